"""Files the page's image inputs send: the input image editor (a background and painted layers) and an uploaded
mask, as Generate receives them raw (its preprocessing is off: our parsing, our messages).

Only files uploaded to this app's Gradio upload folder are read: a client that names another path (the API
takes any JSON) would otherwise make the server read any image on its disk into a job. Painted strokes
become a mask file (white = repaint) in the upload folder; the queue copies it with the job.
No torch here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.components.image_editor import EditorData
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image
from pydantic import model_validator

from models import image_inputs as ii
from models.errors import UserError
from models.files import atomic_path

MASKS = "wgp-masks"  # sub-folder of the upload folder for painted masks
KEEP_MASKS = 64  # painted masks kept there (newest first): the folder does not grow with every Generate


class EditorOrFile(EditorData):
    """An image editor's payload, or a bare file (the API's `handle_file("x.png")`, a FileData) taken as its
    background. Gradio validates every payload into its component's model, preprocessing or not, and
    EditorData makes a bare file an editor with no background: the job ran text-to-image without a word."""

    @model_validator(mode="before")
    @classmethod
    def _bare_file(cls, value: Any) -> Any:
        if isinstance(value, str) or isinstance(value, dict) and "path" in value and not {"background", "layers",
                                                                                          "composite"} & set(value):
            return {"background": {"path": value} if isinstance(value, str) else value, "layers": [],
                    "composite": None}
        return value


def image_input(**kwargs: Any) -> gr.ImageEditor:
    """gr.ImageEditor(**kwargs) that takes a bare file through the API too (see EditorOrFile). The model is set
    on the instance: a subclass of a Gradio component would make Gradio write a .pyi stub beside this file."""
    editor = gr.ImageEditor(**kwargs)
    editor.data_model = EditorOrFile
    return editor


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
    uploaded file is an image without strokes. Either is "" when absent (no strokes: no mask). A file that is
    not an image, or is too large, is a UserError (checked from its header before anything is decoded)."""
    if not isinstance(value, dict) or "background" not in value and "layers" not in value:
        return uploaded_path(value, label), ""
    image = uploaded_path(value.get("background"), label)
    layers = value.get("layers") or []
    if not image or not isinstance(layers, list):
        return image, ""
    width, height = ii.image_size(image, label)
    painted = np.zeros((height, width), dtype=bool)
    for layer in layers:
        what = f"{label} (a painted layer)"
        path = uploaded_path(layer, what)
        if not path:
            continue
        with ii.open_checked(path, what) as im:
            alpha = im.convert("RGBA").getchannel("A")
        if alpha.size != (width, height):  # the editor's canvas is the background's size; be safe
            alpha = alpha.resize((width, height), Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        return image, ""
    return image, save_mask(painted)


def save_mask(mask: np.ndarray) -> str:
    """A boolean mask as a white-on-black PNG in the upload folder; its path.

    Named by its content, so Generate pressed again with the same strokes reuses the file; only the
    KEEP_MASKS newest are kept (a job has its own copy from the moment it is queued)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    folder = Path(get_upload_folder()) / MASKS
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask).tobytes()).hexdigest()[:32]
    path = folder / f"{digest}.png"
    if path.is_file():
        os.utime(path)  # the newest again: not pruned before its job is queued
    else:
        with atomic_path(path) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    prune_masks(folder, KEEP_MASKS)
    return str(path)


def prune_masks(folder: Path, keep: int) -> None:
    """Delete all but the keep newest painted masks in folder (files another process removes are skipped)."""
    found = []
    for f in folder.glob("*.png"):
        try:
            found.append((f.stat().st_mtime, f))
        except OSError:
            continue
    for _, f in sorted(found, reverse=True)[keep:]:
        f.unlink(missing_ok=True)


def combined_mask(uploaded: str, painted: str, size_of: str, label: str = "image") -> str:
    """One mask from an uploaded one and painted strokes (their union, at the image's size); "" for none.
    label names the image size_of in messages."""
    if not uploaded or not painted:
        return uploaded or painted
    width, height = ii.image_size(size_of, label)
    both = ii.mask_to_array(ii.load_mask(uploaded), width, height) | ii.mask_to_array(ii.load_mask(painted), width,
                                                                                     height)
    return save_mask(both)


__all__ = ["KEEP_MASKS", "MASKS", "EditorOrFile", "combined_mask", "editor_inputs", "image_input", "prune_masks",
           "save_mask", "uploaded_path"]
