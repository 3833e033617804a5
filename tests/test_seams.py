"""Seams that replaced shared state: per-job cancel tokens, the step observer, the per-model attention
backend, the family's latent preview factors, our offload session and config changes applied between jobs."""

from __future__ import annotations

import threading

import pytest
import torch

from app.cancel import CancelToken
from app.jobs import JobSpec
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig, StepObserver
from models.errors import GenerationInterrupted


def spec(prompt: str, **kw) -> JobSpec:
    return JobSpec(**{"model_type": "z_image_tiny", "prompt": prompt, "width": 64, "height": 64,
                      "num_inference_steps": 2, "seed": 7, **kw})


# ------------------------------------------------------------ cancel tokens


def test_cancel_tokens_are_independent():
    a, b = CancelToken(), CancelToken()
    a.cancel()
    assert a.is_cancelled() and not b.is_cancelled()
    b.raise_if_cancelled()  # nothing
    with pytest.raises(GenerationInterrupted):
        a.raise_if_cancelled()


class FakeService:
    """Records each job's token; a job runs until its token is cancelled or it is released."""

    def __init__(self):
        self.tokens: list[CancelToken] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def definition(self, model_type):
        return None

    def latent_preview_factors(self, model_type):
        return None

    def generate(self, spec, *, cancel, on_event=None, **kw):
        self.tokens.append(cancel)
        self.started.set()
        while not cancel.is_cancelled() and not self.release.is_set():
            threading.Event().wait(0.01)
        cancel.raise_if_cancelled()
        raise RuntimeError("released")


