"""``imgpack serve`` scheduling: queueing in order, cancelling on disconnect, 503 on a full queue, keep-alive,
``stop``, and the ``imgpack ps``/``stop``/``run --host`` clients."""

from __future__ import annotations

import base64
import gc
import json
import threading

import openai
import pytest

pytestmark = pytest.mark.timeout(120)

#: A job long enough to still be running when the test acts (100 steps of 0.1-0.3 s on a small CPU); tests end it
#: early by hanging up.
LONG = {"model": "zimage-tiny", "size": "256x256", "steps": 100, "stream": True}


def first_progress(stream) -> dict:
    """Read a stream until its first progress event (the job is running)."""
    for event, data in stream.events():
        assert event == "progress", (event, data)
        return data
    raise AssertionError("the stream ended before any progress")


def test_concurrent_requests_are_all_answered(start_server, reference_png):
    srv = start_server()
    api = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    results: dict[tuple[str, int], bytes] = {}
    errors: list[BaseException] = []

    def one(model: str, seed: int) -> None:
        try:
            r = api.images.generate(model=model, prompt="a crowd", size="64x64", extra_body={"seed": seed, "steps": 2})
            results[(model, seed)] = base64.b64decode(r.data[0].b64_json)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    jobs = [("zimage-tiny", s) for s in range(4)] + [("zimage-sharded", s) for s in range(2)]
    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert {k: results.get(k) for k in jobs} == {
        (m, s): reference_png("a crowd", s, model=m) for m, s in jobs
    }
    # One worker per model: both models were loaded once, and each ran its own jobs.
    rows = {row["name"]: row for row in srv.ps()}
    assert rows["zimage-tiny:latest"]["jobs"] == {"done": 4, "failed": 0, "cancelled": 0}
    assert rows["zimage-sharded:latest"]["jobs"] == {"done": 2, "failed": 0, "cancelled": 0}
    assert len(srv.loaded) == 2


def test_jobs_queue_in_arrival_order(start_server, raw_streams):
    srv = start_server()
    first = raw_streams(srv.url, LONG | {"prompt": "first"})
    assert first.status() == 200
    first_progress(first)
    waiting = []
    for k in range(3):
        stream = raw_streams(srv.url, {"model": "zimage-tiny", "prompt": f"queued {k}", "size": "64x64",
                                       "steps": 2, "stream": True})
        assert stream.status() == 200
        srv.wait_for(lambda k=k: srv.ps()[0]["queued"] == k + 1, what=f"{k + 1} queued jobs")
        waiting.append(stream)
    row = srv.ps()[0]
    assert row["state"] == "busy" and row["running"]["total"] == 100 and row["expires_at"] is None
    first.hang_up()  # the long job ends early; the queue then drains in arrival order
    for stream in waiting:
        assert [event for event, _ in stream.events()][-1] == "done"
    order = [(job.spec.prompt, job.state) for job in srv.manager.history]
    assert order == [("first", "cancelled"), ("queued 0", "done"), ("queued 1", "done"), ("queued 2", "done")]
    assert [job.finished for job in srv.manager.history] == sorted(job.finished for job in srv.manager.history)


def test_disconnect_cancels_a_running_stream(start_server, raw_streams):
    srv = start_server()
    stream = raw_streams(srv.url, LONG | {"prompt": "abandoned stream"})
    assert stream.status() == 200
    assert first_progress(stream) == {"step": 1, "total": 100}
    stream.hang_up()
    job = srv.finished_job("abandoned stream")
    assert job.state == "cancelled"
    assert 1 <= job.steps_done < 100
    assert srv.ps()[0]["jobs"] == {"done": 0, "failed": 0, "cancelled": 1}


def test_disconnect_cancels_a_running_plain_request(start_server, raw_streams):
    srv = start_server()
    plain = raw_streams(srv.url, LONG | {"prompt": "abandoned plain", "stream": False})
    srv.wait_for(lambda: (srv.ps() or [{}])[0].get("running"), what="the job to start")
    srv.wait_for(lambda: srv.ps()[0]["running"]["step"] >= 2, what="two steps")
    plain.hang_up()
    job = srv.finished_job("abandoned plain")
    assert job.state == "cancelled" and 2 <= job.steps_done < 100


def test_disconnect_cancels_a_queued_job(start_server, raw_streams):
    srv = start_server()
    running = raw_streams(srv.url, LONG | {"prompt": "running"})
    assert running.status() == 200
    first_progress(running)
    queued = raw_streams(srv.url, LONG | {"prompt": "queued then gone", "stream": False})
    srv.wait_for(lambda: srv.ps()[0]["queued"] == 1, what="the second job to queue")
    queued.hang_up()
    gone = srv.finished_job("queued then gone")
    assert gone.state == "cancelled" and gone.steps_done == 0
    # The running job was not disturbed; it is cancelled only when its own client leaves.
    assert srv.ps()[0]["running"]["id"] != gone.id
    running.hang_up()
    assert srv.finished_job("running").state == "cancelled"


def test_full_queue_is_503_with_retry_after(start_server, raw_streams):
    srv = start_server(max_queue=1)
    running = raw_streams(srv.url, LONG | {"prompt": "running"})
    assert running.status() == 200
    first_progress(running)
    queued = raw_streams(srv.url, LONG | {"prompt": "queued"})
    assert queued.status() == 200
    response = srv.post("/v1/images/generations", {"model": "zimage-tiny", "prompt": "one too many"})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "server_error" and "zimage-tiny" in error["message"]
    # Another model has its own queue.
    other = srv.post("/v1/images/generations", {"model": "zimage-sharded", "prompt": "x", "size": "64x64",
                                                "steps": 1})
    assert other.status_code == 200
    running.hang_up()
    queued.hang_up()
    assert srv.finished_job("queued").state == "cancelled"


