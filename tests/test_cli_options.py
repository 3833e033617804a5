"""Command-line options and the checks made before any model loads (one error line, nothing downloaded)."""

from pathlib import Path

import pytest

import wgp_zimage
from app.settings import ProfileStore


def main(capsys, *args):
    try:
        rc = wgp_zimage.main(list(args))
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_top_level_profiles_dir_is_read_by_profiles_and_generate(tmp_path, capsys):
    pdir = tmp_path / "p"
    ProfileStore(pdir).save("mine", {"model_type": "z_image_tiny", "prompt": "from the profile"})
    rc, out, err = main(capsys, "--profiles-dir", str(pdir), "profiles", "list")
    assert rc == 0 and out.startswith("mine "), (out, err)
    parser = wgp_zimage.build_parser()
    for argv in (["--profiles-dir", str(pdir), "generate", "--gen-profile", "mine"],
                 ["generate", "--profiles-dir", str(pdir), "--gen-profile", "mine"],
                 ["--profiles-dir", str(pdir), "profiles", "show", "mine"],
                 ["profiles", "--profiles-dir", str(pdir), "show", "mine"],
                 ["profiles", "show", "mine", "--profiles-dir", str(pdir)]):
        assert parser.parse_args(argv).profiles_dir == pdir, argv
    assert parser.parse_args(["profiles", "list"]).profiles_dir == Path("profiles")
    assert parser.parse_args(["generate"]).profiles_dir == Path("profiles")


def small_png(path, size=(100, 84)):
    from PIL import Image

    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


@pytest.mark.parametrize("flags,message", [
    (["--image", "{png}"], "TwinFlow Turbo takes no input image"),
    (["--upscale", "2"], "TwinFlow Turbo takes no input image and no upscale pass"),
    (["--control-image", "{png}"], "TwinFlow Turbo takes no control image"),
])
def test_twinflow_refuses_image_inputs_before_any_download(tmp_path, capsys, flags, message):
    png = small_png(tmp_path / "in.png")
    ckpts = tmp_path / "ckpts"
    rc, out, err = main(capsys, "generate", "--model", "twinflow", "--checkpoints-dir", str(ckpts), "--prompt", "x",
                        *[f.format(png=png) for f in flags])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not ckpts.exists() and "fetching" not in err


def test_twinflow_rule_is_checked_where_jobs_come_in():
    """The page's Generate and the API submit through app.jobs.validate: the family's hook runs there."""
    from app.jobs import JobSpec, validate
    from models.errors import UserError

    with pytest.raises(UserError, match="TwinFlow Turbo takes no input image"):
        validate(JobSpec("twinflow", prompt="x", upscale=1.5))
    validate(JobSpec("z_image", prompt="x", upscale=1.5))  # Turbo takes it


def test_input_render_size_fills_the_missing_side_from_the_aspect_ratio(tmp_path):
    from app.jobs import input_render_size

    png = small_png(tmp_path / "in.png", (100, 84))
    assert input_render_size(png) == (96, 80)  # its own size, rounded down
    assert input_render_size(png, 64, None) == (64, 48)  # 64 * 84 / 100 = 53.8 -> 48, not the model's 1024
    assert input_render_size(png, None, 160) == (176, 160)  # 160 * 100 / 84 = 190.5 -> 176
    assert input_render_size(png, 64, 32) == (64, 32)
    thin = small_png(tmp_path / "thin.png", (400, 10))
    assert input_render_size(thin, 64, None) == (64, 16)  # at least 16
    assert input_render_size(thin, None, 160) == (4096, 160)  # at most 4096


def test_cli_image_with_one_side_keeps_its_aspect(tiny_dir, tmp_path, capsys):
    from PIL import Image

    png = small_png(tmp_path / "in.png", (100, 84))
    out = tmp_path / "o.png"
    rc, _, err = main(capsys, "generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "1", "--prompt",
                      "x", "--image", str(png), "--width", "64", "--output", str(out))
    assert rc == 0, err
    assert Image.open(out).size == (64, 48)


def test_one_default_output_quality():
    """A new profile, the service and the command line had 90 and 95."""
    from app.app_config import DEFAULT_OUTPUT_QUALITY
    from app.service import ServiceConfig
    from app.settings import default_settings

    args = wgp_zimage.build_parser().parse_args(["generate"])
    assert default_settings()["output_quality"] == ServiceConfig().output_quality == args.output_quality \
        == DEFAULT_OUTPUT_QUALITY == 95


