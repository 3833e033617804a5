"""Seed variety: seeded noise on the caption embedding in the first steps (models.z_image.variety)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.z_image import variety as var
from models.z_image.handler import HANDLER


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)[0]


KW = dict(prompt="a lighthouse at dusk", height=32, width=32, guidance_scale=0.0, flow_shift=3.0,
          num_inference_steps=4, seed=100)


class CapSpy:
    """Records the positive captions of every transformer call."""

    def __init__(self, pipe):
        self.pipe, self.orig, self.caps = pipe, pipe.transformer.forward, []

    def __enter__(self):
        def forward(x, t, caps, **kw):
            self.caps.append([c.clone() for c in caps])
            return self.orig(x, t, caps, **kw)

        self.pipe.transformer.forward = forward
        return self

    def __exit__(self, *exc):
        del self.pipe.transformer.forward


@pytest.mark.parametrize("extra", [dict(), dict(guidance_scale=3.0, negative_prompt="fog"), dict(sampler="heun"),
                                   dict(sampler="twinflow", num_inference_steps=2), dict(nag_scale=3.0,
                                                                                          negative_prompt="fog")])
def test_zero_is_bit_identical(pipe, extra):
    kw = {**KW, **extra, "output_type": "latent"}
    plain = pipe(**kw).images
    assert torch.equal(pipe(variety=0.0, **kw).images, plain)
    assert torch.equal(pipe(variety=0.0, variety_until=1.0, **kw).images, plain)
    assert torch.equal(pipe(variety=0.8, variety_until=0.0, **kw).images, plain)  # no step perturbed
    assert not torch.equal(pipe(variety=0.8, **kw).images, plain)


def test_deterministic_and_per_image_seed(pipe):
    kw = {**KW, "output_type": "latent", "variety": 0.7}
    a = pipe(**kw).images
    assert torch.equal(pipe(**kw).images, a)
    both = pipe(num_images_per_prompt=2, **kw).images
    alone = pipe(**{**kw, "seed": KW["seed"] + 1}).images
    torch.testing.assert_close(both[:1], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_the_noise_its_scale_its_stream_and_its_steps(pipe):
    """Image i's caption during the first ceil(F N) steps is emb + S std(emb) n, n the first draw of a CPU generator
    seeded with variety_seed(seed + i) (not seed + i: the latent noise's own stream stays as it is); the plain
    caption after. The latent noise is unchanged."""
    s, f = 0.6, 0.3
    with CapSpy(pipe) as spy:
        pipe(variety=s, variety_until=f, num_images_per_prompt=2, output_type="latent", **KW)
    pos = pipe.encode_prompt(KW["prompt"])
    steps = KW["num_inference_steps"]
    assert var.variety_steps(steps, f) == math.ceil(f * steps) == 2
    for i in range(2):
        gen = torch.Generator().manual_seed((KW["seed"] + i + var.SEED_OFFSET) % 2**64)
        want = pos.double() + s * pos.double().std() * torch.randn(pos.shape, generator=gen).double()
        for k in range(steps):
            got = spy.caps[k][i]
            if k < 2:
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, pos)
    # the noise is not the latent noise's stream
    lat_noise = torch.randn(pos.shape, generator=torch.Generator().manual_seed(KW["seed"]))
    assert not torch.allclose(spy.caps[0][0] - pos, s * pos.std() * lat_noise, atol=1e-3)
    assert [var.variety_steps(8, 0.3), var.variety_steps(2, 0.3), var.variety_steps(10, 0.3),
            var.variety_steps(4, 1.0)] == [3, 1, 3, 4]


def test_refuses_bad_values(pipe):
    for bad in (dict(variety=-0.1), dict(variety=float("nan")), dict(variety=0.5, variety_until=1.5)):
        with pytest.raises(ValueError, match="variety"):
            pipe(**{**KW, **bad})


def spread(images) -> float:
    """Mean over pixels of the variance across images (uint8 values)."""
    return float(np.stack([np.asarray(im).astype(np.float64) for im in images]).var(axis=0).mean())


def test_raises_pixel_variance_across_seeds(pipe):
    """Images that share their latent noise (Turbo's case: its images barely follow the seed) differ only
    through variety: 8 seeds' variety streams on one latent noise, pixel variance across the 8 images
    (measured, 32x32, 4 steps: off 0, S 1 until 0.3: 0.43, S 2 until 1: 5.3).

    With each seed's own latent noise the tiny random model is no test bed: its images follow that noise almost
    entirely (8 seeds: variance 566; a wholly different prompt moves an image by about 5), so variety's share
    is lost in the sampling error (off 566.2, S 1: 563.3); each image still changes."""
    seeds = range(100, 108)
    lat = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(100))
    kw = {**KW, "seed": None, "latents": lat}
    off = [pipe(**kw, generator=torch.Generator().manual_seed(s)).images[0] for s in seeds[:2]]
    on = [pipe(**kw, generator=torch.Generator().manual_seed(s), variety=1.0).images[0] for s in seeds]
    strong = [pipe(**kw, generator=torch.Generator().manual_seed(s), variety=2.0, variety_until=1.0).images[0]
              for s in seeds]
    assert spread(off) == 0.0
    assert spread(strong) > spread(on) > 0.1
    # seeded runs: every image moves
    for s in seeds[:2]:
        a, b = (np.asarray(pipe(**{**KW, "seed": s}, variety=v).images[0]) for v in (0.0, 1.0))
        assert (a != b).any()
    print(f"pixel variance across 8 seeds on one latent noise: off 0, variety 1 {spread(on):.3f}, "
          f"variety 2 until 1 {spread(strong):.3f}")
