"""Calls to other peers: every call has a timeout, runs in parallel when there are several, and turns failure into
a value (`CallResult`), never an exception. Keep-alive connections are pooled; Nagle is off (urllib3's default
socket options set TCP_NODELAY).

Authenticated peers (`peer.dejima.auth`): every request is signed by this peer (`sign`), and an answer counts only
when it is signed by a trusted peer and bound to the request (`verify_answer`); otherwise the call fails (refused).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from peer.dejima.auth import Authenticator, AuthError, authorize, signature_id
from peer.dejima.messages import Message, MessageError, parse

log = logging.getLogger(__name__)
MESSAGE_PATH = "/peer/v1/message"


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
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=64, pool_maxsize=max_parallel, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Content-Type": "application/json", "X-Dejima-Peer": peer_name})
        self.pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix=f"{peer_name}-call")

    def call(self, url: str, message: Message, timeout: float) -> CallResult:
        """POST one message to a peer; the answer (or the failure) as a value."""
        envelope = sign(self.auth, message.to_json())
        body = json.dumps(envelope, separators=(",", ":"))
        try:
            resp = self.session.post(url + MESSAGE_PATH, data=body, timeout=(min(timeout, 3.0), timeout))
        except requests.Timeout:
            return CallResult(url, None, error=f"{url} did not answer within {timeout:.1f}s", error_kind="timeout")
        except requests.RequestException as exc:
            return CallResult(url, None, error=f"{url} is unreachable ({type(exc).__name__})", error_kind="unreachable")
        try:
            raw = resp.json()
            answer = parse(raw)
        except (ValueError, MessageError) as exc:
            kind = "refused" if 400 <= resp.status_code < 500 else "internal"
            detail = resp.text[:300] if resp.text else str(exc)
            return CallResult(url, None, resp.status_code, f"{url} answered {resp.status_code}: {detail}", kind)
        try:
            verify_answer(self.auth, raw, signature_id(envelope), answer)
        except AuthError as exc:
            log.warning("refusing the answer of %s to a %s: %s", url, message.kind, exc)
            return CallResult(url, None, resp.status_code, f"{url}: answer refused: {exc}", "refused")
        if resp.status_code >= 400:
            err = getattr(answer, "error", "") or f"HTTP {resp.status_code}"
            kind = getattr(answer, "error_kind", "") or "refused"
            return CallResult(url, answer, resp.status_code, err, kind)
        return CallResult(url, answer, resp.status_code)

    def call_many(self, calls: Sequence[tuple[str, Message]], timeout: float) -> list[CallResult]:
        """Several calls in parallel; results in the order of `calls`."""
        if len(calls) == 1:
            return [self.call(calls[0][0], calls[0][1], timeout)]
        futures = [self.pool.submit(self.call, url, msg, timeout) for url, msg in calls]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()
