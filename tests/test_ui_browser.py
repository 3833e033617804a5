"""The page in a real browser (Debian's Chromium through Playwright): generate, reload, model defaults.

Never skipped: without /usr/bin/chromium these tests fail and say how to install it.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import ROOT
from tests.test_ui_api import App

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 120_000
# a slow or busy machine answers a click in more than Playwright's default 5 s of `expect`
expect.set_options(timeout=30_000)
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("ui_browser"), tiny_dir)
    yield served
    served.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium` "
                    "(never `playwright install`); the browser tests do not skip")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def local_only(route) -> None:
    """Nothing leaves the machine: fonts, CDNs and trackers are refused."""
    url = route.request.url
    if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()


@contextlib.contextmanager
def open_page(browser, url: str, height: int = 1100):
    """The app's page in a fresh browser context, non-loopback requests refused, once its prompt box is up."""
    context = browser.new_context(viewport={"width": 1600, "height": height})
    try:
        pg = context.new_page()
        pg.route("**/*", local_only)
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(url)
        pg.wait_for_selector("#prompt textarea")
        yield pg
    finally:
        context.close()


@pytest.fixture
def page(browser, app):
    with open_page(browser, app.url) as pg:
        yield pg


def choose_model(page: Page, name: str) -> None:
    """name: the word after "Z-Image" in the model's name (Base, Turbo, TwinFlow, tiny); the plain model, not
    its ControlNet types ("Z-Image Turbo ControlNet Union ...")."""
    page.click("#model-type input")
    page.get_by_role("option", name=re.compile(rf"^Z-Image {name}\b(?! ControlNet)")).click()


def number(page: Page, elem_id: str) -> str:
    return page.input_value(f"#{elem_id} input[type=number]")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_generate_survives_reload(page: Page, app):
    choose_model(page, "tiny")
    expect(page.locator("#steps input[type=number]")).to_have_value("8")  # the tiny model's defaults
    expect(page.locator("#width input[type=number]")).to_have_value("256")
    page.fill("#prompt textarea", "a red fox in the snow")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    expect(page.locator("#queue-table")).to_contain_text("a red fox in the snow")
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    # "Queued job X.", or already how it ended (the status line follows the job)
    expect(page.locator("#status")).to_contain_text(re.compile(rf"(Queued job|Job) {job_id}"))

    page.reload()  # the tab goes away mid-job: the job must not care
    page.wait_for_selector("#prompt textarea")
    expect(page.locator("#gallery img").first).to_be_visible()
    table = page.locator("#queue-table")
    expect(table).to_contain_text(job_id)
    expect(table).to_contain_text("done")
    assert app.queue.get(job_id)["status"] == "done"
    screenshot(page, "ui-after-generate.png")

    page.reload()  # a fresh tab still shows the queue and the results
    page.wait_for_selector("#prompt textarea")
    expect(page.locator("#queue-table")).to_contain_text(job_id)
    expect(page.locator("#gallery img").first).to_be_visible()
    expect(page.locator("#progress")).to_contain_text(f"Last job ✔ {job_id} done")
    screenshot(page, "ui-after-reload.png")


def test_model_type_sets_defaults_and_negative_prompt(page: Page):
    expect(page.locator("#negative-prompt textarea")).to_be_visible()  # Base: CFG, negative prompt
    expect(page.locator("#steps input[type=number]")).to_have_value("30")
    choose_model(page, "Turbo")
    expect(page.locator("#negative-prompt")).to_be_hidden()  # Turbo runs without CFG
    expect(page.locator("#steps input[type=number]")).to_have_value("8")
    expect(page.locator("#guidance input[type=number]")).to_have_value("0")
    expect(page.locator("#flow-shift")).to_be_hidden()  # under Advanced for Turbo: test_ui_browser_config.py
    choose_model(page, "Base")
    expect(page.locator("#negative-prompt textarea")).to_be_visible()
    expect(page.locator("#flow-shift input[type=number]")).to_have_value("6")


def test_bad_input_shows_a_message(page: Page, app):
    before = len(app.queue.snapshot())
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    expect(page.get_by_text("the prompt is empty").first).to_be_visible()  # the toast
    expect(page.locator("#status")).to_contain_text("Not queued: the prompt is empty")  # stays after it fades
    assert len(app.queue.snapshot()) == before
    screenshot(page, "ui-bad-input.png")
    # the page keeps working after the error
    page.click("#abort")
    expect(page.locator("#status")).to_contain_text("No job is running.")


@pytest.mark.parametrize("elem_id, typed, message", [
    ("steps", "500", "Steps (--steps) must be between 1 and 100 (got 500)"),
    ("width", "1000", "Width (--width) must be a multiple of 16 (got 1000)"),
])
def test_out_of_range_values_get_the_clis_message(page: Page, app, elem_id, typed, message):
    """A value typed out of range is refused with the message the CLI gives for it, not clamped and run."""
    before = len(app.queue.snapshot())
    page.fill("#prompt textarea", "a fox")
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(typed)
    box.press("Enter")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(f"Not queued: {message}")
    assert len(app.queue.snapshot()) == before
