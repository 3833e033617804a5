"""Memory profiles (mmgp offload), the CPU fallback, VAE tiling choice and out-of-memory errors.

`apply_profile` hands the loaded parts ({"transformer", "text_encoder", "vae"}, as
`handler.load_model` returns them, loaded on the CPU) to `mmgp.offload.profile` (mmgp 3.8.2)
with these corrections of mmgp's defaults:

- budgets always go as a dict per model (mmgp silently ignores a bare number);
- `convertWeightsFloatTo=None`: mmgp would cast every fp32 parameter, the VAE's included, to
  bf16; the parts keep the dtypes they were loaded in (the user's choice);
- the modules the transformer names in its `fp32_input_modules` (Z-Image: its root and timestep embedder)
  take float32 inputs as they are (`_lock_dtype`): mmgp would round the timestep to the model dtype first;
- mmgp leaves `torch.set_default_device("cuda")` behind: the previous default is restored;
- mmgp never quantizes on its own (`quantizeTransformer=False`, no extra models): int8 parts come
  from the family's loader (pre-quantized files, or quantized on the fly keeping the
  precision-sensitive layers in bf16);
- in the low-VRAM profiles (2, 4, 5) the text encoder leaves VRAM as soon as a prompt is encoded.

Without CUDA nothing is profiled: generation runs on the CPU and a warning says so once.

What we set up around mmgp's manager (budgets, hooks, locked modules, the models, the overlap state) lives in
our own `OffloadSession`, which holds the manager; the manager itself is only used through mmgp's API.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

# the profiles' table (re-exported) is torch-free: --help and the page list it without loading torch
from app.memory_profiles import DEFAULT_PROFILE, PROFILE_DESCRIPTIONS, PROFILE_NAMES, PROFILES, MemoryProfile
from models.errors import UserError

log = logging.getLogger("wgp_zimage")

# budgets (MB of a model resident in VRAM at once) of the low-VRAM profiles, as Wan2GP sets them:
# the transformer and the text encoder keep only their small non-repeated parts and stream their
# blocks; the VAE (and anything else, "*") loads whole below this size
LOW_VRAM_BUDGETS = {"transformer": 100, "text_encoder": 100, "*": 3000}
VERYLOW_OTHER_BUDGET = 1000

_cpu_notice_given = False


def profile_help() -> str:
    """One line per profile, for --help and the UI."""
    return "\n".join(f"{n}: {d}" for n, d in PROFILE_DESCRIPTIONS.items())


def check_profile(profile_no: Any) -> int:
    try:
        number = int(profile_no)
    except (TypeError, ValueError):
        number = -1
    if number not in PROFILES or isinstance(profile_no, bool) or (isinstance(profile_no, float)
                                                                 and not profile_no.is_integer()):
        raise UserError(f"memory profile must be one of {', '.join(map(str, PROFILES))} (got {profile_no!r})")
    return number


def profile_budgets(profile_no: int, preload_mb: float = 0, budgets: Mapping[str, float] | None = None
                    ) -> dict[str, float] | None:
    """The per-model budgets (MB) handed to mmgp; None loads every model whole.

    preload_mb > 0 raises the transformer's budget in the low-VRAM profiles: mmgp then keeps that
    many MB of its blocks resident instead of streaming them. `budgets` entries override.
    """
    p = PROFILES[check_profile(profile_no)]
    if budgets is not None and not isinstance(budgets, Mapping):
        raise UserError("budgets must be a dict of MB per model (e.g. {'transformer': 100, '*': 3000}): "
                        "mmgp ignores a bare number")
    if preload_mb is None or preload_mb < 0:
        raise UserError(f"preload must be a number of MB >= 0 (got {preload_mb!r})")
    out: dict[str, float] = {}
    if p.low_vram:
        out = dict(LOW_VRAM_BUDGETS)
        if p.number == 5:
            out["*"] = VERYLOW_OTHER_BUDGET
        if preload_mb:
            out["transformer"] = float(preload_mb)
    for key, value in (budgets or {}).items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"bad budget {key!r}: {value!r} (MB >= 0 per model name)")
        out[key] = value
    return out or None


def _check_perc(perc: float | None) -> float:
    if perc is None or perc == 0:
        return 0.0  # mmgp's default: 50% of the RAM on Linux (40% on Windows)
    if isinstance(perc, bool) or not isinstance(perc, int | float) or not 0 < perc <= 1:
        raise UserError(f"perc_reserved_mem_max must be a fraction of the RAM in (0, 1] (got {perc!r})")
    return float(perc)


def _cpu_notice(profile_no: int) -> None:
    global _cpu_notice_given
    if not _cpu_notice_given:
        _cpu_notice_given = True
        log.warning("no CUDA device: generating on the CPU without mmgp offload (memory profile %d ignored)",
                    profile_no)


def _default_device() -> torch.device:
    try:
        return torch.get_default_device()
    except (AssertionError, RuntimeError):  # a CUDA default on a machine without CUDA
        return torch.device("cpu")


@dataclass
class OffloadSession:
    """One apply_profile: mmgp's manager and what we set up around it, undone by `release`."""

    manager: Any  # mmgp's offload object
    profile: int | None = None
    budgets: dict[str, float] | None = None
    models: dict[str, nn.Module] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)  # torch hook handles (text encoder unload)
    locked: list[nn.Module] = field(default_factory=list)  # modules given a float32 _lock_dtype
    overlap: Any = None  # app.block_overlap._Overlap when block transfers overlap compute

    _streamed: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] | None = field(default=None, repr=False)

    def parameter_copies(self, module: nn.Module, name: str) -> list[torch.Tensor]:
        """Every copy of `module.<name>` a weight change (a merged LoRA) must reach, mmgp's own first.

        mmgp keeps each parameter's CPU copy (pinned in profiles 1-4) in its block lists and streams
        from it: a load sets a new device Parameter on the module, an unload sets a Parameter over the
        CPU copy back. A change made only to the module's current parameter would be lost at the next
        load (or never reach the device), so the CPU copy comes first: the merge is written, and the
        original bytes are read, there. A device copy resident now follows, to get the same values;
        a module parameter sharing the CPU copy's memory is not listed twice. Outside mmgp's lists (or
        after `release`) the module's parameter is the only copy. This is the `WeightCopies` seam of
        models.lora_runtime.LoraManager; call it between jobs, with no transfer in flight (the service
        synchronizes the device before a LoRA sync).
        """
        current = getattr(module, name, None)
        blocks = getattr(self.manager, "blocks_of_modules", None)
        if not self.models or not blocks:
            return [] if current is None else [current]
        if self._streamed is None:  # (module, name) -> mmgp's copy; the lists are fixed once profiled
            self._streamed = {}
            for params in blocks.values():
                for parent, pname, p, _is_buffer, _tied in params:
                    self._streamed.setdefault((id(parent), pname), (parent, p))
        owner, master = self._streamed.get((id(module), name), (None, None))
        if owner is not module:
            return [] if current is None else [current]
        if current is None or current is master or _same_memory(current, master):
            return [master]
        return [master, current]

    @classmethod
    def of(cls, session_or_manager: Any) -> OffloadSession:
        """A session as is; a bare mmgp manager (profiled without apply_profile) in a session of its own."""
        if isinstance(session_or_manager, OffloadSession):
            return session_or_manager
        return cls(manager=session_or_manager, models=dict(getattr(session_or_manager, "models", None) or {}))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory (a quantized tensor without one pointer: assumed so,
    since nothing is ever merged into one)."""
    if a.device != b.device:
        return False
    try:
        return a.data_ptr() == b.data_ptr()
    except RuntimeError:
        return True


def _model_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def apply_profile(
    parts: Mapping[str, nn.Module],
    profile_no: int = DEFAULT_PROFILE,
    *,
    budgets: Mapping[str, float] | None = None,
    preload_mb: float = 0,
    vae_dtype: torch.dtype | None = None,
    perc_reserved_mem_max: float = 0,
    device: str | torch.device | None = None,
    loras: str | list[str] | None = None,
    overlap_transfers: bool = False,
    verbose: int = 0,
) -> OffloadSession | None:
    """Profile parts with mmgp; returns our session holding mmgp's manager, or None on the CPU (no offload).

    parts: {"transformer", "text_encoder", "vae"} modules, on the CPU. budgets: MB per model
    name overriding the profile's (see `profile_budgets`); preload_mb: MB of transformer blocks
    kept in VRAM in profiles 2/4/5; perc_reserved_mem_max: cap of pinned RAM as a fraction of
    the RAM (0: mmgp's default, half the RAM); vae_dtype: cast the VAE to it first (else it keeps
    its dtype); device: where to generate (None: CUDA when available); loras: mmgp's LoRA slots
    (e.g. "transformer"). int8 parts come quantized from the family's loader (mmgp quantizes nothing).
    overlap_transfers: streamed blocks copy ahead without mmgp's device sync per block
    (app/block_overlap.py; low-VRAM profiles only). The service asks for it by default since the H200 run
    (bit-identical latents, profile 4 at 1.08x profile 1 instead of 1.75x); here it stays explicit.
    """
    from models.mmgp_support import import_mmgp

    number = check_profile(profile_no)
    model_budgets = profile_budgets(number, preload_mb, budgets)
    perc = _check_perc(perc_reserved_mem_max)
    if "transformer" not in parts:
        raise ValueError("parts need a 'transformer' module")
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    transformer, text_encoder, vae = parts["transformer"], parts.get("text_encoder"), parts.get("vae")
    if vae is not None and vae_dtype is not None:
        nn.Module.to(vae, dtype=vae_dtype)
    if dev.type != "cuda":
        _cpu_notice(number)
        return None

    offload = import_mmgp()
    locked = []
    for name in getattr(transformer, "fp32_input_modules", ()):  # the model says which (no family names here)
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            continue
        if "_lock_dtype" not in module.__dict__:
            module._lock_dtype = torch.float32
            locked.append(module)
    dtypes_before = {k: _model_dtype(m) for k, m in parts.items()}
    previous_default = _default_device()
    if dev.index is not None:
        torch.cuda.set_device(dev)
    try:
        manager = offload.profile(
            dict(parts), number, verboseLevel=verbose, budgets=model_budgets, quantizeTransformer=False,
            extraModelsToQuantize=[], convertWeightsFloatTo=None, perc_reserved_mem_max=perc, loras=loras,
        )
    except BaseException:
        # a profile that failed half way (RAM exhausted while pinning...) leaves nothing behind
        stray = getattr(offload, "last_offload_obj", None)
        if stray is not None and any(m is p for m in (stray.models or {}).values() for p in parts.values()):
            with contextlib.suppress(Exception):
                stray.release()
        for model in parts.values():
            _unhook(model, locked)
        raise
    finally:
        torch.set_default_device(previous_default)
    for model in parts.values():
        _unwrap_compiled_blocks(model)
    session = OffloadSession(manager, number, model_budgets, dict(parts), locked=locked)
    if PROFILES[number].low_vram and text_encoder is not None:
        # unload right after the prompt is encoded, before the transformer needs the room
        session.hooks.append(text_encoder.register_forward_hook(lambda *_: manager.unload_all()))
    if overlap_transfers and PROFILES[number].low_vram:
        from app.block_overlap import overlap_block_transfers

        session.overlap = overlap_block_transfers(manager)
    changed = {k: (before, _model_dtype(parts[k])) for k, before in dtypes_before.items()
               if _model_dtype(parts[k]) != before}
    if changed:  # mmgp was told not to convert: a change here is a bug, never a silent downgrade
        release(session)
        raise RuntimeError(f"mmgp changed the dtype of {changed}")
    log.info("memory profile %d (%s): budgets %s, %.0f MB pinned", number, PROFILES[number].name,
             model_budgets, pinned_bytes(session) / 2**20)
    return session


def pinned_bytes(session: OffloadSession | Any | None) -> int:
    """Bytes of RAM mmgp pinned for the session's models (a bare mmgp manager is taken too)."""
    if session is None:
        return 0
    session = OffloadSession.of(session)
    models = session.models or getattr(session.manager, "models", None) or {}
    return int(sum(getattr(m, "_pinned_bytes", 0) for m in models.values()))


