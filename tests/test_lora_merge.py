"""LoRAs with one constant strength merged into plain float weights (models.lora_runtime).

References are independent of the merge code: the dense deltas the test files were built from
(tests/test_lora_formats.py), merged here by plain arithmetic, and the side-branch images
(`LoraManager(merge=False)`, today's behaviour). Checked: every format merges to its dense delta,
several LoRAs on one layer are summed in float32 and rounded once, the merged image matches the
side-branch image, removal and strength changes restore the base weights bit for bit, schedules and
int8 layers keep side branches, and under mmgp the merge goes into the CPU copy mmgp streams from
(with device copies simulated by real copies).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app import offload as ofl
from models.lora_runtime import LoraManager
from models.mmgp_support import import_mmgp
from models.z_image.lora import convert_state_dict
from tests.test_lora_formats import FORMATS, load_tiny_transformer, write_lora
from tests.test_offload import cpu_cuda_standins, load, quick_gc, render  # noqa: F401 - fixture

STRENGTH = 0.7


@pytest.fixture(scope="module")
def fp32_model(tiny_dir):
    return load_tiny_transformer(tiny_dir, torch.float32)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("merge_loras")


@pytest.fixture(scope="module")
def plain_lora(tiny_dir, lora_dir):
    """A kohya LoRA on every kind of layer, built from the base weights: (path, {layer: dW})."""
    return write_lora(lora_dir, "kohya_musubi", load_tiny_transformer(tiny_dir), seed=3, name="plain")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    changed = [k for k, v in saved.items() if not torch.equal(now[k], v)]
    assert not changed, changed


def assert_rounded_once(got: torch.Tensor, want32: torch.Tensor) -> None:
    """got == want32 rounded to got's dtype, give or take one unit in the last place where the float32
    reference (summed in another order) sits at a rounding boundary."""
    want = want32.to(got.dtype)
    exact = torch.eq(got, want).float().mean().item()
    ulp = torch.finfo(got.dtype).eps * want32.abs().clamp_min(torch.finfo(got.dtype).tiny)
    assert ((got.float() - want32).abs() <= ulp).all(), (got.float() - want32).abs().max()
    assert exact >= 0.995, exact


def hooked(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if m._forward_hooks}


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_merges_to_its_dense_delta(fmt, fp32_model, tmp_path):
    base = snapshot(fp32_model)
    path, refs = write_lora(tmp_path, fmt, fp32_model)
    manager = LoraManager(fp32_model, convert_state_dict)
    (report,) = manager.sync({path: STRENGTH})
    try:
        assert report.merged == report.modules == len(refs)
        assert set(manager.merged_layers) == set(refs) and hooked(fp32_model) == set()  # no cost per step
        for name, ref in refs.items():
            got = fp32_model.get_parameter(f"{name}.weight") - base[f"{name}.weight"]
            assert (got - STRENGTH * ref).abs().max() <= 1e-5, name
    finally:
        manager.remove_all()
    assert_bitwise(fp32_model, base)


def test_bf16_several_loras_on_one_layer_are_rounded_once(tiny_dir, lora_dir):
    """W' = round_bf16(W + s1 dW1 + s2 dW2 + s3 dW3) in float32, DoRA's taken against the base weight."""
    fp32 = load_tiny_transformer(tiny_dir, torch.float32)
    model = load_tiny_transformer(tiny_dir, torch.bfloat16)
    base = snapshot(model)
    # DoRA magnitudes normalize the bf16 model's own weights: build that file from them
    made = [write_lora(lora_dir, "loha", fp32, seed=61, name="a"),
            write_lora(lora_dir, "dora_peft", model, seed=62, name="b"),
            write_lora(lora_dir, "full_diff", fp32, seed=63, name="c")]
    strengths = (0.9, -0.4, 1.3)
    manager = LoraManager(model, convert_state_dict)
    manager.sync({path: s for (path, _), s in zip(made, strengths)})
    assert hooked(model) == set()
    for name in made[0][1]:
        want = base[f"{name}.weight"].float()
        for (_, refs), s in zip(made, strengths):
            want = want + s * refs[name]
        assert_rounded_once(model.get_parameter(f"{name}.weight").detach(), want)
    manager.remove_all()
    assert_bitwise(model, base)


def test_bias_deltas_merge_where_the_layer_has_a_bias(fp32_model, tmp_path):
    from safetensors.torch import save_file

    base = snapshot(fp32_model)
    db = torch.linspace(-0.5, 0.5, 64)
    save_file({"diffusion_model.all_final_layer.2-1.linear.diff_b": db,
               "diffusion_model.layers.0.attention.qkv.diff_b": torch.arange(192.0)}, tmp_path / "b.safetensors")
    manager = LoraManager(fp32_model, convert_state_dict)
    (report,) = manager.sync({tmp_path / "b.safetensors": 0.5})
    lin = fp32_model.get_submodule("all_final_layer.2-1.linear")
    assert torch.allclose(lin.bias - base["all_final_layer.2-1.linear.bias"], 0.5 * db)
    assert torch.equal(lin.weight, base["all_final_layer.2-1.linear.weight"])  # no weight delta: unchanged
    assert set(manager._merged["all_final_layer.2-1.linear"].originals) == {"bias"}  # nor kept twice
    # q/k/v have no bias of their own: their bias delta stays a side branch
    assert manager.merged_layers == ["all_final_layer.2-1.linear"] and report.merged == 1
    assert hooked(fp32_model) == {f"layers.0.attention.to_{p}" for p in "qkv"}
    with torch.no_grad():
        k = fp32_model.get_submodule("layers.0.attention.to_k")
        assert torch.allclose(k(torch.zeros(1, 64)), 0.5 * torch.arange(64.0, 128.0))
    manager.remove_all()
    assert_bitwise(fp32_model, base)
    assert not hooked(fp32_model)


def test_strength_changes_restore_then_remerge(fp32_model, plain_lora):
    path, refs = plain_lora
    base = snapshot(fp32_model)
    manager = LoraManager(fp32_model, convert_state_dict)
    manager.sync({path: 1.0})
    at_one = snapshot(fp32_model)
    for s in (0.5, -1.25, 1.0):
        manager.sync({path: s})
        for name, ref in refs.items():
            got = fp32_model.get_parameter(f"{name}.weight") - base[f"{name}.weight"]
            assert (got - s * ref).abs().max() <= 1e-5, (s, name)
    assert_bitwise(fp32_model, at_one)  # back at 1.0: the same bits as the first merge
    assert manager.loads == 1
    manager.sync({path: 0.0})  # a zero strength: nothing merged, nothing hooked
    assert_bitwise(fp32_model, base)
    assert manager.merged_layers == [] and not hooked(fp32_model) and manager.multipliers == {"plain": 0.0}
    manager.sync({path: 1.0})
    assert_bitwise(fp32_model, at_one)
    manager.remove_all()
    assert_bitwise(fp32_model, base)


def test_unchanged_selection_touches_nothing(fp32_model, plain_lora, monkeypatch):
    path, _ = plain_lora
    manager = LoraManager(fp32_model, convert_state_dict)
    manager.sync({path: 0.8})
    calls = []
    monkeypatch.setattr(manager, "_merge", lambda *a: calls.append(a))
    monkeypatch.setattr(manager, "_restore", lambda *a: calls.append(a))
    manager.sync({path: 0.8})
    manager.sync({path: "0.8,0.8"})  # a schedule of one value is a constant strength
    assert calls == []
    monkeypatch.undo()
    manager.remove_all()


def test_schedules_keep_the_side_branch(fp32_model, plain_lora):
    path, refs = plain_lora
    base = snapshot(fp32_model)
    manager = LoraManager(fp32_model, convert_state_dict)
    (report,) = manager.sync({path: "1.0,0.3"})
    assert report.merged == 0 and manager.merged_layers == [] and hooked(fp32_model) == set(refs)
    assert_bitwise(fp32_model, base)
    manager.sync({path: 0.6})  # constant now: merged, the hooks go
    assert hooked(fp32_model) == set() and set(manager.merged_layers) == set(refs)
    manager.sync({path: "0.2,1"})  # a schedule again: the base weights back, bit for bit, under the hooks
    assert_bitwise(fp32_model, base)
    assert hooked(fp32_model) == set(refs)
    manager.remove_all()
    assert_bitwise(fp32_model, base)
    assert not hooked(fp32_model)


def test_dora_side_branch_keeps_its_layer_unmerged(fp32_model, lora_dir, plain_lora):
    """A DoRA branch computes from the base layer's output: a constant LoRA on that layer stays a branch."""
    dora, _ = write_lora(lora_dir, "dora_kohya", fp32_model, seed=71, name="dora")
    path, refs = plain_lora
    base = snapshot(fp32_model)
    manager = LoraManager(fp32_model, convert_state_dict)
    manager.sync({path: 0.8, dora: "1,0.5"})
    assert manager.merged_layers == [] and hooked(fp32_model) == set(refs)
    assert_bitwise(fp32_model, base)
    manager.sync({path: 0.8, dora: 0.5})  # both constant: both merged
    assert set(manager.merged_layers) == set(refs) and not hooked(fp32_model)
    manager.remove_all()
    assert_bitwise(fp32_model, base)


