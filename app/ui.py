"""The Gradio page: settings, Generate / Abort, progress and live preview, results gallery, job queue.

Handlers never generate: they submit to the JobQueue and read it (a 1 s timer polls a snapshot), so
closing or reloading the tab never stops a job and a reopened tab shows the queue and the results.
Named API endpoints (see README): /generate, /stop, /queue, /remove, /move_up, /move_down, /retry,
/clear_finished, /last_seed, /restore, /lora_refresh, the generation profiles' (app/ui_profiles.py) and the
Config section's /save_config, /unload_models, /system_info (app/ui_config.py).
LoRA selection helpers live in app/ui_loras.py, restoring settings from a dropped file in app/ui_restore.py.
No torch here.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from app.jobs import (
    DEFAULT_MEMORY_PROFILE,
    MAX_PROMPT_CHARS,
    JobSpec,
    cap_texts,
    check_text,
    text_problem,
    validate,
)
from app.metadata import read_settings
from app.queue import FINISHED, MAX_JOBS_PER_REQUEST, JobQueue, clean_text
from app.served_files import served_files
from app.settings import ProfileStore, model_settings, startup_settings
from app.ui_form import FORM_KEYS, FORM_PENDING, STORAGE_KEY, clean_form, save_form_js
from app.ui_loras import (
    check_available,
    insert_word,
    names_in,
    parse_selection,
    selection_text,
    sync_lines,
    trigger_words_of,
)
from app.ui_profiles import build_profiles_section, controls_to_settings, profile_choices
from app.ui_restore import restore_settings
from app.untrusted import generate_arguments
from models.downloads import missing_report, remote_sizes
from models.errors import UserError
from models.registry import InstallState, install_state

if TYPE_CHECKING:  # the service module imports torch; the page itself does not need it
    from app.service import GenerationService, ServiceConfig

MODEL_ORDER = ("z_image_base", "z_image", "z_image_tiny")
SHORT_NAMES = {"z_image_base": "Base", "z_image": "Turbo", "z_image_tiny": "tiny"}
CUSTOM = "Custom"
NOT_INSTALLED = " · not downloaded"  # after a model's name in the model list
log = logging.getLogger(__name__)
# label -> (width, height); about 1 MP and 2 MP, every side a multiple of 16
PRESETS: dict[str, tuple[int, int]] = {
    "1:1 · 1024×1024": (1024, 1024), "4:3 · 1152×864": (1152, 864), "3:4 · 864×1152": (864, 1152),
    "3:2 · 1248×832": (1248, 832), "2:3 · 832×1248": (832, 1248), "16:9 · 1280×720": (1280, 720),
    "9:16 · 720×1280": (720, 1280), "21:9 · 1568×672": (1568, 672),
    "1:1 · 1440×1440 (2 MP)": (1440, 1440), "4:3 · 1664×1248 (2 MP)": (1664, 1248),
    "3:4 · 1248×1664 (2 MP)": (1248, 1664), "16:9 · 1920×1088 (2 MP)": (1920, 1088),
    "9:16 · 1088×1920 (2 MP)": (1088, 1920), "21:9 · 2240×960 (2 MP)": (2240, 960),
}
# field -> the label the user sees, for validate() messages
UI_NAMES = {
    "width": "Width", "height": "Height", "num_inference_steps": "Steps", "guidance_scale": "Guidance",
    "flow_shift": "Flow shift", "num_images": "Number of images", "cfg_normalization": "CFG normalization",
    "cfg_truncation": "CFG truncation", "seed": "Seed", "memory_profile": "Memory profile",
}
# /generate's other arguments, for messages
API_NAMES = {**UI_NAMES, "model_type": "Model", "prompt": "Prompt", "negative_prompt": "Negative prompt",
             "one_per_line": "One job per line"}
TABLE_HEADERS = ["ID", "Status", "Progress", "Prompt", "Settings", "Seed", "Result"]
TABLE_WIDTHS = ["11%", "11%", "11%", "18%", "16%", "10%", "23%"]  # Result: room for a truncated line
STATUS_ICONS = {"queued": "⏳", "running": "▶", "done": "✔", "failed": "✖", "interrupted": "⚠", "aborted": "■"}
TABLE_MAX_CHARS = 48
GALLERY_SIZE = 24
PROMPT_PREVIEW_CHARS = 100  # of each prompt, in the table and progress line (rebuilt on every step)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

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


# ------------------------------------------------------------------ pure helpers (tested through the API)

def whole(value: Any) -> Any:
    """30.0 -> 30 (sliders send floats); anything else unchanged so validate() can name it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def split_prompts(text: str, one_per_line: bool) -> list[str]:
    if not one_per_line:
        return [text]
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def preset_for(width: Any, height: Any) -> str:
    return next((k for k, v in PRESETS.items() if v == (width, height)), CUSTOM)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def job_progress(job: dict[str, Any]) -> str:
    if job["status"] != "running":
        return ""
    if job["phase"].startswith("loading"):
        return f"loading {job['step']}/{job['total']}" if job["total"] else "loading"
    return f"{job['step']}/{job['total']}" if job["total"] else job["phase"]


def job_result(job: dict[str, Any]) -> str:
    if job["status"] == "done":
        n = len(job["paths"])
        reports = job.get("lora_reports") or []  # "LoRA x (fmt): N of M tensors applied, K unmatched"
        return f"{n} image{'s' * (n != 1)} in {job['seconds'] or 0:.1f} s" + "".join(f" · {r}" for r in reports)
    if job["status"] == "aborted" and not job["error"]:
        return f"stopped at step {job['step']}/{job['total']}" if job["total"] else "stopped"
    return job["error"]


