"""GPU benchmark of the memory profiles (issue: Z-Image Base on an 8 GB card), full-size random weights.

One run, one size (1024x1024, CFG batch 2, 128-token captions), STEPS steps (default 4):
- our pipeline with int8 weights (pre-quantized files read by models/z_image/quantize.py) under
  memory profiles 1-5, and with bf16 weights under profiles 1 and 4;
- diffusers' ZImagePipeline with block-level group offload (streams) in bf16, same weights;
- when RUNS names them, low-bit transformers (issue 18): random GGUF Q8_0 / Q4_K blocks, or the bf16 weights
  as scaled fp8 (with fp8 compute on a GPU that runs it, "fp8-dequant" without), the text encoder int8;
each job loaded from files, profiled, run (encode + STEPS steps + decode), released. Per job:
device memory used over the whole job and during the denoising steps (the transformer part),
as the rise of NVML/`torch.cuda.mem_get_info` used memory over the process start (CUDA context
included; sampled every ms), torch's peak reserved/allocated, s/step (median of steps 2..N),
encode and decode time, pinned RAM, load time (files -> profiled). The VAE (fp32, the app
default) is tiled when `app.offload.should_tile_vae` says an 8 GB card would need it.

Writes `$OUT/offload_gpu.json` and `$OUT/RESULTS_offload.md` (the section for bench/RESULTS.md;
the device's copy of the repo does not come back). Random weights: cost only, no images.
Setup (random weights, bf16 + int8 files, ~31 GB in $WORK, default /tmp/zimage_offload_bench)
takes 1-2 minutes; the whole run about 6 minutes on an H100. `DRY=1` runs it all at tiny size on
the CPU (mmgp through the CPU stand-ins of tests/test_offload.py).

On the lent GPU machine (torch 2.11, transformers, safetensors, accelerate there; diffusers,
mmgp, optimum-quanto and importlib_metadata carried as wheels). Here, in the repo root, once:
    mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 mmgp==3.8.2 optimum-quanto==0.2.7 importlib_metadata==8.7.0
run (carry [".whl"], timeout_s 600):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
        OUT=$OUT PYTHONUNBUFFERED=1 python3 bench/offload_gpu.py
Dry run here: DRY=1 OUT=/tmp/offload_dry .venv/bin/python bench/offload_gpu.py
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import statistics as st
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the app's allocator setting (wgp_zimage.py sets it before torch starts); ALLOC=default measures without
if os.environ.get("ALLOC", "expandable") == "expandable":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
DRY = bool(os.environ.get("DRY"))
OUT = Path(os.environ.get("OUT") or tempfile.gettempdir())
WORK = Path(os.environ.get("WORK") or Path(tempfile.gettempdir()) / ("zimage_offload_dry" if DRY else
                                                                       "zimage_offload_bench"))
STEPS = int(os.environ.get("STEPS", "3" if DRY else "5"))
SIDE = 64 if DRY else 1024
CARD_GIB = float(os.environ.get("CARD_GIB", "8"))  # the card the VAE tiling decision pretends to run on
BUDGET_S = float(os.environ.get("BUDGET_S", "470"))  # skip the remaining jobs past this (setup included)
# most wanted first: the time budget may cut the tail
# "@2048": that image side (issue 19: a 2048x2048 Base job in profile 4 int8 within 6 GiB of device memory)
# "+overlap": app/block_overlap.py (--overlap-transfers); its final latents must equal the run without
# "gguf-q8" / "gguf-q4k" / "fp8" / "fp8-dequant": issue 18's low-bit transformers (GGUF_RUNS), only when named
RUNS = [("int8", 1), ("int8", 4), ("int8+overlap", 4), ("int8", 5), ("int8+overlap", 5), ("bf16", 1),
        ("bf16", 4), ("bf16+overlap", 4), ("diffusers-group-offload", 0), ("int8+preload1200", 4), ("int8", 2),
        ("int8", 3)]
if os.environ.get("RUNS"):  # e.g. RUNS="int8:4 int8+overlap:4"
    RUNS = [(w, int(p)) for w, p in (x.split(":") for x in os.environ["RUNS"].split())]
PROFILE_RUN = ("int8", 4)  # one step of this run goes through torch.profiler (where the time goes)
T_START = time.perf_counter()


def say(*a) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s]", *a, flush=True)


# ---------------------------------------------------------------- device memory, sampled

class Baseline:
    """Used device memory before this process created its CUDA context (NVML), for the rises."""

    def __init__(self) -> None:
        self.nvml = None
        self.used0 = 0
        self.how = "none (CPU)"
        if DRY:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0)  # the lent machines have one GPU
            self.used0 = pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used
            self.how = "NVML used memory, baseline before the CUDA context"
        except Exception as e:
            say("no NVML (", e, "): rises are over the first mem_get_info, CUDA context excluded")
            import torch

            free, total = torch.cuda.mem_get_info()
            self.used0 = total - free
            self.how = "torch.cuda.mem_get_info after context creation (context excluded)"

    def used(self) -> int:
        if DRY:
            return 0
        if self.nvml is not None:
            import pynvml

            return pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free


BASE = Baseline()  # before torch touches CUDA


class Sampler(threading.Thread):
    """Polls used device memory every ms; keeps the peak per phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            used = BASE.used()
            ph = self.phase
            if used > self.peaks.get(ph, 0):
                self.peaks[ph] = used
            time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()
        self.join()


