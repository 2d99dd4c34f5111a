"""Closed-loop clients for the throughput and ycsb benchmarks: every client in one thread, on one event loop.

`closed_loop(targets, body, seconds, warmup_s, seed, headers)`: client c keeps one keep-alive HTTP/1.1 connection to
`targets[c]`, posts `body(c, rng, n)` (JSON) to /api/v1/exec with `headers[c]` (its API token), waits for the answer and
posts the next at once, for warmup_s + seconds. The clients share the machine with the peers they load: with a thread
per client and http.client, the bench process cost ≈ 0.5 ms of CPU per transaction (a tenth of the whole at 64 clients),
much of it parsing headers and handing the GIL between 64 threads. Here one thread waits on every socket at once
(`selectors`), writes each request as one prepared byte string, and reads an answer by its Content-Length (or chunked
framing).

https targets speak TLS (verified with the `context` given: the kit's CA, `LocalNetwork.client_context()`): the
handshake runs once per connection, blocking, when it connects; afterwards a readable socket may carry only TLS
records with no answer byte yet (a session ticket), so a TLS socket is read without blocking (`_Client.read`).

A request is never sent twice, but for one case, as `common.JsonClient` does: the server closed a kept-alive
connection before any byte of the answer (its keep-alive ran out) — the request goes once more on a new connection.
Every request has a deadline (`REQUEST_TIMEOUT_S`); one that passes it stops the run (`BenchError`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import selectors
import socket
import ssl
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from peer.bench.common import BenchError, latency_summary

ABORT_STATUSES = {409: "conflict", 503: "unavailable", 504: "timeout"}
REQUEST_TIMEOUT_S = 60.0  # an answer later than this is a hung run
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
MAX_ERRORS = 20  # unexpected answers before the run stops


@dataclasses.dataclass
class Outcome:
    done_at: float
    status: int
    ms: float
    phases: dict[str, float] | None = None  # the origin's timing of a committed write (its answer's `phases`)


def phase_medians(answers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The median of each phase (local_ms, propagate_ms, …) over the answers that report it."""
    values: dict[str, list[float]] = {}
    for phases in answers:
        for name, v in phases.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                values.setdefault(name, []).append(float(v))
    return {name: round(statistics.median(vs), 3) for name, vs in sorted(values.items())}


