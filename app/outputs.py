"""Output file names and atomic image writes."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from pathlib import Path

from PIL import Image

from app.metadata import format_for_suffix, save_kwargs
from models.files import atomic_path

SLUG_MAX = 50


def prompt_slug(prompt: str, max_len: int = SLUG_MAX) -> str:
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return slug[:max_len].rstrip("_") or "image"


def output_name(when: datetime, seed: int, index: int, prompt: str, ext: str = "png") -> str:
    """YYYY-MM-DD-HHhMMmSSs_seed<N>_<i>_<prompt slug>.<ext> (i counts from 1)."""
    return f"{when.strftime('%Y-%m-%d-%Hh%Mm%Ss')}_seed{seed}_{index}_{prompt_slug(prompt)}.{ext}"


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


def save_image_atomic(image: Image.Image, path: Path, settings: dict | None = None, quality: int = 95) -> Path:
    """Write to a temporary file beside path, then rename: no half-written file under its name.

    The format follows the suffix (.png, .jpg/.jpeg, .webp); settings (None: none) go in the PNG text
    chunks or the JPEG / WebP EXIF; quality (1-100) applies to JPEG and WebP.
    """
    path = Path(path)
    fmt = format_for_suffix(path.suffix)
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format=fmt.upper(), **save_kwargs(fmt, settings, quality))
    return path