def test_keep_alive_expiry_frees_the_model(start_server):
    srv = start_server(keep_alive=60)
    body = {"model": "zimage-tiny", "prompt": "brief", "size": "64x64", "steps": 1, "keep_alive": "300ms"}
    assert srv.post("/v1/images/generations", body).status_code == 200
    assert len(srv.loaded) == 1
    srv.wait_for(lambda: srv.ps() == [], timeout=10, what="the model to expire")
    gc.collect()
    assert srv.loaded[0]() is None, "the unloaded model is still referenced"
    # Loads again on next use; the server default keep-alive applies, and -1 means forever.
    assert srv.post("/v1/images/generations", body | {"keep_alive": None}).status_code == 200
    (row,) = srv.ps()
    assert row["keep_alive"] == 60 and 55 < row["expires_in"] <= 60 and row["state"] == "idle"
    assert srv.post("/v1/images/generations", body | {"keep_alive": -1}).status_code == 200
    (row,) = srv.ps()
    assert row["keep_alive"] is None and row["expires_at"] is None
    assert len(srv.loaded) == 2


def test_server_default_keep_alive(start_server):
    srv = start_server(keep_alive=0.2)
    body = {"model": "zimage-tiny", "prompt": "brief", "size": "64x64", "steps": 1}
    assert srv.post("/v1/images/generations", body).status_code == 200
    srv.wait_for(lambda: srv.ps() == [], timeout=10, what="the model to expire")
    gc.collect()
    assert srv.loaded[0]() is None


def test_stop_unloads(start_server, raw_streams):
    srv = start_server()
    body = {"model": "zimage-tiny", "prompt": "x", "size": "64x64", "steps": 1}
    assert srv.post("/v1/images/generations", body).status_code == 200
    (row,) = srv.ps()
    assert row["name"] == "zimage-tiny:latest" and row["size"] > 0 and row["state"] == "idle"
    response = srv.post("/api/stop", {"model": "zimage-tiny"})
    assert response.json() == {"model": "zimage-tiny:latest", "status": "unloaded"}
    assert srv.ps() == []
    gc.collect()
    assert srv.loaded[0]() is None
    missing = srv.post("/api/stop", {"model": "zimage-tiny"})
    assert missing.status_code == 404 and "is not loaded" in missing.json()["error"]  # ollama's error shape
    assert srv.post("/api/stop", {}).json() == {"error": "model is required"}
    # A busy model finishes its queue first, then unloads.
    stream = raw_streams(srv.url, LONG | {"prompt": "last one", "steps": 10})
    assert stream.status() == 200
    first_progress(stream)
    assert srv.post("/api/stop", {"model": "zimage-tiny:latest"}).json()["status"] == "unloading"
    assert [event for event, _ in stream.events()][-1] == "done"
    srv.wait_for(lambda: srv.ps() == [], what="the model to unload after its queue")


def test_ps_stop_and_run_host_cli(start_server, cli, tmp_path, reference_png):
    srv = start_server()
    host = srv.url.removeprefix("http://")
    out = tmp_path / "remote.png"
    result = cli("run", "zimage-tiny", "a red fox", "--size", "64x64", "--steps", "2", "--seed", "7",
                 "-o", str(out), "--host", host)
    assert result.code == 0, result.err
    assert [line for line in result.out.splitlines() if line.startswith("Generating")] == [
        "Generating: step 1/2", "Generating: step 2/2"]
    assert out.read_bytes() == reference_png("a red fox", 7)
    result = cli("ps", "--host", host)
    assert result.code == 0 and "zimage-tiny:latest" in result.out and "idle" in result.out
    result = cli("ps", "--host", srv.url, "--json")
    assert json.loads(result.out)["models"][0]["name"] == "zimage-tiny:latest"
    result = cli("stop", "zimage-tiny", "--host", host)
    assert result.code == 0 and "Unloaded zimage-tiny:latest" in result.out
    result = cli("stop", "zimage-tiny", "--host", host)
    assert result.code == 4 and "not loaded" in result.err
    bad = cli("run", "nope", "x", "--size", "64x64", "-o", str(tmp_path / "x.png"), "--host", host)
    assert bad.code == 4 and "'nope' not found" in bad.err
    srv.server.shutdown()
    srv.server.server_close()
    gone = cli("ps", "--host", host)
    assert gone.code == 5 and "no imgpack server answers" in gone.err


def test_api_key_for_cli_clients(start_server, cli, monkeypatch):
    srv = start_server(api_key="k3y")
    host = srv.url.removeprefix("http://")
    denied = cli("ps", "--host", host)
    assert denied.code == 3 and "API key" in denied.err
    assert cli("ps", "--host", host, "--api-key", "k3y").code == 0
    monkeypatch.setenv("IMGPACK_API_KEY", "k3y")
    assert cli("ps", "--host", host).code == 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_command_runs_and_stops_cleanly(server_store, sig):
    """The real ``imgpack serve`` process: binds loopback, answers, and exits 0 on SIGTERM or Ctrl-C."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import requests

    env = {k: v for k, v in os.environ.items() if k not in ("IMGPACK_HOST", "IMGPACK_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from imgpack.cli.main import main; sys.exit(main())",
         "--store", str(server_store.root), "serve", "--port", "0", "--keep-alive", "1m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+) ", line)
        assert match, line
        url = match.group(1)
        models = requests.get(url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["zimage-sharded:latest", "zimage-tiny:latest"]
        body = {"model": "zimage-tiny", "prompt": "x", "size": "64x64", "steps": 1}
        assert requests.post(url + "/v1/images/generations", json=body, timeout=30).status_code == 200
        assert requests.get(url + "/api/ps", timeout=30).json()["models"][0]["keep_alive"] == 60
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
