"""A small TCP relay: what a partner reaches of an organization (docs/deployment.md, "Networks").

    python -m peer.relay --listen 0.0.0.0:9000 --to bank-peer:9000          # a peer's gateway
    python -m peer.relay --listen 0.0.0.0:9000 \\
        --route gov-gateway:9000=gov-gateway-peers:9000 --route …             # an organization's egress
    python -m peer.relay --check 127.0.0.1:9000                               # health check: exit 0 when it listens

With `--to`, every connection accepted on `--listen` is joined to a new connection to that one address, bytes
passed both ways unchanged (a half-close is passed on). That is a peer's gateway: on the network of the peers it
reaches the peer's message listener (DEJIMA_MESSAGE_BIND) and nothing else, so a partner never reaches the REST
API, the client API or the database of the organization.

With `--route HOST:PORT=TO_HOST:TO_PORT` (repeated), the host the connection was opened for picks where it goes: the
organization's own peer reaches the other peers' gateways through it, since the peer itself sits only on its
organization's network. Over TLS (the peers' default) that host is the server name (SNI) of the client's first
message, the ClientHello, which TLS sends in clear so that a server can pick its certificate; the relay reads it
without decrypting anything (it holds no key: the peers verify each other end to end) and takes the port the
client connected to, its own listening port. Over plain HTTP it is the first request's `Host` header. A host
without a route is closed (plain HTTP: answered `421 Misdirected Request` first); so is a ClientHello without a
server name (a URL naming an IP address). After that first message the bytes pass unchanged (the peer's transport
keeps one connection per address, so every request on it is for the same host).

Limits: at most `--max-connections` at once (the next one is closed at once, logged once until there is room
again); `--connect-timeout` seconds to reach the destination (else the connection is closed); a connection silent
in both directions for `--idle-timeout` seconds is closed (0: never; longer than the message listener's own
30 s keep-alive, so that the listener closes first, cleanly). SIGTERM or SIGINT: stop accepting, close every
connection, exit 0.

Threads own their sockets: each connection has two threads (one per direction, the first one also connects);
other threads only `shutdown()` a socket (which wakes a blocked `recv`/`accept`) and its owner closes it, so a file
descriptor is never closed under a thread still using it. The test kit's fault-injection proxy
(peer/testkit/proxy.py) is this relay with hooks: it holds, delays and cuts traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

log = logging.getLogger("peer.relay")

Address = tuple[str, int]

LOOPBACK = "127.0.0.1"
CHUNK = 65536
MAX_HEAD = 16 * 1024  # bytes of the first request head (or ClientHello) a routing relay reads to pick a destination
HEAD_TIMEOUT = 10.0  # seconds for that head to come whole (the message listener's own read timeout)
TLS_HANDSHAKE = 0x16  # the content type of a TLS handshake record: a TLS client's first byte
CLIENT_HELLO = 0x01
SERVER_NAME_EXTENSION = 0x0000
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_IDLE_TIMEOUT = 120.0
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class RelayError(ValueError):
    """A bad address or route on the command line; the message says which."""


def parse_address(text: str, what: str = "address") -> Address:
    """`host:port`, `[v6]:port`; the port 0..65535 (0: any free port, when listening)."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise RelayError(f"{what} {text!r}: give host:port")
    return host, int(port_text)


def host_key(host: str) -> str:
    """A Host header value or a route's HOST:PORT, compared case-insensitively, with the default port 80."""
    host = host.strip().lower()
    if host.startswith("["):
        return host if "]:" in host else f"{host}:80"
    return host if ":" in host else f"{host}:80"


def parse_route(text: str) -> tuple[str, Address]:
    """`HOST:PORT=TO_HOST:TO_PORT` -> (host key, destination)."""
    source, sep, target = text.partition("=")
    if not sep:
        raise RelayError(f"route {text!r}: give HOST:PORT=TO_HOST:TO_PORT")
    host, port = parse_address(source, "route")
    return host_key(f"{host}:{port}"), parse_address(target, "route destination")


