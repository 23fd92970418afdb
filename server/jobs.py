"""Loaded models, their job queues and keep-alive, for ``imgpack serve``.

Each loaded model owns one worker thread that runs its jobs one at a time in arrival order, so a model's weights
are touched by a single thread and two requests never fight over its memory. HTTP threads only submit jobs,
read their events and set a job's cancel flag when their client goes away; the pipeline checks that flag between
steps. A worker unloads its model (and exits) once it has been idle past its keep-alive, or when stopped.

Every call into the MLX runtime is in the "runtime boundary" section below (``default_loader``, ``run_job``,
``give_back_memory``, ``memory_stats``), so a change of pipeline API touches only those functions.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import gc
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imgpack.schemas.errors import ImgpackError, NotFoundError, UsageError
from imgpack.schemas.reference import Reference
from imgpack.server import imaging
from imgpack.server.api import DEFAULT_KEEP_ALIVE, ApiError, ImageJobSpec
from imgpack.server.directories import DirectoryModel
from imgpack.server.wire import printable
from imgpack.store.store import Store

log = logging.getLogger("imgpack.server")

DEFAULT_MAX_QUEUE = 16
HISTORY = 64  # finished jobs remembered for /api/ps and tests

#: A request above this many pixels (times its batch) has its working memory handed back to the system afterwards.
LARGE_PIXELS = 1024 * 1024

# Job event kinds put on ``Job.events``.
PROGRESS, PREVIEW, DONE, ERROR, CANCELLED = "progress", "preview", "done", "error", "cancelled"


@dataclass
class GeneratedImage:
    """One encoded image file (``format`` as in ``output_format``); previews carry the step they show."""

    data: bytes
    seed: int
    format: str = "png"
    step: int | None = None


@dataclass
class Job:
    """One request: its spec, a cancel flag the HTTP thread sets, and the events the worker sends back."""

    id: int
    spec: ImageJobSpec
    model_name: str
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    state: str = "queued"  # queued, running, done, failed, cancelled
    steps_done: int = 0
    #: Steps per image once the model said its default (a request may leave ``steps`` out).
    steps_per_image: int | None = None
    load_seconds: float = 0.0  # the part of this job spent loading its model
    submitted: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def total_steps(self) -> int:
        return (self.steps_per_image or self.spec.steps or 0) * self.spec.n

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model_name, "state": self.state, "step": self.steps_done,
                "total": self.total_steps}


@dataclass
class LoadedModel:
    """A model with a worker: 'loading' until its weights are in memory, then 'ready'."""

    name: str
    digest: str
    cond: threading.Condition
    keep_alive: float
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    running: Job | None = None
    model: Any = None  # the Pipeline once loaded
    size: int = 0
    loaded_at: float | None = None
    idle_since: float = field(default_factory=time.time)
    stopping: bool = False
    unload_when_idle: bool = False
    thread: threading.Thread | None = None
    stats: collections.Counter = field(default_factory=collections.Counter)

    @property
    def expires_at(self) -> float | None:
        """When an idle model unloads; None while it is busy."""
        if self.running is not None or self.jobs or self.model is None:
            return None
        return self.idle_since + (0.0 if self.unload_when_idle else self.keep_alive)


# -- the runtime boundary ----------------------------------------------------------------------------


def default_loader(store: Store, name: str, width: int = 1024, height: int = 1024, batch: int = 1,
                   directory: Path | None = None) -> Any:
    """Open and fully load a model — from the store, or in place from ``directory`` (``--model-dir``) — so the
    server pays the load once, not per request.

    The server keeps every network resident, so it checks, before loading anything, that they fit together with
    the working memory of the request that asked for the load (its own size and batch); a model that does not fit
    is refused with the memory message instead of being killed part-way through loading.
    """
    from imgpack.runtime import open_directory, open_pipeline
    from imgpack.runtime.backend import available_memory
    from imgpack.runtime.common.loader import check_memory

    model = open_directory(directory) if directory is not None else open_pipeline(store, name)
    need = sum(model.weight_bytes().values()) + model.activation_bytes(width, height, batch) + \
        model.expanded_layer_bytes()
    check_memory(need, available_memory(), f"model {name} at {width}x{height} (the server keeps all of it loaded)")
    model.load()
    model.keep_text_encoder = True
    return model


class JobFailed(Exception):
    """A job ended in an error its client should see as this ``ApiError``."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def run_job(model: Any, name: str, job: Job, encode: Callable[[Any], bytes]) -> list[GeneratedImage]:
    """Generate a job's images on a loaded model, putting progress and previews on its event queue.

    Runtime failures are translated here: a cancelled generation raises ``GenerationCancelled`` unchanged (the
    caller records it), everything the client should hear about becomes ``JobFailed``.
    """
    from imgpack.runtime.backend import available_memory
    from imgpack.runtime.common import pipeline
    from imgpack.runtime.common.loader import InsufficientMemory, check_memory

    spec = job.spec
    images = []
    try:
        first = model.resolve(pipeline.GenerationRequest(
            prompt=spec.prompt, width=spec.width, height=spec.height, steps=spec.steps, seed=spec.seed,
            guidance=spec.guidance, negative=spec.negative_prompt,
        ))
        job.steps_per_image = first.steps
        previews = spec.preview_steps(first.steps)
        batch = 2 if (first.guidance or 0) > model.defaults.guidance_threshold else 1
        if hasattr(model, "activation_bytes"):
            # The weights are resident already: only this request's working memory is still to find.
            check_memory(model.activation_bytes(first.width, first.height, batch), available_memory(),
                         f"{name} at {first.width}x{first.height}")
        for k in range(spec.n):
            request = replace(first, seed=spec.seed + k)
            for event in model.generate(request, cancel=job.cancel, previews=previews):
                if isinstance(event, pipeline.Step):
                    job.steps_done += 1
                    job.events.put((PROGRESS, {"step": job.steps_done, "total": job.total_steps}))
                elif isinstance(event, pipeline.Preview):
                    job.events.put((PREVIEW, GeneratedImage(encode(event.pixels), request.seed, spec.output_format,
                                                            event.step)))
                elif isinstance(event, pipeline.Image):
                    images.append(GeneratedImage(encode(event.pixels), event.seed, spec.output_format))
    except pipeline.GenerationCancelled:
        raise JobCancelled from None
    except UsageError as e:
        raise JobFailed(ApiError(400, str(e), code="invalid_value")) from None
    except InsufficientMemory as e:
        raise JobFailed(ApiError(503, f"model {name}: {e}", code="insufficient_memory")) from None
    except ImgpackError as e:
        raise JobFailed(ApiError(500, f"model {name}: {e}", code="generation_failed")) from None
    return images


