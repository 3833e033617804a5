"""Low-bit single-file transformers: GGUF files and fp8 safetensors files, and writing fp8 files.

GGUF (the files ComfyUI-GGUF's converter makes, `general.architecture` "lumina2" for Z-Image): the
tensors carry the ComfyUI / original single-file names (fused `attention.qkv`), mapped here with
checkpoints' key conversion; the fused qkv blocks are cut into q, k and v without dequantizing. The
quantized weights of the Linear layers stay quantized (`models.lowbit.GGUFLinear`); every other
tensor (norms, pad tokens, the F16/F32 tensors) and the precision-sensitive layers that int8 keeps
in the model dtype too (`quantize.TRANSFORMER_EXCLUDE`: embedders, final layer) are dequantized once,
at load, to the compute dtype.

fp8 (safetensors with float8_e4m3fn / float8_e5m2 weights): plain fp8 weights, or ComfyUI's "scaled
fp8" layout: a `scaled_fp8` marker tensor and a float32 `<layer>.scale_weight` per fp8 weight
(`<layer>.weight_scale`, the name of ComfyUI's newer quantized layout, is read too; the files' static
activation scales are ignored: fp8 compute scales each token itself). The fp8 weights are kept
(`models.lowbit.Fp8Linear`), never upcast as a whole; W = fp8.to(dtype) * scale per layer at each call,
or, with `enable_fp8_compute`, the main layers' products in fp8 (torch._scaled_mm). Keys: diffusers or
ComfyUI.

`to_fp8` / `save_fp8` / `fp8_path`: what `--save-quantized fp8` does with bf16 weights: per-tensor
absmax-scaled e4m3fn weights in ComfyUI's scaled-fp8 layout (diffusers key names, the config in the
metadata), beside the bf16 file.
"""

from __future__ import annotations

import json
import logging
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from models.errors import UserError
from models.files import atomic_path
from models.ggml import GGMLTensor, is_gguf_file, read_gguf
from models.lowbit import FP8_DTYPES, Fp8Linear, GGUFLinear, is_lowbit, quantize_fp8, set_fp8_compute
from models.z_image import checkpoints as ck
from models.z_image.quantize import sibling_path
from models.z_image.transformer import ZImageConfig, ZImageTransformer

log = logging.getLogger("wgp_zimage")

FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# fp8-compute activation scales and ComfyUI's per-layer format tags: nothing to do without fp8 compute
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_FP8_HEADER_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_TAG = "_fp8_e4m3fn_scaled"
# fp8 layers that compute in bf16 even with fp8 compute: adaLN's products take one timestep embedding per
# image (nothing to gain) and scale every block's stream (their error would reach everything)
FP8_COMPUTE_SKIP = ("adaLN_modulation",)


def _kept_full(module_name: str) -> bool:
    """Layers loaded in the compute dtype whatever the file holds (int8's exclusions: embedders, final layer)."""
    from models.z_image.quantize import TRANSFORMER_EXCLUDE

    return any(fnmatch(module_name, pattern) for pattern in TRANSFORMER_EXCLUDE)


def lowbit_kind(path: str | Path) -> str | None:
    """"gguf", "fp8" (a safetensors file holding float8 tensors) or None for any other file."""
    path = Path(path)
    if is_gguf_file(path):
        return "gguf"
    return "fp8" if path.suffix == ".safetensors" and fp8_file_dtype([path]) is not None else None


def fp8_file_dtype(files: list[Path]) -> torch.dtype | None:
    """The float8 dtype of the first float8 tensor in the files' headers (the marker's first), else None."""
    found = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = _FP8_HEADER_DTYPES.get(f.get_slice(key).get_dtype())
                    if dtype is not None and (key.endswith(FP8_MARKER) or found is None):
                        found = dtype
                        if key.endswith(FP8_MARKER):
                            return found
        except (FileNotFoundError, SafetensorError, OSError, ValueError):
            return None
    return found


