"""The page's LoRA selection and generation profiles: gradio_client against the app served in-process,
then the same in a real browser (Debian's Chromium through Playwright; screenshots in test-artifacts/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import Page, expect

from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.settings import ProfileStore
from app.ui import build_ui, launch_options
from app.ui_loras import insert_word, parse_selection, sync_lines
from models.errors import UserError
from tests.test_lora_formats import load_tiny_transformer, write_lora
from tests.test_ui_api import App, free_port, pixels
from tests.test_ui_browser import browser, open_page, screenshot  # noqa: F401  (browser: a fixture)

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
STYLE = "my_style"
TRIGGER = "zzstyle"


class LoraApp(App):
    """The served app with a LoRA folder (one LoRA written from the tiny model's shapes) and a profiles folder."""

    def __init__(self, root: Path, tiny_dir: Path):
        (root / "ckpts").mkdir(parents=True)
        (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
        self.lora_dir = root / "loras"
        self.lora_dir.mkdir()
        self.transformer = load_tiny_transformer(tiny_dir)
        write_lora(self.lora_dir, "diffusers_peft", self.transformer, seed=1, name=STYLE,
                   metadata={"modelspec.trigger_phrase": TRIGGER})
        write_lora(self.lora_dir, "kohya_musubi", self.transformer, seed=2, name="later")
        self.profiles_dir = root / "profiles"
        self.store = ProfileStore(self.profiles_dir)
        self.config = ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs",
                                    lora_dirs={"z_image": self.lora_dir})
        self.service = GenerationService(self.config)
        self.queue = JobQueue(self.service, root / "queue.json").start()
        self.demo = build_ui(self.queue, self.service, self.config, profiles_dir=self.profiles_dir)
        self.port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True, quiet=True,
                         ssr_mode=False, **launch_options(self.config.output_dir))
        self.url = f"http://127.0.0.1:{self.port}/"
        from gradio_client import Client

        self.client = Client(self.url, verbose=False)


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = LoraApp(tmp_path_factory.mktemp("ui_loras"), tiny_dir)
    yield served
    served.close()


# ------------------------------------------------------------------ pure helpers

def test_strengths_stay_bound_to_names():
    text = sync_lines(["a", "b"], "")
    assert text == "a=1.0\nb=1.0"
    text = "a=0.5\nb=1.0,0.25"
    assert sync_lines(["b", "a"], text) == "b=1.0,0.25\na=0.5"  # reordered: strengths move with their names
    assert sync_lines(["b"], text) == "b=1.0,0.25"  # a removed: b keeps its own
    assert sync_lines(["b", "c"], text) == "b=1.0,0.25\nc=1.0"
    assert parse_selection("a=0.5\nb=1.0,0.25\n\nc") == [
        {"name": "a", "strength": 0.5}, {"name": "b", "strength": "1.0,0.25"}, {"name": "c", "strength": 1.0}]
    assert parse_selection('[{"name": "a", "strength": "0.8"}]') == [{"name": "a", "strength": 0.8}]
    assert parse_selection([{"name": "a"}]) == [{"name": "a", "strength": 1.0}]
    for bad in ("a=strong", "a=1\na=2", '[{"strength": 1}]', "[oops"):
        with pytest.raises(UserError):
            parse_selection(bad)
    assert insert_word("a fox", TRIGGER) == f"a fox, {TRIGGER}"
    assert insert_word("", TRIGGER) == TRIGGER
    assert insert_word(f"a fox, {TRIGGER}", TRIGGER) == f"a fox, {TRIGGER}"


# ------------------------------------------------------------------ gradio_client

