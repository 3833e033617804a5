"""LoRAs on the running model: images against diffusers with the delta merged into its weights,
per-step strengths, switching between jobs, exact removal, bf16 and int8 (quanto) layers, and
LoRA names that try to leave the LoRA folder."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import ZImagePipeline as DiffusersPipeline

from app.loras import LoraLibrary
from models.errors import UserError
from models.lora_runtime import LoraManager, strength_at
from models.z_image.handler import HANDLER
from models.z_image.lora import convert_state_dict
from tests.test_lora_formats import FORMATS, Maker, applied_delta, load_tiny_transformer, write_lora

CASE = dict(prompt="a red fox in the snow", negative_prompt="blurry", height=64, width=64, num_inference_steps=4,
            guidance_scale=4.0)
SHIFT, SEED = 6.0, 7


@pytest.fixture(scope="module")
def ours(tiny_dir):
    pipe, _ = HANDLER.load_model(base_model_type="z_image_tiny", dtype=torch.float32, model_dir=tiny_dir)
    manager = LoraManager(pipe.transformer, convert_state_dict)
    yield pipe, manager
    manager.remove_all()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    pipe = DiffusersPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=SHIFT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


def render_ours(pipe, manager, step_start=None) -> np.ndarray:
    out = pipe(**CASE, flow_shift=SHIFT, seed=SEED, step_start=step_start or manager.step_start)
    return np.asarray(out.images[0]).astype(np.int16)


def render_reference(pipe, deltas: dict[str, tuple[torch.Tensor, tuple[float, ...]]]) -> np.ndarray:
    """diffusers with W = W0 + s_i * dW merged before each step i ({layer: (dW, schedule)})."""
    params = {name: pipe.transformer.get_parameter(f"{name}.weight") for name in deltas}
    originals = {name: p.detach().clone() for name, p in params.items()}
    steps = CASE["num_inference_steps"]

    def merge(step: int) -> None:
        with torch.no_grad():
            for name, (dw, schedule) in deltas.items():
                params[name].copy_(originals[name] + strength_at(schedule, step, steps) * dw)

    def on_step_end(_pipe, i, _t, kwargs):
        if i + 1 < steps:
            merge(i + 1)
        return kwargs

    merge(0)
    try:
        out = pipe(**CASE, generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step_end)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(originals[name])
    return np.asarray(out.images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def base_image(ours):
    pipe, manager = ours
    manager.remove_all()
    return render_ours(pipe, manager)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_image_matches_diffusers_with_merged_delta(fmt, ours, reference, lora_dir, base_image):
    pipe, manager = ours
    manager.remove_all()  # a merged LoRA is in the weights, which a DoRA file's magnitudes are made from
    path, refs = write_lora(lora_dir, fmt, pipe.transformer, seed=11)
    manager.sync({path: 0.8})
    img = render_ours(pipe, manager)
    ref = render_reference(reference, {n: (d, (0.8,)) for n, d in refs.items()})
    assert np.abs(img - ref).max() <= 2
    assert np.abs(img - base_image).max() > 10, "the LoRA must visibly change the image for the test to mean much"


def test_per_step_schedule(ours, reference, lora_dir):
    pipe, manager = ours
    path, refs = write_lora(lora_dir, "kohya_musubi", pipe.transformer, seed=12, name="sched")
    schedule = (1.0, 0.0, 0.5)  # 4 steps: floor(i * 3 / 4) -> values 0, 0, 1, 2
    manager.sync({path: "1.0,0.0,0.5"})
    seen = []

    def hook(i: int, n: int) -> None:
        manager.step_start(i, n)
        seen.append(manager.multipliers["sched"])

    img = render_ours(pipe, manager, step_start=hook)
    assert seen == [1.0, 1.0, 0.0, 0.5]
    ref = render_reference(reference, {n: (d, schedule) for n, d in refs.items()})
    assert np.abs(img - ref).max() <= 2
    manager.sync({path: 1.0})
    constant = render_ours(pipe, manager)
    assert np.abs(img - constant).max() > 10


def test_strengths_bound_by_name_and_no_repatch(ours, lora_dir):
    pipe, manager = ours
    a, _ = write_lora(lora_dir, "kohya_musubi", pipe.transformer, seed=21, name="a")
    b, _ = write_lora(lora_dir, "loha", pipe.transformer, seed=22, name="b")
    manager.sync({a: 1.0, b: "0.5,1"})
    loads = manager.loads
    hooks = {n: list(m._forward_hooks.values()) for n, m in pipe.transformer.named_modules() if m._forward_hooks}
    first = render_ours(pipe, manager)
    t0 = time.perf_counter()
    manager.sync({b: "0.5,1", a: 1.0})  # same selection, other order
    assert time.perf_counter() - t0 < 0.05
    assert manager.loads == loads
    assert {n: list(m._forward_hooks.values()) for n, m in pipe.transformer.named_modules()
            if m._forward_hooks} == hooks
    assert np.array_equal(render_ours(pipe, manager), first)
    manager.sync({a: 0.5, b: 1.0})  # swapped strengths: only floats change, the image does too
    assert manager.loads == loads and manager.multipliers == {"a": 0.5, "b": 1.0}
    assert np.abs(render_ours(pipe, manager) - first).max() > 5
    manager.sync({a: 1.0})  # switching: b goes, a stays hooked, nothing is re-read
    assert manager.loads == loads and manager.multipliers == {"a": 1.0}


def test_removal_restores_exact_output(ours, lora_dir, base_image):
    pipe, manager = ours
    tr = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.3])
    caps = [torch.randn(7, tr.config.cap_feat_dim, generator=gen)]
    manager.remove_all()
    with torch.no_grad():
        before = tr(x, t, caps)
    paths = [write_lora(lora_dir, f, tr, seed=31)[0] for f in ("dora_kohya", "lokr", "comfyui_trained")]
    manager.sync({p: 1.0 for p in paths})
    with torch.no_grad():
        assert not torch.equal(tr(x, t, caps), before)
    manager.sync({})
    assert not any(m._forward_hooks for m in tr.modules())
    with torch.no_grad():
        assert torch.equal(tr(x, t, caps), before)
    assert np.array_equal(render_ours(pipe, manager), base_image)


def test_bf16_layers(tiny_dir, tmp_path):
    fp32 = load_tiny_transformer(tiny_dir, torch.float32)
    bf16 = load_tiny_transformer(tiny_dir, torch.bfloat16)
    path, refs = write_lora(tmp_path, "dora_kohya", fp32, seed=41)
    merged = copy.deepcopy(fp32)
    with torch.no_grad():
        for name, dw in refs.items():
            merged.get_parameter(f"{name}.weight").add_(dw)
    manager = LoraManager(bf16, convert_state_dict)
    manager.sync({path: 1.0})
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.6])
    caps = [torch.randn(5, 32, generator=gen)]
    with torch.no_grad():
        want = merged(x, t, caps)
        got = bf16(x.bfloat16(), t, caps).float()
        lora_effect = (want - fp32(x, t, caps)).abs().max()
    err = (got - want).abs().max()
    assert err <= 0.05 * want.abs().max()
    assert lora_effect > 5 * err  # the comparison is sharper than what the LoRA changes
    manager.remove_all()


def test_quanto_int8_layers(tiny_dir, tmp_path):
    from optimum.quanto import QModuleMixin, freeze, qint8, quantize

    model = load_tiny_transformer(tiny_dir)
    quantize(model, weights=qint8)
    freeze(model)
    modules = dict(model.named_modules())
    # quanto's QLinear, or mmgp's router class for it once mmgp has been imported (another test may have)
    assert isinstance(modules["layers.0.attention.to_q"], QModuleMixin)
    manager = LoraManager(model, convert_state_dict)
    for fmt in ("kohya_musubi", "dora_kohya"):
        path, refs = write_lora(tmp_path, fmt, model, seed=51)  # DoRA refs from the dequantized weights
        eye = {n: torch.eye(modules[n].in_features) for n in refs}
        with torch.no_grad():
            base = {n: modules[n](eye[n]) for n in refs}
        manager.sync({path: 1.0})
        with torch.no_grad():
            for name, ref in refs.items():
                assert ((modules[name](eye[name]) - base[name]).T - ref).abs().max() <= 1e-5, (fmt, name)
            model(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), [torch.randn(3, 32)])
        manager.sync({})
        with torch.no_grad():
            for name in refs:
                assert torch.equal(modules[name](eye[name]), base[name])


def test_applied_delta_probe_is_sound(tiny_dir):
    """applied_delta (used by the format tests) sees a hand-made hook exactly."""
    model = load_tiny_transformer(tiny_dir)
    lin = model.get_submodule("layers.0.attention.to_q")
    dw = Maker(model, 0).randn(64, 64)
    h = lin.register_forward_hook(lambda m, a, o: o + a[0] @ dw.T)
    try:
        assert (applied_delta(lin) - dw).abs().max() <= 1e-6
    finally:
        h.remove()


# ------------------------------------------------------------------ names arriving through an API

@pytest.fixture
def library(tmp_path, tiny_dir):
    model = load_tiny_transformer(tiny_dir)
    folder = tmp_path / "loras" / "z_image"
    (folder / "sub").mkdir(parents=True)
    write_lora(folder / "sub", "ai_toolkit", model, name="inside")
    outside, _ = write_lora(tmp_path, "ai_toolkit", model, name="secret")
    try:
        os.symlink(outside, folder / "escape.safetensors")
        os.symlink(tmp_path, folder / "dirlink", target_is_directory=True)
    except OSError:  # no symlinks on this system: the other checks still run
        pass
    return LoraLibrary(folder), outside


@pytest.mark.parametrize("name", ["../secret", "../../secret.safetensors", "sub/../../secret", "/etc/passwd",
                                  "/tmp/secret.safetensors", "..\\secret", "C:/x", "~/secret", "", "a\x00b",
                                  "escape", "escape.safetensors", "dirlink/secret", "nope"])
def test_api_names_stay_inside_the_folder(library, name):
    lib, _ = library
    with pytest.raises(UserError):
        lib.resolve(name)


def test_known_names_and_cli_paths(library):
    lib, outside = library
    assert lib.names() == ["sub/inside"]
    assert lib.resolve("sub/inside") == lib.lora_dir / "sub" / "inside.safetensors"
    assert lib.resolve("./sub/inside.safetensors") == lib.lora_dir / "sub" / "inside.safetensors"
    with pytest.raises(UserError, match="unknown LoRA 'nope'"):
        lib.resolve("nope")
    with pytest.raises(UserError):
        lib.resolve(str(outside))  # a path is refused from the API...
    assert lib.resolve(str(outside), allow_paths=True) == outside.resolve()  # ...and accepted from the CLI
    file = lib.lora_dir / "sub" / "inside.safetensors"
    assert lib.resolve_selection({"sub/inside": "1,0.5"}) == ({file: "1,0.5"}, {file: "sub/inside"})


def test_library_to_manager(library, tiny_dir):
    lib, _ = library
    manager = LoraManager(load_tiny_transformer(tiny_dir), convert_state_dict)
    (report,) = manager.sync(*lib.resolve_selection({"sub/inside": "1,0.5"}))
    assert report.name == "sub/inside" and manager.multipliers == {"sub/inside": 1.0}
    manager.step_start(3, 4)
    assert manager.multipliers == {"sub/inside": 0.5}


def test_materialize_makes_the_compute_copies_up_front(tiny_dir, tmp_path):
    """Under mmgp the branches sit on the CPU beside the weights; the service makes their copies for the
    compute device and dtype before a (possibly compiled) forward needs them."""
    model = load_tiny_transformer(tiny_dir, torch.bfloat16)
    path, _ = write_lora(tmp_path, "kohya_musubi", load_tiny_transformer(tiny_dir, torch.float32), seed=5)
    manager = LoraManager(model, convert_state_dict, merge=False)  # a constant strength would be merged
    manager.sync({path: 0.8})
    manager.materialize("cpu", torch.float32)
    branches = [br for hook in manager._hooks.values() for br in hook.branches]
    assert branches
    for br in branches:
        alt = br._alt[(torch.device("cpu"), torch.float32)]
        assert alt.down.dtype == torch.float32 and torch.equal(alt.down, br.down.float())
        assert br._for(torch.empty(0, dtype=torch.float32)) is alt  # found, not made again
    manager.remove_all()
