"""The client's only way to the data: HTTP calls to its own peer service (DEJIMA_PEER_URL), each with a timeout.

| call | peer endpoint | result |
|---|---|---|
| `PeerService.status()` | GET /api/v1/status | the status JSON (views, groups, peers); raises `PeerUnavailable` |
| | | (timeout: at most 5 s, every page asks for it) |
| `PeerService.query(sql)` | POST /api/v1/query | `QueryResult(columns, rows)`; raises PeerUnavailable, QueryFailed |
| `PeerService.exec(sqls)` | POST /api/v1/exec | an `Outcome` (never raises): committed, or the error in plain words |

Every call carries the client's API token (`Authorization: Bearer …`, DEJIMA_PEER_TOKEN or DEJIMA_PEER_TOKEN_FILE).
With the client's TLS settings (DEJIMA_TLS_CA_FILE, peer.dejima.tls) the peer's https URL is verified against that CA
only (not the system's, nor REQUESTS_CA_BUNDLE); a peer whose certificate does not verify is `unreachable`.

An `Outcome` mirrors the peer's HTTP status (200, 400, 403, 409 + Retry-After, 422, 503, 504; the peer's own
500 `internal` becomes 502, so the client never answers 500). Failures of the call itself become: 503
`unreachable` (the peer service does not answer: nothing was changed), 504 `no_answer` (no answer within the
timeout: the outcome is unknown), 502 `bad_answer` (not a Dejima answer), 502 `token_refused` (the peer refused
this client's API token, 401 or 403: a setting of the client to fix; nothing was changed).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

# What each error kind of the peer means for a person, and whether anything changed. `{peers}` names peers.
PLAIN_WORDS: dict[str, str] = {
    "conflict": "someone else changed this row at the same time; try again",
    "constraint": "the change breaks a rule of the database; nothing was changed",
    "bad_request": "the database refused the change; nothing was changed",
    "refused": "a peer refused the change; nothing was changed",
    "unreachable": "{peers} unreachable; nothing was changed",
    "busy": "the peer service is busy with other changes; nothing was changed, try again in a moment",
    "timeout": "the change took too long and was cancelled; nothing was changed",
    "internal": "the peer service failed; nothing was changed",
}
STATUS_TIMEOUT = 5.0  # seconds, at most, for GET /api/v1/status
URL_RE = re.compile(r"https?://[^\s/'\"]+")
DUPLICATE_RE = re.compile(r"Key \((?P<cols>[^)]*)\)=\((?P<vals>.*)\) already exists")


class PeerUnavailable(Exception):
    """The peer service could not be asked (down, timeout, or not a Dejima answer). `status` is the HTTP status
    the client answers with (503, 504 or 502), the message says so in plain words."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        self.kind = kind
        self.status = status
        super().__init__(message)


