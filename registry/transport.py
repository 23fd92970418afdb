"""HTTP plumbing shared by every registry operation: sessions, auth, retries, redirects, limits.

One :class:`RegistryClient` exists per registry host.  It owns

* a ``requests.Session`` per thread (sessions are not thread-safe; connections are reused),
* two semaphores: one bounds requests in flight, the other bounds body streams (uploads and
  downloads), so a model with a thousand small tensors keeps many HEADs going while only a few
  large bodies compete for bandwidth and memory,
* the :class:`Authorizer`, which answers ``WWW-Authenticate`` challenges (basic or bearer) and
  caches bearer tokens per scope,
* retry policy: exponential backoff with full jitter, ``Retry-After`` honoured on 429/503.

Redirects are followed by hand so the registry's ``Authorization`` header is never sent to
another host (blob storage such as S3 signs its URLs itself).
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from imgpack.registry.challenge import Challenge, parse_challenges
from imgpack.registry.credentials import ANONYMOUS, Credential
from imgpack.schemas.errors import AuthError, ImgpackError, TransferError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = "imgpack/0.1"
Scope = tuple[str, ...]


class GaveUp(TransferError):
    """A request failed on every attempt the transport allows; retrying it again is pointless."""


def raise_for_exhausted(resp: requests.Response, what: str) -> None:
    """Turn a final retryable status (5xx, 429) into :class:`GaveUp`, other failures stay with the caller."""
    if resp.status_code in RETRY_STATUSES:
        raise GaveUp(f"{what} answered {describe_response(resp)} on every attempt")


class Cancelled(ImgpackError):
    """The transfer was interrupted (Ctrl-C); finished work is kept for the next run."""

    exit_code = 130


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = urlsplit(f"//{host}").hostname or host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def safe_url(url: str) -> str:
    """A URL fit for messages: query strings (which may carry signatures) are dropped."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def describe_response(resp: requests.Response) -> str:
    """``HTTP 400 DIGEST_INVALID: message`` from a registry error body, without echoing headers."""
    text = f"HTTP {resp.status_code}"
    try:
        body = resp.json() if resp.content and len(resp.content) < 65536 else None
    except (ValueError, requests.RequestException):
        body = None
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        parts = []
        for err in body["errors"][:3]:
            if isinstance(err, dict):
                parts.append(f"{err.get('code', '?')}: {err.get('message', '')}".strip())
        if parts:
            text += " " + "; ".join(parts)
    return text


def parse_retry_after(value: str | None, limit: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), capped at ``limit``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, min(float(value), limit))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), limit))


@dataclass
class TransportOptions:
    """Knobs for one registry client; defaults suit loopback and cloud registries alike."""

    insecure: bool = False
    max_requests: int = 8
    max_streams: int = 4
    attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    retry_after_max: float = 60.0
    cancel: threading.Event = field(default_factory=threading.Event)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * (2**attempt)))

    def sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise Cancelled("interrupted")


@dataclass
class _Token:
    value: str
    expires_at: float


