"""Memory profiles through mmgp's real code on the CPU, the CPU fallback, release, OOM errors, VAE tiling.

mmgp 3.8.2 needs CUDA in two places only, and `cpu_cuda_standins` stands in for exactly those:
- at profile time, three `torch.cuda` queries (device properties, the default stream, a new
  Stream);
- at the first forward, the transfer steps: `offload.gpu_load_blocks` (moves a model or a block
  of it to the GPU; the stand-in keeps mmgp's bookkeeping, unloads the previous block with mmgp's
  own `gpu_unload_blocks`, and records each transfer), `offload.move_args_to_gpu` (the same float32
  cast of the arguments, without `.cuda()`) and `torch.cuda.synchronize`, which mmgp calls between
  transfers. Everything else (profiles, budgets, block splitting, hooks, cotenancy, unloading,
  LoRA slots, release) is mmgp's own code.
Renders run with `torch.set_default_device("cuda")` in force, as mmgp leaves it: any tensor our
code creates without an explicit device fails on this CUDA-less torch.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref

import numpy as np
import pytest
import torch

from app import offload as ofl
from models.errors import UserError
from models.mmgp_support import import_mmgp
from models.z_image.handler import HANDLER

KW = dict(prompt="a red fox", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
          guidance_scale=3.0, flow_shift=3.0, seed=11)


@contextlib.contextmanager
def cpu_cuda_standins(total_memory: int = 8 * 2**30):
    """Let mmgp profile and run on a CPU-only torch; yields the list of recorded transfers."""
    offload = import_mmgp()

    class Props:
        name = "CPU stand-in"
        total_memory = 0
        major, minor, multi_processor_count = 8, 6, 1

    Props.total_memory = total_memory
    transfers: list[tuple[str, str | None, bool]] = []

    def gpu_load_blocks(self, model_id, blocks_name, preload=False):
        loaded = self.loaded_blocks[model_id]
        if not preload and loaded is not None:
            self.gpu_unload_blocks(model_id, loaded)
        transfers.append((model_id, blocks_name, preload))
        if not preload:
            self.loaded_blocks[model_id] = blocks_name

    def move_args_to_gpu(self, dtype, *args, **kwargs):
        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.dtype == torch.float32 else a
        return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}

    saved = [(torch.cuda, n, getattr(torch.cuda, n)) for n in ("get_device_properties", "default_stream",
                                                               "Stream", "synchronize")]
    saved += [(offload.offload, n, getattr(offload.offload, n)) for n in ("gpu_load_blocks", "move_args_to_gpu")]
    torch.cuda.get_device_properties = lambda *a, **k: Props()
    torch.cuda.default_stream = lambda *a, **k: "default stream"
    torch.cuda.Stream = lambda *a, **k: "transfer stream"
    torch.cuda.synchronize = lambda *a, **k: None
    offload.offload.gpu_load_blocks = gpu_load_blocks
    offload.offload.move_args_to_gpu = move_args_to_gpu
    try:
        yield transfers
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        torch.set_default_device("cpu")


@pytest.fixture(scope="module", autouse=True)
def quick_gc():
    """mmgp calls gc.collect() a dozen times per profiled job; freezing the objects that exist
    (torch, transformers, diffusers...) makes each call cheap. Later objects are still collected."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def fake_cuda():
    with cpu_cuda_standins() as transfers:
        yield transfers


@pytest.fixture
def spy_all(monkeypatch):
    """Records the arguments mmgp's offload.all receives (and runs it)."""
    offload = import_mmgp()

    calls = []
    real = offload.all

    def recording(pipe, **kwargs):
        calls.append(kwargs)
        return real(pipe, **kwargs)

    monkeypatch.setattr(offload, "all", recording)
    return calls


def load(tiny_dir, dtype=torch.bfloat16):
    return HANDLER.load_model(base_model_type="z_image_tiny", dtype=dtype, VAE_dtype=torch.float32,
                              model_dir=tiny_dir)


def render(pipe, under_cuda_default: bool = True, **kw) -> np.ndarray:
    pipe.text_encoder.cache.clear()
    if under_cuda_default:
        torch.set_default_device("cuda")
    try:
        return np.asarray(pipe(**{**KW, **kw}).images[0])
    finally:
        torch.set_default_device("cpu")


