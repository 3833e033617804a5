"""Every weight layout loads into the same model and renders the same image."""

import json

import numpy as np
import pytest
import torch

from models.errors import UserError
from models.z_image.handler import HANDLER

KW = dict(prompt="a red fox", negative_prompt="blurry", height=64, width=96, num_inference_steps=3,
          guidance_scale=4.0, flow_shift=6.0, seed=11)


def render(model_dir, arch="z_image_base", transformer=None):
    pipe, parts = HANDLER.load_model(model_filename=transformer, base_model_type=arch, dtype=torch.float32,
                                     VAE_dtype=torch.float32, model_dir=model_dir, device="cpu")
    assert set(parts) == {"transformer", "text_encoder", "vae"}
    return np.asarray(pipe(**KW).images[0]), pipe


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return render(tiny_dir, "z_image_tiny")[0]


def test_diffusers_sharded(tiny_sharded_dir, reference):
    assert np.array_equal(render(tiny_sharded_dir, "z_image_tiny")[0], reference)


def test_deepbeepmeep_file_set(tiny_dbm_dir, reference):
    image, pipe = render(tiny_dbm_dir, "z_image_base")
    assert np.array_equal(image, reference)
    assert pipe.default_shift == 3.0  # read from ZImageTurbo_scheduler_config.json


def test_comfy_single_file_beside_diffusers(tiny_dir, tiny_comfy_file, reference):
    assert np.array_equal(render(tiny_dir, "z_image_tiny", transformer=tiny_comfy_file)[0], reference)


def test_comfy_single_file_beside_deepbeepmeep(tiny_dbm_dir, tiny_comfy_file, reference):
    assert np.array_equal(render(tiny_dbm_dir, "z_image_base", transformer=tiny_comfy_file)[0], reference)


def test_turbo_name_in_deepbeepmeep_set_is_required(tiny_dbm_dir):
    with pytest.raises(UserError, match="ZImageTurbo_bf16.safetensors"):
        render(tiny_dbm_dir, "z_image")


def test_single_file_without_config_defaults_to_6b(tiny_comfy_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from models.z_image.checkpoints import transformer_config

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(tiny_comfy_file), bare)
    cfg = transformer_config([bare], None)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.cap_feat_dim) == (3840, 30, 30, 2560)
    (tmp_path / "bare_config.json").write_text(json.dumps({"dim": 64, "n_heads": 2, "axes_dims": [8, 12, 12]}))
    assert transformer_config([bare], None).dim == 64
