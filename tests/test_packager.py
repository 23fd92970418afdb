"""imgpack create / export / store: round trips, reproducibility, dedup, bad input and interop with skopeo."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from imgpack.conformance.verify import verify_store
from imgpack.packager.create import create_model
from imgpack.packager.export import export_model
from imgpack.schemas import spec
from imgpack.schemas.errors import ImgpackError, IntegrityError
from imgpack.schemas.graph import Descriptor
from imgpack.schemas.manifest import ModelManifest
from imgpack.schemas.safetensors import read_header, tensor_blob_problems
from imgpack.schemas.validate import schema_errors
from imgpack.store.store import Store


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def store_snapshot(store: Store) -> dict[str, bytes]:
    """Everything a reader of the layout could see (blobs, index), plus any temp files left behind."""
    snap = {p.relative_to(store.root).as_posix(): p.read_bytes() for p in store.root.rglob("*")
            if p.is_file() and ".imgpack" not in p.relative_to(store.root).parts}
    snap["ingest"] = repr(sorted(os.listdir(store.ingest_dir))).encode()
    return snap


def safetensors_tensors(directory: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) for every tensor under ``directory``, read straight from the files."""
    out = {}
    for path in sorted(directory.rglob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        prefix = path.parent.relative_to(directory).as_posix()
        for key, info in header.items():
            begin, end = info["data_offsets"]
            out[f"{prefix}/{key}"] = (info["dtype"], info["shape"], raw[8 + n + begin : 8 + n + end])
    return out


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["zimage-tiny", "zimage-sharded"])
@pytest.mark.parametrize("fmt", ["oci", "ollama"])
def test_create_export_round_trip_is_bit_exact(store: Store, tmp_path: Path, model: str, fmt: str) -> None:
    source = Path(__file__).parent / "models" / model
    result = create_model(store, f"{model}:test", source, fmt=fmt)
    manifest = store.get_manifest(f"{model}:test")
    assert manifest.digest == result.digest
    assert manifest.flavour == fmt
    exported = tmp_path / "exported"
    export_model(store, f"{model}:test", exported)
    assert tree_bytes(exported) == tree_bytes(source)
    # Every tensor is its own blob, in the exact spec v1 form, holding the source bytes.
    source_tensors = safetensors_tensors(source)
    assert {layer.name for layer in manifest.tensors} == set(source_tensors)
    for layer in manifest.tensors:
        dtype, shape, data = source_tensors[layer.name]
        assert (layer.dtype, layer.shape) == (dtype, shape)
        assert layer.annotations[spec.TITLE_ANNOTATION] == layer.name
        blob = store.blob_path(layer.digest).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
        (n,) = struct.unpack("<Q", blob[:8])
        assert n % 8 == 0
        text = blob[8 : 8 + n]
        assert text == text.rstrip(b" ") + b" " * (n - len(text.rstrip(b" ")))
        assert json.loads(text) == {"data": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}
        assert blob[8 + n :] == data


def test_sharded_model_keeps_index_files_and_shards(store: Store, sharded_model: Path) -> None:
    create_model(store, "sharded", sharded_model)
    manifest = store.get_manifest("sharded")
    names = {layer.name for layer in manifest.files}
    indexes = {p.relative_to(sharded_model).as_posix() for p in sharded_model.rglob("*.index.json")}
    assert indexes and indexes <= names
    shards = {p.relative_to(sharded_model).as_posix() for p in sharded_model.rglob("*.safetensors")}
    assert {layer.name for layer in manifest.headers} == shards
    assert len(shards) > len({s.split("/")[0] for s in shards})  # some component really is sharded
    config = json.loads(store.read_blob(manifest.config.digest))
    assert len(config["dtypes"]) >= 2


def test_exported_model_loads_with_safetensors(store: Store, tmp_path: Path, sharded_model: Path) -> None:
    """The safetensors library itself (numpy has no bfloat16, so the sharded model's F16/F32 parts) reads it."""
    create_model(store, "sharded", sharded_model)
    export_model(store, "sharded", tmp_path / "out")
    checked = 0
    for path in sharded_model.rglob("*.safetensors"):
        with safe_open(path, framework="np") as f:
            if any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys()):
                continue
        ours = load_file(tmp_path / "out" / path.relative_to(sharded_model))
        theirs = load_file(path)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and ours[key].tobytes() == theirs[key].tobytes()
            checked += 1
    assert checked > 10


