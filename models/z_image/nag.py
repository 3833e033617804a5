"""NAG, Normalized Attention Guidance (arXiv 2505.21179): a negative prompt at guidance 0, in the attention.

How it maps onto Z-Image's single-stream main layers (`ZImageTransformer.forward(..., nag=...)`):
- The negative caption is embedded and refined (context refiner) exactly as a negative pass would
  do it: its own length, padded to its own multiple of 32 with `cap_pad_token`, RoPE positions
  1..L_neg. It then rides along in the main layers as a third segment: [image, caption, negative].
  Nothing is padded or truncated to the positive caption's length.
- In each main layer's attention the image segment (its pad tokens included) attends twice:
  positive branch: [image, caption] with the positive RoPE table (the plain model's attention);
  negative branch: [image, negative] with the table a negative pass would use (image tokens at
  axis-0 position L_neg + 1), i.e. the negative caption in the caption's place. Queries, keys and
  values come from the one shared image hidden state.
- Per image token (over the whole attention output, all heads, before the output projection):
  z = s * z_pos - (s - 1) * z_neg; where ||z||_1 / ||z_pos||_1 > tau, z is rescaled to
  tau * ||z_pos||_1; output alpha * z + (1 - alpha) * z_pos (computed in float32).
- Caption tokens keep the positive branch's output; negative-caption tokens take the negative
  branch's (each caption stream follows its own path, as in the paper's Flux/SD3 processors).
  Wan2GP also blends the caption tokens (token j of the caption with token j of the negative,
  the negative forced to the caption's length); we do not: those tokens are unrelated words.
- Refiner layers and the final layer see no NAG. Cost: one more attention of the image tokens
  per main layer plus the negative caption's tokens; no second forward pass.
nag_scale 1 means off: the pipeline then calls the plain model (bit-identical to no NAG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class NagGuidance:
    """NAG for one transformer call: neg_caps holds one negative caption (L_i, cap_feat_dim) per batch item."""

    neg_caps: list[torch.Tensor]
    scale: float
    tau: float = 3.5
    alpha: float = 0.5


class NagLayer(NamedTuple):
    """What a main layer's attention needs for NAG: segment lengths of the [image, caption, negative]
    sequence, the negative branch's RoPE table, and the parameters."""

    n_img: int
    n_cap: int
    rope_neg: tuple[torch.Tensor, torch.Tensor]
    scale: torch.Tensor  # 0-dim float32
    tau: torch.Tensor
    alpha: torch.Tensor


def check_nag(scale: float, tau: float, alpha: float) -> bool:
    """Validate NAG parameters; whether NAG is on (scale != 1)."""
    if not scale >= 1:
        raise ValueError(f"nag_scale must be at least 1 (1 = off), got {scale}")
    if not tau > 0:
        raise ValueError(f"nag_tau must be positive, got {tau}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"nag_alpha must be between 0 and 1, got {alpha}")
    return scale != 1


def nag_blend(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float | torch.Tensor, tau: float | torch.Tensor,
              alpha: float | torch.Tensor) -> torch.Tensor:
    """NAG per token (last dim = features) in float32; returns z_pos's dtype."""
    zp, zn = z_pos.float(), z_neg.float()
    z = scale * zp - (scale - 1) * zn
    norm_pos = zp.abs().sum(-1, keepdim=True)
    norm_z = z.abs().sum(-1, keepdim=True)
    # ratio > tau  <=>  tau * |z_pos| / |z| < 1: a clamp instead of a branch (no host sync)
    z = z * (tau * norm_pos / norm_z.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return (alpha * z + (1 - alpha) * zp).to(z_pos.dtype)