def _unwrap_compiled_blocks(model: nn.Module) -> None:
    """Give the layers inside compiled blocks their plain forward back.

    mmgp wraps the forward of every module with a loading check that dynamo cannot trace (clock
    reads, block transfers), which breaks a full-graph compiled block. The block's own wrapper,
    which runs before its compiled forward, already loads everything the block holds, so the inner
    checks are redundant there.
    """
    for block in model.modules():
        if getattr(block, "is_compiled_region", False) is not True:
            continue
        for inner in block.modules():
            attrs = inner.__dict__
            original = attrs.get("_mm_forward")
            if inner is not block and getattr(original, "__self__", None) is inner and \
                    getattr(original, "__func__", None) is getattr(type(inner), "forward", None):
                attrs.pop("forward", None)


def _unhook(model: nn.Module, locked: list[nn.Module]) -> None:
    """Remove what mmgp attached to a model's modules (forward wrappers, ids, LoRA back references)."""
    from models.mmgp_support import import_mmgp

    hf_hook = import_mmgp().HfHook
    for module in list(model.modules()):
        attrs = module.__dict__
        original = attrs.get("_mm_lora_old_forward", attrs.get("_mm_forward"))
        if original is not None:
            if getattr(original, "__self__", None) is module and \
                    getattr(original, "__func__", None) is getattr(type(module), "forward", None):
                attrs.pop("forward", None)  # back to the class's forward
            else:
                attrs["forward"] = original  # a forward the module had before mmgp
        for name in [n for n in attrs if n.startswith("_mm_")]:
            delattr(module, name)
        for name in [n for n in module._modules if n.startswith("_mm_")]:
            delattr(module, name)  # _mm_lora_model: the parent registered as a child (recursion)
        if isinstance(attrs.get("_hf_hook"), hf_hook):
            del module._hf_hook
        for name in ("_force_device", "_dtype"):
            attrs.pop(name, None)
    for module in locked:
        module.__dict__.pop("_lock_dtype", None)


