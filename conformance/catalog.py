"""The conformance checks of imgpack spec v1, each with the stable id the spec text cites.

A check is *required* (a failure makes ``imgpack conformance`` exit non-zero) or *recommended* (a failure is
reported as a warning). Some required checks are relaxed to warnings for the ollama flavour, where a
consumer can still load the model; ``ollama_warns`` marks them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    required: bool = True
    #: In the ollama flavour a failure of this check is reported as a warning.
    ollama_warns: bool = False


_ARTIFACT = [
    Check("LAY-001", "target is a readable layout whose index resolves the reference to one manifest"),
    Check("MAN-001", "manifest is a JSON object of at most 4 MiB and is a single manifest, not an index"),
    Check("MAN-002", "manifest validates against manifest.schema.json"),
    Check("MAN-003", "manifest, artifact, config and layer media types are known and match the flavour"),
    Check("MAN-004", "the index descriptor (mediaType, size, digest) matches the manifest bytes"),
    Check("MAN-005", "every layer carries an org.opencontainers.image.title annotation equal to its name",
          ollama_warns=True),
    Check("MAN-006", "tensor layers declare dtype and shape", ollama_warns=True),
    Check("BLB-001", "every blob the manifest references is present"),
    Check("BLB-002", "every blob's size equals its descriptor's size"),
    Check("BLB-003", "every blob's content hashes to its descriptor's digest"),
    Check("CFG-001", "config blob is JSON and validates against config.schema.json", ollama_warns=True),
    Check("CFG-002", "config summary (architecture, counts, bytes, dtypes) agrees with the layers", required=False),
    Check("NAM-001", "every layer name is valid and path-safe"),
    Check("NAM-002", "layer names are unique (tensors and files share one namespace, headers another)"),
    Check("NAM-003", "no layer name is a directory of another, so the layers lay out as a file tree"),
    Check("NAM-004", "no two names differ only in letter case", required=False),
    Check("TNS-001", "tensor blob header length is sane (<= 64 KiB) and lies within the blob"),
    Check("TNS-002", "tensor blob header is a JSON object holding exactly one tensor"),
    Check("TNS-003", "tensor blob header length is a multiple of 8, padded with spaces only", ollama_warns=True),
    Check("TNS-004", "the tensor is keyed 'data' and the header has no __metadata__", ollama_warns=True),
    Check("TNS-005", "tensor entry has exactly dtype (known), shape (non-negative integers) and data_offsets"),
    Check("TNS-006", "data_offsets equal [0, nbytes] with nbytes = product(shape) x itemsize"),
    Check("TNS-007", "the tensor data fills the blob exactly: size = 8 + header length + nbytes"),
    Check("TNS-008", "the descriptor's dtype and shape equal the blob header's"),
    Check("TNS-009", "the header is the canonical compact encoding (same tensor, same digest)", required=False),
    Check("TNS-010", "a quantized tensor blob holds its packed weight, scales and biases in the shapes and dtypes"
                     " its type and logical shape require"),
    Check("FIL-001", "every JSON layer parses as UTF-8 JSON"),
    Check("FIL-002", "model_index.json is present and names the pipeline class in _class_name"),
    Check("FIL-003", "every component listed in model_index.json has layers under its folder"),
    Check("FIL-004", "every safetensors header layer parses and matches the tensor layers it lists"),
    Check("ARC-001", "the architecture is one the suite has tensor rules for", required=False),
    Check("ARC-002", "the component configs the architecture needs are present and complete"),
    Check("ARC-003", "every tensor the architecture's configs require is present"),
    Check("ARC-004", "every tensor has the shape the architecture's configs require"),
    Check("ARC-005", "no tensor is unknown to the architecture", required=False),
    Check("ARC-006", "optional tensor groups (VAE encoder) are present", required=False),
]

_REGISTRY = [
    Check("REG-001", "the registry answers the v2 API base (GET /v2/) and accepts the credentials"),
    Check("REG-002", "monolithic blob upload (POST ?digest= or POST then PUT)"),
    Check("REG-003", "chunked blob upload (PATCH with Content-Range, then PUT)"),
    Check("REG-004", "cross-repository blob mount (POST ?mount=&from=)", required=False),
    Check("REG-005", "Range GETs on blobs answer 206 with the requested bytes", required=False),
    Check("REG-006", "manifest Accept handling: both flavours round-trip byte-exact with their Content-Type"),
    Check("REG-007", "a manifest with 1,200 layers is accepted and served"),
    Check("REG-008", "a 4 MiB manifest is accepted and served", required=False),
    Check("REG-009", "tag listing (GET /v2/<name>/tags/list) includes pushed tags"),
    Check("REG-010", "referrers API (GET /v2/<name>/referrers/<digest>)", required=False),
    Check("REG-011", "manifests and blobs can be deleted (clean-up)", required=False),
]

CHECKS: dict[str, Check] = {c.id: c for c in (*_ARTIFACT, *_REGISTRY)}
ARTIFACT_CHECKS = [c.id for c in _ARTIFACT]
REGISTRY_CHECKS = [c.id for c in _REGISTRY]
