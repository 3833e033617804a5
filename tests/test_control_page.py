"""The ControlNet on the page and in the app: the tiny control type (the tiny model + a tiny ControlNet 2.1), the
control section's placement per model type, the control-map preview, /generate with a control image (map saved
beside the output, settings in the metadata, restore, profiles) and a queued control job across a restart."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from gradio.utils import get_upload_folder
from gradio_client import handle_file
from PIL import Image

from app.jobs import JobSpec
from app.metadata import read_settings
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.ui_controller import PageController
from app.ui_form import form_params
from app.ui_profiles import controls_to_settings
from app.ui_restore import restore_settings
from models.registry import load_definitions
from tests.conftest import cli, pixels
from tests.test_ui_api import App

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model (the control type writes its ControlNet into the folder)."""
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("control_page") / "z_image_tiny"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A picture with strong edges: a bright square and a disc on a gradient."""
    y, x = np.mgrid[0:96, 0:80]
    rgb = np.stack([x * 3, y * 2, (x + y)], -1).astype(np.uint8)
    rgb[20:60, 10:40] = 250
    rgb[((y - 60) ** 2 + (x - 55) ** 2) < 200] = (10, 200, 30)
    path = tmp_path_factory.mktemp("control_picture") / "scene.png"
    Image.fromarray(rgb).save(path)
    return path


def upload(path: Path) -> str:
    """path copied into Gradio's upload folder, as a browser upload lands."""
    folder = Path(get_upload_folder()) / "control-test"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{time.monotonic_ns()}-{path.name}"
    shutil.copyfile(path, target)
    return str(target)


def expected_canny(path: Path, width: int, height: int) -> np.ndarray:
    """OpenCV's Canny (100, 200) of the picture resized to the size (Lanczos, stretched as the image inputs are),
    as three channels: written from the libraries, not from our control_map."""
    import cv2

    fitted = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    edges = cv2.Canny(cv2.cvtColor(np.asarray(fitted), cv2.COLOR_RGB2GRAY), 100, 200)
    return np.repeat(edges[:, :, None], 3, axis=2)


def test_the_tiny_control_type_steers_the_tiny_model(model_dir, picture, tmp_path, capsys):
    common = ("--model-dir", str(model_dir), "--prompt", "a cat", "--steps", "3", "--width", "64", "--height",
              "64", "--seed", "4")
    plain, zero, steered = (tmp_path / f"{n}.png" for n in ("plain", "zero", "steered"))
    assert cli(capsys, "generate", "--model", "tiny", *common, "--output", str(plain))[0] == 0
    control = ("--model", "z_image_tiny_control", *common, "--control-image", str(picture), "--control-type",
               "canny")
    rc, _, err = cli(capsys, "generate", *control, "--control-strength", "0", "--output", str(zero))
    assert rc == 0, err
    assert (model_dir / "controlnet" / "config.json").is_file()  # written on first use
    assert np.array_equal(pixels(zero), pixels(plain))  # strength 0: exactly text-to-image
    assert cli(capsys, "generate", *control, "--output", str(steered))[0] == 0
    assert np.abs(pixels(steered) - pixels(plain)).mean() > 1.0
    assert np.array_equal(pixels(tmp_path / "steered_control.png"), expected_canny(picture, 64, 64))
    settings = read_settings(steered)
    assert (settings["model_type"], settings["control_type"], settings["control_strength"]) == (
        "z_image_tiny_control", "canny", 0.75)  # the type's own default strength


def test_a_folder_that_is_not_the_tiny_model_gets_no_tiny_controlnet(tmp_path, picture, capsys):
    rc, _, err = cli(capsys, "generate", "--model", "z_image_tiny_control", "--model-dir", str(tmp_path),
                     "--prompt", "x", "--control-image", str(picture))
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "controlnet").exists()


@pytest.fixture(scope="module")
def ctl(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("control_ctl")
    (root / "ckpts").mkdir()
    (root / "ckpts" / "z_image_tiny").symlink_to(model_dir, target_is_directory=True)
    service = GenerationService(ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "out"))
    return PageController(JobQueue(service, root / "queue.json"), service, None, form_params())


def test_the_control_section_shows_for_the_controlnet_types_only(ctl):
    for t in ("z_image_control", "z_image_control2", "z_image_control2_1", "z_image_tiny_control"):
        assert ctl.shows_group(t, "control") and ctl.shown(t, "control_image") and ctl.shown(t, "control_type")
        assert not ctl.shown(t, "nag_scale")  # a ControlNet job runs without NAG
    for t in ("z_image", "z_image_base", "z_image_tiny", "z_image_twinflow_turbo"):
        assert not ctl.shows_group(t, "control")
    assert ctl.shown("z_image_control2", "mask") and not ctl.shown("z_image_control", "mask")  # 1.0: no inpaint


def test_the_preview_is_the_map_the_job_uses(ctl, picture):
    got = ctl.control_preview("z_image_tiny_control", upload(picture), "canny", 48, 64)
    assert np.array_equal(np.asarray(got.convert("RGB")), expected_canny(picture, 48, 64))
    raw = ctl.control_preview("z_image_tiny_control", {"path": upload(picture)}, "raw", "64", "64")
    assert raw.size == (64, 64)
    assert ctl.control_preview("z_image_tiny_control", None, "canny", 64, 64) is None  # nothing uploaded yet


@pytest.mark.parametrize("args", [
    ("z_image_tiny", "canny", 64),  # a type without a ControlNet
    ("z_image_tiny_control", "sketchy", 64),  # an unknown type
    ("z_image_tiny_control", "canny", 65),  # a size the model cannot take
])
def test_a_bad_preview_request_is_a_warning(ctl, picture, args):
    model_type, control_type, width = args
    with pytest.warns(UserWarning):
        assert ctl.control_preview(model_type, upload(picture), control_type, width, 64) is None


