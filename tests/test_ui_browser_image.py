"""The image input in a real browser: upload a picture, paint the area to repaint with the brush, generate;
the result is in the gallery and, outside the painted area, it is the input's own pixels (paste-back)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.test_ui_api import App
from tests.test_ui_browser import browser, choose_model, local_only, open_page, screenshot  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("ui_browser_image"), tiny_dir)
    yield served
    served.close()


@pytest.fixture
def page(browser, app):  # noqa: F811
    with open_page(browser, app.url, height=1400) as pg:
        yield pg


def grown(mask: np.ndarray, px: int) -> np.ndarray:
    """mask grown by px in every direction (a square neighbourhood: at least the Euclidean one)."""
    out = mask.copy()
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_paint_a_mask_and_inpaint(page: Page, app, tmp_path: Path):
    y, x = np.mgrid[0:256, 0:256]
    source = tmp_path / "picture.png"
    Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)).save(source)
    choose_model(page, "tiny")
    page.fill("#prompt textarea", "a painted fox")
    for elem_id, value in (("steps", "2"), ("width", "256"), ("height", "256")):
        page.fill(f"#{elem_id} input", value)
    page.locator("#image-input").click()  # the accordion
    expect(page.locator("#strength")).to_be_hidden()  # the input's own settings show once there is one
    page.set_input_files("#image input[type=file]", str(source))
    expect(page.locator("#strength")).to_be_visible(timeout=60_000)
    expect(page.locator("#paste-back")).to_be_visible()

    page.locator("#image button[aria-label=Brush]").click()
    box = page.locator("#image canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    page.mouse.move(cx + 30, cy, steps=12)
    page.mouse.up()
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    # "Queued job X", how it ended already, or "Not queued: why"
    expect(page.locator("#status")).to_contain_text(re.compile(r"ueued|Job"), timeout=60_000)
    assert "Not queued" not in page.inner_text("#status"), page.inner_text("#status")
    expect(page.locator("#queue-table")).to_contain_text("a painted fox")
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    expect(page.locator("#queue-table")).to_contain_text("done", timeout=120_000)
    job = app.queue.get(job_id)
    assert job["status"] == "done", job["error"]
    expect(page.locator("#gallery img").first).to_be_visible()
    screenshot(page, "ui-inpaint.png")

    painted = np.asarray(Image.open(job["spec"]["mask"]).convert("L")) >= 128
    assert 0 < painted.mean() < 0.5  # a stroke, not the whole picture
    result = np.asarray(Image.open(job["paths"][0]).convert("RGB")).astype(int)
    original = np.asarray(Image.open(source).convert("RGB")).astype(int)
    far = ~grown(painted, 12)
    assert far.any() and np.array_equal(result[far], original[far])
    assert np.abs(result[painted] - original[painted]).max() > 10  # the stroke was repainted


def test_use_the_new_image_as_input(page: Page, app):
    """Right after a job, its image is shown large: "Use as input image" takes that one without a click on its
    thumbnail, and the input's own settings (strength, paste-back) show, as after an upload."""
    choose_model(page, "tiny")
    page.fill("#prompt textarea", "a fox to reuse")
    for elem_id, value in (("steps", "2"), ("width", "64"), ("height", "64")):
        page.fill(f"#{elem_id} input", value)
    page.locator("#image-input").click()  # the accordion
    expect(page.locator("#strength")).to_be_hidden()
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    expect(page.locator("#queue-table")).to_contain_text("a fox to reuse", timeout=60_000)
    (first,) = {j["id"] for j in app.queue.snapshot()} - before
    app.queue.wait(first, timeout=120)
    made = Path(app.queue.get(first)["paths"][0]).name
    expect(page.locator("#gallery")).to_contain_text("a fox to reuse", timeout=30_000)  # shown large, captioned
    page.click("#use-as-input")
    expect(page.locator("#strength")).to_be_visible(timeout=30_000)
    expect(page.locator("#paste-back")).to_be_visible()
    page.fill("#prompt textarea", "the fox again")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    expect(page.locator("#queue-table")).to_contain_text("the fox again", timeout=60_000)
    (second,) = {j["id"] for j in app.queue.snapshot()} - before
    image = app.queue.get(second)["spec"]["image"]
    assert image, "the second job is text-to-image"
    # the job is img2img, from the image shown
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")),
                          np.asarray(Image.open(Path(app.queue.get(first)["paths"][0])).convert("RGB"))), made
