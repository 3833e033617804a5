"""Linear layers whose weights stay low-bit in memory and are dequantized per layer at each call.

- `GGUFLinear`: the GGML blocks of a GGUF tensor (models/ggml.py), a flat uint8 buffer `weight_raw`;
- `Int8Linear`: an int8 weight (an int8 buffer) and its per-row scale: quanto's int8 layer as plain tensors;
- `Fp8Linear`: the bytes of a float8 (e4m3fn / e5m2) weight, a uint8 buffer `weight_fp8`, and its float32
  `weight_scale` (a scalar, or one per output row); W = fp8.to(dtype) * scale.to(dtype), as ComfyUI's
  scaled fp8 does. With `fp8_compute` set (`set_fp8_compute`) an e4m3fn layer whose dims are multiples of 16
  computes in fp8 instead: its input quantized to e4m3fn per token (row amax / 448), one
  `torch._scaled_mm` with row-wise scales (the token's, the weight's), the bias added after.

The low-bit data are ordinary uint8 module *buffers*: `.to()`, mmgp's pinning and block streaming
(app/offload.py) move them as they are, no float cast of the model touches them, and the memory they
take is their own size. They are not parameters because mmgp asserts that every (non-quanto) parameter
of a model has the model's dtype.
The bias, when there is one, is an ordinary parameter in the compute dtype.

Both are `nn.Linear` subclasses (the LoRA runtime hooks any nn.Linear) without a `weight` attribute:
reading a dequantized weight costs a dequantization, and mmgp reads `module.weight` of every layer
while it hooks a model, so `dequantized_weight()` says what it costs. `compute_device_dtype()` gives the
device and dtype a layer computes in without dequantizing anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ggml import GGMLTensor, dequantize, type_name

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn rows, float32 (rows, 1) scales) of a 2-D x, each row's largest magnitude landing on 448."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = (amax / FP8_MAX[torch.float8_e4m3fn]).clamp_min(torch.finfo(torch.float32).tiny)  # a zero row stays 0
    q = (x.float() / scale).clamp(-FP8_MAX[torch.float8_e4m3fn], FP8_MAX[torch.float8_e4m3fn])
    return q.to(torch.float8_e4m3fn), scale


def scaled_mm_fits(in_features: int, out_features: int) -> bool:
    """torch._scaled_mm's shape rule (CUDA's): both dims of the weight multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def fp8_compute_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fp8 matrix products cannot run on device with dtype outputs (None: they can): no
    torch._scaled_mm, a CUDA GPU under compute capability 8.9, or a probe product that fails."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} (fp8 needs 8.9+)"
    try:  # the call the layers make, on a 16x32 @ 32x16 product
        x = torch.ones(16, 32, device=device, dtype=dtype)
        w = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        q, s = quantize_per_token(x)
        torch._scaled_mm(q, w.t(), scale_a=s, scale_b=torch.ones(1, 16, device=device), out_dtype=dtype)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"torch._scaled_mm fails on {device} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


