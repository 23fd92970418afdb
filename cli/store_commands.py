"""Commands on the local store: create, convert, export, list, show, tag, rm, verify, prune, save, load."""

from __future__ import annotations

import argparse
import math
from typing import Any

from imgpack.cli import ui
from imgpack.cli.ui import emit_json, markup_safe
from imgpack.schemas.errors import ImgpackError


def _store(args: argparse.Namespace):  # noqa: ANN202 - a Store; imported lazily
    from imgpack.store.store import Store

    return Store.open(args.store)


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def cmd_create(args: argparse.Namespace) -> int:
    from imgpack.packager.create import create_model

    store = _store(args)
    if args.json:
        emit_json({"event": "started", "operation": "create", "name": args.name, "directory": args.directory})
    with ui.byte_progress(f"Packing {args.name}", enabled=not (_quiet(args) or args.json)) as bar:
        result = create_model(
            store, args.name, args.directory, fmt=args.format, exclude=args.exclude, timestamp=args.timestamp,
            follow_external_links=args.follow_external_links, quantize=args.quantize, dtype=args.dtype,
            progress=bar.advance, plan_done=bar.set_total,
        )
    if args.json:
        emit_json({"event": "created", **result.__dict__})
        return 0
    if not _quiet(args):
        ui.out.print(
            f"Created {markup_safe(result.reference)} ({result.digest})\n"
            f"  layers: {result.layers} ({result.tensors} tensors"
            f"{f', {result.quantized} quantized' if result.quantized else ''}"
            f"{f', {result.cast} cast' if result.cast else ''}), {ui.human_bytes(result.total_bytes)}\n"
            f"  new blobs: {result.new_blobs} ({ui.human_bytes(result.new_bytes)}),"
            f" already stored: {result.reused_blobs}, unchanged files not re-read: {result.cached_files}"
        )
        if result.skipped:
            ui.out.print(f"  skipped (legacy weights or --exclude): {markup_safe(', '.join(result.skipped))}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from imgpack.packager.convert import convert_model

    store = _store(args)
    if args.json:
        emit_json({"event": "started", "operation": "convert", "source": args.source, "target": args.target})
    with ui.byte_progress(f"Converting {args.source}", enabled=not (_quiet(args) or args.json)) as bar:
        result = convert_model(store, args.source, args.target, quantize=args.quantize, dtype=args.dtype,
                               progress=bar.advance, plan_done=bar.set_total)
    if args.json:
        emit_json({"event": "converted", **result.__dict__})
    elif not _quiet(args):
        ui.out.print(f"Converted {markup_safe(args.source)} -> {markup_safe(result.reference)} ({result.digest})\n"
                     f"  {result.quantized} tensors quantized, {result.cast} cast, {result.unchanged} unchanged"
                     f" (shared with the source); new blobs: {result.new_blobs}"
                     f" ({ui.human_bytes(result.new_bytes)}), total {ui.human_bytes(result.total_bytes)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgpack.packager.export import export_directory, export_model
    from imgpack.schemas.locations import parse_location

    if parse_location(args.ref).kind == "directory":
        count = export_directory(args.ref, args.directory)
        if args.json:
            emit_json({"event": "exported", "source": args.ref, "files": count, "directory": args.directory})
        elif not _quiet(args):
            ui.out.print(f"Exported {markup_safe(args.ref)} ({count} files) to {markup_safe(args.directory)}")
        return 0
    manifest = export_model(_store(args), args.ref, args.directory)
    if args.json:
        emit_json({"event": "exported", "reference": args.ref, "digest": manifest.digest,
                   "directory": args.directory})
    elif not _quiet(args):
        ui.out.print(f"Exported {markup_safe(args.ref)} ({manifest.digest}) to {markup_safe(args.directory)}")
    return 0


def _is_signature(name: str) -> bool:
    tag = name.rsplit(":", 1)[-1]
    return tag.startswith("sha256-") and (tag.endswith(".sig") or len(tag) == 71)


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = []
    for entry in store.entries():
        if not entry.name or _is_signature(entry.name):
            continue
        try:
            manifest = store.manifest_by_digest(entry.digest, source=entry.name)
            size, fmt = manifest.total_size, manifest.flavour
        except ImgpackError:
            size, fmt = -1, "not a model" if entry.descriptor.is_index else "broken"
        rows.append({"reference": entry.name, "digest": entry.digest, "size": size, "format": fmt,
                     "partial": entry.partial})
    rows.sort(key=lambda r: r["reference"])
    if args.json:
        ui.out.print_json(data=rows)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("REFERENCE", "DIGEST", "SIZE", "FORMAT"):
        table.add_column(col)
    for row in rows:
        fmt = row["format"] + (f" (partial: {row['partial']})" if row["partial"] else "")
        table.add_row(markup_safe(row["reference"]), row["digest"][7:19],
                      ui.human_bytes(row["size"]) if row["size"] >= 0 else "?", markup_safe(fmt))
    ui.out.print(table)
    return 0


def _print_model(reference: str, digest: str, media_type: str, flavour: str, config: dict[str, Any],
                 manifest: Any, tensors: bool, where: str) -> None:
    from rich.table import Table

    ui.out.print(f"[bold]{markup_safe(reference)}[/bold]  {digest}  ({where})")
    ui.out.print(f"  format: {flavour} ({media_type})")
    quant = config.get("quantization")
    ui.out.print(f"  architecture: {markup_safe(config.get('architecture'))}   parameters:"
                 f" {config.get('parameterCount') or 0:,}"
                 f"   tensor bytes: {ui.human_bytes(config.get('tensorBytes', 0))}"
                 f"   dtypes: {markup_safe(', '.join(config.get('dtypes', [])))}"
                 + (f"   quantization: {markup_safe(quant.get('type') if isinstance(quant, dict) else quant)}"
                    if quant else ""))
    comps = Table(title="components", box=None, pad_edge=False, title_justify="left")
    for col in ("COMPONENT", "CLASS", "TENSORS", "PARAMETERS", "BYTES", "DTYPES"):
        comps.add_column(col)
    for name, comp in config.get("components", {}).items():
        cls = f"{comp.get('library') or ''}.{comp.get('class') or ''}".strip(".")
        comps.add_row(markup_safe(name), markup_safe(cls),
                      str(comp.get("tensors", 0)), f"{comp.get('parameters', 0):,}",
                      ui.human_bytes(comp.get("tensorBytes", 0)), markup_safe(", ".join(comp.get("dtypes", []))))
    ui.out.print(comps)
    if tensors:
        table = Table(title="tensors", box=None, pad_edge=False, title_justify="left")
        for col in ("NAME", "DTYPE", "SHAPE", "PARAMS", "DIGEST"):
            table.add_column(col)
        for layer in manifest.tensors:
            table.add_row(markup_safe(layer.name or ""), markup_safe(layer.dtype or ""),
                          "x".join(map(str, layer.shape or [])) or "scalar", f"{math.prod(layer.shape or []):,}",
                          layer.digest[7:19])
        ui.out.print(table)
    else:
        ui.out.print(f"  {len(manifest.tensors)} tensors, {len(manifest.files)} files"
                     " (use --tensors for the tensor table)")
    ui.out.print(f"  files: {markup_safe(', '.join(layer.name or '' for layer in manifest.files))}")


def cmd_show(args: argparse.Namespace) -> int:
    from imgpack.registry.inspect import inspect_model

    info = inspect_model(args.ref, getattr(args, "store", None), insecure=args.insecure, ca_file=args.ca_file)
    if args.json:
        ui.out.print_json(data={"reference": args.ref, "digest": info.digest, "mediaType": info.media_type,
                                "format": info.manifest.flavour, "location": info.where, "config": info.config,
                                "manifest": info.manifest.document, "partial": info.partial,
                                **({"splitIndex": info.split_index} if info.split_index else {})})
        return 0
    _print_model(args.ref, info.digest, info.media_type, info.manifest.flavour, info.config, info.manifest,
                 args.tensors, info.where)
    if info.split_index:
        ui.out.print(f"  stored on the registry in index-split form: index {info.split_index}")
    if info.partial:
        ui.out.print(f"  partial: {markup_safe(info.partial)}; missing components: "
                     f"{markup_safe(', '.join(info.missing_components) or 'none')}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    digest = _store(args).tag(args.source, args.target)
    if args.json:
        emit_json({"event": "tagged", "target": args.target, "digest": digest})
    elif not _quiet(args):
        ui.out.print(f"Tagged {markup_safe(args.target)} -> {digest}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    for ref in args.refs:
        digest = store.remove(ref)
        if args.json:
            emit_json({"event": "removed", "reference": ref, "digest": digest})
        elif not _quiet(args):
            ui.out.print(f"Removed {markup_safe(ref)} (run 'imgpack prune' to free its blobs)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.key:
        from imgpack.cli.signing_commands import verify_signature

        return verify_signature(args)
    from imgpack.conformance.verify import verify_store

    report = verify_store(_store(args), args.ref)
    if args.json:
        ui.out.print_json(data=report.to_json())
    else:
        for problem in report.problems:
            ui.console.print(f"[red]BROKEN[/red] {markup_safe(problem)}")
        for note in report.notes:
            ui.console.print(f"[yellow]NOTE[/yellow] {markup_safe(note)}")
        ui.out.print(
            f"{'OK' if report.ok else 'FAILED'}: {report.manifests} manifest(s), {report.blobs} blobs,"
            f" {ui.human_bytes(report.bytes)} checked, {len(report.problems)} problem(s)"
        )
    return 0 if report.ok else 6


def cmd_prune(args: argparse.Namespace) -> int:
    removed, freed = _store(args).prune()
    if args.json:
        emit_json({"event": "pruned", "files": removed, "bytes": freed})
    elif not _quiet(args):
        ui.out.print(f"Pruned {removed} unreferenced file(s), freed {ui.human_bytes(freed)}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from imgpack.registry.archive import save

    size = save(_store(args), args.refs, args.output, level=args.level)
    if args.json:
        emit_json({"event": "saved", "references": args.refs, "archive": args.output, "bytes": size})
    elif not _quiet(args):
        ui.out.print(f"Saved {markup_safe(', '.join(args.refs))} to {markup_safe(args.output)}"
                     f" ({ui.human_bytes(size)})")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from imgpack.registry.archive import load

    result = load(_store(args), args.archive)
    if args.json:
        emit_json({"event": "loaded", **result.__dict__})
    elif not _quiet(args):
        ui.out.print(f"Loaded {markup_safe(', '.join(result.references))}: {result.blobs} blobs"
                     f" ({result.new_blobs} new, {ui.human_bytes(result.bytes)})")
    return 0


def _storage_options(p: argparse.ArgumentParser) -> None:
    from imgpack.schemas.quantized import ALIASES, QUANT_TYPES

    p.add_argument("--quantize", metavar="TYPE", choices=[*QUANT_TYPES, *ALIASES],
                   help="store the transformer's and text encoder's linear weights quantized: int8, int4, mxfp8 or"
                        " nvfp4 (aliases q8, q4, fp8, fp4); needs the runtime extra (MLX)")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"),
                   help="cast every other floating-point tensor to this dtype (the real Z-Image-Turbo transformer is"
                        " f32 on disk: bf16 halves it)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    def add(name: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text[0].upper() +
                              help_text[1:] + ".", **kw)

    p = add("create", "pack a diffusers model directory into the store")
    p.add_argument("name", metavar="NAME[:TAG]", help="the model's name in the store")
    p.add_argument("directory", metavar="DIR", help="a diffusers model directory (with model_index.json)")
    p.add_argument("--format", choices=("oci", "ollama"), default="oci", help="manifest flavour (default: oci)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching GLOB (repeatable)")
    p.add_argument("--timestamp", action="store_true", help="record the creation time (changes the digest)")
    p.add_argument("--follow-external-links", action="store_true",
                   help="pack what symbolic links leaving the model folder point to (refused by default)")
    _storage_options(p)
    p.set_defaults(func=cmd_create)

    p = add("convert", "write a quantized or cast copy of a stored model (unchanged tensors share its blobs)")
    p.add_argument("source", metavar="SRC", help="a stored model")
    p.add_argument("target", metavar="DST", help="the new model's name")
    _storage_options(p)
    p.set_defaults(func=cmd_convert)

    p = add("export", "rebuild a diffusers directory from the store, bit-exact")
    p.add_argument("ref", metavar="REF", help="a stored model, or a directory of layer files (an oras pull, a"
                   " Kubernetes image volume: ./DIR or /DIR)")
    p.add_argument("directory", metavar="DIR", help="where to write it (must not exist, or be empty)")
    p.set_defaults(func=cmd_export)

    p = add("list", "list models in the store", aliases=["ls"])
    p.set_defaults(func=cmd_list)

    p = add("show", "show a model's components and tensors (stored, or on a registry: manifest and config only)")
    p.add_argument("ref", metavar="REF", help="a stored model, HOST/REPO:TAG, oci:PATH[:TAG] or ollama:DIR:NAME")
    p.add_argument("--tensors", action="store_true", help="print the full tensor table")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS certificate")
    p.set_defaults(func=cmd_show)

    p = add("tag", "give a stored model another name")
    p.add_argument("source", metavar="SRC", help="a stored model")
    p.add_argument("target", metavar="DST", help="the new name")
    p.set_defaults(func=cmd_tag)

    p = add("rm", "untag models (their blobs stay until prune)")
    p.add_argument("refs", metavar="REF", nargs="+", help="stored models")
    p.set_defaults(func=cmd_rm)

    p = add("verify", "re-hash blobs and check every stored model against spec v1 (or, with --key, a model's"
                      " signature)")
    p.add_argument("ref", metavar="REF", nargs="?", help="one model: stored (default: all), or with --key also"
                   " HOST/REPO:TAG or oci:PATH[:TAG]")
    p.add_argument("--key", metavar="PUB", help="check instead that a signature by this public key names the model")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS certificate")
    p.set_defaults(func=cmd_verify)

    p = add("save", "write models to one .tar.zst archive (an OCI layout) for offline transfer")
    p.add_argument("refs", metavar="REF", nargs="+", help="stored models")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="archive to write, e.g. model.tar.zst")
    p.add_argument("--level", type=int, default=3, metavar="N", help="zstd level (default 3)")
    p.set_defaults(func=cmd_save)

    p = add("load", "add the models of a 'save' archive to the store, verifying every blob")
    p.add_argument("archive", metavar="FILE", help="a .tar.zst archive written by 'imgpack save'")
    p.set_defaults(func=cmd_load)

    p = add("prune", "delete blobs no manifest references, and leftover partial downloads")
    p.set_defaults(func=cmd_prune)


