"""The Gradio page's layout and wiring: settings, Generate / Abort, progress and live preview, results
gallery, job queue.

The generation form's controls come from the parameter declarations (app/ui_params.py); every event is
a method of app/ui_controller.PageController, which this module only binds to components. Handlers
never generate: they submit to the JobQueue and read it (a 1 s timer polls a snapshot), so closing or
reloading the tab never stops a job and a reopened tab shows the queue and the results.
Named API endpoints (see README): /generate, /stop, /queue, /remove, /move_up, /move_down, /retry,
/clear_finished, /last_seed, /restore, /lora_refresh, /token_count, the generation profiles'
(app/ui_profiles.py) and the Config section's /save_config, /unload_models, /system_info (app/ui_config.py).
No torch here.
"""

from __future__ import annotations

import html
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.jobs import DEFAULT_MEMORY_PROFILE
from app.queue import JobQueue
from app.served_files import served_files
from app.settings import ProfileStore
from app.ui_controller import PageController
from app.ui_form import FORM_PENDING, STORAGE_KEY, form_keys, form_params, save_form_js
from app.ui_params import ParamForm
from app.ui_profiles import build_profiles_section, profile_choices
from app.ui_view import (  # noqa: F401  (re-exported: the page's pure helpers, tested from here)
    CUSTOM,
    PRESETS,
    TABLE_MAX_CHARS,
    TABLE_WIDTHS,
    is_local_request,
    open_output_folder,
    preset_for,
    progress_html,
    queue_table,
    status_after,
)
from models.errors import UserError

if TYPE_CHECKING:  # the service module imports torch; the page itself does not need it
    from app.service import GenerationService, ServiceConfig

log = logging.getLogger(__name__)

CSS = """
#title h1 { margin: 0; font-size: 1.6rem; }
#generate { min-height: 64px; font-size: 1.15rem; }
#progress .bar { height: 8px; background: var(--neutral-200); border-radius: 4px; overflow: hidden; margin-top: 4px; }
#progress .bar > div { height: 100%; background: var(--color-accent); transition: width 0.4s; }
#progress .muted { color: var(--body-text-color-subdued); }
#progress .error { color: var(--error-text-color); }
#model-files pre { max-height: 14em; overflow: auto; }
/* the settings column until the page-load handler filled it (app/ui_form.py); shown anyway after 5 s */
.wgp-form-pending { visibility: hidden; animation: wgp-reveal 0s linear 5s forwards; }
@keyframes wgp-reveal { to { visibility: visible; } }
/* small buttons beside a labelled box: at the box's foot, their own height (a stretched row made them huge) */
.wgp-inline-btn { align-self: flex-end !important; flex-grow: 0 !important; margin-bottom: var(--block-padding, 10px); }
"""
CHEAP = {"queue": False, "show_progress": "hidden"}  # events that only read or set controls
PRIVATE = {**CHEAP, "api_visibility": "private"}


def launch_options(output_dir: str | Path, private_files: list[str | Path] | tuple = ()) -> dict[str, Any]:
    """Keyword arguments for demo.launch() that the page needs (tests pass them too).

    private_files (the queue, the config) are refused even if a later change serves their folder."""
    return {
        "theme": gr.themes.Soft(primary_hue="orange", secondary_hue="slate"),
        "css": CSS,
        # only the images the gallery lists are served, never the output folder (app/served_files.py)
        "allowed_paths": served_files(output_dir),
        "blocked_paths": [os.path.abspath(p) for p in private_files],
        # prompts stay on this machine's server, not in the browser's run history
        "run_history": False,
    }


def as_tuple(keys: Sequence[str], updates: Mapping[str, Any]) -> tuple:
    """A controller's {key: value} as the values of outputs named by keys (absent ones unchanged)."""
    return tuple(updates[k] if k in updates else gr.skip() for k in keys)


