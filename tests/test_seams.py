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
