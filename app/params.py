"""The app's generation parameters and everything derived from the declarations.

Common parameters are declared here (`COMMON`); a family declares its own in its handler
(`FamilyHandler.params`). From these declarations, and nowhere else: the `generate` options
(`add_generate_options`), the page's form (app/ui_form.py), the job spec and its validation
(app/jobs.py: `spec_from_values`), image metadata and its A1111 text (app/metadata.py),
generation profiles (app/settings.py) and the `/generate` API's arguments.

To add a parameter: declare it (here if every family takes it, else in the family's handler)
and read it in the family's pipeline, which receives it under its name.
"""

from __future__ import annotations

import argparse
from typing import Any

from models.params import Param
from models.registry import declared_params, default_model_type

MAX_SEED = 2**32 - 1
DEFAULT_MODEL_TYPE = default_model_type()  # the first family's (models/<family>/params.py)
MEMORY_PROFILES = (1, 2, 3, 4, 5)  # MMGP memory profiles (app/offload.py); kept here so no torch is needed

# the common parameters before the families' (the form, --help and the A1111 text list them in this order:
# the prompt and size, then the model's own knobs, then seed and count)
HEAD: tuple[Param, ...] = (
    # prompts longer than app.jobs.MAX_PROMPT_CHARS are cut with a warning, not refused
    Param("prompt", str, "", "Prompt", cli="--prompt", widget="text", help="the prompt"),
    Param("negative_prompt", str, "", "Negative prompt", cli="--negative-prompt", widget="text",
          model_tuned=True, help="what the image should not show"),
    Param("width", int, 1024, "Width", minimum=16, maximum=4096, multiple_of=16, step=16, cli="--width",
          model_tuned=True, widget="number", row="size", help="image width in pixels (16-4096, a multiple of 16)"),
    Param("height", int, 1024, "Height", minimum=16, maximum=4096, multiple_of=16, step=16, cli="--height",
          model_tuned=True, widget="number", row="size", help="image height in pixels (16-4096, a multiple of 16)"),
    Param("num_inference_steps", int, 30, "Steps", minimum=1, maximum=100, step=1, cli="--steps",
          model_tuned=True, widget="number", a1111="Steps", help="denoising steps = model evaluations (1-100)"),
)
TAIL: tuple[Param, ...] = (
    Param("seed", int, -1, "Seed", minimum=-1, maximum=MAX_SEED, cli="--seed", widget="number", row="seed",
          pipeline=False, a1111="Seed", help="-1 = random (default; reported); image i of a batch uses seed + i"),
    Param("num_images", int, 1, "Number of images", minimum=1, maximum=16, step=1, cli="--num-images",
          row="seed", pipeline=False, legacy=("images",),
          help="images per prompt (1-16, default 1); image i uses seed + i"),
    Param("memory_profile", int, None, "Memory profile", choices=MEMORY_PROFILES, optional=True, group="advanced",
          widget="dropdown", pipeline=False, in_profile=False,
          help="MMGP memory profile for this job only (CUDA); none: the app's configured one"),
)
COMMON: tuple[Param, ...] = (*HEAD, *TAIL)
# parameters with controls of their own on the page and the command line (the prompt box with its
# token count and one-job-per-line, --prompt / --prompt-file, the memory profile's dropdown of
# descriptions and --memory-profile, which on the command line sets the app's profile)
CUSTOM_CONTROLS = ("prompt", "memory_profile")


def all_params() -> list[Param]:
    """Every declared parameter: the common head, the families' (declaration order), the common tail."""
    common = {p.name for p in COMMON}
    return [*HEAD, *(p for p in declared_params() if p.name not in common), *TAIL]


def by_name() -> dict[str, Param]:
    return {p.name: p for p in all_params()}


def params_of(architecture: str | None) -> list[Param]:
    """The parameters a model architecture takes: the common ones and its family's."""
    if architecture is None:
        return list(COMMON)
    from models.registry import handler_for

    names = {p.name for p in COMMON}
    return [*HEAD, *(p for p in handler_for(architecture).params if p.name not in names), *TAIL]


# ------------------------------------------------------------------ the command line

def add_generate_options(parser: argparse.ArgumentParser, profile_only: bool = False) -> None:
    """One `generate` option per declared parameter (custom controls excepted; with profile_only, those a
    generation profile keeps: `profiles save` offers no input image it would drop).

    Values stay text until `Param.parse` reads them, so a bad value gets the same message as in the
    page; absent options are None (the profile, image or model default applies).
    """
    group = parser.add_argument_group("generation parameters")
    for p in all_params():
        if p.cli is None or p.name in CUSTOM_CONTROLS or (profile_only and not p.in_profile):
            continue
        if p.kind is bool:  # --paste-back / --no-paste-back
            group.add_argument(p.cli, dest=p.name, default=None, action=argparse.BooleanOptionalAction, help=p.help)
            continue
        group.add_argument(p.cli, dest=p.name, default=None, metavar=p.metavar or p.kind.__name__.upper(),
                           help=p.help + (f" ({p.describe_range()})" if p.choices else ""))


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The generation parameters given on the command line (raw text, not yet parsed)."""
    return {p.name: getattr(args, p.name) for p in all_params()
            if p.cli is not None and p.name not in CUSTOM_CONTROLS and getattr(args, p.name, None) is not None}
