"""GPU speed benchmark: our Z-Image against diffusers, full-size random weights, one run.

Measures our transformer step (1024x1024 with and without CFG, 2048x2048, eager and regional
`--compile`), diffusers' transformer in the same run for the ratio, prompt encode, VAE decode
fp32/bf16, end-to-end Base (30 steps) and Turbo (8 steps), peak VRAM, and checks the fast path
(bf16, compiled) against the reference path (fp32 eager) on the GPU. Prints a table and writes
`$OUT/speed.json`; append the table to bench/RESULTS.md with card, date and command.

Random weights: compute cost only, no images. `DRY=1` runs tiny shapes on the CPU (checks the
script). On the lent GPU machine (torch, transformers, safetensors there; diffusers carried):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
    run: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:. OUT=$OUT PYTHONUNBUFFERED=1 python3 bench/speed_gpu.py
"""

from __future__ import annotations

import json
import os
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.z_image.pipeline import ZImagePipeline
from models.z_image.text_encoder import PromptEncoder, truncated_config
from models.z_image.tiny import TINY_QWEN3, TINY_TRANSFORMER, TINY_VAE, build_tokenizer
from models.z_image.transformer import ZImageConfig, ZImageTransformer, compile_blocks

DRY = bool(os.environ.get("DRY"))
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
dev = torch.device("cpu" if DRY else "cuda")
bf16 = torch.bfloat16
SIDE, BIG, CAP, CAP_DIM = (64, 128, 16, 32) if DRY else (1024, 2048, 128, 2560)
REPS = 2 if DRY else 5
res: dict = {"torch": torch.__version__, "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0),
             "date": time.strftime("%Y-%m-%d")}


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, warm: int = 1, reps: int = REPS) -> float:
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return st.median(ts)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0


