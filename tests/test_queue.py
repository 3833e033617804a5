"""The UI's job queue on the tiny model: order, remove/move, abort, failures, persistence, retry."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    for blank in ("", "  \n", "\x00", "\x00\x01\x1b\t", "\u200b\x7f"):  # nothing the text encoder could read
        with pytest.raises(UserError, match="the prompt is empty"):
            q.submit(spec(blank))
    assert q.snapshot() == []
    q.submit(spec("a fox\x00"))  # text with a stray control character is still a prompt


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


def crash_copy(state, dest):
    """What a crash right now would leave of the queue at state: its file and its prompt files, copied."""
    dest.mkdir()
    shutil.copy(state, dest / state.name)
    prompts = state.with_name(state.stem + ".prompts")
    if prompts.is_dir():
        shutil.copytree(prompts, dest / prompts.name)
    return dest / state.name


def test_restart_marks_running_job_interrupted_and_retry(make_queue, tmp_path):
    state = tmp_path / "queue.json"
    crash = tmp_path / "crash" / "queue.json"
    q1 = make_queue(state).start()
    a = q1.submit(spec("a", num_inference_steps=3))
    b = q1.submit(spec("b"))

    def snapshot_while_running(q):
        # evaluated with the queue's lock held: the files are what a crash right now would leave
        if q.get(a)["status"] != "running":
            return False
        crash_copy(state, crash.parent)
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


def test_first_format_queue_file_is_restored_and_converted(make_queue, tmp_path):
    state = tmp_path / "wgp_zimage_queue.json"
    done = {**v1_job("d0ne0001", "done"), "paths": ["/x/a.png", "/x/b.png"], "seeds": [5, 6], "finished": 3.0}
    state.write_text(json.dumps({"version": 1, "jobs": [v1_job("aaaa0001"), v1_job("bbbb0002", "running"), done]},
                                indent=1))
    q = make_queue(state)
    jobs = {j["id"]: j for j in q.snapshot()}
    assert list(jobs) == ["aaaa0001", "bbbb0002", "d0ne0001"] and q.notices == []
    assert jobs["aaaa0001"]["status"] == "queued" and jobs["aaaa0001"]["spec"]["prompt"] == "saved aaaa0001"
    assert jobs["bbbb0002"]["status"] == "interrupted" and "retry" in jobs["bbbb0002"]["error"]
    assert jobs["d0ne0001"]["image_indexes"] == [0, 1] and jobs["d0ne0001"]["seeds"] == [5, 6]
    # converted: the prompts moved to one file per job, the list keeps the other settings
    saved = json.loads(state.read_text())
    assert saved["version"] == 2 and "prompt" not in saved["jobs"][0]["spec"]
    assert saved["jobs"][0]["spec"]["width"] == 64
    prompts = tmp_path / "wgp_zimage_queue.prompts"
    assert sorted(p.name for p in prompts.iterdir()) == ["aaaa0001.json", "bbbb0002.json", "d0ne0001.json"]
    assert json.loads((prompts / "aaaa0001.json").read_text())["prompt"] == "saved aaaa0001"
    again = {j["id"]: j for j in make_queue(state).snapshot()}  # and the new format reads back the same
    assert again == jobs


def test_long_prompts_are_cut_and_not_rewritten_on_each_change(make_queue, tmp_path):
    from app.jobs import MAX_PROMPT_CHARS

    state = tmp_path / "queue.json"
    q = make_queue(state)
    huge = "a fox " * 200_000  # 1.2 MB
    ids = [q.submit(spec(huge, negative_prompt=huge)) for _ in range(3)]
    job = q.get(ids[0])
    assert job["spec"]["prompt"] == huge[:MAX_PROMPT_CHARS] and len(job["spec"]["negative_prompt"]) == MAX_PROMPT_CHARS
    assert state.stat().st_size < 10_000  # the list holds no prompt
    prompts = state.with_name("queue.prompts")
    files = {p.name: p.stat().st_ino for p in prompts.iterdir()}
    assert len(files) == 3 and all(p.stat().st_size < 3 * MAX_PROMPT_CHARS for p in prompts.iterdir())
    q.move(ids[2], "up")
    q.remove(ids[1])
    assert {p.name: p.stat().st_ino for p in prompts.iterdir()} == {k: v for k, v in files.items()
                                                                    if k != f"{ids[1]}.json"}  # not rewritten
    assert [j["id"] for j in make_queue(state).snapshot()] == [ids[0], ids[2]]
    assert q.snapshot(prompt_chars=10)[0]["spec"]["prompt"] == huge[:10]
    # the image's metadata carries the cut prompt only
    q.start()
    done = q.wait(ids[0], 120)
    assert done["status"] == "done", done["error"]
    assert read_settings(done["paths"][0])["prompt"] == huge[:MAX_PROMPT_CHARS]
    from pathlib import Path

    assert Path(done["paths"][0]).stat().st_size < 5 * MAX_PROMPT_CHARS


def test_a_crash_between_the_queue_files_loses_nothing_else(make_queue, tmp_path):
    state = tmp_path / "queue.json"
    q = make_queue(state)
    a, b = q.submit(spec("a")), q.submit(spec("b"))
    prompts = state.with_name("queue.prompts")
    (prompts / f"{a}.json").unlink()  # a crash before a's prompt file was complete
    (prompts / "orphan01.json").write_text("{}")  # one written just before a crash, never listed
    stale = prompts / ".x.json.abcd1234.part"
    stale.write_bytes(b"")
    os.utime(stale, (1, 1))
    q2 = make_queue(state)
    assert [j["id"] for j in q2.snapshot()] == [b]
    assert "its prompt file is missing" in q2.notices[0]
    assert sorted(p.name for p in prompts.iterdir()) == [f"{b}.json"]


def test_request_and_queue_limits(make_queue, monkeypatch):
    import app.queue as queue_module

    q = make_queue()
    with pytest.raises(UserError, match="one request can queue at most 100 jobs"):
        q.submit_many([spec(f"p{i}") for i in range(101)])
    assert q.snapshot() == []
    monkeypatch.setattr(queue_module, "MAX_WAITING", 3)
    ids = q.submit_many([spec("a"), spec("b")])
    with pytest.raises(UserError, match="the queue is full: 2 jobs wait to run and it takes at most 3"):
        q.submit_many([spec("c"), spec("d")])  # all or none
    assert len(q.snapshot()) == 2
    q.submit(spec("c"))
    with pytest.raises(UserError, match="queue is full"):
        q.submit(spec("d"))
    q.remove(ids[0])
    q.submit(spec("d"))


def test_retry_after_a_crash_writes_only_the_missing_images(make_queue, service, tmp_path, monkeypatch):
    """kill -9 after the first of three images: the restarted queue retries and writes images 2 and 3 only."""
    import app.service as service_module

    out = service.config.output_dir
    state = tmp_path / "live" / "queue.json"
    crash = tmp_path / "crash"
    real_save = service_module.save_image_atomic
    calls = []

    def save_then_crash(image, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # image 1 is on disk and recorded: what a kill -9 now leaves
            crash_copy(state, crash)
            raise RuntimeError("killed")
        return real_save(image, path, *a, **kw)

    monkeypatch.setattr(service_module, "save_image_atomic", save_then_crash)
    q1 = make_queue(state).start()
    job_id = q1.submit(spec("three foxes", num_images=3, seed=-1))
    assert q1.wait(job_id, 120)["status"] == "failed"
    q1.close()
    monkeypatch.setattr(service_module, "save_image_atomic", real_save)
    before = set(out.iterdir())

    q2 = make_queue(crash / "queue.json")
    job = q2.get(job_id)
    assert job["status"] == "interrupted" and len(job["paths"]) == 1 and job["image_indexes"] == [0]
    batch = job["batch_seed"]
    assert job["seeds"] == [batch] and job["paths"][0] == str(calls[0])
    q2.retry(job_id)
    q2.start()
    job = q2.wait(job_id, 120)
    assert job["status"] == "done", job["error"]
    assert job["paths"][0] == str(calls[0]) and job["seeds"] == [batch, batch + 1, batch + 2]
    new = set(out.iterdir()) - before
    assert sorted(str(p) for p in new) == sorted(job["paths"][1:])  # two new files, no duplicate of image 1
    for i, path in enumerate(job["paths"]):
        meta = read_settings(path)
        assert (meta["seed"], meta["image_index"], meta["batch_seed"]) == (batch + i, i, batch)
        assert f"_seed{batch + i}_{i + 1}_three_foxes" in path  # the usual names
    # the same pixels as one uninterrupted batch of three
    ref = service.generate(spec("three foxes", num_images=3, seed=batch), output_dir=tmp_path / "ref")
    for path, ref_path in zip(job["paths"], ref.paths):
        # a batch of 2 and a batch of 3 differ in float rounding on the CPU (seed-dependent, so it failed now and
        # then): the same bound as re-rendering one image of a batch alone (test_cli's from-image test)
        diff = np.abs(np.asarray(Image.open(path)).astype(int) - np.asarray(Image.open(ref_path)).astype(int))
        assert diff.max() <= 2
    # a retry of a job whose images are all there renders nothing
    again = service.generate(spec("three foxes", num_images=3, seed=-1), batch_seed=batch,
                             existing_images=dict(enumerate(job["paths"])), output_dir=tmp_path / "none")
    assert [str(p) for p in again.paths] == job["paths"] and not (tmp_path / "none").exists()


def test_latent_preview(service):
    rng = np.random.default_rng(0)
    factors = service.latent_preview_factors("z_image_tiny")  # the family's projection, from its handler
    im = latent_preview(rng.standard_normal((2, 16, 8, 12)).astype(np.float32), factors=factors)
    assert im.mode == "RGB" and im.size == (12 * 21, 8 * 21)  # scaled up by a whole factor
    assert latent_preview(rng.standard_normal((1, 4, 8, 8)), factors=factors).mode == "RGB"  # other latent spaces
    assert latent_preview(rng.standard_normal((1, 16, 8, 8))).mode == "RGB"  # a family that gives none


class FlakyCluster:
    """An executor (the local one inside) whose only worker is missing until `back` is set: a cluster gone."""

    def __init__(self, service):
        from app.executors import LocalExecutor

        self.inner, self.back = LocalExecutor(service), False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def ensure(self, slot: int) -> bool:
        return self.back

    def workers(self):
        return [{"name": "w1", "state": "idle" if self.back else "unavailable: cluster gone"}]


def test_jobs_wait_while_no_worker_is_there_and_run_when_one_returns(service, tmp_path):
    from app.ui_view import progress_html

    executor = FlakyCluster(service)
    q = JobQueue(service, tmp_path / "queue.json", executor=executor).start()
    try:
        job_id = q.submit(spec("waits"))
        time.sleep(0.5)
        assert q.get(job_id)["status"] == "queued"
        assert "w1: unavailable: cluster gone" in progress_html(q.snapshot(), q.notices, q.workers())
        executor.back = True  # the slot looks again within 5 s
        assert q.wait(job_id, 60)["status"] == "done"
    finally:
        q.close()


def test_worker_and_attempts_are_kept_across_a_restart(make_queue, tmp_path):
    q = make_queue()
    job_id = q.submit(spec("kept"))
    with q._cond:  # as the queue records a job a Ray worker ran, once requeued
        q._jobs[0].worker, q._jobs[0].attempts = "ray-2", 1
        q._changed()
    again = make_queue(state_file=q.state_file)
    assert (again.get(job_id)["worker"], again.get(job_id)["attempts"]) == ("ray-2", 1)


def test_abort_waiting_ends_the_queued_jobs_and_a_retry_resets_the_lost_worker_count(make_queue):
    from app.jobs import JobSpec

    q = make_queue()  # not started: the jobs wait
    ids = q.submit_many([JobSpec(model_type="z_image_tiny", prompt=f"p{i}") for i in range(3)])
    assert q.abort_waiting() == 3 and q.abort_waiting() == 0
    jobs = [q.get(i) for i in ids]
    assert {j["status"] for j in jobs} == {"aborted"} and jobs[0]["error"] == "stopped before it ran"
    q._find(ids[0]).attempts = 3  # a job that lost its worker three times
    q.retry(ids[0])
    assert q.get(ids[0])["status"] == "queued" and q._find(ids[0]).attempts == 0


def test_gallery_lists_results_not_their_input_copies(tmp_path):
    """Copies of a job's inputs beside its image stay out of the gallery; an image whose prompt merely ends in
    "mask", "input" or "control" is a result like any other."""
    from app.outputs import output_name
    from app.ui_view import recent_images

    when = datetime(2026, 12, 1, 5, 0, 0)
    names = [output_name(when, 1, 1, "a venetian mask"), output_name(when, 2, 1, "user input"),
             output_name(when, 3, 1, "full control"), output_name(when, 4, 1, "a red fox", "jpg")]
    fox = Path(names[3]).stem
    copies = [f"{fox}_input.png", f"{fox}_mask.png", f"{fox}_control.png", f"{fox}_control_input-2.png"]
    for name in names + copies:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert sorted(Path(p).name for p, _ in recent_images(tmp_path)) == sorted(names)


def test_a_job_leaving_the_queue_while_another_is_submitted_keeps_its_input_copy(make_queue, tmp_path, monkeypatch):
    """Any change to the queue prunes the input copies no job names; a submit's fresh copy must be named by its
    job before such a change can run (here: another tab removes a finished job meanwhile)."""
    import threading

    q = make_queue().start()
    old = q.submit(spec("old"))
    q.wait(old, timeout=120)
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    copy_inputs, others = q._keep_inputs, []

    def copy_then_let_another_tab_in(s):
        copy_inputs(s)
        others.append(threading.Thread(target=q.remove, args=(old,)))
        others[0].start()
        others[0].join(0.5)  # with the lock held, the removal waits for the submit

    monkeypatch.setattr(q, "_keep_inputs", copy_then_let_another_tab_in)
    new = q.submit(spec("new", image=str(picture), strength=0.5))
    others[0].join(30)
    assert [j["id"] for j in q.snapshot()] == [new]  # the removal did happen
    assert Path(q.get(new)["spec"]["image"]).is_file()
    q.wait(new, timeout=120)
    assert q.get(new)["status"] == "done", q.get(new)


def test_when_idle_runs_without_the_lock_and_no_job_starts_meanwhile(make_queue):
    """An unload (seconds) must not block every tab's poll, nor let a job start in the middle of it."""
    import threading

    q = make_queue().start()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def slow_unload():
        inside.set()
        release.wait(10)
        seen["status"] = q.get(job_id)["status"]

    job_id = q.submit(spec("after the unload"))
    q.wait(job_id, 60)
    job_id = None
    caller = threading.Thread(target=lambda: seen.setdefault("ran", q.when_idle(slow_unload)))
    caller.start()
    assert inside.wait(10)
    started = time.monotonic()
    job_id = q.submit(spec("submitted mid-unload"))  # takes the lock: must not wait for the unload
    q.snapshot()
    assert time.monotonic() - started < 2
    time.sleep(0.5)
    assert q.get(job_id)["status"] == "queued"  # held back while the unload runs
    release.set()
    caller.join(10)
    assert seen == {"status": "queued", "ran": True}
    assert q.wait(job_id, 60)["status"] == "done"


