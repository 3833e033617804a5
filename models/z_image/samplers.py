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

- twinflow: UCGM's unified sampler (arXiv 2505.07447, "UCGM-S") as TwinFlow (inclusionAI) ships it for its
  1-4 step models, with its own schedule (`unified_sigmas`, no flow shift) and a target time per step
  given to the transformer (`unified_target`); one model evaluation per step. See `unified_step`.

Progress: callers report steps (one callback per completed step, the step's result latents), and
`model_evaluations` converts a step count into evaluations for an ETA: with Heun every step but
the last costs two evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

SAMPLERS = ("euler", "heun")  # the ODE samplers of any Z-Image model
TWINFLOW = "twinflow"  # the unified sampler of TwinFlow checkpoints (target-time aware)
ALL_SAMPLERS = (*SAMPLERS, TWINFLOW)

Predict = Callable[[torch.Tensor, int], torch.Tensor]


def check_sampler(name: str) -> str:
    if name not in ALL_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(ALL_SAMPLERS)}")
    return name


def model_evaluations(sampler: str, steps: int, through_step: int | None = None) -> int:
    """Model evaluations (per CFG branch) of a run of `steps` steps, or of its steps 0..through_step.

    euler, twinflow: one per step. heun: two per step, except the last step (to sigma 0, plain Euler): 2N - 1.
    """
    check_sampler(sampler)
    done = steps if through_step is None else min(through_step + 1, steps)
    if sampler != "heun" or done <= 0:
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
    if sampler == TWINFLOW:
        raise ValueError("the twinflow sampler runs on its own schedule and target times: use unified_step")
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    pred = predict(x, i)
    x_next = euler_update(x, pred, sigma, sigma_next)
    if sampler == "euler" or i + 2 >= len(sigmas):  # euler, or Heun's last step (to sigma 0)
        return x_next
    if before_eval is not None:
        before_eval()
    pred_next = predict(x_next, i + 1)
    return x + (sigma_next - sigma) * (-0.5 * (pred + pred_next))


# ---------------------------------------------------------------- UCGM's unified sampler (TwinFlow)
#
# Facts from the TwinFlow release (README's sampler configs, diffusers_patch/z_image) and Wan2GP
# (models/z_image/unified_sampler.py, pipeline_z_image.py), in this module's sigma convention (1 = noise):
# - linear transport x_s = (1 - s) x + s z; the model's velocity F = dx_s/ds = z - x is the negated transformer
#   output (as everywhere here), so x_hat = x_s - s F (the clean estimate) and z_hat = x_s + (1 - s) F (the
#   noise estimate);
# - step s -> s': x' = (1 - s') x_hat + s' (sqrt(1 - r) z_hat + sqrt(r) n), n fresh Gaussian noise and r the
#   stochasticity ratio (1 = re-noise x_hat with new noise, 0 = deterministic, the DDIM-like update);
#   the last step (s' = 0) gives x_hat itself;
# - extrapolation e > 0 (default 0): from the third step on, x_hat += e (x_hat - previous x_hat), same for
#   z_hat (the previous values taken before their own extrapolation);
# - schedule: N + 1 points s_k = 1 - K(linspace(g0, 1 - g1, N)) then 0, K the Kumaraswamy transform
#   (1 - (1 - u^a)^b)^c (a = b = c = 1: identity); with g1 = 0 the linspace has N + 1 points and its last
#   (1.0) is dropped. Presets by step count: N <= 2 gaps (0.001, 0.6), style "few"; N <= 4 (0.001, 0.5),
#   "any"; more: (0.001, 0), "mul". r = 1, e = 0 in all three;
# - target time per step (sigma convention): "few" 0, "any" s', "mul" s (the gap is zero: the plain model);
# - the transformer's times (1 = clean) come from sigma by sign(s) (1 - |s|): s 0 -> 0, so the "few"
#   target reaches the transformer as time 0, not 1 (TwinFlow's own mapping, kept).
# Not carried over: second-order steps (sampling_order 2) and the "SDE" stochasticity, which neither the
# release's configs nor Wan2GP use.

UNIFIED_STYLES = ("few", "any", "mul")


