"""peer/relay.py on loopback, with real sockets: an echo server and an HTTP server behind the relay, a connection cut
at either end, the connection limit, the idle timeout, routing by Host and by the TLS server name (HTTPS servers with
certificates of a test CA, verified end to end through the relay), and the command line (SIGTERM, --check).
Every wait has a deadline; nothing depends on how fast the machine is."""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from peer import relay, tlscerts
from peer.network import free_port
from peer.relay import NeedMore, Relay, RelayError, RoutingRelay, client_hello_server_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0  # seconds: generous, the machine is shared; a wait ends as soon as its condition holds


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(DEADLINE)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
    return data


def ended(sock: socket.socket) -> bool:
    """Whether the other side ended the connection (EOF or reset), waiting at most DEADLINE for it."""
    sock.settimeout(DEADLINE)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


# ---- servers behind the relay -------------------------------------------------------------------------------------
class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte; `cut()` closes every connection from the server's side; counts connections it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.open: set[socket.socket] = set()
        self.seen = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.cut()
        self.server_close()

    def cut(self) -> None:
        with self.lock:
            conns = list(self.open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        with self.server.lock:
            self.server.open.add(conn)
            self.server.seen += 1
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self.server.lock:
                self.server.open.discard(conn)


class NamedHandler(BaseHTTPRequestHandler):
    """Answers every GET with the server's name, the path and the Host header it got; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    server: NamedHTTPServer

    def do_GET(self) -> None:
        body = f"{self.server.name} {self.path} {self.headers.get('Host')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class NamedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        super().__init__(("127.0.0.1", 0), NamedHandler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        self.connections += 1
        super().process_request(request, client_address)


@contextlib.contextmanager
def http_server(name: str, tls: ssl.SSLContext | None = None) -> Iterator[NamedHTTPServer]:
    """A named HTTP server on loopback; with `tls`, HTTPS (the handshake at accept)."""
    server = NamedHTTPServer(name)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def get(port: int, host: str, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


# ---- the plain relay ----------------------------------------------------------------------------------------------
def test_bytes_pass_both_ways_and_an_end_is_passed_on(echo: EchoServer) -> None:
    with Relay(("127.0.0.1", echo.port)) as r, connect(r.port) as client:
        for size in (1, 1000, 300_000):  # the last one spans many reads and writes
            payload = os.urandom(size)
            client.sendall(payload)
            assert recv_exactly(client, size) == payload
        client.shutdown(socket.SHUT_WR)  # our end reaches the echo server, which ends too: we read EOF
        assert ended(client)
        wait_until(lambda: r.connections == 0, "the relay to forget the connection")
    assert echo.seen == 1


def test_http_keeps_its_connection_alive_through_the_relay() -> None:
    with http_server("A") as server, Relay(("127.0.0.1", server.server_address[1])) as r:
        conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=DEADLINE)
        try:
            for i in range(3):
                conn.request("GET", f"/x{i}")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, f"A /x{i} 127.0.0.1:{r.port}".encode())
        finally:
            conn.close()
        assert server.connections == 1
        assert r.connections <= 1


def test_a_connection_cut_at_either_end_is_closed_at_the_other(echo: EchoServer) -> None:
    with Relay(("127.0.0.1", echo.port)) as r:
        client = connect(r.port)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        echo.cut()  # the destination drops it
        assert ended(client)
        client.close()
        wait_until(lambda: r.connections == 0, "the relay to forget the cut connection")

        client = connect(r.port)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        wait_until(lambda: len(echo.open) == 1, "the echo server to hold one connection")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # the client drops it (a reset)
        wait_until(lambda: not echo.open, "the echo server to see the connection end")
        wait_until(lambda: r.connections == 0, "the relay to forget it")


def test_the_connection_limit_closes_the_next_one_until_there_is_room(echo: EchoServer) -> None:
    with Relay(("127.0.0.1", echo.port), max_connections=2) as r:
        first, second = connect(r.port), connect(r.port)
        for sock in (first, second):
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        with connect(r.port) as third:  # accepted by the kernel, closed by the relay at once
            assert ended(third)
        assert echo.seen == 2
        first.close()
        wait_until(lambda: r.connections == 1, "room for one more")
        with connect(r.port) as fourth:
            fourth.sendall(b"y")
            assert recv_exactly(fourth, 1) == b"y"
        second.close()
        assert echo.seen == 3


def test_a_destination_that_is_down_closes_the_connection_and_the_relay_goes_on() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with Relay(("127.0.0.1", port), connect_timeout=2.0) as r:
        for _ in range(2):
            with connect(r.port) as client:
                assert ended(client)
        wait_until(lambda: r.connections == 0, "the relay to forget both")
        assert r.listening


def test_a_connection_silent_both_ways_is_closed_after_the_idle_timeout(echo: EchoServer) -> None:
    idle = 0.5
    with Relay(("127.0.0.1", echo.port), idle_timeout=idle) as r, connect(r.port) as client:
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        last = time.monotonic()
        assert ended(client)
        assert time.monotonic() - last >= idle * 0.9  # never before the timeout (monotonic clock, coarse poll)
        wait_until(lambda: r.connections == 0, "the relay to forget the idle connection")


def test_stop_closes_every_connection_and_the_listener(echo: EchoServer) -> None:
    r = Relay(("127.0.0.1", echo.port)).start()
    client = connect(r.port)
    client.sendall(b"a")
    assert recv_exactly(client, 1) == b"a"
    r.stop()
    assert ended(client)
    assert r.connections == 0
    assert not r.listening
    with pytest.raises(ConnectionRefusedError):
        connect(r.port).close()


# ---- routing by Host ------------------------------------------------------------------------------------------------
def test_routing_by_host_reaches_only_the_named_destinations() -> None:
    with http_server("A") as a, http_server("B") as b:
        routes = {
            "a-gateway:9000": ("127.0.0.1", a.server_address[1]),
            "B-Gateway:9000": ("127.0.0.1", b.server_address[1]),
        }
        with RoutingRelay(routes) as r:
            assert get(r.port, "a-gateway:9000", "/m") == (200, "A /m a-gateway:9000")
            assert get(r.port, "b-gateway:9000", "/n") == (200, "B /n b-gateway:9000")  # case does not matter
            status, text = get(r.port, "c-gateway:9000")
            assert status == 421
            assert "c-gateway:9000" in text
            assert get(r.port, "a-gateway")[0] == 421  # port 80 is not the route's port
            with connect(r.port) as client:  # not HTTP (nor TLS): no route, closed
                client.sendall(b"hello\r\n\r\n")
                data = client.recv(4096)
                assert data.startswith(b"HTTP/1.1 421")
                assert ended(client)
            wait_until(lambda: r.connections == 0, "the relay to forget every connection")
        assert (a.connections, b.connections) == (1, 1)


def test_a_request_head_must_come_whole_and_bounded() -> None:
    with http_server("A") as a, RoutingRelay({"a:1": ("127.0.0.1", a.server_address[1])}) as r:
        with connect(r.port) as client:
            client.sendall(b"GET / HTTP/1.1\r\nX: " + b"y" * (relay.MAX_HEAD + 10))
            assert ended(client)
        assert a.connections == 0


# ---- routing by TLS server name (SNI) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ssl.SSLContext]]:
    """A CA file and the server contexts of a-gateway and b-gateway (certificates of that CA for those names)."""
    folder = tmp_path_factory.mktemp("relay-ca")
    ca_cert, ca_key = tlscerts.make_ca("relay test CA")
    (folder / "ca.pem").write_bytes(ca_cert)
    contexts: dict[str, ssl.SSLContext] = {}
    for name in ("a-gateway", "b-gateway"):
        cert, key = tlscerts.issue(ca_cert, ca_key, name, [name])
        (folder / f"{name}.pem").write_bytes(cert + key)
        contexts[name] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        contexts[name].load_cert_chain(folder / f"{name}.pem")
    return folder / "ca.pem", contexts


def tls_get(port: int, server_name: str | None, ca: Path, path: str = "/") -> tuple[int, str]:
    """GET over TLS through the relay at `port`, for `server_name` (SNI, and the name the certificate is checked
    against; None: an IP address, no server name sent)."""
    context = ssl.create_default_context(cafile=str(ca))
    with context.wrap_socket(connect(port), server_hostname=server_name or "127.0.0.1") as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def client_hello(server_name: str) -> bytes:
    """The bytes of a real ClientHello (this Python's OpenSSL) for `server_name`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_is_read_from_a_client_hello_whole_or_across_records() -> None:
    hello = client_hello("bank-gateway")
    assert client_hello_server_name(hello) == "bank-gateway"
    for cut in (0, 1, 5, 40, len(hello) - 1):
        with pytest.raises(NeedMore):
            client_hello_server_name(hello[:cut])
    # the same handshake message in two records (a large ClientHello spans several)
    message = hello[5:]
    split = b"".join(bytes([0x16, 3, 1]) + len(part).to_bytes(2, "big") + part for part in (message[:50], message[50:]))
    assert client_hello_server_name(split) == "bank-gateway"
    assert client_hello_server_name(client_hello("127.0.0.1")) is None  # an IP address: no server name
    with pytest.raises(ValueError, match="not a TLS handshake record"):
        client_hello_server_name(b"GET / HTTP/1.1\r\n\r\n")


def test_routing_by_tls_server_name_reaches_only_the_named_destinations(
    test_ca: tuple[Path, dict[str, ssl.SSLContext]],
) -> None:
    ca, contexts = test_ca
    port = free_port()
    with http_server("A", contexts["a-gateway"]) as a, http_server("B", contexts["b-gateway"]) as b:
        routes = {
            f"a-gateway:{port}": ("127.0.0.1", a.server_address[1]),
            f"B-Gateway:{port}": ("127.0.0.1", b.server_address[1]),
        }
        with RoutingRelay(routes, ("127.0.0.1", port)) as r:
            # TLS end to end: the certificate each server presents is checked for the name the client asked for
            assert tls_get(r.port, "a-gateway", ca, "/m") == (200, "A /m a-gateway")
            assert tls_get(r.port, "b-gateway", ca, "/n") == (200, "B /n b-gateway")  # case does not matter
            for refused in ("c-gateway", None):  # no route; an IP address (no server name): closed at once
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    tls_get(r.port, refused, ca)
            with connect(r.port) as client:  # a TLS record that is no ClientHello: closed
                client.sendall(bytes([0x16, 3, 1, 0, 4]) + b"\x02abc")
                assert ended(client)
            wait_until(lambda: r.connections == 0, "the relay to forget every connection")
        assert (a.connections, b.connections) == (1, 1)


def test_a_client_hello_must_come_whole_and_bounded(test_ca: tuple[Path, dict[str, ssl.SSLContext]]) -> None:
    _, contexts = test_ca
    port = free_port()
    with http_server("A", contexts["a-gateway"]) as a:
        routes = {f"a-gateway:{port}": ("127.0.0.1", a.server_address[1])}
        with RoutingRelay(routes, ("127.0.0.1", port)) as r, connect(r.port) as client:
            # a record header announcing more than MAX_HEAD, then a stream of it
            client.sendall(bytes([0x16, 3, 1, 0xFF, 0xFF]) + b"\x01" * (relay.MAX_HEAD + 10))
            assert ended(client)
        assert a.connections == 0


# ---- the command line -------------------------------------------------------------------------------------------
def test_addresses_and_routes_are_parsed_or_refused() -> None:
    assert relay.parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)  # noqa: S104  (parsed, not bound)
    assert relay.parse_address("[::]:9000") == ("::", 9000)
    assert relay.parse_address("bank-peer:9000") == ("bank-peer", 9000)
    assert relay.parse_route("Gov-Gateway:9000=gov-gateway-peers:9000") == (
        "gov-gateway:9000",
        ("gov-gateway-peers", 9000),
    )
    assert relay.host_key("x") == "x:80"
    assert relay.host_key("[::1]") == "[::1]:80"
    for bad in ("bank-peer", ":9000", "h:99999", "h:x"):
        with pytest.raises(RelayError):
            relay.parse_address(bad)
    with pytest.raises(RelayError):
        relay.parse_route("a:1")
    assert relay.request_head_host(b"GET / HTTP/1.1\r\nhOsT:  a:1 ") == "a:1"
    assert relay.request_head_host(b"GET / HTTP/1.1\r\nX: a") is None
    assert relay.request_head_host(b"\x16\x03\x01") is None


def test_the_command_line_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert relay.main(["--listen", "0.0.0.0", "--to", "a:1"]) == 2  # noqa: S104  (refused before binding)
    assert "--listen '0.0.0.0'" in capsys.readouterr().err
    assert relay.main(["--listen", "127.0.0.1:0", "--route", "a:1"]) == 2
    with pytest.raises(SystemExit):
        relay.main(["--listen", "127.0.0.1:0"])  # neither --to nor --route
    with pytest.raises(SystemExit):
        relay.main(["--listen", "127.0.0.1:0", "--to", "a:1", "--route", "b:1=c:1"])


def test_the_command_relays_checks_and_stops_cleanly_on_sigterm(echo: EchoServer) -> None:
    command = [sys.executable, "-m", "peer.relay", "--listen", "127.0.0.1:0", "--to", f"127.0.0.1:{echo.port}"]
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr

    def read_lines() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    try:
        port = 0
        deadline = time.monotonic() + DEADLINE
        while not port:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+), relaying to 127\.0\.0\.1:\d+", line):
                port = int(match.group(1))
        assert relay.main(["--check", f"127.0.0.1:{port}"]) == 0
        client = connect(port)
        client.sendall(b"through")
        assert recv_exactly(client, 7) == b"through"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
        assert ended(client)  # its connections were closed, not left behind
        client.close()
        assert relay.main(["--check", f"127.0.0.1:{port}"]) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
