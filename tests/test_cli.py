"""The headless CLI: outputs, seeds, metadata, defaults and bad input (one line, exit 2)."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import wgp_zimage
from app.metadata import read_settings
from tests.conftest import ROOT, run_cli


def gen(tiny_dir, *args):
    return ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "2", "--width", "64",
            "--height", "64", *args]


def main(capsys, *args):
    rc = wgp_zimage.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def pixels(path):
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------ outputs and seeds

def test_file_output_and_batch_seeds(tiny_dir, tmp_path, capsys):
    rc, out, err = main(capsys, *gen(tiny_dir, "--prompt", "a fox", "--num-images", "3", "--seed", "40",
                                     "--output", str(tmp_path / "fox.png")))
    assert rc == 0, err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fox_1.png", "fox_2.png", "fox_3.png"]
    # image 2 of the batch (seed 41) is reproduced alone from its recorded seed
    meta = read_settings(tmp_path / "fox_2.png")
    assert meta["seed"] == 41 and meta["batch_seed"] == 40 and meta["image_index"] == 1
    rc, _, err = main(capsys, *gen(tiny_dir, "--prompt", "a fox", "--seed", "41", "--output",
                                   str(tmp_path / "alone.png")))
    assert rc == 0, err
    # same noise; batched matmuls may round differently in the last bits
    diff = np.abs(pixels(tmp_path / "alone.png").astype(int) - pixels(tmp_path / "fox_2.png").astype(int))
    assert diff.max() <= 2
    assert not np.array_equal(pixels(tmp_path / "fox_1.png"), pixels(tmp_path / "fox_2.png"))


def test_single_file_output_exact_name(tiny_dir, tmp_path, capsys):
    rc, out, _ = main(capsys, *gen(tiny_dir, "--prompt", "x", "--seed", "1", "--output", str(tmp_path / "one.png")))
    assert rc == 0 and [p.name for p in tmp_path.iterdir()] == ["one.png"]


def test_directory_naming_and_metadata(tiny_dir, tmp_path, capsys):
    rc, out, err = main(capsys, *gen(tiny_dir, "--prompt", "A Red Fox, in snow!", "--seed", "-1",
                                     "--negative-prompt", "ugly", "--guidance", "3.5", "--output", str(tmp_path)))
    assert rc == 0, err
    (path,) = tmp_path.iterdir()
    m = re.fullmatch(r"\d{4}-\d\d-\d\d-\d\dh\d\dm\d\ds_seed(\d+)_1_a_red_fox_in_snow\.png", path.name)
    assert m, path.name
    assert f"seed {m.group(1)}" in out  # the random seed is reported
    meta = read_settings(path)
    assert meta["schema"] == 1 and meta["seed"] == int(m.group(1))
    assert meta["prompt"] == "A Red Fox, in snow!" and meta["negative_prompt"] == "ugly"
    assert meta["guidance_scale"] == 3.5 and meta["num_inference_steps"] == 2 and meta["model_type"] == "z_image_tiny"
    assert meta["width"] == 64 and meta["flow_shift"] == 6.0


def test_output_dir_option(tiny_dir, tmp_path, capsys):
    rc, _, err = main(capsys, *gen(tiny_dir, "--prompt", "x", "--seed", "2"), "--output-dir", str(tmp_path / "o"))
    assert rc == 0, err
    assert len(list((tmp_path / "o").glob("*_seed2_1_x.png"))) == 1


def test_prompt_file(tiny_dir, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# a comment\nfirst prompt\n\n   \nsecond prompt\n")
    rc, out, err = main(capsys, *gen(tiny_dir, "--prompt-file", str(pf), "--seed", "3", "--output",
                                     str(tmp_path / "out")))
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2 and names[0].endswith("first_prompt.png") and names[1].endswith("second_prompt.png")


def test_model_defaults_and_explicit_flags(tiny_dir, tiny_dbm_dir, tmp_path, capsys):
    # --model-dir without --model: Base defaults, but the folder's scheduler shift (3.0 here)
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dbm_dir), "--prompt", "x", "--steps", "1",
                      "--width", "64", "--height", "64", "--seed", "1", "--output", str(tmp_path / "a.png"))
    assert rc == 0, err
    meta = read_settings(tmp_path / "a.png")
    assert meta["flow_shift"] == 3.0 and meta["guidance_scale"] == 4.0 and meta["model_type"] == "z_image_base"
    assert meta["negative_prompt"].startswith("low quality")
    assert "below 512" in err  # the 6B weights were not trained at 64 px
    # --model turbo: Turbo's defaults, explicit flags still win
    dbm_turbo = tmp_path / "dbm"
    shutil.copytree(tiny_dbm_dir, dbm_turbo)
    (dbm_turbo / "ZImageBase_bf16.safetensors").rename(dbm_turbo / "ZImageTurbo_bf16.safetensors")
    rc, _, err = main(capsys, "generate", "--model", "turbo", "--model-dir", str(dbm_turbo), "--prompt", "x",
                      "--width", "64", "--height", "64", "--seed", "1", "--flow-shift", "2.5",
                      "--output", str(tmp_path / "b.png"))
    assert rc == 0, err
    meta = read_settings(tmp_path / "b.png")
    assert (meta["model_type"], meta["num_inference_steps"], meta["guidance_scale"], meta["flow_shift"]) == \
        ("z_image", 8, 0.0, 2.5)


def test_tiny_model_generated_on_first_use(tmp_path, capsys):
    rc, out, err = main(capsys, "generate", "--model", "tiny", "--checkpoints-dir", str(tmp_path / "ck"),
                        "--prompt", "x", "--steps", "1", "--width", "32", "--height", "32", "--seed", "0",
                        "--output", str(tmp_path / "t.png"))
    assert rc == 0, err
    assert (tmp_path / "ck" / "z_image_tiny" / "model_index.json").is_file()


def test_long_prompt_warns_then_generates(tiny_dir, tmp_path, capsys):
    rc, out, err = main(capsys, *gen(tiny_dir, "--prompt", "word " * 200, "--seed", "1", "--output",
                                     str(tmp_path / "long.png")))
    assert rc == 0 and "truncated to 512" in err and (tmp_path / "long.png").is_file()


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args,message", [
    (["--width", "100"], "Width (--width) must be a multiple of 16 (got 100)"),
    (["--height", "8000"], "Height (--height) must be between 16 and 4096 (got 8000)"),
    (["--steps", "0"], "Steps (--steps) must be between 1 and 100 (got 0)"),
    (["--steps", "101"], "Steps (--steps) must be between 1 and 100"),
    (["--guidance", "25"], "Guidance (--guidance) must be between 0 and 20"),
    (["--num-images", "17"], "Number of images (--num-images) must be between 1 and 16"),
    (["--flow-shift", "0.5"], "Flow shift (--flow-shift) must be between 1 and 10"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--model", "z_image_huge"], "unknown model type 'z_image_huge'"),
    (["--width", "abc"], "Width (--width) must be a whole number (got 'abc')"),
    (["--steps", "٣"], "Steps (--steps) must be a whole number (got '٣')"),  # int() reads it as 3
    (["--seed", "²"], "Seed (--seed) must be a whole number (got '²')"),
    (["--guidance", "nan"], "Guidance (--guidance) must be a number (got 'nan')"),
])
def test_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys, args, message):
    try:
        rc = wgp_zimage.main(gen(tiny_dir, "--prompt", "x", "--output", str(tmp_path / "x.png"), *args))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def error_lines(err):
    """The error lines of stderr (progress bars may precede them)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error")]
    assert "Traceback" not in err
    return lines


