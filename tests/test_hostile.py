"""Issue 15: what a hostile registry, archive, model folder, web page or shared volume can still do — one row each.

Every row of :data:`ROWS` reproduces one finding the way it was found: a hostile registry or archive server
written here (or a real ``docker-registry``), a bad model folder, a writer in another PID namespace, a small
tmpfs for a full disk. The runner takes a snapshot of the store (every file under its root but the lock files),
runs the attack through the real CLI, and checks the exit code, the phrases the error must say, that no
traceback came out, and that the store is exactly as before — or, for a row that is meant to change it, only
in the way the row allows. A future finding is one more :class:`Row`.

The server-side findings (#2, #8 and #9 server parts, #10) live in tests/test_server_http.py and
tests/test_server_memory.py; :data:`ELSEWHERE` names those tests and a test checks they still exist.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import zstandard
from fixtures_registry import REGISTRY_BIN, LoopbackHTTPServer, write_mini_model

from imgpack.schemas import spec
from imgpack.schemas.digest import sha256_bytes
from imgpack.store.store import Store

TESTS = Path(__file__).resolve().parent
REPO = "hostile/model"
LOCKS = {".imgpack/lock", ".imgpack/gc.lock"}
C1, CSI, BIDI, LSEP = "\u009b", "\x1b[", "\u202e", "\u2028"
UNSHARE = shutil.which("unshare")


# -- what a row is ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one command printed and returned; ``err`` is stderr decoded leniently, ``raw_err`` its bytes."""

    code: int
    err: str
    out: str = ""
    raw_err: bytes = b""


@dataclass(frozen=True)
class Row:
    """One finding: ``attack`` runs it against ``env`` and returns the command's outcome.

    ``setup`` runs before the store snapshot (state the attack needs: a kept partial, a broken old store);
    ``after`` runs once the checks passed (the way out the error names really works). ``gains`` is a regex of
    store paths the attack may add (resumable partials, blobs a failed transfer keeps); ``unchanged=False``
    leaves the store to the row's own checks (attacks that must succeed).
    """

    finding: str
    name: str
    attack: Callable[[Env], Outcome]
    code: int
    says: tuple[str, ...] = ()
    setup: Callable[[Env], None] | None = None
    after: Callable[[Env], None] | None = None
    unchanged: bool = True
    gains: str | None = None
    tmpfs_mib: int | None = None
    needs: Callable[[], str | None] | None = None

    @property
    def id(self) -> str:
        return f"{self.finding}-{self.name}"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under a store root with a digest of its content, lock files left out."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in LOCKS:
            continue
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# -- hostile servers ---------------------------------------------------------------------------------------------


Handler = Callable[[BaseHTTPRequestHandler, re.Match], None]


