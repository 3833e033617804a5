"""int8 (optimum-quanto) weights: load pre-quantized files, quantize on the fly, save.

File format (the one of DeepBeepMeep/Z-Image's `*_quanto_bf16_int8.safetensors`, written by
mmgp's `save_model`): quanto's flattened state dict (`<module>.weight._data` int8,
`<module>.weight._scale`, `<module>.input_scale`, `<module>.output_scale`, every other tensor as
usual) and the quantization map ({module name: {"weights": "qint8", "activations": "none"}}) in
the safetensors metadata: mmgp writes it base64-encoded under `quantization_map_base64` (its
reader decodes every `<key>_base64`); plain JSON under `quantization_map` and a sibling
`<file stem>_map.json` are read too. We write mmgp's form, so Wan2GP / mmgp read our files.

Loading mirrors `checkpoints.load_transformer` / `load_text_encoder`: the model is built on the meta
device, the modules named by the map are swapped for their quanto counterparts, and the state dict
is assigned. Precision-sensitive layers stay unquantized when quantizing on the fly (see
`TRANSFORMER_EXCLUDE`): naive 8-bit of the embedders and the final layer is known to wreck
Z-Image's output.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from models.errors import UserError
from models.files import atomic_path
from models.mmgp_support import align_int8_storage, import_mmgp, is_quantized
from models.z_image import checkpoints as ck
from models.z_image.text_encoder import PromptEncoder, truncated_config
from models.z_image.transformer import ZImageTransformer

log = logging.getLogger("wgp_zimage")

# module-name patterns (fnmatch) kept in the model dtype when quantizing the transformer; the pad
# tokens and the norms are plain parameters / custom modules that quanto never touches anyway
TRANSFORMER_EXCLUDE = ("all_x_embedder*", "all_final_layer*", "t_embedder*", "cap_embedder*")
# the embedding table stays a plain nn.Embedding (quanto has no int8 embedding; mmgp's would
# dequantize the whole 151936 x 2560 table at every call)
TEXT_ENCODER_EXCLUDE = ("embed_tokens",)
CONTROLNET_EXCLUDE = ("control_all_x_embedder*",)  # its patch embedder, like the transformer's
QUANTO_TAG = "_quanto_"
_SCALE_KEYS = (".input_scale", ".output_scale")
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ---------------------------------------------------------------- names and maps

def sibling_path(path: str | Path, tag: str) -> Path:
    """A weight file's variant beside it: its stem without the dtype tag (_bf16, _fp16, _fp32), then tag."""
    path = Path(path)
    stem = path.stem
    for dtype_tag in ("_bf16", "_fp16", "_fp32"):
        if stem.endswith(dtype_tag):
            stem = stem[: -len(dtype_tag)]
            break
    return path.with_name(f"{stem}{tag}{path.suffix}")


def int8_path(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Name of the int8 file beside a bf16 one: `X_bf16.safetensors` -> `X_quanto_bf16_int8.safetensors`."""
    return sibling_path(path, f"{QUANTO_TAG}{_DTYPE_TAGS.get(dtype, 'bf16')}_int8")


def find_int8(path: str | Path) -> Path | None:
    """The int8 variant of a bf16 weight file when it exists beside it (bf16 or fp32 scales)."""
    for dtype in (torch.bfloat16, torch.float32):
        candidate = int8_path(path, dtype)
        if candidate.is_file():
            return candidate
    return None


def is_quanto_file(path: str | Path) -> bool:
    path = Path(path)
    return QUANTO_TAG in path.name or read_quantization_map([path]) is not None


def _metadata_json(meta: dict, key: str, source: Path):
    """meta[key] as JSON, or meta[key + "_base64"] (mmgp's encoding); None when neither is there."""
    try:
        if meta.get(key + "_base64") is not None:
            return json.loads(base64.b64decode(meta[key + "_base64"].encode("utf8")).decode("utf8"))
        if meta.get(key) is not None:
            return json.loads(meta[key])
    except (ValueError, binascii.Error) as e:
        raise UserError(f"bad {key.replace('_', ' ')} in {source}: {e}") from None
    return None


def read_quantization_map(files: list[Path]) -> dict | None:
    """The merged quantization map of files (metadata, mmgp's base64 or plain, else `<stem>_map.json`)."""
    merged: dict = {}
    found = False
    for path in files:
        path = Path(path)
        qmap = _metadata_json(ck.read_metadata(path), "quantization_map", path)
        source = path
        text = None
        if qmap is None:
            sidecar = path.with_name(path.stem + "_map.json")
            if not sidecar.is_file():
                continue
            source = sidecar
            try:
                text = sidecar.read_text(encoding="utf-8")
                qmap = json.loads(text)
            except OSError as e:
                raise UserError(f"cannot read {sidecar}: {e}") from None
            except ValueError as e:
                raise UserError(f"bad quantization map in {source}: {e}") from None
        if not isinstance(qmap, dict):
            raise UserError(f"bad quantization map in {source}: not a JSON object")
        merged.update(qmap)
        found = True
    return merged if found else None


# ---------------------------------------------------------------- quantizing

def default_exclude(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, ZImageTransformer):
        return TRANSFORMER_EXCLUDE
    if hasattr(model, "control_all_x_embedder"):  # a ControlNet (models/z_image/controlnet.py)
        return CONTROLNET_EXCLUDE
    if hasattr(model, "embed_tokens"):
        return TEXT_ENCODER_EXCLUDE
    return ()


def quantize_on_the_fly(model: nn.Module, exclude: list[str] | tuple[str, ...] | None = None) -> nn.Module:
    """Quantize model's Linear weights to int8 in place (quanto, per output channel, absmax).

    exclude: fnmatch patterns of module names kept in the model dtype; None takes the model's
    default (`TRANSFORMER_EXCLUDE` for the Z-Image transformer, `TEXT_ENCODER_EXCLUDE` for Qwen3).
    Activations stay in the model dtype (weight-only quantization). Returns model.
    """
    from optimum.quanto import freeze, qint8, quantization_map, quantize

    if is_quantized(model):
        return model
    patterns = list(default_exclude(model) if exclude is None else exclude)
    quantize(model, weights=qint8, exclude=patterns or None)
    freeze(model)
    model.requires_grad_(False)
    model._quanto_map = quantization_map(model)  # what mmgp looks for to skip its own quantization
    return model


def _b64(obj) -> str:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False, default=str).encode("utf8")).decode("utf8")