def load_failure(name: str, error: Exception) -> ApiError | None:
    """The client's view of a failed load, or None for an unexpected error (logged and answered 500)."""
    from imgpack.runtime.common.loader import InsufficientMemory

    if isinstance(error, InsufficientMemory):
        return ApiError(503, f"model {name}: {error}", code="insufficient_memory")
    if isinstance(error, ImgpackError):
        return ApiError(500, f"model {name}: {error}", code="generation_failed")
    return None


def give_back_memory(unloading: bool = False) -> None:
    """Return freed memory to the system: MLX's buffer cache, then (glibc) the C heap's free pages.

    Called after a large request and after an unload; without it a 2048x2048 request leaves the process hundreds
    of MB larger for good. ``unloading`` also drops the worker thread's MLX streams, which MLX requires each
    thread to do for itself before it ends (otherwise the process can abort at exit).
    """
    gc.collect()
    try:
        from imgpack.runtime.backend import mx

        mx.clear_cache()
        if unloading:
            mx.clear_streams()
    except ImportError:
        pass
    _malloc_trim()


def _malloc_trim() -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_stats() -> dict[str, int]:
    """MLX's own accounting (active, peak, cache bytes) for ``/api/ps``; empty without the runtime."""
    try:
        from imgpack.runtime.backend import mx

        return {"active": int(mx.get_active_memory()), "peak": int(mx.get_peak_memory()),
                "cache": int(mx.get_cache_memory())}
    except (ImportError, AttributeError):
        return {}