SMALL_BUDGETS = {"transformer": 0.001, "text_encoder": 0.001}  # below a block's size: every block streams


def profiled_and_plain(load, profile_no: int = 4, block: str = "layers.0") -> tuple:
    """(image without a profile, image under profile_no with every block streaming, the (module, name, tensor,
    ...) entries mmgp streams as the transformer's `block`); load() makes a fresh (pipe, parts)."""
    want = render(load()[0], under_cuda_default=False)
    with cpu_cuda_standins() as transfers:
        pipe, parts = load()
        session = ofl.apply_profile(parts, profile_no, device="cuda", budgets=SMALL_BUDGETS)
        try:
            got = render(pipe)
            streamed = session.manager.blocks_of_modules[f"transformer/{block}"]
        finally:
            ofl.release(session)
    assert ("transformer", block, False) in transfers  # loaded as a block of its own
    return want, got, streamed


@pytest.fixture(scope="module")
def reference(tiny_dir) -> np.ndarray:
    """The unprofiled image (bf16 transformer and text encoder, fp32 VAE)."""
    return render(load(tiny_dir)[0], under_cuda_default=False)


# ---------------------------------------------------------------- the profile table

def test_mmgp_import_keeps_from_pretrained_working(tiny_dir):
    """A plain `import mmgp.offload` breaks transformers' from_pretrained; import_mmgp undoes that."""
    import safetensors
    from transformers import Qwen3Model

    import_mmgp()
    from mmgp import safetensors2

    assert safetensors.safe_open is safetensors2._old_safe_open
    model = Qwen3Model.from_pretrained(str(tiny_dir / "text_encoder"))
    assert model.config.hidden_size == 32


def test_profile_table_matches_mmgp():
    from mmgp import profile_type

    assert sorted(ofl.PROFILES) == [1, 2, 3, 4, 5] and ofl.DEFAULT_PROFILE == 4
    for n, p in ofl.PROFILES.items():
        assert profile_type(n).name == p.name == ofl.PROFILE_NAMES[n]
        assert "\n" not in ofl.PROFILE_DESCRIPTIONS[n] and "GB" in p.description
    assert len(ofl.profile_help().splitlines()) == 5 and "default" in ofl.PROFILE_DESCRIPTIONS[4]


def test_profile_budgets_are_dicts():
    assert ofl.profile_budgets(1) is None and ofl.profile_budgets(3) is None
    assert ofl.profile_budgets(4) == {"transformer": 100, "text_encoder": 100, "*": 3000}
    assert ofl.profile_budgets(2) == ofl.profile_budgets(4)
    assert ofl.profile_budgets(5)["*"] == 1000
    assert ofl.profile_budgets(4, preload_mb=2000)["transformer"] == 2000
    assert ofl.profile_budgets(1, budgets={"transformer": 500}) == {"transformer": 500}
    assert ofl.profile_budgets(5, budgets={"vae": 50})["vae"] == 50
    for bad in (3000, "3000", [100]):
        with pytest.raises(UserError, match="dict"):
            ofl.profile_budgets(4, budgets=bad)
    with pytest.raises(UserError):
        ofl.profile_budgets(4, budgets={"transformer": -1})
    with pytest.raises(UserError):
        ofl.profile_budgets(4, preload_mb=-5)


@pytest.mark.parametrize("bad", [0, 6, "x", True, 4.5, None])
def test_bad_profile_numbers(bad):
    with pytest.raises(UserError, match="memory profile"):
        ofl.check_profile(bad)


def test_argument_checks(tiny_dir):
    _, parts = load(tiny_dir)
    for perc in (1.5, -0.2, "half"):
        with pytest.raises(UserError, match="perc_reserved_mem_max"):
            ofl.apply_profile(parts, 4, perc_reserved_mem_max=perc, device="cpu")
    with pytest.raises(UserError, match="bare number"):
        ofl.apply_profile(parts, 4, budgets=3000, device="cpu")


# ---------------------------------------------------------------- profiles through mmgp

