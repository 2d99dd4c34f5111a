"""Test kit (the tests and `dejima chaos` use it): a small threaded TCP proxy on loopback, and a cluster whose
peer-to-peer traffic goes through proxies.

`Proxy(target_port)` listens on a free loopback port and forwards every connection to the target:

- `cut()` closes every connection and refuses new ones (the listening socket is closed: connect is refused);
  `restore()` listens again on the same port and forgets every cut;
- `cut_from(sender)` closes any connection as soon as it carries a request from `sender`: the link between two
  peers is down, the others are not;
- `hold()` stops forwarding new data in both directions (it is kept, in order) until `release()`;
- `delay_from(sender, seconds)` holds each request from peer `sender` back for `seconds` before forwarding it;
  `delay_from(sender, 0)` removes the delay; `clear()` removes every delay, cut, hold and capture;
- `hold_from(sender, when)` holds each request from `sender` (each one `when` picks out of the raw request: over
  plain HTTP e.g. by its message kind, `message_kind`) back until `release_from(sender)`; `wait_held(sender, n)`
  returns once n of them are being (or were) held, and `wait_seen(sender, n)` once n requests from `sender` have
  arrived at all (`requests_seen`): a test orders its steps by these events instead of sleeping;
- `record()` keeps a copy of every byte it forwards, both ways (`recorded()`): what a network observer sees;
- `capture_from(sender)` keeps a copy of every request from `sender` it forwards (`captured`: the raw bytes, as
  an eavesdropper on the link would see them; `request_body` takes the body out), to replay them later. Over TLS a
  "request" is a flight of encrypted records, which is useless to replay: tests of replays run without TLS.

Who sends. Plain HTTP: every peer-to-peer request carries `X-Dejima-Peer: <sender>` (peer/dejima/transport.py), read
request by request. TLS passes through the proxy untouched (the peers verify each other end to end; the proxy holds
no key), so it reads no header: a connection is labelled at accept with the peer whose process opened it (`who`, a
function of the connecting address: `ProxiedCluster` looks the socket up in /proc among its peers' processes), and
a "request" is a flight of TLS records, each run of the sender's bytes after the other side spoke (the handshake's
flights count too, so a delayed sender's new connection waits once per flight).

The proxy is the deployment's relay (peer/relay.py: its listener, connections, threads and their sockets) with
these faults added through the relay's hooks: whether the listener is open, where a connection goes (labelled on
the way), how bytes are sent, and how the client's bytes are read (request by request here, to delay or cut by
sender). It has no connection limit and no idle timeout.

`ProxiedCluster` builds a `LocalNetwork` of the shipped example (TLS unless `tls=False`) where each peer advertises
the URL of its own proxy (`DEJIMA_URL`) and is seeded with the other peers' proxy URLs (`DEJIMA_SEEDS`): other peers
learn a peer's URL from its greetings (peer/dejima/directory.py), so every peer-to-peer message to peer X passes X's
proxy, while the tests talk to each peer directly (`spec.url`, with the peer's API token: `LocalNetwork.auth_headers`,
verifying its certificate against the kit's CA: `LocalNetwork.verify`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg import sql

from peer.cli import check_network
from peer.network import LocalNetwork, NetworkError, example_specs
from peer.pgserver import PgServer
from peer.relay import LOOPBACK, Address, Link, Relay

SENDER_HEADER = b"x-dejima-peer"
MAX_HEAD = 64 * 1024
TLS_HANDSHAKE = 0x16  # the first byte of a TLS connection (a handshake record: the ClientHello)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def _hex_address(address: Address) -> str:
    """An IPv4 address as /proc/net/tcp writes it (`0100007F:1F90`)."""
    packed = socket.inet_aton(address[0])
    return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"


def socket_owner(local: Address, remote: Address, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the TCP socket from `local` to `remote` (both IPv4), from /proc; None when none does
    (or /proc does not tell)."""
    wanted = (_hex_address(local), _hex_address(remote))
    inode = ""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            # an earlier connection of the same addresses may linger in TIME_WAIT: it belongs to nobody (inode 0)
            if len(fields) > 9 and (fields[1], fields[2]) == wanted and fields[9] != "0":
                inode = fields[9]
                break
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        return pid
    return None


