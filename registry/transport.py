"""HTTP plumbing shared by every registry operation: sessions, TLS, proxies, auth, retries, redirects, limits.

One :class:`RegistryClient` exists per registry host. It owns

* a ``requests.Session`` per thread (sessions are not thread-safe; connections are reused),
* an :class:`~imgpack.registry.retry.AdaptiveLimit` on requests in flight (halved on 429/503, grown back on
  success) and a semaphore on body streams, so a model with a thousand small tensors keeps many HEADs going
  while only a few large bodies compete for bandwidth and memory,
* the :class:`Authorizer`, which answers ``WWW-Authenticate`` challenges (basic or bearer) and caches bearer
  tokens per scope,
* the one :class:`~imgpack.registry.retry.RetryPolicy` every request goes through, token fetches included.

Network settings follow the conventions other registry clients use: ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
(and lower-case forms), a CA bundle from ``--ca-file``, ``SSL_CERT_FILE`` or ``REQUESTS_CA_BUNDLE``, and docker's
per-registry directory ``/etc/docker/certs.d/<host>/`` (``ca.crt``, ``client.cert`` + ``client.key``).
``~/.netrc`` is never read, so credentials for one host never leak to another. Redirects are followed by hand
so the registry's ``Authorization`` header is never sent to another host (blob storage such as S3 signs its
URLs itself) — through a proxy as well, since the header is ours to drop.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from imgpack.registry.challenge import Challenge, parse_challenges
from imgpack.registry.credentials import ANONYMOUS, Credential
from imgpack.registry.retry import (
    RETRY_STATUSES,
    THROTTLE_STATUSES,
    AdaptiveLimit,
    Cancelled,
    RetryPolicy,
    parse_retry_after,
    throttled_answer,
)
from imgpack.schemas.errors import AuthError, ImgpackError, TransferError

if TYPE_CHECKING:
    from imgpack.registry.target import ChunkReader

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = "imgpack/0.1"
#: Where docker keeps per-registry TLS material; overridable for tests and rootless setups.
DOCKER_CERTS_ENV = "IMGPACK_DOCKER_CERTS_DIR"
DOCKER_CERTS_DIR = "/etc/docker/certs.d"
Scope = tuple[str, ...]

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


class GaveUp(TransferError):
    """A request failed on every attempt the transport allows; retrying it again is pointless."""


def raise_for_exhausted(resp: requests.Response, what: str) -> None:
    """Turn a final retryable status (5xx, 429) into :class:`GaveUp`; other failures stay with the caller."""
    if resp.status_code in RETRY_STATUSES:
        raise GaveUp(f"{what} answered {describe_response(resp)} on every attempt")


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


def registry_errors(resp: requests.Response) -> list[tuple[str, str]]:
    """The (code, message) pairs of a registry error body, if it has one."""
    try:
        body = resp.json() if resp.content and len(resp.content) < 65536 else None
    except (ValueError, requests.RequestException):
        return []
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return []
    out = []
    for err in body["errors"][:3]:
        if isinstance(err, dict):
            out.append((str(err.get("code", "?")), str(err.get("message", ""))))
    return out


def describe_response(resp: requests.Response) -> str:
    """``HTTP 400 DIGEST_INVALID: message`` from a registry error body, without echoing headers."""
    text = f"HTTP {resp.status_code}"
    parts = [f"{code}: {message}".strip() for code, message in registry_errors(resp)]
    if parts:
        text += " " + "; ".join(parts)
    return text


@dataclass
class TransportOptions:
    """Knobs for one registry client; defaults suit loopback and cloud registries alike."""

    insecure: bool = False
    max_requests: int = 8
    max_streams: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: A CA bundle to trust (beyond the system's), as ``--ca-file`` gives it.
    ca_file: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def cancel(self) -> threading.Event:
        return self.retry.cancel


def certs_dir() -> Path:
    return Path(os.environ.get(DOCKER_CERTS_ENV) or DOCKER_CERTS_DIR)


def _combined_bundle(base: str | None, extras: list[Path]) -> str:
    """One PEM file: the base trust (``base``, else requests' default bundle) plus ``extras`` — so a private CA
    for one registry does not make blob storage elsewhere (S3 behind a redirect) untrusted. The file is named by
    its content, so every client and every run shares one copy."""
    import hashlib
    import tempfile

    parts = [Path(base or requests.certs.where()).read_bytes()]
    for extra in extras:
        try:
            parts.append(extra.read_bytes())
        except OSError as exc:
            raise ImgpackError(f"CA certificate {extra}: cannot read it ({exc.strerror})") from None
    data = b"\n".join(p.rstrip(b"\n") for p in parts) + b"\n"
    path = Path(tempfile.gettempdir()) / f"imgpack-ca-{hashlib.sha256(data).hexdigest()[:24]}.pem"
    if not path.is_file() or path.read_bytes() != data:
        scratch = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        scratch.write_bytes(data)
        os.replace(scratch, path)
    return str(path)


def tls_settings(host: str, ca_file: str | None) -> tuple[str | bool, tuple[str, str] | None]:
    """(``verify`` for requests, client certificate pair) for ``host``.

    ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE`` replace the default trust, as they do for other clients;
    ``--ca-file`` and docker's ``certs.d/<host>/ca.crt`` are added to whichever trust is in force.
    """
    base = None
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        candidate = os.environ.get(name)
        if candidate:
            if not Path(candidate).is_file():
                raise ImgpackError(f"{name}={candidate}: CA bundle does not exist")
            base = candidate
            break
    extras: list[Path] = []
    if ca_file:
        if not Path(ca_file).is_file():
            raise ImgpackError(f"--ca-file {ca_file}: CA bundle does not exist")
        extras.append(Path(ca_file))
    certs = certs_dir() / host
    client = None
    if certs.is_dir():
        if (certs / "ca.crt").is_file():
            extras.append(certs / "ca.crt")
        cert, key = certs / "client.cert", certs / "client.key"
        if cert.is_file() and key.is_file():
            client = (str(cert), str(key))
        elif cert.is_file() or key.is_file():
            raise ImgpackError(f"{certs}: client.cert and client.key go together; only one is there")
    verify: str | bool = _combined_bundle(base, extras) if extras else (base or True)
    return verify, client


def tls_failure(host: str, exc: BaseException) -> TransferError | None:
    """A clear error for a TLS failure (untrusted certificate, refused client certificate), else None."""
    text = repr(exc)
    if "SSL" not in text and "certificate" not in text.lower():
        return None
    match = re.search(r"\[SSL: ?[A-Z_0-9]*\] ?([^('\"\\]+)", text)
    reason = match.group(1).strip() if match else "TLS handshake failed"
    where = certs_dir() / host
    if "verify failed" in reason or "CERTIFICATE_VERIFY_FAILED" in text:
        return TransferError(f"{host}: the registry's TLS certificate is not trusted ({reason}); if it uses a"
                             f" private CA, trust it with --ca-file PEM, SSL_CERT_FILE=PEM or {where}/ca.crt")
    if "alert" in reason or "certificate required" in reason:
        return TransferError(f"{host}: the registry refused the TLS handshake ({reason}); if it requires a client"
                             f" certificate, put it in {where}/client.cert and {where}/client.key")
    return TransferError(f"{host}: TLS failed ({reason})")


@dataclass
class _Token:
    value: str
    expires_at: float


class Authorizer:
    """Turns credentials plus the registry's challenge into ``Authorization`` headers.

    The scheme is learned from the first 401. Bearer tokens are cached per scope and fetched ahead of the
    request once the realm is known, so concurrent workers share one token fetch.
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
        if cred.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token, "client_id": "imgpack",
                    "access_type": "online"}
            if challenge.service:
                form["service"] = challenge.service
            if scopes:
                form["scope"] = " ".join(scopes)
            method, url, headers, body = "POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, \
                urlencode(form).encode()
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
            method, body = "GET", None
        try:
            resp = self.client.exchange(method, url, headers=headers, body=body,
                                        what=f"token service {safe_url(realm)}")
        except GaveUp as exc:
            raise TransferError(f"{host}: token service {safe_url(realm)} unreachable: {exc}") from None
        if resp.status_code in (401, 403):
            who = f"credentials from {cred.source}" if not cred.anonymous else "anonymous access"
            raise AuthError(f"{host}: token service refused {who} for {' '.join(scopes) or 'the registry'}")
        if resp.status_code != 200:
            raise TransferError(f"{host}: token service {safe_url(realm)} answered {describe_response(resp)}")
        try:
            body_json = resp.json()
        except ValueError:
            raise AuthError(f"{host}: token service {safe_url(realm)} returned malformed JSON") from None
        value = body_json.get("token") or body_json.get("access_token") if isinstance(body_json, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthError(f"{host}: token service {safe_url(realm)} returned no token")
        try:
            lifetime = float(body_json.get("expires_in") or 60)
        except (TypeError, ValueError):
            lifetime = 60.0
        # Refresh a little early so a token does not expire between fetch and use.
        margin = min(10.0, lifetime * 0.1)
        return _Token(value=value, expires_at=time.monotonic() + max(1.0, lifetime - margin))


class _ThreadSessions(threading.local):
    session: requests.Session | None = None


class RegistryClient:
    """Everything needed to talk to one registry host."""

    def __init__(self, host: str, credential: Credential | None = None, options: TransportOptions | None = None,
                 api_host: str | None = None):
        self.host = host
        #: Where the API really lives (Docker Hub's is registry-1.docker.io); credentials stay keyed by ``host``.
        self.api_host = api_host or host
        self.options = options or TransportOptions()
        self.retry = self.options.retry
        self.scheme = "http" if is_loopback(self.api_host) or self.options.insecure else "https"
        self.base_url = f"{self.scheme}://{self.api_host}"
        self.authorizer = Authorizer(self, credential or ANONYMOUS)
        self.limit = AdaptiveLimit(self.options.max_requests)
        self.stream_slots = threading.BoundedSemaphore(max(1, self.options.max_streams))
        self.verify, self.client_cert = tls_settings(self.api_host, self.options.ca_file)
        self._local = _ThreadSessions()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._proxies: dict[str, dict[str, str]] = {}

    def session(self) -> requests.Session:
        """This thread's session; created on first use and closed by :meth:`close`."""
        session = self._local.session
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no ~/.netrc credentials leaking to other hosts; proxies are set per request
            adapter = _BigBlockAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            session.verify = self.verify
            if self.client_cert:
                session.cert = self.client_cert
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def proxies_for(self, url: str) -> dict[str, str]:
        """The proxies the environment names for ``url``'s origin, read once per origin: the lookup walks all of
        ``os.environ`` twice, which cost more CPU than the rest of a small blob's GET."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        found = self._proxies.get(origin)
        if found is None:
            found = self._proxies[origin] = requests.utils.get_environ_proxies(url)
        return found

    def url(self, path: str) -> str:
        return path if "://" in path else urljoin(self.base_url + "/", path.lstrip("/"))

    def _is_registry(self, url: str) -> bool:
        return urlsplit(url).netloc.lower() == self.api_host.lower()

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
                proxies=self.proxies_for(url),
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
            if not self._is_registry(target):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise TransferError(f"{self.host}: too many redirects for {safe_url(url)}")

    def exchange(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
                 what: str, stream: bool = False) -> requests.Response:
        """An unauthenticated request under the retry policy (token services, probes)."""
        return self._with_retries(method, url, what,
                                  lambda: self._send(method, url, dict(headers or {}), body, stream, None), True)

    def _with_retries(self, method: str, url: str, what: str, attempt_fn: Callable[[], requests.Response],
                      retry: bool) -> requests.Response:
        policy = self.retry
        started = time.monotonic()
        attempt = 0
        while True:
            policy.check_cancel()
            try:
                with self.limit.slot():
                    resp = attempt_fn()
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                tls = tls_failure(self.host, exc) if isinstance(exc, requests.ConnectionError) else None
                if tls is not None:
                    raise tls from None  # a certificate problem does not heal on retry
                wait = policy.backoff(attempt)
                if retry and policy.attempts_for(started, attempt, wait):
                    policy.sleep(wait)
                    attempt += 1
                    continue
                raise GaveUp(f"{method} {safe_url(url)} failed after {attempt + 1} attempt(s):"
                             f" {type(exc).__name__}") from None
            if resp.status_code in THROTTLE_STATUSES:
                self.limit.throttle()
            elif resp.status_code < 400:
                self.limit.success()
            if retry and resp.status_code in policy.statuses:
                wait = policy.delay(attempt, resp.headers.get("Retry-After"))
                if policy.attempts_for(started, attempt, wait, throttled_answer(resp.status_code,
                                                                                resp.headers.get("Retry-After"))):
                    resp.close()
                    policy.sleep(wait)
                    attempt += 1
                    continue
            return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: Scope = (),
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | bytes | ChunkReader | None = None,
        stream: bool = False,
        retry: bool = True,
        timeout: float | None = None,
    ) -> requests.Response:
        """Send a request with auth and retries; returns the final response whatever its status.

        ``body`` is bytes or a zero-argument callable producing a fresh body, so the request can be replayed
        after a 401 or a retryable failure; a :class:`ChunkReader` streams once (only with ``retry=False``).
        Connection failures become :class:`GaveUp` after the last attempt;
        401/403 become :class:`AuthError`.
        """
        url = self.url(path)
        return self._with_retries(
            method, url, f"{method} {safe_url(url)}",
            lambda: self._authorized(method, url, scope, headers or {}, body, stream, timeout), retry,
        )

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
        if self._is_registry(url):
            sent = self.authorizer.header(scope)
            if sent:
                request_headers["Authorization"] = sent
        resp = self._send(method, url, request_headers, make_body(), stream, timeout)
        if resp.status_code == 401 and self._is_registry(url):
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
