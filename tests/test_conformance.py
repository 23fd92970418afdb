"""imgpack conformance on local artifacts: created models, every committed vector, and the project's consumers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from safetensors import safe_open

from imgpack.architectures import zimage
from imgpack.cli.main import main
from imgpack.conformance.catalog import ARTIFACT_CHECKS, CHECKS
from imgpack.conformance.suite import run_target
from imgpack.conformance.verify import verify_store
from imgpack.packager.create import create_model
from imgpack.schemas.errors import ImgpackError
from imgpack.schemas.manifest import ModelManifest
from imgpack.store.store import Store

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "models"
VECTORS = REPO / "conformance" / "vectors"
CATALOGUE = json.loads((VECTORS / "VECTORS.json").read_text())
VALID = [v for v in CATALOGUE if v["valid"]]
INVALID = [v for v in CATALOGUE if not v["valid"]]


def copy_vector(vector: dict, tmp_path: Path) -> Path:
    """Vectors are read-only inputs: consumers that write state dirs get a copy."""
    target = tmp_path / vector["name"]
    shutil.copytree(VECTORS / vector["path"], target)
    return target


def run_cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "imgpack.cli.main", *args], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


# -- the Z-Image derivation against the committed tiny models -------------------------------------------


@pytest.mark.parametrize("model", ["zimage-tiny", "zimage-sharded"])
def test_zimage_rules_give_exactly_the_tiny_models_tensors(model: str) -> None:
    root = MODELS / model
    configs = {f: json.loads((root / f).read_text()) for f in zimage.CONFIG_FILES}
    expectation = zimage.expected_tensors(configs)
    actual: dict[str, list[int]] = {}
    for path in root.glob("*/*.safetensors"):
        with safe_open(path, "np") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                actual[f"{path.parent.name}/{key}"] = list(f.get_slice(key).get_shape())
    expected = {**expectation.required, **{k: v for k, v in expectation.optional.items() if k in actual}}
    assert set(actual) == set(expected)
    assert actual == expected
    assert "text_encoder/lm_head.weight" not in actual  # tied embeddings: lm_head is optional
    assert all(k.startswith("vae/encoder.") for k in expectation.optional if k.startswith("vae/"))


def test_zimage_rules_follow_the_config() -> None:
    configs = {f: json.loads((MODELS / "zimage-tiny" / f).read_text()) for f in zimage.CONFIG_FILES}
    configs["transformer/config.json"] = {**configs["transformer/config.json"], "n_layers": 3, "dim": 96}
    req = zimage.expected_tensors(configs).required
    assert req["transformer/layers.2.feed_forward.w1.weight"] == [256, 96]  # int(96 / 3 * 8)
    assert req["transformer/t_embedder.mlp.2.weight"] == [96, 1024]
    assert "transformer/layers.3.attention.to_q.weight" not in req
    configs["transformer/config.json"].pop("dim")
    with pytest.raises(zimage.ConfigProblem, match="transformer/config.json: field 'dim'"):
        zimage.expected_tensors(configs)


# -- what imgpack create makes conforms --------------------------------------------------------------------


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("created")
    store = Store.open(root)
    for model in ("zimage-tiny", "zimage-sharded"):
        for fmt in ("oci", "ollama"):
            create_model(store, f"{model}:{fmt}", MODELS / model, fmt)
    return root


@pytest.mark.parametrize("ref", ["zimage-tiny:oci", "zimage-tiny:ollama", "zimage-sharded:oci",
                                 "zimage-sharded:ollama"])
def test_created_models_conform_without_warnings(created: Path, ref: str) -> None:
    report = run_target(ref, str(created))
    assert report.failed == [] and report.warned == []
    assert report.ok
    assert report.info["flavour"] == ref.split(":")[1]
    assert report.info["architecture"] == "ZImagePipeline"
    assert set(report.summary()) == set(ARTIFACT_CHECKS)
    assert all(status == "pass" for status in report.summary().values())
    tensors = 348 if "tiny" in ref else 359
    assert report.info["tensors"] == tensors


def test_cli_table_json_and_junit(created: Path, tmp_path: Path) -> None:
    junit = tmp_path / "report.xml"
    code, out = run_cli("--store", str(created), "conformance", "zimage-tiny:oci", "--json", "--junit", str(junit))
    assert code == 0, out
    document = json.loads(out)
    assert document["ok"] is True and document["failed"] == []
    assert [c["id"] for c in document["checks"]] == ARTIFACT_CHECKS
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(len(ARTIFACT_CHECKS)) and suite.get("failures") == "0"
    assert [case.get("name") for case in suite] == ARTIFACT_CHECKS
    code, out = run_cli("--store", str(created), "conformance", "zimage-sharded:ollama")
    assert code == 0, out
    assert "CONFORMS" in out and "ollama flavour" in out


def test_corrupted_store_blob_fails_blb003_and_cli_exits_nonzero(created: Path, tmp_path: Path) -> None:
    store_copy = tmp_path / "store"
    shutil.copytree(created, store_copy)
    store = Store.open(store_copy, create=False)
    manifest = store.get_manifest("zimage-tiny:oci")
    layer = manifest.layer("transformer/layers.0.attention.to_q.weight")
    path = store.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    code, out = run_cli("--store", str(store_copy), "conformance", "zimage-tiny:oci", "--json")
    assert code == 1
    document = json.loads(out)
    assert document["failed"] == ["BLB-003"]
    rows = [f for f in document["findings"] if f["check"] == "BLB-003"]
    assert rows[0]["subject"] == "layer 'transformer/layers.0.attention.to_q.weight'"
    assert layer.digest in rows[0]["message"]


def test_unreadable_targets_fail_lay001(tmp_path: Path) -> None:
    report = run_target(f"oci:{tmp_path / 'nowhere'}", None)
    assert report.failed == ["LAY-001"] and not report.ok
    assert all(report.status_of(c) == "skip" for c in ARTIFACT_CHECKS if c != "LAY-001")
    Store.open(tmp_path / "store")
    report = run_target("absent:latest", str(tmp_path / "store"))
    assert report.failed == ["LAY-001"]
    assert "absent:latest" in report.findings[0].message
    code, out = run_cli("conformance", "Not A Reference")
    assert code == 2 and "invalid reference" in out


# -- vectors -----------------------------------------------------------------------------------------------


def test_vector_generator_is_deterministic_and_matches_the_committed_output(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(VECTORS / "generate.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = {p.relative_to(VECTORS): p.read_bytes() for p in VECTORS.rglob("*")
                 if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(fresh) == sorted(committed)
    assert fresh == committed


def test_vector_catalogue_covers_the_spec() -> None:
    assert {v["check"] for v in INVALID} >= {c for c in ARTIFACT_CHECKS if CHECKS[c].required}
    for vector in INVALID:
        assert vector["name"].startswith(vector["check"] + "-") and vector["check"] in CHECKS
        assert vector["path"] == f"invalid/{vector['name']}"
    total = sum(p.stat().st_size for p in VECTORS.rglob("*") if p.is_file())
    assert total < 6 * 1024 * 1024, f"vectors grew to {total} bytes"
    assert {v["flavour"] for v in VALID} == {"oci", "ollama"}


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["name"])
def test_valid_vector_conforms(vector: dict) -> None:
    report = run_target(f"oci:{VECTORS / vector['path']}", None)
    assert report.failed == [], [f for f in report.findings if f.status == "fail"]
    expected_warnings = {
        "zimage-oci": [], "zimage-ollama": [], "dtypes": ["ARC-001"], "zimage-sharded": ["ARC-006"],
        "ollama-made": ["MAN-003", "MAN-005", "CFG-001", "TNS-004"], "quantized": ["ARC-001"],
    }[vector["name"]]
    assert report.warned == expected_warnings
    assert report.info["flavour"] == vector["flavour"]


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["name"])
def test_invalid_vector_fails_exactly_its_check(vector: dict) -> None:
    code, out = run_cli("conformance", f"oci:{VECTORS / vector['path']}", "--json")
    assert code == 1, out
    document = json.loads(out)
    assert document["failed"] == [vector["check"]]
    subjects = [f for f in document["findings"] if f["check"] == vector["check"] and f["status"] == "fail"]
    assert subjects and all(f["message"] for f in subjects)


def test_dtype_vector_holds_every_dtype_and_edge_shape() -> None:
    from imgpack.schemas.safetensors import DTYPE_SIZES

    store = Store.open(VECTORS / "valid" / "dtypes", create=False)
    (ref, _), = store.references()
    manifest = store.get_manifest(ref)
    assert {t.dtype for t in manifest.tensors} == set(DTYPE_SIZES)
    shapes = {t.name: t.shape for t in manifest.tensors}
    assert shapes["weights/scalar"] == [] and shapes["weights/vector"] == [5] and shapes["weights/empty"] == [0, 4]


# -- the project's consumers against the vectors --------------------------------------------------------

#: Invalid vectors each consumer must refuse, and a word its error must contain.
MANIFEST_REFUSES = {
    "MAN-001-manifest-not-json": "not valid JSON",
    "MAN-002-schema-version-1": "schemaVersion",
    "MAN-003-unknown-layer-media-type": "mediaType",
    "MAN-006-tensor-without-shape": "shape",
    "NAM-001-parent-segment": "weights/../escape.json",
    "NAM-001-bidi-override": "U+202E",
    "NAM-002-duplicate-name": "duplicate layer name 'weights/config.json'",
    "NAM-003-file-and-directory": "is also the folder of layer",
}
VERIFY_REFUSES = {
    **MANIFEST_REFUSES,
    "BLB-001-missing-blob": "missing",
    "BLB-002-size-mismatch": "manifest says",
    "BLB-003-digest-mismatch": "corrupt",
    "TNS-001-header-past-end": "runs past the end",
    "TNS-002-two-tensors": "holds 2 tensors",
    "TNS-005-unknown-dtype": "unknown dtype 'Q4_K'",
    "TNS-006-data-offsets": "data_offsets [0, 10]",
    "TNS-007-trailing-bytes": "needs 12 data bytes",
    "TNS-008-descriptor-shape-mismatch": "[3, 2]",
    "MAN-004-index-size-mismatch": "index.json says the manifest is",
    "TNS-003-padding-not-spaces": "padding is not spaces",
    "TNS-004-tensor-key-not-data": "not 'data'",
    "CFG-001-config-without-spec-version": "config blob",
    "FIL-001-json-layer-not-json": "is not valid JSON",
    "FIL-002-no-model-index": "no model_index.json layer",
    "FIL-003-component-without-layers": "has no layers under",
    "FIL-004-header-layer-mismatch": "which has no layer",
    "MAN-005-title-not-name": "expected 'weights/config.json'",
    "ARC-002-transformer-config-without-dim": "'dim'",
    "ARC-003-missing-tensor": "transformer/t_embedder.mlp.0",
    "ARC-004-wrong-shape": "the configs require [1024, 256]",
    "TNS-010-quantized-scale-shape": "scale shape [4, 3] should be [4, 2]",
}


def _manifest_bytes(root: Path) -> bytes:
    index = json.loads((root / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return (root / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["name"])
def test_valid_vectors_load_in_store_manifest_and_export(vector: dict, tmp_path: Path) -> None:
    root = copy_vector(vector, tmp_path)
    manifest = ModelManifest.from_bytes(_manifest_bytes(root), source=vector["name"])
    assert manifest.flavour == vector["flavour"]
    store = Store.open(root, create=False)
    report = verify_store(store, vector["reference"])
    assert report.ok, report.problems
    assert report.blobs == len(manifest.blobs)
    from imgpack.packager.export import export_model

    out = tmp_path / "export"
    export_model(store, vector["reference"], out)
    assert json.loads((out / "model_index.json").read_text())["_class_name"]


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_by_store_and_pull_checks(vector: dict, tmp_path: Path) -> None:
    name = vector["name"]
    root = copy_vector(vector, tmp_path)
    if name == "LAY-001-missing-oci-layout":
        with pytest.raises(ImgpackError, match="no oci-layout file"):
            Store.open(root, create=False)
        return
    if name in MANIFEST_REFUSES:  # what pull checks before fetching a single blob
        with pytest.raises(ImgpackError) as info:
            ModelManifest.from_bytes(_manifest_bytes(root), source=name)
        assert MANIFEST_REFUSES[name] in str(info.value)
    report = verify_store(Store.open(root, create=False), vector["reference"])
    assert not report.ok
    assert any(VERIFY_REFUSES[name] in p for p in report.problems), report.problems


@pytest.mark.parametrize("vector", [v for v in INVALID if v["name"] != "LAY-001-missing-oci-layout"],
                         ids=lambda v: v["name"])
def test_verify_reports_each_invalid_vector_under_its_check_id(vector: dict, tmp_path: Path) -> None:
    """verify runs the conformance checks: every invalid vector fails with exactly the check it is named after."""
    report = verify_store(Store.open(copy_vector(vector, tmp_path), create=False), vector["reference"])
    assert not report.ok
    assert report.failed == {vector["reference"]: [vector["check"]]}, report.problems
    assert all(p.endswith(f"({vector['check']})") for p in report.problems)


def test_export_refuses_header_layer_mismatch(tmp_path: Path) -> None:
    from imgpack.packager.export import export_model

    vector = next(v for v in INVALID if v["check"] == "FIL-004")
    store = Store.open(copy_vector(vector, tmp_path), create=False)
    with pytest.raises(ImgpackError, match="weights/absent.weight"):
        export_model(store, vector["reference"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the runtime loader ---------------------------------------------------------------------------------


def _runtime():
    from imgpack.runtime.zimage.pipeline import ZImageModel  # the test extra installs the runtime

    return ZImageModel


@pytest.mark.parametrize("name", ["zimage-oci", "zimage-ollama", "zimage-sharded", "ollama-made"])
def test_runtime_loads_valid_zimage_vectors(name: str, tmp_path: Path) -> None:
    model_cls = _runtime()
    vector = next(v for v in VALID if v["name"] == name)
    model = model_cls.open(Store.open(copy_vector(vector, tmp_path), create=False), vector["reference"])
    model.load()


@pytest.mark.parametrize("name", ["ARC-002-transformer-config-without-dim", "ARC-003-missing-tensor",
                                  "ARC-004-wrong-shape"])
def test_runtime_refuses_invalid_architecture_vectors(name: str, tmp_path: Path) -> None:
    model_cls = _runtime()
    vector = next(v for v in INVALID if v["name"] == name)
    with pytest.raises(ImgpackError) as info:
        model = model_cls.open(Store.open(copy_vector(vector, tmp_path), create=False), vector["reference"])
        model.load()
    # Tensors are named as the manifest spells them (transformer/t_embedder.mlp.0.weight).
    expected = {"ARC-002": "dim", "ARC-003": "transformer/t_embedder", "ARC-004": "transformer/t_embedder.mlp.0.weight"}
    assert expected[vector["check"]] in str(info.value)


def test_main_entry_point_lists_conformance() -> None:
    with pytest.raises(SystemExit):
        main(["conformance", "--help"])