class Proxy(Relay):
    """A threaded TCP proxy from a free loopback port to `target_host:target_port`, with faults."""

    def __init__(self, target_port: int, target_host: str = LOOPBACK, name: str = "", scheme: str = "http") -> None:
        super().__init__(
            (target_host, target_port),
            (LOOPBACK, 0),
            max_connections=1_000_000,
            idle_timeout=None,
            name=name or f"proxy->{target_port}",
        )
        self._flowing = threading.Event()
        self._flowing.set()
        self._delays: dict[str, float] = {}
        self._cut_senders: set[str] = set()
        self._refusing = False
        self.scheme = scheme  # of its URL: "https" when the target speaks TLS (passed through untouched)
        self.requests_seen: dict[str, int] = {}  # sender -> requests (TLS: flights) forwarded (or cut)
        # `hold_from`: sender -> (which of its requests to hold, None: all; set when they may pass)
        self._gates: dict[str, tuple[Callable[[bytes], bool] | None, threading.Event]] = {}
        self.held: dict[str, int] = {}  # sender -> requests `hold_from` has held back (released ones included)
        self._arrivals = threading.Condition(self._lock)  # notified when a request arrives, and when one is held
        # the sending peer of a connection: (its address, the proxy's address) -> its name, "" when unknown
        self.who: Callable[[Address, Address], str] | None = None
        self._recording: bytearray | None = None
        self._capturing: set[str] = set()
        self.captured: list[bytes] = []  # the raw requests of the senders `capture_from` named, in order

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def start(self) -> Proxy:
        super().start()
        self._wait(True)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._flowing.set()  # held sends give up on their closed links
        with self._lock:
            gates, self._gates = list(self._gates.values()), {}
        for _, released in gates:
            released.set()
        super().stop(timeout)

    def __enter__(self) -> Proxy:
        return self.start()

    # ---- faults ---------------------------------------------------------------------------------------------
    def cut(self) -> None:
        """Close every connection and refuse new ones until `restore()`."""
        with self._lock:
            self._refusing = True
        self._reconsider()
        self._close_links(lambda link: True)
        self._wait(False)

    def restore(self) -> None:
        """Accept connections again (same port) and forget every cut."""
        with self._lock:
            self._refusing = False
            self._cut_senders.clear()
        self._reconsider()
        self._wait(True)

    def cut_from(self, sender: str) -> None:
        """Drop every connection carrying requests from `sender` (now or later) until `restore()`."""
        with self._lock:
            self._cut_senders.add(sender)
        self._close_links(lambda link: link.label == sender)

    def hold(self) -> None:
        """Stop forwarding new data (both directions) until `release()`; nothing is lost."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def delay_from(self, sender: str, seconds: float) -> None:
        """Hold back each HTTP request from peer `sender` for `seconds` (0: no delay)."""
        with self._lock:
            if seconds > 0:
                self._delays[sender] = seconds
            else:
                self._delays.pop(sender, None)

    def hold_from(self, sender: str, when: Callable[[bytes], bool] | None = None) -> None:
        """Hold back each request from peer `sender` (each raw request `when` returns True for; all when None) until
        `release_from(sender)` or `clear()`; nothing is lost. Each one held counts in `held[sender]` (`wait_held`).
        A held request stops its own connection only: the sender's requests on other connections pass (unless held
        too). Over TLS a request is a flight, which `when` cannot read: pick by message only over plain HTTP."""
        with self._lock:
            self._gates[sender] = (when, threading.Event())

    def release_from(self, sender: str) -> None:
        """Let the requests `hold_from(sender)` holds pass, in order, and hold no more."""
        with self._lock:
            gate = self._gates.pop(sender, None)
        if gate is not None:
            gate[1].set()

    def wait_held(self, sender: str, count: int = 1, timeout: float = 10.0) -> None:
        """Return once `count` requests from `sender` have been held back by `hold_from` (counting those released
        since); AssertionError after `timeout` seconds (a guard against hanging, not a bound on the peers)."""
        self._wait_count(self.held, sender, count, timeout, "held back")

    def wait_seen(self, sender: str, count: int, timeout: float = 10.0) -> None:
        """Return once `count` requests (TLS: flights) from `sender` have arrived here in all (`requests_seen`);
        AssertionError after `timeout` seconds."""
        self._wait_count(self.requests_seen, sender, count, timeout, "arrived")

    def _wait_count(self, counts: dict[str, int], sender: str, count: int, timeout: float, what: str) -> None:
        with self._arrivals:
            if not self._arrivals.wait_for(lambda: counts.get(sender, 0) >= count, timeout):
                raise AssertionError(
                    f"{self.name}: {counts.get(sender, 0)} requests from {sender!r} {what} within {timeout}s,"
                    f" not {count}"
                )

    def record(self, on: bool = True) -> None:
        """Keep a copy of every byte forwarded from now on, both ways (`recorded()`); `on` False stops and forgets."""
        with self._lock:
            self._recording = bytearray() if on else None

    def recorded(self) -> bytes:
        """What passed since `record()`: every byte, both ways, in the order forwarded."""
        with self._lock:
            return bytes(self._recording or b"")

    def capture_from(self, sender: str) -> None:
        """Keep a copy of every HTTP request from peer `sender` (in `captured`) until `clear()`."""
        with self._lock:
            self._capturing.add(sender)

    def clear(self) -> None:
        """No delay, no hold, no cut, no capture (what was captured stays in `captured`)."""
        with self._lock:
            self._delays.clear()
            self._capturing.clear()
            gates, self._gates = list(self._gates.values()), {}
        for _, released in gates:
            released.set()
        self.release()
        self.restore()

    # ---- the relay's hooks ----------------------------------------------------------------------------------
    def _listener_wanted(self) -> bool:
        return not self._refusing

    def _wait(self, listening: bool, timeout: float = 5.0) -> None:
        """Until the acceptor has opened (closed) its listener, as `cut()`/`restore()` asked."""
        deadline = time.monotonic() + timeout
        while self.listening != listening:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: listener did not become {'open' if listening else 'closed'}")
            time.sleep(0.005)

    def _upstream(self, link: Link) -> Address | None:
        """The target; the connection labelled with the peer that opened it (`who`), when it is known."""
        self._identify(link)
        return self.target

    def _identify(self, link: Link) -> None:
        if self.who is not None and not link.label:
            with contextlib.suppress(OSError):
                link.label = self.who(link.client.getpeername(), link.client.getsockname())

    def _send(self, link: Link, sock: socket.socket, data: bytes) -> bool:
        """Forward `data` once the proxy is not held; False when the link closed meanwhile."""
        while not self._flowing.wait(0.05):
            if link.closed.is_set():
                return False
        sent = super()._send(link, sock, data)
        if sent and self._recording is not None:
            with self._lock:
                if self._recording is not None:
                    self._recording += data
        return sent

    def _pump_up(self, link: Link) -> None:
        """client -> server, request by request (HTTP/1.1 with Content-Length), so that requests can be delayed or
        cut by sender; TLS flight by flight (`_pump_tls`); anything else (chunked bodies, not HTTP) is forwarded as
        raw bytes."""
        assert link.server is not None
        buf = self._recv(link, link.client)
        if buf[:1] == bytes([TLS_HANDSHAKE]):
            self._pump_tls(link, buf)
            return
        raw = False
        while True:
            if not raw:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    request, rest, raw = self._take_request(link, buf, end)
                    if request is not None:
                        buf = rest
                        if not self._forward_request(link, request):
                            return
                        continue
                elif len(buf) > MAX_HEAD:
                    raw = True
            if raw and buf:
                if not self._send(link, link.server, buf):
                    return
                buf = b""
            data = self._recv(link, link.client)
            if not data:
                if buf and not self._send(link, link.server, buf):
                    return
                with contextlib.suppress(OSError):
                    link.server.shutdown(socket.SHUT_WR)
                return
            buf += data

    def _pump_tls(self, link: Link, data: bytes) -> None:
        """client -> server under TLS, unread: each flight of the client (its bytes after the server spoke, or the
        first) is one request of the connection's sender, delayed or cut like one."""
        assert link.server is not None
        answered_at = -1  # link.down_bytes when the client's current flight began
        while True:
            if link.down_bytes != answered_at:
                answered_at = link.down_bytes
                if not self._forward_request(link, data):
                    return
            elif not self._send(link, link.server, data):
                return
            data = self._recv(link, link.client)
            if not data:
                with contextlib.suppress(OSError):
                    link.server.shutdown(socket.SHUT_WR)
                return

    def _take_request(self, link: Link, buf: bytes, end: int) -> tuple[bytes | None, bytes, bool]:
        """Split one complete request off `buf`: (request, or None while incomplete; the rest; raw from now on)."""
        headers: dict[bytes, bytes] = {}
        for line in buf[:end].split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        link.label = headers.get(SENDER_HEADER, b"").decode("latin-1")
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = -1
        if headers.get(b"transfer-encoding", b"identity").lower() != b"identity" or length < 0:
            return buf, b"", True  # forward what came (delay and cut still apply), the rest raw
        total = end + 4 + length
        if len(buf) < total:
            return None, buf, False
        return buf[:total], buf[total:], False

    def _forward_request(self, link: Link, request: bytes) -> bool:
        self._identify(link)  # a connection not labelled at accept is looked up again
        sender = link.label
        with self._lock:
            self.requests_seen[sender] = self.requests_seen.get(sender, 0) + 1
            cut = sender in self._cut_senders
            delay = self._delays.get(sender, 0.0)
            if sender in self._capturing:
                self.captured.append(request)
            gate = self._gates.get(sender)
            self._arrivals.notify_all()
        if cut:
            link.close()
            return False
        if delay and link.closed.wait(delay):
            return False
        if gate is not None and (gate[0] is None or gate[0](request)):
            with self._lock:
                self.held[sender] = self.held.get(sender, 0) + 1
                self._arrivals.notify_all()
            while not gate[1].wait(0.05):
                if link.closed.is_set():
                    return False
        return self._send(link, link.server, request) if link.server is not None else False


