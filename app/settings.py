"""Generation profiles (named JSON files of generation settings), per-model defaults and last-used settings.

"Generation profiles" are unrelated to MMGP memory profiles (1-5): they hold what to render, not how
to fit it in memory.

File layout (schema 2, the current one): a flat JSON object
    {"schema_version": 2, "model_type": str, "prompt": str | null, "negative_prompt": str | null,
     <every declared generation parameter kept in profiles (app/params.py, the families' params.py)
      under its name, e.g. "width": 1024, "num_inference_steps": 30>,
     "seed_policy": "fixed" | "random" | "increment", "seed": 42, "loras": [{"name": "x", "strength": 0.8}],
     "output_format": "png" | "jpeg" | "webp", "output_quality": 95}
A null prompt / negative prompt means "not part of this profile": applying it keeps the current text.

Schema 1 (older files; `schema_version` 1 or absent) used flat short keys: "model", "resolution":
"1024x1024", "steps", "images", "format", "quality", a declared parameter's legacy name (Param.legacy),
"seed" (-1 = random), "loras": ["name" | "name:strength", ...].

Folder layout: <folder>/<name>.json for profiles; <folder>/.state/defaults/<model_type>.json for the
per-model defaults and <folder>/.state/last_used.json (hidden, so they never show up as profiles).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.app_config import DEFAULT_OUTPUT_QUALITY, OUTPUT_QUALITY_RANGE
from app.params import DEFAULT_MODEL_TYPE, MAX_SEED, all_params, by_name
from app.untrusted import UntrustedError, load_json, read_text
from models.errors import UserError
from models.files import atomic_path
from models.parsing import ascii_float, parse_schedule

try:  # a cross-process lock where the OS offers one; threads are covered by _folder_lock anyway
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 2
SEED_POLICIES = ("fixed", "random", "increment")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
QUALITY_RANGE = OUTPUT_QUALITY_RANGE
MAX_FILE_BYTES = 1 << 20  # a profile is a few hundred bytes; refuse to parse something huge
NAME_MAX = 100
# letters, digits, space and a few safe marks; no separators, no leading dot or space
_NAME_RE = re.compile(r"^[^\W][\w .,()+&'-]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}

# the generation parameters a profile keeps come from their declarations (app/params.py and the families'),
# read at each use so a family registered later counts too; a null prompt / negative prompt means "not part
# of this profile", the seed goes with its policy
def profile_params() -> tuple:
    return tuple(p for p in all_params() if p.in_profile)


def default_settings() -> dict[str, Any]:
    return {"model_type": DEFAULT_MODEL_TYPE, **{p.name: p.default for p in profile_params()},
            "prompt": None, "negative_prompt": None, "seed_policy": "random", "seed": -1, "loras": [],
            "output_format": "png", "output_quality": DEFAULT_OUTPUT_QUALITY}


def model_tuned() -> tuple[str, ...]:
    """Keys a model definition recommends; replaced when a profile moves to a non-equivalent model."""
    return tuple(p.name for p in profile_params() if p.model_tuned)


def _legacy() -> dict[str, str]:
    """Renames of schema 1 (flat short keys), from the declarations' legacy names."""
    return {old: p.name for p in profile_params() for old in p.legacy}


# ------------------------------------------------------------------ validation and migration

def check_name(name: str, what: str = "generation profile name") -> str:
    """A name that is one plain file name inside the folder (no traversal, no hidden or empty names)."""
    if not isinstance(name, str):
        raise UserError(f"{what} must be text")
    if name.lower().endswith(".json"):
        name = name[:-5]
    if not name or not name.strip():
        raise UserError(f"{what} is empty")
    if len(name) > NAME_MAX:
        raise UserError(f"{what} is longer than {NAME_MAX} characters")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise UserError(f"{what} {name!r} must not contain path separators or '..'")
    if name.startswith(".") or name != name.strip() or name.endswith("."):
        raise UserError(f"{what} {name!r} must not start with a dot or start/end with spaces or dots")
    if not _NAME_RE.match(name) or name.lower() in _WINDOWS_RESERVED:
        raise UserError(f"{what} {name!r}: use letters, digits, spaces and - _ . , ( ) + & '")
    return name


