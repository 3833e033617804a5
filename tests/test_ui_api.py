"""The web UI's named API endpoints, driven by gradio_client against the app served in-process."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.metadata import read_settings
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.ui import build_ui, launch_options

TINY = {"model_type": "z_image_tiny", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 2,
        "guidance": 4.0, "flow_shift": 6.0}
# gradio's own monitoring code trips pandas 3 deprecation warnings on every event
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
LONG = {**TINY, "width": 512, "height": 512, "steps": 100}  # slow enough to still run after a few API calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """The served app: its queue, output folder and a client."""

    def __init__(self, root: Path, tiny_dir: Path, profiles: bool = False):
        (root / "ckpts").mkdir(parents=True)
        (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
        self.config = ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs")
        self.service = GenerationService(self.config)
        self.queue = JobQueue(self.service, root / "queue.json").start()
        # profiles: a generation profiles folder, which also keeps the last used settings
        self.profiles_dir = root / "profiles" if profiles else None
        self.demo = build_ui(self.queue, self.service, self.config, profiles_dir=self.profiles_dir)
        self.port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True, quiet=True,
                         ssr_mode=False, **launch_options(self.config.output_dir))
        self.url = f"http://127.0.0.1:{self.port}/"
        self.client = Client(self.url, verbose=False)

    def close(self) -> None:
        self.demo.close()
        self.queue.close()

    def generate(self, prompt: str, **kw) -> list[str]:
        ids = self.client.predict(prompt=prompt, **{**TINY, **kw}, api_name="/generate")
        return ids.split(",")

    def jobs(self) -> dict[str, dict]:
        return {j["id"]: j for j in self.client.predict(api_name="/queue")}

    def wait(self, check: Callable[[dict[str, dict]], bool], timeout: float = 120) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if check(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; queue: {[(j['id'], j['status']) for j in jobs.values()]}")
            time.sleep(0.2)

    def wait_done(self, ids: list[str], timeout: float = 120) -> dict[str, dict]:
        finished = ("done", "failed", "aborted", "interrupted")
        return self.wait(lambda jobs: all(jobs[i]["status"] in finished for i in ids), timeout)


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("ui_api"), tiny_dir)
    yield served
    served.close()


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_image_with_metadata(app):
    (job_id,) = app.generate("a red fox in the snow", seed=123, num_images=2)
    job = app.wait_done([job_id])[job_id]
    assert job["status"] == "done", job["error"]
    assert job["seeds"] == [123, 124] and len(job["paths"]) == 2
    for path, seed in zip(job["paths"], job["seeds"]):
        assert Path(path).parent == app.config.output_dir.resolve() or Path(path).parent == app.config.output_dir
        meta = read_settings(path)
        assert meta["prompt"] == "a red fox in the snow" and meta["seed"] == seed and meta["batch_seed"] == 123
        assert meta["model_type"] == "z_image_tiny" and meta["num_inference_steps"] == 2 and meta["width"] == 64
        assert isinstance(meta["num_inference_steps"], int)  # the slider's 2.0 became a whole number


def test_seed_reuse_gives_the_same_image(app):
    (first,) = app.generate("seed reuse", seed=-1)
    job = app.wait_done([first])[first]
    assert job["status"] == "done", job["error"]
    seed = app.client.predict(api_name="/last_seed")
    assert seed == job["seeds"][0] == read_settings(job["paths"][0])["seed"]
    (again,) = app.generate("seed reuse", seed=seed)
    job2 = app.wait_done([again])[again]
    assert job2["seeds"] == [seed]
    assert np.array_equal(pixels(job["paths"][0]), pixels(job2["paths"][0]))


def test_one_job_per_line_runs_in_order(app):
    ids = app.generate("first fox\n\n# a comment\nsecond fox\nthird fox", one_per_line=True, seed=5)
    assert len(ids) == 3
    jobs = app.wait_done(ids)
    assert [jobs[i]["spec"]["prompt"] for i in ids] == ["first fox", "second fox", "third fox"]
    assert all(jobs[i]["status"] == "done" for i in ids)
    assert sorted(ids, key=lambda i: jobs[i]["started"]) == ids


def test_queue_remove_move_retry_and_abort(app):
    (long,) = app.generate("long job", **LONG)
    app.wait(lambda jobs: jobs[long]["phase"] == "denoising")  # running: what follows waits behind it
    a, b, c = (app.generate(p, seed=1)[0] for p in ("job a", "job b", "job c"))
    assert "Moved" in app.client.predict(c, api_name="/move_up")  # long | a c b
    # the next job to run cannot move up, nor the last one down: said so, nothing moves
    assert app.client.predict(a, api_name="/move_up") == f"Job {a} is already first in the queue."
    assert app.client.predict(b, api_name="/move_down") == f"Job {b} is already last in the queue."
    assert "Removed" in app.client.predict(b, api_name="/remove")  # long | a c
    order = [i for i in app.jobs() if i in (a, b, c)]
    assert order == [a, c]
    msg = app.client.predict(api_name="/stop")
    m = re.fullmatch(rf"Stopping job {long} at step (\d+)/100 after the current step\.", msg)
    assert m, msg
    jobs = app.wait_done([long, a, c])
    # the step that was running when the flag was set finishes; the next one never starts
    assert jobs[long]["status"] == "aborted" and jobs[long]["step"] <= int(m.group(1)) + 1
    assert jobs[long]["paths"] == []
    assert jobs[a]["status"] == jobs[c]["status"] == "done"
    assert jobs[a]["started"] < jobs[c]["started"]
    assert "Queued job" in app.client.predict(long, api_name="/retry")
    assert app.jobs()[long]["status"] in ("queued", "running")
    assert "Removed" in app.client.predict(long, api_name="/remove")  # stops it if it already started
    app.wait(lambda jobs: long not in jobs, 60)
    assert app.client.predict(api_name="/stop") == "No job is running."


def test_bad_input_is_reported_and_the_server_stays_up(app):
    with pytest.raises(AppError, match=r"Width \(--width\) must be a multiple of 16 \(got 1000\)"):
        app.generate("bad width", width=1000)
    with pytest.raises(AppError, match="the prompt is empty"):
        app.generate("   ")
    with pytest.raises(AppError, match="prompt is empty"):
        app.generate("# only a comment\n\n", one_per_line=True)
    with pytest.raises(AppError, match=r"Seed \(--seed\) must be between -1 and"):
        app.generate("bad seed", seed=-5)
    assert "no job 'nope'" in app.client.predict("nope", api_name="/remove")
    before = len(app.jobs())
    assert len(app.jobs()) == before  # nothing was queued by the bad calls
    (ok,) = app.generate("still working")
    assert app.wait_done([ok])[ok]["status"] == "done"


def test_restore_settings_from_png(app, tmp_path):
    (job_id,) = app.generate("restore me", seed=77, steps=3, guidance=2.5, flow_shift=4.0, negative_prompt="ugly",
                             cfg_truncation=0.9, num_images=2)
    job = app.wait_done([job_id])[job_id]
    from tests.test_ui_restore import restore_outputs

    out = app.client.predict(handle_file(job["paths"][1]), api_name="/restore")
    named = dict(zip(restore_outputs(), out, strict=True))
    (model, prompt, negative, w, h, steps, guidance, shift, trunc, seed, num, preset, info, strengths, message) = (
        named[k] for k in ("model", "prompt", "negative", "width", "height", "steps", "guidance", "flow_shift",
                           "cfg_truncation", "seed", "num_images", "preset", "info", "lora_strengths", "message"))
    assert (model, prompt, w, h, steps, guidance, shift, trunc) == ("z_image_tiny", "restore me", 64, 64, 3, 2.5,
                                                                     4.0, 0.9)
    assert seed == 78 and num == 1  # the image's own seed: it renders alone as it did in its batch
    assert (negative.get("value") if isinstance(negative, dict) else negative) == "ugly"
    assert preset == "Custom" and "tiny" in info
    assert strengths == "" and "Settings restored from the image" in message
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    out = app.client.predict(handle_file(str(plain)), api_name="/restore")  # no settings: a warning, no change
    assert all(isinstance(v, dict) and "value" not in v for v in out[:-1])  # gr.skip() for every control
    assert "holds no wgp-zimage settings" in out[-1]


def test_page_is_served(app):
    import httpx

    r = httpx.get(app.url, timeout=10)
    assert r.status_code == 200 and "wgp-zimage" in r.text


# ------------------------------------------------------------------ launching

def launch_parser():
    import argparse

    import wgp_zimage
    from app.launch import add_launch_options

    return add_launch_options(argparse.ArgumentParser(parents=[wgp_zimage.shared_options()]))


def test_launch_options():
    from app.launch import parse_auth, queue_file
    from models.errors import UserError

    args = launch_parser().parse_args([])
    assert (args.server_name, args.server_port, args.listen, args.share, args.auth) == ("127.0.0.1", 7860, False,
                                                                                       False, None)
    assert queue_file(args) == Path("outputs") / "wgp_zimage_queue.json"
    args = launch_parser().parse_args(["--listen", "--server-port", "9000", "--auth", "me:se:cret",
                                       "--state-dir", "st", "--output-dir", "o", "--open-browser"])
    assert args.listen and args.server_port == 9000 and args.open_browser
    assert parse_auth(args.auth) == ("me", "se:cret") and queue_file(args) == Path("st") / "wgp_zimage_queue.json"
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(UserError, match="USER:PASSWORD"):
            parse_auth(bad)


def test_launch_serves_and_stops_cleanly(tiny_dir, tmp_path):
    """launch(args) in its own process: the page answers, SIGTERM stops it and saves the queue."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.conftest import ROOT

    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    port = free_port()
    code = ("import sys, argparse, wgp_zimage; from app.launch import add_launch_options, launch; "
            "p = add_launch_options(argparse.ArgumentParser(parents=[wgp_zimage.shared_options()])); "
            "sys.exit(launch(p.parse_args(sys.argv[1:])))")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--server-port", str(port), "--output-dir", str(tmp_path / "out"),
         "--checkpoints-dir", str(tmp_path / "ckpts"), "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the UI did not come up in 90 s"
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        (job_id,) = client.predict(prompt="launched", **TINY, api_name="/generate").split(",")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    saved = json.loads((tmp_path / "state" / "wgp_zimage_queue.json").read_text())
    assert [j["id"] for j in saved["jobs"]] == [job_id]
    assert saved["jobs"][0]["status"] in ("done", "interrupted", "queued")  # never left "running"