def release(session: OffloadSession | Any | None) -> None:
    """Undo apply_profile: unload every model from VRAM, drop mmgp's hooks and references.

    The models stay usable on the CPU (their weights are back where they were loaded; pinned RAM
    is freed with them). Call before loading another model or switching profile. A bare mmgp
    manager (profiled without apply_profile) is released too.
    """
    if session is None:
        return
    session = OffloadSession.of(session)
    manager = session.manager
    for handle in session.hooks:
        handle.remove()
    models = dict(session.models or manager.models or {})
    if manager.models is not None:
        manager.release()
    for model in models.values():
        _unhook(model, session.locked)
    # the session is spent: what it held goes (a second release finds nothing to undo)
    session.hooks, session.locked, session.models, session.overlap = [], [], {}, None
    session._streamed = None
    empty_caches()


def empty_caches() -> None:
    """Collect garbage, then give torch's cached device memory and cached pinned RAM back.

    mmgp pins with torch.empty(pin_memory=True) and --overlap-transfers stages through
    pin_memory(): both come from torch's caching host allocator, which keeps freed pinned blocks
    (page-locked RAM) for reuse. Call once the models themselves are dropped, so that RAM returns
    to its level before the load.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds only
        if host_empty_cache is not None:
            host_empty_cache()


# ---------------------------------------------------------------- VAE tiling

# Flux VAE (decoder and encoder): 83.8 M parameters
FLUX_VAE_PARAMS = 83_819_683
# peak decode memory per output pixel, in elements of the VAE dtype: anchors.md measured 5.1 GiB
# (fp32) and 2.6 GiB (bf16) for one 1024x1024 image, i.e. ~1230 elements per pixel beyond the weights
VAE_ELEMENTS_PER_PIXEL = 1280
VAE_SAFETY = 1.25  # allocator fragmentation and the CUDA workspace


def vae_decode_bytes(height: int, width: int, dtype: torch.dtype, num_images: int = 1,
                     vae_params: int = FLUX_VAE_PARAMS) -> int:
    """Estimated peak device bytes of an untiled decode of num_images images (weights included)."""
    item = torch.empty((), dtype=dtype, device="cpu").element_size()
    return int(vae_params * item + VAE_ELEMENTS_PER_PIXEL * height * width * max(num_images, 1) * item)


def should_tile_vae(free_bytes: int | None, height: int, width: int, dtype: torch.dtype, num_images: int = 1,
                    *, vae_params: int = FLUX_VAE_PARAMS, vae_resident: bool = False) -> bool:
    """Whether to decode in tiles: the untiled estimate (x VAE_SAFETY) exceeds the free device memory.

    free_bytes None (no CUDA) never tiles. vae_resident: the weights already sit in VRAM.
    """
    if free_bytes is None:
        return False
    need = vae_decode_bytes(height, width, dtype, num_images, 0 if vae_resident else vae_params)
    return need * VAE_SAFETY > free_bytes


# the low-VRAM profiles keep the whole job near 4 GiB (CUDA context and denoising ~3 GiB): the decode
# gets at most this much, whatever the card has free. Measured on an H100 (bench/RESULTS.md): an untiled
# fp32 1024x1024 decode took 8.9 GiB reserved after profile 4's denoising, i.e. 9.7 GiB for the job.
LOW_VRAM_DECODE_BYTES = 2 * 2**30


def decode_needs_tiling(profile_no: int | None, free_bytes: int | None, height: int, width: int,
                        dtype: torch.dtype, num_images: int = 1) -> bool:
    """Tile the VAE decode when the untiled estimate exceeds the free VRAM, or, in a low-VRAM
    profile (2, 4, 5), the profile's decode budget. Without CUDA (free_bytes None): never."""
    if free_bytes is None:
        return False
    if profile_no is not None and PROFILES[check_profile(profile_no)].low_vram:
        free_bytes = min(free_bytes, LOW_VRAM_DECODE_BYTES)
    return should_tile_vae(free_bytes, height, width, dtype, num_images)