def test_int8_layers_keep_the_side_branch(tiny_dir, plain_lora):
    """quanto int8 layers take side branches; the layers quantize_on_the_fly keeps in bf16 take the merge."""
    from optimum.quanto import QModuleMixin

    from models.z_image.quantize import quantize_on_the_fly

    model = quantize_on_the_fly(load_tiny_transformer(tiny_dir, torch.bfloat16))
    path, refs = plain_lora
    modules = dict(model.named_modules())
    int8 = {n for n in refs if isinstance(modules[n], QModuleMixin)}
    assert int8 and int8 != set(refs)  # both kinds are on the test
    base = {n: (modules[n].weight._data.clone(), modules[n].weight._scale.clone()) for n in int8}
    manager = LoraManager(model, convert_state_dict)
    (report,) = manager.sync({path: 1.0})
    assert hooked(model) == int8 and set(manager.merged_layers) == set(refs) - int8
    assert report.merged == len(refs) - len(int8)
    for n in int8:
        assert torch.equal(modules[n].weight._data, base[n][0]) and torch.equal(modules[n].weight._scale, base[n][1])
    manager.remove_all()
    assert not hooked(model) and manager.merged_layers == []


# ------------------------------------------------------------------ images


def merged_and_side_images(tiny_dir, lora_dir, dtype) -> dict[str, np.ndarray]:
    """Base, side-branch and merged images of two LoRAs on the same layers (one of them DoRA) at constant
    strengths; checks on the way that removal gives the base weights and image back bit for bit."""
    pipe, _ = load(tiny_dir, dtype)
    tr = pipe.transformer
    fp32 = load_tiny_transformer(tiny_dir, torch.float32)
    selection = {write_lora(lora_dir, "comfyui_trained", fp32, seed=81, name="img_a")[0]: 0.8,
                 write_lora(lora_dir, "dora_peft", fp32, seed=82, name="img_b")[0]: 0.6}
    weights = snapshot(tr)
    out = {"base": render(pipe, under_cuda_default=False)}
    side = LoraManager(tr, convert_state_dict, merge=False)
    side.sync(selection)
    out["side"] = render(pipe, under_cuda_default=False, step_start=side.step_start)
    side.remove_all()
    assert_bitwise(tr, weights)
    merged = LoraManager(tr, convert_state_dict)
    reports = merged.sync(selection)
    assert all(r.merged == r.modules > 0 for r in reports) and not hooked(tr)
    out["merged"] = render(pipe, under_cuda_default=False, step_start=merged.step_start)
    merged.remove_all()
    assert_bitwise(tr, weights)
    assert np.array_equal(render(pipe, under_cuda_default=False), out["base"])
    return {k: v.astype(np.int16) for k, v in out.items()}


