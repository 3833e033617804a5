"""`z_image_tiny`: a tiny random-weights Z-Image in the diffusers layout, made on first use.

It exercises every real code path (tokenizer with a Qwen-style chat template, Qwen3, the S3-DiT,
the Flux-style VAE) in a few MB and a few seconds on any CPU. Its images are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from models.files import creation_mode
from models.z_image.transformer import ZImageConfig, ZImageTransformer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

TINY_TRANSFORMER = {
    "in_channels": 16, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
    "cap_feat_dim": 32, "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512],
}
TINY_QWEN3 = {
    "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64, "use_quant_conv": False,
    "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
TINY_NOTE = "wgp-zimage tiny smoke-test model: random weights, produces noise"
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": False,
}


def build_tokenizer():
    """A byte-level BPE tokenizer (no merges) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
    )


def _randomize(module: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    """Deterministic random weights; norms near 1 so every weight matters, pads non-zero."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(noise * scale / fan_in**0.5)


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model (diffusers layout) to folder atomically; returns folder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        gen = torch.Generator("cpu").manual_seed(seed)
        (tmp / "transformer").mkdir()
        cfg = ZImageConfig.from_dict(TINY_TRANSFORMER)
        tr = ZImageTransformer(cfg)
        _randomize(tr, gen, 1.0)
        save_file({k: v.contiguous() for k, v in tr.state_dict().items()},
                  tmp / "transformer" / "diffusion_pytorch_model.safetensors")
        (tmp / "transformer" / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

        (tmp / "text_encoder").mkdir()
        qcfg = Qwen3Config(**TINY_QWEN3)
        te = Qwen3Model(qcfg)
        _randomize(te, gen, 1.0)
        te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        build_tokenizer().save_pretrained(tmp / "tokenizer")

        (tmp / "vae").mkdir()
        vae = AutoencoderKL(**TINY_VAE)
        _randomize(vae, gen, 0.5)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)

        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "_note": TINY_NOTE,
        }, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.chmod(tmp, creation_mode(directory=True))  # mkdtemp's folders are private (0700)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_tiny_model(folder: str | Path) -> bool:
    """Whether folder holds a tiny model written by write_tiny_model."""
    try:
        return json.loads((Path(folder) / "model_index.json").read_text()).get("_note") == TINY_NOTE
    except (OSError, ValueError, AttributeError):
        return False


CONTROLNET_FOLDER = "controlnet"  # the tiny ControlNet (`z_image_tiny_control`), a diffusers folder


def write_tiny_controlnet(folder: str | Path, seed: int = 1) -> Path:
    """A tiny ControlNet Union 2.1 for the tiny model (a control block per main layer, its own refiner, the
    inpaint channels), written atomically as a diffusers folder; returns folder. Its projections are random,
    not zero as in training, so the control map visibly changes the (noise) image."""
    from safetensors.torch import save_file

    from models.z_image import controlnet as zc

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t = TINY_TRANSFORMER
    cfg = zc.ControlNetConfig(
        control_layers_places=list(range(t["n_layers"])), control_refiner_layers_places=list(
            range(t["n_refiner_layers"])), control_in_dim=zc.INPAINT_IN_DIM,
        add_control_noise_refiner=zc.REFINER_IS_OWN, dim=t["dim"], n_refiner_layers=t["n_refiner_layers"],
        n_heads=t["n_heads"], n_kv_heads=t["n_kv_heads"])
    net = zc.ZImageControlNet(cfg)
    _randomize(net, torch.Generator("cpu").manual_seed(seed), 1.0)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-control-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  tmp / "diffusion_pytorch_model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.chmod(tmp, creation_mode(directory=True))
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_tiny_model(folder: str | Path, controlnet: bool = False) -> Path:
    """The tiny model in folder, written on first use; controlnet: with its tiny ControlNet (folder/controlnet)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        write_tiny_model(folder)
    if controlnet and not (folder / CONTROLNET_FOLDER / "config.json").is_file():
        write_tiny_controlnet(folder / CONTROLNET_FOLDER)
    return folder
