"""GPU benchmark: step overhead of a rank-32 LoRA on every attention and FFN linear (bf16 and int8).

Full-size random transformer, 1024x1024 CFG step (batch 2, caption 128), timed without and with a
LoRA: in bf16 through side branches (`merge=False`, as a strength schedule runs) and merged into the
weights (a constant strength; the time of the merge itself and of its removal too); then after
int8 quantization (optimum-quanto), where the LoRA always runs as side branches.
Target: overhead <= 10% in both. Writes `$OUT/lora.json`; append to bench/RESULTS.md.
`DRY=1` runs tiny shapes on the CPU. On the GPU machine carry optimum-quanto (and its deps) as
wheels, as described in bench/offload_gpu.py, then:
    PYTHONPATH=/tmp/site:. OUT=$OUT PYTHONUNBUFFERED=1 python3 bench/lora_gpu.py
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
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.lora_runtime import LoraManager
from models.z_image.lora import convert_state_dict
from models.z_image.tiny import TINY_TRANSFORMER
from models.z_image.transformer import ZImageConfig, ZImageTransformer

DRY = bool(os.environ.get("DRY"))
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
dev = torch.device("cpu" if DRY else "cuda")
bf16 = torch.bfloat16
SIDE, CAP, CAP_DIM, RANK = (64, 16, 32, 4) if DRY else (1024, 128, 2560, 32)
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps: int = 2 if DRY else 5) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return st.median(ts)


def main() -> dict:
    res: dict = {"torch": torch.__version__, "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0),
                 "date": time.strftime("%Y-%m-%d"), "rank": RANK}
    cfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
    with torch.device("meta"):
        model = ZImageTransformer(cfg)
    model = model.to_empty(device=dev).to(bf16).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    lora = {}
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.endswith(TARGETS):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, dtype=bf16) * 0.01
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, RANK, dtype=bf16) * 0.01
    path = Path(tempfile.gettempdir()) / "bench_lora.safetensors"  # not under $OUT: it would travel back
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(lora, path)
    res["lora_modules"] = len(lora) // 2
    x = torch.randn(2, 16, SIDE // 8, SIDE // 8, device=dev, dtype=bf16)
    t = torch.tensor([0.5, 0.5], device=dev)
    caps = [torch.randn(CAP, CAP_DIM, device=dev, dtype=bf16)] * 2

    def step():
        with torch.no_grad():
            model(x, t, caps)

    for label in ("bf16", "int8"):
        if label == "int8":
            from models.z_image.quantize import quantize_on_the_fly

            quantize_on_the_fly(model)
        base = timeit(step)
        manager = LoraManager(model, convert_state_dict, merge=False)
        manager.sync({path: 1.0})
        with_lora = timeit(step)
        manager.remove_all()
        res[f"{label}_step_s"], res[f"{label}_lora_step_s"] = base, with_lora
        res[f"{label}_lora_overhead"] = with_lora / base - 1
        if label == "bf16":  # merged (the weights live on the device here: merged there, originals kept on the CPU)
            manager = LoraManager(model, convert_state_dict)
            sync()
            t0 = time.perf_counter()
            (report,) = manager.sync({path: 1.0})
            sync()
            res["bf16_merge_s"], res["bf16_merged_layers"] = time.perf_counter() - t0, report.merged
            merged = timeit(step)
            t0 = time.perf_counter()
            manager.remove_all()
            sync()
            res["bf16_unmerge_s"] = time.perf_counter() - t0
            res["bf16_merged_step_s"], res["bf16_merged_overhead"] = merged, merged / base - 1
        print(label, {k: v for k, v in res.items() if k.startswith(label)}, flush=True)
        (OUT / "lora.json").write_text(json.dumps(res, indent=1))
    path.unlink()
    return res


if __name__ == "__main__":
    out = main()
    for k, v in out.items():
        print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
    (OUT / "lora.json").write_text(json.dumps(out, indent=1))
