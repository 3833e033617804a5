"""ControlNet Union through the app: `generate --controlnet FILE --control-image IMG` with the tiny model and a
tiny ControlNet single file (the published key names), strength 0 = text-to-image, the canny map beside the
output, the settings in the metadata re-running the job, ControlNet inpainting, the model types, bad input.
The ControlNet's numerics are checked against diffusers in tests/test_controlnet.py."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app.metadata import read_settings
from models.errors import UserError
from models.z_image import controlnet as zc
from models.z_image.tiny import TINY_TRANSFORMER, _randomize
from tests.conftest import cli as main
from tests.conftest import pixels

SIZE = ("--width", "64", "--height", "64")


def gen(tiny_dir: Path, *args: str) -> list[str]:
    return ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "3", "--prompt", "a cat",
            "--seed", "5", *SIZE, *args]


def write_net(path: Path, version: str) -> Path:
    """A tiny ControlNet for the tiny model (2 layers, 1 refiner layer), keys by the original names. 1.0: a
    published-style single file (its version told from its keys); 2.x: a diffusers folder, since the single
    files' 2.x marker is a 15th control layer, which a 2-layer model cannot have."""
    n_ref = TINY_TRANSFORMER["n_refiner_layers"]
    mode = None if version == "1.0" else zc.REFINER_IS_OWN
    cfg = zc.ControlNetConfig.from_dict(dict(
        control_layers_places=[0, 1], control_refiner_layers_places=None if mode is None else list(range(n_ref)),
        control_in_dim=16 if mode is None else zc.INPAINT_IN_DIM, add_control_noise_refiner=mode,
        dim=TINY_TRANSFORMER["dim"], n_refiner_layers=n_ref, n_heads=TINY_TRANSFORMER["n_heads"],
        n_kv_heads=TINY_TRANSFORMER["n_kv_heads"]))
    net = zc.ZImageControlNet(cfg)
    _randomize(net, torch.Generator().manual_seed(11), 1.0)  # non-zero projections: the hints matter
    sd = net.state_dict()
    if version == "1.0":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        return path
    if version == "2.0":  # its control layers run the refiner pass: no refiner blocks of its own
        cfg.add_control_noise_refiner = zc.REFINER_IS_CONTROL_LAYERS
        sd = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    path.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("controlnets")
    return {v: write_net(folder / (f"cn{v}.safetensors" if v == "1.0" else f"cn{v}"), v) for v in ("1.0", "2.0", "2.1")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """A 64 x 64 picture with edges (shapes on a gradient), a mask of its centre, a broken picture, weights
    that are no ControlNet."""
    folder = tmp_path_factory.mktemp("pictures")
    y, x = np.mgrid[0:64, 0:64]
    arr = np.stack([x * 3, y * 3, np.full_like(x, 60)], axis=-1)
    arr[(np.hypot(x - 30, y - 34) < 14)] = (240, 230, 40)
    arr[8:20, 40:58] = (20, 20, 200)
    Image.fromarray(arr.astype(np.uint8)).save(folder / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / "mask.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    save_file({"layers.0.attention.to_q.weight": torch.zeros(4, 4)}, folder / "other.safetensors")
    return folder


def test_control_renders_records_its_settings_and_reruns(tiny_dir, nets, pictures, tmp_path, capsys):
    out = tmp_path / "ctrl.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--controlnet", str(nets["1.0"]), "--control-image",
                                   str(pictures / "photo.png"), "--control-strength", "0.8", "--output", str(out)))
    assert rc == 0, err
    meta = read_settings(out)
    assert meta["control_image"] == str(tmp_path / "ctrl_control_input.png")
    assert meta["control_strength"] == 0.8 and meta["control_type"] == "raw"
    # raw: the map is the picture at the render size
    assert np.array_equal(pixels(tmp_path / "ctrl_control.png"), pixels(pictures / "photo.png"))

    plain = tmp_path / "plain.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--output", str(plain)))
    assert rc == 0, err
    assert np.abs(pixels(out) - pixels(plain)).max() > 10  # the ControlNet steered the image

    again = tmp_path / "again" / "rerun.png"
    again.parent.mkdir()
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dir), "--controlnet", str(nets["1.0"]),
                      "--from-image", str(out), "--output", str(again))
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(out))  # the control image's copy re-runs the job


