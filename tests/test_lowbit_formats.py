"""Low-bit transformer formats as a choice: a definition's "lowbit_URLs" (fp8, gguf-q8, gguf-q4) are what the
transformer quantization picks; the chosen file downloads from a (loopback) hub and renders; a format the
definition lacks is refused by name; `models` lists each type's formats."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from PIL import Image

from app.app_config import validate_config
from app.jobs import JobSpec
from app.service import GenerationService, ServiceConfig
from models import registry
from models.errors import UserError
from models.registry import handler_for, load_definitions
from tests.conftest import cli
from tests.lowbit_helpers import psnr
from tests.test_downloads import REPO, FakeHub, online  # noqa: F401 - fixture
from tests.test_fp8 import fp8_file
from tests.test_gguf import comfy_sd, write_gguf
from tests.test_model_fetch import served_files

HUB = f"https://huggingface.co/{REPO}/resolve/main"
# PSNR bounds (dB) of the downloaded file's image against the bf16 file's (fp32 compute): tests/test_gguf.py's
# and tests/test_fp8.py's bounds for these formats
BOUNDS = {"gguf-q8": 48, "fp8": 37}


def test_definitions_list_their_formats_and_a_missing_one_is_named(tmp_path):
    defs, _ = load_definitions()
    turbo, base = defs["z_image"], defs["z_image_base"]
    assert turbo.transformer_formats == ("bf16", "int8", "fp8", "gguf-q8", "gguf-q4")
    assert base.transformer_formats == ("bf16", "int8")
    handler = handler_for("z_image")
    specs = handler.files_to_download(turbo, tmp_path, "gguf-q4", "int8")
    names = [s.repo_path for s in specs]
    assert "z_image_turbo-Q4_K_M.gguf" in names and "ZImageTurbo_bf16.safetensors" not in names
    assert [s.repo_id for s in specs if s.repo_path.endswith(".gguf")] == ["jayn7/Z-Image-Turbo-GGUF"]
    assert handler.local_transformer(turbo, "gguf-q4", tmp_path) == tmp_path / "z_image_turbo-Q4_K_M.gguf"
    assert handler.local_transformer(turbo, "bf16", tmp_path) is None  # the folder lookup finds it
    with pytest.raises(UserError, match=r"Z-Image Base 6B \(z_image_base\.json\) lists no gguf-q4 transformer "
                                        r"\(it has: bf16, int8\); choose one of those"):
        handler.files_to_download(base, tmp_path, "gguf-q4", "bf16")
    with pytest.raises(UserError, match="the text encoder takes bf16 or int8 weights"):
        handler.files_to_download(turbo, tmp_path, "bf16", "fp8")
    # the saved Config: the transformer takes the low-bit formats, the text encoder does not
    assert validate_config({"transformer_quantization": "gguf-q8"}) == {"transformer_quantization": "gguf-q8"}
    with pytest.raises(UserError, match="text encoder quantization must be one of auto, bf16, int8"):
        validate_config({"text_encoder_quantization": "gguf-q8"})


def test_a_definition_with_an_unknown_format_is_skipped(tmp_path):
    data = json.loads((registry.DEFAULTS_DIR / "z_image.json").read_text())
    data["model"]["lowbit_URLs"] = {"gguf-q3": f"{HUB}/x.gguf"}
    (tmp_path / "odd.json").write_text(json.dumps(data))
    defs, problems = load_definitions([tmp_path])
    assert "odd" not in defs
    assert len(problems) == 1 and '"lowbit_URLs" must map formats (fp8, gguf-q8, gguf-q4) to URLs' in problems[0]


def test_models_command_shows_the_formats(tmp_path, capsys):
    rc, out, err = cli(capsys, "models", "--checkpoints-dir", str(tmp_path), "--transformer-quantization", "fp8")
    assert rc == 0, err
    block = out.split("z_image  [Z-Image]")[1].split("\nz_image_")[0]
    assert "transformer formats: bf16, int8, fp8, gguf-q8, gguf-q4" in block
    assert f"[ ] {tmp_path / 'z-image-turbo_fp8_scaled_e4m3fn_KJ.safetensors'}  <- https://huggingface.co/Kijai/" \
           "Z-Image_comfy_fp8_scaled/resolve/main/z-image-turbo_fp8_scaled_e4m3fn_KJ.safetensors" in block
    assert block.count("z-image-turbo_fp8_scaled_e4m3fn_KJ.safetensors'") <= 1  # listed once
    base = out.split("z_image_base  [Z-Image]")[1].split("\nz_image")[0]
    assert "transformer formats: bf16, int8\n    cannot be used: Z-Image Base 6B (z_image_base.json) lists no fp8 " \
           "transformer" in base


def test_choosing_a_format_the_model_lacks_is_one_clear_line(tmp_path, capsys):
    rc, _, err = cli(capsys, "generate", "--model", "base", "--prompt", "x", "--checkpoints-dir", str(tmp_path),
                     "--transformer-quantization", "gguf-q4")
    assert rc != 0 and "Traceback" not in err
    assert "lists no gguf-q4 transformer (it has: bf16, int8)" in err


@pytest.fixture(scope="module")
def lowbit_files(tiny_comfy_file, tmp_path_factory):
    """The tiny transformer as a Q8_0 GGUF file and as a scaled fp8 file, as served names -> bytes."""
    d = tmp_path_factory.mktemp("lowbit")
    q8 = write_gguf(d / "tiny-Q8_0.gguf", comfy_sd(tiny_comfy_file), gguf.GGMLQuantizationType.Q8_0)
    fp8 = fp8_file(tiny_comfy_file, d / "tiny_fp8_scaled.safetensors")
    return {"lowbit/tiny-Q8_0.gguf": q8.read_bytes(), "lowbit/tiny_fp8_scaled.safetensors": fp8.read_bytes()}


@pytest.mark.parametrize("case", ["gguf-q8", "fp8", "gguf URL as a finetune's transformer"])
def test_the_chosen_format_downloads_and_renders(case, tiny_dbm_dir, lowbit_files, tmp_path, online,  # noqa: F811
                                                 monkeypatch):
    fmt = case if case in BOUNDS else "bf16"
    data = json.loads((registry.DEFAULTS_DIR / "z_image_base.json").read_text())
    urls = {"gguf-q8": f"{HUB}/lowbit/tiny-Q8_0.gguf", "fp8": f"{HUB}/lowbit/tiny_fp8_scaled.safetensors"}
    if fmt == "bf16":  # a finetune whose own transformer is a GGUF file: its "URLs" name it
        data["model"]["URLs"] = [urls["gguf-q8"]]
    else:
        data["model"]["lowbit_URLs"] = urls
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    (finetunes / "my_base.json").write_text(json.dumps(data))
    monkeypatch.setattr(registry, "FINETUNES_DIR", finetunes)
    server = FakeHub({**served_files(tiny_dbm_dir), **lowbit_files})
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        ck = tmp_path / "ckpts"
        service = GenerationService(ServiceConfig(checkpoints_dir=ck, output_dir=tmp_path / "out",
                                                  transformer_quantization=fmt))
        spec = JobSpec(model_type="my_base", prompt="a red fox", width=64, height=64, num_inference_steps=3, seed=5)
        result = service.generate(spec)
        fetched = {path.rsplit("/", 1)[-1] for _, path, _ in server.gets()}
    finally:
        server.close()
    name = "tiny_fp8_scaled.safetensors" if fmt == "fp8" else "tiny-Q8_0.gguf"
    assert name in fetched and "ZImageBase_bf16.safetensors" not in fetched  # the chosen file only
    assert (ck / "lowbit" / name).read_bytes() == lowbit_files[f"lowbit/{name}"]
    from models.lowbit import Fp8Linear, GGUFLinear

    kind = Fp8Linear if fmt == "fp8" else GGUFLinear
    assert isinstance(service._pipe.transformer.layers[0].attention.to_q, kind)  # the low-bit file is what loaded
    ref = GenerationService(ServiceConfig(output_dir=tmp_path / "ref")).generate(
        JobSpec(**{**spec.to_dict(), "model_type": "z_image_base"}), model_dir=tiny_dbm_dir)
    image, bf16 = (np.asarray(Image.open(p)).astype(np.float64) for p in (result.paths[0], ref.paths[0]))
    assert psnr(image, bf16) > BOUNDS.get(fmt, BOUNDS["gguf-q8"]), psnr(image, bf16)
