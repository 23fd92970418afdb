"""Signing on real registries: sign -> verify, refusals, pull --verify-key, signatures that travel, and cosign's
formats from an implementation independent of imgpack's (tests/test_signing.py's ``Cosign``)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from fixtures_registry import needs_registry, start_registry
from test_signing import Cosign

from imgpack.conformance.verify import verify_store
from imgpack.store.store import Store

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials")]
PASSWORD = "correct horse battery staple"


@pytest.fixture
def keys(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(private key, its public key, another key's public key), made with `imgpack keygen`."""
    monkeypatch.setenv("IMGPACK_SIGNING_PASSWORD", PASSWORD)
    assert cli("keygen", "--output", str(tmp_path / "signer")).code == 0
    assert cli("keygen", "--output", str(tmp_path / "stranger")).code == 0
    assert (tmp_path / "signer.key").stat().st_mode & 0o777 == 0o600
    return tmp_path / "signer.key", tmp_path / "signer.pub", tmp_path / "stranger.pub"


def _manifest(registry, repo: str, reference: str) -> tuple[bytes, str]:
    resp = requests.get(f"{registry.url}/v2/{repo}/manifests/{reference}", timeout=10,
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json,"
                                           "application/vnd.oci.image.index.v1+json"})
    resp.raise_for_status()
    return resp.content, resp.headers["Docker-Content-Digest"]


def _blob(registry, repo: str, digest: str) -> bytes:
    resp = requests.get(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=10)
    resp.raise_for_status()
    return resp.content


def _push_sig(registry, repo: str, digest: str, manifest: bytes, blobs: dict[str, bytes]) -> None:
    """Put a .sig manifest and its blobs with plain HTTP, as another tool would."""
    for blob_digest, data in blobs.items():
        upload = requests.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=10)
        location = urljoin(registry.url, upload.headers["Location"])
        requests.put(f"{location}{'&' if '?' in location else '?'}digest={blob_digest}", data=data,
                     timeout=10).raise_for_status()
    requests.put(f"{registry.url}/v2/{repo}/manifests/sha256-{digest.split(':')[1]}.sig", data=manifest,
                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=10).raise_for_status()


def _public(path: Path):  # noqa: ANN202 - an EllipticCurvePublicKey
    return serialization.load_pem_public_key(path.read_bytes())


