"""The page's form kept in the browser: what the user typed survives a reload, generated or not.

Every change of a setting control copies the form into the browser's localStorage (a gr.BrowserState,
written by a JavaScript-only event: no round trip per keystroke). When a page opens, that saved form
wins over the server's last used settings (app/settings.py), which only change on Generate. The
settings column stays hidden (class FORM_PENDING, see app/ui.py's CSS) until the page-load handler
has filled it, so the page never shows the first model's defaults before the user's own settings.
No torch here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from app.params import CUSTOM_CONTROLS, all_params
from models.params import Param

FORM_VERSION = 1
STORAGE_KEY = "wgp-zimage-form"
FORM_PENDING = "wgp-form-pending"  # CSS class of the settings column until the page-load handler ran
# the form's own fields around the declared parameters' (app/params.py)
_BEFORE = ("model_type", "prompt", "one_per_line")
_AFTER = ("loras", "memory_profile")
_MAX_TEXT = 100_000  # a form field longer than this is not something the page wrote


def form_params() -> list[Param]:
    """The declared parameters the form has a control for, in the form's order (the prompt and memory profile
    have controls of their own; command-line-only ones are left out)."""
    return [p for p in all_params() if p.name not in CUSTOM_CONTROLS and p.page]


def form_keys() -> tuple[str, ...]:
    """The saved form's keys, in the order of the controls handed to save_form_js. Input images stay out:
    an upload lives on the server for a while only, and a picture has no place in localStorage."""
    return (*_BEFORE, *(p.name for p in form_params() if not p.is_file), *_AFTER)


def save_form_js(keys: Iterable[str]) -> str:
    """The JavaScript of the event that saves the form: its inputs are the controls in keys' order, then the
    saved form itself, which it returns unchanged while the page-load handler has not filled the form yet
    (a control's first change must not overwrite the saved form with the defaults)."""
    names = json.dumps(list(keys))
    return (f"(...v) => {{ const saved = v.pop(); if (document.querySelector('.{FORM_PENDING}')) return saved; "
            f"const keys = {names}; const form = {{version: {FORM_VERSION}}}; "
            "keys.forEach((k, i) => { form[k] = v[i]; }); return form; }")


def clean_form(data: Any, model_types: Iterable[str]) -> dict[str, Any] | None:
    """The saved form with every field of the wrong type left out; None when it is unusable (none saved,
    another version, a model type that is no longer installed). The values themselves are the user's, out
    of range or not: Generate checks them and says what is wrong, as it would have before the reload."""
    if not isinstance(data, dict) or data.get("version") != FORM_VERSION:
        return None
    if data.get("model_type") not in set(model_types):
        return None
    params = [p for p in form_params() if not p.is_file]
    kinds = {"prompt": str, "loras": str, "memory_profile": str, "one_per_line": bool,
             **{p.name: p.kind for p in params}}
    out: dict[str, Any] = {"model_type": data["model_type"]}
    for key, kind in kinds.items():
        v = data.get(key)
        if kind is str:
            if isinstance(v, str) and len(v) <= _MAX_TEXT:
                out[key] = v
        elif kind is bool:
            if isinstance(v, bool):
                out[key] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = int(v) if isinstance(v, float) and v.is_integer() else v
    return out


__all__ = ["FORM_PENDING", "STORAGE_KEY", "clean_form", "form_keys", "form_params", "save_form_js"]
