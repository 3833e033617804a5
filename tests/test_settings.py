"""Generation profiles, per-model defaults and last-used settings (app/settings.py, app/profiles_cli.py).

Pure file I/O: no model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

from app import settings as st
from app.jobs import JobSpec
from app.profiles_cli import profile_to_spec_overrides, run_profiles
from app.settings import ProfileStore, apply_to_model, job_seed, normalize_settings
from models.errors import UserError
from models.registry import load_definitions

FULL = {
    "model_type": "z_image_base", "prompt": "a red fox in snow", "negative_prompt": "blurry",
    "width": 768, "height": 1344, "num_inference_steps": 28, "guidance_scale": 3.5, "flow_shift": 5.0,
    "cfg_normalization": 1.5, "cfg_truncation": 0.9, "seed_policy": "increment", "seed": 1234,
    "loras": [{"name": "ink", "strength": 0.7}, {"name": "film", "strength": 1.2}], "num_images": 3,
    "output_format": "webp", "output_quality": 85, "strength": 0.45, "paste_back": False, "mask_blur": 8,
    "upscale": 1.5, "upscale_strength": 0.3, "upscale_steps": 12, "sampler": "heun", "nag_scale": 4.0,
    "nag_tau": 2.5, "nag_alpha": 0.25, "variety": 0.75, "variety_until": 0.5, "control_type": "canny",
    "control_strength": 0.6,
}


@pytest.fixture
def store(tmp_path):
    return ProfileStore(tmp_path / "profiles")


@pytest.fixture(scope="module")
def defs():
    return load_definitions()[0]


def leftovers(folder):
    """Temporary files of the atomic writes (models/files.py) left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".part", ".tmp"))]


# ------------------------------------------------------------------ round trip and schema

def test_round_trip_every_field(store):
    assert store.save("fox", FULL) == []
    loaded, warnings = store.load("fox")
    assert loaded == FULL and warnings == []
    assert set(FULL) == set(st.default_settings())  # the test covers every field
    doc = json.loads(store.path("fox").read_text())
    assert doc["schema_version"] == st.SCHEMA_VERSION == 2
    assert [e.name for e in store.list()] == ["fox"] and not store.list()[0].broken


def test_prompt_is_optional_and_missing_keys_take_defaults(store):
    store.save("bare", {"model_type": "z_image", "prompt": "  "})
    loaded, _ = store.load("bare")
    assert loaded["prompt"] is None and loaded["negative_prompt"] is None
    assert loaded["num_inference_steps"] == JobSpec(model_type="x", prompt="x").num_inference_steps
    assert loaded["seed_policy"] == "random"


def test_schema_1_migrates(store):
    old = {"model": "z_image", "prompt": "a cat", "negative_prompt": "", "resolution": "1280x720",
           "steps": 8, "guidance": 0, "flow_shift": 3, "seed": 77, "images": 2,
           "loras": ["ink:0.5", "film"], "format": "jpg", "quality": 80}
    store.folder.mkdir(parents=True)
    store.path("old").write_text(json.dumps(old))  # schema 1 files carry no schema_version
    loaded, warnings = store.load("old")
    assert loaded == {
        "model_type": "z_image", "prompt": "a cat", "negative_prompt": "", "width": 1280, "height": 720,
        "num_inference_steps": 8, "guidance_scale": 0.0, "flow_shift": 3.0, "cfg_normalization": 0.0,
        "cfg_truncation": 1.0, "seed_policy": "fixed", "seed": 77,
        "loras": [{"name": "ink", "strength": 0.5}, {"name": "film", "strength": 1.0}], "num_images": 2,
        "output_format": "jpeg", "output_quality": 80, "strength": None, "paste_back": True, "mask_blur": 4,
        "upscale": 1.0, "upscale_strength": 0.35, "upscale_steps": None, "sampler": "euler", "nag_scale": 1.0,
        "nag_tau": 3.5, "nag_alpha": 0.5, "variety": 0.0, "variety_until": 0.3, "control_type": "raw",
        "control_strength": 0.75}
    assert any("migrated from schema 1" in w for w in warnings)
    # explicit version 1, random seed
    store.path("old").write_text(json.dumps({"schema_version": 1, "resolution": "512x512", "seed": -1}))
    loaded, _ = store.load("old")
    assert (loaded["width"], loaded["seed_policy"]) == (512, "random")
    # loading does not rewrite; saving again writes schema 2
    assert json.loads(store.path("old").read_text())["schema_version"] == 1
    store.save("old", loaded, overwrite=True)
    assert json.loads(store.path("old").read_text())["schema_version"] == 2


