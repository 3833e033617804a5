"""One entry point for attention, so faster kernels can be added behind it later.

Inputs are (batch, seq, heads, head_dim), no mask: Z-Image runs each caption as its own
unpadded sequence, so every backend (flash kernels included) can serve it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND = "sdpa"
BACKENDS = ("sdpa",)


def set_attention_backend(name: str) -> None:
    global _BACKEND
    if name == "auto":
        name = "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) attention; returns (batch, seq, heads, head_dim)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
