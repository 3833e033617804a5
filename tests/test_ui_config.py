"""The Config section through its API (save, unload, system info) and the saved config at the next start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import wgp_zimage
from app.metadata import read_settings
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.ui import build_ui, launch_options
from tests.test_ui_api import TINY, free_port

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

CONFIG = {"memory_profile": 2, "attention": "sdpa", "compile": False, "transformer_quantization": "auto",
          "text_encoder_quantization": "auto", "output_dir": "elsewhere", "output_format": "jpeg",
          "output_quality": 80, "save_metadata": True}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_config")
    (root / "ckpts").mkdir()
    (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    config = ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs")
    service = GenerationService(config)
    queue = JobQueue(service, root / "queue.json").start()
    demo = build_ui(queue, service, config, config_file=root / "state" / "wgp_zimage_config.json")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                **launch_options(config.output_dir))
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield root, service, queue, client
    demo.close()
    queue.close()


def run_job(client, queue, prompt="a fox"):
    ids = client.predict(prompt=prompt, **TINY, api_name="/generate").split(",")
    return [queue.wait(i, timeout=120) for i in ids]


def test_save_config_applies_output_options(served):
    root, service, queue, client = served
    msg = client.predict(**CONFIG, api_name="/save_config")
    path = root / "state" / "wgp_zimage_config.json"
    assert str(path) in msg and "next model load" in msg and "next start" in msg
    assert json.loads(path.read_text()) == CONFIG
    assert not list(path.parent.glob("*.part"))
    assert service.config.output_format == "jpeg" and service.config.output_quality == 80
    assert service.config.memory_profile == 2 and service.config.attention == "sdpa"
    (job,) = run_job(client, queue)
    assert job["status"] == "done", job
    (p,) = job["paths"]
    assert p.endswith(".jpg") and Path(p).parent == root / "outputs"  # the folder changes at the next start
    with Image.open(p) as im:
        assert im.format == "JPEG"
    assert read_settings(p)["prompt"] == "a fox"

    client.predict(**{**CONFIG, "output_format": "webp", "save_metadata": False}, api_name="/save_config")
    (job,) = run_job(client, queue, "no metadata")
    (p,) = job["paths"]
    assert p.endswith(".webp") and read_settings(p) is None
    client.predict(**{**CONFIG, "output_format": "png", "attention": "auto", "memory_profile": 4},
                   api_name="/save_config")


def test_save_config_refuses_bad_values(served):
    root, service, queue, client = served
    with pytest.raises(AppError, match="not saved"):
        client.predict(**{**CONFIG, "output_dir": "  "}, api_name="/save_config")


def test_unload_and_system_info(served):
    root, service, queue, client = served
    (job,) = run_job(client, queue)
    assert job["status"] == "done"
    info = client.predict(api_name="/system_info")
    assert "Device" in info and "cpu" in info and "Model** loaded" in info and "RAM" in info
    assert client.predict(api_name="/unload_models") == "Models unloaded."
    assert service._pipe is None
    assert client.predict(api_name="/unload_models") == "No model was loaded."
    assert "not loaded" in client.predict(api_name="/system_info")


def test_unload_refused_while_running(served):
    root, service, queue, client = served
    ids = client.predict(prompt="long", **{**TINY, "width": 512, "height": 512, "steps": 100},
                         api_name="/generate").split(",")
    queue.wait_until(lambda q: q.get(ids[0])["status"] == "running" and q.get(ids[0])["step"] >= 1, timeout=120)
    assert client.predict(api_name="/unload_models").startswith("A job is running")
    queue.abort()
    assert queue.wait(ids[0], timeout=120)["status"] == "aborted"


def test_saved_config_becomes_launch_defaults(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "wgp_zimage_config.json").write_text(json.dumps(CONFIG))
    args = wgp_zimage.parse_args(["--output-dir", str(out)])
    assert args.config_file == out / "wgp_zimage_config.json"
    assert args.memory_profile == 2 and args.attention == "sdpa" and args.output_format == "jpeg"
    assert args.output_quality == 80 and args.output_dir == out  # the explicit flag wins
    cfg = ServiceConfig.from_args(args)
    assert cfg.output_format == "jpeg" and cfg.memory_profile == 2
    args = wgp_zimage.parse_args(["--output-dir", str(out), "--memory-profile", "3", "--output-format", "png"])
    assert args.memory_profile == 3 and args.output_format == "png" and args.attention == "sdpa"
    # --state-dir holds it when given; sub-commands never read it
    assert wgp_zimage.parse_args(["--state-dir", str(tmp_path), "--output-dir", str(out)]).memory_profile == 4
    assert wgp_zimage.parse_args(["--output-dir", str(out), "models"]).memory_profile == 4



def test_saved_output_folder_moves_images_not_the_queue(tmp_path, monkeypatch):
    """Config's Save of another output folder: the next start writes images there but keeps reading the queue
    (and the config) where they were, so no queued job is forgotten."""
    from app.launch import queue_file

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "outputs"
    first.mkdir()
    (first / "wgp_zimage_config.json").write_text(json.dumps({"output_dir": str(tmp_path / "elsewhere")}))
    args = wgp_zimage.parse_args([])  # the default output folder, ./outputs
    assert Path(args.output_dir) == tmp_path / "elsewhere"
    assert queue_file(args).resolve() == first / "wgp_zimage_queue.json"
    assert args.config_file.resolve() == first / "wgp_zimage_config.json"
    # an explicit --state-dir still holds both
    args = wgp_zimage.parse_args(["--state-dir", str(tmp_path / "st")])
    assert queue_file(args) == tmp_path / "st" / "wgp_zimage_queue.json"

def test_vram_readout_on_cuda(tmp_path, monkeypatch):
    """On a CUDA device the page shows VRAM used of total, read from torch.cuda.mem_get_info."""
    import torch

    from app.service import GenerationService, ServiceConfig
    from app.ui_config import system_info_text

    service = GenerationService(ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out"))
    service.device = torch.device("cuda")  # as resolved on a GPU machine
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (3 * 2**30, 8 * 2**30))
    status = service.memory_status()
    assert (status["vram_free"], status["vram_total"]) == (3 * 2**30, 8 * 2**30) and asked == [service.device]
    text = system_info_text(service)
    assert "**VRAM** 5.0 GiB used of 8.0 GiB" in text and "**Device** cuda" in text
    assert "used on CUDA only" not in text


# ------------------------------------------------------------------ unusable output folders (refused on save,
# ignored with a warning at start)

def unusable_folders(state: Path) -> list[tuple[str, str]]:
    """(output folder, words of the refusal): each would break the next start or expose files."""
    from tests.conftest import ROOT

    return [("out\x00put", "control characters"), ("/proc/nope/out", "cannot be created"),
            ("/", "root folder"), (str(Path.home()), "home folder"), (str(ROOT), "app folder"),
            (str(state.parent), "state folder")]


def test_save_config_refuses_unusable_output_folders(served):
    root, service, queue, client = served
    path = root / "state" / "wgp_zimage_config.json"
    client.predict(**{**CONFIG, "output_format": "png"}, api_name="/save_config")
    before = path.read_bytes()
    for folder, why in unusable_folders(path.parent):
        with pytest.raises(AppError, match=f"not saved: .*{why}"):
            client.predict(**{**CONFIG, "output_dir": folder}, api_name="/save_config")
        assert path.read_bytes() == before, folder  # the saved file is untouched
    assert not Path("/proc/nope").exists()
    # the app goes on: a good folder still saves
    assert "Saved to" in client.predict(**{**CONFIG, "output_dir": str(root / "other")}, api_name="/save_config")
    assert not (root / "other").exists()  # checked, not left behind: it is created at the next start
    client.predict(**{**CONFIG, "output_format": "png", "attention": "auto", "memory_profile": 4},
                   api_name="/save_config")


def test_bad_saved_output_folder_warns_and_starts_with_the_default(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    for folder, why in unusable_folders(state):
        (state / "wgp_zimage_config.json").write_text(json.dumps({**CONFIG, "output_dir": folder}))
        args = wgp_zimage.parse_args(["--state-dir", str(state)])
        err = capsys.readouterr().err
        assert err.startswith("warning: ") and why in err and "default" in err and len(err.splitlines()) == 1, err
        assert args.output_dir == Path("outputs"), folder  # the default
        assert args.memory_profile == 2 and args.output_format == "jpeg"  # the other saved values still apply


def test_hostile_saved_config_file_warns_and_starts_with_the_defaults(tmp_path, capsys):
    """Deep nesting (RecursionError in json), NaN, a FIFO: one warning line, the defaults, no traceback."""
    import os

    state = tmp_path / "state"
    state.mkdir()
    path = state / "wgp_zimage_config.json"
    for make, why in ((lambda: path.write_text("[" * 100000 + "]" * 100000), "nested"),
                      (lambda: path.write_text('{"output_quality": NaN}'), "JSON"),
                      (lambda: os.mkfifo(path), "regular file")):
        path.unlink(missing_ok=True)
        make()
        args = wgp_zimage.parse_args(["--state-dir", str(state)])
        err = capsys.readouterr().err
        assert err.startswith("warning: ignoring the configuration file") and len(err.splitlines()) == 1, err
        assert why in err, err
        assert args.output_dir == Path("outputs") and args.memory_profile == 4


def test_launch_refuses_unusable_output_folders(tmp_path, monkeypatch):
    """A bad --output-dir is one error line before anything starts (it used to be a traceback, or served)."""
    import app.ui
    from app.launch import launch
    from models.errors import UserError
    from tests.test_ui_api import launch_parser

    def too_far(*a, **k):
        raise AssertionError("the page was built: the output folder was not checked")

    monkeypatch.setattr(app.ui, "build_ui", too_far)
    for folder, why in unusable_folders(tmp_path / "state")[1:]:  # argv has no NUL
        args = launch_parser().parse_args(["--output-dir", folder, "--state-dir", str(tmp_path / "state"),
                                           "--checkpoints-dir", str(tmp_path / "ckpts")])
        with pytest.raises(UserError, match=why):
            launch(args)
