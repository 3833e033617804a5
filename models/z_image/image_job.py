"""One Z-Image job with image inputs: the input prepared (resized, outpaint canvas, mask), the sampling pass
(models/z_image/pipeline.py: img2img / inpainting), paste-back, then the optional upscale ("hires fix")
pass. Without inputs and without upscale it is the plain text-to-image call.

Progress: the step callback counts the evaluations of every pass together (step k of the whole job's
total), so one progress bar and ETA cover the job; the per-step LoRA hook sees each pass's own steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models import image_inputs as ii
from models.errors import UserError
from models.z_image.params import DEFAULT_CONTROL_STRENGTH, DEFAULT_STRENGTH

LARGE_PIXELS = 1024 * 1024  # an upscale pass above this encodes and decodes in tiles


def steps_run(steps: int, strength: float, has_image: bool, has_mask: bool) -> int:
    """The evaluations-per-image count of one pass (the pipeline's own rule: strength 1 without a mask is
    text-to-image)."""
    if not has_image or (not has_mask and strength >= 1.0):
        return steps
    return steps - ii.start_index(steps, strength)


def prepare_inputs(image: str, mask: str, outpaint: str, width: int, height: int
                   ) -> tuple[Image.Image, Image.Image | None]:
    """(source, mask or None) at the render size: the image resized to width x height (Lanczos), the mask
    binarized at that size; outpainting grows both (the new area is white in the mask, added to any painted
    mask) and so the render size."""
    source = ii.fit_image(ii.load_image(image), width, height)
    mask_img = None
    if mask:
        binary = ii.mask_to_array(ii.load_mask(mask), width, height)
        mask_img = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    if outpaint:
        left, top, _, _ = margins = ii.parse_margins(outpaint)
        source, grown = ii.outpaint_canvas(source, margins)
        if mask_img is not None:
            grown.paste(mask_img, (left, top))  # the painted area of the old picture is repainted too
        mask_img = grown
    return source, mask_img


def _control(pipe: Any, path: str, control_type: str, strength: float, width: int, height: int,
             source: Image.Image | None, mask_img: Image.Image | None, checkpoints_dir: Path | None = None,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, Image.Image]:
    """(the pipeline's `control` argument, the control map) for one job; UserError when the model has no
    ControlNet or a 1.0 ControlNet is asked to inpaint."""
    from models.z_image.control_map import control_map
    from models.z_image.controlnet import INPAINT_IN_DIM, control_input

    net = getattr(pipe, "controlnet", None)
    if net is None:
        raise UserError("a control image (--control-image) needs a ControlNet: a ControlNet model type "
                        "(`python wgp_zimage.py models` lists them: z_image_control*) or --controlnet FILE")
    if mask_img is not None and net.in_dim != INPAINT_IN_DIM:
        raise UserError(f"this ControlNet (version {net.config.version}) cannot inpaint: a mask (--mask) with a "
                        "control image needs a 2.x ControlNet (or leave the mask out)")
    picture = control_map(path, control_type, width, height, checkpoints_dir=checkpoints_dir, on_event=on_event)
    # the inpaint channels take the image and mask only with a mask (img2img + control is plain control)
    inpaint = mask_img is not None
    control = control_input(pipe, net, picture, strength, width, height, image=source if inpaint else None,
                            mask_image=mask_img if inpaint else None)
    return control, picture


def render(pipe: Any, *, width: int, height: int, num_inference_steps: int, image: str = "", mask: str = "",
           strength: float | None = None, paste_back: bool = True, mask_blur: int = ii.DEFAULT_MASK_BLUR,
           outpaint: str = "", upscale: float = 1.0, upscale_strength: float = 0.35,
           upscale_steps: int | None = None, num_images_per_prompt: int = 1, seed: int | None = None,
           callback: Callable[[int, int, Any], None] | None = None,
           step_start: Callable[[int, int], None] | None = None, vae_tiling: Any = False, control_image: str = "",
           control_strength: float = DEFAULT_CONTROL_STRENGTH, control_type: str = "raw",
           checkpoints_dir: Path | None = None, on_event: Callable[[dict[str, Any]], None] | None = None,
           **sampling: Any) -> Any:
    """The job's images (an object with `images` and `seeds`, as the pipeline returns, plus `side_images`:
    {suffix: picture} to save beside the first output, the control map as "control"). Values are checked
    already (their declarations in models/z_image/params.py); files that vanished since raise UserError.

    control_image: with the pipeline's ControlNet (`pipe.controlnet`) it steers the first pass (with an image
    and a mask, a 2.x ControlNet inpaints through its inpaint channels); the upscale pass runs without it.
    checkpoints_dir and on_event: where the depth and pose annotators are downloaded, and their events."""
    source = mask_img = None
    if image:
        source, mask_img = prepare_inputs(image, mask, outpaint, width, height)
        width, height = source.size
    control, side_images = None, {}
    if control_image:
        control, side_images["control"] = _control(pipe, control_image, control_type, control_strength, width,
                                                    height, source, mask_img, checkpoints_dir, on_event)
    s = strength if strength is not None else (1.0 if mask_img is not None else DEFAULT_STRENGTH)
    count = num_images_per_prompt
    first = steps_run(num_inference_steps, s, source is not None, mask_img is not None)
    refine_steps = upscale_steps or num_inference_steps
    second = steps_run(refine_steps, upscale_strength, True, False) if upscale > 1.0 else 0
    total = first + count * second
    offset = 0

    def progress(k: int, n: int, latents: Any) -> None:
        if callback is not None:
            callback(offset + k, total, latents)

    # the encode tiles whenever the caller's rule would tile the decode (its memory budget), else by size
    encode_tiling = None
    if source is not None and (vae_tiling() if callable(vae_tiling) else vae_tiling):
        encode_tiling = True
    out = pipe(width=width, height=height, num_inference_steps=num_inference_steps, image=source,
               mask_image=mask_img, strength=s, num_images_per_prompt=count, seed=seed, callback=progress,
               step_start=step_start, vae_tiling=vae_tiling, vae_encode_tiling=encode_tiling, control=control,
               **sampling)
    out.side_images = side_images
    if mask_img is not None and paste_back:
        out.images = [ii.paste_back(source, im, mask_img, mask_blur) for im in out.images]
    if upscale > 1.0:
        refined = []
        for i, im in enumerate(out.images):
            offset = first + i * second
            big = ii.upscale_image(im, upscale)
            # the caller's tiling rule was made for the first pass's size: above 1 MP the VAE works in tiles,
            # which keeps a 2048 x 2048 pass within the low-VRAM profiles' budget
            large = big.width * big.height > LARGE_PIXELS
            one = pipe(width=big.width, height=big.height, num_inference_steps=refine_steps, image=big,
                       strength=upscale_strength, num_images_per_prompt=1,
                       seed=None if seed is None else seed + i, callback=progress, step_start=step_start,
                       vae_tiling=True if large else vae_tiling, vae_encode_tiling=True if large else None,
                       **sampling)
            refined.append(one.images[0])
        out.images = refined
    return out


__all__ = ["DEFAULT_STRENGTH", "prepare_inputs", "render", "steps_run"]