def test_merged_image_matches_side_branches(tiny_dir, lora_dir):
    """float32: the merged image is the side-branch image within 1/255. bf16: both carry bf16's own error
    (4/255 between the bf16 and float32 base images of the tiny model), so each is held against the
    float32 image: the merge is no less accurate than the side branches."""
    fp32 = merged_and_side_images(tiny_dir, lora_dir, torch.float32)
    assert np.abs(fp32["merged"] - fp32["side"]).max() <= 1
    assert np.abs(fp32["merged"] - fp32["base"]).max() > 10  # the LoRAs change the image a lot
    bf16 = merged_and_side_images(tiny_dir, lora_dir, torch.bfloat16)
    floor = np.abs(bf16["base"] - fp32["base"]).max()
    err = {k: np.abs(bf16[k] - fp32[k]) for k in ("side", "merged")}
    assert err["merged"].max() <= max(err["side"].max(), floor) + 1, (err["merged"].max(), err["side"].max(), floor)
    assert err["merged"].mean() <= 1.1 * err["side"].mean() + 0.05, (err["merged"].mean(), err["side"].mean())


def test_a_schedule_renders_as_today(tiny_dir, plain_lora):
    """A schedule takes exactly the side-branch path: the same image, bit for bit, as merge=False."""
    pipe, _ = load(tiny_dir)
    path, _ = plain_lora
    images = []
    for merge in (False, True):
        manager = LoraManager(pipe.transformer, convert_state_dict, merge=merge)
        manager.sync({path: "1.0,0.2,0.6"})
        images.append(render(pipe, under_cuda_default=False, step_start=manager.step_start))
        manager.remove_all()
    assert np.array_equal(*images)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_merge_under_compile(tiny_dir, plain_lora, fresh_dynamo):
    """Blocks compiled before the merge compute with the merged weights, and with the base ones after removal."""
    from models.z_image.transformer import compile_blocks

    path, _ = plain_lora
    plain, _ = load(tiny_dir)
    manager = LoraManager(plain.transformer, convert_state_dict)
    manager.sync({path: 0.9})
    want = render(plain, under_cuda_default=False)
    manager.remove_all()
    base = render(plain, under_cuda_default=False)
    pipe, _ = load(tiny_dir)
    compile_blocks(pipe.transformer, backend="aot_eager")
    assert np.array_equal(render(pipe, under_cuda_default=False), base)  # compiled without the LoRA
    manager = LoraManager(pipe.transformer, convert_state_dict)
    manager.sync({path: 0.9})
    assert np.array_equal(render(pipe, under_cuda_default=False), want)
    manager.remove_all()
    assert np.array_equal(render(pipe, under_cuda_default=False), base)


