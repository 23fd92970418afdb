"""``imgpack serve`` through the official ``openai`` client and plain HTTP: images, streams and every error."""

from __future__ import annotations

import base64
import io
import json
import os
import socket

import openai
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def sse(response: requests.Response) -> list[tuple[str, dict]]:
    events, event = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[6:])))
    return events


# -- images through the openai client ------------------------------------------------------------------


def test_b64_json_matches_in_process_bytes(start_server, reference_png):
    srv = start_server()
    result = client(srv.url).images.generate(
        model="zimage-tiny", prompt="a red fox", size="64x48", extra_body={"seed": 7, "steps": 2},
    )
    assert len(result.data) == 1
    png = base64.b64decode(result.data[0].b64_json)
    assert png_size(png) == (64, 48)
    assert png == reference_png("a red fox", 7, (64, 48))
    assert abs(result.created - __import__("time").time()) < 60


def test_url_format_serves_the_same_png(start_server, reference_png):
    srv = start_server()
    result = client(srv.url).images.generate(
        model="zimage-tiny:latest", prompt="a red fox", size="64x64", response_format="url",
        extra_body={"seed": 7, "steps": 2},
    )
    url = result.data[0].url
    assert url.startswith(srv.url + "/v1/images/files/") and url.endswith(".png")
    fetched = requests.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert fetched.content == reference_png("a red fox", 7)
    assert requests.get(url.replace("/files/", "/files/x"), timeout=30).status_code == 404


def test_n_images_use_consecutive_seeds(start_server, reference_png):
    srv = start_server()
    result = client(srv.url).images.generate(model="zimage-tiny", prompt="owls", size="64x64", n=3,
                                             extra_body={"seed": 20, "steps": 2})
    pngs = [base64.b64decode(d.b64_json) for d in result.data]
    assert [d.model_extra["seed"] for d in result.data] == [20, 21, 22]
    assert pngs == [reference_png("owls", s) for s in (20, 21, 22)]
    assert len(set(pngs)) == 3


def test_models_list_and_retrieve(start_server, server_store):
    srv = start_server()
    api = client(srv.url)
    ids = sorted(m.id for m in api.models.list())
    assert ids == ["zimage-sharded:latest", "zimage-tiny:latest"]
    model = api.models.retrieve("zimage-tiny")
    assert model.id == "zimage-tiny:latest" and model.owned_by == "imgpack"
    assert model.model_extra["digest"] == server_store.resolve("zimage-tiny")[1]
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("nope")


# -- streaming ---------------------------------------------------------------------------------------------


