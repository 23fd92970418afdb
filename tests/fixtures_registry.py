"""Real registries for tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

Three configurations: open, htpasswd (bcrypt) and token auth (a small token server here signs
RS256 JWTs with an ``x5c`` header; the registry trusts the certificate via ``rootcertbundle``).
A fault-injecting proxy sits between client and registry when a test wants failures.

Every wait here is bounded in time; servers are stopped when their fixture ends.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

REGISTRY_BIN = shutil.which("docker-registry")
USER, PASSWORD = "alice", "s3cret-pass-1"
TOKEN_SERVICE, TOKEN_ISSUER = "imgpack-test-registry", "imgpack-test-issuer"
STARTUP_TIMEOUT_S = 15.0

needs_registry = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry (Debian package) not installed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _yaml(value: object, indent: int = 0) -> str:
    """Tiny YAML emitter for the registry config (nested dicts, lists of scalars, scalars)."""
    pad = "  " * indent
    lines: list[str] = []
    assert isinstance(value, dict)
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1))
        elif isinstance(item, list):
            lines.append(f"{pad}{key}: [{', '.join(json.dumps(v) for v in item)}]")
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines)


@dataclass
class RegistryServer:
    """A running docker-registry process."""

    root: Path
    port: int
    process: subprocess.Popen
    auth: str  # "open" | "htpasswd" | "token"
    token_server: TokenServer | None = None
    #: The name clients use (a non-loopback name is reached over HTTPS by imgpack).
    hostname: str = "127.0.0.1"
    tls: bool = False

    @property
    def host(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def log_text(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def blob_files(self) -> list[Path]:
        return sorted((self.root / "storage").rglob("data"))


def start_registry(root: Path, auth: str = "open", token_server: TokenServer | None = None, *,
                   tls: ServerTls | None = None, remote_url: str | None = None,
                   access_log: bool = False) -> RegistryServer:
    """Start docker-registry with storage under ``root``; wait until /v2/ answers.

    ``tls`` serves HTTPS with that certificate (and requires client certificates when it names client CAs);
    ``remote_url`` makes it a pull-through cache of that registry (``proxy: remoteurl:``); ``access_log`` keeps
    distribution's access log in ``registry.log`` so tests can count the requests it served.
    """
    if REGISTRY_BIN is None:
        pytest.fail("docker-registry is not installed: `apt-get install docker-registry` (.ci/setup does this)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict = {
        "version": 0.1,
        "log": {"level": "info" if access_log else "error", "accesslog": {"disabled": not access_log}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    if auth == "htpasswd":
        import bcrypt

        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        (root / "htpasswd").write_text(f"{USER}:{hashed}\n")
        config["auth"] = {"htpasswd": {"realm": "imgpack-test", "path": str(root / "htpasswd")}}
    elif auth == "token":
        assert token_server is not None
        (root / "token-cert.pem").write_bytes(token_server.cert_pem)
        config["auth"] = {
            "token": {
                "realm": f"{token_server.url}/token",
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(root / "token-cert.pem"),
            }
        }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        if tls.client_ca is not None:
            config["http"]["tls"]["clientcas"] = [str(tls.client_ca)]
    if remote_url is not None:
        config["proxy"] = {"remoteurl": remote_url}
    (root / "config.yml").write_text(_yaml(config) + "\n")
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    log.close()
    server = RegistryServer(root=root, port=port, process=process, auth=auth, token_server=token_server,
                            hostname=tls.hostname if tls else "127.0.0.1", tls=tls is not None)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()[-2000:]}")
        try:
            if tls is not None:
                cert = (str(tls.client_cert), str(tls.client_key)) if tls.client_ca is not None else None
                ok = requests.get(f"https://127.0.0.1:{port}/v2/", timeout=1, verify=str(tls.ca), cert=cert)
            else:
                ok = requests.get(f"{server.url}/v2/", timeout=1)
            if ok.status_code in (200, 401):
                return server
        except requests.RequestException:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("docker-registry did not come up in time")


# ---------------------------------------------------------------------------------------------
# A private CA, server and client certificates (for TLS registries)


def tls_hostname() -> str | None:
    """A name for this machine that resolves to a local address but is not a loopback *name*, so imgpack
    reaches a registry under it over HTTPS (it uses plain HTTP for localhost and 127.0.0.0/8)."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return None
    if name == "localhost" or name.endswith(".localhost") or not address.startswith("127."):
        return None
    return name


