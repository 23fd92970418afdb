"""The spec's parts agree: schemas are valid draft 2020-12, constants match them, and the text cites every check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from imgpack.schemas import spec
from imgpack.schemas.errors import UsageError
from imgpack.schemas.reference import Reference
from imgpack.schemas.safetensors import DTYPE_SIZES, encode_header
from imgpack.schemas.validate import schema, schema_errors

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.mark.parametrize("kind", ["manifest", "config", "tensor-header"])
def test_schemas_are_valid_draft_2020_12(kind: str) -> None:
    document = schema(kind)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(document)


def test_schema_enums_match_the_constants() -> None:
    manifest = schema("manifest")
    assert manifest["$defs"]["dtype"]["enum"] == list(DTYPE_SIZES)
    assert set(manifest["$defs"]["layer"]["properties"]["mediaType"]["enum"]) == set(spec.LAYER_MEDIA_TYPES)
    assert set(manifest["properties"]["mediaType"]["enum"]) == {spec.OCI_MANIFEST, spec.DOCKER_MANIFEST}


def test_every_conformance_check_is_cited_in_the_spec_text() -> None:
    from imgpack.conformance import catalog

    ids = {c.id for value in vars(catalog).values() if isinstance(value, list) for c in value
           if isinstance(c, catalog.Check)}
    text = (SCHEMAS / "README.md").read_text()
    assert len(ids) > 40
    assert ids <= set(re.findall(r"\b[A-Z]{3}-\d{3}\b", text))


def test_encoded_tensor_header_validates_and_matches_ollamas_form() -> None:
    header = encode_header("BF16", [2560, 9728])
    n = int.from_bytes(header[:8], "little")
    assert n % 8 == 0 and len(header) == 8 + n
    assert header[8:].rstrip(b" ") == b'{"data":{"dtype":"BF16","shape":[2560,9728],"data_offsets":[0,49807360]}}'
    assert schema_errors("tensor-header", json.loads(header[8:])) == []
    assert schema_errors("tensor-header", {"data": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}})


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("zimage", None, "zimage", "latest", None),
        ("zimage:v1", None, "zimage", "v1", None),
        ("localhost:5000/team/zimage:v1", "localhost:5000", "team/zimage", "v1", None),
        ("ghcr.io/acme/zimage", "ghcr.io", "acme/zimage", "latest", None),
        ("127.0.0.1:5000/z@sha256:" + "a" * 64, "127.0.0.1:5000", "z", None, "sha256:" + "a" * 64),
    ],
)
def test_references(text: str, registry: str | None, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize("text", ["", "UPPER/case", "a//b", "a:b:c", "x@sha256:short", "../x", "a:" + "t" * 129])
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        Reference.parse(text)
