"""The page's event handlers (app/ui_controller.PageController) called directly: no Blocks, no browser, no server.
The queue is never started, so submitted jobs wait and nothing renders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.settings import ProfileStore
from app.ui_controller import PageController
from app.ui_form import form_params
from models.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request warns

FORM = {"model_type": "z_image_tiny", "prompt": "a fox", "one_per_line": False, "negative_prompt": "blurry",
        "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 4.0, "flow_shift": 6.0,
        "cfg_normalization": 0.0, "cfg_truncation": 1.0, "seed": 7, "num_images": 1, "loras": "",
        "memory_profile": "default"}


@pytest.fixture()
def ctl(tmp_path: Path) -> PageController:
    config = ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out")
    service = GenerationService(config)
    queue = JobQueue(service, tmp_path / "queue.json")  # not started: jobs stay queued
    return PageController(queue, service, ProfileStore(tmp_path / "profiles"), form_params())


def test_models_are_listed_in_family_order_and_picking_one_sets_its_recommendations(ctl):
    assert ctl.model_types[:10] == ["z_image_base", "z_image", "z_image_twinflow_turbo", "z_image_control2_1",
                                    "z_image_control2_1_8s", "z_image_control_tile", "z_image_control2",
                                    "z_image_control", "z_image_tiny", "z_image_tiny_control"]
    turbo = ctl.model_picked("z_image")
    assert (turbo["num_inference_steps"], turbo["guidance_scale"], turbo["flow_shift"]) == (8, 0.0, 3.0)
    assert turbo["preset"] == "1:1 · 1024×1024" and "Turbo" in turbo["model_info"]
    assert "cfg_truncation" not in turbo  # not tuned per model: the user's value stays
    # Turbo: no CFG extras, the shift under Advanced (the handler's layout), the negative prompt once NAG is on
    assert not ctl.shown("z_image", "cfg_truncation") and ctl.layouts["z_image"]["flow_shift"] == "advanced"
    assert ctl.conditions["z_image"]["negative_prompt"] == "nag_scale"
    assert ctl.shown("z_image_base", "negative_prompt") and ctl.layouts["z_image_base"]["flow_shift"] == "main"


def test_generate_refuses_like_the_cli_and_queues_nothing(ctl):
    with pytest.raises(UserError, match=r"Steps \(--steps\) must be between 1 and 100 \(got 500\)"):
        ctl.generate({**FORM, "num_inference_steps": 500}, "tab")
    with pytest.raises(UserError, match=r"Width \(--width\) must be a multiple of 16 \(got 1000\)"):
        ctl.generate({**FORM, "width": 1000.0}, "tab")
    assert ctl.queue.snapshot() == []
    assert ctl.submit_message("tab").startswith("⚠ Not queued: Width")

    ids = ctl.generate({**FORM, "prompt": "one\n# skipped\ntwo", "one_per_line": True}, "tab").split(",")
    jobs = {j["id"]: j for j in ctl.queue.snapshot()}
    assert [jobs[i]["spec"]["prompt"] for i in ids] == ["one", "two"] and jobs[ids[0]]["spec"]["seed"] == 7
    assert ctl.submit_message("tab") == f"Queued jobs {ids[0]}, {ids[1]}."
    # the last used settings are what a new page shows
    assert ctl.last_used_updates()["num_inference_steps"] == 2


def test_queue_buttons_say_what_happened(ctl):
    assert ctl.queue_op("remove", "") == "⚠ select a job in the queue table first"
    (job_id,) = ctl.generate(FORM, "tab").split(",")
    assert ctl.queue_op("up", job_id) == f"Job {job_id} is already first in the queue."
    assert ctl.queue_op("remove", job_id) == f"Removed job {job_id}."
    assert ctl.stop() == "No job is running."


def test_settings_fill_the_form_and_a_missing_model_keeps_the_current_one(ctl):
    out = ctl.settings_updates({"model_type": "z_image_tiny", "prompt": None, "width": 64, "height": 64,
                                "cfg_truncation": 5.0, "seed_policy": "random", "seed": 3, "loras": []})
    assert out["model"] == "z_image_tiny" and "prompt" not in out  # a null prompt keeps the typed text
    assert out["cfg_truncation"] == 1.0  # the slider's end (5 never truncates either)
    assert out["seed"] == -1 and out["preset"] == "Custom"
    assert "model" not in ctl.settings_updates({"model_type": "gone", "loras": []})


def test_a_saved_form_wins_and_a_broken_one_is_ignored(ctl):
    saved = {"version": 1, "model_type": "z_image_tiny", "prompt": "typed", "width": 96, "loras": "x=0.5",
             "guidance_scale": "not a number"}
    out = ctl.startup(saved)
    assert (out["prompt"], out["width"], out["lora_strengths"]) == ("typed", 96, "x=0.5")
    assert out["guidance_scale"] == 4.0  # the wrong type left out: the model's value
    assert ctl.startup({"version": 99}) == {}


def test_the_model_list_tells_missing_files_from_a_format_the_model_lacks(ctl):
    """With a low-bit format chosen in Config, a type whose definition lists no such file is not "not downloaded"
    (downloading would not help) but unusable with these settings; the report box says why."""
    from app.ui_controller import NOT_INSTALLED, UNUSABLE

    ctl.service.config.transformer_quantization = "fp8"
    labels = dict((t, label) for label, t in ctl.model_choices())
    assert labels["z_image"].endswith(NOT_INSTALLED)  # Turbo lists an fp8 file: not downloaded yet
    assert labels["z_image_base"].endswith(UNUSABLE)  # Base lists none
    report, _ = ctl.model_files_report("z_image_base")
    assert "cannot be used" in report["value"] and "fp8" in report["value"]
    ctl.service.config.transformer_quantization = "bf16"
    labels = dict((t, label) for label, t in ctl.model_choices())
    assert labels["z_image_base"].endswith(NOT_INSTALLED)


def painted_form(upload: Path, strokes: tuple[int, int, int, int]) -> dict:
    """FORM with an input image and one painted layer (strokes: the box painted white, opaque)."""
    upload.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (90, 100, 110)).save(upload / "photo.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), strokes)
    layer.save(upload / f"layer{strokes}.png")
    image = {"background": {"path": str(upload / "photo.png")},
             "layers": [{"path": str(upload / f"layer{strokes}.png")}], "composite": None}
    return {**FORM, "mask": None, "image": image}


def test_painted_masks_are_reused_and_bounded(ctl, tmp_path, monkeypatch):
    """Each Generate with strokes wrote a new full-size mask file into the upload folder, never deleted: the same
    strokes now reuse one file, and only the KEEP_MASKS newest stay (a queued job has its own copy)."""
    import app.ui_uploads as uploads

    upload = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload))
    monkeypatch.setattr(uploads, "KEEP_MASKS", 3)
    masks = upload / uploads.MASKS
    form = painted_form(upload, (8, 8, 24, 24))
    first = ctl.generate(form, "tab")
    ctl.generate(form, "tab")
    assert len(list(masks.glob("*.png"))) == 1
    for i in range(5):
        ctl.generate(painted_form(upload, (i, i, 30, 30)), "tab")
    assert len(list(masks.glob("*.png"))) == 3
    job = ctl.queue.get(first)  # its mask, pruned from the upload folder, is the queue's own copy
    assert Path(job["spec"]["mask"]).is_file() and masks not in Path(job["spec"]["mask"]).parents


@pytest.mark.parametrize("content", [b"", b"GIF89a", None])
@pytest.mark.parametrize("where", ["background", "layer"])
def test_a_bad_painted_upload_is_our_message(ctl, tmp_path, monkeypatch, content, where):
    """A zero-byte, corrupt or decompression-bomb background or painted layer: one UserError naming the file
    (Gradio's bare "Error" and a console traceback before), and nothing queued."""
    upload = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload))
    form = painted_form(upload, (8, 8, 24, 24))
    bad = upload / "bad.png"
    Image.new("1", (12000, 12000)).save(bad) if content is None else bad.write_bytes(content)
    key = "background" if where == "background" else "layers"
    form["image"][key] = {"path": str(bad)} if key == "background" else [{"path": str(bad)}]
    with pytest.raises(UserError, match="'bad.png' is (not an image|corrupt|too large)") as e:
        ctl.generate(form, "tab")
    assert str(upload) not in str(e.value) and ctl.queue.snapshot() == []
