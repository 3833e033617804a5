"""Atomic file writes: a temporary file beside the target, renamed onto it only once complete.

Every file the app writes (images, settings, profiles, the queue, the config, int8 weights) goes
through `atomic_path`, so a crash or a full disk leaves the old file or the new one, never half of
one, and no temporary file behind. `tempfile.mkstemp` creates its files readable by their owner
only (0600); the renamed file gets the mode a plain `open()` would give instead (0666 less the
umask), or keeps the mode of the file it replaces.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it before Python 3.13; restored at once
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import, before any worker thread exists


def creation_mode(directory: bool = False) -> int:
    """The mode a plain open() / mkdir() would give a new file / folder (the umask applied)."""
    return (0o777 if directory else 0o666) & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends without an error it is
    renamed onto `path` (durable: file and rename flushed to disk first), otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = creation_mode()
        os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