def test_config_blob_summarises_the_model(store: Store, tiny_model: Path) -> None:
    create_model(store, "tiny", tiny_model)
    manifest = store.get_manifest("tiny")
    config = json.loads(store.read_blob(manifest.config.digest))
    assert schema_errors("config", config) == []
    assert config["architecture"] == "ZImagePipeline"
    tensors = safetensors_tensors(tiny_model)
    assert config["parameterCount"] == sum(math.prod(shape) for _, shape, _ in tensors.values())
    assert set(config["dtypes"]) == {dtype for dtype, _, _ in tensors.values()}
    assert set(config["components"]) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert config["components"]["transformer"]["tensors"] == sum(1 for n in tensors if n.startswith("transformer/"))
    assert "created" not in config


def test_ollama_export_without_header_layers_synthesises_loadable_files(
    store: Store, tmp_path: Path, tiny_model: Path
) -> None:
    """A manifest made by another tool has no header layers: export writes standard files per component."""
    create_model(store, "tiny", tiny_model, fmt="ollama")
    manifest = store.get_manifest("tiny")
    document = json.loads(manifest.raw)
    document["layers"] = [d for d in document["layers"] if d["mediaType"] != spec.SAFETENSORS_HEADER_MEDIA_TYPE]
    raw = json.dumps(document).encode()
    store.put_manifest("stripped", raw)
    export_model(store, "stripped", tmp_path / "out")
    assert (tmp_path / "out/text_encoder/model.safetensors").exists()
    assert (tmp_path / "out/transformer/diffusion_pytorch_model.safetensors").exists()
    ours = safetensors_tensors(tmp_path / "out")
    assert ours == safetensors_tensors(tiny_model)


# -- reproducibility, dedup, cache ------------------------------------------------------------------------


def test_same_directory_gives_same_digest_everywhere(tmp_path: Path, tiny_model: Path) -> None:
    a = create_model(Store.open(tmp_path / "a"), "m:1", tiny_model).digest
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    b = create_model(Store.open(tmp_path / "b"), "m:1", copy).digest
    c = create_model(Store.open(tmp_path / "a"), "m:1", tiny_model).digest
    assert a == b == c
    stamped = create_model(Store.open(tmp_path / "c"), "m:1", tiny_model, timestamp=True)
    assert stamped.digest != a


def test_identical_tensors_are_stored_once(store: Store, tiny_model: Path, sharded_model: Path) -> None:
    first = create_model(store, "one", tiny_model)
    assert first.new_blobs > 300
    again = create_model(store, "two", tiny_model)
    assert again.new_blobs == 0 and again.new_bytes == 0
    assert again.digest == first.digest
    blobs_before = set(store.iter_blobs())
    create_model(store, "three", sharded_model)
    shared = {layer.digest for layer in store.get_manifest("one").blobs} & {
        layer.digest for layer in store.get_manifest("three").blobs
    }
    assert shared  # identical configs/tensors across the two models share blobs
    assert shared <= blobs_before


def test_recreate_unchanged_directory_reads_nothing(store: Store, model_copy) -> None:
    source = model_copy()
    create_model(store, "m", source)
    n_files = len(list(source.rglob("*.safetensors")))
    again = create_model(store, "m", source)
    assert again.cached_files == n_files
    weights = source / "vae" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_mtime_ns + 10**9,) * 2)
    touched = create_model(store, "m", source)
    assert touched.cached_files == n_files - 1
    assert touched.digest == again.digest
    # A cache entry whose blob vanished is not trusted.
    victim = store.get_manifest("m").tensors[0]
    store.blob_path(victim.digest).unlink()
    repaired = create_model(store, "m", source)
    assert repaired.new_blobs == 1
    assert verify_store(store, "m").ok


# -- bad input ----------------------------------------------------------------------------------------------


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


