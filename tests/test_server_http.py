"""``imgpack serve`` at the HTTP level: connection reuse across errors, malformed framing, slow clients, and what a
web page may and may not make the server do (issue 15: Host, Origin, content type, hostile JSON)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import requests

pytestmark = pytest.mark.timeout(120)

GOOD = {"model": "zimage-tiny", "prompt": "a red fox", "size": "64x64", "steps": 1, "seed": 7}


def raw(port: int, data: bytes, wait: float = 10.0) -> tuple[bytes, bool]:
    """Send bytes, read until the server closes (or ``wait`` passes); returns (what came back, closed by server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        reply, closed = b"", False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            reply += chunk
    return reply, closed


def statuses(reply: bytes) -> list[int]:
    """The status codes of the responses in a byte stream (a body ends right where the next status line starts)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


# -- one connection, many answers ----------------------------------------------------------------------


def test_a_session_keeps_one_connection_across_401_404_405_413(start_server):
    srv = start_server(api_key="k", max_body=4096)
    session = requests.Session()
    good = {"Authorization": "Bearer k"}
    answers = [
        session.post(srv.url + "/api/show", json={"model": "m", "prompt": "x"}, timeout=30).status_code,
        session.get(srv.url + "/v1/models", headers=good, timeout=30).status_code,
        session.post(srv.url + "/v1/chat/completions", json={"model": "m"}, headers=good, timeout=30).status_code,
        session.post(srv.url + "/v1/models", json={"model": "m"}, headers=good, timeout=30).status_code,
        session.post(srv.url + "/v1/images/generations", json={"prompt": "x" * 8000}, headers=good,
                     timeout=30).status_code,
        session.post(srv.url + "/v1/images/generations", json=GOOD, headers=good, timeout=30).status_code,
        session.get(srv.url + "/v1/models", headers=good, timeout=30).status_code,
    ]
    assert answers == [401, 200, 404, 405, 413, 200, 200]
    assert srv.server.accepted == 1  # every answer, errors included, left the connection usable


def test_the_issue_reproduction_form_body_then_next_request(start_server):
    """``curl -X POST -d '{...}' HOST/api/show --next HOST/v1/models`` on one connection: both answered."""
    srv = start_server()
    body = b'{"model":"m","prompt":"x"}'
    request = (b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    request += b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    reply, closed = raw(srv.server.port, request)
    assert statuses(reply) == [415, 200] and closed
    assert b'"error": "the request body must be sent as' in reply  # ollama's shape under /api
    assert b'"zimage-tiny:latest"' in reply


def test_pipelined_requests_are_answered_in_order(start_server):
    srv = start_server()
    one = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply, _ = raw(srv.server.port, one + b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n" + one.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert statuses(reply) == [200, 404, 200]


MALFORMED = {
    "garbage request line": b"HELLO THERE\r\n\r\n",
    "no version": b"GET /v1/models\r\n\r\n",
    "space in header name": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    "repeated content-length": b"POST /api/ps HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "conflicting content-length": b"POST /api/ps HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                  b"Content-Length: 5\r\n\r\n{}",
    "listed content-length": b"POST /api/ps HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
    "content-length and chunked": b"POST /api/ps HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative content-length": b"POST /api/ps HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "http/1.1 without host": b"GET /v1/models HTTP/1.1\r\n\r\n",
    "control character in target": b"GET /v1/mo\x01dels HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_framing_is_400_and_close(start_server, data):
    srv = start_server()
    follow_up = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply, closed = raw(srv.server.port, data + follow_up)
    assert statuses(reply) == [400], reply[:300]
    assert closed and b"Connection: close" in reply
    # Nothing after the bad request was read as a request; the server still answers new connections.
    assert requests.get(srv.url + "/v1/models", timeout=30).status_code == 200


def test_huge_declared_body_is_refused_unread_and_closed(start_server):
    srv = start_server(max_body=1000)
    reply, closed = raw(srv.server.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
    assert statuses(reply) == [413] and closed and b'"request_too_large"' in reply


# -- slow clients -------------------------------------------------------------------------------------------


def test_headers_that_never_finish_get_408_and_close(start_server):
    srv = start_server(header_timeout=0.5)
    started = time.monotonic()
    reply, closed = raw(srv.server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", wait=10)
    assert statuses(reply) == [408] and closed
    assert 0.4 < time.monotonic() - started < 5


def test_a_dripping_body_is_cut_off(start_server):
    srv = start_server(body_timeout=1.5)
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")
        started, reply = time.monotonic(), b""
        for _ in range(20):  # one byte every 0.3 s: steady, but 100 bytes would take 30 s
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.3)
            sock.setblocking(False)
            try:
                reply += sock.recv(65536)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if reply:
                break
    assert statuses(reply) == [408] and b"did not arrive within 1.5s" in reply
    assert time.monotonic() - started < 4
    assert not srv.manager.history


def test_half_open_connections_hold_no_threads(start_server):
    """200 clients that send half a request: no thread each, other clients are answered at once, and all 200 are
    dropped at the header deadline."""
    srv = start_server(header_timeout=2.0)
    requests.get(srv.url + "/v1/models", timeout=30)  # the worker pool is up
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", srv.server.port), timeout=10)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)
        time.sleep(0.2)
        assert threading.active_count() <= threads_before
        started = time.monotonic()
        assert requests.get(srv.url + "/v1/models", timeout=30).status_code == 200
        assert time.monotonic() - started < 1.0
        time.sleep(2.5)
        dropped = 0
        for sock in socks:
            sock.settimeout(3)
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:
                pass
            dropped += data.startswith(b"HTTP/1.1 408 ")
        assert dropped == 200
    finally:
        for sock in socks:
            sock.close()


# -- what a web page can do ---------------------------------------------------------------------------------


def test_foreign_host_names_are_refused(start_server):
    srv = start_server()
    port = srv.server.port
    for host in (f"evil.example:{port}", "attacker.test", f"192.168.1.10:{port}"):
        response = requests.get(srv.url + "/v1/models", headers={"Host": host}, timeout=30)
        assert response.status_code == 403, host
        assert response.json()["error"]["code"] == "host_not_allowed" and "--allowed-host" in response.text
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.1.2.3", f"[::1]:{port}", f"app.localhost:{port}"):
        assert requests.get(srv.url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    assert requests.post(srv.url + "/api/generate", json={"model": "zimage-tiny", "prompt": "x"},
                         headers={"Host": "evil.example"}, timeout=30).json() == {
        "error": "this server does not answer to the host name 'evil.example'; start it with --allowed-host"
                 " evil.example to allow it"}
    assert not srv.manager.history
    allowed = start_server(allowed_hosts=("studio.lan",))
    assert requests.get(allowed.url + "/v1/models", headers={"Host": "studio.lan:8420"}, timeout=30).ok


def test_foreign_origins_are_refused_and_allowed_ones_get_cors(start_server):
    srv = start_server(allowed_origins=("http://tools.example:3000",))
    url = srv.url + "/v1/images/generations"
    evil = requests.post(url, json=GOOD, headers={"Origin": "http://evil.example"}, timeout=30)
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in evil.headers
    preflight = requests.options(url, headers={"Origin": "http://evil.example",
                                               "Access-Control-Request-Method": "POST"}, timeout=30)
    assert preflight.status_code == 403
    assert not srv.manager.history
    same = requests.post(url, json=GOOD, headers={"Origin": srv.url}, timeout=30)  # the server's own page
    assert same.status_code == 200 and "Access-Control-Allow-Origin" not in same.headers
    friend = "http://tools.example:3000"
    preflight = requests.options(url, headers={"Origin": friend, "Access-Control-Request-Method": "POST"}, timeout=30)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == friend
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    answer = requests.get(srv.url + "/v1/models", headers={"Origin": friend}, timeout=30)
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == friend


@pytest.mark.parametrize("path", ["/v1/images/generations", "/api/generate", "/api/stop", "/api/pull"])
def test_json_bodies_need_the_json_content_type(start_server, path):
    srv = start_server()
    extra = {"width": 64, "height": 64} if path.startswith("/api/") else {}  # ollama's API has no "size"
    body = json.dumps(GOOD | {"stream": False} | extra)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = requests.post(srv.url + path, data=body, headers=headers, timeout=30)
        assert response.status_code == 415, (content_type, response.text)
    assert requests.post(srv.url + path, data=body, headers={"Content-Type": "application/json; charset=utf-8"},
                         timeout=30).status_code != 415
    srv.wait_for(lambda: srv.manager.history or path in ("/api/stop", "/api/pull"), what="the one accepted job")
    assert len(srv.manager.history) <= 1


def deep(depth: int) -> bytes:
    return b'{"model": "zimage-tiny", "prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(("path", "field"), [("/v1/images/generations", "prompt"), ("/api/generate", "prompt"),
                                             ("/api/show", "model")])
def test_hostile_json_is_400_never_500(start_server, path, field):
    srv = start_server()
    headers = {"Content-Type": "application/json"}
    for body in (deep(100_000), deep(65), b'{"a": ' * 50_000 + b"1" + b"}" * 50_000):
        response = requests.post(srv.url + path, data=body, headers=headers, timeout=30)
        assert response.status_code == 400, response.text[:200]
        assert "nested more than 64 levels" in response.text
    surrogate = json.dumps({"model": "zimage-tiny", "prompt": "ok", "stream": False} | {field: "bad \ud800 text"})
    response = requests.post(srv.url + path, data=surrogate, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert "lone UTF-16 surrogate" in response.text and f"{field}:" in response.text
    bad_utf8 = b'{"model": "zimage-tiny", "prompt": "\xff\xfe"}'
    assert requests.post(srv.url + path, data=bad_utf8, headers=headers, timeout=30).status_code == 400
    assert not srv.manager.history
    assert requests.post(srv.url + "/v1/images/generations", json=GOOD, timeout=30).status_code == 200