def test_live_token_count(app):
    short = app.client.predict(model_type="z_image_tiny", text="hello", api_name="/token_count")
    # the tiny tokenizer has one token per byte: 5 + the chat template's 19 (2 x <|im_start|>, <|im_end|>,
    # "user\n", "\n", "assistant\n")
    assert short == "24 / 512 tokens"
    long = app.client.predict(model_type="z_image_tiny", text="x" * 600, api_name="/token_count")
    assert long.startswith("**619 / 512 tokens**") and "cut" in long
    assert app.client.predict(model_type="z_image_tiny", text="", api_name="/token_count") == ""


def raw_call(app, api_name: str, data: list) -> tuple[str, str]:
    """Call an endpoint over plain HTTP with ASCII-escaped JSON, as any client may (gradio_client cannot send a
    lone surrogate); (event, data) of the reply's last event."""
    import httpx

    r = httpx.post(f"{app.url}gradio_api/call/{api_name}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.get(f"{app.url}gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=60)
    assert r.status_code == 200, r.text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", r.text, re.M)
    return events[-1]


def generate_args(prompt: str, one_per_line: bool = False) -> list:
    """/generate's arguments in order: the model, the prompt, one per line, each form parameter, LoRAs, memory."""
    from app.ui_form import form_params

    given = {"negative_prompt": "", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 7}
    return ["z_image_tiny", prompt, one_per_line,
            *(None if p.is_file else given.get(p.name, p.default) for p in form_params()), "", "default"]


