"""Z-Image's own generation parameters (the common ones are in app/params.py) and where the page
shows them per architecture. No torch here: the CLI's option list and the job spec read this
without loading a model."""

from __future__ import annotations

from models.params import Param

DEFAULT_MODEL_TYPE = "z_image_base"  # when no model type is named
MODEL_ORDER = ("z_image_base", "z_image", "z_image_tiny")  # how the page lists them
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

# where the page shows a parameter when not where it is declared ("hidden": the model's default applies)
LAYOUT: dict[str, dict[str, str]] = {
    # Turbo is distilled for one shift and no CFG
    "z_image": {"negative_prompt": "hidden", "flow_shift": "advanced", "cfg_normalization": "hidden",
                "cfg_truncation": "hidden"},
}
