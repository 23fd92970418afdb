"""ollama's native API for image models, as ollama served them (its experimental image generation, January to
July 2026: ``api/types.go`` and ``server/routes.go``'s ``handleImageGenerate`` before their removal).

* ``POST /api/generate``: ``model``, ``prompt``, ``width``, ``height``, ``steps``, ``options.seed``,
  ``keep_alive``, ``stream`` (default true). Streamed as NDJSON: ``{"completed", "total", "done": false}`` per
  step, then ``{"image": <base64 PNG>, "done": true, "done_reason": "stop", "total_duration",
  "load_duration"}``; without streaming only that last object. An empty prompt only loads the model
  (``done_reason: "load"``); an empty prompt with ``keep_alive: 0`` unloads it (``"unload"``).
* ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``GET /api/version``, ``DELETE /api/delete``.
* ``POST /api/pull``: ``model`` is ``HOST[:PORT]/REPO[:TAG]`` (imgpack has no default registry); statuses
  ``pulling manifest``, ``pulling model`` (``total``/``completed`` bytes), ``writing manifest``, ``success``.
* ``POST /api/stop`` is imgpack's own (ollama's CLI unloads with the keep-alive-0 idiom).

Errors are ollama's ``{"error": "message"}``; once a stream has started they arrive as such a line.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib.metadata
import json
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from imgpack.schemas.errors import AuthError, ImgpackError, NotFoundError, UsageError
from imgpack.server.api import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    SIZE_MULTIPLE,
    ApiError,
    ImageJobSpec,
    bad,
    parse_keep_alive,
    parse_model,
)
from imgpack.server.follow import POLL_SECONDS, cancel_unless_finished, guarded, job_events
from imgpack.server.jobs import CANCELLED, DONE, ERROR, PROGRESS, Job, on_gpu
from imgpack.server.openai_api import created_at
from imgpack.server.wire import ClientGone, Exchange

if TYPE_CHECKING:
    from imgpack.server.http import ImageServer

NDJSON = "application/x-ndjson"
DEFAULT_SIDE = 1024


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _object(server: ImageServer, ex: Exchange) -> dict[str, Any]:
    body = server.read_json(ex)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _model_name(body: dict[str, Any]) -> str:
    given = body.get("model") or body.get("name")
    if not isinstance(given, str) or not given:
        raise ApiError(400, "model is required", param="model", code="missing_required_parameter")
    return given


def _resolve(server: ImageServer, given: str) -> tuple[str, str]:
    """(name, digest) of a stored model; 404 in ollama's words ("model 'x' not found")."""
    reference = parse_model(given)
    try:
        return server.manager.resolve(reference, given)
    except ApiError as e:
        if e.status == 404:
            raise ApiError(404, f"model '{given}' not found", code=e.code) from None
        raise


# -- /api/generate -------------------------------------------------------------------------------------


def _side(body: dict[str, Any], field: str) -> int:
    value = body.get(field)
    if value in (None, 0):
        return DEFAULT_SIDE
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(field, f"must be an integer number of pixels, got {value!r}")
    if not SIZE_MULTIPLE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        raise bad(field, f"{value} must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE}",
                  "out_of_range")
    return value


def parse_generate(body: dict[str, Any]) -> ImageJobSpec:
    """An ``/api/generate`` body as a job; unknown fields are ignored, as ollama's JSON decoding does."""
    import secrets

    given = _model_name(body)
    reference = parse_model(given)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise bad("prompt", f"must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad("prompt", f"{len(prompt)} characters is over the {MAX_PROMPT_CHARS} limit", "out_of_range")
    if body.get("images"):
        raise bad("images", "image inputs (editing) are not supported by these models")
    steps = body.get("steps")
    if steps == 0:
        steps = None  # ollama's "use the model's default"
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        raise bad("steps", f"{steps!r} must be an integer from 1 to {MAX_STEPS}", "out_of_range")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad("options", "must be an object")
    seed = options.get("seed")
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed < 0):
        seed = secrets.randbits(32)  # ollama's -1 means random, as does leaving it out
    if isinstance(seed, bool) or not isinstance(seed, int) or seed > MAX_SEED:
        raise bad("options.seed", f"{seed!r} must be a non-negative integer")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}")
    return ImageJobSpec(model=given, reference=reference, prompt=prompt, width=_side(body, "width"),
                        height=_side(body, "height"), steps=steps, seed=seed, stream=stream,
                        keep_alive=parse_keep_alive(body.get("keep_alive")))


