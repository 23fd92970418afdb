"""``imgpack verify``: is every stored model intact and well-formed?

It runs the conformance artifact checks (:mod:`imgpack.conformance.artifact`) on each stored model — every blob
re-hashed, manifest, names, config, tensor headers, files, and the architecture's tensor rules — and reports each
failure with its check id, so ``verify`` and ``imgpack conformance`` can never disagree. Blobs shared by several
models are hashed once. Other artifacts in the store (signatures, indexes) have their blobs checked. A model
pulled in part (``pull --component``) is checked for what it holds; the blobs it left out are notes, not
problems.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imgpack.conformance.artifact import check_artifact
from imgpack.conformance.report import FAIL
from imgpack.conformance.sources import Source
from imgpack.registry.layout import LayoutTarget
from imgpack.registry.model import describe_artifact
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.graph import parse_node
from imgpack.store.store import IndexEntry, Store


@dataclass
class VerifyReport:
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Check ids that failed, per reference.
    failed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def _subject(subject: str) -> str:
    return "config blob" if subject == "config" else subject


def _check_model(store: Store, target: LayoutTarget, entry: IndexEntry, report: VerifyReport,
                 cache: dict[str, tuple[int | None, str | None]]) -> None:
    name = entry.name or entry.digest
    source = Source(label=name, target=target, root=entry.descriptor, kind="store",
                    descriptor=next((e for e in store.index_entries() if e.get("digest") == entry.digest), None))
    result = check_artifact(source, cache)
    missing_ok: set[str] = set()
    if entry.partial:
        try:
            manifest = store.manifest_by_digest(entry.digest, source=name)
            missing_ok = {layer.digest for layer in manifest.layers if not store.has_blob(layer.digest)}
        except ImgpackError:
            pass
    failed = []
    for finding in result.findings:
        if finding.status != FAIL:
            continue
        if finding.check == "BLB-001" and any(d in finding.message for d in missing_ok):
            continue
        report.problems.append(f"{name}: {_subject(finding.subject)}: {finding.message} ({finding.check})")
        failed.append(finding.check)
    if missing_ok:
        report.notes.append(f"{name}: partial model ({entry.partial}); {len(missing_ok)} blobs not pulled")
    if failed:
        report.failed[name] = sorted(set(failed))
    report.blobs += int(result.info.get("layers", 0)) + 1


def _check_graph(store: Store, entry: IndexEntry, report: VerifyReport,
                 cache: dict[str, tuple[int | None, str | None]]) -> None:
    """A stored artifact that is not a model: every node and blob it reaches must be present and intact."""
    name = entry.name or entry.digest
    pending = [entry.descriptor]
    seen: set[str] = set()
    while pending:
        desc = pending.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        if not store.has_blob(desc.digest):
            report.problems.append(f"{name}: {desc.media_type} {desc.digest} is missing (BLB-001)")
            continue
        size = store.blob_size(desc.digest)
        if size != desc.size:
            report.problems.append(f"{name}: {desc.digest} is {size} bytes, the manifest says {desc.size} (BLB-002)")
            continue
        try:
            store.read_blob(desc.digest)
        except ImgpackError as e:
            report.problems.append(f"{name}: {e} (BLB-003)")
            continue
        report.blobs += 1
        if desc.is_graph_node:
            try:
                node = store.node(desc.digest, desc.media_type)
            except ImgpackError as e:
                report.problems.append(f"{name}: {e}")
                continue
            pending.extend(node.children)


def verify_store(store: Store, ref: str | None = None) -> VerifyReport:
    """Check one stored model (or everything the index names)."""
    report = VerifyReport()
    target = LayoutTarget(store)
    if ref is not None:
        parsed, digest = store.resolve(ref)
        name = str(parsed.with_tag(parsed.tag)) if parsed.tag else str(parsed)
        entries = [next((e for e in store.entries() if e.digest == digest and e.name == name),
                        next(e for e in store.entries() if e.digest == digest))]
    else:
        entries = store.entries()
    cache: dict[str, tuple[int | None, str | None]] = {}
    for entry in entries:
        report.manifests += 1
        try:
            raw = store.read_blob(entry.digest, verify=False)
            node = parse_node(raw, entry.name or entry.digest, entry.descriptor.media_type)
            foreign = describe_artifact(node) is not None
        except ImgpackError:
            foreign = False  # the artifact checks say what is wrong with it
        if foreign:
            _check_graph(store, entry, report, cache)
        else:
            _check_model(store, target, entry, report, cache)
    report.bytes = sum(size for size, _ in cache.values() if size)
    return report


__all__ = ["VerifyReport", "verify_store"]