def api_function(name: str, doc: str, arguments: Sequence[tuple[str, Any, Any]],
                 call: Callable[[list[Any], gr.Request | None], Any]) -> Callable[..., Any]:
    """A function whose signature is arguments ((name, annotation, default) each, the API's argument names)
    plus Gradio's request, calling call(values, request): an endpoint whose arguments follow declarations."""
    def endpoint(*values: Any) -> Any:
        *values, request = values if len(values) > len(arguments) else (*values, None)
        return call(list(values), request)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
              for n, a, d in arguments]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=gr.Request))
    endpoint.__signature__ = inspect.Signature(params, return_annotation=str)  # type: ignore[attr-defined]
    endpoint.__annotations__ = {**{n: a for n, a, _ in arguments}, "request": gr.Request, "return": str}
    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = doc
    return endpoint


# ------------------------------------------------------------------ the page

def build_ui(queue: JobQueue, service: GenerationService, config: ServiceConfig,
             profiles_dir: str | Path | None = None, config_file: str | Path | None = None,
             notice: str = "") -> gr.Blocks:
    """The page for queue (running jobs through service); config.output_dir feeds the gallery.

    notice: a warning shown at the top of the page (serving on the network without --auth).

    config_file: where the Config section saves (default <output folder>/wgp_zimage_config.json).

    profiles_dir (else config.profiles_dir when it has one): the generation profiles folder, which also
    keeps the per-model defaults and the last used settings (restored when a page opens). Without
    either, the page has no generation profiles section and remembers nothing.
    """
    output_dir = Path(config.output_dir)
    profiles_dir = profiles_dir if profiles_dir is not None else getattr(config, "profiles_dir", None)
    store = ProfileStore(profiles_dir) if profiles_dir is not None else None
    params = form_params()
    ctl = PageController(queue, service, store, params)
    first = ctl.first
    form = ParamForm(params, ctl.layouts, ctl.first_values(), first, ctl.conditions)
    from app.ui_config import memory_override_choices  # reads app.offload's descriptions (torch)

    with gr.Blocks(title="wgp-zimage") as demo:
        c: dict[str, Any] = {}  # the components events read or set, by the controller's keys
        # this browser's form (app/ui_form.py). Not a secret (Gradio hands it to the page, which encrypts with
        # it): a fixed one lets the saved form survive a restart of the app
        form_state = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=STORAGE_KEY)
        seen = gr.State({})  # per tab: which queue / preview / gallery version it shows
        selected_image = gr.State("")
        if notice:
            gr.Markdown(f"⚠ **{html.escape(notice)}**", elem_id="exposure-warning")
        with gr.Row(equal_height=True):
            gr.Markdown("# wgp-zimage · Z-Image", elem_id="title")
            # values stay the model type names (the API's); labels mark the models whose files are missing
            c["model"] = gr.Dropdown(ctl.model_choices(), value=first, label="Model", elem_id="model-type", scale=2)
            c["model_info"] = gr.Markdown(ctl.defs[first].description, elem_id="model-info",
                                          label="model description")
        # the chosen model's missing files, their URLs and folders, the size to download (hidden when installed)
        model_files = gr.Markdown("", elem_id="model-files", visible=False)
        with gr.Row(equal_height=False):
            # hidden (FORM_PENDING) until the page-load handler has put the user's settings in
            with gr.Column(scale=5, elem_id="settings-column", elem_classes=[FORM_PENDING]) as settings_column:
                _settings_column(c, ctl, form, store, memory_override_choices())
            with gr.Column(scale=6):
                _results_column(c, any(p.widget == "image" for p in params), form.has_group("control"))

        from app.app_config import CONFIG_FILE
        from app.ui_config import build_config_section

        build_config_section(queue, service, config, config_file or output_dir / CONFIG_FILE)
        _wire_jobs(demo, c, ctl, seen, selected_image, form)
        _wire_settings(demo, c, ctl, form, model_files, selected_image)
        _wire_form_memory(demo, c, ctl, form, form_state, settings_column, model_files, store)
    return demo