def test_deeply_nested_queue_files_are_set_aside_not_fatal(make_queue, tmp_path):
    """'[' * 200000 overflowed the JSON parser's stack: RecursionError stopped the app at start."""
    deep = "[" * 200_000 + "]" * 200_000
    state = tmp_path / "queue.json"
    state.write_text(deep)
    assert make_queue(state).snapshot() == []
    assert (tmp_path / "queue.json.broken").read_text() == deep
    state.write_text("{truncated")  # a second broken file: the first one is kept
    q = make_queue(state)
    assert q.snapshot() == [] and "queue.json.broken-2" in q.notices[0]
    assert (tmp_path / "queue.json.broken").read_text() == deep
    assert (tmp_path / "queue.json.broken-2").read_text() == "{truncated"
    # a job's prompt file nested so: that job is moved aside, the others run
    q = make_queue(state)
    kept, bad = q.submit(spec("kept")), q.submit(spec("deep prompts"))
    (tmp_path / "queue.prompts" / f"{bad}.json").write_text(deep)
    again = make_queue(state)
    assert [j["id"] for j in again.snapshot()] == [kept]
    assert f"'{bad}' could not be restored (its prompt file cannot be read (nested more than" in again.notices[0]
    (record,) = json.loads((tmp_path / "queue.json.rejected").read_text())["jobs"]
    assert record["job"]["id"] == bad and record["texts_file"] == deep[:100_000]  # what the file held
    # a .rejected file nested so is set aside too, not fatal
    (tmp_path / "queue.json.rejected").write_text(deep)
    (tmp_path / "queue.prompts" / f"{kept}.json").write_text("[1")
    assert make_queue(state).snapshot() == []
    assert (tmp_path / "queue.json.rejected.broken").read_text() == deep
    assert json.loads((tmp_path / "queue.json.rejected").read_text())["jobs"][0]["job"]["id"] == kept


