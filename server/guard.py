"""What a request must show before the server acts on it: a Host it answers to, an Origin it trusts, and a JSON
body that is really JSON.

A server on loopback is still reachable from every web page the user opens: a page can POST to
``http://127.0.0.1:8420`` (a "simple" request needs no CORS preflight when its body is ``text/plain``), and with
DNS rebinding (a hostname of the attacker's that resolves to 127.0.0.1) it can even read the answers. So:

* ``Host`` must be a loopback name or address (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``[::1]``), the
  exact address the server is bound to, or a name given with ``--allowed-host`` (``*`` accepts any). A rebinding
  attack always arrives with the attacker's hostname, so it is refused here.
* a browser's ``Origin``, when sent, must be this server itself (the page at ``/``) or one given with
  ``--allowed-origin`` (``*`` accepts any); allowed cross-origin callers get CORS headers, others a 403.
* a JSON body must say ``Content-Type: application/json``, which no page can send cross-origin without a
  preflight that the Origin rule answers. It is parsed with bounded nesting and without lone surrogates, so bad
  input is a 400, never a ``RecursionError`` or an encoding error deep inside the pipeline.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from imgpack.server.api import ApiError

MAX_JSON_DEPTH = 64
ANY = "*"


def is_loopback(host: str) -> bool:
    """A loopback name or address (``localhost`` and its subdomains included, per RFC 6761)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(header: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6][:port]`` -> (name, port); raises ValueError on anything else."""
    parts = urlsplit(f"//{header}")
    name = parts.hostname
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise ValueError(header)
    return name, parts.port


@dataclass(frozen=True)
class WebPolicy:
    """The Host and Origin rules of one server (see the module docstring)."""

    bound: str  # the address the server listens on
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    @classmethod
    def create(cls, bound: str, hosts: Iterable[str] = (), origins: Iterable[str] = ()) -> WebPolicy:
        return cls(bound, tuple(h.lower().rstrip(".") for h in hosts), tuple(o.rstrip("/").lower() for o in origins))

    def host_allowed(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if ANY in self.allowed_hosts or is_loopback(name) or name in self.allowed_hosts:
            return True
        try:
            return ipaddress.ip_address(name) == ipaddress.ip_address(self.bound)
        except ValueError:
            return False

    def check_host(self, header: str | None) -> None:
        if header is None:
            return  # HTTP/1.0 without Host: no browser sends that
        try:
            name, _ = split_host(header)
        except ValueError:
            raise ApiError(400, f"Host header {header!r} is not host[:port]", code="invalid_header") from None
        if not self.host_allowed(name):
            raise ApiError(403, f"this server does not answer to the host name {name!r}; start it with"
                                f" --allowed-host {name} to allow it", code="host_not_allowed")

    def cors_origin(self, origin: str | None, host: str | None) -> str | None:
        """The Origin to echo in CORS headers (None when the request is not cross-origin); 403 if refused."""
        if origin is None:
            return None
        normalized = origin.rstrip("/").lower()
        if host is not None and normalized in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return None  # the page this server serves: same-origin, no CORS needed
        if ANY in self.allowed_origins or normalized in self.allowed_origins:
            return origin
        raise ApiError(403, f"requests from the web origin {origin!r} are refused; start the server with"
                            f" --allowed-origin {origin} to allow them", code="origin_not_allowed")


def cors_headers(origin: str, preflight: bool = False) -> list[tuple[str, str]]:
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    if preflight:
        headers += [("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                    ("Access-Control-Max-Age", "600")]
    return headers


def parse_json_body(body: bytes, content_type: str | None) -> Any:
    """The request's JSON value: 400 when missing, malformed, nested too deep or holding a lone surrogate;
    415 unless the client said ``application/json``."""
    if not body:
        raise ApiError(400, "the request needs a JSON body", code="invalid_json")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json', not"
                            f" {content_type or 'without a Content-Type'!r}", code="unsupported_media_type")
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None
    except ValueError as e:  # includes UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Walk the parsed value without recursion: bounded depth, strings that are valid Unicode."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                               code="invalid_json")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, where or "a key")
                stack.append((child, depth + 1, where or (key if isinstance(key, str) else "")))
        elif isinstance(item, str):
            _check_text(item, where)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = where or "the body"
        raise ApiError(400, f"{field}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); send valid"
                            " Unicode", param=where or None, code="invalid_value") from None
