"""The page's model list, status line, form and layout: helpers directly, then the page in a real browser
(Debian's Chromium through Playwright; screenshots in test-artifacts/)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import Page, expect

import app.ui_view as ui_view
import models.downloads as dl
from app.settings import ProfileStore
from app.ui import is_local_request, open_output_folder, status_after
from app.ui_form import FORM_VERSION, clean_form
from models.downloads import FileSpec, missing_report, remote_sizes
from models.registry import install_state, load_definitions
from tests.test_downloads import FILES, REPO, hub, online  # noqa: F401 - fixtures
from tests.test_ui_api import App
from tests.test_ui_browser import browser, choose_model, open_page, screenshot  # noqa: F401 - fixture

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
BASE_URL = "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/ZImageBase_bf16.safetensors"


# ------------------------------------------------------------------ helpers

def job(job_id: str, status: str, **kw) -> dict:
    return {"id": job_id, "status": status, "paths": [], "seconds": 1.0, "error": "", "step": 0, "total": 0,
            "lora_reports": [], **kw}


def test_status_line_follows_the_jobs_it_names():
    a, b = "0123abcd", "4567ef01"
    assert status_after(f"Queued job {a}.", [job(a, "queued")]) is None  # still to run: unchanged
    assert status_after(f"Queued job {a}.", [job(a, "running")]) is None
    assert status_after(f"Queued job {a}.", [job(a, "done", paths=["x.png"], seconds=0.5)]) == \
        f"✔ Job {a} done: 1 image in 0.5 s"
    assert status_after(f"Queued job {a} again.", [job(a, "failed", error="boom")]) == f"✖ Job {a} failed: boom"
    assert status_after(f"Stopping job {a} at step 3/8 after the current step.",
                        [job(a, "aborted", step=3, total=8)]) == f"■ Job {a} aborted: stopped at step 3/8"
    assert status_after(f"Queued job {a}.", []) == f"Job {a} is no longer in the queue."
    both = f"Queued jobs {a}, {b}."
    assert status_after(both, [job(a, "done"), job(b, "queued")]) is None
    assert status_after(both, [job(a, "done"), job(b, "done")]) == f"✔ Jobs {a}, {b} ended: 2 done."
    assert status_after(both, [job(a, "done"), job(b, "failed")]) == f"⚠ Jobs {a}, {b} ended: 1 done, 1 failed."
    # lines that name no pending job are left alone, the poll's own outcome lines included
    for text in ("", "No job is running.", f"Removed job {a}.", f"✔ Job {a} done: 1 image in 0.5 s",
                 "⚠ Not queued: the prompt is empty"):
        assert status_after(text, [job(a, "done")]) is None


def request(host: str, headers: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(client=SimpleNamespace(host=host), headers=headers or {})


def test_only_a_browser_on_this_machine_opens_the_output_folder(tmp_path, monkeypatch):
    assert is_local_request(request("127.0.0.1", {"host": "127.0.0.1:7860"}))
    assert is_local_request(request("::1", {"host": "[::1]:7860"}))
    assert is_local_request(request("127.0.0.1", {"host": "localhost:7860"}))
    assert not is_local_request(request("192.168.1.20", {"host": "192.168.1.5:7860"}))  # --listen, another PC
    assert not is_local_request(request("127.0.0.1", {"host": "abcd.gradio.live"}))  # --share tunnel
    assert not is_local_request(request("127.0.0.1", {"host": "127.0.0.1:7860", "x-forwarded-for": "10.0.0.9"}))
    assert not is_local_request(None)

    opened = []
    monkeypatch.setattr(ui_view, "open_folder", opened.append)
    message = open_output_folder(tmp_path / "out", request("10.0.0.9", {"host": "10.0.0.1:7860"}))
    assert message.startswith("⚠") and "machine that runs the app" in message and opened == []
    message = open_output_folder(tmp_path / "out", request("127.0.0.1", {"host": "127.0.0.1:7860"}))
    assert opened == [(tmp_path / "out").resolve()] and "Opened the output folder" in message

    def no_file_manager(path):
        raise FileNotFoundError(2, "No such file or directory", "xdg-open")

    monkeypatch.setattr(ui_view, "open_folder", no_file_manager)
    message = open_output_folder(tmp_path / "out", request("127.0.0.1", {"host": "127.0.0.1:7860"}))
    assert message.startswith("⚠ Could not open") and "xdg-open" in message


def test_saved_form_is_checked_field_by_field():
    types = ["z_image_base", "z_image_tiny"]
    form = {"version": FORM_VERSION, "model_type": "z_image_tiny", "prompt": "typed", "width": 64.0,
            "num_inference_steps": "many", "guidance_scale": float("nan"), "one_per_line": True, "seed": True,
            "loras": "my_style=0.", "memory_profile": "3"}
    assert clean_form(form, types) == {"model_type": "z_image_tiny", "prompt": "typed", "width": 64,
                                       "one_per_line": True, "loras": "my_style=0.", "memory_profile": "3"}
    assert clean_form({**form, "model_type": "gone"}, types) is None  # a model no longer installed
    assert clean_form({**form, "version": 99}, types) is None
    for junk in (None, "text", [], {}):
        assert clean_form(junk, types) is None


def test_missing_report_lists_files_urls_folders_and_size(hub, tmp_path, monkeypatch):  # noqa: F811 - fixture
    monkeypatch.setattr(dl, "_unreachable_until", 0.0)  # no earlier failure holds the requests back
    specs = [FileSpec(REPO, path, tmp_path.joinpath(*path.split("/"))) for path in FILES]
    offline = missing_report(specs, endpoint=hub.endpoint, offline=True, sizes=remote_sizes(specs, offline=True))
    assert offline.startswith("2 model files are missing (download size unknown offline).")
    assert hub.requests == []  # offline: not one request
    for spec in specs:
        assert f"from: {spec.url(hub.endpoint)}" in offline and f"into: {spec.local_path.parent}/" in offline

    sizes = remote_sizes(specs, endpoint=hub.endpoint, offline=False)
    assert sizes == {s.local_path: len(FILES[s.repo_path]) for s in specs}
    report = missing_report(specs, endpoint=hub.endpoint, offline=False, sizes=sizes)
    assert report.startswith("2 model files are missing (156.2 KB to download).")  # 96,000 + 64,000 bytes
    assert "The first job downloads them" in report and "ZImageBase_bf16.safetensors (93.8 KB)" in report
    n = len(hub.requests)
    remote_sizes(specs, endpoint=hub.endpoint, offline=False)
    assert len(hub.requests) == n  # remembered

    specs[0].local_path.parent.mkdir(parents=True, exist_ok=True)
    specs[0].local_path.write_bytes(FILES[specs[0].repo_path])
    assert missing_report(specs, endpoint=hub.endpoint, offline=False, sizes=sizes).startswith(
        "1 model file is missing (62.5 KB to download).")


def test_unreachable_hub_gives_unknown_sizes_without_asking_again(online, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dl, "_unreachable_until", 0.0)
    calls = []

    def unreachable(spec, url):
        calls.append(url)
        raise dl._Unreachable("no network")

    monkeypatch.setattr(dl, "_metadata", unreachable)
    specs = [FileSpec(REPO, f"nowhere/{path}", tmp_path / path) for path in FILES]
    assert set(remote_sizes(specs, offline=False).values()) == {None}
    assert len(calls) == 1  # the first failure stops the others
    remote_sizes(specs, offline=False)
    assert len(calls) == 1  # and the next page does not wait again


def test_install_state_is_what_the_models_command_lists(tiny_dbm_dir, tmp_path):
    import torch

    defs, _ = load_definitions()
    state = install_state(defs["z_image_base"], tiny_dbm_dir, "bf16", "bf16", torch.device("cpu"))
    assert state.specs and not state.installed  # the tiny file set lacks vocab.json and merges.txt
    assert {s.repo_path for s in state.missing} == {"Qwen3/vocab.json", "Qwen3/merges.txt"}
    assert install_state(defs["z_image_tiny"], tmp_path, "bf16", "bf16", torch.device("cpu")).installed


# ------------------------------------------------------------------ the page

@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("ui_page"), tiny_dir, profiles=True)
    served.store = ProfileStore(served.profiles_dir)
    yield served
    served.close()


@pytest.fixture
def page(browser, app):  # noqa: F811 - the browser fixture imported above
    (app.profiles_dir / ".state" / "last_used.json").unlink(missing_ok=True)  # a page with the model defaults
    with open_page(browser, app.url, height=1400) as pg:
        yield pg


def set_number(page: Page, elem_id: str, value: str) -> None:
    page.fill(f"#{elem_id} input[type=number]", value)
    page.press(f"#{elem_id} input[type=number]", "Enter")


def test_model_list_shows_what_a_model_lacks(page: Page, app):
    page.click("#model-type input")
    expect(page.get_by_role("option", name=re.compile("Base"))).to_contain_text("not downloaded")
    expect(page.get_by_role("option", name=re.compile(r"^Z-Image tiny \("))).not_to_contain_text("not downloaded")
    page.get_by_role("option", name=re.compile("Base")).click()  # the current one: the list closes
    files = page.locator("#model-files")
    expect(files).to_contain_text("Z-Image Base 6B is not installed")  # Base: the page's first model
    expect(files).to_contain_text("10 model files are missing (download size unknown offline)")
    expect(files).to_contain_text(f"from: {BASE_URL}")
    expect(files).to_contain_text(f"into: {app.config.checkpoints_dir / 'Qwen3'}/")
    screenshot(page, "ui-model-not-installed.png")
    choose_model(page, "tiny")
    expect(files).to_be_hidden()
    choose_model(page, "Turbo")
    expect(files).to_contain_text("ZImageTurbo_bf16.safetensors")


def test_status_line_shows_how_the_job_ended(page: Page, app):
    choose_model(page, "tiny")
    for eid, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        set_number(page, eid, value)
    page.fill("#prompt textarea", "a status fox")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    expect(page.locator("#queue-table")).to_contain_text("a status fox")
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    assert app.queue.wait(job_id, timeout=120)["status"] == "done"
    expect(page.locator("#status")).to_contain_text(f"✔ Job {job_id} done: 1 image in")


def test_typed_settings_survive_a_reload(page: Page, app):
    choose_model(page, "tiny")
    page.fill("#prompt textarea", "typed, never generated")
    set_number(page, "steps", "7")
    page.fill("#seed input", "4242")
    page.press("#seed input", "Enter")
    page.wait_for_timeout(300)  # the form is saved by the browser itself, at once; no server round trip
    page.reload()
    page.wait_for_selector("#prompt textarea")
    expect(page.locator("#prompt textarea")).to_have_value("typed, never generated")
    expect(page.locator("#steps input[type=number]")).to_have_value("7")
    expect(page.locator("#seed input")).to_have_value("4242")
    expect(page.locator("#model-type input")).to_have_value(re.compile("tiny"))


# samples the steps box at every frame from the first one: its value whenever it can be seen
SAMPLER = """
window.__steps = [];
const sample = () => {
  const el = document.querySelector('#steps input[type=number]');
  if (el && el.checkVisibility({visibilityProperty: true})) window.__steps.push(el.value);
  requestAnimationFrame(sample);
};
requestAnimationFrame(sample);
"""


def test_page_never_shows_the_first_models_defaults_before_the_last_used(browser, app):  # noqa: F811
    warnings = app.store.save_last_used({"model_type": "z_image_tiny", "prompt": "the last used fox",
                                         "width": 64, "height": 64, "num_inference_steps": 5})
    assert warnings == []
    context = browser.new_context(viewport={"width": 1600, "height": 1100})
    try:
        pg = context.new_page()
        pg.add_init_script(SAMPLER)
        from tests.test_ui_browser import local_only

        pg.route("**/*", local_only)
        pg.goto(app.url)
        expect(pg.locator("#prompt textarea")).to_have_value("the last used fox", timeout=60_000)
        expect(pg.locator("#steps input[type=number]")).to_have_value("5")
        seen = pg.evaluate("window.__steps")
        assert seen and set(seen) == {"5"}, f"the steps box showed {sorted(set(seen))} (Base has 30)"
    finally:
        context.close()


def test_profile_section_is_compact(page: Page, app, tmp_path):
    for eid in ("profile-load", "profile-delete", "profile-save", "profile-rename", "profile-import"):
        box = page.locator(f"#{eid}").bounding_box()
        assert box is not None and box["height"] <= 44, (eid, box)  # their own height, not the row's
    expect(page.locator("#profile-export-file")).to_be_hidden()  # nothing exported yet: no empty box
    screenshot(page, "ui-profiles.png")

    # import: a button whose file goes straight in
    profile = tmp_path / "from disk.json"
    profile.write_text(json.dumps({"schema_version": 2, "model_type": "z_image_tiny", "prompt": "an imported fox",
                                   "width": 64, "height": 64}))
    page.fill("#profile-name input", "button import")
    with page.expect_file_chooser() as chooser:
        page.click("#profile-import")
    chooser.value.set_files(str(profile))
    expect(page.locator("#profile-status")).to_contain_text("Imported generation profile button import")
    assert app.store.load("button import")[0]["prompt"] == "an imported fox"
    # export: the file box appears with the file to download
    page.click("#profile-export")
    expect(page.locator("#profile-export-file")).to_be_visible()
    expect(page.locator("#profile-export-file")).to_contain_text("button import")
    app.store.delete("button import")


def test_random_seed_button(page: Page):
    page.fill("#seed input", "123")
    page.press("#seed input", "Enter")
    page.click("#random-seed")
    expect(page.locator("#seed input")).to_have_value("-1")


def test_open_output_folder_from_this_machine(page: Page, app, monkeypatch):
    opened = []
    monkeypatch.setattr(ui_view, "open_folder", opened.append)  # the app runs in this process
    page.click("#open-output-folder")  # shown: this browser is on the app's machine
    expect(page.locator("#status")).to_contain_text("Opened the output folder")
    assert opened == [Path(app.config.output_dir).resolve()]


def test_long_result_stays_one_short_row_and_expands(page: Page, app):
    (job_id,) = app.generate("a base fox", model_type="z_image_base")  # offline, no weights: a long error
    error = app.wait_done([job_id])[job_id]["error"]
    assert len(error) > ui_view.TABLE_MAX_CHARS
    row = page.locator("#queue-table [role=row]", has_text=job_id).first
    expect(row).to_be_visible()
    box = row.bounding_box()
    assert box is not None and box["height"] <= 90, box  # was about 220 px: a word or two per line
    cell = row.locator("[role=gridcell]").last
    expect(cell).not_to_contain_text(error)
    cell.click()  # shows the whole text
    expect(cell).to_contain_text(error)
    app.client.predict(job_id, api_name="/remove")
