"""Find registry credentials: environment, imgpack's own file, then docker's config.json.

Lookup order for a registry host:

1. ``IMGPACK_REGISTRY_TOKEN`` (a ready bearer token) or ``IMGPACK_REGISTRY_USER`` +
   ``IMGPACK_REGISTRY_PASSWORD``; when ``IMGPACK_REGISTRY`` is set they apply to that host only,
   so a CI secret is never offered to another registry.
2. imgpack's credentials file (``imgpack login``), ``$IMGPACK_CONFIG_DIR/credentials.json`` or
   ``$XDG_CONFIG_HOME/imgpack/credentials.json`` (default ``~/.config/imgpack``), mode 0600.
3. docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``): ``credHelpers[host]``, then
   ``auths[host]`` (``auth`` / ``identitytoken``), then the global ``credsStore`` helper.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from imgpack.schemas.errors import AuthError, ImgpackError
from imgpack.store.atomic import atomic_file

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
HELPER_TIMEOUT_S = 30


@dataclass(frozen=True)
class Credential:
    """Secrets for one registry; ``repr`` never shows them."""

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    registry_token: str | None = None
    source: str = "anonymous"

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def __repr__(self) -> str:
        user = self.username or "-"
        return f"Credential(user={user!r}, source={self.source!r})"

    __str__ = __repr__


ANONYMOUS = Credential()


def normalize_host(key: str) -> str:
    """Reduce a config.json key (maybe ``https://host/v1/``) to ``host[:port]``."""
    key = key.strip()
    if "://" in key:
        key = urlsplit(key).netloc
    key = key.split("/", 1)[0].lower()
    if key in DOCKER_HUB_KEYS or key == "index.docker.io":
        return "docker.io"
    return key


def config_dir() -> Path:
    if os.environ.get("IMGPACK_CONFIG_DIR"):
        return Path(os.environ["IMGPACK_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "imgpack"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImgpackError(f"{path}: cannot read credentials file: {exc.strerror}") from None
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise ImgpackError(f"{path}: invalid JSON at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ImgpackError(f"{path}: expected a JSON object")
    return data


def _decode_auth(value: str, path: Path, host: str) -> tuple[str, str]:
    try:
        text = base64.b64decode(value, validate=False).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ImgpackError(f"{path}: auths[{host!r}].auth is not base64 of 'user:password'") from None
    if ":" not in text:
        raise ImgpackError(f"{path}: auths[{host!r}].auth is not base64 of 'user:password'")
    user, password = text.split(":", 1)
    return user, password


def _find_entry(mapping: dict, host: str) -> object | None:
    for key, value in mapping.items():
        if isinstance(key, str) and normalize_host(key) == host:
            return value
    return None


def _from_auths(auths: dict, host: str, path: Path, source: str) -> Credential | None:
    entry = _find_entry(auths, host)
    if not isinstance(entry, dict):
        return None
    if entry.get("identitytoken"):
        return Credential(
            username=entry.get("username") or "<token>", identity_token=entry["identitytoken"], source=source
        )
    if entry.get("auth"):
        user, password = _decode_auth(entry["auth"], path, host)
        return Credential(username=user, password=password, source=source)
    if entry.get("username") and entry.get("password"):
        return Credential(username=entry["username"], password=entry["password"], source=source)
    return None


def run_credential_helper(helper: str, host: str) -> Credential | None:
    """Ask ``docker-credential-<helper> get`` for a host; None when it has nothing stored."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        raise AuthError(f"credential helper docker-credential-{helper} (configured for {host}) is not on PATH")
    # Helpers are keyed by what `docker login` stored, usually the bare host; docker hub is special.
    server = "https://index.docker.io/v1/" if host == "docker.io" else host
    try:
        proc = subprocess.run(
            [exe, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper docker-credential-{helper} timed out for {host}") from None
    if proc.returncode != 0:
        message = proc.stdout.decode(errors="replace").strip() or proc.stderr.decode(errors="replace").strip()
        if "not found" in message.lower() or "no credentials" in message.lower():
            return None
        raise AuthError(f"credential helper docker-credential-{helper} failed for {host} (exit {proc.returncode})")
    try:
        data = json.loads(proc.stdout)
        user, secret = data.get("Username", ""), data.get("Secret", "")
    except (json.JSONDecodeError, AttributeError):
        raise AuthError(f"credential helper docker-credential-{helper} returned malformed output for {host}") from None
    if not secret:
        return None
    source = f"docker-credential-{helper}"
    if user == "<token>":
        return Credential(username=user, identity_token=secret, source=source)
    return Credential(username=user, password=secret, source=source)


def _from_environment(host: str) -> Credential | None:
    only_for = os.environ.get("IMGPACK_REGISTRY")
    if only_for and normalize_host(only_for) != host:
        return None
    token = os.environ.get("IMGPACK_REGISTRY_TOKEN")
    if token:
        return Credential(registry_token=token, source="IMGPACK_REGISTRY_TOKEN")
    user = os.environ.get("IMGPACK_REGISTRY_USER")
    password = os.environ.get("IMGPACK_REGISTRY_PASSWORD")
    if user and password is not None:
        return Credential(username=user, password=password, source="IMGPACK_REGISTRY_USER")
    return None


def lookup(host: str) -> Credential:
    """Return the credential to use for ``host`` (anonymous when nothing is configured)."""
    host = normalize_host(host)
    found = _from_environment(host)
    if found:
        return found
    own = credentials_path()
    found = _from_auths(_read_json(own).get("auths") or {}, host, own, source=str(own))
    if found:
        return found
    docker_path = docker_config_path()
    docker = _read_json(docker_path)
    helpers = docker.get("credHelpers") or {}
    helper = _find_entry(helpers, host) if isinstance(helpers, dict) else None
    if isinstance(helper, str) and helper:
        found = run_credential_helper(helper, host)
        if found:
            return found
    found = _from_auths(docker.get("auths") or {}, host, docker_path, source=str(docker_path))
    if found:
        return found
    store = docker.get("credsStore")
    if isinstance(store, str) and store:
        found = run_credential_helper(store, host)
        if found:
            return found
    return ANONYMOUS


def _write_private_json(path: Path, data: dict) -> None:
    """Atomically replace ``path`` with ``data``; the file is created 0600 and never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(path, 0o600, durable=True) as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def store_login(host: str, username: str, password: str) -> Path:
    """Save ``username``/``password`` for ``host`` in imgpack's credentials file."""
    host = normalize_host(host)
    path = credentials_path()
    data = _read_json(path)
    auths = data.setdefault("auths", {})
    for key in [k for k in auths if normalize_host(k) == host]:
        del auths[key]
    auths[host] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode("ascii")}
    _write_private_json(path, data)
    return path


def remove_login(host: str) -> bool:
    """Forget ``host`` in imgpack's credentials file; False when nothing was stored."""
    host = normalize_host(host)
    path = credentials_path()
    data = _read_json(path)
    auths = data.get("auths") or {}
    keys = [k for k in auths if normalize_host(k) == host]
    if not keys:
        return False
    for key in keys:
        del auths[key]
    _write_private_json(path, data)
    return True