def test_lora_applied_by_name_with_its_report(app):
    (plain,) = app.generate("a lora fox", seed=7)
    (styled,) = app.generate("a lora fox", seed=7, loras=f"{STYLE}=0.8")
    (scheduled,) = app.generate("a lora fox", seed=7, loras=json.dumps([{"name": STYLE, "strength": "1.0,0.5"}]))
    jobs = app.wait_done([plain, styled, scheduled])
    for i in (plain, styled, scheduled):
        assert jobs[i]["status"] == "done", jobs[i]["error"]
    assert jobs[styled]["spec"]["loras"] == [{"name": STYLE, "strength": 0.8}]
    assert jobs[scheduled]["spec"]["loras"] == [{"name": STYLE, "strength": "1.0,0.5"}]
    report = " ".join(jobs[styled]["lora_reports"])
    assert re.search(rf"LoRA {STYLE}.*(\d+) of \1 tensors applied", report), report
    assert not np.array_equal(pixels(jobs[plain]["paths"][0]), pixels(jobs[styled]["paths"][0]))
    assert not np.array_equal(pixels(jobs[styled]["paths"][0]), pixels(jobs[scheduled]["paths"][0]))


def test_unknown_lora_is_refused_and_the_server_stays_up(app):
    before = len(app.jobs())
    with pytest.raises(AppError, match="unknown LoRA 'nope'"):
        app.generate("a fox", loras="nope=1.0")
    with pytest.raises(AppError, match="must be a number"):
        app.generate("a fox", loras=f"{STYLE}=very")
    with pytest.raises(AppError, match="invalid LoRA name"):
        app.generate("a fox", loras="../escape=1")
    assert len(app.jobs()) == before
    (job_id,) = app.generate("still up")  # existing callers (no loras argument) keep working
    assert app.wait_done([job_id])[job_id]["status"] == "done"


def test_lora_refresh_lists_new_files(app):
    (app.lora_dir / "sub").mkdir()
    write_lora(app.lora_dir, "kohya_musubi", app.transformer, seed=3, name="sub/newer")
    result = app.client.predict([], "", "z_image_tiny", api_name="/lora_refresh")
    assert set(result[-1]) >= {STYLE, "later", "sub/newer"}


def controls(prompt: str = "a saved fox", loras: str = f"{STYLE}=0.6", seed: int = 42) -> list:
    """/profile_save's values in order: the model, the prompt, each parameter a profile keeps, the LoRAs."""
    from app.ui_form import form_params

    given = {"negative_prompt": "blurry", "width": 64, "height": 64, "num_inference_steps": 3,
             "guidance_scale": 2.5, "flow_shift": 5.0, "seed": seed}
    return ["z_image_tiny", prompt, *(given.get(p.name, p.default) for p in form_params() if p.in_profile), loras]


def test_profile_save_list_load_export_delete(app):
    app.client.predict("api fox", False, *controls(), api_name="/profile_save")
    names = {p["name"]: p for p in app.client.predict(api_name="/profile_list")}
    assert "api fox" in names and not names["api fox"]["broken"]
    with pytest.raises(AppError, match="already exists"):
        app.client.predict("api fox", False, *controls(), api_name="/profile_save")
    (app.profiles_dir / "broken.json").write_text("{not json")
    assert {p["name"]: p for p in app.client.predict(api_name="/profile_list")}["broken"]["broken"]

    from tests.test_ui_restore import restore_outputs

    out = app.client.predict("api fox", api_name="/profile_load")
    named = dict(zip(restore_outputs(), out, strict=True))  # the same controls as /restore's, then the status
    (model, prompt, width, height, steps, guidance, flow, seed, n, selected, strengths, status) = (
        named[k] for k in ("model", "prompt", "width", "height", "steps", "guidance", "flow_shift", "seed",
                           "num_images", "lora_select", "lora_strengths", "message"))
    assert (model, prompt, width, height, steps, guidance, flow, seed, n) == (
        "z_image_tiny", "a saved fox", 64, 64, 3, 2.5, 5.0, 42, 1)
    selected = selected["value"] if isinstance(selected, dict) else selected  # an update: choices refreshed too
    assert selected == [STYLE] and strengths == f"{STYLE}=0.6" and "Loaded" in status
    with pytest.raises(AppError, match="broken"):
        app.client.predict("broken", api_name="/profile_load")

    path, _ = app.client.predict("api fox", api_name="/profile_export")
    exported = json.loads(Path(path).read_text())
    assert exported["prompt"] == "a saved fox" and exported["loras"] == [{"name": STYLE, "strength": 0.6}]

    app.client.predict(handle_file(path), "imported fox", False, api_name="/profile_import")
    imported, _ = app.store.load("imported fox")
    assert imported["prompt"] == "a saved fox" and imported["loras"] == [{"name": STYLE, "strength": 0.6}]
    app.client.predict("imported fox", api_name="/profile_delete")

    app.client.predict("api fox", "renamed fox", False, api_name="/profile_rename")
    app.client.predict("renamed fox", api_name="/profile_delete")
    names = {p["name"] for p in app.client.predict(api_name="/profile_list")}
    assert "api fox" not in names and "renamed fox" not in names
    (app.profiles_dir / "broken.json").unlink()