def _broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_file(tiny_dbm_dir, tmp_path, capsys):
    d = _broken_copy(tiny_dbm_dir, tmp_path / "m")
    (d / "ZImageTurbo_VAE_bf16.safetensors").unlink()
    rc, _, err = main(capsys, "generate", "--model-dir", str(d), "--prompt", "x", "--width", "64", "--height", "64")
    assert rc == 2 and "missing weight files" in err and "ZImageTurbo_VAE_bf16.safetensors" in err
    assert "Traceback" not in err


def test_corrupt_weight_file(tiny_dir, tmp_path, capsys):
    d = _broken_copy(tiny_dir, tmp_path / "c")
    f = d / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated download
    rc, _, err = main(capsys, *gen(d, "--prompt", "x"))
    assert rc == 2 and "corrupt or unreadable weight file" in err and str(f) in err
    assert len(error_lines(err)) == 1 and err.rstrip().endswith("invalid header length")


def test_missing_and_unexpected_keys_named(tiny_dir, tmp_path, capsys):
    d = _broken_copy(tiny_dir, tmp_path / "k")
    f = d / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    del sd["layers.1.feed_forward.w2.weight"]
    sd["extra.thing.weight"] = sd["x_pad_token"].clone()
    save_file(sd, f)
    rc, _, err = main(capsys, *gen(d, "--prompt", "x"))
    assert rc == 2
    assert "1 missing keys (first: layers.1.feed_forward.w2.weight)" in err
    assert "1 unexpected keys (first: extra.thing.weight)" in err


