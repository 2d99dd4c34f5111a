"""Unit tier: the peer-to-peer HTTP client (`peer.dejima.transport.Connections`) against a real server on loopback.

Keep-alive connections are reused, Nagle is off, a connection the server closed while idle is not reused, a silent
server is a timeout, a closed port an OSError, and a request is never sent twice.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from peer.dejima.messages import MessageError, Propagate, parse
from peer.dejima.transport import CallTimeout, Connections

pytestmark = pytest.mark.unit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[int, bytes]]] = []  # (client port, body) of every request
    delay: ClassVar[float] = 0.0
    close_after: ClassVar[bool] = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Handler.seen.append((self.client_address[1], body))
        time.sleep(Handler.delay)
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
    Handler.seen, Handler.delay, Handler.close_after = [], 0.0, False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
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
        Handler.delay = 1.0
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            conns.post(server, "/m", b"{}", 0.3)
        assert time.monotonic() - started < 0.9
        assert len(Handler.seen) == 1
        assert not any(conns.idle.values()), "a connection with an answer still due is not kept"
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
