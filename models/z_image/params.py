"""Z-Image's own generation parameters (the common ones are in app/params.py) and where the page
shows them per architecture. No torch here: the CLI's option list and the job spec read this
without loading a model."""

from __future__ import annotations

from typing import Any

from models import image_inputs as ii
from models.errors import UserError
from models.params import Param

DEFAULT_MODEL_TYPE = "z_image_base"  # when no model type is named
# how the page lists them (the smoke-test models last)
MODEL_ORDER = ("z_image_base", "z_image", "z_image_twinflow_turbo", "z_image_control2_1", "z_image_control2_1_8s",
               "z_image_control_tile", "z_image_control2", "z_image_control", "z_image_tiny", "z_image_tiny_control")
LORA_SUBDIR = "z_image"  # loras/<this>, or --lora-dir-z-image

# Z-Image's own generation parameters (the common ones are in app/params.py); the pipeline takes
# each under its name. Guidance g means pos + g * (pos - neg), so A1111's CFG scale is g + 1.
PARAMS = (
    Param("guidance_scale", float, 4.0, "Guidance", minimum=0.0, maximum=20.0, step=0.1, cli="--guidance",
          row="cfg", model_tuned=True, a1111="CFG scale", a1111_value=lambda g: g + 1, legacy=("guidance",),
          help="CFG scale g (0 = off, no negative pass; Base's 4 is 'CFG 5' in other UIs)"),
    Param("flow_shift", float, 6.0, "Flow shift", minimum=1.0, maximum=10.0, step=0.1, cli="--flow-shift",
          row="cfg", model_tuned=True, a1111="Flow shift", help="sampling shift (1-10; Base 6, Turbo 3)"),
    Param("cfg_normalization", float, 0.0, "CFG normalization", minimum=0.0, maximum=100.0, step=0.1,
          cli="--cfg-normalization", group="advanced",
          help="caps the guided prediction's norm at K x the positive one (0 = off, default)"),
    Param("cfg_truncation", float, 1.0, "CFG truncation", minimum=0.0, maximum=100.0, slider_maximum=1.0, step=0.01,
          cli="--cfg-truncation", group="advanced",
          help="guidance off once 1 - sigma exceeds C (1.0, the default, never truncates)"),
)


def _image_file(path: str) -> str:
    ii.load_image(path)  # missing, not an image, corrupt: refused now, not when the job runs
    return path


def _mask_file(path: str) -> str:
    if ii.load_mask(path).getextrema()[1] < 128:
        raise UserError("the mask is all black: nothing to repaint (white = repaint)")
    return path


def _margins(text: str) -> str:
    return ",".join(str(v) for v in ii.parse_margins(text))


