"""Seed variety: seeded noise on the caption embedding during the first steps (Turbo, TwinFlow).

Z-Image Turbo's images change little with the seed (Tongyi-MAI/Z-Image issues #16, #27): the
composition is settled by the first steps, and the distilled model follows the caption there much
more than the initial noise. The remedy InvokeAI ships ("Seed Variance Enhancer", from the ComfyUI
SeedVarianceEnhancer node) perturbs the caption embedding with seeded noise; ours:

- strength S (`variety`, 0 = off, the default): the positive caption embedding (L, 2560) of image i
  becomes `emb + S * std(emb) * n_i`, n_i standard Gaussian noise of the embedding's shape and std(emb)
  the standard deviation of all the embedding's values (one number per caption, float32), so S is
  relative to the embedding's own spread whatever the text encoder's scale: S 1 adds noise as large as
  the embedding itself. Useful values are about 0.2-1; InvokeAI's strength (uniform noise, also scaled
  by the embedding's std) runs 0-2.
- until F (`variety_until`, default 0.3): the perturbed embedding serves the first ceil(F * N) of the N
  steps that run (8 Turbo steps: 3; 2 TwinFlow steps: 1), the plain one the rest, so the details are
  drawn to the real caption. F 1 perturbs every step.
- the noise of image i comes from a CPU generator seeded with `variety_seed(seed + i)`: its own stream,
  not the latent noise's (seed + i itself), so the latent noise is unchanged, and an image re-renders
  from its recorded seed and settings alone. Without a seed (a generator or latents given) the
  per-image seeds are drawn from the generator (or torch's global RNG).
- only the positive caption is perturbed (a CFG or NAG negative stays as it is); S 0 runs the plain
  pipeline, bit for bit.
"""

from __future__ import annotations

import math

import torch

DEFAULT_UNTIL = 0.3
# added to an image's seed for its variety stream (mod 2**64): any fixed odd constant far from small seeds
SEED_OFFSET = 0x9E3779B97F4A7C15


def check_variety(strength: float, until: float) -> bool:
    """Whether seed variety is on; refuses values out of range."""
    if not math.isfinite(float(strength)) or strength < 0:
        raise ValueError(f"variety must be 0 (off) or more (got {strength})")
    if not 0.0 <= float(until) <= 1.0:
        raise ValueError(f"variety_until must be a fraction of the steps, 0 to 1 (got {until})")
    return strength > 0 and until > 0


def variety_seed(seed: int) -> int:
    """The seed of an image's variety noise stream, from the image's own seed."""
    return (int(seed) + SEED_OFFSET) % 2**64


def variety_steps(steps: int, until: float) -> int:
    """How many of the first `steps` steps see the perturbed caption: ceil(until * steps)."""
    return min(steps, math.ceil(round(until * steps, 9)))


def perturbed_caption(emb: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """emb + strength * std(emb) * n, n drawn on the CPU from a generator seeded with `seed` (float32
    arithmetic, the result in emb's dtype and device)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(tuple(emb.shape), generator=gen, device="cpu", dtype=torch.float32).to(emb.device)
    e = emb.float()
    return (e + float(strength) * e.std() * noise).to(emb.dtype)


def image_seeds(n: int, seeds: list[int] | None, generator: torch.Generator | None) -> list[int]:
    """The variety stream seed of each of n images: from their seeds, else drawn from generator (or the
    global RNG)."""
    if seeds is not None:
        return [variety_seed(s) for s in seeds]
    drawn = torch.randint(0, 2**62, (n,), generator=generator, device="cpu")
    return [variety_seed(int(s)) for s in drawn]