def assert_refused(store: Store, directory: Path, *fragments: str) -> None:
    before = store_snapshot(store)
    with pytest.raises(ImgpackError) as info:
        create_model(store, "bad:1", directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert store_snapshot(store) == before
    assert all(ref != "bad:1" for ref, _ in store.references())


@pytest.fixture
def populated(store: Store, tiny_model: Path) -> Store:
    create_model(store, "good", tiny_model)
    return store


VAE = "vae/diffusion_pytorch_model.safetensors"


def test_not_a_diffusers_model(populated: Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(populated, tmp_path / "empty", "model_index.json")


def test_missing_component_folder(populated: Store, model_copy) -> None:
    model = model_copy()
    shutil.rmtree(model / "vae")
    assert_refused(populated, model, "model_index.json", "'vae'")


def test_truncated_safetensors(populated: Store, model_copy) -> None:
    model = model_copy()
    path = model / VAE
    path.write_bytes(path.read_bytes()[:-7])
    assert_refused(populated, model, str(path), "past the end")


def test_header_length_past_end_of_file(populated: Store, model_copy) -> None:
    model = model_copy()
    write_raw_safetensors(model / VAE, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                          b"\0" * 4, header_len=10_000)
    assert_refused(populated, model, VAE, "runs past the end")


def test_header_length_over_limit(populated: Store, model_copy) -> None:
    model = model_copy()
    write_raw_safetensors(model / VAE, {}, b"", header_len=2**40)
    assert_refused(populated, model, VAE, "limit")


def test_overlapping_offsets(populated: Store, model_copy) -> None:
    model = model_copy()
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    write_raw_safetensors(model / VAE, header, b"\1" * 12)
    assert_refused(populated, model, VAE, "'b'", "overlaps")


def test_out_of_range_offsets(populated: Store, model_copy) -> None:
    model = model_copy()
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    write_raw_safetensors(model / VAE, header, b"\1" * 8)
    assert_refused(populated, model, VAE, "'a'", "past the end")


def test_unknown_dtype(populated: Store, model_copy) -> None:
    model = model_copy()
    write_raw_safetensors(model / VAE, {"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, b"\1\2")
    assert_refused(populated, model, VAE, "'a'", "unknown dtype 'F12'")


def test_shape_does_not_match_bytes(populated: Store, model_copy) -> None:
    model = model_copy()
    write_raw_safetensors(model / VAE, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\1" * 8)
    assert_refused(populated, model, VAE, "'a'", "needs 12 bytes")


def test_duplicate_tensor_name_across_files(populated: Store, model_copy) -> None:
    model = model_copy()
    save_file({"decoder.conv_in.bias": np.ones(3, np.float32) * 2}, str(model / "vae" / "extra.safetensors"))
    assert_refused(populated, model, "duplicate tensor name 'decoder.conv_in.bias'")


def test_duplicate_tensor_name_in_one_header(populated: Store, model_copy) -> None:
    model = model_copy()
    text = (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
    write_raw_safetensors(model / VAE, text, b"\1\2")
    assert_refused(populated, model, VAE, "duplicate tensor name 'a'")


@pytest.mark.parametrize("bad_key", ["../escape", "/abs", "a\\b", "a//b", "ctl\x07x"])
def test_unsafe_tensor_name(populated: Store, model_copy, bad_key: str) -> None:
    model = model_copy()
    write_raw_safetensors(model / VAE, {bad_key: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\1")
    assert_refused(populated, model, VAE, "unsafe name")


def test_invalid_config_json(populated: Store, model_copy) -> None:
    model = model_copy()
    (model / "vae" / "config.json").write_text("{not json")
    assert_refused(populated, model, "vae/config.json", "not valid JSON")


def test_cli_bad_input_exit_code_and_message(cli, model_copy) -> None:
    model = model_copy()
    path = model / VAE
    path.write_bytes(path.read_bytes()[:-1])
    result = cli("create", "bad", str(model))
    assert result.code == 1
    assert str(path) in result.err


# -- the store ----------------------------------------------------------------------------------------------


def test_manifest_refused_when_a_blob_is_missing(populated: Store) -> None:
    manifest = populated.get_manifest("good")
    victim = manifest.tensors[5]
    populated.blob_path(victim.digest).unlink()
    with pytest.raises(IntegrityError, match=victim.name):
        populated.put_manifest("other", manifest.raw)
    assert "other:latest" not in dict(populated.references())


def test_manifest_with_unsafe_name_is_refused_on_read(populated: Store) -> None:
    document = json.loads(populated.get_manifest("good").raw)
    document["layers"][3]["name"] = "../../etc/passwd"
    with pytest.raises(ImgpackError, match=r"layers\[3\]"):
        ModelManifest.from_bytes(json.dumps(document).encode(), source="evil")


def test_verify_finds_a_flipped_byte(populated: Store, cli) -> None:
    layer = populated.get_manifest("good").tensors[0]
    path = populated.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_store(populated)
    assert not report.ok and layer.name in report.problems[0] and "corrupt" in report.problems[0]
    result = cli("verify", store=populated.root)
    assert result.code == 6 and layer.name in result.err


def test_tag_rm_prune(populated: Store, sharded_model: Path) -> None:
    create_model(populated, "other", sharded_model)
    populated.tag("good", "alias:v2")
    assert dict(populated.references())["alias:v2"] == dict(populated.references())["good:latest"]
    good_blobs = {b.digest for b in populated.get_manifest("good").blobs}
    other_blobs = {b.digest for b in populated.get_manifest("other").blobs}
    populated.remove("other")
    removed, freed = populated.prune()
    remaining = set(populated.iter_blobs())
    assert other_blobs - good_blobs and not (other_blobs - good_blobs) & remaining
    assert good_blobs <= remaining
    assert removed >= len(other_blobs - good_blobs) and freed > 0
    assert verify_store(populated).ok


def _tag_many(root: str, prefix: str) -> None:
    store = Store.open(root)
    for i in range(15):
        store.tag("good", f"{prefix}-{i}")


def test_concurrent_writers_lose_no_index_entries(populated: Store) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_tag_many, args=(str(populated.root), p)) for p in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    refs = dict(populated.references())
    assert all(f"{p}-{i}:latest" in refs for p in "abc" for i in range(15))
    assert len(refs) == 46


def test_stale_temp_files_of_dead_processes_are_removed(populated: Store) -> None:
    proc = subprocess.run(["true"])
    assert proc.returncode == 0
    dead_pid = 2**22 - 3  # above the default pid_max, so no live process has it
    stale = populated.ingest_dir / f"tmp-{dead_pid}-abc"
    stale.write_bytes(b"x")
    partial = populated.partial_path("sha256:" + "a" * 64)
    partial.write_bytes(b"resume me")
    Store.open(populated.root)
    assert not stale.exists()
    assert partial.exists()  # resumable downloads are kept


def test_blob_files_always_match_their_names(populated: Store) -> None:
    for digest in populated.iter_blobs():
        data = populated.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def test_tensor_header_reader_accepts_other_single_keys(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    save_file({"decoder.weight": np.arange(6, dtype=np.float16).reshape(2, 3)}, str(path))
    with open(path, "rb") as f:
        header = read_header(f, path.stat().st_size)
    ((key, entry),) = header.entries.items()
    assert (key, entry.dtype, entry.shape, entry.nbytes) == ("decoder.weight", "F16", [2, 3], 12)
    assert any("not 'data'" in d for _, d in tensor_blob_problems(header, path.stat().st_size))


# -- CLI ----------------------------------------------------------------------------------------------------


def test_cli_commands(cli, tiny_model: Path, tmp_path: Path) -> None:
    assert cli("create", "tiny:v1", str(tiny_model)).code == 0
    listed = cli("list", "--json")
    rows = json.loads(listed.out)
    assert [r["reference"] for r in rows] == ["tiny:v1"]
    shown = json.loads(cli("show", "tiny:v1", "--json").out)
    assert shown["config"]["architecture"] == "ZImagePipeline"
    assert shown["digest"] == rows[0]["digest"]
    table = cli("show", "tiny:v1", "--tensors").out
    assert "transformer/" in table and "BF16" in table
    assert cli("tag", "tiny:v1", "tiny:v2").code == 0
    assert cli("export", "tiny:v2", str(tmp_path / "out")).code == 0
    assert tree_bytes(tmp_path / "out") == tree_bytes(tiny_model)
    refused = cli("export", "tiny:v2", str(tmp_path / "out"))
    assert refused.code == 1 and "refusing to overwrite" in refused.err
    assert cli("verify", "tiny:v1").code == 0
    assert cli("rm", "tiny:v1").code == 0
    missing = cli("show", "tiny:v1")
    assert missing.code == 4 and "tiny:v1" in missing.err
    assert cli("show", "Not A Ref").code == 2
    assert cli("prune").code == 0
    assert cli("verify", "tiny:v2").code == 0


# -- interop ------------------------------------------------------------------------------------------------


def test_skopeo_reads_the_store(store: Store, tiny_model: Path, tmp_path: Path) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo, "skopeo is required (apt-get install skopeo; .ci/run installs it)"
    create_model(store, "localhost:5000/zimage/tiny:v1", tiny_model)
    manifest = store.get_manifest("localhost:5000/zimage/tiny:v1")
    raw = subprocess.run([skopeo, "inspect", "--raw", f"oci:{store.root}:localhost:5000/zimage/tiny:v1"],
                         check=True, capture_output=True).stdout
    assert raw == manifest.raw
    out = tmp_path / "copy"
    subprocess.run([skopeo, "copy", "-q", f"oci:{store.root}:localhost:5000/zimage/tiny:v1", f"oci:{out}:copied"],
                   check=True, capture_output=True)
    copied = Store.open(out, create=False)
    assert copied.resolve("copied")[1] == manifest.digest
    assert verify_store(copied, "copied").ok


# -- save / load ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_damage(cli, tmp_path: Path, tiny_model: Path, sharded_model: Path) -> None:
    assert cli("create", "tiny:v1", str(tiny_model)).code == 0
    assert cli("create", "sharded:v1", str(sharded_model)).code == 0
    archive = tmp_path / "models.tar.zst"
    assert cli("save", "tiny:v1", "sharded:v1", "-o", str(archive)).code == 0
    source = Store.open(tmp_path / "store")
    other = tmp_path / "other"
    loaded = cli("load", str(archive), store=other)
    assert loaded.code == 0, loaded.err
    target = Store.open(other)
    assert dict(target.references()) == dict(source.references())
    assert verify_store(target).ok
    assert set(target.iter_blobs()) == set(source.iter_blobs())
    # Loading again adds nothing; a truncated archive adds no manifest and no corrupt blob.
    again = cli("load", str(archive), store=other)
    assert again.code == 0 and "0 new" in again.out
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    third = tmp_path / "third"
    failed = cli("load", str(cut), store=third)
    assert failed.code == 6 and "cut.tar.zst" in failed.err
    partial = Store.open(third)
    assert partial.references() == []
    for digest in partial.iter_blobs():
        assert "sha256:" + hashlib.sha256(partial.blob_path(digest).read_bytes()).hexdigest() == digest
    assert os.listdir(partial.ingest_dir) == []
    # The archive is a plain OCI layout once decompressed: skopeo-compatible, no imgpack needed.
    import tarfile

    import zstandard

    unpacked = tmp_path / "unpacked"
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zst, \
            tarfile.open(fileobj=zst, mode="r|") as tar:
        tar.extractall(unpacked, filter="data")
    layout = Store.open(unpacked, create=False)
    assert verify_store(layout, "tiny:v1").ok


def test_digest_references_are_pinned_not_tagged(store: Store, tiny_model: Path) -> None:
    digest = create_model(store, "tiny:v1", tiny_model).digest
    raw = store.get_manifest("tiny:v1").raw
    store.remove("tiny:v1")
    pinned = f"example.com/tiny@{digest}"
    store.put_manifest(pinned, raw)
    assert dict(store.references()) == {pinned: digest}  # no ":latest" tag was invented
    store.prune()
    assert verify_store(store, pinned).ok  # prune kept what the pin needs
    store.remove(pinned)
    assert store.references() == []
    removed, _ = store.prune()
    assert removed > 300 and list(store.iter_blobs()) == []


def test_name_that_is_also_a_folder_is_refused_before_writing(populated: Store, model_copy) -> None:
    model = model_copy()
    clash = model / "vae" / "config.json" / "notes.txt"
    (model / "vae" / "config.json").unlink()
    clash.parent.mkdir()
    clash.write_text("x")
    write_raw_safetensors(model / VAE, {"config.json": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\1")
    assert_refused(populated, model, "also the folder of layer")


def test_prune_keeps_blobs_of_foreign_oci_images(populated: Store) -> None:
    config = populated.put_bytes(b'{"architecture":"amd64","os":"linux"}')
    layer = populated.put_bytes(b"not an imgpack layer")
    image = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer[0], "size": layer[1]}],
    }).encode()
    digest, size = populated.put_bytes(image)
    populated.set_entry("alpine", Descriptor(spec.OCI_MANIFEST, digest, size))
    populated.prune()
    assert populated.has_blob(config[0]) and populated.has_blob(layer[0]) and populated.has_blob(digest)
    assert verify_store(populated, "good").ok
