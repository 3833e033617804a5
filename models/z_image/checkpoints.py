"""Weight file layouts, key conversion and loading of the Z-Image parts.

Three layouts are understood:
1. the official diffusers folder (model_index.json, transformer/, text_encoder/, tokenizer/,
   vae/, scheduler/), sharded or not;
2. the DeepBeepMeep/Z-Image file set (transformer single file, VAE file + config, scheduler
   config, Qwen3/ folder with weights, config and tokenizer);
3. a ComfyUI / original single-file transformer (`model.diffusion_model.` keys, fused qkv),
   given on its own beside either of the above.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from models.errors import UserError
from models.z_image.text_encoder import PromptEncoder, truncated_config
from models.z_image.transformer import ZImageConfig, ZImageTransformer

DBM_VAE = "ZImageTurbo_VAE_bf16.safetensors"
DBM_VAE_CONFIG = "ZImageTurbo_VAE_bf16_config.json"
DBM_SCHEDULER = "ZImageTurbo_scheduler_config.json"
DBM_TEXT_DIR = "Qwen3"
DBM_TEXT_WEIGHTS = "qwen3_bf16.safetensors"


@dataclass
class ModelFiles:
    """Where each part of a model lives; `layout` names the file set it came from."""

    layout: str
    transformer: list[Path]
    transformer_config: Path | None
    text_encoder: list[Path]
    text_encoder_config: Path
    tokenizer_dir: Path
    vae: list[Path]
    vae_config: Path
    scheduler_config: Path | None
    missing: list[Path] = field(default_factory=list)

    def check(self) -> None:
        if self.missing:
            names = "\n  ".join(str(p) for p in self.missing)
            raise UserError(f"missing weight files ({self.layout} layout):\n  {names}")


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def find_model_files(model_dir: str | Path, transformer_stem: str = "ZImageBase") -> ModelFiles:
    """Recognise the layout of model_dir and list its files (missing ones in `.missing`)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model folder not found: {root}")
    if (root / "model_index.json").is_file():
        te_dir = root / "text_encoder"
        files = ModelFiles(
            layout="diffusers",
            transformer=_shards(root / "transformer", "diffusion_pytorch_model.safetensors.index.json"),
            transformer_config=root / "transformer" / "config.json",
            text_encoder=_shards(te_dir, "model.safetensors.index.json"),
            text_encoder_config=te_dir / "config.json",
            tokenizer_dir=root / "tokenizer",
            vae=_shards(root / "vae", "diffusion_pytorch_model.safetensors.index.json"),
            vae_config=root / "vae" / "config.json",
            scheduler_config=root / "scheduler" / "scheduler_config.json",
        )
        for name, part in (("transformer", files.transformer), ("text_encoder", files.text_encoder),
                           ("vae", files.vae)):
            if not part:
                files.missing.append(root / name / "*.safetensors")
    else:
        te_dir = root / DBM_TEXT_DIR
        tr = root / f"{transformer_stem}_bf16.safetensors"
        files = ModelFiles(
            layout="DeepBeepMeep",
            transformer=[tr],
            transformer_config=None,
            text_encoder=[te_dir / DBM_TEXT_WEIGHTS],
            text_encoder_config=te_dir / "config.json",
            tokenizer_dir=te_dir,
            vae=[root / DBM_VAE],
            vae_config=root / DBM_VAE_CONFIG,
            scheduler_config=root / DBM_SCHEDULER,
        )
    wanted = [*files.transformer, *files.text_encoder, *files.vae, files.text_encoder_config, files.vae_config]
    if files.layout == "diffusers":
        wanted.append(files.tokenizer_dir / "tokenizer_config.json")
    else:
        wanted.append(files.tokenizer_dir / "tokenizer.json")
    files.missing += [p for p in wanted if "*" not in p.name and not p.is_file()]
    return files


# ---------------------------------------------------------------- safetensors reading

def read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise UserError(f"missing weight file: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt or unreadable weight file {path}: {e}") from None