def _settings_column(c: dict[str, Any], ctl: PageController, form: ParamForm, store: ProfileStore | None,
                     memory_choices: list) -> None:
    """The prompt, the declared parameters' controls, LoRAs, Advanced, restore and the profiles section."""
    c["prompt"] = gr.Textbox(label="Prompt", lines=4, max_lines=20, elem_id="prompt",
                             placeholder="a red fox in the snow, golden hour, 35 mm photo")
    c["token_info"] = gr.Markdown("", elem_id="token-count")
    c["one_per_line"] = gr.Checkbox(False, label="One job per line (lines starting with # are skipped)",
                                    elem_id="one-per-line")
    first = form.values

    def preset() -> None:  # beside width and height
        c["preset"] = gr.Dropdown([*PRESETS, CUSTOM], value=preset_for(first.get("width"), first.get("height")),
                                  label="Resolution", elem_id="resolution-preset", scale=2)

    def seed_buttons() -> None:  # between the seed and the number of images
        with gr.Column(scale=1, min_width=110):
            c["reuse_seed"] = gr.Button("♻ Last seed", elem_id="reuse-seed", size="sm")
            c["random_seed"] = gr.Button("🎲 Random", elem_id="random-seed", size="sm")

    # number boxes (not sliders) where a typed value must not be clamped: Generate refuses an out-of-range
    # value with the CLI's message (the ranges live in the declarations)
    form.build("main", before={"width": preset}, after={"seed": seed_buttons})
    if form.has_group("image"):
        with gr.Accordion("Image input: img2img, inpaint, outpaint, upscale", open=False, elem_id="image-input"):
            form.build("image")
    if form.has_group("control"):
        _control_section(c, ctl, form)
    with gr.Accordion("LoRAs", open=True, elem_id="loras"):
        with gr.Row(equal_height=True):
            c["lora_select"] = gr.Dropdown(ctl.lora_names(), value=[], multiselect=True, label="LoRAs",
                                           info="from the LoRA folder", elem_id="lora-select", scale=5)
            c["lora_refresh"] = gr.Button("↻ Refresh", elem_id="lora-refresh", size="sm", scale=1, min_width=80,
                                          elem_classes=["wgp-inline-btn"])
        c["lora_strengths"] = gr.Textbox(
            "", label="Strengths (one name=strength line per LoRA)", lines=2, max_lines=12,
            elem_id="lora-strengths", placeholder="my_style=0.8",
            info="a number, or one per step spread over the steps: 1.0,0.5")
        c["lora_triggers"] = gr.Radio([], value=None, label="Trigger words (click to add to the prompt)",
                                      elem_id="lora-triggers", visible=False)
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        form.build("advanced")
        c["memory_profile"] = gr.Dropdown(
            memory_choices, value=DEFAULT_MEMORY_PROFILE, label="Memory profile for these jobs (CUDA)",
            info="default: the Config section's; a profile other than the loaded model's reloads it",
            elem_id="memory-profile-override",
            allow_custom_value=True)  # a bad API value gets our message, not Gradio's
    with gr.Accordion("Restore settings from an image or a settings file", open=True, elem_id="restore"):
        c["restore_file"] = gr.File(label="Drop an image made by this app, or a settings JSON",
                                    file_types=[".png", ".jpg", ".jpeg", ".webp", ".json"], type="filepath",
                                    elem_id="restore-png", height=140)
        c["restore_message"] = gr.Markdown("", elem_id="restore-message")
    c.update(form.controls)
    if store is not None:
        keys = _settings_keys(form)
        inputs = {"model_type": c["model"], "prompt": c["prompt"],
                  **{p.name: c[p.name] for p in form.params if p.in_profile}, "loras": c["lora_strengths"]}
        c["profiles"] = build_profiles_section(store, inputs, [c[k] for k in keys],
                                               lambda st: as_tuple(keys, ctl.settings_updates(st)),
                                               lambda: ctl.lora_names())