def test_saved_jobs_open_input_files_only_from_the_queues_inputs_folder(make_queue, tmp_path):
    """A queue file is data: a job naming /etc/hostname as its image must not have it opened."""
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    outside = tmp_path / "private.png"
    Image.new("RGB", (64, 64), "blue").save(outside)
    first = make_queue(tmp_path / "a" / "queue.json")
    ids = [first.submit(spec(f"job {i}", image=str(picture), strength=0.5)) for i in range(5)]
    copy = Path(first.get(ids[0])["spec"]["image"])
    assert copy.parent == first.inputs_dir
    (first.inputs_dir / "link.png").symlink_to(outside)
    state = json.loads(first.state_file.read_text())
    images = [str(outside), str(first.inputs_dir / ".." / ".." / "private.png"), str(first.inputs_dir / "link.png")]
    for record, image in zip(state["jobs"][1:], images):
        record["spec"]["image"] = image
    first.state_file.write_text(json.dumps(state))
    again = make_queue(first.state_file)
    assert [j["id"] for j in again.snapshot()] == [ids[0], ids[4]]  # the copy, as the current code writes it
    assert again.get(ids[0])["spec"]["image"] == str(copy)
    assert len(again.notices) == 3 and all("is not one of the queue's input copies" in n for n in again.notices)
    rejected = json.loads((first.state_file.with_name("queue.json.rejected")).read_text())["jobs"]
    assert [r["job"]["spec"]["image"] for r in rejected] == images
    # the state folder moved (another path to it): its copies are found in their new place
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = make_queue(tmp_path / "b" / "queue.json")
    assert [j["spec"]["image"] for j in moved.snapshot()] == [str(tmp_path / "b" / "queue.inputs" / copy.name)] * 2
    assert not moved.notices


