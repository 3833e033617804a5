"""The web UI's saved configuration (`wgp_zimage_config.json`), applied when the app next starts.

Keys (all optional): memory_profile (1-5), attention, compile, transformer_quantization,
text_encoder_quantization, output_dir, output_format, output_quality, save_metadata. On start the saved
values become the command-line defaults, so flags given explicitly still win. No torch here.

The output folder is checked on save and at start (check_output_dir): it must be creatable and writable,
and must not be the root folder or contain the home folder, the app folder or the state folder (the queue
and this file). A bad saved value is dropped at start with a warning, so the default applies.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.files import atomic_path
from models.registry import LOWBIT_FORMATS

CONFIG_FILE = "wgp_zimage_config.json"
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "flash3", "sage")
QUANTIZATION_CHOICES = ("auto", "bf16", "int8")
# the transformer's: also the low-bit files a definition may list
TRANSFORMER_QUANTIZATION_CHOICES = (*QUANTIZATION_CHOICES, *LOWBIT_FORMATS)
FORMAT_CHOICES = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_QUALITY = 95  # JPEG / WebP quality: the CLI's, the service's and a new profile's
OUTPUT_QUALITY_RANGE = (1, 100)
KEYS = ("memory_profile", "attention", "compile", "transformer_quantization", "text_encoder_quantization",
        "output_dir", "output_format", "output_quality", "save_metadata")
MODEL_KEYS = ("memory_profile", "attention", "compile", "transformer_quantization", "text_encoder_quantization")
APP_DIR = Path(__file__).resolve().parent.parent


def config_path(state_dir: str | Path | None, output_dir: str | Path) -> Path:
    return Path(state_dir or output_dir) / CONFIG_FILE


def _whole(value: Any, lo: int, hi: int, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be a whole number from {lo} to {hi} (got {value!r})")
    return value


def validate_config(data: dict[str, Any]) -> dict[str, Any]:
    """The known keys of data, checked and normalised; raises UserError naming a bad value."""
    if not isinstance(data, dict):
        raise UserError("the configuration must be a JSON object")
    out: dict[str, Any] = {}
    for key in KEYS:
        if key not in data:
            continue
        v = data[key]
        if key == "memory_profile":
            v = _whole(v, 1, 5, "memory profile")
        elif key == "output_quality":
            v = _whole(v, *OUTPUT_QUALITY_RANGE, "output quality")
        elif key in ("compile", "save_metadata"):
            if not isinstance(v, bool):
                raise UserError(f"{key} must be true or false (got {v!r})")
        elif key == "output_dir":
            if not isinstance(v, str) or not v.strip():
                raise UserError("the output folder must be a non-empty path")
            v = v.strip()
            if any(ord(c) < 32 or ord(c) == 127 for c in v):  # a NUL byte made every later start fail
                raise UserError(f"the output folder must not contain control characters (got {v!r})")
        else:
            choices = {"attention": ATTENTION_CHOICES, "output_format": FORMAT_CHOICES,
                       "transformer_quantization": TRANSFORMER_QUANTIZATION_CHOICES}.get(key, QUANTIZATION_CHOICES)
            if v not in choices:
                raise UserError(f"{key.replace('_', ' ')} must be one of {', '.join(choices)} (got {v!r})")
        out[key] = v
    return out


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _writable(folder: Path) -> None:
    """Create folder (and a file in it) to prove the next start can; remove what this created."""
    missing = []
    p = Path(os.path.abspath(folder))
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"the output folder {folder} cannot be created or written ({e.strerror or e})") from None
    finally:
        for m in missing:  # deepest first: the folder is made for real at the next start
            with contextlib.suppress(OSError):
                m.rmdir()


def check_output_dir(output_dir: str | Path, state_dir: str | Path) -> None:
    """Raise UserError (one line) when the web UI must not use output_dir: it cannot be created or written,
    or it is the root folder or contains the home folder, the app folder or state_dir (the queue and config;
    state_dir may be the output folder itself). Defence in depth: the server sends only the images the
    gallery lists (app/served_files.py), but a folder this wide is a mistake worth stopping."""
    text = str(output_dir)
    if "\x00" in text:
        raise UserError(f"the output folder must not contain control characters (got {text!r})")
    out = _resolved(output_dir)
    if out == out.parent:
        raise UserError(f"the output folder cannot be the root folder {out}: choose a folder of its own")
    protected = [("your home folder", None), ("the app folder", APP_DIR)]
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        protected[0] = ("your home folder", Path.home())
    for what, folder in protected:
        if folder is not None and (out == _resolved(folder) or out in _resolved(folder).parents):
            raise UserError(f"the output folder {output_dir} is or contains {what} ({folder}): "
                            "choose a folder of its own")
    if out in _resolved(state_dir).parents:
        raise UserError(f"the output folder {output_dir} contains the state folder {state_dir} (queue and "
                        "config): choose a folder of its own")
    _writable(Path(output_dir))


def load_config(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(the saved settings, warnings); a missing file is an empty config, an unreadable one is ignored with a
    warning, and each bad value is dropped with a warning (its default applies), so the app still starts."""
    path = Path(path)
    from app.untrusted import UntrustedError, load_json, read_text

    try:  # a FIFO, a huge file, deep nesting or NaN: a warning, never a crash at start
        data = load_json(read_text(path, 1 << 20))
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError, UntrustedError) as e:
        return {}, [f"ignoring the configuration file {path}: {e}"]
    if not isinstance(data, dict):
        return {}, [f"ignoring the configuration file {path}: the configuration must be a JSON object"]
    out: dict[str, Any] = {}
    warnings = []
    for key in KEYS:
        if key not in data:
            continue
        try:
            value = validate_config({key: data[key]})[key]
            if key == "output_dir":
                check_output_dir(value, path.parent)  # the file lives in the state folder
        except UserError as e:
            name = "output folder" if key == "output_dir" else key.replace("_", " ")
            warnings.append(f"{path}: ignoring the saved {name}, using the default: {e}")
            continue
        out[key] = value
    return out, warnings


def save_config(path: str | Path, data: dict[str, Any]) -> Path:
    """Validate data (the output folder against the file's folder, the state folder) and write it atomically
    (temporary file, then rename)."""
    clean = validate_config(data)
    path = Path(path)
    if "output_dir" in clean:
        check_output_dir(clean["output_dir"], path.parent)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def parser_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved settings as argparse defaults (dest names; output_dir as a Path)."""
    return {k: Path(v) if k == "output_dir" else v for k, v in saved.items()}
