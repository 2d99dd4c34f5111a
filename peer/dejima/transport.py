"""Calls to other peers: every call has a timeout, runs in parallel when there are several, and turns failure into
a value (`CallResult`), never an exception. Keep-alive connections are pooled per peer address and Nagle is off
(TCP_NODELAY): `Connections`, a small HTTP/1.1 client on plain sockets. A peer's messages are one POST with a JSON
body and a JSON answer; the standard library's http.client (itself half the CPU of urllib3 and a sixth of
`requests` per call, docs/performance.md "Floors") spent ≈ 0.2 ms of CPU per call more than this on them, its
header parsing going through the email package (docs/decisions.md "Peer calls on plain sockets"); the origin makes
several calls per global transaction. An idle connection the peer has closed (its keep-alive ran out, or it
restarted) is dropped before reuse, as urllib3 does; a request is never sent twice: a failure is the call's result.

Authenticated peers (`peer.dejima.auth`): every request is signed by this peer (`sign`), and an answer counts only
when it is signed by a trusted peer and bound to the request (`verify_answer`); otherwise the call fails (refused).

TLS (`peer.dejima.tls`, docs/decisions.md "TLS between peers"): with the peer's TLS settings every call is HTTPS, the
peer's certificate verified against the CA and the host of its URL, and a plain `http://` URL is refused (a peer
with TLS never speaks clear text). The handshake is paid once per connection, and connections are kept alive; when a
new one is needed to a peer (its keep-alive ran out, it restarted, several calls at once), it resumes the TLS session
of the previous one (the session ticket it got, kept per peer address): no certificate exchange then. Counters of
connections, answered requests and handshakes (full, resumed, failed): `Connections.snapshot()`, in /api/v1/status.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from peer.dejima.auth import Authenticator, AuthError, authorize, read_envelope, signature_id, wire
from peer.dejima.messages import Message, MessageError, parse
from peer.dejima.tls import HandshakeStats, TlsSettings, client_context

log = logging.getLogger(__name__)
MESSAGE_PATH = "/peer/v1/message"
CONNECT_TIMEOUT = 3.0  # seconds, at most (less when the call's own timeout is shorter)
MAX_IDLE_PER_PEER = 16  # idle keep-alive connections kept per peer address
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_LINE = 65536  # bytes of the status line or of one header line of an answer
MAX_HEADERS = 100

Address = tuple[str, str, int]  # (scheme, host, port)


class CallTimeout(Exception):
    """The peer did not answer in time."""


class PlainRefused(ValueError):
    """A plain http:// URL, while this peer speaks TLS only."""


class BadAnswer(ConnectionError):
    """The peer's answer is not HTTP/1.x as this client reads it (cut short, malformed, too large); the connection
    is closed. An OSError, like every other way a call can fail on the wire."""