@pytest.mark.parametrize("version", ["1.0", "2.1"])
def test_strength_zero_is_text_to_image(tiny_dir, nets, pictures, tmp_path, capsys, version):
    plain, zero = tmp_path / "plain.png", tmp_path / "zero.png"
    assert main(capsys, *gen(tiny_dir, "--output", str(plain)))[0] == 0
    rc, _, err = main(capsys, *gen(tiny_dir, "--controlnet", str(nets[version]), "--control-image",
                                   str(pictures / "photo.png"), "--control-strength", "0", "--output", str(zero)))
    assert rc == 0, err
    assert np.array_equal(pixels(zero), pixels(plain))


def test_canny_map_is_opencv_canny_of_the_input(tiny_dir, nets, pictures, tmp_path, capsys):
    out = tmp_path / "edges.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--controlnet", str(nets["2.0"]), "--control-image",
                                   str(pictures / "photo.png"), "--control-type", "canny", "--output", str(out)))
    assert rc == 0, err
    grey = cv2.cvtColor(np.asarray(Image.open(pictures / "photo.png").convert("RGB")), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(grey, 100, 200)
    saved = np.asarray(Image.open(tmp_path / "edges_control.png").convert("RGB"))
    assert expected.any() and all(np.array_equal(saved[:, :, c], expected) for c in range(3))
    assert read_settings(out)["control_type"] == "canny"
    # the map is what steered the image: raw with the map as the file gives the same pixels
    raw = tmp_path / "raw.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--controlnet", str(nets["2.0"]), "--control-image",
                                   str(tmp_path / "edges_control.png"), "--output", str(raw)))
    assert rc == 0, err
    assert np.array_equal(pixels(raw), pixels(out))


def test_controlnet_inpainting_keeps_the_input_outside_the_mask(tiny_dir, nets, pictures, tmp_path, capsys):
    out = tmp_path / "inpaint.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--controlnet", str(nets["2.1"]), "--control-image",
                                   str(pictures / "photo.png"), "--image", str(pictures / "photo.png"), "--mask",
                                   str(pictures / "mask.png"), "--mask-blur", "2", "--output", str(out)))
    assert rc == 0, err
    diff = np.abs(pixels(out) - pixels(pictures / "photo.png")).max(axis=-1)
    assert diff[:8].max() == 0 and diff[24:40, 24:40].max() > 0  # paste-back outside, repainted inside
    meta = read_settings(out)
    assert Path(meta["control_image"]).name == "inpaint_control_input.png" and meta["mask"]


@pytest.mark.parametrize("args, message", [
    (("--control-image", "{pic}/photo.png"), "a control image (--control-image) needs a ControlNet"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/photo.png", "--image", "{pic}/photo.png", "--mask",
      "{pic}/mask.png"), "this ControlNet (version 1.0) cannot inpaint"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/broken.png"), "Control image (--control-image):"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/gone.png"), "Control image (--control-image): image file "
                                                                     "not found"),
    (("--controlnet", "{pic}/gone.safetensors", "--control-image", "{pic}/photo.png"), "ControlNet not found"),
    (("--controlnet", "{pic}/photo.png", "--control-image", "{pic}/photo.png"), "corrupt or unreadable weight file"),
    (("--controlnet", "{pic}/other.safetensors", "--control-image", "{pic}/photo.png"),
     "not a Z-Image ControlNet file"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/photo.png", "--image", "{pic}/photo.png", "--outpaint",
      "16,0,0,0"), "a control image (--control-image) cannot go with outpainting"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/photo.png", "--control-type", "hed"),
     "Control type (--control-type) must be one of raw, canny, gray"),
    (("--controlnet", "{cn1}", "--control-image", "{pic}/photo.png", "--control-strength", "2.5"),
     "Control strength (--control-strength) must be between 0 and 2"),
])
def test_bad_control_input_is_one_line_and_exit_2(tiny_dir, nets, pictures, capsys, args, message):
    rc, out, err = main(capsys, *gen(tiny_dir, *(a.format(pic=pictures, cn1=nets["1.0"]) for a in args)))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err


# ---------------------------------------------------------------- the ControlNet model types


