"""GPU check of the real service path: `wgp_zimage.py generate` in fresh processes on full-size
random weights (DeepBeepMeep file set, bf16 + int8 written first), as a user would run it.

Covers what the other benchmarks bypass: the CLI and GenerationService on CUDA (load on the CPU, then
the memory profile), int8 selection, the VAE tiling decision, `--compile` together with a memory
profile and a LoRA (rank 32 on every attention/FFN linear). Per run: exit code, wall time, the
step rate the CLI reports, device memory used over the process (NVML, whole device, sampled every ms),
and whether the PNG was written. Writes `$OUT/service_gpu.json`; the images stay in /tmp.
`DRY=1` runs the same commands at tiny size on the CPU, without --compile (inductor's C++ build
takes minutes on small CPUs). Needs the wheels of bench/offload_gpu.py; see bench/gpu_session.sh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.offload_gpu import BASE, DRY, OUT, SIDE, WORK, Sampler, gib, write_models  # noqa: E402

STEPS = 3 if DRY else 8
RUNS = [  # name, extra CLI flags; the overlap (app/block_overlap.py) is the default of profile 4
    ("int8_profile4", ["--memory-profile", "4", "--transformer-quantization", "int8",
                       "--text-encoder-quantization", "int8"]),
    ("int8_profile4_compile_lora_mmgp", ["--memory-profile", "4", "--transformer-quantization", "int8",
                                         "--text-encoder-quantization", "int8", "--compile", "--lora", "LORA",
                                         "--lora-multipliers", "1.0,0.5", "--no-overlap-transfers"]),
    # the default streaming on the real path: the image must equal mmgp's streaming's, pixel for pixel
    ("int8_profile4_compile_lora", ["--memory-profile", "4", "--transformer-quantization", "int8",
                                    "--text-encoder-quantization", "int8", "--compile", "--lora", "LORA",
                                    "--lora-multipliers", "1.0,0.5"]),
    ("bf16_profile1_compile", ["--memory-profile", "1", "--transformer-quantization", "bf16",
                               "--text-encoder-quantization", "bf16", "--compile"]),
]
SAME_AS = {"int8_profile4_compile_lora": "int8_profile4_compile_lora_mmgp"}


def write_lora(folder: Path) -> Path:
    """Rank-32 (tiny: 4) LoRA in diffusers/PEFT names on every attention and FFN linear of the main layers."""
    import torch
    from safetensors.torch import save_file

    from models.z_image.tiny import TINY_TRANSFORMER
    from models.z_image.transformer import ZImageConfig

    cfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
    rank, hid = (4 if DRY else 32), int(cfg.dim / 3 * 8)
    shapes = {"attention.to_q": (cfg.dim, cfg.dim), "attention.to_k": (cfg.dim, cfg.dim),
              "attention.to_v": (cfg.dim, cfg.dim), "attention.to_out.0": (cfg.dim, cfg.dim),
              "feed_forward.w1": (hid, cfg.dim), "feed_forward.w3": (hid, cfg.dim), "feed_forward.w2": (cfg.dim, hid)}
    sd = {}
    for i in range(cfg.n_layers):
        for name, (out_f, in_f) in shapes.items():
            sd[f"transformer.layers.{i}.{name}.lora_A.weight"] = torch.randn(rank, in_f, dtype=torch.bfloat16) * 0.01
            sd[f"transformer.layers.{i}.{name}.lora_B.weight"] = torch.randn(out_f, rank, dtype=torch.bfloat16) * 0.01
    path = folder / "bench_style.safetensors"
    save_file(sd, path)
    return path


def run(name: str, flags: list[str], model_dir: Path, lora: Path, images: Path) -> dict:
    flags = [str(lora) if f == "LORA" else f for f in flags if not (DRY and f == "--compile")]
    out_png = images / f"{name}.png"
    cmd = [sys.executable, str(ROOT / "wgp_zimage.py"), "generate", "--model", "z_image_base", "--model-dir",
           str(model_dir), "--width", str(SIDE), "--height", str(SIDE), "--steps", str(STEPS), "--seed", "1",
           "--prompt", "a red fox in fresh snow at dawn, soft light, photo", "--output", str(out_png), *flags]
    if DRY:
        cmd += ["--device", "cpu"]
    sampler = Sampler()
    sampler.phase = "job"
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - t0
    sampler.stop()
    text = proc.stdout + proc.stderr
    rates = re.findall(r"([0-9.]+) ?s/(?:step|it)", text)
    res = {"name": name, "flags": " ".join(flags), "exit": proc.returncode, "wall_s": round(wall, 1),
           "image_written": out_png.is_file(), "device_used_peak_GiB": gib(sampler.peaks.get("job", 0) - BASE.used0),
           "reported_s_per_step": rates[-1] if rates else None,
           "lora_lines": [line for line in text.splitlines() if "LoRA" in line][:3], "output_tail": text[-1500:]}
    print(json.dumps({k: v for k, v in res.items() if k != "output_tail"}), flush=True)
    if proc.returncode:
        print(text[-4000:], flush=True)
    return res


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    setup = write_models(WORK / "models")
    lora = write_lora(WORK)
    images = Path(tempfile.mkdtemp(prefix="service_gpu_"))
    res = {"date": time.strftime("%Y-%m-%d"), "dry": DRY, "steps": STEPS, "size": SIDE, "setup": setup, "runs": []}
    for name, flags in RUNS:
        res["runs"].append(run(name, flags, WORK / "models", lora, images))
        other = images / f"{SAME_AS.get(name, '')}.png"
        if name in SAME_AS and other.is_file() and (images / f"{name}.png").is_file():
            import numpy as np
            from PIL import Image

            res["runs"][-1]["same_pixels_as_" + SAME_AS[name]] = bool(np.array_equal(
                np.asarray(Image.open(other)), np.asarray(Image.open(images / f"{name}.png"))))
            print(name, "same pixels:", res["runs"][-1]["same_pixels_as_" + SAME_AS[name]], flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "service_gpu.json").write_text(json.dumps(res, indent=1))
    if not os.environ.get("KEEP"):
        import shutil

        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
