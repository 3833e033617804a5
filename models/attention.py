"""One entry point for attention; the backend is the caller's (each attention module of a loaded model
holds its own), so two models can use different kernels and nothing here is global state.

Inputs are (batch, seq, heads, head_dim), no mask: Z-Image runs each caption as its own
unpadded sequence, so every backend (flash kernels included) can serve it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("wgp_zimage")

BACKENDS = ("sdpa", "flash", "flash3", "sage")
CHOICES = ("auto", *BACKENDS)
_MODULES = {"flash": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention"}


def installed_backends() -> list[str]:
    return ["sdpa"] + [b for b, m in _MODULES.items() if importlib.util.find_spec(m) is not None]


def _capability(device: torch.device | None = None) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def rule_backend(rules: dict[str, str] | None, capability: tuple[int, int] | None) -> str | None:
    """A model definition's rule such as {"<89": "sdpa"}: the backend for this compute capability."""
    if not rules or capability is None:
        return None
    cc = capability[0] * 10 + capability[1]
    for cond, backend in rules.items():
        m = re.fullmatch(r"\s*(<=|>=|<|>|==)?\s*(\d+)\s*", cond)
        if not m:
            raise ValueError(f"bad attention rule {cond!r}; use e.g. '<89' or '>=90'")
        op, value = m.group(1) or "==", int(m.group(2))
        if {"<": cc < value, "<=": cc <= value, ">": cc > value, ">=": cc >= value, "==": cc == value}[op]:
            return backend
    return None


def resolve_backend(requested: str = "auto", rules: dict[str, str] | None = None,
                    capability: tuple[int, int] | None = None, installed: list[str] | None = None) -> str:
    """The backend to use. auto: a model rule, else the fastest installed kernel safe for Z-Image.

    SageAttention is never picked by auto: it quantizes q/k and corrupts Z-Image Base images.
    """
    installed = installed_backends() if installed is None else installed
    if requested not in CHOICES:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {', '.join(CHOICES)}")
    if requested != "auto":
        if requested not in installed:
            raise ValueError(f"attention backend {requested!r} is not installed (installed: {', '.join(installed)})")
        if requested == "sage":
            log.warning("SageAttention can corrupt Z-Image Base images (large sizes especially); use with care")
        return requested
    by_rule = rule_backend(rules, capability)
    if by_rule is not None and by_rule in installed:
        return by_rule
    if capability is not None and capability[0] == 9 and "flash3" in installed:
        return "flash3"
    if capability is not None and capability >= (8, 0) and "flash" in installed:
        return "flash"
    return "sdpa"


def choose_backend(name: str, rules: dict[str, str] | None = None) -> str:
    """resolve_backend for this machine's GPU (its compute capability and installed kernels)."""
    return resolve_backend(name, rules, _capability())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@functools.cache
def _kernel(name: str) -> Callable:
    if name == "flash":
        from flash_attn import flash_attn_func

        return flash_attn_func
    if name == "flash3":
        from flash_attn_interface import flash_attn_func

        return lambda q, k, v: _first(flash_attn_func(q, k, v))
    from sageattention import sageattn

    return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full (non-causal) attention with backend (one of BACKENDS); returns (batch, seq, heads, head_dim)."""
    # the fused kernels take half precision on CUDA only; everything else goes through SDPA
    if backend == "sdpa" or q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return _sdpa(q, k, v)
    return _kernel(backend)(q, k, v)