def test_profile_exports_reuse_one_folder(app, monkeypatch):
    """Each export made a new temporary folder that was never removed: now one folder, one file per profile,
    the files of deleted profiles dropped."""
    import tempfile

    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    for name in ("export one", "export two"):
        app.client.predict(name, True, *controls(), api_name="/profile_save")
    for name in ("export one", "export two", "export one", "export two"):
        path, _ = app.client.predict(name, api_name="/profile_export")
        assert json.loads(Path(path).read_text())["prompt"] == "a saved fox"
    ours = [Path(m) for m in made if Path(m).name.startswith("wgp-zimage-profile-")]
    assert len(ours) <= 1  # none when an earlier test of this module made the folder
    folder = ours[0] if ours else max((f.parent for f in Path(tempfile.gettempdir()).glob(
        "wgp-zimage-profile-*/export two.json")), key=lambda f: f.stat().st_mtime)
    assert sorted(f.name for f in folder.iterdir()) == ["export one.json", "export two.json"]
    app.client.predict("export two", api_name="/profile_delete")
    app.client.predict("export one", api_name="/profile_export")
    assert sorted(f.name for f in folder.iterdir()) == ["export one.json"]
    app.client.predict("export one", api_name="/profile_delete")


def test_generate_saves_the_last_used_settings(app):
    (job_id,) = app.generate("remember me", seed=9, loras=f"{STYLE}=0.3")
    last, _ = app.store.load_last_used()
    assert last["prompt"] == "remember me" and last["seed"] == 9 and last["model_type"] == "z_image_tiny"
    assert last["loras"] == [{"name": STYLE, "strength": 0.3}]
    app.wait_done([job_id])


def test_set_as_default_for_this_model(app):
    app.client.predict(*controls(), api_name="/profile_set_default")
    user, _ = app.store.get_model_defaults("z_image_tiny")
    assert user["num_inference_steps"] == 3 and user["guidance_scale"] == 2.5
    assert app.store.clear_model_defaults("z_image_tiny")


# ------------------------------------------------------------------ the browser

@pytest.fixture
def page(browser, app):  # noqa: F811 - the browser fixture imported above
    (app.profiles_dir / ".state" / "last_used.json").unlink(missing_ok=True)  # a page with the model defaults
    with open_page(browser, app.url, height=1400) as pg:
        yield pg


def choose(page: Page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option, exact=True).click()


def new_job(page: Page, app: LoraApp, before: set[str]) -> dict:
    # "Queued job X.", or already how it ended (the status line follows the job)
    expect(page.locator("#status")).to_contain_text(re.compile(r"(Queued job|Job) [0-9a-f]{8}"))
    (job_id,) = {j["id"] for j in app.queue.snapshot()} - before
    return app.queue.wait(job_id, timeout=120)


