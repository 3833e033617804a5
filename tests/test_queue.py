"""The UI's job queue on the tiny model: order, remove/move, abort, failures, persistence, retry."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from app.jobs import JobSpec
from app.metadata import read_settings
from app.queue import JobQueue, latent_preview
from app.service import GenerationService, ServiceConfig
from models.errors import UserError


def spec(prompt: str, **kw) -> JobSpec:
    return JobSpec(**{"model_type": "z_image_tiny", "prompt": prompt, "width": 64, "height": 64,
                      "num_inference_steps": 2, "seed": 7, **kw})


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory) -> GenerationService:
    """One service (the tiny model loads once) whose checkpoints folder holds the test's tiny model."""
    root = tmp_path_factory.mktemp("queue")
    (root / "ckpts").mkdir()
    (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    return GenerationService(ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs"))


@pytest.fixture
def make_queue(service, tmp_path):
    made: list[JobQueue] = []

    def make(state_file=None, **kw) -> JobQueue:
        q = JobQueue(service, state_file if state_file is not None else tmp_path / "queue.json", **kw)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()
    service.abort.clear()


def denoising(job_id: str, min_step: int = 1):
    return lambda q: q.get(job_id)["phase"] == "denoising" and q.get(job_id)["step"] >= min_step


def test_order_remove_move(make_queue):
    q = make_queue()  # not started: the order is set before anything runs
    a, b, c, d = (q.submit(spec(p)) for p in ("first", "second", "third", "fourth"))
    q.move(c, "up")  # a c b d
    q.move(a, "up")  # already first: no change
    q.move(d, "down")  # already last: no change
    q.remove(b)  # a c d
    assert [j["id"] for j in q.snapshot()] == [a, c, d]
    q.start()
    jobs = [q.wait(i, 120) for i in (a, c, d)]
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [j["id"] for j in sorted(jobs, key=lambda j: j["started"])] == [a, c, d]
    meta = read_settings(jobs[1]["paths"][0])
    assert meta["prompt"] == "third" and meta["seed"] == 7 and jobs[1]["seeds"] == [7]
    with pytest.raises(UserError, match="only queued jobs"):
        q.move(a, "down")


def test_submit_rejects_bad_settings(make_queue):
    q = make_queue()
    with pytest.raises(UserError, match="multiple of 16"):
        q.submit(spec("x", width=100))
    with pytest.raises(UserError, match="unknown model type"):
        q.submit(spec("x", model_type="nope"))
    assert q.snapshot() == []


def test_abort_stops_within_a_step_and_next_job_runs(make_queue):
    q = make_queue(preview_every=1).start()
    long = q.submit(spec("long", width=256, height=256, num_inference_steps=100))
    short = q.submit(spec("short"))
    q.wait_until(denoising(long, 2), 120)
    _, preview = q.preview()
    assert preview is not None and preview.mode == "RGB"
    seen = q.get(long)["step"]
    assert q.abort() == long
    job = q.wait(long, 60)
    assert job["status"] == "aborted" and job["paths"] == []
    assert job["step"] <= seen + 2  # the step running when we asked, and at most one more (race)
    assert q.wait(short, 60)["status"] == "done"
    assert q.abort() is None  # idle


def test_failures_are_recorded_and_the_queue_goes_on(make_queue, service, monkeypatch):
    real = service.generate
    errors = iter([UserError("missing weights: ckpts/ZImageBase_bf16.safetensors"),
                   RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), ValueError("boom\ndetails")])

    def flaky(s, **kw):
        if s.prompt.startswith("fail"):
            raise next(errors)
        return real(s, **kw)

    monkeypatch.setattr(service, "generate", flaky)
    q = make_queue().start()
    ids = [q.submit(spec(p)) for p in ("fail 1", "fail 2", "fail 3", "ok")]
    jobs = [q.wait(i, 120) for i in ids]
    assert [j["status"] for j in jobs] == ["failed", "failed", "failed", "done"]
    assert jobs[0]["error"] == "missing weights: ckpts/ZImageBase_bf16.safetensors"
    assert jobs[1]["error"].startswith("out of memory: try a smaller size")
    assert jobs[2]["error"] == "ValueError: boom"  # one line, no traceback
    assert all("Traceback" not in j["error"] for j in jobs)


def test_restart_marks_running_job_interrupted_and_retry(make_queue, tmp_path):
    state = tmp_path / "queue.json"
    crash = tmp_path / "crash.json"
    q1 = make_queue(state).start()
    a = q1.submit(spec("a", num_inference_steps=3))
    b = q1.submit(spec("b"))

    def snapshot_while_running(q):
        # evaluated with the queue's lock held: the file is what a crash right now would leave
        if q.get(a)["status"] != "running":
            return False
        shutil.copy(state, crash)
        return True

    q1.wait_until(snapshot_while_running, 120)
    q1.close()
    saved = {j["id"]: j["status"] for j in json.loads(crash.read_text())["jobs"]}
    assert saved == {a: "running", b: "queued"}

    q2 = make_queue(crash)  # the process "restarts" from the crash-time file
    jobs = {j["id"]: j for j in q2.snapshot()}
    assert jobs[a]["status"] == "interrupted" and "retry" in jobs[a]["error"]
    assert jobs[b]["status"] == "queued"
    q2.start()
    assert q2.wait(b, 120)["status"] == "done"
    assert q2.get(a)["status"] == "interrupted"  # never re-run silently
    with pytest.raises(UserError, match="only failed"):
        q2.retry(b)
    q2.retry(a)
    job = q2.wait(a, 120)
    assert job["status"] == "done" and len(job["paths"]) == 1
    q2.close()
    # a clean restart keeps the finished history
    assert {j["id"]: j["status"] for j in make_queue(crash).snapshot()} == {a: "done", b: "done"}


def test_close_while_running_saves_interrupted(make_queue, tmp_path):
    q = make_queue().start()
    a = q.submit(spec("slow", width=256, height=256, num_inference_steps=100))
    q.wait_until(denoising(a), 120)
    q.close()
    assert q.get(a)["status"] == "interrupted"
    assert make_queue().get(a)["status"] == "interrupted"


def test_broken_state_file_starts_empty(make_queue, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert make_queue(bad).snapshot() == []
    assert (tmp_path / "bad.json.broken").read_text() == "{not json"


def test_move_reports_first_and_last(make_queue):
    q = make_queue()
    a, b = q.submit(spec("a")), q.submit(spec("b"))
    assert q.move(a, "up") is False and q.move(b, "down") is False
    assert [j["id"] for j in q.snapshot()] == [a, b]
    assert q.move(b, "up") is True and [j["id"] for j in q.snapshot()] == [b, a]


def test_stale_part_files_are_removed_at_start(service, tmp_path):
    from app.outputs import clean_stale_parts

    old = tmp_path / ".2024-01-01-10h00m00s_seed1_1_fox.png.k3j9_x0a.part"
    fresh = tmp_path / ".2024-01-01-10h00m01s_seed2_1_fox.png.Zx81ab2c.part"
    other = tmp_path / "notes.part"
    for f in (old, fresh, other):
        f.write_bytes(b"")
    os.utime(old, (1, 1))
    os.utime(other, (1, 1))
    GenerationService(ServiceConfig(checkpoints_dir=service.config.checkpoints_dir, output_dir=tmp_path))
    assert not old.exists() and fresh.exists() and other.exists()  # a fresh one may be another process's
    assert clean_stale_parts(tmp_path / "missing") == []


# ------------------------------------------------------------------ hardening: odd input, limits, crashes

def test_text_that_is_not_unicode_is_refused_at_submit(make_queue, tmp_path):
    q = make_queue()
    for bad in (spec("a\ud800b"), spec("ok", negative_prompt="\udcff"),
                spec("ok", loras=[{"name": "x\ud800", "strength": 1.0}])):
        with pytest.raises(UserError, match="not valid Unicode text .*lone surrogate") as e:
            q.submit(bad)
        str(e.value).encode("utf-8")  # the message itself is sendable
    assert q.snapshot() == [] and not (tmp_path / "queue.json").exists()  # nothing queued, nothing saved


def v1_job(job_id: str, status: str = "queued", **spec_kw) -> dict:
    """A job as the first queue file format saved it (spec inline, no image indexes)."""
    s = {**spec("saved " + job_id).to_dict(), **spec_kw}
    return {"id": job_id, "spec": s, "status": status, "created": 1.0, "started": None, "finished": None,
            "phase": "", "step": 0, "total": 0, "seconds_per_step": None, "eta": None, "seconds": None,
            "paths": [], "seeds": [], "error": "", "lora_reports": []}


def test_odd_saved_jobs_are_moved_aside_and_the_rest_kept(make_queue, tmp_path):
    from app.ui import progress_html, queue_table

    state = tmp_path / "queue.json"
    good, other = v1_job("g00d0001"), v1_job("0ther002", "failed")
    odd = [
        {**v1_job("empty001"), "spec": {}},
        v1_job("status01", "sleeping"),
        v1_job("g00d0001", "done"),  # a duplicate id
        v1_job("surr0001", prompt="poison \ud800"),  # what the submit bug let in
        {**v1_job("types001"), "step": "three"},
        {**v1_job("types002"), "paths": "a.png"},
        v1_job("range001", width=100),
        "not a job",
        {**v1_job("../evil"), "id": "../evil"},
    ]
    state.write_text(json.dumps({"version": 1, "jobs": [good, *odd, other]}))
    q = make_queue(state)
    assert [j["id"] for j in q.snapshot()] == ["g00d0001", "0ther002"]
    assert len(q.notices) == len(odd)
    assert "'empty001' could not be restored (no settings (spec)); moved to queue.json.rejected" in q.notices[0]
    assert "unknown status 'sleeping'" in q.notices[1] and "duplicate id" in q.notices[2]
    assert "lone surrogate" in q.notices[3] and "bad step" in q.notices[4] and "multiple of 16" in q.notices[6]
    aside = json.loads((tmp_path / "queue.json.rejected").read_text())["jobs"]
    assert [r["job"] for r in aside] == odd  # every odd record kept, as it was
    assert all(r["reason"] for r in aside)
    # the page's table and progress line, and a JSON reply, all work on the restored queue
    jobs = q.snapshot()
    json.dumps(jobs, ensure_ascii=False).encode("utf-8")
    assert list(queue_table(jobs)["ID"]) == ["g00d0001", "0ther002"]
    assert "could not be restored" in progress_html(jobs, q.notices)
    # a restart keeps the good jobs; the rejected file keeps its records
    assert [j["id"] for j in make_queue(state).snapshot()] == ["g00d0001", "0ther002"]
    assert len(json.loads((tmp_path / "queue.json.rejected").read_text())["jobs"]) == len(odd)


def test_queue_table_survives_odd_jobs():
    from app.ui import progress_html, queue_table

    good = {**v1_job("g00d0001"), "image_indexes": [], "batch_seed": None}
    jobs = [good, {"id": "x1", "status": "queued"}, {**good, "id": "x2", "spec": {**good["spec"], "width": None}},
            {**good, "id": "x3", "error": "bad \ud800", "status": "failed", "finished": "soon"}, "junk"]
    table = queue_table(jobs)
    assert list(table["ID"])[:2] == ["g00d0001", "x1"] and len(table) == 5
    json.dumps(table.values.tolist(), ensure_ascii=False).encode("utf-8")  # no lone surrogate reaches the page
    progress_html(jobs).encode("utf-8")


def test_latent_preview():
    rng = np.random.default_rng(0)
    im = latent_preview(rng.standard_normal((2, 16, 8, 12)).astype(np.float32))
    assert im.mode == "RGB" and im.size == (12 * 21, 8 * 21)  # scaled up by a whole factor
    assert latent_preview(rng.standard_normal((1, 4, 8, 8))).mode == "RGB"  # other latent spaces
