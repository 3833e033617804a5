"""GPU speed benchmark: our Z-Image against diffusers, full-size random weights, one run.

Measures our transformer step (1024x1024 with and without CFG, 2048x2048, eager and regional
`--compile`), diffusers' transformer in the same run for the ratio, prompt encode, VAE decode
fp32/bf16, end-to-end Base (30 steps) and Turbo (8 steps), peak VRAM, and checks the fast path
(bf16, compiled) against the reference path (fp32 eager) on the GPU; fp8 compute (issue 18: the same weights
as scaled fp8, torch._scaled_mm) eager and compiled, its step output's PSNR against bf16's. Then the levers of the speed
issue: SDPA kernels (flash / cuDNN / efficient), fused QKV and w1/w3 projections (per-layer
micro-benchmark scaled to the model), launch overhead and CUDA-graph capture at 512x512, and a
kernel profile of one compiled step; opt-in (COMPILE_LEVERS), static shapes but the sequence,
inductor's coordinate-descent tuning and max-autotune. Each section is independent: a failure is recorded and the
rest runs. Prints a table and writes `$OUT/speed.json` (after every section) and
`$OUT/speed_profile.txt`; append the table to bench/RESULTS.md with card, date and command.

Random weights: compute cost only, no images. `DRY=1` runs tiny shapes on the CPU (checks the
script). On the lent GPU machine carry diffusers as a wheel (see bench/offload_gpu.py), then:
    PYTHONPATH=/tmp/site:. OUT=$OUT PYTHONUNBUFFERED=1 python3 bench/speed_gpu.py
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics as st
import sys
import tempfile
import time
import traceback
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
SIDE, BIG, SMALL, CAP, CAP_DIM = (64, 128, 32, 16, 32) if DRY else (1024, 2048, 512, 128, 2560)
REPS = 2 if DRY else 5
T0 = time.perf_counter()
res: dict = {"torch": torch.__version__, "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0),
             "date": time.strftime("%Y-%m-%d"), "errors": {}}


def say(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


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


def dump() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.json").write_text(json.dumps(res, indent=1))


SKIP = set(os.environ.get("SKIP", "").split())  # sections measured in an earlier run, left out to save device time


def want(name: str) -> bool:
    if name in SKIP:
        say("skip", name)
    return name not in SKIP


@contextlib.contextmanager
def section(name: str):
    """Run one part; an exception is recorded and the next part runs."""
    say("section", name)
    try:
        with torch.no_grad():
            yield
    except Exception as e:
        traceback.print_exc()
        res["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        dump()


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


def lat(side: int, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 16, side // 8, side // 8, device=dev, dtype=bf16)


say("start", res)
cfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
with torch.device("meta"):
    ours = ZImageTransformer(cfg)
ours = rand_(ours, bf16)
res["transformer_params_B"] = sum(p.numel() for p in ours.parameters()) / 1e9
cap = torch.randn(CAP, CAP_DIM, device=dev, dtype=bf16)
neg = torch.randn(CAP - 5, CAP_DIM, device=dev, dtype=bf16)  # same padded length: one batched call
t2, t1 = torch.tensor([0.5, 0.5], device=dev), torch.tensor([0.5], device=dev)
x1, x2 = lat(SIDE), lat(SIDE, 2)
cfg_step = lambda: ours(x2, t2, [cap, neg])

if want("eager"):
    with section("eager"):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["ours_step_cfg_1024_eager_s"] = timeit(cfg_step)
        res["ours_step_nocfg_1024_eager_s"] = timeit(lambda: ours(x1, t1, [cap]))
        res["ours_peak_1024_cfg_gib"] = peak_gib()
        big = lat(BIG, 2)
        res["ours_step_cfg_2048_eager_s"] = timeit(lambda: ours(big, t2, [cap, neg]), reps=max(2, REPS // 2))
        res["ours_peak_2048_cfg_gib"] = peak_gib()
        big = None

if want("diffusers"):
    with section("diffusers"):
        from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

        with torch.device("meta"):
            theirs = ZImageTransformer2DModel(**(TINY_TRANSFORMER if DRY else {}))
        theirs = rand_(theirs, bf16)
        xs = [xi.unsqueeze(1) for xi in x2]
        res["diffusers_step_cfg_1024_eager_s"] = timeit(lambda: theirs(xs, t2, [cap, neg], return_dict=False))
        theirs.compile_repeated_blocks(fullgraph=True)
        t0 = time.perf_counter()
        theirs(xs, t2, [cap, neg], return_dict=False)
        sync()
        res["diffusers_compile_first_call_s"] = time.perf_counter() - t0
        res["diffusers_step_cfg_1024_compiled_s"] = timeit(lambda: theirs(xs, t2, [cap, neg], return_dict=False))
theirs = None

if want("compiled"):
    with section("compiled"):
        t0 = time.perf_counter()
        compile_blocks(ours)
        cfg_step()
        sync()
        res["ours_compile_first_call_s"] = time.perf_counter() - t0
        res["ours_step_cfg_1024_compiled_s"] = timeit(cfg_step)
        res["ours_step_nocfg_1024_compiled_s"] = timeit(lambda: ours(x1, t1, [cap]))
        from torch._dynamo.utils import counters

        frames = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        ours(x2, t2, [torch.randn(CAP + 40, CAP_DIM, device=dev, dtype=bf16)] * 2)  # new prompt length
        sync()
        res["ours_new_prompt_length_first_call_s"] = time.perf_counter() - t0
        res["ours_new_prompt_length_new_graphs"] = counters["stats"]["unique_graphs"] - frames
        t0 = time.perf_counter()
        ours(x2, t2, [torch.randn(CAP + 40, CAP_DIM, device=dev, dtype=bf16)] * 2)
        sync()
        res["ours_new_prompt_length_second_call_s"] = time.perf_counter() - t0

if want("small_size_launch_overhead"):
    with section("small_size_launch_overhead"):
        # CUDA graphs only pay where issuing the kernels (CPU) takes longer than running them (GPU)
        xs2 = lat(SMALL, 2)
        small = lambda: ours(xs2, t2, [cap, neg])
        res["ours_step_cfg_512_compiled_s"] = timeit(small)
        sync()
        t0 = time.perf_counter()
        small()
        res["ours_step_cfg_512_cpu_issue_s"] = time.perf_counter() - t0
        sync()
        with torch.device("meta"):
            eager_copy = ZImageTransformer(cfg)
        eager_copy = rand_(eager_copy, bf16)
        res["ours_step_cfg_512_eager_s"] = timeit(lambda: eager_copy(xs2, t2, [cap, neg]))
        sync()
        t0 = time.perf_counter()
        eager_copy(xs2, t2, [cap, neg])
        res["ours_step_cfg_512_eager_cpu_issue_s"] = time.perf_counter() - t0
        sync()
        if dev.type == "cuda":
            try:  # a whole eager step captured as one CUDA graph (static inputs)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        eager_copy(xs2, t2, [cap, neg])
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    eager_copy(xs2, t2, [cap, neg])
                res["ours_step_cfg_512_eager_cudagraph_s"] = timeit(graph.replay)
            except Exception as e:
                res["ours_step_cfg_512_eager_cudagraph_s"] = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
        eager_copy = None

if want("encode_vae_e2e"):
    with section("encode_vae_e2e"):
        from diffusers import AutoencoderKL
        from transformers import Qwen3Config, Qwen3Model
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        qcfg = Qwen3Config(**TINY_QWEN3) if DRY else Qwen3Config(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)
        with torch.device("meta"):
            qwen = Qwen3Model(truncated_config(qcfg))
        qwen.norm = torch.nn.Identity()
        qwen = rand_(qwen, bf16)
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
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["vae_decode_fp32_s"] = timeit(lambda: vae.decode(z), reps=3)
        res["vae_decode_fp32_peak_gib"] = peak_gib()
        vae16 = vae.to(bf16)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["vae_decode_bf16_s"] = timeit(lambda: vae16.decode(z.to(bf16)), reps=3)
        res["vae_decode_bf16_peak_gib"] = peak_gib()
        vae = vae16.float()
        # lever: channels-last (NHWC) convolutions, which cuDNN often runs faster; same weights
        vae.to(memory_format=torch.channels_last)
        res["lever_vae_decode_fp32_channels_last_s"] = timeit(
            lambda: vae.decode(z.contiguous(memory_format=torch.channels_last)), reps=3)
        vae.to(memory_format=torch.contiguous_format)
        pipe = ZImagePipeline(ours, encoder, vae, default_shift=6.0, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # the first run of a prompt length pays ~0.55 s once (attention plans for the new sequence length);
        # "repeat" is the same job again (prompt encoded again): what every later image of that prompt takes
        jobs = (("base_30_steps", 30, 4.0), ("base_30_steps_repeat", 30, 4.0), ("turbo_8_steps", 8, 0.0))
        for name, steps, g in jobs:
            encoder.cache.clear()
            t0 = time.perf_counter()
            pipe(prompt=prompt, negative_prompt="blurry", height=SIDE, width=SIDE,
                 num_inference_steps=3 if DRY else steps, guidance_scale=g, seed=1)
            sync()
            res[f"e2e_{name}_compiled_s"] = time.perf_counter() - t0
        res["e2e_peak_gib"] = peak_gib()
        pipe = encoder = qwen = vae = vae16 = None

if want("profile"):
    with section("profile"):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            cfg_step()
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
        (OUT / "speed_profile.txt").write_text(table)
        print(table[:6000])

if want("fast_vs_reference"):
    with section("fast_vs_reference"):
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

if want("levers_fused_projections"):
    with section("levers_fused_projections"):
        # one layer's projections on the 1024x1024 CFG sequence, scaled by the number of blocks
        seq = (SIDE // 16) ** 2 + CAP
        n_blocks = cfg.n_layers + 2 * cfg.n_refiner_layers
        d, hid = cfg.dim, int(cfg.dim / 3 * 8)
        xin = torch.randn(2, seq, d, device=dev, dtype=bf16)
        wq, wk, wv = (torch.randn(d, d, device=dev, dtype=bf16) * 0.02 for _ in range(3))
        wqkv = torch.cat([wq, wk, wv])
        w1, w3 = (torch.randn(hid, d, device=dev, dtype=bf16) * 0.02 for _ in range(2))
        w13 = torch.cat([w1, w3])
        lin = torch.nn.functional.linear
        reps = 3 if DRY else 20

        def many(fn):
            return lambda: [fn() for _ in range(10)]

        sep_qkv = timeit(many(lambda: (lin(xin, wq), lin(xin, wk), lin(xin, wv))), reps=reps) / 10
        fus_qkv = timeit(many(lambda: lin(xin, wqkv).chunk(3, -1)), reps=reps) / 10
        sep_13 = timeit(many(lambda: torch.nn.functional.silu(lin(xin, w1)) * lin(xin, w3)), reps=reps) / 10
        fus_13 = timeit(many(lambda: (lambda a, b: torch.nn.functional.silu(a) * b)(*lin(xin, w13).chunk(2, -1))),
                        reps=reps) / 10
        res["lever_fused_qkv_saving_per_step_s"] = (sep_qkv - fus_qkv) * n_blocks
        res["lever_fused_w1w3_saving_per_step_s"] = (sep_13 - fus_13) * n_blocks
        res["lever_qkv_separate_per_layer_ms"] = sep_qkv * 1e3
        res["lever_w1w3_separate_per_layer_ms"] = sep_13 * 1e3

if want("levers_sdpa_kernels"):
    with section("levers_sdpa_kernels"):
        # which SDPA kernel serves Z-Image's unmasked bf16 attention fastest (eager step)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(2, 30, (SIDE // 16) ** 2 + CAP, 128, device=dev, dtype=bf16)
        attn = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    res[f"lever_sdpa_{name.lower()}_per_layer_ms"] = timeit(attn, reps=3 if DRY else 20) * 1e3
            except Exception as e:
                res[f"lever_sdpa_{name.lower()}_per_layer_ms"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"

# int8 weights: quanto's layers (the default below 24 GB), then the same weights as plain tensors
# (models.lowbit.Int8Linear, --int8-layers plain), whose dequantization (scale * int8) compile traces with the
# matmul instead of calling quanto's opaque op through its tensor subclass (issue 19: int8 compiled <= 1.05x
# bf16 compiled); eager, then compiled, against the bf16 steps above
for kind in ("int8", "int8_plain"):
    if not want(kind):
        continue
    with section(kind):
        from models.lowbit import plain_int8_layers
        from models.z_image.quantize import quantize_on_the_fly

        torch._dynamo.reset()
        ours = None
        with torch.device("meta"):
            q8 = ZImageTransformer(cfg)
        q8 = quantize_on_the_fly(rand_(q8, bf16))
        if kind == "int8_plain":
            res["int8_plain_layers"] = plain_int8_layers(q8)
        res[f"{kind}_step_cfg_1024_eager_s"] = timeit(lambda m=q8: m(x2, t2, [cap, neg]))
        compile_blocks(q8)
        t0 = time.perf_counter()
        q8(x2, t2, [cap, neg])
        sync()
        res[f"{kind}_compile_first_call_s"] = time.perf_counter() - t0
        res[f"{kind}_step_cfg_1024_compiled_s"] = timeit(lambda m=q8: m(x2, t2, [cap, neg]))
        if res.get("ours_step_cfg_1024_compiled_s"):
            res[f"ratio_{kind}_compiled_over_bf16"] = (res[f"{kind}_step_cfg_1024_compiled_s"]
                                                      / res["ours_step_cfg_1024_compiled_s"])
        q8 = None


def rope_variants(heads: int, head_dim: int) -> dict:
    """Formulations of the attention's q/k RMSNorm + RoPE (8.8 ms of the compiled H200 step, at about a
    quarter of the memory bandwidth): each maps (q, k, wq, wk, cos, sin) -> (q', k') in (B, S, H, D)."""
    from models.z_image.transformer import apply_rope

    fn_ = torch.nn.functional
    eps = 1e-5

    def current(q, k, wq, wk, cos, sin):  # the model's code: bf16 norm, then RoPE on RopeTables' full-width tables
        c, s_ = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
        q, k = fn_.rms_norm(q, (head_dim,), wq, eps), fn_.rms_norm(k, (head_dim,), wk, eps)
        return apply_rope(q, c, s_), apply_rope(k, c, s_)

    def pairs_stack(q, k, wq, wk, cos, sin):  # the model's code before 2026-11-30: (re*c - im*s, re*s + im*c)
        def rope(x):
            xf = x.float().reshape(*x.shape[:-1], -1, 2)
            c, s_ = cos.unsqueeze(2), sin.unsqueeze(2)
            return torch.stack((xf[..., 0] * c - xf[..., 1] * s_, xf[..., 0] * s_ + xf[..., 1] * c), -1).flatten(-2) \
                .type_as(x)
        q, k = fn_.rms_norm(q, (head_dim,), wq, eps), fn_.rms_norm(k, (head_dim,), wk, eps)
        return rope(q), rope(k)

    def complex_mul(q, k, wq, wk, cos, sin):  # diffusers' formulation: complex multiply
        freqs = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos)).unsqueeze(2)

        def rope(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)
        q, k = fn_.rms_norm(q, (head_dim,), wq, eps), fn_.rms_norm(k, (head_dim,), wk, eps)
        return rope(q), rope(k)

    def rotate_pairs(q, k, wq, wk, cos, sin):  # full-width tables, pair swap by a flip: one FMA form
        c = cos.repeat_interleave(2, -1).unsqueeze(2)
        sgn = torch.tensor([-1.0, 1.0], device=cos.device)
        s_ = (sin.unsqueeze(-1) * sgn).flatten(-2).unsqueeze(2)

        def rope(x):
            xf = x.float()
            return (xf * c + xf.reshape(*x.shape[:-1], -1, 2).flip(-1).flatten(-2) * s_).type_as(x)
        q, k = fn_.rms_norm(q, (head_dim,), wq, eps), fn_.rms_norm(k, (head_dim,), wk, eps)
        return rope(q), rope(k)

    def fp32_through(q, k, wq, wk, cos, sin):  # no bf16 rounding between norm and RoPE (numerics differ)
        def one(x, w):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
            xr, xi = xf.reshape(*x.shape[:-1], -1, 2).unbind(-1)
            c, s_ = cos.unsqueeze(2), sin.unsqueeze(2)
            return torch.stack((xr * c - xi * s_, xr * s_ + xi * c), -1).flatten(-2).type_as(x)
        return one(q, wq), one(k, wk)

    return {"current": current, "pairs_stack": pairs_stack, "complex_mul": complex_mul, "rotate_pairs": rotate_pairs,
            "fp32_through": fp32_through}


def int8_variants(xin: torch.Tensor, layer: torch.nn.Module, w8: torch.Tensor, scale: torch.Tensor) -> dict:
    lin = torch.nn.functional.linear
    wbf = (w8.to(bf16) * scale).contiguous()
    return {
        "bf16": lambda: lin(xin, wbf),
        "quanto": lambda: layer(xin),
        "scale_times_int8": lambda: lin(xin, scale * w8),
        "cast_then_mul_": lambda: lin(xin, w8.to(bf16).mul_(scale)),
        "scale_output": lambda: lin(xin, w8.to(bf16)) * scale.view(1, -1),
        "dequant_only_scale_times_int8": lambda: scale * w8,
        "dequant_only_cast_then_mul_": lambda: w8.to(bf16).mul_(scale),
    }


if want("rope_variants"):
    with section("rope_variants"):
        # the q/k norm + RoPE region of one attention at the CFG step's size, summed over the 34 blocks
        seq = (SIDE // 16) ** 2 + CAP
        heads, hd = cfg.n_heads, cfg.dim // cfg.n_heads
        gen = torch.Generator(dev).manual_seed(1)
        qk = [torch.randn(2, seq, heads, hd, device=dev, dtype=bf16, generator=gen) for _ in range(2)]
        wq, wk = (1 + 0.1 * torch.randn(hd, device=dev, dtype=bf16, generator=gen) for _ in range(2))
        ang = torch.rand(1, seq, hd // 2, device=dev, generator=gen) * 6.0
        cos, sin = torch.cos(ang), torch.sin(ang)
        n_blocks = cfg.n_layers + 2 * cfg.n_refiner_layers
        variants = rope_variants(heads, hd)
        ref = [t.float() for t in variants["current"](*qk, wq, wk, cos, sin)]
        for name, fn in variants.items():
            out = fn(*qk, wq, wk, cos, sin)
            err = max((o.float() - r).abs().max().item() for o, r in zip(out, ref))
            res[f"rope_{name}_max_abs_diff_vs_current"] = err
            assert err < 0.1, f"{name} does not compute the same thing ({err})"
            res[f"rope_{name}_eager_ms_per_step"] = timeit(lambda f=fn: f(*qk, wq, wk, cos, sin),
                                                           reps=3 if DRY else 20) * 1e3 * n_blocks
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            compiled(*qk, wq, wk, cos, sin)
            res[f"rope_{name}_compiled_ms_per_step"] = timeit(lambda f=compiled: f(*qk, wq, wk, cos, sin),
                                                              reps=3 if DRY else 20) * 1e3 * n_blocks

if want("int8_dequant"):
    with section("int8_dequant"):
        # where the int8 step's extra time goes (issue: int8 step <= 1.05x bf16), per linear shape of a main
        # layer at the CFG step's token count: quanto's path against plain bf16 and other dequant orders
        # (not torch._weight_int8pack_mm: it crashed the process (segfault) in the CPU dry run)
        from models.z_image.quantize import quantize_on_the_fly

        rows = 2 * ((SIDE // 16) ** 2 + CAP)
        hid = int(cfg.dim / 3 * 8)
        # (out, in, per layer)
        shapes = {"qkvo": (cfg.dim, cfg.dim, 4), "w1w3": (hid, cfg.dim, 2), "w2": (cfg.dim, hid, 1)}
        totals: dict[str, float] = {}
        for name, (n_out, n_in, count) in shapes.items():
            xin = torch.randn(rows, n_in, device=dev, dtype=bf16)
            layer = quantize_on_the_fly(torch.nn.Sequential(rand_(torch.nn.Linear(n_in, n_out, bias=False), bf16)),
                                        exclude=())[0]
            w = layer.weight
            w8, scale = w._data, w._scale  # (out, in) int8, (out, 1) bf16
            for v, fn in int8_variants(xin, layer, w8, scale).items():
                try:
                    ms = timeit(fn, reps=3 if DRY else 20) * 1e3
                except Exception as e:
                    res[f"int8_dequant_{name}_{v}_ms"] = f"unavailable: {type(e).__name__}: {str(e)[:100]}"
                    continue
                res[f"int8_dequant_{name}_{v}_ms"] = ms
                totals[v] = totals.get(v, 0.0) + ms * count * cfg.n_layers / 1e3
        for v, t in totals.items():  # the main layers' linears of one CFG step (refiners left out)
            res[f"int8_dequant_step_linears_{v}_s"] = t

def psnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of a step's output against the bf16 model's, over the range of the latter (scale-free)."""
    out, ref = out.float(), ref.float()
    mse = (out - ref).pow(2).mean()
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / mse)) if mse > 0 else float("inf")