class _Conn:
    """One keep-alive connection: the socket, and a buffered reader on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.answered = 0  # answers read on it (its TLS session is kept after the first one)

    def dropped(self) -> bool:
        """Whether the idle connection is unusable: a readable socket means the peer's EOF, or bytes nobody asked
        for. (Bytes a peer sent past a complete answer that already sit in `reader` are not seen here; the next
        answer then reads wrong and the call fails as BadAnswer, never sent twice.)"""
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def _line(self) -> bytes:
        line = self.reader.readline(MAX_LINE + 1)
        if not line:
            raise BadAnswer("the peer closed the connection before it answered")
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise BadAnswer("an answer line is too long or cut short")
        return line

    def answer(self) -> tuple[int, bytes, bool]:
        """Read one answer: (status, body, whether the connection must be closed after it)."""
        while True:
            parts = self._line().split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise BadAnswer(f"not an HTTP/1.x status line: {b' '.join(parts)[:80]!r}")
            status = int(parts[1])
            headers = self._headers()
            if status >= 200:
                break  # an interim answer (1xx) is followed by the real one
        connection = headers.get(b"connection", b"").lower()
        close = connection == b"close" or (parts[0] == b"HTTP/1.0" and connection != b"keep-alive")
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return status, self._chunked(), close
        length = headers.get(b"content-length")
        if length is None:
            return status, self._read(MAX_ANSWER_BYTES, to_eof=True), True
        if not length.strip().isdigit():
            raise BadAnswer(f"bad Content-Length {length[:40]!r}")
        size = int(length)
        if size > MAX_ANSWER_BYTES:
            raise BadAnswer(f"an answer of {size} bytes is larger than {MAX_ANSWER_BYTES}")
        return status, self._read(size), close

    def _headers(self) -> dict[bytes, bytes]:
        headers: dict[bytes, bytes] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return headers
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadAnswer("a malformed header line")
            headers[name.strip().lower()] = value.strip()
        raise BadAnswer(f"more than {MAX_HEADERS} header lines")

    def _read(self, size: int, to_eof: bool = False) -> bytes:
        """`size` bytes; with `to_eof`, everything up to the peer's close, at most `size`."""
        data = self.reader.read(size + 1 if to_eof else size)
        if to_eof and len(data) > size:
            raise BadAnswer(f"an answer larger than {size} bytes")
        if not to_eof and len(data) != size:
            raise BadAnswer("the answer was cut short")
        return data

    def _chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadAnswer(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                self._headers()  # the trailer, up to its blank line
                return b"".join(chunks)
            total += size
            if total > MAX_ANSWER_BYTES:
                raise BadAnswer(f"an answer larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(self._read(size))
            if self._line() not in (b"\r\n", b"\n"):
                raise BadAnswer("a chunk does not end where its size says")


class Connections:
    """Keep-alive HTTP/1.1 connections to other peers, pooled per (scheme, host, port), TCP_NODELAY on each.

    `post` answers (status, body) or raises CallTimeout / OSError (BadAnswer among them) / PlainRefused. Thread-safe:
    a connection is used by one call at a time (taken from the idle list, given back after a complete answer). The
    timeout bounds each wait on the peer (connecting, the TLS handshake, sending, every read), as a socket timeout
    does. `tls`: the context of https calls (the peer's CA and certificate; None: the system's CAs); `plain`: whether
    http:// URLs may be called at all."""

    def __init__(
        self,
        headers: dict[str, str],
        max_idle: int = MAX_IDLE_PER_PEER,
        tls: ssl.SSLContext | None = None,
        plain: bool = True,
    ) -> None:
        self.head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.max_idle = max_idle
        self.idle: dict[Address, list[_Conn]] = {}
        self.lock = threading.Lock()
        self.closed = False
        self._tls = tls
        self.plain = plain
        self.sessions: dict[Address, ssl.SSLSession] = {}  # the last resumable TLS session per peer address
        self.handshakes = HandshakeStats()
        self.opened = 0  # connections made
        self.answered = 0  # answers read

    def _address(self, url: str) -> Address:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.scheme == "http" and not self.plain:
            raise PlainRefused(f"{url} is plain http: this peer speaks TLS only (DEJIMA_TLS_CERT_FILE)")
        return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    def _new(self, address: Address, timeout: float) -> _Conn:
        scheme, host, port = address
        sock = socket.create_connection((host, port), timeout=min(timeout, CONNECT_TIMEOUT))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                with self.lock:
                    session = self.sessions.get(address)
                try:  # the handshake, bounded by the connect timeout; the certificate and the host checked
                    sock = self._tls.wrap_socket(sock, server_hostname=host, session=session)
                except (OSError, ValueError):
                    self.handshakes.refused()
                    raise
                assert isinstance(sock, ssl.SSLSocket)
                self.handshakes.done(sock)
        except BaseException:
            sock.close()
            raise
        with self.lock:
            self.opened += 1
        return _Conn(sock)

    def _take(self, address: Address) -> _Conn | None:
        """An idle connection to `address` that the peer has not closed, or None."""
        while True:
            with self.lock:
                idle = self.idle.get(address)
                conn = idle.pop() if idle else None
            if conn is None or not conn.dropped():
                return conn
            conn.close()

    def _give_back(self, address: Address, conn: _Conn, close: bool) -> None:
        """After a complete answer: keep the connection (unless `close`) and, after its first answer (a TLS 1.3
        server sends its session tickets before it), its TLS session for the next new connection to `address`."""
        session = None
        if conn.answered == 0 and isinstance(conn.sock, ssl.SSLSocket):
            session = conn.sock.session
            if session is not None and not session.has_ticket and conn.sock.version() != "TLSv1.2":
                session = None  # TLS 1.3 without a ticket yet: not resumable
        conn.answered += 1
        with self.lock:
            self.answered += 1
            if session is not None:
                self.sessions[address] = session
            if not close and not self.closed and len(idle := self.idle.setdefault(address, [])) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def post(self, url: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        address = self._address(url)
        scheme, host, port = address
        name = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed as in the URL
        host_header = name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n{self.head}Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        conn = self._take(address)
        try:
            if conn is None:
                conn = self._new(address, timeout)
            conn.sock.settimeout(timeout)
            conn.sock.sendall(request)
            status, data, close = conn.answer()
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, TimeoutError):
                raise CallTimeout(f"no answer within {timeout:.1f}s") from None
            raise
        self._give_back(address, conn, close)
        return status, data

    def snapshot(self) -> dict[str, Any]:
        """Connections made, answers read and TLS handshakes (full, resumed, failed) since start."""
        with self.lock:
            counts = {"connections": self.opened, "requests": self.answered}
        return {**counts, "handshakes": self.handshakes.snapshot()}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns = [c for idle in self.idle.values() for c in idle]
            self.idle.clear()
        for conn in conns:
            conn.close()


@dataclass(frozen=True)
class CallResult:
    url: str
    message: Message | None  # the typed answer, when there is one
    status: int = 0  # HTTP status, 0 when no answer arrived
    error: str = ""
    error_kind: str = ""  # unreachable | timeout | refused | bad_request | internal

    @property
    def ok(self) -> bool:
        return self.message is not None and not self.error


def sign(auth: Authenticator, envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope of a request, signed by this peer."""
    return auth.sign(envelope)


def verify_answer(auth: Authenticator, envelope: Any, request_id: str, answer: Message) -> None:
    """An answer counts only when signed by a trusted peer, bound to our request, from the peer it names."""
    if not isinstance(envelope, dict):
        raise AuthError(401, "the answer is not a signed envelope")
    authorize(auth.verify_reply(envelope, request_id), answer)


class _Signed:
    """A request's signed envelope and its bytes, made once by whichever call needs them first."""

    def __init__(self, auth: Authenticator, message: Message) -> None:
        self.auth = auth
        self.message = message
        self.lock = threading.Lock()
        self.value: tuple[dict[str, Any], bytes] | None = None

    def get(self) -> tuple[dict[str, Any], bytes]:
        with self.lock:
            if self.value is None:
                envelope = sign(self.auth, self.message.to_json())
                self.value = envelope, wire(envelope)
            return self.value


class Transport:
    def __init__(
        self, peer_name: str, auth: Authenticator, max_parallel: int = 64, tls: TlsSettings | None = None
    ) -> None:
        """`tls`: the peer's TLS settings; with them every call is HTTPS, verified against their CA, presenting the
        peer's certificate, and a plain http:// URL is refused."""
        self.peer_name = peer_name
        self.auth = auth
        self.connections = Connections(
            {"Content-Type": "application/json", "X-Dejima-Peer": peer_name},
            tls=client_context(tls) if tls is not None else None,
            plain=tls is None,
        )
        self.pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix=f"{peer_name}-call")

    def call(self, url: str, message: Message, timeout: float, signed: _Signed | None = None) -> CallResult:
        """POST one message to a peer; the answer (or the failure) as a value. `signed`: the message's signed
        envelope, shared with the other calls that send it (`call_many`)."""
        envelope, body = (signed or _Signed(self.auth, message)).get()
        try:
            status, data = self.connections.post(url, MESSAGE_PATH, body, timeout)
        except CallTimeout:
            return CallResult(url, None, error=f"{url} did not answer within {timeout:.1f}s", error_kind="timeout")
        except PlainRefused as exc:
            return CallResult(url, None, error=str(exc), error_kind="unreachable")
        except ssl.SSLError as exc:  # a handshake refused: the peer's certificate (or ours) not of the CA, …
            reason = getattr(exc, "verify_message", "") or exc.reason or str(exc)
            return CallResult(url, None, error=f"{url} is unreachable (TLS: {reason})", error_kind="unreachable")
        except (OSError, ValueError) as exc:
            return CallResult(url, None, error=f"{url} is unreachable ({type(exc).__name__})", error_kind="unreachable")
        try:
            raw = read_envelope(data)
            answer = parse(raw)
        except (ValueError, MessageError) as exc:
            kind = "refused" if 400 <= status < 500 else "internal"
            detail = data[:300].decode(errors="replace") if data else str(exc)
            return CallResult(url, None, status, f"{url} answered {status}: {detail}", kind)
        try:
            verify_answer(self.auth, raw, signature_id(envelope), answer)
        except AuthError as exc:
            log.warning("refusing the answer of %s to a %s: %s", url, message.kind, exc)
            return CallResult(url, None, status, f"{url}: answer refused: {exc}", "refused")
        if status >= 400:
            err = getattr(answer, "error", "") or f"HTTP {status}"
            kind = getattr(answer, "error_kind", "") or "refused"
            return CallResult(url, answer, status, err, kind)
        return CallResult(url, answer, status)

    def call_many(self, calls: Sequence[tuple[str, Message]], timeout: float) -> list[CallResult]:
        """Several calls in parallel; results in the order of `calls`. The first one runs in the calling thread,
        which would only wait meanwhile. A message sent to several peers (the same object in several calls) is
        signed and encoded once, by the first call that sends it: every receiver checks the same signature, each
        remembers it against replays for itself, and each answer is bound to it (docs/decisions.md)."""
        if not calls:
            return []
        signed = {id(msg): _Signed(self.auth, msg) for _, msg in calls}
        futures = [self.pool.submit(self.call, url, msg, timeout, signed[id(msg)]) for url, msg in calls[1:]]
        first = self.call(calls[0][0], calls[0][1], timeout, signed[id(calls[0][1])])
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.connections.close()