def request_head_host(head: bytes) -> str | None:
    """The Host header of an HTTP/1.x request head (the bytes before the blank line), or None."""
    lines = head.split(b"\r\n")
    if len(lines[0].split(b" ")) != 3 or not lines[0].split(b" ")[2].startswith(b"HTTP/1."):
        return None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return value.strip().decode("latin-1")
    return None


class NeedMore(Exception):
    """The bytes read so far end inside the ClientHello."""


def client_hello_server_name(data: bytes) -> str | None:
    """The server name (SNI, RFC 6066) of the TLS ClientHello at the start of `data`, None when it names none.
    Raises NeedMore while the ClientHello is not whole (it may span several records), ValueError when `data` is
    not a ClientHello."""
    handshake = b""
    pos = 0
    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        if len(data) < pos + 5:
            raise NeedMore
        if data[pos] != TLS_HANDSHAKE or data[pos + 1] != 3:
            raise ValueError("not a TLS handshake record")
        size = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if len(data) < pos + 5 + size:
            raise NeedMore
        handshake += data[pos + 5 : pos + 5 + size]
        pos += 5 + size
    if handshake[0] != CLIENT_HELLO:
        raise ValueError("the first handshake message is not a ClientHello")
    try:
        return _server_name(handshake[4 : 4 + int.from_bytes(handshake[1:4], "big")])
    except IndexError:
        raise ValueError("a ClientHello cut short") from None


def _server_name(hello: bytes) -> str | None:
    """The host_name of the server_name extension of a ClientHello's body (IndexError when it is cut short)."""
    at = 2 + 32  # client version, random
    at += 1 + hello[at]  # session id
    at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
    at += 1 + hello[at]  # compression methods
    if at + 2 > len(hello):
        return None  # no extensions
    end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
    at += 2
    if end > len(hello):
        raise ValueError("the ClientHello's extensions run past its end")
    while at + 4 <= end:
        kind, size = int.from_bytes(hello[at : at + 2], "big"), int.from_bytes(hello[at + 2 : at + 4], "big")
        body = hello[at + 4 : at + 4 + size]
        at += 4 + size
        if kind != SERVER_NAME_EXTENSION:
            continue
        item = 2  # the list's length, then entries (type, length, name)
        while item + 3 <= len(body):
            name_type, length = body[item], int.from_bytes(body[item + 1 : item + 3], "big")
            name = body[item + 3 : item + 3 + length]
            item += 3 + length
            if name_type == 0:  # host_name
                return name.decode("ascii", errors="replace")
        return None
    return None


