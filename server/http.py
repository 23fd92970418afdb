"""``imgpack serve``: an OpenAI-compatible image API over the local store, on the standard library's HTTP server.

Why ``ThreadingHTTPServer`` and not an ASGI stack: the work is a few long, CPU/GPU-bound jobs, not thousands of
idle connections, so a thread per connection costs nothing that matters, and it adds no dependency to a tool whose
runtime already pulls in MLX. It also makes the hard part simple: the thread that owns a connection can look at
its socket between generation steps — a readable socket that returns EOF means the client hung up, and the job's
cancel flag is set; for a stream, a failed write says the same.

Routes: ``POST /v1/images/generations`` (JSON or ``stream: true`` server-sent events), ``GET /v1/models[/ID]``,
``GET /v1/images/files/<token>.png`` (what ``response_format: "url"`` points at), ``GET /api/ps``,
``POST /api/stop``.
"""

from __future__ import annotations

import base64
import collections
import hmac
import ipaddress
import json
import logging
import queue
import re
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from imgpack.schemas import spec as oci_spec
from imgpack.server.api import DEFAULT_KEEP_ALIVE, ApiError, parse_generation, parse_model
from imgpack.server.jobs import (
    CANCELLED,
    DEFAULT_MAX_QUEUE,
    DONE,
    ERROR,
    PROGRESS,
    GeneratedImage,
    Job,
    ModelManager,
    default_loader,
)
from imgpack.store.store import Store