def _hooked_by_mmgp(model: nn.Module) -> bool:
    return any("_mm_manager" in m.__dict__ or "_mm_Id" in m.__dict__ for m in model.modules())


def save_quantized(model: nn.Module, path: str | Path, config: dict | None = None) -> Path:
    """Write model as an int8 quanto safetensors file that the int8 loaders read back.

    A model that is not quantized yet is quantized first, in place (`quantize_on_the_fly` with its
    default exclusions). The quantization map and the config (`config`, else the model's own
    when it has a `to_dict()`) go into the metadata. The file is written atomically.
    """
    from optimum.quanto import quantization_map

    if _hooked_by_mmgp(model):
        raise UserError("save the int8 weights before applying a memory profile (or after releasing it)")
    quantize_on_the_fly(model)
    qmap = quantization_map(model)
    if config is None and hasattr(getattr(model, "config", None), "to_dict"):
        config = model.config.to_dict()
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors that share storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    metadata = {"format": "pt", "quantization_format": "quanto", "quantization_map_base64": _b64(qmap)}
    if config is not None:
        metadata["config_base64"] = _b64(config)
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("saved int8 weights to %s", path)
    return path


# ---------------------------------------------------------------- loading

def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _requantize(model: nn.Module, qmap: dict, what: str, where: str) -> None:
    """Swap the modules named in qmap for quanto modules (still on the meta device)."""
    from optimum.quanto import quantize_module

    for name, qconfig in qmap.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{what} int8 file {where}: its quantization map names {name!r}, "
                            f"which the model does not have") from None
        if not isinstance(qconfig, dict):
            raise UserError(f"{what} int8 file {where}: bad quantization map entry for {name!r}")
        if isinstance(module, nn.Embedding):
            import_mmgp()  # registers mmgp's quanto QEmbedding
        weights = None if qconfig.get("weights", "none") == "none" else qconfig["weights"]
        activations = None if qconfig.get("activations", "none") == "none" else qconfig["activations"]
        try:
            qmodule = quantize_module(module, weights=weights, activations=activations)
        except KeyError as e:
            raise UserError(f"{what} int8 file {where}: unknown quantization type {e}") from None
        if qmodule is None:
            raise UserError(f"{what} int8 file {where}: cannot quantize {name!r} ({type(module).__name__})")
        _set_module(model, name, qmodule)
        qmodule.name = name


def _load_quantized(model: nn.Module, sd: dict, qmap: dict, what: str, files: list[Path]) -> None:
    where = ", ".join(str(p) for p in files)
    _requantize(model, qmap, what, where)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # the activation scales of weight-only quantization are unused: tolerate files without them
    missing = [k for k in missing if not k.endswith(_SCALE_KEYS)]
    problem = ck.key_mismatch(missing, unexpected)
    if problem:
        raise UserError(f"{what} int8 checkpoint {where} does not match the model: {problem}")
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name in ("input_scale", "output_scale"):
                module.register_buffer(name, torch.ones((), dtype=buf.dtype, device="cpu"))
    meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if meta:
        raise UserError(f"{what} int8 checkpoint {where} has no data for {len(meta)} tensors "
                        f"(first: {', '.join(meta[:3])})")
    align_int8_storage(model)  # the file's int8 views can sit at any offset: see its docstring


