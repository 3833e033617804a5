"""Input from outside the app (API values, image metadata, dropped or imported files) never crashes or hangs
it, and is never read more generously than a user would read it: one clear message instead."""

from __future__ import annotations

import re

import pytest

from app.settings import normalize_settings
from app.ui_loras import parse_selection, parse_strength
from models.errors import UserError
from models.lora_runtime import parse_schedule

# ------------------------------------------------------------------ numbers and LoRA strengths


@pytest.mark.parametrize("bad", ["٣", "1,٣", "²", "1e308", 1e308, 11, -10.5, "1,20", 10**400, "inf", "1_0"])
def test_lora_strength_is_ascii_and_bounded(bad):
    with pytest.raises(UserError):
        parse_schedule(bad)
    with pytest.raises(UserError):
        parse_strength(bad, "style")
    with pytest.raises(UserError, match=r"loras\[0\]"):
        normalize_settings({"loras": [{"name": "style", "strength": bad}]})


def test_lora_strength_message_says_the_bounds():
    with pytest.raises(UserError, match="between -10 and 10"):
        parse_schedule(1e308)
    with pytest.raises(UserError, match="'style' strength.*between -10 and 10"):
        parse_selection("style=1e308")


def test_lora_strength_good_values():
    assert parse_schedule(10) == (10.0,) and parse_schedule("-10, 0.5") == (-10.0, 0.5)
    assert parse_schedule([1, "0.5"]) == (1.0, 0.5)
    assert parse_strength(" 0.8 ") == 0.8 and parse_strength("1.0, 0.25") == "1.0,0.25"
    settings, _ = normalize_settings({"loras": [{"name": "a", "strength": "1,0.5"}, {"name": "b", "strength": 2}]})
    assert settings["loras"] == [{"name": "a", "strength": "1,0.5"}, {"name": "b", "strength": 2.0}]


def test_profiles_cli_lora_strength_is_ascii():
    from app.profiles_cli import _parse_lora

    assert _parse_lora("style:0.5") == {"name": "style", "strength": 0.5}
    for bad in ("style:٣", "style:1e308"):
        with pytest.raises(UserError, match="--lora"):
            _parse_lora(bad)


def test_ascii_numbers():
    from models.parsing import ascii_float, ascii_int

    assert ascii_int(" -12 ") == -12 and ascii_float("1.5e-3") == 0.0015 and ascii_float(".5") == 0.5
    for bad in ("٣", "²", "1.0", "", "1_000", "0x10", None):
        with pytest.raises(ValueError):
            ascii_int(bad)
    for bad in ("٣", "۱.۵", "inf", "nan", "1e999", "", "1_0", "1.2.3"):
        with pytest.raises(ValueError):
            ascii_float(bad)


# ------------------------------------------------------------------ files: profiles and dropped files

NESTED = "[" * 100000 + "]" * 100000