def test_wrong_shapes_named(tiny_dir, tmp_path, capsys):
    d = _broken_copy(tiny_dir, tmp_path / "s")
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    (d / "transformer" / "config.json").write_text(json.dumps({**cfg, "cap_feat_dim": 48}))
    rc, _, err = main(capsys, *gen(d, "--prompt", "x"))
    assert rc == 2 and "wrong tensor shapes" in err and "cap_embedder" in err


def test_missing_model_dir(tmp_path, capsys):
    rc, _, err = main(capsys, "generate", "--model-dir", str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 2 and "model folder not found" in err


def test_process_level_bad_input_has_no_traceback(tiny_dir):
    r = run_cli(*gen(tiny_dir, "--prompt", "x", "--width", "30"))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: Width (--width) must be a multiple of 16 (got 30)"


def test_ctrl_c_stops_after_current_step_and_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "never.png"
    cmd = [sys.executable, str(ROOT / "wgp_zimage.py"), "generate", "--model", "tiny", "--model-dir", str(tiny_dir),
           "--prompt", "x", "--steps", "100", "--width", "2048", "--height", "2048", "--seed", "1",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    err = ""
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until denoising has started
        chunk = proc.stderr.read(1)
        err += chunk
        if "denoising" in err and re.search(r"\| [1-9]\d*/100", err):
            break
        if not chunk:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 130, err[-2000:]
    assert "nothing of it was written" in err
    before, _, after = err.partition("stopping after the current step")
    assert before.endswith("\n") and "denoising" not in after, err[-2000:]  # its own line, no bar redrawn after it
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "Traceback" not in err


# ------------------------------------------------------------------ shared options, generation profiles

def test_shared_option_before_subcommand_is_kept(capsys):
    args = wgp_zimage.build_parser().parse_args(["--device", "cpu", "--output-dir", "x", "generate", "--prompt", "p"])
    assert args.device == "cpu" and str(args.output_dir) == "x"
    args = wgp_zimage.build_parser().parse_args(["generate", "--prompt", "p", "--device", "cpu"])
    assert args.device == "cpu" and str(args.output_dir) == "outputs"


def test_gen_profile_then_explicit_flags_win(tiny_dir, tmp_path, capsys):
    pdir = str(tmp_path / "profiles")
    rc, out, err = main(capsys, "profiles", "save", "mine", "--profiles-dir", pdir, "--model", "tiny", "--steps", "3",
                        "--guidance", "2.5", "--seed", "7", "--width", "64", "--height", "64",
                        "--prompt", "profile prompt")
    assert rc == 0, err
    rc, out, err = main(capsys, "profiles", "list", "--profiles-dir", pdir)
    assert rc == 0 and "mine" in out
    rc, out, err = main(capsys, "generate", "--gen-profile", "mine", "--profiles-dir", pdir, "--model-dir",
                        str(tiny_dir), "--output", str(tmp_path / "a.png"))
    assert rc == 0, err
    meta = read_settings(tmp_path / "a.png")
    assert (meta["model_type"], meta["num_inference_steps"], meta["guidance_scale"], meta["seed"], meta["prompt"]) \
        == ("z_image_tiny", 3, 2.5, 7, "profile prompt")
    rc, out, err = main(capsys, "generate", "--gen-profile", "mine", "--profiles-dir", pdir, "--model-dir",
                        str(tiny_dir), "--steps", "1", "--prompt", "flag prompt", "--output", str(tmp_path / "b.png"))
    assert rc == 0, err
    meta = read_settings(tmp_path / "b.png")
    assert (meta["num_inference_steps"], meta["guidance_scale"], meta["prompt"]) == (1, 2.5, "flag prompt")
    rc, _, err = main(capsys, "generate", "--gen-profile", "../etc", "--profiles-dir", pdir, "--prompt", "x")
    assert rc == 2 and len(error_lines(err)) == 1


# ------------------------------------------------------------------ LoRAs from the command line

def test_cli_lora_by_path_and_name_with_schedule(tiny_dir, tmp_path, capsys):
    from tests.test_lora_formats import load_tiny_transformer, write_lora

    lora_dir = tmp_path / "loras"
    (lora_dir / "style").mkdir(parents=True)
    write_lora(lora_dir / "style", "kohya_musubi", load_tiny_transformer(tiny_dir), name="ink")
    base = gen(tiny_dir, "--prompt", "x", "--seed", "4", "--steps", "3")
    rc, out, err = main(capsys, *base, "--output", str(tmp_path / "base.png"))
    assert rc == 0, err
    rc, out, err = main(capsys, *base, "--lora-dir-z-image", str(lora_dir), "--lora", "style/ink",
                        "--lora-multipliers", "1.0,0.5", "--output", str(tmp_path / "lora.png"))
    assert rc == 0, err
    assert "tensors applied" in out
    assert not np.array_equal(pixels(tmp_path / "base.png"), pixels(tmp_path / "lora.png"))
    assert read_settings(tmp_path / "lora.png")["loras"] == [{"name": "style/ink", "strength": "1,0.5"}]
    path = next((lora_dir / "style").iterdir())
    rc, out, err = main(capsys, *base, "--lora", str(path), "--lora-multipliers", "1.0,0.5",
                        "--output", str(tmp_path / "bypath.png"))
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "bypath.png"), pixels(tmp_path / "lora.png"))
    rc, out, err = main(capsys, *base, "--lora-dir-z-image", str(lora_dir), "--lora", "nope",
                        "--output", str(tmp_path / "x.png"))
    assert rc == 2 and "nope" in err and len(error_lines(err)) == 1 and not (tmp_path / "x.png").exists()


