"""Restoring settings from a dropped file: images, the settings JSON images carry, generation profiles.

First the function the page calls (app.ui_restore.restore_settings), then /restore through gradio_client
against an app where Base is not installed (its settings go to Turbo) and the LoRA folder has one LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.metadata import png_info, settings_json
from app.queue import JobQueue
from app.service import GenerationService, ServiceConfig
from app.settings import ProfileStore
from app.ui import build_ui, launch_options
from app.ui_restore import installed_type, restore_settings
from models.errors import UserError
from models.registry import load_definitions
from tests.test_lora_formats import load_tiny_transformer, write_lora
from tests.test_ui_api import free_port

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
STYLE = "my_style"
# what an image of a Base job carries (app/service.py: the spec, its own seed, how it was made)
BASE_IMAGE = {
    "model_type": "z_image_base", "prompt": "a base fox", "negative_prompt": "ugly", "width": 768, "height": 1344,
    "num_inference_steps": 30, "guidance_scale": 4.0, "flow_shift": 6.0, "cfg_normalization": 0.0,
    "cfg_truncation": 1.0, "seed": 1235, "num_images": 2, "loras": [], "memory_profile": None, "batch_seed": 1234,
    "image_index": 1, "dtype": "bf16", "created": "2025-01-01T00:00:00",
}


@pytest.fixture(scope="module")
def defs():
    return load_definitions()[0]


def without(defs, *types):
    return {t: d for t, d in defs.items() if t not in types}


def no_loras(model_type):
    return []


# ------------------------------------------------------------------ the function the page calls

def test_installed_type_maps_base_and_turbo_to_each_other(defs):
    assert installed_type("z_image_base", defs) == ("z_image_base", [])
    assert installed_type("turbo", defs) == ("z_image", [])  # an alias
    target, (warning,) = installed_type("z_image_base", without(defs, "z_image_base"))
    assert target == "z_image" and "'z_image_base' is not installed" in warning and "Turbo" in warning
    assert installed_type("base", without(defs, "z_image_base"))[0] == "z_image"
    target, (warning,) = installed_type("z_image", without(defs, "z_image"))
    assert target == "z_image_base" and "equivalent" in warning and "Base" in warning
    # the tiny model has no equivalent: the page keeps its current model
    target, (warning,) = installed_type("z_image_tiny", without(defs, "z_image_tiny"))
    assert target is None and "no installed equivalent" in warning
    target, (warning,) = installed_type("flux_dev", defs)
    assert target is None and "keeping the current model" in warning


def test_base_image_json_restores_into_turbo_when_base_is_missing(defs, tmp_path):
    path = tmp_path / "base.json"
    path.write_text(settings_json(BASE_IMAGE))
    r = restore_settings(path, without(defs, "z_image_base"), no_loras)
    s = r.settings
    assert r.source == "image settings" and s["model_type"] == "z_image"
    # the user's values carry over unchanged; the image's own seed, one image
    assert (s["prompt"], s["negative_prompt"], s["width"], s["height"], s["num_inference_steps"]) == (
        "a base fox", "ugly", 768, 1344, 30)
    assert (s["guidance_scale"], s["flow_shift"], s["seed_policy"], s["seed"], s["num_images"]) == (
        4.0, 6.0, "fixed", 1235, 1)
    text = " | ".join(r.warnings)
    assert "equivalent Z-Image Turbo" in text and "guidance 4 is above 0" in text and "30 steps is many" in text
    # Turbo settings go to Base the same way
    path.write_text(settings_json({**BASE_IMAGE, "model_type": "z_image", "num_inference_steps": 8,
                                   "guidance_scale": 0.0, "flow_shift": 3.0}))
    r = restore_settings(path, without(defs, "z_image"), no_loras)
    assert r.settings["model_type"] == "z_image_base" and r.settings["flow_shift"] == 3.0
    assert any("8 steps is few" in w for w in r.warnings)
    # both installed: no warning at all
    r = restore_settings(path, defs, no_loras)
    assert r.settings["model_type"] == "z_image" and r.warnings == []


def test_image_with_a_missing_lora_drops_it_by_name(defs, tmp_path):
    path = tmp_path / "lora.png"
    settings = {**BASE_IMAGE, "loras": [{"name": STYLE, "strength": 0.8}, {"name": "gone_lora", "strength": "1.0,0.5"}]}
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(settings))
    asked = []

    def names(model_type):
        asked.append(model_type)
        return [STYLE]

    r = restore_settings(path, defs, names)
    assert r.source == "image" and asked == ["z_image_base"]
    assert r.settings["loras"] == [{"name": STYLE, "strength": 0.8}]
    (warning,) = r.warnings
    assert "'gone_lora'" in warning and "dropped" in warning and "'lora.png'" in warning


def test_generation_profile_json_restores(defs, tmp_path):
    store = ProfileStore(tmp_path / "profiles")
    store.save("foxes", {"model_type": "z_image_tiny", "prompt": "a profiled fox", "width": 64, "height": 64,
                         "seed_policy": "increment", "seed": 5, "num_images": 3,
                         "loras": [{"name": STYLE, "strength": 0.5}]})
    r = restore_settings(store.path("foxes"), defs, lambda t: [])
    assert r.source == "generation profile" and r.settings["model_type"] == "z_image_tiny"
    assert (r.settings["prompt"], r.settings["num_images"], r.settings["seed"]) == ("a profiled fox", 3, 5)
    assert r.settings["loras"] == [] and any(f"'{STYLE}'" in w for w in r.warnings)
    # a schema-1 profile (no schema_version, "model") is migrated
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": "turbo", "prompt": "old fox", "resolution": "512x512", "steps": 6}))
    r = restore_settings(old, defs, no_loras)
    assert (r.settings["model_type"], r.settings["width"], r.settings["num_inference_steps"]) == ("z_image", 512, 6)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("[1, 2]", "holds a JSON list"),
    ('{"foo": 1}', "not a wgp-zimage settings file"),
    ('{"model": {"architecture": "z_image"}}', "not a wgp-zimage settings file"),  # a model definition
    ('{"app": "other-app", "prompt": "x"}', "written by 'other-app'"),
    ('{"app": "wgp-zimage", "schema": 99, "model_type": "z_image"}', "newer than this version reads"),
    ('{"app": "wgp-zimage", "schema": 1, "prompt": "x"}', "names no model type"),
    ('{"app": "wgp-zimage", "schema": 1, "model_type": "z_image", "width": "wide"}',
     r"Width \(--width\) must be a number"),
    ('{"schema_version": 2, "model_type": "z_image", "num_inference_steps": 500}', "between 1 and 100"),
    ('{"schema_version": 7, "model_type": "z_image"}', "newer wgp-zimage"),
])
def test_unusable_json_files_raise_one_clear_line(defs, tmp_path, content, message):
    path = tmp_path / "settings.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as e:
        restore_settings(path, defs, no_loras)
    assert "'settings.json'" in str(e.value) and "\n" not in str(e.value)


def test_unusable_images_raise_one_clear_line(defs, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(UserError, match="holds no wgp-zimage settings"):
        restore_settings(plain, defs, no_loras)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="cannot read image 'broken.png'"):
        restore_settings(broken, defs, no_loras)


# ------------------------------------------------------------------ /restore through gradio_client

class RestoreApp:
    """The served app without Base (its settings go to Turbo), with one LoRA in the LoRA folder."""

    def __init__(self, root: Path, tiny_dir: Path):
        (root / "ckpts").mkdir(parents=True)
        (root / "ckpts" / "z_image_tiny").symlink_to(tiny_dir, target_is_directory=True)
        self.lora_dir = root / "loras"
        self.lora_dir.mkdir()
        write_lora(self.lora_dir, "diffusers_peft", load_tiny_transformer(tiny_dir), seed=1, name=STYLE)
        self.config = ServiceConfig(checkpoints_dir=root / "ckpts", output_dir=root / "outputs",
                                    lora_dirs={"z_image": self.lora_dir})
        self.service = GenerationService(self.config)
        del self.service.definitions["z_image_base"]  # as if defaults/z_image_base.json were gone
        self.queue = JobQueue(self.service, root / "queue.json").start()
        self.demo = build_ui(self.queue, self.service, self.config)
        port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                         ssr_mode=False, **launch_options(self.config.output_dir))
        self.client = Client(f"http://127.0.0.1:{port}/", verbose=False)

    def close(self) -> None:
        self.demo.close()
        self.queue.close()

    def restore(self, path: Path) -> dict:
        out = self.client.predict(handle_file(str(path)), api_name="/restore")
        names = restore_outputs()
        assert len(out) == len(names)
        return dict(zip(names, out))


def restore_outputs() -> tuple[str, ...]:
    """/restore's outputs by name: the model, the prompt, each form parameter (by its API name), the preset,
    the model's description, the LoRA controls and the message."""
    from app.ui_form import form_params

    short = {"negative_prompt": "negative"}
    return ("model", "prompt", *(short.get(p.api_name, p.api_name) for p in form_params()), "preset", "info",
            "lora_select", "lora_strengths", "lora_triggers", "message")


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    served = RestoreApp(tmp_path_factory.mktemp("ui_restore"), tiny_dir)
    yield served
    served.close()


