"""`wgp_zimage.py profiles ...`: list, show, save, delete, rename, export and import generation profiles.

Generation profiles (named settings files in --profiles-dir) are not MMGP memory profiles (1-5).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.launch import PROFILES_DIR
from app.params import DEFAULT_MODEL_TYPE, by_name, cli_values
from app.settings import (
    OUTPUT_FORMATS,
    SEED_POLICIES,
    ProfileStore,
    TargetExists,
    apply_to_model,
    job_seed,
    model_settings,
    profile_params,
)
from models.errors import UserError
from models.parsing import ascii_float, cli_int, parse_schedule

log = logging.getLogger("wgp_zimage")

DEFAULT_DIR = PROFILES_DIR
# save flags that are not generation parameters (those come from their declarations) -> settings key
FLAG_KEYS = {"seed_policy": "seed_policy", "format": "output_format", "quality": "output_quality"}


def add_profiles_parser(subparsers: argparse._SubParsersAction,
                        shared_parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `profiles list|show|save|delete|rename|export|import` to a CLI's sub-commands."""
    prof = subparsers.add_parser(
        "profiles", help="saved generation profiles (not MMGP memory profiles)",
        description="Generation profiles: named files of generation settings in --profiles-dir.")
    # given before or after the action, or before `profiles`: the default is the top level's (app.launch), the
    # copies here are SUPPRESSed so they never overwrite a value given earlier
    prof.add_argument("--profiles-dir", type=Path, default=argparse.SUPPRESS,
                      help="folder of generation profiles (default: profiles/)")
    actions = prof.add_subparsers(dest="profiles_command", metavar="ACTION", parser_class=type(prof))
    actions.required = True

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, parents=[shared_parent], help=help_text)
        p.add_argument("--profiles-dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    action("list", "list generation profiles (broken ones too)")
    action("show", "print a generation profile as JSON").add_argument("name")
    save = action("save", "save generation settings as a profile (unset values: the model's defaults)")
    save.add_argument("name")
    save.add_argument("--model", default=None, help="model type or alias (default: the first family's default type)")
    save.add_argument("--prompt", default=None, help="saved with the profile only when given")
    from app.params import add_generate_options

    add_generate_options(save, profile_only=True)  # the declared parameters a profile keeps, as for generate
    save.add_argument("--seed-policy", choices=SEED_POLICIES, default=None,
                      help="fixed, random, or increment after each job (default: random for seed -1, else fixed)")
    # as generate takes them (NAME:STRENGTH, the older form, is still read when --lora-multipliers is not given)
    save.add_argument("--lora", action="append", default=None, metavar="NAME",
                      help="a LoRA of the LoRA folder; repeatable")
    save.add_argument("--lora-multipliers", default=None, metavar="SPEC",
                      help='strengths in --lora order, space-separated (default 1.0); a comma list is spread over the '
                           'steps: "1.0 0.6,0.3"')
    save.add_argument("--format", choices=[*OUTPUT_FORMATS, "jpg"], default=None, help="output image format")
    save.add_argument("--quality", type=cli_int, default=None, help="jpeg/webp quality 1-100")
    save.add_argument("--overwrite", action="store_true", help="replace a profile of that name")
    save.add_argument("--overwrite-broken", action="store_true", help="replace a broken (unreadable) profile")
    action("delete", "delete a generation profile").add_argument("name")
    rename = action("rename", "rename a generation profile")
    rename.add_argument("name")
    rename.add_argument("new_name")
    rename.add_argument("--overwrite", action="store_true", help="replace a profile of the new name")
    export = action("export", "write a generation profile to a file")
    export.add_argument("name")
    export.add_argument("file", type=Path)
    export.add_argument("--overwrite", action="store_true", help="replace the file")
    imp = action("import", "add a generation profile file (any schema version) to the folder")
    imp.add_argument("file", type=Path)
    imp.add_argument("--name", default=None, help="profile name (default: the file name)")
    imp.add_argument("--overwrite", action="store_true", help="replace a profile of that name")
    return prof


def _warn(warnings: Iterable[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _parse_lora(text: str) -> dict[str, Any]:
    name, sep, strength = text.rpartition(":")
    if not sep:
        return {"name": text, "strength": 1.0}
    try:
        (value,) = parse_schedule(ascii_float(strength))  # ASCII digits, |s| <= 10
    except ValueError:
        raise UserError(f"--lora {text}: the strength after ':' must be a number") from None
    except UserError as e:
        raise UserError(f"--lora {text}: {e}") from None
    return {"name": name, "strength": value}


def _cli_loras(names: list[str], multipliers: str | None) -> list[dict[str, Any]]:
    """--lora NAME ... --lora-multipliers SPEC, as generate reads them; without SPEC each NAME may still be the
    older NAME:STRENGTH."""
    if multipliers is None:
        return [_parse_lora(t) for t in names]
    from app.loras import format_schedule, parse_lora_multipliers

    schedules = parse_lora_multipliers(multipliers, names)
    return [{"name": n, "strength": s[0] if len(s) == 1 else format_schedule(s)} for n, s in schedules.items()]


def settings_from_args(args: argparse.Namespace, store: ProfileStore) -> tuple[dict[str, Any], list[str]]:
    """The model's defaults (user's per-model defaults included) overlaid with the flags given."""
    from models.registry import load_definitions

    defs, problems = load_definitions()
    settings, warnings = model_settings(args.model or DEFAULT_MODEL_TYPE, defs, store)
    settings = {**settings, "prompt": None, "negative_prompt": None}  # texts only when asked for
    if args.prompt is not None:
        settings["prompt"] = args.prompt
    declared = by_name()
    settings.update({k: declared[k].parse(v) for k, v in cli_values(args).items()})  # command-line text
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[key] = value
    if args.seed_policy is None and args.seed is not None:
        settings["seed_policy"] = "random" if by_name()["seed"].parse(args.seed) == -1 else "fixed"
    if args.lora_multipliers is not None and args.lora is None:
        raise UserError("--lora-multipliers gives the strengths of --lora LoRAs: give --lora too")
    if args.lora is not None:
        settings["loras"] = _cli_loras(args.lora, args.lora_multipliers)
    return settings, problems + warnings


def _summary(s: dict[str, Any]) -> str:
    seed = {"random": "random seed", "fixed": f"seed {s['seed']}", "increment": f"seed {s['seed']}++"}
    tuned = "  ".join(f"{p.label.lower()} {s[p.name]:g}" for p in profile_params()
                      if p.model_tuned and p.kind is float and p.name in s)  # a family's own (guidance...)
    return (f"{s['model_type']}  {s['width']}x{s['height']}  {s['num_inference_steps']} steps  "
            f"{tuned}  {seed[s['seed_policy']]}  x{s['num_images']}  {s['output_format']}")


def run_profiles(args: argparse.Namespace) -> int:
    """Run a `profiles` action; UserError propagates (the CLI prints it and exits 2)."""
    try:
        return _run_profiles(args)
    except TargetExists as e:  # the store does not know the command line's flags
        flag = "--overwrite-broken" if e.broken and args.profiles_command == "save" else "--overwrite"
        raise UserError(f"{e}; use {flag} to replace it") from None


def _run_profiles(args: argparse.Namespace) -> int:
    store = ProfileStore(args.profiles_dir)
    cmd = args.profiles_command
    if cmd == "list":
        entries = store.list()
        if not entries:
            print(f"no generation profiles in {store.folder}")
        for e in entries:
            print(f"{e.name}  BROKEN: {e.error}" if e.broken else f"{e.name}  {_summary(e.settings or {})}")
    elif cmd == "show":
        settings, warnings = store.load(args.name)
        _warn(warnings)
        print(json.dumps(settings, indent=2, ensure_ascii=False))
    elif cmd == "save":
        settings, warnings = settings_from_args(args, store)
        _warn(warnings)
        _warn(store.save(args.name, settings, overwrite=args.overwrite, overwrite_broken=args.overwrite_broken))
        print(f"saved generation profile {args.name!r} to {store.path(args.name)}")
    elif cmd == "delete":
        store.delete(args.name)
        print(f"deleted generation profile {args.name!r}")
    elif cmd == "rename":
        store.rename(args.name, args.new_name, overwrite=args.overwrite, overwrite_broken=args.overwrite)
        print(f"renamed generation profile {args.name!r} to {args.new_name!r}")
    elif cmd == "export":
        print(f"exported generation profile {args.name!r} to {store.export_to(args.name, args.file, args.overwrite)}")
    elif cmd == "import":
        name, warnings = store.import_from(args.file, args.name, overwrite=args.overwrite,
                                           overwrite_broken=args.overwrite)
        _warn(warnings)
        print(f"imported {args.file} as generation profile {name!r}")
    else:  # pragma: no cover - argparse refuses other actions
        raise UserError(f"unknown profiles action {cmd!r}")
    return 0


def profile_to_spec_overrides(name: str, profiles_dir: str | Path = DEFAULT_DIR, model_type: str | None = None,
                              available_loras: Iterable[str] | None = None,
                              definitions: dict[str, Any] | None = None) -> dict[str, Any]:
    """JobSpec keyword values from a generation profile, for `generate --gen-profile NAME`.

    Overlay explicit CLI flags on the result. prompt / negative_prompt are present only when the
    profile holds them; seed is -1 for the random policy. Extra keys JobSpec does not take (JobSpec.from_dict
    drops them): seed_policy, output_format, output_quality (the CLI's generate applies the last two to the
    images it writes). model_type (an explicit --model) moves the
    profile to that model through the equivalence map. Warnings go to the log.
    """
    settings, warnings = ProfileStore(profiles_dir).load(name, available_loras)
    if model_type is not None:
        if definitions is None:
            from models.registry import load_definitions

            definitions, _ = load_definitions()
        settings, more = apply_to_model(settings, model_type, definitions)
        warnings += more
    for w in warnings:
        log.warning(w)
    out = {k: v for k, v in settings.items() if not (k in ("prompt", "negative_prompt") and v is None)}
    out["seed"] = job_seed(settings, 0)
    return out
