"""The job queue behind the web UI: a persisted list of jobs and one worker thread per executor slot (the
in-process GenerationService: one; Ray: one per actor, app/ray_executor.py).

Gradio's own queue is not used for generation: a page handler only submits here and polls
`snapshot()`, so closing or reloading the tab never stops a job, and every tab sees the same queue.

Persistence: the state file (e.g. `wgp_zimage_queue.json`) is the list of jobs (status, progress, results,
settings), rewritten atomically (temp file + os.replace) on every structural change (submit, remove, move,
retry, a job starting or finishing, each image saved), not on every denoising step. Each job's prompt and
negative prompt live in a small file of their own, `<state file stem>.prompts/<id>.json`, written once when
the job is queued and removed after it leaves the list, so a change never rewrites every prompt. A state file
of the first format (prompts inline) is still read; the next save converts it.

When the process dies, the job it was running comes back as "interrupted": it is re-run only by `retry(id)`,
never silently (it may be the job that killed the process). Jobs still "queued" run again after a restart.
Each image is recorded in its job as soon as it is saved, so a retry renders only the missing ones (same
seeds). A saved job that does not make sense (no settings, unknown status, duplicate id, text that is not
Unicode) is moved aside to `<state file>.rejected` with a message; the rest of the queue is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.cancel import CancelToken
from app.executors import Executor, LocalExecutor, WorkerLost
from app.jobs import TEXT_FIELDS, JobSpec, cap_texts, text_problem, validate
from app.outputs import PART_PATTERN, SaveError, clean_stale_parts, output_folder_problem, unique_path
from app.params import all_params
from app.untrusted import MAX_JSON_DEPTH, check_structure
from models.errors import GenerationInterrupted, UserError
from models.files import atomic_path
from models.registry import PreviewFactors

log = logging.getLogger("wgp_zimage")

STATE_VERSION = 2  # 1: prompts inline in the state file; 2: in one file per job
STATUSES = ("queued", "running", "done", "failed", "interrupted", "aborted")
FINISHED = ("done", "failed", "interrupted", "aborted")
RETRYABLE = ("failed", "interrupted", "aborted")
WAITING = ("queued", "running")
KEEP_FINISHED = 100  # older done/failed/aborted jobs drop off the persisted history
# limits, so one request cannot fill memory and disk: jobs one submit may add, and jobs waiting to run at once
MAX_JOBS_PER_REQUEST = 100
MAX_WAITING = 200
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # ids name the per-job prompt files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # kept on an input's copy
RAW_TEXTS_CHARS = 100_000  # of an unusable prompt file, kept in the .rejected record
INTERRUPTED_ERROR = "the app stopped while this job was running; retry it to run it again"

PREVIEW_MAX_SIDE = 256


def latent_preview(latents: Any, max_side: int = PREVIEW_MAX_SIDE, factors: PreviewFactors | None = None
                   ) -> Image.Image:
    """A cheap RGB preview of the first image of a (n, C, h, w) latent batch (tensor or array).

    factors: the model family's latent -> RGB projection (C rows of 3, and 3 biases), from its handler's
    latent_preview_factors: one matrix product instead of a VAE decode. Without one (or for another channel
    count) the first three channels are shown, stretched."""
    x = latents[0]
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed here
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    matrix = np.asarray(factors[0], dtype=np.float32) if factors is not None else None
    if matrix is not None and matrix.shape == (x.shape[0], 3):
        rgb = np.einsum("chw,cr->hwr", x, matrix) + np.asarray(factors[1], dtype=np.float32)
        rgb = (rgb + 1.0) / 2.0
    else:  # another latent space: show its first three channels, stretched
        rgb = np.moveaxis(x[:3], 0, -1)
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-6)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    scale = max(1, max_side // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def clean_text(text: str) -> str:
    """text that any JSON encoder takes: characters that are not Unicode (lone surrogates) become "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def user_message(exc: BaseException) -> str:
    """One clear line for the page; the traceback goes to the log."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = clean_text(text)  # an exception may quote the input: the message must stay serializable
    if isinstance(exc, UserError):
        return text
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 1] ...: '/x/.name.abcd1234.part'": said plainly
        where = ""
        if exc.filename:
            name = Path(os.fsdecode(exc.filename))
            where = f" (in {name.parent})" if PART_PATTERN.match(name.name) else f" ({name})"
        return clean_text(f"{exc.strerror}{where}")[:400]
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ("out of memory: try a smaller size, fewer images per job, or a lower-memory setting "
                f"({text[:200]})")
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass
class Job:
    id: str
    spec: dict[str, Any]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    phase: str = ""  # "loading model", "denoising", "decoding" while running
    step: int = 0
    total: int = 0
    seconds_per_step: float | None = None
    eta: float | None = None
    seconds: float | None = None
    paths: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str = ""
    lora_reports: list[str] = field(default_factory=list)  # "LoRA x (fmt): N of M tensors applied, K unmatched"
    # image index (0-based) of each entry of paths / seeds: images are recorded as they are saved, so after a
    # crash a retry knows which ones exist; batch_seed is image 0's seed (a random seed is resolved once)
    image_indexes: list[int] = field(default_factory=list)
    batch_seed: int | None = None
    worker: str = ""  # the executor's worker that runs / ran it (empty: the app itself)
    attempts: int = 0  # runs cut short by a lost worker (app.executors.WorkerLost): retried up to max_retries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# the saved job's fields and what each must hold (older files lack the later ones: defaults apply)
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {  # name -> (types, None allowed)
    "created": (_NUMBER, False), "started": (_NUMBER, True), "finished": (_NUMBER, True),
    "phase": ((str,), False), "step": ((int,), False), "total": ((int,), False),
    "seconds_per_step": (_NUMBER, True), "eta": (_NUMBER, True), "seconds": (_NUMBER, True),
    "error": ((str,), False), "batch_seed": ((int,), True), "worker": ((str,), False),
    "attempts": ((int,), False),
}
_LIST_TYPES: dict[str, type] = {"paths": str, "seeds": int, "lora_reports": str, "image_indexes": int}


def read_json_file(path: Path) -> Any:
    """A queue file's content; OSError, or ValueError saying why it cannot be used (not JSON, nested deeper
    than MAX_JSON_DEPTH: a file nested thousands deep overflowed the parser's stack and stopped the app).
    Lone surrogates pass: each saved job is checked for them on its own (job_from_record)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    return check_structure(data, texts=False)


