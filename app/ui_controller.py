"""The page's event handlers, as methods of one object: testable without a browser or a Blocks.

Handlers never generate: they submit to the JobQueue and read it, so closing or reloading the tab never
stops a job. A handler that sets several controls returns {control key: value} (app/ui.py maps the keys
to its components): "model", "prompt", "one_per_line", each form parameter's name, "preset",
"model_info", "lora_select", "lora_strengths", "lora_triggers", "memory_profile"; keys left out keep
their control as it is. UserError is how a handler refuses; app/ui.py turns it into the page's message.
No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.jobs import MAX_PROMPT_CHARS, JobSpec, cap_texts, check_text, input_render_size, text_problem
from app.params import params_of
from app.queue import MAX_JOBS_PER_REQUEST, JobQueue
from app.served_files import served_files
from app.settings import ProfileStore, model_settings, model_tuned, startup_settings
from app.ui_form import clean_form, form_keys
from app.ui_loras import (
    check_available,
    insert_word,
    names_in,
    parse_selection,
    selection_text,
    sync_lines,
    trigger_words_of,
)
from app.ui_params import HIDDEN, placements, shown_value
from app.ui_profiles import controls_to_settings
from app.ui_restore import Restored, restore_settings
from app.ui_uploads import combined_mask, editor_inputs, uploaded_path
from app.ui_view import (
    PENDING_STATUS,
    PRESETS,
    PROMPT_PREVIEW_CHARS,
    preset_for,
    progress_html,
    queue_table,
    recent_images,
    split_prompts,
    status_after,
    whole,
)
from app.untrusted import generate_arguments
from models.downloads import missing_report, remote_sizes
from models.errors import UserError
from models.image_inputs import file_name
from models.params import Param
from models.registry import InstallState, handler_for, install_state, model_order

if TYPE_CHECKING:  # the service module imports torch; the page itself does not need it
    from app.service import GenerationService

NOT_INSTALLED = " · not downloaded"  # after a model's name in the model list
UNUSABLE = " · not with these settings"  # ...when its definition lacks the Config's chosen weights (a format)
log = logging.getLogger(__name__)
Updates = dict[str, Any]


def ordered_model_types(definitions: Mapping[str, Any]) -> list[str]:
    """The families' listing order (their MODEL_ORDER), then any other definitions by name."""
    listed = [t for t in model_order() if t in definitions]
    return listed + sorted(t for t in definitions if t not in listed)


