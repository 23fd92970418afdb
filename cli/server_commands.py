"""``imgpack serve``, ``ps``, ``stop`` and ``run --host``: the server command and the clients that talk to it.

The clients need only ``requests`` (a core dependency), so ``imgpack ps`` and ``imgpack run --host`` work on a
machine without the MLX runtime. The server's address comes from ``--host`` or ``$IMGPACK_HOST``
(``host:port`` or a URL), its key from ``--api-key`` or ``$IMGPACK_API_KEY``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from collections.abc import Callable
from typing import Any

from imgpack.schemas.errors import AuthError, ImgpackError, NotFoundError, TransferError, UsageError

HOST_ENV = "IMGPACK_HOST"
API_KEY_ENV = "IMGPACK_API_KEY"


def default_host() -> str:
    from imgpack.server.api import DEFAULT_HOST, DEFAULT_PORT

    return os.environ.get(HOST_ENV) or f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def server_url(host: str) -> str:
    """``host``, ``host:port`` or ``http(s)://host[:port]`` -> a base URL (default port for a bare host)."""
    from imgpack.server.api import DEFAULT_PORT

    text = host.strip().rstrip("/")
    if not text:
        raise UsageError("--host: empty")
    if "://" in text:
        if not text.startswith(("http://", "https://")):
            raise UsageError(f"--host: {host!r} must be an http:// or https:// URL")
        return text
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address
    if (text.startswith("[") and "]:" not in text) or ":" not in text:
        return f"http://{text}:{DEFAULT_PORT}"
    return f"http://{text}"


def split_listen(host: str, port: int | None) -> tuple[str, int]:
    """``serve --host``: a bare host, ``host:port`` or a URL; ``--port`` wins over a port in the host."""
    from urllib.parse import urlsplit

    from imgpack.server.api import DEFAULT_PORT

    parts = urlsplit(server_url(host))
    if parts.hostname is None:
        raise UsageError(f"--host: {host!r} names no host")
    try:
        given_port = parts.port
    except ValueError:
        raise UsageError(f"--host: {host!r} has an invalid port") from None
    chosen = port if port is not None else (given_port or DEFAULT_PORT)
    if not 0 <= chosen <= 65535:
        raise UsageError(f"--port: {chosen} is not a TCP port")
    return parts.hostname, chosen


