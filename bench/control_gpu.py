"""GPU check of ControlNet Union 2.1 (issue 16) on the real CLI path, full-size random weights (the model files
bench/offload_gpu.py writes, Turbo's name pointing at the same random transformer, plus a random ControlNet 2.1
of the published shape: 15 control blocks, its own 2-block refiner, 33 input channels, bf16 and our int8 file),
fresh processes, 1024x1024, 8 steps, guidance 0.

Runs: plain Turbo and ControlNet 2.1 in profile 1 bf16 with --compile, each twice (the second run has warm
compile caches and is the one compared): goal a controlled step <= 1.25x a plain Turbo step
(`control_step_ratio`); then ControlNet 2.1 in profile 4 with int8 weights: goal whole job <= 4.5 GiB of device
memory (`p4_int8_peak_GiB`, NVML, whole device, CUDA context included). Writes `$OUT/control_gpu.json`.
`DRY=1` runs the same commands at tiny size on the CPU, without --compile; there the ControlNet file is a
1.0-shaped one under the 2.1 name (a 2-layer model cannot carry 2.x's 15-block marker).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.offload_gpu import BF16, DEV, DRY, OUT, SIDE, WORK, randomize, write_models  # noqa: E402
from bench.service_gpu import run  # noqa: E402
from bench.turbo_gpu import job_seconds  # noqa: E402

STEM = "Z-Image-Turbo-Fun-Controlnet-Union2.1"  # defaults/z_image_control2_1.json's file
PROFILE1 = ["--memory-profile", "1", "--transformer-quantization", "bf16", "--text-encoder-quantization", "bf16",
            "--compile", "--guidance", "0", "--steps", "8"]
PROFILE4_INT8 = ["--memory-profile", "4", "--transformer-quantization", "int8", "--text-encoder-quantization",
                 "int8", "--guidance", "0", "--steps", "8"]


def write_controlnet(folder: Path) -> dict:
    """The random ControlNet (bf16 single file, published key names) and its int8 file beside it."""
    from safetensors.torch import save_file

    from models.z_image import controlnet as zc
    from models.z_image import quantize as q
    from models.z_image.tiny import TINY_TRANSFORMER
    from models.z_image.transformer import ZImageConfig

    t0 = time.perf_counter()
    tcfg = ZImageConfig.from_dict(TINY_TRANSFORMER) if DRY else ZImageConfig()
    if DRY:
        cfg = zc.ControlNetConfig(control_layers_places=list(range(tcfg.n_layers)), dim=tcfg.dim,
                                  n_refiner_layers=tcfg.n_refiner_layers, n_heads=tcfg.n_heads,
                                  n_kv_heads=tcfg.n_kv_heads)
    else:
        cfg = zc.ControlNetConfig(control_layers_places=list(range(0, tcfg.n_layers, 2)),
                                  control_refiner_layers_places=list(range(tcfg.n_refiner_layers)),
                                  control_in_dim=zc.INPAINT_IN_DIM, add_control_noise_refiner=zc.REFINER_IS_OWN,
                                  dim=tcfg.dim, n_refiner_layers=tcfg.n_refiner_layers, n_heads=tcfg.n_heads,
                                  n_kv_heads=tcfg.n_kv_heads)
    with torch.device("meta"):
        net = zc.ZImageControlNet(cfg)
    net = net.to(BF16).to_empty(device=DEV)
    randomize(net)
    bf16 = folder / f"{STEM}_bf16.safetensors"
    save_file({k: v.to("cpu").contiguous() for k, v in net.state_dict().items()}, bf16)
    q.save_quantized(q.quantize_on_the_fly(net), folder / f"{STEM}_quanto_bf16_int8.safetensors")
    del net
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return {"controlnet_version": cfg.version, "control_blocks": len(cfg.control_layers_places),
            "write_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from PIL import Image

    WORK.mkdir(parents=True, exist_ok=True)
    models = WORK / "models"
    res = {"date": time.strftime("%Y-%m-%d"), "dry": DRY, "size": SIDE, "setup": write_models(models), "runs": []}
    for name in ("ZImageTurbo_bf16.safetensors", "ZImageTurbo_quanto_bf16_int8.safetensors"):
        source = name.replace("ZImageTurbo", "ZImageBase")
        if not (models / name).exists() and (models / source).exists():
            (models / name).symlink_to(source)
    res["controlnet"] = write_controlnet(models)
    images = Path(tempfile.mkdtemp(prefix="control_gpu_"))
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    picture = images / "control.png"
    Image.fromarray(np.stack([x % 256, y % 256, ((x // 64 + y // 64) % 2) * 255], -1).astype(np.uint8)).save(picture)
    control = ["--model", "z_image_control2_1", "--control-image", str(picture), "--control-type", "raw"]
    runs = [("turbo_8", [*PROFILE1, "--model", "z_image"]), ("control21_8", [*PROFILE1, *control]),
            ("turbo_8_again", [*PROFILE1, "--model", "z_image"]), ("control21_8_again", [*PROFILE1, *control]),
            ("control21_8_p4_int8", [*PROFILE4_INT8, *control])]
    for name, flags in runs:
        r = run(name, flags, models, images / "none.safetensors", images)
        r["job_s"] = job_seconds(r.get("output_tail", ""))
        res["runs"].append(r)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "control_gpu.json").write_text(json.dumps(res, indent=1))
    by = {r["name"]: r for r in res["runs"]}
    try:
        res["control_step_ratio"] = round(float(by["control21_8_again"]["reported_s_per_step"])
                                          / float(by["turbo_8_again"]["reported_s_per_step"]), 3)
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        pass
    res["p4_int8_peak_GiB"] = by.get("control21_8_p4_int8", {}).get("device_used_peak_GiB")
    print(json.dumps({k: res.get(k) for k in ("control_step_ratio", "p4_int8_peak_GiB")}), flush=True)
    (OUT / "control_gpu.json").write_text(json.dumps(res, indent=1))
    if not os.environ.get("KEEP"):
        import shutil

        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