def test_stream_reports_every_step_then_the_image(start_server, reference_png):
    srv = start_server()
    body = {"model": "zimage-tiny", "prompt": "a lighthouse", "size": "64x64", "steps": 3, "n": 2, "seed": 5,
            "stream": True}
    with requests.post(srv.url + "/v1/images/generations", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        events = sse(response)
    progress = [data for event, data in events if event == "progress"]
    assert progress == [{"step": i, "total": 6} for i in range(1, 7)]
    assert [event for event, _ in events] == ["progress"] * 6 + ["image_generation.completed"] * 2 + ["done"]
    done = events[-1][1]
    assert set(done) == {"created", "data", "size", "output_format", "background", "quality", "usage"}
    assert (done["size"], done["output_format"]) == ("64x64", "png")
    pngs = [base64.b64decode(d["b64_json"]) for d in done["data"]]
    assert pngs == [reference_png("a lighthouse", 5, steps=3), reference_png("a lighthouse", 6, steps=3)]
    completed = [data for event, data in events if event == "image_generation.completed"]
    assert [base64.b64decode(c["b64_json"]) for c in completed] == pngs


def test_stream_failure_midway_is_an_error_event(start_server):
    srv = start_server(fail_at=2)
    body = {"model": "zimage-tiny", "prompt": "doomed", "size": "64x64", "steps": 4, "stream": True}
    with requests.post(srv.url + "/v1/images/generations", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200
        events = sse(response)
    assert [e for e, _ in events] == ["progress", "error"]
    assert events[0][1] == {"step": 1, "total": 4}
    error = events[1][1]["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "injected failure" in error["message"] and "zimage-tiny:latest" in error["message"]
    assert srv.finished_job("doomed").state == "failed"
    # The same failure without streaming is a 500 in the same shape.
    response = srv.post("/v1/images/generations", {"model": "zimage-tiny", "prompt": "doomed again", "size": "64x64"})
    assert response.status_code == 500
    assert "injected failure" in response.json()["error"]["message"]


# -- errors ------------------------------------------------------------------------------------------------


BAD_REQUESTS = [
    ({"model": "zimage-tiny"}, "prompt", "missing_required_parameter"),
    ({"model": "zimage-tiny", "prompt": "   "}, "prompt", "missing_required_parameter"),
    ({"model": "zimage-tiny", "prompt": 3}, "prompt", "invalid_value"),
    ({"prompt": "x"}, "model", "missing_required_parameter"),
    ({"model": 5, "prompt": "x"}, "model", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "size": "64"}, "size", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "size": "65x64"}, "size", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "size": "0x64"}, "size", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "size": "4096x4096"}, "size", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "size": 64}, "size", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "n": 0}, "n", "out_of_range"),
    ({"model": "zimage-tiny", "prompt": "x", "n": 11}, "n", "out_of_range"),
    ({"model": "zimage-tiny", "prompt": "x", "n": "2"}, "n", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "n": True}, "n", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "response_format": "jpeg"}, "response_format", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "stream": "yes"}, "stream", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "steps": 0}, "steps", "out_of_range"),
    ({"model": "zimage-tiny", "prompt": "x", "seed": -1}, "seed", "out_of_range"),
    ({"model": "zimage-tiny", "prompt": "x", "guidance": "high"}, "guidance", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "keep_alive": "soon"}, "keep_alive", "invalid_value"),
    ({"model": "zimage-tiny", "prompt": "x", "negative": "blur"}, "negative", "unknown_parameter"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_REQUESTS, ids=[f"{b[1]}-{i}" for i, b in
                                                                        enumerate(BAD_REQUESTS)])