class QueryFailed(Exception):
    """The peer refused a read query (HTTP 400/409 from /api/v1/query)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


@dataclass(frozen=True)
class Outcome:
    """What became of one write. `status` is the HTTP status to answer with (the peer's own where it answered)."""

    ok: bool
    status: int
    kind: str  # "committed" or an error kind (conflict, constraint, unreachable, timeout, no_answer, …)
    message: str  # plain words for a person
    detail: str = ""  # the peer's own words
    gxid: str = ""
    participants: tuple[str, ...] = ()
    retry_after: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {
                "status": "committed",
                "message": self.message,
                "gxid": self.gxid,
                "participants": list(self.participants),
                **self.extra,
            }
        body: dict[str, Any] = {"status": "error", "kind": self.kind, "error": self.message, "detail": self.detail}
        if self.retry_after:
            body["retry_after"] = self.retry_after
        return body


def committed_message(participants: tuple[str, ...] | list[str]) -> str:
    if participants:
        return f"committed (reached {', '.join(participants)})"
    return "committed (no dejima view changed, so no other peer was involved)"


class PeerService:
    """HTTP client of one peer service. Thread-safe: one `requests.Session` per thread (keep-alive)."""

    def __init__(self, url: str, timeout: float, token: str = "", ca_file: Path | None = None) -> None:
        """`ca_file`: the CA the peer's certificate is verified against (DEJIMA_TLS_CA_FILE; None: the system's)."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._verify: str | bool = str(ca_file) if ca_file is not None else True
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            session.verify = self._verify
            self._local.session = session
        return session

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> tuple[requests.Response, dict[str, Any]]:
        """(response, JSON body); raises PeerUnavailable when there is no usable answer."""
        timeout = self.timeout if timeout is None else timeout
        try:
            resp = self._session().request(method, self.url + path, json=body, timeout=timeout)
        except requests.Timeout:
            raise PeerUnavailable(
                "no_answer", 504, f"the peer service at {self.url} did not answer within {timeout:g} s"
            ) from None
        except requests.exceptions.SSLError as exc:
            raise PeerUnavailable(
                "unreachable", 503, f"the peer service at {self.url} is unreachable (TLS: {_tls_reason(exc)})"
            ) from None
        except requests.RequestException as exc:
            raise PeerUnavailable(
                "unreachable", 503, f"the peer service at {self.url} is unreachable ({type(exc).__name__})"
            ) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise PeerUnavailable(
                "bad_answer", 502, f"the peer service at {self.url} gave an unexpected answer (HTTP {resp.status_code})"
            )
        if resp.status_code in (401, 403) and data.get("kind") in ("unauthorized", "forbidden"):
            raise PeerUnavailable(
                "token_refused",
                502,
                f"the peer service at {self.url} refused this client's API token ({data.get('error')}); check"
                " DEJIMA_PEER_TOKEN / DEJIMA_PEER_TOKEN_FILE",
            )
        return resp, data

    def status(self) -> dict[str, Any]:
        # Every page asks for the status: a hung peer must not hold each page for the whole write timeout.
        resp, data = self._call("GET", "/api/v1/status", timeout=min(self.timeout, STATUS_TIMEOUT))
        if resp.status_code != 200:
            raise PeerUnavailable("bad_answer", 502, f"the peer's status failed (HTTP {resp.status_code})")
        return data

    def query(self, statement: str) -> QueryResult:
        resp, data = self._call("POST", "/api/v1/query", {"sql": statement})
        if resp.status_code != 200:
            raise QueryFailed(resp.status_code, str(data.get("error") or f"HTTP {resp.status_code}"))
        columns, rows = data.get("columns"), data.get("rows")
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise PeerUnavailable("bad_answer", 502, "the peer's query answer has no columns and rows")
        return QueryResult(columns, rows)

    def exec(self, statements: list[str], peer_names: dict[str, str] | None = None, self_name: str = "") -> Outcome:
        """Run statements at the peer as one global transaction. `peer_names` (URL -> name of the peers the peer
        knows) and `self_name` (the peer's own name) let an "unreachable" error name the missing peer."""
        try:
            resp, data = self._call("POST", "/api/v1/exec", {"sql": statements})
        except PeerUnavailable as exc:
            message = str(exc)
            if exc.kind == "no_answer":
                message += "; the change may or may not have been applied — reload to see"
            elif exc.kind in ("unreachable", "token_refused"):
                message += "; nothing was changed"
            return Outcome(False, exc.status, exc.kind, message)
        if resp.status_code == 200 and data.get("status") == "committed":
            participants = tuple(str(p) for p in data.get("participants") or ())
            return Outcome(
                True, 200, "committed", committed_message(participants), "", str(data.get("gxid", "")), participants
            )
        kind = str(data.get("kind") or "internal")
        detail = str(data.get("error") or "")
        # The peer's status, except that its own failure (500 internal, or anything unexpected) is a bad gateway
        # here: the client never answers 500.
        status = resp.status_code if 400 <= resp.status_code < 500 or resp.status_code in (503, 504) else 502
        message = PLAIN_WORDS.get(kind, "the change failed; nothing was changed")
        if kind == "unreachable":
            message = message.format(peers=_unreachable_peers(detail, peer_names or {}, self_name))
        duplicate = DUPLICATE_RE.search(detail) if kind == "constraint" else None
        if duplicate:
            message = f"a row with {duplicate['cols']} = {duplicate['vals']} already exists; nothing was changed"
        return Outcome(False, status, kind, message, detail, retry_after=resp.headers.get("Retry-After"))


def _tls_reason(exc: Exception) -> str:
    """The reason OpenSSL gave (certificate verify failed: …), from the exceptions requests wraps it in."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "verify_message", "") or getattr(current, "reason", "")
        if isinstance(reason, str) and reason:
            return reason
        inner = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = inner or current.__cause__ or current.__context__
    return type(exc).__name__


def _unreachable_peers(detail: str, peer_names: dict[str, str], self_name: str) -> str:
    """'peer insurance is' / 'peers bank, insurance are' / 'a peer this change must reach is', from the peer's
    error text (it names URLs, peer names, or "no peer of type X")."""
    found: list[str] = []

    def add(name: str) -> None:
        if name and name != self_name and name not in found:
            found.append(name)

    for url in URL_RE.findall(detail):
        add(peer_names.get(url.rstrip("/"), url))
    for match in re.finditer(r"no peer of type ([\w-]+(?:, [\w-]+)*)", detail):
        for name in match.group(1).split(", "):
            add(name)
    for name in peer_names.values():
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", detail):
            add(name)
    if not found:
        return "a peer this change must reach is"
    if len(found) == 1:
        return f"peer {found[0]} is"
    return f"peers {', '.join(found)} are"