import torch  # noqa: E402

from app import offload as ofl  # noqa: E402
from models.z_image import checkpoints as ck  # noqa: E402
from models.z_image import quantize as q  # noqa: E402
from models.z_image.handler import HANDLER  # noqa: E402
from models.z_image.pipeline import ZImagePipeline  # noqa: E402
from models.z_image.tiny import TINY_QWEN3, TINY_TRANSFORMER, TINY_VAE, build_tokenizer  # noqa: E402
from models.z_image.transformer import ZImageConfig, ZImageTransformer  # noqa: E402

DEV = torch.device("cpu" if DRY else "cuda")
BF16 = torch.bfloat16
GiB = 2**30
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def gib(n: float) -> float:
    return round(n / GiB, 3)


@contextlib.contextmanager
def cuda_for_mmgp():
    """On the GPU: nothing. In the dry run: mmgp's CUDA calls answered on the CPU (tests' stand-ins)."""
    if not DRY:
        yield
        return
    import app.block_overlap as overlap
    from tests.test_block_overlap import Recorder
    from tests.test_offload import cpu_cuda_standins

    real = overlap.CudaStreams
    overlap.CudaStreams = Recorder  # the overlap's stream calls, logged on the CPU
    try:
        with cpu_cuda_standins():
            yield
    finally:
        overlap.CudaStreams = real


# ---------------------------------------------------------------- model files

def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)


# low-bit runs (issue 18): the transformer's main layers as GGUF blocks (random, valid: fp16 scales set) or as
# scaled fp8 (the bf16 weights quantized, as --save-quantized fp8 does), the text encoder int8
GGUF_RUNS = {"gguf-q8": ("Q8_0", 3e-4), "gguf-q4k": ("Q4_K", 1e-4)}  # GGML type, its fp16 scale fields' value


