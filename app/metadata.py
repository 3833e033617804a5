"""Generation settings stored in image files.

PNG: a `wgp_zimage` text chunk (JSON) and an A1111-style `parameters` text chunk (read by other tools).
JPEG / WebP: the same JSON (ASCII-escaped) in the EXIF ImageDescription tag, and the A1111 text in the
EXIF UserComment tag (as A1111 writes it: "UNICODE\\0" + UTF-16BE).

Schema 1: {"schema": 1, "app": "wgp-zimage", "model_type", every declared generation parameter
(app/params.py, the families' params.py) under its name, with "seed" this image's own seed (re-running
it alone with num_images 1 gives this image), "batch_seed", "image_index", "loras", "memory_profile"
(the job's per-generation MMGP override, null = the app's configured one; newer files only,
informative: restoring ignores it),
"dtype", "created"}.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from app.app_config import DEFAULT_OUTPUT_QUALITY
from app.untrusted import UntrustedError, load_json, open_regular
from models.errors import UserError
from models.parsing import parse_schedule

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
    """The A1111 "parameters" text of an image's settings: the prompt, the negative prompt, then each
    declared parameter that has an A1111 name (app/params.py; a family's may format its value, e.g.
    Z-Image's guidance g is A1111's CFG scale g + 1), the sampler, size and model."""
    from app.params import all_params

    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields: list[tuple[str, Any]] = []
    for p in all_params():
        value = settings.get(p.name)
        if p.a1111 and value is not None:
            fields.append((p.a1111, p.a1111_value(value) if p.a1111_value else value))
    # A1111's order: the sampler right after the steps (a family that declares none samples with Euler)
    sampler = next((f for f in fields if f[0] == "Sampler"), ("Sampler", "Euler (flow)"))
    fields = [f for f in fields if f[0] != "Sampler"]
    fields.insert(1 if fields and fields[0][0] == "Steps" else 0, sampler)
    fields += [("Size", f"{settings['width']}x{settings['height']}" if "width" in settings else None),
               ("Model", settings.get("model_type"))]
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


def stored_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """settings as an image stores them: a LoRA given by its file path (the CLI's --lora with a file outside the
    LoRA folder: an absolute path, which no LoRA folder name is) by the file's stem, so the user's folders are
    not published and a re-run finds the LoRA by that name in the LoRA folder."""
    loras = settings.get("loras")
    if not isinstance(loras, list) or not any(isinstance(i, dict) and _is_path(i.get("name")) for i in loras):
        return settings
    named = [{**i, "name": PurePath(i["name"]).stem} if isinstance(i, dict) and _is_path(i.get("name")) else i
             for i in loras]
    return {**settings, "loras": named}


def _is_path(name: Any) -> bool:
    return isinstance(name, str) and PurePath(name).is_absolute()  # this system's paths: the CLI made it


def save_kwargs(fmt: str, settings: dict[str, Any] | None, quality: int = DEFAULT_OUTPUT_QUALITY) -> dict[str, Any]:
    """Keyword arguments for Image.save in format fmt ("png", "jpeg", "webp"), settings stored when given."""
    settings = stored_settings(settings) if settings else settings
    if fmt == "png":
        return {"pnginfo": png_info(settings)} if settings else {}
    kwargs: dict[str, Any] = {"quality": int(quality)}
    if settings:
        kwargs["exif"] = exif_for(settings)
    return kwargs


class MetadataError(OSError, ValueError):
    """An image, or the settings it holds, cannot be used: one line that names no path.

    An OSError (callers that skip unreadable images keep doing so) and a ValueError (bad content).
    """


def _parse(text: Any, ours: bool) -> dict[str, Any] | None:
    """The settings in text; ours: the text sits under our own key, so broken JSON is an error, not "none"."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text or not isinstance(text, str):
        return None
    text = text.rstrip("\0")
    if not ours and not text.lstrip().startswith("{"):
        return None  # an EXIF description written by a camera or another app
    try:
        data = load_json(text)
    except UntrustedError as e:
        raise MetadataError(f"its wgp-zimage JSON {e}") from None
    if not isinstance(data, dict):
        if ours:
            raise MetadataError(f"its wgp-zimage JSON is a {type(data).__name__}, not an object")
        return None
    return data if data.get("app", "wgp-zimage") == "wgp-zimage" else None


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings stored in an image (PNG, JPEG or WebP) by this app, or None when it holds none.

    The file is untrusted: MetadataError when it is no regular file, no image of ours, claims a huge
    size (a decompression bomb: only the header is read, never the pixels) or holds settings that are
    not plain JSON (nested too deep, lone surrogates); OSError when it cannot be opened.
    """
    try:
        f = open_regular(path)
    except UntrustedError as e:
        raise MetadataError(str(e)) from None
    with f:
        try:
            with warnings.catch_warnings():  # the pixels are never decoded here: the size needs no warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f, formats=["PNG", "JPEG", "WEBP"])
        except Image.DecompressionBombError:
            raise MetadataError("claims an image size beyond the decompression bomb limit; refused") from None
        except UnidentifiedImageError:
            raise MetadataError("is not a PNG, JPEG or WebP image") from None
        except Exception as e:  # PIL raises many kinds for a broken header; its messages may name the path
            raise MetadataError(f"is not a readable image ({type(e).__name__})") from None
        with im:
            text = im.info.get(PNG_KEY)
            ours = bool(text)
            if not ours:
                try:
                    text = im.getexif().get(EXIF_IMAGE_DESCRIPTION)
                except Exception:  # a broken EXIF block holds nothing of ours
                    text = None
    return _input_files(_parse(text, ours=ours), Path(path))


def _input_files(data: dict[str, Any] | None, image: Path) -> dict[str, Any] | None:
    """The settings with their input files (an img2img image, a mask) as paths in the image's own folder,
    where the app saved their copies. The settings name them by file name only; a path (another folder, a
    parent) would let a crafted image point the app at any file: refused."""
    from app.params import all_params

    if data is None:
        return None
    for p in all_params():
        value = data.get(p.name)
        if not p.is_file or not value:
            continue
        if not isinstance(value, str) or value != Path(value).name or value in (".", "..") or "\\" in value:
            raise MetadataError(f"its settings' {p.name} is not a file name of its own folder")
        data[p.name] = str(image.resolve().parent / value)
    return data


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


def job_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """JobSpec keyword values from an image's settings (its own seed, one image), each value checked by its
    declaration (app/params.py).

    The settings are untrusted: MetadataError names the first key that holds a bad value (a list as
    model_type...). LoRA names are checked against the LoRA folder by whoever runs the job. The recorded
    memory profile is informative only and left out.
    """
    from app.params import all_params

    out: dict[str, Any] = {}
    if not isinstance(data.get("model_type"), str) or not data["model_type"].strip():
        raise MetadataError(f"its settings hold {type(data.get('model_type')).__name__} "
                            f"{data.get('model_type')!r:.60} as model_type, not text")
    out["model_type"] = data["model_type"]
    for p in all_params():
        if not p.stored or p.name in ("memory_profile", "num_images") or p.name not in data:
            continue
        try:
            out[p.name] = p.parse(data[p.name], from_text=False)
        except UserError as e:
            raise MetadataError(f"its settings' {p.name}: {e}") from None
    if not isinstance(out.get("prompt"), str) or not out["prompt"].strip():
        raise MetadataError("its settings hold no prompt")
    loras = data.get("loras") or []
    if not isinstance(loras, list):
        raise MetadataError(f"its settings hold {type(loras).__name__} as loras, not a list")
    out["loras"] = []
    for i, item in enumerate(loras):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise MetadataError(f"its settings' loras[{i}] is not a {{\"name\", \"strength\"}} object")
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float, str)):
            raise MetadataError(f"its settings' loras[{i}] strength is not a number")
        try:
            parse_schedule(strength)  # the run's own check, before any model loads
        except UserError as e:
            raise MetadataError(f"its settings' loras[{i}]: {e}") from None
        out["loras"].append({"name": item["name"], "strength": strength})
    out["num_images"] = 1
    return out