def generate(server: ImageServer, ex: Exchange) -> None:
    spec = parse_generate(_object(server, ex))
    name, _ = _resolve(server, spec.model)
    started = time.monotonic()
    if not spec.prompt and spec.keep_alive == 0:
        try:
            server.manager.stop(name)
        except ApiError:
            pass  # not loaded: nothing to unload
        server.send_json(ex, 200, _final(spec, "unload"))
        return
    job = server.manager.submit(spec)
    try:
        if not spec.prompt:
            _load_only(server, ex, job)
        elif spec.stream:
            _stream(server, ex, job, started)
        else:
            for kind, payload in job_events(ex, server.manager, job):
                if kind == DONE:
                    server.send_json(ex, 200, _final(spec, "stop", job, payload, started))
                elif kind in (ERROR, CANCELLED):
                    server.send_error(ex, _job_error(kind, payload))
    finally:
        cancel_unless_finished(server.manager, job)


def _final(spec: ImageJobSpec, reason: str, job: Job | None = None, images: list | None = None,
           started: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": spec.model, "created_at": _now(), "response": "", "done": True,
                           "done_reason": reason}
    if images:
        out["image"] = base64.b64encode(images[0].data).decode("ascii")
    if started is not None:
        out["total_duration"] = int((time.monotonic() - started) * 1e9)
        out["load_duration"] = int((job.load_seconds if job else 0.0) * 1e9)
    return out


def _job_error(kind: str, payload: Any) -> ApiError:
    if kind == ERROR:
        return payload
    return ApiError(503, "the job was cancelled (the server is stopping)", code="cancelled")


def _load_only(server: ImageServer, ex: Exchange, job: Job) -> None:
    for kind, payload in job_events(ex, server.manager, job):
        if kind == DONE:
            server.send_json(ex, 200, _final(job.spec, "load"))
        elif kind in (ERROR, CANCELLED):
            server.send_error(ex, _job_error(kind, payload))


def _line(body: Any) -> bytes:
    return json.dumps(body).encode() + b"\n"


def _stream(server: ImageServer, ex: Exchange, job: Job, started: float) -> None:
    spec = job.spec
    ex.start_stream(200, NDJSON)
    line: dict[str, Any]
    for kind, payload in job_events(ex, server.manager, job):
        if kind == PROGRESS:
            line = {"model": spec.model, "created_at": _now(), "response": "", "done": False,
                    "completed": payload["step"], "total": payload["total"]}
        elif kind == DONE:
            line = _final(spec, "stop", job, payload, started)
        elif kind in (ERROR, CANCELLED):
            line = {"error": _job_error(kind, payload).message}
        else:
            continue
        guarded(ex, server.manager, job, functools.partial(ex.write, _line(line)))
    ex.end_stream()


# -- models ----------------------------------------------------------------------------------------------