@pytest.mark.parametrize("profile_no", [1, 2, 3, 4, 5])
def test_every_profile_renders_like_unprofiled(tiny_dir, reference, fake_cuda, spy_all, profile_no):
    pipe, parts = load(tiny_dir)
    session = ofl.apply_profile(parts, profile_no, device="cuda", perc_reserved_mem_max=0.3)
    assert session is not None
    manager = session.manager
    assert torch.get_default_device().type == "cpu"  # mmgp's CUDA default was undone
    (kwargs,) = spy_all
    p = ofl.PROFILES[profile_no]
    assert kwargs["budgets"] == ofl.profile_budgets(profile_no)
    assert kwargs["pinnedMemory"] == {"all": True, "transformer": "transformer", "none": False}[p.pinned]
    assert kwargs["convertWeightsFloatTo"] is None and kwargs["quantizeTransformer"] is False
    assert kwargs["extraModelsToQuantize"] == [] and kwargs["perc_reserved_mem_max"] == 0.3
    # the dtypes chosen at load survive mmgp (it would cast the fp32 VAE to bf16 otherwise)
    assert parts["vae"].dtype == torch.float32 and parts["transformer"].dtype == torch.bfloat16

    resident_after_encode = []
    te = parts["text_encoder"]
    te.register_forward_hook(lambda *_: resident_after_encode.append(list(manager.active_models_ids)))
    image = render(pipe)
    assert np.array_equal(image, reference)
    assert {m for m, _, _ in fake_cuda} == {"transformer", "text_encoder", "vae"}
    assert len(resident_after_encode) == 2  # prompt and negative prompt
    if p.low_vram:
        assert all("text_encoder" not in ids for ids in resident_after_encode)
    else:
        assert all("text_encoder" in ids for ids in resident_after_encode)
    ofl.release(session)


def test_blocks_stream_under_small_budgets(tiny_dir, reference, fake_cuda):
    """Budgets below a block's size split the models into blocks that mmgp loads one at a time."""
    pipe, parts = load(tiny_dir)
    manager = ofl.apply_profile(parts, 4, device="cuda", budgets={"transformer": 0.001, "text_encoder": 0.001})
    assert np.array_equal(render(pipe), reference)
    transformer_blocks = [b for m, b, pre in fake_cuda if m == "transformer" and not pre]
    assert {"layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"} <= set(transformer_blocks)
    assert transformer_blocks.index("layers.0") < transformer_blocks.index("layers.1")
    assert any(m == "text_encoder" and b and b.startswith("layers.") for m, b, _ in fake_cuda)
    ofl.release(manager)


def test_vae_dtype_choice_is_kept(tiny_dir, fake_cuda):
    offload = import_mmgp()

    _, parts = load(tiny_dir)
    manager = ofl.apply_profile(parts, 4, device="cuda", vae_dtype=torch.bfloat16)
    assert parts["vae"].dtype == torch.bfloat16 and parts["transformer"].dtype == torch.bfloat16
    ofl.release(manager)
    # why convertWeightsFloatTo=None matters: mmgp's default casts the fp32 VAE to bf16
    _, parts = load(tiny_dir)
    manager = offload.profile(dict(parts), 4, verboseLevel=0, quantizeTransformer=False)
    torch.set_default_device("cpu")
    assert parts["vae"].dtype == torch.bfloat16
    ofl.release(manager)


