"""The page's event handlers (app/ui_controller.PageController) called directly: no Blocks, no browser, no server.
The queue is never started, so submitted jobs wait and nothing renders."""

from __future__ import annotations

from pathlib import Path

import pytest

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
