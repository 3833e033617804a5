"""Model families, definitions, defaults and the equivalence map."""

import json

import pytest

from models import registry
from models.errors import UserError
from models.registry import FamilyHandler, load_definitions, register_handler, resolve_model_type


@pytest.fixture(scope="module")
def defs():
    return load_definitions()[0]


def test_types_and_aliases(defs):
    assert {"z_image_base", "z_image", "z_image_tiny"} <= set(defs)
    assert resolve_model_type("base", defs) == "z_image_base"
    assert resolve_model_type("turbo", defs) == "z_image"
    assert resolve_model_type("tiny", defs) == "z_image_tiny"
    with pytest.raises(UserError, match="unknown model type 'sdxl'.*base"):
        resolve_model_type("sdxl", defs)
    assert "noise" in defs["z_image_tiny"].name


def test_equivalence(defs):
    assert registry.equivalent_types("z_image_base", defs) == ("z_image_base", "z_image")
    assert registry.equivalent_types("z_image", defs) == ("z_image", "z_image_base", "z_image_twinflow_turbo")
    assert registry.equivalent_types("z_image_twinflow_turbo", defs) == ("z_image_twinflow_turbo", "z_image")
    assert registry.equivalent_types("z_image_tiny", defs) == ("z_image_tiny",)


def test_defaults(defs):
    base, turbo = defs["z_image_base"].defaults(), defs["z_image"].defaults()
    assert (base["num_inference_steps"], base["guidance_scale"], base["flow_shift"]) == (30, 4.0, 6.0)
    assert base["negative_prompt"].startswith("low quality")
    assert (turbo["num_inference_steps"], turbo["guidance_scale"], turbo["flow_shift"]) == (8, 0.0, 3.0)
    # Turbo is distilled without CFG and for one shift: the page hides the negative prompt, moves the shift
    h = registry.handler_for("z_image")
    # (its negative prompt shows once NAG is on: the page's conditions)
    assert h.param_layout("z_image")["flow_shift"] == "advanced" and "negative_prompt" not in h.param_layout("z_image")
    assert h.param_conditions("z_image")["negative_prompt"] == "nag_scale"
    assert h.param_layout("z_image_base")["nag_scale"] == "hidden" and "negative_prompt" not in \
        h.param_layout("z_image_base")
    assert defs["z_image_base"].urls[0].endswith("ZImageBase_bf16.safetensors")
    assert defs["z_image_base"].urls[1].endswith("ZImageBase_quanto_bf16_int8.safetensors")


def test_files_to_download(defs, tmp_path):
    h = registry.handler_for("z_image_base")
    specs = h.files_to_download(defs["z_image_base"], tmp_path, "int8", "bf16")
    paths = {s.repo_path for s in specs}
    assert {"ZImageBase_quanto_bf16_int8.safetensors", "Qwen3/qwen3_bf16.safetensors",
            "ZImageTurbo_VAE_bf16.safetensors", "ZImageTurbo_VAE_bf16_config.json",
            "ZImageTurbo_scheduler_config.json", "Qwen3/tokenizer.json", "Qwen3/config.json"} <= paths
    assert all(s.repo_id == "DeepBeepMeep/Z-Image" for s in specs)
    assert h.files_to_download(defs["z_image_tiny"], tmp_path) == []


def test_broken_and_unknown_definitions_are_skipped(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "alien.json").write_text(json.dumps({"model": {"architecture": "alien"}}))
    (tmp_path / "nomodel.json").write_text(json.dumps({"steps": 3}))
    defs, problems = load_definitions([registry.DEFAULTS_DIR, tmp_path])
    assert "z_image_base" in defs and "broken" not in defs and "alien" not in defs
    assert len(problems) == 3
    assert any("broken.json" in p for p in problems) and any("unknown architecture 'alien'" in p for p in problems)


def test_finetune_overrides_default(tmp_path):
    data = json.loads((registry.DEFAULTS_DIR / "z_image.json").read_text())
    data["num_inference_steps"] = 6
    data["model"]["name"] = "My Turbo"
    (tmp_path / "z_image.json").write_text(json.dumps(data))
    defs, _ = load_definitions([registry.DEFAULTS_DIR, tmp_path])
    assert defs["z_image"].name == "My Turbo" and defs["z_image"].defaults()["num_inference_steps"] == 6


def test_dummy_family_plugs_in(tmp_path):
    """A second family is one handler plus one JSON file."""

    class DummyHandler(FamilyHandler):
        family = "dummy"
        family_label = "Dummy"
        architectures = ("dummy_xl",)
        aliases = {"dxl": "dummy_xl"}

        def ui_defaults(self, architecture):
            return {"num_inference_steps": 12, "guidance_scale": 1.5}

    register_handler(DummyHandler())
    try:
        (tmp_path / "dummy_xl.json").write_text(json.dumps({"model": {"name": "Dummy XL", "architecture": "dummy_xl"},
                                                            "width": 768}))
        defs, problems = load_definitions([registry.DEFAULTS_DIR, tmp_path])
        assert problems == []
        assert resolve_model_type("dxl", defs) == "dummy_xl"
        d = defs["dummy_xl"]
        assert d.family == "dummy" and d.defaults() == {"num_inference_steps": 12, "guidance_scale": 1.5, "width": 768}
        assert registry.handler_for("dummy_xl").family_label == "Dummy"
        with pytest.raises(ValueError, match="already handled"):
            register_handler(type("Clash", (FamilyHandler,), {"family": "clash", "architectures": ("dummy_xl",)})())
    finally:
        registry.unregister_handler("dummy")
    assert "dummy_xl" not in load_definitions([registry.DEFAULTS_DIR, tmp_path])[0]


def test_quantization_choice_on_cpu():
    import torch

    h = registry.handler_for("z_image")
    assert h.choose_quantization("auto", torch.device("cpu")) == "bf16"
    assert h.choose_quantization("int8", torch.device("cpu")) == "int8"
    not_ready = type("NoInt8", (FamilyHandler,), {"int8_ready": False})()
    assert not_ready.choose_quantization("int8", torch.device("cpu")) == "bf16"  # a family without int8 loader
    assert h.choose_quantization("gguf-q4", torch.device("cpu")) == "gguf-q4"  # a low-bit file: as chosen
    with pytest.raises(UserError, match="quantization must be one of auto, bf16, int8, fp8, gguf-q8, gguf-q4"):
        h.choose_quantization("fp4", torch.device("cpu"))