# image inputs (img2img, inpainting, outpainting, upscale): models/z_image/image_job.py runs them
DEFAULT_STRENGTH = 0.6  # img2img; inpainting and outpainting default to 1.0
IMAGE_PARAMS = (
    Param("image", str, "", "Input image", cli="--image", metavar="FILE", widget="image", group="image",
          in_profile=False, check=_image_file,
          help="img2img / inpainting input, resized (Lanczos) to the width x height; without --width/--height "
               "its own size, rounded down to a multiple of 16; with one of them the other keeps its aspect ratio"),
    Param("mask", str, "", "Mask", cli="--mask", metavar="FILE", widget="mask", group="image", in_profile=False,
          check=_mask_file, needs="image",
          help="inpainting mask: white = repaint (any size; grey counts as white from 0.5)"),
    Param("strength", float, None, "Strength", minimum=0.01, maximum=1.0, step=0.01, cli="--strength",
          group="image", widget="number", optional=True, a1111="Denoising strength",
          needs="image",
          help=f"how much of the input is repainted (0.01-1; empty: {DEFAULT_STRENGTH}, or 1.0 with a mask or "
               "outpainting)"),
    Param("paste_back", bool, True, "Paste back", cli="--paste-back", widget="checkbox", group="image",
          row="paste", needs="image",
          help="put the input's own pixels back outside the mask (feathered over the mask blur)"),
    Param("mask_blur", int, ii.DEFAULT_MASK_BLUR, "Mask blur", minimum=0, maximum=64, step=1, cli="--mask-blur",
          group="image", row="paste", a1111="Mask blur",
          needs="image",
          help="paste-back feather in px: pixels 2 x blur px or more outside the mask are the input's exactly"),
    Param("outpaint", str, "", "Outpaint", cli="--outpaint", metavar="L,T,R,B", widget="text", group="image",
          in_profile=False, check=_margins,
          needs="image",
          help="grow the canvas by LEFT,TOP,RIGHT,BOTTOM px (multiples of 16); the new area is painted"),
    Param("upscale", float, 1.0, "Upscale", minimum=1.0, maximum=ii.MAX_UPSCALE, step=0.05, cli="--upscale",
          group="image", row="upscale", a1111="Hires upscale",
          help="hires fix: resize the result (or the input) by this factor, then an img2img pass (1 = off)"),
    Param("upscale_strength", float, 0.35, "Upscale strength", minimum=0.01, maximum=1.0, step=0.01,
          cli="--upscale-strength", group="image", row="upscale", help="the upscale pass's strength"),
    Param("upscale_steps", int, None, "Upscale steps", minimum=1, maximum=100, cli="--upscale-steps",
          group="image", row="upscale", widget="number", optional=True, a1111="Hires steps",
          help="the upscale pass's steps (empty: the job's steps)"),
)
# Turbo extras: a second sampler, and NAG (a negative prompt without CFG: models/z_image/nag.py)
SAMPLER_NAMES = {"euler": "Euler (flow)", "heun": "Heun (flow)"}  # as the A1111 text names them
EXTRA_PARAMS = (
    Param("sampler", str, "euler", "Sampler", choices=tuple(SAMPLER_NAMES), cli="--sampler", widget="dropdown",
          group="advanced", a1111="Sampler", a1111_value=SAMPLER_NAMES.get,
          help="euler (N model evaluations) or heun (2N - 1: more accurate at few steps, about twice the time)"),
    Param("nag_scale", float, 1.0, "NAG scale", minimum=1.0, maximum=20.0, step=0.1, cli="--nag-scale",
          group="advanced", row="nag", a1111="NAG scale",
          help="Normalized Attention Guidance: the negative prompt works at guidance 0 (1 = off; Turbo: try 3-5)"),
    Param("nag_tau", float, 3.5, "NAG tau", minimum=0.1, maximum=20.0, step=0.1, cli="--nag-tau", group="advanced",
          row="nag", help="NAG's cap on how far the guided attention may move from the positive one"),
    Param("nag_alpha", float, 0.5, "NAG alpha", minimum=0.0, maximum=1.0, step=0.05, cli="--nag-alpha",
          group="advanced", row="nag", help="NAG's blend: 1 = the guided attention only, 0 = off"),
    # seed variety (models/z_image/variety.py): the distilled models give nearly the same picture for every seed
    Param("variety", float, 0.0, "Seed variety", minimum=0.0, maximum=4.0, step=0.05, cli="--variety",
          group="advanced", row="variety", a1111="Variety",
          help="noise from the seed on the prompt's embedding early on, so seeds differ in composition "
               "(0 = off; try 0.5-1.5)"),
    Param("variety_until", float, 0.3, "Variety until", minimum=0.05, maximum=1.0, step=0.05,
          cli="--variety-until", group="advanced", row="variety",
          help="the fraction of the steps that see the varied prompt"),
)
# ControlNet Union (models/z_image/controlnet.py, maps in control_map.py): the ControlNet itself is a weight file
# of the model (a ControlNet model type's, or --controlnet), not a job setting; the job names its control image.
# The page shows them for the ControlNet types only (LAYOUT); like the input image, the control image is not
# kept in generation profiles, its type and strength are.
# how the control image becomes the map (control_map.py); depth and pose download an annotator
CONTROL_TYPES = ("raw", "canny", "gray", "scribble", "depth", "pose")
DEFAULT_CONTROL_STRENGTH = 0.75  # the publisher's range is 0.65-0.75 (1.0 / 2.x)
CONTROL_PARAMS = (
    Param("control_image", str, "", "Control image", cli="--control-image", metavar="FILE", widget="picture",
          group="control", in_profile=False, check=_image_file,
          help="ControlNet input (a ControlNet model type or --controlnet): the control map itself (raw) or the "
               "picture it is made from (--control-type); resized (Lanczos) to the width x height"),
    Param("control_type", str, "raw", "Control type", choices=CONTROL_TYPES, cli="--control-type",
          widget="dropdown", group="control", row="control",
          help="raw: the control image is the map; canny: its edges (OpenCV Canny); gray: its grey image; "
               "scribble: thick strokes of its contours; depth: a Depth Anything V2 depth map (downloads about "
               "100 MB on first use); pose: OpenPose-style skeletons by RT-DETR + ViTPose (about 520 MB)"),
    Param("control_strength", float, DEFAULT_CONTROL_STRENGTH, "Control strength", minimum=0.0, maximum=2.0,
          step=0.05, cli="--control-strength", group="control", row="control", model_tuned=True,
          a1111="Control strength",
          help="how strongly the control map steers the image (0 = exactly text-to-image; published 0.65-0.75)"),
)
PARAMS = (*PARAMS, *IMAGE_PARAMS, *CONTROL_PARAMS, *EXTRA_PARAMS)


