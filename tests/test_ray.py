"""The queue on Ray (app/ray_executor.py): two CPU actors of a local Ray (num_cpus=2) and the tiny model.

Every job's image is compared with the same job run by the local executor (the in-process service), pixel for
pixel; the actors are started once for the module (each imports torch) and shared by the tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from app.jobs import JobSpec  # noqa: E402
from app.metadata import read_settings  # noqa: E402
from app.queue import JobQueue  # noqa: E402
from app.ray_executor import RayExecutor, connect  # noqa: E402
from app.service import GenerationService, ServiceConfig  # noqa: E402
from tests.conftest import pixels  # noqa: E402

TYPES = ("z_image_tiny", "z_image_tiny_ft")


def spec(prompt: str, model_type: str = "z_image_tiny", **kw) -> JobSpec:
    return JobSpec(**{"model_type": model_type, "prompt": prompt, "width": 64, "height": 64,
                      "num_inference_steps": 2, "seed": 7, **kw})


def add_finetune(service: GenerationService) -> None:
    """A second model type on the tiny weights (as a finetune's definition would be): switching to it
    reloads the pipeline, so model affinity is visible in the actors' load counts."""
    d = service.definition("z_image_tiny")
    service.definitions["z_image_tiny_ft"] = dataclasses.replace(
        d, model_type="z_image_tiny_ft", name="Z-Image tiny finetune", settings={**d.settings, "flow_shift": 3.0})


@pytest.fixture(scope="module")
def root(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "ckpts").mkdir()
    (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def service(root) -> GenerationService:
    s = GenerationService(ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "out",
                                        loras_root=root / "loras"))
    add_finetune(s)
    return s


class Local:
    """The local executor's service, for the reference images, with the actors' thread count (Ray gives a
    one-CPU actor one thread; a CPU sum split over other thread counts may round one pixel differently)."""

    def __init__(self, root):
        self.service = GenerationService(ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "local",
                                                       loras_root=root / "loras"))
        add_finetune(self.service)

    def generate(self, s: JobSpec):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.service.generate(s)
        finally:
            torch.set_num_threads(threads)

    def lora_library(self, model_type: str):
        return self.service.lora_library(model_type)


@pytest.fixture(scope="module")
def local(root) -> Local:
    return Local(root)


@pytest.fixture(scope="module")
def executor(service):
    connect(local=True, num_cpus=2)
    ex = RayExecutor(service, workers=2)
    assert ex.start_all() == 2
    yield ex
    ex.close()
    ray.shutdown()


@pytest.fixture
def make_queue(service, executor, tmp_path):
    service.config.output_dir = tmp_path / "out"
    made: list[JobQueue] = []

    def make(**kw) -> JobQueue:
        q = JobQueue(service, tmp_path / "queue.json", executor=executor, **kw)
        made.append(q)
        return q.start()

    yield make
    for q in made:
        q.close()


def stats(executor) -> list[dict]:
    return [ray.get(executor.actor(s).stats.remote()) for s in range(2) if executor.actor(s) is not None]


def images(folder) -> list:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def test_jobs_of_two_types_finish_once_with_the_local_pixels(make_queue, executor, local, tmp_path):
    q = make_queue()
    loads_before = sum(s["loads"] for s in stats(executor))
    specs = [spec(f"job {i}", TYPES[i % 2], seed=100 + i) for i in range(12)]
    ids = q.submit_many([JobSpec.from_dict(s.to_dict()) for s in specs])
    jobs = [q.wait(i, 120) for i in ids]
    assert [j["status"] for j in jobs] == ["done"] * 12
    assert {j["worker"] for j in jobs} == {"ray-1", "ray-2"}  # both actors worked
    files = images(tmp_path / "out")
    assert len(files) == 12 and sorted(str(p) for j in jobs for p in j["paths"]) == [str(f) for f in files]
    for s, j in zip(specs, jobs):
        ref = local.generate(s)  # the same job on the local executor
        assert ref.paths[0].name.split("_seed")[1] == j["paths"][0].split("_seed")[1]  # same name (but the time)
        assert np.array_equal(pixels(ref.paths[0]), pixels(j["paths"][0])), s.model_type
        mine, theirs = read_settings(j["paths"][0]), read_settings(ref.paths[0])
        mine.pop("created"), theirs.pop("created")
        assert mine == theirs
    # model affinity: an actor loads only when the job's type differs from the one it has loaded
    by_worker: dict[str, list[str]] = {}
    for j in sorted(jobs, key=lambda j: j["started"]):
        by_worker.setdefault(j["worker"], []).append(j["spec"]["model_type"])
    switches = sum(sum(a != b for a, b in zip(seq, seq[1:])) for seq in by_worker.values())
    assert sum(s["loads"] for s in stats(executor)) - loads_before <= switches + 2


