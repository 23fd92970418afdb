"""Artifact conformance: does one manifest, its config and its blobs meet imgpack spec v1?

The checks run in dependency order — manifest, names, blobs, config, tensor headers, files, architecture —
and each reports under its own id, so one defect fails one check: a later check skips the subjects an
earlier one already condemned (a missing blob is BLB-001, not also a bad tensor header).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import jsonschema

from imgpack import architectures
from imgpack.architectures.base import ConfigProblem, canonical_name
from imgpack.conformance.catalog import ARTIFACT_CHECKS, CHECKS
from imgpack.conformance.report import PASS, Report
from imgpack.conformance.sources import LayoutProblem, Source
from imgpack.schemas import spec
from imgpack.schemas.content import (
    MAX_CONFIG_BLOB,
    MAX_FILE_LAYER,
    config_problems,
    header_layer_problems,
    json_problems,
    tensor_problems,
)
from imgpack.schemas.digest import is_digest
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.graph import parse_node
from imgpack.schemas.manifest import title_for
from imgpack.schemas.names import name_problem
from imgpack.schemas.quantized import blob_quantization, legacy_quant_type, pair_separate_layers
from imgpack.schemas.validate import schema


@dataclass
class Desc:
    """A descriptor from the manifest, read leniently (fields may be missing or of the wrong type)."""

    index: int  # -1 for the config
    media_type: Any
    digest: Any
    size: Any
    name: Any
    dtype: Any
    shape: Any
    annotations: Any

    @property
    def subject(self) -> str:
        if self.index < 0:
            return "config"
        return f"layer {self.name!r}" if isinstance(self.name, str) else f"layers[{self.index}]"

    @property
    def usable(self) -> bool:
        """Enough to fetch the blob: a well-formed digest and a non-negative integer size."""
        return is_digest(self.digest) and isinstance(self.size, int) and not isinstance(self.size, bool) \
            and self.size >= 0

    @property
    def is_tensor(self) -> bool:
        return self.media_type == spec.TENSOR_MEDIA_TYPE

    @property
    def is_header(self) -> bool:
        return self.media_type == spec.SAFETENSORS_HEADER_MEDIA_TYPE

    @property
    def is_json(self) -> bool:
        return self.media_type in spec.JSON_LAYER_TYPES

    @classmethod
    def read(cls, index: int, d: Any) -> Desc:
        d = d if isinstance(d, dict) else {}
        return cls(index, d.get("mediaType"), d.get("digest"), d.get("size"), d.get("name"), d.get("dtype"),
                   d.get("shape"), d.get("annotations"))


@dataclass
class TensorInfo:
    """What the suite learned about one tensor layer: dtype and shape from descriptor or blob header."""

    desc: Desc
    dtype: str | None
    shape: list[int] | None


class ArtifactCheck:
    """One run of the artifact checks over a :class:`Source`."""

    def __init__(self, source: Source, hash_cache: dict[str, tuple[int | None, str | None]] | None = None) -> None:
        self.source = source
        self.hash_cache = hash_cache if hash_cache is not None else {}
        self.report = Report(target=source.label, kind="artifact")
        self.report.info.update({"source": source.kind, **source.details})
        self.flavour = "oci"
        self.document: dict[str, Any] = {}
        self.config: Desc | None = None
        self.layers: list[Desc] = []
        #: Digests whose blob is present, of the right size and content (safe to read).
        self.good_blobs: set[str] = set()
        self.blob_sizes: dict[str, int] = {}
        self.files: dict[str, Any] = {}  # JSON layer name -> parsed document
        self.tensors: dict[str, TensorInfo] = {}
        #: Quantized tensors whose logical shape the descriptor does not give (ollama's layers carry none).
        self.quantized: set[str] = set()

    def warn_if_ollama(self, check: str) -> bool:
        return self.flavour == "ollama" and CHECKS[check].ollama_warns

    def fail(self, check: str, subject: str, message: str) -> None:
        self.report.fail(check, subject, message, warn=self.warn_if_ollama(check))

    def run(self) -> Report:
        report = self.report
        try:
            raw = self.source.manifest_bytes()
        except (LayoutProblem, OSError) as e:
            report.fail("LAY-001", self.source.label, str(e))
            return self._skip_rest("the target could not be read")
        report.add("LAY-001", PASS, self.source.label, f"{self.source.kind} target resolved to a manifest")
        raw = self._unsplit(raw)
        if self._foreign(raw):
            return self._skip_rest("not an imgpack model")
        if not self._manifest(raw):
            return self._skip_rest("the manifest could not be read")
        self._descriptor(raw)
        self._layer_descriptors()
        self._names()
        self._blobs()
        self._config()
        self._tensor_blobs()
        self._files()
        self._header_layers()
        self._january_quantized()
        self._config_summary()
        self._architecture()
        for check in ARTIFACT_CHECKS:
            report.start(check)
        return report

    def _foreign(self, raw: bytes) -> bool:
        """A container image, a ModelPack model, an oras artifact: named once, not failed check by check."""
        from imgpack.registry.model import describe_artifact, foreign_hint

        try:
            foreign = describe_artifact(parse_node(raw, self.source.label))
        except ImgpackError:
            return False  # the manifest checks say what is wrong with it
        if foreign is None:
            return False
        self.report.info["foreign"] = foreign
        self.report.fail("MAN-003", self.source.label, f"{foreign}, not an imgpack model; {foreign_hint(foreign)}")
        return True

    def _unsplit(self, raw: bytes) -> bytes:
        """An index-split model is checked as the manifest it carries (the parts are checked to cover it)."""
        from imgpack.registry.model import unsplit

        target, root = self.source.target, self.source.root
        if target is None or root is None or not root.is_index:
            return raw
        try:
            model, model_raw = unsplit(target, root, raw)
        except ImgpackError as e:
            self.report.info["split"] = f"unreadable split form: {e}"
            return raw
        if model.digest != root.digest:
            self.report.info["split"] = f"index-split form (index {root.digest}) of manifest {model.digest}"
            self.source.descriptor = None
        return model_raw

    def _skip_rest(self, why: str) -> Report:
        for check in ARTIFACT_CHECKS:
            if check not in self.report.ran:
                self.report.skip(check, f"not run: {why}")
        return self.report

    # -- manifest -------------------------------------------------------------------------------------

    def _manifest(self, raw: bytes) -> bool:
        r = self.report
        if len(raw) > spec.MAX_MANIFEST_BYTES:
            r.fail("MAN-001", "manifest", f"{len(raw)} bytes, over the {spec.MAX_MANIFEST_BYTES}-byte limit")
            return False
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            r.fail("MAN-001", "manifest", f"not valid JSON: {e}")
            return False
        if not isinstance(document, dict):
            r.fail("MAN-001", "manifest", f"is a JSON {type(document).__name__}, not an object")
            return False
        if document.get("mediaType") in (spec.OCI_INDEX, spec.DOCKER_MANIFEST_LIST):
            r.fail("MAN-001", "manifest", f"is an image index ({document['mediaType']}), not a model manifest")
            return False
        r.add("MAN-001", PASS, "manifest", f"{len(raw)} bytes of JSON")
        self.document = document
        self.flavour = "ollama" if document.get("mediaType") == spec.DOCKER_MANIFEST else "oci"
        r.info["flavour"] = self.flavour
        r.info["mediaType"] = document.get("mediaType")
        r.info["digest"] = "sha256:" + hashlib.sha256(raw).hexdigest()
        self._schema(document)
        self._media_types(document)
        self.config = Desc.read(-1, document.get("config"))
        layers = document.get("layers")
        self.layers = [Desc.read(i, d) for i, d in enumerate(layers)] if isinstance(layers, list) else []
        if not isinstance(document.get("config"), dict) or not isinstance(layers, list):
            return False
        r.info["layers"] = len(self.layers)
        r.info["tensors"] = sum(1 for d in self.layers if d.is_tensor)
        return True

    def _schema(self, document: dict[str, Any]) -> None:
        """MAN-002, with the errors other checks own (media types, names, dtype/shape) sent to them."""
        validator = jsonschema.Draft202012Validator(schema("manifest"))
        general = 0
        for error in sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path]):
            path = list(error.absolute_path)
            where = ".".join(str(p) for p in path) or "(top level)"
            if path and path[-1] == "mediaType" or (not path and "artifactType" in error.message) or \
                    path == ["artifactType"]:
                continue  # MAN-003 examines media types itself
            if len(path) >= 2 and path[0] == "layers" and (path[2:3] == ["name"] or
                                                            (error.validator == "required" and "'name'" in
                                                             error.message)):
                continue  # NAM-001
            if len(path) == 2 and path[0] == "layers" and error.validator == "required" and \
                    ("'dtype'" in error.message or "'shape'" in error.message):
                continue  # MAN-006
            name = None
            if len(path) >= 2 and path[0] == "layers" and isinstance(path[1], int):
                layers = document.get("layers")
                entry = layers[path[1]] if isinstance(layers, list) and path[1] < len(layers) else None
                name = entry.get("name") if isinstance(entry, dict) else None
            subject = f"layer {name!r}" if name else where
            self.report.fail("MAN-002", subject, f"{where}: {error.message[:300]}")
            general += 1
        if not general:
            self.report.add("MAN-002", PASS, "manifest", "valid against manifest.schema.json")

    def _media_types(self, document: dict[str, Any]) -> None:
        r = self.report
        media_type = document.get("mediaType")
        if media_type not in (spec.OCI_MANIFEST, spec.DOCKER_MANIFEST):
            r.fail("MAN-003", "manifest", f"mediaType {media_type!r} is not {spec.OCI_MANIFEST} or"
                                          f" {spec.DOCKER_MANIFEST}")
        if media_type == spec.OCI_MANIFEST and document.get("artifactType") != spec.ARTIFACT_TYPE:
            r.fail("MAN-003", "manifest", f"artifactType {document.get('artifactType')!r} should be"
                                          f" {spec.ARTIFACT_TYPE}")
        config = document.get("config")
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        expected = spec.OLLAMA_CONFIG_MEDIA_TYPE if self.flavour == "ollama" else spec.CONFIG_MEDIA_TYPE
        if config_type != expected:
            r.fail("MAN-003", "config", f"mediaType {config_type!r} should be {expected} in the {self.flavour}"
                                        " flavour")
        layers = document.get("layers")
        for i, d in enumerate(layers if isinstance(layers, list) else []):
            desc = Desc.read(i, d)
            if desc.media_type == spec.OLLAMA_LEGACY_JSON_MEDIA_TYPE:
                r.fail("MAN-003", desc.subject, f"legacy media type {desc.media_type}; readers accept it as JSON,"
                                                f" writers use {spec.JSON_MEDIA_TYPE}", warn=True)
            elif desc.media_type not in spec.LAYER_MEDIA_TYPES:
                r.fail("MAN-003", desc.subject, f"unknown layer mediaType {desc.media_type!r}")
        if not any(f.check == "MAN-003" for f in r.findings):
            r.add("MAN-003", PASS, "manifest", f"{self.flavour} flavour, media types known")

    def _descriptor(self, raw: bytes) -> None:
        r = self.report
        entry = self.source.descriptor
        if not entry:
            r.skip("MAN-004", f"{self.source.kind} targets have no descriptor for the manifest")
            return
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        problems = []
        if entry.get("digest") != digest:
            problems.append(f"digest {entry.get('digest')} but the manifest hashes to {digest}")
        if "size" in entry and entry.get("size") != len(raw):
            where = "index.json" if self.source.kind in ("store", "oci-layout") else "the registry"
            problems.append(f"{where} says the manifest is {entry.get('size')} bytes, it is {len(raw)}")
        if entry.get("mediaType") and entry.get("mediaType") != self.document.get("mediaType"):
            problems.append(f"mediaType {entry.get('mediaType')} but the manifest says"
                            f" {self.document.get('mediaType')}")
        for problem in problems:
            r.fail("MAN-004", "index descriptor", problem)
        if not problems:
            r.add("MAN-004", PASS, "index descriptor", "digest, size and media type match")

    def _layer_descriptors(self) -> None:
        """MAN-005 (title annotations) and MAN-006 (tensor dtype/shape fields)."""
        r = self.report
        for desc in self.layers:
            if not isinstance(desc.name, str):
                continue
            expected = title_for(desc.name, desc.media_type) if isinstance(desc.media_type, str) else desc.name
            annotations = desc.annotations if isinstance(desc.annotations, dict) else {}
            title = annotations.get(spec.TITLE_ANNOTATION)
            if title is None:
                self.fail("MAN-005", desc.subject, f"no {spec.TITLE_ANNOTATION} annotation (expected {expected!r})")
            elif title != expected:
                self.fail("MAN-005", desc.subject, f"{spec.TITLE_ANNOTATION} is {title!r}, expected {expected!r}")
            if desc.is_tensor:
                missing = [k for k, v in (("dtype", desc.dtype), ("shape", desc.shape)) if v is None]
                if missing:
                    self.fail("MAN-006", desc.subject, f"tensor layer has no {' or '.join(missing)};"
                                                       " readers must take them from the blob header")
        if "MAN-005" not in r.ran:
            r.add("MAN-005", PASS, "layers", "every layer's title annotation equals its name")
        if "MAN-006" not in r.ran:
            r.add("MAN-006", PASS, "layers", "every tensor layer declares dtype and shape")

    # -- names ----------------------------------------------------------------------------------------

    def _names(self) -> None:
        r = self.report
        valid: list[Desc] = []
        for desc in self.layers:
            problem = name_problem(desc.name)
            if problem:
                r.fail("NAM-001", desc.subject, f"unsafe name {desc.name!r}: {problem}")
            else:
                valid.append(desc)
        if "NAM-001" not in r.ran:
            r.add("NAM-001", PASS, "layers", f"{len(valid)} names valid and path-safe")
        for headers in (False, True):
            seen: set[str] = set()
            for desc in valid:
                if desc.is_header != headers:
                    continue
                if desc.name in seen:
                    r.fail("NAM-002", desc.subject, f"duplicate layer name {desc.name!r}" +
                           (" (two header layers)" if headers else ""))
                seen.add(desc.name)
        if "NAM-002" not in r.ran:
            r.add("NAM-002", PASS, "layers", "names unique")
        names = {desc.name for desc in valid}
        for name in sorted(names):
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in names:
                    r.fail("NAM-003", f"layer {parent!r}", f"is also the folder of layer {name!r}")
        if "NAM-003" not in r.ran:
            r.add("NAM-003", PASS, "layers", "names lay out as a file tree")
        folded: dict[str, str] = {}
        for name in sorted(names):
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                r.fail("NAM-004", f"layer {name!r}", f"differs from {other!r} only in case; the two collide on"
                                                     " case-insensitive file systems (macOS, Windows)")
        if "NAM-004" not in r.ran:
            r.add("NAM-004", PASS, "layers", "no case-only collisions")

    # -- blobs ----------------------------------------------------------------------------------------

    def _blobs(self) -> None:
        r = self.report
        seen: dict[str, Desc] = {}
        for desc in [self.config, *self.layers] if self.config else self.layers:
            if not desc.usable:
                continue  # MAN-002 reported the malformed digest or size
            first = seen.setdefault(desc.digest, desc)
            if first is not desc:
                if first.size != desc.size:
                    r.fail("BLB-002", desc.subject, f"descriptor size {desc.size} differs from {first.size}, given"
                                                    f" for the same blob by {first.subject}")
                continue
        measured = self._measure(list(seen))
        for digest, desc in seen.items():
            size, actual = measured[digest]
            if size is None:
                r.fail("BLB-001", desc.subject, f"blob {digest} is missing")
                continue
            self.blob_sizes[digest] = size
            if size != desc.size:
                r.fail("BLB-002", desc.subject, f"blob {digest} is {size} bytes, the manifest says {desc.size}")
            if actual != digest:
                r.fail("BLB-003", desc.subject, f"blob {digest} is corrupt: its content hashes to {actual}")
                continue
            self.good_blobs.add(digest)
        for check, text in (("BLB-001", "present"), ("BLB-002", "sizes match"), ("BLB-003", "digests match")):
            if check not in r.ran:
                r.add(check, PASS, "blobs", f"{len(seen)} blobs {text}")

    def _measure(self, digests: list[str]) -> dict[str, tuple[int | None, str | None]]:
        """(size, content digest) of each blob, hashed on a few threads (hashlib releases the GIL); shared blobs
        are hashed once per ``hash_cache``."""
        from concurrent.futures import ThreadPoolExecutor

        def one(digest: str) -> tuple[int | None, str | None]:
            if digest in self.hash_cache:
                return self.hash_cache[digest]
            size = self.source.blob_size(digest)
            if size is None:
                return None, None
            hasher = hashlib.sha256()
            for chunk in self.source.iter_blob(digest):
                hasher.update(chunk)
            result = (size, "sha256:" + hasher.hexdigest())
            self.hash_cache[digest] = result
            return result

        workers = 4 if self.source.kind != "remote" else 8
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return dict(zip(digests, pool.map(one, digests), strict=True))

    def _readable(self, desc: Desc) -> bool:
        return desc.usable and desc.digest in self.good_blobs

    # -- config ---------------------------------------------------------------------------------------

    def _config(self) -> None:
        desc = self.config
        if desc is None or not self._readable(desc):
            self.report.skip("CFG-001", "config blob not readable (see MAN/BLB checks)")
            return
        try:
            raw = self.source.read_blob(desc.digest, MAX_CONFIG_BLOB)
        except ImgpackError as e:
            self.fail("CFG-001", "config", str(e))
            return
        self.config_document, problems = config_problems(raw, "oci")
        for _, message in problems:
            self.fail("CFG-001", "config", message)
        if not problems:
            self.report.add("CFG-001", PASS, "config", "valid against config.schema.json")

    # -- tensor blobs ---------------------------------------------------------------------------------

    def _tensor_blobs(self) -> None:
        r = self.report
        checked = 0
        for desc in self.layers:
            if not desc.is_tensor or not isinstance(desc.name, str):
                continue
            info = TensorInfo(desc, desc.dtype if isinstance(desc.dtype, str) else None,
                              desc.shape if isinstance(desc.shape, list) else None)
            self.tensors.setdefault(desc.name, info)
            if not self._readable(desc):
                continue
            checked += 1
            header = self._tensor_header(desc)
            if header is not None:
                dtype, shape = header
                if info.dtype is None:
                    info.dtype = dtype
                if info.shape is None:
                    info.shape = shape
        for check in ("TNS-001", "TNS-002", "TNS-003", "TNS-004", "TNS-005", "TNS-006", "TNS-007", "TNS-008",
                      "TNS-009", "TNS-010"):
            if check not in r.ran:
                r.add(check, PASS, "tensor blobs", f"{checked} tensor blobs")

    def _tensor_header(self, desc: Desc) -> tuple[str, list[int]] | None:
        """Check one tensor blob's header; returns its (logical dtype, shape) when they can be known."""
        size = self.blob_sizes[desc.digest]
        layer = {"mediaType": desc.media_type, "name": desc.name, "dtype": desc.dtype, "shape": desc.shape,
                 "annotations": desc.annotations if isinstance(desc.annotations, dict) else {}}

        def read(offset: int, length: int) -> bytes:
            return self.source.read_range(desc.digest, offset, length)

        header, problems = tensor_problems(layer, read, size, desc.subject)
        for check, message in problems:
            warn = check == "TNS-009" or self.warn_if_ollama(check)
            self.report.fail(check, desc.subject, message, warn=warn)
        if header is None:
            return None
        if blob_quantization(header) is not None or spec.QUANTIZATION_ANNOTATION in layer["annotations"]:
            if isinstance(desc.dtype, str) and isinstance(desc.shape, list):
                return desc.dtype, desc.shape
            self.quantized.add(desc.name)
            return None
        if len(header.entries) != 1 or any(c in ("TNS-005", "TNS-006", "TNS-007") for c, _ in problems):
            return None
        (entry,) = header.entries.values()
        return entry.dtype, entry.shape

    # -- files ----------------------------------------------------------------------------------------

    def _files(self) -> None:
        r = self.report
        for desc in self.layers:
            if not desc.is_json or not isinstance(desc.name, str) or not self._readable(desc):
                continue
            try:
                raw = self.source.read_blob(desc.digest, MAX_FILE_LAYER)
            except ImgpackError as e:
                r.fail("FIL-001", desc.subject, str(e))
                continue
            document, problems = json_problems(raw, desc.subject)
            for _, message in problems:
                r.fail("FIL-001", desc.subject, message)
            if not problems:
                self.files[desc.name] = document
        if "FIL-001" not in r.ran:
            r.add("FIL-001", PASS, "JSON layers", f"{len(self.files)} JSON layers parse")
        names = {d.name for d in self.layers if isinstance(d.name, str)}
        index = self.files.get("model_index.json")
        self.architecture = None
        if "model_index.json" not in names:
            r.fail("FIL-002", "model_index.json", "no model_index.json layer; a consumer cannot tell which"
                                                  " pipeline to build")
        elif not any(d.name == "model_index.json" and d.is_json for d in self.layers):
            r.fail("FIL-002", "layer 'model_index.json'", f"must have media type {spec.JSON_MEDIA_TYPE}")
        elif "model_index.json" not in self.files:
            r.skip("FIL-002", "model_index.json unreadable (see FIL-001/BLB checks)")
        elif not isinstance(index, dict) or not isinstance(index.get("_class_name") or index.get("architecture"), str):
            r.fail("FIL-002", "layer 'model_index.json'", "must be a JSON object with a string '_class_name'"
                                                         " (or, as ollama rewrites it, 'architecture')")
        else:
            self.architecture = index.get("_class_name") or index["architecture"]
            r.add("FIL-002", PASS, "layer 'model_index.json'", f"pipeline {self.architecture}")
            r.info["architecture"] = self.architecture
            for key, value in index.items():
                if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
                    continue
                if not any(n.startswith(key + "/") for n in names):
                    r.fail("FIL-003", f"component {key!r}", f"model_index.json lists {value[0]}.{value[1]} but it"
                                                            f" has no layers under {key}/")
            if "FIL-003" not in r.ran:
                r.add("FIL-003", PASS, "components", "every listed component has layers")

    def _header_layers(self) -> None:
        """FIL-004: export rebuilds each safetensors file from its header layer plus the tensor layers."""
        r = self.report
        count = 0
        for desc in self.layers:
            if not desc.is_header or not isinstance(desc.name, str) or not self._readable(desc):
                continue
            count += 1
            data = self.source.read_blob(desc.digest, spec.MAX_SAFETENSORS_HEADER + 8)
            parsed, problems = header_layer_problems(data)
            for _, message in problems:
                r.fail("FIL-004", desc.subject, message)
            if parsed is None:
                continue
            prefix = desc.name.rsplit("/", 1)[0] + "/" if "/" in desc.name else ""
            spans: list[tuple[int, int, str]] = []
            for key, entry in parsed.entries.items():  # the parser has checked each entry's fields and offsets
                spans.append((entry.begin, entry.end, key))
                tensor = self.tensors.get(prefix + key)
                if tensor is None:
                    r.fail("FIL-004", desc.subject, f"lists tensor {prefix + key!r}, which has no layer")
                elif (tensor.dtype, tensor.shape) != (entry.dtype, entry.shape):
                    r.fail("FIL-004", desc.subject, f"lists {key!r} as {entry.dtype} {entry.shape},"
                                                    f" the layer is {tensor.dtype} {tensor.shape}")
            end = 0
            for begin, stop, key in sorted(spans, key=lambda s: (s[0], s[1])):
                if begin != end:
                    r.fail("FIL-004", desc.subject, f"tensor {key!r} starts at {begin}, not right after the"
                                                    f" previous one at {end}; the file cannot be rebuilt exactly")
                    break
                end = stop
        if "FIL-004" not in r.ran:
            r.add("FIL-004", PASS, "header layers", f"{count} header layers match their tensors")

    def _january_quantized(self) -> None:
        """ollama's January form: ``name``, ``name_scale``, ``name_qbias`` layers make one quantized tensor, whose
        type only model_index.json's ``quantization`` label gives. The three count as one logical tensor."""
        groups, _ = pair_separate_layers(list(self.tensors))
        if not groups:
            return
        index = self.files.get("model_index.json")
        label = index.get("quantization") if isinstance(index, dict) else None
        try:
            qtype = legacy_quant_type(label) if isinstance(label, str) else None
        except ImgpackError as e:
            qtype = None
            self.fail("TNS-010", "model_index.json", str(e))
        for name, group in groups.items():
            info = self.tensors[name]
            scale = self.tensors.get(group.scale)
            for extra in (group.scale, group.qbias):
                if extra:
                    self.tensors.pop(extra, None)
            if qtype is None or info.shape is None or scale is None or scale.shape is None:
                if qtype is None and isinstance(label, str) is False:
                    self.fail("TNS-010", f"layer {name!r}", "quantized in ollama's January form, but"
                                                            " model_index.json has no 'quantization' label")
                continue
            in_features = info.shape[-1] * 32 // qtype.bits
            if not scale.shape or in_features % scale.shape[-1] or scale.shape[:-1] != info.shape[:-1]:
                self.fail("TNS-010", f"layer {name!r}", f"packed {info.shape} and scales {scale.shape} do not make a"
                                                        f" {qtype.bits}-bit tensor")
                continue
            info.shape = [*info.shape[:-1], in_features]
            info.dtype = scale.dtype

    def _config_summary(self) -> None:
        """CFG-002: the config's summary agrees with the layers (recommended: nothing loads from it)."""
        r = self.report
        config = getattr(self, "config_document", None)
        if "CFG-001" not in r.ran or r.status_of("CFG-001") != PASS or not isinstance(config, dict):
            r.skip("CFG-002", "config does not validate (CFG-001)")
            return
        tensors = [t for t in self.tensors.values() if t.shape is not None]
        if self.architecture and config.get("architecture") != self.architecture:
            r.fail("CFG-002", "config", f"architecture {config.get('architecture')!r} but model_index.json says"
                                        f" {self.architecture!r}")
        params = sum(math.prod(t.shape or []) for t in tensors)
        if len(tensors) == len(self.tensors) and config.get("parameterCount") != params:
            r.fail("CFG-002", "config", f"parameterCount {config.get('parameterCount')} but the tensors hold"
                                        f" {params}")
        nbytes = sum(t.desc.size for t in self.tensors.values() if isinstance(t.desc.size, int))
        if config.get("tensorBytes") != nbytes:
            r.fail("CFG-002", "config", f"tensorBytes {config.get('tensorBytes')} but the tensor layers total"
                                        f" {nbytes}")
        dtypes = sorted({t.dtype for t in self.tensors.values() if t.dtype})
        if sorted(config.get("dtypes") or []) != dtypes:
            r.fail("CFG-002", "config", f"dtypes {config.get('dtypes')} but the tensors use {dtypes}")
        counts: dict[str, int] = {}
        for name in self.tensors:
            component = name.split("/", 1)[0] if "/" in name else "."
            counts[component] = counts.get(component, 0) + 1
        for component, entry in (config.get("components") or {}).items():
            if isinstance(entry, dict) and entry.get("tensors") != counts.get(component, 0):
                r.fail("CFG-002", f"component {component!r}", f"config counts {entry.get('tensors')} tensors,"
                                                              f" the manifest has {counts.get(component, 0)}")
        if "CFG-002" not in r.ran:
            r.add("CFG-002", PASS, "config", "summary agrees with the layers")

    # -- architecture ---------------------------------------------------------------------------------

    def _architecture(self) -> None:
        r = self.report
        arc = ("ARC-002", "ARC-003", "ARC-004", "ARC-005", "ARC-006")
        if self.architecture is None:
            r.skip("ARC-001", "no readable model_index.json (FIL-002)")
            for check in arc:
                r.skip(check, "no architecture")
            return
        found = architectures.find(self.architecture)
        if found is None:
            r.fail("ARC-001", "model_index.json", f"no architecture rules for {self.architecture!r} (known:"
                                                  f" {', '.join(architectures.known_names())}); only the generic"
                                                  " checks ran", warn=True)
            for check in arc:
                r.skip(check, f"no architecture rules for {self.architecture}")
            return
        r.add("ARC-001", PASS, "model_index.json", f"{self.architecture}: tensor rules derived from"
                                                   f" {', '.join(found.config_files)}")
        configs = {}
        for file in found.config_files:
            if file in self.files:
                configs[file] = self.files[file]
            elif any(d.name == file for d in self.layers):
                r.skip("ARC-002", f"{file} unreadable (see FIL-001/BLB checks)")
            else:
                r.fail("ARC-002", file, f"missing: {self.architecture} derives its tensors from it")
        if "ARC-002" in r.ran:
            for check in arc[1:]:
                r.skip(check, "component configs incomplete (ARC-002)")
            return
        try:
            expectation = found.expected_tensors(configs)
        except ConfigProblem as e:
            r.fail("ARC-002", e.file, str(e).split(": ", 1)[1])
            for check in arc[1:]:
                r.skip(check, "component configs incomplete (ARC-002)")
            return
        r.add("ARC-002", PASS, "configs", f"{', '.join(found.config_files)} complete")
        present: dict[str, TensorInfo] = {}
        for name, info in self.tensors.items():
            canonical = canonical_name(name, expectation)
            if canonical in present:
                r.fail("ARC-005", f"layer {name!r}", f"duplicates {canonical!r} under another prefix")
                continue
            present[canonical] = info
        groups_present = {prefix: any(n.startswith(prefix) for n in present)
                          for prefix in expectation.optional_groups}
        required = dict(expectation.required)
        for prefix, present_any in groups_present.items():
            if present_any:  # a partly present optional group must be complete
                required.update({n: s for n, s in expectation.optional.items() if n.startswith(prefix)})
            else:
                r.fail("ARC-006", prefix.rstrip("."), f"absent: {expectation.optional_groups[prefix]}")
        missing = sorted(set(required) - set(present))
        for name in missing:
            r.fail("ARC-003", f"tensor {name!r}", f"required by the configs (shape {required[name]}) but absent")
        expected_shapes = {**expectation.optional, **required}
        for name, info in sorted(present.items()):
            shape = expected_shapes.get(name)
            if shape is None:
                r.fail("ARC-005", f"layer {info.desc.name!r}", "not a parameter of the architecture; loaders"
                                                               " ignore it")
            elif info.shape is not None and info.shape != shape:
                r.fail("ARC-004", f"layer {info.desc.name!r}", f"shape {info.shape}, the configs require {shape}")
        if "ARC-003" not in r.ran:
            r.add("ARC-003", PASS, "tensors", f"all {len(required)} required tensors present")
        if "ARC-004" not in r.ran:
            r.add("ARC-004", PASS, "tensors", "shapes match the configs")
        if "ARC-005" not in r.ran:
            r.add("ARC-005", PASS, "tensors", "no unknown tensors")
        if "ARC-006" not in r.ran:
            r.add("ARC-006", PASS, "tensors", "optional groups present")


def check_artifact(source: Source, hash_cache: dict[str, tuple[int | None, str | None]] | None = None) -> Report:
    """Run every artifact check on ``source``; never raises for a defect of the artifact itself."""
    return ArtifactCheck(source, hash_cache).run()