def display_order(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Running, then queued (in run order), then the finished ones newest first: the live part stays on top."""
    active = [j for j in jobs if j["status"] in ("running", "queued")]
    active.sort(key=lambda j: j["status"] != "running")  # stable: queued keep their order
    finished = [j for j in jobs if j["status"] not in ("running", "queued")]
    finished.sort(key=lambda j: _sort_key(j.get("finished") or j.get("created")), reverse=True)
    return active + finished


def table_row(j: dict[str, Any]) -> list[Any]:
    s = j["spec"]
    seed = j["seeds"][0] if j["seeds"] else ("random" if s["seed"] == -1 else s["seed"])
    prompt = s["prompt"] if len(s["prompt"]) <= 60 else s["prompt"][:57] + "..."
    settings = (f"{SHORT_NAMES.get(s['model_type'], s['model_type'])} · {s['width']}×{s['height']} · "
                f"{s['num_inference_steps']} steps" + (f" · ×{s['num_images']}" if s["num_images"] > 1 else "")
                # older queue files have no memory_profile
                + (f" · memory profile {s['memory_profile']}" if s.get("memory_profile") else ""))
    return [j["id"], f"{STATUS_ICONS.get(j['status'], '')} {j['status']}", job_progress(j), prompt,
            settings, seed, job_result(j)]


def _sort_key(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def queue_table(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    """The queue as the page's table. One odd job (a field missing or of the wrong type, text that is not
    Unicode) gets a placeholder row instead of failing the whole table, which every tab polls."""
    try:
        ordered = display_order(jobs)
    except Exception:  # an unsortable job: keep the list order rather than show nothing
        log.warning("queue table: cannot order the jobs", exc_info=True)
        ordered = list(jobs)
    rows = []
    for j in ordered:
        try:
            row = table_row(j)
        except Exception:
            job_id = j.get("id", "?") if isinstance(j, dict) else "?"
            log.warning("queue table: job %r cannot be shown", job_id, exc_info=True)
            row = [job_id, "?", "", "", "", "", "this job's saved data is unreadable; remove it"]
        # every cell JSON-safe: a lone surrogate would fail the page's poll (HTTP 500) for every client
        rows.append([clean_text(str(v)) if not isinstance(v, int) or isinstance(v, bool) else v for v in row])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def progress_html(jobs: list[dict[str, Any]], notices: list[str] | None = None) -> str:
    """The running job's step i/N, s/step and ETA; else the last finished job's outcome; notices (saved jobs
    that could not be restored) below. Never raises: it is polled by every tab."""
    try:
        out = _progress_html(jobs)
    except Exception:
        log.warning("progress: cannot show the queue's state", exc_info=True)
        out = "<div class='error'>The queue's state cannot be shown (see the log).</div>"
    out += "".join(f"<div class='error'>⚠ {html.escape(n)}</div>" for n in (notices or [])[-5:])
    return clean_text(out)


def _progress_html(jobs: list[dict[str, Any]]) -> str:
    waiting = sum(j["status"] == "queued" for j in jobs)
    tail = f" · {waiting} waiting" if waiting else ""
    running = next((j for j in jobs if j["status"] == "running"), None)
    if running is not None:
        e = html.escape
        head = f"<b>▶ {e(running['id'])}</b> {e(running['spec']['prompt'][:80])}"
        if running["phase"] in ("denoising", "decoding"):
            pct = 100 * running["step"] / max(running["total"], 1)
            per = running["seconds_per_step"] or 0
            line = (f"step {running['step']}/{running['total']} · {per:.2f} s/step · "
                    f"ETA {fmt_seconds(running['eta'])}" + (" · decoding" if running["phase"] == "decoding" else ""))
        else:
            pct = 0
            line = e(running["phase"] or "starting") + (
                f" ({running['step']}/{running['total']})" if running["total"] else "")
        return (f"<div>{head}</div><div>{line}{tail}</div>"
                f"<div class='bar'><div style='width:{pct:.0f}%'></div></div>")
    finished = [j for j in jobs if j["finished"]]
    if not finished:
        return f"<div class='muted'>Idle{tail}. Models load on the first job.</div>"
    last = max(finished, key=lambda j: j["finished"])
    icon = STATUS_ICONS.get(last["status"], "")
    cls = "error" if last["status"] in ("failed", "interrupted") else "muted"
    what = html.escape(job_result(last) or last["status"])
    return f"<div class='{cls}'>Idle{tail}. Last job {icon} {html.escape(last['id'])} {last['status']}: {what}</div>"


# status lines naming jobs that have yet to end ("Queued job X.", "Queued jobs X, Y.", "Queued job X again.",
# "Stopping job X ..."): the poll replaces them with the outcome once those jobs have all ended
PENDING_STATUS = re.compile(r"^(?:Queued jobs?|Stopping job) ((?:[0-9a-f]{8})(?:, [0-9a-f]{8})*)\b")


def status_after(text: str | None, jobs: list[dict[str, Any]]) -> str | None:
    """The status line once every job it names as queued or stopping has ended; None: leave it as it is."""
    m = PENDING_STATUS.match(text or "")
    if not m:
        return None
    ids = m.group(1).split(", ")
    by_id = {j["id"]: j for j in jobs}
    if any(by_id[i]["status"] not in FINISHED for i in ids if i in by_id):
        return None
    if len(ids) == 1:
        job = by_id.get(ids[0])
        if job is None:
            return f"Job {ids[0]} is no longer in the queue."
        outcome = job_result(job)
        return (f"{STATUS_ICONS.get(job['status'], '')} Job {job['id']} {job['status']}"
                + (f": {outcome}" if outcome else "."))
    counts: dict[str, int] = {}
    for i in ids:
        st = by_id[i]["status"] if i in by_id else "removed"
        counts[st] = counts.get(st, 0) + 1
    icon = STATUS_ICONS["done"] if set(counts) == {"done"} else STATUS_ICONS["interrupted"]
    return f"{icon} Jobs {', '.join(ids)} ended: " + ", ".join(f"{n} {st}" for st, n in counts.items()) + "."


def caption_for(path: Path, cache: dict[str, str]) -> str:
    """'seed N · prompt' from the image's settings (read once per file), else its name."""
    key = str(path)
    if key not in cache:
        try:
            meta = read_settings(path) or {}
        except OSError:
            meta = {}
        if len(cache) > 4 * GALLERY_SIZE:
            cache.clear()
        cache[key] = f"seed {meta['seed']} · {str(meta.get('prompt', ''))[:60]}" if "seed" in meta else path.name
    return cache[key]


