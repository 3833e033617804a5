"""GPU check of the Turbo extras (issue 17) on the real CLI path, full-size random weights (the files
bench/offload_gpu.py writes; Turbo's and TwinFlow's transformer names point at the same random file: only
speed and memory are measured), fresh processes, profile 1 bf16, `--compile`, 1024x1024, guidance 0.

Runs: Turbo 8 steps (the baseline), with NAG (scale 4, a negative prompt), with Heun (15 evaluations), and a
TwinFlow 2-step job. Goals: a NAG step <= 1.35x a plain Turbo step (`nag_step_ratio`); the TwinFlow job
(sampling and decode, the CLI's job seconds: the model load is not counted) <= 0.4 s. Writes
`$OUT/turbo_gpu.json`. `DRY=1` runs the same commands at tiny size on the CPU, without --compile.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.offload_gpu import DRY, OUT, SIDE, WORK, write_models  # noqa: E402
from bench.service_gpu import run  # noqa: E402

COMMON = ["--memory-profile", "1", "--transformer-quantization", "bf16", "--text-encoder-quantization", "bf16",
          "--compile", "--guidance", "0"]
RUNS = [
    ("turbo_8", ["--model", "z_image", "--steps", "8"]),
    ("turbo_8_nag4", ["--model", "z_image", "--steps", "8", "--negative-prompt", "blurry, lowres, watermark",
                      "--nag-scale", "4"]),
    ("turbo_8_heun", ["--model", "z_image", "--steps", "8", "--sampler", "heun"]),
    ("twinflow_2", ["--model", "twinflow", "--steps", "2"]),
    ("twinflow_2_again", ["--model", "twinflow", "--steps", "2"]),  # compile caches warm
]


def job_seconds(text: str) -> float | None:
    """The CLI's last "X s, Y s/step" line: sampling and saving, without the model load."""
    found = re.findall(r"^([0-9.]+) s, [0-9.]+ s/step", text, re.M)
    return float(found[-1]) if found else None


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    models = WORK / "models"
    res = {"date": time.strftime("%Y-%m-%d"), "dry": DRY, "size": SIDE, "setup": write_models(models), "runs": []}
    base = models / "ZImageBase_bf16.safetensors"
    for name in ("ZImageTurbo_bf16.safetensors", "TwinFlow-Z-Image-Turbo_bf16.safetensors"):
        if not (models / name).exists():
            (models / name).symlink_to(base.name)
    images = Path(tempfile.mkdtemp(prefix="turbo_gpu_"))
    for name, flags in RUNS:
        r = run(name, [*COMMON, *flags], models, images / "none.safetensors", images)
        r["job_s"] = job_seconds(r.get("output_tail", ""))
        res["runs"].append(r)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "turbo_gpu.json").write_text(json.dumps(res, indent=1))
    by = {r["name"]: r for r in res["runs"]}
    try:
        res["nag_step_ratio"] = round(float(by["turbo_8_nag4"]["reported_s_per_step"])
                                      / float(by["turbo_8"]["reported_s_per_step"]), 3)
        res["heun_step_ratio"] = round(float(by["turbo_8_heun"]["reported_s_per_step"])
                                       / float(by["turbo_8"]["reported_s_per_step"]), 3)
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        pass
    res["twinflow_job_s"] = by.get("twinflow_2_again", {}).get("job_s")
    print(json.dumps({k: res.get(k) for k in ("nag_step_ratio", "heun_step_ratio", "twinflow_job_s")}), flush=True)
    (OUT / "turbo_gpu.json").write_text(json.dumps(res, indent=1))
    if not os.environ.get("KEEP"):
        import shutil

        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
