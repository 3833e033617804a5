"""ODE samplers on the shifted flow-matching sigmas (`pipeline.flow_sigmas`: N values, then a terminal 0).

A sampler advances the float32 latents from sigma index i to i + 1 with a `predict(x, k)` the
pipeline supplies: the (CFG-combined, float32) transformer output at sigma index k. The pipeline
negates that output before the update, as diffusers' ZImagePipeline does, so the velocity
dx/dsigma is `-predict(x, k)`.

- euler: x + (sigma[i+1] - sigma[i]) * -predict(x, i). N steps = N model evaluations. The
  pipeline's Euler arithmetic is exactly diffusers' FlowMatchEulerDiscreteScheduler.step.
- heun: Heun's method (diffusers' FlowMatchHeunDiscreteScheduler.step without churn): an Euler
  predictor x' to sigma[i+1], then the trapezoid corrector
  x + (sigma[i+1] - sigma[i]) * (d(x, i) + d(x', i + 1)) / 2. The last step, to sigma 0, stays
  plain Euler (the velocity is not evaluated at sigma 0), so N steps = 2N - 1 model evaluations.
  The corrector's evaluation is one at sigma[i+1]: its CFG switch (cfg_truncation) is that of
  sigma index i + 1, i.e. of the next step.

Progress: callers report steps (one callback per completed step, the step's result latents), and
`model_evaluations` converts a step count into evaluations for an ETA: with Heun every step but
the last costs two evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAMPLERS = ("euler", "heun")

Predict = Callable[[torch.Tensor, int], torch.Tensor]


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return name


def model_evaluations(sampler: str, steps: int, through_step: int | None = None) -> int:
    """Model evaluations (per CFG branch) of a run of `steps` steps, or of its steps 0..through_step.

    euler: one per step. heun: two per step, except the last step (to sigma 0, plain Euler): 2N - 1.
    """
    check_sampler(sampler)
    done = steps if through_step is None else min(through_step + 1, steps)
    if sampler == "euler" or done <= 0:
        return max(done, 0)
    return 2 * done - (1 if done == steps else 0)


def euler_update(x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step from sigma to sigma_next given the transformer output pred (negated: the velocity)."""
    return x + (sigma_next - sigma) * (-pred)


def sample_step(sampler: str, x: torch.Tensor, i: int, sigmas: torch.Tensor, predict: Predict,
                before_eval: Callable[[], None] | None = None) -> torch.Tensor:
    """Latents at sigma index i + 1 from x at index i. sigmas: the schedule (terminal 0 last), on x's device.

    before_eval runs before each model evaluation after the step's first one (e.g. an interrupt check).
    """
    check_sampler(sampler)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    pred = predict(x, i)
    x_next = euler_update(x, pred, sigma, sigma_next)
    if sampler == "euler" or i + 2 >= len(sigmas):  # euler, or Heun's last step (to sigma 0)
        return x_next
    if before_eval is not None:
        before_eval()
    pred_next = predict(x_next, i + 1)
    return x + (sigma_next - sigma) * (-0.5 * (pred + pred_next))
