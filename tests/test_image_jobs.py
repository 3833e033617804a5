"""Image inputs through the app: the CLI (`--image`, `--mask`, `--outpaint`, `--upscale`), the copies beside the
output and `--from-image`, bad input (one line, exit 2), and a queued img2img job surviving a restart.
The sampling itself is checked against diffusers in tests/test_image_inputs.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.jobs import JobSpec
from app.metadata import MetadataError, read_settings
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from models.z_image.image_job import steps_run
from tests.conftest import cli as main
from tests.conftest import pixels


def gen(tiny_dir: Path, *args: str) -> list[str]:
    return ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "4", "--prompt", "a cat",
            *args]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 100 x 70 picture with structure (not a flat colour), and a mask of its centre."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:70, 0:100]
    arr = np.stack([x * 2.5, y * 3.5, (x + y) * 1.5], axis=-1) + rng.integers(0, 20, (70, 100, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    mask.save(folder / "mask.png")
    Image.new("L", (64, 64), 0).save(folder / "black.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not a picture")
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # a few KB declaring 144 MP
    return folder


def test_img2img_takes_the_image_size_and_saves_its_input_beside_the_output(tiny_dir, source, tmp_path, capsys):
    out = tmp_path / "i2i.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--image", str(source / "photo.png"), "--strength", "0.5", "--seed", "3",
                                   "--output", str(out)))
    assert rc == 0, err
    assert Image.open(out).size == (96, 64)  # 100 x 70 rounded down to multiples of 16
    meta = read_settings(out)
    assert meta["image"] == str(tmp_path / "i2i_input.png") and meta["strength"] == 0.5 and meta["mask"] == ""
    assert Image.open(tmp_path / "i2i_input.png").size == (100, 70)  # the input as given
    plain = tmp_path / "t2i.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--width", "96", "--height", "64", "--seed", "3", "--output", str(plain)))
    assert rc == 0, err
    assert np.abs(pixels(out) - pixels(plain)).max() > 10  # the image changed the result

    again = tmp_path / "again" / "rerun.png"
    again.parent.mkdir()
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dir), "--from-image", str(out), "--output",
                      str(again))
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(out))  # the copy beside the output re-runs the job


def test_inpainting_keeps_the_input_outside_the_mask(tiny_dir, source, tmp_path, capsys):
    out, raw = tmp_path / "inpaint.png", tmp_path / "raw.png"
    common = ("--image", str(source / "photo.png"), "--mask", str(source / "mask.png"), "--width", "64", "--height",
              "64", "--seed", "5")
    assert main(capsys, *gen(tiny_dir, *common, "--output", str(out)))[0] == 0
    assert main(capsys, *gen(tiny_dir, *common, "--no-paste-back", "--output", str(raw)))[0] == 0
    fitted = np.asarray(Image.open(source / "photo.png").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
    got, unpasted = pixels(out), pixels(raw)
    far = np.ones((64, 64), bool)
    far[24 - 12:40 + 12, 24 - 12:40 + 12] = False  # 12 px or more from the mask
    assert np.array_equal(got[far], fitted.astype(int)[far])
    assert np.abs(unpasted[far] - fitted.astype(int)[far]).max() > 0  # the VAE round trip drifts: paste-back fixed it
    assert np.abs(got[26:38, 26:38] - fitted.astype(int)[26:38, 26:38]).max() > 10  # the masked area was repainted
    meta = read_settings(out)
    assert meta["strength"] is None and meta["paste_back"] is True  # 1.0 with a mask (recorded as "default")
    assert Path(meta["mask"]).name == "inpaint_mask.png"


def test_outpaint_grows_the_canvas_and_keeps_the_picture(tiny_dir, source, tmp_path, capsys):
    out = tmp_path / "wide.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--image", str(source / "photo.png"), "--width", "64", "--height", "64",
                                   "--outpaint", "32,0,16,16", "--output", str(out)))
    assert rc == 0, err
    assert Image.open(out).size == (64 + 48, 64 + 16)
    fitted = np.asarray(Image.open(source / "photo.png").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
    inner = pixels(out)[0:64 - 12, 32 + 12:32 + 64 - 12]  # the old picture, 12 px from the new area
    assert np.array_equal(inner, fitted.astype(int)[0:52, 12:52])


def test_upscale_size_and_evaluations(tiny_dir, tmp_path, capsys):
    out = tmp_path / "big.png"
    rc, _, err = main(capsys, *gen(tiny_dir, "--width", "64", "--height", "48", "--upscale", "2",
                                   "--upscale-strength", "0.5", "--upscale-steps", "6", "--num-images", "2",
                                   "--output", str(out)))
    assert rc == 0, err
    assert [Image.open(tmp_path / f"big_{i}.png").size for i in (1, 2)] == [(128, 96)] * 2
    # one progress bar for the job: 4 text-to-image steps, then 3 of 6 steps per image for the upscale pass
    assert "10/10" in err and steps_run(6, 0.5, True, False) == 3


@pytest.mark.parametrize("args, message", [
    (("--image", "{src}/notes.txt"), "Input image (--image): image file 'notes.txt' is not an image PIL can read"),
    (("--image", "{src}/bomb.png"), "Input image (--image): image file 'bomb.png' is too large: at most 16384 px"),
    (("--image", "{src}/photo.png", "--mask", "{src}/bomb.png"), "Mask (--mask): mask file 'bomb.png' is too large"),
    (("--image", "{src}/broken.png"), "Input image (--image): image file"),
    (("--image", "{src}/gone.png"), "Input image (--image): image file not found"),
    (("--image", "{src}/photo.png", "--mask", "{src}/black.png"), "the mask is all black: nothing to repaint"),
    (("--mask", "{src}/mask.png"), "a mask (--mask) needs an input image (--image)"),
    (("--image", "{src}/photo.png", "--strength", "0"), "Strength (--strength) must be between 0.01 and 1"),
    (("--image", "{src}/photo.png", "--strength", "1.5"), "Strength (--strength) must be between 0.01 and 1"),
    (("--image", "{src}/photo.png", "--outpaint", "10,0,0,0"), "must be a non-negative multiple of 16"),
    (("--width", "2048", "--height", "64", "--upscale", "3"), "upscaled size 6144x192 exceeds 4096 px a side"),
])
def test_bad_image_input_is_one_line_and_exit_2(tiny_dir, source, capsys, args, message):
    rc, out, err = main(capsys, *gen(tiny_dir, *(a.format(src=source) for a in args)))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert "Warning" not in err and str(source) not in lines[0], err  # no Pillow warning; the name, not the path


def test_settings_naming_a_file_elsewhere_are_refused(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    for value in ("/etc/passwd", "../secret.png", "sub/x.png"):
        info = PngInfo()
        info.add_text("wgp_zimage", json.dumps({"app": "wgp-zimage", "prompt": "x", "model_type": "z_image_tiny",
                                                "image": value}))
        path = tmp_path / "crafted.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        with pytest.raises(MetadataError, match="is not a file name of its own folder"):
            read_settings(path)


def test_a_queued_img2img_job_survives_a_restart(tiny_dir, source, tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
    service = GenerationService(ServiceConfig(checkpoints_dir=tmp_path / "ckpts", output_dir=tmp_path / "out"))
    upload = tmp_path / "upload.png"  # a browser upload: gone once the request is over
    upload.write_bytes((source / "photo.png").read_bytes())
    state = tmp_path / "queue.json"
    first = JobQueue(service, state)  # not started: the job waits
    job_id = first.submit(JobSpec(model_type="z_image_tiny", prompt="kept", image=str(upload), strength=0.5,
                                  width=64, height=64, num_inference_steps=4, seed=9))
    kept = Path(first.get(job_id)["spec"]["image"])
    assert kept.parent == first.inputs_dir and kept.read_bytes() == upload.read_bytes()
    first.close()
    upload.unlink()

    second = JobQueue(service, state).start()
    try:
        deadline = time.monotonic() + 120
        while second.get(job_id)["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        job = second.get(job_id)
        assert job["status"] == "done", job["error"]
        assert read_settings(job["paths"][0])["strength"] == 0.5
        second.remove(job_id)
        assert not kept.exists()  # no job refers to it any more
    finally:
        second.close()


def test_restoring_an_image_whose_inputs_are_gone_says_so(tiny_dir, source, tmp_path, capsys):
    from app.ui_restore import restore_settings
    from models.registry import load_definitions

    out = tmp_path / "made.png"
    common = ("--image", str(source / "photo.png"), "--mask", str(source / "mask.png"), "--width", "64",
              "--height", "64", "--outpaint", "16,0,0,0")
    assert main(capsys, *gen(tiny_dir, *common, "--output", str(out)))[0] == 0
    defs, _ = load_definitions()
    restored = restore_settings(out, defs, lambda t: [])
    assert restored.settings["image"] == str(tmp_path / "made_input.png") and restored.warnings == []
    assert restored.settings["mask"] == str(tmp_path / "made_mask.png")
    assert restored.settings["outpaint"] == "16,0,0,0"

    (tmp_path / "made_input.png").unlink()
    restored = restore_settings(out, defs, lambda t: [])
    assert restored.settings["image"] == restored.settings["mask"] == restored.settings["outpaint"] == ""
    assert any("input image cannot be used" in w and "not found" in w for w in restored.warnings)
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dir), "--from-image", str(out))
    assert rc == 2 and "image file not found" in err and err.count("error:") == 1