def read_state_dict(paths: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except FileNotFoundError:
            raise UserError(f"missing weight file: {path}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"corrupt or unreadable weight file {path}: {e}") from None
    return sd


def key_mismatch(missing, unexpected) -> str | None:
    """'N missing keys (first: ...); M unexpected keys (first: ...)', or None when both are empty."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(sorted(missing)[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(sorted(unexpected)[:3])})")
    return "; ".join(parts) or None


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str, source: list[Path]) -> None:
    """Strict load with a message naming the first few missing or unexpected keys."""
    expected = set(model.state_dict().keys())
    where = ", ".join(str(p) for p in source)
    problem = key_mismatch(expected - sd.keys(), sd.keys() - expected)
    if problem:
        raise UserError(f"{what} checkpoint {where} does not match the model: {problem}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{what} checkpoint {where} has wrong tensor shapes: {first}") from None


# ---------------------------------------------------------------- transformer

_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _convert_key(key: str) -> str | None:
    """One ComfyUI / original single-file key -> its diffusers key (None: a tensor the model drops).

    A fused `.attention.qkv.weight` keeps its name here; the callers split it."""
    for prefix in _SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key == "norm_final.weight":
        return None  # present in original files, unused by the model (diffusers drops it too)
    if key.startswith("x_embedder."):
        key = "all_x_embedder.2-1." + key[len("x_embedder."):]
    elif key.startswith("final_layer."):
        key = "all_final_layer.2-1." + key[len("final_layer."):]
    key = key.replace(".attention.out.", ".attention.to_out.0.")
    key = re.sub(r"\.attention\.q_norm\.", ".attention.norm_q.", key)
    return re.sub(r"\.attention\.k_norm\.", ".attention.norm_k.", key)


def convert_transformer_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI / original single-file keys -> diffusers keys; diffusers keys pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = _convert_key(key)
        if key is None:
            continue
        if key.endswith(".attention.qkv.weight"):
            base = key[: -len("qkv.weight")]
            q, k, v = value.chunk(3, dim=0)
            out[base + "to_q.weight"], out[base + "to_k.weight"], out[base + "to_v.weight"] = q, k, v
            continue
        out[key] = value
    return out


def transformer_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """The diffusers names and shapes of the tensors in files, read from their headers only.

    quanto int8 files name a weight's data `<module>.weight._data`: it is reported as `<module>.weight`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for raw in f.keys():
                    key = _convert_key(raw)
                    if key is None or key.endswith(("._scale", ".input_scale", ".output_scale")):
                        continue
                    key = key.removesuffix("._data")
                    shape = tuple(f.get_slice(raw).get_shape())
                    if key.endswith(".attention.qkv.weight"):
                        base = key[: -len("qkv.weight")]
                        for part in ("to_q", "to_k", "to_v"):
                            shapes[f"{base}{part}.weight"] = (shape[0] // 3, *shape[1:])
                        continue
                    shapes[key] = shape
        except FileNotFoundError:
            raise UserError(f"missing weight file: {path}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"corrupt or unreadable weight file {path}: {e}") from None
    return shapes


def infer_transformer_config(shapes: dict[str, tuple[int, ...]], source: Path) -> ZImageConfig:
    """The architecture a checkpoint's tensor shapes describe, as ComfyUI detects models.

    Read from the shapes: dim and patch sizes (the x embedder), the channel count, the number of
    main and refiner layers, heads and KV heads (the q/k norm size is the head dim), the caption
    width, whether q/k are normed. Not in the shapes, so the 6B values: norm eps, RoPE theta and
    table lengths, the timestep scale. The RoPE axes split the head dim 1/4, 3/8, 3/8 as the 6B's
    128 = 32 + 48 + 48 does.
    """
    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise UserError(f"{source} is not a Z-Image transformer: it has no tensor {key!r} "
                            f"(first keys: {', '.join(sorted(shapes)[:3]) or 'none'})")
        return shapes[key]

    embedders = sorted(k for k in shapes if re.fullmatch(r"all_x_embedder\.\d+-\d+\.weight", k))
    if len(embedders) != 1:
        need("all_x_embedder.2-1.weight")  # names the key when there is none
        raise UserError(f"{source}: several patch embedders ({', '.join(embedders)}): not a Z-Image checkpoint")
    p, pf = (int(n) for n in embedders[0].split(".")[1].split("-"))
    dim, patch_in = need(embedders[0])
    if patch_in % (p * p * pf):
        raise UserError(f"{source}: tensor {embedders[0]} of shape {(dim, patch_in)} fits no {p}x{p} patch layout")

    def count(prefix: str) -> int:
        found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    n_layers, n_refiner = count("layers"), count("noise_refiner")
    if n_layers == 0:
        need("layers.0.attention.to_q.weight")
    norm_q = shapes.get("layers.0.attention.norm_q.weight")
    head_dim = norm_q[0] if norm_q else None
    if head_dim is None:  # no q/k norm: the 6B's head dim
        head_dim = sum(ZImageConfig().axes_dims)
    q_rows = need("layers.0.attention.to_q.weight")[0]
    k_rows = need("layers.0.attention.to_k.weight")[0]
    if dim % head_dim or q_rows != dim or k_rows % head_dim or head_dim % 8:
        raise UserError(f"{source}: tensor layers.0.attention.norm_q.weight (head dim {head_dim}) does not "
                        f"divide the width {dim} (to_q {q_rows} rows, to_k {k_rows}): no Z-Image architecture fits")
    cap = need("cap_embedder.1.weight")
    quarter = head_dim // 4
    axes = [quarter, (head_dim - quarter) // 2, head_dim - quarter - (head_dim - quarter) // 2]
    return ZImageConfig(all_patch_size=[p], all_f_patch_size=[pf], in_channels=patch_in // (p * p * pf), dim=dim,
                        n_layers=n_layers, n_refiner_layers=n_refiner, n_heads=dim // head_dim,
                        n_kv_heads=k_rows // head_dim, qk_norm=norm_q is not None, cap_feat_dim=cap[1],
                        axes_dims=axes)


def _fits(cfg: ZImageConfig, shapes: dict[str, tuple[int, ...]]) -> bool:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ZImageTransformer(cfg).state_dict().items()}
    return all(shapes.get(k) == v for k, v in expected.items())


def transformer_config(files: list[Path], config_path: Path | None, folder_config: Path | None = None,
                       shapes: dict[str, tuple[int, ...]] | None = None) -> ZImageConfig:
    """config.json when given, else the file's metadata, else a sibling json, else the model folder's
    config when the file's tensors fit it, else the architecture read from the tensors' shapes.

    shapes: the (diffusers) names and shapes of the tensors of files that are no safetensors files (GGUF):
    they have no metadata to read a config from, nor a header transformer_shapes can read."""
    if config_path is not None:
        return _config_or_error(_read_json(config_path), config_path)
    meta = read_metadata(files[0]) if shapes is None else {}
    if meta.get("config"):
        try:
            return _config_or_error(json.loads(meta["config"]), files[0])
        except ValueError as e:
            raise UserError(f"bad config metadata in {files[0]}: {e}") from None
    for sibling in (files[0].with_name(files[0].stem + "_config.json"), files[0].with_name("config.json")):
        if sibling.is_file():
            return _config_or_error(_read_json(sibling), sibling)
    shapes = transformer_shapes(files) if shapes is None else shapes
    if folder_config is not None and Path(folder_config).is_file():
        cfg = _config_or_error(_read_json(folder_config), folder_config)
        if _fits(cfg, shapes):
            return cfg
    return infer_transformer_config(shapes, files[0])


def _config_or_error(cfg: dict, source: Path) -> ZImageConfig:
    try:
        return ZImageConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad transformer config in {source}: {e}") from None


def with_optional_modules(model: ZImageTransformer, keys) -> ZImageTransformer:
    """model with the optional modules whose tensors the checkpoint's (diffusers) keys hold: TwinFlow's
    `t_embedder_2.*` (its reference model's target-time embedder; Wan2GP's TwinFlow has none)."""
    prefix = ZImageTransformer.TARGET_EMBEDDER + "."
    if any(k.startswith(prefix) for k in keys):
        model.add_target_embedder()
    return model


def load_transformer(
    files: list[Path], config_path: Path | None, dtype: torch.dtype, device: torch.device,
    folder_config: Path | None = None,
) -> ZImageTransformer:
    cfg = transformer_config(files, config_path, folder_config)
    sd = convert_transformer_keys(read_state_dict(files))
    with torch.device("meta"):
        model = with_optional_modules(ZImageTransformer(cfg), sd)
    _load_into(model, sd, "transformer", files)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------- text encoder

def load_text_encoder(
    files: list[Path], config_path: Path, tokenizer_dir: Path, dtype: torch.dtype, device: torch.device
) -> PromptEncoder:
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    try:
        config = AutoConfig.from_pretrained(str(config_path.parent))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read text encoder config {config_path}: {e}") from None
    cfg = truncated_config(config)
    dropped = f"layers.{cfg.num_hidden_layers}."
    sd = {}
    for key, value in read_state_dict(files).items():
        key = key[len("model."):] if key.startswith("model.") else key
        if key.startswith(dropped) or key.startswith("lm_head.") or key == "norm.weight":
            continue  # the last layer, the final norm and the LM head are never run
        sd[key] = value
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    model.norm = nn.Identity()
    del model.rotary_emb
    _load_into(model, sd, "text encoder", files)
    return finish_text_encoder(model.to(device=device, dtype=dtype), cfg, tokenizer_dir, device)


def finish_text_encoder(model: nn.Module, cfg, tokenizer_dir: Path, device: torch.device) -> PromptEncoder:
    """RoPE tables, eval mode and the tokenizer, once the weights are loaded and cast."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    # built after the dtype cast so the RoPE frequencies stay float32, as in transformers
    model.rotary_emb = Qwen3RotaryEmbedding(config=cfg).to(device)
    model.eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {tokenizer_dir}: {e}") from None
    return PromptEncoder(model, tokenizer)


# ---------------------------------------------------------------- VAE and scheduler

def load_vae(files: list[Path], config_path: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    cfg = _read_json(config_path)
    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad VAE config {config_path}: {e}") from None
    _load_into(vae, read_state_dict(files), "VAE", files)
    # plain Module.to: ModelMixin.to warns about fp32 modules the Flux VAE does not have
    return nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)


def scheduler_shift(config_path: Path | None, default: float = 3.0) -> float:
    if config_path is None or not Path(config_path).is_file():
        return default
    return float(_read_json(config_path).get("shift", default))
