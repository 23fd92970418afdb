"""The ``imgpack`` command line: one parser, commands registered explicitly by the modules that own them.

Each ``*_commands`` module adds its commands with ``register(subparsers, common)`` and imports what its handlers
need only when one runs, so ``imgpack --help`` stays fast and works without the optional MLX runtime. The options
every command takes (``--store``, ``-q``, ``--json``) come from one parent parser and may be given before or
after the command. Errors print as ``imgpack: error: …`` — or, with ``--json``, as one ``{"event": "error"}``
line — with untrusted text escaped, and exit with the code the error class carries.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imgpack.cli import (
    conformance_commands,
    registry_commands,
    runtime_commands,
    server_commands,
    signing_commands,
    store_commands,
)
from imgpack.cli.ui import emit_json, safe
from imgpack.schemas.errors import ImgpackError, UsageError

#: Exit codes and the names ``--json`` error events give them.
ERROR_CODES = {1: "bad_input", 2: "usage", 3: "auth", 4: "not_found", 5: "transfer", 6: "integrity",
               130: "interrupted"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse exits 2 itself; keep our format
        self.print_usage(sys.stderr)
        raise UsageError(message)


def version() -> str:
    from importlib import metadata  # here, not at the top: it costs every command ~0.1 s of CPU

    try:
        return metadata.version("imgpack")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def common_options(suppress: bool) -> Parser:
    """``--store``, ``-q`` and ``--json``; on subcommands their defaults are suppressed so values given before
    the command survive."""
    default = argparse.SUPPRESS if suppress else None
    parent = Parser(add_help=False)
    parent.add_argument("--store", metavar="DIR", default=default,
                        help="store directory (default: $IMGPACK_HOME or ~/.imgpack)")
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="print nothing but errors")
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="print machine-readable JSON (events, one per line, for long operations)")
    return parent


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        emit_json({"event": "version", "version": version(), "python": sys.version.split()[0]})
    else:
        print(f"imgpack {version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="imgpack", parents=[common_options(False)],
                    description="Ship image-generation models through OCI registries, and run them.")
    parser.add_argument("--version", action="version", version=f"imgpack {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    common = common_options(True)
    for module in (store_commands, registry_commands, signing_commands, runtime_commands, server_commands,
                   conformance_commands):
        module.register(sub, common)
    p = sub.add_parser("version", parents=[common], help="print imgpack's version",
                       description="Print imgpack's version.")
    p.set_defaults(func=cmd_version)
    return parser


def report_error(args: argparse.Namespace | None, code: int, message: str) -> int:
    if args is not None and getattr(args, "json", False):
        emit_json({"event": "error", "code": ERROR_CODES.get(code, "error"), "exit": code, "message": message})
    else:
        print(f"imgpack: error: {safe(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except ImgpackError as e:
        if args is None and "--json" in argv:
            args = argparse.Namespace(json=True)
        return report_error(args, e.exit_code, str(e))
    except KeyboardInterrupt:
        return report_error(args, 130, "interrupted")
    except BrokenPipeError:
        return 141
    except OSError as e:
        # A backstop: commands turn expected OS errors into ImgpackError; anything else still gets a clean line.
        where = f"{e.filename}: " if e.filename else ""
        return report_error(args, 1, f"{where}{e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