class QuietServer(ThreadingHTTPServer):
    """A loopback server whose clients hang up on it mid-answer by design: no tracebacks on our stderr."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class HostileRegistry(LoopbackHTTPServer):
    """The distribution API on loopback, serving what a row put in it and misbehaving where a route says so.

    ``manifests`` maps a tag or digest to (bytes, media type), ``blobs`` a digest to bytes; ``route`` installs a
    handler that answers matching requests instead (first match wins). Every request is logged.
    """

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.routes: list[tuple[str, re.Pattern, Handler]] = []
        self.log: list[tuple[str, str]] = []
        self._serve(self._handler(), QuietServer)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.address[1]}"

    def serve(self, model: Model, tag: str = "1") -> str:
        raw = model.raw()
        self.manifests[tag] = self.manifests[sha256_bytes(raw)] = (raw, model.document["mediaType"])
        self.blobs.update(model.blobs)
        return f"{self.host}/{REPO}:{tag}"

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(pattern), handler))

    def blob_gets(self, digest: str) -> int:
        return sum(1 for method, path in self.log if method == "GET" and path.endswith(f"/blobs/{digest}"))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                registry.log.append((self.command, self.path))
                for method, pattern, handler in registry.routes:
                    match = pattern.search(self.path)
                    if method in (self.command, "*") and match:
                        handler(self, match)
                        return
                path = self.path.split("?", 1)[0]
                if path == "/v2/":
                    reply(self, 200, b"{}")
                elif m := re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path):
                    found = registry.manifests.get(m.group(2))
                    if found is None:
                        reply(self, 404, error_body("MANIFEST_UNKNOWN", "manifest unknown"))
                    else:
                        reply(self, 200, found[0], {"Content-Type": found[1],
                                                    "Docker-Content-Digest": sha256_bytes(found[0])})
                elif m := re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", path):
                    data = registry.blobs.get(m.group(2))
                    if data is None:
                        reply(self, 404, error_body("BLOB_UNKNOWN", "blob unknown"))
                        return
                    start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
                    headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
                    reply(self, 206 if start else 200, data[start:], headers)
                else:
                    reply(self, 404, error_body("NAME_UNKNOWN", "not here"))

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815

        return H


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


def push_raw(registry_url: str, model: Model, tag: str = "1") -> str:
    """Upload a model's blobs and manifest exactly as they are (however broken) to a real registry."""
    for digest, data in model.blobs.items():
        start = requests.post(f"{registry_url}/v2/{REPO}/blobs/uploads/", timeout=10)
        assert start.status_code == 202, start.text
        location = requests.compat.urljoin(registry_url, start.headers["Location"])
        done = requests.put(location, params={"digest": digest}, data=data, timeout=30,
                            headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
    put = requests.put(f"{registry_url}/v2/{REPO}/manifests/{tag}", data=model.raw(), timeout=10,
                       headers={"Content-Type": model.document["mediaType"]})
    assert put.status_code == 201, put.text
    return f"{registry_url.removeprefix('http://')}/{REPO}:{tag}"


# -- models, stores and archives ------------------------------------------------------------------------------------


@dataclass
class Model:
    """A model as manifest document plus blobs, to be broken by a row and served, pushed, stored or saved."""

    document: dict
    blobs: dict[str, bytes]

    def raw(self) -> bytes:
        return json.dumps(self.document, indent=1).encode()

    def layer(self, name: str) -> dict:
        return next(layer for layer in self.document["layers"] if layer.get("name") == name)

    def header_layer(self, name: str = "transformer/diffusion_pytorch_model.safetensors") -> dict:
        return next(layer for layer in self.document["layers"]
                    if layer.get("name") == name and layer["mediaType"] == spec.SAFETENSORS_HEADER_MEDIA_TYPE)

    def blob(self, desc: dict) -> bytes:
        return self.blobs[desc["digest"]]

    def replace(self, desc: dict, data: bytes) -> None:
        """Give the descriptor ``desc`` new content (a digest-valid blob whose content is whatever ``data`` is)."""
        old = desc["digest"]
        if not any(d is not desc and d["digest"] == old for d in self.descriptors()):
            self.blobs.pop(old, None)
        desc["digest"], desc["size"] = sha256_bytes(data), len(data)
        self.blobs[desc["digest"]] = data

    def rename(self, desc: dict, name: str) -> None:
        desc["name"] = name
        desc.setdefault("annotations", {})[spec.TITLE_ANNOTATION] = name

    def descriptors(self) -> list[dict]:
        return [self.document["config"], *self.document["layers"]]

    def write_into(self, store: Store, name: str) -> str:
        """Store and index it as an old imgpack might have: blobs and manifest verbatim, no content checks."""
        from imgpack.schemas.graph import Descriptor

        for data in self.blobs.values():
            store.put_bytes(data)
        digest, size = store.put_bytes(self.raw())
        store.set_entry(name, Descriptor(self.document["mediaType"], digest, size))
        return digest


def model_of(store: Store, ref: str) -> Model:
    manifest = store.get_manifest(ref)
    return Model(json.loads(manifest.raw), {b.digest: store.read_blob(b.digest) for b in manifest.blobs})


def archive_of(model: Model, path: Path, scratch: Path) -> Path:
    """``imgpack save`` of ``model`` (written into a scratch store first, broken or not)."""
    from imgpack.registry.archive import save

    store = Store.open(scratch)
    model.write_into(store, "archived/model:1")
    save(store, ["archived/model:1"], path)
    return path


class Zeros(io.RawIOBase):
    """``size`` zero bytes as a readable stream: a huge but perfectly compressible archive member."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zeros_digest(size: int) -> str:
    hasher, chunk = hashlib.sha256(), bytes(1 << 24)
    for start in range(0, size, len(chunk)):
        hasher.update(chunk[: min(len(chunk), size - start)])
    return "sha256:" + hasher.hexdigest()


def rewrite_archive(source: Path, target: Path, extra: tuple[str, int, int] | None = None) -> Path:
    """Copy a ``.tar.zst`` archive, inserting ``extra`` = (member name, size of zeros, position among members)."""
    with open(source, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zst, \
            tarfile.open(fileobj=zst, mode="r|") as tar:
        items: list[tuple[tarfile.TarInfo, Callable[[], io.IOBase]]] = []
        for member in tar:
            data = tar.extractfile(member).read()
            items.append((member, lambda data=data: io.BytesIO(data)))
    if extra is not None:
        big = tarfile.TarInfo(extra[0])
        big.size = extra[1]
        items.insert(extra[2], (big, lambda: io.BufferedReader(Zeros(extra[1]), 1 << 20)))
    with open(target, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as zst, \
            tarfile.open(fileobj=zst, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, opener in items:
            tar.addfile(info, opener())
    return target


def tar_zst(path: Path, members: dict[str, bytes]) -> Path:
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as zst, \
            tarfile.open(fileobj=zst, mode="w|") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- the environment a row runs in ------------------------------------------------------------------------------


@dataclass
class Env:
    """A store with one good model in it, and the tools rows attack it with."""

    tmp: Path
    store: Store
    source: Model
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    notes: dict = field(default_factory=dict)
    _hostile: HostileRegistry | None = None

    @property
    def hostile(self) -> HostileRegistry:
        if self._hostile is None:
            self._hostile = HostileRegistry()
        return self._hostile

    @property
    def registry_url(self) -> str:
        """A real docker-registry (skipped where it is not installed)."""
        if REGISTRY_BIN is None:
            pytest.skip("docker-registry (Debian package) not installed")
        return self.request.getfixturevalue("open_registry").url

    def model(self) -> Model:
        return copy.deepcopy(self.source)

    def model_dir(self, name: str = "src", **kwargs: int) -> Path:
        return write_mini_model(self.tmp / name, {"transformer": 1, "vae": 2}, **{"tensors": 2, "rows": 8,
                                                                                   **kwargs})

    def imgpack(self, *argv: str) -> Outcome:
        """The CLI in this process (monkeypatched limits apply); a traceback fails the test by itself."""
        from imgpack.cli.main import main

        self.capsys.readouterr()
        code = main(["--store", str(self.store.root), *argv])
        captured = self.capsys.readouterr()
        return Outcome(code, captured.err, captured.out, captured.err.encode("utf-8", "surrogateescape"))

    def imgpack_process(self, *argv: str, timeout: float = 120) -> Outcome:
        """The CLI as a separate process, its stderr kept as bytes: what a terminal would receive."""
        done = subprocess.run([sys.executable, "-m", "imgpack.cli.main", "--store", str(self.store.root), *argv],
                              capture_output=True, timeout=timeout, cwd=self.tmp)
        return Outcome(done.returncode, done.stderr.decode("utf-8", "backslashreplace"),
                       done.stdout.decode("utf-8", "backslashreplace"), done.stderr)

    def close(self) -> None:
        if self._hostile is not None:
            self._hostile.stop()


def mount_tmpfs(path: Path, mib: int) -> str | None:
    """Mount a ``size=``-limited tmpfs at ``path``; the reason it cannot be done, or None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root (or a user namespace), which this machine does not give"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}"
    return None


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from imgpack.packager.create import create_model

    root = tmp_path_factory.mktemp("source")
    store = Store.open(root / "store")
    create_model(store, "local/source:1", write_mini_model(root / "m", {"transformer": 11, "vae": 12}, tensors=2,
                                                           rows=8))
    return model_of(store, "local/source:1")


@pytest.fixture
def env(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, capsys,
        isolated_credentials, source_model: Model) -> Iterator[Env]:
    row: Row | None = getattr(request, "param", None)
    store_root = tmp_path / "store"
    mounted = None
    if row is not None and row.tmpfs_mib:
        mounted = tmp_path / "small-disk"
        reason = mount_tmpfs(mounted, row.tmpfs_mib)
        if reason:
            pytest.skip(reason)
        store_root = mounted / "store"
    from imgpack.packager.create import create_model

    store = Store.open(store_root)
    environment = Env(tmp_path, store, source_model, request, monkeypatch, capsys)
    create_model(store, "local/good:1", environment.model_dir("good"))
    try:
        yield environment
    finally:
        environment.close()
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)