def load_int8_state(model: nn.Module, sd: dict, files: list[Path], what: str, dtype: torch.dtype) -> nn.Module:
    """model (built on the meta device, its keys those of sd) with the quanto int8 tensors of sd loaded: the
    modules the files' quantization map names become quanto modules; floating tensors and scales end in dtype.
    UserError for a file without a map or whose keys do not fit."""
    qmap = read_quantization_map(files)
    if qmap is None:
        raise UserError(f"{files[0]} has no quantization map (metadata 'quantization_map' or "
                        f"{files[0].stem}_map.json): not a quanto int8 file")
    qmap = {k: v for k, v in _rename_map(qmap, _transformer_module_name).items()
            if any(key.startswith(k + ".") for key in sd)}  # entries of tensors the caller left out go too
    _load_quantized(model, sd, qmap, what, files)
    return cast_model(model, dtype)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating tensors of a (partly) quantized model to dtype; int8 data stays int8.

    quanto refuses `.to(dtype)` on quantized weights, so their scales are rebuilt in dtype
    (the scale dtype is the dtype the quantized matmul computes in).
    """
    from optimum.quanto import QModuleMixin, QTensor
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    for module in model.modules():
        if isinstance(module, QModuleMixin) and isinstance(module.weight, QTensor):
            w = module.weight
            if w.dtype != dtype:
                if not isinstance(w, WeightQBytesTensor):
                    raise UserError(f"cannot change the dtype of {type(w).__name__} weights")
                inner = WeightQBytesTensor.create(w.qtype, w.axis, w.size(), w.stride(), w._data,
                                                  w._scale.to(dtype), activation_qtype=w.activation_qtype)
                module.weight = nn.Parameter(inner, requires_grad=False)
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, QTensor) or not p.is_floating_point() or p.dtype == dtype:
                continue
            setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != dtype:
                module.register_buffer(name, b.to(dtype), persistent=name not in module._non_persistent_buffers_set)
    return model


def _rename_map(qmap: dict, rename) -> dict:
    out = {}
    for name, qconfig in qmap.items():
        new = rename(name)
        if new is not None:
            out[new] = qconfig
    return out


def _transformer_module_name(name: str) -> str:
    # the key conversion works on tensor names: convert a fake tensor of that module
    converted = ck.convert_transformer_keys({f"{name}.x": None})
    return next(iter(converted))[: -len(".x")] if converted else name


def load_transformer_int8(
    files: list[Path], config_path: Path | None, dtype: torch.dtype, device: torch.device,
    folder_config: Path | None = None,
) -> ZImageTransformer:
    """The transformer from quanto int8 file(s), mirroring `checkpoints.load_transformer`.

    Non-quantized tensors and the quantization scales end in dtype (the file's bf16 for the
    DeepBeepMeep files); the int8 data is kept as is.
    """
    files = [Path(p) for p in files]
    qmap = read_quantization_map(files)
    if qmap is None:
        raise UserError(f"{files[0]} has no quantization map (metadata 'quantization_map' or "
                        f"{files[0].stem}_map.json): not a quanto int8 file")
    meta_cfg = None if config_path is not None else _metadata_json(ck.read_metadata(files[0]), "config", files[0])
    cfg = (ck.transformer_config(files, config_path, folder_config) if meta_cfg is None
           else ck._config_or_error(meta_cfg, files[0]))
    sd = ck.convert_transformer_keys(ck.read_state_dict(files))
    qmap = _rename_map(qmap, _transformer_module_name)
    with torch.device("meta"):
        model = ck.with_optional_modules(ZImageTransformer(cfg), sd)
    _load_quantized(model, sd, qmap, "transformer", files)
    cast_model(model, dtype)
    return model.to(device=device).eval().requires_grad_(False)


def load_text_encoder_int8(
    files: list[Path], config_path: Path, tokenizer_dir: Path, dtype: torch.dtype, device: torch.device
) -> PromptEncoder:
    """The Qwen3 prompt encoder from quanto int8 file(s), mirroring `checkpoints.load_text_encoder`."""
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    files = [Path(p) for p in files]
    qmap = read_quantization_map(files)
    if qmap is None:
        raise UserError(f"{files[0]} has no quantization map (metadata 'quantization_map' or "
                        f"{files[0].stem}_map.json): not a quanto int8 file")
    try:
        config = AutoConfig.from_pretrained(str(Path(config_path).parent))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read text encoder config {config_path}: {e}") from None
    cfg = truncated_config(config)
    dropped = f"layers.{cfg.num_hidden_layers}."

    def rename(name: str) -> str | None:
        name = name[len("model."):] if name.startswith("model.") else name
        if (name + ".").startswith(dropped) or name.split(".")[0] == "lm_head" or name in ("norm", "norm.weight"):
            return None  # the last layer, the final norm and the LM head are never run
        return name

    sd = _rename_map(ck.read_state_dict(files), rename)
    qmap = _rename_map(qmap, rename)
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    model.norm = nn.Identity()
    del model.rotary_emb
    _load_quantized(model, sd, qmap, "text encoder", files)
    cast_model(model, dtype)
    return ck.finish_text_encoder(model.to(device=device), cfg, tokenizer_dir, device)


__all__ = [
    "TEXT_ENCODER_EXCLUDE", "TRANSFORMER_EXCLUDE", "cast_model", "default_exclude", "find_int8", "import_mmgp",
    "int8_path",
    "is_quantized", "is_quanto_file", "load_text_encoder_int8", "load_transformer_int8", "quantize_on_the_fly",
    "read_quantization_map", "save_quantized",
]