@pytest.mark.parametrize("doc, field", [
    ({"resolution": "big"}, "resolution"),
    ({"schema_version": 3}, "schema 3"),
    ({"schema_version": "two"}, "schema_version"),
])
def test_bad_versions_and_migration_input(store, doc, field):
    store.folder.mkdir(parents=True)
    store.path("x").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=field):
        store.load("x")


# ------------------------------------------------------------------ validation

def test_unknown_keys_ignored_with_notice(store):
    warnings = store.save("u", {**FULL, "scheduler": "karras", "hires": True})
    assert warnings and "scheduler" in warnings[0] and "hires" in warnings[0]
    assert "scheduler" not in json.loads(store.path("u").read_text())


@pytest.mark.parametrize("field, value", [
    ("width", 8), ("width", 4112), ("width", 1000), ("height", 0), ("height", 1025),
    ("num_inference_steps", 0), ("num_inference_steps", 101), ("num_inference_steps", 2.5),
    ("guidance_scale", -0.1), ("guidance_scale", 20.5), ("guidance_scale", "high"),
    ("flow_shift", 0.5), ("flow_shift", 11), ("num_images", 0), ("num_images", 17),
    ("cfg_truncation", -1), ("seed", 2**32), ("seed", True), ("seed_policy", "sometimes"),
    ("output_format", "gif"), ("output_quality", 0), ("output_quality", 101), ("model_type", ""),
    ("prompt", 5), ("loras", "ink"), ("loras", [{"strength": 1}]), ("loras", [{"name": "a", "strength": "x"}]),
])
def test_out_of_range_refused_naming_the_field(store, field, value):
    with pytest.raises(UserError, match=field):
        store.save("bad", {**FULL, field: value})
    assert not store.folder.exists() or not store.path("bad").exists()


def test_fixed_seed_policy_needs_a_seed():
    with pytest.raises(UserError, match="seed"):
        normalize_settings({**FULL, "seed_policy": "fixed", "seed": -1})
    assert normalize_settings({**FULL, "seed_policy": "random", "seed": -1})[0]["seed"] == -1


def test_edge_values_accepted():
    s, _ = normalize_settings({**FULL, "width": 16, "height": 4096, "num_inference_steps": 100,
                               "guidance_scale": 20, "flow_shift": 1, "num_images": 16, "width_": 1})
    assert (s["width"], s["guidance_scale"], s["flow_shift"]) == (16, 20.0, 1.0)
    assert isinstance(s["guidance_scale"], float)


def test_missing_loras_dropped_with_warning(store):
    store.save("l", FULL)
    loaded, warnings = store.load("l", available_loras=["film", "other"])
    assert loaded["loras"] == [{"name": "film", "strength": 1.2}]
    assert any("'ink'" in w and "dropped" in w for w in warnings)
    assert store.load("l")[0]["loras"] == FULL["loras"]  # no list given: nothing checked


# ------------------------------------------------------------------ names

@pytest.mark.parametrize("name", [
    "", "   ", "..", ".", "../evil", "a/b", "a\\b", "/etc/passwd", "C:\\x", ".hidden", " lead", "trail ",
    "dot.", "nul\0byte", "x" * 101, "CON", "a:b", "new\nline", "*",
])
def test_names_cannot_escape_or_hide(store, tmp_path, name):
    with pytest.raises(UserError):
        store.save(name, FULL)
    with pytest.raises(UserError):
        store.load(name)
    with pytest.raises(UserError):
        store.delete(name)
    assert not any(p for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["Portraits", "v1.2 draft", "turbo_fast-8", "Élan (wide)", "a..b"])
def test_ordinary_names(store, name):
    store.save(name, FULL)
    assert store.load(name)[0] == FULL
    assert store.path(name).parent == store.folder


def test_json_suffix_is_the_same_name(store):
    store.save("fox.json", FULL)
    assert store.path("fox") == store.folder / "fox.json"
    assert store.load("fox")[0] == FULL


# ------------------------------------------------------------------ save, rename, delete, export, import

def test_overwrite_rename_delete(store):
    store.save("a", FULL)
    with pytest.raises(UserError, match="already exists"):
        store.save("a", {**FULL, "num_images": 1})
    store.save("a", {**FULL, "num_images": 1}, overwrite=True)
    assert store.load("a")[0]["num_images"] == 1
    store.save("b", FULL)
    with pytest.raises(UserError, match="already exists"):
        store.rename("a", "b")
    store.rename("a", "c")
    assert [e.name for e in store.list()] == ["b", "c"]
    store.rename("c", "b", overwrite=True)
    assert store.load("b")[0]["num_images"] == 1 and [e.name for e in store.list()] == ["b"]
    with pytest.raises(UserError, match="not found"):
        store.rename("zzz", "y")
    store.delete("b")
    assert store.list() == []
    with pytest.raises(UserError, match="not found"):
        store.delete("b")
    with pytest.raises(UserError, match="not found"):
        store.load("b")