def test_an_idle_actor_with_the_model_loaded_takes_the_job(make_queue, executor):
    q = make_queue()
    # give each actor one type: two jobs at once take both actors
    ids = q.submit_many([spec("a", TYPES[0], num_inference_steps=8, width=128, height=128),
                         spec("b", TYPES[1], num_inference_steps=8, width=128, height=128)])
    first = [q.wait(i, 120) for i in ids]
    assert {j["worker"] for j in first} == {"ray-1", "ray-2"}
    loads = sum(s["loads"] for s in stats(executor))
    holder = {j["spec"]["model_type"]: j["worker"] for j in first}
    for model_type in (TYPES[1], TYPES[0], TYPES[1]):
        job = q.wait(q.submit(spec("again", model_type)), 120)
        assert job["status"] == "done" and job["worker"] == holder[model_type]
    assert sum(s["loads"] for s in stats(executor)) == loads  # no load: each went where its model was


def test_unload_frees_every_worker_model(make_queue, executor):
    """The page's "Unload models" reaches the actors: afterwards none holds a model, and the next job loads."""
    q = make_queue()
    assert q.wait(q.submit(spec("warm", TYPES[0])), 120)["status"] == "done"
    assert any(s["loaded"] for s in stats(executor))
    unloaded: list[bool] = []
    assert q.when_idle(lambda: unloaded.append(q.executor.unload()))
    assert unloaded == [True] and not any(s["loaded"] for s in stats(executor))
    assert all(executor.loaded(slot) is None for slot in range(2))
    loads = sum(s["loads"] for s in stats(executor))
    assert q.wait(q.submit(spec("again", TYPES[0])), 120)["status"] == "done"
    assert sum(s["loads"] for s in stats(executor)) == loads + 1
    assert q.when_idle(lambda: unloaded.append(q.executor.unload())) and unloaded[-1] is True
    assert q.when_idle(lambda: unloaded.append(q.executor.unload())) and unloaded[-1] is False  # none left


def test_abort_reaches_the_actor_within_a_step(make_queue, tmp_path):
    q = make_queue(preview_every=1)
    long = q.submit(spec("long", width=768, height=768, num_inference_steps=100))
    q.wait_until(lambda q: q.get(long)["phase"] == "denoising" and q.get(long)["step"] >= 2, 120)
    _, preview = q.preview()
    assert preview is not None and preview.mode == "RGB"  # previews come back from the actor
    seen = q.get(long)["step"]
    assert q.abort() == long
    job = q.wait(long, 60)
    assert job["status"] == "aborted" and job["paths"] == []
    assert job["step"] <= seen + 2  # the step running when we asked, and at most one more (race)
    assert images(tmp_path / "out") == []


def test_a_killed_actor_reruns_its_job_once(make_queue, executor, local, tmp_path):
    q = make_queue()
    job_id = q.submit(spec("killed", width=256, height=256, num_inference_steps=40, seed=5))
    q.wait_until(lambda q: q.get(job_id)["phase"] == "denoising" and q.get(job_id)["step"] >= 2, 120)
    worker = q.get(job_id)["worker"]
    ray.kill(executor.actor(executor.slot_names().index(worker)))
    job = q.wait(job_id, 180)
    assert job["status"] == "done" and job["attempts"] == 1
    assert [j["id"] for j in q.snapshot()] == [job_id]  # once in the queue
    files = images(tmp_path / "out")
    assert [str(f) for f in files] == job["paths"]  # once in the folder
    ref = local.generate(spec("killed", width=256, height=256, num_inference_steps=40, seed=5))
    assert np.array_equal(pixels(ref.paths[0]), pixels(files[0]))
    q.wait_until(lambda q: all(w["state"] == "idle" for w in q.workers()), 120)  # the slot got a new actor


