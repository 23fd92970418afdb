"""HTTP/1.1 connections for ``imgpack serve``: h11 parses, one reactor thread waits, a bounded pool answers.

Why this and not ``http.server`` or uvicorn: the stdlib server reads headers leniently (a second or conflicting
``Content-Length`` is silently resolved, a garbled request line can be read as the tail of the previous body) and
it is the handler's job to drain every body, which is exactly what went wrong (an unread JSON body of a 401 was
parsed as the next request). It also parks a thread on every open connection, so 200 half-open sockets hold 200
threads. uvicorn is h11 underneath, but brings asyncio, which would sit between blocking MLX work and the
socket we poll to notice a client hanging up, and it has no deadline for a request that arrives a byte at a time.
So: h11 (pure Python, strict RFC 9112 parsing, and it refuses to start the next request on a connection until
both sides have finished the current one), driven by our own small loop:

* one **reactor** thread owns every connection that is idle, sending headers or sending a body. It reads without
  blocking, feeds h11, and enforces deadlines: headers within ``header_timeout`` of their first byte, the body
  within ``body_timeout`` of the headers, idle keep-alive connections closed after ``idle_timeout``. A slow or
  half-open client therefore costs a socket, never a thread, and is answered 408 and closed when its time is up.
* a **request** is handed to the bounded worker pool only once it is complete (headers and the whole body, at
  most ``max_body`` bytes). The worker answers it; streaming answers use chunked encoding, so the connection
  stays reusable afterwards. When both sides are done the connection goes back to the reactor; in every other
  case (the body was refused unread, the client asked to close, a protocol error) it is closed.
* protocol errors (a malformed request line, a header h11 rejects, a second ``Content-Length``) are answered 400
  with ``Connection: close``. A refused body is drained for a moment after the answer (``linger``) so the
  client's kernel reads our answer instead of a reset.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h11

log = logging.getLogger("imgpack.server")

HEADER_TIMEOUT = 10.0  # from a request's first byte to the end of its headers
BODY_TIMEOUT = 30.0  # from the end of the headers to the end of the body
IDLE_TIMEOUT = 75.0  # a keep-alive connection with no request in flight
WRITE_TIMEOUT = 60.0  # one blocked send to a client that stopped reading
LINGER_SECONDS = 2.0  # how long, and how many bytes, a refused body is drained before closing
LINGER_BYTES = 16 * 1024 * 1024
DISCARD_BYTES = 16 * 1024 * 1024  # a body over the limit but under this is read and dropped: the 413 keeps the
# connection; a larger one is answered at once and the connection closed
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_WORKERS = 32
DEFAULT_MAX_CONNECTIONS = 1024
_CONTENT_LENGTH_LINE = re.compile(rb"(?im)^content-length[ \t]*:")

#: The reason phrases we send; anything else gets h11's empty phrase.
REASONS = {
    200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 411: b"Length Required",
    413: b"Content Too Large", 415: b"Unsupported Media Type", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
}


def printable(text: str, limit: int = 200) -> str:
    """Untrusted text made safe for a log line: control, bidi and non-ASCII characters escaped, length capped."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[:limit] + "..."


class ClientGone(Exception):
    """The client closed its connection or stopped reading; nothing more can be sent to it."""


@dataclass
class Conn:
    """One client connection and where it is in its current request."""

    sock: socket.socket
    peer: str
    fd: int
    parser: h11.Connection = field(default_factory=lambda: h11.Connection(
        h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES))
    phase: str = "idle"  # idle, head, body, busy (a worker has it), linger, closed
    deadline: float = 0.0
    request: h11.Request | None = None
    body: bytearray = field(default_factory=bytearray)
    oversize: bool = False  # the body is over the limit: read and dropped, then answered 413
    discarded: int = 0
    lingered: int = 0

    def close(self) -> None:
        self.phase = "closed"
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Request:
    """A complete request as a worker sees it: header names lower-cased, repeated headers joined with ', '."""

    method: str
    target: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    peer: str
    http_version: str