def job_from_record(record: Any, texts: dict[str, Any] | None = None) -> Job:
    """A saved job, checked; ValueError saying what is wrong. texts: its prompt file's content (format 2)."""
    if not isinstance(record, dict):
        raise ValueError(f"not a job record ({type(record).__name__})")
    job_id = record.get("id")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ValueError(f"no usable id ({str(job_id)[:40]!r})")
    status = record.get("status")
    if status not in STATUSES:
        raise ValueError(f"unknown status {str(status)[:40]!r}")
    for name, (types, nullable) in _FIELD_TYPES.items():
        if name in record:
            value = record[name]
            if not ((value is None and nullable) or (isinstance(value, types) and not isinstance(value, bool))):
                raise ValueError(f"bad {name} ({str(value)[:40]!r})")
    for name, item_type in _LIST_TYPES.items():
        value = record.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, item_type) and not isinstance(v, bool)
                                                  for v in value):
            raise ValueError(f"bad {name} (a list of {item_type.__name__} expected)")
    for name in ("phase", "error", "paths", "lora_reports"):
        for text in record.get(name) if isinstance(record.get(name), list) else [record.get(name, "")]:
            if text_problem(text):
                raise ValueError(f"{name} {text_problem(text)}")
    spec = record.get("spec")
    if not isinstance(spec, dict) or not spec:
        raise ValueError("no settings (spec)")
    spec = dict(spec)
    if "prompt" not in spec:  # format 2: the texts are in the job's own file
        if texts is None:
            raise ValueError("its prompt file is missing")
        spec.update({k: texts.get(k, "") for k in TEXT_FIELDS})
    if not isinstance(spec.get("model_type"), str):
        raise ValueError("no model type in its settings")
    try:
        job_spec = JobSpec.from_dict(spec)
    except TypeError as e:
        raise ValueError(f"bad settings ({e})") from None
    for w in cap_texts(job_spec):  # a file from before the cap may hold megabytes
        log.warning("saved job %s: %s", job_id, w)
    try:
        validate(job_spec)
    except UserError as e:
        raise ValueError(f"bad settings: {e}") from None
    job = Job.from_dict({**record, "spec": job_spec.to_dict()})
    if "image_indexes" not in record:  # format 1 recorded the images of finished jobs only, in order
        job.image_indexes = list(range(len(job.paths)))
    if not len(job.paths) == len(job.seeds) == len(job.image_indexes):
        raise ValueError("paths, seeds and image indexes differ in length")
    return job


BLOCKED_RETRY_SECONDS = 5.0  # a slot without a worker, or an output folder that cannot be written, is looked at again
MAX_RETRIES = 2  # a job whose worker was lost runs again at most this many times, then fails with the reason