@pytest.mark.parametrize("value", ["0", "101"])
def test_output_quality_out_of_range_is_one_short_line(capsys, value):
    rc, _, err = main(capsys, "generate", "--prompt", "x", "--output-quality", value)
    assert rc == 2 and err.count("\n") == 1 and f"must be between 1 and 100 (got {value})" in err, err
    assert "choose from" not in err


def test_gen_profile_output_format_and_quality(tiny_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    pdir = str(tmp_path / "profiles")
    rc, _, err = main(capsys, "profiles", "save", "jp", "--profiles-dir", pdir, "--model", "tiny", "--steps", "1",
                      "--seed", "3", "--width", "64", "--height", "64", "--prompt", "x", "--format", "jpeg",
                      "--quality", "20")
    assert rc == 0, err

    def run(folder, *flags):
        rc, _, err = main(capsys, "generate", "--gen-profile", "jp", "--profiles-dir", pdir, "--model-dir",
                          str(tiny_dir), "--output", str(tmp_path / folder), *flags)
        assert rc == 0, err
        return sorted((tmp_path / folder).iterdir()) if (tmp_path / folder).is_dir() else [tmp_path / folder]

    (by_profile,) = run("a")
    assert by_profile.suffix == ".jpg", by_profile
    (same,) = run("b", "--output-format", "jpeg", "--output-quality", "20")
    (better,) = run("c", "--output-quality", "95")  # an explicit flag wins
    assert better.suffix == ".jpg"
    assert np.array_equal(np.asarray(Image.open(by_profile)), np.asarray(Image.open(same)))
    assert not np.array_equal(np.asarray(Image.open(by_profile)), np.asarray(Image.open(better)))
    assert run("d", "--output-format", "webp")[0].suffix == ".webp"
    assert run("e.png")[0].suffix == ".png" and Image.open(tmp_path / "e.png").format == "PNG"  # the file name's


@pytest.mark.parametrize("flag", ["--image", "--mask", "--outpaint", "--control-image"])
def test_profiles_save_offers_no_option_it_would_drop(tmp_path, capsys, flag):
    rc, _, err = main(capsys, "profiles", "save", "p", "--profiles-dir", str(tmp_path), "--model", "tiny", flag, "x")
    assert rc == 2 and f"unrecognized arguments: {flag}" in err and not list(tmp_path.iterdir()), err
    help_text = wgp_zimage.build_parser()._subparsers._group_actions[0].choices["profiles"]  # profiles save --help
    save = help_text._subparsers._group_actions[0].choices["save"].format_help()
    assert f"{flag} " not in save and "--strength" in save


@pytest.mark.parametrize("name,value,shown", [
    ("seed", "4294967296", "got 4294967296"),
    ("seed", 10**400, "got 1000000000000000000000000000000000000..."),
    ("num_inference_steps", "1234567", "got 1234567"),
    ("guidance_scale", "123456.5", "got 123456.5"),
    ("guidance_scale", "1e300", "got 1e+300"),
    ("width", "4097", "got 4097"),
])
def test_out_of_range_numbers_are_shown_in_full(name, value, shown):
    from app.params import by_name
    from models.errors import UserError

    with pytest.raises(UserError) as e:
        by_name()[name].parse(value)
    assert shown in str(e.value) and "e+0" not in str(e.value), str(e.value)


def test_existing_profile_or_file_names_the_cli_flag(tmp_path, capsys):
    pdir = str(tmp_path / "p")
    save = ["profiles", "save", "a", "--profiles-dir", pdir, "--model", "tiny"]
    assert main(capsys, *save)[0] == 0
    for argv, flag in ((save, "--overwrite"),
                       (["profiles", "export", "a", str(tmp_path / "p" / "a.json"), "--profiles-dir", pdir],
                        "--overwrite")):
        rc, _, err = main(capsys, *argv)
        assert rc == 2 and f"already exists; use {flag} to replace it" in err and "overwrite=True" not in err, err
    (tmp_path / "p" / "b.json").write_text("{not json")
    rc, _, err = main(capsys, "profiles", "save", "b", "--profiles-dir", pdir, "--model", "tiny")
    assert rc == 2 and "exists but is broken" in err and "use --overwrite-broken to replace it" in err, err
    rc, _, err = main(capsys, "profiles", "rename", "a", "b", "--profiles-dir", pdir)
    assert rc == 2 and "use --overwrite to replace it" in err, err
    assert main(capsys, "profiles", "rename", "a", "b", "--overwrite", "--profiles-dir", pdir)[0] == 0


def test_existing_profile_names_the_page_checkbox(tmp_path):
    from app.settings import ProfileStore, TargetExists
    from app.ui_profiles import REPLACE_LABEL, _error

    store = ProfileStore(tmp_path)
    store.save("a", {"model_type": "z_image_tiny"})
    with pytest.raises(TargetExists) as e:
        store.save("a", {"model_type": "z_image_tiny"})
    assert "overwrite" not in str(e.value)
    assert f"tick '{REPLACE_LABEL}' to replace it" in _error(e.value).message


def test_cli_lora_file_is_recorded_by_name_and_re_runs(tiny_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from app.metadata import read_settings
    from tests.test_lora_formats import load_tiny_transformer, write_lora

    lora_dir, elsewhere = tmp_path / "loras", tmp_path / "mine" / "private"
    (lora_dir / "style").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    write_lora(lora_dir / "style", "kohya_musubi", load_tiny_transformer(tiny_dir), name="ink")
    inside = next((lora_dir / "style").iterdir())
    outside = elsewhere / inside.name
    outside.write_bytes(inside.read_bytes())
    base = ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "2", "--width", "64", "--height",
            "64", "--prompt", "x", "--seed", "4", "--lora-dir-z-image", str(lora_dir)]
    for lora, out, name in ((inside, "in.png", "style/ink"), (outside, "out.png", "ink")):
        rc, _, err = main(capsys, *base, "--lora", str(lora), "--lora-multipliers", "0.5", "--output",
                          str(tmp_path / out))
        assert rc == 0, err
        meta = read_settings(tmp_path / out)
        assert meta["loras"] == [{"name": name, "strength": "0.5"}] and str(tmp_path) not in json_text(tmp_path / out)
    # re-run from the image: the name is looked up in the LoRA folder
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dir), "--lora-dir-z-image", str(lora_dir),
                      "--from-image", str(tmp_path / "in.png"), "--output", str(tmp_path / "again.png"))
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "in.png")))
    (lora_dir / "ink.safetensors").write_bytes(inside.read_bytes())  # the outside file, put in the folder
    rc, _, err = main(capsys, "generate", "--model-dir", str(tiny_dir), "--lora-dir-z-image", str(lora_dir),
                      "--from-image", str(tmp_path / "out.png"), "--output", str(tmp_path / "again2.png"))
    assert rc == 0, err


