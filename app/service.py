"""The generation service: one path from a JobSpec to saved images, used by the CLI and the UI.

It owns the loaded pipeline (reloaded only when the model, its files, device or dtypes change),
resolves defaults and seeds, reports progress events and writes images atomically with their
settings. It knows nothing of Gradio or argparse.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from app.app_config import DEFAULT_OUTPUT_QUALITY
from app.cancel import CancelToken
from app.jobs import MAX_PROMPT_CHARS, JobSpec, resolve_seed, size_warnings
from app.outputs import clean_stale_parts, input_copy_path, output_name, save_image_atomic, unique_path
from app.params import DEFAULT_MODEL_TYPE, params_of
from models.attention import choose_backend
from models.errors import GenerationInterrupted, UserError
from models.registry import (
    LOWBIT_FORMATS,
    ModelDefinition,
    PreviewFactors,
    handler_for,
    load_definitions,
    resolve_model_type,
)

log = logging.getLogger("wgp_zimage")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EventFn = Callable[[dict[str, Any]], None]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def check_output_options(config: ServiceConfig) -> None:
    from app.metadata import FORMATS

    if config.output_format not in FORMATS:
        raise UserError(f"output format must be one of {', '.join(FORMATS)} (got {config.output_format!r})")
    q = config.output_quality
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
        raise UserError(f"output quality must be a whole number from 1 to 100 (got {q!r})")


@dataclass
class ServiceConfig:
    checkpoints_dir: Path = Path("ckpts")
    output_dir: Path = Path("outputs")
    device: str | None = None
    dtype: str | None = None  # bf16 on CUDA, fp32 on the CPU when None
    vae_dtype: str = "fp32"
    vae_tiling: bool = False
    compile: bool = False
    lora_dirs: dict[str, Path] = field(default_factory=dict)  # --lora-dir-<family>: family LoRA folder -> its path
    loras_root: Path | None = None  # --loras (root holding one folder per family)
    attention: str = "auto"
    transformer_quantization: str = "auto"
    text_encoder_quantization: str = "auto"
    memory_profile: int = 4  # MMGP profile (CUDA only)
    perc_reserved_mem_max: float = 0.0
    preload_mb: int = 0
    overlap_transfers: bool = True  # app/block_overlap.py: low-VRAM profiles stream without mmgp's per-block sync
    # fp8 weights' products in fp8 (torch._scaled_mm): None = where the CUDA GPU runs them (compute capability
    # 8.9+), True = asked for (any device that runs them; elsewhere said once, then dequantized), False = never
    fp8_compute: bool | None = None
    # int8 transformer weights as quanto's layers ("quanto") or as plain int8 tensors and scales ("plain":
    # models.lowbit.Int8Linear, same products, traced whole by --compile)
    int8_layers: str = "quanto"
    save_quantized: bool | str = False  # True / "int8": int8 files of on-the-fly weights; "fp8": an fp8 transformer
    output_format: str = "png"  # png | jpeg | webp (changed on a running service: applies to the next image)
    output_quality: int = DEFAULT_OUTPUT_QUALITY  # JPEG / WebP quality, 1-100
    save_metadata: bool = True  # False: images hold no settings

    @classmethod
    def from_args(cls, args) -> ServiceConfig:
        """From parsed command-line options (the shared ones); what is absent keeps its default."""
        names = {
            "checkpoints_dir": "checkpoints_dir", "output_dir": "output_dir", "device": "device", "dtype": "dtype",
            "vae_dtype": "vae_dtype", "vae_tiling": "vae_tiling", "compile": "compile", "attention": "attention",
            "loras_root": "loras",
            "transformer_quantization": "transformer_quantization",
            "text_encoder_quantization": "text_encoder_quantization",
            "memory_profile": "memory_profile", "perc_reserved_mem_max": "perc_reserved_mem_max",
            "preload_mb": "preload", "overlap_transfers": "overlap_transfers", "fp8_compute": "fp8_compute",
            "int8_layers": "int8_layers",
            "save_quantized": "save_quantized", "output_format": "output_format",
            "output_quality": "output_quality", "save_metadata": "save_metadata",
        }
        from models.registry import lora_subdirs

        lora_dirs = {sub: getattr(args, f"lora_dir_{sub}") for sub in lora_subdirs()
                     if getattr(args, f"lora_dir_{sub}", None) is not None}
        return cls(**{field: getattr(args, opt) for field, opt in names.items() if hasattr(args, opt)},
                   lora_dirs=lora_dirs)


@dataclass
class JobResult:
    paths: list[Path]
    seeds: list[int]
    settings: list[dict[str, Any]]
    seconds: float
    seconds_per_step: float
    warnings: list[str] = field(default_factory=list)
    lora_reports: list[str] = field(default_factory=list)


def merge_room() -> float:
    """RAM that merged LoRAs may keep original weights in: half of what is available now (the rest of the
    LoRAs' layers keep side branches: a per-step cost instead of a low-RAM machine's memory)."""
    import psutil

    return psutil.virtual_memory().available * MERGE_RAM_SHARE


MERGE_RAM_SHARE = 0.5


class StepObserver:
    """The pipeline's per-step hooks for one run, in one object: progress events with timing, the OOM guard's
    stage (encode -> denoise -> decode) and the LoRAs' per-step strengths."""

    def __init__(self, on_event: EventFn | None, guard: Any = None,
                 lora_step: Callable[[int, int], None] | None = None, sync_device: torch.device | None = None):
        self.on_event = on_event
        self.guard = guard  # an app.offload.OomGuard (anything with a `stage`), or None
        self.lora_step = lora_step
        self.sync_device = sync_device  # CUDA: wait for the step's kernels, only to report true progress
        self.loop_start = time.perf_counter()
        self.step_times: list[float] = []

    def step_start(self, i: int, n: int) -> None:
        if self.guard is not None:
            self.guard.stage = "denoise"
        if self.lora_step is not None:
            self.lora_step(i, n)

    def step_end(self, i: int, n: int, latents: torch.Tensor) -> None:
        if self.sync_device is not None:
            torch.cuda.current_stream(self.sync_device).synchronize()
        self.step_times.append(time.perf_counter())
        if self.on_event:
            times = self.step_times
            per = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[-1] - self.loop_start
            self.on_event({"kind": "step", "step": i + 1, "total": n, "seconds_per_step": per,
                           "eta": per * (n - i - 1), "latents": latents})
        if i == n - 1 and self.guard is not None:
            self.guard.stage = "decode"

    def seconds_per_step(self) -> float:
        """Mean seconds per step since the observer was made (the text encoding counts in the first step)."""
        if not self.step_times:
            return 0.0
        return (self.step_times[-1] - self.loop_start) / len(self.step_times)