def check_values(values: dict[str, Any]) -> None:
    """Rules between parameters (each one alone is checked by its declaration): UserError names the first."""
    image, mask, outpaint = values.get("image") or "", values.get("mask") or "", values.get("outpaint") or ""
    if mask and not image:
        raise UserError("a mask (--mask) needs an input image (--image)")
    if outpaint and not image:
        raise UserError("outpainting (--outpaint) needs an input image (--image)")
    if values.get("control_image") and outpaint:  # the control map has the render size, not the grown canvas's
        raise UserError("a control image (--control-image) cannot go with outpainting (--outpaint)")
    if values.get("control_image") and (values.get("nag_scale") or 1.0) != 1.0:  # said before any work
        raise UserError("NAG (--nag-scale) does not run with a ControlNet: leave one of them out")
    width, height = values.get("width"), values.get("height")
    if not isinstance(width, int) or not isinstance(height, int):
        return
    if outpaint:
        left, top, right, bottom = ii.parse_margins(outpaint)
        width, height = width + left + right, height + top + bottom
        if max(width, height) > ii.MAX_SIDE:
            raise UserError(f"the outpainted canvas {width}x{height} exceeds {ii.MAX_SIDE} px a side")
    upscale = values.get("upscale") or 1.0
    if upscale > 1.0:
        ii.upscale_size(width, height, upscale)  # over 4096 px a side: refused with the size


# where the page shows a parameter when not where it is declared ("hidden": the model's default applies)
# the control section is for the ControlNet types (the command line takes a control image with --controlnet
# for any type)
_NO_CONTROL = {p.name: "hidden" for p in CONTROL_PARAMS}
_NO_NAG = {"nag_scale": "hidden", "nag_tau": "hidden", "nag_alpha": "hidden"}  # the ControlNet runs without NAG
# the ControlNet types are Turbo plus a ControlNet
_CONTROL_TURBO = {"flow_shift": "advanced", "cfg_normalization": "hidden", "cfg_truncation": "hidden", **_NO_NAG}
LAYOUT: dict[str, dict[str, str]] = {
    # Turbo is distilled for one shift and no CFG (its negative prompt is NAG's: see CONDITIONS)
    "z_image": {"flow_shift": "advanced", "cfg_normalization": "hidden", "cfg_truncation": "hidden", **_NO_CONTROL},
    # Base has CFG: NAG is for the distilled models (the CLI still takes it: it then guides the positive pass)
    "z_image_base": {"nag_scale": "hidden", "nag_tau": "hidden", "nag_alpha": "hidden", "variety": "hidden",
                     "variety_until": "hidden", **_NO_CONTROL},
    "z_image_tiny": _NO_CONTROL,
    "z_image_tiny_control": _NO_NAG,
    # ControlNet Union 1.0 has no inpaint channels: no mask (its input image still does img2img)
    "z_image_control": {**_CONTROL_TURBO, "mask": "hidden"},
    "z_image_control2": _CONTROL_TURBO,
    "z_image_control2_1": _CONTROL_TURBO,
    # TwinFlow: its own sampler and schedule (no shift), no CFG, no image input (the sampler takes none)
    "z_image_twinflow_turbo": {"flow_shift": "hidden", "sampler": "hidden", "cfg_normalization": "hidden",
                         "cfg_truncation": "hidden", **{p.name: "hidden" for p in (*IMAGE_PARAMS, *CONTROL_PARAMS)}},
}

# parameters the page shows only while another one is set, per architecture (on top of `Param.needs`)
_DISTILLED = {"negative_prompt": "nag_scale", "nag_tau": "nag_scale", "nag_alpha": "nag_scale",
              "variety_until": "variety"}
CONDITIONS: dict[str, dict[str, str]] = {"z_image": _DISTILLED, "z_image_twinflow_turbo": _DISTILLED}