class Authorizer:
    """Turns credentials plus the registry's challenge into ``Authorization`` headers.

    The scheme is learned from the first 401.  Bearer tokens are cached per scope and fetched
    ahead of the request once the realm is known, so concurrent workers share one token fetch.
    """

    def __init__(self, client: RegistryClient, credential: Credential) -> None:
        self.client = client
        self.credential = credential
        self.scheme: str | None = None
        self.challenge: Challenge | None = None
        self.tokens: dict[Scope, _Token] = {}
        self.token_requests = 0
        self._lock = threading.Lock()
        self._fetch_locks: dict[Scope, threading.Lock] = {}

    def _basic(self) -> str | None:
        cred = self.credential
        if cred.username is None or cred.password is None:
            return None
        raw = f"{cred.username}:{cred.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def header(self, scope: Scope) -> str | None:
        """The header to send with a request for ``scope``, or None to go anonymous."""
        if self.credential.registry_token:
            return f"Bearer {self.credential.registry_token}"
        if self.scheme == "basic":
            return self._basic()
        if self.scheme == "bearer":
            token = self._cached(scope)
            if token is None:
                token = self._fetch_token(scope)
            return f"Bearer {token}"
        return None

    def _cached(self, scope: Scope) -> str | None:
        with self._lock:
            token = self.tokens.get(scope)
        if token and token.expires_at > time.monotonic():
            return token.value
        return None

    def handle_challenge(self, header: str | None, scope: Scope, sent: str | None, final: bool = False) -> None:
        """Learn from a 401; raise AuthError when another try cannot succeed.

        ``final`` marks a 401 that answered a freshly authorized retry: nothing more can help.
        """
        host = self.client.host
        if self.credential.registry_token:
            raise AuthError(f"{host}: the registry rejected the token from {self.credential.source}")
        try:
            challenges = parse_challenges(header or "")
        except ValueError as exc:
            raise AuthError(f"{host}: unreadable WWW-Authenticate header ({exc})") from None
        chosen = next((c for c in challenges if c.scheme == "bearer"), None)
        chosen = chosen or next((c for c in challenges if c.scheme == "basic"), None)
        if chosen is None:
            raise AuthError(f"{host}: authentication required, but the registry offered no basic or bearer scheme")
        with self._lock:
            was_scheme = self.scheme
            self.scheme, self.challenge = chosen.scheme, chosen
            if chosen.scheme == "bearer":
                self.tokens.pop(scope, None)
        if chosen.scheme == "basic":
            if self._basic() is None:
                raise AuthError(f"{host}: authentication required; run `imgpack login {host}` or set credentials")
            if sent is not None and was_scheme == "basic":
                raise AuthError(f"{host}: the registry rejected the credentials from {self.credential.source}")
        elif final and sent is not None and was_scheme == "bearer" and sent.startswith("Bearer "):
            # A token we just fetched was refused: the scope is not granted to these credentials.
            if self.credential.anonymous:
                raise AuthError(f"{host}: access denied to {' '.join(scope) or 'the registry'} (not logged in)")
            raise AuthError(f"{host}: access denied to {' '.join(scope) or 'the registry'}")

    def _fetch_token(self, scope: Scope) -> str:
        with self._lock:
            lock = self._fetch_locks.setdefault(scope, threading.Lock())
        with lock:
            cached = self._cached(scope)
            if cached:
                return cached
            token = self._request_token(scope)
            with self._lock:
                self.tokens[scope] = token
                self.token_requests += 1
            return token.value

    def _request_token(self, scope: Scope) -> _Token:
        challenge = self.challenge
        assert challenge is not None
        host = self.client.host
        realm = challenge.realm
        if not realm:
            raise AuthError(f"{host}: bearer challenge has no realm")
        realm_host = urlsplit(realm).netloc
        if urlsplit(realm).scheme != "https" and not (self.client.options.insecure or is_loopback(realm_host)):
            raise AuthError(f"{host}: refusing to send credentials to non-TLS token realm {safe_url(realm)}")
        scopes = list(scope) or ([challenge.scope] if challenge.scope else [])
        cred = self.credential
        session = self.client.session()
        timeout = (self.client.options.connect_timeout, self.client.options.read_timeout)
        opts = self.client.options
        for attempt in range(opts.attempts):
            try:
                if cred.identity_token:
                    form = {
                        "grant_type": "refresh_token",
                        "refresh_token": cred.identity_token,
                        "client_id": "imgpack",
                        "access_type": "online",
                    }
                    if challenge.service:
                        form["service"] = challenge.service
                    if scopes:
                        form["scope"] = " ".join(scopes)
                    resp = session.post(realm, data=form, timeout=timeout, allow_redirects=False)
                else:
                    query: list[tuple[str, str]] = []
                    if challenge.service:
                        query.append(("service", challenge.service))
                    query.extend(("scope", s) for s in scopes)
                    url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
                    headers = {}
                    basic = self._basic()
                    if basic:
                        headers["Authorization"] = basic
                    resp = session.get(url, headers=headers, timeout=timeout, allow_redirects=False)
            except requests.RequestException as exc:
                if attempt + 1 >= opts.attempts:
                    raise TransferError(
                        f"{host}: token service {safe_url(realm)} unreachable: {type(exc).__name__}"
                    ) from None
                opts.sleep(opts.backoff(attempt))
                continue
            if resp.status_code in RETRY_STATUSES and attempt + 1 < opts.attempts:
                delay = parse_retry_after(resp.headers.get("Retry-After"), opts.retry_after_max)
                opts.sleep(delay if delay is not None else opts.backoff(attempt))
                continue
            break
        if resp.status_code in (401, 403):
            who = f"credentials from {cred.source}" if not cred.anonymous else "anonymous access"
            raise AuthError(f"{host}: token service refused {who} for {' '.join(scopes) or 'the registry'}")
        if resp.status_code != 200:
            raise TransferError(f"{host}: token service {safe_url(realm)} answered {describe_response(resp)}")
        try:
            body = resp.json()
        except ValueError:
            raise AuthError(f"{host}: token service {safe_url(realm)} returned malformed JSON") from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthError(f"{host}: token service {safe_url(realm)} returned no token")
        try:
            lifetime = float(body.get("expires_in") or 60)
        except (TypeError, ValueError):
            lifetime = 60.0
        # Refresh a little early so a token does not expire between fetch and use.
        margin = min(10.0, lifetime * 0.1)
        return _Token(value=value, expires_at=time.monotonic() + max(1.0, lifetime - margin))