def _control_section(c: dict[str, Any], ctl: PageController, form: ParamForm) -> None:
    """The ControlNet's inputs (shown for the model types that have one) and a preview of the control map."""
    shown = ctl.shows_group(ctl.first, "control")
    with gr.Accordion("ControlNet: control image, type, strength", open=True, elem_id="control-section",
                      visible=shown) as c["control_section"]:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                form.build("control")
            with gr.Column(scale=2):
                c["control_preview"] = gr.Image(label="Control map (what the ControlNet sees)", interactive=False,
                                                height=240, elem_id="control-map-preview", buttons=[])
                c["control_preview_button"] = gr.Button("Preview map", elem_id="control-map-button", size="sm")


def _settings_keys(form: ParamForm) -> list[str]:
    """The controls a profile, a restored file or a saved form sets."""
    return ["model", "prompt", *(p.name for p in form.params), "preset", "model_info", "lora_select",
            "lora_strengths", "lora_triggers"]


def _results_column(c: dict[str, Any], inputs: bool, controls: bool) -> None:
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
        c["abort"] = gr.Button("Abort", variant="stop", elem_id="abort", scale=1)
    c["status"] = gr.Markdown("", elem_id="status", label="Status message")
    c["last_ids"] = gr.Textbox(label="Last submitted job IDs", elem_id="last-job-ids", interactive=False,
                               visible=False)
    with gr.Row(equal_height=False):
        c["progress"] = gr.HTML("", elem_id="progress")
    with gr.Row(equal_height=False):
        c["preview"] = gr.Image(label="Live preview", elem_id="preview", interactive=False, height=256, scale=1,
                                buttons=[])
        c["gallery"] = gr.Gallery(label="Results (newest first)", elem_id="gallery", columns=4, height=420,
                                  object_fit="contain", scale=2, interactive=False)
    with gr.Row(equal_height=True):
        c["use_settings"] = gr.Button("Load settings of the selected image", elem_id="use-image-settings",
                                      size="sm", scale=3)
        if inputs:  # the model families take input images
            c["use_input"] = gr.Button("Use as input image", elem_id="use-as-input", size="sm", scale=2)
        if controls:  # and control images
            c["use_control"] = gr.Button("Use as control image", elem_id="use-as-control", size="sm", scale=2)
        # shown on page load to a browser on this machine only (is_local_request)
        c["open_outputs"] = gr.Button("📂 Open output folder", elem_id="open-output-folder", size="sm", scale=1,
                                      visible=False)
    with gr.Group():
        c["table"] = gr.Dataframe(queue_table([]), label="Queue (click a row to select it)", elem_id="queue-table",
                                  interactive=False, wrap=True, max_height=320, column_widths=TABLE_WIDTHS,
                                  # a long result or error stays one or two lines; a click on the cell shows it
                                  max_chars=TABLE_MAX_CHARS)
        with gr.Row(equal_height=True):
            c["job_id"] = gr.Textbox(show_label=False, placeholder="job ID (click a row)", elem_id="job-id",
                                     scale=3, min_width=120, max_lines=1, container=False)
            for label, eid in (("▲ Up", "job-up"), ("▼ Down", "job-down"), ("↻ Retry", "job-retry"),
                               ("✕ Remove", "job-remove"), ("Clear finished", "queue-clear-finished")):
                c[eid] = gr.Button(label, elem_id=eid, size="sm", scale=1, min_width=60)


def _generate_inputs(c: dict[str, Any], form: ParamForm) -> tuple[list[Any], list[tuple[str, Any, Any]], list[str]]:
    """/generate's components, its arguments ((API name, type, default)) and the controller's keys for them."""
    before = [("model_type", str, None, "model"), ("prompt", str, None, "prompt"),
              ("one_per_line", bool, False, "one_per_line")]
    declared = [(p.api_name, p.kind, None, p.name) for p in form.params]
    after = [("loras", str, "", "lora_strengths"), ("memory_profile", str, DEFAULT_MEMORY_PROFILE, "memory_profile")]
    rows = [*before, *declared, *after]
    components = [form.controls[k] if k in form.controls else c[k] for *_, k in rows]
    keys = [{"model": "model_type", "lora_strengths": "loras"}.get(k, k) for *_, k in rows]
    return components, [(n, t, d) for n, t, d, _ in rows], keys