# -- 1: symbolic links out of the model folder; 11: names that are not UTF-8 -----------------------------------------


def link_to_passwd(env: Env) -> Outcome:
    model = env.model_dir()
    (model / "transformer" / "passwd.txt").symlink_to("/etc/passwd")
    env.notes["says"] = str(model / "transformer" / "passwd.txt")
    return env.imgpack("create", "local/linked:1", str(model))


def link_to_etc(env: Env) -> Outcome:
    model = env.model_dir()
    (model / "transformer" / "etc").symlink_to("/etc", target_is_directory=True)
    env.notes["says"] = str(model / "transformer" / "etc")
    return env.imgpack("create", "local/linked:1", str(model))


def hugging_face_cache(env: Env) -> Outcome:
    """``models--org--name/snapshots/<rev>/`` whose every file is a relative link into ``../../blobs``."""
    plain = env.model_dir("plain")
    repo = env.tmp / "hub" / "models--org--name"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in plain.rglob("*") if p.is_file()):
        rel = path.relative_to(plain)
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot_dir / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    outcome = env.imgpack("create", "local/cached:1", str(snapshot_dir))
    if outcome.code == 0:
        exported = env.tmp / "exported"
        assert env.imgpack("export", "local/cached:1", str(exported)).code == 0
        for path in plain.rglob("*"):
            if path.is_file():
                assert (exported / path.relative_to(plain)).read_bytes() == path.read_bytes(), path
    return outcome


def follow_external(env: Env) -> Outcome:
    model = env.model_dir()
    outside = env.tmp / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text("kept outside the model folder on purpose\n")
    (model / "transformer" / "notes.txt").symlink_to(outside)
    outcome = env.imgpack("create", "--follow-external-links", "local/linked:1", str(model))
    if outcome.code == 0:
        layer = env.store.get_manifest("local/linked:1").layer("transformer/notes.txt")
        assert env.store.read_blob(layer.digest) == outside.read_bytes()
    return outcome


def non_utf8_name(env: Env) -> Outcome:
    model = env.model_dir()
    with open(os.path.join(os.fsencode(model / "transformer"), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    return env.imgpack("create", "local/latin1:1", str(model))


# -- 3: two processes opening a new store at once -------------------------------------------------------------------

OPEN_AT = """
import sys, time
from imgpack.store.store import Store
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
Store.open(sys.argv[1])
"""


def open_new_store_at_once(env: Env) -> Outcome:
    failures = []
    for round_ in range(15):
        root = env.tmp / f"race-{round_}" / "store"
        start = time.time() + 1.0  # both are past their imports by then: they open within microseconds
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(root), str(start)], stderr=subprocess.PIPE)
                 for _ in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode:
                failures.append(f"round {round_}: {err.decode(errors='replace').strip().splitlines()[-1]}")
        assert Store.open(root, create=False).references() == []
    return Outcome(1 if failures else 0, "\n".join(failures))


# -- 4: a writer in another PID namespace (a container sharing the volume) ---------------------------------------

WRITER = """
import os, sys
from imgpack.store.store import Store
store = Store.open(sys.argv[1])
writer = store.writer()
writer.write(b"written by a process in another PID namespace")
print(writer.path, os.getpid(), flush=True)
sys.stdin.readline()
print(writer.commit(), flush=True)
"""