class Exchange:
    """A worker's handle on one request: read it, answer it once (plainly or as a stream), watch the client."""

    def __init__(self, server: HttpServer, conn: Conn, request: Request) -> None:
        self.server = server
        self.conn = conn
        self.request = request
        self.status: int | None = None
        self.close_after = False
        self.extra_headers: list[tuple[str, str]] = []  # sent with whatever answer comes (CORS, for one)
        self._peer_sent_more = False

    # -- answering -----------------------------------------------------------------------------------

    def _send(self, event: Any) -> None:
        data = self.conn.parser.send(event)
        if data:
            try:
                self.conn.sock.sendall(data)
            except OSError as e:  # includes socket.timeout: a client that stopped reading
                self.close_after = True
                raise ClientGone(str(e)) from None

    def _head(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        if self.status is not None:
            raise RuntimeError("this request was already answered")
        self.status = status
        items = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in [*headers, *self.extra_headers]]
        if self.close_after:
            items.append((b"Connection", b"close"))
        items.append((b"Server", b"imgpack"))
        self._send(h11.Response(status_code=status, headers=items, reason=REASONS.get(status, b"")))

    def respond(self, status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A complete answer with a Content-Length (none for 204, which has no body by definition)."""
        if status == 204:
            self._head(status, headers)
            self._send(h11.EndOfMessage())
            return
        self._head(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        if body and self.request.method != "HEAD":
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())

    def start_stream(self, status: int, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Begin an answer of unknown length: chunked for HTTP/1.1 clients (the connection stays usable)."""
        self._head(status, [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                            ("X-Accel-Buffering", "no"), *headers])

    def write(self, data: bytes) -> None:
        if data:
            self._send(h11.Data(data=data))

    def end_stream(self) -> None:
        self._send(h11.EndOfMessage())

    @property
    def answered(self) -> bool:
        return self.status is not None

    # -- the client ----------------------------------------------------------------------------------

    def client_gone(self) -> bool:
        """True once the peer has closed its end: its socket polls readable and a peek returns no bytes.

        Bytes that are really there (a pipelined next request) mean the client is alive; polling then stops, as the
        socket would stay readable.
        """
        if self._peer_sent_more:
            return False
        sock = self.conn.sock
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
        if data:
            self._peer_sent_more = True
            return False
        return True


Handler = Callable[[Exchange], None]


class HttpServer:
    """The reactor, the worker pool and the listening socket; ``handle`` answers one complete request."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_body: int,
        workers: int = DEFAULT_WORKERS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.max_body = max_body
        self.workers = workers
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self._conns: dict[int, Conn] = {}  # every open connection, by file descriptor
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[tuple[Conn, Request] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.accepted = 0  # connections accepted so far (tests use it to see a connection being reused)

    # -- to be provided --------------------------------------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def refusal(self, status: int, message: str, code: str, path: str | None) -> tuple[bytes, str]:
        """The body and content type of an answer the reactor gives on its own (400, 408, 413, 503)."""
        import json

        error = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                 "param": None, "code": code}
        return json.dumps({"error": error}).encode(), "application/json"

    def log_request(self, exchange: Exchange, seconds: float) -> None:
        pass

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.server_address[1]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the reactor in this thread until ``shutdown``; the workers run beside it."""
        self._stopped.clear()
        try:
            for k in range(self.workers):
                thread = threading.Thread(target=self._worker, name=f"imgpack-http-{k}", daemon=True)
                thread.start()
                self._threads.append(thread)
            self._selector.register(self.socket, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                self._tick(poll_interval)
        finally:
            for conn in list(self._conns.values()):
                if conn.phase != "busy":
                    self._close(conn)
            for _ in self._threads:
                self._work.put(None)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the reactor and wait for it (from another thread, like ``socketserver``)."""
        self._stop.set()
        self._wake()
        self._stopped.wait(timeout=30)

    def server_close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.socket.close()
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the reactor -----------------------------------------------------------------------------------

    def _tick(self, poll_interval: float) -> None:
        now = time.monotonic()
        waiting = [c.deadline for c in self._conns.values() if c.phase not in ("busy", "closed")]
        timeout = max(0.0, min([poll_interval, *(d - now for d in waiting)]))
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self.socket:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            else:
                self._readable(key.data)
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                break
            self._resume(conn)
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.phase not in ("busy", "closed") and now >= conn.deadline:
                self._expire(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            peer = f"{addr[0]}:{addr[1]}"
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, peer, sock.fileno(), deadline=time.monotonic() + self.header_timeout)
            self.accepted += 1
            if len(self._conns) >= self.max_connections:
                self._refuse(conn, 503, "too many open connections; retry", "server_busy")
                continue
            self._conns[conn.fd] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.phase == "linger":
            conn.lingered += len(data)
            if not data or conn.lingered >= LINGER_BYTES:
                self._close(conn)
            return
        if conn.phase == "idle" and data:
            conn.phase, conn.deadline = "head", time.monotonic() + self.header_timeout
        try:
            conn.parser.receive_data(data)
        except h11.RemoteProtocolError:
            self._close(conn)  # data after the client said it was done sending: nothing to answer
            return
        self._drive(conn)

    def _resume(self, conn: Conn) -> None:
        """A worker finished with a kept-alive connection: wait for its next request (maybe already buffered)."""
        if conn.phase == "closed":
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]
            return
        conn.phase, conn.request, conn.body, conn.oversize, conn.discarded = "idle", None, bytearray(), False, 0
        conn.deadline = time.monotonic() + self.idle_timeout
        try:
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError, KeyError):
            self._close(conn)
            return
        if conn.parser.trailing_data[0]:
            conn.phase, conn.deadline = "head", time.monotonic() + self.header_timeout
            self._drive(conn)

    def _drive(self, conn: Conn) -> None:
        """Feed what h11 has buffered through it: a complete request goes to a worker, a bad one is refused."""
        while conn.phase in ("idle", "head", "body"):
            parser = conn.parser
            if parser.their_state is h11.IDLE and self._repeats_content_length(parser.trailing_data[0]):
                self._refuse(conn, 400, "the request has more than one Content-Length header", "invalid_header")
                return
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (400, 431, 501) else 400
                self._refuse(conn, status, f"malformed HTTP request: {e}", "bad_request")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._headers_done(conn, event)
            elif isinstance(event, h11.Data):
                if not conn.oversize and len(conn.body) + len(event.data) > self.max_body:
                    conn.oversize, conn.discarded, conn.body = True, len(conn.body), bytearray()
                if conn.oversize:
                    conn.discarded += len(event.data)
                    if conn.discarded > DISCARD_BYTES:
                        self._refuse(conn, 413, f"the request body is over the {self.max_body}-byte limit",
                                     "request_too_large", path=_path(conn.request))
                else:
                    conn.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if conn.oversize:
                    self._too_large(conn)
                else:
                    self._dispatch(conn)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self._close(conn)

    @staticmethod
    def _repeats_content_length(buffered: bytes) -> bool:
        """h11 quietly merges identical repeated Content-Length headers; we refuse any repeat (request smuggling)."""
        end = buffered.find(b"\r\n\r\n")
        if end < 0:
            end = buffered.find(b"\n\n")
        if end < 0:
            return False
        head = buffered[:end]
        found = _CONTENT_LENGTH_LINE.findall(head)
        if len(found) > 1:
            return True
        if found:
            value = head[head.lower().index(b"content-length") :].split(b"\n", 1)[0]
            return b"," in value
        return False

    def _headers_done(self, conn: Conn, request: h11.Request) -> None:
        conn.request = request
        conn.phase, conn.deadline = "body", time.monotonic() + self.body_timeout
        names = [k for k, _ in request.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            self._refuse(conn, 400, "the request has both Transfer-Encoding and Content-Length", "invalid_header")
            return
        length = next((v for k, v in request.headers if k == b"content-length"), None)
        if length is not None and int(length) > self.max_body:
            if int(length) > DISCARD_BYTES or conn.parser.they_are_waiting_for_100_continue:
                self._refuse(conn, 413, f"the request body is {int(length)} bytes, over the {self.max_body}-byte"
                             " limit", "request_too_large", path=_path(request))
                return
            conn.oversize = True
        if conn.parser.they_are_waiting_for_100_continue:
            self._send_now(conn, conn.parser.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")

    def _too_large(self, conn: Conn) -> None:
        """Answer 413 to a body that was read and dropped; the connection stays usable."""
        body, content_type = self.refusal(413, f"the request body is over the {self.max_body}-byte limit",
                                          "request_too_large", _path(conn.request))
        parser = conn.parser
        headers = [(b"Content-Type", content_type.encode()), (b"Content-Length", str(len(body)).encode()),
                   (b"Server", b"imgpack")]
        data = parser.send(h11.Response(status_code=413, headers=headers, reason=REASONS[413])) or b""
        data += (parser.send(h11.Data(data=body)) or b"") + (parser.send(h11.EndOfMessage()) or b"")
        if not self._send_now(conn, data) or parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
            self._close(conn)
            return
        parser.start_next_cycle()
        conn.phase, conn.request, conn.body, conn.oversize, conn.discarded = "idle", None, bytearray(), False, 0
        conn.deadline = time.monotonic() + self.idle_timeout

    def _dispatch(self, conn: Conn) -> None:
        assert conn.request is not None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.phase = "busy"
        self._work.put((conn, _request(conn)))

    def _expire(self, conn: Conn) -> None:
        if conn.phase == "idle":
            self._close(conn)
        elif conn.phase == "linger":
            self._close(conn)
        elif conn.phase == "head":
            self._refuse(conn, 408, f"the request headers did not arrive within {self.header_timeout:g}s",
                         "request_timeout")
        else:
            self._refuse(conn, 408, f"the request body did not arrive within {self.body_timeout:g}s",
                         "request_timeout", path=_path(conn.request))

    def _refuse(self, conn: Conn, status: int, message: str, code: str, path: str | None = None) -> None:
        """Answer from the reactor and close: end our side, then drain what the client still sends, briefly."""
        body, content_type = self.refusal(status, message, code, path)
        head = (f"HTTP/1.1 {status} {REASONS.get(status, b'').decode()}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: imgpack\r\n\r\n").encode()
        log.info("%s refused: %d %s", conn.peer, status, printable(message))
        self._send_now(conn, head + body)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        if self._conns.get(conn.fd) is not conn:
            conn.close()
            return
        conn.phase, conn.lingered = "linger", 0
        conn.deadline = time.monotonic() + LINGER_SECONDS

    def _send_now(self, conn: Conn, data: bytes) -> bool:
        """A small write from the reactor: it fits the socket buffer; whatever does not is dropped, never waited for.
        True if all of it went out."""
        try:
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def _close(self, conn: Conn) -> None:
        if conn.phase != "closed":
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        conn.close()

    # -- workers ---------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, request = item
            self._answer(conn, request)

    def _answer(self, conn: Conn, request: Request) -> None:
        exchange = Exchange(self, conn, request)
        started = time.monotonic()
        try:
            conn.sock.settimeout(self.write_timeout)
            self.handle(exchange)
            if not exchange.answered:
                raise RuntimeError("the handler sent no answer")
        except ClientGone:
            exchange.close_after = True
        except Exception:  # noqa: BLE001 - one bad request must not take a worker down
            log.exception("%s %s failed", request.method, printable(request.path))
            exchange.close_after = True
            if not exchange.answered:
                body, content_type = self.refusal(500, "internal error", "internal_error", request.path)
                with contextlib.suppress(ClientGone, h11.LocalProtocolError):
                    exchange.respond(500, body, content_type)
        self.log_request(exchange, time.monotonic() - started)
        parser = conn.parser
        if (not exchange.close_after and not self._stop.is_set() and parser.our_state is h11.DONE
                and parser.their_state is h11.DONE):
            parser.start_next_cycle()
            self._returned.put(conn)
            self._wake()
            return
        # The client asked to close, the answer was cut short, or we are stopping.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.close()
        self._returned.put(conn)  # the reactor, which alone owns the table of connections, forgets it
        self._wake()


def _path(request: h11.Request | None) -> str | None:
    if request is None:
        return None
    return request.target.decode("latin-1").split("?", 1)[0]


def _request(conn: Conn) -> Request:
    event = conn.request
    assert event is not None
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(method=event.method.decode("latin-1"), target=target, path=path, query=query, headers=headers,
                   body=bytes(conn.body), peer=conn.peer, http_version=event.http_version.decode("latin-1"))
