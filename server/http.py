"""``imgpack serve``: the store's models over OpenAI's image API, ollama's native API and a page at ``/``.

The connection layer is ``imgpack.server.wire`` (h11 driven by a reactor thread and a bounded worker pool; its
docstring says why that and not ``http.server`` or uvicorn). This module routes complete requests: it checks the
Host, Origin and API key (``guard``), finds the route, and renders errors in the shape of the API that was
called — OpenAI's ``{"error": {message, type, param, code}}`` under ``/v1``, ollama's ``{"error": "message"}``
under ``/api``.

Routes: ``GET /`` (the page), ``POST /v1/images/generations``, ``GET /v1/models[/ID]``,
``GET /v1/images/files/<name>``, and ollama's ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, ``/api/pull``, ``/api/delete``, plus ``/api/stop``.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from imgpack.server import ollama_api, openai_api
from imgpack.server.api import DEFAULT_HOST, DEFAULT_KEEP_ALIVE, DEFAULT_PORT, ApiError
from imgpack.server.directories import DirectoryModel
from imgpack.server.guard import WebPolicy, cors_headers, is_loopback, parse_json_body, split_host
from imgpack.server.jobs import DEFAULT_MAX_QUEUE, ModelManager, default_loader
from imgpack.server.openai_api import ImageFiles
from imgpack.server.wire import DEFAULT_WORKERS, Exchange, HttpServer, printable
from imgpack.store.store import Store

log = logging.getLogger("imgpack.server")

MAX_BODY = 1024 * 1024

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ImageServer", "is_loopback", "serve"]


@dataclass(frozen=True)
class Route:
    handler: Callable[..., None]
    family: str  # "openai" or "ollama": the shape of its errors
    public: bool = False  # answered without the API key (the page; image files, whose unguessable name is the key)


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): Route(lambda server, ex: server.send_page(ex), "openai", public=True),
    ("POST", "/v1/images/generations"): Route(openai_api.generations, "openai"),
    ("GET", "/v1/models"): Route(openai_api.models, "openai"),
    ("POST", "/api/generate"): Route(ollama_api.generate, "ollama"),
    ("GET", "/api/tags"): Route(ollama_api.tags, "ollama"),
    ("POST", "/api/show"): Route(ollama_api.show, "ollama"),
    ("GET", "/api/ps"): Route(ollama_api.ps, "ollama"),
    ("GET", "/api/version"): Route(ollama_api.version, "ollama"),
    ("POST", "/api/pull"): Route(ollama_api.pull, "ollama"),
    ("DELETE", "/api/delete"): Route(ollama_api.delete, "ollama"),
    ("POST", "/api/stop"): Route(ollama_api.stop, "ollama"),
}
PREFIXES: dict[tuple[str, str], Route] = {  # routes that take the rest of the path as their argument
    ("GET", "/v1/models/"): Route(lambda server, ex, rest: openai_api.get_model(server, ex, unquote(rest)), "openai"),
    ("GET", "/v1/images/files/"): Route(lambda server, ex, rest: openai_api.get_file(server, ex, rest), "openai",
                                        public=True),
}


def family_of(path: str) -> str:
    return "ollama" if path.startswith("/api/") else "openai"


def error_body(error: ApiError, family: str) -> dict[str, Any]:
    return {"error": error.message} if family == "ollama" else error.body()


class ImageServer(HttpServer):
    """The HTTP server: a ``ModelManager`` for the models, ``ImageFiles`` for URLs, a ``WebPolicy`` for browsers."""

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
        allowed_hosts: tuple[str, ...] = (),
        allowed_origins: tuple[str, ...] = (),
        workers: int = DEFAULT_WORKERS,
        directories: tuple[DirectoryModel, ...] | list[DirectoryModel] = (),
        **timeouts: Any,  # header/body/idle/write timeouts (s), max_connections: see wire.HttpServer
    ) -> None:
        super().__init__(address, max_body=max_body, workers=workers, **timeouts)
        self.store = store
        self.api_key = api_key or None
        self.quiet = quiet
        self.policy = WebPolicy.create(address[0], allowed_hosts, allowed_origins)
        self.manager = ModelManager(store, keep_alive=keep_alive, max_queue=max_queue, loader=loader,
                                    directories=directories)
        self.files = ImageFiles()

    @property
    def url(self) -> str:
        host = self.server_address[0]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{_bracket(host)}:{self.port}"

    def base_url_for(self, host_header: str | None) -> str:
        """Where URLs in responses point: the bound address, or for a wildcard bind the Host the client used
        (already checked against the allowed hosts)."""
        bound = self.server_address[0]
        if bound not in ("0.0.0.0", "::", ""):
            return f"http://{_bracket(bound)}:{self.port}"
        if host_header:
            try:
                split_host(host_header)
                return f"http://{host_header}"
            except ValueError:
                pass
        return f"http://{socket.gethostname()}:{self.port}"

    def server_close(self) -> None:
        self.manager.close()
        super().server_close()

    # -- answers ---------------------------------------------------------------------------------------

    def send_json(self, ex: Exchange, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        ex.respond(status, json.dumps(body).encode(), "application/json", list((headers or {}).items()))

    def send_error(self, ex: Exchange, error: ApiError) -> None:
        self.send_json(ex, error.status, error_body(error, family_of(ex.request.path)), error.headers)

    def refusal(self, status: int, message: str, code: str, path: str | None) -> tuple[bytes, str]:
        body = error_body(ApiError(status, message, code=code), family_of(path or ""))
        return json.dumps(body).encode(), "application/json"

    def read_json(self, ex: Exchange) -> Any:
        return parse_json_body(ex.request.body, ex.request.headers.get("content-type"))

    def send_page(self, ex: Exchange) -> None:
        page = importlib.resources.files("imgpack.server").joinpath("page.html").read_bytes()
        ex.respond(200, page, "text/html; charset=utf-8", [
            ("Cache-Control", "no-cache"),
            ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline';"
                                        " script-src 'unsafe-inline'; frame-ancestors 'none'"),
            ("X-Frame-Options", "DENY"),
        ])

    def log_request(self, ex: Exchange, seconds: float) -> None:
        if not self.quiet:
            r = ex.request
            sys.stderr.write(f"{printable(r.peer)} - {r.method} {printable(r.target)} {ex.status} {seconds:.3f}s\n")

    # -- dispatch --------------------------------------------------------------------------------------

    def handle(self, ex: Exchange) -> None:
        request = ex.request
        try:
            self.policy.check_host(request.headers.get("host"))
            origin = self.policy.cors_origin(request.headers.get("origin"), request.headers.get("host"))
            if origin is not None:
                ex.extra_headers += cors_headers(origin)
            if request.method == "OPTIONS":
                if origin is None:
                    raise ApiError(405, "OPTIONS is only answered to allowed cross-origin callers",
                                   code="method_not_allowed")
                ex.respond(204, b"", "text/plain", cors_headers(origin, preflight=True)[2:])
                return
            route, args = self._route(request.method, request.path)
            if not route.public and not self._authorised(request.headers.get("authorization", "")):
                raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            route.handler(self, ex, *args)
        except ApiError as e:
            if ex.answered:  # a stream already started: nothing better to do than end it
                ex.close_after = True
                return
            self.send_error(ex, e)

    def _route(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        route = ROUTES.get((method, path))
        if route is not None:
            return route, ()
        for (m, prefix), route in PREFIXES.items():
            if m == method and path.startswith(prefix) and len(path) > len(prefix):
                return route, (path[len(prefix):],)
        known = any(p == path for _, p in ROUTES) or any(path.startswith(p) for _, p in PREFIXES)
        if known:
            raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
        raise ApiError(404, f"no route {method} {path}", code="not_found")

    def _authorised(self, header: str) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(
    store: Store,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    keep_alive: float = DEFAULT_KEEP_ALIVE,
    max_queue: int = DEFAULT_MAX_QUEUE,
    allowed_hosts: tuple[str, ...] = (),
    allowed_origins: tuple[str, ...] = (),
    quiet: bool = False,
    ready: threading.Event | None = None,
    directories: tuple[DirectoryModel, ...] | list[DirectoryModel] = (),
) -> int:
    """Serve until interrupted; Ctrl-C (or SIGTERM) cancels running jobs and unloads every model."""
    import signal

    try:
        server = ImageServer((host, port), store, api_key=api_key, keep_alive=keep_alive, max_queue=max_queue,
                             allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, quiet=quiet,
                             directories=directories)
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
    for model in directories:
        print(f"imgpack: {model.name} is {model.path} ({model.tensors} tensors, served in place)", flush=True)
    print(f"imgpack: serving {store.root} at {server.url} (OpenAI API under {server.url}/v1, ollama's under"
          f" {server.url}/api, a page at {server.url}/)", flush=True)
    if ready is not None:
        ready.set()
    started = time.monotonic()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    log.info("served for %.0fs", time.monotonic() - started)
    return 0
