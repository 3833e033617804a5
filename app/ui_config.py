"""The page's Config section: memory profile, attention, compile, quantization, output folder / format /
quality / metadata, saved to the configuration file (applied at the next start); Unload models; device,
memory profile, attention backend and VRAM / RAM use, current on page load and within a second of a change.
Also the choices of the generation controls' per-job memory profile (memory_override_choices).

Output format, quality and metadata apply at once to the running service; the model options at the next
model load (the next job reloads the model when they changed); the output folder at the next start.
API endpoints: /save_config, /unload_models, /system_info.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.app_config import (
    ATTENTION_CHOICES,
    FORMAT_CHOICES,
    MODEL_KEYS,
    QUANTIZATION_CHOICES,
    TRANSFORMER_QUANTIZATION_CHOICES,
    save_config,
    validate_config,
)
from app.queue import JobQueue
from models.errors import UserError

if TYPE_CHECKING:
    from app.service import GenerationService, ServiceConfig

log = logging.getLogger(__name__)
GIB = 1024 ** 3


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def memory_override_choices() -> list[tuple[str, str]]:
    """The generation controls' per-job memory profile: the Config section's ("default") or 1-5, described."""
    from app.jobs import DEFAULT_MEMORY_PROFILE
    from app.offload import PROFILE_DESCRIPTIONS

    return [("default (from Config)", DEFAULT_MEMORY_PROFILE),
            *((f"{n} · {d}", str(n)) for n, d in PROFILE_DESCRIPTIONS.items())]


def system_info_text(service: GenerationService) -> str:
    from app.offload import PROFILE_NAMES
    m = service.memory_status()
    cfg = service.config
    backend = service.attention_backend if m["loaded"] else None
    parts = [f"**Device** {m['device']}",
             f"**Memory profile** {cfg.memory_profile} ({PROFILE_NAMES.get(cfg.memory_profile, '?')})"
             + ("" if m["device"].startswith("cuda") else ", used on CUDA only")
             # a job's per-generation override loaded the model with another one
             + (f"; loaded model: {service.pipe_memory_profile}" if m["loaded"] and getattr(
                 service, "pipe_memory_profile", None) not in (None, cfg.memory_profile) else ""),
             f"**Attention** {backend + ' (' + cfg.attention + ')' if backend else cfg.attention}",
             f"**Model** {'loaded' if m['loaded'] else 'not loaded'}"]
    if m["vram_total"] is not None:
        parts.append(f"**VRAM** {_gib(m['vram_total'] - m['vram_free'])} used of {_gib(m['vram_total'])}")
    if m["ram_total"] is not None:
        parts.append(f"**RAM** {_gib(m['ram_used'])} used of {_gib(m['ram_total'])}")
    return " · ".join(parts)


def build_config_section(queue: JobQueue, service: GenerationService, config: ServiceConfig,
                         config_file: str | Path) -> dict[str, Any]:
    """The Config accordion (inside a gr.Blocks); returns its components by elem_id."""
    from app.offload import PROFILE_DESCRIPTIONS

    config_file = Path(config_file)
    parts: dict[str, Any] = {}
    with gr.Accordion("Config", open=False, elem_id="config"):
        # a callable value is computed at each page load: the facts of now, not of when the page was built
        info = gr.Markdown(lambda: system_info_text(service), elem_id="system-info")
        shown = gr.State("")  # per tab: the facts it shows, so the timer below sends only changes
        with gr.Row():
            profile = gr.Dropdown([(f"{n} · {d}", n) for n, d in PROFILE_DESCRIPTIONS.items()],
                                  value=config.memory_profile, label="Memory profile (CUDA)",
                                  elem_id="cfg-memory-profile", scale=3)
            attention_dd = gr.Dropdown(list(ATTENTION_CHOICES), value=config.attention, label="Attention backend",
                                    elem_id="cfg-attention", scale=1)
            compile_box = gr.Checkbox(bool(config.compile), label="torch.compile the transformer",
                                      elem_id="cfg-compile", scale=1)
        with gr.Row():
            tq = gr.Dropdown(list(TRANSFORMER_QUANTIZATION_CHOICES), value=config.transformer_quantization,
                             label="Transformer quantization", elem_id="cfg-transformer-quantization",
                             info="fp8 / gguf-q8 / gguf-q4: where the model lists such a file (`models` shows them)")
            teq = gr.Dropdown(list(QUANTIZATION_CHOICES), value=config.text_encoder_quantization,
                              label="Text encoder quantization", elem_id="cfg-text-encoder-quantization")
        with gr.Row():
            out_dir = gr.Textbox(str(config.output_dir), label="Output folder (next start)",
                                 elem_id="cfg-output-dir", max_lines=1, scale=3)
            fmt = gr.Dropdown(list(FORMAT_CHOICES), value=config.output_format, label="Output format",
                              elem_id="cfg-output-format", scale=1)
            quality = gr.Slider(1, 100, config.output_quality, step=1, label="JPEG / WebP quality",
                                elem_id="cfg-output-quality", scale=2)
            metadata = gr.Checkbox(bool(config.save_metadata), label="Store settings in images",
                                   elem_id="cfg-save-metadata", scale=1)
        with gr.Row():
            save_btn = gr.Button("Save", variant="primary", elem_id="cfg-save", size="sm")
            unload_btn = gr.Button("Unload models", elem_id="cfg-unload", size="sm")
            refresh_btn = gr.Button("↻ Refresh", elem_id="cfg-refresh", size="sm")
        message = gr.Markdown("", elem_id="cfg-message")
    parts.update({"system-info": info, "cfg-message": message, "cfg-save": save_btn, "cfg-unload": unload_btn})

    def save(memory_profile: Any, attention: str, compile: bool, transformer_quantization: str,
             text_encoder_quantization: str, output_dir: str, output_format: str, output_quality: Any,
             save_metadata: bool) -> str:
        """Save the configuration (applied at the next start); output format / quality / metadata apply now."""
        data = {"memory_profile": memory_profile, "attention": attention, "compile": bool(compile),
                "transformer_quantization": transformer_quantization,
                "text_encoder_quantization": text_encoder_quantization, "output_dir": output_dir or "",
                "output_format": output_format, "output_quality": output_quality,
                "save_metadata": bool(save_metadata)}
        try:
            clean = validate_config(data)
            save_config(config_file, clean)
        except (UserError, OSError) as e:
            raise gr.Error(f"Configuration not saved: {e}", print_exception=False) from None
        cfg = service.config
        # handed to the service, which applies them between jobs: never under a running job's feet
        changed = service.update_config({k: clean[k] for k in ("output_format", "output_quality", "save_metadata",
                                                               *MODEL_KEYS)})
        model_changed = [k for k in MODEL_KEYS if k in changed]
        notes = ["output format, quality and metadata apply to the next image"]
        if model_changed:
            notes.append(f"{', '.join(k.replace('_', ' ') for k in model_changed)}: at the next model load")
        if Path(clean["output_dir"]) != Path(cfg.output_dir):
            notes.append("output folder: at the next start")
        log.info("configuration saved to %s", config_file)
        return f"Saved to {config_file}; " + "; ".join(notes) + "."

    save_btn.click(save, [profile, attention_dd, compile_box, tq, teq, out_dir, fmt, quality, metadata], message,
                   api_name="save_config", queue=False, show_progress="hidden").then(
        lambda: system_info_text(service), None, info, queue=False, show_progress="hidden",
        api_visibility="private")

    def unload() -> str:
        """Free the loaded models (refused while a job runs)."""
        unloaded: list[bool] = []  # the app's model and, with Ray, each worker's
        if not queue.when_idle(lambda: unloaded.append(queue.executor.unload())):
            return "A job is running: stop it or wait for it to end, then unload."
        return "Models unloaded." if any(unloaded) else "No model was loaded."

    unload_btn.click(unload, None, message, api_name="unload_models", concurrency_id="gpu",
                     show_progress="hidden").then(lambda: system_info_text(service), None, info, queue=False,
                                                  show_progress="hidden", api_visibility="private")

    def system_info() -> str:
        """Device, memory profile, attention backend, VRAM and RAM use."""
        return system_info_text(service)

    refresh_btn.click(system_info, None, info, api_name="system_info", queue=False, show_progress="hidden")

    def facts_changed(last: str) -> tuple:
        # every second, but cheap (no lock, psutil / mem_get_info) and sent only when a fact changed: a job
        # that loaded the model, an unload from another tab or the API, RAM use at the shown 0.1 GiB
        text = system_info_text(service)
        return (gr.skip(), gr.skip()) if text == last else (text, text)

    gr.Timer(1.0).tick(facts_changed, shown, [info, shown], queue=False, show_progress="hidden",
                       api_visibility="private")
    return parts
