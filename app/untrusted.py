"""Reading what comes from outside the app: uploaded or dropped files, image metadata, API arguments.

Nothing here trusts its input. A file must be a regular file (a FIFO or a device would block the
reader forever) and small; JSON must parse without exhausting the interpreter's stack, nest at most
MAX_JSON_DEPTH levels and hold only text that can be written back (no lone surrogates, which
`"\\ud800"` escapes produce); numbers from the API are ASCII numbers of the expected kind. Every
failure is one ValueError / UserError line that names no server path. No torch, no Gradio here.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import IO, Any

from app.jobs import DEFAULT_MEMORY_PROFILE, MEMORY_PROFILES
from models.errors import UserError
from models.parsing import ascii_int

MAX_JSON_DEPTH = 32  # our settings nest 3 levels; JSON nested thousands deep overflows the stack


class UntrustedError(ValueError):
    """Input that cannot be used; the message is one line without any path."""


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """The file opened for reading, refused (UntrustedError) unless it is a regular file.

    Opened non-blocking, so a FIFO or a device is refused at once instead of blocking the open or the read.
    OSError (missing file, no permission) propagates.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a special file"
            raise UntrustedError(f"is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike[str], limit: int) -> bytes:
    """A regular file's bytes, refused when larger than limit (read up to limit + 1: the size may change)."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UntrustedError(f"is larger than {limit} bytes")
    return data


def read_text(path: str | os.PathLike[str], limit: int) -> str:
    """A small regular UTF-8 text file (a BOM is dropped); UntrustedError naming the first bad byte."""
    data = read_limited(path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UntrustedError(f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_structure(data: Any, max_depth: int = MAX_JSON_DEPTH, texts: bool = True) -> Any:
    """data itself, once every nested value is within max_depth levels and every text (keys too) is valid
    Unicode (texts=False: not checked, the caller sorts such values out itself); UntrustedError otherwise.
    Iterative: a deep value cannot exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise UntrustedError(f"is nested more than {max_depth} levels deep")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if isinstance(key, str) and texts:
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str) and texts:
            _check_text(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise UntrustedError(f"holds the non-finite number {value!r}")
    return data


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UntrustedError(f"holds invalid text (a lone surrogate U+{ord(text[e.start]):04X})") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def load_json(text: str | bytes) -> Any:
    """json.loads for untrusted text, checked by check_structure; UntrustedError with the reason otherwise.

    NaN / Infinity (which json accepts) are refused: they are not JSON and no setting takes them.
    """
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise UntrustedError(f"is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (bytes), NaN
        raise UntrustedError(f"is not valid JSON ({e})") from None
    return check_structure(data)


# ------------------------------------------------------------------ API arguments (strict, ASCII)

def _label(label: str) -> str:
    return label[:1].upper() + label[1:]


def parse_text(value: Any, label: str, optional: bool = False) -> str:
    """Text from the API (None is "" when optional); valid Unicode only."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{_label(label)} must be text (got {type(value).__name__})")
    try:
        _check_text(value)
    except UntrustedError as e:
        raise UserError(f"{_label(label)} {e}") from None
    return value


def parse_bool(value: Any, label: str) -> bool:
    """A checkbox from the API: true / false (None: false)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UserError(f"{_label(label)} must be true or false (got {value!r})")
    return value


def parse_memory_profile(value: Any, label: str = "memory profile") -> int | None:
    """A per-job memory profile: None for "default" / empty / None, else a whole number 1-5 in ASCII digits
    ("٣" and "²" are refused, not read as 3 and 2)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", DEFAULT_MEMORY_PROFILE)):
        return None
    number: int | None = None
    if isinstance(value, str):
        try:
            number = ascii_int(value)
        except ValueError:
            pass
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number not in MEMORY_PROFILES:
        raise UserError(f"{_label(label)} must be {DEFAULT_MEMORY_PROFILE!r} (the Config section's) or a whole "
                        f"number from {MEMORY_PROFILES[0]} to {MEMORY_PROFILES[-1]} (got {value!r})")
    return number


def generate_arguments(values: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """The /generate endpoint's raw values (Gradio's own preprocessing is off: it answered "abc" for a seed
    with a generic error) parsed into JobSpec keywords, plus "prompt" and "one_per_line".

    values: model_type, prompt, one_per_line, memory_profile ("default" or 1-5) and any declared parameter
    (app/params.py) by name; absent ones are left out (the model's defaults apply). Each value is read by
    its declaration, so a bad one gets the message the CLI gives for it. names: unused (messages name the
    parameters the same way everywhere).
    """
    from app.params import CUSTOM_CONTROLS, all_params

    out: dict[str, Any] = {
        "model_type": parse_text(values.get("model_type"), "Model").strip(),
        "prompt": parse_text(values.get("prompt"), "Prompt", optional=True),
        "one_per_line": parse_bool(values.get("one_per_line"), "One job per line"),
        "memory_profile": parse_memory_profile(values.get("memory_profile"), "Memory profile"),
    }
    for p in all_params():
        if p.name in CUSTOM_CONTROLS or p.name not in values:
            continue
        value = values[p.name]
        out[p.name] = parse_text(value, p.display, optional=True) if p.kind is str else p.parse(value)
    return out


__all__ = ["MAX_JSON_DEPTH", "UntrustedError", "check_structure", "load_json", "open_regular",
           "parse_bool", "parse_memory_profile", "parse_text", "read_limited",
           "read_text"]
