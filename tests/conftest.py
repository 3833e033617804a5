"""Fixtures: tiny Z-Image models (random weights) in every file layout we load.

The models are real: a byte-level BPE tokenizer with a Qwen-style chat template, a tiny Qwen3,
the S3-DiT at dim 64 and a Flux-style VAE with small group norms, written in the same file
formats as the real checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def run_cli(*args: str, timeout: float = 240, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run wgp_zimage.py in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "wgp_zimage.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run wgp_zimage's main in this process; (exit code, stdout, stderr)."""
    import wgp_zimage

    rc = wgp_zimage.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def pixels(path: Path):
    """An image file's RGB pixels as ints."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model in the official diffusers layout (single files)."""
    from models.z_image.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "diffusers", seed=1)


def _shard(sd: dict[str, torch.Tensor], folder: Path, stem: str, index_name: str) -> None:
    keys = sorted(sd)
    half = len(keys) // 2
    names = [f"{stem}-00001-of-00002.safetensors", f"{stem}-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        save_file({k: sd[k].contiguous() for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def tiny_sharded_dir(tiny_dir, tmp_path_factory) -> Path:
    """The same model, diffusers layout with transformer and text encoder in two shards each."""
    out = tmp_path_factory.mktemp("models") / "sharded"
    shutil.copytree(tiny_dir, out)
    tr = out / "transformer" / "diffusion_pytorch_model.safetensors"
    _shard(load_file(tr), tr.parent, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json")
    tr.unlink()
    te = out / "text_encoder" / "model.safetensors"
    _shard(load_file(te), te.parent, "model", "model.safetensors.index.json")
    te.unlink()
    return out


@pytest.fixture(scope="session")
def tiny_dbm_dir(tiny_dir, tmp_path_factory) -> Path:
    """The same model as the DeepBeepMeep/Z-Image file set (Base and Turbo names, Qwen3/ folder)."""
    out = tmp_path_factory.mktemp("models") / "dbm"
    out.mkdir()
    cfg = (tiny_dir / "transformer" / "config.json").read_text()
    sd = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(sd, out / "ZImageBase_bf16.safetensors", metadata={"config": cfg})
    shutil.copy(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors", out / "ZImageTurbo_VAE_bf16.safetensors")
    shutil.copy(tiny_dir / "vae" / "config.json", out / "ZImageTurbo_VAE_bf16_config.json")
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    (out / "ZImageTurbo_scheduler_config.json").write_text(json.dumps({**sched, "shift": 3.0}))
    qwen = out / "Qwen3"
    qwen.mkdir()
    te = load_file(tiny_dir / "text_encoder" / "model.safetensors")
    # a causal-LM style file: "model." prefix and an LM head the encoder must ignore
    te = {f"model.{k}": v for k, v in te.items()}
    te["lm_head.weight"] = torch.zeros(260, 32)
    save_file(te, qwen / "qwen3_bf16.safetensors")
    shutil.copy(tiny_dir / "text_encoder" / "config.json", qwen / "config.json")
    for f in (tiny_dir / "tokenizer").iterdir():
        if f.suffix != ".jinja":
            shutil.copy(f, qwen / f.name)
    # like the real Qwen3 folder: the chat template inside tokenizer_config.json
    tc = json.loads((qwen / "tokenizer_config.json").read_text())
    tc["chat_template"] = (tiny_dir / "tokenizer" / "chat_template.jinja").read_text()
    (qwen / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


def to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers transformer keys -> ComfyUI / original single-file keys (fused qkv)."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            base = k.split(".attention.to_q.")[0]
            qkv = torch.cat([v, sd[f"{base}.attention.to_k.weight"], sd[f"{base}.attention.to_v.weight"]])
            out[f"model.diffusion_model.{base}.attention.qkv.weight"] = qkv
            continue
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".attention.to_out.0.", ".attention.out.")
        k = k.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        out[f"model.diffusion_model.{k}"] = v
    out["model.diffusion_model.norm_final.weight"] = torch.ones(64)
    return out


@pytest.fixture(scope="session")
def tiny_comfy_file(tiny_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "z_image_comfy.safetensors"
    sd = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(to_comfy(sd), path, metadata={"config": (tiny_dir / "transformer" / "config.json").read_text()})
    return path


# -- comparisons with diffusers (tiny fp32 models)

# Measured: our final latents within 1.1e-6 (turbo) / 7.6e-6 (base) of diffusers'. 1e-4 leaves room for other
# CPUs' kernels (AMX or not); a real bug moves them far more (an image read as x / 256: ~1e-3 and up).
LATENT_ATOL = 1e-4


def assert_latents_match(ours: torch.Tensor, ref: torch.Tensor, atol: float = LATENT_ATOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours.float().cpu() - ref.float().cpu()).abs().max().item()
    assert diff <= atol, f"latents differ from diffusers' by {diff:.2e} (> {atol:g})"


def assert_pixels_match(ours, ref) -> None:
    """8-bit images decoded from matching latents: now and then a value lands on the other side of a rounding
    step (measured: by 1, on 0.003-0.008 % of the values), never systematically (truncating instead of rounding
    moves about half of them)."""
    import numpy as np

    diff = np.abs(np.asarray(ours).astype(np.int16) - np.asarray(ref).astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3 and diff.mean() < 0.01, (
        f"pixels: max {diff.max()}, mean {diff.mean():.2e}, {100 * (diff > 0).mean():.3f} % differ")


class DiffusersLatents:
    """callback_on_step_end for a diffusers pipeline: keeps the latents after each step (the last: the final
    latents, which its output decodes)."""

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None

    def __call__(self, pipe, step, timestep, kwargs: dict) -> dict:
        self.latents = kwargs["latents"].detach().clone()
        return {}


# -- the low-bit PSNR table

def pytest_terminal_summary(terminalreporter) -> None:
    """The PSNRs the low-bit rendering tests measured, each with its test bound: the README's table comes from
    `pytest -p no:cacheprovider tests/test_gguf.py tests/test_fp8.py tests/test_fp8_compute.py` (printed at the
    end of the run; nothing when none of those tests ran)."""
    lines = []
    for name, label in (("test_gguf", "GGUF"), ("test_fp8", "fp8"), ("test_fp8_compute", "fp8 compute")):
        mod = sys.modules.get(f"tests.{name}") or sys.modules.get(name)
        bounds = getattr(mod, "PSNR_BOUNDS", {})
        for case, value in getattr(mod, "MEASURED", {}).items():
            bound = f" (bound {bounds[case]})" if case in bounds else ""
            lines.append(f"{label} {case}: {value:.1f} dB{bound}")
    if lines:
        terminalreporter.write_sep("-", "measured PSNRs (README's low-bit table)")
        for line in lines:
            terminalreporter.write_line(line)
