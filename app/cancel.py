"""A per-job cancel token: whoever starts a job keeps its token and may cancel that job, and only that one.

It replaces a flag shared by the service, the queue and the CLI, which the service cleared when sampling
started and the queue had to set again, so a stop requested at the wrong moment could be lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from models.errors import GenerationInterrupted


class CancelToken:
    """Set once (from any thread, a signal handler included), never cleared: a job gets a fresh one."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        self._event.set()
        for fn in list(self._callbacks):
            fn()

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Call fn (once) when the token is cancelled, at once if it is already: how a stop reaches a job that
        runs elsewhere (a Ray actor) without polling. fn must be quick and must not raise."""
        self._callbacks.append(fn)
        if self._event.is_set():
            fn()

    def is_cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """GenerationInterrupted when cancelled: the way a job stops between its stages."""
        if self._event.is_set():
            raise GenerationInterrupted()

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.is_cancelled()})"


__all__ = ["CancelToken"]
