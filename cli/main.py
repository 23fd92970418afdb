"""The ``imgpack`` command line.

Store commands live here; registry, runtime and conformance commands register themselves through a
``register(subparsers)`` function in their own ``cli`` module, imported lazily so ``imgpack --help`` stays
fast and works without the optional MLX runtime installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence

from imgpack.cli import ui
from imgpack.schemas.errors import ImgpackError, UsageError
from imgpack.store.store import Store

#: Subpackages that add commands; each has a ``cli`` module with ``register(subparsers)``.
PLUGINS = ("imgpack.cli.registry_cli", "imgpack.cli.runtime_commands", "imgpack.cli.conformance_commands")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; keep our message format
        self.print_usage(sys.stderr)
        raise UsageError(message)


def cmd_create(args: argparse.Namespace) -> int:
    from imgpack.packager.create import create_model

    store = Store.open(args.store)
    with ui.byte_progress(f"Packing {args.name}", enabled=not args.quiet) as bar:
        result = create_model(
            store, args.name, args.directory, fmt=args.format, exclude=args.exclude,
            timestamp=args.timestamp, progress=bar.advance, plan_done=bar.set_total,
        )
    if args.json:
        ui.out.print_json(data=result.__dict__)
        return 0
    if not args.quiet:
        ui.out.print(
            f"Created {result.reference} ({result.digest})\n"
            f"  layers: {result.layers} ({result.tensors} tensors), {ui.human_bytes(result.total_bytes)}\n"
            f"  new blobs: {result.new_blobs} ({ui.human_bytes(result.new_bytes)}),"
            f" already stored: {result.reused_blobs}, unchanged files not re-read: {result.cached_files}"
        )
        if result.skipped:
            ui.out.print(f"  skipped (legacy weights or --exclude): {', '.join(result.skipped)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgpack.packager.export import export_model

    manifest = export_model(Store.open(args.store), args.ref, args.directory)
    if not args.quiet:
        ui.out.print(f"Exported {args.ref} ({manifest.digest}) to {args.directory}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = Store.open(args.store)
    rows = []
    for ref, digest in store.list():
        try:
            manifest = store.manifest_by_digest(digest, source=ref)
            size, fmt = manifest.total_size, manifest.flavour
        except ImgpackError:
            size, fmt = -1, "broken"
        rows.append({"reference": ref, "digest": digest, "size": size, "format": fmt})
    if args.json:
        ui.out.print_json(data=rows)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("REFERENCE", "DIGEST", "SIZE", "FORMAT"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["reference"], row["digest"][7:19], ui.human_bytes(row["size"]) if row["size"] >= 0
                      else "?", row["format"])
    ui.out.print(table)
    return 0


def _config_summary(store: Store, manifest) -> dict:
    """The config blob when it is imgpack's; otherwise (e.g. written by ollama) a summary made from the layers."""
    from imgpack.packager.create import model_config
    from imgpack.schemas.validate import schema_errors

    try:
        config = json.loads(store.read_blob(manifest.config.digest))
        if not schema_errors("config", config):
            return config
    except (ValueError, ImgpackError):
        pass
    model_index: dict = {"_class_name": "unknown"}
    if (layer := manifest.find("model_index.json")) is not None:
        try:
            model_index = json.loads(store.read_blob(layer.digest))
        except (ValueError, ImgpackError):
            pass
    if not isinstance(model_index, dict) or not isinstance(model_index.get("_class_name"), str):
        model_index = {"_class_name": "unknown"}
    tensors = [t for t in manifest.tensors if t.dtype is not None and t.shape is not None]
    return model_config(model_index, tensors, None) | {"imgpackVersion": "n/a (config not written by imgpack)"}


