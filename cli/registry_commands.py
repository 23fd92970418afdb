"""Handlers of the registry commands; imported only when one of them runs (requests is slow to import)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import threading

from imgpack.cli.ui import human_bytes
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
from imgpack.store.store import Store


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
        f"  blobs: {result.blobs} ({', '.join(parts)}); moved {human_bytes(result.bytes_moved)}"
        f" of {human_bytes(result.bytes_total)} in {result.seconds:.1f} s ({human_bytes(speed)}/s)"
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
    # By tag: stored under that tag. By digest: pinned under its digest reference (kept by prune, never :latest).
    local = str(Reference(ref.registry, ref.repository, ref.tag) if ref.tag else ref)
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
