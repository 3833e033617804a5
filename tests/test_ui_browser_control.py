"""The control section in a real browser: it shows for a ControlNet type only; pick the tiny control type,
upload a picture, choose canny: the map preview appears (OpenCV's edges of the picture); generate: the result is
in the gallery and the job used the map (saved beside the output)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import pixels
from tests.test_control_page import expected_canny
from tests.test_ui_api import App
from tests.test_ui_browser import browser, choose_model, local_only, open_page, screenshot  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser_control")
    model_dir = Path(shutil.copytree(tiny_dir, root / "model"))  # the control type writes its ControlNet there
    served = App(root / "app", model_dir)
    yield served
    served.close()


@pytest.fixture
def page(browser, app):  # noqa: F811
    with open_page(browser, app.url, height=1600) as pg:
        yield pg


def test_control_image_preview_and_generate(page: Page, app, tmp_path: Path):
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 2, y * 3, (x + y)], -1).astype(np.uint8)
    rgb[16:40, 12:44] = 255
    source = tmp_path / "scene.png"
    Image.fromarray(rgb).save(source)

    choose_model(page, "tiny")
    expect(page.locator("#control-section")).to_be_hidden()  # no ControlNet: no control section
    page.click("#model-type input")
    page.get_by_role("option", name=re.compile(r"^Z-Image tiny ControlNet")).click()
    expect(page.locator("#control-section")).to_be_visible(timeout=30_000)
    page.fill("#prompt textarea", "a fenced field")
    for elem_id, value in (("steps", "2"), ("width", "64"), ("height", "64")):
        page.fill(f"#{elem_id} input", value)
        page.press(f"#{elem_id} input", "Tab")
    page.set_input_files("#control-image input[type=file]", str(source))
    expect(page.locator("#control-map-preview img")).to_be_visible(timeout=60_000)
    page.click("#control-type input")
    page.get_by_role("option", name="canny", exact=True).click()
    # the preview is redrawn as the canny map: wait for an image whose source changed
    first = page.get_attribute("#control-map-preview img", "src")
    page.wait_for_function("(s) => { const i = document.querySelector('#control-map-preview img'); "
                           "return i && i.src && i.src !== s; }", arg=first, timeout=60_000)
    screenshot(page, "ui-control.png")

    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(re.compile(r"ueued|Job"), timeout=60_000)
    assert "Not queued" not in page.inner_text("#status"), page.inner_text("#status")
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    expect(page.locator("#queue-table")).to_contain_text("done", timeout=120_000)
    job = app.queue.get(job_id)
    assert job["status"] == "done", job["error"]
    expect(page.locator("#gallery img").first).to_be_visible()
    assert job["spec"]["model_type"] == "z_image_tiny_control" and job["spec"]["control_type"] == "canny"
    stem = Path(job["paths"][0]).with_suffix("")
    assert np.array_equal(pixels(Path(f"{stem}_control.png")), expected_canny(source, 64, 64))

    # the result as the next control image: the section shows it and its map
    before = page.get_attribute("#control-map-preview img", "src")
    page.locator("#gallery img").first.click()
    page.click("#use-as-control")
    page.wait_for_function("(s) => { const i = document.querySelector('#control-map-preview img'); "
                           "return i && i.src && i.src !== s; }", arg=before, timeout=60_000)
    expect(page.locator("#control-image img")).to_be_visible()