def _migrate_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    renames = {"model": "model_type", "steps": "num_inference_steps", **_legacy(),
               "format": "output_format", "quality": "output_quality"}
    out = {renames.get(k, k): v for k, v in data.items() if k not in ("resolution", "schema_version")}
    if "resolution" in data:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(data["resolution"]))
        if not m:
            raise UserError(f"resolution must look like 1024x1024 (got {data['resolution']!r})")
        out["width"], out["height"] = int(m[1]), int(m[2])
    seed = data.get("seed", -1)
    out["seed_policy"] = "random" if seed == -1 else "fixed"
    loras = []
    for item in data.get("loras") or []:
        if isinstance(item, str):  # "name" or "name:strength"
            name, _, strength = item.rpartition(":") if ":" in item else (item, "", "1")
            try:
                loras.append({"name": name, "strength": ascii_float(strength)})
            except ValueError:
                raise UserError(f"loras: bad strength in {item!r}") from None
        else:
            loras.append(item)
    out["loras"] = loras
    if out.get("output_format") == "jpg":
        out["output_format"] = "jpeg"
    return out


MIGRATIONS = {1: _migrate_1_to_2}  # version -> function producing version + 1


def migrate(data: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Bring a profile document to the current schema; returns (document, version it was in)."""
    version = data.get("schema_version", 1)  # schema 1 files may not name their version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"schema_version must be a whole number >= 1 (got {version!r})")
    if version > SCHEMA_VERSION:
        raise UserError(f"written by a newer wgp-zimage (schema {version}); this version reads up to {SCHEMA_VERSION}")
    out, v = dict(data), version
    while v < SCHEMA_VERSION:
        out = MIGRATIONS[v](out)
        v += 1
    out["schema_version"] = SCHEMA_VERSION
    return out, version


def normalize_settings(
    data: Mapping[str, Any], available_loras: Iterable[str] | None = None, label: str = "settings",
) -> tuple[dict[str, Any], list[str]]:
    """Complete, checked current-schema settings from data; raises UserError naming the bad field.

    Unknown keys are ignored (with a notice), missing keys take default_settings(), LoRAs missing from
    available_loras (when given) are dropped with a warning.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"{label}: expected a JSON object, got {type(data).__name__}")
    warnings: list[str] = []
    defaults = default_settings()
    unknown = sorted(str(k) for k in data if k not in defaults and k != "schema_version")
    if unknown:
        warnings.append(f"{label}: ignored unknown keys: {', '.join(unknown)}")
    s = {**defaults, **{k: v for k, v in data.items() if k in defaults}}

    def bad(message: str) -> UserError:
        return UserError(f"{label}: {message}")

    if not isinstance(s["model_type"], str) or not s["model_type"].strip():
        raise bad(f"model_type must be a model type name (got {s['model_type']!r})")
    for key in ("prompt", "negative_prompt"):
        if s[key] is not None and not isinstance(s[key], str):
            raise bad(f"{key} must be text or null (got {type(s[key]).__name__})")
    if s["prompt"] is not None and not s["prompt"].strip():
        s["prompt"] = None  # an empty prompt is "no prompt saved"
    for p in profile_params():  # each value checked by its declaration (null texts are "not saved")
        if p.kind is str and s[p.name] is None:
            continue
        try:
            s[p.name] = p.parse(s[p.name], from_text=False)
        except UserError as e:
            raise bad(f"{p.name}: {e}") from None
    try:
        s["seed"] = by_name()["seed"].parse(s["seed"], from_text=False)
    except UserError as e:
        raise bad(f"seed: {e}") from None
    if s["seed_policy"] not in SEED_POLICIES:
        raise bad(f"seed_policy must be one of {', '.join(SEED_POLICIES)} (got {s['seed_policy']!r})")
    if s["seed_policy"] != "random" and s["seed"] < 0:
        raise bad(f"seed must be 0..{MAX_SEED} with seed_policy {s['seed_policy']} (got {s['seed']})")
    fmt = s["output_format"].lower() if isinstance(s["output_format"], str) else s["output_format"]
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in OUTPUT_FORMATS:
        raise bad(f"output_format must be one of {', '.join(OUTPUT_FORMATS)} (got {s['output_format']!r})")
    s["output_format"] = fmt
    q, (lo, hi) = s["output_quality"], QUALITY_RANGE
    if isinstance(q, bool) or not isinstance(q, int) or not lo <= q <= hi:
        raise bad(f"output_quality must be a whole number between {lo} and {hi} (got {q!r})")
    s["loras"] = _check_loras(s["loras"], available_loras, label, warnings)
    return s, warnings


