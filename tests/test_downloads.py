"""models.downloads against a fake Hub served on 127.0.0.1 (no internet needed or used)."""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

import models.downloads as dl
from models.downloads import FileSpec, download_files, missing_files, offline_report, spec_from_url
from models.errors import UserError

REPO = "DeepBeepMeep/Z-Image"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob(n: int, seed: int) -> bytes:
    """Deterministic non-repeating bytes, so a resume at the wrong offset would show."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


FILES = {
    "ZImageBase_bf16.safetensors": _blob(96_000, 1),
    "Qwen3/qwen3_bf16.safetensors": _blob(64_000, 2),
}


class FakeHub:
    """Serves FILES as `/<repo>/resolve/main/<path>`, answering HEAD like the Hub and GET with Range support.

    `plan` scripts the next GETs: "cut" sends half the body then drops the connection, "503" fails,
    "short" sends a body shorter than the HEAD size (with a consistent Content-Length), "ok" is normal.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {f"/{REPO}/resolve/main/{path}": data for path, data in files.items()}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.plan: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _start(self, method: str) -> bytes | None:
                hub.requests.append((method, self.path, self.headers.get("Range")))
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return data

            def do_HEAD(self) -> None:
                data = self._start("HEAD")
                if data is None:
                    return
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                data = self._start("GET")
                if data is None:
                    return
                action = hub.plan.pop(0) if hub.plan else "ok"
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    assert rng.startswith("bytes=") and rng.endswith("-"), rng
                    start = int(rng[len("bytes="):-1])
                body = data[start:]
                if action == "short":
                    body = body[:-1000]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # drop mid-body: the client sees a truncated response
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online(monkeypatch):
    """conftest turns HF_HUB_OFFLINE on for the whole run; these tests talk to a loopback server."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read by the hub's request hook at each request
    # Small chunks so an interrupted transfer leaves data on disk (the hub buffers 10 MB per write).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)


@pytest.fixture
def hub(online):
    server = FakeHub(FILES)
    yield server
    server.close()


def _specs(root: Path) -> list[FileSpec]:
    return [FileSpec(REPO, path, root.joinpath(*path.split("/"))) for path in FILES]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.incomplete")]


def test_spec_from_url(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    url = f"https://huggingface.co/{REPO}/resolve/main/Qwen3/qwen3_bf16.safetensors"
    spec = spec_from_url(url, tmp_path)
    assert spec.repo_id == REPO
    assert spec.repo_path == "Qwen3/qwen3_bf16.safetensors"
    assert spec.local_path == tmp_path / "Qwen3" / "qwen3_bf16.safetensors"
    assert spec.url() == url
    assert spec.url("http://127.0.0.1:9/") == f"http://127.0.0.1:9/{REPO}/resolve/main/Qwen3/qwen3_bf16.safetensors"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    assert spec.url() == f"https://hf-mirror.example/{REPO}/resolve/main/Qwen3/qwen3_bf16.safetensors"

    top = spec_from_url(f"https://huggingface.co/{REPO}/blob/main/ZImageBase_bf16.safetensors?download=true", "ckpts")
    assert (top.repo_path, top.local_path) == ("ZImageBase_bf16.safetensors", Path("ckpts/ZImageBase_bf16.safetensors"))
    for bad in ("https://huggingface.co/DeepBeepMeep/Z-Image", "https://example.com/a/b/c/d/e.bin",
                f"https://huggingface.co/{REPO}/resolve/main/../../etc/passwd"):
        with pytest.raises(UserError):
            spec_from_url(bad, tmp_path)


def test_first_download_is_byte_identical(hub, tmp_path, capsys):
    specs = _specs(tmp_path)
    assert missing_files(specs) == specs
    paths = download_files(specs, endpoint=hub.endpoint, offline=False)
    assert paths == [s.local_path for s in specs]
    for spec in specs:
        assert spec.local_path.read_bytes() == FILES[spec.repo_path]
    assert (tmp_path / "Qwen3" / "qwen3_bf16.safetensors").is_file()  # repo subfolder kept
    assert missing_files(specs) == []
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "Qwen3" / ".cache").exists()  # tidied up
    assert [r[0] for r in hub.requests] == ["HEAD", "GET", "HEAD", "GET"]
    assert all(r[2] is None for r in hub.requests)
    err = capsys.readouterr().err  # the tqdm bars: file name, byte size and speed
    assert "Qwen3/qwen3_bf16.safetensors" in err and "B/s" in err


def test_present_files_make_no_request(hub, tmp_path):
    specs = _specs(tmp_path)
    for spec in specs:
        spec.local_path.parent.mkdir(parents=True, exist_ok=True)
        spec.local_path.write_bytes(b"already here")
    assert download_files(specs, endpoint=hub.endpoint, offline=False) == [s.local_path for s in specs]
    assert download_files(specs, offline=True) == [s.local_path for s in specs]  # nothing missing: offline is fine
    assert hub.requests == []
    assert specs[0].local_path.read_bytes() == b"already here"


def test_resume_after_interrupted_transfer(hub, tmp_path):
    spec = _specs(tmp_path)[0]
    total = len(FILES[spec.repo_path])
    # First run: the connection drops mid-body, the hub's in-call retry then gets a 503 => the run fails.
    hub.plan = ["cut", "503"]
    with pytest.raises(UserError, match="resumes"):
        download_files([spec], endpoint=hub.endpoint, progress=False, offline=False)
    assert not spec.local_path.exists()  # never a half file under the final name
    (partial,) = _leftovers(tmp_path)
    kept = partial.stat().st_size
    assert 0 < kept < total
    assert FILES[spec.repo_path].startswith(partial.read_bytes())

    # Second run: asks only for the rest with a Range request.
    hub.requests.clear()
    download_files([spec], endpoint=hub.endpoint, progress=False, offline=False)
    assert hub.gets() == [("GET", f"/{REPO}/resolve/main/{spec.repo_path}", f"bytes={kept}-")]
    assert spec.local_path.read_bytes() == FILES[spec.repo_path]
    assert _leftovers(tmp_path) == []


def test_dropped_connection_is_resumed_within_the_call(hub, tmp_path):
    spec = _specs(tmp_path)[1]
    hub.plan = ["cut"]
    download_files([spec], endpoint=hub.endpoint, progress=False, offline=False)
    first, second = hub.gets()
    assert first[2] is None and second[2] is not None and second[2] != "bytes=0-"
    assert spec.local_path.read_bytes() == FILES[spec.repo_path]


def test_404_names_the_file_and_leaves_nothing(hub, tmp_path):
    spec = FileSpec(REPO, "Qwen3/nope.safetensors", tmp_path / "Qwen3" / "nope.safetensors")
    with pytest.raises(UserError) as info:
        download_files([spec], endpoint=hub.endpoint, offline=False)
    msg = str(info.value)
    assert "Qwen3/nope.safetensors" in msg and spec.url(hub.endpoint) in msg and "404" in msg
    assert not spec.local_path.exists()
    assert _leftovers(tmp_path) == []


def test_truncated_body_is_refused(hub, tmp_path):
    spec = _specs(tmp_path)[0]
    hub.plan = ["short"]
    with pytest.raises(UserError, match="incomplete") as info:
        download_files([spec], endpoint=hub.endpoint, progress=False, offline=False)
    assert spec.url(hub.endpoint) in str(info.value)
    assert not spec.local_path.exists()
    assert _leftovers(tmp_path) == []


def test_offline_lists_each_missing_file(hub, tmp_path, monkeypatch):
    specs = _specs(tmp_path)
    specs.append(FileSpec(REPO, "present.json", tmp_path / "present.json"))
    specs[-1].local_path.write_text("{}")
    with pytest.raises(UserError) as info:
        download_files(specs, offline=True)
    msg = str(info.value)
    assert msg == offline_report(specs)
    for spec in specs[:2]:
        assert f"from: https://huggingface.co/{REPO}/resolve/main/{spec.repo_path}" in msg
        assert f"into: {spec.local_path.parent}" in msg
    assert "present.json" not in msg
    assert "2 model files are missing" in msg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline=None follows the environment
    with pytest.raises(UserError, match="offline mode"):
        download_files(specs, endpoint=hub.endpoint)
    assert hub.requests == []


def test_unreachable_endpoint_gives_the_offline_report(online, tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    specs = _specs(tmp_path)
    with pytest.raises(UserError, match="cannot reach") as info:
        download_files(specs, endpoint=endpoint, offline=False)
    for spec in specs:
        assert spec.url(endpoint) in str(info.value)


def test_disk_full(hub, tmp_path, monkeypatch):
    spec = _specs(tmp_path)[0]
    # Not enough free space: refused before any byte is fetched.
    with monkeypatch.context() as m:
        m.setattr(dl.shutil, "disk_usage", lambda _p: SimpleNamespace(total=10**12, used=10**12, free=1000))
        with pytest.raises(UserError, match="Not enough disk space"):
            download_files([spec], endpoint=hub.endpoint, offline=False)
    assert hub.gets() == []

    # The disk fills up during the transfer (ENOSPC).
    def full_disk(url, f, **kwargs):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "http_get", full_disk)
    with pytest.raises(UserError, match="disk is full") as info:
        download_files([spec], endpoint=hub.endpoint, offline=False)
    assert spec.repo_path in str(info.value)
    assert not spec.local_path.exists()