def value(update):
    return update.get("value") if isinstance(update, dict) else update


def test_api_base_settings_go_to_turbo(app, tmp_path):
    path = tmp_path / "base.json"
    path.write_text(settings_json(BASE_IMAGE))
    out = app.restore(path)
    assert (out["model"], out["prompt"], out["steps"], out["guidance"], out["flow_shift"], out["seed"]) == (
        "z_image", "a base fox", 30, 4.0, 6.0, 1235)
    assert out["num_images"] == 1 and value(out["negative"]) == "ugly"
    assert out["message"].startswith("Settings restored from the image settings 'base.json'")
    assert "'z_image_base' is not installed" in out["message"] and "Z-Image Turbo" in out["message"]
    assert "guidance 4 is above 0" in out["message"]


def test_api_missing_lora_is_dropped_with_a_warning(app, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"schema_version": 2, "model_type": "z_image_tiny", "prompt": "lora fox",
                                "loras": [{"name": STYLE, "strength": 0.6}, {"name": "deleted_lora", "strength": 1}]}))
    out = app.restore(path)
    assert out["model"] == "z_image_tiny" and out["prompt"] == "lora fox"
    assert value(out["lora_select"]) == [STYLE] and out["lora_strengths"] == f"{STYLE}=0.6"
    assert "generation profile 'profile.json'" in out["message"]
    assert "LoRA 'deleted_lora' is no longer available; dropped" in out["message"]


def test_api_corrupt_json_changes_nothing(app, tmp_path):
    for name, content, message in (("corrupt.json", "{\"prompt\": ", "is not valid JSON"),
                                   ("other.json", '{"hello": "world"}', "not a wgp-zimage settings file"),
                                   ("fake.png", "not an image", "cannot read image 'fake.png'")):
        path = tmp_path / name
        path.write_text(content)
        out = app.restore(path)
        assert out["message"].startswith("⚠ Not restored: ") and message in out["message"]
        assert "Traceback" not in out["message"]
        # gr.skip() for every control: nothing else changes
        assert all(isinstance(v, dict) and "value" not in v for k, v in out.items() if k != "message")
    assert app.client.predict(api_name="/queue") == []  # the server is still up
