"""What the launched web UI exposes: only the gallery's images are served (never the queue, the config or any
other file), serving on the network without --auth warns on the console and in the page, and failed logins
are rate-limited per client address. The app runs as a user starts it (`wgp_zimage.py`, own process);
everything goes over loopback HTTP, the page through Debian's Chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException
from gradio_client import Client
from playwright.sync_api import expect

from app.login_guard import LoginGuard
from tests.conftest import ROOT
from tests.test_ui_api import TINY, free_port
from tests.test_ui_browser import browser, open_page, screenshot  # noqa: F401 (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


class Launched:
    """wgp_zimage.py serving the web UI in its own process; console lines collected as they come."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}/"
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def console(self) -> str:
        return "".join(self.lines)

    def status(self, path: str | Path) -> int:
        return httpx.get(f"{self.url}gradio_api/file={path}", timeout=10).status_code


@contextlib.contextmanager
def launched(tmp_path: Path, tiny_dir: Path, *flags: str) -> Iterator[Launched]:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (ckpts / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "wgp_zimage.py"), "--server-port", str(port),
                             "--checkpoints-dir", str(ckpts), "--profiles-dir", str(tmp_path / "profiles"), *flags],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    app = Launched(proc, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, app.console
            try:
                if httpx.get(app.url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the UI did not come up in 120 s:\n" + app.console
            time.sleep(0.5)
        yield app
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def wait_done(client: Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = {j["id"]: j for j in client.predict(api_name="/queue")}[job_id]
        if job["status"] in ("done", "failed", "aborted", "interrupted"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_listening_without_auth_warns_and_serves_only_the_gallery(tmp_path, tiny_dir, browser):  # noqa: F811
    out = tmp_path / "out"  # also the state folder: the queue and the config live beside the images
    out.mkdir()
    (out / "wgp_zimage_config.json").write_text(json.dumps({"output_quality": 90}))
    (out / "notes.txt").write_text("private")
    (out / "sub").mkdir()
    (out / "sub" / "other.txt").write_text("private")
    with launched(tmp_path, tiny_dir, "--listen", "--output-dir", str(out)) as app:
        assert "warning: Serving on 0.0.0.0 without --auth" in app.console, app.console
        client = Client(app.url, verbose=False)
        (job_id,) = client.predict(prompt="served", **TINY, api_name="/generate").split(",")
        job = wait_done(client, job_id)
        assert job["status"] == "done", job
        (image,) = job["paths"]
        queue_json = out / "wgp_zimage_queue.json"
        assert queue_json.is_file()
        for private in (queue_json, out / "wgp_zimage_config.json", out / "notes.txt", out / "sub" / "other.txt",
                        "/etc/hostname", ROOT / "pyproject.toml", ROOT / ".git"):
            assert app.status(private) == 403, private

        with open_page(browser, app.url) as page:
            expect(page.locator("#exposure-warning")).to_contain_text("without --auth")
            img = page.locator("#gallery img").first
            expect(img).to_be_visible()
            page.wait_for_function("() => { const i = document.querySelector('#gallery img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            src = img.get_attribute("src")
            src = src if src.startswith("http") else app.url + src.lstrip("/")
            assert httpx.get(src, timeout=10).status_code == 200
            screenshot(page, "ui-exposure-warning.png")
        assert app.status(image) == 200  # the gallery's own file, and nothing else of the folder
        assert app.status(queue_json) == 403


def test_failed_logins_are_rate_limited_per_client(tmp_path, tiny_dir):
    with launched(tmp_path, tiny_dir, "--auth", "me:secret", "--output-dir", str(tmp_path / "out")) as app:
        assert "warning" not in app.console  # loopback with --auth: nothing to warn about

        def login(password: str, source: str = "127.0.0.1") -> int:
            with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as c:
                return c.post(f"{app.url}login", data={"username": "me", "password": password}).status_code

        started = time.monotonic()
        assert [login("guess") for _ in range(5)] == [400] * 5
        assert time.monotonic() - started >= 4  # each failure is answered late
        assert login("secret") == 429  # locked out: even the right password
        assert login("secret", source="127.0.0.2") == 200  # another client is not
        assert login("guess", source="127.0.0.2") == 400
        assert "locked out" in app.console


# ------------------------------------------------------------------ the pieces

def test_exposure_warning():
    from app.launch import exposure_warning, is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and exposure_warning(host, False, None) == "", host
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.lan"):
        assert not is_loopback(host)
        assert "without --auth" in exposure_warning(host, False, None)
        assert exposure_warning(host, False, ("me", "pw")) == ""
    assert "share link" in exposure_warning("127.0.0.1", True, None)


def run(coro):
    """The coroutine's result, on a fresh loop in a thread with this context (Playwright holds this thread's)."""
    ctx = contextvars.copy_context()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(ctx.run, asyncio.run, coro).result()


def test_login_guard_locks_out_and_forgives():
    now = [1000.0]
    guard = LoginGuard("me", "pw", max_failures=3, delay_s=0, lockout_s=10, max_lockout_s=25, forget_s=100,
                       clock=lambda: now[0])

    # Gradio awaits the auth callable only when inspect says so; otherwise its coroutine passes as "yes"
    assert inspect.iscoroutinefunction(guard.check)

    def attempt(user: str, password: str) -> bool:
        return run(guard.check(user, password))

    assert attempt("me", "pw")
    assert not attempt("me", "x") and not attempt("you", "pw")
    assert attempt("me", "pw")  # a success clears the count
    assert [attempt("me", "x") for _ in range(3)] == [False] * 3
    with pytest.raises(HTTPException) as e:
        attempt("me", "pw")
    assert e.value.status_code == 429 and "try again in 10 s" in e.value.detail
    now[0] += 10.5
    assert not attempt("me", "x")  # one more failure after the lockout: locked again, twice as long
    assert guard.locked_for("unknown client") == 20
    now[0] += 21
    assert not attempt("me", "x")
    assert guard.locked_for("unknown client") == 25  # capped
    now[0] += 26
    assert attempt("me", "pw") and guard.locked_for("unknown client") == 0


def test_login_guard_memory_is_bounded():
    now = [0.0]
    guard = LoginGuard("me", "pw", delay_s=0, max_clients=8, clock=lambda: now[0])
    from app import login_guard

    for i in range(50):
        token = login_guard._client.set(f"10.0.0.{i}")
        try:
            assert not run(guard.check("me", "x"))
        finally:
            login_guard._client.reset(token)
        now[0] += 1
    assert len(guard._records) <= 8


def test_served_files_is_a_bounded_allow_list(tmp_path):
    from app.served_files import ServedFiles, served_files

    files = ServedFiles(keep=3)
    assert files and files == []  # truthy when empty: Gradio keeps this list instead of making its own
    files.allow(tmp_path / f"{i}.png" for i in range(5))
    assert files == [str(tmp_path / f"{i}.png") for i in (2, 3, 4)]
    files.allow([tmp_path / "2.png"])  # listed again: kept, as the newest
    assert files[-1] == str(tmp_path / "2.png") and len(files) == 3
    assert served_files(tmp_path) is served_files(str(tmp_path) + "/")  # one list per output folder
