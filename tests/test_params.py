"""Generation parameters declared once (models/params.py, app/params.py, a family's params.py): how a value is
read, and a dummy family whose one new parameter (declaration + its pipeline reading it, nothing else) reaches
the command line, the job spec, the pipeline, image metadata and generation profiles."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import UserError
from models.params import Param
from models.registry import FamilyHandler, register_handler, unregister_handler

STEPS = Param("num_inference_steps", int, 30, "Steps", minimum=1, maximum=100, cli="--steps")
SIZE = Param("width", int, 1024, "Width", minimum=16, maximum=4096, multiple_of=16, cli="--width")
SHIFT = Param("flow_shift", float, 6.0, "Flow shift", minimum=1.0, maximum=10.0, cli="--flow-shift")


@pytest.mark.parametrize("param, raw, expected", [
    (STEPS, 30, 30), (STEPS, 30.0, 30), (STEPS, "30", 30), (STEPS, " 7 ", 7), (STEPS, "+7", 7),
    (SIZE, 1024, 1024), (SIZE, "64", 64), (SHIFT, 3, 3.0), (SHIFT, "3.5", 3.5), (SHIFT, "1e0", 1.0),
])
def test_values_read_from_any_source(param, raw, expected):
    value = param.parse(raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("param, raw, message", [
    (STEPS, 500, "Steps (--steps) must be between 1 and 100 (got 500)"),
    (STEPS, "0", "Steps (--steps) must be between 1 and 100 (got 0)"),
    (STEPS, 2.5, "Steps (--steps) must be a whole number (got 2.5)"),
    (STEPS, "٣", "Steps (--steps) must be a whole number (got '٣')"),  # int("٣") == 3
    (STEPS, "²", "Steps (--steps) must be a whole number (got '²')"),
    (STEPS, True, "Steps (--steps) must be a whole number (got True)"),
    (STEPS, None, "Steps (--steps) is missing"),
    (STEPS, 10**400, "Steps (--steps) must be between 1 and 100"),
    (SIZE, 1000, "Width (--width) must be a multiple of 16 (got 1000)"),
    (SHIFT, "nan", "Flow shift (--flow-shift) must be a number (got 'nan')"),
    (SHIFT, float("inf"), "Flow shift (--flow-shift) must be a finite number (got inf)"),
    (SHIFT, 10**400, "Flow shift (--flow-shift) must be a finite number"),
    (SHIFT, [3], "Flow shift (--flow-shift) must be a number (got [3])"),
])
def test_bad_values_name_the_parameter_one_way(param, raw, message):
    with pytest.raises(UserError) as e:
        param.parse(raw)
    assert str(e.value).startswith(message)


def test_json_documents_keep_strict_types():
    assert STEPS.parse("30") == 30
    with pytest.raises(UserError, match="must be a number"):
        STEPS.parse("30", from_text=False)  # "30" where a file holds 30: a foreign file
    text = Param("prompt", str, "", "Prompt", cli="--prompt")
    assert text.parse("a fox") == "a fox"
    with pytest.raises(UserError, match=r"Prompt \(--prompt\) holds a character that is not valid Unicode text at "
                                        r"position 2 \(a lone surrogate\)"):
        text.parse("a \ud800")
    with pytest.raises(UserError, match="must be text"):
        text.parse(5)
    choice = Param("memory_profile", int, None, "Memory profile", choices=(1, 2, 3), optional=True)
    assert choice.parse(None) is None and choice.parse("2") == 2
    with pytest.raises(UserError, match=r"Memory profile must be one of 1, 2, 3 \(got 4\)"):
        choice.parse(4)


def test_a_family_declares_its_parameters_without_torch():
    """The CLI's option list and the job spec read the declarations without loading torch."""
    import subprocess
    import sys

    code = ("import sys; from app.params import all_params; names = [p.name for p in all_params()]; "
            "assert 'flow_shift' in names and 'width' in names, names; assert 'torch' not in sys.modules")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ a dummy family with one parameter of its own

GLOW = Param("glow", float, 0.25, "Glow", minimum=0.0, maximum=1.0, step=0.05, cli="--glow", a1111="Glow",
             help="how bright the dummy image is")


@dataclass
class _Output:
    images: list
    seeds: list


class _GlowPipeline:
    """The dummy family's pipeline: it reads its own parameter by name (and ignores Z-Image's)."""

    device = "cpu"

    def __call__(self, *, prompt, negative_prompt, width, height, num_inference_steps, glow,
                 num_images_per_prompt, seed, callback=None, interrupt=None, step_start=None, vae_tiling=None,
                 **unused):
        assert not {"flow_shift", "guidance_scale"} & set(unused), unused
        for i in range(num_inference_steps):
            if step_start is not None:
                step_start(i, num_inference_steps)
            if callback is not None:
                callback(i, num_inference_steps, np.zeros((1, 3, 2, 2), np.float32))
        value = int(round(glow * 255))
        images = [Image.new("RGB", (width, height), (value, value, value)) for _ in range(num_images_per_prompt)]
        return _Output(images, [seed + i for i in range(num_images_per_prompt)])


class _GlowHandler(FamilyHandler):
    family = "glowtest"
    family_label = "Glow test"
    architectures = ("glow_arch",)
    params = (GLOW,)

    def ui_defaults(self, architecture):
        return {"width": 32, "height": 32, "num_inference_steps": 2}

    def default_model_dir(self, architecture, checkpoints_dir):
        return Path(checkpoints_dir)

    def load_model(self, **kwargs):
        import torch.nn as nn

        return _GlowPipeline(), {"transformer": nn.Linear(2, 2)}


