"""What the page shows, as pure functions: the queue table, the progress line, the status line that follows
queued jobs, the gallery's newest images and the local-browser check for "Open output folder".
No Gradio, no torch here; tested through the API and directly.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from app.metadata import read_settings
from app.outputs import is_input_copy
from app.queue import FINISHED, clean_text

CUSTOM = "Custom"
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
TABLE_HEADERS = ["ID", "Status", "Progress", "Prompt", "Settings", "Seed", "Result"]
TABLE_WIDTHS = ["11%", "11%", "11%", "18%", "16%", "10%", "23%"]  # Result: room for a truncated line
STATUS_ICONS = {"queued": "⏳", "running": "▶", "done": "✔", "failed": "✖", "interrupted": "⚠", "aborted": "■"}
TABLE_MAX_CHARS = 48
GALLERY_SIZE = 24
PROMPT_PREVIEW_CHARS = 100  # of each prompt, in the table and progress line (rebuilt on every step)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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


def table_row(j: dict[str, Any], short_names: Mapping[str, str] | None = None) -> list[Any]:
    """One job's row; short_names: how the Settings cell names model types (their definitions' short names)."""
    s = j["spec"]
    short_names = short_names or {}
    seed = j["seeds"][0] if j["seeds"] else ("random" if s["seed"] == -1 else s["seed"])
    prompt = s["prompt"] if len(s["prompt"]) <= 60 else s["prompt"][:57] + "..."
    settings = (f"{short_names.get(s['model_type'], s['model_type'])} · {s['width']}×{s['height']} · "
                f"{s['num_inference_steps']} steps" + (f" · ×{s['num_images']}" if s["num_images"] > 1 else "")
                # older queue files have no memory_profile
                + (f" · memory profile {s['memory_profile']}" if s.get("memory_profile") else ""))
    # the worker (on Ray): which machine / GPU runs or ran it
    status = f"{STATUS_ICONS.get(j['status'], '')} {j['status']}" + (f" · {j['worker']}" if j.get("worker") else "")
    return [j["id"], status, job_progress(j), prompt,
            settings, seed, job_result(j)]


def _sort_key(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def queue_table(jobs: list[dict[str, Any]], short_names: Mapping[str, str] | None = None) -> pd.DataFrame:
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
            row = table_row(j, short_names)
        except Exception:
            job_id = j.get("id", "?") if isinstance(j, dict) else "?"
            log.warning("queue table: job %r cannot be shown", job_id, exc_info=True)
            row = [job_id, "?", "", "", "", "", "this job's saved data is unreadable; remove it"]
        # every cell JSON-safe: a lone surrogate would fail the page's poll (HTTP 500) for every client
        rows.append([clean_text(str(v)) if not isinstance(v, int) or isinstance(v, bool) else v for v in row])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def progress_html(jobs: list[dict[str, Any]], notices: list[str] | None = None,
                  workers: list[dict[str, Any]] | None = None, waiting: str = "") -> str:
    """The running job's step i/N, s/step and ETA; else the last finished job's outcome; why queued jobs wait
    (waiting: JobQueue.waiting_reason), the workers' states (on Ray: JobQueue.workers()) and notices (saved jobs
    that could not be restored) below. Never raises: it is polled by every tab."""
    try:
        out = _progress_html(jobs)
        if waiting and any(j["status"] == "queued" for j in jobs):
            out += f"<div class='error'>⏸ Queued jobs wait: {html.escape(waiting)} (they start once it can)</div>"
    except Exception:
        log.warning("progress: cannot show the queue's state", exc_info=True)
        out = "<div class='error'>The queue's state cannot be shown (see the log).</div>"
    try:
        out += workers_html(workers or [])
    except Exception:
        log.warning("progress: cannot show the workers", exc_info=True)
    out += "".join(f"<div class='error'>⚠ {html.escape(n)}</div>" for n in (notices or [])[-5:])
    return clean_text(out)


def workers_html(workers: list[dict[str, Any]]) -> str:
    """One line: each worker, where it runs, its state and the job it runs (empty without workers)."""
    if not workers:
        return ""
    parts = []
    for w in workers:
        state = str(w.get("state", "?"))
        text = f"{w.get('name', '?')}" + (f" ({w['node']})" if w.get("node") else "") + f": {state}"
        text += f" {w['job']}" if w.get("job") and state == "running" else ""
        text += f" · {w['model']}" if w.get("model") else ""
        parts.append(f"<span class='{'error' if state.startswith(('unavailable', 'lost')) else 'muted'}'>"
                     f"{html.escape(text)}</span>")
    return "<div class='workers'>Workers: " + " · ".join(parts) + "</div>"


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
        entries = list(Path(folder).iterdir())
        names = {p.name for p in entries}
        for p in entries:
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not is_input_copy(p.name, names):
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