class _ThreadSessions(threading.local):
    session: requests.Session | None = None


class RegistryClient:
    """Everything needed to talk to one registry host."""

    def __init__(self, host: str, credential: Credential | None = None, options: TransportOptions | None = None):
        self.host = host
        self.options = options or TransportOptions()
        if is_loopback(host) or self.options.insecure:
            self.scheme = "http"
        else:
            self.scheme = "https"
        self.base_url = f"{self.scheme}://{host}"
        self.authorizer = Authorizer(self, credential or ANONYMOUS)
        self.request_slots = threading.BoundedSemaphore(max(1, self.options.max_requests))
        self.stream_slots = threading.BoundedSemaphore(max(1, self.options.max_streams))
        self._local = _ThreadSessions()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def session(self) -> requests.Session:
        """This thread's session; created on first use and closed by :meth:`close`."""
        session = self._local.session
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no ~/.netrc credentials leaking to other hosts
            adapter = _BigBlockAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def url(self, path: str) -> str:
        return path if "://" in path else urljoin(self.base_url + "/", path.lstrip("/"))

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: Any, stream: bool, timeout: float | None
    ) -> requests.Response:
        """One HTTP exchange, following redirects by hand and dropping credentials off-host."""
        session = self.session()
        read_timeout = timeout if timeout is not None else self.options.read_timeout
        for _ in range(MAX_REDIRECTS + 1):
            # Every URL is checked, not only redirects: an upload Location of http:// on an https registry
            # (a TLS-terminating proxy) must not carry credentials or blob bytes in clear text.
            parts = urlsplit(url)
            if parts.scheme == "http" and not (self.options.insecure or is_loopback(parts.netloc)):
                raise TransferError(f"{self.host}: refusing plain-HTTP URL {safe_url(url)} (use --insecure to allow)")
            resp = session.request(
                method,
                url,
                headers=headers,
                data=body,
                stream=stream,
                allow_redirects=False,
                timeout=(self.options.connect_timeout, read_timeout),
            )
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location or method not in ("GET", "HEAD"):
                return resp
            resp.close()
            target = urljoin(url, location)
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https"):
                raise TransferError(f"{self.host}: redirect to unsupported URL scheme {parts.scheme!r}")
            if parts.scheme == "http" and not (self.options.insecure or is_loopback(parts.netloc)):
                raise TransferError(f"{self.host}: refusing redirect to plain-HTTP {safe_url(target)}")
            if parts.netloc.lower() != self.host.lower():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise TransferError(f"{self.host}: too many redirects for {safe_url(url)}")

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: Scope = (),
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | bytes | None = None,
        stream: bool = False,
        retry: bool = True,
        timeout: float | None = None,
    ) -> requests.Response:
        """Send a request with auth and retries; returns the final response whatever its status.

        ``body`` is bytes or a zero-argument callable producing a fresh body, so the request can
        be replayed after a 401 or a retryable failure.  Connection failures become
        :class:`TransferError` after the last attempt; 401/403 become :class:`AuthError`.
        """
        opts = self.options
        url = self.url(path)
        attempts = opts.attempts if retry else 1
        last_error = ""
        for attempt in range(attempts):
            if opts.cancel.is_set():
                raise Cancelled("interrupted")
            try:
                with self.request_slots:
                    resp = self._authorized(method, url, scope, headers or {}, body, stream, timeout)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last_error = type(exc).__name__
                if attempt + 1 < attempts:
                    opts.sleep(opts.backoff(attempt))
                    continue
                raise GaveUp(f"{method} {safe_url(url)} failed after {attempts} attempt(s): {last_error}") from None
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                delay = parse_retry_after(resp.headers.get("Retry-After"), opts.retry_after_max)
                resp.close()
                opts.sleep(delay if delay is not None else opts.backoff(attempt))
                continue
            return resp
        raise AssertionError("unreachable")

    def _authorized(
        self,
        method: str,
        url: str,
        scope: Scope,
        headers: dict[str, str],
        body: Any,
        stream: bool,
        timeout: float | None,
    ) -> requests.Response:
        def make_body() -> Any:
            return body() if callable(body) else body

        sent = None
        request_headers = dict(headers)
        if urlsplit(url).netloc.lower() == self.host.lower():
            sent = self.authorizer.header(scope)
            if sent:
                request_headers["Authorization"] = sent
        resp = self._send(method, url, request_headers, make_body(), stream, timeout)
        if resp.status_code == 401 and urlsplit(url).netloc.lower() == self.host.lower():
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            self.authorizer.handle_challenge(challenge, scope, sent)
            if body is not None and not isinstance(body, bytes) and not callable(body):
                # A streamed body was consumed by the refused attempt; the caller restarts the upload
                # and its next request carries the fresh authorization.
                raise TransferError(f"{self.host}: authorization expired during {method} {safe_url(url)}")
            retried = self.authorizer.header(scope)
            if retried:
                request_headers["Authorization"] = retried
            resp = self._send(method, url, request_headers, make_body(), stream, timeout)
            if resp.status_code == 401:
                resp.close()
                self.authorizer.handle_challenge(resp.headers.get("WWW-Authenticate"), scope, retried, final=True)
                raise AuthError(f"{self.host}: authentication failed for {' '.join(scope) or 'the registry'}")
        if resp.status_code == 403:
            resp.close()
            raise AuthError(f"{self.host}: access denied ({method} {safe_url(url)})")
        return resp

    def ping(self) -> None:
        """Check the registry speaks the v2 API and the credentials are accepted."""
        resp = self.request("GET", "/v2/")
        resp.close()
        if resp.status_code != 200:
            raise TransferError(f"{self.host}: /v2/ answered {describe_response(resp)}")


class _BigBlockAdapter(HTTPAdapter):
    """Send request bodies in 1 MiB blocks instead of http.client's 8-16 KiB."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = 1 << 20
        super().init_poolmanager(*args, **kwargs)


def json_or_error(resp: requests.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise TransferError(f"{what}: response is not JSON") from None


def iter_bounded(chunks: Iterable[bytes], limit: int, what: str) -> bytes:
    """Join chunks, refusing more than ``limit`` bytes (manifests, tag lists)."""
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > limit:
            raise TransferError(f"{what}: response larger than {limit} bytes")
    return bytes(out)


__all__ = [
    "Authorizer",
    "Cancelled",
    "GaveUp",
    "RegistryClient",
    "Scope",
    "TransportOptions",
    "describe_response",
    "is_loopback",
    "iter_bounded",
    "json_or_error",
    "parse_retry_after",
    "safe_url",
]
