"""The page's LoRA selection: "name=strength" lines bound by name, trigger words, checks at submit.

The strengths text box is the selection the job gets: one `name=strength` line per selected LoRA
(strength: a number, or a per-step schedule such as `1.0,0.5`). The multiselect only adds and removes
lines, so reordering or removing a LoRA never moves another one's strength. The /generate API takes
the same text, or a JSON list of {"name", "strength"} objects. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.untrusted import UntrustedError, load_json
from models.errors import UserError

DEFAULT_STRENGTH = "1.0"


def parse_strength(value: Any, name: str = "") -> float | str:
    """A number (-> float) or a comma schedule (-> the normalized string); UserError otherwise.

    The numbers are read by models.parsing.parse_schedule (ASCII digits, |s| <= 10), the one check the
    run applies too, so nothing accepted here fails later."""
    from models.parsing import parse_schedule

    label = f"LoRA {name!r} strength" if name else "LoRA strength"
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{label} is empty: give a number or a comma list such as 1.0,0.5")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(f"{label} must be a number or a comma list such as 1.0,0.5 (got {value!r})")
    try:
        values = parse_schedule(value)
    except UserError as e:
        raise UserError(f"{label}: {e}") from None
    if isinstance(value, str) and len(values) > 1:
        return ",".join(p.strip() for p in value.split(","))
    return values[0]


def strength_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if not value.is_integer() else f"{value:.1f}"
    return str(value)


def parse_lines(text: str | None) -> list[tuple[str, str]]:
    """'name=strength' lines -> [(name, strength text)] in order (a bare name means 1.0); blank lines skipped."""
    out: list[tuple[str, str]] = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, strength = line.rpartition("=")
        if not sep:
            name, strength = line, DEFAULT_STRENGTH
        out.append((name.strip(), strength.strip()))
    return out


def parse_selection(value: Any) -> list[dict[str, Any]]:
    """The job's LoRAs from the page's text, a JSON list (API) or a list: [{"name", "strength"}], checked."""
    if value is None:
        return []
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        try:  # API input: nesting that would exhaust the stack, lone surrogates... are refused
            value = load_json(value)
        except UntrustedError as e:
            raise UserError(f"LoRAs: the value {e}") from None
        if isinstance(value, Mapping):  # {"name": strength, ...}
            value = [{"name": k, "strength": v} for k, v in value.items()]
    if isinstance(value, str):
        items = [{"name": n, "strength": s} for n, s in parse_lines(value)]
    elif isinstance(value, list):
        items = value
    else:
        raise UserError(f"LoRAs must be 'name=strength' lines or a JSON list (got {type(value).__name__})")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise UserError(f"LoRAs: entry {i + 1} needs a name (got {item!r})")
        name = item["name"].strip()
        if name in seen:
            raise UserError(f"LoRA {name!r} is selected twice")
        seen.add(name)
        out.append({"name": name, "strength": parse_strength(item.get("strength", 1.0), name)})
    return out


def sync_lines(selected: Iterable[str] | None, text: str | None) -> str:
    """The text for the selected names in their order, each keeping the strength it already had."""
    current = dict(parse_lines(text))
    return "\n".join(f"{n}={current.get(n, DEFAULT_STRENGTH)}" for n in (selected or []))


def selection_text(loras: Iterable[Mapping[str, Any]]) -> str:
    return "\n".join(f"{item['name']}={strength_text(item.get('strength', 1.0))}" for item in loras)


def names_in(text: str | None, choices: Iterable[str]) -> list[str]:
    """The names of the text that the dropdown knows (a value outside its choices would raise)."""
    known = set(choices)
    return [n for n, _ in parse_lines(text) if n in known]


def trigger_words_of(library: Any, names: Iterable[str]) -> list[str]:
    """Trigger words of the selected LoRAs, first occurrence first."""
    by_name = {info.name: info for info in library.items}
    words: list[str] = []
    for n in names:
        info = by_name.get(n)
        for w in (info.trigger_words if info is not None else []):
            if w not in words:
                words.append(w)
    return words


def insert_word(prompt: str | None, word: str | None) -> str:
    """The prompt with the trigger word appended (comma-separated), unless it is already there."""
    prompt = prompt or ""
    if not word or word in prompt:
        return prompt
    body = prompt.rstrip()
    if not body:
        return word
    return f"{body}{'' if body.endswith(',') else ','} {word}"


def check_available(loras: list[dict[str, Any]], library: Any) -> None:
    """UserError naming the first LoRA the folder does not have (the library's own message)."""
    for item in loras:
        library.get(item["name"])


__all__ = ["parse_selection", "parse_strength", "sync_lines", "selection_text", "names_in", "trigger_words_of",
           "insert_word", "check_available"]