def test_text_that_is_not_unicode_is_refused_and_the_queue_stays_readable(app):
    before = set(app.jobs())
    event, data = raw_call(app, "generate", generate_args("a fox \ud800 in the snow"))
    assert event == "error" and "the prompt holds a character that is not valid Unicode text" in data
    event, _ = raw_call(app, "generate", generate_args("fine\nbad \udcff", one_per_line=True))
    assert event == "error"
    assert set(app.jobs()) == before  # nothing queued; /queue still answers
    event, data = raw_call(app, "token_count", ["z_image_tiny", "x\ud800"])
    assert event == "complete" and "lone surrogate" in data


def test_request_and_prompt_limits(app):
    from app.jobs import MAX_PROMPT_CHARS

    before = set(app.jobs())
    with pytest.raises(AppError, match="one request can queue at most 100 jobs"):
        app.generate("\n".join(f"fox {i}" for i in range(1000)), one_per_line=True)
    assert set(app.jobs()) == before
    huge = "a red fox " * 500_000  # 5 MB
    t0 = time.monotonic()
    count = app.client.predict(model_type="z_image_tiny", text=huge, api_name="/token_count")
    assert time.monotonic() - t0 < 5  # counting cuts first (it took 6 s of CPU before)
    assert count.startswith(f"**{MAX_PROMPT_CHARS + 19}+ / 512 tokens**") and "5,000,000 characters" in count
    (job_id,) = app.generate(huge[:1_000_000])
    job = app.jobs()[job_id]
    assert job["spec"]["prompt"] == huge[:MAX_PROMPT_CHARS]
    app.client.predict(job_id, api_name="/remove")