# ------------------------------------------------------------------ under mmgp


def copying_load_blocks(self, model_id, blocks_name, preload=False):
    """mmgp's gpu_load_blocks with `.to("cuda")` replaced by a copy: a loaded block's parameters are
    new tensors, as device copies are, so a merge that missed mmgp's CPU copy would not show."""
    mmgp = import_mmgp()
    entry = model_id if blocks_name is None else f"{model_id}/{blocks_name}"
    loaded = self.loaded_blocks[model_id]
    if not preload and loaded is not None:
        self.gpu_unload_blocks(model_id, loaded)
    for parent, name, p, is_buffer, tied in self.blocks_of_modules[entry]:
        q = p.detach().clone()
        q = mmgp._make_buffer(q) if is_buffer else mmgp._make_parameter(q, requires_grad=False)
        setattr(parent, name, q)
        if tied is not None:
            setattr(tied[0], tied[1], q)
    if not preload:
        self.loaded_blocks[model_id] = blocks_name


@pytest.fixture
def copying_cuda():
    with cpu_cuda_standins():
        offload = import_mmgp()
        offload.offload.gpu_load_blocks = copying_load_blocks  # put back by cpu_cuda_standins
        yield


@pytest.fixture(scope="module")
def offload_reference(tiny_dir, plain_lora):
    """The unprofiled base and merged images."""
    path, _ = plain_lora
    pipe, _ = load(tiny_dir)
    base = render(pipe, under_cuda_default=False)
    manager = LoraManager(pipe.transformer, convert_state_dict)
    manager.sync({path: STRENGTH})
    merged = render(pipe, under_cuda_default=False)
    manager.remove_all()
    return base, merged


def same(got, want) -> bool:
    return len(got) == len(want) and all(a is b for a, b in zip(got, want))