def _check_loras(loras: Any, available: Iterable[str] | None, label: str, warnings: list[str]) -> list[dict]:
    if not isinstance(loras, list):
        raise UserError(f"{label}: loras must be a list of {{\"name\", \"strength\"}} objects")
    known = None if available is None else set(available)
    out = []
    for i, item in enumerate(loras):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise UserError(f"{label}: loras[{i}] needs a \"name\" (got {item!r})")
        strength = item.get("strength", 1.0)
        # the run's own check (ASCII numbers, |s| <= 10): a saved profile never fails when it runs
        if isinstance(strength, bool) or not isinstance(strength, (str, int, float)):
            raise UserError(f"{label}: loras[{i}] strength must be a number (got {strength!r})")
        try:
            values = parse_schedule(strength)
        except UserError as e:
            raise UserError(f"{label}: loras[{i}]: {e}") from None
        if not isinstance(strength, str):
            strength = values[0]
        if known is not None and item["name"] not in known:
            warnings.append(f"{label}: LoRA {item['name']!r} is no longer available; dropped")
            continue
        out.append({"name": item["name"], "strength": strength})
    return out


def parse_document(text: str, available_loras: Iterable[str] | None = None,
                   label: str = "settings") -> tuple[dict[str, Any], list[str]]:
    """JSON text of any known schema -> (current settings, warnings)."""
    try:  # nesting that would exhaust the stack, lone surrogates, NaN: refused with the reason
        data = load_json(text)
    except UntrustedError as e:
        raise UserError(f"{label} {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a JSON object, got {type(data).__name__}")
    return parse_settings(data, available_loras, label)


def parse_settings(data: Mapping[str, Any], available_loras: Iterable[str] | None = None,
                   label: str = "settings") -> tuple[dict[str, Any], list[str]]:
    """A parsed profile document of any known schema -> (current settings, warnings)."""
    try:
        doc, version = migrate(data)
    except UserError as e:
        raise UserError(f"{label}: {e}") from None
    settings, warnings = normalize_settings(doc, available_loras, label)
    if version < SCHEMA_VERSION:
        warnings.insert(0, f"{label}: migrated from schema {version} to {SCHEMA_VERSION} (saved as "
                           f"{SCHEMA_VERSION} next time)")
    return settings, warnings


def _read(path: Path, label: str) -> str:
    """A profile file's text: a regular file (a FIFO would block the reader, and /profile_list with it),
    at most MAX_FILE_BYTES, UTF-8. Messages name the label only: the path may be the server's."""
    try:
        return read_text(path, MAX_FILE_BYTES)
    except UntrustedError as e:
        raise UserError(f"{label} {e}") from None
    except OSError as e:
        raise UserError(f"{label}: cannot read the file: {e.strerror or e}") from None


