"""Pipeline behaviour beyond parity: no wasted encodes, callbacks, interrupt, VAE options."""

import numpy as np
import pytest
import torch

from models.errors import GenerationInterrupted
from models.z_image.handler import HANDLER


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


KW = dict(height=64, width=64, num_inference_steps=3, flow_shift=3.0)


def test_turbo_without_guidance_encodes_no_negative(pipe):
    pipe.text_encoder.cache.clear()
    before = pipe.text_encoder.encode_calls
    pipe(prompt="turbo prompt", negative_prompt="never encoded", guidance_scale=0.0, seed=1, **KW)
    assert pipe.text_encoder.encode_calls == before + 1
    pipe(prompt="turbo prompt", negative_prompt="now encoded", guidance_scale=2.0, seed=1, **KW)
    assert pipe.text_encoder.encode_calls == before + 2  # the positive came from the cache


def test_callback_per_step_and_interrupt(pipe):
    seen = []
    pipe(prompt="x", guidance_scale=1.0, seed=1, callback=lambda i, n, lat: seen.append((i, n, lat.dtype)), **KW)
    assert seen == [(0, 3, torch.float32), (1, 3, torch.float32), (2, 3, torch.float32)]
    calls = []

    def stop_after_two(i, n, lat):
        calls.append(i)

    with pytest.raises(GenerationInterrupted):
        pipe(prompt="x", seed=1, callback=stop_after_two, interrupt=lambda: len(calls) >= 2, **KW)
    assert calls == [0, 1]  # stopped between steps, before the third evaluation


def test_same_padded_length_batches_like_separate_runs(pipe):
    """Prompt and negative that pad to one length share a forward call; result equals separate calls."""
    kw = dict(KW, guidance_scale=3.0, seed=5, output_type="latent")
    together = pipe(prompt="abc", negative_prompt="abcd", **kw).images
    orig = pipe._predict

    def one_by_one(x, t, groups):
        return [orig(x, t, [g])[0] for g in groups]

    pipe._predict = one_by_one
    try:
        apart = pipe(prompt="abc", negative_prompt="abcd", **kw).images
    finally:
        pipe._predict = orig
    assert torch.allclose(together, apart, atol=1e-5)


def test_latents_and_generator_inputs(pipe):
    lat = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    a = pipe(prompt="x", guidance_scale=0.0, latents=lat, output_type="latent", **KW).images
    b = pipe(prompt="x", guidance_scale=0.0, seed=9, output_type="latent", **KW).images
    c = pipe(prompt="x", guidance_scale=0.0, generator=torch.Generator().manual_seed(9), output_type="latent",
             **KW).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_flow_shift_changes_the_result(pipe):
    a = pipe(prompt="x", guidance_scale=0.0, seed=2, output_type="latent", **dict(KW, flow_shift=1.0)).images
    b = pipe(prompt="x", guidance_scale=0.0, seed=2, output_type="latent", **dict(KW, flow_shift=6.0)).images
    assert (a - b).abs().max() > 1e-2


def test_bad_size_refused(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(prompt="x", height=72, width=64, num_inference_steps=1)


def test_vae_bf16_and_tiled_decode(tiny_dir, pipe, monkeypatch):
    lat = pipe(prompt="x", guidance_scale=0.0, seed=3, output_type="latent",
               **dict(KW, height=256, width=256)).images
    tiles = []
    tiled_decode = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda z, **k: tiles.append(z.shape) or tiled_decode(z, **k))
    full = np.asarray(pipe.decode(lat)[0]).astype(int)
    assert tiles == []
    saved = pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 128, 16  # force several tiles
    try:
        tiled = np.asarray(pipe.decode(lat, tiled=True)[0]).astype(int)
    finally:
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = saved
    assert tiles == [lat.shape]  # the VAE's tiled decode ran
    assert tiled.shape == full.shape == (256, 256, 3)
    assert not np.array_equal(tiled, full)  # it did tile: the tiny VAE's group norms see per-tile statistics
    assert np.abs(tiled - full).mean() < 20  # blended tiles approximate the full decode
    assert not pipe.vae.use_tiling
    bf16 = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, VAE_dtype=torch.bfloat16,
                              model_dir=tiny_dir)[0]
    assert bf16.vae.dtype == torch.bfloat16
    half = np.asarray(bf16.decode(lat)[0]).astype(int)
    assert np.abs(half - full).mean() < 4


def test_bf16_model_keeps_float32_latents(tiny_dir):
    """With a bf16 transformer the latents still accumulate in float32 from step to step. Reference: an Euler
    loop written here (the model's input cast to bf16, its output back to float32, each update in float32)."""
    bf16 = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.bfloat16, VAE_dtype=torch.float32,
                              model_dir=tiny_dir)[0]
    assert bf16.transformer.dtype == torch.bfloat16
    steps, shift, prompt = 8, 3.0, "a lighthouse at dusk"
    noise = torch.randn(1, 16, 12, 16, generator=torch.Generator().manual_seed(4))
    seen = []
    got = bf16(prompt=prompt, guidance_scale=0.0, latents=noise, height=96, width=128, num_inference_steps=steps,
               flow_shift=shift, output_type="latent", callback=lambda i, n, lat: seen.append(lat.dtype)).images
    assert seen == [torch.float32] * steps and got.dtype == torch.float32
    base = torch.linspace(1.0, 1.0 / steps, steps)
    sigmas = torch.cat([shift * base / (1 + (shift - 1) * base), torch.zeros(1)])  # the shifted flow schedule
    cap = bf16.encode_prompt(prompt)
    x = noise.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = bf16.transformer(x.to(torch.bfloat16), ((1000 - s * 1000) / 1000).reshape(1), [cap]).float()
            x = x - (s_next - s) * v  # the transformer's output is the negated velocity
    # measured: 0 (the same arithmetic); latents rounded to bf16 after each step end 3.6e-2 away
    assert (got - x).abs().max() <= 1e-4, (got - x).abs().max()
