"""The lean listener for peer messages (peer/dejima/peerserver.py): HTTP/1.1 keep-alive on real loopback sockets,
every bad request answered with a JSON error (and nothing handed to the handler), bounded connections and waits.

The handler here is a stand-in that echoes what it got; what a real peer answers through this listener (the same
checks and statuses as through gunicorn) is in tests/test_api_input.py and tests/test_auth.py (`front`), and that
peers send their messages here in `test_peers_send_their_messages_to_each_others_lean_listener`.

Tiers: every test but that last one is `unit` (a server on loopback, no database); that one is `cluster`. Nothing
is timed: a closed connection is one the server closed (the client's own timeout is only a guard against hanging).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from peer.dejima.config import ConfigError, load_config, parse_bind
from peer.dejima.jsonvalues import MAX_DEPTH, TOO_DEEP_TO_HANDLE
from peer.dejima.peerserver import MESSAGE_PATH, PeerServer, message_routes
from peer.network import LocalNetwork
from tests.helpers import wait_until

LIMIT = 4096


class Echo:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, envelope: Any, remote: str) -> tuple[int, dict[str, Any]]:
        self.calls.append(envelope)
        if envelope == "boom":
            raise RuntimeError("the handler failed")
        if envelope == "recurse":
            raise RecursionError("maximum recursion depth exceeded")
        return 200, {"echo": envelope, "remote": remote}


@pytest.fixture
def echo() -> Echo:
    return Echo()


def serve(handler: Echo, **kw: Any) -> PeerServer:
    server = PeerServer(message_routes(handler), "127.0.0.1", 0, LIMIT, **kw)
    server.start()
    return server


@pytest.fixture
def server(echo: Echo) -> Iterator[PeerServer]:
    s = serve(echo, read_timeout=1.0, idle_timeout=2.0)
    yield s
    s.close()


def connect(server: PeerServer) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.connect()
    return conn


def post(conn: http.client.HTTPConnection, body: bytes, path: str = MESSAGE_PATH) -> tuple[int, Any, str | None]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), resp.getheader("Connection")


def raw(server: PeerServer, data: bytes, timeout: float = 5.0, whole: bool = False) -> bytes:
    """Send bytes as they are; the server's answer (with `whole`: everything until it closes the connection)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = [int(v) for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if k == b"Content-Length"]
            if not whole and sep and length and len(body) >= length[0]:
                break
        return out