def test_quantize_in_profile(tiny_dir, reference, fake_cuda):
    from optimum.quanto import QModuleMixin as Q  # mmgp swaps quanto's QLinear for its own router class

    from models.z_image.quantize import quantize_on_the_fly

    pipe, parts = load(tiny_dir)
    quantize_on_the_fly(parts["transformer"])
    quantize_on_the_fly(parts["text_encoder"])
    manager = ofl.apply_profile(parts, 4, device="cuda")
    tr = parts["transformer"]
    assert isinstance(tr.layers[0].attention.to_q, Q)
    assert not isinstance(tr.all_x_embedder["2-1"], Q) and not isinstance(tr.t_embedder.mlp[0], Q)
    assert isinstance(parts["text_encoder"].layers[0].mlp.up_proj, Q)
    image = render(pipe).astype(np.float64)
    mse = np.mean((image - reference.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 40  # see test_quantize for the bound
    ofl.release(manager)


# ---------------------------------------------------------------- CPU fallback

def test_cpu_runs_without_offload_and_says_so_once(tiny_dir, reference, monkeypatch, caplog):
    monkeypatch.setattr(ofl, "_cpu_notice_given", False)
    pipe, parts = load(tiny_dir)
    with caplog.at_level(logging.WARNING, logger="wgp_zimage"):
        assert ofl.apply_profile(parts, 4, device="cpu") is None
        assert ofl.apply_profile(parts, 2) is None  # no CUDA on this machine: the CPU
    notices = [r for r in caplog.records if "without mmgp offload" in r.getMessage()]
    assert len(notices) == 1
    assert not any("_mm_" in k for m in parts["transformer"].modules() for k in m.__dict__)
    assert np.array_equal(render(pipe, under_cuda_default=False), reference)
    ofl.release(None)


# ---------------------------------------------------------------- release

def test_release_restores_models_and_leaks_nothing(tiny_dir, reference, fake_cuda):
    offload = import_mmgp()

    pipe, parts = load(tiny_dir)
    tr = parts["transformer"]
    state_before = {k: v.clone() for k, v in tr.state_dict().items()}
    manager = ofl.apply_profile(parts, 2, device="cuda", loras="transformer")
    with pytest.raises(RecursionError):  # mmgp's LoRA slots register the model under its layers
        tr.state_dict()
    assert np.array_equal(render(pipe), reference)
    ofl.release(manager)
    assert offload.last_offload_obj is None and ofl.pinned_bytes(manager) == 0
    for m in [*tr.modules(), *parts["text_encoder"].modules(), *parts["vae"].modules()]:
        assert not [k for k in m.__dict__ if k.startswith("_mm_") or k in ("forward", "_lock_dtype")]
        assert not hasattr(m, "_hf_hook")
    after = tr.state_dict()  # no recursion any more
    assert all(torch.equal(after[k], v) for k, v in state_before.items()) and repr(tr)
    # switching profile: the same parts profile again; and without a profile they run as loaded
    manager = ofl.apply_profile(parts, 5, device="cuda")
    assert np.array_equal(render(pipe), reference)
    ofl.release(manager)
    assert np.array_equal(render(pipe, under_cuda_default=False), reference)

    refs = [weakref.ref(m) for m in parts.values()]
    del pipe, parts, tr, manager, after, state_before
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_release_returns_the_cached_pinned_memory(tiny_dir, monkeypatch):
    """mmgp's pinned copies and the overlap's staging come from torch's caching host allocator, which
    keeps freed pinned blocks; release empties that cache (on CUDA builds)."""
    emptied = []
    with cpu_cuda_standins():
        for overlap in (True, False):
            pipe, parts = load(tiny_dir)
            manager = ofl.apply_profile(parts, 4, device="cuda", overlap_transfers=overlap)
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "is_available", lambda: True)
                m.setattr(torch.cuda, "empty_cache", lambda: None)
                m.setattr(torch._C, "_host_emptyCache", lambda o=overlap: emptied.append(o), raising=False)
                ofl.release(manager)
            assert manager.overlap is None and not hasattr(manager.manager, "_wgp_overlap")
    assert emptied == [True, False]


def test_failed_profile_leaves_nothing_behind(tiny_dir, reference, fake_cuda, monkeypatch):
    offload = import_mmgp()
    real = offload.all

    def hooks_then_fails(pipe, **kwargs):
        real(pipe, **kwargs)
        raise torch.OutOfMemoryError("pinning ran out of RAM")

    monkeypatch.setattr(offload, "all", hooks_then_fails)
    pipe, parts = load(tiny_dir)
    with pytest.raises(torch.OutOfMemoryError):
        ofl.apply_profile(parts, 2, device="cuda")
    assert offload.last_offload_obj is None and torch.get_default_device().type == "cpu"
    assert not any(k.startswith("_mm_") or k == "forward" for m in parts["transformer"].modules() for k in m.__dict__)
    assert np.array_equal(render(pipe, under_cuda_default=False), reference)


# ---------------------------------------------------------------- out of memory

def test_oom_mapping_per_stage():
    cuda_oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    e = ofl.oom_error(cuda_oom, "denoise", profile_no=4, width=1024, height=1024, num_images=2)
    msg = str(e)
    assert isinstance(e, UserError) and "GPU memory while denoising" in msg
    assert "--memory-profile 5" in msg and "768x768" in msg and "fewer images" in msg
    assert "--memory-profile 2" in str(ofl.oom_error(cuda_oom, "denoise", profile_no=1, width=512, height=512))
    assert "--vae-tiling" in str(ofl.oom_error(cuda_oom, "decode", profile_no=4))
    assert "encoding the prompt" in str(ofl.oom_error(RuntimeError("CUDA error: out of memory"), "encode",
                                                      profile_no=3))
    ram = ofl.oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
                        "load", profile_no=1)
    assert "out of RAM while loading" in str(ram) and "int8" in str(ram) and "perc-reserved" in str(ram)
    assert ofl.oom_error(RuntimeError("shape mismatch"), "denoise") is None
    assert ofl.oom_error(ValueError("out of memory"), "denoise") is None
    with pytest.raises(ValueError):
        ofl.oom_error(cuda_oom, "upscale")


