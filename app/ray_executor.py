"""The queue's jobs on a Ray cluster: one actor per GPU (or per CPU worker), each holding a GenerationService.

Only imported when asked for (--ray-local / --ray-address): the single-machine app never starts Ray.

- An actor renders a job into a temporary folder with the same service code as a local job, and streams back
  progress (step i/N, a small preview) and each image's files (the image with its metadata, the input copies)
  as encoded bytes; the app writes them into its own output folder under the same names, so a job's files
  do not depend on where it ran (same seed and settings: the same pixels).
- LoRA files and input images travel once through the object store, keyed by their sha256; each actor keeps
  what it fetched (a later job naming the same file fetches nothing).
- Weights are not shipped: each machine finds or downloads them in its checkpoints folder (the app's path).
- An actor that dies mid-job raises WorkerLost: the queue runs the job again (its saved images are recorded,
  so only the missing ones render, nothing is written twice); the slot starts a new actor when it can, and
  while the cluster is gone the slot says so and its jobs wait.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue as queue_mod
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from app.app_config import DEFAULT_OUTPUT_QUALITY
from app.cancel import CancelToken
from app.executors import EventFn, WorkerLost
from app.jobs import JobSpec
from app.outputs import unique_path
from app.params import all_params
from models.errors import GenerationInterrupted, UserError
from models.files import atomic_path

log = logging.getLogger("wgp_zimage")

ROOT = Path(__file__).resolve().parent.parent
RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"
START_TIMEOUT = 180.0  # seconds an actor may take to start (its process imports torch)
RESPAWN_SECONDS = 5.0  # a slot without an actor tries to start one this often
UNLOAD_SECONDS = 10.0  # how long the page's Unload waits for the workers (the queue is held meanwhile)
DRAIN_SECONDS = 60.0  # an actor told to stop a job the app gave up on must end it within this, else it goes
# the app's settings an actor does not take from the app: its own device, folders and LoRA folder
LOCAL_FIELDS = ("device", "output_dir", "loras_root", "lora_dirs")
# a file an actor may send back: a plain name (no folder, not hidden) of an image file
SAFE_NAME = re.compile(r"[^/\\.\x00-\x1f][^/\\\x00-\x1f]{0,250}\.(?:png|jpe?g|webp)", re.IGNORECASE)


def connect(address: str | None = None, local: bool = False, num_cpus: int | None = None) -> None:
    """Join the cluster at address ("auto", "HOST:PORT") or, local, start Ray on this machine. The actors'
    processes import this app from its folder (PYTHONPATH): every machine needs the app at the same path."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    if ray.is_initialized():
        return
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        ray.init(address="local" if local else address, num_cpus=num_cpus if local else None,
                 include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
                 logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "on this machine" if local else f"at {address}"
        raise UserError(f"cannot start or reach the Ray cluster {where}: {str(e).splitlines()[0][:200]}") from None


def wants_ray(args: Any) -> bool:
    """Whether the command line asks for Ray (--ray-local / --ray-address); --ray-workers alone is an error."""
    asked = bool(getattr(args, "ray_local", False) or getattr(args, "ray_address", None))
    if not asked and getattr(args, "ray_workers", None) is not None:
        raise UserError("--ray-workers goes with --ray-local or --ray-address")
    return asked


def executor_from_args(args: Any, service: Any) -> RayExecutor:
    """Connect to (or start) Ray as the command line says and make the executor of its workers."""
    workers = getattr(args, "ray_workers", None)
    if workers is not None and workers < 1:
        raise UserError(f"--ray-workers must be at least 1 (got {workers})")
    connect(getattr(args, "ray_address", None), local=bool(getattr(args, "ray_local", False)))
    return RayExecutor(service, workers=workers)


def shutdown() -> None:
    """Leave the cluster (a --ray-local one stops)."""
    import ray

    ray.shutdown()


def write_result(folder: Path, files: list, image_name: str, quality: int = DEFAULT_OUTPUT_QUALITY) -> Path:
    """Write one image's files (name, bytes) from a worker into folder, each atomically and never over an
    existing file; the image's path. Only plain file names of image files are taken (RuntimeError otherwise).
    When the image's name is taken already, its files move to the next free stem together (<stem>-2.png,
    <stem>-2_input.png: the local service's unique_path rule), and the image's settings are rewritten to name
    its input copies so (quality: a JPEG / WebP image's, which that re-encodes)."""
    from app.metadata import read_settings
    from app.outputs import save_image_atomic
    from app.params import all_params

    files = [(str(name), data) for name, data in files]
    for name, _ in files:
        if not SAFE_NAME.fullmatch(name):
            raise RuntimeError(f"a worker sent a file name this app does not write: {name[:80]!r}")
    image_name = str(image_name)
    if image_name not in {name for name, _ in files}:
        raise RuntimeError("a worker sent an image event without its image")
    stem = Path(image_name).stem
    folder.mkdir(parents=True, exist_ok=True)
    image = unique_path(folder / image_name)
    renamed: dict[str, str] = {}  # a companion's name in the image's settings -> the name it got here
    for name, data in files:
        own = name == image_name or name.startswith(stem + "_")  # <stem>_input.png...: renamed with the image
        target = folder / (image.stem + name[len(stem):] if own else name)
        if target != image:
            target = unique_path(target)
            if target.name != name:
                renamed[name] = target.name
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    if renamed:
        settings = read_settings(image)
        if settings is not None:  # saved with settings: they name the companions by their first names
            for p in all_params():
                if p.is_file and settings.get(p.name):
                    first = Path(settings[p.name]).name
                    settings[p.name] = renamed.get(first, first)
            with Image.open(image) as im:
                im.load()
                save_image_atomic(im, image, settings, quality=quality)
        log.info("%s exists already: the image and its files are written as %s", image_name, image.name)
    return image


CACHE_PREFIX = "wgp-zimage-ray-"  # a worker's temporary folder: <prefix><its pid>-<random>


def clean_stale_caches(folder: Path) -> int:
    """Remove the temporary folders of workers whose process is gone (a killed actor cleans nothing up), as a
    new worker starts on the node; returns how many."""
    removed = 0
    for path in folder.glob(f"{CACHE_PREFIX}*"):
        pid = path.name[len(CACHE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only whether the process exists
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # another user's process, or not a pid: not ours to judge
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


class RayWorker:
    """The actor (one per GPU / CPU worker): a GenerationService of its own, a cache of shipped files.
    Threaded (max_concurrency > 1): cancel() and stats() answer while run() renders."""

    def __init__(self, name: str):
        self.name = name
        clean_stale_caches(Path(tempfile.gettempdir()))  # those of killed workers on this node
        self.cache = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-"))
        self.service: Any = None
        self.loads = 0  # pipeline loads (model affinity is measured by this)
        self.fetched: Counter[str] = Counter()  # sha256 -> times fetched from the object store
        self.tokens: dict[str, CancelToken] = {}
        self.lock = threading.Lock()

    def ping(self) -> dict[str, Any]:
        import ray

        return {"name": self.name, "node": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def stats(self) -> dict[str, Any]:
        key = self.service.pipeline_key if self.service is not None else None
        return {"loads": self.loads, "fetched": dict(self.fetched), "loaded": key[0] if key else None,
                "pid": os.getpid()}

    def unload(self) -> bool:
        """Free this worker's model (the page's "Unload models"); whether one was loaded."""
        loaded = self.service is not None and self.service.pipeline_key is not None
        if self.service is not None:
            self.service.unload()
        return loaded

    def cancel(self, job_id: str) -> None:
        with self.lock:  # a cancel may come before run() starts: the token waits for it
            self.tokens.setdefault(job_id, CancelToken()).cancel()

    def _service(self, config: dict[str, Any]) -> Any:
        from app.service import GenerationService, ServiceConfig

        shared = {k: v for k, v in config.items() if k not in LOCAL_FIELDS}
        if self.service is None:
            import torch

            device = config["device"] if torch.cuda.is_available() else "cpu"
            self.service = GenerationService(ServiceConfig(
                **shared, device=device, output_dir=self.cache / "out", loras_root=self.cache / "loras"))
        else:
            self.service.update_config({k: v for k, v in shared.items() if k not in ("dtype", "vae_dtype")})
        return self.service

    def _blob(self, sha: str, ref: Any, suffix: str) -> Path:
        """The shipped file sha256, fetched from the object store the first time only."""
        import ray

        path = self.cache / "blobs" / f"{sha}{suffix}"
        if not path.is_file():
            data = ray.get(ref)
            if hashlib.sha256(data).hexdigest() != sha:
                raise UserError("a shipped file arrived damaged (sha256 differs)")
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            self.fetched[sha] += 1
        return path

    def _localize(self, service: Any, spec: JobSpec, files: dict[str, Any]) -> None:
        """Point spec's input files at the cached copies and put its LoRAs in this actor's LoRA folder under
        their names (the reports and metadata name them as on the app)."""
        for param, (sha, ref, suffix) in files["inputs"].items():
            setattr(spec, param, str(self._blob(sha, ref, suffix)))
        if files["loras"]:
            library = service.lora_library(spec.model_type)
            for sha, ref, rel in files["loras"].values():
                blob = self._blob(sha, ref, Path(rel).suffix)
                target = library.lora_dir / rel
                if target.is_file() and os.path.samefile(target, blob):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                try:
                    os.link(blob, target)
                except OSError:
                    shutil.copyfile(blob, target)
            library.refresh()

    def run(self, job_id: str, spec_dict: dict[str, Any], definition: Any, config: dict[str, Any],
            files: dict[str, Any], existing: list[int], batch_seed: int | None, preview_every: int):
        """Render one job; yields its events (plain data), the last one "result", "interrupted" or "error"."""
        from app.queue import latent_preview, user_message

        with self.lock:
            token = self.tokens.setdefault(job_id, CancelToken())
        out_dir = self.cache / "jobs" / job_id
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        events: queue_mod.Queue = queue_mod.Queue()
        # images the app has already: an empty stand-in each, so the service renders only the missing ones
        kept = {i: out_dir / f".kept-{i}" for i in existing}
        for path in kept.values():
            path.touch()
        sent = {p.name for p in kept.values()}

        def work() -> None:
            try:
                service = self._service(config)
                service.definitions[definition.model_type] = definition
                spec = JobSpec.from_dict(spec_dict)
                self._localize(service, spec, files)
                try:
                    factors = service.latent_preview_factors(spec.model_type)
                except Exception:
                    factors = None

                def on_event(ev: dict[str, Any]) -> None:
                    kind = ev["kind"]
                    if kind == "step":
                        out = {k: ev[k] for k in ("kind", "step", "total", "seconds_per_step", "eta")}
                        if preview_every and (ev["step"] % preview_every == 0 or ev["step"] == ev["total"]):
                            buf = io.BytesIO()
                            latent_preview(ev["latents"], factors=factors).save(buf, format="PNG")
                            out["preview"] = buf.getvalue()
                        events.put(out)
                    elif kind == "image":
                        image = Path(ev["path"]).name
                        new = sorted((p for p in out_dir.iterdir() if p.name not in sent and p.name != image
                                      and not p.name.endswith(".part")), key=lambda p: p.name)
                        new.append(Path(ev["path"]))  # the image last: its input copies are there before it
                        sent.update(p.name for p in new)
                        events.put({"kind": "image", "index": ev["index"], "seed": ev["seed"],
                                    "batch_seed": ev["batch_seed"], "name": image,
                                    "files": [(p.name, p.read_bytes()) for p in new]})
                    elif kind in ("load", "download", "preprocess"):
                        events.put(dict(ev))

                before = service.pipeline_key
                try:
                    result = service.generate(spec, output_dir=out_dir, on_event=on_event, cancel=token,
                                              existing_images=kept, batch_seed=batch_seed)
                finally:
                    if service.pipeline_key is not None and service.pipeline_key != before:
                        self.loads += 1
                events.put({"kind": "result", "seeds": list(result.seeds), "seconds": result.seconds,
                            "seconds_per_step": result.seconds_per_step, "warnings": list(result.warnings),
                            "lora_reports": list(result.lora_reports)})
            except GenerationInterrupted:
                events.put({"kind": "interrupted"})
            except Exception as e:  # the job failed here: the app shows the message, the log has the trace
                log.error("job %s failed on %s", job_id, self.name, exc_info=not isinstance(e, UserError))
                events.put({"kind": "error", "message": user_message(e)})
            finally:
                events.put(None)

        thread = threading.Thread(target=work, name=f"job-{job_id}", daemon=True)
        thread.start()
        try:
            while (ev := events.get()) is not None:
                yield ev
        finally:
            thread.join()
            shutil.rmtree(out_dir, ignore_errors=True)
            with self.lock:
                self.tokens.pop(job_id, None)


class RemoteJobError(UserError):
    """A job that failed on its actor: the actor's one-line message, shown as it is."""


class RayExecutor:
    """Slots backed by Ray actors: num_gpus=1 each on a cluster with GPUs, else `workers` CPU actors."""

    def __init__(self, service: Any, workers: int | None = None, use_gpus: bool | None = None,
                 preview_every: int = 2, start_timeout: float = START_TIMEOUT):
        try:
            import ray
        except ImportError:
            raise UserError(RAY_MISSING) from None
        if not ray.is_initialized():
            raise UserError("Ray is not connected: start the app with --ray-local or --ray-address")
        self._ray = ray
        self.service = service
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.use_gpus = gpus > 0 if use_gpus is None else use_gpus
        count = workers or (gpus if self.use_gpus else 1)
        if count < 1:
            raise UserError("--ray-workers must be at least 1")
        self.preview_every = preview_every
        self.start_timeout = start_timeout
        self._names = [f"ray-{i + 1}" for i in range(count)]
        self._actors: list[Any] = [None] * count
        self._loaded: list[Any] = [None] * count
        self._states = ["starting"] * count
        self._nodes = [""] * count
        self._next_try = [0.0] * count
        self._remote = ray.remote(RayWorker)
        # the actors are asked for here, in the caller's thread (ensure() waits for them): Ray serializes the
        # first actor creation with lazy imports of its own, which raced with the page's imports in another thread
        self._pending: list[Any] = [self._create(slot) for slot in range(count)]
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # slots write results into the output folder one at a time
        self._shipped: dict[str, Any] = {}  # LoRAs: sha256 -> ObjectRef (kept: a later job sends the same ref)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.puts: Counter[str] = Counter()  # sha256 -> times put in the object store (once each)

    # ------------------------------------------------------------ slots

    def slot_names(self) -> list[str]:
        return list(self._names)

    def actor(self, slot: int) -> Any:
        return self._actors[slot]

    def ensure(self, slot: int) -> bool:
        if self._actors[slot] is not None:
            return True
        if time.monotonic() < self._next_try[slot]:
            return False
        ray = self._ray
        actor, self._pending[slot] = self._pending[slot], None
        try:
            actor = actor if actor is not None else self._create(slot)
            info = ray.get(actor.ping.remote(), timeout=self.start_timeout)
        except Exception as e:  # no room, no cluster, a crash at start: the slot waits and tries again
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if isinstance(e, ray.exceptions.GetTimeoutError):
                kind = "GPU" if self.use_gpus else "CPU"
                why = f"no worker started within {self.start_timeout:g} s (no free {kind}?)"
            self._states[slot] = f"unavailable: {why}"
            self._next_try[slot] = time.monotonic() + RESPAWN_SECONDS
            log.warning("Ray worker %s unavailable: %s", self._names[slot], why,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            return False
        self._actors[slot], self._loaded[slot] = actor, None
        self._nodes[slot], self._states[slot] = str(info.get("node", "")), "idle"
        return True

    def start_all(self) -> int:
        """Start every slot's actor at once (each imports torch: seconds); how many are up. A batch starts
        with all its workers, rather than the first one up taking the first jobs alone."""
        threads = [threading.Thread(target=self.ensure, args=(slot,), daemon=True) for slot in range(len(self._names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(a is not None for a in self._actors)

    def _create(self, slot: int) -> Any:
        """Ask Ray for the slot's actor (returns at once; it starts in its own process)."""
        options = {"num_gpus": 1, "num_cpus": 0} if self.use_gpus else {"num_cpus": 1}
        return self._remote.options(max_concurrency=4, **options).remote(self._names[slot])

    def affinity(self, spec: JobSpec) -> Any:
        profile = spec.memory_profile if spec.memory_profile is not None else self.service.config.memory_profile
        return (spec.model_type, profile)

    def loaded(self, slot: int) -> Any:
        return self._loaded[slot]

    def unload(self) -> bool:
        """Free the app's own model and every worker's (the queue calls it when no job runs); whether any was
        loaded. A worker that does not answer is left as it is (it is gone or busy starting)."""
        loaded = self.service.pipeline_key is not None
        self.service.unload()
        asked = {slot: actor.unload.remote() for slot, actor in enumerate(self._actors) if actor is not None}
        deadline = time.monotonic() + UNLOAD_SECONDS  # all at once: a hung worker costs this once, not per worker
        for slot, ref in asked.items():
            try:
                loaded |= bool(self._ray.get(ref, timeout=max(0.1, deadline - time.monotonic())))
            except Exception as e:  # a lost worker is its slot's business, not the page's
                log.warning("worker %s did not unload: %s", self._names[slot], str(e).splitlines()[0][:200])
                continue
            self._loaded[slot] = None
        return loaded

    def workers(self) -> list[dict[str, Any]]:
        return [{"name": n, "node": node, "state": state, "model": loaded[0] if loaded else None}
                for n, node, state, loaded in zip(self._names, self._nodes, self._states, self._loaded)]

    def close(self) -> None:
        for slot, actor in enumerate(self._pending):
            if actor is not None:
                try:
                    self._ray.kill(actor)
                except Exception:
                    pass
                self._pending[slot] = None
        for slot, actor in enumerate(self._actors):
            if actor is not None:
                try:
                    self._ray.kill(actor)
                except Exception:
                    pass
                self._actors[slot] = None

    def _drop(self, slot: int, actor: Any) -> None:
        """Give up the slot's actor (it is gone, or cannot be trusted to have stopped): killed so that it frees
        its GPU, never running a job beside its replacement; the slot starts a new one."""
        try:
            self._ray.kill(actor)
        except Exception:  # already gone
            pass
        self._actors[slot], self._loaded[slot] = None, None
        self._states[slot] = "lost: a new worker starts"

    def _drained(self, stream: Any, seconds: float) -> bool:
        """Whether an actor's job stream ended within seconds (its events discarded)."""
        if stream is None:  # the job never started there
            return True
        deadline = time.monotonic() + seconds
        try:
            for ref in stream:
                self._ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
                if time.monotonic() > deadline:
                    return False
        except Exception:
            return False
        return True

    # ------------------------------------------------------------ data

    def _put(self, path: Path, keep: bool = True) -> tuple[str, Any]:
        """(sha256, object ref) of a file, put in the object store once. keep=False (a job's input image): the
        reference is not kept for later jobs, so the object store lets it go once the job's run is over (the
        actors keep their copy by sha256 either way)."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            sha = self._hashes.get(key)
            if sha is not None and sha in self._shipped:
                return sha, self._shipped[sha]
        data = path.read_bytes()  # hashed and shipped from one read: a file replaced meanwhile cannot mix
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha in self._shipped:
                return sha, self._shipped[sha]
            ref = self._ray.put(data)
            self.puts[sha] += 1
            if keep:
                self._hashes[key] = sha
                self._shipped[sha] = ref
            return sha, ref

    def _files(self, spec: JobSpec) -> dict[str, Any]:
        """What the actor needs besides the settings: the job's LoRAs and input files, by reference."""
        out: dict[str, Any] = {"loras": {}, "inputs": {}}
        if spec.loras:
            library = self.service.lora_library(spec.model_type)
            for item in spec.loras:
                name = str(item["name"]) if isinstance(item, dict) and "name" in item else None
                if name is None:
                    raise UserError(f"bad LoRA entry {item!r}: expected {{'name': ..., 'strength': ...}}")
                path = library.resolve(name)
                out["loras"][name] = (*self._put(path), path.relative_to(library.lora_dir).as_posix())
        for p in all_params():
            value = getattr(spec, p.name, None)
            if p.is_file and value:
                out["inputs"][p.name] = (*self._put(Path(value), keep=False), Path(value).suffix.lower())
        return out

    def _config(self) -> dict[str, Any]:
        from app.service import ServiceConfig

        config = {f.name: getattr(self.service.config, f.name) for f in fields(ServiceConfig)}
        config["checkpoints_dir"] = Path(config["checkpoints_dir"]).resolve()
        config["device"] = "cuda" if self.use_gpus else "cpu"
        return config

    def _write(self, ev: dict[str, Any]) -> Path:
        """Write an image's files into the app's output folder; slots write one at a time, so two jobs finishing
        together cannot claim the same name."""
        with self._write_lock:
            return write_result(Path(self.service.config.output_dir), ev["files"], ev["name"],
                                quality=self.service.config.output_quality)

    # ------------------------------------------------------------ running

    def run(self, slot: int, spec: JobSpec, *, on_event: EventFn, existing_images: dict[int, Path],
            batch_seed: int | None, cancel: CancelToken, job_id: str) -> Any:
        from app.service import JobResult

        ray = self._ray
        actor = self._actors[slot]
        if actor is None:
            raise WorkerLost(f"{self._names[slot]} has no worker")
        files = self._files(spec)
        self._loaded[slot] = self.affinity(spec)
        self._states[slot] = "running"
        sent = threading.Event()
        # this run's name on the actor: a stop that arrives there after the run ended leaves a cancelled token
        # under a name no later run (a retry of the job) uses
        run_key = f"{job_id}-{uuid.uuid4().hex[:12]}"

        def forward_cancel() -> None:  # the stop reaches the actor's token at once; it stops within a step
            if not sent.is_set():
                sent.set()
                try:
                    actor.cancel.remote(run_key)
                except Exception:  # the actor is gone: nothing runs there to stop
                    pass

        cancel.on_cancel(forward_cancel)
        paths: dict[int, Path] = dict(existing_images)
        result: dict[str, Any] | None = None
        stream = None
        try:
            stream = actor.run.options(num_returns="streaming").remote(
                run_key, spec.to_dict(), self.service.definition(spec.model_type), self._config(), files,
                sorted(existing_images), batch_seed, self.preview_every)
            for ref in stream:
                ev = ray.get(ref)
                kind = ev["kind"]
                if kind == "image":
                    paths[ev["index"]] = self._write(ev)
                    on_event({"kind": "image", "index": ev["index"], "seed": ev["seed"],
                              "batch_seed": ev["batch_seed"], "path": paths[ev["index"]]})
                elif kind == "step":
                    if "preview" in ev:
                        ev["preview"] = Image.open(io.BytesIO(ev["preview"])).convert("RGB")
                    on_event(ev)
                elif kind in ("load", "download"):
                    on_event(ev)
                elif kind == "result":
                    result = ev
                elif kind == "interrupted":
                    raise GenerationInterrupted()
                elif kind == "error":
                    raise RemoteJobError(ev["message"])
        except ray.exceptions.RayTaskError as e:  # our actor code raised outside its own handler: a failure
            raise RuntimeError(str(e).strip().splitlines()[0][:300]) from None
        except ray.exceptions.RayError as e:  # the actor, its node or the cluster went away
            self._drop(slot, actor)
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise WorkerLost(f"worker {self._names[slot]} lost ({type(e).__name__}: {why})") from None
        except (GenerationInterrupted, RemoteJobError):
            raise  # the actor's own end of the job: nothing runs there any more
        except BaseException:
            # the app failed on its side (a write, an event): the actor must not go on rendering beside the
            # slot's next job, so it stops (within a step) and is waited for, or replaced
            forward_cancel()
            if not self._drained(stream, DRAIN_SECONDS):
                self._drop(slot, actor)
            raise
        finally:
            sent.set()  # a later cancel of this token has nothing to stop there
            if self._actors[slot] is not None:
                self._states[slot] = "idle"
        if result is None:
            raise WorkerLost(f"worker {self._names[slot]} ended the job without a result")
        order = range(spec.num_images)
        return JobResult([paths[i] for i in order], result["seeds"], [{} for _ in order], result["seconds"],
                         result["seconds_per_step"], result["warnings"], result["lora_reports"])


__all__ = ["RayExecutor", "RayWorker", "WorkerLost", "connect", "executor_from_args", "shutdown", "wants_ray",
           "RAY_MISSING"]