@pytest.fixture()
def glow_family(tmp_path, monkeypatch):
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "glow_model.json").write_text(json.dumps({"model": {"name": "Glow", "architecture": "glow_arch"}}))
    import models.registry as registry

    # the real families' definitions plus the dummy one
    monkeypatch.setattr(registry, "FINETUNES_DIR", defaults)
    register_handler(_GlowHandler())
    yield defaults
    unregister_handler("glowtest")


def test_a_new_parameter_reaches_cli_spec_pipeline_metadata_and_profiles(glow_family, tmp_path, capsys):
    import wgp_zimage
    from app.jobs import JobSpec, validate
    from app.metadata import a1111_parameters, job_settings, read_settings
    from app.service import GenerationService, ServiceConfig
    from app.settings import ProfileStore

    # the command line: an option of generate, with its help
    parser = wgp_zimage.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    assert "--glow" in capsys.readouterr().out
    args = parser.parse_args(["generate", "--prompt", "x", "--glow", "0.8"])
    assert args.glow == "0.8"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--glow", "0.8", "--glow-typo", "1"])
    capsys.readouterr()

    # the job spec and its one validation
    spec = JobSpec(model_type="glow_model", prompt="a glow", glow="0.8", num_inference_steps=2, width=32, height=32)
    validate(spec)
    assert spec.glow == 0.8
    with pytest.raises(UserError, match=r"Glow \(--glow\) must be between 0 and 1 \(got 2\)"):
        validate(JobSpec(model_type="glow_model", prompt="a glow", glow=2))
    assert spec.pipeline_values("glow_arch")["glow"] == 0.8
    assert "flow_shift" not in spec.pipeline_values("glow_arch")

    # the pipeline receives it; the image's metadata and A1111 text carry it
    service = GenerationService(ServiceConfig(output_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpts"))
    result = service.generate(spec)
    (path,) = result.paths
    assert Image.open(path).getpixel((0, 0)) == (204, 204, 204)
    meta = read_settings(path)
    assert meta["glow"] == 0.8 and "Glow: 0.8" in a1111_parameters(meta)
    again = job_settings(meta)
    assert again["glow"] == 0.8 and again["model_type"] == "glow_model"
    meta["glow"] = "0.8"
    with pytest.raises(ValueError, match=r"glow: Glow \(--glow\) must be a number"):  # text where a number
        job_settings(meta)  # belongs: a foreign file

    # a generation profile keeps it
    store = ProfileStore(tmp_path / "profiles")
    store.save("glowing", {"model_type": "glow_model", "glow": 0.6})
    assert store.load("glowing")[0]["glow"] == 0.6
    with pytest.raises(UserError, match="Glow"):
        store.save("too bright", {"model_type": "glow_model", "glow": 3})


def test_a_new_parameter_reaches_the_page_and_the_generate_api(glow_family, tmp_path):
    """The same dummy parameter on the page: a control in the form (shown for its family's model only) and an
    argument of /generate, read and checked as on the command line."""
    from gradio_client import Client

    from app.queue import JobQueue
    from app.service import GenerationService, ServiceConfig
    from app.ui import build_ui, launch_options
    from tests.test_ui_api import free_port

    config = ServiceConfig(output_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpts")
    service = GenerationService(config)
    queue = JobQueue(service, tmp_path / "queue.json").start()
    demo = build_ui(queue, service, config)
    try:
        (control,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "glow"]
        assert (control.label, control.minimum, control.maximum, control.value) == ("Glow", 0.0, 1.0, 0.25)
        # where each model type shows it (the same table decides the page's visibility on a model change)
        model_updates = {getattr(e.fn, "__name__", ""): e for e in demo.fns.values()}["placement_updates"].fn
        index = [p.name for p in demo_params()].index("glow")
        assert model_updates("glow_model")[index]["visible"] is True
        assert model_updates("z_image_base")[index]["visible"] is False
        shift = [p.name for p in demo_params()].index("flow_shift")
        assert model_updates("glow_model")[shift]["visible"] is False  # another family's parameter

        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                    **launch_options(config.output_dir))
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert "glow" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"][
            "parameters"][[p.name for p in demo_params()].index("glow") + 3]["parameter_name"]
        with pytest.raises(Exception, match=r"Glow \(--glow\) must be between 0 and 1 \(got 2\)"):
            client.predict(model_type="glow_model", prompt="too bright", glow=2, width=32, height=32, steps=2,
                           api_name="/generate")
        (job_id,) = client.predict(model_type="glow_model", prompt="a glow", glow=0.6, width=32, height=32, steps=2,
                                   api_name="/generate").split(",")
        deadline = time.monotonic() + 60
        while (job := queue.get(job_id))["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["status"] == "done", job["error"]
        assert Image.open(job["paths"][0]).getpixel((0, 0)) == (153, 153, 153)
    finally:
        demo.close()
        queue.close()


def demo_params() -> list:
    from app.ui_form import form_params

    return form_params()


def test_readme_lists_every_generate_option_of_the_declarations():
    """The README's table of generation parameters is the declarations' list (no more, no less)."""
    import re

    from app.params import CUSTOM_CONTROLS, all_params

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--[a-z0-9-]+)` \| ([^|]+) \|", readme, re.M)}
    declared = {p.cli: p for p in all_params() if p.cli is not None and p.name not in CUSTOM_CONTROLS}
    assert set(rows) == set(declared)
    for flag, label in rows.items():
        assert label.strip() == declared[flag].label
        p = declared[flag]
        if p.minimum is not None:
            assert re.search(rf"^\| `{flag}` \| [^|]+ \| {p.describe_range()}", readme, re.M), flag