def test_a_lost_worker_fails_the_job_after_its_retries(make_queue, executor, monkeypatch):
    from app.executors import WorkerLost

    def lost(*a, **kw):
        raise WorkerLost("worker ray-1 lost (ActorDiedError: the node died)")

    monkeypatch.setattr(executor, "run", lost)
    q = make_queue(max_retries=2)
    job = q.wait(q.submit(spec("doomed")), 60)
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"] == "worker lost 3 times, last: worker ray-1 lost (ActorDiedError: the node died)"


def test_lora_and_input_image_are_shipped_once_and_cached(make_queue, executor, service, local, tiny_dir,
                                                           tmp_path):
    from PIL import Image

    from tests.test_lora_formats import load_tiny_transformer, write_lora

    folder = service.lora_library("z_image_tiny").lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    path, _ = write_lora(folder, "kohya_musubi", load_tiny_transformer(tiny_dir), seed=3, name="style")
    service.lora_library("z_image_tiny").refresh()
    local.lora_library("z_image_tiny").refresh()
    picture = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture)
    q = make_queue()
    lora = [{"name": "style", "strength": 0.8}]
    jobs = [q.wait(q.submit(spec(f"lora {i}", loras=lora, seed=20 + i)), 120) for i in range(3)]
    img2img = q.wait(q.submit(spec("from a picture", image=str(picture), strength=0.6)), 120)
    assert [j["status"] for j in jobs + [img2img]] == ["done"] * 4, [j["error"] for j in jobs + [img2img]]
    assert all(j["lora_reports"] and "style" in j["lora_reports"][0] for j in jobs)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert executor.puts[sha] == 1  # put in the object store once
    fetched = [s["fetched"].get(sha, 0) for s in stats(executor)]
    assert max(fetched) == 1 and sum(fetched) == len({j["worker"] for j in jobs})  # once per actor that used it
    for i, j in enumerate(jobs):
        ref = local.generate(spec(f"lora {i}", loras=lora, seed=20 + i))
        assert np.array_equal(pixels(ref.paths[0]), pixels(j["paths"][0]))
    ref = local.generate(spec("from a picture", image=str(picture), strength=0.6))
    assert np.array_equal(pixels(ref.paths[0]), pixels(img2img["paths"][0]))
    meta = read_settings(img2img["paths"][0])
    assert (tmp_path / "out" / meta["image"]).is_file()  # its input copy came back beside it
    picture_sha = hashlib.sha256(picture.read_bytes()).hexdigest()
    assert executor.puts[picture_sha] == 1 and picture_sha not in executor._shipped  # a job's input: not kept


def test_the_page_shows_the_worker_of_each_job_and_the_workers(make_queue):
    from app.ui_view import progress_html, queue_table

    q = make_queue()
    job = q.wait(q.submit(spec("shown")), 120)
    table = queue_table(q.snapshot())
    assert job["worker"] in table.loc[table["ID"] == job["id"], "Status"].iloc[0]
    page = progress_html(q.snapshot(), q.notices, q.workers())
    assert "ray-1" in page and "ray-2" in page and "idle" in page


def test_no_ray_without_asking(tmp_path):
    import subprocess
    import sys

    code = ("import sys, app.queue, app.service, app.ui_view, app.launch, app.executors, wgp_zimage; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0



def test_a_job_failing_on_its_actor_says_why_as_locally(make_queue, service, local):
    from app.queue import user_message

    folder = service.lora_library("z_image_tiny").lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    service.lora_library("z_image_tiny").refresh()
    local.lora_library("z_image_tiny").refresh()
    bad = spec("broken lora", loras=[{"name": "broken", "strength": 1.0}])
    with pytest.raises(Exception) as raised:
        local.generate(bad)
    q = make_queue()
    job = q.wait(q.submit(bad), 120)
    assert job["status"] == "failed" and job["error"] == user_message(raised.value)
    assert q.wait(q.submit(spec("after it")), 120)["status"] == "done"  # the worker goes on