def write_atomic(path: Path, settings: Mapping[str, Any]) -> None:
    """Temp file beside path, flushed, then renamed: a crash leaves the old file or the new one, never half."""
    text = json.dumps({"schema_version": SCHEMA_VERSION, **settings}, indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------ the store

@dataclass
class ProfileEntry:
    name: str
    path: Path
    broken: bool = False
    error: str = ""
    settings: dict[str, Any] | None = None


_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


class TargetExists(UserError):
    """A profile or file of that name is there and replacing it was not asked for. The message says what is
    there; each caller adds how its users ask for the replacement (the CLI's --overwrite, the page's checkbox)."""

    def __init__(self, subject: str, broken: str | None = None) -> None:
        self.subject, self.broken = subject, broken  # broken: why the one there cannot be read
        super().__init__(f"{subject} exists but is broken ({broken})" if broken else f"{subject} already exists")


class ProfileStore:
    """Generation profiles in one folder, plus per-model defaults and the last-used settings."""

    def __init__(self, folder: str | Path, state_dir: str | Path | None = None):
        self.folder = Path(folder)
        self.state_dir = Path(state_dir) if state_dir is not None else self.folder / ".state"

    # -- paths and locking

    def path(self, name: str) -> Path:
        path = self.folder / f"{check_name(name)}.json"
        # belt and braces: whatever the name checks miss, the file must sit directly in the folder
        if Path(os.path.abspath(path)).parent != Path(os.path.abspath(self.folder)):
            raise UserError(f"generation profile name {name!r} leaves the profiles folder")
        return path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time per folder: threads via an in-process lock, processes via flock."""
        key = str(self.folder.resolve())
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(key, threading.RLock())
        with lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                yield
                return
            with open(self.folder / ".lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    # -- profiles

    def list(self) -> list[ProfileEntry]:
        """Every *.json profile, broken ones included (never raises for a bad file)."""
        if not self.folder.is_dir():
            return []
        entries = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stem.lower()):
            if path.name.startswith("."):
                continue
            try:
                check_name(path.stem)
                settings, _ = parse_document(_read(path, path.stem), label=f"profile {path.stem!r}")
                entries.append(ProfileEntry(path.stem, path, settings=settings))
            except UserError as e:
                entries.append(ProfileEntry(path.stem, path, broken=True, error=str(e)))
        return entries

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str, available_loras: Iterable[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        path = self.path(name)
        label = f"generation profile {check_name(name)!r}"
        if not path.is_file():
            raise UserError(f"{label} not found in the generation profiles folder")
        return parse_document(_read(path, label), available_loras, label)

    def _check_target(self, name: str, path: Path, overwrite: bool, overwrite_broken: bool) -> None:
        if not path.exists():
            return
        try:
            parse_document(_read(path, name), label=name)
        except UserError as e:
            if not overwrite_broken:
                raise TargetExists(f"generation profile {name!r}", broken=str(e)) from None
            return
        if not overwrite:
            raise TargetExists(f"generation profile {name!r}")

    def save(self, name: str, settings: Mapping[str, Any], overwrite: bool = False,
             overwrite_broken: bool = False) -> list[str]:
        """Validate and write a profile atomically; returns warnings (ignored keys...)."""
        name = check_name(name)
        clean, warnings = normalize_settings(settings, label=f"generation profile {name!r}")
        path = self.path(name)
        with self._locked():
            self._check_target(name, path, overwrite, overwrite_broken)
            self._write(path, clean)
        return warnings

    def _write(self, path: Path, settings: Mapping[str, Any]) -> None:
        try:
            write_atomic(path, settings)
        except OSError as e:
            raise UserError(f"cannot save {path.name}: {e.strerror or e}") from None

    def rename(self, old: str, new: str, overwrite: bool = False, overwrite_broken: bool = False) -> None:
        src, dst = self.path(old), self.path(new)
        with self._locked():
            if not src.is_file():
                raise UserError(f"generation profile {check_name(old)!r} not found in the generation profiles folder")
            if src != dst:
                self._check_target(check_name(new), dst, overwrite, overwrite_broken)
            try:
                os.replace(src, dst)
            except OSError as e:
                raise UserError(f"cannot rename {src.name} to {dst.name}: {e.strerror or e}") from None

    def delete(self, name: str) -> None:
        path = self.path(name)
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                raise UserError(f"generation profile {check_name(name)!r} not found in the generation profiles "
                                "folder") from None
            except OSError as e:
                raise UserError(f"cannot delete {path.name}: {e.strerror or e}") from None

    def export_to(self, name: str, path: str | Path, overwrite: bool = False) -> Path:
        """Write a profile (in the current schema) to any file, e.g. to share it."""
        settings, _ = self.load(name)
        path = Path(path)
        if path.exists() and not overwrite:
            raise TargetExists(str(path))
        self._write(path, settings)
        return path

    def import_from(self, path: str | Path, name: str | None = None, overwrite: bool = False,
                    overwrite_broken: bool = False,
                    available_loras: Iterable[str] | None = None) -> tuple[str, list[str]]:
        """Read a profile file of any known schema into the store (as `name`, default: its file stem)."""
        path = Path(path)
        name = check_name(name if name is not None else path.stem)
        label = f"file {path.name!r}"  # an upload's path is /tmp/gradio/<hash>/...: the name only
        settings, warnings = parse_document(_read(path, label), available_loras, label=label)
        return name, warnings + self.save(name, settings, overwrite=overwrite, overwrite_broken=overwrite_broken)

    # -- per-model defaults ("set as default for this model") and last used settings

    def _defaults_path(self, model_type: str) -> Path:
        return self.state_dir / "defaults" / f"{check_name(model_type, 'model type')}.json"

    def _read_state(self, path: Path, label: str,
                    available_loras: Iterable[str] | None) -> tuple[dict[str, Any] | None, list[str]]:
        # a broken state file must never stop the app: report it and fall back to the defaults
        if not path.is_file():
            return None, []
        try:
            return parse_document(_read(path, label), available_loras, label)
        except UserError as e:
            return None, [f"{e}; ignored"]

    def get_model_defaults(self, model_type: str,
                           available_loras: Iterable[str] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
        return self._read_state(self._defaults_path(model_type), f"defaults of {model_type}", available_loras)

    def set_model_defaults(self, model_type: str, settings: Mapping[str, Any]) -> list[str]:
        path = self._defaults_path(model_type)
        clean, warnings = normalize_settings({**settings, "model_type": model_type}, label=f"defaults of {model_type}")
        with self._locked():
            self._write(path, clean)
        return warnings

    def clear_model_defaults(self, model_type: str) -> bool:
        path = self._defaults_path(model_type)
        with self._locked():
            existed = path.is_file()
            path.unlink(missing_ok=True)
        return existed

    def save_last_used(self, settings: Mapping[str, Any]) -> list[str]:
        """Remember the settings of the job just run; never raises (it runs after every generation)."""
        try:
            clean, warnings = normalize_settings(settings, label="last used settings")
            with self._locked():
                self._write(self.state_dir / "last_used.json", clean)
            return warnings
        except (UserError, OSError) as e:
            return [f"could not remember the last used settings: {e}"]

    def load_last_used(self, available_loras: Iterable[str] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
        return self._read_state(self.state_dir / "last_used.json", "last used settings", available_loras)


# ------------------------------------------------------------------ models

def model_settings(model_type: str, definitions: Mapping[str, Any],
                   store: ProfileStore | None = None) -> tuple[dict[str, Any], list[str]]:
    """Full settings for model_type: the definition's defaults, then the user's per-model defaults."""
    from models.registry import resolve_model_type

    model_type = resolve_model_type(model_type, dict(definitions))
    d = definitions[model_type].defaults()
    base = {**default_settings(), **{k: d[k] for k in model_tuned() if k in d}, "model_type": model_type}
    settings, warnings = normalize_settings(base, label=f"defaults of {model_type}")
    if store is not None:
        user, more = store.get_model_defaults(model_type)
        warnings += more
        if user is not None:
            settings = {**user, "model_type": model_type}
    return settings, warnings


def startup_settings(store: ProfileStore, definitions: Mapping[str, Any], default_model: str = DEFAULT_MODEL_TYPE,
                     available_loras: Iterable[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """What the UI shows at start: the last used settings, else the default model's defaults."""
    last, warnings = store.load_last_used(available_loras)
    if last is not None and last["model_type"] in definitions:
        return last, warnings
    if last is not None:
        warnings.append(f"last used model type {last['model_type']!r} is not installed; using {default_model}")
    settings, more = model_settings(default_model, definitions, store)
    return settings, warnings + more


def apply_to_model(settings: Mapping[str, Any], model_type: str,
                   definitions: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Settings saved for one model type, used with model_type.

    Equivalent types (Base <-> Turbo) keep the user's values, with a warning where they stray from
    the target's recommendations; other types take the target's recommended values for model_tuned().
    """
    from models.registry import equivalent_types, resolve_model_type

    defs = dict(definitions)
    target = resolve_model_type(model_type, defs)
    out, source = {**settings, "model_type": target}, settings.get("model_type")
    try:
        source = resolve_model_type(str(source), defs)
    except UserError:
        pass  # a model type no longer installed: judged by its name below
    if source == target:
        return out, []
    rec, name = defs[target].defaults(), defs[target].name
    # a type no longer installed still carries over when it is named after an equivalent architecture
    source_arch = defs[source].architecture if source in defs else source
    if source_arch not in equivalent_types(target, defs):
        for key in model_tuned():
            if key in rec and key in out and (key != "negative_prompt" or out[key] is not None):
                out[key] = rec[key]
        labels = ", ".join(p.label.lower() for p in profile_params() if p.model_tuned)
        return out, [f"settings of {source!r} do not carry over to {name}: its recommended {labels} were used"]
    # the user's values stay; the family says where they stray from the target's recommendations
    from models.registry import handler_for

    return out, handler_for(defs[target].architecture).carry_over_warnings(out, rec, name)


def job_seed(settings: Mapping[str, Any], job_index: int) -> int:
    """The seed of the job_index-th job (0 first) under the profile's seed policy (-1 = random).

    "increment" steps by num_images because image i of a job already uses seed + i: no seed repeats.
    """
    policy = settings.get("seed_policy", "random")
    if policy == "random":
        return -1
    seed = int(settings["seed"])
    if policy == "increment":
        seed += job_index * int(settings.get("num_images", 1))
    return seed % (MAX_SEED + 1)