def test_int8_on_the_fly_save_and_reload(tiny_dbm_dir, tmp_path, capsys):
    d = _broken_copy(tiny_dbm_dir, tmp_path / "q")
    common = ["generate", "--model-dir", str(d), "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64",
              "--seed", "3", "--dtype", "bf16"]
    rc, _, err = main(capsys, *common, "--output", str(tmp_path / "bf16.png"))
    assert rc == 0, err
    rc, _, err = main(capsys, *common, "--transformer-quantization", "int8", "--save-quantized",
                      "--output", str(tmp_path / "fly.png"))
    assert rc == 0, err
    assert (d / "ZImageBase_quanto_bf16_int8.safetensors").is_file()
    (d / "ZImageBase_bf16.safetensors").unlink()  # now only the int8 file can serve
    rc, _, err = main(capsys, *common, "--transformer-quantization", "int8", "--output", str(tmp_path / "file.png"))
    assert rc == 0, err
    a, b, c = (pixels(tmp_path / n).astype(float) for n in ("bf16.png", "fly.png", "file.png"))
    assert np.array_equal(b, c)  # the saved file reproduces the on-the-fly weights
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 30, psnr


def test_info_and_from_image(tiny_dir, tmp_path, capsys):
    rc, _, err = main(capsys, *gen(tiny_dir, "--prompt", "a fox", "--num-images", "2", "--seed", "9", "--guidance",
                                   "2.5", "--output", str(tmp_path / "b.png")))
    assert rc == 0, err
    rc, out, _ = main(capsys, "info", str(tmp_path / "b_2.png"))
    assert rc == 0
    info = json.loads(out)
    assert info["seed"] == 10 and info["guidance_scale"] == 2.5 and info["prompt"] == "a fox"
    rc, _, err = main(capsys, "generate", "--from-image", str(tmp_path / "b_2.png"), "--model-dir", str(tiny_dir),
                      "--output", str(tmp_path / "again.png"))
    assert rc == 0, err
    again = read_settings(tmp_path / "again.png")
    assert (again["seed"], again["guidance_scale"], again["num_images"], again["model_type"]) == \
        (10, 2.5, 1, "z_image_tiny")
    diff = np.abs(pixels(tmp_path / "again.png").astype(int) - pixels(tmp_path / "b_2.png").astype(int))
    assert diff.max() <= 2  # image 2 of the batch re-rendered alone
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    rc, _, err = main(capsys, "info", str(tmp_path / "plain.png"))
    assert rc == 2 and "holds no wgp-zimage settings" in err