def cmd_show(args: argparse.Namespace) -> int:
    store = Store.open(args.store)
    manifest = store.get_manifest(args.ref)
    config = _config_summary(store, manifest)
    if args.json:
        ui.out.print_json(data={
            "reference": args.ref, "digest": manifest.digest, "mediaType": manifest.media_type,
            "format": manifest.flavour, "config": config, "manifest": manifest.document,
        })
        return 0
    from rich.table import Table

    ui.out.print(f"[bold]{args.ref}[/bold]  {manifest.digest}")
    ui.out.print(f"  format: {manifest.flavour} ({manifest.media_type})")
    ui.out.print(f"  architecture: {config.get('architecture')}   parameters: {config.get('parameterCount'):,}"
                 f"   tensor bytes: {ui.human_bytes(config.get('tensorBytes', 0))}   dtypes: "
                 f"{', '.join(config.get('dtypes', []))}")
    comps = Table(title="components", box=None, pad_edge=False, title_justify="left")
    for col in ("COMPONENT", "CLASS", "TENSORS", "PARAMETERS", "BYTES", "DTYPES"):
        comps.add_column(col)
    for name, comp in config.get("components", {}).items():
        comps.add_row(name, f"{comp.get('library') or ''}.{comp.get('class') or ''}".strip("."),
                      str(comp["tensors"]), f"{comp['parameters']:,}", ui.human_bytes(comp["tensorBytes"]),
                      ", ".join(comp.get("dtypes", [])))
    ui.out.print(comps)
    if args.tensors:
        table = Table(title="tensors", box=None, pad_edge=False, title_justify="left")
        for col in ("NAME", "DTYPE", "SHAPE", "PARAMS", "DIGEST"):
            table.add_column(col)
        for layer in manifest.tensors:
            table.add_row(layer.name or "", layer.dtype or "", "x".join(map(str, layer.shape or [])) or "scalar",
                          f"{math.prod(layer.shape or []):,}", layer.digest[7:19])
        ui.out.print(table)
    else:
        ui.out.print(f"  {len(manifest.tensors)} tensors, {len(manifest.files)} files"
                     " (use --tensors for the tensor table)")
    files = ", ".join(layer.name or "" for layer in manifest.files)
    ui.out.print(f"  files: {files}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    digest = Store.open(args.store).tag(args.source, args.target)
    if not args.quiet:
        ui.out.print(f"Tagged {args.target} -> {digest}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = Store.open(args.store)
    for ref in args.refs:
        store.remove(ref)
        if not args.quiet:
            ui.out.print(f"Removed {ref} (run 'imgpack prune' to free its blobs)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = Store.open(args.store).verify(args.ref)
    if args.json:
        ui.out.print_json(data=report.__dict__ | {"ok": report.ok})
    else:
        for problem in report.problems:
            ui.console.print(f"[red]BROKEN[/red] {problem}")
        ui.out.print(
            f"{'OK' if report.ok else 'FAILED'}: {report.manifests} manifest(s), {report.blobs} blobs,"
            f" {ui.human_bytes(report.bytes)} checked, {len(report.problems)} problem(s)"
        )
    return 0 if report.ok else 6


def cmd_prune(args: argparse.Namespace) -> int:
    removed, freed = Store.open(args.store).prune()
    if not args.quiet:
        ui.out.print(f"Pruned {removed} unreferenced file(s), freed {ui.human_bytes(freed)}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from imgpack.registry.archive import save

    size = save(Store.open(args.store), args.refs, args.output, level=args.level)
    if not args.quiet:
        ui.out.print(f"Saved {', '.join(args.refs)} to {args.output} ({ui.human_bytes(size)})")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from imgpack.registry.archive import load

    result = load(Store.open(args.store), args.archive)
    if not args.quiet:
        ui.out.print(f"Loaded {', '.join(result.references)}: {result.blobs} blobs"
                     f" ({result.new_blobs} new, {ui.human_bytes(result.bytes)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgpack", description="Ship image-generation models through OCI registries.")
    parser.add_argument("--store", metavar="DIR", help="store directory (default: $IMGPACK_HOME or ~/.imgpack)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("create", help="pack a diffusers model directory into the store")
    p.add_argument("name", metavar="NAME[:TAG]")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--format", choices=("oci", "ollama"), default="oci", help="manifest flavour (default: oci)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching GLOB (repeatable)")
    p.add_argument("--timestamp", action="store_true", help="record the creation time (changes the digest)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("export", help="rebuild a diffusers directory from the store, bit-exact")
    p.add_argument("ref", metavar="REF")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("list", aliases=["ls"], help="list models in the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show a model's components and tensors")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--tensors", action="store_true", help="print the full tensor table")
    p.add_argument("--json", action="store_true", help="print manifest and config as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("tag", help="give a stored model another name")
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rm", help="untag models (blobs stay until prune)")
    p.add_argument("refs", metavar="REF", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("verify", help="re-hash blobs and validate manifests")
    p.add_argument("ref", metavar="REF", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("save", help="write models to one .tar.zst archive (an OCI layout) for offline transfer")
    p.add_argument("refs", metavar="REF", nargs="+")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="archive to write, e.g. model.tar.zst")
    p.add_argument("--level", type=int, default=3, metavar="N", help="zstd level (default 3)")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("load", help="add the models of a 'save' archive to the store, verifying every blob")
    p.add_argument("archive", metavar="FILE")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("prune", help="delete blobs no manifest references")
    p.set_defaults(func=cmd_prune)

    for module_name in PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        module.register(sub)
    for command in set(sub.choices.values()):
        _add_common_options(command)
    return parser


def _add_common_options(command: argparse.ArgumentParser) -> None:
    """Accept --store and --quiet after the subcommand too, without overriding values given before it."""
    known = command._option_string_actions
    if "--store" not in known:
        command.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if "--quiet" not in known and "-q" not in known:
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except ImgpackError as e:
        print(f"imgpack: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("imgpack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:
        # A backstop: commands turn expected OS errors into ImgpackError; anything else still gets a clean line.
        where = f"{e.filename}: " if e.filename else ""
        print(f"imgpack: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