def random_gguf(model: torch.nn.Module, type_name: str, scale: float) -> int:
    """model's main Linear layers (not those int8 / fp8 keep: embedders, final layer) as GGUFLinear layers of
    random blocks of type_name, in place, each block's fp16 scale(s) set to scale (random bytes there could be
    inf / NaN); the cost of a GGUF file's layers, not its values. Returns the layers swapped (a dry run's
    layers whose width is no whole number of blocks stay bf16)."""
    from models.ggml import _TYPES, GGMLTensor
    from models.lowbit import GGUFLinear
    from models.z_image.lowbit import _kept_full, _linear_names, _set_module

    qtype = next(n for n, (name, _, _) in _TYPES.items() if name == type_name)
    _, block, size = _TYPES[qtype]
    fp16_fields = 2 if type_name.endswith("_K") else 1  # K-quants: d and dmin (Q6_K's d is last: not used here)
    gen = torch.Generator().manual_seed(0)
    swapped = 0
    for name in sorted(_linear_names(model)):
        layer = model.get_submodule(name)
        if _kept_full(name) or layer.in_features % block:
            continue
        blocks = layer.out_features * layer.in_features // block
        raw = torch.randint(0, 256, (blocks, size), dtype=torch.uint8, generator=gen)
        half = torch.full((blocks, fp16_fields), scale, dtype=torch.float16).view(torch.uint8)
        raw[:, : 2 * fp16_fields] = half.reshape(blocks, 2 * fp16_fields)
        tensor = GGMLTensor(raw.reshape(-1), qtype, (layer.out_features, layer.in_features))
        _set_module(model, name, GGUFLinear(tensor, layer.bias, BF16))
        swapped += 1
    return swapped