def test_sign_then_verify_and_an_independent_verifier_agrees(cli, store, make_model, open_registry, keys):
    private, public, stranger = keys
    make_model(store, "signed:1", {"transformer": 401, "vae": 402})
    ref = f"{open_registry.host}/signed:1"
    assert cli("push", "signed:1", ref).code == 0
    signed = cli("sign", ref, "--key", str(private))
    assert signed.code == 0, signed.err
    _, digest = _manifest(open_registry, "signed", "1")
    assert digest in signed.out

    verified = cli("verify", ref, "--key", str(public))
    assert verified.code == 0, verified.err
    assert digest in verified.out
    refused = cli("verify", ref, "--key", str(stranger))
    assert refused.code == 6 and "signature verification failed" in refused.err

    # What cosign would read: the .sig manifest and the bundle referrer, checked without imgpack's code.
    hex_digest = digest.split(":")[1]
    sig, _ = _manifest(open_registry, "signed", f"sha256-{hex_digest}.sig")
    blobs = {layer["digest"]: _blob(open_registry, "signed", layer["digest"]) for layer in json.loads(sig)["layers"]}
    assert Cosign.verify_sig(sig, blobs, _public(public), digest)
    index, _ = _manifest(open_registry, "signed", f"sha256-{hex_digest}")
    (referrer,) = json.loads(index)["manifests"]
    assert referrer["artifactType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    manifest, _ = _manifest(open_registry, "signed", referrer["digest"])
    assert json.loads(manifest)["subject"]["digest"] == digest
    bundle = _blob(open_registry, "signed", json.loads(manifest)["layers"][0]["digest"])
    assert Cosign.verify_bundle(bundle, _public(public), digest)

    # Signing again with the same key adds no duplicate layer (as cosign).
    assert cli("sign", ref, "--key", str(private)).code == 0
    again, _ = _manifest(open_registry, "signed", f"sha256-{hex_digest}.sig")
    assert len(json.loads(again)["layers"]) == 1


def test_a_different_manifest_under_the_same_tag_fails(cli, store, make_model, open_registry, keys):
    private, public, _ = keys
    make_model(store, "moved:1", {"vae": 411})
    make_model(store, "moved:2", {"vae": 412})
    ref = f"{open_registry.host}/moved:1"
    assert cli("push", "moved:1", ref).code == 0
    assert cli("sign", ref, "--key", str(private)).code == 0
    assert cli("verify", ref, "--key", str(public)).code == 0
    assert cli("push", "moved:2", ref).code == 0  # the tag now names an unsigned manifest
    result = cli("verify", ref, "--key", str(public))
    assert result.code == 6
    assert "no signature" in result.err.lower() or "not found" in result.err.lower()


def test_pull_verify_key_refuses_an_unsigned_model_before_it_is_stored(cli, store, make_model, open_registry, keys,
                                                                      tmp_path):
    _, public, _ = keys
    make_model(store, "unsigned:1", {"vae": 421})
    ref = f"{open_registry.host}/unsigned:1"
    assert cli("push", "unsigned:1", ref).code == 0
    target = tmp_path / "consumer"
    result = cli("pull", ref, "--verify-key", str(public), store=target)
    assert result.code == 6 and "signature verification failed" in result.err
    consumer = Store.open(target)
    assert consumer.references() == []
    assert list(consumer.iter_blobs()) == []  # refused before a single blob moved


def test_policy_requires_a_signature_for_a_scope(cli, store, make_model, open_registry, keys, tmp_path):
    private, public, _ = keys
    make_model(store, "policy:1", {"vae": 431})
    ref = f"{open_registry.host}/policed/policy:1"
    assert cli("push", "policy:1", ref).code == 0
    config = Path(os.environ["IMGPACK_CONFIG_DIR"])
    (config / "policy.json").write_text(json.dumps({"require": [{"scope": f"{open_registry.host}/policed",
                                                                 "key": str(public)}]}))
    assert cli("pull", ref, store=tmp_path / "a").code == 6
    assert cli("sign", ref, "--key", str(private)).code == 0
    pulled = cli("pull", ref, store=tmp_path / "b")
    assert pulled.code == 0, pulled.err
    assert verify_store(Store.open(tmp_path / "b")).ok


def test_signatures_travel_with_copy_push_and_save_load(cli, store, make_model, open_registry, keys, tmp_path):
    private, public, _ = keys
    make_model(store, "travel:1", {"transformer": 441, "vae": 442})
    ref = f"{open_registry.host}/travel:1"
    assert cli("push", "travel:1", ref).code == 0
    assert cli("sign", ref, "--key", str(private)).code == 0

    second = start_registry(tmp_path / "second")
    try:
        other = f"{second.host}/copied/travel:1"
        copied = cli("copy", ref, other)
        assert copied.code == 0, copied.err
        assert cli("verify", other, "--key", str(public)).code == 0

        pulled = tmp_path / "pulled"
        assert cli("pull", ref, store=pulled).code == 0
        assert cli("verify", ref, "--key", str(public), store=pulled).code == 0
        archive = tmp_path / "travel.tar.zst"
        assert cli("save", ref, "-o", str(archive), store=pulled).code == 0
        offline = tmp_path / "offline"
        loaded = cli("load", str(archive), store=offline)
        assert loaded.code == 0, loaded.err
        assert cli("verify", ref, "--key", str(public), store=offline).code == 0
        assert verify_store(Store.open(offline)).ok
        pushed = cli("push", ref, f"{second.host}/pushed/travel:1", store=offline)
        assert pushed.code == 0, pushed.err
        assert cli("verify", f"{second.host}/pushed/travel:1", "--key", str(public)).code == 0
    finally:
        second.stop()


def test_a_signature_made_independently_verifies(cli, store, make_model, open_registry, keys, tmp_path):
    private, public, _ = keys
    make_model(store, "foreign:1", {"vae": 451})
    ref = f"{open_registry.host}/foreign:1"
    assert cli("push", "foreign:1", ref).code == 0
    _, digest = _manifest(open_registry, "foreign", "1")
    from imgpack.signing.keys import load_private_key

    key = load_private_key(private.read_bytes(), PASSWORD).key
    payload = Cosign.payload(f"{open_registry.host}/foreign", digest)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    manifest, blobs = Cosign.sig_manifest([(payload, signature)])
    _push_sig(open_registry, "foreign", digest, manifest, blobs)
    result = cli("verify", ref, "--key", str(public))
    assert result.code == 0, result.err


def test_a_malformed_signature_is_a_reason_not_a_traceback(cli, store, make_model, open_registry, keys):
    _, public, _ = keys
    make_model(store, "broken:1", {"vae": 461})
    ref = f"{open_registry.host}/broken:1"
    assert cli("push", "broken:1", ref).code == 0
    _, digest = _manifest(open_registry, "broken", "1")
    payload = Cosign.payload(f"{open_registry.host}/broken", digest)
    manifest, blobs = Cosign.sig_manifest([(payload, "!!not base64!!")])
    _push_sig(open_registry, "broken", digest, manifest, blobs)
    result = cli("verify", ref, "--key", str(public))
    assert result.code == 6
    assert "Traceback" not in result.err and "base64" in result.err
