"""Unit tier: the peer-to-peer HTTP client (`peer.dejima.transport.Connections`) against a real server on loopback.

Keep-alive connections are reused, Nagle is off, a connection the server closed while idle is not reused, a silent
server is a timeout, a closed port an OSError, and a request is never sent twice. Nothing here is timed: a silent
server is one whose handler holds its answer until the test lets it go.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from peer.dejima.messages import MessageError, Propagate, parse
from peer.dejima.transport import CallTimeout, Connections

pytestmark = pytest.mark.unit

HOLD_AT_MOST = 30.0  # seconds a held answer waits for the test at most (a guard against hanging, never reached)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[int, bytes]]] = []  # (client port, body) of every request
    # while cleared, the handler holds its answer back (at most HOLD_AT_MOST s: a test that forgets to set it
    # does not hang the server) and `holding` is set
    answer_now: ClassVar[threading.Event] = threading.Event()
    holding: ClassVar[threading.Event] = threading.Event()
    close_after: ClassVar[bool] = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Handler.seen.append((self.client_address[1], body))
        if not Handler.answer_now.is_set():
            Handler.holding.set()
            Handler.answer_now.wait(HOLD_AT_MOST)
        answer = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        if Handler.close_after:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen, Handler.close_after = [], False
    Handler.answer_now, Handler.holding = threading.Event(), threading.Event()
    Handler.answer_now.set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.answer_now.set()
    httpd.shutdown()
    httpd.server_close()


def test_it_reuses_one_keep_alive_connection_with_nagle_off(server: str) -> None:
    conns = Connections({"Content-Type": "application/json"})
    try:
        for n in range(3):
            assert conns.post(server, "/m", f'{{"n":{n}}}'.encode(), 5.0) == (200, b'{"ok":true}')
        assert [body for _, body in Handler.seen] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert len({port for port, _ in Handler.seen}) == 1, "one connection for all three"
        (idle,) = next(iter(conns.idle.values()))
        assert idle.sock is not None
        assert idle.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        conns.close()


def test_it_does_not_reuse_a_connection_the_server_closed(server: str) -> None:
    conns = Connections({})
    try:
        Handler.close_after = True
        conns.post(server, "/m", b"{}", 5.0)
        assert not any(conns.idle.values()), "an answer with Connection: close is not kept"
        Handler.close_after = False
        conns.post(server, "/m", b"{}", 5.0)
        (idle,) = next(iter(conns.idle.values()))
        assert idle.sock is not None
        idle.sock.shutdown(socket.SHUT_RD)  # as if the server had closed it while idle: readable at EOF
        conns.post(server, "/m", b"{}", 5.0)
        assert len(Handler.seen) == 3, "each request sent exactly once"
        assert len({port for port, _ in Handler.seen}) == 3
    finally:
        conns.close()


def test_a_silent_server_is_a_timeout_and_the_request_is_sent_once(server: str) -> None:
    conns = Connections({})
    try:
        Handler.answer_now.clear()  # the server holds its answer until the test has seen the timeout
        with pytest.raises(CallTimeout):
            conns.post(server, "/m", b"{}", 0.3)
        # the request arrived and its answer is still held (the test has not let it go): the call gave up on its
        # own timeout, not on an answer
        assert Handler.holding.wait(10), "the request never reached the server"
        assert len(Handler.seen) == 1
        assert not any(conns.idle.values()), "a connection with an answer still due is not kept"
        Handler.answer_now.set()  # the late answer, once it comes, is read by nobody: the next call is new
        assert conns.post(server, "/m", b'{"n":1}', 5.0) == (200, b'{"ok":true}')
        assert [body for _, body in Handler.seen] == [b"{}", b'{"n":1}'], "the first request was not sent again"
        assert Handler.seen[0][0] != Handler.seen[1][0], "the timed-out connection was not reused"
    finally:
        conns.close()


def test_a_closed_port_is_an_os_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conns = Connections({})
    with pytest.raises(OSError):
        conns.post(f"http://127.0.0.1:{port}", "/m", b"{}", 1.0)


@pytest.mark.parametrize("recipients", ["bank", [1], [None], {"bank": 1}])
def test_a_propagate_with_malformed_recipients_is_refused(recipients: object) -> None:
    envelope = Propagate("g.1.a", "bank", "bank", "dejima_bank", [], [], 1000, recipients=["government"]).to_json()
    assert parse(envelope) == Propagate(
        "g.1.a",
        "bank",
        "bank",
        "dejima_bank",
        [],
        [],
        1000,
        message_id=envelope["body"]["message_id"],
        recipients=["government"],
    )
    envelope["body"]["recipients"] = recipients
    with pytest.raises(MessageError, match="recipients"):
        parse(envelope)


class Canned:
    """A loopback server that answers each request with the next of `answers`, raw bytes as given, and closes the
    connection after an answer when told to (None as an answer: close without answering)."""

    def __init__(self, answers: list[tuple[bytes | None, bool]]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                while self.answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = reader.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                    self.requests.append(head + reader.read(length))
                    answer, close = self.answers.pop(0)
                    if answer is not None:
                        conn.sendall(answer)
                    if close or answer is None:
                        break

    def close(self) -> None:
        self.sock.close()


def _post_each(answers: list[tuple[bytes | None, bool]], count: int) -> tuple[list[object], Canned, Connections]:
    server = Canned(answers)
    conns = Connections({"X-Dejima-Peer": "bank"})
    results: list[object] = []
    try:
        for _ in range(count):
            try:
                results.append(conns.post(server.url, "/m", b'{"a":1}', 2.0))
            except OSError as exc:
                results.append(type(exc).__name__)
    finally:
        server.close()
    return results, server, conns


def test_it_reads_chunked_interim_and_length_less_answers() -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{"a"\r\n3\r\n:1}\r\n0\r\nT: v\r\n\r\n'
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}"
    to_eof = b"HTTP/1.0 200 OK\r\n\r\n[1, 2]"
    results, server, conns = _post_each([(chunked, False), (interim, False), (to_eof, True)], 3)
    try:
        assert results == [(200, b'{"a":1}'), (201, b"{}"), (200, b"[1, 2]")]
        first = server.requests[0]
        assert first.startswith(b"POST /m HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b'\r\nX-Dejima-Peer: bank\r\nContent-Length: 7\r\n\r\n{"a":1}' in first
        assert not any(conns.idle.values()), "an answer read to the peer's close leaves nothing to reuse"
    finally:
        conns.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",  # cut short
        b"SPDY/3 200 OK\r\n\r\n",  # not HTTP/1.x
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # the headers cut short
    ],
)
def test_a_malformed_or_cut_answer_is_an_os_error_and_the_connection_is_dropped(answer: bytes) -> None:
    results, server, conns = _post_each([(answer, True), (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", False)], 2)
    try:
        assert results == ["BadAnswer", (200, b"{}")]
        assert len(server.requests) == 2, "each request sent once, the second on a new connection"
    finally:
        conns.close()


def test_a_peer_that_closes_without_answering_is_an_os_error_sent_once() -> None:
    results, server, conns = _post_each([(None, True)], 1)
    try:
        assert results == ["BadAnswer"]
        assert len(server.requests) == 1
    finally:
        conns.close()