class GenerationService:
    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        self.definitions, self.definition_problems = load_definitions()
        self.device = resolve_device(self.config.device)
        dtype_name = self.config.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        if dtype_name not in DTYPES or self.config.vae_dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}")
        self.dtype_name = dtype_name
        self.dtype = DTYPES[dtype_name]
        self.vae_dtype = DTYPES[self.config.vae_dtype]
        check_output_options(self.config)
        self._pipe = None
        self._pipe_key: tuple | None = None
        self.pipe_memory_profile: int | None = None  # the profile the loaded pipeline was set up with
        self.attention_backend: str | None = None  # the backend the loaded pipeline's model uses
        self._lora_manager = None
        self._lora_noted: set[str] = set()  # architectures whose LoRA note was given
        self._offload = None  # app.offload.OffloadSession of the loaded pipeline (CUDA only)
        self._libraries: dict[str, object] = {}
        self._lock = threading.RLock()
        # config changes from other threads (the page's Config section) wait here while a job runs
        self._config_lock = threading.Lock()
        self._pending_config: dict[str, Any] = {}
        self._jobs_running = 0
        # a process killed while saving leaves a 0-byte or partial temporary file beside the image it wrote
        clean_stale_parts(self.config.output_dir)

    # ------------------------------------------------------------ configuration changes

    def update_config(self, changes: dict[str, Any]) -> list[str]:
        """Change ServiceConfig fields from any thread: at once when no job runs, else when the running job
        ends (the worker never sees a configuration change half way through a job). Returns the names whose
        value differs from what was in effect or already waiting."""
        unknown = set(changes) - {f.name for f in fields(ServiceConfig)}
        if unknown:
            raise ValueError(f"unknown configuration field(s): {', '.join(sorted(unknown))}")
        with self._config_lock:
            changed = [k for k, v in changes.items() if self._pending_config.get(k, getattr(self.config, k)) != v]
            self._pending_config.update(changes)
            if not self._jobs_running:
                self._apply_pending_config()
        return changed

    def pending_config(self) -> dict[str, Any]:
        """Changes waiting for the running job to end (empty when none)."""
        with self._config_lock:
            return dict(self._pending_config)

    def _apply_pending_config(self) -> None:  # with _config_lock held
        for k, v in self._pending_config.items():
            setattr(self.config, k, v)
        self._pending_config.clear()

    @contextlib.contextmanager
    def _job_config(self) -> Iterator[None]:
        """The span of one job: waiting changes apply before it starts and after it ends, never inside."""
        with self._config_lock:
            self._apply_pending_config()
            self._jobs_running += 1
        try:
            yield
        finally:
            with self._config_lock:
                self._jobs_running -= 1
                if not self._jobs_running:
                    self._apply_pending_config()

    # ------------------------------------------------------------ models and defaults

    def definition(self, model_type: str) -> ModelDefinition:
        return self.definitions[resolve_model_type(model_type, self.definitions)]

    def model_dir(self, model_type: str | None, model_dir: str | Path | None) -> Path:
        if model_dir is not None:
            return Path(model_dir)
        d = self.definition(model_type or DEFAULT_MODEL_TYPE)
        return handler_for(d.architecture).default_model_dir(d.architecture, self.config.checkpoints_dir)

    def defaults(self, model_type: str | None, model_dir: str | Path | None = None) -> dict[str, Any]:
        """Defaults of model_type (the family's default type when None); with a folder and no type, what the
        folder's own files say (the handler's folder_defaults: Z-Image's scheduler shift)."""
        d = self.definition(model_type or DEFAULT_MODEL_TYPE)
        out = d.defaults()
        if model_type is None and model_dir is not None:
            handler = handler_for(d.architecture)
            out.update(handler.folder_defaults(handler.model_files(Path(model_dir), None)))
        return out

    def latent_preview_factors(self, model_type: str | None) -> PreviewFactors | None:
        """The latent -> RGB preview projection of a model type's family (None: it gives none)."""
        d = self.definition(model_type or DEFAULT_MODEL_TYPE)
        return handler_for(d.architecture).latent_preview_factors(d.architecture)

    def pipeline(
        self,
        model_type: str | None,
        model_dir: str | Path | None = None,
        transformer_file: str | Path | None = None,
        on_event: EventFn | None = None,
        memory_profile: int | None = None,
        cancel: CancelToken | None = None,
        controlnet_file: str | Path | None = None,
    ):
        """The loaded pipeline, reloaded when any part of its key changed; memory_profile (a job's
        override) replaces the configured profile for this load; a cancelled token stops a load between
        its parts (GenerationInterrupted); controlnet_file: a ControlNet loaded with the model (the family's
        handler takes it), like transformer_file a weight file of the model, not of a job."""
        d = self.definition(model_type or DEFAULT_MODEL_TYPE)
        profile = self.config.memory_profile if memory_profile is None else memory_profile
        handler = handler_for(d.architecture)
        quant = (handler.choose_quantization(self.config.transformer_quantization, self.device),
                 handler.choose_quantization(self.config.text_encoder_quantization, self.device))
        if model_dir is None:
            transformer_file = transformer_file or self.fetch_weights(d, quant, on_event)
        elif transformer_file is None and quant[0] in LOWBIT_FORMATS:
            log.warning("transformer %s with --model-dir: the folder's own transformer loads (give the %s file "
                        "with --transformer FILE)", quant[0], quant[0])
        folder = self.model_dir(model_type, model_dir)
        if controlnet_file is None and model_type:  # a ControlNet type's own (its definition names it)
            controlnet_file = handler.controlnet_file(d, folder, quant[0])
        key = (d.model_type if model_type else None, str(folder), str(transformer_file), str(controlnet_file),
               str(self.device), self.dtype, self.vae_dtype, self.config.compile, quant, self.config.attention,
               self.config.fp8_compute, self.config.int8_layers) + self._offload_key(profile)
        with self._lock:
            if self._pipe_key == key:
                return self._pipe
            self.unload()
            try:
                backend = choose_backend(self.config.attention, d.model.get("attention"))
            except ValueError as e:
                raise UserError(str(e)) from None
            log.info("attention backend: %s", backend)

            def progress(i: int, n: int, desc: str) -> None:
                if cancel is not None:
                    cancel.raise_if_cancelled()  # a long load stops at its next part
                if on_event:
                    on_event({"kind": "load", "step": i, "total": n, "desc": desc})

            from app.offload import apply_profile, oom_guard, set_vae_tile_size

            offloaded = self.device.type == "cuda"  # mmgp streams the parts from RAM to the GPU
            with oom_guard("load", profile_no=profile):
                pipe, parts = handler.load_model(
                    model_filename=transformer_file, base_model_type=d.architecture if model_type else None,
                    dtype=self.dtype, VAE_dtype=self.vae_dtype, model_dir=folder,
                    device="cpu" if offloaded else self.device, progress=progress, compile=self.config.compile,
                    transformer_quantization=quant[0], text_encoder_quantization=quant[1],
                    save_quantized=self.config.save_quantized, attention_backend=backend,
                    fp8_compute=self._fp8_compute(), int8_layers=self.config.int8_layers,
                    **({"controlnet_file": controlnet_file} if controlnet_file is not None else {}),
                )
                self._offload = apply_profile(
                    parts, profile, preload_mb=self.config.preload_mb,
                    perc_reserved_mem_max=self.config.perc_reserved_mem_max, vae_dtype=self.vae_dtype,
                    device=self.device, overlap_transfers=self.config.overlap_transfers)
            if offloaded:
                pipe.device = self.device
                set_vae_tile_size(parts["vae"])
            # on the CPU no profile is applied: none to show as the loaded model's
            self._pipe, self._pipe_key, self.pipe_memory_profile = pipe, key, profile if offloaded else None
            self.attention_backend = backend
            converter = handler_for(d.architecture).lora_converter()
            if converter is not None:
                from models.lora_runtime import LoraManager

                # constant strengths merge into the weights; under mmgp into the CPU copies it streams from
                weights = self._offload.parameter_copies if self._offload is not None else None
                self._lora_manager = LoraManager(pipe.transformer, converter, weights=weights,
                                                 merge_room=merge_room)
            return pipe

    def _offload_key(self, profile: int) -> tuple:
        """The pipeline key's offload settings: only mmgp (CUDA) uses them; on the CPU they are recorded, not
        applied, so a job's memory profile there must not reload the model."""
        if self.device.type != "cuda":
            return ()
        return (profile, self.config.preload_mb, self.config.perc_reserved_mem_max, self.config.overlap_transfers)

    def _fp8_compute(self) -> bool:
        """Whether fp8 weights multiply in fp8 on this device (ServiceConfig.fp8_compute); a device that cannot
        is said once per load (a warning when it was asked for)."""
        mode = self.config.fp8_compute
        if mode is False or (mode is None and self.device.type != "cuda"):
            return False
        from models.lowbit import fp8_compute_problem

        problem = fp8_compute_problem(self.device, self.dtype)
        if problem is not None:
            (log.warning if mode else log.info)(
                "fp8 compute unavailable: %s; fp8 weights are dequantized per layer (same images, bf16 speed)",
                problem)
        return problem is None

    def fetch_weights(self, d: ModelDefinition, quant: tuple[str, str], on_event: EventFn | None = None) -> Path | None:
        """Download what a type needs (quant: the transformer's format, bf16 / int8 / a low-bit one, and the text
        encoder's bf16 / int8) into the checkpoints folder; returns the transformer file to load instead of the
        folder's own (a finetune's, a low-bit download), if any."""
        handler = handler_for(d.architecture)
        tq, teq = quant
        self._download(handler.files_to_download(d, self.config.checkpoints_dir, tq, teq), on_event)
        return handler.local_transformer(d, tq, self.config.checkpoints_dir)

    @staticmethod
    def _download(specs: list, on_event: EventFn | None) -> None:
        """The missing files of specs downloaded (a "download" event first), UserError when they cannot be."""
        if not specs:  # most jobs: not even the downloader's imports (the GPU bench machine lacks its client)
            return
        from models.downloads import download_files, missing_files

        missing = missing_files(specs)
        if missing and on_event:
            on_event({"kind": "download", "files": [s.repo_path for s in missing]})
        download_files(specs)  # no request at all when nothing is missing

    @property
    def pipeline_key(self) -> tuple | None:
        """What the loaded pipeline was loaded for (model type, folder, files, device, dtypes, profile...); None
        when nothing is loaded. A change of it means a (re)load."""
        return self._pipe_key

    def memory_status(self) -> dict[str, Any]:
        """Device, whether a model is loaded, VRAM (CUDA) and RAM use in bytes (None where unknown)."""
        out: dict[str, Any] = {"device": str(self.device), "loaded": self._pipe is not None,
                               "vram_free": None, "vram_total": None, "ram_used": None, "ram_total": None}
        if self.device.type == "cuda":
            try:
                out["vram_free"], out["vram_total"] = torch.cuda.mem_get_info(self.device)
            except RuntimeError:
                pass
        try:
            import psutil

            vm = psutil.virtual_memory()
            out["ram_used"], out["ram_total"] = vm.total - vm.available, vm.total
        except ImportError:
            pass
        return out

    def unload(self) -> None:
        with self._lock:
            if self._offload is not None:
                from app.offload import release

                release(self._offload)
            self._pipe, self._pipe_key, self._lora_manager, self._offload = None, None, None, None
            self.pipe_memory_profile = self.attention_backend = None
            from app.offload import empty_caches

            empty_caches()  # the models are gone now: their pinned RAM too

    def token_count(self, model_type: str, prompt: str) -> int | None:
        """Tokens the prompt takes with this model's tokenizer (None until its files are there). Only the first
        MAX_PROMPT_CHARS characters are counted: jobs never keep more, and tokenizing megabytes takes seconds."""
        prompt = prompt[:MAX_PROMPT_CHARS]
        d = self.definition(model_type)
        try:
            folder = self.model_dir(model_type, None)
        except UserError:
            return None
        return handler_for(d.architecture).count_tokens(folder, d.architecture, prompt)

    def lora_library(self, model_type: str | None = None):
        """The LoRA folder of a model type's family (scanned once; `refresh()` rescans)."""
        from app.loras import LoraLibrary, lora_dir_for

        handler = handler_for(self.definition(model_type or DEFAULT_MODEL_TYPE).architecture)
        if handler.family not in self._libraries:
            folder = lora_dir_for(handler.lora_subdir, self.config.loras_root,
                                  self.config.lora_dirs.get(handler.lora_subdir))
            self._libraries[handler.family] = LoraLibrary(folder)
        return self._libraries[handler.family]

    def _sync_loras(self, spec: JobSpec, allow_paths: bool) -> list[str]:
        """Apply the job's LoRAs (only re-patching when the selection changed); their reports."""
        if self._lora_manager is None:
            if spec.loras:
                raise UserError(f"{spec.model_type} does not take LoRAs")
            return []
        strengths = {}
        for item in spec.loras:
            if not isinstance(item, dict) or "name" not in item:
                raise UserError(f"bad LoRA entry {item!r}: expected {{'name': ..., 'strength': ...}}")
            strengths[str(item["name"])] = item.get("strength", 1.0)
        files, labels = self.lora_library(spec.model_type).resolve_selection(strengths, allow_paths=allow_paths)
        if self.device.type == "cuda":  # merges write into copies mmgp may still be moving: let it finish
            torch.cuda.synchronize(self.device)
        reports = self._lora_manager.sync(files, labels)
        arch = self.definition(spec.model_type).architecture
        note = handler_for(arch).lora_note(arch) if files else None
        if note and arch in self._lora_noted:
            note = None
        if note:  # once per run of the app, in the log and with the job's LoRA reports
            self._lora_noted.add(arch)
            log.warning("%s", note)
        if self.device.type == "cuda":  # weights offloaded to the CPU, inputs on the GPU
            self._lora_manager.materialize(self.device, self.dtype)
        for r in reports:  # unmatched keys were warned about, with their reasons, when the file was read
            log.info("%s", r.summary)
        return [r.summary for r in reports] + ([note] if note else [])

    # ------------------------------------------------------------ generation

    def generate(
        self,
        spec: JobSpec,
        *,
        model_dir: str | Path | None = None,
        transformer_file: str | Path | None = None,
        controlnet_file: str | Path | None = None,
        model_type_given: bool = True,
        output_dir: Path | None = None,
        file_names: list[Path] | None = None,
        on_event: EventFn | None = None,
        allow_lora_paths: bool = False,
        existing_images: dict[int, str | Path] | None = None,
        batch_seed: int | None = None,
        cancel: CancelToken | None = None,
    ) -> JobResult:
        """Render spec (validated where it came in: app.jobs.validate) and save its images; file_names (one per
        image) override the naming scheme.

        Each image is reported as it is saved (event "image": index, seed, batch_seed, path), so a caller can
        record it at once. A retry passes what was recorded: existing_images (index -> path; those still on disk
        are kept, not rendered again) and batch_seed (the seed image 0 had): only the missing images are
        rendered, each with the seed and name it would have had in the first run.

        cancel: this job's token (the caller keeps it; `cancel.cancel()` from any thread stops the job within a
        step, or between the parts of a model load, with GenerationInterrupted).
        """
        with self._job_config():  # the job reads one configuration; changes wait until it ends
            cancel = cancel if cancel is not None else CancelToken()
            # spec was validated where it came in (the CLI, the queue's submit or restore): trusted here
            d = self.definition(spec.model_type)
            warnings = size_warnings(spec, int(d.defaults().get("min_recommended_size", 0)))
            for w in warnings:
                log.warning(w)
            if file_names is not None and len(file_names) != spec.num_images:
                raise ValueError("one file name per image")
            kept = {int(i): Path(p) for i, p in (existing_images or {}).items()
                    if 0 <= int(i) < spec.num_images and Path(p).is_file()}
            missing = [i for i in range(spec.num_images) if i not in kept]
            seed = batch_seed if batch_seed is not None else resolve_seed(spec.seed)
            if spec.seed == -1 and batch_seed is None:
                log.info("random seed: %d", seed)
            if kept:
                log.info("%d of %d images already written; rendering %s", len(kept), spec.num_images,
                         ", ".join(str(i + 1) for i in missing) or "none")
            per_step, lora_reports = 0.0, []
            paths: dict[int, Path] = dict(kept)
            settings: dict[int, dict[str, Any]] = {}
            start = time.perf_counter()
            if missing:
                profile = self.config.memory_profile if spec.memory_profile is None else spec.memory_profile
                if spec.memory_profile is not None:
                    log.info("memory profile %d for this job (configured: %d)%s", profile, self.config.memory_profile,
                             "" if self.device.type == "cuda" else "; recorded only: no mmgp offload on the CPU")
                arch = d.architecture
                self._download(handler_for(arch).job_files(spec.pipeline_values(arch), self.config.checkpoints_dir),
                               on_event)  # before the model load: an offline job without them fails at once
                pipe = self.pipeline(spec.model_type if model_type_given else None, model_dir, transformer_file,
                                     on_event, memory_profile=profile, cancel=cancel,
                                     controlnet_file=controlnet_file)
                lora_reports = self._sync_loras(spec, allow_lora_paths)
                # consecutive missing images render together (image i of a batch uses seed + i, so a run starting at
                # image k with seed + k gives the same images as the full batch)
                runs: list[list[int]] = []
                for i in missing:
                    if runs and runs[-1][-1] == i - 1:
                        runs[-1].append(i)
                    else:
                        runs.append([i])
                start = time.perf_counter()  # sampling and saving time, as before: the model load is not counted
                for run in runs:
                    per_step = self._render_run(pipe, spec, run, seed, profile, output_dir, file_names, on_event,
                                                paths, settings, cancel)
            elapsed = time.perf_counter() - start
            order = range(spec.num_images)
            result_paths = [paths[i] for i in order]
            seeds = [seed + i for i in order]
            if on_event:
                on_event({"kind": "done", "paths": result_paths, "seconds": elapsed, "seconds_per_step": per_step})
            return JobResult(result_paths, seeds, [settings.get(i, {}) for i in order], elapsed, per_step, warnings,
                             lora_reports)

    def _render_run(self, pipe, spec: JobSpec, indexes: list[int], seed: int, profile: int,
                    output_dir: Path | None, file_names: list[Path] | None, on_event: EventFn | None,
                    paths: dict[int, Path], settings: dict[int, dict[str, Any]], cancel: CancelToken) -> float:
        """Render images indexes (consecutive) of spec's batch and save each as it comes; seconds per step."""
        first, count = indexes[0], len(indexes)
        from app.offload import OomGuard

        guard = OomGuard("encode", self._offload, profile_no=profile, width=spec.width,
                         height=spec.height, num_images=count)
        observer = StepObserver(
            on_event, guard, lora_step=self._lora_manager.step_start if self._lora_manager is not None else None,
            sync_device=self.device if self.device.type == "cuda" and on_event is not None else None)
        with guard:
            arch = self.definition(spec.model_type).architecture
            out = handler_for(arch).render(
                pipe, arch, **spec.pipeline_values(arch), num_images_per_prompt=count,
                seed=seed + first,
                callback=observer.step_end, interrupt=cancel.is_cancelled, step_start=observer.step_start,
                vae_tiling=functools.partial(self._decode_tiled, profile, spec.height, spec.width, count),
                checkpoints_dir=self.config.checkpoints_dir, on_event=on_event,
            )
        when = datetime.now()
        from app.metadata import EXTENSIONS

        ext = EXTENSIONS[self.config.output_format]
        inputs: dict[str, str] | None = None
        for index, image, image_seed in zip(indexes, out.images, out.seeds):
            s = {**spec.to_dict(), "seed": image_seed, "batch_seed": seed, "image_index": index,
                 "dtype": self.dtype_name, "created": when.isoformat(timespec="seconds")}
            if file_names is not None:
                path = file_names[index]
            else:
                folder = Path(output_dir or self.config.output_dir)
                path = unique_path(folder / output_name(when, image_seed, index + 1, spec.prompt, ext))
            if inputs is None:
                inputs = self._save_inputs(spec, path)
                # what the render made besides the images (a control map): shown beside the output, not re-read
                for suffix, picture in (getattr(out, "side_images", None) or {}).items():
                    save_image_atomic(picture, input_copy_path(output=path, param=suffix), None)
            s.update(inputs)
            paths[index] = save_image_atomic(image, path, s if self.config.save_metadata else None,
                                             quality=self.config.output_quality)
            settings[index] = s
            if on_event:  # recorded by the caller now: a crash later does not orphan this file
                on_event({"kind": "image", "index": index, "seed": image_seed, "batch_seed": seed,
                          "path": paths[index]})
        return observer.seconds_per_step()

    def _save_inputs(self, spec: JobSpec, output: Path) -> dict[str, str]:
        """Copies of the job's input files (image, mask) beside its first output, `<name>_input.png` and
        `<name>_mask.png`, so the output's metadata can name them (by file name: app.metadata resolves them in
        the image's folder) and `generate --from-image` or a restore runs the job again."""
        from models import image_inputs as ii

        out: dict[str, str] = {}
        for p in params_of(self.definition(spec.model_type).architecture):
            value = getattr(spec, p.name)
            if not p.is_file or not value:
                continue
            picture = ii.load_mask(value) if p.widget == "mask" else ii.load_image(value)
            out[p.name] = save_image_atomic(picture, input_copy_path(output, p.name), None).name
        return out

    def _decode_tiled(self, profile: int, height: int, width: int, count: int) -> bool:
        """Whether the VAE decodes in tiles; decided just before the decode: the transformer's cached activation
        memory is returned first, so the decision sees what the VAE can really use."""
        if self.config.vae_tiling:
            return True
        if self.device.type != "cuda":
            return False
        from app.offload import decode_needs_tiling, free_device_bytes

        torch.cuda.empty_cache()
        return decode_needs_tiling(profile, free_device_bytes(self.device), height, width, self.vae_dtype, count)


__all__ = ["GenerationService", "ServiceConfig", "JobResult", "GenerationInterrupted", "resolve_device"]