def request_body(request: bytes) -> bytes:
    """The body of a raw HTTP request (`Proxy.captured`)."""
    _, sep, body = request.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("not an HTTP request: no end of headers")
    return body


def message_kind(request: bytes) -> str:
    """The kind of the peer message a raw plain-HTTP request carries (`propagate`, `finish`, …: the envelope's
    `kind`, peer/dejima/messages.py); "" when it carries none (not JSON, not an envelope, a TLS flight)."""
    with contextlib.suppress(ValueError):
        envelope = json.loads(request_body(request))
        if isinstance(envelope, dict) and isinstance(envelope.get("kind"), str):
            return str(envelope["kind"])
    return ""


def settle(peer_url: str, headers: dict[str, str], verify: str | bool = True) -> None:
    """Let a peer finish the transactions prepared there (any client statement waits for them first:
    `Coordinator.settle`), before the database is read or changed behind its back; `headers`: its API token (a kit
    network's `auth_headers(name)`), `verify`: what its certificate is verified against (`LocalNetwork.verify`).
    Best effort: a peer that is down or stopped is not waited for."""
    with contextlib.suppress(requests.RequestException):
        requests.post(peer_url + "/api/v1/query", json={"sql": "SELECT 1"}, headers=headers, timeout=2, verify=verify)