def test_browser_pick_a_lora_and_generate(page: Page, app):
    choose(page, "model-type", app.service.definitions["z_image_tiny"].name)
    expect(page.locator("#steps input[type=number]")).to_have_value("8")
    page.fill("#width input[type=number]", "64")
    page.press("#width input[type=number]", "Enter")
    page.fill("#height input[type=number]", "64")
    page.press("#height input[type=number]", "Enter")
    page.fill("#steps input[type=number]", "2")
    page.press("#steps input[type=number]", "Enter")
    page.fill("#prompt textarea", "a browser fox")
    choose(page, "lora-select", STYLE)
    page.keyboard.press("Escape")
    expect(page.locator("#lora-strengths textarea")).to_have_value(f"{STYLE}=1.0")
    page.fill("#lora-strengths textarea", f"{STYLE}=0.7")
    page.locator("#lora-strengths textarea").blur()
    page.get_by_text(TRIGGER, exact=True).click()  # click-to-insert
    expect(page.locator("#prompt textarea")).to_have_value(f"a browser fox, {TRIGGER}")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    job = new_job(page, app, before)
    assert job["status"] == "done", job["error"]
    assert job["spec"]["loras"] == [{"name": STYLE, "strength": 0.7}] and job["spec"]["width"] == 64
    # the result cell is cut short in the table; a click shows all of it
    result = page.locator("#queue-table [role=row]", has_text=job["id"]).first.locator("[role=gridcell]").last
    result.click()
    expect(result).to_contain_text("tensors applied")
    screenshot(page, "ui-lora-generate.png")

    # strengths follow their LoRA by name when another one is added or removed
    choose(page, "lora-select", "later")
    page.keyboard.press("Escape")
    expect(page.locator("#lora-strengths textarea")).to_have_value(f"{STYLE}=0.7\nlater=1.0")
    page.fill("#lora-strengths textarea", f"{STYLE}=0.7\nlater=0.2")
    page.locator("#lora-strengths textarea").blur()
    page.locator(f"#lora-select .token:has-text('{STYLE}') .token-remove").click()
    expect(page.locator("#lora-strengths textarea")).to_have_value("later=0.2")
    choose(page, "lora-select", STYLE)
    page.keyboard.press("Escape")
    expect(page.locator("#lora-strengths textarea")).to_have_value(f"later=0.2\n{STYLE}=1.0")


def test_browser_profile_save_reload_load_generate(page: Page, app):
    tiny = app.service.definitions["z_image_tiny"].name
    choose(page, "model-type", tiny)
    expect(page.locator("#width input[type=number]")).to_have_value("256")  # the model's defaults came
    page.fill("#prompt textarea", "a profiled fox")
    for eid, value in (("width", "64"), ("height", "64"), ("steps", "3")):
        page.fill(f"#{eid} input[type=number]", value)
        page.press(f"#{eid} input[type=number]", "Enter")
    page.fill("#seed input", "321")
    page.press("#seed input", "Enter")
    page.fill("#lora-strengths textarea", f"{STYLE}=0.4")
    page.locator("#lora-strengths textarea").blur()
    expect(page.locator("#lora-select")).to_contain_text(STYLE)
    expect(page.locator("#width input[type=number]")).to_have_value("64")
    page.fill("#profile-name input", "browser fox")
    page.click("#profile-save")
    expect(page.locator("#profile-status")).to_contain_text("Saved generation profile browser fox")
    assert app.store.exists("browser fox")

    page.reload()
    page.wait_for_selector("#prompt textarea")
    # a page that opens shows a fresh profile list; switch the controls away from the profile first
    page.fill("#prompt textarea", "something else")
    page.fill("#lora-strengths textarea", "")
    choose(page, "profile-select", "browser fox")
    page.click("#profile-load")
    expect(page.locator("#profile-status")).to_contain_text("Loaded generation profile browser fox")
    expect(page.locator("#prompt textarea")).to_have_value("a profiled fox")
    expect(page.locator("#steps input[type=number]")).to_have_value("3")
    expect(page.locator("#lora-strengths textarea")).to_have_value(f"{STYLE}=0.4")
    before = {j["id"] for j in app.queue.snapshot()}
    page.click("#generate")
    job = new_job(page, app, before)
    assert job["status"] == "done", job["error"]
    spec = job["spec"]
    assert (spec["prompt"], spec["width"], spec["num_inference_steps"], spec["seed"]) == ("a profiled fox", 64, 3, 321)
    assert spec["loras"] == [{"name": STYLE, "strength": 0.4}]
    screenshot(page, "ui-profile-generate.png")

    page.reload()  # the last used settings come back on their own
    page.wait_for_selector("#prompt textarea")
    expect(page.locator("#prompt textarea")).to_have_value("a profiled fox")
    expect(page.locator("#lora-strengths textarea")).to_have_value(f"{STYLE}=0.4")
    app.store.delete("browser fox")
