"""What runs the queue's jobs: an executor has one or more worker slots, each running one job at a time.

The queue (app/queue.py) keeps the job list, its file and the order; an executor only runs a job it is handed
and reports progress, the saved images and the result through the same events and JobResult as
GenerationService.generate. The LocalExecutor is the in-process service (one slot: today's single worker);
app/ray_executor.py runs one slot per Ray actor (a GPU, or a CPU worker).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from app.cancel import CancelToken
from app.jobs import JobSpec

EventFn = Callable[[dict[str, Any]], None]


class WorkerLost(Exception):
    """The worker running a job went away (its process or machine died, the cluster is gone): the job did not
    fail on its own, so the queue runs it again (up to its retry limit)."""


class Executor(Protocol):
    def slot_names(self) -> list[str]:
        """One name per worker slot (the queue runs one job per slot at a time)."""

    def ensure(self, slot: int) -> bool:
        """Whether the slot has a worker able to take a job now (a Ray executor starts one if it can); called
        without the queue's lock held: it may block for seconds."""

    def affinity(self, spec: JobSpec) -> Any:
        """What a worker must have loaded to run spec without a (re)load: compared with loaded(slot)."""

    def loaded(self, slot: int) -> Any:
        """affinity() of the last job the slot ran (None: nothing loaded)."""

    def run(self, slot: int, spec: JobSpec, *, on_event: EventFn, existing_images: dict[int, Path],
            batch_seed: int | None, cancel: CancelToken, job_id: str) -> Any:
        """Render spec on the slot's worker; images are written into the app's output folder and reported with
        an "image" event each; returns an app.service.JobResult. GenerationInterrupted when cancel stops it,
        WorkerLost when the worker went away, any other exception: the job failed."""

    def unload(self) -> bool:
        """Free the loaded models (the app's and every worker's; called when no job runs): whether any was."""

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's name and state ("idle", "running", "unavailable: why"), for the page."""

    def close(self) -> None:
        """Release the workers."""


class LocalExecutor:
    """The in-process GenerationService: one slot, exactly the queue's behaviour before executors."""

    def __init__(self, service: Any):
        self.service = service
        self._last: Any = None

    def slot_names(self) -> list[str]:
        return ["local"]

    def ensure(self, slot: int) -> bool:
        return True

    def affinity(self, spec: JobSpec) -> Any:
        return spec.model_type

    def loaded(self, slot: int) -> Any:
        return self._last

    def run(self, slot: int, spec: JobSpec, *, on_event: EventFn, existing_images: dict[int, Path],
            batch_seed: int | None, cancel: CancelToken, job_id: str) -> Any:
        self._last = self.affinity(spec)
        return self.service.generate(spec, on_event=on_event, existing_images=existing_images,
                                     batch_seed=batch_seed, cancel=cancel)

    def unload(self) -> bool:
        loaded = self.service.pipeline_key is not None
        self.service.unload()
        self._last = None
        return loaded

    def workers(self) -> list[dict[str, Any]]:
        return []  # one worker, the app itself: the page shows no worker list

    def close(self) -> None:
        pass


__all__ = ["Executor", "LocalExecutor", "WorkerLost"]