def test_jobs_wait_while_the_output_folder_cannot_be_written(make_queue, service, tmp_path, monkeypatch):
    """An output folder that could not be written drained the queue: each job rendered in full, then failed with
    a raw PermissionError naming a temporary file. The jobs now wait, the page says why, and they run once the
    folder can be written."""
    from app.ui_view import progress_html

    blocker = tmp_path / "file.txt"  # a folder under a regular file cannot be made (portable; root too)
    blocker.write_text("not a folder")
    monkeypatch.setattr(service.config, "output_dir", blocker / "outputs")
    q = make_queue().start()
    ids = q.submit_many([spec(f"waits {i}") for i in range(3)])
    q.wait_until(lambda q: q.waiting_reason != "", timeout=30)
    time.sleep(0.5)
    assert [j["status"] for j in q.snapshot()] == ["queued"] * 3  # nothing rendered, nothing failed
    why = f"cannot write in the output folder {blocker / 'outputs'}: {blocker} is not a folder"
    assert q.waiting_reason == why
    assert f"Queued jobs wait: {why}" in progress_html(q.snapshot(), q.notices, q.workers(), q.waiting_reason)
    blocker.unlink()
    blocker.mkdir()  # writable again: the jobs start by themselves (looked at every 5 s)
    for job_id in ids:
        assert q.wait(job_id, 120)["status"] == "done"
    assert q.waiting_reason == ""
    assert "wait" not in progress_html(q.snapshot(), q.notices, q.workers(), q.waiting_reason)