def on_gpu() -> bool:
    """Whether models sit in GPU memory (Metal's unified memory) rather than plain CPU memory."""
    try:
        from imgpack.runtime.backend import is_cpu

        return not is_cpu()
    except ImportError:
        return False


class JobCancelled(Exception):
    """The job's cancel flag stopped the generation between two steps."""


def model_size(model: Any) -> int:
    try:
        return int(sum(model.weight_bytes().values()))
    except Exception:  # noqa: BLE001 - a size is informational; never fail a load over it
        return 0


class ModelManager:
    """Schedules jobs onto per-model workers and unloads idle models."""

    def __init__(
        self,
        store: Store,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        loader: Callable[..., Any] = default_loader,
        directories: tuple[DirectoryModel, ...] | list[DirectoryModel] = (),
    ) -> None:
        self.store = store
        #: Models served in place from directories (``--model-dir``), found before the store's.
        self.directories = tuple(directories)
        self.keep_alive = keep_alive
        self.max_queue = max_queue
        self.loader = loader
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._ids = itertools.count(1)
        self.history: collections.deque[Job] = collections.deque(maxlen=HISTORY)
        self._closed = False

    # -- names ---------------------------------------------------------------------------------------

    def resolve(self, reference: Reference, given: str) -> tuple[str, str]:
        """(canonical name, manifest digest) of a stored model, looking only at the store's index.

        A digest reference must name an indexed manifest: any other blob (a multi-GB tensor) is never read as one.
        A ``--model-dir`` model answers to its name (with or without ``:latest``) and its digest.
        """
        for model in self.directories:
            if model.matches(given) or (reference.tag is None and reference.digest == model.digest):
                return model.name, model.digest
        try:
            if reference.tag is None and reference.digest:
                for name, digest in self.store.references():
                    if digest == reference.digest:
                        return name, digest
                raise NotFoundError(given)
            parsed, digest = self.store.resolve(reference)
        except NotFoundError:
            raise ApiError(404, f"model {given!r} not found; GET /v1/models lists the models this server has",
                           param="model", code="model_not_found") from None
        except ImgpackError as e:
            raise ApiError(500, f"the store's index is unreadable: {e}", code="store_error") from None
        return str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed), digest

    def directory(self, digest: str) -> DirectoryModel | None:
        """The ``--model-dir`` model with this digest, if it is one."""
        return next((m for m in self.directories if m.digest == digest), None)

    def references(self) -> list[tuple[str, str]]:
        """(name, digest) of every model this server has: its directories, then the store's."""
        return [(m.name, m.digest) for m in self.directories] + self.store.references()

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(self, spec: ImageJobSpec) -> Job:
        """Queue a job on its model's worker, loading the model on first use; 503 when the queue is full."""
        name, digest = self.resolve(spec.reference, spec.model)
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            entry = self._models.get(digest)
            if entry is None or entry.stopping:
                if entry is not None and entry.thread is not None:
                    # A stopping worker is on its way out; wait for it rather than hold two copies in memory.
                    self._lock.release()
                    try:
                        entry.thread.join(timeout=30)
                    finally:
                        self._lock.acquire()
                entry = self._models.get(digest)
                if entry is None or entry.stopping:
                    entry = self._start(name, digest)
            if len(entry.jobs) >= self.max_queue:
                raise ApiError(
                    503, f"model {name} already has {len(entry.jobs)} queued requests (the limit); retry later",
                    code="queue_full", headers={"Retry-After": str(self._retry_after(entry))},
                )
            job = Job(next(self._ids), spec, name)
            if spec.keep_alive is not None:
                entry.keep_alive = spec.keep_alive
                entry.unload_when_idle = False
            entry.jobs.append(job)
            entry.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a job whose client left: a queued one leaves the queue now, a running one stops at its next step."""
        job.cancel.set()
        with self._lock:
            for entry in self._models.values():
                if job in entry.jobs:
                    entry.jobs.remove(job)
                    self._finish(job, "cancelled", (CANCELLED, None))
                    self.history.append(job)
                    entry.stats["cancelled"] += 1
                    entry.cond.notify_all()
                    return

    def _retry_after(self, entry: LoadedModel) -> int:
        running = entry.running
        seconds = 1 + len(entry.jobs) * ((running.total_steps // max(running.spec.n, 1)) if running else 8) // 8
        return max(1, min(seconds, 60))

    def _start(self, name: str, digest: str) -> LoadedModel:
        entry = LoadedModel(name, digest, threading.Condition(self._lock), self.keep_alive)
        entry.thread = threading.Thread(target=self._worker, args=(entry,), name=f"imgpack-model-{name}", daemon=True)
        self._models[digest] = entry
        entry.thread.start()
        return entry

    def _worker(self, entry: LoadedModel) -> None:
        try:
            while True:
                with self._lock:
                    job = self._next_job(entry)
                    if job is None:
                        break
                    entry.running = job
                    job.state = "running"
                try:
                    self._run(entry, job)
                finally:
                    with self._lock:
                        entry.running = None
                        entry.idle_since = time.time()
                        self.history.append(job)
                        entry.stats[job.state] += 1
        finally:
            self._unload(entry)

    def _next_job(self, entry: LoadedModel) -> Job | None:
        """Under the lock: the next live job, or None once the model should unload."""
        while True:
            while entry.jobs and entry.jobs[0].cancel.is_set():
                job = entry.jobs.popleft()
                self._finish(job, "cancelled", (CANCELLED, None))
                self.history.append(job)
                entry.stats["cancelled"] += 1
            if entry.stopping:
                return None
            if entry.jobs:
                return entry.jobs.popleft()
            expires = entry.expires_at
            if entry.model is None or (expires is not None and time.time() >= expires):
                entry.stopping = True
                return None
            timeout = expires - time.time() if expires is not None and math.isfinite(expires) else None
            # Wake at least every second: queued jobs can be cancelled without anyone notifying us.
            entry.cond.wait(timeout=min(timeout, 1.0) if timeout is not None else 1.0)

    def _finish(self, job: Job, state: str, event: tuple[str, Any]) -> None:
        job.state = state
        job.finished = time.time()
        job.events.put(event)

    def _run(self, entry: LoadedModel, job: Job) -> None:
        spec = job.spec
        try:
            if entry.model is None:
                load_started = time.monotonic()
                directory = self.directory(entry.digest)
                where = {"directory": directory.path} if directory is not None else {}
                try:
                    entry.model = self.loader(self.store, entry.name, spec.width, spec.height,
                                              2 if spec.guidance > 0 else 1, **where)
                except Exception as e:  # noqa: BLE001 - translated below; a failed load is retried next request
                    error = load_failure(entry.name, e)
                    if error is None:
                        raise
                    raise JobFailed(error) from None
                entry.size = model_size(entry.model)
                entry.loaded_at = time.time()
                job.load_seconds = time.monotonic() - load_started
            if not spec.prompt:  # ollama's "load only" request
                self._finish(job, "done", (DONE, []))
                return
            encode = functools.partial(imaging.encode, output_format=spec.output_format,
                                       compression=spec.output_compression)
            images = run_job(entry.model, entry.name, job, encode)
            self._finish(job, "done", (DONE, images))
        except JobCancelled:
            self._finish(job, "cancelled", (CANCELLED, None))
        except JobFailed as e:
            self._finish(job, "failed", (ERROR, e.error))
        except Exception as e:  # noqa: BLE001 - the client gets a 500, the worker keeps serving
            log.exception("job %s on %s failed", job.id, printable(entry.name))
            self._finish(job, "failed", (ERROR, ApiError(500, f"model {entry.name}: internal error: {e!r}",
                                                         code="internal_error")))
        finally:
            if entry.loaded_at is None:
                entry.model = None
            if spec.width * spec.height * spec.n > LARGE_PIXELS:
                give_back_memory()

    def _unload(self, entry: LoadedModel) -> None:
        with self._lock:
            entry.stopping = True
            if self._models.get(entry.digest) is entry:
                del self._models[entry.digest]
            leftovers = list(entry.jobs)
            entry.jobs.clear()
            entry.model = None
            entry.size = 0
        for job in leftovers:  # only reachable when stopped during shutdown
            self._finish(job, "cancelled", (ERROR, ApiError(503, "the model was unloaded; retry",
                                                             code="model_unloaded", headers={"Retry-After": "1"})))
        give_back_memory(unloading=True)  # on the worker thread, the only one that computed with this model
        log.info("unloaded %s", printable(entry.name))

    # -- management ----------------------------------------------------------------------------------

    def _find(self, given: str) -> LoadedModel | None:
        """A loaded model by the name it was loaded under, any alias of it in the store, or its digest."""
        entries = list(self._models.values())
        for entry in entries:
            if given in (entry.name, entry.digest):
                return entry
        try:
            reference = Reference.parse(given)
        except UsageError:
            return None
        canonical = str(reference)
        for entry in entries:
            if canonical == entry.name:
                return entry
        try:
            _, digest = self.resolve(reference, given)
        except ApiError:
            return None
        return self._models.get(digest)

    def stop(self, given: str, wait: float = 30.0) -> dict[str, Any]:
        """Unload now if idle (waiting for the memory to be released), else as soon as its queue drains."""
        with self._lock:
            entry = self._find(given)
            if entry is None:
                raise ApiError(404, f"model {given!r} is not loaded; GET /api/ps lists loaded models",
                               param="model", code="model_not_loaded")
            busy = entry.running is not None or bool(entry.jobs)
            if busy:
                entry.unload_when_idle = True
            else:
                entry.stopping = True
            entry.cond.notify_all()
        if busy:
            return {"model": entry.name, "status": "unloading"}
        if entry.thread is not None:
            entry.thread.join(timeout=wait)
        return {"model": entry.name, "status": "unloaded"}

    def ps(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            rows = []
            for entry in self._models.values():
                expires = entry.expires_at
                rows.append({
                    "name": entry.name,
                    "model": entry.name,
                    "digest": entry.digest,
                    "size": entry.size,
                    "state": "loading" if entry.model is None else ("busy" if entry.running else "idle"),
                    "running": entry.running.summary() if entry.running else None,
                    "queued": len(entry.jobs),
                    "keep_alive": None if math.isinf(entry.keep_alive) else entry.keep_alive,
                    "expires_at": _iso(expires) if expires is not None and math.isfinite(expires) else None,
                    "expires_in": max(0.0, round(expires - now, 3)) if expires is not None and math.isfinite(expires)
                    else None,
                    "loaded_at": _iso(entry.loaded_at) if entry.loaded_at else None,
                    "jobs": {k: entry.stats.get(k, 0) for k in ("done", "failed", "cancelled")},
                })
        return sorted(rows, key=lambda r: r["name"])

    def close(self, wait: float = 10.0) -> None:
        """Cancel every job and unload every model (server shutdown)."""
        with self._lock:
            self._closed = True
            entries = list(self._models.values())
            for entry in entries:
                entry.stopping = True
                for job in entry.jobs:
                    job.cancel.set()
                if entry.running is not None:
                    entry.running.cancel.set()
                entry.cond.notify_all()
        deadline = time.time() + wait
        for entry in entries:
            if entry.thread is not None:
                entry.thread.join(timeout=max(0.0, deadline - time.time()))


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
