"""``imgpack push / pull / copy / tags / login / logout``: registry commands.

All transfers go through :func:`imgpack.registry.copy.copy_model`; these handlers only turn
arguments into endpoints, pick a reporter (rich bar on a TTY, JSON lines with ``--json``, nothing
with ``--quiet``) and print a summary.  Errors are ImgpackError subclasses, whose exit codes the
main entry point uses (usage 2, auth 3, not found 4, transfer 5, integrity 6).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

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


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    """Defer importing the transfer engine (and requests) until a registry command actually runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module("imgpack.cli.registry_commands"), name)(args)

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the registry commands to imgpack's parser."""
    p = subparsers.add_parser("push", help="upload a stored model to a registry (or an oci: layout)")
    p.add_argument("ref", metavar="REF", help="stored model (or oci:PATH[:TAG])")
    p.add_argument("dest", metavar="DEST", nargs="?", help="HOST[:PORT]/REPO[:TAG] (default: REF itself)")
    _transfer_options(p)
    p.set_defaults(func=_handler("cmd_push"))

    p = subparsers.add_parser("pull", help="download a model from a registry into the store")
    p.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    _transfer_options(p)
    p.set_defaults(func=_handler("cmd_pull"))

    p = subparsers.add_parser("copy", help="copy a model between registries, layouts and the store")
    p.add_argument("src", metavar="SRC", help="HOST/REPO:TAG, oci:PATH[:TAG] or a stored model")
    p.add_argument("dst", metavar="DST", help="HOST/REPO:TAG, oci:PATH[:TAG] or a store name")
    _transfer_options(p)
    p.set_defaults(func=_handler("cmd_copy"))

    p = subparsers.add_parser("tags", help="list the tags of a registry repository")
    p.add_argument("repo", metavar="REPO", help="HOST[:PORT]/REPO")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("cmd_tags"))

    p = subparsers.add_parser("login", help="save credentials for a registry (verified first)")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.set_defaults(func=_handler("cmd_login"))

    p = subparsers.add_parser("logout", help="forget saved credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=_handler("cmd_logout"))