@dataclass(frozen=True)
class UnifiedConfig:
    """The unified sampler's settings; `unified_config(steps)` gives TwinFlow's preset for a step count."""

    style: str = "few"  # how the target time is chosen: "few" (0), "any" (next sigma), "mul" (own sigma)
    gap: tuple[float, float] = (0.001, 0.6)  # rfba_gap_steps: the schedule spans 1 - g0 down to g1, then 0
    stochast_ratio: float = 1.0  # share of fresh noise in the re-noising (0 deterministic, 1 all fresh)
    extrapol_ratio: float = 0.0
    time_dist_ctrl: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Kumaraswamy a, b, c

    def __post_init__(self):
        if self.style not in UNIFIED_STYLES:
            raise ValueError(f"unknown unified sampling style {self.style!r}; choose from {', '.join(UNIFIED_STYLES)}")
        if not 0.0 <= self.stochast_ratio <= 1.0:
            raise ValueError(f"stochast_ratio must be in [0, 1] (got {self.stochast_ratio})")


def unified_config(steps: int, **overrides) -> UnifiedConfig:
    """TwinFlow's preset for `steps` (as its README and Wan2GP pick it), with overrides by field name."""
    if steps <= 2:
        base = UnifiedConfig("few", (0.001, 0.6))
    elif steps <= 4:
        base = UnifiedConfig("any", (0.001, 0.5))
    else:
        base = UnifiedConfig("mul", (0.001, 0.0))
    return replace(base, **overrides) if overrides else base


def kumaraswamy(u: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    return (1 - (1 - u**a) ** b) ** c


def unified_sigmas(steps: int, config: UnifiedConfig | None = None) -> torch.Tensor:
    """The unified sampler's steps + 1 sigmas (float32, CPU): 1 - g0 down to about g1, then a terminal 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    cfg = config or unified_config(steps)
    g0, g1 = cfg.gap
    n = steps + 1 if g1 == 0 else steps
    u = torch.linspace(g0, 1.0 - g1, n, dtype=torch.float64, device="cpu").float()  # Wan2GP: float64 -> latents'
    if g1 == 0:
        u = u[:-1]
    u = kumaraswamy(u, *cfg.time_dist_ctrl)
    return torch.cat([1 - u, torch.zeros(1, device="cpu")])


def unified_target(style: str, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The target time of a step from sigma to sigma_next, as a sigma (0 dim tensor)."""
    if style == "few":
        return torch.zeros_like(sigma)
    if style == "mul":
        return sigma
    if style == "any":
        return sigma_next
    raise ValueError(f"unknown unified sampling style {style!r}")


def ucgm_time(s: torch.Tensor) -> torch.Tensor:
    """A sigma (1 = noise) as the transformer's time (1 = clean): sign(s) (1 - |s|), TwinFlow's mapping
    (0 stays 0)."""
    return s.sign() * (1 - s.abs())


@dataclass
class UnifiedState:
    """What the unified sampler carries between steps: the previous raw estimates (extrapolation)."""

    prev_x_hat: torch.Tensor | None = None
    prev_z_hat: torch.Tensor | None = None
    step: int = 0
    x_hat: torch.Tensor | None = None  # the last step's clean estimate


def unified_step(x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 config: UnifiedConfig, noise: Callable[[], torch.Tensor] | None = None,
                 state: UnifiedState | None = None) -> torch.Tensor:
    """Latents at sigma_next from x at sigma, pred being the transformer output (CFG applied, float32) at
    sigma with the step's target time. noise() returns fresh N(0, 1) noise of x's shape, called only when
    the stochasticity ratio is > 0 and sigma_next > 0. state: carried between the steps of one run
    (extrapolation; it also keeps the step's clean estimate x_hat, for previews).
    The step to sigma 0 returns that clean estimate (float32 throughout; Wan2GP mixes in float64)."""
    state = state if state is not None else UnifiedState()
    velocity = -pred
    x_hat = raw_x = x - sigma * velocity
    z_hat = x + (1 - sigma) * velocity
    if config.extrapol_ratio > 0:
        raw_z = z_hat
        if state.step >= 2:
            x_hat = x_hat + config.extrapol_ratio * (x_hat - state.prev_x_hat)
            z_hat = z_hat + config.extrapol_ratio * (z_hat - state.prev_z_hat)
        state.prev_x_hat, state.prev_z_hat = raw_x, raw_z
    state.step += 1
    state.x_hat = raw_x
    if float(sigma_next) == 0.0:
        return raw_x  # the result is the last clean estimate, before any extrapolation (as in Wan2GP)
    r = float(config.stochast_ratio)
    if r > 0:
        if noise is None:
            raise ValueError("the unified sampler with stochast_ratio > 0 needs a noise source")
        mixed = z_hat * math.sqrt(1 - r) + noise() * math.sqrt(r)
    else:
        mixed = z_hat
    return (1 - sigma_next) * x_hat + sigma_next * mixed