class _LowBitLinear(nn.Linear):
    """What both share: no nn.Linear.__init__ (it would allocate a full weight), a bias parameter, and the
    compute dtype, which follows the model's float casts (`model.to(dtype)` moves the low-bit data to the
    new device and leaves their bytes alone: they are uint8 buffers)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype  # the model's dtype: what dequantized_weight() returns by default
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _data(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def compute_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        return self._data().device, self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # the dtype a float tensor of the compute dtype would get (Module.to(dtype), .half(), .float()...)
        self.compute_dtype = fn(torch.zeros((), dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)


class GGUFLinear(_LowBitLinear):
    """A Linear holding a GGUF weight as its raw blocks (`weight_raw`, flat uint8) plus type and shape."""

    def __init__(self, weight: GGMLTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, dtype)
        self.qtype = weight.qtype
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("weight_raw", weight.raw.reshape(-1))

    def _data(self) -> torch.Tensor:
        return self.weight_raw

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight_raw, self.qtype, self.weight_shape, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, type={type_name(self.qtype)}"


class Fp8Linear(_LowBitLinear):
    """A Linear holding an fp8 weight and its float32 scale (`weight_scale`: a scalar or one per row).

    The fp8 bytes are a uint8 buffer (`weight_fp8`; `fp8_weight` views them in their float8 dtype): no
    float cast of the model can upcast them. The scale stays float32 through such casts too."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        if weight.dtype not in FP8_DTYPES or weight.ndim != 2:
            raise ValueError(f"an fp8 weight must be a 2-D float8 tensor (got {weight.dtype}, {tuple(weight.shape)})")
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, dtype)
        scale = torch.ones((), dtype=torch.float32) if scale is None else scale.detach().to(torch.float32)
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == out_features:
            scale = scale.reshape(out_features, 1)
        else:
            raise ValueError(f"an fp8 weight of shape {tuple(weight.shape)} takes one scale or one per row "
                             f"(got {scale.numel()})")
        self.fp8_dtype = weight.dtype
        self.fp8_compute = False  # set_fp8_compute: torch._scaled_mm instead of a dequantized weight
        self.register_buffer("weight_fp8", weight.contiguous().view(torch.uint8))
        self.register_buffer("weight_scale", scale.clone())

    @property
    def scaled_mm_ready(self) -> bool:
        """Whether this layer can compute in fp8: an e4m3fn weight (the activations' format too) of dims
        torch._scaled_mm takes."""
        return self.fp8_dtype == torch.float8_e4m3fn and scaled_mm_fits(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_compute:
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        q, scale_a = quantize_per_token(rows)
        # row-wise on both sides (CUDA takes no per-tensor scale beside a row-wise one): the weight's
        # per-tensor scale repeated over its output rows
        scale_b = self.weight_scale.float().reshape(1, -1).expand(1, self.out_features).contiguous()
        out = torch._scaled_mm(q, self.fp8_weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def fp8_weight(self) -> torch.Tensor:
        return self.weight_fp8.view(self.fp8_dtype)

    def _data(self) -> torch.Tensor:
        return self.weight_fp8

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return self.fp8_weight.to(dtype) * self.weight_scale.to(dtype)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # a float cast of the model: the scale keeps its precision
            self.weight_scale = scale.to(self.weight_scale.device)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {str(self.fp8_dtype).removeprefix('torch.')}"


class Int8Linear(_LowBitLinear):
    """A Linear holding an int8 weight with one scale per output row, as plain tensors (`weight_int8`, an int8
    buffer, and `weight_scale`, (out, 1) in the compute dtype): W = scale * int8, what quanto's int8 QLinear
    computes, without its tensor subclass. Made from a quanto layer by `plain_int8_layers`, so that
    torch.compile traces the dequantization with the matmul (quanto's path is an opaque op behind a subclass's
    dispatch)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        if weight.dtype != torch.int8 or weight.ndim != 2:
            raise ValueError(f"an int8 weight must be a 2-D int8 tensor (got {weight.dtype}, {tuple(weight.shape)})")
        out_features, in_features = weight.shape
        if scale.numel() != out_features:
            raise ValueError(f"an int8 weight of shape {tuple(weight.shape)} takes one scale per row "
                             f"(got {scale.numel()})")
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("weight_int8", weight.detach().contiguous())
        self.register_buffer("weight_scale", scale.detach().reshape(out_features, 1).to(dtype).clone())

    def _data(self) -> torch.Tensor:
        return self.weight_int8

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        scale = self.weight_scale.to(dtype)
        return scale * self.weight_int8.to(dtype)


def plain_int8_layers(model: nn.Module) -> int:
    """Replace model's quanto int8 Linear layers (weight-only, per-row scales) by Int8Linear layers holding the
    same int8 data and scales; returns how many. Their outputs are quanto's, op for op on the CPU."""
    from optimum.quanto import QModuleMixin
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    swaps = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        # quanto's QLinear, or the router class mmgp puts in its place once imported
        if isinstance(module, QModuleMixin) and isinstance(module, nn.Linear) and \
                isinstance(w, WeightQBytesTensor) and w._data.dtype == torch.int8 and w.axis == 0 and \
                module.activation_qtype is None:
            swaps.append((name, module))
    for name, module in swaps:
        w = module.weight
        layer = Int8Linear(w._data, w._scale, module.bias, dtype=w._scale.dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    if swaps and hasattr(model, "_quanto_map"):
        del model._quanto_map  # no quanto layer left to describe
    return len(swaps)


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scalar scale) with weight ~ fp8 * scale: per-tensor absmax scaling (the
    largest magnitude lands on the format's largest finite value)."""
    w = weight.detach().float()
    amax = w.abs().max()
    scale = (amax / FP8_MAX[dtype]).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q, scale.reshape(())


def set_fp8_compute(model: nn.Module, on: bool, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """Turn fp8 compute on (or off) for model's Fp8Linear layers, but those whose name holds one of skip
    and those `scaled_mm_ready` refuses (they keep per-layer dequantization). Returns (layers computing in
    fp8, fp8 layers that do not)."""
    on_count = off_count = 0
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            module.fp8_compute = on and module.scaled_mm_ready and not any(k in name for k in skip)
            on_count += module.fp8_compute
            off_count += not module.fp8_compute
    return on_count, off_count


def lowbit_layers(model: nn.Module) -> dict[str, _LowBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LowBitLinear)}


def is_lowbit(module: nn.Module) -> bool:
    return isinstance(module, _LowBitLinear)


__all__ = ["FP8_DTYPES", "Fp8Linear", "GGUFLinear", "Int8Linear", "fp8_compute_problem", "is_lowbit",
           "lowbit_layers", "plain_int8_layers", "quantize_fp8", "quantize_per_token", "scaled_mm_fits",
           "set_fp8_compute"]
