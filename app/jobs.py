"""A generation job's settings and their validation (shared by the CLI, the UI and profiles)."""

from __future__ import annotations

import random
import unicodedata
from typing import Any

from app import params as _params
from models.errors import UserError
from models.registry import check_declared_values, check_job

MAX_SEED = _params.MAX_SEED
# Text encoders read a few hundred tokens (Z-Image's: 512, chat template included); a token is rarely more than
# a few characters, so 20,000 characters hold far more than they read. Longer prompts are cut to this: the
# queue file, the image metadata and the token counter never carry megabytes.
MAX_PROMPT_CHARS = 20_000
TEXT_FIELDS = ("prompt", "negative_prompt")
MEMORY_PROFILES = _params.MEMORY_PROFILES
DEFAULT_MEMORY_PROFILE = "default"  # how the UI and the API name "no per-job override"


class JobSpec:
    """A job's settings: its model type, its LoRAs and one attribute per declared parameter
    (app/params.py and the families' params.py), each defaulting to its declaration's default.

    Built from raw values at the edges (command line, page, API, profile, image metadata), checked
    once there by `validate`; the queue, the service and the pipeline trust it.
    """

    def __init__(self, model_type: str, prompt: str = "", loras: list[dict[str, Any]] | None = None,
                 **values: Any) -> None:
        declared = _params.by_name()
        unknown = sorted(set(values) - declared.keys())
        if unknown:
            raise TypeError(f"JobSpec got unknown settings: {', '.join(unknown)}")
        self.model_type = model_type
        for name, p in declared.items():
            setattr(self, name, values.get(name, p.default))
        self.prompt = prompt
        self.loras = list(loras) if isinstance(loras, (list, tuple)) else ([] if loras is None else loras)

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": self.model_type}
        out.update({name: getattr(self, name) for name in _params.by_name()})
        out["loras"] = [dict(x) if isinstance(x, dict) else x for x in self.loras] if isinstance(self.loras, list) \
            else self.loras
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """From stored settings (queue file, image, profile): known keys only, not yet validated."""
        known = {"model_type", "loras", *_params.by_name()}
        return cls(**{k: v for k, v in data.items() if k in known})

    def pipeline_values(self, architecture: str | None) -> dict[str, Any]:
        """The declared values the family's pipeline takes, by name."""
        return {p.name: getattr(self, p.name) for p in _params.params_of(architecture) if p.pipeline}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"JobSpec({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


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


def is_blank(text: str) -> bool:
    """Whether text holds nothing to read: only spaces and control or format characters ("\\x00", U+200B)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


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
                            f"{MAX_PROMPT_CHARS:,} (far more than the text encoder reads)")
    return warnings


def validate(spec: JobSpec, names: dict[str, str] | None = None) -> list[str]:
    """Check spec and normalize its values in place (30.0 -> 30, "7" -> 7); UserError naming the first
    bad one, the same message whichever edge the value came through. names: unused, kept for callers."""
    check_text(spec.model_type, "model type")
    declared = _params.by_name()
    for name, p in declared.items():
        setattr(spec, name, p.parse(getattr(spec, name)))
    values = {name: getattr(spec, name) for name in declared}
    check_declared_values(values)
    check_job(spec.model_type, values)  # the family's rules for this model type (TwinFlow takes no input image)
    if is_blank(spec.prompt):
        raise UserError("the prompt is empty" + (" (only control characters)" if spec.prompt.strip() else ""))
    if not isinstance(spec.loras, list):
        raise UserError(f"loras must be a list (got {type(spec.loras).__name__})")
    for item in spec.loras:
        if not isinstance(item, dict):
            raise UserError(f"bad LoRA entry {item!r}: expected {{'name': ..., 'strength': ...}}")
        for value in item.values():
            if isinstance(value, str):
                check_text(value, "a LoRA name or strength")
    return []


def input_render_size(image: Any, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The render size of a job with an input image and the sides given (None: not given). Neither: the image's
    own size (models.image_inputs.native_size); one: the other from the image's aspect ratio, rounded down to a
    multiple of 16 (16 to 4096), so the picture is not stretched to the model's default for the missing side."""
    from models.image_inputs import MAX_SIDE, MULTIPLE, as_image, native_size

    if width is not None and height is not None:
        return width, height
    if width is None and height is None:
        return native_size(image)
    w, h = as_image(image).size
    other = (width * h / w) if height is None else (height * w / h)
    other = min(MAX_SIDE, max(MULTIPLE, int(other) // MULTIPLE * MULTIPLE))
    return (width, other) if height is None else (other, height)


def size_warnings(spec: JobSpec, min_recommended: int) -> list[str]:
    if min_recommended and min(spec.width, spec.height) < min_recommended:
        return [f"{spec.width}x{spec.height} is below {min_recommended} px: the model was not trained "
                "that small, expect poor images"]
    return []


def resolve_seed(seed: int) -> int:
    """-1 means a fresh random seed; leave room for seed + image index."""
    return random.randint(0, MAX_SEED - 16) if seed == -1 else seed