def test_model_types_download_turbo_and_their_controlnet(tmp_path):
    from models.registry import handler_for, load_definitions

    defs, problems = load_definitions()
    assert not problems
    expected = {"z_image_control": ("Z-Image-Turbo-Fun-Controlnet-Union_bf16.safetensors", 9),
                "z_image_control2": ("Z-Image-Turbo-Fun-Controlnet-Union2_bf16.safetensors", 9),
                "z_image_control2_1": ("Z-Image-Turbo-Fun-Controlnet-Union2.1_bf16.safetensors", 9),
                "z_image_control2_1_8s": ("Z-Image-Turbo-Fun-Controlnet-Union2.1-8steps_bf16.safetensors", 8)}
    for model_type, (name, steps) in expected.items():
        d = defs[model_type]
        handler = handler_for(d.architecture)
        for quant in ("bf16", "int8"):
            names = [s.local_path.name for s in handler.files_to_download(d, tmp_path, quant, "bf16")]
            tag = "bf16" if quant == "bf16" else "quanto_bf16_int8"  # the ControlNet follows the transformer
            assert name.replace("_bf16", f"_{tag}") in names and f"ZImageTurbo_{tag}.safetensors" in names
        values = d.defaults()
        assert values["num_inference_steps"] == steps and values["guidance_scale"] == 0.0
        assert 0.65 <= values["control_strength"] <= 0.75
        int8 = d.model["controlnet_URLs"][1]
        assert int8.endswith(name.replace("_bf16", "_quanto_bf16_int8"))
    # Turbo's low-bit transformers go with a ControlNet type too (with its bf16 ControlNet)
    d = defs["z_image_control2_1"]
    names = [s.local_path.name for s in handler_for(d.architecture).files_to_download(d, tmp_path, "fp8", "bf16")]
    turbo_fp8 = Path(defs["z_image"].model["lowbit_URLs"]["fp8"]).name
    assert turbo_fp8 in names and "Z-Image-Turbo-Fun-Controlnet-Union2.1_bf16.safetensors" in names
    # the Tile ControlNet (Wan2GP's z_image_control2_1_8s file; no int8 file known): bf16 whatever the choice
    tile = defs["z_image_control_tile"]
    for quant in ("bf16", "int8"):
        names = [s.local_path.name for s in handler_for(tile.architecture).files_to_download(tile, tmp_path, quant,
                                                                                             "bf16")]
        assert "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-2601-8_steps_bf16.safetensors" in names
    assert tile.defaults()["num_inference_steps"] == 8


def test_model_type_without_its_controlnet_file_says_which(tmp_path):
    from models.registry import load_definitions
    from models.z_image.handler import HANDLER

    defs, _ = load_definitions()
    with pytest.raises(UserError, match="Z-Image-Turbo-Fun-Controlnet-Union2_bf16.safetensors"):
        HANDLER.controlnet_file(defs["z_image_control2"], tmp_path)
    assert HANDLER.controlnet_file(defs["z_image"], tmp_path) is None
    with pytest.raises(UserError, match="needs its ControlNet file"):  # loaded without its definition's file
        HANDLER._controlnet_path(tmp_path, "z_image_control2", None)
    assert HANDLER._controlnet_path(tmp_path, "z_image", None) is None


def test_twinflow_refuses_a_control_image():
    from models.z_image.handler import HANDLER

    with pytest.raises(UserError, match="TwinFlow Turbo takes no control image"):
        HANDLER.check_job("z_image_twinflow_turbo", {"control_image": "x.png", "width": 64, "height": 64})


def test_a_controlnet_type_loads_its_own_file_and_takes_its_strength(tiny_dbm_dir, nets, pictures, tmp_path, capsys):
    """z_image_control from a DeepBeepMeep folder (tiny weights under Turbo's and the 1.0 ControlNet's names):
    its ControlNet comes with the model and its strength from the definition."""
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(tiny_dbm_dir, folder)
    (folder / "ZImageBase_bf16.safetensors").rename(folder / "ZImageTurbo_bf16.safetensors")
    base = ["generate", "--model", "z_image_control", "--model-dir", str(folder), "--steps", "2", "--prompt", "a cat",
            "--seed", "5", *SIZE, "--control-image", str(pictures / "photo.png")]
    rc, _, err = main(capsys, *base, "--output", str(tmp_path / "none.png"))
    assert rc == 2 and "Z-Image-Turbo-Fun-Controlnet-Union_bf16.safetensors" in err, err
    shutil.copy(nets["1.0"], folder / "Z-Image-Turbo-Fun-Controlnet-Union_bf16.safetensors")
    out = tmp_path / "typed.png"
    rc, _, err = main(capsys, *base, "--output", str(out))
    assert rc == 0, err
    meta = read_settings(out)
    assert meta["model_type"] == "z_image_control" and meta["control_strength"] == 0.75
    assert meta["guidance_scale"] == 0.0 and (tmp_path / "typed_control.png").is_file()
