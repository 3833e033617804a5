"""The web UI's saved configuration (`wgp_zimage_config.json`), applied when the app next starts.

Keys (all optional): memory_profile (1-5), attention, compile, transformer_quantization,
text_encoder_quantization, output_dir, output_format, output_quality, save_metadata. On start the saved
values become the command-line defaults, so flags given explicitly still win. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.files import atomic_path

CONFIG_FILE = "wgp_zimage_config.json"
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "flash3", "sage")
QUANTIZATION_CHOICES = ("auto", "bf16", "int8")
FORMAT_CHOICES = ("png", "jpeg", "webp")
KEYS = ("memory_profile", "attention", "compile", "transformer_quantization", "text_encoder_quantization",
        "output_dir", "output_format", "output_quality", "save_metadata")
MODEL_KEYS = ("memory_profile", "attention", "compile", "transformer_quantization", "text_encoder_quantization")


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
            v = _whole(v, 1, 100, "output quality")
        elif key in ("compile", "save_metadata"):
            if not isinstance(v, bool):
                raise UserError(f"{key} must be true or false (got {v!r})")
        elif key == "output_dir":
            if not isinstance(v, str) or not v.strip():
                raise UserError("the output folder must be a non-empty path")
            v = v.strip()
        else:
            choices = {"attention": ATTENTION_CHOICES, "output_format": FORMAT_CHOICES}.get(key, QUANTIZATION_CHOICES)
            if v not in choices:
                raise UserError(f"{key.replace('_', ' ')} must be one of {', '.join(choices)} (got {v!r})")
        out[key] = v
    return out


def load_config(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(the saved settings, warnings); a missing file is an empty config, a bad one is ignored with a warning."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as e:
        return {}, [f"ignoring the configuration file {path}: {e}"]
    try:
        return validate_config(data), []
    except UserError as e:
        return {}, [f"ignoring the configuration file {path}: {e}"]


def save_config(path: str | Path, data: dict[str, Any]) -> Path:
    """Validate data and write it atomically (temporary file, then rename)."""
    clean = validate_config(data)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def parser_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved settings as argparse defaults (dest names; output_dir as a Path)."""
    return {k: Path(v) if k == "output_dir" else v for k, v in saved.items()}
