"""GGUF files: reading their tensors as raw GGML blocks, and dequantizing the blocks in torch.

A GGUF tensor is kept as it is stored: a flat uint8 tensor of its blocks, its GGML type and its
logical (torch-order) shape (`GGMLTensor`). `dequantize` turns the blocks into floats with torch
operations only, so it runs where the blocks are (CPU or GPU) and inside torch.compile. Each
type's arithmetic repeats the gguf package's numpy dequantizer (`gguf.quants`) operation for
operation in float32, so the two agree bit for bit (tests/test_gguf.py).

Not family-specific: a family maps the tensor names (models/z_image/lowbit.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import UserError

GGUF_MAGIC = b"GGUF"
QK_K = 256

# GGML type number -> (name, block size in elements, bytes per block); the numbers are ggml's enum
_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
}
FLOAT_TYPES = {"F32", "F16", "BF16"}
SUPPORTED_TYPES = tuple(name for name, _, _ in _TYPES.values())


@dataclass
class GGMLTensor:
    """One GGUF tensor as stored: `raw` (flat uint8 blocks), its GGML type number and torch-order shape."""

    raw: torch.Tensor
    qtype: int
    shape: tuple[int, ...]

    @property
    def type_name(self) -> str:
        return _TYPES[self.qtype][0]

    @property
    def is_float(self) -> bool:
        """F32 / F16 / BF16: plain floats, nothing to dequantize but a cast."""
        return self.type_name in FLOAT_TYPES

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype)

    def split_rows(self, parts: int) -> list[GGMLTensor]:
        """The tensor cut into `parts` equal slices along dim 0, each in storage of its own, still quantized.

        The blocks run over the elements in row-major order, so a slice of whole rows is a run of whole
        blocks whenever its element count is a multiple of the block size."""
        _, block, size = _TYPES[self.qtype]
        rows = self.shape[0]
        per = self.numel() // parts
        if rows % parts or per % block:
            raise ValueError(f"cannot split a {self.type_name} tensor of shape {self.shape} in {parts}")
        step = per // block * size
        shape = (rows // parts, *self.shape[1:])
        return [GGMLTensor(self.raw[i * step:(i + 1) * step].clone(), self.qtype, shape) for i in range(parts)]


def type_name(qtype: int) -> str:
    return _TYPES[qtype][0] if qtype in _TYPES else f"type {qtype}"


# ------------------------------------------------------------------------------ dequantizers
# Each takes blocks (n, bytes per block) uint8 and returns (n, block size) float32. The comments give
# the gguf.quants class they mirror; keep the operation order, it is what makes the results identical.

def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32: a little-endian fp16 per block."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """(n, b) bytes -> (n, 8b): bit j of the little-endian bit string (byte j // 8, bit j % 8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.reshape(n, -1, 1) >> shifts) & 1).reshape(n, -1)


def _shifted(q: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """q >> s for each s, stacked at dim (numpy's broadcast shift against a shift array)."""
    return torch.stack([q >> s for s in shifts], dim=dim)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    qs = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * qs.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qh = _bits(b[:, 2:6], n)
    q = (_nibbles(b[:, 6:]) | (qh << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qh = _bits(b[:, 4:8], n)
    q = (_nibbles(b[:, 8:]) | (qh << 4)).float()
    return d * q + m


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (_shifted(qs.reshape(n, 2, 32), [0, 2, 4, 6], 2) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = _shifted(scales[:, :8].reshape(n, 1, 8), [0, 4], 1).reshape(n, 16)
    high = _shifted(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 1).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (_shifted(qs.reshape(n, 2, 32), [0, 2, 4, 6], 2).reshape(n, 16, 16) & 3)
    qh = (_shifted(hmask.reshape(n, 1, 32), list(range(8)), 2).reshape(n, 16, 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (gguf.quants.Q4_K.get_scale_min)."""
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16], n)
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    q = (_shifted(b[:, 16:].reshape(n, 4, 32), [0, 4], 2) & 0x0F).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16], n)
    qh, qs = b[:, 16:48], b[:, 48:]
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    ql = (_shifted(qs.reshape(n, 4, 32), [0, 4], 2) & 0x0F).reshape(n, 8, 32)
    qh = (_shifted(qh.reshape(n, 1, 32), list(range(8)), 2) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    d = (d * scales).reshape(n, 16, 1)
    ql = (_shifted(ql.reshape(n, 2, 64), [0, 4], 2) & 0x0F).reshape(n, 8, 32)
    qh = (_shifted(qh.reshape(n, 2, 32), [0, 2, 4, 6], 2) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
                 "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The float tensor of `shape` that the GGML blocks `raw` (flat uint8) of type qtype hold, in dtype.

    The arithmetic runs in float32 (as ggml's and gguf's reference dequantizers do) and the result is
    then cast to dtype."""
    name, _, size = _TYPES[qtype]
    raw = raw.reshape(-1)
    if name == "F32":
        out = raw.view(torch.float32)
    elif name == "F16":
        out = raw.view(torch.float16).float()
    elif name == "BF16":  # as gguf's: the 16 bits moved to the top of a float32 (any NaN payload kept)
        out = (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    else:
        out = _DEQUANTIZERS[name](raw.view(-1, size))
    return out.reshape(shape).to(dtype)


# ------------------------------------------------------------------------------ reading

def is_gguf_file(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def _orig_shape(reader, name: str, source: Path) -> tuple[int, ...] | None:
    """ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>`: the shape of a tensor its converter stored reshaped."""
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    try:
        return tuple(int(field.parts[i][0]) for i in field.data)
    except (IndexError, TypeError, ValueError):
        raise UserError(f"{source}: bad comfy.gguf.orig_shape metadata for tensor {name!r}") from None


def read_gguf(path: str | Path) -> tuple[dict[str, GGMLTensor], str | None]:
    """Every tensor of a GGUF file as a `GGMLTensor` (its blocks copied into torch-owned memory), and the
    file's `general.architecture` (None when absent). UserError for an unreadable file or a tensor of a
    GGML type that `dequantize` does not know, naming the type."""
    path = Path(path)
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'gguf>=0.14,<1'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise UserError(f"missing weight file: {path}") from None
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"corrupt or unreadable GGUF file {path}: {e}") from None
    arch = _string_field(reader, "general.architecture")
    unsupported = {}
    for t in reader.tensors:
        if int(t.tensor_type) not in _TYPES:
            unsupported.setdefault(getattr(t.tensor_type, "name", str(int(t.tensor_type))), t.name)
    if unsupported:
        kinds = ", ".join(f"{k} (e.g. {v!r})" for k, v in sorted(unsupported.items()))
        raise UserError(f"{path}: unsupported GGUF tensor type {kinds}; supported: {', '.join(SUPPORTED_TYPES)}")
    tensors: dict[str, GGMLTensor] = {}
    for t in reader.tensors:
        shape = _orig_shape(reader, t.name, path) or tuple(int(d) for d in reversed(t.shape.tolist()))
        with warnings.catch_warnings():  # a read-only memmap: copied at once
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(t.data.reshape(-1).view("uint8")).clone()
        _, block, size = _TYPES[int(t.tensor_type)]
        n = 1
        for d in shape:
            n *= d
        if n % block or raw.numel() != n // block * size:
            raise UserError(f"{path}: tensor {t.name!r} holds {raw.numel()} bytes, which do not fit its "
                            f"{type_name(int(t.tensor_type))} shape {shape}")
        tensors[t.name] = GGMLTensor(raw, int(t.tensor_type), shape)
    del reader  # closes the memmap
    return tensors, arch


__all__ = ["FLOAT_TYPES", "GGMLTensor", "SUPPORTED_TYPES", "dequantize", "is_gguf_file", "read_gguf", "type_name"]