class Link:
    """One relayed connection: the accepted socket, the socket to the destination, and the two threads' state."""

    def __init__(self, client: socket.socket, remote: str) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.remote = remote  # the address the connection came from, for the log
        self.closed = threading.Event()
        self.pending = b""  # bytes read from the client before the destination was known
        self.label = ""  # what a relay reading requests learned: the Host (routes), the sending peer (test kit)
        self.down_bytes = 0  # bytes passed from the destination to the client so far
        self.last_activity = time.monotonic()
        self._lock = threading.Lock()
        self._owners = 2  # the two threads; the last one out closes the sockets

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def close(self) -> None:
        """Wake both threads (shutdown); the sockets are closed by the last thread."""
        self.closed.set()
        for sock in (self.client, self.server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def done(self, owners: int = 1) -> bool:
        """A thread is finished with the link; the last one closes the sockets and returns True."""
        with self._lock:
            self._owners -= owners
            last = self._owners <= 0
        if last:
            self.closed.set()
            for sock in (self.client, self.server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
        return last


class Relay:
    """A threaded TCP relay from `listen` to `target` (see the module's docstring). `start()` binds (an error
    raises there), `stop()` closes everything. Subclasses change where a connection goes (`_upstream`), how bytes
    are sent (`_send`) or read upwards (`_pump_up`), and whether the listener is open (`_listener_wanted`)."""

    def __init__(
        self,
        target: Address | None,
        listen: Address = (LOOPBACK, 0),
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        name: str = "",
    ) -> None:
        if max_connections < 1:
            raise RelayError(f"max connections {max_connections}: give 1 or more")
        if connect_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise RelayError("timeouts are seconds above 0")
        self.target = target
        self.listen = listen
        self.port = listen[1]
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.name = name or f"relay:{listen[1]}"
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a link is forgotten
        self._links: set[Link] = set()
        self._listener: socket.socket | None = None  # owned by the acceptor thread; others only shut it down
        self._stopped = threading.Event()
        self._wake = threading.Event()  # the acceptor looks at _listener_wanted() again
        self._listening = threading.Event()  # the acceptor's listener state
        self._acceptor: threading.Thread | None = None
        self._full_logged = False

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Relay:
        listener = self._bind(self.listen[1])
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, wait (at most `timeout` s) until their threads are done."""
        self._stopped.set()
        self._reconsider()
        self._close_links(lambda link: True)
        if self._acceptor is not None:
            self._acceptor.join(timeout=timeout)
        with self._room:
            self._room.wait_for(lambda: not self._links, timeout=timeout)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Connections relayed now."""
        with self._lock:
            return len(self._links)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _listener_wanted(self) -> bool:
        """Whether the listener should be open (called with the relay's lock held): the test kit closes it to cut."""
        return True

    def _upstream(self, link: Link) -> Address | None:
        """Where `link` goes (None: nowhere, the link is closed). May read from the client into `link.pending`."""
        return self.target

    def _send(self, link: Link, sock: socket.socket, data: bytes) -> bool:
        """Send `data` on one side of `link`; False when it closed (the link is closed then)."""
        if link.closed.is_set():
            return False
        try:
            sock.sendall(data)
        except OSError:
            link.close()
            return False
        return True

    def _pump_up(self, link: Link) -> None:
        """client -> destination."""
        assert link.server is not None
        self._pump(link, link.client, link.server)

    # ---- the listener ---------------------------------------------------------------------------------------
    def _bind(self, port: int) -> socket.socket:
        host = self.listen[0]
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock

    def _reconsider(self) -> None:
        """Wake the acceptor to look at `_stopped` and `_listener_wanted()` again: its listener is shut down when it
        should no longer listen (which wakes a blocked accept)."""
        with self._lock:
            listener = self._listener
            close = self._stopped.is_set() or not self._listener_wanted()
        if close and listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
        self._wake.set()

    def _accept_loop(self) -> None:
        """Owns the listening socket: closes it while not wanted, listens again on the same port after."""
        with self._lock:
            listener = self._listener
        try:
            while not self._stopped.is_set():
                with self._lock:
                    wanted = self._listener_wanted()
                    if not wanted:
                        self._listener = None
                if not wanted:
                    if listener is not None:
                        listener.close()
                        listener = None
                    self._listening.clear()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                if listener is None:
                    try:
                        listener = self._bind(self.port)
                    except OSError as exc:  # the port is briefly taken: try again when woken or soon
                        log.warning("%s: cannot listen on port %d again: %s", self.name, self.port, exc)
                        self._wake.wait(0.05)
                        self._wake.clear()
                        continue
                    with self._lock:  # published only if still wanted: a cut meanwhile finds it and shuts it
                        self._listener = listener
                        if not self._listener_wanted():
                            continue
                self._listening.set()
                try:
                    client, addr = listener.accept()
                except OSError as exc:  # shut down (stop, cut), a client gone already, or out of descriptors
                    if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                        log.warning("%s: accept: %s", self.name, exc)
                        self._wake.wait(0.1)
                    continue
                self._admit(client, str(addr[0]) if isinstance(addr, tuple) else str(addr))
        finally:
            with self._lock:
                self._listener = None
            if listener is not None:
                listener.close()
            self._listening.clear()

    def _admit(self, client: socket.socket, remote: str) -> None:
        client.settimeout(None)
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(client, remote)
        with self._lock:
            refused = self._stopped.is_set() or not self._listener_wanted()
            full = len(self._links) >= self.max_connections
            if not refused and not full:
                self._links.add(link)
            log_full = full and not self._full_logged
            self._full_logged = self._full_logged or full
        if log_full:
            log.warning("%s: %d connections: closing new ones until one ends", self.name, self.max_connections)
        if refused or full:
            client.close()
            return
        threading.Thread(target=self._run_link, args=(link,), name=f"{self.name}-up", daemon=True).start()

    def _close_links(self, which: Callable[[Link], bool]) -> None:
        with self._lock:
            links = [link for link in self._links if which(link)]
        for link in links:
            link.close()

    def _forget(self, link: Link) -> None:
        with self._room:
            self._links.discard(link)
            if len(self._links) < self.max_connections:
                self._full_logged = False
            self._room.notify_all()

    # ---- one connection -------------------------------------------------------------------------------------
    def _run_link(self, link: Link) -> None:
        target = self._upstream(link)
        server: socket.socket | None = None
        if target is not None and not link.closed.is_set():
            try:
                server = socket.create_connection(target, timeout=self.connect_timeout)
            except OSError as exc:  # the destination is down or unknown: the client sees the connection closed
                log.warning("%s: cannot reach %s:%d: %s", self.name, target[0], target[1], exc)
        if server is None:
            link.done(owners=2)
            self._forget(link)
            return
        server.settimeout(self.idle_timeout)  # bounds a send to a reader that stopped reading
        with contextlib.suppress(OSError):
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.client.settimeout(self.idle_timeout)
        link.server = server
        if link.closed.is_set():  # cut while connecting: shut the new socket down too
            link.close()
        link.touch()
        threading.Thread(target=self._pump_down, args=(link,), name=f"{self.name}-down", daemon=True).start()
        if link.pending:
            pending, link.pending = link.pending, b""
            if not self._send(link, server, pending):
                self._done(link)
                return
        try:
            self._pump_up(link)
        finally:
            self._done(link)

    def _pump_down(self, link: Link) -> None:
        """destination -> client."""
        assert link.server is not None
        try:
            self._pump(link, link.server, link.client)
        finally:
            self._done(link)

    def _pump(self, link: Link, src: socket.socket, dst: socket.socket) -> None:
        """Bytes from `src` to `dst` until `src` ends (its end is passed on as a half-close) or the link closes."""
        while True:
            data = self._recv(link, src)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if not self._send(link, dst, data):
                return
            if dst is link.client:
                link.down_bytes += len(data)

    def _recv(self, link: Link, sock: socket.socket) -> bytes:
        """The next bytes from `sock`: b"" at its end, on an error, once the link closed, or when the link has been
        silent both ways for `idle_timeout` (it is closed then)."""
        if self.idle_timeout is not None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while True:
                remaining = link.last_activity + self.idle_timeout - time.monotonic()
                if remaining <= 0:
                    if not link.closed.is_set():
                        log.info(
                            "%s: closed a connection from %s, idle %.0f s", self.name, link.remote, self.idle_timeout
                        )
                    link.close()
                    return b""
                try:
                    if poller.poll(max(1, int(remaining * 1000) + 1)):
                        break
                except OSError:
                    return b""
        try:
            data = sock.recv(CHUNK)
        except OSError:
            return b""
        if data:
            link.touch()
        return data

    def _done(self, link: Link) -> None:
        if link.done():
            self._forget(link)


class RoutingRelay(Relay):
    """A relay whose destination is picked by the host a connection is for (`routes`: host key -> address): the
    server name of a TLS ClientHello with the port it came to, or the first HTTP request's Host header."""

    def __init__(
        self,
        routes: Mapping[str, Address],
        listen: Address = (LOOPBACK, 0),
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        name: str = "",
    ) -> None:
        if not routes:
            raise RelayError("no route")
        super().__init__(
            None,
            listen,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            name=name,
        )
        self.routes = {host_key(host): address for host, address in routes.items()}

    def _upstream(self, link: Link) -> Address | None:
        first = self._read_some(link, b"", time.monotonic() + HEAD_TIMEOUT)
        if first is None:
            return None
        if first[0] == TLS_HANDSHAKE:
            return self._tls_upstream(link, first)
        head = self._read_head(link, first)
        if head is None:
            return None
        host = request_head_host(head)
        link.label = host or ""
        target = self.routes.get(host_key(host)) if host else None
        if target is None:
            log.warning("%s: no route for Host %r (from %s): answered 421", self.name, (host or "")[:100], link.remote)
            body = f"no route for host {(host or '')[:100]!r}\n".encode()
            answer = (
                b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            with contextlib.suppress(OSError):
                link.client.sendall(answer)
        return target

    def _tls_upstream(self, link: Link, buf: bytes) -> Address | None:
        """The destination of a TLS connection: its ClientHello's server name at the port it came to."""
        deadline = time.monotonic() + HEAD_TIMEOUT
        while True:
            try:
                name = client_hello_server_name(buf)
                break
            except NeedMore:
                more = self._read_some(link, buf, deadline)
                if more is None:
                    return None
                buf = more
            except ValueError as exc:
                log.warning("%s: not a TLS ClientHello from %s (%s): closed", self.name, link.remote, exc)
                return None
        link.pending = buf
        link.label = name or ""
        port = link.client.getsockname()[1]
        target = self.routes.get(host_key(f"{name}:{port}")) if name else None
        if target is None:
            log.warning(
                "%s: no route for TLS server name %r (from %s, port %d): closed",
                self.name,
                (name or "")[:100],
                link.remote,
                port,
            )
        return target

    def _read_some(self, link: Link, buf: bytes, deadline: float) -> bytes | None:
        """`buf` and the next bytes from the client, or None: the client ended, sent more than MAX_HEAD bytes, or
        the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(buf) > MAX_HEAD:
            return None
        link.client.settimeout(remaining)
        try:
            data = link.client.recv(CHUNK)
        except OSError:
            return None
        return buf + data if data else None

    def _read_head(self, link: Link, buf: bytes) -> bytes | None:
        """Read from the client until a whole request head is in `link.pending` (the head returned), or None: the
        client ended, sent more than MAX_HEAD bytes without one, or took more than HEAD_TIMEOUT."""
        deadline = time.monotonic() + HEAD_TIMEOUT
        while b"\r\n\r\n" not in buf:
            more = self._read_some(link, buf, deadline)
            if more is None:
                return None
            buf = more
        link.pending = buf
        return buf[: buf.index(b"\r\n\r\n")]


def check(address: Address, timeout: float = 3.0) -> bool:
    """Whether something accepts connections at `address` (the relay's health check)."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError as exc:
        print(f"unhealthy: {address[0]}:{address[1]}: {exc}", file=sys.stderr)
        return False


# ---- command line -----------------------------------------------------------------------------------------------
def build(args: argparse.Namespace) -> Relay:
    """The relay the command line asks for."""
    listen = parse_address(args.listen, "--listen")
    idle = args.idle_timeout or None
    name = f"relay {args.listen}"
    if args.to:
        target = parse_address(args.to, "--to")
        return Relay(
            target,
            listen,
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
            idle_timeout=idle,
            name=name,
        )
    routes = dict(parse_route(route) for route in args.route)
    return RoutingRelay(
        routes,
        listen,
        max_connections=args.max_connections,
        connect_timeout=args.connect_timeout,
        idle_timeout=idle,
        name=name,
    )


def argument_parser() -> argparse.ArgumentParser:
    """The command line (the deployment files' relays are checked with it: tests/test_deploy.py)."""
    parser = argparse.ArgumentParser(prog="python -m peer.relay", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", help="host:port to accept connections on (0.0.0.0:9000)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--to", help="host:port every connection is relayed to")
    where.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="HOST:PORT=TO_HOST:TO_PORT",
        help="relay by the host a connection is for: the TLS server name (SNI) or the HTTP Host header",
    )
    where.add_argument("--check", metavar="HOST:PORT", help="exit 0 when something accepts connections there")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, help="seconds")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, help="seconds (0: never)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        if args.check:
            return 0 if check(parse_address(args.check, "--check")) else 1
        if not args.listen or not (args.to or args.route):
            parser.error("give --listen and either --to or --route (or --check)")
        relay = build(args)
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        relay.start()
    except OSError as exc:
        print(f"relay: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    where_to = args.to or ", ".join(args.route)
    log.info("listening on %s:%d, relaying to %s", relay.listen[0], relay.port, where_to)
    stop.wait()
    log.info("stopping: closing %d connections", relay.connections)
    relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
