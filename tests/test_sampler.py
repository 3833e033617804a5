"""Sampler pieces against diffusers' scheduler and hand-computed cases."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from models.z_image.pipeline import apply_cfg, cfg_active_steps, flow_sigmas, initial_noise


@pytest.mark.parametrize("steps", [1, 8, 30])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_sigmas_match_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    ours = flow_sigmas(steps, shift)
    assert len(ours) == steps + 1 and ours[-1] == 0  # N steps = N evaluations, terminal 0
    assert torch.equal(ours, sched.sigmas)


def test_shift_formula_by_hand():
    s = flow_sigmas(2, 6.0)  # sigmas 1.0, 0.5 -> 1.0, 6*0.5/(1+5*0.5) = 3/3.5
    assert s.tolist() == pytest.approx([1.0, 3 / 3.5, 0.0], abs=1e-7)


def test_cfg_truncation_steps():
    s = flow_sigmas(4, 1.0)  # sigmas 1, .75, .5, .25 -> 1 - sigma = 0, .25, .5, .75
    assert cfg_active_steps(s, 4.0, 1.0) == [True] * 4
    assert cfg_active_steps(s, 4.0, 0.5) == [True, True, True, False]
    assert cfg_active_steps(s, 4.0, 0.3) == [True, True, False, False]
    assert cfg_active_steps(s, 4.0, 1.5) == [True] * 4  # > 1 disables the feature
    assert cfg_active_steps(s, 0.0, 1.0) == [False] * 4


def test_cfg_normalization_per_image_float64():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    neg = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    neg[1] = pos[1] * 0.999  # image 1: small guidance effect, below the cap
    for k in (0.0, 1.0, 1.3):
        got = apply_cfg(pos, neg, 4.0, k)
        for i in range(3):  # diffusers' per-image loop, by hand
            pred = pos[i] + 4.0 * (pos[i] - neg[i])
            if k > 0 and pred.norm() > k * pos[i].norm():
                pred = pred * (k * pos[i].norm() / pred.norm())
            assert torch.allclose(got[i], pred, atol=1e-12)
    capped = apply_cfg(pos, neg, 4.0, 1.0)
    assert not torch.allclose(capped[0], pos[0] + 4.0 * (pos[0] - neg[0]))  # the cap did act


def test_noise_per_image_seed():
    n = initial_noise((1, 16, 4, 4), [7, 8])
    assert torch.equal(n[0:1], torch.randn((1, 16, 4, 4), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(n[1:2], torch.randn((1, 16, 4, 4), generator=torch.Generator().manual_seed(8)))
