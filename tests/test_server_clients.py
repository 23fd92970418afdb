"""``imgpack serve`` through the official clients people already use: the ``openai`` SDK's image streaming and
output formats, and the ``ollama`` Python client (list, show, ps, generate, pull from a real registry, delete)."""

from __future__ import annotations

import base64
import io

import ollama
import openai
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.timeout(180)


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# -- openai ----------------------------------------------------------------------------------------------


def test_openai_stream_without_extra_parameters_ends_with_completed(start_server, reference_png):
    """OpenAI's own example loop, unchanged: dispatch on ``event.type``."""
    srv = start_server()
    stream = client(srv.url).images.generate(model="zimage-tiny", prompt="a red fox", size="64x48", stream=True,
                                              extra_body={"seed": 7, "steps": 2})
    completed, partial, others = [], [], []
    for event in stream:
        if event.type == "image_generation.completed":
            completed.append(event)
        elif event.type == "image_generation.partial_image":
            partial.append(event)
        else:
            others.append(event)  # imgpack's progress and done events, which carry no type
    assert partial == []
    (done,) = completed
    assert base64.b64decode(done.b64_json) == reference_png("a red fox", 7, (64, 48))
    assert (done.size, done.output_format, done.background) == ("64x48", "png", "opaque")
    assert done.usage.output_tokens == 4 * 3 and done.usage.total_tokens == 12
    assert abs(done.created_at - __import__("time").time()) < 60
    assert [(o.model_extra.get("step"), o.model_extra.get("total")) for o in others[:2]] == [(1, 2), (2, 2)]
    assert len(others) == 3  # two progress events and the final done


def test_openai_stream_with_partial_images(start_server, reference_png):
    srv = start_server()
    stream = client(srv.url).images.generate(model="zimage-tiny", prompt="a red fox", size="64x64", stream=True,
                                              partial_images=3, extra_body={"seed": 7, "steps": 8})
    events = [e for e in stream if e.type is not None]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    partials = events[:3]
    assert [p.partial_image_index for p in partials] == [0, 1, 2]
    for p in partials:
        assert p.size == "64x64" and p.output_format == "png" and decoded(p.b64_json).size == (64, 64)
    previews = [base64.b64decode(p.b64_json) for p in partials]
    final = base64.b64decode(events[-1].b64_json)
    assert final == reference_png("a red fox", 7, steps=8)
    assert len(set(previews + [final])) == 4  # each preview shows a different point of the denoising