def json_text(path):
    from PIL import Image

    return str(Image.open(path).info)


def test_lora_multipliers_without_lora_is_refused(capsys):
    rc, _, err = main(capsys, "generate", "--prompt", "x", "--lora-multipliers", "0.5")
    assert rc == 2 and err == "error: --lora-multipliers gives the strengths of --lora LoRAs: give --lora too\n"


def test_output_folder_is_probed_by_writing(tmp_path, capsys):
    """/proc passes os.access for root, but nothing can be made there: refused before the model loads."""
    ckpts = tmp_path / "ck"
    target = Path("/proc/wgp-zimage-test/x.png")
    rc, _, err = main(capsys, "generate", "--model", "tiny", "--checkpoints-dir", str(ckpts), "--prompt", "x",
                      "--output", str(target))
    assert rc == 2 and err.startswith(f"error: --output {target.parent}: ") and err.count("\n") == 1, err
    assert not ckpts.exists()
    fine = tmp_path / "a" / "b"
    wgp_zimage.check_output_folder(fine, "--output")
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind


def test_profiles_save_takes_loras_as_generate_does(tmp_path, capsys):
    import json

    pdir = str(tmp_path / "p")
    rc, _, err = main(capsys, "profiles", "save", "l", "--profiles-dir", pdir, "--model", "tiny", "--lora", "ink",
                      "--lora", "film", "--lora", "grain", "--lora-multipliers", "0.5 1.0,0.5")
    assert rc == 0, err
    rc, out, _ = main(capsys, "profiles", "show", "l", "--profiles-dir", pdir)
    assert rc == 0 and json.loads(out)["loras"] == [
        {"name": "ink", "strength": 0.5}, {"name": "film", "strength": "1,0.5"}, {"name": "grain", "strength": 1.0}]
    rc, _, err = main(capsys, "profiles", "save", "m", "--profiles-dir", pdir, "--lora-multipliers", "0.5")
    assert rc == 2 and "give --lora too" in err
    rc, _, err = main(capsys, "profiles", "save", "m", "--profiles-dir", pdir, "--lora", "a", "--lora-multipliers",
                      "0.5 0.5")
    assert rc == 2 and "--lora-multipliers has 2 entries for 1 LoRA(s)" in err, err
