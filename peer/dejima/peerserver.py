"""The lean listeners beside gunicorn, without Django: `POST /peer/v1/message` for other peers
(DEJIMA_MESSAGE_BIND), and `POST /api/v1/exec` and `/api/v1/query` for clients (DEJIMA_API_BIND).

Why. Every global transaction costs its origin two or three sequential calls per participant (propagate, prepare,
finish); a call answered by gunicorn + Django + DRF spent about 1.5 ms outside the handler here (parsing, the
gthread worker's hand-offs between its poller and pool threads, the framework). Served from here, each round is
about 1.1 ms shorter (docs/performance.md; an empty round trip to such a server: ≈ 0.05 ms, its "Floors").
A client's write pays the same once per request: under closed-loop load that was a fifth of all the CPU per
transaction (docs/performance.md).

What. One thread accepts; every connection gets its own thread, which reads its requests one after the other
(HTTP/1.1 keep-alive, TCP_NODELAY) and answers each with its route: for peer messages `handle_message`, for the
client API `peer.dejima.api.run_exec` / `run_query` — the same functions the Django endpoints run: the same checks,
statuses and answers. Only those paths exist on a listener (anything else: 404; another method: 405). A request
must come whole within `read_timeout` once it started; an idle connection is closed after `idle_timeout`; at most
`max_connections` connections are served at once (one more is answered 503 and closed); a body larger than the
limit is answered 413 without being read, a chunked one 411; every answer is JSON. A request refused before its body
was read (413, 411, a guard's refusal of a body beyond the limit) is answered, then what the client still sends is
read and dropped (at most `LINGER_BYTES`, within `read_timeout`) before the connection is closed: a client writes its
whole body before it reads, and over TLS a connection closed under its writes is an error to it, not the answer.

Who may ask. A listener may have a `guard`: it sees each request's method, path, remote address and headers once
they are read, before the body is, and may refuse it. The client listener's guard checks the API token
(`peer.dejima.tokens.authorize`, as the REST API does, with the same statuses and bodies: 401, 403): a request
without a valid token is answered before its body is read or parsed, and its body is then skipped (or, beyond the
limit, the connection closed). The message listener has none: every peer message is signed and checked.

TLS. With a `tls` context (the peer's TLS settings, peer.dejima.tls) a listener speaks HTTPS only: each connection's
thread runs the handshake, bounded by `read_timeout`, before it reads a request (the accepting thread never does: a
caller that stalls its handshake holds only its own thread); a handshake that fails (a caller with no certificate of
the CA when the message listener requires one, a plain-text caller, a stall) closes the connection and is counted.
The context is the listener's for its whole life, so that a caller coming back with a session ticket is resumed
without a new certificate exchange (`stats()`: connections, handshakes full, resumed and failed).

Started by the peer runtime when DEJIMA_MESSAGE_BIND / DEJIMA_API_BIND is set (docs/settings.md). DEJIMA_URL, the
address a peer advertises to the others, then names the message listener, so their messages come here; the client
listener is never advertised (bind it where only this organization's clients reach; it needs a token like the REST
API). gunicorn still serves every path (seeds may name either) and everything else.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, BinaryIO

from peer.dejima import jsonvalues
from peer.dejima.auth import read_envelope, wire
from peer.dejima.jsonvalues import TOO_DEEP_TO_HANDLE, TooDeep
from peer.dejima.tls import HandshakeStats

log = logging.getLogger(__name__)

MESSAGE_PATH = "/peer/v1/message"
MAX_LINE = 8192  # bytes of a request line or of one header line
MAX_HEADERS = 100
LINGER_BYTES = 64 * 1024 * 1024  # at most this much of a refused body is read and dropped before the close

# (the decoded JSON body, the client's address) -> (HTTP status, JSON answer): a peer message's handler
Handler = Callable[[Any, str], tuple[int, dict[str, Any]]]
# (the decoded JSON body, the client's address) -> (HTTP status, the JSON answer's bytes, extra headers)
Route = Callable[[Any, str], tuple[int, bytes, dict[str, str]]]
# (method, path, the client's address, the request's headers by lower-case name) -> None to go on, or the refusal
# (HTTP status, the JSON answer's bytes, extra headers), answered before the body is read
Guard = Callable[[str, str, str, Mapping[str, str]], tuple[int, bytes, dict[str, str]] | None]


def message_routes(handler: Handler) -> dict[str, Route]:
    """The routes of the listener for peer messages: `POST /peer/v1/message`, answered by `handler`."""

    def route(envelope: Any, remote: str) -> tuple[int, bytes, dict[str, str]]:
        status, answer = handler(envelope, remote)
        return status, wire(answer), {}

    return {MESSAGE_PATH: route}


class _Refused(Exception):
    """A request this server answers with an error and then closes the connection; `unread`: bytes of its body the
    client may still be sending (dropped before the close)."""

    def __init__(self, status: int, message: str, unread: int = 0) -> None:
        self.status = status
        self.unread = unread
        super().__init__(message)


def _error_body(message: str) -> dict[str, Any]:
    return {"status": "error", "kind": "bad_request", "error": message}


class PeerServer:
    def __init__(
        self,
        routes: Mapping[str, Route],
        host: str,
        port: int,
        max_body_bytes: int,
        read_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_connections: int = 256,
        name: str = "peer",
        guard: Guard | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.guard = guard
        self.tls = tls
        self.handshakes = HandshakeStats()
        self.accepted = 0  # connections accepted
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.name = name
        self.slots = threading.BoundedSemaphore(max_connections)
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-message-accept", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop accepting and close every connection (their threads end on the closed socket)."""
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self.thread is not None:
            self.thread.join(timeout=5)

    # ---- connections ----------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self.stopped.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            with self.lock:
                self.conns.add(conn)
                self.accepted += 1
            remote = str(addr[0])
            threading.Thread(
                target=self._serve, args=(conn, remote), name=f"{self.name}-message-{remote}", daemon=True
            ).start()

    def _refuse_busy(self, conn: socket.socket) -> None:
        if self.tls is not None:  # an answer would need a handshake, which the accepting thread never runs
            conn.close()
            return
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(self._response(503, _error_body("too many connections to this peer; try again"), close=True))
        conn.close()

    def _handshake(self, conn: socket.socket, remote: str) -> socket.socket | None:
        """The TLS handshake of a new connection, in its own thread, within `read_timeout`: the TLS socket (in
        `conns` in place of the plain one), or None when it failed (the connection is closed then)."""
        assert self.tls is not None
        conn.settimeout(self.read_timeout)
        try:
            secure = self.tls.wrap_socket(conn, server_side=True)
        except (OSError, ValueError) as exc:
            self.handshakes.refused()
            reason = getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or type(exc).__name__
            log.info("%s: refused a TLS handshake from %s: %s", self.name, remote, reason)
            with self.lock:
                self.conns.discard(conn)
            conn.close()
            return None
        self.handshakes.done(secure)
        with self.lock:
            self.conns.discard(conn)
            self.conns.add(secure)
        if self.stopped.is_set():  # closed while shaking hands: `close` saw only the plain socket
            with contextlib.suppress(OSError):
                secure.shutdown(socket.SHUT_RDWR)
        return secure

    def stats(self) -> dict[str, Any]:
        """Connections accepted and TLS handshakes (full, resumed, failed) since start."""
        with self.lock:
            accepted = self.accepted
        return {"connections": accepted, "handshakes": self.handshakes.snapshot()}

    def _serve(self, conn: socket.socket, remote: str) -> None:
        try:
            if self.tls is not None:
                secure = self._handshake(conn, remote)
                if secure is None:
                    return
                conn = secure
            reader = conn.makefile("rb")
            while not self.stopped.is_set():
                conn.settimeout(self.idle_timeout)
                try:
                    first = reader.readline(MAX_LINE + 1)
                except TimeoutError:
                    return  # idle too long
                if not first:
                    return  # the peer closed it
                conn.settimeout(self.read_timeout)
                try:
                    status, answer, headers, close, unread = self._one(first, reader, remote)
                except _Refused as exc:
                    status, answer, headers, close, unread = exc.status, _error_body(str(exc)), {}, True, exc.unread
                conn.sendall(self._response(status, answer, close, headers))
                if close:
                    self._linger(conn, reader, unread)
                    return
        except (OSError, ValueError):
            return  # reset, timed out mid-request, or closed by `close`
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()
            self.slots.release()

    # ---- one request ----------------------------------------------------------------------------------------
    def _linger(self, conn: socket.socket, reader: BinaryIO, unread: int) -> None:
        """Read and drop at most `unread` (and LINGER_BYTES) bytes the client still sends, within `read_timeout`."""
        left = min(unread, LINGER_BYTES)
        read = getattr(reader, "read1", reader.read)  # a BufferedReader: what has come, without waiting for more
        deadline = time.monotonic() + self.read_timeout
        with contextlib.suppress(OSError, ValueError):
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                conn.settimeout(remaining)
                chunk = read(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)

    def _one(
        self, first: bytes, reader: BinaryIO, remote: str
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str], bool, int]:
        """(status, answer, extra headers, close after it, bytes of the body left unread) for the request whose first
        line is `first`."""
        if len(first) > MAX_LINE or not first.endswith(b"\n"):
            raise _Refused(414 if len(first) > MAX_LINE else 400, "request line too long or cut")
        parts = first.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        headers = self._headers(reader)
        conn_header = headers.get("connection", "").lower()
        close = conn_header == "close" or (version == "HTTP/1.0" and conn_header != "keep-alive")
        path = target.split("?", 1)[0]
        if self.guard is not None and path in self.routes:
            try:
                refusal = self.guard(method, path, remote, headers)
            except Exception as exc:
                log.exception("the check of the request to %s from %s failed", path, remote)
                raise _Refused(500, f"{type(exc).__name__}: {exc}") from None
            if refusal is not None:
                unread = self._skip_body(headers, reader)
                return (*refusal, unread > 0 or close, unread)
        if "transfer-encoding" in headers:
            raise _Refused(
                411, "send the body with a Content-Length (chunked bodies are not taken here)", unread=LINGER_BYTES
            )
        raw_length = headers.get("content-length", "0").strip()
        if not (raw_length.isascii() and raw_length.isdigit()):  # str.isdigit() takes "²" too, int() does not
            raise _Refused(400, f"bad Content-Length {raw_length!r}")
        digits = raw_length.lstrip("0")
        if len(digits) > 18:  # no body is that long; int() would refuse 4,300 digits
            raise _Refused(
                413,
                f"Content-Length of {len(digits)} digits is over the limit of {self.max_body_bytes} bytes",
                unread=LINGER_BYTES,
            )
        length = int(digits or "0")
        if length > self.max_body_bytes:
            raise _Refused(
                413, f"body of {length} bytes is larger than the limit of {self.max_body_bytes} bytes", unread=length
            )
        body = reader.read(length) if length else b""
        if len(body) != length:
            raise ValueError("body cut short")  # the connection is gone: nothing to answer
        route = self.routes.get(path)
        if route is None:
            return 404, {"status": "error", "kind": "not_found", "error": f"no endpoint {path} here"}, {}, close, 0
        if method != "POST":
            answer = {"status": "error", "kind": "method_not_allowed", "error": f"{method} not allowed"}
            return 405, answer, {}, close, 0
        try:
            envelope = read_envelope(body)  # `jsonvalues.loads_request`, keeping a signed body's text as it came
        except TooDeep as exc:
            return 400, _error_body(str(exc)), {}, close, 0
        except ValueError as exc:  # UnicodeDecodeError among them
            return 400, _error_body(f"malformed JSON: {exc}"), {}, close, 0
        except RecursionError:  # not past the depth check; were it to, the request fails, not the thread
            return 400, _error_body(TOO_DEEP_TO_HANDLE), {}, close, 0
        try:
            status, encoded, headers = route(envelope, remote)
        except RecursionError:  # e.g. a query's deeply nested jsonb result: a 400 like a body too deep
            log.warning("the request to %s from %s nests too deeply to handle", path, remote)
            return 400, _error_body(TOO_DEEP_TO_HANDLE), {}, close, 0
        except Exception as exc:
            log.exception("the request to %s from %s failed", path, remote)
            answer = {"status": "error", "kind": "internal", "error": f"{type(exc).__name__}: {exc}"}
            return 500, answer, {}, close, 0
        return status, encoded, headers, close, 0

    def _skip_body(self, headers: Mapping[str, str], reader: BinaryIO) -> int:
        """Read past the body of a refused request (unparsed); or, when the connection must be closed instead (a
        chunked body, a bad Content-Length, or one beyond the limit), the bytes the client may still send (> 0)."""
        raw_length = headers.get("content-length", "0").strip()
        if "transfer-encoding" in headers or not (raw_length.isascii() and raw_length.isdigit()):
            return LINGER_BYTES
        digits = raw_length.lstrip("0")
        if len(digits) > 18:
            return LINGER_BYTES
        length = int(digits or "0")
        if length > self.max_body_bytes:
            return min(length, LINGER_BYTES)
        if len(reader.read(length)) != length:
            raise ValueError("body cut short")
        return 0

    @staticmethod
    def _headers(reader: BinaryIO) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = reader.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise _Refused(431, "header line too long")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise ValueError("headers cut short")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name.strip():
                raise _Refused(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        raise _Refused(431, f"more than {MAX_HEADERS} header lines")

    @staticmethod
    def _response(
        status: int, answer: dict[str, Any] | bytes, close: bool, headers: Mapping[str, str] | None = None
    ) -> bytes:
        body = answer if isinstance(answer, bytes) else jsonvalues.dumps(answer).encode()
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
        if status == 405:
            head.append("Allow: POST")
        head.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        if close:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
