"""Generation settings stored in image files.

PNG: a `wgp_zimage` text chunk (JSON) and an A1111-style `parameters` text chunk (read by other tools).
JPEG / WebP: the same JSON (ASCII-escaped) in the EXIF ImageDescription tag, and the A1111 text in the
EXIF UserComment tag (as A1111 writes it: "UNICODE\\0" + UTF-16BE).

Schema 1: {"schema": 1, "app": "wgp-zimage", "model_type", "prompt", "negative_prompt", "width",
"height", "num_inference_steps", "guidance_scale", "flow_shift", "cfg_normalization",
"cfg_truncation", "seed" (this image's own seed: re-running it alone with num_images 1 gives
this image), "batch_seed", "image_index", "num_images", "loras", "memory_profile" (the job's per-generation
MMGP override, null = the app's configured one; newer files only, informative: restoring ignores it),
"dtype", "created"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SCHEMA = 1
PNG_KEY = "wgp_zimage"
A1111_KEY = "parameters"
FORMATS = ("png", "jpeg", "webp")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


def format_for_suffix(suffix: str) -> str:
    """".jpg" -> "jpeg", ".webp" -> "webp", anything else "png"."""
    s = suffix.lower().lstrip(".")
    return "jpeg" if s in ("jpg", "jpeg") else "webp" if s == "webp" else "png"


def settings_json(settings: dict[str, Any], ascii_only: bool = False) -> str:
    return json.dumps({"schema": SCHEMA, "app": "wgp-zimage", **settings}, ensure_ascii=ascii_only)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def a1111_parameters(settings: dict[str, Any]) -> str:
    """The A1111 "parameters" text of an image's settings.

    Our guidance g computes pos + g * (pos - neg) = (g + 1) * pos - g * neg, whereas A1111's CFG scale s
    computes neg + s * (pos - neg): the same thing for s = g + 1, hence "CFG scale: g+1".
    """
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [("Steps", settings.get("num_inference_steps")), ("Sampler", "Euler (flow)"),
              ("CFG scale", _num(float(settings["guidance_scale"]) + 1) if "guidance_scale" in settings else None),
              ("Seed", settings.get("seed")),
              ("Size", f"{settings['width']}x{settings['height']}" if "width" in settings else None),
              ("Model", settings.get("model_type")), ("Flow shift", settings.get("flow_shift"))]
    lines.append(", ".join(f"{k}: {_num(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_info(settings: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text(PNG_KEY, settings_json(settings))
    info.add_text(A1111_KEY, a1111_parameters(settings))
    return info


def exif_for(settings: dict[str, Any]) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = settings_json(settings, ascii_only=True)
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + a1111_parameters(settings).encode("utf-16-be")
    return exif


def save_kwargs(fmt: str, settings: dict[str, Any] | None, quality: int = 95) -> dict[str, Any]:
    """Keyword arguments for Image.save in format fmt ("png", "jpeg", "webp"), settings stored when given."""
    if fmt == "png":
        return {"pnginfo": png_info(settings)} if settings else {}
    kwargs: dict[str, Any] = {"quality": int(quality)}
    if settings:
        kwargs["exif"] = exif_for(settings)
    return kwargs


def _parse(text: Any) -> dict[str, Any] | None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text or not isinstance(text, str):
        return None
    try:
        data = json.loads(text.rstrip("\0"))
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("app", "wgp-zimage") == "wgp-zimage" else None


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings stored in an image (PNG, JPEG or WebP) by this app, or None when it holds none."""
    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
        if not text:
            try:
                text = im.getexif().get(EXIF_IMAGE_DESCRIPTION)
            except Exception:  # a broken EXIF block holds nothing of ours
                text = None
    return _parse(text)


def read_parameters(path: str | Path) -> str | None:
    """The A1111 "parameters" text of an image (PNG chunk or EXIF UserComment), or None."""
    with Image.open(path) as im:
        if im.info.get(A1111_KEY):
            return str(im.info[A1111_KEY])
        raw = im.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be", "replace")
    if isinstance(raw, bytes):
        return raw[8:].decode("utf-8", "replace") if len(raw) > 8 else None
    return raw or None