def test_a_preview_of_a_file_not_uploaded_here_is_refused(ctl, picture):
    with pytest.warns(UserWarning, match="only files uploaded to this page"):
        assert ctl.control_preview("z_image_tiny_control", str(picture), "raw", 64, 64) is None


def test_profiles_keep_the_control_type_and_strength_not_the_picture():
    settings = controls_to_settings({"model_type": "z_image_tiny_control", "prompt": "x",
                                     "control_image": "/somewhere/pic.png", "control_type": "canny",
                                     "control_strength": 0.6})
    assert settings["control_type"] == "canny" and settings["control_strength"] == 0.6
    assert "control_image" not in settings


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    served = App(tmp_path_factory.mktemp("control_api"), model_dir, profiles=True)
    yield served
    served.close()


def test_generate_with_a_control_image_through_the_api_and_restore_it(app, picture):
    ids = app.generate("a fenced garden", model_type="z_image_tiny_control", control_image=handle_file(str(picture)),
                       control_type="canny", control_strength=0.5, width=64, height=64)
    job = app.wait_done(ids)[ids[0]]
    assert job["status"] == "done", job["error"]
    out = Path(job["paths"][0])
    stem = out.with_suffix("")
    assert np.array_equal(pixels(Path(f"{stem}_control.png")), expected_canny(picture, 64, 64))
    settings = read_settings(out)
    assert (settings["control_type"], settings["control_strength"]) == ("canny", 0.5)
    assert settings["control_image"] == f"{stem}_control_input.png"  # the copy beside the output
    defs, _ = load_definitions()
    restored = restore_settings(out, defs, lambda t: [])
    assert restored.settings["control_image"] == f"{stem}_control_input.png" and restored.warnings == []
    assert np.array_equal(pixels(Path(restored.settings["control_image"])), pixels(picture))


def test_a_queued_control_job_survives_a_restart(model_dir, picture, tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(model_dir, target_is_directory=True)
    service = GenerationService(ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out"))
    upload_copy = tmp_path / "upload.png"  # a browser upload: gone once the request is over
    shutil.copyfile(picture, upload_copy)
    state = tmp_path / "queue.json"
    first = JobQueue(service, state)  # not started: the job waits
    job_id = first.submit(JobSpec(model_type="z_image_tiny_control", prompt="kept", control_image=str(upload_copy),
                                  control_type="canny", width=64, height=64, num_inference_steps=3, seed=9))
    kept = Path(first.get(job_id)["spec"]["control_image"])
    assert kept.parent == first.inputs_dir and kept.read_bytes() == upload_copy.read_bytes()
    first.close()
    upload_copy.unlink()

    second = JobQueue(service, state).start()
    try:
        job = second.wait(job_id, timeout=120)
        assert job["status"] == "done", job["error"]
        assert read_settings(job["paths"][0])["control_type"] == "canny"
    finally:
        second.close()


def test_loras_still_apply_to_the_transformer_with_a_controlnet(model_dir, picture, tmp_path, capsys):
    """The ControlNet rides along as a submodule of the transformer: a LoRA still finds all its layers."""
    import re

    from tests.test_lora_formats import load_tiny_transformer, write_lora

    lora, _ = write_lora(tmp_path, "kohya_musubi", load_tiny_transformer(model_dir), name="style")
    common = ("generate", "--model", "z_image_tiny_control", "--model-dir", str(model_dir), "--prompt", "a cat",
              "--steps", "3", "--width", "64", "--height", "64", "--seed", "4", "--control-image", str(picture))
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert cli(capsys, *common, "--output", str(plain))[0] == 0
    rc, out, err = cli(capsys, *common, "--lora", str(lora), "--output", str(styled))
    assert rc == 0, err
    applied = re.search(r"(\d+) of (\d+) tensors applied", out + err)
    assert applied and applied.group(1) == applied.group(2) != "0"
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 0.5


def test_a_gallery_image_as_the_control_image(ctl, picture):
    assert ctl.use_as_control(str(picture), "z_image_tiny_control") == {"control_image": str(picture)}
    with pytest.warns(UserWarning, match="ControlNet model type"):
        assert ctl.use_as_control(str(picture), "z_image_tiny") == {}
    with pytest.warns(UserWarning, match="select an image"):
        assert ctl.use_as_control("", "z_image_tiny_control") == {}


def test_a_control_image_left_in_the_hidden_section_is_not_sent(ctl, picture):
    """Upload under a ControlNet type, switch to a type without one, Generate: the job is plain text-to-image
    (the section and its picture are hidden), not a job that fails once its model has loaded."""
    values = {"model_type": "z_image_tiny", "prompt": "x", "one_per_line": False, "memory_profile": "default",
              "control_image": upload(picture), "control_type": "canny", "width": 64, "height": 64}
    (job_id,) = ctl.generate(values).split(",")
    assert ctl.queue.get(job_id)["spec"]["control_image"] == ""
    (job_id,) = ctl.generate({**values, "model_type": "z_image_tiny_control",
                              "control_image": upload(picture)}).split(",")
    assert ctl.queue.get(job_id)["spec"]["control_image"]  # shown there: kept


def test_nag_with_a_controlnet_is_refused_before_any_work(model_dir, picture, tmp_path, capsys):
    rc, _, err = cli(capsys, "generate", "--model", "z_image_tiny_control", "--model-dir", str(model_dir),
                     "--prompt", "x", "--control-image", str(picture), "--nag-scale", "3", "--output",
                     str(tmp_path / "x.png"))
    assert rc == 2 and "NAG" in err and "ControlNet" in err and "loading" not in err