def _linear_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is nn.Linear}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], what: str, extra: str = "") -> None:
    """UserError naming the missing / unexpected keys, or the first tensor whose shape does not fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = ck.key_mismatch(expected.keys() - shapes.keys(), shapes.keys() - expected.keys())
    if problem:
        raise UserError(f"{what}{extra} does not match the model: {problem}")
    for key in sorted(expected):
        if tuple(shapes[key]) != expected[key]:
            raise UserError(f"{what} has wrong tensor shapes: {key} is {tuple(shapes[key])}, the model "
                            f"takes {expected[key]}")


def _assemble(model: ZImageTransformer, lowbit: dict[str, nn.Module], sd: dict[str, torch.Tensor], what: str,
              dtype: torch.dtype, device: torch.device) -> ZImageTransformer:
    """model (on the meta device) with the low-bit layers swapped in and every other tensor assigned."""
    for name, module in lowbit.items():
        _set_module(model, name, module)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    lowbit_keys = {f"{name}.{k}" for name, m in lowbit.items() for k in m.state_dict()}  # filled already
    problem = ck.key_mismatch(set(missing) - lowbit_keys, unexpected)
    if problem:  # _check_keys ran before: a bug if this fires
        raise UserError(f"{what} does not match the model: {problem}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise UserError(f"{what} has no data for {len(meta)} tensors (first: {', '.join(meta[:3])})")
    model.to(device=device)
    for module in model.modules():
        if is_lowbit(module):
            module.compute_dtype = dtype
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- GGUF

def convert_gguf_keys(tensors: dict[str, GGMLTensor]) -> dict[str, GGMLTensor]:
    """ComfyUI / original names (and diffusers names) -> diffusers names, the fused qkv cut in three."""
    out: dict[str, GGMLTensor] = {}
    for name, t in tensors.items():
        key = ck._convert_key(name)
        if key is None:
            continue
        if key.endswith(".attention.qkv.weight"):
            base = key[: -len("qkv.weight")]
            try:
                parts = t.split_rows(3)
            except ValueError:  # rows that cut blocks: the three parts as F32 (never seen in real files)
                parts = [GGMLTensor(c.contiguous().view(torch.uint8).reshape(-1).clone(), 0, tuple(c.shape))
                         for c in t.dequantize().chunk(3, dim=0)]
            out[base + "to_q.weight"], out[base + "to_k.weight"], out[base + "to_v.weight"] = parts
            continue
        out[key] = t
    return out


def _not_z_image(shapes: dict, source: Path, arch: str | None) -> UserError:
    with torch.device("meta"):
        expected = set(ZImageTransformer(ZImageConfig()).state_dict())
    problem = ck.key_mismatch(expected - shapes.keys(), shapes.keys() - expected)
    return UserError(f"{source} is not a Z-Image transformer (GGUF architecture {arch or 'unnamed'!r}): {problem}")


def load_transformer_gguf(path: str | Path, config_path: Path | None, dtype: torch.dtype, device: torch.device,
                          folder_config: Path | None = None) -> ZImageTransformer:
    """The transformer of a GGUF file, its quantized Linear weights kept as GGML blocks (GGUFLinear)."""
    path = Path(path)
    tensors, arch = read_gguf(path)
    conv = convert_gguf_keys(tensors)
    shapes = {k: t.shape for k, t in conv.items()}
    if not any(k.startswith("all_x_embedder.") for k in shapes) or not any(k.startswith("layers.") for k in shapes):
        raise _not_z_image(shapes, path, arch)
    cfg = ck.transformer_config([path], config_path, folder_config, shapes=shapes)
    with torch.device("meta"):
        model = ck.with_optional_modules(ZImageTransformer(cfg), conv)
    what = f"transformer GGUF file {path}"
    _check_keys(model, shapes, what, f" (GGUF architecture {arch or 'unnamed'!r})")
    linears = _linear_names(model)
    lowbit: dict[str, nn.Module] = {}
    quantized = {k[: -len(".weight")] for k, t in conv.items()
                 if k.endswith(".weight") and not t.is_float and k[: -len(".weight")] in linears
                 and not _kept_full(k[: -len(".weight")])}
    sd = {}
    for key, t in conv.items():
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue
        sd[key] = t.dequantize(dtype)
    for name in sorted(quantized):
        lowbit[name] = GGUFLinear(conv[f"{name}.weight"], sd.pop(f"{name}.bias", None), dtype)
    del conv, tensors
    return _assemble(model, lowbit, sd, what, dtype, device)


# ---------------------------------------------------------------- fp8

def _split_scale(scale: torch.Tensor) -> list[torch.Tensor]:
    return [scale] * 3 if scale.numel() == 1 else list(scale.reshape(-1).chunk(3))


def load_transformer_fp8(files: list[Path], config_path: Path | None, dtype: torch.dtype, device: torch.device,
                         folder_config: Path | None = None) -> ZImageTransformer:
    """The transformer of fp8 safetensors file(s), its fp8 Linear weights kept in fp8 (Fp8Linear)."""
    files = [Path(p) for p in files]
    cfg = ck.transformer_config(files, config_path, folder_config)
    raw = ck.read_state_dict(files)
    scales: dict[str, torch.Tensor] = {}  # module name (diffusers) -> scale
    plain: dict[str, torch.Tensor] = {}
    for key in list(raw):
        value = raw.pop(key)
        converted = ck._convert_key(key)
        if converted is None or converted == FP8_MARKER or key.endswith(IGNORED_SUFFIXES):
            continue
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            plain[key] = value
            continue
        module = ck._convert_key(key[: -len(suffix)] + ".weight")[: -len(".weight")]
        if module.endswith(".attention.qkv"):
            base = module[: -len("qkv")]
            for part, s in zip(("to_q", "to_k", "to_v"), _split_scale(value)):
                scales[base + part] = s
        else:
            scales[module] = value
    sd = ck.convert_transformer_keys(plain)
    del plain
    with torch.device("meta"):
        model = ck.with_optional_modules(ZImageTransformer(cfg), sd)
    where = ", ".join(str(p) for p in files)
    what = f"transformer fp8 checkpoint {where}"
    stray = [f"{m}.scale_weight" for m in scales if f"{m}.weight" not in sd]
    if stray:
        raise UserError(f"{what} does not match the model: {len(stray)} unexpected keys (first: "
                        f"{', '.join(sorted(stray)[:3])})")
    _check_keys(model, {k: tuple(v.shape) for k, v in sd.items()}, what)
    linears = _linear_names(model)
    lowbit: dict[str, nn.Module] = {}
    out: dict[str, torch.Tensor] = {}
    for key in list(sd):
        value = sd.pop(key)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = scales.get(module) if module is not None else None
        if value.dtype in FP8_DTYPES and module in linears and not _kept_full(module):
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()  # a third of a fused qkv: storage of its own
            lowbit[module] = (value, scale)
            continue
        if scale is not None:  # a scaled tensor kept in the compute dtype: dequantized once, here
            s = scale.float()
            value = value.float() * (s.reshape(-1, *[1] * (value.ndim - 1)) if s.numel() > 1 else s.reshape(()))
        out[key] = value.to(dtype)
    modules = {name: Fp8Linear(w, s, out.pop(f"{name}.bias", None), dtype) for name, (w, s) in lowbit.items()}
    return _assemble(model, modules, out, what, dtype, device)


def enable_fp8_compute(model: nn.Module) -> int:
    """The main layers' fp8 weights multiplied in fp8 (`models.lowbit.set_fp8_compute`; not adaLN's, and not
    layers torch._scaled_mm cannot take: e5m2 weights, dims that are not multiples of 16). Says what it did
    in one line (nothing for a model without fp8 layers); returns the number of layers computing in fp8."""
    on, off = set_fp8_compute(model, True, FP8_COMPUTE_SKIP)
    if on or off:
        log.info("fp8 compute: %d linear layers through torch._scaled_mm (per-token activation scales), %d fp8 "
                 "layers dequantized per layer (adaLN, e5m2 weights, dims not multiples of 16)", on, off)
    else:
        log.info("fp8 compute: the transformer has no fp8 weights; nothing to do")
    return on


# ---------------------------------------------------------------- writing fp8

def fp8_path(path: str | Path) -> Path:
    """Name of the fp8 file beside a bf16 one: `X_bf16.safetensors` -> `X_fp8_e4m3fn_scaled.safetensors`."""

    return sibling_path(path, FP8_TAG)


def to_fp8(model: ZImageTransformer, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> ZImageTransformer:
    """model's Linear layers (but the embedders and final layer) turned into fp8 ones in place, each weight
    scaled per tensor (absmax); the rest keeps the model dtype. Returns model."""
    dtype = model.dtype
    for name in sorted(_linear_names(model)):
        if _kept_full(name):
            continue
        layer = model.get_submodule(name)
        weight, scale = quantize_fp8(layer.weight, fp8_dtype)
        _set_module(model, name, Fp8Linear(weight, scale, layer.bias, dtype).to(layer.weight.device))
    return model


def save_fp8(model: ZImageTransformer, path: str | Path, config: dict | None = None) -> Path:
    """Write an fp8 model (`to_fp8`; a model that is not fp8 yet is converted first, in place) as a
    scaled-fp8 safetensors file: `<layer>.weight` fp8, `<layer>.scale_weight` float32, the `scaled_fp8`
    marker, every other tensor as it is, the config in the metadata. Written atomically."""
    from safetensors.torch import save_file

    if not any(is_lowbit(m) for m in model.modules()):
        to_fp8(model)
    tensors: dict[str, torch.Tensor] = {}
    marker = None
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            raise UserError("a GGUF model cannot be saved as fp8")
        if isinstance(module, Fp8Linear):
            tensors[f"{name}.weight"] = module.fp8_weight.detach().cpu().contiguous()
            tensors[f"{name}.scale_weight"] = module.weight_scale.detach().cpu().float().clone()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
            marker = module.fp8_dtype
            continue
        for leaf, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            tensors[f"{name}.{leaf}" if name else leaf] = t.detach().cpu().contiguous()
    tensors[FP8_MARKER] = torch.empty(0, dtype=marker or torch.float8_e4m3fn)
    config = config if config is not None else model.config.to_dict()
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(config)})
    log.info("saved fp8 weights to %s", path)
    return path


__all__ = ["FP8_MARKER", "convert_gguf_keys", "enable_fp8_compute", "fp8_file_dtype", "fp8_path",
           "load_transformer_fp8", "load_transformer_gguf", "lowbit_kind", "save_fp8", "to_fp8"]