def hostile_files(folder):
    """name -> (a file of that name, what the message must say)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested.json").write_text('{"schema_version": 2, "x": ' + NESTED + "}")
    (folder / "deep.json").write_text('{"schema_version": 2, "x": ' + "[" * 40 + "]" * 40 + "}")
    (folder / "surrogate.json").write_text('{"schema_version": 2, "prompt": "a \\ud800 fox"}')
    (folder / "nan.json").write_text('{"schema_version": 2, "guidance_scale": NaN}')
    os.mkfifo(folder / "pipe.json")
    (folder / "dir.json").mkdir()
    return {"nested": "nested more than 32 levels deep", "deep": "nested more than 32 levels deep",
            "surrogate": "lone surrogate U+D800", "nan": "not valid JSON", "pipe": "is a pipe, not a regular file",
            "dir": "is a folder, not a regular file"}


def test_profile_folder_with_hostile_files_lists_them_as_broken(tmp_path):
    from app.settings import ProfileStore

    expected = hostile_files(tmp_path / "profiles")
    store = ProfileStore(tmp_path / "profiles")
    entries = {e.name: e for e in store.list()}  # a FIFO used to block here (and /profile_list with it)
    assert set(entries) == set(expected)
    for name, message in expected.items():
        assert entries[name].broken and message in entries[name].error, (name, entries[name].error)
        assert str(tmp_path) not in entries[name].error


@pytest.mark.parametrize("name", ["nested", "deep", "surrogate", "nan", "pipe", "dir"])
def test_import_and_restore_of_hostile_files_name_the_file_only(tmp_path, name):
    from app.settings import ProfileStore
    from app.ui_restore import restore_settings
    from models.registry import load_definitions

    message = hostile_files(tmp_path / "upload")[name]
    path = tmp_path / "upload" / f"{name}.json"
    with pytest.raises(UserError, match=re.escape(message)) as e:
        ProfileStore(tmp_path / "profiles").import_from(path)
    assert str(e.value).startswith(f"file '{name}.json'") and str(tmp_path) not in str(e.value)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        restore_settings(path, load_definitions()[0], lambda t: [])
    assert f"'{name}.json'" in str(e.value) and str(tmp_path) not in str(e.value)


def test_restore_of_unreadable_images_names_the_file_only(tmp_path):
    import os

    from app.ui_restore import restore_settings
    from models.registry import load_definitions

    defs = load_definitions()[0]
    (tmp_path / "text.png").write_text("not an image")  # PIL's own message names the full path
    os.mkfifo(tmp_path / "pipe.png")
    for name, message in (("text.png", "is not a PNG, JPEG or WebP image"), ("pipe.png", "is a pipe")):
        with pytest.raises(UserError, match=re.escape(message)) as e:
            restore_settings(tmp_path / name, defs, lambda t: [])
        assert f"'{name}'" in str(e.value) and str(tmp_path) not in str(e.value)


def test_profile_messages_do_not_name_the_server_folder(tmp_path):
    from app.settings import ProfileStore

    store = ProfileStore(tmp_path / "secret" / "profiles")
    for action in (lambda: store.load("nope"), lambda: store.delete("nope"), lambda: store.rename("nope", "x")):
        with pytest.raises(UserError, match="not found in the generation profiles folder") as e:
            action()
        assert str(tmp_path) not in str(e.value)


def test_lora_messages_do_not_name_the_server_folder(tmp_path):
    from app.loras import LoraLibrary

    library = LoraLibrary(tmp_path / "secret" / "loras")
    with pytest.raises(UserError, match="unknown LoRA 'nope': not in the LoRA folder") as e:
        library.get("nope")
    assert str(tmp_path) not in str(e.value)


def test_lora_file_gone_names_the_file_only(tmp_path):
    import torch

    from models.lora_runtime import LoraManager, load_lora_file

    manager = LoraManager(torch.nn.Linear(2, 2), lambda sd: None)
    gone = tmp_path / "secret" / "gone.safetensors"
    for action in (lambda: manager.sync({gone: 1.0}), lambda: load_lora_file(gone)):
        with pytest.raises(UserError, match="LoRA file not found: gone.safetensors") as e:
            action()
        assert str(tmp_path) not in str(e.value)


# ------------------------------------------------------------------ /generate's arguments (the handler's parser)

GOOD = {"model_type": "z_image_tiny", "prompt": "a fox", "one_per_line": False, "negative_prompt": None,
        "width": 64.0, "height": "64", "num_inference_steps": 2, "guidance_scale": "4.5", "flow_shift": 3,
        "cfg_normalization": 0.0, "cfg_truncation": 1.0, "seed": -1.0, "num_images": "1", "memory_profile": "default"}


def test_generate_arguments_parse_numbers_strictly():
    from app.untrusted import generate_arguments

    a = generate_arguments(GOOD, {})
    assert a == {"model_type": "z_image_tiny", "prompt": "a fox", "one_per_line": False, "negative_prompt": "",
                 "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 4.5, "flow_shift": 3.0,
                 "cfg_normalization": 0.0, "cfg_truncation": 1.0, "seed": -1, "num_images": 1, "memory_profile": None}
    assert all(type(a[k]) is int for k in ("width", "height", "num_inference_steps", "seed", "num_images"))
    assert generate_arguments({**GOOD, "memory_profile": " 3 "}, {})["memory_profile"] == 3
    for key, bad in (("seed", "abc"), ("seed", "٣"), ("width", None), ("width", "64.5"), ("num_images", True),
                     ("guidance_scale", "nan"), ("guidance_scale", 10**400), ("flow_shift", [3]),
                     ("memory_profile", "²"), ("memory_profile", "٣"), ("memory_profile", 6), ("memory_profile", 2.5),
                     ("prompt", 5), ("prompt", "a \ud800"), ("model_type", None), ("one_per_line", "yes")):
        with pytest.raises(UserError, match=r"^(Seed|Width|Number of images|Guidance|Flow shift|Memory profile|"
                                            r"Prompt|Model|One job per line) ") as e:
            generate_arguments({**GOOD, key: bad}, {"seed": "Seed", "width": "Width", "num_images": "Number of images",
                                                    "guidance_scale": "Guidance", "flow_shift": "Flow shift",
                                                    "memory_profile": "Memory profile", "prompt": "Prompt",
                                                    "model_type": "Model", "one_per_line": "One job per line"})
        assert "\n" not in str(e.value)


def test_lora_json_from_the_api_is_checked():
    for bad, message in (("[" * 100000 + "]" * 100000, "nested more than 32 levels deep"),
                         ('[{"name": "a\\ud800", "strength": 1}]', "lone surrogate"),
                         ('[{"name": "a", "strength": NaN}]', "not valid JSON")):
        with pytest.raises(UserError, match=f"^LoRAs: .*{message}"):
            parse_selection(bad)