needs_tls_hostname = pytest.mark.skipif(tls_hostname() is None,
                                        reason="this machine's host name does not resolve to a loopback address")


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a private CA, a server certificate it signed and a client certificate it signed."""

    hostname: str
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    client_ca: Path | None = None  # set: the registry requires client certificates signed by it


def make_pki(directory: Path, hostname: str) -> ServerTls:
    """A CA and the certificates of a server named ``hostname`` (and 127.0.0.1) and of one client."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgpack test private CA")])
    ca = (builder("imgpack test private CA", ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(subject: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName]) -> tuple[x509.Certificate,
                                                                                                  ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(subject, ca.subject, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(hostname, ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client, client_key = leaf("imgpack test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return ServerTls(
        hostname=hostname,
        ca=write_cert(ca, directory / "ca.crt"),
        cert=write_cert(server, directory / "server.crt"),
        key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client, directory / "client.cert"),
        client_key=write_key(client_key, directory / "client.key"),
    )


# ---------------------------------------------------------------------------------------------
# Token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class LoopbackHTTPServer:
    """A threaded stdlib HTTP server on a free loopback port, for the test servers below."""

    _httpd: ThreadingHTTPServer

    def _serve(self, handler: type[BaseHTTPRequestHandler],
               server: type[ThreadingHTTPServer] = ThreadingHTTPServer) -> None:
        self._httpd = server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class TokenServer(LoopbackHTTPServer):
    """Issues registry JWTs the way distribution's token auth expects them.

    Users in ``users`` get every action they ask for; anonymous callers get ``pull`` only when
    ``anonymous_pull`` is set.  ``requests`` records (user, scopes) per token issued.
    """

    def __init__(self, users: dict[str, str] | None = None, lifetime_s: int = 300, anonymous_pull: bool = False):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users or {USER: PASSWORD})
        self.refresh_tokens: dict[str, str] = {"refresh-" + u: u for u in self.users}
        self.lifetime_s = lifetime_s
        self.anonymous_pull = anonymous_pull
        self.requests: list[tuple[str | None, list[str]]] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgpack test token signer")])
        now = time.time()
        import datetime as dt

        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._serve(self._handler())

    def sign(self, user: str | None, access: list[dict]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode("ascii")]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user or "",
            "aud": TOKEN_SERVICE,
            "exp": now + self.lifetime_s,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = actions if user else (["pull"] if self.anonymous_pull and "pull" in actions else [])
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _issue(self, user: str | None, scopes: list[str], service: str | None) -> None:
                if service != TOKEN_SERVICE:
                    self._reply(400, {"error": "unknown service"})
                    return
                server.requests.append((user, scopes))
                token = server.sign(user, server.grant(user, scopes))
                self._reply(200, {"token": token, "access_token": token, "expires_in": server.lifetime_s})

            def do_GET(self) -> None:  # noqa: N802
                parsed = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(name) != password:
                        self._reply(401, {"error": "bad credentials"})
                        return
                    user = name
                self._issue(user, query.get("scope", []), (query.get("service") or [None])[0])

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                refresh = (form.get("refresh_token") or [""])[0]
                user = server.refresh_tokens.get(refresh)
                if (form.get("grant_type") or [""])[0] != "refresh_token" or user is None:
                    self._reply(401, {"error": "invalid refresh token"})
                    return
                scopes = " ".join(form.get("scope", [])).split()
                self._issue(user, scopes, (form.get("service") or [None])[0])

        return Handler


# ---------------------------------------------------------------------------------------------
# Fault-injecting proxy


@dataclass
class Fault:
    """Applied to the next ``times`` requests whose method and path match.

    kinds: ``status`` (answer ``arg`` without forwarding), ``429`` (Retry-After: ``arg``),
    ``reset`` (half the body then TCP RST), ``truncate`` (half the body then close),
    ``flip`` (one byte changed), ``stall`` (half the body then sleep ``arg`` s), ``throttle``
    (body at ``arg`` bytes/s), ``redirect`` (307 to the proxy's blob store on another host name).
    """

    method: str
    path: str
    kind: str
    times: int = 1
    arg: float = 0
    hits: int = 0


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]
    host: str
    size: int = 0  # request body bytes
    status: int = 0  # what the proxy answered
    in_flight: int = 0  # requests the proxy was handling when this one arrived (itself included)
    at: float = 0.0  # time.monotonic() on arrival


#: Amazon ECR's answer to a manifest with too many layers, byte for byte.
ECR_LAYER_LIMIT = (b'{"errors":[{"code":"UNSUPPORTED","message":"Invalid parameter at \'ImageManifest\' failed to'
                   b' satisfy constraint: \'Limit on number of layers per image exceeded\'"}]}')


HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


@dataclass
class FaultProxy(LoopbackHTTPServer):
    """HTTP proxy in front of a registry that injects faults and logs requests."""

    upstream: RegistryServer
    upstream_auth: str | None = None
    faults: list[Fault] = field(default_factory=list)
    log: list[LoggedRequest] = field(default_factory=list)
    #: Refuse manifest PUTs with more layers than this, as Amazon ECR does (405 and its error body).
    layer_cap: int | None = None
    #: (requests, seconds): blob requests beyond this many per sliding window are answered 429, as GHCR's
    #: layers-per-minute budget is (scaled down to seconds); ``retry_after`` is then sent as Retry-After.
    budget: tuple[int, float] | None = None
    retry_after: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._budget_used: list[float] = []
        self._serve(self._handler())

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, method: str, path: str, kind: str, times: int = 1, arg: float = 0) -> Fault:
        fault = Fault(method, path, kind, times, arg)
        with self._lock:
            self.faults.append(fault)
        return fault

    def blob_bytes_sent(self) -> int:
        """Bytes the client uploaded as blob content (PUT/PATCH bodies of upload sessions)."""
        with self._lock:
            return sum(r.size for r in self.log if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.path)

    def _over_budget(self, path: str) -> bool:
        if self.budget is None or "/blobs/" not in path:
            return False
        count, window = self.budget
        now = time.monotonic()
        with self._lock:
            self._budget_used = [t for t in self._budget_used if now - t < window]
            if len(self._budget_used) >= count:
                return True
            self._budget_used.append(now)
            return False

    def _over_cap(self, method: str, path: str, body: bytes) -> bool:
        if self.layer_cap is None or method != "PUT" or "/manifests/" not in path:
            return False
        try:
            layers = json.loads(body).get("layers") or []
        except (ValueError, AttributeError):
            return False
        return len(layers) > self.layer_cap

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.method == method and re.search(fault.path, path):
                    fault.hits += 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self, method: str, path: str, body: bytes, extra: dict[str, str] | None = None):
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers.update(extra or {})
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read() if method != "HEAD" else b""
                conn.close()
                return resp.status, resp.getheaders(), data

            def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, fault: Fault | None):
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length")
                if self.command != "HEAD" or length is None:
                    length = str(len(data))
                self.send_header("Content-Length", length)
                kind = fault.kind if fault else None
                if kind in ("reset", "truncate", "stall"):
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if kind == "flip" and data:
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
                if kind in ("reset", "truncate", "stall"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if kind == "stall":
                        time.sleep(fault.arg or 5)
                    if kind == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if kind == "throttle":
                    step = max(1, int(fault.arg) // 20)
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start : start + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(data)

            def send_response(self, code: int, message: str | None = None) -> None:
                entry = getattr(self, "_entry", None)
                if entry is not None:
                    entry.status = code
                super().send_response(code, message)

            def _handle(self) -> None:
                with proxy._lock:
                    proxy._in_flight += 1
                    in_flight = proxy._in_flight
                try:
                    self._handle_counted(in_flight)
                finally:
                    with proxy._lock:
                        proxy._in_flight -= 1

            def _handle_counted(self, in_flight: int) -> None:
                method, path = self.command, self.path
                host = self.headers.get("Host", "")
                body = self._body()
                self._entry = LoggedRequest(method, path, dict(self.headers.items()), host, len(body), 0, in_flight,
                                            time.monotonic())
                with proxy._lock:
                    proxy.log.append(self._entry)
                if proxy._over_cap(method, path, body):
                    self._send(405, [("Content-Type", "application/json")], ECR_LAYER_LIMIT, None)
                    return
                if proxy._over_budget(path):
                    headers = [("Content-Type", "application/json")]
                    if proxy.retry_after is not None:
                        headers.append(("Retry-After", proxy.retry_after))
                    self._send(429, headers, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"rate limit"}]}', None)
                    return
                if path.startswith("/_blobstore/"):
                    real = path[len("/_blobstore") :].split("?", 1)[0]
                    extra = {"Authorization": proxy.upstream_auth} if proxy.upstream_auth else {}
                    status, headers, data = self._forward(method, real, b"", extra)
                    self._send(status, headers, data, None)
                    return
                fault = proxy._match(method, path)
                if fault and fault.kind == "status":
                    self._send(int(fault.arg), [("Content-Type", "application/json")], b'{"errors":[]}', None)
                    return
                if fault and fault.kind == "429":
                    self._send(429, [("Retry-After", str(int(fault.arg)))], b"", None)
                    return
                if fault and fault.kind == "redirect":
                    location = f"http://localhost:{proxy.port}/_blobstore{path}?X-Amz-Signature=s3kr1t"
                    self._send(307, [("Location", location)], b"", None)
                    return
                status, headers, data = self._forward(method, path, body)
                self._send(status, headers, data, fault)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815

        return Handler


