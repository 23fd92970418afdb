"""OpenAI's image API: ``POST /v1/images/generations``, ``GET /v1/models[/ID]`` and the files ``url`` answers
point at.

Streaming (``stream: true``) sends one server-sent event stream that serves two kinds of client at once:

* ``event: progress`` / ``data: {"step", "total"}`` after every denoising step (over all ``n`` images), and last
  ``event: done`` whose data is exactly the non-streaming response body — what ``curl`` users and ``imgpack run
  --host`` read;
* ``event: image_generation.partial_image`` (only with ``partial_images`` 1-3: decoded previews at evenly spaced
  steps) and one ``event: image_generation.completed`` per image, whose data carry OpenAI's ``type`` field — what
  the official SDK reads. The SDK dispatches on ``data.type`` and ignores ``event:`` names, so it also yields the
  ``progress``/``done`` events, as objects whose ``type`` is None; a loop that checks ``event.type`` (as OpenAI's
  own examples do) works unchanged.

Errors after the stream has started are ``event: error`` with OpenAI's ``{"error": {...}}`` body, which the SDK
raises as ``APIError``.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import re
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from imgpack.schemas import spec as oci_spec
from imgpack.server import imaging
from imgpack.server.api import ApiError, ImageJobSpec, parse_generation, parse_model
from imgpack.server.follow import cancel_unless_finished, guarded, job_events
from imgpack.server.jobs import CANCELLED, DONE, ERROR, PREVIEW, PROGRESS, GeneratedImage, Job
from imgpack.server.wire import Exchange

if TYPE_CHECKING:
    from imgpack.server.http import ImageServer

FILE_TTL = 3600.0
FILE_BUDGET = 512 * 1024 * 1024
_FILE = re.compile(r"^([A-Za-z0-9_-]{20,64})\.(png|jpg|webp)$")
CANCELLED_ERROR = ApiError(503, "the job was cancelled (the server is stopping)", code="cancelled",
                           headers={"Retry-After": "1"})


class ImageFiles:
    """Images served for ``response_format: "url"``: kept in memory only (never written to disk) under an
    unguessable token, for an hour or until the byte budget pushes them out, oldest first."""

    def __init__(self, ttl: float = FILE_TTL, budget: int = FILE_BUDGET) -> None:
        self.ttl = ttl
        self.budget = budget
        self._lock = threading.Lock()
        self._files: collections.OrderedDict[str, tuple[bytes, str, float]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, output_format: str = "png") -> str:
        """Store an image; returns its file name, ``<token>.<extension>``."""
        name = f"{secrets.token_urlsafe(24)}.{imaging.EXTENSIONS[output_format]}"
        with self._lock:
            self._expire(time.time())
            self._files[name] = (data, imaging.FORMATS[output_format], time.time() + self.ttl)
            self._bytes += len(data)
            while self._bytes > self.budget and len(self._files) > 1:
                _, (old, _, _) = self._files.popitem(last=False)
                self._bytes -= len(old)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a stored image."""
        if not _FILE.match(name):
            return None
        with self._lock:
            self._expire(time.time())
            item = self._files.get(name)
        return (item[0], item[1]) if item else None

    def _expire(self, now: float) -> None:
        while self._files:
            name, (data, _, expires) = next(iter(self._files.items()))
            if expires > now:
                break
            del self._files[name]
            self._bytes -= len(data)


# -- generations ---------------------------------------------------------------------------------------


def generations(server: ImageServer, ex: Exchange) -> None:
    spec = parse_generation(server.read_json(ex))
    job = server.manager.submit(spec)
    try:
        if spec.stream:
            _stream(server, ex, job)
        else:
            _wait(server, ex, job)
    finally:
        cancel_unless_finished(server.manager, job)


