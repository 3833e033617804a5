"""--auth for the web UI, with failed logins rate-limited per client address.

Gradio calls `auth(username, password)` without the request, so a small ASGI middleware
(`client_address_middleware`, passed through launch(app_kwargs=...)) records the client's address in a
context variable that the check reads. Each failed attempt is answered after `delay_s` (an async sleep: the
server keeps serving everyone else); after `max_failures` failures in a row an address is locked out for
`lockout_s`, doubled for every further failure up to `max_lockout_s`, and then gets HTTP 429 whatever it
sends, the right password included. A success clears the address's record.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
UNKNOWN = "unknown client"
_client: ContextVar[str] = ContextVar("wgp_zimage_login_client", default=UNKNOWN)


class ClientAddressMiddleware:
    """Pure ASGI middleware: the request's client address, for LoginGuard (same task, so the value is seen)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") == "http":
            client = scope.get("client")
            _client.set(str(client[0]) if client else UNKNOWN)
        await self.app(scope, receive, send)


def client_address_middleware() -> list:
    """The `middleware` list for FastAPI (launch(app_kwargs={"middleware": ...}))."""
    from starlette.middleware import Middleware

    return [Middleware(ClientAddressMiddleware)]


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginGuard:
    """One user name and password, checked by `check` (Gradio's auth callable); see the module docstring."""

    def __init__(self, user: str, password: str, max_failures: int = 5, delay_s: float = 1.0,
                 lockout_s: float = 60.0, max_lockout_s: float = 900.0, forget_s: float = 3600.0,
                 max_clients: int = 4096, clock: Callable[[], float] = time.monotonic):
        self._user, self._password = user.encode(), password.encode()
        self.max_failures, self.delay_s, self.lockout_s = max_failures, delay_s, lockout_s
        self.max_lockout_s, self.forget_s, self.max_clients = max_lockout_s, forget_s, max_clients
        self._clock = clock
        self._records: dict[str, _Record] = {}  # only touched on the event loop: no lock needed

    def locked_for(self, client: str) -> float:
        """Seconds left of client's lockout (0: none)."""
        rec = self._records.get(client)
        return max(0.0, rec.locked_until - self._clock()) if rec else 0.0

    def _prune(self, now: float) -> None:
        if len(self._records) < self.max_clients:
            return
        for key in [k for k, r in self._records.items() if now - r.last > self.forget_s and r.locked_until <= now]:
            del self._records[key]
        while len(self._records) >= self.max_clients:  # still full: forget the oldest
            del self._records[min(self._records, key=lambda k: self._records[k].last)]

    async def check(self, username: str, password: str) -> bool:
        """The auth callable for launch(auth=guard.check). A coroutine function on purpose: Gradio awaits only
        what inspect.iscoroutinefunction() names one; an object with an async __call__ would be called
        without await, and its coroutine (truthy) would let every password in."""
        from fastapi import HTTPException

        client, now = _client.get(), self._clock()
        left = self.locked_for(client)
        if left > 0:
            raise HTTPException(status_code=429, detail=f"Too many failed logins from {client}: "
                                                        f"try again in {math.ceil(left)} s.")
        # both compared in full, in constant time: the answer's timing says nothing about either
        ok = hmac.compare_digest(username.encode(), self._user) & hmac.compare_digest(password.encode(),
                                                                                     self._password)
        if ok:
            self._records.pop(client, None)
            return True
        rec = self._records.get(client)
        if rec is None or (now - rec.last > self.forget_s and rec.locked_until <= now):
            self._prune(now)
            rec = self._records[client] = _Record()
        rec.failures += 1
        rec.last = now
        if rec.failures >= self.max_failures:
            lock = min(self.lockout_s * 2 ** (rec.failures - self.max_failures), self.max_lockout_s)
            rec.locked_until = now + lock
            log.warning("%d failed logins in a row from %s: locked out for %.0f s", rec.failures, client, lock)
        else:
            log.warning("failed login for user %r from %s", username, client)
        await asyncio.sleep(self.delay_s)  # recorded first: parallel guesses count too
        return False
