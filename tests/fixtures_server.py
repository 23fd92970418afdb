"""Fixtures for the server tests: a store with the tiny models, an in-thread ``imgpack serve`` on a free loopback
port, raw-socket streams (so a test can hang up mid-job), and in-process reference images to compare bytes with.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

TESTS = Path(__file__).resolve().parent
MODELS = TESTS / "models"


@pytest.fixture(scope="session")
def server_store(tmp_path_factory: pytest.TempPathFactory):
    """A store holding ``zimage-tiny:latest`` and ``zimage-sharded:latest``."""
    from imgpack.packager.create import create_model
    from imgpack.store.store import Store

    store = Store.open(tmp_path_factory.mktemp("server") / "store")
    create_model(store, "zimage-tiny:latest", MODELS / "zimage-tiny")
    create_model(store, "zimage-sharded:latest", MODELS / "zimage-sharded")
    return store


@pytest.fixture(scope="session")
def reference_png(server_store) -> Callable[..., bytes]:
    """PNG bytes of an in-process generation, the ground truth the server's output must match byte for byte."""
    from imgpack.runtime.zimage import pipeline

    models: dict[str, Any] = {}
    cache: dict[tuple, bytes] = {}

    def make(prompt: str, seed: int, size: tuple[int, int] = (64, 64), steps: int = 2,
             model: str = "zimage-tiny") -> bytes:
        key = (model, prompt, seed, size, steps)
        if key not in cache:
            if model not in models:
                models[model] = pipeline.ZImageModel.open(server_store, model)
            request = pipeline.GenerationRequest(prompt=prompt, width=size[0], height=size[1], steps=steps, seed=seed)
            cache[key] = pipeline.run_to_image(models[model], request).png()
        return cache[key]

    return make


class FailingTransformer:
    """Wraps a transformer so its ``fail_at``-th call raises: a failure in the middle of the denoising loop."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("injected failure in the denoising step")
        return self.inner(*args)


@dataclass
class ServerHandle:
    server: Any
    url: str
    loaded: list[weakref.ref] = field(default_factory=list)

    @property
    def manager(self) -> Any:
        return self.server.manager

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kwargs)

    def ps(self) -> list[dict[str, Any]]:
        response = self.get("/api/ps", headers=getattr(self, "auth", {}))
        assert response.status_code == 200, response.text
        return response.json()["models"]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def finished_job(self, prompt: str, timeout: float = 15.0) -> Any:
        """The server's record of the finished job with this prompt."""
        return self.wait_for(
            lambda: next((j for j in list(self.manager.history) if j.spec.prompt == prompt), None),
            timeout, f"job {prompt!r} to finish",
        )


@pytest.fixture
def start_server(server_store) -> Iterator[Callable[..., ServerHandle]]:
    """``start_server(**options)`` runs an ``ImageServer`` on 127.0.0.1 in a thread; ``fail_at`` makes the model's
    transformer raise on that call. Every server is shut down (jobs cancelled, models unloaded) at teardown."""
    from imgpack.server.http import ImageServer
    from imgpack.server.jobs import default_loader

    started: list[tuple[Any, threading.Thread]] = []

    def start(fail_at: int | None = None, store: Any = None, **options: Any) -> ServerHandle:
        handle: ServerHandle

        def loader(store: Any, name: str, *plan: int) -> Any:
            model = default_loader(store, name, *plan)
            if fail_at is not None:
                model.transformer = FailingTransformer(model.transformer, fail_at)
            handle.loaded.append(weakref.ref(model))
            return model

        server = ImageServer(("127.0.0.1", 0), store or server_store, quiet=True, loader=loader, **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        handle = ServerHandle(server, f"http://127.0.0.1:{server.port}")
        return handle

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class RawStream:
    """A request sent over a plain socket, so the test decides exactly when the client disappears."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        data = json.dumps(body).encode()
        head = f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        for key, value in (headers or {}).items():
            head += f"{key}: {value}\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        self.sock.sendall(head.encode() + data)
        self.file = self.sock.makefile("rb")
        self.chunked = False

    def status(self) -> int:
        line = self.file.readline().decode()
        while (header := self.file.readline()) not in (b"\r\n", b""):
            if header.lower().startswith(b"transfer-encoding:") and b"chunked" in header.lower():
                self.chunked = True
        return int(line.split()[1])

    def lines(self) -> Iterator[str]:
        """The body's lines, undoing chunked transfer encoding."""
        if not self.chunked:
            for raw in self.file:
                yield raw.decode().rstrip("\r\n")
            return
        pending = b""
        while size_line := self.file.readline():
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            pending += self.file.read(size)
            self.file.readline()  # the CRLF after the chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                yield raw.decode().rstrip("\r")

    def events(self) -> Iterator[tuple[str, Any]]:
        """(event, data) pairs of a server-sent event stream."""
        event, data = None, None
        for line in self.lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and event is not None:
                yield event, data
                event, data = None, None

    def hang_up(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw_streams() -> Iterator[Callable[..., RawStream]]:
    opened: list[RawStream] = []

    def open_stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> RawStream:
        stream = RawStream(url, body, headers)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.hang_up()