def test_export_import(store, tmp_path):
    store.save("fox", FULL)
    out = store.export_to("fox", tmp_path / "shared" / "fox-profile.json")
    with pytest.raises(UserError, match="exists"):
        store.export_to("fox", out)
    other = ProfileStore(tmp_path / "other")
    name, warnings = other.import_from(out)
    assert name == "fox-profile" and warnings == [] and other.load(name)[0] == FULL
    with pytest.raises(UserError, match="already exists"):
        other.import_from(out)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": "z_image", "resolution": "512x512", "loras": ["gone"], "seed": 3}))
    name, warnings = other.import_from(old, name="imported", available_loras=[])
    assert name == "imported" and other.load(name)[0]["loras"] == []
    assert any("migrated" in w for w in warnings) and any("'gone'" in w for w in warnings)
    with pytest.raises(UserError, match="name"):
        other.import_from(old, name="../x")


# ------------------------------------------------------------------ safety

def test_crash_mid_write_keeps_old_profile(store, monkeypatch):
    store.save("p", FULL)
    before = store.path("p").read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "replace", boom)
    with pytest.raises(UserError, match="No space left"):
        store.save("p", {**FULL, "num_images": 9}, overwrite=True)
    monkeypatch.undo()
    assert store.path("p").read_bytes() == before and leftovers(store.folder) == []

    monkeypatch.setattr(st.os, "fsync", boom)
    with pytest.raises(UserError):
        store.save("p", {**FULL, "num_images": 9}, overwrite=True)
    monkeypatch.undo()
    assert store.path("p").read_bytes() == before and leftovers(store.folder) == []


def test_interrupt_mid_write_cleans_up(store, monkeypatch):
    store.save("p", FULL)
    before = store.path("p").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save("p", {**FULL, "num_images": 9}, overwrite=True)
    monkeypatch.undo()
    assert store.path("p").read_bytes() == before and leftovers(store.folder) == []


def test_concurrent_saves_never_interleave(tmp_path):
    folder = tmp_path / "profiles"
    variants = [{**FULL, "prompt": "A" * 5000, "num_images": 1}, {**FULL, "prompt": "B" * 7000, "num_images": 2}]
    errors: list[BaseException] = []
    seen: list[dict] = []

    def writer(settings):
        try:
            store = ProfileStore(folder)  # separate instances share the folder lock
            for _ in range(40):
                store.save("race", settings, overwrite=True)
        except BaseException as e:  # reported below
            errors.append(e)

    def reader():
        store = ProfileStore(folder)
        for _ in range(80):
            if store.path("race").exists():
                seen.append(store.load("race")[0])  # never a half-written file

    ProfileStore(folder).save("race", variants[0])
    threads = [threading.Thread(target=writer, args=(v,)) for v in variants] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = json.loads((folder / "race.json").read_text())
    assert {k: v for k, v in final.items() if k != "schema_version"} in variants
    assert all(s in variants for s in seen) and leftovers(folder) == []