log = logging.getLogger("imgpack.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8420
MAX_BODY = 1024 * 1024
POLL_SECONDS = 0.05  # how often a waiting request thread checks its client's socket
HEARTBEAT_SECONDS = 10.0  # SSE comment sent while a streamed job waits, so dead clients show up as failed writes
LINGER_SECONDS = 2.0  # how long, and how many bytes, an unread refused body is drained before closing
LINGER_BYTES = 16 * 1024 * 1024
FILE_TTL = 3600.0
FILE_BUDGET = 512 * 1024 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(?::[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?$")


class ImageFiles:
    """PNGs served for ``response_format: "url"``: kept in memory only (never written to disk) under an
    unguessable token, for an hour or until the byte budget pushes them out, oldest first."""

    def __init__(self, ttl: float = FILE_TTL, budget: int = FILE_BUDGET) -> None:
        self.ttl = ttl
        self.budget = budget
        self._lock = threading.Lock()
        self._files: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(time.time())
            self._files[token] = (png, time.time() + self.ttl)
            self._bytes += len(png)
            while self._bytes > self.budget and len(self._files) > 1:
                _, (old, _) = self._files.popitem(last=False)
                self._bytes -= len(old)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            self._expire(time.time())
            item = self._files.get(token)
        return item[0] if item else None

    def _expire(self, now: float) -> None:
        while self._files:
            token, (png, expires) = next(iter(self._files.items()))
            if expires > now:
                break
            del self._files[token]
            self._bytes -= len(png)


class ImageServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, a ``ModelManager`` for the models, ``ImageFiles`` for URLs."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        store: Store,
        *,
        api_key: str | None = None,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_body: int = MAX_BODY,
        loader: Any = default_loader,
        quiet: bool = False,
    ) -> None:
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store = store
        self.api_key = api_key or None
        self.max_body = max_body
        self.quiet = quiet
        self.manager = ModelManager(store, keep_alive=keep_alive, max_queue=max_queue, loader=loader)
        self.files = ImageFiles()
        super().__init__(address, Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{_bracket(host)}:{self.port}"

    def base_url_for(self, host_header: str | None) -> str:
        """Where URLs in responses point: the bound address, or for a wildcard bind the Host the client used."""
        bound = self.server_address[0]
        if bound not in ("0.0.0.0", "::", ""):
            return f"http://{_bracket(bound)}:{self.port}"
        if host_header and _HOST_HEADER.match(host_header):
            return f"http://{host_header}"
        return f"http://{socket.gethostname()}:{self.port}"

    def server_close(self) -> None:
        self.manager.close()
        super().server_close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientGone(Exception):
    """The client closed its connection; its job has been cancelled."""


class Handler(BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.1"
    server_version = "imgpack"
    timeout = 300  # an idle keep-alive connection, or a client that stops sending its body, is dropped after this
    # Headers and body go out as separate small writes (and SSE events one by one); with Nagle's algorithm each
    # would wait for the client's delayed ACK, adding ~40 ms to every response and progress event.
    disable_nagle_algorithm = True

    # -- plumbing ------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        self._send_json(error.status, error.body(), error.headers)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length",
                           code="length_required")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"Content-Length {length_text!r} is not a byte count", code="invalid_header") from None
        if length > self.server.max_body:
            self.close_connection = True  # the body is never read, so the connection cannot be reused
            self._unread = length
            raise ApiError(413, f"the request body is {length} bytes, over the {self.server.max_body}-byte limit",
                           code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise ApiError(400, f"the request body ended after {len(raw)} of {length} bytes", code="invalid_body")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _linger(self) -> None:
        """After refusing a body unread: end our side, then drain (bounded) what the client is still sending.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the error response
        before the client reads it.
        """
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            left = min(self._unread, LINGER_BYTES)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        self._unread = 0
        path = urlsplit(self.path).path
        try:
            if method == "GET" and path.startswith("/v1/images/files/"):
                return self._get_file(path)  # capability URLs: the unguessable token is the credential
            if not self._authorised():
                raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            route = ROUTES.get((method, path))
            if route is not None:
                return route(self)
            if method == "GET" and path.startswith("/v1/models/"):
                return self._get_model(unquote(path[len("/v1/models/"):]))
            if any(p == path for _, p in ROUTES) or path.startswith("/v1/models/"):
                raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            raise ApiError(404, f"no route {method} {path}", code="not_found")
        except ApiError as e:
            self._send_error(e)
            if self._unread:
                self._linger()
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("%s %s failed", method, path)
            self.close_connection = True
            try:
                self._send_error(ApiError(500, f"internal error: {e!r}", code="internal_error"))
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # -- client liveness -----------------------------------------------------------------------------

    def client_gone(self) -> bool:
        """True once the peer has closed its end: its socket polls readable and a peek returns no bytes.

        Bytes that are really there (a pipelined next request) mean the client is alive; polling then stops, as the
        socket would stay readable.
        """
        if getattr(self, "_peer_sent_more", False):
            return False
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
        if data:
            self._peer_sent_more = True
            return False
        return True

    def _job_events(self, job: Job, heartbeat: bool = False) -> Iterator[tuple[str, Any]]:
        """The job's events, until its last one; cancels the job and raises ``ClientGone`` if the client leaves."""
        last_write = time.monotonic()
        while True:
            try:
                kind, payload = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.client_gone():
                    self._abandon(job)
                if heartbeat and time.monotonic() - last_write > HEARTBEAT_SECONDS:
                    self._write_stream(job, b": waiting\n\n")
                    last_write = time.monotonic()
                continue
            if kind == PROGRESS and self.client_gone():
                self._abandon(job)
            yield kind, payload
            last_write = time.monotonic()
            if kind != PROGRESS:
                return

    def _abandon(self, job: Job) -> None:
        self.server.manager.cancel(job)
        log.info("client %s went away; cancelled job %s", self.address_string(), job.id)
        raise ClientGone

    def _write_stream(self, job: Job, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError:
            self._abandon(job)

    # -- routes --------------------------------------------------------------------------------------

    def _generations(self) -> None:
        spec = parse_generation(self._read_json())
        job = self.server.manager.submit(spec)
        try:
            if spec.stream:
                self._stream(job)
            else:
                self._wait(job)
        finally:
            if job.state in ("queued", "running"):
                self.server.manager.cancel(job)  # whatever went wrong here, nobody is waiting for this job now

    def _result(self, job: Job, images: list[GeneratedImage]) -> dict[str, Any]:
        data = []
        for image in images:
            if job.spec.response_format == "url":
                token = self.server.files.put(image.png)
                url = f"{self.server.base_url_for(self.headers.get('Host'))}/v1/images/files/{token}.png"
                data.append({"url": url, "seed": image.seed})
            else:
                data.append({"b64_json": base64.b64encode(image.png).decode("ascii"), "seed": image.seed})
        return {"created": int(time.time()), "data": data}

    def _wait(self, job: Job) -> None:
        for kind, payload in self._job_events(job):
            if kind == DONE:
                self._send_json(200, self._result(job, payload))
            elif kind == ERROR:
                self._send_error(payload)
            elif kind == CANCELLED:
                self._send_error(ApiError(503, "the job was cancelled (the server is stopping)", code="cancelled",
                                          headers={"Retry-After": "1"}))

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        self._write_stream(job, b": queued\n\n")
        for kind, payload in self._job_events(job, heartbeat=True):
            if kind == PROGRESS:
                self._write_stream(job, _sse("progress", payload))
            elif kind == DONE:
                self._write_stream(job, _sse("done", self._result(job, payload)))
            elif kind == ERROR:
                self._write_stream(job, _sse("error", payload.body()))
            elif kind == CANCELLED:
                error = ApiError(503, "the job was cancelled (the server is stopping)", code="cancelled")
                self._write_stream(job, _sse("error", error.body()))

    def _get_file(self, path: str) -> None:
        name = path[len("/v1/images/files/"):]
        token = name[:-4] if name.endswith(".png") else ""
        png = self.server.files.get(token) if _TOKEN.match(token) else None
        if png is None:
            raise ApiError(404, "no such image (image URLs expire after an hour)", code="not_found")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(png)))
        self.send_header("Cache-Control", "private, max-age=3600")
        self.end_headers()
        self.wfile.write(png)

    def _models(self) -> None:
        rows = [self._model_row(name, digest) for name, digest in self.server.store.references()]
        self._send_json(200, {"object": "list", "data": rows})

    def _model_row(self, name: str, digest: str) -> dict[str, Any]:
        created = 0
        try:
            manifest = self.server.store.manifest_by_digest(digest, source=name)
            stamp = (manifest.document.get("annotations") or {}).get(oci_spec.CREATED_ANNOTATION)
            if stamp:
                import datetime as dt

                created = int(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except Exception:  # noqa: BLE001 - a listing shows a broken model rather than failing
            created = 0
        return {"id": name, "object": "model", "created": created, "owned_by": "imgpack", "digest": digest}

    def _get_model(self, given: str) -> None:
        reference = parse_model(given)
        name, digest = self.server.manager.resolve(reference, given)
        self._send_json(200, self._model_row(name, digest))

    def _ps(self) -> None:
        memory: dict[str, int] = {}
        try:
            from imgpack.runtime.backend import mx

            memory = {"active": int(mx.get_active_memory()), "peak": int(mx.get_peak_memory()),
                      "cache": int(mx.get_cache_memory())}
        except (ImportError, AttributeError):
            pass
        self._send_json(200, {"models": self.server.manager.ps(), "memory": memory})

    def _stop(self) -> None:
        body = self._read_json()
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        given = body.get("model")
        if not isinstance(given, str) or not given:
            raise ApiError(400, "model: required (a loaded model's name, see GET /api/ps)", param="model",
                           code="missing_required_parameter")
        self._send_json(200, self.server.manager.stop(given))


ROUTES = {
    ("POST", "/v1/images/generations"): Handler._generations,
    ("GET", "/v1/models"): Handler._models,
    ("GET", "/api/ps"): Handler._ps,
    ("POST", "/api/stop"): Handler._stop,
}


def _sse(event: str, body: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(body)}\n\n".encode()


def serve(
    store: Store,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    keep_alive: float = DEFAULT_KEEP_ALIVE,
    max_queue: int = DEFAULT_MAX_QUEUE,
    quiet: bool = False,
    ready: threading.Event | None = None,
) -> int:
    """Serve until interrupted; Ctrl-C (or SIGTERM) cancels running jobs and unloads every model."""
    import signal

    try:
        server = ImageServer((host, port), store, api_key=api_key, keep_alive=keep_alive, max_queue=max_queue,
                             quiet=quiet)
    except OSError as e:
        from imgpack.schemas.errors import ImgpackError

        raise ImgpackError(f"cannot listen on {_bracket(host)}:{port}: {e.strerror or e}") from None
    if not is_loopback(host) and not api_key:
        print(f"imgpack: warning: listening on {host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        # Both signals stop the loop from another thread, so the main thread returns normally: a
        # KeyboardInterrupt raised inside MLX or OpenBLAS code would abort the process instead.
        def stop(*_: object) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    print(f"imgpack: serving {store.root} at {server.url} (OpenAI API under {server.url}/v1)", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