def test_oom_guard_frees_memory_and_names_the_stage(monkeypatch):
    freed = []
    monkeypatch.setattr(ofl, "free_memory", lambda manager=None: freed.append(manager))
    big = []

    def failing_step():
        activations = torch.zeros(1000)
        big.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory")

    manager = object()
    with pytest.raises(UserError, match="while decoding") as info:
        with ofl.oom_guard("encode", manager, profile_no=4) as guard:
            guard.stage = "decode"
            failing_step()
    assert freed == [manager] and info.value.__cause__ is None
    gc.collect()
    assert big[0]() is None  # the failed step's tensors are not kept alive by the traceback
    with pytest.raises(KeyError):  # anything else passes through untouched
        with ofl.oom_guard("denoise"):
            raise KeyError("x")
    assert freed == [manager]


def test_free_memory_unloads_the_manager(tiny_dir, fake_cuda):
    pipe, parts = load(tiny_dir)
    session = ofl.apply_profile(parts, 1, device="cuda")
    render(pipe)
    assert session.manager.active_models_ids
    ofl.free_memory(session)
    assert session.manager.active_models_ids == []
    ofl.release(session)


# ---------------------------------------------------------------- VAE tiling

GiB = 2**30


def test_vae_tiling_decision():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert not ofl.should_tile_vae(None, 4096, 4096, fp32)  # CPU: never
    assert not ofl.should_tile_vae(7 * GiB, 1024, 1024, bf16)  # 8 GB card, bf16 VAE: ~3.6 GB needed
    assert ofl.should_tile_vae(5 * GiB, 1024, 1024, fp32)  # fp32 needs ~7.1 GB
    assert not ofl.should_tile_vae(20 * GiB, 1024, 1024, fp32)
    assert ofl.should_tile_vae(7 * GiB, 2048, 2048, bf16)
    assert not ofl.should_tile_vae(22 * GiB, 2048, 2048, bf16)
    assert ofl.should_tile_vae(7 * GiB, 1024, 1024, bf16, num_images=3)
    # the anchors: 1024x1024 peaks of 5.1 GiB (fp32) and 2.6 GiB (bf16) are within the estimate
    assert 5.1 * GiB <= ofl.vae_decode_bytes(1024, 1024, fp32) <= 5.1 * GiB * 1.1
    assert 2.6 * GiB <= ofl.vae_decode_bytes(1024, 1024, bf16) <= 2.6 * GiB * 1.15
    need = ofl.vae_decode_bytes(1536, 1536, bf16) * ofl.VAE_SAFETY
    assert ofl.should_tile_vae(int(need) - 1, 1536, 1536, bf16)
    assert not ofl.should_tile_vae(int(need) + 1, 1536, 1536, bf16)
    resident = ofl.vae_decode_bytes(1536, 1536, bf16, vae_params=0) * ofl.VAE_SAFETY
    assert not ofl.should_tile_vae(int(resident) + 1, 1536, 1536, bf16, vae_resident=True)
    assert ofl.free_device_bytes("cpu") is None