# ---------------------------------------------------------------------------------------------
# A forwarding proxy (what HTTPS_PROXY / HTTP_PROXY point at)


@dataclass
class ProxiedRequest:
    method: str
    target: str  # an absolute URL, or host:port for CONNECT
    headers: dict[str, str]


class ForwardProxy(LoopbackHTTPServer):
    """A real forward proxy: absolute-URI requests are forwarded over plain HTTP, ``CONNECT host:port`` opens a
    TCP tunnel (the TLS inside stays end-to-end). ``log`` records what each client asked for, headers included."""

    def __init__(self) -> None:
        self.log: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._serve(self._handler())

    def connects(self) -> list[str]:
        with self._lock:
            return [r.target for r in self.log if r.method == "CONNECT"]

    def forwarded(self) -> list[ProxiedRequest]:
        with self._lock:
            return [r for r in self.log if r.method != "CONNECT"]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _record(self) -> None:
                with proxy._lock:
                    proxy.log.append(ProxiedRequest(self.command, self.path, dict(self.headers.items())))

            def do_CONNECT(self) -> None:  # noqa: N802
                self._record()
                host, _, port = self.path.rpartition(":")
                try:
                    upstream = socket.create_connection((host, int(port)), timeout=10)
                except (OSError, ValueError):
                    self.send_error(502)
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                sockets = [self.connection, upstream]
                try:
                    while True:
                        readable, _, _ = select.select(sockets, [], [], 30)
                        if not readable:
                            break
                        for sock in readable:
                            data = sock.recv(1 << 16)
                            if not data:
                                return
                            (upstream if sock is self.connection else self.connection).sendall(data)
                except OSError:
                    pass
                finally:
                    upstream.close()
                    self.close_connection = True

            def _forward(self) -> None:
                self._record()
                url = urllib.parse.urlsplit(self.path)
                if url.scheme != "http" or not url.hostname:
                    self.send_error(400, "absolute http:// URL expected")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                path = url.path + (f"?{url.query}" if url.query else "")
                try:
                    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
                    conn.request(self.command, path or "/", body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read() if self.command != "HEAD" else b""
                    conn.close()
                except OSError:
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                given = resp.getheader("Content-Length")
                self.send_header("Content-Length", given if self.command == "HEAD" and given else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815

        return Handler


# ---------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-open"), "open")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    pytest.importorskip("bcrypt")
    server = start_registry(tmp_path_factory.mktemp("registry-htpasswd"), "htpasswd")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-token"), "token", token_server)
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(open_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(open_registry)
    yield proxy
    proxy.stop()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    yield proxy
    proxy.stop()


@pytest.fixture
def no_network_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy, CA-bundle or registries.conf settings from the machine: each test sets what it tests."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "no_proxy",
                 "all_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "no-certs.d"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("IMGPACK_DOCKER_CERTS_DIR", str(empty))
    conf = tmp_path / "no-registries.conf"
    conf.write_text("")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))


@pytest.fixture
def isolated_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point imgpack's and docker's credential files at empty temp dirs; clear CI variables."""
    config = tmp_path / "imgpack-config"
    docker = tmp_path / "docker-config"
    config.mkdir()
    docker.mkdir()
    monkeypatch.setenv("IMGPACK_CONFIG_DIR", str(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    for name in ("IMGPACK_REGISTRY", "IMGPACK_REGISTRY_USER", "IMGPACK_REGISTRY_PASSWORD", "IMGPACK_REGISTRY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return config


COMPONENT_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}


def write_mini_model(directory: Path, seeds: dict[str, int], tensors: int = 6, rows: int = 64) -> Path:
    """A small diffusers-layout model: per component ``tensors`` F32 tensors drawn from ``seeds[component]``.

    Components with the same seed produce identical blobs, which is how tests model shared components.
    """
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "ImgpackTestPipeline"}  # not a real architecture: only generic checks apply
    for component, seed in seeds.items():
        index[component] = ["diffusers", "Component"]
        (directory / component).mkdir(exist_ok=True)
        (directory / component / "config.json").write_text(json.dumps({"component": component, "seed": seed}))
        rng = np.random.default_rng(seed)
        arrays = {
            f"blocks.{i}.weight": rng.standard_normal((rows, 32 + i), dtype=np.float32) for i in range(tensors)
        }
        save_file(arrays, str(directory / component / COMPONENT_FILES[component]))
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


#: Tensor counts shaped like Z-Image-Turbo's (its transformer alone has 521): 1,161 tensor layers in all.
WIDE_COUNTS = {"transformer": 521, "text_encoder": 398, "vae": 242}


def write_wide_model(directory: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A diffusers-layout model with many tiny tensors (a few dozen bytes each): a layer count like a real
    model's, built in well under a second. Per-component seeds differ, so no two tensors share a blob."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": "ImgpackTestPipeline"}
    for n, (component, count) in enumerate((counts or WIDE_COUNTS).items()):
        index[component] = ["diffusers", "Component"]
        (directory / component).mkdir(exist_ok=True)
        (directory / component / "config.json").write_text(json.dumps({"component": component, "count": count}))
        rng = np.random.default_rng(seed * 100 + n)
        arrays = {f"layers.{i}.weight": rng.standard_normal((2, 3), dtype=np.float32) for i in range(count)}
        save_file(arrays, str(directory / component / COMPONENT_FILES[component]))
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture
def make_model(tmp_path: Path):
    """``make_model(store, ref, seeds, fmt="oci", **kw)`` creates a mini model in ``store``; returns its digest."""
    from imgpack.packager.create import create_model

    counter = iter(range(10_000))

    def make(store, ref: str, seeds: dict[str, int], fmt: str = "oci", **kwargs) -> str:
        directory = write_mini_model(tmp_path / f"model-src-{next(counter)}", seeds, **kwargs)
        return create_model(store, ref, directory, fmt=fmt).digest

    return make


def basic_header(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


__all__ = [
    "PASSWORD",
    "TOKEN_SERVICE",
    "USER",
    "ECR_LAYER_LIMIT",
    "Fault",
    "FaultProxy",
    "ForwardProxy",
    "ServerTls",
    "forward_proxy",
    "make_pki",
    "needs_tls_hostname",
    "no_network_env",
    "tls_hostname",
    "RegistryServer",
    "TokenServer",
    "basic_header",
    "fault_proxy",
    "free_port",
    "htpasswd_registry",
    "isolated_credentials",
    "make_model",
    "write_mini_model",
    "write_wide_model",
    "WIDE_COUNTS",
    "needs_registry",
    "open_registry",
    "start_registry",
    "token_registry",
    "token_server",
]