def _wire_jobs(demo: gr.Blocks, c: dict[str, Any], ctl: PageController, seen: gr.State, selected_image: gr.State,
               form: ParamForm) -> None:
    """Polling, Generate, Abort, the queue's buttons and the seed's."""
    poll_io = {"fn": ctl.poll, "inputs": [seen, c["status"]],
               "outputs": [c["table"], c["progress"], c["preview"], c["gallery"], selected_image, c["status"], seen],
               **PRIVATE}
    gr.Timer(1.0).tick(**poll_io)
    demo.load(**poll_io)

    components, arguments, keys = _generate_inputs(c, form)

    def submit(values: list[Any], request: gr.Request | None) -> str:
        try:
            return ctl.generate(dict(zip(keys, values)), getattr(request, "session_hash", None) or "")
        except UserError as e:  # an error, not a return value, so API clients cannot take it for a job ID
            raise gr.Error(str(e), title="Not queued", print_exception=False) from None

    generate = api_function(
        "generate", "Queue one job (or one per prompt line); returns the new job IDs, comma-separated.\n\n"
        "Arguments are the CLI's generate options (steps, guidance, ...); absent ones take the model's "
        "defaults. loras: 'name=strength' lines, or a JSON list of {\"name\", \"strength\"} objects; a strength "
        "is a number or a per-step schedule such as \"1.0,0.5\". memory_profile: \"default\" (the Config "
        "section's) or 1-5 for these jobs only.", arguments, submit)
    submitted = c["generate"].click(generate, components, c["last_ids"], api_name="generate",
                                    show_progress="hidden", concurrency_limit=None,
                                    preprocess=False)  # our parsing, our messages

    def submit_message(request: gr.Request) -> Any:
        return ctl.submit_message(getattr(request, "session_hash", None) or "")

    # the status box keeps the outcome after the toast fades. Gradio 6.31's page does not run .then()
    # after an error (whatever its docs say), hence .failure() for that path.
    message_io = {"fn": submit_message, "inputs": None, "outputs": c["status"], **PRIVATE}
    submitted.then(**message_io).then(**poll_io)
    submitted.failure(**message_io)

    def stop() -> str:
        """Stop the running job after its current step (the queue goes on with the next one)."""
        return ctl.stop()

    c["abort"].click(stop, None, c["status"], api_name="stop", **CHEAP)

    def queue_op(op: str, doc: str) -> Callable[[str], str]:
        def run(job_id: str) -> str:
            return ctl.queue_op(op, job_id)
        run.__name__, run.__doc__ = f"queue_{op}", doc
        return run

    for eid, op, name, doc in (("job-remove", "remove", "remove", "Remove a job from the queue."),
                               ("job-up", "up", "move_up", "Move a waiting job one place up."),
                               ("job-down", "down", "move_down", "Move a waiting job one place down."),
                               ("job-retry", "retry", "retry", "Queue a finished job again.")):
        c[eid].click(queue_op(op, doc), c["job_id"], c["status"], api_name=name, **CHEAP).then(**poll_io)

    def clear_finished() -> str:
        """Drop done, failed and aborted jobs from the table (their images stay on disk)."""
        return ctl.clear_finished()

    c["queue-clear-finished"].click(clear_finished, None, c["status"], api_name="clear_finished",
                                    **CHEAP).then(**poll_io)

    def list_queue() -> list[dict[str, Any]]:
        """Every job: id, status, spec, step/total, seconds_per_step, eta, paths, seeds, error."""
        return ctl.queue.snapshot()

    gr.api(list_queue, api_name="queue", queue=False)

    def on_select(evt: gr.SelectData) -> str:
        row = evt.row_value if isinstance(evt.row_value, list) else []
        return str(row[0]) if row else gr.skip()

    c["table"].select(on_select, None, c["job_id"], **PRIVATE)

    def last_seed() -> int:
        """The seed of the newest finished job's first image."""
        return ctl.last_seed()

    c["reuse_seed"].click(last_seed, None, c["seed"], api_name="last_seed", **CHEAP)
    # -1: each job draws its own seed (recorded in its images); set in the browser, no round trip
    c["random_seed"].click(None, None, c["seed"], js="() => -1", **PRIVATE)