if want("fp8_compute"):
    with section("fp8_compute"):
        # issue 18: fp8 weights (per-tensor scaled e4m3fn, what --save-quantized fp8 writes) of the same random
        # weights as `ours` (rand_'s seed), the main layers' products through torch._scaled_mm; goal on an H200:
        # compiled CFG step <= 0.6x bf16 compiled, step output within 30 dB PSNR of bf16's
        from models.lowbit import fp8_compute_problem
        from models.z_image.lowbit import enable_fp8_compute, to_fp8

        res["fp8_compute_problem"] = fp8_compute_problem(dev, bf16)  # None: this device runs it
        if ours is None:  # the int8 sections freed it: the same random weights again (rand_'s seed), eager
            with torch.device("meta"):
                ours = ZImageTransformer(cfg)
            ours = rand_(ours, bf16)
        ref = ours(x2, t2, [cap, neg])  # bf16 (compiled when the compiled section ran)
        with torch.device("meta"):
            fp8m = ZImageTransformer(cfg)
        fp8m = to_fp8(rand_(fp8m, bf16))
        fp8_step = lambda: fp8m(x2, t2, [cap, neg])
        res["fp8_dequant_step_cfg_1024_eager_s"] = timeit(fp8_step)
        res["fp8_dequant_psnr_vs_bf16_db"] = psnr_db(fp8_step(), ref)
        res["fp8_compute_layers"] = enable_fp8_compute(fp8m)
        res["fp8_compute_step_cfg_1024_eager_s"] = timeit(fp8_step)
        res["fp8_compute_psnr_vs_bf16_eager_db"] = psnr_db(fp8_step(), ref)
        t0 = time.perf_counter()
        compile_blocks(fp8m)
        fp8_step()
        sync()
        res["fp8_compute_compile_first_call_s"] = time.perf_counter() - t0
        res["fp8_compute_step_cfg_1024_compiled_s"] = timeit(fp8_step)
        res["fp8_compute_psnr_vs_bf16_db"] = psnr_db(fp8_step(), ref)
        bf16_compiled = res.get("ours_step_cfg_1024_compiled_s")
        if bf16_compiled:
            res["ratio_compiled_fp8_compute_over_bf16"] = res["fp8_compute_step_cfg_1024_compiled_s"] / bf16_compiled
        fp8m = ref = None

