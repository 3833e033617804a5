"""Control maps for the ControlNet: the control image as the ControlNet sees it.

raw: the image is the map already (a pose skeleton, a depth map, edges made elsewhere); canny: its edges
through OpenCV's Canny on the grey image; gray: its grey image; scribble: thick white strokes of its main
contours (OpenCV); depth and pose: an annotator model (models/annotators.py: Depth Anything V2, ViTPose),
downloaded on first use. Either way the map has the render size (Lanczos fit, as the image inputs), so the copy
saved beside the output is exactly what was encoded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models import image_inputs as ii
from models.errors import UserError

# OpenCV's usual hysteresis thresholds for 8-bit images (the publishers' Canny examples use them)
CANNY_LOW, CANNY_HIGH = 100, 200
# scribble: ControlNet's scribble maps are hand-drawn-looking white strokes on black: its training scribbles
# were HED boundaries thresholded and thickened by random dilation, so only the main contours, a few pixels
# wide, no texture. The same from OpenCV: a blur (drops texture and noise), Canny with low thresholds (the
# contours that remain), then a dilation to stroke width. Blur and stroke scale with the picture (at 512 px:
# sigma 2, a 5 px pen).
SCRIBBLE_LOW, SCRIBBLE_HIGH = 50, 150
EventFn = Callable[[dict[str, Any]], None]


def _cv2():
    try:
        import cv2
    except ImportError:  # a requirement; a partial install should still say what is missing
        raise UserError("the canny, gray and scribble control types need OpenCV: pip install "
                        "opencv-python-headless") from None
    return cv2


def _rgb(single: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(single[:, :, None], 3, axis=2), mode="RGB")  # the ControlNet takes 3 channels


def gray(image: Image.Image) -> Image.Image:
    """OpenCV's grey image (BT.601 weights), three equal channels."""
    cv2 = _cv2()
    return _rgb(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY))


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black, RGB (the ControlNet takes three channels)."""
    cv2 = _cv2()
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return _rgb(cv2.Canny(grey, low, high))


def scribble_scale(width: int, height: int) -> tuple[float, int]:
    """(blur sigma, pen width in pixels, odd) for a width x height picture."""
    s = min(width, height) / 512
    return max(1.0, 2.0 * s), max(3, 2 * round(2 * s) + 1)


def scribble(image: Image.Image) -> Image.Image:
    """Thick white strokes on black along the picture's main contours (see SCRIBBLE_LOW above)."""
    cv2 = _cv2()
    sigma, pen = scribble_scale(*image.size)
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(cv2.GaussianBlur(grey, (0, 0), sigma), SCRIBBLE_LOW, SCRIBBLE_HIGH)
    strokes = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (pen, pen)))
    return _rgb(strokes)


def _annotated(picture: Image.Image, control_type: str, checkpoints_dir: Path | None,
               on_event: EventFn | None) -> Image.Image:
    from models import annotators as an

    if checkpoints_dir is None:
        raise UserError(f"the {control_type} control type needs its annotator's folder (the checkpoints folder)")

    def downloading(files: list[str]) -> None:
        if on_event is not None:
            on_event({"kind": "download", "files": files})

    def progress(i: int, n: int, what: str) -> None:
        if on_event is not None:
            on_event({"kind": "preprocess", "step": i, "total": n, "desc": what})

    folders = an.fetch(an.annotators_for(control_type), checkpoints_dir, downloading)
    if control_type == "depth":
        return an.depth_map(picture, folders[0], progress)
    return an.pose_map(picture, folders[0], folders[1] if len(folders) > 1 else None, progress)


def control_map(path: str, control_type: str, width: int, height: int, *, checkpoints_dir: Path | None = None,
                on_event: EventFn | None = None) -> Image.Image:
    """The control map of the file at path for a width x height render (UserError for an unreadable file, an
    unknown type or annotator weights that cannot be had). checkpoints_dir: where the depth and pose annotators
    are (downloaded into `annotators/` there); on_event: their download and progress events."""
    picture = ii.fit_image(ii.load_image(path), width, height)
    if control_type == "raw":
        return picture
    if control_type == "canny":
        return canny(picture)
    if control_type == "gray":
        return gray(picture)
    if control_type == "scribble":
        return scribble(picture)
    if control_type in ("depth", "pose"):
        return _annotated(picture, control_type, checkpoints_dir, on_event)
    raise UserError(f"unknown control type {control_type!r}: raw, canny, gray, scribble, depth or pose")


__all__ = ["CANNY_HIGH", "CANNY_LOW", "SCRIBBLE_HIGH", "SCRIBBLE_LOW", "canny", "control_map", "gray", "scribble",
           "scribble_scale"]
