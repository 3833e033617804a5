"""Strict number parsing and LoRA strengths, shared by the app and the models (no torch here).

Python's int() and float() read any Unicode digit ("٣" is 3, "۱.۵" is 1.5) and float() also takes
"inf", "nan" and "1_000". Values that come from outside (the API, image metadata, profile files, the
command line) are numbers only when written with ASCII digits, so nothing looks like a number to us
that does not look like one to the user.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from models.errors import UserError

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# |strength| above this is no style any more, only overflow (1e308 passed every check and gave NaN images)
MAX_LORA_STRENGTH = 10.0

Strength = float | int | str | Sequence[float]


def ascii_int(text: str) -> int:
    """A whole number written in ASCII digits ("-12", " 7 "); ValueError for anything else."""
    if not isinstance(text, str) or not _INT.fullmatch(text.strip(" \t")):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text.strip(" \t"))


def ascii_float(text: str) -> float:
    """A finite number written in ASCII ("1.5", "-2e-3"); ValueError for anything else (inf, nan, "٣")."""
    if not isinstance(text, str) or not _FLOAT.fullmatch(text.strip(" \t")):
        raise ValueError(f"not a number: {text!r}")
    value = float(text.strip(" \t"))
    if not math.isfinite(value):  # "1e999"
        raise ValueError(f"not a finite number: {text!r}")
    return value


def cli_int(text: str) -> int:
    """argparse type: ascii_int, reported by argparse as "invalid int value: '٣'"."""
    return ascii_int(text)


def cli_float(text: str) -> float:
    """argparse type: ascii_float, reported by argparse as "invalid float value: 'nan'"."""
    return ascii_float(text)


cli_int.__name__, cli_float.__name__ = "int", "float"  # argparse names the type by __name__ in its message


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("a bool is not a strength")
    return ascii_float(value) if isinstance(value, str) else float(value)  # type: ignore[arg-type]


def parse_schedule(spec: Strength) -> tuple[float, ...]:
    """A LoRA strength: a number, or a schedule spread over the steps ("1.0,0.8,0.4" or a list).

    Every value must be finite and within +-MAX_LORA_STRENGTH; UserError otherwise.
    """
    if isinstance(spec, bool):
        raise UserError(f"LoRA strength must be a number or a comma list (got {spec!r})")
    if isinstance(spec, (int, float)):
        try:
            values = [float(spec)]
        except OverflowError:  # an int beyond any float
            raise UserError(f"LoRA strength {spec!r} must be between {-MAX_LORA_STRENGTH:g} and "
                            f"{MAX_LORA_STRENGTH:g}") from None
    elif isinstance(spec, str):
        if ";" in spec:
            raise UserError(f"LoRA strength {spec!r}: ';' (per-phase strengths) is not used by this model")
        try:
            values = [ascii_float(p) for p in spec.split(",")]
        except ValueError:
            raise UserError(f"LoRA strength {spec!r} must be a number or numbers separated by commas") from None
    else:
        try:
            values = [_number(v) for v in spec]
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"LoRA strength must be a number or a comma list (got {spec!r})") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"LoRA strength {spec!r} must be finite numbers")
    if any(abs(v) > MAX_LORA_STRENGTH for v in values):
        raise UserError(f"LoRA strength {spec!r} must be between {-MAX_LORA_STRENGTH:g} and {MAX_LORA_STRENGTH:g}")
    return tuple(values)


__all__ = ["MAX_LORA_STRENGTH", "Strength", "ascii_float", "ascii_int", "cli_float", "cli_int", "parse_schedule"]