def _wire_settings(demo: gr.Blocks, c: dict[str, Any], ctl: PageController, form: ParamForm,
                   model_files: gr.Markdown, selected_image: gr.State) -> None:
    """The model list, presets, token count, restore, the gallery's actions and the LoRA controls."""
    model = c["model"]
    picked = ["preset", "model_info", *(p.name for p in form.params if p.model_tuned)]
    model.input(lambda t: as_tuple(picked, ctl.model_picked(t)), model, [c[k] for k in picked], **PRIVATE)
    # .change: a restored file, a profile or the page load may choose the model too
    model.change(ctl.model_files_report, model, [model_files, model], **PRIVATE)
    form.wire_placement(model)
    form.wire_mirrors()
    if "control_section" in c:
        model.change(lambda t: gr.update(visible=ctl.shows_group(t, "control")), model, c["control_section"],
                     **PRIVATE)
        preview_inputs = [model, c["control_image"], c["control_type"], c["width"], c["height"]]
        # an upload or a new type shows the map at once; the button redraws it (after a size change, say)
        gr.on([c["control_image"].upload, c["control_image"].clear, c["control_type"].input,
               c["control_preview_button"].click], ctl.control_preview, preview_inputs, c["control_preview"],
              show_progress="minimal", api_visibility="private")

    def token_count(model_type: str, text: str) -> str:
        """Live count against the prompt limit (chat template included); longer prompts are truncated."""
        return ctl.tokens(model_type, text)

    c["prompt"].change(token_count, [model, c["prompt"]], c["token_info"], api_name="token_count", **CHEAP)
    model.change(token_count, [model, c["prompt"]], c["token_info"], **PRIVATE)

    size = ["width", "height"]
    c["preset"].input(lambda label: as_tuple(size, ctl.preset_picked(label)), c["preset"], [c[k] for k in size],
                      **PRIVATE)
    for k in size:
        c[k].input(ctl.size_typed, [c[k] for k in size], c["preset"], **PRIVATE)

    def open_outputs(request: gr.Request) -> str:
        message = open_output_folder(ctl.service.config.output_dir, request)
        if message.startswith("⚠"):
            gr.Warning(message.lstrip("⚠ "))
        return message

    c["open_outputs"].click(open_outputs, None, c["status"], **PRIVATE)

    def show_open_outputs(request: gr.Request) -> Any:
        return gr.update(visible=is_local_request(request))

    demo.load(show_open_outputs, None, c["open_outputs"], **PRIVATE)

    keys = _settings_keys(form)
    restore_outputs = [*(c[k] for k in keys), c["restore_message"]]

    def restore(path: str | None) -> tuple:
        """Settings from a dropped file into the controls: an image made by this app (its own seed, one
        image), the settings JSON an image carries, or a generation profile. The last output says what
        happened (warnings included); a file that cannot be used changes nothing else."""
        updates, message = ctl.restore(path)
        return (*as_tuple(keys, updates), message or gr.skip())

    # the box empties once read (the message names the file), so the next file can be dropped at once
    placement = form.placement_io(model)  # a value set by these events fires no event of its control
    c["restore_file"].upload(restore, c["restore_file"], restore_outputs, api_name="restore", **CHEAP).then(
        lambda: None, None, c["restore_file"], **PRIVATE).then(**placement)

    def on_gallery_select(evt: gr.SelectData) -> str:
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image") if isinstance(value.get("image"), dict) else {}
        return image.get("path") or ""

    c["gallery"].select(on_gallery_select, None, selected_image, **PRIVATE)

    def restore_selected(path: str) -> tuple:
        if not path:
            gr.Warning("select an image in the gallery first")
        return restore(path)

    c["use_settings"].click(restore_selected, selected_image, restore_outputs, **PRIVATE).then(**placement)
    editors = [p.name for p in form.params if p.widget == "image"]
    if editors:
        used = [*editors, "width", "height", "preset"]
        c["use_input"].click(lambda path: as_tuple(used, ctl.use_as_input(path)), selected_image,
                             [c[k] for k in used], **PRIVATE).then(**placement)
    if "use_control" in c:
        picture = next(p.name for p in form.params if p.widget == "picture")
        # one output: Gradio takes the value itself, not a 1-tuple
        c["use_control"].click(lambda path, t: ctl.use_as_control(path, t).get(picture, gr.skip()),
                               [selected_image, model], c[picture], **PRIVATE).then(
            ctl.control_preview, [model, c["control_image"], c["control_type"], c["width"], c["height"]],
            c["control_preview"], **PRIVATE)

    lora_keys = ["lora_select", "lora_strengths", "lora_triggers"]
    lora = [c[k] for k in lora_keys]
    c["lora_select"].input(lambda s, t, m: as_tuple(lora_keys[1:], ctl.lora_picked(s, t, m)),
                           [c["lora_select"], c["lora_strengths"], model], lora[1:], **PRIVATE)
    c["lora_strengths"].blur(ctl.lora_typed, [c["lora_strengths"], model], c["lora_select"], **PRIVATE)

    def lora_refresh(selected: list[str] | None, text: str, model_type: str) -> tuple:
        """Rescan the LoRA folder; returns the LoRA names."""
        updates, names = ctl.lora_refresh(selected, text, model_type)
        return (*as_tuple(lora_keys, updates), names)

    lora_names_out = gr.JSON(visible=False)
    c["lora_refresh"].click(lora_refresh, [c["lora_select"], c["lora_strengths"], model], [*lora, lora_names_out],
                            api_name="lora_refresh", **CHEAP)
    trigger_keys = ["prompt", "lora_triggers"]
    c["lora_triggers"].input(lambda w, t: as_tuple(trigger_keys, ctl.trigger_picked(w, t)),
                             [c["lora_triggers"], c["prompt"]], [c[k] for k in trigger_keys], **PRIVATE)


