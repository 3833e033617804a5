"""Fetch model files from the Hugging Face Hub (or a mirror), for any model family.

A model lists its files as `FileSpec`s (repo, path in the repo, where it goes locally);
`download_files` fetches the missing ones and leaves present ones alone, without any
network request when nothing is missing.

Why not `hf_hub_download(local_dir=...)`: since huggingface_hub 1.x it downloads into a
process-unique temporary file that is deleted on failure, so an interrupted multi-GB
download starts over from zero on the next run. Here the partial file is kept under
`<folder>/.cache/partial/` (named after the file and its ETag) and the next run resumes it
with an HTTP Range request. The hub's own pieces are still used for the HEAD metadata call
(redirects, ETag, size, offline mode, auth headers) and for the transfer (`http_get`: Range,
retries of transient errors, size check).

A file only ever appears under its final name by an atomic rename once its size matches what
the server announced, so "present" means "complete".
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from tqdm import tqdm

from models.errors import UserError
from models.hub_urls import hub_file

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_DIR = Path(".cache") / "partial"  # relative to each file's folder: same disk, so the final move is atomic
_RETRYABLE_STATUS = (429, 500, 502, 503, 504)
_TRUE = {"1", "on", "yes", "true"}

__all__ = ["FileSpec", "download_files", "missing_files", "missing_report", "offline_report", "remote_sizes",
           "spec_from_url"]


@dataclass
class FileSpec:
    """One file of a Hub repository and where it must end up on disk."""

    repo_id: str  # "DeepBeepMeep/Z-Image"
    repo_path: str  # path inside the repo, "/"-separated: "Qwen3/qwen3_bf16.safetensors"
    local_path: Path  # final location: ckpts/Qwen3/qwen3_bf16.safetensors
    revision: str = "main"

    def __post_init__(self) -> None:
        self.local_path = Path(self.local_path)

    def url(self, endpoint: str | None = None) -> str:
        """`<endpoint>/<repo_id>/resolve/<revision>/<repo_path>`; endpoint: $HF_ENDPOINT, else huggingface.co."""
        return hf_hub_url(self.repo_id, self.repo_path, revision=self.revision, endpoint=_endpoint(endpoint))


def _endpoint(endpoint: str | None) -> str:
    # Read HF_ENDPOINT now rather than at import (huggingface_hub freezes it in constants.ENDPOINT).
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _offline_from_env() -> bool:
    # The hub reads HF_HUB_OFFLINE once at import; honour a later change of the variable too.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def spec_from_url(url: str, checkpoints_dir: Path) -> FileSpec:
    """Parse `https://<host>/<owner>/<repo>/resolve/<revision>/<path>`; the file goes to checkpoints_dir/<path>.

    The host is not kept: which endpoint to download from is chosen at download time.
    """
    repo_id, revision, path = hub_file(url)
    return FileSpec(repo_id=repo_id, repo_path="/".join(path), local_path=Path(checkpoints_dir).joinpath(*path),
                    revision=revision)


def _is_present(spec: FileSpec) -> bool:
    try:
        return spec.local_path.is_file() and spec.local_path.stat().st_size > 0
    except OSError:
        return False


def missing_files(specs: Iterable[FileSpec]) -> list[FileSpec]:
    """The specs whose file is absent or empty (each local path once, in order)."""
    seen: set[Path] = set()
    out = []
    for spec in specs:
        if spec.local_path in seen or _is_present(spec):
            continue
        seen.add(spec.local_path)
        out.append(spec)
    return out


def _file_lines(missing: list[FileSpec], endpoint: str | None, sizes: dict[Path, int | None] | None = None
                ) -> list[str]:
    """Each missing file: its path in the repository (and size when known), its URL, the folder it goes in."""
    lines = []
    for spec in missing:
        size = (sizes or {}).get(spec.local_path)
        lines += [
            f"  {spec.repo_path}" + (f" ({_size(size)})" if size is not None else ""),
            f"    from: {spec.url(endpoint)}",
            f"    into: {spec.local_path.parent}{os.sep}",
        ]
    return lines


def offline_report(specs: Iterable[FileSpec], *, endpoint: str | None = None, reason: str | None = None) -> str:
    """A message telling the user, for each missing file, which URL to fetch and which folder to put it in."""
    missing = missing_files(specs)
    if not missing:
        return "All model files are present."
    why = reason or "offline mode is on (HF_HUB_OFFLINE)"
    lines = [
        f"{len(missing)} model file{'s are' if len(missing) > 1 else ' is'} missing and cannot be downloaded: {why}.",
        "Download each file below with a browser or another machine and put it in the folder shown"
        " (keep the file name), or go online and run again:",
    ]
    return "\n".join(lines + _file_lines(missing, endpoint))


def missing_report(specs: Iterable[FileSpec], *, endpoint: str | None = None, offline: bool | None = None,
                   sizes: dict[Path, int | None] | None = None) -> str:
    """Before any download (the web UI's model list): what is missing, how much to download, where from and
    to. sizes: remote_sizes(); the total is given when every missing file's size is known."""
    missing = missing_files(specs)
    if not missing:
        return "All model files are present."
    offline = _offline_from_env() if offline is None else offline
    known = [(sizes or {}).get(s.local_path) for s in missing]
    if all(n is not None for n in known):
        total = f"{_size(sum(known))} to download"  # type: ignore[arg-type]  # no None left
    else:
        total = "download size unknown offline" if offline else "download size unknown"
    n = len(missing)
    how = ("Offline (HF_HUB_OFFLINE): download each file below with a browser or another machine and put it"
           " in the folder shown (keep the file name)." if offline else
           "The first job downloads them; or download each file below yourself and put it in the folder shown"
           " (keep the file name).")
    head = f"{n} model file{'s are' if n > 1 else ' is'} missing ({total})."
    return "\n".join([head, how] + _file_lines(missing, endpoint, sizes))


_SIZES: dict[str, int] = {}  # URL -> size in bytes, from earlier HEAD requests
_SIZES_UNREACHABLE = 60.0  # seconds without asking again after the endpoint could not be reached
_unreachable_until = 0.0


def remote_sizes(specs: Iterable[FileSpec], *, endpoint: str | None = None, offline: bool | None = None
                 ) -> dict[Path, int | None]:
    """Each file's size from the Hub (a HEAD request, remembered), None where unknown. No request offline,
    and none for a minute after the endpoint could not be reached: a page asking again must not wait."""
    global _unreachable_until
    specs = list(specs)
    offline = _offline_from_env() if offline is None else offline
    out: dict[Path, int | None] = {}
    for spec in specs:
        url = spec.url(endpoint)
        if url not in _SIZES and not offline and time.monotonic() >= _unreachable_until:
            try:
                size = _metadata(spec, url).size
            except _Unreachable:
                _unreachable_until = time.monotonic() + _SIZES_UNREACHABLE
                size = None
            except UserError:  # not found, gated...: the download will say so
                size = None
            if size is not None:
                _SIZES[url] = size
        out[spec.local_path] = _SIZES.get(url)
    return out


def download_files(
    specs: Iterable[FileSpec],
    *,
    endpoint: str | None = None,
    progress: bool = True,
    offline: bool | None = None,
) -> list[Path]:
    """Make sure every spec's file is on disk, downloading the missing ones; returns the local paths in order.

    offline=None follows HF_HUB_OFFLINE. Any failure raises UserError with a message for the user;
    an interrupted transfer is resumed by the next call.
    """
    specs = list(specs)
    todo = missing_files(specs)
    if todo:
        if offline is None:
            offline = _offline_from_env()
        if offline:
            raise UserError(offline_report(todo, endpoint=endpoint))
        for spec in todo:
            try:
                _download_one(spec, endpoint=endpoint, progress=progress)
            except _Unreachable as e:
                # No network: the remaining files will not come either, so list them all for a manual download.
                raise UserError(offline_report(todo, endpoint=endpoint, reason=str(e))) from e
    return [spec.local_path for spec in specs]


class _Unreachable(Exception):
    """The endpoint could not be reached (no network, DNS, proxy, offline mode)."""


def _partial_path(spec: FileSpec, etag: str) -> Path:
    # The ETag in the name means a partial file is only resumed against the very same remote file.
    tag = hashlib.sha256(etag.encode()).hexdigest()[:12]
    return spec.local_path.parent / PARTIAL_DIR / f"{spec.local_path.name}.{tag}.incomplete"


def _bar_class(label: str, enabled: bool) -> type[tqdm]:
    """A plain tqdm (size in B/kB/MB, speed, ETA) that the hub's http_get instantiates for each transfer."""

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(desc=label, disable=not enabled, unit="B", unit_scale=True, unit_divisor=1024,
                          dynamic_ncols=True, mininterval=0.5)
            super().__init__(*args, **kwargs)

    return _Bar


def _size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _http_message(spec: FileSpec, url: str, err: HfHubHTTPError) -> str:
    status = err.response.status_code if err.response is not None else None
    if isinstance(err, RemoteEntryNotFoundError) or status == 404:
        hint = "the file is not in that repository (wrong name, or it was moved or removed)"
    elif isinstance(err, (GatedRepoError, RepositoryNotFoundError)) or status in (401, 403):
        hint = ("the repository is missing, private or gated: accept its terms on the Hub and set HF_TOKEN"
                " (or run `hf auth login`) if you have access")
    elif status in _RETRYABLE_STATUS:
        hint = "the server is busy or down; try again later"
    else:
        hint = "unexpected answer from the server"
    code = f"HTTP {status}" if status is not None else "an HTTP error"
    return (f"Could not download {spec.repo_path}: {url} answered {code}; {hint}. "
            f"You can also fetch it yourself and put it at {spec.local_path}.")


def _metadata(spec: FileSpec, url: str):
    """HEAD the resolve URL: final location (after Hub redirects), ETag and size."""
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        try:
            # No retries first: a machine without network must fail fast, not after ~20 s of backoff.
            return get_hf_file_metadata(url, timeout=timeout)
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code not in _RETRYABLE_STATUS:
                raise
            return get_hf_file_metadata(url, timeout=timeout, retry_on_errors=True)
    except (OfflineModeIsEnabled, httpx2.TransportError) as e:
        raise _Unreachable(f"cannot reach {url} ({type(e).__name__}: {e})") from e
    except HfHubHTTPError as e:
        raise UserError(_http_message(spec, url, e)) from e
    except FileMetadataError as e:
        raise UserError(
            f"Could not download {spec.repo_path}: {url} did not answer like the Hugging Face Hub ({e}). "
            "Check HF_ENDPOINT, proxy and firewall settings."
        ) from e


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlparse(a), urlparse(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _download_one(spec: FileSpec, *, endpoint: str | None, progress: bool) -> None:
    url = spec.url(endpoint)
    meta = _metadata(spec, url)
    size: int | None = meta.size
    partial = _partial_path(spec, meta.etag or "")
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the folder {partial.parent} for {spec.repo_path}: {e}.") from e

    # One downloader per file: two processes appending to the same partial file would corrupt it.
    with WeakFileLock(partial.parent / f"{spec.local_path.name}.lock"):
        if _is_present(spec):  # another process finished it while we waited
            return
        for stale in glob.glob(glob.escape(str(partial.parent / spec.local_path.name)) + ".*.incomplete"):
            if Path(stale) != partial:  # left over from an older version of the remote file
                Path(stale).unlink(missing_ok=True)
        done = partial.stat().st_size if partial.is_file() else 0
        if size is not None and done > size:
            partial.unlink()
            done = 0
        if size is not None:
            free = shutil.disk_usage(partial.parent).free
            if free < size - done:
                raise UserError(
                    f"Not enough disk space to download {spec.repo_path} ({_size(size)}): "
                    f"{spec.local_path.parent} has {_size(free)} free, {_size(size - done)} more is needed. "
                    "Free some space and run again."
                )

        headers = build_hf_headers()
        if not _same_origin(url, meta.location):
            headers.pop("authorization", None)  # signed CDN URL: the token must not leave the Hub
        try:
            with partial.open("ab") as f:  # append: `done` bytes are already there
                http_get(meta.location, f, resume_size=done, headers=headers, expected_size=size,
                         displayed_filename=spec.repo_path, tqdm_class=_bar_class(spec.repo_path, progress))
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 416:
                partial.unlink(missing_ok=True)  # the server rejects our resume point: start over next time
            raise UserError(_http_message(spec, url, e) + _kept(partial)) from e
        except httpx2.TransportError as e:
            raise _Unreachable(
                f"the connection to {url} was lost while downloading ({type(e).__name__}: {e});{_kept(partial)}"
            ) from e
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(
                    f"The disk is full: could not finish {spec.repo_path} ({_size(size)}) into "
                    f"{spec.local_path.parent}. Free some space and run again; the download will resume."
                ) from e
            if e.errno is None and "Consistency check failed" in str(e):
                # The server sent a different length than announced: not a prefix we can trust.
                got = partial.stat().st_size if partial.is_file() else 0
                partial.unlink(missing_ok=True)
                raise UserError(_truncated(spec, url, size, got)) from e
            raise UserError(f"Could not write {spec.repo_path} to {partial}: {e}.") from e

        got = partial.stat().st_size
        if (size is not None and got != size) or got == 0:
            partial.unlink(missing_ok=True)
            raise UserError(_truncated(spec, url, size, got))
        try:
            os.replace(partial, spec.local_path)  # atomic: the final name only ever holds a complete file
        except OSError as e:
            raise UserError(f"Could not move the downloaded {spec.repo_path} to {spec.local_path}: {e}.") from e
    _tidy(partial.parent, spec.local_path.name)


def _tidy(partial_dir: Path, name: str) -> None:
    """After a success, drop the lock file and the empty .cache folders (best effort).

    Safe against a concurrent downloader: whoever takes the lock from now on finds the final file present.
    """
    try:
        (partial_dir / f"{name}.lock").unlink(missing_ok=True)
        partial_dir.rmdir()
        partial_dir.parent.rmdir()
    except OSError:
        pass  # not empty (another file's partial or lock) or not removable: harmless


def _kept(partial: Path) -> str:
    if partial.is_file() and partial.stat().st_size:
        return f" {_size(partial.stat().st_size)} already downloaded are kept; running again resumes the download."
    return ""


def _truncated(spec: FileSpec, url: str, size: int | None, got: int) -> str:
    expected = f"{size} bytes" if size is not None else "a non-empty file"
    return (f"The download of {spec.repo_path} from {url} is incomplete or damaged: expected {expected}, "
            f"received {got}. Nothing was saved under its final name; run again to retry.")