def write_models(folder: Path) -> dict:
    """A DeepBeepMeep-layout folder (bf16 files) plus the int8 files our --save-quantized would write.
    With REUSE_MODELS=1 a complete folder left by an earlier part (KEEP=1) is used as it is."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    done = folder / "setup.json"
    if os.environ.get("REUSE_MODELS") and done.is_file():
        return {**json.loads(done.read_text()), "reused": True}
    t0 = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "Qwen3").mkdir(parents=True)
    cfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
    with torch.device("meta"):
        tr = ZImageTransformer(cfg)
    tr = tr.to(BF16).to_empty(device=DEV)  # random init on the GPU: seconds (minutes on the CPU)
    randomize(tr)
    save_file({k: v.to("cpu").contiguous() for k, v in tr.state_dict().items()},
              folder / "ZImageBase_bf16.safetensors", metadata={"config": json.dumps(cfg.to_dict())})
    del tr
    qcfg = Qwen3Config(**(TINY_QWEN3 if DRY else QWEN3_4B))
    with torch.device("meta"):
        te = Qwen3Model(qcfg)
    te = te.to(BF16).to_empty(device=DEV)
    randomize(te)
    sd = {k: v.to("cpu").contiguous() for k, v in te.state_dict().items()}
    del te
    save_file(sd, folder / "Qwen3" / "qwen3_bf16.safetensors")
    del sd
    qcfg.save_pretrained(folder / "Qwen3")
    build_tokenizer().save_pretrained(folder / "Qwen3")
    vae_cfg = TINY_VAE if DRY else FLUX_VAE
    vae = AutoencoderKL(**vae_cfg)
    save_file({k: v.to(BF16).contiguous() for k, v in vae.state_dict().items()},
              folder / "ZImageTurbo_VAE_bf16.safetensors")
    (folder / "ZImageTurbo_VAE_bf16_config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **vae_cfg}))
    (folder / "ZImageTurbo_scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 6.0,
         "use_dynamic_shifting": False}))
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    t_bf16 = time.perf_counter() - t0
    # int8 files: bf16 loaded to the device, quantized on the fly, saved (what --save-quantized does)
    files = HANDLER.model_files(folder, "z_image_base")
    t1 = time.perf_counter()
    tr = ck.load_transformer(files.transformer, files.transformer_config, BF16, DEV)
    q.save_quantized(q.quantize_on_the_fly(tr), q.int8_path(files.transformer[0]))
    del tr
    enc = ck.load_text_encoder(files.text_encoder, files.text_encoder_config, files.tokenizer_dir, BF16, DEV)
    q.save_quantized(q.quantize_on_the_fly(enc.model), q.int8_path(files.text_encoder[0]))
    del enc
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    sizes = {p.name: round(p.stat().st_size / GiB, 3) for p in [*folder.glob("*.safetensors"),
                                                                 *(folder / "Qwen3").glob("*.safetensors")]}
    setup = {"write_bf16_s": round(t_bf16, 1), "quantize_and_save_int8_s": round(time.perf_counter() - t1, 1),
             "file_GiB": sizes}
    done.write_text(json.dumps(setup))
    return setup


# ---------------------------------------------------------------- prompts

def prompts(tokenizer) -> tuple[str, str]:
    """A prompt of ~128 tokens (template included) and a negative prompt that pads to the same length,
    so CFG runs as one batch-2 forward as in the anchors."""
    from models.z_image.transformer import pad_len

    def count(text: str) -> int:
        msgs = [{"role": "user", "content": text}]
        return len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                           enable_thinking=True)).input_ids)

    target = 16 if DRY else 128
    prompt = "a red fox in fresh snow at dawn, soft light, photo"
    while count(prompt + " x") <= target:
        prompt += " x"
    neg = "blurry"
    while pad_len(count(neg)) < pad_len(count(prompt)) or count(neg) < count(prompt) - 8:
        neg += " y"
    return prompt, neg


# ---------------------------------------------------------------- one job

def tiling_for(dtype: torch.dtype) -> bool:
    """What an 8 GB card (CARD_GIB) would decide: its total minus what this process uses now."""
    used_now = (BASE.used() - BASE.used0) if not DRY else 0
    return ofl.should_tile_vae(int(CARD_GIB * GiB - used_now), SIDE, SIDE, dtype)


def set_tiles(vae, tiled: bool) -> None:
    if tiled:  # 512-pixel tiles: the Flux VAE config's sample_size (1024) would not tile a 1024 image
        ofl.set_vae_tile_size(vae, 32 if DRY else ofl.VAE_TILE_PIXELS)


def run_ours(folder: Path, weights: str, profile: int, prompt: str, neg: str) -> dict:
    res: dict = {"weights": weights, "profile": profile}
    # "int8+overlap@2048": another image side for this run (a dry run divides it by 16)
    side = (int(weights.split("@")[1]) // (16 if DRY else 1)) if "@" in weights else SIDE
    res["side"] = side
    files = HANDLER.model_files(folder, "z_image_base")
    t0 = time.perf_counter()
    kind = weights.split("+")[0].split("@")[0]
    if weights.startswith("bf16"):
        pipe, parts = HANDLER.load_model(base_model_type="z_image_base", dtype=BF16, VAE_dtype=torch.float32,
                                         model_dir=folder, device="cpu")
    elif kind in GGUF_RUNS or kind.startswith("fp8"):
        from models.lowbit import fp8_compute_problem
        from models.z_image.lowbit import enable_fp8_compute, to_fp8

        tr = ck.load_transformer(files.transformer, files.transformer_config, BF16, torch.device("cpu"))
        t1 = time.perf_counter()
        if kind in GGUF_RUNS:
            res["lowbit_layers"] = random_gguf(tr, *GGUF_RUNS[kind])
        else:  # "fp8": fp8 compute where the app would turn it on (CUDA, cc 8.9+); "fp8-dequant": never
            to_fp8(tr)
            if kind == "fp8" and DEV.type == "cuda" and fp8_compute_problem(DEV, BF16) is None:
                res["fp8_compute_layers"] = enable_fp8_compute(tr)
        res["convert_s"] = round(time.perf_counter() - t1, 2)
        res["transformer_GiB"] = gib(sum(t.numel() * t.element_size()
                                         for t in [*tr.parameters(), *tr.buffers()]))
    else:
        tr = q.load_transformer_int8([q.find_int8(files.transformer[0])], files.transformer_config, BF16,
                                     torch.device("cpu"))
    if not weights.startswith("bf16"):  # the int8 text encoder and the VAE beside the transformer read above
        te = q.load_text_encoder_int8([q.find_int8(files.text_encoder[0])], files.text_encoder_config,
                                      files.tokenizer_dir, BF16, torch.device("cpu"))
        vae = ck.load_vae(files.vae, files.vae_config, torch.float32, torch.device("cpu"))
        pipe = ZImagePipeline(tr, te, vae, default_shift=6.0)
        parts = {"transformer": tr, "text_encoder": te.model, "vae": vae}
        del tr, te, vae
    res["read_s"] = round(time.perf_counter() - t0, 2)
    with cuda_for_mmgp():
        preload = 1200 if "preload" in weights else 0
        manager = ofl.apply_profile(parts, profile, device="cuda", preload_mb=preload,
                                    overlap_transfers="overlap" in weights)
        res["load_s"] = round(time.perf_counter() - t0, 2)
        res["pinned_GiB"] = gib(ofl.pinned_bytes(manager))
        pipe.device = torch.device(DEV)
        decided: list[bool] = []

        def tiled() -> bool:
            """What the service does before the decode, on an 8 GB card (CARD_GIB)."""
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            used_now = (BASE.used() - BASE.used0) if not DRY else 0
            decided.append(ofl.decode_needs_tiling(profile, int(CARD_GIB * GiB - used_now), side, side,
                                                   parts["vae"].dtype))
            set_tiles(parts["vae"], decided[-1])
            return decided[-1]

        res.update(measure_job(lambda step_start, callback: pipe(
            prompt=prompt, negative_prompt=neg, height=side, width=side, num_inference_steps=STEPS,
            guidance_scale=4.0, seed=1, step_start=step_start, callback=callback, vae_tiling=tiled),
            profile_step=(weights, profile) == PROFILE_RUN))
        res["vae_tiled"] = decided[-1] if decided else None
        if manager.overlap is not None:  # manager: app.offload.OffloadSession
            res["blocks_copied_ahead"] = manager.overlap.copies
        ofl.release(manager)
    pipe = parts = manager = None
    cleanup()
    return res


def run_diffusers(folder: Path, prompt: str, neg: str) -> dict:
    """diffusers' ZImagePipeline, block-level group offload with streams, bf16, same files (anchor method)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import ZImagePipeline as DiffusersPipeline
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from transformers import AutoConfig, AutoTokenizer, Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    res: dict = {"weights": "bf16", "profile": "diffusers group offload"}
    files = HANDLER.model_files(folder, "z_image_base")
    t0 = time.perf_counter()
    cfg = ck.transformer_config(files.transformer, files.transformer_config)
    with torch.device("meta"):
        tr = ZImageTransformer2DModel.from_config(cfg.to_dict())
    tr.load_state_dict(ck.read_state_dict(files.transformer), assign=True)
    qcfg = AutoConfig.from_pretrained(str(files.text_encoder_config.parent))
    with torch.device("meta"):
        te = Qwen3Model(qcfg)
    te.load_state_dict(ck.read_state_dict(files.text_encoder), assign=True)
    te.rotary_emb = Qwen3RotaryEmbedding(config=qcfg)
    vae = ck.load_vae(files.vae, files.vae_config, torch.float32, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(files.tokenizer_dir))
    pipe = DiffusersPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae,
                             text_encoder=te.eval().requires_grad_(False), tokenizer=tok,
                             transformer=tr.eval().requires_grad_(False))
    res["read_s"] = round(time.perf_counter() - t0, 2)
    onload = DEV
    pipe.enable_group_offload(onload_device=onload, offload_device=torch.device("cpu"), offload_type="block_level",
                              num_blocks_per_group=1, use_stream=not DRY)
    tiled = tiling_for(vae.dtype)
    set_tiles(vae, tiled)
    if tiled:
        vae.enable_tiling()
    res["vae_tiled"] = tiled
    res["load_s"] = round(time.perf_counter() - t0, 2)
    pinned = sum(p.numel() * p.element_size() for p in [*tr.parameters(), *te.parameters(), *vae.parameters()]
                 if p.device.type == "cpu" and p.is_pinned()) if not DRY else 0
    res["pinned_GiB"] = gib(pinned)

    def job(step_start, callback):
        # diffusers has no hook before the first step: the transformer's first call marks it
        hook = tr.register_forward_pre_hook(lambda *_: step_start(0, STEPS))

        def on_end(p, i, t, kw):
            callback(i, STEPS, kw["latents"])
            return kw
        try:
            return pipe(prompt=prompt, negative_prompt=neg, height=SIDE, width=SIDE, num_inference_steps=STEPS,
                        guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(1),
                        callback_on_step_end=on_end)
        finally:
            hook.remove()

    res.update(measure_job(job))
    pipe = tr = te = vae = None
    cleanup()
    return res


