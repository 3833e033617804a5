"""The page in a real browser (Debian's Chromium through Playwright): the Config section's Save, Turbo's flow
shift under Advanced with the per-job memory profile, and dropping a settings JSON. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect

from app.metadata import settings_json
from tests.test_ui_api import App
from tests.test_ui_browser import browser, choose_model, open_page, screenshot  # noqa: F401 (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("ui_browser_config"), tiny_dir)
    yield served
    served.close()


@pytest.fixture
def page(browser, app):  # noqa: F811 - the browser fixture imported above
    with open_page(browser, app.url, height=1400) as pg:
        yield pg


def open_accordion(page: Page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id}").get_by_role("button", name=label).first.click()


def choose(page: Page, elem_id: str, option: str | re.Pattern) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option).first.click()


def test_config_save_writes_the_file(page: Page, app):
    path = app.config.output_dir / "wgp_zimage_config.json"
    open_accordion(page, "config", "Config")
    expect(page.locator("#system-info")).to_contain_text("Device")
    choose(page, "cfg-output-format", re.compile("^webp$"))
    choose(page, "cfg-memory-profile", re.compile("^2 · "))
    try:
        page.click("#cfg-save")
        expect(page.locator("#cfg-message")).to_contain_text(f"Saved to {path}")
        saved = json.loads(path.read_text())
        assert saved["output_format"] == "webp" and saved["memory_profile"] == 2
        assert app.service.config.output_format == "webp"  # output options apply at once
        expect(page.locator("#system-info")).to_contain_text("Memory profile 2")
        screenshot(page, "ui-config-saved.png")
    finally:  # the module's app goes on with its own settings
        app.service.config.output_format, app.service.config.memory_profile = "png", 4


def test_turbo_flow_shift_lives_under_advanced(page: Page, app):
    main, adv = page.locator("#flow-shift"), page.locator("#flow-shift-advanced")
    expect(main).to_be_visible()  # Base: in the main controls
    expect(adv).to_be_hidden()
    choose_model(page, "Turbo")
    expect(main).to_be_hidden()
    open_accordion(page, "advanced", "Advanced")
    expect(adv).to_be_visible()
    expect(adv.locator("input[type=number]")).to_have_value("3")  # Turbo's default reached the advanced slider
    choose_model(page, "Base")
    expect(main.locator("input[type=number]")).to_have_value("6")
    expect(adv).to_be_hidden()

    # it still works there: the job gets the advanced slider's value (and the per-job memory profile)
    choose_model(page, "Turbo")
    adv.locator("input[type=number]").fill("4.5")
    adv.locator("input[type=number]").press("Enter")
    choose(page, "memory-profile-override", re.compile("^3 · "))
    page.fill("#prompt textarea", "an advanced fox")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    # "Queued job X.", or already how it ended (the status line follows the job)
    expect(page.locator("#status")).to_contain_text(re.compile(r"(Queued job|Job) [0-9a-f]{8}"))
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    spec = app.queue.get(job_id)["spec"]
    assert (spec["model_type"], spec["flow_shift"], spec["memory_profile"]) == ("z_image", 4.5, 3)
    expect(page.locator("#queue-table")).to_contain_text("memory profile 3")
    screenshot(page, "ui-turbo-advanced.png")
    # Turbo's weights are not on this machine (offline): the job fails cleanly; remove it
    app.queue.wait(job_id, timeout=120)
    app.queue.remove(job_id)


def test_drop_a_settings_json(page: Page, app, tmp_path):
    good = tmp_path / "fox settings.json"
    good.write_text(settings_json({"model_type": "z_image_tiny", "prompt": "a dropped fox", "negative_prompt": "",
                                   "width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 2.0,
                                   "flow_shift": 5.0, "seed": 99, "loras": [{"name": "gone", "strength": 1.0}]}))
    page.locator("#restore-png input[type=file]").set_input_files(str(good))
    message = page.locator("#restore-message")
    expect(message).to_contain_text("Settings restored from the image settings 'fox settings.json'")
    expect(message).to_contain_text("LoRA 'gone' is no longer available; dropped")
    expect(page.locator("#prompt textarea")).to_have_value("a dropped fox")
    expect(page.locator("#steps input[type=number]")).to_have_value("3")
    expect(page.locator("#seed input")).to_have_value("99")
    screenshot(page, "ui-drop-settings-json.png")

    bad = tmp_path / "broken.json"
    bad.write_text("{oops")
    # the box emptied itself after reading the first file: the next one drops straight in
    expect(page.locator("#restore-png button[aria-label=Clear]")).to_have_count(0)
    page.locator("#restore-png input[type=file]").set_input_files(str(bad))
    expect(message).to_contain_text("Not restored: settings file 'broken.json' is not valid JSON")
    expect(page.locator("#prompt textarea")).to_have_value("a dropped fox")  # nothing else changed


def test_config_facts_are_current_without_refresh(browser, app):  # noqa: F811 - the browser fixture
    """The Config section shows the facts of now (the page was built before any model loaded): on page load,
    after a job ends, and after an unload from elsewhere (the API, another tab), with no click on Refresh."""
    app.wait_done(app.generate("facts"))
    with open_page(browser, app.url, height=1400) as page:
        open_accordion(page, "config", "Config")
        info = page.locator("#system-info")
        expect(info).to_contain_text("Model loaded", timeout=3000)
        assert app.client.predict(api_name="/unload_models") == "Models unloaded."
        expect(info).to_contain_text("Model not loaded", timeout=3000)
        app.wait_done(app.generate("facts again"))
        expect(info).to_contain_text("Model loaded", timeout=3000)
