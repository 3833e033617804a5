"""End to end: our CLI against diffusers' ZImagePipeline on the same tiny weights (fp32, CPU)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import ZImagePipeline as DiffusersPipeline
from PIL import Image

from models.z_image.handler import HANDLER
from tests.conftest import DiffusersLatents, assert_latents_match, assert_pixels_match, run_cli

CASES = {
    # Base-like: CFG, negative prompt, shift 6
    "base": dict(prompt="a red fox in the snow", negative_prompt="blurry, low quality", guidance=4.0, shift=6.0,
                 steps=6, norm=0.0, trunc=1.0),
    # Turbo-like: no CFG, shift 3
    "turbo": dict(prompt="a lighthouse at dusk", negative_prompt="", guidance=0.0, shift=3.0, steps=4,
                  norm=0.0, trunc=1.0),
    # CFG normalization and truncation both acting
    "cfg_extras": dict(prompt="a bowl of ramen", negative_prompt="text", guidance=5.0, shift=6.0, steps=6,
                       norm=1.0, trunc=0.5),
}


def diffusers_image(tiny_dir, case, seed, width=128, height=96, latents: DiffusersLatents | None = None):
    pipe = DiffusersPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=case["shift"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=height, width=width,
               num_inference_steps=case["steps"], guidance_scale=case["guidance"],
               cfg_normalization=case["norm"], cfg_truncation=case["trunc"],
               generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=latents)
    return np.asarray(out.images[0]).astype(np.int16)


def cli_image(tiny_dir, case, seed, out, width=128, height=96):
    r = run_cli("generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--prompt", case["prompt"],
                "--negative-prompt", case["negative_prompt"], "--width", str(width), "--height", str(height),
                "--steps", str(case["steps"]), "--guidance", str(case["guidance"]), "--flow-shift", str(case["shift"]),
                "--cfg-normalization", str(case["norm"]), "--cfg-truncation", str(case["trunc"]),
                "--seed", str(seed), "--dtype", "fp32", "--device", "cpu", "--output", str(out))
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(out)).astype(np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_cli_matches_diffusers(tiny_dir, pipe, tmp_path, name):
    """The CLI's image and our pipeline's final latents (the sampling, before the VAE and the 8-bit rounding
    that a pixel bound of a level or two would hide) against diffusers'."""
    case = CASES[name]
    ours = cli_image(tiny_dir, case, 1234, tmp_path / "ours.png")
    ref_latents = DiffusersLatents()
    ref = diffusers_image(tiny_dir, case, 1234, latents=ref_latents)
    assert ours.shape == ref.shape == (96, 128, 3)
    assert ours.std() > 10, "degenerate image: the comparison would prove nothing"
    assert_pixels_match(ours, ref)
    latents = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=96, width=128,
                   num_inference_steps=case["steps"], guidance_scale=case["guidance"], flow_shift=case["shift"],
                   cfg_normalization=case["norm"], cfg_truncation=case["trunc"], seed=1234,
                   output_type="latent").images
    assert_latents_match(latents, ref_latents.latents)


def test_cfg_extras_change_the_image(tiny_dir):
    """The extras case only tests something if normalization and truncation alter the result."""
    plain = dict(CASES["cfg_extras"], norm=0.0, trunc=1.0)
    a = diffusers_image(tiny_dir, plain, 1234)
    b = diffusers_image(tiny_dir, CASES["cfg_extras"], 1234)
    assert np.abs(a - b).max() > 10