def cleanup() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def measure_job(call, profile_step: bool = False) -> dict:
    """Run call(step_start, callback) with phases: encode -> denoise -> decode; memory and times.

    profile_step: the last step runs under torch.profiler (its table is printed; the step is left
    out of s/step)."""
    sampler = Sampler()
    prof: list = []
    marks: dict[str, float] = {}
    step_ends: list[float] = []
    torch_peaks: dict[str, tuple[int, int]] = {}

    def enter(phase: str) -> None:
        if DEV.type == "cuda":
            sync()
            torch_peaks[sampler.phase] = (torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        marks[phase] = time.perf_counter()
        sampler.phase = phase

    def step_start(i: int, n: int) -> None:
        if i == 0 and "denoise" not in marks:
            enter("denoise")
        if profile_step and i == n - 1 and n > 2:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
            prof.append(profile(activities=acts))
            prof[0].__enter__()

    def callback(i: int, n: int, latents) -> None:
        sync()
        step_ends.append(time.perf_counter())
        if i == n - 1:  # runs that must compute the same thing compare these
            marks["latents_sha"] = hashlib.sha1(latents.float().cpu().numpy().tobytes()).hexdigest()[:16]
        if prof and i == n - 1:
            prof[0].__exit__(None, None, None)
            avg = prof[0].key_averages()
            for key in ("self_cpu_time_total", "self_cuda_time_total" if DEV.type == "cuda" else None):
                if key:
                    print(f"profile of the last step, by {key}:\n"
                          + avg.table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)
        if i == n - 1:
            enter("decode")

    before = BASE.used()
    sampler.start()
    enter("encode")
    t0 = time.perf_counter()
    call(step_start, callback)
    enter("done")
    t_end = time.perf_counter()
    sampler.stop()
    peaks = sampler.peaks
    job_peak = max((peaks.get(p, 0) for p in ("encode", "denoise", "decode")), default=0)
    timed = step_ends[:-1] if prof else step_ends
    steps = [b - a for a, b in zip(timed, timed[1:])]
    out = {
        "job_s": round(t_end - t0, 2),
        "encode_s": round(marks["denoise"] - marks["encode"], 3),
        "first_step_s": round(step_ends[0] - marks["denoise"], 3) if step_ends else None,
        "s_per_step": round(st.median(steps), 4) if steps else None,
        "decode_s": round(t_end - marks["decode"], 3),
        "device_used_rise_job_GiB": gib(job_peak - BASE.used0),
        "device_used_rise_denoise_GiB": gib(peaks.get("denoise", 0) - BASE.used0),
        "device_used_at_job_start_GiB": gib(before - BASE.used0),
        "latents_sha": marks.get("latents_sha"),
    }
    if DEV.type == "cuda":
        out["torch_peak_reserved_GiB"] = {k: gib(v[0]) for k, v in torch_peaks.items() if k != "idle"}
        out["torch_peak_allocated_GiB"] = {k: gib(v[1]) for k, v in torch_peaks.items() if k != "idle"}
    return out


# ---------------------------------------------------------------- report

def table(res: dict) -> str:
    rows = ["| weights | profile | s/step | first step s | encode s | decode s | job s | used rise, job GiB | "
            "used rise, denoise GiB | torch reserved, denoise GiB | pinned GiB | load s | VAE tiled | "
            "same latents as without overlap |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "error" in r:
            rows.append(f"| {r['weights']} | {r['profile']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        den = (r.get("torch_peak_reserved_GiB") or {}).get("denoise", "")
        rows.append(f"| {r['weights']} | {r['profile']} | {r['s_per_step']} | {r['first_step_s']} | {r['encode_s']} | "
                    f"{r['decode_s']} | {r['job_s']} | {r['device_used_rise_job_GiB']} | "
                    f"{r['device_used_rise_denoise_GiB']} | {den} | {r['pinned_GiB']} | {r['load_s']} | "
                    f"{r['vae_tiled']} | {r.get('same_latents_as_without_overlap', '')} |")
    return "\n".join(rows)


def main() -> None:
    res: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dry": DRY, "steps": STEPS,
                 "size": SIDE, "memory": BASE.how, "card_for_tiling_GiB": CARD_GIB,
                 "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0), "runs": []}
    if not DRY:
        torch.zeros(1, device="cuda")
        res["context_GiB"] = gib(BASE.used() - BASE.used0)
    say("device", res["device"], "torch", res["torch"])
    WORK.mkdir(parents=True, exist_ok=True)
    res["setup"] = write_models(WORK / "models")
    say("model files written", res["setup"])
    prompt, neg = prompts(build_tokenizer())
    for weights, profile in RUNS:
        if time.perf_counter() - T_START > BUDGET_S:
            res["runs"].append({"weights": weights, "profile": profile, "error": "skipped: time budget"})
            continue
        say("job", weights, profile)
        try:
            if weights.startswith("diffusers"):
                r = run_diffusers(WORK / "models", prompt, neg)
            else:
                r = run_ours(WORK / "models", weights, profile, prompt, neg)
        except Exception as e:  # report and go on with the next job
            traceback.print_exc()
            r = {"weights": weights, "profile": profile, "error": f"{type(e).__name__}: {e}"}
            cleanup()
        if DEV.type == "cuda":
            r["device_used_after_release_GiB"] = gib(BASE.used() - BASE.used0)
        import psutil  # RAM after release: pinned and pageable copies must go with the job

        r["process_rss_after_release_GiB"] = gib(psutil.Process().memory_info().rss)
        say(json.dumps(r))
        res["runs"].append(r)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "offload_gpu.json").write_text(json.dumps(res, indent=1))  # partial results survive a kill
    for r in res["runs"]:  # overlapped transfers must not change a single bit
        if "+overlap" in str(r.get("weights")) and r.get("latents_sha"):
            base = next((x for x in res["runs"] if x.get("weights") == r["weights"].replace("+overlap", "")
                         and x.get("profile") == r["profile"] and x.get("latents_sha")), None)
            r["same_latents_as_without_overlap"] = None if base is None else base["latents_sha"] == r["latents_sha"]
    res["total_s"] = round(time.perf_counter() - T_START, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "offload_gpu.json").write_text(json.dumps(res, indent=1))
    section = (f"\n## bench/offload_gpu.py (issue: memory profiles and int8)\n"
               f"- {res['date']}, {res['device']}, torch {res['torch']}, {SIDE}x{SIDE} CFG, {STEPS} steps, "
               f"memory = {res['memory']}{', DRY RUN (numbers mean nothing)' if DRY else ''}; "
               f"VAE fp32, tiled when a {CARD_GIB:g} GB card would need it; total {res['total_s']} s\n\n"
               + table(res) + "\n")
    (OUT / "RESULTS_offload.md").write_text(section)
    if not DRY:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(section)
    print(section)
    if not os.environ.get("KEEP"):
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