def parse_answer(buf: bytes | bytearray) -> tuple[int, bytes, bool, int] | None:
    """The HTTP/1.x answer at the start of `buf`: (status, body, whether the server closes the connection, bytes it
    took), or None while it is not complete. ValueError when it is not a well-formed answer."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise ValueError(f"no end of the headers in {len(buf)} bytes")
        return None
    status_line, *lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:100]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"a malformed header line: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        pos = start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)  # ValueError when it is not hexadecimal
            data = line_end + 2
            if size == 0:  # the last chunk, then the empty line that ends the (absent) trailers
                if len(buf) < data + 2:
                    return None
                if buf[data : data + 2] != b"\r\n":
                    raise ValueError("trailers after a chunked body are not read here")
                return int(code), bytes(body), close, data + 2
            if len(buf) < data + size + 2:
                return None
            body += buf[data : data + size]
            pos = data + size + 2
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        raise ValueError(f"an answer without a Content-Length or chunked body: {status_line!r}")
    if len(buf) < start + int(length):
        return None
    return int(code), bytes(buf[start : start + int(length)]), close, start + int(length)


class _Client:
    """One closed-loop client: its connection, its request in flight and what has come of it so far."""

    def __init__(
        self,
        c: int,
        target: str,
        seed: int,
        headers: Mapping[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(target)
        self.c = c
        https = parts.scheme == "https"
        self.address = (parts.hostname or "127.0.0.1", parts.port or (443 if https else 80))
        self.tls = (context or ssl.create_default_context()) if https else None
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.head = f"POST /api/v1/exec HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n{extra}"
        self.rng = random.Random(seed * 1000 + c)  # noqa: S311 - key choice, not security
        self.n = 0
        self.sock: socket.socket | None = None
        self.reused = False  # the connection answered a request before
        self.request = b""
        self.sent_at = 0.0
        self.deadline = 0.0
        self.buf = bytearray()
        self.resent = False
        self.outcomes: list[Outcome] = []

    def connect(self, sel: selectors.BaseSelector) -> None:
        self.close(sel)
        sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:  # the handshake, within the connect timeout
            sock = self.tls.wrap_socket(sock, server_hostname=self.address[0])
        sock.settimeout(REQUEST_TIMEOUT_S)  # for sendall; answers are read only when the selector says readable
        sel.register(sock, selectors.EVENT_READ, self)
        self.sock, self.reused = sock, False
        self.buf.clear()

    def send(self, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.request = f"{self.head}Content-Length: {len(data)}\r\n\r\n".encode() + data
        self.n += 1
        self.resent = False
        self._write()

    def resend(self, sel: selectors.BaseSelector) -> None:
        """The server closed the kept-alive connection before answering: the same request, once, anew."""
        self.connect(sel)
        self.resent = True
        self._write()

    def _write(self) -> None:
        assert self.sock is not None
        self.sent_at = time.perf_counter()
        self.deadline = self.sent_at + REQUEST_TIMEOUT_S
        self.sock.sendall(self.request)

    def read(self) -> bytes | None:
        """What the readable socket has: bytes, b"" at its end, None when a TLS socket had records but no answer byte
        yet (read without blocking, every decrypted byte taken: the selector sees only the socket)."""
        assert self.sock is not None
        if not isinstance(self.sock, ssl.SSLSocket):
            return self.sock.recv(65536)
        self.sock.setblocking(False)
        chunks: list[bytes] = []
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except ssl.SSLWantReadError:
                    break
                if not data:
                    if not chunks:
                        return b""
                    break
                chunks.append(data)
        finally:
            self.sock.settimeout(REQUEST_TIMEOUT_S)  # blocking again (with the deadline) for sendall
        return b"".join(chunks) if chunks else None

    def close(self, sel: selectors.BaseSelector) -> None:
        if self.sock is not None:
            sel.unregister(self.sock)
            self.sock.close()
            self.sock = None


def closed_loop(
    targets: Sequence[str],
    body: Callable[[int, random.Random, int], Any],
    seconds: float,
    warmup_s: float,
    seed: int,
    headers: Sequence[Mapping[str, str]] | None = None,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Closed-loop clients (module docstring). Counts what finished inside the measured window: committed (200
    committed), aborted (409 conflict, 503, 504; retryable); any other answer is a broken run (BenchError).
    Returns the window's figures and `client_committed` (every commit the clients saw, window or not). `headers[c]`:
    the extra headers of client c's requests (the API token of `targets[c]`); `context`: what https targets are
    verified with (None: the system's CAs)."""
    if headers is not None and len(headers) != len(targets):
        raise BenchError(f"{len(targets)} targets but {len(headers)} sets of headers")
    clients = [_Client(c, target, seed, headers[c] if headers else None, context) for c, target in enumerate(targets)]
    errors: list[str] = []
    sel = selectors.DefaultSelector()
    try:
        for client in clients:
            client.connect(sel)
        t_start = time.perf_counter()
        end = t_start + warmup_s + seconds
        for client in clients:
            client.send(body(client.c, client.rng, client.n))
        running = {client.c: client for client in clients}
        while running and len(errors) <= MAX_ERRORS:
            now = time.perf_counter()
            late = [c for c in running.values() if now > c.deadline]
            if late:
                hung = targets[late[0].c]
                raise BenchError(f"{len(clients)} clients: a client did not finish (a request hung at {hung})")
            wait = min(c.deadline for c in running.values()) - now
            for key, _ in sel.select(max(0.0, min(wait, 1.0))):
                client = key.data
                assert isinstance(client, _Client) and client.sock is not None
                try:
                    chunk = client.read()
                except ConnectionResetError:
                    chunk = b""  # as an EOF: the server dropped the connection
                except OSError as exc:
                    errors.append(f"{targets[client.c]}: {exc}")
                    client.close(sel)
                    running.pop(client.c)
                    continue
                if chunk is None:
                    continue  # TLS records without an answer byte yet
                if not chunk:
                    if not client.buf and client.reused and not client.resent:
                        client.resend(sel)
                    else:
                        errors.append(f"{targets[client.c]}: the peer closed the connection without an answer")
                        client.close(sel)
                        running.pop(client.c)
                    continue
                client.buf += chunk
                try:
                    parsed = parse_answer(client.buf)
                except ValueError as exc:
                    errors.append(f"{targets[client.c]}: {exc}")
                    client.close(sel)
                    running.pop(client.c)
                    continue
                if parsed is None:
                    continue
                t1 = time.perf_counter()
                status, raw, closing, used = parsed
                del client.buf[:used]
                client.reused = True
                _record(client, status, raw, t1, errors, targets[client.c])
                if closing:
                    client.connect(sel)
                if t1 < end:
                    client.send(body(client.c, client.rng, client.n))
                else:
                    client.close(sel)
                    running.pop(client.c)
    except OSError as exc:
        errors.append(f"{exc}")
    finally:
        for client in clients:
            client.close(sel)
        sel.close()
    if errors:
        raise BenchError(f"{len(clients)} clients: unexpected answers: {'; '.join(errors[:5])}")
    window_start, window_end = t_start + warmup_s, t_start + warmup_s + seconds
    every = [o for client in clients for o in client.outcomes]
    counted = [o for o in every if window_start <= o.done_at <= window_end]
    committed = [o for o in counted if o.status == 200]
    aborted = [o for o in counted if o.status != 200]
    if not every:
        raise BenchError(f"{len(clients)} clients: no transaction finished at all")
    return {
        "clients": len(clients),
        "seconds": seconds,
        "committed": len(committed),
        "aborted": len(aborted),
        "aborted_by_kind": {kind: sum(1 for o in aborted if o.status == s) for s, kind in ABORT_STATUSES.items()},
        "txn_per_s": round(len(committed) / seconds, 1),
        "abort_rate": round(len(aborted) / len(counted), 4) if counted else None,
        "finished_outside_window": len(every) - len(counted),
        "latency": latency_summary([o.ms for o in committed]) if committed else None,
        "phases_median_ms": phase_medians([o.phases for o in committed if o.phases]),
        "aborted_latency_median_ms": round(statistics.median(o.ms for o in aborted), 3) if aborted else None,
        "client_committed": sum(1 for o in every if o.status == 200),
    }


def _record(client: _Client, status: int, raw: bytes, t1: float, errors: list[str], target: str) -> None:
    """What an answer says: a commit, an abort (retryable), or an error of the run."""
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = {"error": raw[:300].decode(errors="replace")}
    ms = (t1 - client.sent_at) * 1000
    if status == 200 and isinstance(answer, dict) and answer.get("status") == "committed":
        phases = answer.get("phases")
        client.outcomes.append(Outcome(t1, 200, ms, phases if isinstance(phases, dict) else None))
    elif status in ABORT_STATUSES:
        client.outcomes.append(Outcome(t1, status, ms))
    else:
        errors.append(f"{target}: {status} {answer}")
