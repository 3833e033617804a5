"""Settings restored into the page from a dropped file: an image made by this app (PNG, JPEG, WebP) or a
settings JSON file (the `wgp_zimage` JSON our images carry, app/metadata.py, or a saved generation
profile, app/settings.py).

Whatever the file, the result is checked generation-profile settings plus warnings for the page: a model
type that is not installed maps to an installed equivalent (Base <-> Turbo, the handlers' equivalence
map) or, lacking one, leaves the current model selected; LoRAs the folder no longer has are dropped and
named. A file that cannot be used raises UserError with one line saying why. No torch, no Gradio here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.metadata import SCHEMA, read_settings
from app.settings import (
    MAX_FILE_BYTES,
    apply_to_model,
    default_settings,
    model_tuned,
    normalize_settings,
    parse_settings,
    profile_params,
)
from app.untrusted import UntrustedError, load_json, open_regular, read_text
from models.errors import UserError
from models.registry import aliases, discover_handlers, resolve_model_type


def image_keys() -> tuple[str, ...]:
    """Keys of an image's settings that go back into the controls (the rest says how it was made): the
    declared parameters that profiles keep, the seed and the LoRAs."""
    return (*(p.name for p in profile_params() if p.name != "num_images"), "seed", "loras")

APP_NAME = "wgp-zimage"


@dataclass
class Restored:
    settings: dict[str, Any]  # generation-profile settings; model_type None: keep the page's current model
    warnings: list[str]
    source: str  # what the file was, for the page's message


def installed_type(model_type: Any, definitions: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The installed model type that settings saved for model_type go to, and a warning when it is not that one.

    Itself (or what its alias names) when installed; else an installed type of the same architecture or of
    one the family declares equivalent (types are named after their architecture); else None.
    """
    defs = dict(definitions)
    if not isinstance(model_type, str) or not model_type.strip():
        raise UserError(f"the settings name no model type (got {model_type!r})")
    try:
        return resolve_model_type(model_type, defs), []
    except UserError:
        model_type = aliases().get(model_type, model_type)  # an alias ("base") names an architecture
    for handler in discover_handlers().values():
        if model_type not in handler.architectures:
            continue
        for arch in (model_type, *handler.equivalences.get(model_type, ())):
            # the type named after the architecture first, then its finetunes
            candidates = sorted((t for t, d in defs.items() if d.architecture == arch), key=lambda t: (t != arch, t))
            if candidates:
                target = candidates[0]
                return target, [f"model type {model_type!r} is not installed; its settings go to the equivalent "
                                f"{defs[target].name} ({target})"]
    return None, [f"model type {model_type!r} is not installed and has no installed equivalent; keeping the "
                  "current model"]


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:  # a regular file only (a FIFO would block), small, UTF-8, JSON of sane depth without lone surrogates
        text = read_text(path, MAX_FILE_BYTES)
        data = load_json(text)
    except UntrustedError as e:
        raise UserError(f"{label} {e}: not a settings file") from None
    except OSError as e:
        raise UserError(f"cannot read {label}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} holds a JSON {type(data).__name__}, not a settings object")
    return data


def _looks_like_json(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with open_regular(path) as f:  # never blocks on a FIFO; the reader then says what the file is
            return f.read(64).lstrip()[:1] in (b"{", b"[")
    except (OSError, UntrustedError):
        return False


def _image_document(data: Mapping[str, Any], model_type: str | None,
                    definitions: Mapping[str, Any]) -> dict[str, Any]:
    """An image's settings as profile settings: its own seed, one image; keys it lacks take the model's defaults."""
    base = default_settings()
    if model_type is not None:
        d = definitions[model_type].defaults()
        base.update({k: d[k] for k in model_tuned() if k in d})
    doc = {**base, **{k: data[k] for k in image_keys() if k in data}, "model_type": data["model_type"], "num_images": 1}
    seed = doc.get("seed")
    doc["seed_policy"] = "fixed" if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else "random"
    if doc["seed_policy"] == "random":
        doc["seed"] = -1
    return doc


def restore_settings(path: str | Path, definitions: Mapping[str, Any],
                     lora_names: Callable[[str | None], Iterable[str]]) -> Restored:
    """The settings a dropped file holds, checked, with warnings; UserError when the file cannot be used.

    lora_names(model_type): the LoRAs the folder has for that model type (None: the page's default one).
    """
    path = Path(path)
    is_json = _looks_like_json(path)
    label = f"{'settings file' if is_json else 'image'} {path.name!r}"
    if is_json:
        data = _read_json(path, label)
        if "app" in data:  # the JSON an image carries (its `wgp_zimage` chunk saved to a file)
            if data["app"] != APP_NAME:
                raise UserError(f"{label} was written by {data['app']!r}, not by {APP_NAME}")
            schema = data.get("schema", SCHEMA)
            if isinstance(schema, bool) or not isinstance(schema, int) or schema > SCHEMA:
                raise UserError(f"{label}: image settings schema {schema!r} is newer than this version reads "
                                f"({SCHEMA})")
            kind = "image settings"
        elif "schema_version" in data or isinstance(data.get("model"), str):  # a generation profile (2, or 1)
            kind = "generation profile"
        else:
            raise UserError(f"{label} is not a wgp-zimage settings file: expected the settings JSON of an image "
                            f"made by this app (\"app\": \"{APP_NAME}\") or a generation profile "
                            "(\"schema_version\")")
    else:
        try:
            data = read_settings(path)
        except Exception as e:  # PIL raises many kinds for a broken file; the page gets one line
            raise UserError(f"cannot read {label}: {e}") from None
        if not data:
            raise UserError(f"{label} holds no wgp-zimage settings")
        kind = "image"

    warnings: list[str] = []
    if kind == "generation profile":
        doc, warnings = parse_settings(data, label=label)
    else:
        if "model_type" not in data:
            raise UserError(f"{label} names no model type: not settings made by this app")
        doc = None
    target, more = installed_type(data.get("model_type") if doc is None else doc["model_type"], definitions)
    warnings += more
    if doc is None:
        doc = _image_document(data, target, definitions)
    # LoRAs are checked against the folder of the model the settings go to
    settings, more = normalize_settings(doc, lora_names(target), label)
    warnings += more
    if kind == "image":
        warnings += _image_inputs(data, settings, label)
    if target is not None and target != settings["model_type"]:
        settings, more = apply_to_model(settings, target, definitions)
        warnings += more
    elif target is None:
        settings["model_type"] = None
    return Restored(settings, warnings, kind)


def _image_inputs(data: Mapping[str, Any], settings: dict[str, Any], label: str) -> list[str]:
    """The image's inputs (its input image and mask: copies beside it, app.metadata resolved them; outpaint
    margins) into settings, "" where it had none, so a restored text-to-image job clears the page's input.
    An input file that is gone is left out, and said."""
    from app.params import all_params

    warnings = []
    for p in all_params():
        if p.in_profile or not p.stored or p.name in ("memory_profile", "num_images"):
            continue
        value = data.get(p.name) or ""
        try:
            settings[p.name] = p.parse(value, from_text=False) if value else ""
        except UserError as e:
            settings[p.name] = ""
            warnings.append(f"{label}: its {p.label.lower()} cannot be used ({e}); restored without it")
    for p in all_params():  # a mask without its image means nothing: it goes too
        if p.needs and p.name in settings and not p.in_profile and not settings.get(p.needs):
            settings[p.name] = ""
    return warnings


__all__ = ["Restored", "installed_type", "restore_settings"]