def rand_(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to_empty(device=dev).to(dtype)
    gen = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return module.eval().requires_grad_(False)


def diffusers_steps(x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> dict:
    """diffusers' transformer on the same inputs, eager then compiled (its own regional compile)."""
    try:
        from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    except ImportError as e:
        return {"diffusers": f"not available: {e}"}
    with torch.device("meta"):
        theirs = ZImageTransformer2DModel(**(TINY_TRANSFORMER if DRY else {}))
    theirs = rand_(theirs, bf16)
    xs = [xi.unsqueeze(1) for xi in x]
    out = {"diffusers_step_cfg_1024_eager_s": timeit(lambda: theirs(xs, t, caps, return_dict=False))}
    theirs.compile_repeated_blocks(fullgraph=True)
    t0 = time.perf_counter()
    theirs(xs, t, caps, return_dict=False)
    sync()
    out["diffusers_compile_first_call_s"] = time.perf_counter() - t0
    out["diffusers_step_cfg_1024_compiled_s"] = timeit(lambda: theirs(xs, t, caps, return_dict=False))
    return out


print("start", res, flush=True)
cfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
with torch.device("meta"):
    ours = ZImageTransformer(cfg)
ours = rand_(ours, bf16)
res["transformer_params_B"] = sum(p.numel() for p in ours.parameters()) / 1e9


def lat(side: int, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 16, side // 8, side // 8, device=dev, dtype=bf16)


cap = torch.randn(CAP, CAP_DIM, device=dev, dtype=bf16)
neg = torch.randn(CAP - 5, CAP_DIM, device=dev, dtype=bf16)  # same padded length: one batched call
t2, t1 = torch.tensor([0.5, 0.5], device=dev), torch.tensor([0.5], device=dev)
x1, x2 = lat(SIDE), lat(SIDE, 2)
with torch.no_grad():
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res["ours_step_cfg_1024_eager_s"] = timeit(lambda: ours(x2, t2, [cap, neg]))
    res["ours_step_nocfg_1024_eager_s"] = timeit(lambda: ours(x1, t1, [cap]))
    res["ours_step_cfg_2048_eager_s"] = timeit(lambda: ours(lat(BIG, 2), t2, [cap, neg]), reps=max(2, REPS // 2))
    res["ours_peak_2048_gib"] = peak_gib()

    # reference path on the GPU: fp32 eager, a few layers are enough to bound the bf16 error
    ref_cfg = ZImageConfig.from_dict({**cfg.to_dict(), "n_layers": 2})
    with torch.device("meta"):
        ref32 = ZImageTransformer(ref_cfg)
    ref32 = rand_(ref32, torch.float32)
    fast = ZImageTransformer(ref_cfg).to(device=dev, dtype=bf16).eval()
    fast.load_state_dict({k: v.to(bf16) for k, v in ref32.state_dict().items()})
    want = ref32(x1.float(), t1, [cap.float()])
    compile_blocks(fast)
    got = fast(x1, t1, [cap]).float()
    res["fast_vs_reference_rel_err"] = ((got - want).norm() / want.norm()).item()
    del ref32, fast

    res.update(diffusers_steps(x2, t2, [cap, neg]))
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    compile_blocks(ours)
    ours(x2, t2, [cap, neg])
    sync()
    res["ours_compile_first_call_s"] = time.perf_counter() - t0
    res["ours_step_cfg_1024_compiled_s"] = timeit(lambda: ours(x2, t2, [cap, neg]))
    t0 = time.perf_counter()
    ours(x2, t2, [torch.randn(CAP + 40, CAP_DIM, device=dev, dtype=bf16)] * 2)  # new prompt length
    sync()
    res["ours_new_prompt_length_first_call_s"] = time.perf_counter() - t0

    # text encoder and VAE, then whole jobs through our pipeline
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    qcfg = Qwen3Config(**TINY_QWEN3) if DRY else Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)
    with torch.device("meta"):
        qwen = Qwen3Model(truncated_config(qcfg))
    qwen.norm = torch.nn.Identity()
    qwen = rand_(qwen, bf16)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    qwen.rotary_emb = Qwen3RotaryEmbedding(config=truncated_config(qcfg)).to(dev)
    encoder = PromptEncoder(qwen, build_tokenizer())
    prompt = "a photograph of a red fox in the snow at dawn, " * (3 if DRY else 6)
    res["encode_s"] = timeit(lambda: (encoder.cache.clear(), encoder.encode(prompt)))
    vcfg = TINY_VAE if DRY else {**TINY_VAE, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                 "norm_num_groups": 32}
    with torch.device("meta"):
        vae = AutoencoderKL(**vcfg)
    vae = rand_(vae, torch.float32)
    z = torch.randn(1, 16, SIDE // 8, SIDE // 8, device=dev)
    res["vae_decode_fp32_s"] = timeit(lambda: vae.decode(z))
    vae16 = vae.to(bf16)
    res["vae_decode_bf16_s"] = timeit(lambda: vae16.decode(z.to(bf16)))
    vae = vae16.float()

    pipe = ZImagePipeline(ours, encoder, vae, default_shift=6.0, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name, steps, g in (("base_30_steps", 30, 4.0), ("turbo_8_steps", 8, 0.0)):
        encoder.cache.clear()
        t0 = time.perf_counter()
        pipe(prompt=prompt, negative_prompt="blurry", height=SIDE, width=SIDE, num_inference_steps=3 if DRY else steps,
             guidance_scale=g, seed=1)
        sync()
        res[f"e2e_{name}_compiled_s"] = time.perf_counter() - t0
    res["e2e_peak_gib"] = peak_gib()

for key in ("eager", "compiled"):
    a, b = res.get(f"ours_step_cfg_1024_{key}_s"), res.get(f"diffusers_step_cfg_1024_{key}_s")
    if a and b:
        res[f"ratio_{key}_ours_over_diffusers"] = a / b
width = max(len(k) for k in res)
for k, v in res.items():
    print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "speed.json").write_text(json.dumps(res, indent=1))