def recent_images(folder: Path, limit: int = GALLERY_SIZE, cache: dict[str, str] | None = None
                  ) -> list[tuple[str, str]]:
    """(path, caption) of the newest images of the output folder, newest first."""
    try:
        files = []
        for p in Path(folder).iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                try:
                    st = p.lstat()  # plain files only: a link could point the server at any file
                except OSError:  # deleted meanwhile
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((st.st_mtime, p))
    except OSError:
        return []
    files.sort(key=lambda t: t[0], reverse=True)
    cache = {} if cache is None else cache
    return [(str(p), caption_for(p, cache)) for _, p in files[:limit]]


def is_loopback(host: str | None) -> bool:
    host = (host or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_request(request: Any) -> bool:
    """Whether the browser runs on the app's machine: a loopback client that asked for a loopback host.

    A --share tunnel or a reverse proxy also connects from loopback, but names another host (or adds a
    forwarding header): those browsers are elsewhere, and a folder opened here would be no use to them.
    """
    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    if not is_loopback(getattr(client, "host", None)):
        return False
    if any(h in headers for h in ("x-forwarded-for", "x-forwarded-host", "forwarded", "x-real-ip")):
        return False
    host = headers.get("host", "")
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host.rsplit("]:", 1)[0]  # drop the port
    return is_loopback(name)


def open_folder(path: Path) -> None:
    """Show path in the desktop's file manager; OSError when there is none."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]  # Windows only
        return
    tool = "open" if sys.platform == "darwin" else "xdg-open"
    subprocess.Popen([tool, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def open_output_folder(folder: str | Path, request: Any) -> str:
    """The "Open output folder" action: only for a browser on this machine (the API can call it too)."""
    if not is_local_request(request):
        return ("⚠ The output folder opens only from a browser on the machine that runs the app "
                "(the gallery shows its images).")
    folder = Path(folder).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)  # nothing generated yet: open it empty rather than fail
        open_folder(folder)
    except OSError as e:
        return f"⚠ Could not open {folder}: {e}"
    return f"Opened the output folder {folder}."


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
    defs = service.definitions
    model_types = [t for t in MODEL_ORDER if t in defs] + sorted(t for t in defs if t not in MODEL_ORDER)
    first = model_types[0]
    d0 = service.defaults(first)
    from app.ui_config import memory_override_choices  # reads app.offload's descriptions (torch)

    def flow_shift_advanced(model_type: str | None) -> bool:
        """Whether the model's handler puts flow shift under Advanced (Turbo: distilled for one shift)."""
        return bool(model_type and service.defaults(model_type).get("flow_shift_advanced", False))

    def lora_library(model_type: str | None = None):
        return service.lora_library(model_type or first)

    def lora_names(model_type: str | None = None) -> list[str]:
        return lora_library(model_type).names()

    def model_defaults(model_type: str) -> dict[str, Any]:
        """The definition's defaults, with the user's "default for this model" settings on top."""
        d = dict(service.defaults(model_type))
        if store is not None:
            user, warnings = store.get_model_defaults(model_type)
            for w in warnings:
                gr.Warning(w)
            if user is not None:
                d.update({k: user[k] for k in ("width", "height", "num_inference_steps", "guidance_scale",
                                               "flow_shift") if k in user})
                if user.get("negative_prompt") is not None:
                    d["negative_prompt"] = user["negative_prompt"]
        return d

    def model_updates(model_type: str) -> tuple:
        d = model_defaults(model_type)
        show_neg = bool(d.get("show_negative_prompt", True))
        return (gr.update(value=d["negative_prompt"], visible=show_neg), preset_for(d["width"], d["height"]),
                d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"], d["flow_shift"],
                defs[model_type].description)

    def install(model_type: str) -> InstallState:
        """Read at each call: files appear as jobs download them, and the Config may change quantization."""
        cfg = service.config
        return install_state(defs[model_type], cfg.checkpoints_dir, cfg.transformer_quantization,
                             cfg.text_encoder_quantization, service.device)

    def installed(model_type: str) -> bool:
        try:
            return install(model_type).installed
        except UserError:  # a definition without the chosen weights: model_files_report says why
            return False

    def model_choices() -> list[tuple[str, str]]:
        return [(defs[t].name if installed(t) else f"{defs[t].name}{NOT_INSTALLED}", t) for t in model_types]

    def model_files_report(model_type: str | None) -> tuple:
        """(report box, model list): what the chosen model lacks, the same list the CLI prints offline, with the
        size to download when the Hub tells it; the labels refreshed."""
        labels = gr.update(choices=model_choices())
        if model_type not in defs:
            return gr.update(visible=False), labels
        name = defs[model_type].name
        try:
            state = install(model_type)
        except UserError as e:
            return gr.update(value=f"⚠ **{name} cannot be used:** {e}", visible=True), labels
        if state.installed:
            return gr.update(value="", visible=False), labels
        if state.missing:
            report = missing_report(state.specs, sizes=remote_sizes(state.missing))
        else:
            report = f"Its transformer file is missing: {state.local_transformer}"
        return gr.update(value=f"⚠ **{name} is not installed.**\n\n```text\n{report}\n```", visible=True), labels

    with gr.Blocks(title="wgp-zimage") as demo:
        buttons: dict[str, gr.Button] = {}
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
            model = gr.Dropdown(model_choices(), value=first, label="Model", elem_id="model-type", scale=2)
            model_info = gr.Markdown(defs[first].description, elem_id="model-info", label="model description")
        # the chosen model's missing files, their URLs and folders, the size to download (hidden when installed)
        model_files = gr.Markdown("", elem_id="model-files", visible=False)
        with gr.Row(equal_height=False):
            # hidden (FORM_PENDING) until the page-load handler has put the user's settings in
            with gr.Column(scale=5, elem_id="settings-column", elem_classes=[FORM_PENDING]) as settings_column:
                prompt = gr.Textbox(label="Prompt", lines=4, max_lines=20, elem_id="prompt",
                                    placeholder="a red fox in the snow, golden hour, 35 mm photo")
                token_info = gr.Markdown("", elem_id="token-count")
                one_per_line = gr.Checkbox(False, label="One job per line (lines starting with # are skipped)",
                                           elem_id="one-per-line")
                negative = gr.Textbox(d0["negative_prompt"], label="Negative prompt", lines=2,
                                      elem_id="negative-prompt", visible=bool(d0.get("show_negative_prompt", True)))
                with gr.Row():
                    preset = gr.Dropdown([*PRESETS, CUSTOM], value=preset_for(d0["width"], d0["height"]),
                                         label="Resolution", elem_id="resolution-preset", scale=2)
                    # number boxes, not sliders: a slider clamps a typed 500 to its end and runs it; Generate
                    # refuses it with the CLI's message instead (the ranges live in app/params.py)
                    width = gr.Number(d0["width"], precision=0, label="Width", elem_id="width", scale=2,
                                      step=16, info="16-4096, a multiple of 16")
                    height = gr.Number(d0["height"], precision=0, label="Height", elem_id="height", scale=2,
                                       step=16, info="16-4096, a multiple of 16")
                steps = gr.Number(d0["num_inference_steps"], precision=0, label="Steps", elem_id="steps", step=1,
                                  info="1-100 model evaluations")
                with gr.Row():
                    guidance = gr.Slider(0, 20, d0["guidance_scale"], step=0.1, label="Guidance (0 = off)",
                                         elem_id="guidance")
                    # the one flow shift the jobs read; hidden for models that keep it under Advanced, where
                    # flow_shift_adv mirrors it (synced in the browser, see below)
                    flow_shift = gr.Slider(1, 10, d0["flow_shift"], step=0.1, label="Flow shift", elem_id="flow-shift",
                                           visible=not flow_shift_advanced(first))
                with gr.Row(equal_height=True):
                    seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="seed", scale=3)
                    with gr.Column(scale=1, min_width=110):
                        reuse_seed = gr.Button("♻ Last seed", elem_id="reuse-seed", size="sm")
                        random_seed = gr.Button("🎲 Random", elem_id="random-seed", size="sm")
                    num_images = gr.Slider(1, 16, 1, step=1, label="Number of images", elem_id="num-images", scale=4)
                with gr.Accordion("LoRAs", open=True, elem_id="loras"):
                    with gr.Row(equal_height=True):
                        lora_select = gr.Dropdown(lora_names(), value=[], multiselect=True, label="LoRAs",
                                                  info="from the LoRA folder", elem_id="lora-select", scale=5)
                        lora_refresh = gr.Button("↻ Refresh", elem_id="lora-refresh", size="sm", scale=1,
                                                 min_width=80, elem_classes=["wgp-inline-btn"])
                    lora_strengths = gr.Textbox(
                        "", label="Strengths (one name=strength line per LoRA)", lines=2, max_lines=12,
                        elem_id="lora-strengths", placeholder="my_style=0.8",
                        info="a number, or one per step spread over the steps: 1.0,0.5")
                    lora_triggers = gr.Radio([], value=None, label="Trigger words (click to add to the prompt)",
                                             elem_id="lora-triggers", visible=False)
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    cfg_norm = gr.Slider(0, 100, 0.0, step=0.1, label="CFG normalization (0 = off)",
                                         info="caps the guided prediction's norm at K × the positive one",
                                         elem_id="cfg-normalization")
                    cfg_trunc = gr.Slider(0, 1, 1.0, step=0.01, label="CFG truncation (1 = never)",
                                          info="guidance off once 1 − sigma exceeds C", elem_id="cfg-truncation")
                    flow_shift_adv = gr.Slider(1, 10, d0["flow_shift"], step=0.1, label="Flow shift",
                                               info="this model is tuned for its default shift",
                                               elem_id="flow-shift-advanced", visible=flow_shift_advanced(first))
                    memory_override = gr.Dropdown(
                        memory_override_choices(), value=DEFAULT_MEMORY_PROFILE,
                        label="Memory profile for these jobs (CUDA)",
                        info="default: the Config section's; a profile other than the loaded model's reloads it",
                        elem_id="memory-profile-override",
                        allow_custom_value=True)  # a bad API value gets our message, not Gradio's
                with gr.Accordion("Restore settings from an image or a settings file", open=True, elem_id="restore"):
                    restore_file = gr.File(label="Drop an image made by this app, or a settings JSON",
                                           file_types=[".png", ".jpg", ".jpeg", ".webp", ".json"],
                                           type="filepath", elem_id="restore-png", height=140)
                    restore_message = gr.Markdown("", elem_id="restore-message")
                settings_inputs = [model, prompt, negative, width, height, steps, guidance, flow_shift, cfg_norm,
                                   cfg_trunc, seed, num_images, lora_strengths]
                settings_outputs = [model, prompt, negative, preset, width, height, steps, guidance, flow_shift,
                                    cfg_norm, cfg_trunc, seed, num_images, model_info, lora_select, lora_strengths,
                                    lora_triggers]

                def lora_updates(loras: list[dict[str, Any]], model_type: str | None = None) -> tuple:
                    """Dropdown (its choices refreshed, the value filtered against them), text, trigger words."""
                    names = lora_names(model_type)
                    kept = [x for x in loras if x["name"] in names]
                    for x in loras:
                        if x["name"] not in names:
                            gr.Warning(f"LoRA {x['name']!r} is not in the LoRA folder; left out")
                    selected = [x["name"] for x in kept]
                    words = trigger_words_of(lora_library(model_type), selected)
                    return (gr.update(choices=names, value=selected), selection_text(kept),
                            gr.update(choices=words, value=None, visible=bool(words)))

                def settings_updates(st: dict[str, Any]) -> tuple:
                    """Profile / last-used settings -> values for settings_outputs (a missing model keeps the
                    current one; a null prompt keeps the current text)."""
                    model_type = st.get("model_type")  # None: keep the current model (already warned)
                    if model_type is not None and model_type not in defs:
                        gr.Warning(f"model type {model_type!r} is not installed; keeping the current model")
                        model_type = None
                    show_neg = service.defaults(model_type).get("show_negative_prompt", True) if model_type else True
                    neg = st.get("negative_prompt")
                    seed_value = -1 if st.get("seed_policy", "fixed") == "random" else st.get("seed", -1)
                    return (model_type or gr.skip(),
                            st["prompt"] if st.get("prompt") is not None else gr.skip(),
                            gr.update(value=neg, visible=bool(show_neg)) if neg is not None
                            else gr.update(visible=bool(show_neg)),
                            preset_for(st["width"], st["height"]), st["width"], st["height"],
                            st["num_inference_steps"], st["guidance_scale"], st["flow_shift"],
                            st["cfg_normalization"], min(float(st["cfg_truncation"]), 1.0), seed_value,
                            st["num_images"], defs[model_type].description if model_type else gr.skip(),
                            *lora_updates(st.get("loras") or [], model_type))

                profile_parts = (build_profiles_section(store, settings_inputs, settings_outputs, settings_updates,
                                                        lambda: lora_names()) if store is not None else {})
            with gr.Column(scale=6):
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
                    abort_btn = gr.Button("Abort", variant="stop", elem_id="abort", scale=1)
                status = gr.Markdown("", elem_id="status", label="Status message")
                last_ids = gr.Textbox(label="Last submitted job IDs", elem_id="last-job-ids", interactive=False,
                                      visible=False)
                with gr.Row(equal_height=False):
                    progress = gr.HTML("", elem_id="progress")
                with gr.Row(equal_height=False):
                    preview = gr.Image(label="Live preview", elem_id="preview", interactive=False, height=256,
                                       scale=1, buttons=[])
                    gallery = gr.Gallery(label="Results (newest first)", elem_id="gallery", columns=4, height=420,
                                         object_fit="contain", scale=2, interactive=False)
                with gr.Row(equal_height=True):
                    use_settings = gr.Button("Load settings of the selected image", elem_id="use-image-settings",
                                             size="sm", scale=3)
                    # shown on page load to a browser on this machine only (is_local_request)
                    open_outputs = gr.Button("📂 Open output folder", elem_id="open-output-folder", size="sm",
                                             scale=1, visible=False)
                with gr.Group():
                    table = gr.Dataframe(queue_table([]), label="Queue (click a row to select it)",
                                         elem_id="queue-table", interactive=False, wrap=True, max_height=320,
                                         column_widths=TABLE_WIDTHS,
                                         # a long result or error stays one or two lines; a click on the cell
                                         # shows it all
                                         max_chars=TABLE_MAX_CHARS)
                    with gr.Row(equal_height=True):
                        job_id = gr.Textbox(show_label=False, placeholder="job ID (click a row)", elem_id="job-id",
                                            scale=3, min_width=120, max_lines=1, container=False)
                        for label, eid in (("▲ Up", "job-up"), ("▼ Down", "job-down"), ("↻ Retry", "job-retry"),
                                           ("✕ Remove", "job-remove"), ("Clear finished", "queue-clear-finished")):
                            buttons[eid] = gr.Button(label, elem_id=eid, size="sm", scale=1, min_width=60)

        from app.app_config import CONFIG_FILE
        from app.ui_config import build_config_section

        build_config_section(queue, service, config, config_file or output_dir / CONFIG_FILE)

        # ---------------------------------------------------------- polling (the only way results reach the page)

        captions: dict[str, str] = {}
        gallery_files = served_files(output_dir)

        def poll(state: dict, status_text: str | None = None) -> tuple:
            state = dict(state or {})
            version = queue.version
            table_out = progress_out = gallery_out = status_out = gr.skip()
            jobs = None
            if state.get("v") != version:
                jobs = queue.snapshot(prompt_chars=PROMPT_PREVIEW_CHARS)  # the table shows only their start
                table_out, progress_out = queue_table(jobs), progress_html(jobs, queue.notices)
                state["v"] = version
            if state.get("rv") != queue.results_version:
                # only when a job ended (or on a tab's first poll): the folder is not rescanned every step
                state["rv"] = queue.results_version
                items = recent_images(output_dir, cache=captions)
                gallery_files.allow(p for p, _ in items)  # the only local files the server may send
                key = [p for p, _ in items]
                if key != state.get("gallery"):
                    # a new file on top while this tab watches: show it large, like A1111
                    newest = bool(state.get("gallery") is not None and key and key[0] not in state["gallery"])
                    gallery_out = gr.Gallery(value=items, selected_index=0 if newest else None)
                    state["gallery"] = key
            # a status line naming pending jobs follows them (read again when they or the line change)
            if PENDING_STATUS.match(status_text or "") and (jobs is not None or state.get("st") != status_text):
                status_out = status_after(status_text, jobs if jobs is not None else queue.snapshot()) or gr.skip()
            state["st"] = status_text
            preview_version, image = queue.preview()
            preview_out = image if state.get("pv") != preview_version else gr.skip()
            state["pv"] = preview_version
            return table_out, progress_out, preview_out, gallery_out, status_out, state

        poll_io = {"fn": poll, "inputs": [seen, status], "outputs": [table, progress, preview, gallery, status, seen],
                   "queue": False, "show_progress": "hidden", "api_visibility": "private"}
        gr.Timer(1.0).tick(**poll_io)
        demo.load(**poll_io)

        # ---------------------------------------------------------- submitting and controlling jobs

        submit_messages: dict[str, str] = {}  # session -> outcome of its last Generate, for the status box

        def generate(model_type: str, prompt: str, one_per_line: bool, negative_prompt: str, width: float,
                     height: float, steps: float, guidance: float, flow_shift: float, cfg_normalization: float,
                     cfg_truncation: float, seed: float, num_images: float, loras: str | None = "",
                     memory_profile: str | int | None = DEFAULT_MEMORY_PROFILE, request: gr.Request = None) -> str:
            """Queue one job (or one per prompt line); returns the new job IDs, comma-separated.

            loras (optional): 'name=strength' lines, or a JSON list of {"name", "strength"} objects; a
            strength is a number or a per-step schedule such as "1.0,0.5".
            memory_profile (optional): "default" (the Config section's) or 1-5 for these jobs only."""
            session = getattr(request, "session_hash", None) or ""
            cut: list[str] = []
            try:
                # refused here, before anything else reads them: text that is not Unicode breaks every
                # JSON reply that would carry it
                for text, label in ((prompt, "the prompt"), (negative_prompt or "", "the negative prompt"),
                                    (loras or "", "the LoRAs text")):
                    if isinstance(text, str):
                        check_text(text, label)
                # raw values (preprocess=False below): any API client may send anything; parsed strictly here
                a = generate_arguments({
                    "model_type": model_type, "prompt": prompt, "one_per_line": one_per_line,
                    "negative_prompt": negative_prompt, "width": width, "height": height,
                    "num_inference_steps": steps, "guidance_scale": guidance, "flow_shift": flow_shift,
                    "cfg_normalization": cfg_normalization, "cfg_truncation": cfg_truncation, "seed": seed,
                    "num_images": num_images, "memory_profile": memory_profile}, API_NAMES)
                selection = parse_selection(loras)
                model_type, prompt, one_per_line = a.pop("model_type"), a.pop("prompt"), a.pop("one_per_line")
                if selection:  # unknown names are refused here, not when the job runs
                    check_available(selection, lora_library(model_type))
                specs = [JobSpec(model_type=model_type, prompt=p, loras=[dict(x) for x in selection], **a)
                         for p in split_prompts(prompt, one_per_line)[:MAX_JOBS_PER_REQUEST + 1]]
                if not specs:
                    raise UserError("the prompt is empty (every line is blank or a # comment)")
                if len(specs) > MAX_JOBS_PER_REQUEST:
                    raise UserError(f"one request can queue at most {MAX_JOBS_PER_REQUEST} jobs: split the "
                                    "prompt lines into smaller batches")
                for s in specs:  # all checked before any is queued
                    cut += cap_texts(s, UI_NAMES)
                    validate(s, UI_NAMES)
                ids = queue.submit_many(specs, UI_NAMES)  # all or none (the queue's length is capped)
            except UserError as e:
                # an error (not a return value) so API clients cannot mistake it for a job ID
                submit_messages.pop(session, None)
                submit_messages[session] = f"⚠ Not queued: {e}"
                raise gr.Error(str(e), title="Not queued", print_exception=False) from None
            if len(submit_messages) > 256:  # API calls never read theirs: keep the dict small
                submit_messages.clear()
            cut = list(dict.fromkeys(cut))  # one line per kind of cut, not one per prompt line
            for w in cut:
                gr.Warning(w)
            submit_messages[session] = f"Queued job{'s' * (len(ids) != 1)} {', '.join(ids)}." + "".join(
                f"\n\n⚠ {w}" for w in cut)
            if store is not None:  # restored when a page opens; never raises
                for w in store.save_last_used(controls_to_settings(
                        model_type, prompt, a["negative_prompt"], a["width"], a["height"], a["num_inference_steps"],
                        a["guidance_scale"], a["flow_shift"], a["cfg_normalization"], a["cfg_truncation"], a["seed"],
                        a["num_images"], selection)):
                    log.warning("%s", w)
            gr.Info(f"Queued {len(ids)} job{'s' * (len(ids) != 1)}: {', '.join(ids)}")
            return ",".join(ids)

        def submit_message(request: gr.Request) -> str:
            return submit_messages.pop(getattr(request, "session_hash", None) or "", gr.skip())

        gen_inputs = [model, prompt, one_per_line, negative, width, height, steps, guidance, flow_shift,
                      cfg_norm, cfg_trunc, seed, num_images, lora_strengths, memory_override]
        submitted = generate_btn.click(generate, gen_inputs, last_ids, api_name="generate", show_progress="hidden",
                                       concurrency_limit=None, preprocess=False)  # our parsing, our messages
        # the status box keeps the outcome after the toast fades. Gradio 6.31's page does not run .then()
        # after an error (whatever its docs say), hence .failure() for that path.
        message_io = {"fn": submit_message, "inputs": None, "outputs": status, "queue": False,
                      "show_progress": "hidden", "api_visibility": "private"}
        submitted.then(**message_io).then(**poll_io)
        submitted.failure(**message_io)

        def stop() -> str:
            """Stop the running job after its current step (the queue goes on with the next one)."""
            job_id = queue.abort()
            if job_id is None:
                return "No job is running."
            try:
                job = queue.get(job_id)  # read after the flag is set: it stops at most one step later
            except UserError:
                return f"Stopping job {job_id}."
            where = f" at step {job['step']}/{job['total']}" if job["phase"] == "denoising" else ""
            return f"Stopping job {job_id}{where} after the current step."

        abort_btn.click(stop, None, status, api_name="stop", queue=False, show_progress="hidden")

        def queue_op(op: str):
            def run(job_id: str) -> str:
                job_id = (job_id or "").strip()
                try:
                    if not job_id:
                        raise UserError("select a job in the queue table first")
                    if op == "remove":
                        queue.remove(job_id)
                    elif op in ("up", "down"):
                        if not queue.move(job_id, op):
                            return f"Job {job_id} is already {'first' if op == 'up' else 'last'} in the queue."
                    else:
                        queue.retry(job_id)
                except UserError as e:
                    gr.Warning(str(e))
                    return f"⚠ {e}"
                return {"remove": f"Removed job {job_id}.", "up": f"Moved job {job_id} up.",
                        "down": f"Moved job {job_id} down.", "retry": f"Queued job {job_id} again."}[op]
            run.__name__ = f"queue_{op}"
            return run

        for eid, op, name in (("job-remove", "remove", "remove"), ("job-up", "up", "move_up"),
                              ("job-down", "down", "move_down"), ("job-retry", "retry", "retry")):
            buttons[eid].click(queue_op(op), job_id, status, api_name=name, queue=False,
                      show_progress="hidden").then(**poll_io)

        def clear_finished() -> str:
            """Drop done, failed and aborted jobs from the table (their images stay on disk)."""
            return f"Cleared {queue.clear_finished()} finished job(s)."

        buttons["queue-clear-finished"].click(clear_finished, None, status, api_name="clear_finished", queue=False,
                        show_progress="hidden").then(**poll_io)

        def list_queue() -> list[dict[str, Any]]:
            """Every job: id, status, spec, step/total, seconds_per_step, eta, paths, seeds, error."""
            return queue.snapshot()

        gr.api(list_queue, api_name="queue", queue=False)

        def on_select(evt: gr.SelectData) -> str:
            row = evt.row_value if isinstance(evt.row_value, list) else []
            return str(row[0]) if row else gr.skip()

        table.select(on_select, None, job_id, queue=False, show_progress="hidden", api_visibility="private")

        # ---------------------------------------------------------- settings helpers

        model.input(model_updates, model, [negative, preset, width, height, steps, guidance, flow_shift, model_info],
                    queue=False, show_progress="hidden", api_visibility="private")
        # .change: a restored file, a profile or the page load may choose the model too
        model.change(model_files_report, model, [model_files, model], queue=False, show_progress="hidden",
                     api_visibility="private")

        def flow_shift_place(model_type: str) -> tuple:
            adv = flow_shift_advanced(model_type)
            return gr.update(visible=not adv), gr.update(visible=adv)

        # .change: the model may also come from a restored file, a profile or the last used settings
        model.change(flow_shift_place, model, [flow_shift, flow_shift_adv], queue=False, show_progress="hidden",
                     api_visibility="private")
        # the advanced slider mirrors the one the jobs read; synced in the browser (no round trip, so a click
        # on Generate right after a drag sends the new value)
        mirror = {"fn": None, "js": "(v) => v", "queue": False, "show_progress": "hidden", "api_visibility": "private"}
        flow_shift.change(inputs=flow_shift, outputs=flow_shift_adv, **mirror)
        flow_shift_adv.input(inputs=flow_shift_adv, outputs=flow_shift, **mirror)

        def tokens(model_type: str, text: str) -> str:
            """Live count against the prompt limit (chat template included); longer prompts are truncated."""
            if not text or not isinstance(text, str):
                return ""
            if text_problem(text):  # the tokenizer would fail on it, and Generate refuses it
                return f"⚠ the prompt {text_problem(text)}: remove it"
            limit = service.definition(model_type).defaults().get("max_prompt_tokens")
            try:
                n = service.token_count(model_type, text)  # counts the first MAX_PROMPT_CHARS only: cheap
            except Exception:  # a count must never break typing; the job reports real problems
                log.debug("token count failed", exc_info=True)
                n = None
            if n is None or not limit:
                return ""
            if len(text) > MAX_PROMPT_CHARS:
                return (f"**{n}+ / {limit} tokens**: {len(text):,} characters; a job keeps the first "
                        f"{MAX_PROMPT_CHARS:,} and the model reads its first {limit} tokens")
            return f"**{n} / {limit} tokens**: the end will be cut" if n > limit else f"{n} / {limit} tokens"

        prompt.change(tokens, [model, prompt], token_info, queue=False, show_progress="hidden", api_name="token_count")
        model.change(tokens, [model, prompt], token_info, queue=False, show_progress="hidden",
                     api_visibility="private")

        def on_preset(label: str) -> tuple:
            return PRESETS.get(label, (gr.skip(), gr.skip()))

        preset.input(on_preset, preset, [width, height], queue=False, show_progress="hidden",
                     api_visibility="private")
        for box in (width, height):
            box.input(lambda w, h: preset_for(whole(w), whole(h)), [width, height], preset, queue=False,
                      show_progress="hidden", api_visibility="private")

        def last_seed() -> int:
            """The seed of the newest finished job's first image."""
            value = queue.last_seed()
            if value is None:
                gr.Warning("no finished job yet: nothing to reuse")
                return gr.skip()
            return value

        reuse_seed.click(last_seed, None, seed, api_name="last_seed", queue=False, show_progress="hidden")
        # -1: each job draws its own seed (recorded in its images); set in the browser, no round trip
        random_seed.click(None, None, seed, js="() => -1", queue=False, show_progress="hidden",
                          api_visibility="private")

        def open_outputs_fn(request: gr.Request) -> str:
            message = open_output_folder(service.config.output_dir, request)
            if message.startswith("⚠"):
                gr.Warning(message.lstrip("⚠ "))
            return message

        open_outputs.click(open_outputs_fn, None, status, queue=False, show_progress="hidden",
                           api_visibility="private")

        def show_open_outputs(request: gr.Request) -> Any:
            return gr.update(visible=is_local_request(request))

        demo.load(show_open_outputs, None, open_outputs, queue=False, show_progress="hidden", api_visibility="private")

        restore_outputs = [*settings_outputs, restore_message]

        def restore(path: str | None) -> tuple:
            """Settings from a dropped file into the controls: an image made by this app (its own seed, one
            image), the settings JSON an image carries, or a generation profile. The last output says what
            happened (warnings included); a file that cannot be used changes nothing else."""
            if not path:
                return tuple(gr.skip() for _ in restore_outputs)
            try:
                restored = restore_settings(path, defs, lambda t: lora_names(t))
            except UserError as e:
                gr.Warning(str(e))
                return (*(gr.skip() for _ in settings_outputs), f"⚠ Not restored: {e}")
            for w in restored.warnings:
                gr.Warning(w)
            gr.Info(f"Settings restored from the {restored.source}")
            lines = [f"Settings restored from the {restored.source} **{Path(path).name}**."]
            lines += [f"- ⚠ {w}" for w in restored.warnings]
            return (*settings_updates(restored.settings), "\n".join(lines))

        # the box empties once read (the message names the file), so the next file can be dropped at once
        restore_file.upload(restore, restore_file, restore_outputs, api_name="restore", queue=False,
                            show_progress="hidden").then(lambda: None, None, restore_file, queue=False,
                                                         show_progress="hidden", api_visibility="private")

        def on_gallery_select(evt: gr.SelectData) -> str:
            value = evt.value if isinstance(evt.value, dict) else {}
            image = value.get("image") if isinstance(value.get("image"), dict) else {}
            return image.get("path") or ""

        gallery.select(on_gallery_select, None, selected_image, queue=False, api_visibility="private")
        def restore_selected(path: str) -> tuple:
            if not path:
                gr.Warning("select an image in the gallery first")
            return restore(path)

        use_settings.click(restore_selected, selected_image, restore_outputs, queue=False, show_progress="hidden",
                           api_visibility="private")

        # ---------------------------------------------------------- LoRAs (bound to their strengths by name)

        def on_lora_select(selected: list[str] | None, text: str, model_type: str) -> tuple:
            selected = list(selected or [])
            words = trigger_words_of(lora_library(model_type), selected)
            return sync_lines(selected, text), gr.update(choices=words, value=None, visible=bool(words))

        lora_select.input(on_lora_select, [lora_select, lora_strengths, model], [lora_strengths, lora_triggers],
                           queue=False, show_progress="hidden", api_visibility="private")

        def on_lora_text(text: str, model_type: str) -> Any:
            """Typed lines select their LoRAs too (names the folder lacks are refused at Generate)."""
            return gr.update(value=names_in(text, lora_names(model_type)))

        lora_strengths.blur(on_lora_text, [lora_strengths, model], lora_select, queue=False, show_progress="hidden",
                            api_visibility="private")

        def lora_refresh_fn(selected: list[str] | None, text: str, model_type: str) -> tuple:
            """Rescan the LoRA folder; returns the LoRA names."""
            names = [i.name for i in lora_library(model_type).refresh()]
            kept = [n for n in (selected or []) if n in names]
            words = trigger_words_of(lora_library(model_type), kept)
            gr.Info(f"{len(names)} LoRA{'s' * (len(names) != 1)} in the folder")
            return (gr.update(choices=names, value=kept), sync_lines(kept, text),
                    gr.update(choices=words, value=None, visible=bool(words)), names)

        lora_names_out = gr.JSON(visible=False)
        lora_refresh.click(lora_refresh_fn, [lora_select, lora_strengths, model],
                           [lora_select, lora_strengths, lora_triggers, lora_names_out], api_name="lora_refresh",
                           queue=False, show_progress="hidden")

        def on_trigger(word: str | None, text: str) -> tuple:
            return insert_word(text, word), gr.update(value=None)

        lora_triggers.input(on_trigger, [lora_triggers, prompt], [prompt, lora_triggers], queue=False,
                            show_progress="hidden", api_visibility="private")

        # ---------------------------------------------------------- the form: this browser's, else the last used

        def form_updates(saved: dict[str, Any]) -> tuple:
            """The browser's saved form (clean_form) -> values for form_outputs."""
            model_type = saved["model_type"]
            st, warnings = model_settings(model_type, defs, store)  # fields the saved form lacks
            for w in warnings:
                log.warning("%s", w)
            st = {**st, **{k: saved[k] for k in FORM_KEYS if k in saved and k in st}, "seed_policy": "fixed",
                  "loras": []}
            out = list(settings_updates(st))
            # the strengths text as typed (it may be half written); the dropdown gets the names it knows
            text = saved.get("loras", "")
            names = names_in(text, lora_names(model_type))
            words = trigger_words_of(lora_library(model_type), names)
            out[-3:] = [gr.update(choices=lora_names(model_type), value=names), text,
                        gr.update(choices=words, value=None, visible=bool(words))]
            memory = saved.get("memory_profile")
            choices = [v for _, v in memory_override_choices()]
            return (*out, saved.get("one_per_line", gr.skip()), memory if memory in choices else gr.skip())

        def last_used_updates() -> tuple:
            """The server's last used settings (or this model's saved defaults); skips when there are none."""
            keep = tuple(gr.skip() for _ in settings_outputs)
            if store is None:
                return keep
            try:
                if store.load_last_used()[0] is None and store.get_model_defaults(first)[0] is None:
                    return keep  # the page already shows that
                st, warnings = startup_settings(store, defs, default_model=first, available_loras=lora_names())
            except UserError as e:
                log.warning("cannot restore the last used settings: %s", e)
                return keep
            for w in warnings:
                log.warning("%s", w)
            return settings_updates(st)

        form_outputs = [*settings_outputs, one_per_line, memory_override]

        def startup(form: Any) -> tuple:
            """Fill the form when a page opens, then show it (it is hidden until then: no flash of defaults)."""
            try:
                saved = clean_form(form, defs)
                values = form_updates(saved) if saved is not None else (*last_used_updates(), gr.skip(), gr.skip())
            except Exception:  # never leave the form hidden (the CSS shows it after a few seconds anyway)
                log.exception("cannot restore the form")
                values = tuple(gr.skip() for _ in form_outputs)
            return (*values, gr.update(elem_classes=[]))

        demo.load(startup, form_state, [*form_outputs, settings_column], queue=False, show_progress="hidden",
                  api_visibility="private").then(model_files_report, model, [model_files, model], queue=False,
                                                 show_progress="hidden", api_visibility="private")
        # every change of a control saves the form in this browser (JavaScript only: no round trip)
        gr.on([c.change for c in gen_inputs], None, [*gen_inputs, form_state], form_state, js=save_form_js(),
              queue=False, show_progress="hidden", api_visibility="private")
        if store is not None:
            demo.load(lambda: gr.update(choices=profile_choices(store)), None, profile_parts["profile-select"],
                      queue=False, show_progress="hidden", api_visibility="private")
    return demo


__all__ = ["build_ui", "launch_options", "PRESETS", "UI_NAMES"]