class JobQueue:
    """Runs jobs through an executor (default: the in-process service, one job at a time); thread-safe; see
    the module docstring. With several worker slots (app/ray_executor.py) jobs run side by side, each slot
    taking the first queued job it suits best (model affinity: see _pick)."""

    def __init__(self, service: Any, state_file: str | Path | None = None, preview_every: int = 2,
                 executor: Executor | None = None, max_retries: int = MAX_RETRIES):
        self.service = service
        self.executor: Executor = executor if executor is not None else LocalExecutor(service)
        self.max_retries = max(0, int(max_retries))
        self.state_file = Path(state_file) if state_file else None
        self.preview_every = max(1, int(preview_every))
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._version = 0  # bumped on every change, progress included: pollers skip unchanged snapshots
        self._results_version = 0  # bumped when a job ends: the gallery rescans the output folder only then
        self._preview: Image.Image | None = None
        self._preview_version = 0
        # running jobs by slot, with their tokens: stopping one stops that job only
        self._running: dict[int, tuple[Job, CancelToken]] = {}
        self._remove_after: set[str] = set()  # running jobs removed by the user: dropped when they stop
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._texts_saved: set[str] = set()  # jobs whose prompt file is written (it never changes after)
        self._ready: set[int] = set()  # slots whose worker was there at their last look
        self._held = False  # when_idle's call runs: no job may start
        self._blocked = ""  # why queued jobs cannot start now (the output folder cannot be written)
        self._idle_lock = threading.Lock()
        self.notices: list[str] = []  # restore problems, for the page (one line each)
        self._restore()

    # ------------------------------------------------------------ persistence

    @property
    def texts_dir(self) -> Path | None:
        """The folder of the per-job prompt files, beside the state file."""
        return self.state_file.with_name(self.state_file.stem + ".prompts") if self.state_file else None

    @property
    def inputs_dir(self) -> Path | None:
        """The folder of the jobs' input files (img2img images, masks), copied at submit: an upload or a file
        the user moves away later must not break a queued job, nor a restart."""
        return self.state_file.with_name(self.state_file.stem + ".inputs") if self.state_file else None

    def _keep_inputs(self, spec: JobSpec) -> None:
        """Point spec's input files at copies in inputs_dir (named by content: one copy per file)."""
        if self.inputs_dir is None:
            return
        for p in all_params():
            value = getattr(spec, p.name, None)
            if not p.is_file or not value or Path(value).parent == self.inputs_dir:
                continue
            data = Path(value).read_bytes()
            suffix = Path(value).suffix.lower() if Path(value).suffix.lower() in IMAGE_SUFFIXES else ".img"
            target = self.inputs_dir / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
            if not target.is_file():
                self.inputs_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_bytes(data)
            setattr(spec, p.name, str(target))

    def _checked_inputs(self, record: Any) -> Any:
        """record, once each input file of the saved job is one of the queue's own copies (in inputs_dir): a
        queue file naming /etc/hostname must not have it opened; ValueError otherwise. A copy named under the
        folder's former place (the state folder moved) is found in the current one (a changed copy returned)."""
        spec = record.get("spec") if isinstance(record, dict) else None
        if not isinstance(spec, dict) or self.inputs_dir is None:
            return record  # job_from_record says what is wrong
        folder, spec = self.inputs_dir.resolve(), dict(spec)
        for p in all_params():
            value = spec.get(p.name)
            if not p.is_file or not value or not isinstance(value, str):
                continue
            given = Path(value)
            here = self.inputs_dir / given.name
            if given.parent.name == self.inputs_dir.name and given.name not in ("", ".", "..") and here.is_file():
                given = here
            if given.resolve().parent != folder:
                raise ValueError(f"its {p.name} file {clean_text(value)[:200]!r} is not one of the queue's "
                                 f"input copies (in {self.inputs_dir.name}/)")
            spec[p.name] = str(given)
        return {**record, "spec": spec}

    def _prune_inputs(self) -> None:
        """Remove the input copies no job in the queue refers to any more."""
        if self.inputs_dir is None or not self.inputs_dir.is_dir():
            return
        used = {v for j in self._jobs for v in j.spec.values() if isinstance(v, str) and v}
        for f in self.inputs_dir.iterdir():
            if f.is_file() and str(f) not in used:
                f.unlink(missing_ok=True)

    def _texts_path(self, job_id: str) -> Path:
        assert self.texts_dir is not None
        return self.texts_dir / f"{job_id}.json"

    def _read_texts(self, record: Any) -> dict[str, Any] | None:
        """The job's prompt file; None when there is none; ValueError when it cannot be used."""
        job_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            return None
        try:
            texts = read_json_file(self._texts_path(job_id))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ValueError(f"its prompt file cannot be read ({clean_text(str(e))[:200]})") from None
        if not isinstance(texts, dict):
            raise ValueError(f"its prompt file holds no prompts ({type(texts).__name__})")
        return texts

    def _restore(self) -> None:
        if self.state_file is None:
            return
        for folder in (self.state_file.parent, self.texts_dir, self.inputs_dir):  # what a killed save left
            clean_stale_parts(folder)
        if not self.state_file.is_file():
            if self.texts_dir is not None and self.texts_dir.is_dir():
                self._save(sweep=True)  # prompt files no state file refers to: removed
            return
        try:
            data = read_json_file(self.state_file)
            records = data.get("jobs", [])
            if not isinstance(records, list):
                raise TypeError("'jobs' is not a list")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            # a broken state file must not keep the UI from starting; keep it aside for inspection
            aside, texts_aside = self._aside_names(".broken")
            log.warning("could not read the saved queue %s (%s); moved it to %s, starting with an empty queue",
                        self.state_file, e, aside)
            self.notices.append(f"the saved queue could not be read ({clean_text(str(e))[:200]}); "
                                f"it was moved to {aside.name}")
            for src, dst in ((self.state_file, aside),  # the prompt files go with it (they help recover it)
                             (self.texts_dir, texts_aside)):
                try:
                    os.replace(src, dst)
                except OSError:
                    pass
            return
        jobs, rejected, seen = [], [], set()
        for record in records:
            spec = record.get("spec") if isinstance(record, dict) else None
            texts = None
            try:
                if isinstance(spec, dict) and spec and "prompt" not in spec:
                    texts = self._read_texts(record)
                job = job_from_record(self._checked_inputs(record), texts)  # no file is opened before
                if job.id in seen:
                    raise ValueError("duplicate id")
            except ValueError as e:
                rejected.append({"reason": str(e), "job": record, "texts": texts,
                                 **(self._raw_texts(record) if texts is None else {})})
                continue
            seen.add(job.id)
            if texts is not None:
                self._texts_saved.add(job.id)  # its prompt file is there already
            if job.status == "running":
                job.status, job.phase, job.error = "interrupted", "", INTERRUPTED_ERROR
            jobs.append(job)
        self._jobs = jobs
        if rejected:
            self._move_aside(rejected)
        self._save(sweep=True)

    def _aside_names(self, tag: str) -> tuple[Path, Path]:
        """Free names for the state file and its prompt folder set aside: <name><tag>, else <name><tag>-2, ...
        (an earlier broken file is kept, not overwritten)."""
        assert self.state_file is not None and self.texts_dir is not None
        n = 1
        while True:
            suffix = tag if n == 1 else f"{tag}-{n}"
            pair = (self.state_file.with_name(self.state_file.name + suffix),
                    self.texts_dir.with_name(self.texts_dir.name + suffix))
            if not any(os.path.lexists(p) for p in pair):
                return pair
            n += 1

    def _raw_texts(self, record: Any) -> dict[str, str]:
        """A rejected job's prompt file as text, when it is there but unusable: the sweep removes the file, the
        .rejected record keeps what it held."""
        job_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            return {}
        try:
            with open(self._texts_path(job_id), encoding="utf-8", errors="replace") as f:
                return {"texts_file": f.read(RAW_TEXTS_CHARS)}
        except OSError:
            return {}

    def _move_aside(self, rejected: list[dict[str, Any]]) -> None:
        """Keep saved jobs that cannot be restored in <state file>.rejected (added to what it holds)."""
        assert self.state_file is not None
        aside = self.state_file.with_name(self.state_file.name + ".rejected")
        try:
            earlier = read_json_file(aside).get("jobs", [])
            earlier = earlier if isinstance(earlier, list) else []
        except FileNotFoundError:
            earlier = []
        except (OSError, ValueError, AttributeError) as e:  # kept beside, under a name of its own
            earlier = []
            broken = unique_path(aside.with_name(aside.name + ".broken"))
            log.warning("could not read %s (%s); moved it to %s", aside, e, broken)
            try:
                os.replace(aside, broken)
            except OSError:
                pass
        try:
            with atomic_path(aside) as tmp:  # ensure_ascii: a lone surrogate is written as \ud800, readable
                tmp.write_text(json.dumps({"jobs": earlier + rejected}, indent=1), encoding="utf-8")
        except OSError:
            log.exception("could not write %s", aside)
        for r in rejected:
            job = r["job"]
            job_id = clean_text(str(job.get("id") if isinstance(job, dict) else "?"))[:40]
            line = f"saved job {job_id!r} could not be restored ({clean_text(r['reason'])}); moved to {aside.name}"
            log.warning("%s", line)
            self.notices.append(line)

    def _save(self, sweep: bool = False) -> None:
        """Write the queue atomically; called with the lock held (or before the worker starts).

        Order, so that a crash at any point leaves a readable queue: new prompt files first, then the state
        file, then the prompt files of jobs that left it (sweep: every prompt file no job refers to)."""
        if self.state_file is None:
            return
        try:
            records = []
            for job in self._jobs:
                record = job.to_dict()
                texts = {k: record["spec"].pop(k) for k in TEXT_FIELDS}
                if job.id not in self._texts_saved:
                    with atomic_path(self._texts_path(job.id)) as tmp:
                        tmp.write_text(json.dumps(texts), encoding="utf-8")
                    self._texts_saved.add(job.id)
                records.append(record)
            with atomic_path(self.state_file) as tmp:
                tmp.write_text(json.dumps({"version": STATE_VERSION, "jobs": records}, indent=1), encoding="utf-8")
            kept = {j.id for j in self._jobs}
            gone = [self._texts_path(i) for i in self._texts_saved - kept]
            assert self.texts_dir is not None
            if sweep and self.texts_dir.is_dir():
                gone = [f for f in self.texts_dir.glob("*.json") if f.stem not in kept]
            self._texts_saved &= kept
            for leftover in gone:
                leftover.unlink(missing_ok=True)
            if gone or sweep:
                self._prune_inputs()
        except OSError:
            # losing persistence must not stop generation; say so once per failure
            log.exception("could not save the queue to %s", self.state_file)

    def _changed(self, persist: bool = True) -> None:
        self._version += 1
        if persist:
            self._save()
        self._cond.notify_all()

    def _prune(self) -> None:
        finished = [j for j in self._jobs if j.status in ("done", "failed", "aborted")]
        for job in finished[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []:
            self._jobs.remove(job)

    # ------------------------------------------------------------ operations

    def submit(self, spec: JobSpec, names: dict[str, str] | None = None) -> str:
        """Validate and enqueue; raises UserError on bad settings (nothing is queued then)."""
        return self.submit_many([spec], names)[0]

    def submit_many(self, specs: list[JobSpec], names: dict[str, str] | None = None) -> list[str]:
        """Validate every spec, then enqueue them all, or none (UserError): bad settings, more than
        MAX_JOBS_PER_REQUEST jobs, or a queue that would hold more than MAX_WAITING waiting jobs.
        Prompts longer than MAX_PROMPT_CHARS are cut (app.jobs.cap_texts says so to the caller)."""
        if len(specs) > MAX_JOBS_PER_REQUEST:
            raise UserError(f"one request can queue at most {MAX_JOBS_PER_REQUEST} jobs (got {len(specs)}): "
                            "split it into smaller ones")
        for spec in specs:
            cap_texts(spec, names)
            validate(spec, names)
            self.service.definition(spec.model_type)  # unknown model type -> UserError now, not later
        with self._cond:
            waiting = sum(j.status in WAITING for j in self._jobs)
            if waiting + len(specs) > MAX_WAITING:
                raise UserError(f"the queue is full: {waiting} jobs wait to run and it takes at most {MAX_WAITING}; "
                                f"{len(specs)} more do not fit (wait for some to finish, or remove some)")
            # under the lock: a save between the copy and the append would prune the copy as unused
            for spec in specs:
                try:
                    self._keep_inputs(spec)
                except OSError as e:
                    raise UserError(f"cannot keep a copy of the job's input file: {e.strerror or e}") from None
            taken = {j.id for j in self._jobs}
            jobs = []
            for spec in specs:
                job_id = uuid.uuid4().hex[:8]
                while job_id in taken:  # 8 hex digits: rare, but an id names one job and one file
                    job_id = uuid.uuid4().hex[:8]
                taken.add(job_id)
                jobs.append(Job(id=job_id, spec=spec.to_dict()))
            self._jobs.extend(jobs)
            self._changed()
        return [j.id for j in jobs]

    def _find(self, job_id: str) -> Job:
        for job in self._jobs:
            if job.id == job_id:
                return job
        raise UserError(f"no job {job_id!r} in the queue")

    def remove(self, job_id: str) -> None:
        """Remove a job; a running one is stopped first (within one step) and then dropped."""
        with self._cond:
            job = self._find(job_id)
            if job.status == "running":
                self._remove_after.add(job_id)
                self._request_abort(job)
                return
            self._jobs.remove(job)
            self._changed()

    def move(self, job_id: str, direction: str) -> bool:
        """Swap a queued job with the previous / next queued job ("up" runs it sooner); False when it is
        already the first (up) / last (down) queued job, so nothing moved."""
        if direction not in ("up", "down"):
            raise ValueError("direction is 'up' or 'down'")
        with self._cond:
            job = self._find(job_id)
            if job.status != "queued":
                raise UserError(f"job {job_id} is {job.status}: only queued jobs can be moved")
            queued = [j for j in self._jobs if j.status == "queued"]
            k = queued.index(job) + (-1 if direction == "up" else 1)
            if not 0 <= k < len(queued):
                return False
            a, b = self._jobs.index(job), self._jobs.index(queued[k])
            self._jobs[a], self._jobs[b] = self._jobs[b], self._jobs[a]
            self._changed()
            return True

    def retry(self, job_id: str) -> None:
        """Queue a failed, aborted or interrupted job again, in its place in the list. The images it already
        saved (recorded in the job) are kept: only the missing ones are rendered."""
        with self._cond:
            job = self._find(job_id)
            if job.status not in RETRYABLE:
                raise UserError(
                    f"job {job_id} is {job.status}: only failed, aborted or interrupted jobs can be retried")
            waiting = sum(j.status in WAITING for j in self._jobs)
            if waiting >= MAX_WAITING:
                raise UserError(f"the queue is full: {waiting} jobs wait to run (at most {MAX_WAITING})")
            job.status, job.error, job.phase = "queued", "", ""
            job.attempts = 0  # a retry asked for by the user gets its own lost-worker retries
            job.step = job.total = 0
            job.started = job.finished = job.seconds_per_step = job.eta = job.seconds = None
            self._changed()

    def clear_finished(self) -> int:
        """Drop done, failed and aborted jobs from the list (their images stay on disk), and the notices."""
        with self._cond:
            self.notices.clear()  # seen: the page stops showing them
            before = len(self._jobs)
            self._jobs = [j for j in self._jobs if j.status not in ("done", "failed", "aborted")]
            self._changed()
            return before - len(self._jobs)

    def when_idle(self, fn: Callable[[], Any]) -> bool:
        """Call fn while no job runs (none can start meanwhile); False, without calling it, when one runs.

        fn runs without the queue's lock (an unload takes seconds: every tab's poll reads the queue under it);
        the workers are held back meanwhile instead, so no job starts mid-call."""
        with self._idle_lock:  # one such call at a time
            with self._cond:
                if self._running:
                    return False
                self._held = True
            try:
                fn()
            finally:
                with self._cond:
                    self._held = False
                    self._cond.notify_all()
            return True

    def abort(self, job_id: str | None = None) -> str | None:
        """Stop a running job (job_id; None: every running job) after its current step; returns the id of the
        (first) job stopped, None when none runs."""
        with self._cond:
            jobs = [j for j, _ in self._running.values() if job_id is None or j.id == job_id]
            for job in jobs:
                self._request_abort(job)
            return jobs[0].id if jobs else None

    def abort_waiting(self, reason: str = "stopped before it ran") -> int:
        """Mark every queued job aborted (with reason; they can be retried); returns how many. A batch that is
        stopped (Ctrl-C) ends its waiting jobs so, beside abort() for the running ones."""
        with self._cond:
            waiting = [j for j in self._jobs if j.status == "queued"]
            for job in waiting:
                job.status, job.error, job.finished = "aborted", reason, time.time()
            if waiting:
                self._changed()
            return len(waiting)

    def _request_abort(self, job: Job) -> None:
        for running, token in self._running.values():
            if running is job:
                token.cancel()

    def workers(self) -> list[dict[str, Any]]:
        """The executor's workers and their states (empty for the in-process one), with the job each runs."""
        out = [dict(w) for w in self.executor.workers()]
        with self._cond:
            for slot, (job, _) in self._running.items():
                if slot < len(out):
                    out[slot]["job"] = job.id
        return out

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        return self._version

    @property
    def results_version(self) -> int:
        return self._results_version

    def snapshot(self, prompt_chars: int | None = None) -> list[dict[str, Any]]:
        """Every job as a plain dict, in list order (the queued ones run top to bottom); prompt_chars: the
        prompts cut to that many characters (the page's table shows only their start, and it is rebuilt on
        every step)."""
        with self._cond:
            out = [j.to_dict() for j in self._jobs]
        if prompt_chars is not None:
            for job in out:
                for key in TEXT_FIELDS:
                    job["spec"][key] = job["spec"][key][:prompt_chars]
        return out

    def get(self, job_id: str) -> dict[str, Any]:
        with self._cond:
            return self._find(job_id).to_dict()

    def preview(self) -> tuple[int, Image.Image | None]:
        """(version, image) of the latest live preview; the image is None once no job runs."""
        with self._cond:
            return self._preview_version, self._preview

    def last_seed(self) -> int | None:
        """The first image seed of the most recently finished successful job."""
        with self._cond:
            done = [j for j in self._jobs if j.status == "done" and j.seeds]
            return max(done, key=lambda j: j.finished or 0).seeds[0] if done else None

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until job_id has finished (any end status); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._find(job_id).status not in FINISHED:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {self._find(job_id).status} after {timeout:g} s")
                self._cond.wait(left)
            return self._find(job_id).to_dict()

    def wait_until(self, predicate: Callable[[JobQueue], bool], timeout: float = 60.0) -> None:
        """Block until predicate(self) holds (it is evaluated with the lock held)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met after {timeout:g} s")
                self._cond.wait(min(left, 0.5))

    # ------------------------------------------------------------ worker

    def start(self) -> JobQueue:
        if not any(t.is_alive() for t in self._threads):
            self._stopping = False
            names = self.executor.slot_names()
            self._threads = [threading.Thread(target=self._run, args=(slot,), daemon=True,
                                              name="wgp-zimage-queue" + (f"-{name}" if len(names) > 1 else ""))
                             for slot, name in enumerate(names)]
            for t in self._threads:
                t.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers; running jobs are stopped and saved as interrupted (retry to run them)."""
        with self._cond:
            self._stopping = True
            for _, token in self._running.values():
                token.cancel()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _pick(self, slot: int) -> Job | None:
        """The job slot runs next (lock held): the first queued job, unless another idle slot has that job's
        model loaded and this one has not (that slot takes it: no second load), then the next one, and so on."""
        busy = set(self._running)
        loaded = self.executor.loaded(slot)
        others = {self.executor.loaded(s) for s in range(len(self._threads)) if s != slot and s not in busy
                  and s in self._ready}
        for job in (j for j in self._jobs if j.status == "queued"):
            key = self.executor.affinity(JobSpec.from_dict(job.spec))
            if key == loaded or key not in others:
                return job
        return None

    @property
    def waiting_reason(self) -> str:
        """Why the queued jobs wait (empty when nothing holds them back), for the page."""
        return self._blocked

    def output_problem(self) -> str:
        """Why images cannot be written in the output folder now (empty when they can)."""
        folder = getattr(getattr(self.service, "config", None), "output_dir", None)
        problem = output_folder_problem(folder) if folder is not None else None
        return f"cannot write in the output folder {folder}: {problem}" if problem else ""

    def _next(self, slot: int) -> Job | None:
        while True:
            ready = self.executor.ensure(slot)  # may block (a Ray worker starting): outside the lock
            with self._cond:
                queued = any(j.status == "queued" for j in self._jobs)
            # checked before each job (outside the lock: it touches the disk), not found after its whole render:
            # an unwritable folder drained the queue, every job failing once rendered
            blocked = self.output_problem() if ready and queued else ""
            with self._cond:
                if self._stopping:
                    return None
                if ready != (slot in self._ready):  # a worker came or went: the page's worker list changes
                    self._version += 1
                if queued and blocked != self._blocked:
                    if blocked:
                        log.warning("queued jobs wait: %s (checked again every %g s)", blocked, BLOCKED_RETRY_SECONDS)
                    else:
                        log.info("the output folder can be written again: queued jobs run")
                    self._blocked = blocked
                    self._version += 1
                if ready and not blocked:
                    self._ready.add(slot)
                    job = self._pick(slot) if not self._held else None
                    if job is not None:
                        job.status, job.started, job.phase, job.error = "running", time.time(), "starting", ""
                        # the in-process executor runs everything: no worker to name
                        local = isinstance(self.executor, LocalExecutor)
                        job.worker = "" if local else self.executor.slot_names()[slot]
                        self._running[slot] = (job, CancelToken())
                        self._changed()
                        return job
                elif not ready:
                    self._ready.discard(slot)
                # woken by any change; a slot without a worker, or held back by the output folder, looks again
                # every few seconds
                self._cond.wait(None if ready and not blocked else BLOCKED_RETRY_SECONDS)

    def _run(self, slot: int) -> None:
        while (job := self._next(slot)) is not None:
            self._run_job(job, slot)

    def _run_job(self, job: Job, slot: int = 0) -> None:
        status, error, result = "done", "", None
        with self._cond:  # a retry: the images saved before are kept (the service checks they are still there)
            existing = {i: Path(p) for i, p in zip(job.image_indexes, job.paths) if Path(p).is_file()}
            batch_seed = job.batch_seed
            cancel = self._running[slot][1]
        try:
            factors = self.service.latent_preview_factors(job.spec["model_type"])
        except Exception:  # a preview is a nicety: the job runs without one (generate reports a bad type)
            factors = None
        try:
            result = self.executor.run(slot, JobSpec.from_dict(job.spec),
                                       on_event=lambda ev: self._on_event(job, ev, factors),
                                       existing_images=existing, batch_seed=batch_seed, cancel=cancel, job_id=job.id)
        except GenerationInterrupted:
            status = "interrupted" if self._stopping else "aborted"
        except WorkerLost as e:
            with self._cond:
                job.attempts += 1
            if self._stopping:
                status = "interrupted"
            elif cancel.is_cancelled():  # stopped by the user as its worker went: nothing to run again
                status = "aborted"
            elif job.attempts <= self.max_retries:
                status = "queued"  # runs again; the images it saved are recorded, so only the missing ones render
                log.warning("job %s: %s; queued again (attempt %d of %d)", job.id, e, job.attempts + 1,
                            self.max_retries + 1)
            else:
                status, error = "failed", f"worker lost {job.attempts} times, last: {clean_text(str(e))[:300]}"
                log.error("job %s failed: %s", job.id, error)
        except OSError as e:  # a write failed (the folder made read-only, a full disk) or another system error
            why = self.output_problem()
            if why and not self._stopping and not cancel.is_cancelled():
                # the folder cannot be written now: the job waits for it like the others (its saved images are
                # recorded, so it renders only the missing ones) instead of failing
                status = "queued"
                log.warning("job %s: %s; %s: queued again", job.id, user_message(e), why)
            elif isinstance(e, SaveError):  # the folder takes files (a full disk?): retried, it would fail again
                error = clean_text(f"could not save {e.filename}: {e.strerror}")[:400]
                status, error = "failed", f"{error}; retry the job once fixed (the images it saved are kept)"
                log.error("job %s failed: %s", job.id, error, exc_info=True)
            else:
                status, error = "failed", user_message(e)
                log.error("job %s failed: %s", job.id, error, exc_info=True)
        except BaseException as e:  # anything: record it, log the traceback, go on with the next job
            status, error = "failed", user_message(e)
            log.error("job %s failed: %s", job.id, error, exc_info=not isinstance(e, UserError))
            if not isinstance(e, Exception):
                raise
        finally:
            with self._cond:
                job.status, job.error, job.finished, job.phase, job.eta = status, error, time.time(), "", None
                if status == "interrupted":
                    job.error = INTERRUPTED_ERROR
                if status == "queued":
                    job.finished = job.started = None
                    job.step = job.total = 0
                if result is not None:
                    job.paths = [str(p) for p in result.paths]
                    job.seeds = list(result.seeds)
                    job.image_indexes = list(range(len(job.paths)))
                    job.seconds, job.seconds_per_step = result.seconds, result.seconds_per_step
                    job.lora_reports = list(getattr(result, "lora_reports", []) or [])
                self._running.pop(slot, None)
                if not self._running:
                    self._preview = None
                self._preview_version += 1
                self._results_version += 1
                if job.id in self._remove_after:
                    self._remove_after.discard(job.id)
                    self._jobs.remove(job)
                self._prune()
                self._changed()

    def _on_event(self, job: Job, ev: dict[str, Any], factors: PreviewFactors | None = None) -> None:
        """Progress from the service (worker thread): update the job, make a preview (a stop request reaches
        the service through the job's cancel token, not here)."""
        preview = ev.get("preview")  # a remote worker sends its preview ready-made (no latents travel)
        if ev["kind"] == "step" and "latents" in ev and (ev["step"] % self.preview_every == 0
                                                          or ev["step"] == ev["total"]):
            try:
                preview = latent_preview(ev["latents"], factors=factors)
            except Exception:  # a preview is a nicety: never fail the job over it
                log.debug("latent preview failed", exc_info=True)
        with self._cond:
            if ev["kind"] == "load":
                job.phase = f"loading model: {ev.get('desc', '')}".rstrip(": ")
                job.step, job.total = ev["step"], ev["total"]
            elif ev["kind"] == "preprocess":  # the control map's annotator (depth, pose)
                job.phase = f"control map: {ev.get('desc', '')}".rstrip(": ")
                job.step, job.total = ev["step"], ev["total"]
            elif ev["kind"] == "step":
                job.phase = "decoding" if ev["step"] >= ev["total"] else "denoising"
                job.step, job.total = ev["step"], ev["total"]
                job.seconds_per_step, job.eta = ev["seconds_per_step"], ev["eta"]
                if preview is not None:
                    self._preview, self._preview_version = preview, self._preview_version + 1
            elif ev["kind"] == "image":
                # saved on disk: recorded (and persisted) now, so a crash before the job ends orphans nothing
                # and a retry does not write it again
                keep = [k for k, i in enumerate(job.image_indexes) if i != ev["index"]]  # a re-rendered one
                job.paths = [job.paths[k] for k in keep] + [str(ev["path"])]
                job.seeds = [job.seeds[k] for k in keep] + [int(ev["seed"])]
                job.image_indexes = [job.image_indexes[k] for k in keep] + [int(ev["index"])]
                job.batch_seed = int(ev["batch_seed"])
            self._changed(persist=ev["kind"] == "image")
