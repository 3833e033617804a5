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


def _bare(tiny_comfy_file, tmp_path, name="bare.safetensors", edit=None):
    """The ComfyUI single file without its config metadata (as ComfyUI files come)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_comfy_file)
    if edit:
        edit(sd)
    bare = tmp_path / name
    save_file(sd, bare)
    return bare


def test_single_file_without_config_takes_its_architecture_from_its_shapes(tiny_dir, tiny_dbm_dir, tiny_comfy_file,
                                                                            tmp_path, reference):
    from models.z_image.checkpoints import transformer_config
    from models.z_image.transformer import ZImageConfig

    bare = _bare(tiny_comfy_file, tmp_path)
    tiny = ZImageConfig.from_dict(json.loads((tiny_dir / "transformer" / "config.json").read_text()))
    assert transformer_config([bare], None) == tiny
    # beside the diffusers folder (its config fits) and beside the DeepBeepMeep set (no config at all)
    assert np.array_equal(render(tiny_dir, "z_image_tiny", transformer=bare)[0], reference)
    assert np.array_equal(render(tiny_dbm_dir, "z_image_base", transformer=bare)[0], reference)
    (tmp_path / "bare_config.json").write_text(json.dumps({"dim": 64, "n_heads": 2, "axes_dims": [8, 12, 12]}))
    assert transformer_config([bare], None).n_layers == 30  # a sibling config still wins over the shapes


def test_folder_config_serves_a_file_that_fits_it(tiny_dir, tiny_comfy_file, tmp_path):
    from models.z_image.checkpoints import transformer_config

    folder_cfg = tmp_path / "config.json"
    cfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    folder_cfg.write_text(json.dumps({**cfg, "rope_theta": 100.0}))  # something the shapes cannot tell
    sub = tmp_path / "f"
    sub.mkdir()
    bare = _bare(tiny_comfy_file, sub)
    assert transformer_config([bare], None, folder_cfg).rope_theta == 100.0
    folder_cfg.write_text(json.dumps({**cfg, "n_layers": 3}))  # does not fit the file: its shapes rule
    assert transformer_config([bare], None, folder_cfg).n_layers == 2


def test_six_b_shapes_give_the_six_b_config():
    """diffusers' own 6B transformer (its default config), on the meta device: its tensor shapes read back
    as our 6B config."""
    from diffusers import ZImageTransformer2DModel

    from models.z_image.checkpoints import infer_transformer_config
    from models.z_image.transformer import ZImageConfig

    with torch.device("meta"):
        ref = ZImageTransformer2DModel()
    cfg = ref.config
    assert (cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads, cfg.cap_feat_dim, list(cfg.axes_dims)) == \
        (3840, 30, 2, 30, 2560, [32, 48, 48])
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert infer_transformer_config(shapes, "6b") == ZImageConfig()


def test_a_tensor_that_fits_no_architecture_is_named(tiny_dir, tiny_comfy_file, tmp_path):
    from models.z_image.checkpoints import transformer_config

    def odd_norm(sd):
        sd["model.diffusion_model.layers.0.attention.q_norm.weight"] = torch.ones(24)

    bare = _bare(tiny_comfy_file, tmp_path, edit=odd_norm)
    with pytest.raises(UserError, match=r"layers\.0\.attention\.norm_q\.weight"):
        transformer_config([bare], None)

    def no_embedder(sd):
        del sd["model.diffusion_model.x_embedder.weight"]

    bare = _bare(tiny_comfy_file, tmp_path, "b2.safetensors", edit=no_embedder)
    with pytest.raises(UserError, match="all_x_embedder"):
        transformer_config([bare], None)

    def odd_layer(sd):  # one main layer wider than the rest: the load names it
        sd["model.diffusion_model.layers.1.feed_forward.w1.weight"] = torch.zeros(160, 64)

    bare = _bare(tiny_comfy_file, tmp_path, "b3.safetensors", edit=odd_layer)
    with pytest.raises(UserError, match=r"layers\.1\.feed_forward\.w1\.weight"):
        HANDLER.load_model(model_filename=bare, base_model_type="z_image_tiny", dtype=torch.float32,
                           model_dir=tiny_dir, device="cpu")
