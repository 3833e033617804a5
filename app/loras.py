"""The LoRA folder: discovery, trigger words, strength lists, and safe name resolution.

Names are paths relative to the family's LoRA folder without the extension (`style`,
`people/alice`), as the UI shows them. Names that arrive from the UI or an API are only ever
resolved to files found by scanning that folder, so `..`, absolute paths and symlinks pointing
outside cannot reach any other file. The CLI may also name a file by path (`allow_paths=True`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from models.errors import UserError
from models.parsing import Strength, parse_schedule  # torch-free: listing LoRAs needs no torch

log = logging.getLogger("wgp_zimage")

ROOT = Path(__file__).resolve().parent.parent
LORA_EXTENSIONS = (".safetensors", ".sft")
MAX_TRIGGER_TAGS = 5


def lora_dir_for(family_subdir: str, loras_root: str | Path | None = None,
                 override: str | Path | None = None) -> Path:
    """The folder of a family's LoRAs: `override` (--lora-dir-<family>), else <root>/<family> with
    root = `loras_root` (--loras) or ./loras next to the app."""
    if override is not None:
        return Path(override).expanduser()
    return Path(loras_root).expanduser() / family_subdir if loras_root is not None else ROOT / "loras" / family_subdir


@dataclass
class LoraInfo:
    name: str  # folder/name, no extension
    path: Path
    size: int
    mtime_ns: int
    trigger_words: list[str] = field(default_factory=list)
    error: str | None = None  # unreadable header: listed anyway, loading it will say why


def trigger_words(metadata: dict[str, str], max_tags: int = MAX_TRIGGER_TAGS) -> list[str]:
    """Trigger words from safetensors metadata: modelspec/explicit trigger phrases first, then the
    most frequent kohya training tags (`ss_tag_frequency`: {dataset: {tag: count}})."""
    words: list[str] = []
    for key in ("modelspec.trigger_phrase", "trigger_phrase", "trigger_word", "trigger_words", "ss_trigger_words"):
        value = metadata.get(key)
        if value:
            words += [w.strip() for w in re.split(r"[,\n]", value) if w.strip()]
    counts: dict[str, int] = {}
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        freq = {}
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    tag = str(tag).strip()
                    if tag and isinstance(n, (int, float)):
                        counts[tag] = counts.get(tag, 0) + int(n)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    words = list(dict.fromkeys(words))  # explicit phrases are always kept, tags fill up to max_tags
    for tag in ranked:
        if len(words) >= max_tags:
            break
        if tag not in words:
            words.append(tag)
    return words


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata, read without loading any tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _inside(path: Path, folder: Path) -> bool:
    """Whether path, symlinks resolved, lies inside folder (resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


class LoraLibrary:
    """The LoRA files of one folder (recursive), rescanned by `refresh()`."""

    def __init__(self, lora_dir: str | Path):
        self.lora_dir = Path(lora_dir).expanduser()
        self._items: dict[str, LoraInfo] = {}
        self._meta_cache: dict[tuple[str, int, int], tuple[list[str], str | None]] = {}
        self._scanned = False

    def refresh(self) -> list[LoraInfo]:
        """Rescan the folder; returns the files sorted by name."""
        items: dict[str, LoraInfo] = {}
        if self.lora_dir.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(self.lora_dir, followlinks=False):
                dirnames.sort()
                found += [Path(dirpath) / f for f in filenames if f.lower().endswith(LORA_EXTENSIONS)]
            for path in sorted(found):
                if not _inside(path, self.lora_dir) or not path.is_file():
                    log.warning("LoRA %s points outside %s; ignored", path, self.lora_dir)
                    continue
                rel = path.relative_to(self.lora_dir).as_posix()
                name = rel.rsplit(".", 1)[0]
                if name in items:  # x.safetensors next to x.sft: the second keeps its extension
                    name = rel
                try:
                    st = path.stat()
                except OSError:  # deleted (or moved) since the folder was listed
                    continue
                words, error = self._trigger_words(path, st)
                items[name] = LoraInfo(name, path, st.st_size, st.st_mtime_ns, words, error)
        self._items, self._scanned = items, True
        return list(items.values())

    def _trigger_words(self, path: Path, st: os.stat_result) -> tuple[list[str], str | None]:
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._meta_cache:
            try:
                self._meta_cache[key] = (trigger_words(read_metadata(path)), None)
            except Exception as e:  # a corrupt header must not break the listing
                self._meta_cache[key] = ([], f"unreadable: {e}")
        return self._meta_cache[key]

    def _ensure(self) -> None:
        if not self._scanned:
            self.refresh()

    @property
    def items(self) -> list[LoraInfo]:
        self._ensure()
        return list(self._items.values())

    def names(self) -> list[str]:
        self._ensure()
        return list(self._items)

    def get(self, name: str) -> LoraInfo:
        """The file of a LoRA name (also accepts the relative path with its extension)."""
        self._ensure()
        key = _clean_name(name)
        info = self._items.get(key) or self._by_relpath(key)
        if info is None:  # maybe added since the last scan
            self.refresh()
            info = self._items.get(key) or self._by_relpath(key)
        if info is None:
            known = ", ".join(list(self._items)[:10]) or "none"
            # the folder's path is the server's business: API and page messages say "the LoRA folder"
            raise UserError(f"unknown LoRA {name!r}: not in the LoRA folder (available: {known})")
        if not _inside(info.path, self.lora_dir):  # the link changed since the scan
            raise UserError(f"LoRA {name!r} resolves outside the LoRA folder; refused")
        return info

    def _by_relpath(self, rel: str) -> LoraInfo | None:
        return next((i for i in self._items.values() if i.path.relative_to(self.lora_dir).as_posix() == rel), None)

    def resolve(self, name_or_path: str, allow_paths: bool = False) -> Path:
        """A LoRA name -> its file inside the folder. With allow_paths (the CLI, a local user), an
        existing file path outside the folder is accepted too."""
        if not allow_paths:
            return self.get(name_or_path).path
        try:  # a library name wins over a same-named path
            return self.get(name_or_path).path
        except UserError as e:
            p = Path(name_or_path).expanduser()
            if not p.is_file():
                raise UserError(f"LoRA {name_or_path!r}: neither a file nor a LoRA of {self.lora_dir}") from e
            if p.suffix.lower() not in LORA_EXTENSIONS:
                raise UserError(f"LoRA file {p} must be {' or '.join(LORA_EXTENSIONS)}") from None
            return p.resolve()

    def resolve_selection(self, strengths: Mapping[str, Strength],
                          allow_paths: bool = False) -> tuple[dict[Path, Strength], dict[Path, str]]:
        """{name: strength} -> ({file: strength}, {file: name}): the two arguments of
        LoraManager.sync, strengths bound by name whatever the order."""
        files = {name: self.resolve(name, allow_paths) for name in strengths}
        return {files[n]: s for n, s in strengths.items()}, {f: n for n, f in files.items()}


def _clean_name(name: str) -> str:
    """Reject anything but a plain relative name inside the folder (API input)."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise UserError(f"invalid LoRA name {name!r}")
    norm = name.strip().replace("\\", "/")
    parts = PurePosixPath(norm).parts
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in parts or norm.startswith("~"):
        raise UserError(f"invalid LoRA name {name!r}: names are relative to the LoRA folder, without '..'")
    return "/".join(p for p in parts if p not in (".", ""))


def parse_lora_multipliers(text: str | None, names: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """Wan2GP's --lora-multipliers: one entry per LoRA, in order, separated by spaces; within an
    entry a comma list is spread over the steps ("1.0 0.6,0.3"). LoRAs without an entry get 1.0.
    Returns {name: schedule}, so later code binds strengths by name, not position."""
    names = list(names)
    entries = (text or "").split()
    if len(entries) > len(names):
        raise UserError(f"--lora-multipliers has {len(entries)} entries for {len(names)} LoRA(s): {text!r}")
    out = {}
    for i, name in enumerate(names):
        out[name] = parse_schedule(entries[i]) if i < len(entries) else (1.0,)
    return out


def format_schedule(schedule: tuple[float, ...] | float) -> str:
    """A schedule back to the text form ("1.0,0.5"), for settings and metadata."""
    values = (schedule,) if isinstance(schedule, (int, float)) else schedule
    return ",".join(f"{v:g}" for v in values)