@pytest.mark.unit
def test_it_answers_several_requests_on_one_keep_alive_connection(server: PeerServer, echo: Echo) -> None:
    conn = connect(server)
    try:
        for n in range(3):
            status, answer, connection = post(conn, json.dumps({"n": n}).encode())
            assert (status, answer["echo"], connection) == (200, {"n": n}, None)
    finally:
        conn.close()
    assert echo.calls == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert answer["remote"] == "127.0.0.1"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /peer/v1/message HTTP/1.1\r\nHost: x\r\n\r\n", 405, "GET not allowed"),
        (b"POST /api/v1/exec HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 404, "/api/v1/exec"),
        (b"POST /peer/v1/message HTTP/1.1\r\nContent-Length: 4\r\n\r\n{bad", 400, "malformed JSON"),
        (b"POST /peer/v1/message HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"POST /peer/v1/message HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411, "chunked"),
        (f"POST /peer/v1/message HTTP/1.1\r\nContent-Length: {LIMIT + 1}\r\n\r\n".encode(), 413, "larger than"),
        (b"POST /peer/v1/message\r\n\r\n", 400, "request line"),
        (b"POST /peer/v1/message HTTP/1.1\r\nno colon here\r\n\r\n", 400, "header"),
        (b"POST /peer/v1/message HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431, "too long"),
        ("POST /peer/v1/message HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n{}".encode("latin-1"), 400, "Content-Length"),
        (b"POST /peer/v1/message HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413, "5000 digits"),
    ],
    ids=[
        "get",
        "other-path",
        "broken-json",
        "bad-length",
        "chunked",
        "too-large",
        "no-version",
        "bad-header",
        "long",
        "unicode-digit-length",
        "5000-digit-length",
    ],
)
def test_it_refuses_a_bad_request_with_a_json_error_and_hands_nothing_to_the_handler(
    server: PeerServer, echo: Echo, request_bytes: bytes, status: int, says: str
) -> None:
    answer = raw(server, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    error = json.loads(body)
    assert error["status"] == "error" and says in error["error"], error
    if status == 405:
        assert b"\r\nAllow: POST" in head
    assert echo.calls == []


@pytest.mark.unit
def test_a_failing_handler_is_a_500_and_the_connection_stays_usable(server: PeerServer) -> None:
    conn = connect(server)
    try:
        status, answer, _ = post(conn, b'"boom"')
        assert (status, answer["kind"]) == (500, "internal"), answer
        assert "the handler failed" in answer["error"]
        assert post(conn, b'"fine"')[:2] == (200, {"echo": "fine", "remote": "127.0.0.1"})
    finally:
        conn.close()


@pytest.mark.unit
def test_a_body_nested_too_deeply_is_a_400_and_the_connection_stays_usable(server: PeerServer, echo: Echo) -> None:
    """The thread of the connection used to die of the decoder's RecursionError without an answer (2,000 levels:
    beyond the interpreter's recursion limit, within this server's body limit)."""
    conn = connect(server)
    try:
        local = conn.sock.getsockname()
        for deep in (b"[" * 2000 + b"]" * 2000, b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1)):
            status, answer, connection = post(conn, deep)
            assert (status, answer, connection) == (
                400,
                _bad_request(f"JSON nested deeper than {MAX_DEPTH} levels"),
                None,
            )
        assert post(conn, b'{"fine": [[1]]}')[:2] == (200, {"echo": {"fine": [[1]]}, "remote": "127.0.0.1"})
        assert conn.sock.getsockname() == local  # the same connection
    finally:
        conn.close()
    assert echo.calls == [{"fine": [[1]]}]


@pytest.mark.unit
def test_a_recursion_error_in_the_handler_is_a_400_and_the_connection_stays_usable(server: PeerServer) -> None:
    conn = connect(server)
    try:
        assert post(conn, b'"recurse"')[:2] == (400, _bad_request(TOO_DEEP_TO_HANDLE))
        assert post(conn, b'"fine"')[:2] == (200, {"echo": "fine", "remote": "127.0.0.1"})
    finally:
        conn.close()


def _bad_request(error: str) -> dict[str, str]:
    return {"status": "error", "kind": "bad_request", "error": error}


@pytest.mark.unit
def test_it_closes_when_asked_and_after_http_1_0(server: PeerServer) -> None:
    closing = b"POST /peer/v1/message HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    answer = raw(server, closing, whole=True)  # returns only because the server closed the connection
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
    old = raw(server, b"POST /peer/v1/message HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", whole=True)
    assert old.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in old


def closed_by_server(server: PeerServer, data: bytes) -> bytes:
    """Send `data` and read until the server closes the connection: what it sent first. The client waits
    HANG_GUARD seconds at most for each read, far longer than the timeout under test and far shorter than the other
    one: a server that keeps the connection open (or closes it by the wrong timeout) fails here."""
    try:
        return raw(server, data, timeout=HANG_GUARD, whole=True)
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {HANG_GUARD}s after {data!r}") from None


HANG_GUARD = 10.0  # seconds


@pytest.mark.unit
def test_it_closes_an_idle_connection_by_its_idle_timeout(echo: Echo) -> None:
    server = serve(echo, read_timeout=6 * HANG_GUARD, idle_timeout=0.3)  # only the idle timeout can close it
    try:
        assert closed_by_server(server, b"") == b""  # nothing sent: closed without an answer
    finally:
        server.close()
    assert echo.calls == []


@pytest.mark.unit
def test_it_closes_a_connection_whose_request_stalls_by_its_read_timeout(echo: Echo) -> None:
    server = serve(echo, read_timeout=0.3, idle_timeout=6 * HANG_GUARD)  # only the read timeout can close it
    try:
        stalled = closed_by_server(server, b"POST /peer/v1/message HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        assert stalled == b""  # the body never came whole: closed without an answer
    finally:
        server.close()
    assert echo.calls == []


def served_on_a_new_connection(server: PeerServer, body: bytes) -> int:
    """The status a new connection's request gets; 0 when the server closed it first (refused: it answers 503 and
    closes without reading the request, so the send may fail)."""
    conn = connect(server)
    try:
        return post(conn, body)[0]
    except OSError:
        return 0
    finally:
        conn.close()


@pytest.mark.unit
def test_it_serves_at_most_max_connections_and_answers_one_more_with_503(echo: Echo) -> None:
    server = serve(echo, max_connections=1)  # its idle timeout (30 s) never frees a slot within the waits here
    first = connect(server)
    try:
        assert post(first, b"1")[0] == 200
        busy = raw(server, b"", whole=True)
        assert busy.startswith(b"HTTP/1.1 503 ") and b"too many connections" in busy
        assert server_slots_taken(server) == 1
        first.close()  # its thread ends and frees the slot: a new connection is then served
        wait_until(lambda: served_on_a_new_connection(server, b"2") == 200, HANG_GUARD, "the freed slot to serve")
    finally:
        first.close()
        server.close()
    assert echo.calls == [1, 2]


def server_slots_taken(server: PeerServer) -> int:
    with server.lock:
        return len(server.conns)


@pytest.mark.unit
def test_after_close_it_refuses_connections(echo: Echo) -> None:
    server = serve(echo)
    port = server.port
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw_value", "expected"),
    [("127.0.0.1:9001", ("127.0.0.1", 9001)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:8001", ("::1", 8001)), ("", None)],  # noqa: S104
)
def test_it_reads_the_message_bind_setting(raw_value: str, expected: tuple[str, int] | None) -> None:
    assert parse_bind("DEJIMA_MESSAGE_BIND", raw_value) == expected


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["DEJIMA_MESSAGE_BIND", "DEJIMA_API_BIND"])
@pytest.mark.parametrize("bad", ["9001", "host:", ":9001", "host:port", "host:0", "host:70000"])
def test_it_rejects_a_bad_listener_bind_naming_the_setting(bad: str, setting: str) -> None:
    env = {
        "PEER_TYPE": "bank",
        "DEJIMA_DATABASE_URL": "postgresql://localhost/x",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@localhost/x",
        "DEJIMA_DEBUG": "1",
    }
    with pytest.raises(ConfigError, match=setting) as err:
        load_config({**env, setting: bad})
    assert "host:port" in str(err.value)
    assert load_config({**env, setting: "127.0.0.1:9002"}).api_bind == (
        ("127.0.0.1", 9002) if setting == "DEJIMA_API_BIND" else None
    )


@pytest.mark.cluster
def test_peers_send_their_messages_to_each_others_lean_listener(network: LocalNetwork) -> None:
    for name in network.specs:
        known = {p["name"]: p["url"] for p in network.get(name, "/api/v1/status")["peers"]}
        assert known == {o: s.message_url for o, s in network.specs.items() if o != name}, known
        assert all(s.message_url != s.url for s in network.specs.values())
    before = network.get("government", "/api/v1/status")["stats"]["propagate_received"]
    status, body = network.exec(
        "bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('L', 'Ean', '1')"
    )
    assert (status, body.get("status")) == (200, "committed"), body
    assert network.get("government", "/api/v1/status")["stats"]["propagate_received"] > before
    assert "peer messages also at 127.0.0.1:" in network.tail("government", 400)
