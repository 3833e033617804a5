"""Output file names, atomic image writes, and the cleanup of temporary files a killed process left."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from PIL import Image

from app.app_config import DEFAULT_OUTPUT_QUALITY
from app.metadata import format_for_suffix, save_kwargs
from models.files import atomic_path

SLUG_MAX = 50
# models.files.atomic_path's temporary files: ".<name>.<8 random characters>.part" beside the target
PART_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.part$")
# a temporary file older than this belongs to no write in progress (an image is written in well under a
# second): it is what a killed process left. Younger ones may be another process's (the CLI writing into
# the same folder), so they stay.
STALE_PART_SECONDS = 60.0
log = logging.getLogger("wgp_zimage")


def prompt_slug(prompt: str, max_len: int = SLUG_MAX) -> str:
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return slug[:max_len].rstrip("_") or "image"


def output_name(when: datetime, seed: int, index: int, prompt: str, ext: str = "png") -> str:
    """YYYY-MM-DD-HHhMMmSSs_seed<N>_<i>_<prompt slug>.<ext> (i counts from 1)."""
    return f"{when.strftime('%Y-%m-%d-%Hh%Mm%Ss')}_seed{seed}_{index}_{prompt_slug(prompt)}.{ext}"


# copies of a job's input files beside its first output: <output stem>_input.png, <output stem>_mask.png,
# <output stem>_control_input.png (a control image); <output stem>_control.png is the control map a job made
INPUT_COPY_NAMES = {"image": "input", "control_image": "control_input"}
_INPUT_COPY = re.compile(r"_(?:input|mask|control|control_input)(?:-\d+)?\.png$")


def input_copy_path(output: Path, param: str) -> Path:
    """Where the copy of input parameter param (an image, a mask) of the job that wrote output goes."""
    return unique_path(output.with_name(f"{output.stem}_{INPUT_COPY_NAMES.get(param, param)}.png"))


def is_input_copy(name: str, names: Collection[str]) -> bool:
    """Whether a file name is an input's copy (the gallery lists results only): it ends like one and the
    output it was copied for is among names (the folder's): a prompt ending in "mask" is no copy."""
    m = _INPUT_COPY.search(name)
    return bool(m) and any(name[:m.start()] + ext in names for ext in (".png", ".jpg", ".jpeg", ".webp"))


def unique_path(path: Path) -> Path:
    """path, or path with -2, -3... before the suffix when it exists already."""
    if not path.exists():
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


class SaveError(OSError):
    """An image (or a copy beside it) could not be written; filename is the file meant, not its temporary one."""


def output_folder_problem(folder: str | Path) -> str | None:
    """Why images cannot be written in folder (made when the first one is saved), or None. Checked before a job
    renders (the CLI's run, each queued job), not found after the whole render. A file is really created (and
    removed at once): a read-only or immutable folder lets root's permission check pass."""
    folder = Path(os.path.abspath(folder))
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe}"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"cannot write in {probe} ({(e.strerror or type(e).__name__).lower()})"
    return None


def save_image_atomic(image: Image.Image, path: Path, settings: dict | None = None,
                      quality: int = DEFAULT_OUTPUT_QUALITY) -> Path:
    """Write to a temporary file beside path, then rename: no half-written file under its name.

    The format follows the suffix (.png, .jpg/.jpeg, .webp); settings (None: none) go in the PNG text
    chunks or the JPEG / WebP EXIF; quality (1-100) applies to JPEG and WebP.
    """
    path = Path(path)
    fmt = format_for_suffix(path.suffix)
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            image.save(f, format=fmt.upper(), **save_kwargs(fmt, settings, quality))
    except SaveError:
        raise
    except OSError as e:  # named by the image, not by its temporary file (".<name>.<random>.part")
        raise SaveError(e.errno, e.strerror or str(e), str(path)) from e
    return path


def clean_stale_parts(folder: str | Path, older_than: float = STALE_PART_SECONDS) -> list[Path]:
    """Remove the temporary files a killed write left in folder (not its subfolders); the removed paths."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for entry in entries:
        if not PART_PATTERN.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    if removed:
        log.info("removed %d unfinished temporary file(s) a stopped process left in %s", len(removed), folder)
    return removed