def test_partial_images_come_at_evenly_spaced_steps(start_server):
    srv = start_server()
    body = {"model": "zimage-tiny", "prompt": "x", "size": "64x64", "steps": 8, "partial_images": 3, "stream": True}
    with requests.post(srv.url + "/v1/images/generations", json=body, stream=True, timeout=60) as response:
        names = []
        event = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                names.append(event)
    order = ["progress"] * 2 + ["image_generation.partial_image"] + ["progress"] * 2 + [
        "image_generation.partial_image"] + ["progress"] * 2 + ["image_generation.partial_image"] + ["progress"] * 2
    assert names == order + ["image_generation.completed", "done"]  # after steps 2, 4 and 6 of 8
    too_many = requests.post(srv.url + "/v1/images/generations", json=body | {"partial_images": 4}, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "partial_images"


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(start_server, fmt, pil):
    srv = start_server()
    api = client(srv.url)
    result = api.images.generate(model="zimage-tiny", prompt="a red fox", size="80x48", output_format=fmt,
                                 extra_body={"seed": 7, "steps": 1})
    image = decoded(result.data[0].b64_json)
    assert (image.format, image.size) == (pil, (80, 48))
    assert result.size == "80x48" and result.output_format == fmt
    if fmt != "png":
        small = api.images.generate(model="zimage-tiny", prompt="a red fox", size="80x48", output_format=fmt,
                                    output_compression=10, extra_body={"seed": 7, "steps": 1})
        assert len(base64.b64decode(small.data[0].b64_json)) < len(base64.b64decode(result.data[0].b64_json))
    url = api.images.generate(model="zimage-tiny", prompt="a red fox", size="80x48", output_format=fmt,
                              response_format="url", extra_body={"seed": 7, "steps": 1}).data[0].url
    fetched = requests.get(url, timeout=30)
    assert fetched.headers["Content-Type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(fetched.content)).format == pil


def test_openai_errors_then_a_good_call_on_the_same_client(start_server, reference_png):
    srv = start_server(api_key="k")
    wrong = client(srv.url, "wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(model="zimage-tiny", prompt="x", size="64x64")
    api = client(srv.url, "k")
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="zimage-tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        api.images.generate(model="zimage-tiny", prompt="x", size="65x64")
    with pytest.raises(openai.NotFoundError):
        api.images.generate(model="nope", prompt="x", size="64x64", stream=True)
    result = api.images.generate(model="zimage-tiny", prompt="a red fox", size="64x64",
                                 extra_body={"seed": 7, "steps": 2})
    assert base64.b64decode(result.data[0].b64_json) == reference_png("a red fox", 7)
    stream = api.images.generate(model="zimage-tiny", prompt="a red fox", size="64x64", stream=True,
                                 extra_body={"seed": 7, "steps": 2})
    (done,) = [e for e in stream if e.type == "image_generation.completed"]
    assert base64.b64decode(done.b64_json) == reference_png("a red fox", 7)
    assert srv.server.accepted <= 3  # the SDK's pool reused its connections through the errors


def test_openai_stream_failure_raises_api_error(start_server):
    srv = start_server(fail_at=2)
    stream = client(srv.url).images.generate(model="zimage-tiny", prompt="doomed", size="64x64", stream=True,
                                              extra_body={"steps": 4})
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in stream:
            pass


# -- ollama ----------------------------------------------------------------------------------------------


def test_ollama_list_show_generate_ps_and_unload(start_server, server_store, reference_png):
    srv = start_server()
    api = ollama.Client(host=srv.url)
    listed = {m.model: m for m in api.list().models}
    assert set(listed) == {"zimage-tiny:latest", "zimage-sharded:latest"}
    tiny = listed["zimage-tiny:latest"]
    manifest = server_store.get_manifest("zimage-tiny")
    assert tiny.digest == manifest.digest.removeprefix("sha256:") and tiny.size == manifest.total_size
    assert tiny.details.format == "safetensors" and tiny.details.quantization_level == "BF16"
    shown = api.show("zimage-tiny")
    assert shown.capabilities == ["image"]
    parameters = sum(__import__("math").prod(t.shape) for t in manifest.tensors)
    assert shown.modelinfo["general.parameter_count"] == parameters
    with pytest.raises(ollama.ResponseError) as missing:
        api.show("nope")
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"

    result = api.generate(model="zimage-tiny", prompt="a red fox", width=64, height=48, steps=2,
                          options={"seed": 7})
    assert result.done and result.done_reason == "stop"
    assert base64.b64decode(result.image) == reference_png("a red fox", 7, (64, 48))
    assert result.total_duration > 0 and result.load_duration > 0

    parts = list(api.generate(model="zimage-tiny", prompt="a red fox", width=64, height=64, steps=3, stream=True,
                              options={"seed": 7}))
    assert [(p.completed, p.total, p.done) for p in parts[:-1]] == [(1, 3, False), (2, 3, False), (3, 3, False)]
    assert parts[-1].done and base64.b64decode(parts[-1].image) == reference_png("a red fox", 7, steps=3)

    (row,) = api.ps().models
    assert row.model == "zimage-tiny:latest" and row.digest == tiny.digest and row.size > 0
    assert row.expires_at is not None
    with pytest.raises(ollama.ResponseError) as bad:
        api.generate(model="zimage-tiny", prompt="x", width=65)
    assert bad.value.status_code == 400 and "width" in bad.value.error
    unloaded = api.generate(model="zimage-tiny", keep_alive=0)
    assert unloaded.done_reason == "unload" and api.ps().models == []
    loaded = api.generate(model="zimage-sharded", keep_alive="1m")
    assert loaded.done_reason == "load" and [m.model for m in api.ps().models] == ["zimage-sharded:latest"]


def test_ollama_pull_from_a_registry_then_generate_and_delete(start_server, tmp_path, open_registry, reference_png):
    """Push the tiny model to a real docker-registry, pull it through ``/api/pull``, use it, delete it."""
    from imgpack.cli.main import main
    from imgpack.packager.create import create_model
    from imgpack.store.store import Store

    source = Store.open(tmp_path / "source")
    create_model(source, "zimage-tiny:latest", __import__("pathlib").Path(__file__).parent / "models" / "zimage-tiny")
    remote = f"{open_registry.host}/pulltest/zimage-tiny:v1"
    assert main(["--store", str(source.root), "push", "zimage-tiny:latest", remote, "--quiet"]) == 0

    store = Store.open(tmp_path / "served")
    srv = start_server(store=store)
    api = ollama.Client(host=srv.url)
    assert api.list().models == []
    statuses = list(api.pull(remote, stream=True))
    names = [s.status for s in statuses]
    assert names[0] == "pulling manifest" and names[-2:] == ["writing manifest", "success"]
    moving = [s for s in statuses if s.status == "pulling model"]
    total = sum({b.digest: b.size for b in source.get_manifest("zimage-tiny").blobs}.values())
    assert moving and all(s.total == total for s in moving) and moving[-1].completed == total
    assert [s.completed for s in moving] == sorted(s.completed for s in moving)
    assert moving[0].digest == source.resolve("zimage-tiny")[1]
    assert [m.model for m in api.list().models] == [remote]
    assert api.pull(remote).status == "success"  # again, not streamed: already there

    result = api.generate(model=remote, prompt="a red fox", width=64, height=64, steps=2, options={"seed": 7})
    assert base64.b64decode(result.image) == reference_png("a red fox", 7)

    with pytest.raises(ollama.ResponseError) as missing:
        api.pull(f"{open_registry.host}/pulltest/nothing:v1")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as hostless:
        api.pull("zimage-tiny")
    assert hostless.value.status_code == 400 and "names no registry" in hostless.value.error

    assert api.delete(remote).status == "success"
    assert api.list().models == [] and api.ps().models == []
    with pytest.raises(ollama.ResponseError) as gone:
        api.delete(remote)
    assert gone.value.status_code == 404


def test_ollama_version(start_server):
    import importlib.metadata

    srv = start_server()
    assert requests.get(srv.url + "/api/version", timeout=30).json() == {
        "version": importlib.metadata.version("imgpack")}
