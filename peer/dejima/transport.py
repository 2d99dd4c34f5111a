"""Calls to other peers: every call has a timeout, runs in parallel when there are several, and turns failure into
a value (`CallResult`), never an exception. Keep-alive connections are pooled per peer address and Nagle is off
(TCP_NODELAY): `Connections`, on the standard library's http.client — about half the CPU of urllib3 and a sixth of
`requests` per call (../shared/PERFORMANCE-NOTES.md), and the origin makes several calls per global transaction.
An idle connection the peer has closed (its keep-alive ran out, or it restarted) is dropped before reuse, as urllib3
does; a request is never sent twice: a failure is the call's result.

Authenticated peers (`peer.dejima.auth`): every request is signed by this peer (`sign`), and an answer counts only
when it is signed by a trusted peer and bound to the request (`verify_answer`); otherwise the call fails (refused).
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from peer.dejima import jsonvalues
from peer.dejima.auth import Authenticator, AuthError, authorize, signature_id
from peer.dejima.messages import Message, MessageError, parse

log = logging.getLogger(__name__)
MESSAGE_PATH = "/peer/v1/message"
CONNECT_TIMEOUT = 3.0  # seconds, at most (less when the call's own timeout is shorter)
MAX_IDLE_PER_PEER = 16  # idle keep-alive connections kept per peer address
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class CallTimeout(Exception):
    """The peer did not answer in time."""


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection is unusable: closed here, or readable (the peer's EOF, or bytes nobody asked for)."""
    if conn.sock is None:
        return True
    poller = select.poll()
    try:
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class Connections:
    """Keep-alive HTTP/1.1 connections to other peers, pooled per (scheme, host, port), TCP_NODELAY on each.

    `post` answers (status, body) or raises CallTimeout / OSError / http.client.HTTPException. Thread-safe: a
    connection is used by one call at a time (taken from the idle list, given back after a complete answer)."""

    def __init__(self, headers: dict[str, str], max_idle: int = MAX_IDLE_PER_PEER) -> None:
        self.headers = headers
        self.max_idle = max_idle
        self.idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self.lock = threading.Lock()
        self.closed = False

    @staticmethod
    def _address(url: str) -> tuple[str, str, int]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise http.client.InvalidURL(f"not an http(s) URL: {url!r}")
        return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    def _new(self, address: tuple[str, str, int], timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = address
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=min(timeout, CONNECT_TIMEOUT))
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self, address: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        """An idle connection to `address` that the peer has not closed, or None."""
        while True:
            with self.lock:
                idle = self.idle.get(address)
                conn = idle.pop() if idle else None
            if conn is None or not _dropped(conn):
                return conn
            conn.close()

    def _give_back(self, address: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self.lock:
            idle = self.idle.setdefault(address, [])
            if not self.closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def post(self, url: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        address = self._address(url)
        headers = {**self.headers, "Content-Length": str(len(body))}
        conn = self._take(address)
        try:
            if conn is None:
                conn = self._new(address, timeout)
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_ANSWER_BYTES)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, TimeoutError):
                raise CallTimeout(f"no answer within {timeout:.1f}s") from None
            raise
        if resp.will_close or not resp.isclosed():  # closing, or an answer larger than we read
            conn.close()
        else:
            self._give_back(address, conn)
        return resp.status, data

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


class Transport:
    def __init__(self, peer_name: str, auth: Authenticator, max_parallel: int = 64) -> None:
        self.peer_name = peer_name
        self.auth = auth
        self.connections = Connections({"Content-Type": "application/json", "X-Dejima-Peer": peer_name})
        self.pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix=f"{peer_name}-call")

    def call(self, url: str, message: Message, timeout: float) -> CallResult:
        """POST one message to a peer; the answer (or the failure) as a value."""
        envelope = sign(self.auth, message.to_json())
        body = jsonvalues.dumps(envelope).encode()
        try:
            status, data = self.connections.post(url, MESSAGE_PATH, body, timeout)
        except CallTimeout:
            return CallResult(url, None, error=f"{url} did not answer within {timeout:.1f}s", error_kind="timeout")
        except (OSError, http.client.HTTPException) as exc:
            return CallResult(url, None, error=f"{url} is unreachable ({type(exc).__name__})", error_kind="unreachable")
        try:
            raw = jsonvalues.loads(data)
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
        """Several calls in parallel; results in the order of `calls`."""
        if len(calls) == 1:
            return [self.call(calls[0][0], calls[0][1], timeout)]
        futures = [self.pool.submit(self.call, url, msg, timeout) for url, msg in calls]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.connections.close()