def no_pid_namespaces() -> str | None:
    if UNSHARE is None:
        return "unshare(1) is not installed"
    done = subprocess.run([UNSHARE, "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if done.returncode:
        return f"cannot make a PID namespace here ({done.stderr.decode(errors='replace').strip()})"
    return None


def in_pid_namespace(*argv: str) -> list[str]:
    return [UNSHARE or "unshare", "-p", "-f", "--mount-proc", *argv]


def temps_of_a_writer_elsewhere(env: Env) -> Outcome:
    root = str(env.store.root)
    writer = subprocess.Popen(in_pid_namespace(sys.executable, "-c", WRITER, root), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        temp, pid = writer.stdout.readline().split()
        assert pid == "1", f"the writer is PID {pid} in its namespace; ours cannot see it"
        listed = env.imgpack("list")  # opening the store cleans stale temps
        assert listed.code == 0, listed.err
        assert Path(temp).exists(), "another process's open deleted a live writer's temp file"
        assert Store.open(root).clean_stale_temps() == 0
        writer.stdin.write("\n")
        writer.stdin.flush()
        digest = writer.stdout.readline().strip()
        writer.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(writer.pid, signal.SIGKILL)
    assert env.store.has_blob(digest) and not Path(temp).exists()
    # A writer killed mid-write leaves a temp nobody holds: the next open removes it.
    killed = subprocess.Popen(in_pid_namespace(sys.executable, "-c", WRITER, root), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    leftover = Path(killed.stdout.readline().split()[0])
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert leftover.exists()
    deadline = time.monotonic() + 10  # the namespace's init may take a moment to die after its parent
    while leftover.exists() and time.monotonic() < deadline:
        Store.open(root)
        time.sleep(0.05)
    assert not leftover.exists(), "a dead writer's temp survived the next open"
    return Outcome(writer.returncode, "")


def creates_in_six_namespaces(env: Env) -> Outcome:
    """Six ``create``s, each in its own PID namespace, while this process keeps opening (and cleaning) the store."""
    models = [write_mini_model(env.tmp / f"ns-{i}", {"transformer": 100 + i, "vae": 200 + i}, tensors=6, rows=2048)
              for i in range(6)]
    procs = [subprocess.Popen(in_pid_namespace(sys.executable, "-m", "imgpack.cli.main", "--store",
                                               str(env.store.root), "-q", "create", f"local/ns{i}:1", str(m)),
                              stderr=subprocess.PIPE, start_new_session=True) for i, m in enumerate(models)]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        Store.open(env.store.root).clean_stale_temps()
    errors = [p.communicate(timeout=30)[1].decode(errors="replace") for p in procs]
    failed = [f"create {i}: {e.strip()}" for i, (p, e) in enumerate(zip(procs, errors, strict=True)) if p.returncode]
    if not failed:
        from imgpack.conformance.verify import verify_store

        assert {f"local/ns{i}:1" for i in range(6)} <= dict(env.store.references()).keys()
        assert verify_store(env.store).ok
    return Outcome(1 if failed else 0, "\n".join(failed))


# -- 5: a full disk ----------------------------------------------------------------------------------------------

TENSOR = "transformer/blocks.0.weight"
KEPT = r"^(blobs/sha256/[0-9a-f]{64}|\.imgpack/ingest/sha256-[0-9a-f]{64}\.partial)$"
MIB = 1 << 20


def declare(model: Model, name: str, size: int) -> dict:
    """Make layer ``name`` declare a ``size``-byte blob that the registry then serves (or not) as a route says."""
    desc = model.layer(name)
    model.blobs.pop(desc["digest"], None)
    desc["size"], desc["digest"] = size, sha256_bytes(f"{name}:{size}".encode())
    return desc


def route_blob(env: Env, desc: dict, handler: Callable[[BaseHTTPRequestHandler, re.Match, dict], None]) -> None:
    env.hostile.route("GET", re.escape(f"/blobs/{desc['digest']}"), lambda h, m: handler(h, m, desc))


def sends_then_closes(sent: int) -> Callable[[BaseHTTPRequestHandler, re.Match, dict], None]:
    def handler(h: BaseHTTPRequestHandler, match: re.Match, desc: dict) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(desc["size"]))
        h.send_header("Connection", "close")
        h.end_headers()
        with contextlib.suppress(OSError):
            h.wfile.write(bytes(sent))
            h.wfile.flush()
        h.close_connection = True

    return handler


def declares_a_terabyte(env: Env) -> Outcome:
    model = env.model()
    desc = declare(model, TENSOR, 10**12)
    outcome = env.imgpack("pull", env.hostile.serve(model))
    assert env.hostile.blob_gets(desc["digest"]) == 0, "the 1 TB blob was requested"
    return outcome


def small_disk(env: Env) -> None:
    from imgpack.registry import layout

    env.monkeypatch.setattr(layout, "DISK_MARGIN", MIB)  # the disk is real; only the safety margin is shrunk


def leave_a_partial(env: Env) -> None:
    """A registry that declares 10 MiB and always stops after 8 MiB: the pull fails, the 8 MiB partial stays."""
    from imgpack.packager.create import create_model

    small_disk(env)
    model = env.model()
    desc = declare(model, TENSOR, 10 * MIB)
    route_blob(env, desc, sends_then_closes(8 * MIB))
    failed = env.imgpack("pull", env.hostile.serve(model))
    assert failed.code == 5, failed.err
    assert env.store.partial_bytes() == 8 * MIB
    scratch = Store.open(env.tmp / "scratch")
    create_model(scratch, "local/big:1", env.model_dir("big", tensors=4, rows=8192))  # ~9 MB
    env.notes["ref"] = push_raw(env.registry_url, model_of(scratch, "local/big:1"), tag="big")


def pull_noted(env: Env) -> Outcome:
    return env.imgpack("pull", env.notes["ref"])


def prune_then_pull(env: Env) -> None:
    assert env.imgpack("prune").code == 0
    again = env.imgpack("pull", env.notes["ref"])
    assert again.code == 0, again.err


def fills_the_disk_midway(env: Env) -> Outcome:
    """The registry sends 1 MiB, then something else fills the disk, then it sends the rest: ENOSPC mid-write."""
    small_disk(env)
    model = env.model()
    desc = declare(model, TENSOR, 6 * MIB)
    filler = env.store.root.parent / "filler"

    def handler(h: BaseHTTPRequestHandler, match: re.Match, desc: dict) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(desc["size"]))
        h.end_headers()
        with contextlib.suppress(OSError):
            h.wfile.write(bytes(MIB))
            h.wfile.flush()
            time.sleep(0.3)
            with open(filler, "ab") as f:  # another program takes the rest of the disk
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(MIB))
                        f.flush()
            h.wfile.write(bytes(desc["size"] - MIB))

    route_blob(env, desc, handler)
    return env.imgpack("pull", env.hostile.serve(model))


def huge_unreferenced_member(position: int) -> Callable[[Env], Outcome]:
    """A small archive with a 1 GiB member no manifest references, at ``position`` among its members."""

    def attack(env: Env) -> Outcome:
        small_disk(env)
        size = 1 << 30
        digest = zeros_digest(size)
        saved = archive_of(env.model(), env.tmp / "plain.tar.zst", env.tmp / "scratch")
        archive = rewrite_archive(saved, env.tmp / "huge.tar.zst", ("blobs/sha256/" + digest[7:], size, position))
        assert archive.stat().st_size < 2 * MIB
        outcome = env.imgpack("load", str(archive))
        assert not env.store.has_blob(digest)
        assert os.listdir(env.store.ingest_dir) == []
        if outcome.code == 0:
            assert set(env.store.iter_blobs()) == env.store.referenced_blobs()
            assert "archived/model:1" in dict(env.store.references())
        return outcome

    return attack


# -- 6: digest-valid blobs whose content is not what the layer says ------------------------------------------------


def bad_tensor_header(model: Model) -> str:
    desc = model.layer(TENSOR)
    data = bytearray(model.blob(desc))
    data[:8] = struct.pack("<Q", len(data) * 2)  # the header length runs past the end of the blob
    model.replace(desc, bytes(data))
    return f"layer {TENSOR!r}"


def deep_tensor_header(model: Model) -> str:
    desc = model.layer(TENSOR)
    header = b"[" * 20_000 + b"]" * 20_000
    model.replace(desc, struct.pack("<Q", len(header)) + header + bytes(max(0, desc["size"] - len(header) - 8)))
    return f"layer {TENSOR!r}"


def bad_source_header(model: Model) -> str:
    desc = model.header_layer()
    garbage = b'{"blocks.0.weight": {"dtype": "F32", "shape": [8, 32], "data_offsets": [0,'
    model.replace(desc, struct.pack("<Q", len(garbage)) + garbage)
    return "transformer/diffusion_pytorch_model.safetensors"


def header_names_a_missing_tensor(model: Model) -> str:
    desc = model.header_layer()
    header = json.dumps({"blocks.0.weight": {"dtype": "F32", "shape": [8, 32], "data_offsets": [0, 1024]},
                         "ghost.weight": {"dtype": "F32", "shape": [1], "data_offsets": [1024, 1028]}}).encode()
    model.replace(desc, struct.pack("<Q", len(header)) + header)
    return "ghost.weight"


def config_not_json(model: Model) -> str:
    model.replace(model.document["config"], b"this is not JSON\n")
    return "config blob"


def config_off_schema(model: Model) -> str:
    config = json.loads(model.blob(model.document["config"]))
    del config["specVersion"]
    model.replace(model.document["config"], json.dumps(config).encode())
    return "config blob"


def pull_broken(mutate: Callable[[Model], str]) -> tuple[Callable[[Env], None], Callable[[Env], Outcome]]:
    def setup(env: Env) -> None:
        model = env.model()
        env.notes["says"] = mutate(model)
        env.notes["ref"] = push_raw(env.registry_url, model, tag=mutate.__name__.replace("_", "-"))

    return setup, pull_noted


def load_broken(mutate: Callable[[Model], str]) -> tuple[Callable[[Env], None], Callable[[Env], Outcome]]:
    def setup(env: Env) -> None:
        model = env.model()
        env.notes["says"] = mutate(model)
        env.notes["archive"] = archive_of(model, env.tmp / "broken.tar.zst", env.tmp / "scratch")

    def attack(env: Env) -> Outcome:
        outcome = env.imgpack("load", str(env.notes["archive"]))
        assert str(env.notes["archive"]) in outcome.err
        return outcome

    return setup, attack


def export_broken(mutate: Callable[[Model], str]) -> tuple[Callable[[Env], None], Callable[[Env], Outcome]]:
    def setup(env: Env) -> None:
        model = env.model()
        said = mutate(model)
        if said != "config blob":  # export does not read the config blob: it exports such a model fine
            env.notes["says"] = said
        model.write_into(env.store, "local/broken:1")  # an old store that indexed it without checking

    def attack(env: Env) -> Outcome:
        target = env.tmp / "out" / "exported"
        outcome = env.imgpack("export", "local/broken:1", str(target))
        assert not target.exists() or outcome.code == 0
        assert not [p for p in target.parent.glob(".*export*")], "export left its temp folder"
        return outcome

    return setup, attack


# -- 7: terminal escapes from registries and layer names -----------------------------------------------------------

HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\x1b[31mDENIED" + C1 + "2J" + BIDI + "txt.exe" + LSEP + "forged line"
RAW_BAD = [b"\x1b", "\u009b".encode(), BIDI.encode(), LSEP.encode(), b"\x07"]


def terminal_safe(outcome: Outcome) -> Outcome:
    for raw in (outcome.raw_err, outcome.out.encode("utf-8", "surrogateescape")):
        bad = [b for b in RAW_BAD if b in raw]
        assert not bad, f"raw control bytes {bad} reached the terminal: {raw!r}"
    return outcome


def registry_says(status: int, where: str, *flags: str, push: bool = False) -> Callable[[Env], Outcome]:
    """GET/POST requests matching ``where`` answer ``status`` with hostile error codes and messages (HEAD
    answers carry no body); the CLI runs as a separate process, so its stderr bytes are what a terminal gets."""

    def attack(env: Env) -> Outcome:
        body = json.dumps({"errors": [{"code": HOSTILE_TEXT, "message": HOSTILE_TEXT, "detail": HOSTILE_TEXT}]})
        env.hostile.route("GET", where, lambda h, m: reply(h, status, body.encode()))
        env.hostile.route("POST", where, lambda h, m: reply(h, status, body.encode()))
        ref = env.hostile.serve(env.model())
        argv = ("push", "local/good:1", ref) if push else ("pull", ref)
        outcome = env.imgpack_process(*flags, *argv)
        if "--json" in flags:
            events = [json.loads(line) for line in outcome.out.splitlines() + outcome.err.splitlines()
                      if line.startswith("{")]
            assert any(e.get("event") == "error" and HOSTILE_TEXT[:8] in e["message"] for e in events), outcome
        return terminal_safe(outcome)

    return attack


def token_service_says(env: Env) -> Outcome:
    """The registry sends clients to a token service that answers with hostile error strings."""
    realm = f"http://{env.hostile.host}/token"
    challenge = {"WWW-Authenticate": f'Bearer realm="{realm}",service="hostile",scope="repository:{REPO}:pull"'}
    body = json.dumps({"errors": [{"code": HOSTILE_TEXT, "message": HOSTILE_TEXT}]}).encode()
    env.hostile.route("GET", r"^/token", lambda h, m: reply(h, 400, body))
    env.hostile.route("*", r"^/v2/", lambda h, m: reply(h, 401, error_body("UNAUTHORIZED", "log in"), challenge))
    return terminal_safe(env.imgpack_process("pull", f"{env.hostile.host}/{REPO}:1"))


def named(name: str) -> Callable[[Env], Outcome]:
    """A registry serving a model with one file layer renamed ``name``."""

    def attack(env: Env) -> Outcome:
        model = env.model()
        model.rename(model.layer("transformer/config.json"), name)
        outcome = env.imgpack_process("pull", env.hostile.serve(model))
        assert not any(method == "GET" and "/blobs/" in path for method, path in env.hostile.log)
        return terminal_safe(outcome)

    return attack


def old_store_with_name(name: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        model = env.model()
        model.rename(model.layer("transformer/config.json"), name)
        model.write_into(env.store, "local/old:1")

    return setup


def show_old(env: Env) -> Outcome:
    listed = terminal_safe(env.imgpack_process("list"))
    assert listed.code == 0 and "broken" in listed.out, listed
    return terminal_safe(env.imgpack_process("show", "local/old:1"))


# -- 8: documents nested 100,000 deep -----------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def create_with(path: str, content: bytes) -> Callable[[Env], Outcome]:
    def attack(env: Env) -> Outcome:
        model = env.model_dir()
        (model / path).write_bytes(content)
        return env.imgpack("create", "local/deep:1", str(model))

    return attack


def pull_manifest_with(edit: Callable[[Model], None]) -> Callable[[Env], Outcome]:
    def attack(env: Env) -> Outcome:
        model = env.model()
        edit(model)
        outcome = env.imgpack("pull", env.hostile.serve(model))
        assert not any(method == "GET" and "/blobs/" in path for method, path in env.hostile.log)
        return outcome

    return attack


def deep_manifest(model: Model) -> None:
    model.raw = lambda: b'{"schemaVersion": 2, "mediaType": "%s", "deep": %s}' % (  # type: ignore[method-assign]
        spec.OCI_MANIFEST.encode(), DEEP)


def pull_quantized_with_deep_annotation(env: Env) -> Outcome:
    """A valid quantized tensor (from the committed conformance vector) whose annotation is nested 100,000 deep."""
    vector = Store.open(TESTS.parent / "conformance" / "vectors" / "valid" / "quantized", create=False)
    model = model_of(vector, vector.references()[0][0])
    model.layer("weights/fp4.weight")["annotations"][spec.QUANTIZATION_ANNOTATION] = DEEP.decode()
    return env.imgpack("pull", env.hostile.serve(model))


def old_store_with_deep_manifest(env: Env) -> None:
    from imgpack.schemas.graph import Descriptor

    digest, size = env.store.put_bytes(b'{"schemaVersion": 2, "mediaType": "%s", "layers": [], "deep": %s}' % (
        spec.OCI_MANIFEST.encode(), DEEP))
    env.store.set_entry("local/deep:1", Descriptor(spec.OCI_MANIFEST, digest, size))


def commands_on_deep_manifest(env: Env) -> Outcome:
    listed = env.imgpack("list")
    assert listed.code == 0 and "local/deep:1" in listed.out, listed
    exported = env.imgpack("export", "local/deep:1", str(env.tmp / "out"))
    assert exported.code == 1 and "nested too deeply" in exported.err, exported
    return env.imgpack("show", "local/deep:1")


# -- 9: a blob that drips ------------------------------------------------------------------------------------------


def dripping_blob(env: Env) -> Outcome:
    from imgpack.registry import copy as copy_module
    from imgpack.registry import remote

    env.monkeypatch.setattr(remote, "STALL_WINDOW", 1.0)
    env.monkeypatch.setattr(copy_module, "BLOB_DEADLINE_BASE", 3.0)
    model = env.model()
    desc = declare(model, TENSOR, MIB)

    def drip(h: BaseHTTPRequestHandler, match: re.Match, desc: dict) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(desc["size"]))
        h.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1200):  # 64 bytes every 50 ms for at most a minute, far below any sane rate
                h.wfile.write(bytes(64))
                h.wfile.flush()
                time.sleep(0.05)

    route_blob(env, desc, drip)
    started = time.monotonic()
    outcome = env.imgpack("pull", env.hostile.serve(model))
    elapsed = time.monotonic() - started
    assert elapsed < 25, f"a dripping blob held the pull for {elapsed:.0f} s"
    return outcome


# -- 11: smaller ones ---------------------------------------------------------------------------------------------


def redirect_loop(env: Env) -> Outcome:
    env.hostile.route("GET", r"/blobs/sha256:", lambda h, m: reply(h, 307, b"", {"Location": h.path}))
    outcome = env.imgpack("pull", env.hostile.serve(env.model()))
    assert not list(env.store.ingest_dir.glob("*.partial"))
    return outcome


def load_of(make: Callable[[Env], Path]) -> Callable[[Env], Outcome]:
    def attack(env: Env) -> Outcome:
        archive = make(env)
        outcome = env.imgpack("load", str(archive))
        assert str(archive) in outcome.err, outcome.err
        return outcome

    return attack


def saved(env: Env) -> Path:
    return archive_of(env.model(), env.tmp / "good.tar.zst", env.tmp / "scratch")


def with_index(index: bytes) -> Callable[[Env], Path]:
    return lambda env: tar_zst(env.tmp / "bad.tar.zst", {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
                                                         "index.json": index})


BAD_ARCHIVES: dict[str, Callable[[Env], Path]] = {
    "not-zstd": lambda env: _write(env.tmp / "random.tar.zst", os.urandom(4096)),
    "zstd-not-tar": lambda env: _write(env.tmp / "text.tar.zst", zstandard.ZstdCompressor().compress(b"hi" * 999)),
    "truncated": lambda env: _write(env.tmp / "cut.tar.zst", saved(env).read_bytes()[:1500]),
    "traversal-member": lambda env: tar_zst(env.tmp / "evil.tar.zst", {"../../etc/evil": b"x"}),
    "no-index": lambda env: tar_zst(env.tmp / "empty.tar.zst", {"oci-layout": b"{}"}),
    "index-not-json": with_index(b"{not json"),
    "index-nested-deep": with_index(b'{"manifests": ' + DEEP + b"}"),
    "index-names-a-bad-reference": lambda env: _rename_in_index(env, "Not A Reference!!"),
    "manifest-missing": with_index(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": spec.OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 2,
         "annotations": {spec.REF_NAME_ANNOTATION: "a/b:1"}}]}).encode()),
    "a-directory": lambda env: _mkdir(env.tmp / "folder.tar.zst"),
    "missing-file": lambda env: env.tmp / "nowhere.tar.zst",
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _rename_in_index(env: Env, name: str) -> Path:
    source = saved(env)
    target = env.tmp / "renamed.tar.zst"
    with open(source, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zst, \
            tarfile.open(fileobj=zst, mode="r|") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    index = json.loads(members["index.json"])
    index["manifests"][0]["annotations"][spec.REF_NAME_ANNOTATION] = name
    members["index.json"] = json.dumps(index).encode()
    return tar_zst(target, members)


# -- the table --------------------------------------------------------------------------------------------------


def no_registry() -> str | None:
    return None if REGISTRY_BIN else "docker-registry (Debian package) not installed"


REFUSED = ("nothing was indexed",)
ROWS: list[Row] = [
    # 1: symbolic links; 11: file names that are not UTF-8.
    Row("1", "file-link-to-etc-passwd", link_to_passwd, 1,
        ("/etc/passwd", "leaves the model folder", "--follow-external-links")),
    Row("1", "directory-link-to-etc", link_to_etc, 1, ("symbolic link to /etc ", "leaves the model folder")),
    Row("1", "hugging-face-cache-links-into-blobs", hugging_face_cache, 0, unchanged=False),
    Row("1", "follow-external-links-packs-it", follow_external, 0, unchanged=False),
    Row("11", "non-utf8-file-name", non_utf8_name, 1, ("caf\\xe9.txt", "not valid UTF-8")),
    # 3, 4: shared stores.
    Row("3", "two-processes-open-a-new-store-15-rounds", open_new_store_at_once, 0),
    Row("4", "temps-of-a-writer-in-another-pid-namespace-survive", temps_of_a_writer_elsewhere, 0,
        unchanged=False, needs=no_pid_namespaces),
    Row("4", "six-creates-in-six-pid-namespaces", creates_in_six_namespaces, 0, unchanged=False,
        needs=no_pid_namespaces),
    # 5: disk fill.
    Row("5", "registry-declares-a-1tb-blob", declares_a_terabyte, 5,
        ("declares 1.0 TB", "needs 1.0 TB", "GB is free", "imgpack prune")),
    Row("5", "kept-partial-then-good-pull-on-a-small-disk", pull_noted, 5,
        ("held by partial downloads", "imgpack prune"), setup=leave_a_partial, after=prune_then_pull, tmpfs_mib=16,
        needs=no_registry),
    Row("5", "disk-fills-during-a-download", fills_the_disk_midway, 5,
        ("No space left on device", "imgpack prune"), gains=KEPT, tmpfs_mib=16),
    Row("5", "load-huge-unreferenced-member-after-the-manifests", huge_unreferenced_member(10**6), 0,
        unchanged=False, tmpfs_mib=64),
    Row("5", "load-huge-unreferenced-member-before-the-manifests", huge_unreferenced_member(2), 0,
        unchanged=False, tmpfs_mib=64),
]
for mutate, said in [(bad_tensor_header, "TNS-001"), (deep_tensor_header, "nested too deeply"),
                     (bad_source_header, "FIL-004"), (config_not_json, "CFG-001"), (config_off_schema, "CFG-001")]:
    tag = mutate.__name__.replace("_", "-")
    setup, attack = pull_broken(mutate)
    ROWS.append(Row("6", f"pull-{tag}", attack, 6, (said, *REFUSED), setup=setup, needs=no_registry))
    setup, attack = load_broken(mutate)
    ROWS.append(Row("6", f"load-{tag}", attack, 6, (said, *REFUSED), setup=setup))
for mutate in (bad_tensor_header, deep_tensor_header, bad_source_header, header_names_a_missing_tensor,
               config_not_json, config_off_schema):
    setup, attack = export_broken(mutate)
    code = {"config_not_json": 0, "config_off_schema": 0, "header_names_a_missing_tensor": 1}.get(mutate.__name__, 6)
    ROWS.append(Row("6", f"export-{mutate.__name__.replace('_', '-')}", attack, code, setup=setup))
ROWS += [
    # 7: terminal escapes.
    Row("7", "registry-error-strings-manifest-400", registry_says(400, r"/manifests/"), 5, ("\\x1b]0;owned",)),
    Row("7", "registry-error-strings-blob-400", registry_says(400, r"/blobs/"), 5, ("\\x9b2J", "\\u202e")),
    Row("7", "registry-error-strings-push-400", registry_says(400, r"/blobs/uploads/", push=True), 5,
        ("\\u2028forged line",)),
    Row("7", "registry-error-strings-token-service", token_service_says, 5, ("\\x1b[2J",)),
    Row("7", "registry-error-strings-403", registry_says(403, r"/manifests/"), 3, ("access denied",)),
    Row("7", "registry-error-strings-404", registry_says(404, r"/manifests/"), 4, ("not found",)),
    Row("7", "registry-error-strings-json", registry_says(400, r"/manifests/", "--json"), 5),
    Row("7", "layer-name-with-c1-control", named("transformer/con" + C1 + "fig.json"), 1,
        ("unsafe name", "\\x9b")),
    Row("7", "layer-name-with-bidi-override", named("transformer/gpj." + BIDI + "config.json"), 1,
        ("unsafe name", "\\u202e")),
    Row("7", "layer-name-with-bidi-isolate", named("transformer/\u2066config.json"), 1, ("unsafe name",)),
    Row("7", "layer-name-with-line-separator", named("transformer/config" + LSEP + ".json"), 1,
        ("unsafe name", "\\u2028")),
    Row("7", "layer-name-with-lone-surrogate", named("transformer/config\ud800.json"), 1, ("unsafe name",)),
    Row("7", "show-of-an-old-store-with-such-a-name", show_old, 1, ("unsafe name", "\\u202e"),
        setup=old_store_with_name("transformer/gpj." + BIDI + "config.json")),
    # 8: nesting.
    Row("8", "create-safetensors-header-nested-100000-deep",
        create_with("transformer/diffusion_pytorch_model.safetensors", struct.pack("<Q", len(DEEP)) + DEEP), 1,
        ("diffusion_pytorch_model.safetensors", "nested too deeply")),
    Row("8", "create-model-index-nested-100000-deep",
        create_with("model_index.json", b'{"_class_name": "X", "deep": ' + DEEP + b"}"), 1,
        ("model_index.json", "nested too deeply")),
    Row("8", "create-component-config-nested-100000-deep", create_with("vae/config.json", DEEP), 1,
        ("vae/config.json", "nested too deeply")),
    Row("8", "pull-manifest-nested-100000-deep", pull_manifest_with(deep_manifest), 1, ("nested too deeply",)),
    Row("8", "pull-quantization-annotation-nested-100000-deep", pull_quantized_with_deep_annotation, 6,
        (spec.QUANTIZATION_ANNOTATION, "nested too deeply", *REFUSED)),
    Row("8", "old-store-manifest-nested-100000-deep", commands_on_deep_manifest, 1, ("nested too deeply",),
        setup=old_store_with_deep_manifest),
    # 9: slow registries (client side).
    Row("9", "a-dripping-blob-is-abandoned-in-bounded-time", dripping_blob, 5, ("slower than",), gains=KEPT),
    # 11: smaller.
    Row("11", "redirect-loop-leaves-no-partial-files", redirect_loop, 5, ("too many redirects",)),
    Row("11", "path-segment-of-300-characters", named("transformer/" + "c" * 300 + ".json"), 1,
        ("unsafe name", "255")),
]
for name, make in BAD_ARCHIVES.items():
    ROWS.append(Row("11", f"load-{name}", load_of(make), 1 if name in (
        "no-index", "index-not-json", "index-nested-deep", "index-names-a-bad-reference", "traversal-member",
        "a-directory", "missing-file") else 6))

#: Findings whose fix and test live with the server (done by another engineer), by test id.
ELSEWHERE = {
    "2": ["tests/test_server_http.py::test_foreign_host_names_are_refused",
          "tests/test_server_http.py::test_foreign_origins_are_refused_and_allowed_ones_get_cors",
          "tests/test_server_http.py::test_json_bodies_need_the_json_content_type"],
    "8": ["tests/test_server_http.py::test_hostile_json_is_400_never_500"],
    "9": ["tests/test_server_http.py::test_headers_that_never_finish_get_408_and_close",
          "tests/test_server_http.py::test_a_dripping_body_is_cut_off",
          "tests/test_server_http.py::test_half_open_connections_hold_no_threads"],
    "10": ["tests/test_server_memory.py::test_the_fit_check_uses_the_requests_own_size",
           "tests/test_server_memory.py::test_memory_is_given_back_after_a_large_request"],
}


@pytest.mark.parametrize("env", ROWS, ids=[row.id for row in ROWS], indirect=True)
def test_hostile(env: Env) -> None:
    row: Row = env.request.param
    if row.needs is not None and (reason := row.needs()):
        pytest.skip(reason)
    if row.setup is not None:
        row.setup(env)
    before = snapshot(env.store.root)
    outcome = row.attack(env)
    print(f"{row.id}: exit {outcome.code}: {outcome.err}")  # shown when the row fails, and with -s
    assert outcome.code == row.code, f"exit {outcome.code}, expected {row.code}: {outcome.err}"
    for phrase in (*row.says, *([env.notes["says"]] if "says" in env.notes else [])):
        assert phrase in outcome.err, f"{phrase!r} not in: {outcome.err}"
    assert "Traceback" not in outcome.err
    if row.code:
        assert outcome.err.startswith("imgpack: error: ") or '"event":"error"' in outcome.out + outcome.err, outcome
    if row.unchanged:
        after = snapshot(env.store.root)
        allowed = re.compile(row.gains) if row.gains else None
        gained = {p for p in after.keys() - before.keys() if not (allowed and allowed.match(p))}
        assert not gained, f"the store gained {sorted(gained)}"
        assert {p: d for p, d in after.items() if p in before} == before, "the store changed"
    if row.after is not None:
        row.after(env)


def test_every_finding_has_a_row() -> None:
    findings = {row.finding for row in ROWS} | set(ELSEWHERE)
    assert findings == {str(n) for n in range(1, 12)}, sorted(findings, key=int)


def test_findings_tested_elsewhere_still_exist() -> None:
    for ids in ELSEWHERE.values():
        for test_id in ids:
            path, name = test_id.split("::")
            tree = ast.parse((TESTS.parent / path).read_text())
            assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, test_id


@pytest.mark.parametrize(("name", "problem"), [
    ("transformer/con\u0080fig.json", "U+0080"),
    ("transformer/con\u009ffig.json", "U+009F"),
    ("transformer/con\x7ffig.json", "U+007F"),
    *[(f"transformer/a{chr(c)}b.json", f"U+{c:04X}") for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))],
    ("transformer/a\u2028b.json", "U+2028"),
    ("transformer/a\u2029b.json", "U+2029"),
    ("transformer/a\udc80b.json", "lone surrogate"),
    ("transformer/" + "c" * 256, "255 bytes"),
    ("transformer/" + "\u00e9" * 128, "255 bytes"),  # 128 characters, 256 bytes of UTF-8
])
def test_name_rules_refuse_what_a_terminal_or_file_system_would_misread(name: str, problem: str) -> None:
    from imgpack.schemas.names import name_problem

    found = name_problem(name)
    assert found is not None and problem in found, found


@pytest.mark.parametrize("name", ["transformer/" + "c" * 255, "transformer/\u00e9" * 1 + "x" * 250,
                                  "text_encoder/\u6a21\u578b.json", "vae/\u00fcber-\U0001f600.json"])
def test_name_rules_keep_ordinary_unicode(name: str) -> None:
    from imgpack.schemas.names import name_problem

    assert name_problem(name) is None