def test_low_vram_profiles_cap_the_decode():
    """Profiles 2/4/5 keep the job near 4 GiB: a 1024x1024 fp32 decode is tiled even on a large card,
    while the high-VRAM profiles decode it whole when it fits (H100 run, bench/RESULTS.md)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    for profile in (2, 4, 5):
        assert ofl.decode_needs_tiling(profile, 70 * GiB, 1024, 1024, fp32)
        assert ofl.decode_needs_tiling(profile, 70 * GiB, 1024, 1024, bf16)
        assert not ofl.decode_needs_tiling(profile, 70 * GiB, 512, 512, bf16)  # ~0.9 GB: fits the cap
    for profile in (1, 3, None):
        assert not ofl.decode_needs_tiling(profile, 70 * GiB, 1024, 1024, fp32)
        assert ofl.decode_needs_tiling(profile, 5 * GiB, 1024, 1024, fp32)
    assert not ofl.decode_needs_tiling(4, None, 2048, 2048, fp32)  # CPU: never
    with pytest.raises(UserError):
        ofl.decode_needs_tiling(7, 70 * GiB, 1024, 1024, fp32)


def test_pipeline_decides_tiling_after_denoising(tiny_dir):
    """A callable vae_tiling is asked once, after the last step (when the denoising memory is free)."""
    pipe, _ = load(tiny_dir)
    events = []
    pipe(prompt="a cat", height=64, width=64, num_inference_steps=2, guidance_scale=0.0, seed=1,
         callback=lambda i, n, lat: events.append(f"step{i}"),
         vae_tiling=lambda: events.append("decide") or True)
    assert events == ["step0", "step1", "decide"]


def test_vae_tiles_small_enough_to_split(tiny_dir):
    """enable_tiling() alone tiles at the config's sample_size (1024 for the Flux VAE): no split at 1024."""
    _, parts = load(tiny_dir)
    vae = parts["vae"]
    ofl.set_vae_tile_size(vae, 32)
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (32, 4)
    calls = []
    orig = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: calls.append(1) or orig(*a, **k)
    vae.enable_tiling()
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 16, 8, 8), return_dict=False)[0]
    assert calls and out.shape == (1, 3, 64, 64)



# ---------------------------------------------------------------- a ControlNet under the profiles

@pytest.fixture(scope="module")
def control_case(tiny_dir, tmp_path_factory):
    """(model folder with the tiny ControlNet, a control picture, the unprofiled controlled image)."""
    import shutil

    from PIL import Image

    root = tmp_path_factory.mktemp("offload_control")
    model_dir = shutil.copytree(tiny_dir, root / "model")
    y, x = np.mgrid[0:64, 0:64]
    picture = root / "control.png"
    Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], -1).astype(np.uint8)).save(picture)
    pipe, _ = load_control(model_dir)
    return model_dir, picture, control_render(pipe, picture, under_cuda_default=False)


def load_control(model_dir):
    return HANDLER.load_model(base_model_type="z_image_tiny_control", dtype=torch.bfloat16,
                              VAE_dtype=torch.float32, model_dir=model_dir)


def control_render(pipe, picture, under_cuda_default: bool = True) -> np.ndarray:
    pipe.text_encoder.cache.clear()
    if under_cuda_default:
        torch.set_default_device("cuda")
    try:
        out = HANDLER.render(pipe, "z_image_tiny_control", **KW, control_image=str(picture), control_type="raw",
                             control_strength=0.75)
        return np.asarray(out.images[0])
    finally:
        torch.set_default_device("cpu")


@pytest.mark.parametrize("profile_no", [1, 4, 5])
def test_a_controlnet_renders_under_every_profile_like_unprofiled(control_case, reference, fake_cuda, profile_no):
    model_dir, picture, controlled = control_case
    assert not np.array_equal(controlled, reference)  # the ControlNet changes the image
    pipe, parts = load_control(model_dir)
    assert parts["transformer"].controlnet is pipe.controlnet  # mmgp sees it as part of the transformer
    session = ofl.apply_profile(parts, profile_no, device="cuda")
    assert np.array_equal(control_render(pipe, picture), controlled)
    ofl.release(session)


def test_the_control_blocks_stream_with_the_transformer(control_case, fake_cuda):
    """Under budgets below a block's size the ControlNet's blocks are loaded one at a time, like the main
    layers, instead of the whole ControlNet sitting on the device."""
    model_dir, picture, controlled = control_case
    pipe, parts = load_control(model_dir)
    session = ofl.apply_profile(parts, 4, device="cuda", budgets=SMALL_BUDGETS)
    assert np.array_equal(control_render(pipe, picture), controlled)
    blocks = {b for m, b, pre in fake_cuda if m == "transformer" and not pre}
    assert {"controlnet.control_layers.0", "controlnet.control_layers.1", "controlnet.control_noise_refiner.0",
            "layers.0", "layers.1"} <= blocks
    ofl.release(session)