class ServerClient:
    """A small client for a running ``imgpack serve`` (JSON calls and the streamed generation)."""

    def __init__(self, host: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        import requests

        self.url = server_url(host)
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout),
                                            **kwargs)
        except requests.ConnectionError:
            raise TransferError(f"no imgpack server answers at {self.url} (start one with 'imgpack serve')") from None
        except requests.RequestException as e:
            raise TransferError(f"{self.url}{path}: {e}") from None
        if response.status_code >= 400:
            raise _error(response.status_code, _message(response))
        return response

    def ps(self) -> dict[str, Any]:
        return self._call("GET", "/api/ps").json()

    def stop(self, model: str) -> dict[str, Any]:
        return self._call("POST", "/api/stop", json={"model": model}).json()

    def generate(self, body: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
        """Stream a generation, reporting each step; returns the final response body."""
        import requests

        response = self._call("POST", "/v1/images/generations", json=body | {"stream": True}, stream=True,
                              timeout=(self.timeout, None))
        with response:
            try:
                for event, data in iter_sse(response.iter_lines(decode_unicode=True)):
                    if event == "progress":
                        progress(int(data["step"]), int(data["total"]))
                    elif event == "done":
                        return data
                    elif event == "error":
                        error = data.get("error", {}) if isinstance(data, dict) else {}
                        raise ImgpackError(f"server: {error.get('message', data)}")
            except (requests.RequestException, ValueError, KeyError, TypeError) as e:
                raise TransferError(f"{self.url}: the event stream broke: {e}") from None
        raise TransferError(f"{self.url}: the stream ended before the image arrived")


def iter_sse(lines: Any) -> Any:
    """(event, parsed data) pairs from server-sent event lines; comments and blank keep-alives are skipped."""
    event, data = "message", list[str]()
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, json.loads("\n".join(data))


def _message(response: Any) -> str:
    """The error message of an OpenAI-shaped (``{"error": {"message"}}``) or ollama-shaped (``{"error": "..."}``)
    answer."""
    try:
        error = response.json()["error"]
        return error if isinstance(error, str) else error["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _error(status: int, message: str) -> ImgpackError:
    if status == 404:
        return NotFoundError(message)
    if status in (401, 403):
        return AuthError(message)
    if status == 400:
        return UsageError(message)
    return ImgpackError(f"server answered {status}: {message}")


# -- commands ----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from imgpack.server.api import DEFAULT_KEEP_ALIVE, ApiError, parse_keep_alive
    from imgpack.server.directories import open_model_dirs
    from imgpack.server.http import serve
    from imgpack.store.store import Store

    host, port = split_listen(args.host or default_host(), args.port)
    try:
        parsed = parse_keep_alive(args.keep_alive, "--keep-alive")
    except ApiError as e:
        raise UsageError(e.message) from None
    if args.max_queue < 1:
        raise UsageError(f"--max-queue: {args.max_queue} must be at least 1")
    store = Store.open(args.store)
    directories = open_model_dirs(args.model_dir, {name for name, _ in store.references()})
    return serve(store, host, port, api_key=args.api_key or os.environ.get(API_KEY_ENV), directories=directories,
                 keep_alive=DEFAULT_KEEP_ALIVE if parsed is None else parsed, max_queue=args.max_queue,
                 allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin),
                 quiet=getattr(args, "quiet", False))


def cmd_ps(args: argparse.Namespace) -> int:
    result = ServerClient(args.host or default_host(), args.api_key or os.environ.get(API_KEY_ENV)).ps()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from imgpack.cli import ui

    rows = [("NAME", "DIGEST", "SIZE", "STATE", "QUEUED", "UNTIL")]
    for m in result.get("models", []):
        running = m.get("running")
        state = f"busy {running['step']}/{running['total']}" if running else m["state"]
        until = "forever" if m.get("keep_alive") is None else (
            f"{m['expires_in']:.0f}s" if m.get("expires_in") is not None else "after queue")
        digest = m["digest"].removeprefix("sha256:")[:12]
        rows.append((m["name"], digest, ui.human_bytes(m["size"]), state, str(m["queued"]), until))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    result = ServerClient(args.host or default_host(), args.api_key or os.environ.get(API_KEY_ENV)).stop(args.model)
    if not getattr(args, "quiet", False):
        verb = "Unloaded" if result.get("status") == "unloaded" else "Unloading (after its queued jobs)"
        print(f"{verb} {result.get('model', args.model)}")
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """``imgpack run --host``: the same command, generated by a running server and saved here."""
    from imgpack.cli.runtime_commands import check_run_args
    from imgpack.store.atomic import write_atomic

    width, height, seed, output = check_run_args(args)
    quiet = getattr(args, "quiet", False)
    body: dict[str, Any] = {"model": args.ref, "prompt": args.prompt, "size": f"{width}x{height}", "seed": seed,
                            "response_format": "b64_json"}
    if args.guidance is not None:
        body["guidance"] = args.guidance
    if args.steps is not None:
        body["steps"] = args.steps
    if args.negative:
        body["negative_prompt"] = args.negative

    def progress(step: int, total: int) -> None:
        if not quiet:
            print(f"Generating: step {step}/{total}", flush=True)

    client = ServerClient(args.host, os.environ.get(API_KEY_ENV))
    started = time.monotonic()
    result = client.generate(body, progress)
    seconds = time.monotonic() - started
    try:
        png = base64.b64decode(result["data"][0]["b64_json"], validate=True)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ImgpackError(f"server: the response holds no image ({e})") from None
    write_atomic(output, png)
    if not quiet:
        used = result["data"][0].get("seed", seed)
        print(f"Saved {output} (seed {used}, generated in {seconds:.1f}s on {client.url})")
    if args.open:
        from imgpack.cli.runtime_commands import open_image

        open_image(output)
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", metavar="HOST[:PORT]", help=f"server address (default: ${HOST_ENV} or 127.0.0.1:8420)")
    p.add_argument("--api-key", metavar="KEY", help=f"the server's API key (default: ${API_KEY_ENV})")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add serve, ps and stop."""
    p = sub.add_parser("serve", parents=[common], help="serve the store's models over an OpenAI-compatible HTTP API",
                       description="Serve the store's models over an OpenAI-compatible HTTP API.")
    p.add_argument("--host", metavar="HOST", help=f"address to bind (default: ${HOST_ENV} or 127.0.0.1, loopback)")
    p.add_argument("--port", type=int, metavar="PORT", help="TCP port (default 8420; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--keep-alive", default="5m", metavar="DURATION",
                   help="how long an idle model stays loaded, e.g. 30s, 5m, 1h; negative = forever (default 5m)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="queued requests per model before answering 503 (default 16)")
    p.add_argument("--model-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="also serve the model in DIR in place, a directory of layer files named by their titles (what"
                        " 'oras pull' writes and a Kubernetes image volume mounts), as NAME (default: DIR's name);"
                        " repeatable")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (repeatable; '*' = any). By default only loopback"
                        " names and the bound address are answered, which stops DNS-rebinding pages")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API, with CORS"
                        " (repeatable; '*' = any). By default only the server's own page may")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ps", parents=[common], help="list the models a running server has loaded",
                       description="List the models a running server has loaded.")
    _client_options(p)
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", parents=[common], help="unload a model from a running server",
                       description="Unload a model from a running server.")
    p.add_argument("model", metavar="MODEL", help="a loaded model's name or digest (see 'imgpack ps')")
    _client_options(p)
    p.set_defaults(func=cmd_stop)
