"""Generation parameters: each one declared once, as a `Param`.

The app's common parameters are declared in app/params.py, a family's own ones by its handler
(`FamilyHandler.params`). Everything else derives from the declarations: the `generate` options
of the CLI, the controls of the page's form, the job spec and its validation, the image metadata
(with the A1111 `parameters` text), the generation profiles and the `/generate` API. So adding a
parameter to a family is its declaration plus the family's pipeline reading it.

This module knows nothing of argparse or Gradio; `Param.parse` is the one validation of a value,
whatever its source (a command-line string, a slider's float, JSON from a file or an image), and
its messages name the parameter the same way everywhere: "Steps (--steps) must be ...".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.errors import UserError
from models.parsing import ascii_float, ascii_int

KINDS = (int, float, str, bool)
GROUPS = ("main", "image", "control", "advanced")
# "image" / "mask" / "picture": a file (its path, kind str); the page shows an image editor (the input, whose
# strokes are a mask) / an upload for a mask / an upload for a picture (a control image)
WIDGETS = ("slider", "number", "text", "checkbox", "dropdown", "image", "mask", "picture")
FILE_WIDGETS = ("image", "mask", "picture")


def _number(x: float) -> str:
    """4294967295, not 4.29497e+09; 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _shown(value: int | float) -> str:
    """A value in a message: 4294967296, not 4.29497e+09 (an int beyond any float cut by _short)."""
    if isinstance(value, int):
        return _short(value)
    if abs(value) >= 1e15:
        return f"{value:g}"  # 1e+300, not 300 digits
    return str(int(value)) if value.is_integer() else repr(value)  # 123456.5, not 123456


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Param:
    """One generation parameter.

    name: the job spec's field and the key in image metadata, profiles and the API.
    kind: int, float, str or bool. default: the value when nothing says otherwise (a model
    definition's settings override it per model type when `model_tuned`).
    minimum / maximum / multiple_of / choices / max_length: what parse() accepts.
    label / help: what the page and `--help` show; cli: the option of `generate` (None: none).
    group: where the page puts it ("main", "image", "control" or "advanced"; a handler may move or hide it per
    model);
    widget: its kind of control; step: a slider's step; slider_maximum: a slider's end when
    narrower than what parse accepts.
    row: controls of one group with the same row name share a row on the page (consecutive ones).
    needs: another parameter's name: the page shows this one only while that one has a value (an input
    image's strength).
    check: a further check of a parsed, non-empty value (a file that must be an image, margins): it
    returns the value to keep or raises UserError, which parse() prefixes with the parameter's name.
    stored: kept in image metadata; in_profile: kept in generation profiles.
    a1111 / a1111_value: its name (and value formatter) in the A1111 `parameters` text.
    page: False keeps it off the page's form and the `/generate` API (the command line only, until the
    page has a control for it). pipeline: passed to the family's pipeline under `name`. legacy: older
    names read from old profile files. optional: None is a value (meaning "not set": the app's default).
    """

    name: str
    kind: type
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] = ()
    max_length: int | None = None
    cli: str | None = None
    metavar: str | None = None
    group: str = "main"
    widget: str = "slider"
    step: float | None = None
    slider_maximum: float | None = None
    row: str = ""
    needs: str = ""
    check: Callable[[Any], Any] | None = None
    stored: bool = True
    in_profile: bool = True
    a1111: str | None = None
    a1111_value: Callable[[Any], Any] | None = None
    pipeline: bool = True
    model_tuned: bool = False
    legacy: tuple[str, ...] = ()
    optional: bool = False
    page: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name}: kind must be one of int, float, str, bool")
        if self.group not in GROUPS or self.widget not in WIDGETS:
            raise ValueError(f"parameter {self.name}: unknown group {self.group!r} or widget {self.widget!r}")

    @property
    def display(self) -> str:
        """How messages name it: "Steps (--steps)"."""
        return f"{self.label} ({self.cli})" if self.cli else self.label

    @property
    def is_file(self) -> bool:
        """Whether its value is a file's path (an input image or mask)."""
        return self.widget in FILE_WIDGETS

    @property
    def api_name(self) -> str:
        """Its argument name in the `/generate` API: the CLI option's (--steps -> steps), else its name."""
        return self.cli.lstrip("-").replace("-", "_") if self.cli else self.name

    @property
    def elem_id(self) -> str:
        """Its control's element id on the page: the CLI option's (--flow-shift -> flow-shift)."""
        return self.cli.lstrip("-") if self.cli else self.name.replace("_", "-")

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"{_number(self.minimum)}-{_number(self.maximum)}"
        return ""

    def parse(self, value: Any, from_text: bool = True) -> Any:
        """value, typed and checked; UserError naming the parameter otherwise.

        from_text: numbers and booleans may come as text (a command line, a form field); False for JSON
        documents (image metadata, profiles), where "64" in place of 64 is a sign of a foreign file."""
        if not from_text and self.kind is not str and isinstance(value, str):
            raise UserError(f"{self.display} must be {'true or false' if self.kind is bool else 'a number'} "
                            f"(got {_short(value)})")
        if value is None or (isinstance(value, str) and not value.strip() and self.kind is not str):
            if self.optional:
                return None
            raise UserError(f"{self.display} is missing")
        if self.kind is str:
            out = self._parse_text(value)
        elif self.kind is bool:
            out = self._parse_bool(value)
        else:
            out = self._parse_number(value)
        if self.choices and out not in self.choices:
            raise UserError(f"{self.display} must be {self.describe_range()} (got {_short(value)})")
        if self.check is not None and out != "":
            try:
                out = self.check(out)
            except UserError as e:
                raise UserError(f"{self.display}: {e}") from None
        return out

    def _parse_text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise UserError(f"{self.display} must be text (got {_short(value)})")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # it would break every JSON reply and file holding it
            raise UserError(f"{self.display} holds a character that is not valid Unicode text at position "
                            f"{e.start} (a lone surrogate)") from None
        if self.max_length is not None and len(value) > self.max_length:
            raise UserError(f"{self.display} is {len(value)} characters long; the limit is {self.max_length}")
        return value

    def _parse_bool(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise UserError(f"{self.display} must be true or false (got {_short(value)})")

    def _parse_number(self, value: Any) -> int | float:
        whole = "a whole number" if self.kind is int else "a number"
        if isinstance(value, bool):
            raise UserError(f"{self.display} must be {whole} (got {_short(value)})")
        if isinstance(value, str):  # ASCII digits only: int("٣") would be 3
            try:
                value = ascii_int(value)
            except ValueError:
                try:
                    value = ascii_float(value)
                except ValueError:
                    raise UserError(f"{self.display} must be {whole} (got {_short(value)})") from None
        if not isinstance(value, (int, float)):
            raise UserError(f"{self.display} must be {whole} (got {_short(value)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{self.display} must be a finite number (got {value})")
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise UserError(f"{self.display} must be a whole number (got {value:g})")
                value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an int beyond any float
                raise UserError(f"{self.display} must be a finite number (got {_short(value)})") from None
        lo, hi = self.minimum, self.maximum
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise UserError(f"{self.display} must be between {_number(lo)} and {_number(hi)} (got {_shown(value)})")
        if self.multiple_of and value % self.multiple_of:
            raise UserError(f"{self.display} must be a multiple of {self.multiple_of} (got {_shown(value)})")
        return value