def _wire_form_memory(demo: gr.Blocks, c: dict[str, Any], ctl: PageController, form: ParamForm,
                      form_state: gr.BrowserState, settings_column: gr.Column, model_files: gr.Markdown,
                      store: ProfileStore | None) -> None:
    """The form when a page opens (this browser's, else the last used settings) and its saving on change."""
    keys = [*_settings_keys(form), "one_per_line", "memory_profile"]
    outputs = [c[k] for k in keys]

    def startup(saved: Any) -> tuple:
        """Fill the form when a page opens, then show it (it is hidden until then: no flash of defaults)."""
        return (*as_tuple(keys, ctl.startup(saved)), gr.update(elem_classes=[]))

    demo.load(startup, form_state, [*outputs, settings_column], **PRIVATE).then(
        ctl.model_files_report, c["model"], [model_files, c["model"]], **PRIVATE)
    # every change of a control saves the form in this browser (JavaScript only: no round trip)
    saved = [{"model_type": "model", "loras": "lora_strengths"}.get(k, k) for k in form_keys()]
    controls = [c[k] for k in saved]
    gr.on([x.change for x in controls], None, [*controls, form_state], form_state, js=save_form_js(form_keys()),
          **PRIVATE)
    if store is not None:
        demo.load(lambda: gr.update(choices=profile_choices(store)), None, c["profiles"]["profile-select"],
                  **PRIVATE)


__all__ = ["build_ui", "launch_options", "PRESETS"]
