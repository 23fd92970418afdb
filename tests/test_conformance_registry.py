"""imgpack conformance against a real registry (Debian's docker-registry on loopback) and an ollama models dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import requests
from fixtures_registry import RegistryServer, needs_registry, open_registry  # noqa: F401 - fixture

from imgpack.conformance.catalog import REGISTRY_CHECKS
from imgpack.conformance.suite import run_target
from imgpack.packager.create import create_model
from imgpack.store.store import Store

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "models"
VECTORS = REPO / "conformance" / "vectors"


def run_cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "imgpack.cli.main", *args], capture_output=True, text=True,
                          timeout=170)
    return proc.returncode, proc.stdout + proc.stderr


def ollama_models_dir(vector: str, root: Path, name: str = "zimage", tag: str = "latest") -> Path:
    """Lay an OCI-layout vector out as ollama stores models: blobs/sha256-<hex>, manifests/<host>/<ns>/<m>/<tag>."""
    layout = VECTORS / "valid" / vector
    (root / "blobs").mkdir(parents=True)
    for blob in (layout / "blobs" / "sha256").iterdir():
        shutil.copy(blob, root / "blobs" / f"sha256-{blob.name}")
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    shutil.copy(layout / "blobs" / "sha256" / digest.split(":")[1], manifest)
    return root


def test_ollama_made_models_dir_is_reported_as_ollama_with_warnings(tmp_path: Path) -> None:
    root = ollama_models_dir("ollama-made", tmp_path / "models")
    for target in (f"ollama:{root}:zimage:latest", f"ollama:{root}:library/zimage", f"ollama:{root}", str(root)):
        report = run_target(target, None)
        assert report.ok, target
        assert report.info["flavour"] == "ollama" and report.info["source"] == "ollama"
        assert report.warned == ["MAN-003", "MAN-005", "CFG-001", "TNS-004"]
        assert report.status_of("MAN-004") == "skip"  # an ollama dir has no index descriptor
        assert report.status_of("ARC-003") == "pass"
    tns = [f for f in report.findings if f.check == "TNS-004"]
    assert len(tns) == report.info["tensors"]
    assert tns[0].subject == "layer 'text_encoder/model.embed_tokens.weight'"
    assert tns[0].message == "tensor is keyed 'model.embed_tokens.weight', not 'data'"
    code, out = run_cli("conformance", f"ollama:{root}:zimage", "--json")
    assert code == 0, out
    assert json.loads(out)["info"]["manifest"] == "manifests/registry.ollama.ai/library/zimage/latest"


def test_ollama_dir_with_a_corrupt_blob_fails(tmp_path: Path) -> None:
    root = ollama_models_dir("ollama-made", tmp_path / "models")
    victim = sorted((root / "blobs").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    report = run_target(f"ollama:{root}:zimage", None)
    assert report.failed == ["BLB-003"]
    code, out = run_cli("conformance", f"ollama:{root}:missing:tag", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["failed"] == ["LAY-001"]
    assert "no manifest manifests/registry.ollama.ai/library/missing/tag" in report["findings"][0]["message"]


@needs_registry
def test_registry_probe_against_docker_registry(open_registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    junit = tmp_path / "registry.xml"
    code, out = run_cli("conformance", "--registry", f"{open_registry.host}/conformance/probe", "--json",
                        "--junit", str(junit))
    assert code == 0, out
    report = json.loads(out)
    statuses = {c["id"]: c["status"] for c in report["checks"]}
    assert list(statuses) == REGISTRY_CHECKS
    # distribution 2.8: everything imgpack needs, no referrers API.
    assert statuses == {**dict.fromkeys(REGISTRY_CHECKS, "pass"), "REG-010": "warn"}
    (referrers,) = [f for f in report["findings"] if f["check"] == "REG-010"]
    assert "404" in referrers["message"]
    assert junit.read_text().count("<testcase") == len(REGISTRY_CHECKS)
    # Clean-up removed every probe tag.
    tags = requests.get(f"{open_registry.url}/v2/conformance/probe/tags/list", timeout=10).json().get("tags")
    assert not [t for t in tags or [] if t.startswith("imgpack-conformance-")]


@needs_registry
def test_registry_probe_reports_an_unreachable_registry(tmp_path: Path) -> None:
    from fixtures_registry import free_port

    code, out = run_cli("conformance", "--registry", f"127.0.0.1:{free_port()}/x/y", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["failed"] == ["REG-001"]
    assert all(c["status"] == "skip" for c in report["checks"] if c["id"] != "REG-001")


@needs_registry
def test_remote_and_pulled_models_conform(open_registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    store_dir = tmp_path / "store"
    store = Store.open(store_dir)
    create_model(store, "zimage-sharded:ollama", MODELS / "zimage-sharded", "ollama")
    remote = f"{open_registry.host}/conformance/zimage:ollama"
    code, out = run_cli("--store", str(store_dir), "push", "zimage-sharded:ollama", remote)
    assert code == 0, out
    report = run_target(remote, None)
    assert report.ok and report.warned == []
    assert report.info["source"] == "remote" and report.info["flavour"] == "ollama"
    assert report.status_of("MAN-004") == "pass"
    pulled = tmp_path / "pulled"
    code, out = run_cli("--store", str(pulled), "pull", remote)
    assert code == 0, out
    code, out = run_cli("--store", str(pulled), "conformance", remote, "--local", "--json")
    assert code == 0, out
    assert json.loads(out)["info"]["source"] == "store"


@needs_registry
def test_remote_invalid_vector_fails_its_check(open_registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    """A broken manifest pushed byte-for-byte (bypassing imgpack's own checks) is caught when read remotely."""
    layout = VECTORS / "invalid" / "TNS-006-data-offsets"
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    base = f"{open_registry.url}/v2/conformance/broken"
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes())
    for desc in [manifest["config"], *manifest["layers"]]:
        data = (layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        start = requests.post(f"{base}/blobs/uploads/", timeout=10)
        location = requests.compat.urljoin(open_registry.url, start.headers["Location"])
        put = requests.put(location + "&digest=" + desc["digest"], data=data, timeout=10)
        assert put.status_code == 201, put.text
    raw = (layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes()
    resp = requests.put(f"{base}/manifests/v1", data=raw, headers={"Content-Type": entry["mediaType"]}, timeout=10)
    assert resp.status_code == 201, resp.text
    report = run_target(f"{open_registry.host}/conformance/broken:v1", None)
    assert report.failed == ["TNS-006"]