def streamed_copies(manager) -> dict[tuple[int, str], torch.Tensor]:
    """mmgp's own lists: (id(module), parameter name) -> the CPU copy it loads from."""
    return {(id(parent), name): p for params in manager.blocks_of_modules.values()
            for parent, name, p, _, _ in params}


@pytest.mark.parametrize("profile_no", [1, 2, 3, 4, 5])
def test_merge_goes_into_the_copy_mmgp_streams(tiny_dir, plain_lora, offload_reference, copying_cuda, profile_no):
    path, refs = plain_lora
    pipe, parts = load(tiny_dir)
    # the low-VRAM profiles' budgets below a block's size: the tiny model streams block by block
    low_vram = ofl.PROFILES[profile_no].low_vram
    session = ofl.apply_profile(parts, profile_no, device="cuda", budgets={"transformer": 0.001} if low_vram else None)
    try:
        tr = pipe.transformer
        assert np.array_equal(render(pipe), offload_reference[0])
        session.manager.ensure_model_loaded("transformer")  # resident, as between two jobs on one model
        if low_vram:  # a streamed block left loaded, as after a forward
            session.manager.gpu_load_blocks("transformer", "layers.1")
        modules = dict(tr.named_modules())
        streamed = streamed_copies(session.manager)
        masters = {n: streamed[(id(modules[n]), "weight")] for n in refs}
        before = {n: (p.data_ptr(), p.detach().clone()) for n, p in masters.items()}
        resident = [n for n in refs if modules[n].weight.data_ptr() != masters[n].data_ptr()]
        if not low_vram:  # whole model loaded: every layer has a separate (device) copy now
            assert set(resident) == set(refs)
        else:
            assert set(resident) == {n for n in refs if n.startswith("layers.1.")}
        for n in resident:
            assert same(session.parameter_copies(modules[n], "weight"), [masters[n], modules[n].weight])
        manager = LoraManager(tr, convert_state_dict, weights=session.parameter_copies)
        (report,) = manager.sync({path: STRENGTH})
        assert report.merged == len(refs) and not hooked(tr)
        for n, p in masters.items():
            assert streamed_copies(session.manager)[(id(modules[n]), "weight")] is p  # the same Parameter
            assert p.data_ptr() == before[n][0]  # written in place (mmgp's pinned buffer in profiles 1-4)
            assert_rounded_once(p.detach(), before[n][1].float() + STRENGTH * refs[n])
            assert torch.equal(modules[n].weight, p)  # the copy loaded now carries it too
        assert np.array_equal(render(pipe), offload_reference[1])
        session.manager.unload_all()  # everything reloads from mmgp's copies
        assert np.array_equal(render(pipe), offload_reference[1])
        manager.remove_all()
        for n, p in masters.items():
            assert torch.equal(p, before[n][1]) and p.data_ptr() == before[n][0]
        assert np.array_equal(render(pipe), offload_reference[0])
    finally:
        ofl.release(session)
    q = modules["layers.0.attention.to_q"]
    assert same(session.parameter_copies(q, "weight"), [q.weight])  # released: the module's own parameter


def test_merging_stops_where_the_ram_room_ends(tiny_dir, tmp_path):
    """Layers beyond the RAM room given for kept originals keep side branches."""
    model = load_tiny_transformer(tiny_dir)
    path, _ = write_lora(tmp_path, "kohya_musubi", model, name="ink")
    full = LoraManager(model, convert_state_dict)
    (report,) = full.sync({path: 1.0})
    total = sum(t.nbytes for m in full._merged.values() for t in m.originals.values())
    assert report.merged == report.modules and not full._hooks  # unlimited room: every layer merged
    full.remove_all()
    roomy = LoraManager(model, convert_state_dict, merge_room=lambda: total / 2)
    (report,) = roomy.sync({path: 1.0})
    kept = sum(t.nbytes for m in roomy._merged.values() for t in m.originals.values())
    assert 0 < report.merged < report.modules and kept <= total / 2
    assert len(roomy._hooks) == report.modules - report.merged  # the rest as side branches
    roomy.remove_all()
    none = LoraManager(model, convert_state_dict, merge_room=lambda: 0)
    (report,) = none.sync({path: 1.0})
    assert report.merged == 0 and not none._merged
    none.remove_all()