VAE_TILE_PIXELS = 512


def set_vae_tile_size(vae, tile_px: int = VAE_TILE_PIXELS) -> None:
    """Tile size of diffusers' AutoencoderKL tiled decode, in image pixels (25% overlap).

    diffusers tiles at the config's sample_size, 1024 for the Flux VAE: `enable_tiling()` alone
    leaves a 1024x1024 image in one piece. 512-pixel tiles take about a quarter of the memory.
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = int(tile_px)
    vae.tile_latent_min_size = int(tile_px) // f


def free_device_bytes(device: str | torch.device | None = None) -> int | None:
    """Device memory free for torch (driver-free + cached by torch); None without CUDA."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


# ---------------------------------------------------------------- out of memory

STAGES = ("load", "encode", "denoise", "decode")
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def _smaller(width: int, height: int) -> tuple[int, int]:
    return max(256, int(width * 0.75) // 16 * 16), max(256, int(height * 0.75) // 16 * 16)


def _lower_vram_profile(profile_no: int | None) -> str:
    if profile_no is None:
        return "a memory profile that streams the models (--memory-profile 4 or 5)"
    if profile_no == 1:
        return "memory profile 2 (--memory-profile 2)"
    if profile_no == 3:
        return "memory profile 4 (--memory-profile 4)"
    if profile_no in (2, 4):
        return "memory profile 5 (--memory-profile 5), or a smaller --preload"
    return ""


def oom_error(exc: BaseException, stage: str, *, profile_no: int | None = None, width: int | None = None,
              height: int | None = None, num_images: int = 1) -> UserError | None:
    """The UserError for an out-of-memory exc raised during stage; None when exc is no OOM."""
    if not is_oom(exc):
        return None
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (got {stage!r})")
    ram = not isinstance(exc, torch.OutOfMemoryError) and "cuda" not in str(exc).lower()
    where = "RAM" if ram else "GPU memory"
    profile = _lower_vram_profile(profile_no)
    tips: list[str]
    if stage == "load":
        if ram:
            tips = ["int8 weights (--transformer-quantization int8 --text-encoder-quantization int8)",
                    "a memory profile that pins less RAM (--memory-profile 4 or 5)",
                    "a lower --perc-reserved-mem-max"]
        else:
            tips = [profile or "a smaller --preload", "int8 weights"]
        what = "loading the model"
    elif stage == "encode":
        tips = [profile or "int8 text encoder weights", "int8 text encoder weights"]
        what = "encoding the prompt"
    elif stage == "denoise":
        tips = [profile] if profile else []
        if width and height:
            w2, h2 = _smaller(width, height)
            tips.append(f"a smaller size (e.g. {w2}x{h2} instead of {width}x{height})")
        else:
            tips.append("a smaller size")
        if num_images > 1:
            tips.append(f"fewer images per prompt (1 instead of {num_images})")
        what = "denoising"
    else:
        tips = ["VAE tiling (--vae-tiling)", "a bf16 VAE (--vae-dtype bf16)"]
        if num_images > 1:
            tips.append(f"fewer images per prompt (1 instead of {num_images})")
        what = "decoding the image"
    tips = list(dict.fromkeys(t for t in tips if t))
    return UserError(f"out of {where} while {what}: try {', or '.join(tips)}")


def free_memory(session: OffloadSession | Any | None = None) -> None:
    """Unload the profiled models and return torch's cached device memory (after an OOM)."""
    manager = OffloadSession.of(session).manager if session is not None else None
    if manager is not None and getattr(manager, "models", None) is not None:
        try:
            manager.unload_all()
        except Exception as e:
            log.debug("unload after OOM failed: %s", e)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomGuard:
    """Context manager: an OOM inside becomes a UserError naming the current stage, memory is freed.

    The stage can move on while inside (`guard.stage = "denoise"` from a step callback).
    """

    def __init__(self, stage: str = "encode", manager: OffloadSession | Any | None = None, *,
                 profile_no: int | None = None,
                 width: int | None = None, height: int | None = None, num_images: int = 1):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES} (got {stage!r})")
        self.stage = stage
        self.manager = manager
        self.context = {"profile_no": profile_no, "width": width, "height": height, "num_images": num_images}

    def __enter__(self) -> OomGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not is_oom(exc):
            return False
        error = oom_error(exc, self.stage, **self.context)
        # drop the frames that hold the failed step's tensors before returning the memory
        traceback.clear_frames(tb)
        exc.__traceback__ = None
        del exc, tb
        free_memory(self.manager)
        log.warning("%s", error)
        raise error from None


def oom_guard(stage: str = "encode", manager=None, **context) -> OomGuard:
    return OomGuard(stage, manager, **context)


__all__ = [
    "DEFAULT_PROFILE", "PROFILES", "PROFILE_DESCRIPTIONS", "PROFILE_NAMES", "MemoryProfile", "OffloadSession",
    "OomGuard",
    "apply_profile", "check_profile", "free_device_bytes", "free_memory", "is_oom", "oom_error", "oom_guard",
    "decode_needs_tiling", "empty_caches", "pinned_bytes", "profile_budgets", "profile_help", "release",
    "set_vae_tile_size", "should_tile_vae", "vae_decode_bytes",
]