def usage(spec: ImageJobSpec) -> dict[str, Any]:
    """OpenAI's usage block: output tokens are the transformer's 16x16-pixel image patches; prompt tokens are not
    counted (0)."""
    image_tokens = (spec.width // 16) * (spec.height // 16) * spec.n
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": image_tokens, "total_tokens": image_tokens}


def response_body(server: ImageServer, ex: Exchange, spec: ImageJobSpec, images: list[GeneratedImage]) -> dict:
    """The non-streaming answer (also the data of a stream's ``done`` event)."""
    data = []
    for image in images:
        if spec.response_format == "url":
            name = server.files.put(image.data, image.format)
            data.append({"url": f"{server.base_url_for(ex.request.headers.get('host'))}/v1/images/files/{name}",
                         "seed": image.seed})
        else:
            data.append({"b64_json": base64.b64encode(image.data).decode("ascii"), "seed": image.seed})
    return {"created": int(time.time()), "data": data, "size": spec.size, "output_format": spec.output_format,
            "background": "opaque", "quality": "auto", "usage": usage(spec)}


def _event_fields(spec: ImageJobSpec, image: GeneratedImage) -> dict[str, Any]:
    return {"b64_json": base64.b64encode(image.data).decode("ascii"), "size": spec.size,
            "output_format": spec.output_format, "created_at": int(time.time()), "background": "opaque",
            "quality": "auto"}


def _wait(server: ImageServer, ex: Exchange, job: Job) -> None:
    for kind, payload in job_events(ex, server.manager, job):
        if kind == DONE:
            server.send_json(ex, 200, response_body(server, ex, job.spec, payload))
        elif kind == ERROR:
            server.send_error(ex, payload)
        elif kind == CANCELLED:
            server.send_error(ex, CANCELLED_ERROR)


def _stream(server: ImageServer, ex: Exchange, job: Job) -> None:
    manager, spec = server.manager, job.spec

    def send(event: str, body: Any) -> None:
        guarded(ex, manager, job, lambda: ex.write(sse(event, body)))

    ex.start_stream(200, "text/event-stream")
    guarded(ex, manager, job, lambda: ex.write(b": queued\n\n"))
    previews = 0
    for kind, payload in job_events(ex, manager, job, heartbeat=lambda: ex.write(b": waiting\n\n")):
        if kind == PROGRESS:
            send("progress", payload)
        elif kind == PREVIEW:
            send("image_generation.partial_image", {"type": "image_generation.partial_image",
                                                     "partial_image_index": previews, **_event_fields(spec, payload)})
            previews += 1
        elif kind == DONE:
            for image in payload:
                send("image_generation.completed", {"type": "image_generation.completed", "usage": usage(spec),
                                                    **_event_fields(spec, image)})
            send("done", response_body(server, ex, spec, payload))
        elif kind == ERROR:
            send("error", payload.body())
        elif kind == CANCELLED:
            send("error", CANCELLED_ERROR.body())
    ex.end_stream()


def sse(event: str, body: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(body)}\n\n".encode()


# -- models and files -------------------------------------------------------------------------------------


def created_at(server: ImageServer, name: str, digest: str) -> dt.datetime | None:
    """When a stored model was made (its manifest's created annotation), if it says; for a ``--model-dir`` model,
    when its ``model_index.json`` was written."""
    directory = server.manager.directory(digest)
    if directory is not None:
        try:
            mtime = (directory.path / "model_index.json").stat().st_mtime
        except OSError:
            return None
        return dt.datetime.fromtimestamp(mtime, dt.UTC)
    try:
        manifest = server.store.manifest_by_digest(digest, source=name)
        stamp = (manifest.document.get("annotations") or {}).get(oci_spec.CREATED_ANNOTATION)
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
    except Exception:  # noqa: BLE001 - a listing shows a broken model rather than failing
        return None


def model_row(server: ImageServer, name: str, digest: str) -> dict[str, Any]:
    stamp = created_at(server, name, digest)
    return {"id": name, "object": "model", "created": int(stamp.timestamp()) if stamp else 0, "owned_by": "imgpack",
            "digest": digest}


def models(server: ImageServer, ex: Exchange) -> None:
    rows = [model_row(server, name, digest) for name, digest in server.manager.references()]
    server.send_json(ex, 200, {"object": "list", "data": rows})


def get_model(server: ImageServer, ex: Exchange, given: str) -> None:
    name, digest = server.manager.resolve(parse_model(given), given)
    server.send_json(ex, 200, model_row(server, name, digest))


def get_file(server: ImageServer, ex: Exchange, name: str) -> None:
    found = server.files.get(name)
    if found is None:
        raise ApiError(404, "no such image (image URLs expire after an hour)", code="not_found")
    data, content_type = found
    ex.respond(200, data, content_type, [("Cache-Control", "private, max-age=3600")])