@pytest.mark.parametrize("user_value", [None, "max_split_size_mb:128"])
def test_allocator_setting_before_torch(user_value):
    """The entry point turns on expandable segments before torch starts, unless the user chose a setting."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if user_value:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_value
    code = "import wgp_zimage, os; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (user_value or "expandable_segments:True")


# ------------------------------------------------------------------ untrusted images and files

def png_with_settings(path, text, size=(8, 8)):
    """A PNG whose wgp_zimage chunk holds text (any JSON, well-formed or not)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("wgp_zimage", text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def bomb_png(path):
    """A PNG whose header claims 100000 x 100000 pixels (a decompression bomb), with our settings."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = b"wgp_zimage\0" + json.dumps({"app": "wgp-zimage", "model_type": "z_image_tiny", "prompt": "x"}).encode()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"tEXt", text) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return path


JOB = {"app": "wgp-zimage", "model_type": "z_image_tiny", "prompt": "a fox", "width": 64, "height": 64,
       "num_inference_steps": 1, "seed": 1}


@pytest.mark.parametrize("name,make,message", [
    ("nested", lambda p: png_with_settings(p, '{"app": "wgp-zimage", "x": ' + "[" * 100000 + "]" * 100000 + "}"),
     "nested more than 32 levels deep"),
    ("surrogate", lambda p: png_with_settings(p, json.dumps({**JOB, "prompt": "a \ud800 fox"})),
     "lone surrogate U+D800"),
    ("bomb", bomb_png, "decompression bomb"),
    ("list", lambda p: png_with_settings(p, "[1, 2]"), "its wgp-zimage JSON is a list, not an object"),
    ("broken", lambda p: png_with_settings(p, '{"app": "wgp-zimage", '), "not valid JSON"),
    ("text", lambda p: (p.write_text("not an image"), p)[1], "is not a PNG, JPEG or WebP image"),
])
def test_info_and_from_image_on_hostile_images(tmp_path, capsys, name, make, message):
    path = make(tmp_path / f"{name}.png")
    for args in (["info", str(path)], ["generate", "--from-image", str(path), "--output", str(tmp_path / "o.png")]):
        rc, out, err = main(capsys, *args)
        assert rc == 2 and message in err, err
        assert len(error_lines(err)) == 1 and not (tmp_path / "o.png").exists()


def test_from_image_with_wrong_value_types(tmp_path, capsys):
    for key, value in (("model_type", ["z_image_tiny"]), ("prompt", {"a": 1}), ("width", "64"), ("seed", True),
                       ("guidance_scale", "4"), ("loras", {"name": "x"}),
                       ("loras", [{"name": "x", "strength": 1e308}])):
        path = png_with_settings(tmp_path / "t.png", json.dumps({**JOB, key: value}))
        rc, _, err = main(capsys, "generate", "--from-image", str(path), "--output", str(tmp_path / "o.png"))
        assert rc == 2 and f"cannot use image {path}" in err and len(error_lines(err)) == 1, (key, err)
    # info shows what the file holds, odd types included
    odd = png_with_settings(tmp_path / "l.png", json.dumps({**JOB, "model_type": [1]}))
    rc, out, _ = main(capsys, "info", str(odd))
    assert rc == 0 and json.loads(out)["model_type"] == [1]


def test_info_of_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.png"
    os_mkfifo = __import__("os").mkfifo
    os_mkfifo(fifo)
    r = run_cli("info", str(fifo), timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: cannot read image {fifo}: is a pipe, not a regular file"


def test_from_image_loras_are_names_in_the_lora_folder_only(tiny_dir, tmp_path, capsys):
    """An image's settings may name any file: they only ever reach LoRAs inside the LoRA folder."""
    from tests.test_lora_formats import load_tiny_transformer, write_lora

    outside, _ = write_lora(tmp_path, "kohya_musubi", load_tiny_transformer(tiny_dir), name="evil")
    (tmp_path / "loras").mkdir()
    for name in (str(outside), "../evil", "~/evil"):
        image = png_with_settings(tmp_path / "img.png", json.dumps({**JOB, "loras": [{"name": name, "strength": 1}]}))
        rc, out, err = main(capsys, "generate", "--from-image", str(image), "--model-dir", str(tiny_dir),
                            "--lora-dir-z-image", str(tmp_path / "loras"), "--output", str(tmp_path / "o.png"))
        assert rc == 2 and "only --lora takes a file path" in err and len(error_lines(err)) == 1, err
        assert "tensors applied" not in out and not (tmp_path / "o.png").exists()
    # a profile file is no more trusted than an image
    pdir = str(tmp_path / "profiles")
    rc, _, err = main(capsys, "profiles", "save", "p", "--profiles-dir", pdir, "--model", "tiny", "--lora",
                      f"{outside}:1", "--prompt", "x", "--width", "64", "--height", "64")
    assert rc == 0, err
    rc, _, err = main(capsys, "generate", "--gen-profile", "p", "--profiles-dir", pdir, "--model-dir", str(tiny_dir),
                      "--lora-dir-z-image", str(tmp_path / "loras"), "--output", str(tmp_path / "o.png"))
    assert rc == 2 and "only --lora takes a file path" in err and not (tmp_path / "o.png").exists()


def test_prompt_file_not_utf8(tmp_path, capsys):
    pf = tmp_path / "latin1.txt"
    pf.write_bytes(b"caf\xe9 fox\n")
    rc, _, err = main(capsys, "generate", "--model", "tiny", "--prompt-file", str(pf))
    assert rc == 2 and err == f"error: --prompt-file {pf} is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8\n"


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    for flag, target in (("--output", blocker / "x.png"), ("--output", blocker / "sub"),
                         ("--output-dir", blocker / "sub")):
        rc, _, err = main(capsys, "generate", "--model", "tiny", "--prompt", "x", flag, str(target))
        assert rc == 2 and err == f"error: {flag} {target.parent if target.suffix else target}: {blocker} is not a " \
                                  "folder\n", err
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root may write anywhere: the probe really writes
    rc, _, err = main(capsys, "generate", "--model", "tiny", "--prompt", "x", "--output",
                      str(tmp_path / "new" / "x.png"))
    assert rc == 2 and err == f"error: --output {tmp_path / 'new'}: cannot write in {tmp_path} (permission denied)\n"
    assert not (tmp_path / "new").exists()  # the probe makes no folder


def test_write_error_after_the_run_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    import app.service

    def refuse(image, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(app.service, "save_image_atomic", refuse)
    rc, _, err = main(capsys, *gen(tiny_dir, "--prompt", "x", "--steps", "1", "--output", str(tmp_path / "x.png")))
    assert rc == 2 and error_lines(err) == [f"error: Permission denied ({tmp_path / 'x.png'})"]


def test_profiles_import_of_nested_json_and_of_a_fifo(tmp_path, capsys):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100000 + "]" * 100000)
    rc, _, err = main(capsys, "profiles", "import", str(nested), "--profiles-dir", str(tmp_path / "p"))
    assert rc == 2 and err == "error: file 'nested.json' is nested more than 32 levels deep\n"
    fifo = tmp_path / "pipe.json"
    __import__("os").mkfifo(fifo)
    r = run_cli("profiles", "import", str(fifo), "--profiles-dir", str(tmp_path / "p"), timeout=60)
    assert r.returncode == 2 and r.stderr == "error: file 'pipe.json' is a pipe, not a regular file\n"


def test_progress_shows_seconds_per_step_never_a_rate_from_nothing(tiny_dir, tmp_path, capsys):
    """tqdm's rate for the first step was measured from the bar's creation, just after that step: "76260 step/s"."""
    rc, _, err = main(capsys, *gen(tiny_dir, "--prompt", "x", "--steps", "3", "--output", str(tmp_path / "x.png")))
    assert rc == 0, err
    bars = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("denoising")]
    assert bars and all("step/s" not in ln and "it/s" not in ln for ln in bars), bars
    first = next(ln for ln in bars if "| 1/3 " in ln)
    assert re.search(r"1/3 \[\d\d:\d\d, \d+\.\d\d s/step, ETA \d\d:\d\d\]", first), first
    assert re.search(r"3/3 \[.*s/step", bars[-1]), bars[-1]


@pytest.mark.parametrize("args,allowed", [
    (["--help"], set()),
    (["generate", "--help"], set()),
    (["info", "{image}"], set()),
    (["profiles", "list", "--profiles-dir", "{tmp}"], set()),
    (["generate", "--prompt-file", "{tmp}/missing.txt"], set()),
    (["models", "--checkpoints-dir", "{tmp}"], {"torch"}),  # the device decides "auto" quantization
])
def test_commands_import_only_what_they_need(tmp_path, args, allowed):
    """Start-up time: torch (~2 s), diffusers / transformers (~1 s) and gradio only where the command needs them."""
    image = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = [a.format(image=image, tmp=tmp_path) for a in args]
    code = ("import sys, json, wgp_zimage\n"
            "try:\n    wgp_zimage.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'diffusers', 'transformers', 'gradio')\n"
            "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert "Traceback" not in r.stderr, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) <= allowed, (r.stdout, r.stderr)