def test_queue_stop_cancels_the_running_job_only():
    service = FakeService()
    q = JobQueue(service).start()
    try:
        first, second = q.submit(spec("one")), q.submit(spec("two"))
        assert service.started.wait(10)
        assert q.abort() == first
        assert q.wait(first, 10)["status"] == "aborted"
        q.wait_until(lambda q: len(service.tokens) == 2, 10)
        assert service.tokens[0].is_cancelled() and not service.tokens[1].is_cancelled()  # a fresh token
        service.release.set()
        assert q.wait(second, 10)["status"] == "failed"  # ran to its (fake) end: not stopped by the first stop
    finally:
        service.release.set()
        q.close()


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory) -> GenerationService:
    root = tmp_path_factory.mktemp("seams")
    (root / "ckpts").mkdir()
    (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    return GenerationService(ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs"))


def test_a_cancelled_job_does_not_stop_the_next(service):
    token = CancelToken()

    def on_event(ev):
        if ev["kind"] == "step":
            token.cancel()  # as the queue's stop or the CLI's Ctrl-C would, from another thread

    with pytest.raises(GenerationInterrupted):
        service.generate(spec("stopped", num_inference_steps=4), on_event=on_event, cancel=token)
    result = service.generate(spec("next"), cancel=CancelToken())  # no shared flag left set
    assert len(result.paths) == 1 and result.paths[0].is_file()


def test_step_observer_reports_steps_and_moves_the_guard_stage():
    class Guard:
        stage = "encode"

    events, lora_steps, guard = [], [], Guard()
    obs = StepObserver(events.append, guard, lora_step=lambda i, n: lora_steps.append((i, n)))
    latents = torch.zeros(1)
    for i in range(3):
        obs.step_start(i, 3)
        assert guard.stage == "denoise"
        obs.step_end(i, 3, latents)
    assert guard.stage == "decode"
    assert lora_steps == [(0, 3), (1, 3), (2, 3)]
    assert [(e["step"], e["total"]) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1]["eta"] == 0 and obs.seconds_per_step() >= 0


# ------------------------------------------------------------ attention backend per model instance


def test_attention_backend_belongs_to_the_model_instance(monkeypatch):
    from models.z_image import transformer as tr
    from models.z_image.tiny import TINY_TRANSFORMER

    cfg = tr.ZImageConfig.from_dict(TINY_TRANSFORMER)
    a, b = tr.ZImageTransformer(cfg), tr.ZImageTransformer(cfg)
    assert a.attention_backend == b.attention_backend == "sdpa"
    a.set_attention_backend("flash")
    b.set_attention_backend("sage")
    assert a.attention_backend == "flash" and b.attention_backend == "sage"
    assert {m.backend for m in a.modules() if isinstance(m, tr.Attention)} == {"flash"}
    with pytest.raises(ValueError, match="unknown attention backend"):
        a.set_attention_backend("xformers")

    seen = []
    real = tr.attention
    monkeypatch.setattr(tr, "attention", lambda q, k, v, backend: seen.append(backend) or real(q, k, v, backend))
    monkeypatch.setattr(tr, "apply_rope", lambda x, *rope: x)
    x = torch.randn(1, 8, cfg.dim)
    a.layers[0].attention(x, ())
    b.layers[0].attention(x, ())
    assert seen == ["flash", "sage"]  # on the CPU both then run SDPA


def test_attention_dispatches_by_its_argument(monkeypatch):
    from types import SimpleNamespace

    from models import attention as at

    calls = []
    monkeypatch.setattr(at, "_kernel", lambda name: lambda q, k, v: calls.append(name) or name)
    monkeypatch.setattr(at, "_sdpa", lambda q, k, v: calls.append("sdpa") or "sdpa")
    cuda_bf16 = SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=torch.bfloat16)  # only these are read
    assert at.attention(cuda_bf16, None, None, "flash") == "flash"
    assert at.attention(cuda_bf16, None, None, "flash3") == "flash3"
    assert at.attention(cuda_bf16, None, None) == "sdpa"  # the default
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"), dtype=torch.bfloat16)
    assert at.attention(cpu, None, None, "flash") == "sdpa"  # fused kernels run on CUDA only
    assert calls == ["flash", "flash3", "sdpa", "sdpa"]


def test_service_keeps_the_backend_with_the_loaded_model(service):
    service.generate(spec("load"))
    assert service.attention_backend == "sdpa"  # the CPU: auto resolves to SDPA
    assert service._pipe.transformer.attention_backend == service.attention_backend
    from app.ui_config import system_info_text

    assert "sdpa" in system_info_text(service)


# ------------------------------------------------------------ latent preview factors from the family handler


def test_preview_factors_come_from_the_handler(monkeypatch):
    import numpy as np

    from app.queue import latent_preview
    from models.registry import FamilyHandler, handler_for

    handler = handler_for("z_image_tiny")
    matrix, bias = handler.latent_preview_factors("z_image_tiny")
    assert len(matrix) == 16 and all(len(row) == 3 for row in matrix) and len(bias) == 3
    assert FamilyHandler().latent_preview_factors("anything") is None  # the default: no projection
    latents = np.zeros((1, 16, 4, 4), np.float32)
    projected = np.asarray(latent_preview(latents, factors=(matrix, bias)))
    # zero latents show the bias alone with the projection; the stretched fallback shows black
    want = np.clip((np.asarray(bias) + 1) / 2, 0, 1) * 255
    assert np.allclose(projected[0, 0], want.astype(np.uint8), atol=1)
    assert np.asarray(latent_preview(latents)).max() == 0


def test_queue_previews_with_the_jobs_family_factors(service, monkeypatch):
    from app import queue as queue_module

    seen = []
    real = queue_module.latent_preview
    monkeypatch.setattr(queue_module, "latent_preview", lambda latents, **kw: seen.append(kw) or real(latents, **kw))
    q = JobQueue(service, preview_every=1).start()
    try:
        assert q.wait(q.submit(spec("preview")), 120)["status"] == "done"
    finally:
        q.close()
    assert seen and all(kw["factors"] == service.latent_preview_factors("z_image_tiny") for kw in seen)


# ------------------------------------------------------------ our offload session around mmgp's manager


def test_offload_state_lives_in_our_session(tiny_dir):
    from app import offload as ofl
    from tests.test_offload import cpu_cuda_standins, load

    with cpu_cuda_standins():
        _, parts = load(tiny_dir)
        session = ofl.apply_profile(parts, 4, device="cuda", overlap_transfers=True)
        assert isinstance(session, ofl.OffloadSession) and session.manager is not None
        assert session.profile == 4 and session.budgets == ofl.profile_budgets(4)
        assert session.models == dict(parts) and session.hooks and session.overlap is not None
        assert not [k for k in vars(session.manager) if k.startswith("_wgp")]  # nothing of ours on mmgp's object
        # the modules locked to float32 inputs are those the model names (no family names in app/offload.py)
        tr = parts["transformer"]
        assert session.locked == [tr.get_submodule(n) for n in tr.fp32_input_modules]
        ofl.release(session)
        assert (session.models, session.hooks, session.locked, session.overlap) == ({}, [], [], None)
        assert ofl.pinned_bytes(session) == 0
        assert not any("_lock_dtype" in m.__dict__ for m in tr.modules())


# ------------------------------------------------------------ config changes wait for the running job


def test_config_changes_apply_between_jobs(service):
    assert service.config.output_format == "png"
    seen = []

    def on_event(ev):
        if ev["kind"] == "step" and ev["step"] == 1:  # the page saves its Config section mid-job
            changed = service.update_config({"output_format": "jpeg", "output_quality": 80, "save_metadata": True})
            seen.append((changed, service.config.output_format, service.pending_config()))

    try:
        first = service.generate(spec("during a config change", num_inference_steps=3), on_event=on_event)
        assert seen == [(["output_format", "output_quality"], "png",
                         {"output_format": "jpeg", "output_quality": 80, "save_metadata": True})]
        assert first.paths[0].suffix == ".png"  # the job kept the configuration it started with
        assert service.config.output_format == "jpeg" and service.pending_config() == {}  # applied when it ended
        assert service.generate(spec("next")).paths[0].suffix in (".jpg", ".jpeg")
        assert service.update_config({"output_format": "jpeg"}) == []  # no change
        with pytest.raises(ValueError, match="unknown configuration"):
            service.update_config({"nope": 1})
    finally:
        assert service.update_config({"output_format": "png", "output_quality": 95}) == ["output_format",
                                                                                       "output_quality"]
        assert service.config.output_format == "png"  # idle: at once


def test_a_worker_s_files_land_in_the_output_folder_under_safe_names(tmp_path):
    """What a Ray worker sends back (app/ray_executor.write_result; no Ray needed): plain image names only; a
    taken name moves the image and its companions to the next stem together, overwriting nothing, and the
    image's settings then name its own input copy."""
    import io

    import pytest
    from PIL import Image

    from app.metadata import read_settings
    from app.outputs import save_image_atomic
    from app.ray_executor import write_result

    def png(color, settings=None) -> bytes:
        path = tmp_path / "made.png"
        save_image_atomic(Image.new("RGB", (8, 8), color), path, settings)
        return path.read_bytes()

    def job(n: int) -> list:
        settings = {"app": "wgp-zimage", "prompt": f"job {n}", "model_type": "z_image_tiny",
                    "image": "a_seed1_input.png", "control_image": "a_seed1_control_input.png"}
        return [("a_seed1_input.png", png((n, 0, 0))), ("a_seed1_control_input.png", png((0, n, 0))),
                ("a_seed1_control.png", png((0, 0, n))), ("a_seed1.png", png((n, n, n), settings))]

    out = tmp_path / "out"
    first = write_result(out, job(1), "a_seed1.png")
    assert first == out / "a_seed1.png"
    second = write_result(out, job(2), "a_seed1.png")
    assert second.name == "a_seed1-2.png"
    settings = read_settings(second)
    assert settings["prompt"] == "job 2" and settings["image"] == str(out.resolve() / "a_seed1-2_input.png")
    assert settings["control_image"] == str(out.resolve() / "a_seed1-2_control_input.png")
    with Image.open(second) as im:
        assert im.getpixel((0, 0)) == (2, 2, 2)  # the pixels as sent (PNG: rewritten without loss)
    with Image.open(io.BytesIO((out / "a_seed1-2_input.png").read_bytes())) as im:
        assert im.getpixel((0, 0)) == (2, 0, 0)
    assert read_settings(first)["image"] == str(out.resolve() / "a_seed1_input.png")  # the first job's untouched
    with Image.open(out / "a_seed1_input.png") as im:
        assert im.getpixel((0, 0)) == (1, 0, 0)
    for bad in ("../x.png", "sub/x.png", "", ".", ".x.png", "x.part", "x.json"):
        with pytest.raises(RuntimeError, match="file name"):
            write_result(out, [(bad, b"x"), ("ok.png", b"x")], "ok.png")
    with pytest.raises(RuntimeError, match="without its image"):
        write_result(out, [("ok.png", b"x")], "other.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"a_seed1{tag}{kind}.png" for tag in ("", "-2") for kind in ("", "_input", "_control", "_control_input"))


def test_a_new_worker_removes_the_folders_of_workers_that_are_gone(tmp_path):
    import os
    import subprocess
    import sys

    from app.ray_executor import CACHE_PREFIX, clean_stale_caches

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has just ended
    (tmp_path / f"{CACHE_PREFIX}{gone}-abc" / "blobs").mkdir(parents=True)
    (tmp_path / f"{CACHE_PREFIX}{os.getpid()}-def").mkdir()  # a live worker's
    (tmp_path / f"{CACHE_PREFIX}notapid").mkdir()
    (tmp_path / "other-folder").mkdir()
    assert clean_stale_caches(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{CACHE_PREFIX}{os.getpid()}-def", f"{CACHE_PREFIX}notapid", "other-folder"])