def test_a_save_that_fails_after_the_render_keeps_the_job(make_queue, service, tmp_path, monkeypatch):
    import app.service as service_module
    from app.outputs import SaveError, save_image_atomic
    from app.queue import user_message

    good = tmp_path / "out"
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    monkeypatch.setattr(service.config, "output_dir", good)
    calls = []

    def folder_gone_during_the_render(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # the folder became unusable while the job rendered: a real failed write
            monkeypatch.setattr(service.config, "output_dir", blocker / "outputs")
            return save_image_atomic(image, blocker / "outputs" / Path(path).name, *args, **kwargs)
        return save_image_atomic(image, path, *args, **kwargs)

    monkeypatch.setattr(service_module, "save_image_atomic", folder_gone_during_the_render)
    q = make_queue().start()
    job_id = q.submit(spec("kept"))
    q.wait_until(lambda q: q.waiting_reason != "", timeout=60)
    assert q.get(job_id)["status"] == "queued" and q.get(job_id)["error"] == ""  # back in line, waiting
    monkeypatch.setattr(service.config, "output_dir", good)
    assert q.wait(job_id, 120)["status"] == "done" and Path(q.get(job_id)["paths"][0]).parent == good

    def disk_full(image, path, *args, **kwargs):  # the folder takes files, the image does not fit
        raise SaveError(28, "No space left on device", str(path))

    monkeypatch.setattr(service_module, "save_image_atomic", disk_full)
    job_id = q.submit(spec("full"))
    job = q.wait(job_id, 120)
    assert job["status"] == "failed" and job["error"].startswith(f"could not save {good}")
    assert job["error"].endswith(": No space left on device; retry the job once fixed (the images it saved are kept)")
    # a raw write error names the folder, not the temporary file
    raw = PermissionError(1, "Operation not permitted", str(good / ".2026-x.png.xwuqvk1e.part"))
    assert user_message(raw) == f"Operation not permitted (in {good})"
    with pytest.raises(SaveError) as e:  # the real save names the image it meant
        save_image_atomic(Image.new("RGB", (8, 8)), blocker / "x.png")
    assert e.value.filename == str(blocker / "x.png")
