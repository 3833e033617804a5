"""Generation settings stored in image files (PNG text chunk `wgp_zimage`, JSON).

Schema 1: {"schema": 1, "app": "wgp-zimage", "model_type", "prompt", "negative_prompt", "width",
"height", "num_inference_steps", "guidance_scale", "flow_shift", "cfg_normalization",
"cfg_truncation", "seed" (this image's own seed: re-running it alone with num_images 1 gives
this image), "batch_seed", "image_index", "num_images", "loras", "dtype", "created"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SCHEMA = 1
PNG_KEY = "wgp_zimage"


def png_info(settings: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps({"schema": SCHEMA, "app": "wgp-zimage", **settings}, ensure_ascii=False))
    return info


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings stored in an image by this app, or None when it holds none."""
    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
