"""The Turbo extras through the app: `--sampler`, `--nag-scale/--nag-tau/--nag-alpha` on the command line, in the
image's metadata and A1111 text, and where the page shows them per model type. The samplers and NAG themselves
are checked against independent references in tests/test_samplers.py and tests/test_nag.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import wgp_zimage
from app.metadata import read_parameters, read_settings


def gen(tiny_dir, *args: str) -> list[str]:
    return ["generate", "--model", "tiny", "--model-dir", str(tiny_dir), "--steps", "3", "--width", "64", "--height",
            "64", "--seed", "4", "--prompt", "a fox", *args]


def run(capsys, *args: str) -> tuple[int, str]:
    rc = wgp_zimage.main(list(args))
    return rc, capsys.readouterr().err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_heun_is_recorded_and_changes_the_image(tiny_dir, tmp_path, capsys):
    euler, heun = tmp_path / "euler.png", tmp_path / "heun.png"
    assert run(capsys, *gen(tiny_dir, "--output", str(euler)))[0] == 0
    rc, err = run(capsys, *gen(tiny_dir, "--sampler", "heun", "--output", str(heun)))
    assert rc == 0, err
    assert "heun: 2 evaluations a step" in err
    assert read_settings(heun)["sampler"] == "heun" and read_settings(euler)["sampler"] == "euler"
    assert "Steps: 3, Sampler: Heun (flow), CFG scale:" in read_parameters(heun)
    assert np.abs(pixels(heun) - pixels(euler)).max() > 0


def test_nag_uses_the_negative_prompt_at_guidance_zero(tiny_dir, tmp_path, capsys):
    plain, neg_only, nag = tmp_path / "plain.png", tmp_path / "neg.png", tmp_path / "nag.png"
    common = ("--guidance", "0", "--negative-prompt", "blurry, dark")
    assert run(capsys, *gen(tiny_dir, "--guidance", "0", "--output", str(plain)))[0] == 0
    assert run(capsys, *gen(tiny_dir, *common, "--output", str(neg_only)))[0] == 0
    rc, err = run(capsys, *gen(tiny_dir, *common, "--nag-scale", "4", "--output", str(nag)))
    assert rc == 0, err
    assert np.array_equal(pixels(plain), pixels(neg_only))  # without CFG or NAG the negative prompt does nothing
    assert np.abs(pixels(nag) - pixels(plain)).max() > 0
    meta = read_settings(nag)
    assert (meta["nag_scale"], meta["nag_tau"], meta["nag_alpha"]) == (4.0, 3.5, 0.5)
    again = tmp_path / "again.png"
    rc, err = run(capsys, "generate", "--model-dir", str(tiny_dir), "--from-image", str(nag), "--output", str(again))
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(nag))


@pytest.mark.parametrize("args, message", [
    (("--sampler", "dpm"), "Sampler (--sampler) must be one of euler, heun"),
    (("--nag-scale", "0.5"), "NAG scale (--nag-scale) must be between 1 and 20"),
    (("--nag-alpha", "2"), "NAG alpha (--nag-alpha) must be between 0 and 1"),
    (("--nag-tau", "0"), "NAG tau (--nag-tau) must be between 0.1 and 20"),
])
def test_bad_values_are_one_line(tiny_dir, capsys, args, message):
    rc, err = run(capsys, *gen(tiny_dir, *args))
    assert rc == 2 and err.count("error:") == 1 and message in err, err


def test_the_page_shows_nag_for_turbo_and_its_negative_prompt_once_nag_is_on(tmp_path):
    from app.queue import JobQueue
    from app.service import GenerationService, ServiceConfig
    from app.ui import build_ui
    from app.ui_form import form_params

    config = ServiceConfig(output_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpts")
    service = GenerationService(config)
    demo = build_ui(JobQueue(service), service, config)
    fn = {getattr(e.fn, "__name__", ""): e for e in demo.fns.values()}["placement_updates"].fn
    names = [p.name for p in form_params()]
    needed = fn.__self__.needed()  # the values placement_updates reads after the model type
    assert "nag_scale" in needed

    def visible(model: str, **values) -> dict[str, bool]:
        out = fn(model, *(values.get(n) for n in needed))
        return {n: out[i]["visible"] for i, n in enumerate(names)}

    turbo_off, turbo_on = visible("z_image", nag_scale=1.0), visible("z_image", nag_scale=3.0)
    assert turbo_off["nag_scale"] and not turbo_off["nag_tau"] and not turbo_off["negative_prompt"]
    assert turbo_on["nag_tau"] and turbo_on["nag_alpha"] and turbo_on["negative_prompt"]
    base = visible("z_image_base", nag_scale=1.0)
    assert base["negative_prompt"] and not base["nag_scale"] and base["sampler"]
    demo.close()


def tf(tiny_dir, *args: str) -> list[str]:
    return ["generate", "--model", "twinflow", "--model-dir", str(tiny_dir), "--width", "64", "--height", "64",
            "--seed", "4", "--prompt", "a fox", *args]


def test_twinflow_samples_with_its_own_sampler_and_refuses_image_input(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tf.png"
    rc, err = run(capsys, *tf(tiny_dir, "--output", str(out)))
    assert rc == 0, err
    meta = read_settings(out)
    assert (meta["model_type"], meta["num_inference_steps"], meta["guidance_scale"]) == ("z_image_twinflow_turbo", 2,
                                                                                          0.0)
    euler = tmp_path / "euler.png"  # the same weights and steps sampled by Turbo's Euler
    assert run(capsys, *gen(tiny_dir, "--steps", "2", "--guidance", "0", "--flow-shift", "3", "--negative-prompt", "",
                            "--output", str(euler)))[0] == 0
    assert np.abs(pixels(out) - pixels(euler)).max() > 0
    again = tmp_path / "again.png"
    rc, err = run(capsys, "generate", "--model-dir", str(tiny_dir), "--from-image", str(out), "--output", str(again))
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(out))
    rc, err = run(capsys, *tf(tiny_dir, "--upscale", "2"))
    assert rc == 2 and "TwinFlow Turbo takes no input image and no upscale pass" in err


def test_twinflow_with_a_lora_warns_once(tiny_dir, tmp_path):
    from app.jobs import JobSpec, validate
    from app.service import GenerationService, ServiceConfig
    from tests.test_lora_formats import load_tiny_transformer, write_lora

    lora_dir = tmp_path / "loras" / "z_image"
    lora_dir.mkdir(parents=True)
    write_lora(lora_dir, "kohya_musubi", load_tiny_transformer(tiny_dir), name="ink")
    service = GenerationService(ServiceConfig(output_dir=tmp_path / "out", checkpoints_dir=tmp_path / "ckpts",
                                              lora_dirs={"z_image": lora_dir}))
    reports = []
    for _ in range(2):
        spec = JobSpec(model_type="z_image_twinflow_turbo", prompt="a fox", width=64, height=64, seed=1,
                       loras=[{"name": "ink", "strength": 1.0}])
        validate(spec)
        reports.append(service.generate(spec, model_dir=tiny_dir).lora_reports)
    assert any("TwinFlow with LoRAs" in r for r in reports[0]) and not any("TwinFlow" in r for r in reports[1])


def test_variety_is_recorded_and_re_renders(tiny_dir, tmp_path, capsys):
    plain, varied = tmp_path / "plain.png", tmp_path / "varied.png"
    assert run(capsys, *gen(tiny_dir, "--output", str(plain)))[0] == 0
    rc, err = run(capsys, *gen(tiny_dir, "--variety", "2", "--variety-until", "1", "--output", str(varied)))
    assert rc == 0, err
    assert np.abs(pixels(varied) - pixels(plain)).max() > 0
    assert (read_settings(varied)["variety"], read_settings(varied)["variety_until"]) == (2.0, 1.0)
    again = tmp_path / "again.png"
    rc, err = run(capsys, "generate", "--model-dir", str(tiny_dir), "--from-image", str(varied), "--output", str(again))
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(varied))  # the variety noise comes from the image's seed