def test_bad_request_names_the_field(start_server, body, param, code):
    srv = start_server()
    for stream in (False, True):
        response = srv.post("/v1/images/generations", body | ({"stream": True} if stream and param != "stream"
                                                               else {}))
        assert response.status_code == 400, response.text
        assert response.headers["Content-Type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
        assert error["message"].startswith(f"{param}: ")
    assert not srv.manager.history and srv.ps() == []  # nothing was queued or loaded


def test_openai_client_sees_openai_errors(start_server):
    srv = start_server()
    api = client(srv.url)
    with pytest.raises(openai.BadRequestError) as bad:
        api.images.generate(model="zimage-tiny", prompt="x", size="100x100")
    assert bad.value.status_code == 400 and bad.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as missing:
        api.images.generate(model="no-such-model", prompt="x", size="64x64")
    assert missing.value.body["code"] == "model_not_found"
    assert "no-such-model" in missing.value.body["message"]


def test_body_errors(start_server):
    srv = start_server()
    url = srv.url + "/v1/images/generations"
    json_type = {"Content-Type": "application/json"}
    big = requests.post(url, data=b"{" + b" " * (2 * 1024 * 1024) + b"}", timeout=30, headers=json_type)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    not_json = requests.post(url, data=b"{nope", timeout=30, headers=json_type)
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    array = requests.post(url, json=["model"], timeout=30)
    assert array.status_code == 400 and "JSON object" in array.json()["error"]["message"]
    # A chunked body is read like any other (within the same size limit).
    chunked = requests.post(url, data=iter([b'{"model": "zimage-tiny", ', b'"prompt": "x", "size": "1x1"}']),
                            timeout=30, headers=json_type)
    assert chunked.status_code == 400 and chunked.json()["error"]["param"] == "size"
    assert srv.get("/v1/nothing").status_code == 404
    wrong_method = srv.get("/v1/images/generations")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_413_is_answered_without_reading_the_body(start_server):
    """A client announcing a huge body gets its 413 at once, not after uploading it."""
    srv = start_server(max_body=1000)
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413 ")
    assert '"request_too_large"' in reply and "Connection: close" in reply


def test_api_key(start_server, reference_png):
    srv = start_server(api_key="s3cret")
    body = {"model": "zimage-tiny", "prompt": "a red fox", "size": "64x64", "seed": 7, "steps": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        response = srv.post("/v1/images/generations", body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert srv.get("/api/ps", headers=headers).status_code == 401
        assert srv.get("/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(srv.url, "wrong").models.list()
    result = client(srv.url, "s3cret").images.generate(
        model="zimage-tiny", prompt="a red fox", size="64x64", response_format="url",
        extra_body={"seed": 7, "steps": 2})
    assert requests.get(result.data[0].url, timeout=30).content == reference_png("a red fox", 7)


# -- the store is the only thing a request can reach ------------------------------------------------------


TRAVERSALS = [
    "../../etc/passwd", "/etc/passwd", "..", "zimage-tiny/../../../etc/passwd", "zimage-tiny:../../x",
    "zimage-tiny@sha256:../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "C:\\Windows\\win.ini",
    "blobs/sha256/../../index.json", "./zimage-tiny", "zimage-tiny\x00", "~/.ssh/id_rsa", "ZIMAGE-TINY",
]


def test_model_paths_are_refused(start_server, server_store, tmp_path):
    srv = start_server()
    root = server_store.root
    before = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*") if ".imgpack" not in p.parts)
    for model in TRAVERSALS:
        response = srv.post("/v1/images/generations", {"model": model, "prompt": "x", "size": "64x64"})
        assert response.status_code == 400, (model, response.text)
        error = response.json()["error"]
        assert error["param"] == "model" and error["code"] == "invalid_model"
        assert "root:" not in response.text and str(root) not in response.text
        assert srv.post("/api/stop", {"model": model}).status_code == 404
    for path in ("/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/images/files/../../etc/passwd",
                 "/v1/images/files/..%2F..%2Findex.json", "/v1/images/files/" + "a" * 30 + ".png"):
        response = srv.get(path)
        assert response.status_code in (400, 404), path
        assert "imageLayoutVersion" not in response.text and "root:" not in response.text
    # A digest reference reaches only indexed manifests, never an arbitrary blob (here: a tensor).
    tensor = server_store.get_manifest("zimage-tiny").tensors[0].digest
    response = srv.post("/v1/images/generations", {"model": f"zimage-tiny@{tensor}", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = srv.post("/v1/images/generations", {"model": f"other@{tensor}", "prompt": "x"})
    assert response.status_code == 404
    after = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*") if ".imgpack" not in p.parts)
    assert after == before
    assert not srv.manager.history and srv.ps() == []


def test_serve_refuses_a_busy_port(server_store):
    from imgpack.schemas.errors import ImgpackError
    from imgpack.server.http import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ImgpackError, match="cannot listen on 127.0.0.1"):
            serve(server_store, "127.0.0.1", taken.getsockname()[1], quiet=True)


def test_default_bind_is_loopback():
    from imgpack.cli.server_commands import split_listen
    from imgpack.server import http as server

    assert server.DEFAULT_HOST == "127.0.0.1" and server.is_loopback(server.DEFAULT_HOST)
    env = os.environ.pop("IMGPACK_HOST", None)
    try:
        assert split_listen("127.0.0.1", None) == ("127.0.0.1", 8420)
        assert split_listen("localhost:9000", None) == ("localhost", 9000)
        assert split_listen("http://[::1]:9000", 9001) == ("::1", 9001)
    finally:
        if env is not None:
            os.environ["IMGPACK_HOST"] = env


def test_model_that_does_not_fit_is_refused_with_503_before_loading(start_server, server_store, monkeypatch):
    import requests

    import imgpack.runtime.backend as backend

    monkeypatch.setattr(backend, "available_memory", lambda: 1024)
    srv = start_server()
    model = server_store.references()[0][0]
    r = requests.post(f"{srv.url}/v1/images/generations", json={"model": model, "prompt": "a fox", "size": "64x64"},
                      timeout=60)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "insufficient_memory" and "needs about" in error["message"]
    assert srv.loaded == []  # nothing was loaded