# inductor settings that may speed up the elementwise kernels (12% of the compiled step on an H200);
# opt-in because each recompiles the whole model: COMPILE_LEVERS="cdt max-autotune-no-cudagraphs"
# (seqdyn, only the sequence dimension symbolic, is compile_blocks' only mode since 2026-11-30)
for lever in os.environ.get("COMPILE_LEVERS", "").split():
    with section(f"lever_compile_{lever}"):
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with torch.device("meta"):
            tuned = ZImageTransformer(cfg)
        tuned = rand_(tuned, bf16)
        inductor_config.coordinate_descent_tuning = lever == "cdt"
        t0 = time.perf_counter()
        compile_blocks(tuned, mode=None if lever == "cdt" else lever)
        tuned(x2, t2, [cap, neg])
        sync()
        res[f"lever_compile_{lever}_first_call_s"] = time.perf_counter() - t0
        res[f"lever_compile_{lever}_step_cfg_1024_s"] = timeit(lambda m=tuned: m(x2, t2, [cap, neg]))
        inductor_config.coordinate_descent_tuning = False
        tuned = None

for key in ("eager", "compiled"):
    a, b = res.get(f"ours_step_cfg_1024_{key}_s"), res.get(f"diffusers_step_cfg_1024_{key}_s")
    if a and b:
        res[f"ratio_{key}_ours_over_diffusers"] = a / b
    q = res.get(f"int8_step_cfg_1024_{key}_s")
    if a and isinstance(q, float):
        res[f"ratio_{key}_int8_over_bf16"] = q / a
res["total_s"] = time.perf_counter() - T0
width = max(len(k) for k in res)
for k, v in res.items():
    print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
dump()
