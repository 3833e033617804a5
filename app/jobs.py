"""A generation job's settings and their validation (shared by the CLI, the UI and profiles)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.errors import UserError

MAX_SEED = 2**32 - 1
# The text encoder reads only the first 512 tokens (chat template included); a token is rarely more than a
# few characters, so 20,000 characters hold far more than it reads. Longer prompts are cut to this: the
# queue file, the image metadata and the token counter never carry megabytes.
PROMPT_TOKEN_LIMIT = 512
MAX_PROMPT_CHARS = 20_000
TEXT_FIELDS = ("prompt", "negative_prompt")

# field -> (min, max) inclusive; sizes must also be multiples of SIZE_MULTIPLE
RANGES: dict[str, tuple[float, float]] = {
    "width": (16, 4096),
    "height": (16, 4096),
    "num_inference_steps": (1, 100),
    "guidance_scale": (0.0, 20.0),
    "flow_shift": (1.0, 10.0),
    "num_images": (1, 16),
    "cfg_normalization": (0.0, 100.0),
    "cfg_truncation": (0.0, 100.0),
}
SIZE_MULTIPLE = 16
MEMORY_PROFILES = range(1, 6)  # MMGP memory profiles (app/offload.py); kept here so this module needs no torch
DEFAULT_MEMORY_PROFILE = "default"  # how the UI and the API name "no per-job override"
# the names users type on the command line, for messages
CLI_NAMES = {
    "width": "--width", "height": "--height", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
    "flow_shift": "--flow-shift", "num_images": "--num-images", "cfg_normalization": "--cfg-normalization",
    "cfg_truncation": "--cfg-truncation", "seed": "--seed", "memory_profile": "--memory-profile",
}


@dataclass
class JobSpec:
    model_type: str
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 30
    guidance_scale: float = 4.0
    flow_shift: float = 6.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    seed: int = -1
    num_images: int = 1
    loras: list[dict[str, Any]] = field(default_factory=list)
    # a per-job MMGP memory profile (1-5); None runs with the app's configured one. Absent from older
    # queue files and images, hence optional and last.
    memory_profile: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def text_problem(value: Any) -> str | None:
    """Why value cannot be stored as UTF-8 text (None when it can). A lone surrogate ("\\ud800", or bytes of a
    command line that are not UTF-8) passes through Python but breaks every JSON reply and file holding it."""
    if not isinstance(value, str):
        return f"must be text (got {type(value).__name__})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a character that is not valid Unicode text at position {e.start} (a lone surrogate)"
    return None


def check_text(value: Any, label: str) -> None:
    """UserError when value is not storable text; the message never repeats the text itself."""
    problem = text_problem(value)
    if problem is not None:
        raise UserError(f"{label} {problem}")


def cap_texts(spec: JobSpec, names: dict[str, str] | None = None) -> list[str]:
    """Cut the prompt and negative prompt to MAX_PROMPT_CHARS (in place); one warning per cut text."""
    names = names or {}
    warnings = []
    for key in TEXT_FIELDS:
        text = getattr(spec, key)
        if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
            setattr(spec, key, text[:MAX_PROMPT_CHARS])
            warnings.append(f"{names.get(key, key.replace('_', ' '))} is {len(text):,} characters: cut to the first "
                            f"{MAX_PROMPT_CHARS:,} (the text encoder reads only its first {PROMPT_TOKEN_LIMIT} tokens)")
    return warnings


def validate(spec: JobSpec, names: dict[str, str] | None = None) -> list[str]:
    """Raise UserError naming the first bad field; return warnings for legal but odd values."""
    names = names or {}
    for key in ("model_type", *TEXT_FIELDS):
        check_text(getattr(spec, key), names.get(key, key.replace("_", " ")))
    if not spec.prompt.strip():
        raise UserError("the prompt is empty")
    if not isinstance(spec.loras, list):
        raise UserError(f"loras must be a list (got {type(spec.loras).__name__})")
    for item in spec.loras:
        if not isinstance(item, dict):
            raise UserError(f"bad LoRA entry {item!r}: expected {{'name': ..., 'strength': ...}}")
        for value in item.values():
            if isinstance(value, str):
                check_text(value, "a LoRA name or strength")
    for key, (lo, hi) in RANGES.items():
        value = getattr(spec, key)
        label = names.get(key, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{label} must be a number (got {value!r})")
        if not lo <= value <= hi:
            raise UserError(f"{label} must be between {lo:g} and {hi:g} (got {value:g})")
    for key in ("width", "height", "num_inference_steps", "num_images"):
        if int(getattr(spec, key)) != getattr(spec, key):
            raise UserError(f"{names.get(key, key)} must be a whole number (got {getattr(spec, key)})")
    for key in ("width", "height"):
        if getattr(spec, key) % SIZE_MULTIPLE:
            raise UserError(
                f"{names.get(key, key)} must be a multiple of {SIZE_MULTIPLE} (got {getattr(spec, key)})")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not -1 <= spec.seed <= MAX_SEED:
        raise UserError(f"{names.get('seed', 'seed')} must be -1 (random) or 0..{MAX_SEED} (got {spec.seed})")
    mp = spec.memory_profile
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp not in MEMORY_PROFILES):
        raise UserError(f"{names.get('memory_profile', 'memory_profile')} must be a whole number from "
                        f"{MEMORY_PROFILES[0]} to {MEMORY_PROFILES[-1]}, or none for the app's default (got {mp!r})")
    return []


def parse_memory_profile(value: Any, label: str = "memory profile") -> int | None:
    """A per-job memory profile from the UI or the API: None for "default" / empty, else a whole number 1-5."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", DEFAULT_MEMORY_PROFILE)):
        return None
    number = None
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number not in MEMORY_PROFILES:
        raise UserError(f"{label} must be {DEFAULT_MEMORY_PROFILE!r} (the Config section's) or a whole number from "
                        f"{MEMORY_PROFILES[0]} to {MEMORY_PROFILES[-1]} (got {value!r})")
    return number


def size_warnings(spec: JobSpec, min_recommended: int) -> list[str]:
    if min_recommended and min(spec.width, spec.height) < min_recommended:
        return [f"{spec.width}x{spec.height} is below {min_recommended} px: the model was not trained "
                "that small, expect poor images"]
    return []


def resolve_seed(seed: int) -> int:
    """-1 means a fresh random seed; leave room for seed + image index."""
    return random.randint(0, MAX_SEED - 16) if seed == -1 else seed