def empty_base_tables(conninfo: str) -> None:
    """Empty every base table of one peer database directly (no gxid: nothing is captured or propagated)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
        for (table,) in tables:
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))


# ---- a cluster of the shipped example, peer-to-peer traffic through proxies ------------------------------------
FAST_ENV = {
    "DEJIMA_DISCOVERY_INTERVAL": "0.2",
    "DEJIMA_DISCOVERY_MAX_BACKOFF": "1",
    "DEJIMA_RECOVERY_INTERVAL": "0.5",
}


class ProxiedCluster:
    """The shipped example (government, bank, insurance) on loopback; with `proxied`, every peer sits behind its
    own `Proxy` for peer-to-peer traffic. `env` applies to every peer, `peer_env[name]` to one peer; `tls` False
    runs it on plain HTTP."""

    def __init__(
        self,
        pg_server: PgServer,
        state_dir: Path,
        env: dict[str, str] | None = None,
        peer_env: dict[str, dict[str, str]] | None = None,
        proxied: bool = True,
        tls: bool = True,
    ) -> None:
        prefix = f"f{uuid.uuid4().hex[:8]}_"
        specs = example_specs(base_port=0, prefix=prefix, tls=tls)
        self.proxies: dict[str, Proxy] = {}
        if proxied:
            for spec in specs:
                # the peer's own listener for peer messages (where its DEJIMA_URL would point without the proxy)
                target = spec.message_port or spec.port
                proxy = Proxy(target, name=f"proxy-{spec.name}", scheme=spec.scheme)
                proxy.who = self.sender
                self.proxies[spec.name] = proxy.start()
        for spec in specs:
            spec.env.update(FAST_ENV)
            spec.env.update(env or {})
            spec.env.update((peer_env or {}).get(spec.name, {}))
            if proxied:
                spec.env["DEJIMA_URL"] = self.proxies[spec.name].url
                spec.env["DEJIMA_SEEDS"] = ",".join(self.proxies[o.name].url for o in specs if o.name != spec.name)
        self.net = LocalNetwork(pg_server, state_dir, specs)
        self.server = pg_server

    def sender(self, address: Address, proxy: Address) -> str:
        """The name of the peer whose process opened the connection from `address` to a proxy at `proxy` (a proxy's
        `who`), "" when none of the cluster's peers did."""
        pids = {p: name for name, spec in self.net.specs.items() if spec.pid for p in process_tree(spec.pid)}
        owner = socket_owner((address[0], address[1]), (proxy[0], proxy[1]), pids)
        return pids.get(owner, "") if owner is not None else ""

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ProxiedCluster:
        """Start every peer; wait until they are healthy and their groups formed (the logs are in the error)."""
        try:
            self.net.start_all()
            self.net.wait_ready(timeout=timeout)
            self.check_routing()
        except (NetworkError, AssertionError, requests.RequestException) as exc:
            raise NetworkError(f"the network did not start: {exc}\n{self.status_dump()}\n{self.logs()}") from exc
        return self

    def status_dump(self) -> str:
        """What each running peer knows (groups and peers), for failure messages."""
        lines = []
        for name in self.net.specs:
            try:
                st = self.net.get(name, "/api/v1/status", timeout=2)
            except (requests.RequestException, ValueError) as exc:
                lines.append(f"{name}: no status ({exc})")
                continue
            peers = [(p["name"], p["url"], p["status"], p["views"]) for p in st.get("peers", [])]
            lines.append(f"{name}: groups {st.get('groups')} peers {peers}")
        return "\n".join(lines)

    def check_routing(self) -> None:
        """Every peer knows every other peer by its proxy URL (so messages really pass the proxies)."""
        if not self.proxies:
            return
        for name in self.net.specs:
            status = self.net.get(name, "/api/v1/status")
            urls = {p["name"]: p["url"] for p in status["peers"]}
            expected = {o: self.proxies[o].url for o in self.net.specs if o != name}
            assert urls == expected, f"{name} reaches its peers at {urls}, not through the proxies {expected}"

    def close(self) -> None:
        try:
            for proxy in self.proxies.values():  # first: open keep-alive links would slow the peers' shutdown
                proxy.stop()
            self.net.stop_all()
        finally:
            for spec in self.net.specs.values():
                with contextlib.suppress(Exception):
                    self.server.drop_database(spec.database)

    def restart(
        self, name: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 15.0
    ) -> None:
        """Kill a peer (if it runs), change its settings, start it again and wait until it answers (a peer starts
        in 1-2 s; NetworkError after `timeout`)."""
        spec = self.net.specs[name]
        self.net.kill(name)
        for key in drop:
            spec.env.pop(key, None)
        spec.env.update(env or {})
        self.net.start(name)
        self.net.wait_healthy(name, timeout=timeout)

    def logs(self, lines: int = 120) -> str:
        return "\n".join(f"----- log of peer {name} -----\n{self.net.tail(name, lines)}" for name in self.net.specs)

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def urls(self) -> dict[str, str]:
        return {name: spec.url for name, spec in self.net.specs.items()}

    def exec(self, peer: str, statements: str | list[str], timeout: float = 30.0) -> tuple[int, Any]:
        return self.net.exec(peer, statements, timeout=timeout)

    def rows(self, peer: str, table: str, order: tuple[str, ...] = ("first_name", "last_name")) -> list[dict[str, Any]]:
        """Base-table rows read straight from the peer's database (works while the peer service is down); values as
        text (None for NULL), in `order`. A peer that is up is asked first to let the transactions prepared there
        finish (any client statement does: `Coordinator.settle`), as a client of the peer would see them: with
        DEJIMA_COMMIT_WAIT=decision a write is answered before its COMMIT PREPARED reached the participants."""
        query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, order))
        )
        settle(self.net.specs[peer].url, self.net.auth_headers(peer), self.net.verify)
        with psycopg.connect(self.server.url(self.net.specs[peer].database), autocommit=True) as conn:
            cur = conn.execute(query)
            cols = [d.name for d in cur.description or []]
            return [dict(zip(cols, (None if v is None else str(v) for v in r), strict=True)) for r in cur]

    def prepared(self) -> list[str]:
        """gids of prepared transactions of this cluster's databases (read from PostgreSQL directly)."""
        dbs = [s.database for s in self.net.specs.values()]
        with psycopg.connect(self.server.url("postgres"), autocommit=True) as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = ANY(%s) ORDER BY gid", (dbs,)
                ).fetchall()
            ]

    def open_transactions(self) -> dict[str, int]:
        return {name: int(self.net.get(name, "/api/v1/status")["open_transactions"]) for name in self.net.specs}

    def check(self) -> dict[str, Any]:
        return check_network(self.urls, {name: self.net.auth_headers(name) for name in self.urls}, self.net.verify)

    def quiet(self) -> bool:
        """No open global transaction at any peer and no prepared transaction left."""
        try:
            return not any(self.open_transactions().values()) and not self.prepared()
        except (requests.RequestException, NetworkError):
            return False

    def reset(self) -> None:
        """Empty every base table directly (no gxid: nothing is captured or propagated), once the peers have
        finished what they prepared (a COMMIT PREPARED landing afterwards would bring a row back)."""
        for spec in self.net.specs.values():
            settle(spec.url, self.net.auth_headers(spec.name), self.net.verify)
        for spec in self.net.specs.values():
            empty_base_tables(self.server.url(spec.database))


@contextlib.contextmanager
def proxied_cluster(
    pg_server: PgServer,
    state_dir: Path,
    env: dict[str, str] | None = None,
    peer_env: dict[str, dict[str, str]] | None = None,
    proxied: bool = True,
    tls: bool = True,
) -> Iterator[ProxiedCluster]:
    cluster = ProxiedCluster(pg_server, state_dir, env, peer_env, proxied, tls)
    try:
        yield cluster.start()
    finally:
        cluster.close()
