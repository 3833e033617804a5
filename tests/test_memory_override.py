"""A job's per-generation memory profile: validation, the service's reload keyed by the profile, the
/generate API argument, the queue file and the image metadata. On the CPU the profile is recorded, not used."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from gradio_client.exceptions import AppError

from app import offload
from app.jobs import JobSpec, validate
from app.metadata import read_settings
from app.service import GenerationService, ServiceConfig
from app.ui import queue_table
from app.untrusted import parse_memory_profile
from models.errors import UserError
from tests.test_ui_api import App

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
SMALL = {"model_type": "z_image_tiny", "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 0.0}


def test_parse_and_validate_the_override():
    for given, expected in ((None, None), ("", None), ("default", None), (" Default ", None), ("2", 2), (5, 5),
                            (3.0, 3), ("1", 1)):
        assert parse_memory_profile(given) == expected, given
    for bad in ("7", "0", 0, 6, -1, "abc", "2.5", 2.5, True, "1 · HighRAM", "٣"):
        with pytest.raises(UserError, match=r"[Mm]emory profile must be 'default' .* from 1 to 5"):
            parse_memory_profile(bad)
    validate(JobSpec(prompt="x", **SMALL, memory_profile=3))
    for bad in (0, 6, True, 2.5, "٣"):
        with pytest.raises(UserError, match=r"Memory profile must be (one of 1, 2, 3, 4, 5|a whole number)"):
            validate(JobSpec(prompt="x", **SMALL, memory_profile=bad))
    for given in (2.0, "2"):  # the value a page or a file sends, normalized once at the edge
        spec = JobSpec(prompt="x", **SMALL, memory_profile=given)
        validate(spec)
        assert spec.memory_profile == 2
    # older queue files and images have no memory_profile: the app's default
    old = JobSpec(prompt="x", **SMALL).to_dict()
    del old["memory_profile"]
    assert JobSpec.from_dict(old).memory_profile is None
    table = queue_table([{"id": "a", "status": "queued", "spec": old, "seeds": [], "phase": "", "step": 0, "total": 0,
                          "paths": [], "error": "", "finished": None, "created": 0.0, "seconds": None}])
    assert "memory profile" not in table.iloc[0]["Settings"]


def test_cpu_override_is_recorded_without_a_reload(tiny_dir, tmp_path, monkeypatch, caplog):
    """On the CPU the profile is not applied (no mmgp): jobs with profiles None, 2, None load the model once."""
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    service = GenerationService(ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out",
                                              memory_profile=4))
    monkeypatch.setattr(offload, "_cpu_notice_given", False)  # the once-per-process notice, for this test
    caplog.set_level(logging.INFO, logger="wgp_zimage")
    loads = []

    def run(profile, seed=1):
        events = []
        result = service.generate(JobSpec(prompt="a fox", **SMALL, seed=seed, memory_profile=profile),
                                  on_event=events.append)
        loads.append(any(e["kind"] == "load" for e in events))
        return service._pipe, result

    first, _ = run(None)
    assert "memory profile 4 ignored" in caplog.text  # the CPU notice: no mmgp offload here
    override, result = run(2)
    assert override is first
    assert "memory profile 2 for this job (configured: 4); recorded only" in caplog.text
    assert read_settings(result.paths[0])["memory_profile"] == 2  # recorded in the image
    back, result = run(None)
    assert back is first and read_settings(result.paths[0])["memory_profile"] is None
    assert loads == [True, False, False]
    assert service.pipe_memory_profile is None  # no profile applied: none shown as the loaded model's


def test_offload_settings_key_the_pipeline_on_cuda_only(tmp_path):
    service = GenerationService(ServiceConfig(output_dir=tmp_path / "out", memory_profile=4))
    assert service._offload_key(2) == service._offload_key(4) == ()
    service.device = torch.device("cuda")  # only the key is computed: no CUDA needed
    assert service._offload_key(2) != service._offload_key(4)
    assert 2 in service._offload_key(2) and service.config.preload_mb in service._offload_key(2)


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_memory")
    served = App(root, tiny_dir)
    served.root = root
    yield served
    served.close()


def test_api_override_travels_with_the_job(app):
    tiny = {"model_type": "z_image_tiny", "width": 64, "height": 64, "steps": 2}
    (job_id,) = app.generate("an overridden fox", **tiny, memory_profile="2")
    saved = json.loads((app.root / "queue.json").read_text())
    assert {j["id"]: j for j in saved["jobs"]}[job_id]["spec"]["memory_profile"] == 2  # in the queue file
    job = app.wait_done([job_id])[job_id]
    assert job["status"] == "done", job["error"]
    assert read_settings(job["paths"][0])["memory_profile"] == 2
    (plain,) = app.generate("a default fox", **tiny)  # no argument: the Config section's profile
    job = app.wait_done([plain])[plain]
    assert job["status"] == "done" and job["spec"]["memory_profile"] is None
    assert app.service.pipe_memory_profile is None  # the CPU applies no profile
    (explicit,) = app.generate("a default fox", **tiny, memory_profile="default")
    assert app.wait_done([explicit])[explicit]["spec"]["memory_profile"] is None


def test_api_refuses_bad_overrides(app):
    before = len(app.jobs())
    for bad in ("7", "0", "fast", "2.5"):
        with pytest.raises(AppError, match=r"Memory profile must be 'default' \(the Config section's\) or a whole "
                                           "number from 1 to 5"):
            app.generate("a fox", memory_profile=bad)
    assert len(app.jobs()) == before  # nothing queued
