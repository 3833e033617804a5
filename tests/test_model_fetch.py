"""First use of Base / Turbo: the weights come from a (loopback) hub, or a clear offline message."""

import numpy as np

from app.jobs import JobSpec
from app.service import GenerationService, ServiceConfig
from tests.conftest import run_cli
from tests.test_downloads import FakeHub, hub, online  # noqa: F401 - fixtures


def served_files(dbm_dir):
    files = {p.relative_to(dbm_dir).as_posix(): p.read_bytes() for p in dbm_dir.rglob("*") if p.is_file()}
    files["Qwen3/vocab.json"] = b"{}"  # part of the real set; our tokenizer.json makes them unused
    files["Qwen3/merges.txt"] = b"#version: 0.2\n"
    return files


def test_first_use_downloads_then_generates(tiny_dbm_dir, tmp_path, online, monkeypatch):  # noqa: F811
    server = FakeHub(served_files(tiny_dbm_dir))
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        ck = tmp_path / "ckpts"
        service = GenerationService(ServiceConfig(checkpoints_dir=ck, output_dir=tmp_path / "out"))
        spec = JobSpec(model_type="z_image_base", prompt="x", width=64, height=64, num_inference_steps=1, seed=1)
        result = service.generate(spec)
        assert result.paths[0].is_file()
        assert (ck / "Qwen3" / "qwen3_bf16.safetensors").read_bytes() == \
            (tiny_dbm_dir / "Qwen3" / "qwen3_bf16.safetensors").read_bytes()
        assert not list(ck.rglob("*.incomplete"))
        n = len(server.requests)
        GenerationService(ServiceConfig(checkpoints_dir=ck, output_dir=tmp_path / "out")).generate(spec)
        assert len(server.requests) == n  # files present: nothing fetched again
        direct = GenerationService(ServiceConfig(output_dir=tmp_path / "o2")).generate(spec, model_dir=tiny_dbm_dir)
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(direct.paths[0])), np.asarray(Image.open(result.paths[0])))
    finally:
        server.close()


def test_offline_lists_every_missing_file(tmp_path):
    r = run_cli("generate", "--model", "turbo", "--prompt", "x", "--checkpoints-dir", str(tmp_path / "ck"),
                env_extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "10 model files are missing" in r.stderr
    assert "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/ZImageTurbo_bf16.safetensors" in r.stderr
    assert f"into: {tmp_path / 'ck' / 'Qwen3'}/" in r.stderr
    assert not (tmp_path / "ck").exists() or not any(p.is_file() for p in (tmp_path / "ck").rglob("*"))


def test_models_command_lists_presence(tiny_dbm_dir, tmp_path):
    r = run_cli("models", "--checkpoints-dir", str(tiny_dbm_dir))
    assert r.returncode == 0, r.stderr
    assert f"[x] {tiny_dbm_dir / 'ZImageBase_bf16.safetensors'}" in r.stdout
    assert f"[ ] {tiny_dbm_dir / 'ZImageTurbo_bf16.safetensors'}" in r.stdout
    assert "z_image_tiny" in r.stdout and "generated on first use" in r.stdout


def test_finetune_pointing_at_a_local_transformer(tiny_dbm_dir, tiny_comfy_file, tmp_path, monkeypatch):
    """A user definition in finetunes/ may name a local file; the rest comes from the checkpoints folder."""
    import json
    import shutil

    from models import registry

    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    base = json.loads((registry.DEFAULTS_DIR / "z_image_base.json").read_text())
    base["model"].update(name="My Base", URLs=[str(tiny_comfy_file)])
    base["num_inference_steps"] = 2
    (finetunes / "my_base.json").write_text(json.dumps(base))
    monkeypatch.setattr(registry, "FINETUNES_DIR", finetunes)
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dbm_dir, ck)
    (ck / "ZImageBase_bf16.safetensors").unlink()  # only the finetune's own transformer is there
    (ck / "Qwen3" / "vocab.json").write_text("{}")
    (ck / "Qwen3" / "merges.txt").write_text("#version: 0.2\n")
    service = GenerationService(ServiceConfig(checkpoints_dir=ck, output_dir=tmp_path / "out"))
    assert service.definition("my_base").name == "My Base"
    spec = JobSpec(model_type="my_base", prompt="x", width=64, height=64, num_inference_steps=2, seed=1)
    result = service.generate(spec)
    ref = GenerationService(ServiceConfig(output_dir=tmp_path / "ref")).generate(
        JobSpec(**{**spec.to_dict(), "model_type": "z_image_base"}), model_dir=tiny_dbm_dir)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(result.paths[0])), np.asarray(Image.open(ref.paths[0])))