class PageController:
    """Everything the page's events do, for one queue and service.

    params: the declared parameters the form shows (app/ui_form.form_params()), in its order.
    store: the generation profiles (None: the page remembers nothing).
    """

    def __init__(self, queue: JobQueue, service: GenerationService, store: ProfileStore | None,
                 params: list[Param]):
        self.queue, self.service, self.store = queue, service, store
        self.params = list(params)
        self.defs = service.definitions
        self.model_types = ordered_model_types(self.defs)
        self.first = self.model_types[0]
        self.short_names = {t: d.short_name for t, d in self.defs.items()}
        self.layouts = placements(self.model_types, self._family_params, self._handler_layout, self.params)
        self.conditions = {t: handler_for(d.architecture).param_conditions(d.architecture)
                           for t, d in self.defs.items()}
        self.output_dir = Path(service.config.output_dir)
        self.gallery_files = served_files(self.output_dir)  # the only local files the server may send
        self._captions: dict[str, str] = {}
        self._submit_messages: dict[str, str] = {}  # session -> outcome of its last Generate

    # ------------------------------------------------------------ models

    def _family_params(self, model_type: str) -> list[str]:
        return [p.name for p in params_of(self.defs[model_type].architecture)]

    def _handler_layout(self, model_type: str) -> dict[str, str]:
        arch = self.defs[model_type].architecture
        return handler_for(arch).param_layout(arch)

    def shown(self, model_type: str, name: str) -> bool:
        return self.layouts.get(model_type, {}).get(name, HIDDEN) != HIDDEN

    def shows_group(self, model_type: str | None, group: str) -> bool:
        """Whether model_type shows any parameter in group (a section of the page)."""
        return group in self.layouts.get(model_type or "", {}).values()

    def lora_library(self, model_type: str | None = None):
        return self.service.lora_library(model_type or self.first)

    def lora_names(self, model_type: str | None = None) -> list[str]:
        return self.lora_library(model_type).names()

    def model_defaults(self, model_type: str) -> dict[str, Any]:
        """The definition's defaults, with the user's "default for this model" settings on top."""
        d = dict(self.service.defaults(model_type))
        if self.store is not None:
            user, warnings = self.store.get_model_defaults(model_type)
            for w in warnings:
                gr.Warning(w)
            if user is not None:
                d.update({k: user[k] for k in model_tuned() if user.get(k) is not None})
        return d

    def first_values(self) -> dict[str, Any]:
        """What the form shows before the page-load handler fills it: the first model's defaults."""
        d = self.service.defaults(self.first)
        return {p.name: d.get(p.name, p.default) for p in self.params}

    def model_picked(self, model_type: str) -> Updates:
        """The user chose a model: its recommended values (model-tuned parameters) and description."""
        d = self.model_defaults(model_type)
        out: Updates = {p.name: shown_value(p, d[p.name]) for p in self.params if p.model_tuned and p.name in d}
        if "width" in d and "height" in d:
            out["preset"] = preset_for(d["width"], d["height"])
        out["model_info"] = self.defs[model_type].description
        return out

    def install(self, model_type: str) -> InstallState:
        """Read at each call: files appear as jobs download them, and the Config may change quantization."""
        cfg = self.service.config
        return install_state(self.defs[model_type], cfg.checkpoints_dir, cfg.transformer_quantization,
                             cfg.text_encoder_quantization, self.service.device)

    def installed(self, model_type: str) -> bool:
        try:
            return self.install(model_type).installed
        except UserError:  # a definition without the chosen weights: model_files_report says why
            return False

    def _label(self, model_type: str) -> str:
        name = self.defs[model_type].name
        try:
            return name if self.install(model_type).installed else f"{name}{NOT_INSTALLED}"
        except UserError:  # installed or not, it lacks the Config's chosen weights: the report box says which
            return f"{name}{UNUSABLE}"

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, model type): labels mark the models whose files are missing, and those that cannot run with
        the Config's weight choice (a low-bit format their definition does not list)."""
        return [(self._label(t), t) for t in self.model_types]

    def model_files_report(self, model_type: str | None) -> tuple[Any, Any]:
        """(report box, model list): what the chosen model lacks, the same list the CLI prints offline, with the
        size to download when the Hub tells it; the labels refreshed."""
        labels = gr.update(choices=self.model_choices())
        if model_type not in self.defs:
            return gr.update(visible=False), labels
        name = self.defs[model_type].name
        try:
            state = self.install(model_type)
        except UserError as e:
            return gr.update(value=f"⚠ **{name} cannot be used:** {e}", visible=True), labels
        if state.installed:
            return gr.update(value="", visible=False), labels
        if state.missing:
            report = missing_report(state.specs, sizes=remote_sizes(state.missing))
        else:
            report = f"Its transformer file is missing: {state.local_transformer}"
        return gr.update(value=f"⚠ **{name} is not installed.**\n\n```text\n{report}\n```", visible=True), labels

    def tokens(self, model_type: str, text: str) -> str:
        """Live count against the prompt limit (chat template included); longer prompts are truncated."""
        if not text or not isinstance(text, str):
            return ""
        if text_problem(text):  # the tokenizer would fail on it, and Generate refuses it
            return f"⚠ the prompt {text_problem(text)}: remove it"
        limit = self.service.definition(model_type).defaults().get("max_prompt_tokens")
        try:
            n = self.service.token_count(model_type, text)  # counts the first MAX_PROMPT_CHARS only: cheap
        except Exception:  # a count must never break typing; the job reports real problems
            log.debug("token count failed", exc_info=True)
            n = None
        if n is None or not limit:
            return ""
        if len(text) > MAX_PROMPT_CHARS:
            return (f"**{n}+ / {limit} tokens**: {len(text):,} characters; a job keeps the first "
                    f"{MAX_PROMPT_CHARS:,} and the model reads its first {limit} tokens")
        return f"**{n} / {limit} tokens**: the end will be cut" if n > limit else f"{n} / {limit} tokens"

    @staticmethod
    def preset_picked(label: str) -> Updates:
        if label not in PRESETS:
            return {}
        width, height = PRESETS[label]
        return {"width": width, "height": height}

    @staticmethod
    def size_typed(width: Any, height: Any) -> str:
        return preset_for(whole(width), whole(height))

    # ------------------------------------------------------------ settings into the form

    def lora_updates(self, loras: list[dict[str, Any]], model_type: str | None = None) -> Updates:
        """Dropdown (its choices refreshed, the value filtered against them), text, trigger words."""
        names = self.lora_names(model_type)
        kept = [x for x in loras if x["name"] in names]
        for x in loras:
            if x["name"] not in names:
                gr.Warning(f"LoRA {x['name']!r} is not in the LoRA folder; left out")
        selected = [x["name"] for x in kept]
        words = trigger_words_of(self.lora_library(model_type), selected)
        return {"lora_select": gr.update(choices=names, value=selected), "lora_strengths": selection_text(kept),
                "lora_triggers": gr.update(choices=words, value=None, visible=bool(words))}

    def settings_updates(self, st: Mapping[str, Any]) -> Updates:
        """Profile / last-used / restored settings -> the form (a missing model keeps the current one; a null
        prompt or negative prompt keeps the current text)."""
        model_type = st.get("model_type")  # None: keep the current model (already warned)
        if model_type is not None and model_type not in self.defs:
            gr.Warning(f"model type {model_type!r} is not installed; keeping the current model")
            model_type = None
        out: Updates = {}
        if model_type is not None:
            out["model"] = model_type
            out["model_info"] = self.defs[model_type].description
        if st.get("prompt") is not None:
            out["prompt"] = st["prompt"]
        for p in self.params:
            if p.is_file:
                if p.name not in st:  # a profile keeps no input files: the page's stay
                    continue
                value = st[p.name] or None
                if value:  # a restored image's input (its copy beside the image): the page may show it now
                    self.gallery_files.allow([value])
                out[p.name] = {"background": value, "layers": [], "composite": value} if p.widget == "image" \
                    else value
            elif st.get(p.name) is not None:
                out[p.name] = shown_value(p, st[p.name])
        if st.get("seed_policy", "fixed") == "random":
            out["seed"] = -1
        if "width" in st and "height" in st:
            out["preset"] = preset_for(st["width"], st["height"])
        return {**out, **self.lora_updates(list(st.get("loras") or []), model_type)}

    def form_updates(self, saved: Mapping[str, Any]) -> Updates:
        """The browser's saved form (clean_form) -> the form."""
        model_type = saved["model_type"]
        st, warnings = model_settings(model_type, self.defs, self.store)  # fields the saved form lacks
        for w in warnings:
            log.warning("%s", w)
        st = {**st, **{k: saved[k] for k in form_keys() if k in saved and k in st}, "seed_policy": "fixed",
              "loras": []}
        out = self.settings_updates(st)
        # the strengths text as typed (it may be half written); the dropdown gets the names it knows
        text = saved.get("loras", "")
        names = names_in(text, self.lora_names(model_type))
        words = trigger_words_of(self.lora_library(model_type), names)
        out.update({"lora_select": gr.update(choices=self.lora_names(model_type), value=names),
                    "lora_strengths": text, "lora_triggers": gr.update(choices=words, value=None,
                                                                       visible=bool(words))})
        if isinstance(saved.get("one_per_line"), bool):
            out["one_per_line"] = saved["one_per_line"]
        from app.ui_config import memory_override_choices  # reads app.offload's descriptions (torch)

        if saved.get("memory_profile") in [v for _, v in memory_override_choices()]:
            out["memory_profile"] = saved["memory_profile"]
        return out

    def last_used_updates(self) -> Updates:
        """The server's last used settings (or this model's saved defaults); nothing when there are none."""
        if self.store is None:
            return {}
        try:
            if self.store.load_last_used()[0] is None and self.store.get_model_defaults(self.first)[0] is None:
                return {}  # the page already shows that
            st, warnings = startup_settings(self.store, self.defs, default_model=self.first,
                                            available_loras=self.lora_names())
        except UserError as e:
            log.warning("cannot restore the last used settings: %s", e)
            return {}
        for w in warnings:
            log.warning("%s", w)
        return self.settings_updates(st)

    def startup(self, form: Any) -> Updates:
        """The form when a page opens: this browser's saved form, else the server's last used settings."""
        try:
            saved = clean_form(form, self.defs)
            return self.form_updates(saved) if saved is not None else self.last_used_updates()
        except Exception:  # never leave the form hidden (the CSS shows it after a few seconds anyway)
            log.exception("cannot restore the form")
            return {}

    def restore(self, path: str | None) -> tuple[Updates, str]:
        """Settings from a dropped file into the form: an image made by this app (its own seed, one image), the
        settings JSON an image carries, or a generation profile; and the message saying what happened. A file
        that cannot be used changes nothing else."""
        if not path:
            return {}, ""
        try:
            restored: Restored = restore_settings(path, self.defs, lambda t: self.lora_names(t))
        except UserError as e:
            gr.Warning(str(e))
            return {}, f"⚠ Not restored: {e}"
        for w in restored.warnings:
            gr.Warning(w)
        gr.Info(f"Settings restored from the {restored.source}")
        lines = [f"Settings restored from the {restored.source} {file_name(path)}."]  # escaped: an upload's name
        lines += [f"- ⚠ {w}" for w in restored.warnings]
        return self.settings_updates(restored.settings), "\n".join(lines)

    def use_as_input(self, path: str | None) -> Updates:
        """A gallery image as the input image (its size as the job's size)."""
        editor = next((p for p in self.params if p.widget == "image"), None)
        if not path or editor is None:
            gr.Warning("select an image in the gallery first")
            return {}
        try:
            width, height = input_render_size(path)  # the command line's size for an input alone
        except UserError as e:
            gr.Warning(str(e))
            return {}
        return {editor.name: {"background": path, "layers": [], "composite": path}, "width": width,
                "height": height, "preset": preset_for(width, height)}

    def control_preview(self, model_type: str, control_image: Any, control_type: Any, width: Any,
                        height: Any) -> Any:
        """The control map a job would use (the picture the ControlNet sees at the job's size), shown before
        generating; a problem is a warning and clears the preview."""
        d = self.defs.get(model_type)
        by_name = {p.name: p for p in self.params}
        try:
            if d is None:
                raise UserError(f"model type {model_type!r} is not installed")
            values = {"control_image": uploaded_path(control_image, by_name["control_image"].display)}
            if not values["control_image"]:
                return None
            for name, raw in (("control_type", control_type), ("width", width), ("height", height)):
                values[name] = by_name[name].parse(raw)
            return handler_for(d.architecture).control_map(d.architecture, values,
                                                           Path(self.service.config.checkpoints_dir))
        except UserError as e:
            gr.Warning(str(e))
            return None

    def use_as_control(self, path: str | None, model_type: str | None) -> Updates:
        """A gallery image as the control image (a ControlNet type's control section shows it)."""
        picture = next((p for p in self.params if p.widget == "picture"), None)
        if not path or picture is None:
            gr.Warning("select an image in the gallery first")
            return {}
        if not self.shows_group(model_type, "control"):
            gr.Warning("pick a ControlNet model type first: its control section takes the image")
            return {}
        return {picture.name: path}

    # ------------------------------------------------------------ submitting and controlling jobs

    def generate(self, values: Mapping[str, Any], session: str = "") -> str:
        """Queue one job (or one per prompt line) from the form's raw values, keyed by parameter name plus
        model_type, prompt, one_per_line, loras and memory_profile; returns the new job IDs, comma-separated.
        UserError (nothing queued) names the first bad value as the CLI would."""
        cut: list[str] = []
        try:
            # refused here, before anything else reads them: text that is not Unicode breaks every
            # JSON reply that would carry it
            for key, label in (("prompt", "the prompt"), ("negative_prompt", "the negative prompt"),
                               ("loras", "the LoRAs text")):
                if isinstance(values.get(key), str):
                    check_text(values[key], label)
            a = generate_arguments({k: v for k, v in self.file_values(values).items() if k != "loras"})
            selection = parse_selection(values.get("loras"))
            model_type, prompt, one_per_line = a.pop("model_type"), a.pop("prompt"), a.pop("one_per_line")
            for p in self.params:  # a picture left in a section the chosen model hides is not part of its job
                if p.is_file and a.get(p.name) and model_type in self.layouts and not self.shown(model_type, p.name):
                    a[p.name] = p.default
            if selection:  # unknown names are refused here, not when the job runs
                check_available(selection, self.lora_library(model_type))
            specs = [JobSpec(model_type=model_type, prompt=p, loras=[dict(x) for x in selection], **a)
                     for p in split_prompts(prompt, one_per_line)[:MAX_JOBS_PER_REQUEST + 1]]
            if not specs:
                raise UserError("the prompt is empty (every line is blank or a # comment)")
            if len(specs) > MAX_JOBS_PER_REQUEST:
                raise UserError(f"one request can queue at most {MAX_JOBS_PER_REQUEST} jobs: split the "
                                "prompt lines into smaller batches")
            for s in specs:
                cut += cap_texts(s)
            ids = self.queue.submit_many(specs)  # all validated before any is queued; all or none
        except UserError as e:
            self._submit_messages.pop(session, None)
            self._submit_messages[session] = f"⚠ Not queued: {e}"
            raise
        if len(self._submit_messages) > 256:  # API calls never read theirs: keep the dict small
            self._submit_messages.clear()
        cut = list(dict.fromkeys(cut))  # one line per kind of cut, not one per prompt line
        for w in cut:
            gr.Warning(w)
        self._submit_messages[session] = f"Queued job{'s' * (len(ids) != 1)} {', '.join(ids)}." + "".join(
            f"\n\n⚠ {w}" for w in cut)
        if self.store is not None:  # restored when a page opens; never raises
            for w in self.store.save_last_used(controls_to_settings({**a, "model_type": model_type,
                                                                     "prompt": prompt, "loras": selection})):
                log.warning("%s", w)
        gr.Info(f"Queued {len(ids)} job{'s' * (len(ids) != 1)}: {', '.join(ids)}")
        return ",".join(ids)

    def file_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """values with the image inputs' raw payloads (an image editor's background and strokes, an uploaded
        mask) as file paths; the strokes and the uploaded mask become one mask."""
        out, painted, image, label = dict(values), "", "", ""
        for p in self.params:
            if p.widget == "image" and p.name in out:
                out[p.name], painted = editor_inputs(out[p.name], p.display)
                image, label = out[p.name], p.display
        for p in self.params:
            if p.widget == "picture" and p.name in out:
                out[p.name] = uploaded_path(out[p.name], p.display)
            if p.widget == "mask" and p.name in out:
                uploaded = uploaded_path(out[p.name], p.display)
                out[p.name] = combined_mask(uploaded, painted, image, label) if image else uploaded
        return out

    def submit_message(self, session: str = "") -> Any:
        """The outcome of this session's last Generate, once (the status box keeps it after the toast)."""
        return self._submit_messages.pop(session, gr.skip())

    def stop(self) -> str:
        """Stop the running job after its current step (the queue goes on with the next one)."""
        job_id = self.queue.abort()
        if job_id is None:
            return "No job is running."
        try:
            job = self.queue.get(job_id)  # read after the flag is set: it stops at most one step later
        except UserError:
            return f"Stopping job {job_id}."
        where = f" at step {job['step']}/{job['total']}" if job["phase"] == "denoising" else ""
        return f"Stopping job {job_id}{where} after the current step."

    def queue_op(self, op: str, job_id: str | None) -> str:
        """remove / up / down / retry on the selected job; the status line says what happened."""
        job_id = (job_id or "").strip()
        try:
            if not job_id:
                raise UserError("select a job in the queue table first")
            if op == "remove":
                self.queue.remove(job_id)
            elif op in ("up", "down"):
                if not self.queue.move(job_id, op):
                    return f"Job {job_id} is already {'first' if op == 'up' else 'last'} in the queue."
            elif op == "retry":
                self.queue.retry(job_id)
            else:
                raise ValueError(op)
        except UserError as e:
            gr.Warning(str(e))
            return f"⚠ {e}"
        return {"remove": f"Removed job {job_id}.", "up": f"Moved job {job_id} up.",
                "down": f"Moved job {job_id} down.", "retry": f"Queued job {job_id} again."}[op]

    def clear_finished(self) -> str:
        """Drop done, failed and aborted jobs from the table (their images stay on disk)."""
        return f"Cleared {self.queue.clear_finished()} finished job(s)."

    def last_seed(self) -> Any:
        """The seed of the newest finished job's first image."""
        value = self.queue.last_seed()
        if value is None:
            gr.Warning("no finished job yet: nothing to reuse")
            return gr.skip()
        return value

    def poll(self, state: dict | None, status_text: str | None = None) -> tuple:
        """(table, progress, preview, gallery, selected image, status, state): only what changed since this tab's
        last poll. A new image shown large is also the selected one: the gallery's buttons act on what is shown."""
        state = dict(state or {})
        queue = self.queue
        version = queue.version
        table_out = progress_out = gallery_out = selected_out = status_out = gr.skip()
        jobs = None
        if state.get("v") != version:
            jobs = queue.snapshot(prompt_chars=PROMPT_PREVIEW_CHARS)  # the table shows only their start
            table_out = queue_table(jobs, self.short_names)
            progress_out = progress_html(jobs, queue.notices, queue.workers(), queue.waiting_reason)
            state["v"] = version
        if state.get("rv") != queue.results_version:
            # only when a job ended (or on a tab's first poll): the folder is not rescanned every step
            state["rv"] = queue.results_version
            items = recent_images(self.output_dir, cache=self._captions)
            self.gallery_files.allow(p for p, _ in items)
            key = [p for p, _ in items]
            if key != state.get("gallery"):
                # a new file on top while this tab watches: show it large, like A1111
                newest = bool(state.get("gallery") is not None and key and key[0] not in state["gallery"])
                gallery_out = gr.Gallery(value=items, selected_index=0 if newest else None)
                if newest:  # setting selected_index fires no .select
                    selected_out = key[0]
                state["gallery"] = key
        # a status line naming pending jobs follows them (read again when they or the line change)
        if PENDING_STATUS.match(status_text or "") and (jobs is not None or state.get("st") != status_text):
            status_out = status_after(status_text, jobs if jobs is not None else queue.snapshot()) or gr.skip()
        state["st"] = status_text
        preview_version, image = queue.preview()
        preview_out = image if state.get("pv") != preview_version else gr.skip()
        state["pv"] = preview_version
        return table_out, progress_out, preview_out, gallery_out, selected_out, status_out, state

    # ------------------------------------------------------------ LoRAs (bound to their strengths by name)

    def lora_picked(self, selected: list[str] | None, text: str, model_type: str) -> Updates:
        selected = list(selected or [])
        words = trigger_words_of(self.lora_library(model_type), selected)
        return {"lora_strengths": sync_lines(selected, text),
                "lora_triggers": gr.update(choices=words, value=None, visible=bool(words))}

    def lora_typed(self, text: str, model_type: str) -> Any:
        """Typed lines select their LoRAs too (names the folder lacks are refused at Generate)."""
        return gr.update(value=names_in(text, self.lora_names(model_type)))

    def lora_refresh(self, selected: list[str] | None, text: str, model_type: str) -> tuple[Updates, list[str]]:
        """Rescan the LoRA folder: the LoRA controls, and the LoRA names."""
        names = [i.name for i in self.lora_library(model_type).refresh()]
        kept = [n for n in (selected or []) if n in names]
        words = trigger_words_of(self.lora_library(model_type), kept)
        gr.Info(f"{len(names)} LoRA{'s' * (len(names) != 1)} in the folder")
        return ({"lora_select": gr.update(choices=names, value=kept), "lora_strengths": sync_lines(kept, text),
                 "lora_triggers": gr.update(choices=words, value=None, visible=bool(words))}, names)

    @staticmethod
    def trigger_picked(word: str | None, text: str) -> Updates:
        return {"prompt": insert_word(text, word), "lora_triggers": gr.update(value=None)}


__all__ = ["NOT_INSTALLED", "PageController", "ordered_model_types"]