def test_corrupt_files_listed_as_broken(store):
    store.save("good", FULL)
    (store.folder / "torn.json").write_text('{"model_type": "z_image", "width": 10')
    (store.folder / "range.json").write_text(json.dumps({**FULL, "num_inference_steps": 500}))
    (store.folder / "list.json").write_text("[1, 2]")
    (store.folder / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    entries = {e.name: e for e in store.list()}
    assert not entries["good"].broken and entries["good"].settings == FULL
    for name in ("torn", "range", "list", "binary"):
        assert entries[name].broken and entries[name].error, name
    assert "num_inference_steps" in entries["range"].error
    with pytest.raises(UserError, match="not valid JSON"):
        store.load("torn")
    torn = (store.folder / "torn.json").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(UserError, match="exists but is broken"):
            store.save("torn", FULL, overwrite=overwrite)
    assert (store.folder / "torn.json").read_bytes() == torn
    store.save("torn", FULL, overwrite_broken=True)
    assert store.load("torn")[0] == FULL


# ------------------------------------------------------------------ defaults and last used

def test_model_defaults(store, defs):
    assert store.get_model_defaults("z_image") == (None, [])
    base, _ = st.model_settings("turbo", defs)
    assert (base["num_inference_steps"], base["guidance_scale"], base["model_type"]) == (8, 0.0, "z_image")
    store.set_model_defaults("z_image", {**FULL, "num_inference_steps": 6, "guidance_scale": 0})
    saved, warnings = store.get_model_defaults("z_image")
    assert saved["model_type"] == "z_image" and saved["num_inference_steps"] == 6 and warnings == []
    mine, _ = st.model_settings("z_image", defs, ProfileStore(store.folder))  # survives a restart
    assert mine["num_inference_steps"] == 6
    assert st.model_settings("z_image_base", defs, store)[0]["num_inference_steps"] == 30  # per model
    assert store.list() == []  # not shown as generation profiles
    with pytest.raises(UserError, match="model type"):
        store.set_model_defaults("../x", FULL)
    # a corrupt defaults file falls back with a warning
    (store.state_dir / "defaults" / "z_image.json").write_text("{oops")
    saved, warnings = store.get_model_defaults("z_image")
    assert saved is None and "ignored" in warnings[0]
    assert st.model_settings("z_image", defs, store)[0]["num_inference_steps"] == 8
    assert store.clear_model_defaults("z_image") and not store.clear_model_defaults("z_image")


def test_last_used_restored_at_start(store, defs):
    settings, _ = st.startup_settings(store, defs)
    assert settings["model_type"] == "z_image_base" and settings["num_inference_steps"] == 30
    assert store.save_last_used({**FULL, "model_type": "z_image"}) == []
    restarted = ProfileStore(store.folder)
    assert restarted.load_last_used()[0] == {**FULL, "model_type": "z_image"}
    settings, warnings = st.startup_settings(restarted, defs, available_loras=["film"])
    assert settings["model_type"] == "z_image" and len(settings["loras"]) == 1 and warnings
    # never raises: bad settings and corrupt files become warnings
    assert "could not remember" in store.save_last_used({**FULL, "width": 3})[0]
    (store.state_dir / "last_used.json").write_text("not json")
    assert store.load_last_used()[0] is None
    settings, warnings = st.startup_settings(store, defs)
    assert settings["model_type"] == "z_image_base" and warnings
    store.save_last_used({**FULL, "model_type": "uninstalled_ft"})
    settings, warnings = st.startup_settings(store, defs)
    assert settings["model_type"] == "z_image_base" and "not installed" in warnings[0]


# ------------------------------------------------------------------ moving between models

def test_base_profile_on_turbo_keeps_values_and_warns(defs):
    base, _ = normalize_settings({**FULL, "num_inference_steps": 30, "guidance_scale": 4.0, "flow_shift": 6.0})
    out, warnings = apply_to_model(base, "turbo", defs)
    assert out["model_type"] == "z_image"
    assert {k: out[k] for k in ("num_inference_steps", "guidance_scale", "flow_shift", "negative_prompt")} == {
        "num_inference_steps": 30, "guidance_scale": 4.0, "flow_shift": 6.0, "negative_prompt": "blurry"}
    text = " | ".join(warnings)
    assert "guidance 4 is above 0" in text and "30 steps is many" in text and "flow shift 6" in text
    # Turbo's recommended values raise nothing
    ok, warnings = apply_to_model({**base, "num_inference_steps": 8, "guidance_scale": 0, "flow_shift": 3},
                                  "z_image", defs)
    assert warnings == [] and ok["model_type"] == "z_image"
    # and back: Turbo settings on Base
    back, warnings = apply_to_model(ok, "base", defs)
    assert back["guidance_scale"] == 0 and any("guidance 0" in w for w in warnings)
    assert any("8 steps is few" in w for w in warnings)
    assert apply_to_model(base, "z_image_base", defs) == ({**base}, [])


def test_non_equivalent_model_takes_its_recommendations(defs):
    base, _ = normalize_settings(FULL)
    out, warnings = apply_to_model(base, "tiny", defs)
    assert (out["width"], out["num_inference_steps"], out["model_type"]) == (256, 8, "z_image_tiny")
    assert out["prompt"] == FULL["prompt"] and out["loras"] == FULL["loras"] and warnings
    with pytest.raises(UserError, match="unknown model type"):
        apply_to_model(base, "nope", defs)


def test_job_seed_policies():
    assert job_seed({"seed_policy": "random", "seed": 5}, 3) == -1
    assert job_seed({"seed_policy": "fixed", "seed": 5}, 3) == 5
    assert job_seed({"seed_policy": "increment", "seed": 5, "num_images": 2}, 3) == 11


# ------------------------------------------------------------------ CLI

def cli(tmp_path, *argv):
    from wgp_zimage import build_parser

    args = build_parser().parse_args(["profiles", "--profiles-dir", str(tmp_path / "profiles"), *argv])
    return run_profiles(args)


def test_cli_save_list_show_delete(tmp_path, capsys):
    assert cli(tmp_path, "list") == 0
    assert "no generation profiles" in capsys.readouterr().out
    assert cli(tmp_path, "save", "fast", "--model", "turbo", "--prompt", "a fox", "--seed", "42",
               "--lora", "ink:0.5", "--lora", "film", "--format", "jpg", "--quality", "80") == 0
    assert "saved generation profile 'fast'" in capsys.readouterr().out
    assert cli(tmp_path, "show", "fast") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "model_type": "z_image", "prompt": "a fox", "negative_prompt": None, "width": 1024, "height": 1024,
        "num_inference_steps": 8, "guidance_scale": 0.0, "flow_shift": 3.0, "cfg_normalization": 0.0,
        "cfg_truncation": 1.0, "seed_policy": "fixed", "seed": 42,
        "loras": [{"name": "ink", "strength": 0.5}, {"name": "film", "strength": 1.0}], "num_images": 1,
        "output_format": "jpeg", "output_quality": 80, "strength": None, "paste_back": True, "mask_blur": 4,
        "upscale": 1.0, "upscale_strength": 0.35, "upscale_steps": None, "sampler": "euler", "nag_scale": 1.0,
        "nag_tau": 3.5, "nag_alpha": 0.5, "variety": 0.0, "variety_until": 0.3, "control_type": "raw",
        "control_strength": 0.75}
    (tmp_path / "profiles" / "torn.json").write_text("{")
    assert cli(tmp_path, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fast  z_image  1024x1024  8 steps") and out[1].startswith("torn  BROKEN")
    with pytest.raises(UserError, match="already exists"):
        cli(tmp_path, "save", "fast")
    with pytest.raises(UserError, match=r"Steps \(--steps\) must be between 1 and 100"):
        cli(tmp_path, "save", "slow", "--steps", "500")
    with pytest.raises(UserError, match="broken .*; use --overwrite-broken to replace it"):
        cli(tmp_path, "save", "torn", "--overwrite")
    assert cli(tmp_path, "save", "torn", "--overwrite-broken", "--seed-policy", "increment", "--seed", "7") == 0
    assert cli(tmp_path, "rename", "torn", "steady") == 0
    assert cli(tmp_path, "export", "steady", str(tmp_path / "x.json")) == 0
    assert cli(tmp_path, "delete", "steady") == 0
    assert cli(tmp_path, "import", str(tmp_path / "x.json"), "--name", "back") == 0
    capsys.readouterr()
    assert cli(tmp_path, "list") == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["back", "fast"]
    with pytest.raises(UserError, match="not found"):
        cli(tmp_path, "delete", "steady")
    with pytest.raises(UserError, match="separators"):
        cli(tmp_path, "show", "../../etc/passwd")


def test_cli_options_after_the_action(tmp_path, capsys):
    from wgp_zimage import build_parser

    parser = build_parser()
    args = parser.parse_args(["profiles", "list", "--profiles-dir", str(tmp_path / "p2"), "-v"])
    assert args.profiles_dir == tmp_path / "p2" and args.verbose
    args = parser.parse_args(["profiles", "list"])
    assert str(args.profiles_dir) == "profiles"


def test_profile_to_spec_overrides(tmp_path, defs, caplog):
    folder = tmp_path / "profiles"
    ProfileStore(folder).save("base", {**FULL, "model_type": "z_image_base", "prompt": None,
                                       "seed_policy": "random", "guidance_scale": 4.0})
    out = profile_to_spec_overrides("base", folder)
    assert "prompt" not in out and out["negative_prompt"] == "blurry" and out["seed"] == -1
    spec = JobSpec.from_dict({**out, "prompt": "explicit flag wins", "num_images": 1})
    assert (spec.width, spec.num_inference_steps, spec.prompt, spec.num_images) == (768, 28, "explicit flag wins", 1)
    assert spec.loras == FULL["loras"] and out["output_format"] == "webp"
    with caplog.at_level(logging.WARNING, logger="wgp_zimage"):
        out = profile_to_spec_overrides("base", folder, model_type="turbo", definitions=defs)
    assert out["model_type"] == "z_image" and out["guidance_scale"] == 4.0
    assert "above 0" in caplog.text
    with pytest.raises(UserError, match="not found"):
        profile_to_spec_overrides("nope", folder)


def test_store_tolerates_missing_folder(tmp_path):
    store = ProfileStore(tmp_path / "absent")
    assert store.list() == [] and store.load_last_used() == (None, [])
    assert not os.path.exists(tmp_path / "absent")
