"""``imgpack push / pull / copy / tags / login / logout``: registry commands.

All transfers go through :func:`imgpack.registry.copy.copy_model`; these handlers only turn
arguments into endpoints, pick a reporter (rich bar on a TTY, JSON lines with ``--json``, nothing
with ``--quiet``) and print a summary.  Errors are ImgpackError subclasses, whose exit codes the
main entry point uses (usage 2, auth 3, not found 4, transfer 5, integrity 6).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import threading

from imgpack.packager.store import Store
from imgpack.registry import credentials
from imgpack.registry.blobsources import BlobSources
from imgpack.registry.copy import CopyResult, copy_model
from imgpack.registry.endpoints import Clients, Endpoint, open_endpoint
from imgpack.registry.local import LocalLayout
from imgpack.registry.progress import JsonReporter, Reporter, RichReporter
from imgpack.registry.remote import RemoteRepository
from imgpack.registry.transport import RegistryClient, TransportOptions
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference

DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _concurrency(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: {value!r} is not an integer") from None
    if not 1 <= n <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"--concurrency: must be between 1 and {MAX_CONCURRENCY}, got {n}")
    return n


def _transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight (default {DEFAULT_CONCURRENCY}); body streams are capped at half of it",
    )
    parser.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    parser.add_argument("--json", action="store_true", help="print one JSON event per line (for CI logs)")


def _options(args: argparse.Namespace, cancel: threading.Event) -> TransportOptions:
    concurrency = args.concurrency
    return TransportOptions(
        insecure=args.insecure,
        max_requests=concurrency,
        max_streams=max(1, (concurrency + 1) // 2),
        cancel=cancel,
    )


def _reporter(args: argparse.Namespace, operation: str) -> Reporter:
    if args.json:
        return JsonReporter(operation)
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return Reporter()
    return RichReporter(operation)


def _summary(operation: str, result: CopyResult) -> str:
    if result.up_to_date:
        return f"{result.destination} is up to date ({result.digest}); nothing transferred"
    speed = result.bytes_moved / result.seconds if result.seconds > 0 else 0.0
    parts = [f"{result.transferred} transferred"]
    if result.mounted:
        parts.append(f"{result.mounted} mounted")
    parts.append(f"{result.existing} already present")
    return (
        f"{operation} {result.source} -> {result.destination}\n"
        f"  digest: {result.digest}\n"
        f"  blobs: {result.blobs} ({', '.join(parts)}); moved {_human(result.bytes_moved)}"
        f" of {_human(result.bytes_total)} in {result.seconds:.1f} s ({_human(speed)}/s)"
    )


def run_copy(
    args: argparse.Namespace,
    operation: str,
    source: str,
    destination: str | None,
    local_name: str | None,
    source_in_store: bool = False,
):
    """Shared body of push, pull and copy.

    ``destination`` None means the store, under ``local_name``; ``source_in_store`` reads the
    source from the store even when its name carries a registry host (``imgpack push host/repo:tag``).
    """
    cancel = threading.Event()
    clients = Clients(_options(args, cancel))
    store = Store.open(getattr(args, "store", None))
    reporter = _reporter(args, operation)
    try:
        if source_in_store and not source.startswith("oci:"):
            src = Endpoint(LocalLayout(store, cancel=cancel), str(Reference.parse(source)), "store")
        else:
            src = open_endpoint(source, store=store, clients=clients, write=False, cancel=cancel)
        if destination is None:
            dst_target, dst_ref = LocalLayout(store, cancel=cancel), local_name
        else:
            dst = open_endpoint(destination, store=store, clients=clients, write=True, cancel=cancel)
            dst_target, dst_ref = dst.target, (dst.reference if dst.kind != "store" else local_name)
        if src.reference is None:
            raise UsageError(f"{source}: needs a tag or digest")
        result = copy_model(
            src.target,
            src.reference,
            dst_target,
            dst_ref,
            concurrency=args.concurrency,
            reporter=reporter,
            cancel=cancel,
            sources=BlobSources.for_store(store.root),
        )
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        reporter.close()
        clients.close()
    if not args.json and not getattr(args, "quiet", False):
        print(_summary(operation, result))
        if destination is None and local_name is None:
            ref = Reference.parse(source)
            print(f"  stored untagged; refer to it as {ref.name}@{result.digest}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    source = args.ref
    destination = args.dest or args.ref
    if not destination.startswith("oci:") and Reference.parse(destination).registry is None:
        raise UsageError(
            f"push: {destination!r} has no registry host; use `imgpack push {args.ref} HOST[:PORT]/REPO:TAG`"
        )
    return run_copy(args, "Pushed", source, destination, None, source_in_store=True)


def cmd_pull(args: argparse.Namespace) -> int:
    ref = Reference.parse(args.ref)
    if ref.registry is None:
        raise UsageError(f"pull: {args.ref!r} has no registry host (expected HOST[:PORT]/REPO[:TAG])")
    local = str(Reference(ref.registry, ref.repository, ref.tag)) if ref.tag else None
    return run_copy(args, "Pulled", args.ref, None, local)


def cmd_copy(args: argparse.Namespace) -> int:
    dst_ref = None
    if not args.dst.startswith("oci:"):
        parsed = Reference.parse(args.dst)
        if parsed.registry is None:
            dst_ref = str(parsed)
    return run_copy(args, "Copied", args.src, args.dst, dst_ref)


def cmd_tags(args: argparse.Namespace) -> int:
    ref = Reference.parse(args.repo, default_tag=None)
    if ref.registry is None:
        raise UsageError(f"tags: {args.repo!r} has no registry host (expected HOST[:PORT]/REPO)")
    options = TransportOptions(insecure=args.insecure)
    client = RegistryClient(ref.registry, credentials.lookup(ref.registry), options)
    try:
        tags = RemoteRepository(client, ref.repository).tags()
    finally:
        client.close()
    if args.json:
        print(json.dumps({"repository": ref.name, "tags": tags}))
    else:
        for tag in tags:
            print(tag)
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    host = credentials.normalize_host(args.registry)
    if not host:
        raise UsageError("login: empty registry host")
    username = args.username
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("login: give -u USER when not on a terminal")
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("login: use --password-stdin to pass the password without a terminal")
    if not username or not password:
        raise UsageError("login: username and password must not be empty")
    cred = credentials.Credential(username=username, password=password, source="imgpack login")
    client = RegistryClient(host, cred, TransportOptions(insecure=args.insecure))
    try:
        client.ping()
    finally:
        client.close()
    path = credentials.store_login(host, username, password)
    if not getattr(args, "quiet", False):
        print(f"Login succeeded for {username} at {host} (saved in {path})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    host = credentials.normalize_host(args.registry)
    removed = credentials.remove_login(host)
    if not getattr(args, "quiet", False):
        print(f"Removed credentials for {host}" if removed else f"Not logged in to {host}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the registry commands to imgpack's parser."""
    p = subparsers.add_parser("push", help="upload a stored model to a registry (or an oci: layout)")
    p.add_argument("ref", metavar="REF", help="stored model (or oci:PATH[:TAG])")
    p.add_argument("dest", metavar="DEST", nargs="?", help="HOST[:PORT]/REPO[:TAG] (default: REF itself)")
    _transfer_options(p)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("pull", help="download a model from a registry into the store")
    p.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    _transfer_options(p)
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("copy", help="copy a model between registries, layouts and the store")
    p.add_argument("src", metavar="SRC", help="HOST/REPO:TAG, oci:PATH[:TAG] or a stored model")
    p.add_argument("dst", metavar="DST", help="HOST/REPO:TAG, oci:PATH[:TAG] or a store name")
    _transfer_options(p)
    p.set_defaults(func=cmd_copy)

    p = subparsers.add_parser("tags", help="list the tags of a registry repository")
    p.add_argument("repo", metavar="REPO", help="HOST[:PORT]/REPO")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tags)

    p = subparsers.add_parser("login", help="save credentials for a registry (verified first)")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.set_defaults(func=cmd_login)

    p = subparsers.add_parser("logout", help="forget saved credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)
