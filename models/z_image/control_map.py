"""Control maps for the ControlNet: the control image as the ControlNet sees it (no torch here).

raw: the image is the map already (a pose skeleton, a depth map, edges made elsewhere); canny: its edges
through OpenCV's Canny on the grey image. Either way the map has the render size (Lanczos fit, as the
image inputs), so the copy saved beside the output is exactly what was encoded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from models import image_inputs as ii
from models.errors import UserError

# OpenCV's usual hysteresis thresholds for 8-bit images (the publishers' Canny examples use them)
CANNY_LOW, CANNY_HIGH = 100, 200


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black, RGB (the ControlNet takes three channels)."""
    try:
        import cv2
    except ImportError:  # a requirement; a partial install should still say what is missing
        raise UserError("the canny control type needs OpenCV: pip install opencv-python-headless") from None
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")


def control_map(path: str, control_type: str, width: int, height: int) -> Image.Image:
    """The control map of the file at path for a width x height render (UserError for an unreadable file or
    an unknown type)."""
    picture = ii.fit_image(ii.load_image(path), width, height)
    if control_type == "raw":
        return picture
    if control_type == "canny":
        return canny(picture)
    raise UserError(f"unknown control type {control_type!r}: raw or canny")


__all__ = ["CANNY_HIGH", "CANNY_LOW", "canny", "control_map"]
