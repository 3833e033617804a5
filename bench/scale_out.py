"""Scale-out on Ray, measured on this machine with CPU actors and the tiny model (no GPU needed).

Two workloads through the app's queue (app/queue.py), each after a warm-up job per worker (the model load
is not counted):
- throughput: JOBS jobs of 256x256, 8 steps: jobs per second with the local executor and with N = 1, 2 Ray
  CPU actors;
- overhead: JOBS jobs of 64x64, 1 step (almost no compute): the seconds per job the Ray path adds to the
  local one (one actor against the local executor, one torch thread each: a Ray CPU actor gets one).

Prints a Markdown table and writes scale_out.json into $OUT (default: its temporary folder).
Run: `python bench/scale_out.py` (JOBS=24).
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

import torch  # noqa: E402

from app.jobs import JobSpec  # noqa: E402
from app.queue import JobQueue  # noqa: E402
from app.service import GenerationService, ServiceConfig  # noqa: E402

JOBS = int(os.environ.get("JOBS", "24"))
WORKLOADS = {"throughput": {"width": 256, "height": 256, "num_inference_steps": 8},
             "overhead": {"width": 64, "height": 64, "num_inference_steps": 1}}


def spec(i: int, size: dict) -> JobSpec:
    return JobSpec(model_type="z_image_tiny", prompt=f"job {i}", seed=1000 + i, **size)


def run(service: GenerationService, executor, size: dict, warm: int) -> float:
    """Seconds for JOBS jobs through a queue on executor (None: the local one), after `warm` warm-up jobs."""
    queue = JobQueue(service, None, executor=executor).start()
    try:
        for job_id in queue.submit_many([spec(-1 - i, size) for i in range(warm)]):
            queue.wait(job_id, 600)
        start = time.perf_counter()
        ids = queue.submit_many([spec(i, size) for i in range(JOBS)])
        jobs = [queue.wait(i, 600) for i in ids]
        seconds = time.perf_counter() - start
        assert all(j["status"] == "done" for j in jobs), [j["error"] for j in jobs if j["status"] != "done"]
        return seconds
    finally:
        queue.close()


def main() -> None:
    import ray

    from app.ray_executor import RayExecutor, connect

    torch.set_num_threads(1)  # the local path with the thread count of one Ray CPU actor
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    service = GenerationService(ServiceConfig(checkpoints_dir=work / "ckpts", output_dir=work / "out"))
    connect(local=True, num_cpus=2)
    results: dict[str, dict[str, float]] = {}
    try:
        for name, size in WORKLOADS.items():
            results[name] = {"local": run(service, None, size, warm=1)}
            for n in (1, 2):
                executor = RayExecutor(service, workers=n)
                try:
                    results[name][f"ray{n}"] = run(service, executor, size, warm=2 * n)
                finally:
                    executor.close()
    finally:
        ray.shutdown()
    t, o = results["throughput"], results["overhead"]
    print(f"| path | {JOBS} jobs 256x256 8 steps: s | jobs/s | speed-up vs 1 actor |")
    print("|---|---|---|---|")
    for key, label in (("local", "local executor (1 thread)"), ("ray1", "Ray, 1 CPU actor"),
                       ("ray2", "Ray, 2 CPU actors")):
        print(f"| {label} | {t[key]:.2f} | {JOBS / t[key]:.2f} | {t['ray1'] / t[key]:.2f} |")
    overhead_ms = 1000 * (o["ray1"] - o["local"]) / JOBS
    print(f"\nper-job overhead of the Ray path (64x64, 1 step): {overhead_ms:.0f} ms "
          f"(local {1000 * o['local'] / JOBS:.0f} ms/job, Ray 1 actor {1000 * o['ray1'] / JOBS:.0f} ms/job)")
    out = Path(os.environ.get("OUT", work))
    out.mkdir(parents=True, exist_ok=True)
    print(f"results: {out / 'scale_out.json'}")
    (out / "scale_out.json").write_text(json.dumps({"jobs": JOBS, "seconds": results,
                                                    "overhead_ms_per_job": overhead_ms}, indent=1))


if __name__ == "__main__":
    main()
