"""Image metadata: the JSON settings and the A1111 text in PNG, JPEG and WebP; metadata off; CLI flags."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import wgp_zimage
from app.app_config import load_config, save_config, validate_config
from app.metadata import a1111_parameters, read_parameters, read_settings
from app.outputs import save_image_atomic
from models.errors import UserError

SETTINGS = {"model_type": "z_image_tiny", "prompt": "a fox, ünïcode ✓", "negative_prompt": "blurry",
            "width": 64, "height": 48, "num_inference_steps": 2, "guidance_scale": 4.0, "flow_shift": 6.0,
            "seed": 41, "batch_seed": 40, "image_index": 1}


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")])
def test_round_trip_each_format(tmp_path, suffix, fmt):
    path = save_image_atomic(Image.new("RGB", (64, 48), "red"), tmp_path / f"x{suffix}", SETTINGS, quality=80)
    with Image.open(path) as im:
        assert im.format == fmt
    meta = read_settings(path)
    assert meta["schema"] == 1 and meta["app"] == "wgp-zimage"
    assert {k: meta[k] for k in SETTINGS} == SETTINGS
    assert read_parameters(path) == a1111_parameters(SETTINGS)
    assert [p.name for p in tmp_path.iterdir()] == [f"x{suffix}"]  # no temporary file left


def test_a1111_text():
    text = a1111_parameters(SETTINGS)
    # A1111's order: steps, sampler, the model's own (CFG scale...), then seed and size
    assert text == ("a fox, ünïcode ✓\nNegative prompt: blurry\nSteps: 2, Sampler: Euler (flow), CFG scale: 5, "
                    "Flow shift: 6, Seed: 41, Size: 64x48, Model: z_image_tiny")
    # guidance 0 (off) is A1111's CFG scale 1; no negative prompt line when there is none
    assert a1111_parameters({**SETTINGS, "negative_prompt": "", "guidance_scale": 3.5}).splitlines()[1].startswith(
        "Steps: 2, Sampler: Euler (flow), CFG scale: 4.5, Flow shift: 6, Seed: 41,")


def test_png_text_chunks(tmp_path):
    path = save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "a.png", SETTINGS)
    with Image.open(path) as im:
        assert json.loads(im.info["wgp_zimage"])["seed"] == 41
        assert im.info["parameters"].startswith("a fox")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_no_metadata(tmp_path, suffix):
    path = save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / f"a{suffix}", None)
    assert read_settings(path) is None and read_parameters(path) is None


def test_quality_changes_size(tmp_path):
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    lo = save_image_atomic(noise, tmp_path / "lo.jpg", None, quality=10).stat().st_size
    hi = save_image_atomic(noise, tmp_path / "hi.jpg", None, quality=95).stat().st_size
    assert lo < hi


def gen(tiny_dir, *args):
    return ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "2", "--width", "64",
            "--height", "64", "--prompt", "a fox", "--seed", "3", *args]


@pytest.mark.parametrize("fmt,ext,pil", [("jpeg", "jpg", "JPEG"), ("webp", "webp", "WEBP"), ("png", "png", "PNG")])
def test_cli_output_format(tiny_dir, tmp_path, capsys, fmt, ext, pil):
    rc = wgp_zimage.main(gen(tiny_dir, "--output-format", fmt, "--output-quality", "70", "--output", str(tmp_path)))
    assert rc == 0, capsys.readouterr().err
    (path,) = tmp_path.iterdir()
    assert path.suffix == f".{ext}"
    with Image.open(path) as im:
        assert im.format == pil
    assert read_settings(path)["seed"] == 3
    assert "CFG scale" in read_parameters(path)


def test_cli_output_suffix_and_no_metadata(tiny_dir, tmp_path, capsys):
    rc = wgp_zimage.main(gen(tiny_dir, "--output", str(tmp_path / "fox.jpg")))
    assert rc == 0, capsys.readouterr().err
    with Image.open(tmp_path / "fox.jpg") as im:
        assert im.format == "JPEG"
    assert read_settings(tmp_path / "fox.jpg")["prompt"] == "a fox"
    rc = wgp_zimage.main(gen(tiny_dir, "--no-metadata", "--output", str(tmp_path / "bare.png")))
    assert rc == 0
    assert read_settings(tmp_path / "bare.png") is None and read_parameters(tmp_path / "bare.png") is None
    capsys.readouterr()
    rc = wgp_zimage.main(["info", str(tmp_path / "bare.png")])
    assert rc == 2 and "holds no wgp-zimage settings" in capsys.readouterr().err


def test_cli_bad_flags(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        wgp_zimage.main(gen(tiny_dir, "--output-format", "gif"))
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        wgp_zimage.main(gen(tiny_dir, "--output-quality", "0"))
    assert e.value.code == 2
    capsys.readouterr()


def test_info_reads_jpeg(tiny_dir, tmp_path, capsys):
    assert wgp_zimage.main(gen(tiny_dir, "--output", str(tmp_path / "a.webp"))) == 0
    capsys.readouterr()
    assert wgp_zimage.main(["info", str(tmp_path / "a.webp")]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3


def test_config_file(tmp_path):
    path = save_config(tmp_path / "c.json", {"memory_profile": 2, "output_format": "webp", "save_metadata": False,
                                             "output_dir": "out", "unknown": 1})
    assert load_config(path) == ({"memory_profile": 2, "output_format": "webp", "save_metadata": False,
                                  "output_dir": "out"}, [])
    with pytest.raises(UserError, match="memory profile"):
        validate_config({"memory_profile": 7})
    (tmp_path / "bad.json").write_text("{")
    saved, warnings = load_config(tmp_path / "bad.json")
    assert saved == {} and warnings
