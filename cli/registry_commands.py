"""``imgpack push / pull / copy / tags / login / logout``: registry commands.

Every transfer goes through :mod:`imgpack.registry.operations`; these handlers turn options into settings, pick a
reporter (rich bar on a TTY, JSON lines with ``--json``, nothing with ``--quiet``) and print a summary. Errors
are ImgpackError subclasses whose exit codes the main entry point uses (usage 2, auth 3, not found 4, transfer
5, integrity 6).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from imgpack.cli.ui import emit_json, human_bytes, safe
from imgpack.schemas.errors import UsageError

DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64


def _concurrency(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: {value!r} is not an integer") from None
    if not 1 <= n <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"--concurrency: must be between 1 and {MAX_CONCURRENCY}, got {n}")
    return n


def _max_layers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-layers: {value!r} is not an integer") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"--max-layers: must be at least 2, got {n}")
    return n


def _settings(args: argparse.Namespace):  # noqa: ANN202 - TransferSettings
    from imgpack.registry.model import Selection
    from imgpack.registry.operations import TransferSettings

    selection = None
    if getattr(args, "component", None) or getattr(args, "include", None):
        selection = Selection(components=list(args.component or []), include=list(args.include or []))
    verbose = not getattr(args, "quiet", False) and not args.json

    def log(message: str) -> None:
        if verbose:
            print(f"imgpack: {safe(message)}", file=sys.stderr)

    settings = TransferSettings(
        concurrency=args.concurrency, insecure=args.insecure, ca_file=args.ca_file,
        max_layers=getattr(args, "max_layers", None), mirrors=list(getattr(args, "mirror", None) or []),
        selection=selection, log=log,
    )
    verify_key = getattr(args, "verify_key", None)
    if verify_key is None and getattr(args, "command", None) == "pull":
        from imgpack.cli.signing_commands import policy_key

        verify_key = policy_key(args.ref)
    if verify_key:
        from imgpack.cli.signing_commands import pull_policy

        settings.verify_root = pull_policy(verify_key, args)
    return settings


def _reporter(args: argparse.Namespace, operation: str):  # noqa: ANN202 - a Reporter
    from imgpack.cli.progress import RichReporter
    from imgpack.registry.progress import JsonReporter, Reporter

    if args.json:
        return JsonReporter(operation)
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return Reporter()
    return RichReporter(operation)


def _summary(operation: str, result: Any) -> str:
    if result.up_to_date:
        return f"{safe(result.destination)} is up to date ({result.digest}); nothing transferred"
    speed = result.bytes_moved / result.seconds if result.seconds > 0 else 0.0
    parts = [f"{result.transferred} transferred"]
    if result.mounted:
        parts.append(f"{result.mounted} mounted")
    parts.append(f"{result.existing} already present")
    if result.skipped:
        parts.append(f"{result.skipped} left out (partial)")
    lines = [
        f"{operation} {safe(result.source)} -> {safe(result.destination)}",
        f"  digest: {result.digest}",
        f"  blobs: {result.blobs} ({', '.join(parts)}); moved {human_bytes(result.bytes_moved)}"
        f" of {human_bytes(result.bytes_total)} in {result.seconds:.1f} s ({human_bytes(speed)}/s)",
    ]
    if result.pushed_digest:
        lines.append(f"  pushed in index-split form (the registry caps layers): index {result.pushed_digest}")
    if result.referrers:
        lines.append(f"  signatures and referrers copied: {result.referrers}")
    return "\n".join(lines)


def _finish(args: argparse.Namespace, operation: str, result: Any) -> int:
    if not args.json and not getattr(args, "quiet", False):
        print(_summary(operation, result))
    return 0


def _store(args: argparse.Namespace):  # noqa: ANN202 - a Store
    from imgpack.store.store import Store

    return Store.open(getattr(args, "store", None))


def cmd_push(args: argparse.Namespace) -> int:
    from imgpack.registry.operations import push

    result = push(_store(args), args.ref, args.dest, settings=_settings(args), reporter=_reporter(args, "push"))
    return _finish(args, "Pushed", result)


def cmd_pull(args: argparse.Namespace) -> int:
    from imgpack.registry.operations import pull

    result = pull(_store(args), args.ref, settings=_settings(args), reporter=_reporter(args, "pull"))
    return _finish(args, "Pulled", result)


def cmd_copy(args: argparse.Namespace) -> int:
    from imgpack.registry.operations import copy

    result = copy(_store(args), args.src, args.dst, settings=_settings(args), reporter=_reporter(args, "copy"))
    return _finish(args, "Copied", result)


def _client(host: str, args: argparse.Namespace, cred=None):  # noqa: ANN001, ANN202 - a RegistryClient
    from imgpack.registry import credentials
    from imgpack.registry.locations import api_host
    from imgpack.registry.transport import RegistryClient, TransportOptions

    options = TransportOptions(insecure=args.insecure, ca_file=args.ca_file)
    return RegistryClient(host, cred or credentials.lookup(host), options, api_host(host))


def cmd_tags(args: argparse.Namespace) -> int:
    from imgpack.registry.remote import RemoteRepository
    from imgpack.schemas.reference import Reference

    ref = Reference.parse(args.repo, default_tag=None)
    if ref.registry is None:
        raise UsageError(f"tags: {args.repo!r} has no registry host (expected HOST[:PORT]/REPO)")
    client = _client(ref.registry, args)
    try:
        tags = RemoteRepository(client, ref.repository).tags()
    finally:
        client.close()
    if args.json:
        emit_json({"repository": ref.name, "tags": tags})
    else:
        for tag in tags:
            print(safe(tag))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from imgpack.registry import credentials

    host = credentials.normalize_host(args.registry)
    if not host:
        raise UsageError("login: empty registry host")
    username = args.username
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("login: give -u USER when not on a terminal")
        username = input("Username: ").strip()
    if args.password is not None:
        if args.password_stdin:
            raise UsageError("login: --password and --password-stdin are mutually exclusive")
        print("WARNING! Using --password via the CLI is insecure. Use --password-stdin.", file=sys.stderr)
        password = args.password
    elif args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("login: use --password-stdin to pass the password without a terminal")
    if not username or not password:
        raise UsageError("login: username and password must not be empty")
    cred = credentials.Credential(username=username, password=password, source="imgpack login")
    client = _client(host, args, cred)
    try:
        client.ping()
    finally:
        client.close()
    path = credentials.store_login(host, username, password)
    if args.json:
        emit_json({"event": "logged_in", "registry": host, "username": username, "file": str(path)})
    elif not getattr(args, "quiet", False):
        print(f"Login succeeded for {safe(username)} at {host} (saved in {path})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from imgpack.registry import credentials

    host = credentials.normalize_host(args.registry)
    removed = credentials.remove_login(host)
    if args.json:
        emit_json({"event": "logged_out", "registry": host, "removed": removed})
    elif not getattr(args, "quiet", False):
        print(f"Removed credentials for {host}" if removed else f"Not logged in to {host}")
    return 0


def _network(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for registries' TLS certificates"
                   " (also: SSL_CERT_FILE, REQUESTS_CA_BUNDLE, /etc/docker/certs.d/HOST/ca.crt)")


def _transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=_concurrency, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"requests in flight (default {DEFAULT_CONCURRENCY}); body streams are capped at half of it;"
                        " the registry's 429/503 answers lower it for a while")
    _network(p)


def _split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-layers", type=_max_layers, metavar="N",
                   help="push models with more than N layers as an index of part manifests (default: 500 for"
                        " Amazon ECR, none elsewhere; a registry's own layer-limit answer also triggers it)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text[0].upper() +
                              help_text[1:] + ".")

    p = add("push", "upload a stored model (and its signatures) to a registry or an oci: layout")
    p.add_argument("ref", metavar="REF", help="a stored model (its name may carry the registry: HOST/REPO:TAG)")
    p.add_argument("dest", metavar="DEST", nargs="?", help="HOST[:PORT]/REPO[:TAG] or oci:PATH[:TAG] (default: REF)")
    _transfer(p)
    _split(p)
    p.set_defaults(func=cmd_push)

    p = add("pull", "download a model from a registry into the store")
    p.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    _transfer(p)
    p.add_argument("--mirror", action="append", metavar="HOST[:PORT]",
                   help="try this mirror or pull-through cache before the origin (repeatable, in order, after"
                        " the mirrors registries.conf names)")
    p.add_argument("--component", action="append", metavar="NAME",
                   help="fetch only this component's tensors (repeatable); configs and files always come")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="fetch only tensors whose layer name matches GLOB (repeatable)")
    p.add_argument("--verify-key", metavar="PUB",
                   help="refuse the model unless a signature verifies with this public key (before it is stored)")
    p.set_defaults(func=cmd_pull)

    p = add("copy", "copy any OCI graph (a model, an index, a signature) between registries, layouts, ollama"
                    " directories and the store, keeping every digest")
    p.add_argument("src", metavar="SRC", help="HOST/REPO:TAG, oci:PATH[:TAG], ollama:DIR:NAME[:TAG] or a stored model")
    p.add_argument("dst", metavar="DST", help="HOST/REPO:TAG, oci:PATH[:TAG], ollama:DIR:NAME[:TAG] or a store name")
    _transfer(p)
    _split(p)
    p.set_defaults(func=cmd_copy)

    p = add("tags", "list the tags of a registry repository")
    p.add_argument("repo", metavar="REPO", help="HOST[:PORT]/REPO")
    _network(p)
    p.set_defaults(func=cmd_tags)

    p = add("login", "save credentials for a registry (checked against it first)")
    p.add_argument("registry", metavar="REGISTRY", help="registry host, e.g. ghcr.io or 127.0.0.1:5000")
    p.add_argument("-u", "--username", metavar="USER", help="user name (asked for on a terminal)")
    p.add_argument("-p", "--password", metavar="PASSWORD", help="password (insecure: visible to other users;"
                   " prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _network(p)
    p.set_defaults(func=cmd_login)

    p = add("logout", "forget saved credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY", help="registry host")
    p.set_defaults(func=cmd_logout)