def details(server: ImageServer, name: str, digest: str) -> tuple[dict[str, Any], int, int]:
    """(ollama's ``details``, parameter count, total bytes) of a stored model, from its manifest alone (of a
    ``--model-dir`` model, from what the directory holds: its files carry no dtypes or shapes to count)."""
    directory = server.manager.directory(digest)
    if directory is not None:
        info = {"parent_model": "", "format": "safetensors", "family": directory.architecture,
                "families": [directory.architecture], "parameter_size": "", "quantization_level": ""}
        return info, 0, directory.size
    manifest = server.store.manifest_by_digest(digest, source=name)
    parameters = sum(math.prod(t.shape or []) for t in manifest.tensors if t.shape is not None)
    dtypes = sorted({t.dtype for t in manifest.tensors if t.dtype})
    family = "unknown"
    try:
        config = json.loads(server.store.read_blob(manifest.config.digest))
        family = str(config.get("architecture") or family) if isinstance(config, dict) else family
    except (ValueError, ImgpackError):
        pass
    info = {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": _human_count(parameters), "quantization_level": "/".join(dtypes)}
    return info, parameters, manifest.total_size


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def _modified(server: ImageServer, name: str, digest: str) -> str:
    stamp = created_at(server, name, digest) or dt.datetime.fromtimestamp(
        (server.store.root / "index.json").stat().st_mtime, dt.UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def tags(server: ImageServer, ex: Exchange) -> None:
    rows = []
    for name, digest in server.manager.references():
        try:
            info, _, size = details(server, name, digest)
        except ImgpackError:
            continue  # a broken entry is for `imgpack verify` to report, not for a listing to fail on
        rows.append({"name": name, "model": name, "modified_at": _modified(server, name, digest), "size": size,
                     "digest": digest.removeprefix("sha256:"), "details": info, "capabilities": ["image"]})
    server.send_json(ex, 200, {"models": rows})


def show(server: ImageServer, ex: Exchange) -> None:
    name, digest = _resolve(server, _model_name(_object(server, ex)))
    info, parameters, _ = details(server, name, digest)
    server.send_json(ex, 200, {
        "license": "", "modelfile": f"# Modelfile generated by imgpack\nFROM {name}\n", "parameters": "",
        "template": "", "details": info,
        "model_info": {"general.architecture": info["family"], "general.parameter_count": parameters},
        "capabilities": ["image"], "modified_at": _modified(server, name, digest),
    })


def ps(server: ImageServer, ex: Exchange) -> None:
    """ollama's ``/api/ps`` rows, plus imgpack's own fields (state, queue, keep-alive) that ``imgpack ps`` shows."""
    from imgpack.server.jobs import memory_stats

    gpu = on_gpu()
    rows = []
    for row in server.manager.ps():
        try:
            info, _, _ = details(server, row["name"], row["digest"])
        except ImgpackError:
            info = {}
        rows.append(row | {"digest": row["digest"].removeprefix("sha256:"), "details": info,
                           "size_vram": row["size"] if gpu else 0, "context_length": 0})
    server.send_json(ex, 200, {"models": rows, "memory": memory_stats()})


def version(server: ImageServer, ex: Exchange) -> None:
    try:
        number = importlib.metadata.version("imgpack")
    except importlib.metadata.PackageNotFoundError:
        number = "0.0.0"
    server.send_json(ex, 200, {"version": number})


def delete(server: ImageServer, ex: Exchange) -> None:
    given = _model_name(_object(server, ex))
    name, digest = _resolve(server, given)
    directory = server.manager.directory(digest)
    if directory is not None:
        raise ApiError(400, f"model '{given}' is served from the directory {directory.path}; imgpack deletes only"
                       " stored models", code="not_deletable")
    try:
        server.manager.stop(name, wait=0)
    except ApiError:
        pass  # not loaded
    try:
        server.store.remove(name)
    except NotFoundError:
        raise ApiError(404, f"model '{given}' not found", code="model_not_found") from None
    ex.respond(200, b"", "application/json")


def stop(server: ImageServer, ex: Exchange) -> None:
    server.send_json(ex, 200, server.manager.stop(_model_name(_object(server, ex))))


# -- /api/pull ---------------------------------------------------------------------------------------------


def _pull_error(error: BaseException) -> ApiError:
    status = 404 if isinstance(error, NotFoundError) else 401 if isinstance(error, AuthError) else (
        400 if isinstance(error, UsageError) else 500)
    return ApiError(status, str(error), code="pull_failed")


def pull(server: ImageServer, ex: Exchange) -> None:
    from imgpack.server.pull import pull_model

    body = _object(server, ex)
    given = _model_name(body)
    parse_model(given)
    insecure, stream = body.get("insecure", False), body.get("stream", True)
    if not isinstance(insecure, bool) or not isinstance(stream, bool):
        raise bad("stream" if isinstance(insecure, bool) else "insecure", "must be true or false")
    events: queue.SimpleQueue[dict[str, Any] | BaseException | None] = queue.SimpleQueue()
    cancel = threading.Event()

    def work() -> None:
        try:
            events.put({"status": "pulling manifest"})
            pull_model(server.store, given, events.put, insecure=insecure, cancel=cancel)
            events.put({"status": "writing manifest"})
            events.put({"status": "success"})
        except BaseException as e:  # noqa: BLE001 - handed to the request thread, which answers with it
            events.put(e)
        events.put(None)

    threading.Thread(target=work, name="imgpack-pull", daemon=True).start()
    if stream:
        ex.start_stream(200, NDJSON)
    latest: dict[str, Any] = {}
    try:
        while True:
            try:
                item = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if ex.client_gone():
                    raise ClientGone from None
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                error = _pull_error(item)
                if not stream:
                    server.send_error(ex, error)
                    return
                ex.write(_line({"error": error.message}))
                break
            latest = item
            if stream:
                ex.write(_line(item))
        if stream:
            ex.end_stream()
        else:
            server.send_json(ex, 200, latest)
    finally:
        cancel.set()  # a client that left stops the copy; after success this changes nothing
