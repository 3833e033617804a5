"""Files the page's image inputs send: the input image editor (a background and painted layers) and an uploaded
mask, as Generate receives them raw (its preprocessing is off: our parsing, our messages).

Only files uploaded to this app's Gradio upload folder are read: a client that names another path (the API
takes any JSON) would otherwise make the server read any image on its disk into a job. Painted strokes
become a mask file (white = repaint) in the upload folder; the queue copies it with the job.
No torch here.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image

from models import image_inputs as ii
from models.errors import UserError

MASKS = "wgp-masks"  # sub-folder of the upload folder for painted masks


def uploaded_path(value: Any, label: str) -> str:
    """The server path of an uploaded file value (Gradio's FileData, or its path), "" for none."""
    if value is None or value == "" or value == {}:
        return ""
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise UserError(f"{label} is not an uploaded file")
    if not is_in_or_equal(path, get_upload_folder()):
        raise UserError(f"{label}: only files uploaded to this page can be used")
    return path


def editor_inputs(value: Any, label: str) -> tuple[str, str]:
    """(image path, painted mask path) of an image editor's value ({"background", "layers", "composite"}); a plain
    uploaded file is an image without strokes. Either is "" when absent (no strokes: no mask)."""
    if not isinstance(value, dict) or "background" not in value and "layers" not in value:
        return uploaded_path(value, label), ""
    image = uploaded_path(value.get("background"), label)
    layers = value.get("layers") or []
    if not image or not isinstance(layers, list):
        return image, ""
    with Image.open(image) as im:
        size = im.size
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        path = uploaded_path(layer, f"{label} (a painted layer)")
        if not path:
            continue
        with Image.open(path) as im:
            alpha = im.convert("RGBA").getchannel("A")
        if alpha.size != size:  # the editor's canvas is the background's size; be safe
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        return image, ""
    return image, save_mask(painted)


def save_mask(mask: np.ndarray) -> str:
    """A boolean mask as a white-on-black PNG in the upload folder; its path."""
    folder = Path(get_upload_folder()) / MASKS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.png"
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
    return str(path)


def combined_mask(uploaded: str, painted: str, size_of: str) -> str:
    """One mask from an uploaded one and painted strokes (their union, at the image's size); "" for none."""
    if not uploaded or not painted:
        return uploaded or painted
    with Image.open(size_of) as im:
        width, height = im.size
    both = ii.mask_to_array(ii.load_mask(uploaded), width, height) | ii.mask_to_array(ii.load_mask(painted), width,
                                                                                     height)
    return save_mask(both)


__all__ = ["combined_mask", "editor_inputs", "save_mask", "uploaded_path"]
