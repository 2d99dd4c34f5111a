"""HTTP endpoints of a peer. Views validate and hand over to the coordinator/directory; they change nothing
themselves.

Every endpoint needs an API token (`Authorization: Bearer <token>`, peer/dejima/apiauth.py and tokens.py), a new
one too, except the two open ones below (`authentication_classes([])`, `permission_classes([AllowAny])`):

| endpoint | method | token | statuses |
|---|---|---|---|
| /health | GET | none | 200 ok, 503 database down |
| /peer/v1/message | POST | none (signed) | 200 typed answer (signed); 400 malformed; 401 unsigned, forged, |
| | | | untrusted, stale or replayed; 403 signed by another peer than it claims, or a propagate from |
| | | | outside the view's group; 413 too large |
| /api/v1/status | GET | read | 200 |
| /api/v1/groups | GET | read | 200 |
| /api/v1/exec | POST {"sql": str or [str]} | write | 200 committed; 400 bad input, or bad SQL (kind bad_sql, with its |
| | | | sqlstate); 403 a privilege the client's database role lacks (kind forbidden, with its sqlstate), or a |
| | | | participant refused; 409 conflict (Retry-After); 422 constraint; 503 unreachable peer, or busy |
| | | | (Retry-After); 504 timeout |
| /api/v1/query | POST {"sql": str} | read | 200 {columns, rows}; 400 bad input or bad SQL; 403 forbidden; 409 timeout |
| | | | (both: transaction control or session state, a plain SET, … is 400: `peer.dejima.sqlguard`) |
| /api/v1/views/<view> | GET | read | 200 {view, columns, rows, digest}; 404 unknown view |
| /api/v1/prepared | GET | read | 200 prepared transactions of this peer's database |
| /api/v1/txlog | GET ?verify=1&limit=N&at=S,…&pair=P | read | 200 {peer, length, head, entries, verify?, |
| | | | witnessed?, witnessed_by?, at?, pair?, seal_error?}; 400 bad limit or at |
| /api/v1/machinery | GET | read | 200 {peer, ok, problems}: the triggers, functions and privileges in the database |
| /api/v1/openapi.json | GET | read | 200 the OpenAPI schema of these endpoints (bodies, parameters, statuses) |

Every endpoint that needs a token answers, before anything else:

| status | kind | when |
|---|---|---|
| 401 | unauthorized | no `Authorization` header, not `Bearer <token>`, or an unknown or revoked token |
| | | (with `WWW-Authenticate: Bearer realm="dejima"`) |
| 403 | forbidden | the token lacks the scope: `read` for every GET and for query, `write` for exec (and any |
| | | other POST) |
| 503 | unreachable | the peer cannot read its tokens from its database now |

The lean client listener (DEJIMA_API_BIND: exec and query) answers the same. Each refusal is logged with the remote
address and the path, never the token. Every endpoint answers 405 (with Allow) to a method it does not take (once
the token is checked). The bodies are described by the serializers in peer/dejima/serializers.py (the schema); the
views validate input themselves.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from psycopg import sql
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny

from peer.dejima import api, inbox, jsonvalues, machinery, txlog
from peer.dejima.api import BadInput
from peer.dejima.peerserver import LINGER_BYTES
from peer.dejima.runtime import get_runtime
from peer.dejima.serializers import (
    AnswerSerializer,
    CommittedSerializer,
    EnvelopeSerializer,
    ErrorSerializer,
    GroupsSerializer,
    HealthSerializer,
    MachinerySerializer,
    MethodNotAllowedSerializer,
    PreparedSerializer,
    QueryResultSerializer,
    QuerySerializer,
    StatementsSerializer,
    StatusSerializer,
    TxlogSerializer,
    UnhealthySerializer,
    ViewRowsSerializer,
)

log = logging.getLogger(__name__)

TAG = ["peer"]


def _err(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


# Statuses every endpoint may answer besides its own (the schema lists them once per operation).
NOT_ALLOWED = {405: OpenApiResponse(MethodNotAllowedSerializer, description="method not allowed (see Allow)")}
BAD_BODY = {
    400: _err("malformed JSON, or a body that is not what the endpoint takes; nothing was done"),
    413: _err("body larger than DEJIMA_MAX_BODY_BYTES; nothing was done"),
    **NOT_ALLOWED,
}


def _error(status: int, message: str, kind: str = "bad_request", **extra: Any) -> JsonResponse:
    return JsonResponse({"status": "error", "kind": kind, "error": message, **extra}, status=status)


def exact_json(data: Any, status: int = 200) -> HttpResponse:
    """A JSON answer whose numbers are exact (`jsonvalues`): JsonResponse would write a Decimal as a string."""
    return HttpResponse(jsonvalues.dumps(data), content_type="application/json", status=status)


def _drop_body(request: HttpRequest, length: int) -> None:
    """Read and drop a body refused unread (at most peerserver.LINGER_BYTES of it): a client writes its whole body
    before it reads the answer, and over TLS a connection closed under its writes is an error to it, not the 413."""
    stream = request.META.get("wsgi.input")
    left = min(length, LINGER_BYTES)
    while stream is not None and left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)


def _json_body(request: HttpRequest) -> Any:
    """The request body as JSON, within the size limit. Raises BadInput with a clear message."""
    limit = get_runtime().config.max_body_bytes
    length = int(request.headers.get("Content-Length") or 0)
    if length > limit:
        _drop_body(request, length)
        raise BadInput(413, f"body of {length} bytes is larger than the limit of {limit} bytes")
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        body = request.META["wsgi.input"].read(limit + 1)  # Django reads Content-Length bodies only
    else:
        body = request.body
    if len(body) > limit:
        raise BadInput(413, f"body is larger than the limit of {limit} bytes")
    try:
        return jsonvalues.loads_request(body)  # nested deeper than jsonvalues.MAX_DEPTH: refused before decoding
    except jsonvalues.TooDeep as exc:
        raise BadInput(400, str(exc)) from None
    except ValueError as exc:  # UnicodeDecodeError among them
        raise BadInput(400, f"malformed JSON: {exc}") from None


def rejects_bad_input(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """A body too large is answered 413, a malformed one 400; nothing is done."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest) -> HttpResponse:
        try:
            return view(request)
        except BadInput as exc:
            return _error(exc.status, str(exc))

    return wrapped


@extend_schema(
    tags=TAG,
    summary="Is this peer and its database up",
    responses={
        200: HealthSerializer,
        503: OpenApiResponse(UnhealthySerializer, description="database down"),
        **NOT_ALLOWED,
    },
)
@api_view(["GET"])
@authentication_classes([])  # open: probes and orchestrators ask it
@permission_classes([AllowAny])
def health(request: HttpRequest) -> JsonResponse:
    rt = get_runtime()
    try:
        with rt.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001  (any failure means unhealthy; say which)
        return JsonResponse({"status": "unhealthy", "peer": rt.config.name, "error": str(exc)}, status=503)
    return JsonResponse({"status": "ok", "peer": rt.config.name, "peer_type": rt.config.peer_type})


@extend_schema(
    tags=TAG,
    summary="A signed peer-to-peer message (propagate, prepare, finish, decision_query, hello)",
    request=EnvelopeSerializer,
    responses={
        200: OpenApiResponse(AnswerSerializer, description="the typed answer, signed and bound to the request"),
        401: _err("unsigned, forged, untrusted, stale or replayed"),
        403: _err(
            "signed by another peer than it claims, or a propagate from outside the view's group or with a "
            "column outside the view; or sent here while the peer requires client certificates "
            "(DEJIMA_TLS_CLIENT_CERTS=require: messages go to its message listener, which checks them)"
        ),
        **BAD_BODY,
    },
)
@api_view(["POST"])
@authentication_classes([])  # open to other peers: every message is signed and checked (peer.dejima.auth)
@permission_classes([AllowAny])
@rejects_bad_input
def message(request: HttpRequest) -> HttpResponse:
    """Peer-to-peer messages (propagate, prepare, finish, decision_query, hello): `peer.dejima.inbox`. With
    DEJIMA_TLS_CLIENT_CERTS=require they are taken only at the message listener, which checks the caller's
    certificate (gunicorn asks for none: its callers are the organization's own)."""
    tls = get_runtime().config.tls
    if tls is not None and tls.require_client_certs:
        return _error(
            403,
            "this peer takes peer messages only at its message listener (DEJIMA_MESSAGE_BIND, its DEJIMA_URL), which"
            " checks the caller's certificate (DEJIMA_TLS_CLIENT_CERTS=require)",
            kind="refused",
        )
    status, answer = inbox.handle_message(_json_body(request), request.META.get("REMOTE_ADDR", ""))
    return exact_json(answer, status=status)


@extend_schema(
    tags=TAG,
    summary="This peer, its dejima groups and the peers it knows",
    responses={200: StatusSerializer, **NOT_ALLOWED},
)
@api_view(["GET"])
def status(request: HttpRequest) -> JsonResponse:
    rt = get_runtime()
    return JsonResponse(
        {
            "peer": rt.config.name,
            "peer_type": rt.config.peer_type,
            "url": rt.config.url,
            "views": sorted(rt.directory.my_views),
            "groups": rt.directory.groups(),
            "peer_groups": rt.directory.peer_groups(),
            "peers": [p.summary() for p in rt.directory.peers.values()],
            "stats": rt.coordinator.stats,
            "messages_received": inbox.received(),
            "propagates_received": inbox.received_views(),
            "entitlements": rt.directory.entitlements(),
            "refused_claims": rt.directory.refused_claims(),
            "open_transactions": len(rt.coordinator.gxs),
            "queued_transactions": len(rt.coordinator.waiting),
            "commit_wait": rt.config.commit_wait,
            "tls": rt.tls_status(),
        }
    )


@extend_schema(
    tags=TAG, summary="Dejima groups and attribute-level peer groups", responses={200: GroupsSerializer, **NOT_ALLOWED}
)
@api_view(["GET"])
def groups(request: HttpRequest) -> JsonResponse:
    rt = get_runtime()
    return JsonResponse({"groups": rt.directory.groups(), "peer_groups": rt.directory.peer_groups()})


@extend_schema(
    tags=TAG,
    summary="Run statements at this peer as one global transaction",
    request=StatementsSerializer,
    responses={
        200: CommittedSerializer,
        400: _err("malformed input, or bad SQL (kind bad_sql: unknown table or column, syntax, …); nothing was done"),
        403: _err(
            "the client's database role may not do this (kind forbidden), or a participant refused; nothing was done"
        ),
        409: _err("conflict with a concurrent transaction; nothing was done, try again (Retry-After)"),
        413: BAD_BODY[413],
        422: _err("a constraint is violated (the error names the peer and the constraint); nothing was done"),
        500: _err("the peer failed; nothing was done"),
        503: _err(
            "a participant is unreachable, or this peer is busy (DEJIMA_MAX_ACTIVE, Retry-After); nothing was done"
        ),
        504: _err("a participant or the database timed out; nothing was done"),
        **NOT_ALLOWED,
    },
)
@api_view(["POST"])
@rejects_bad_input
def exec_sql(request: HttpRequest) -> HttpResponse:
    """Run statements at this peer as one global transaction."""
    return _answer(*api.run_exec(_json_body(request)))


@extend_schema(
    tags=TAG,
    summary="Run one read-only query at this peer",
    request=QuerySerializer,
    responses={
        200: QueryResultSerializer,
        400: _err("malformed input, bad SQL or a write; nothing was done"),
        403: _err("the client's database role may not do this (kind forbidden); nothing was done"),
        409: _err("conflict or timeout; try again"),
        413: BAD_BODY[413],
        **NOT_ALLOWED,
    },
)
@api_view(["POST"])
@rejects_bad_input
def query(request: HttpRequest) -> HttpResponse:
    """Run one read-only query at this peer."""
    return _answer(*api.run_query(_json_body(request)))


def _answer(status: int, answer: bytes, headers: dict[str, str]) -> HttpResponse:
    resp = HttpResponse(answer, content_type="application/json", status=status)
    for name, value in headers.items():
        resp[name] = value
    return resp


def view_snapshot(view: str) -> dict[str, Any]:
    """Rows of a dejima view (sorted by key) and an order-independent digest, for `dejima check`."""
    rt = get_runtime()
    spec = rt.ptype.view(view)
    cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
    q = sql.SQL("SELECT jsonb_build_array({}) FROM {} ORDER BY {}").format(
        cols, sql.Identifier(view), sql.SQL(", ").join(map(sql.Identifier, spec.key))
    )
    rt.coordinator.settle()
    with rt.pool.connection(timeout=5) as conn:
        rows = [r[0] for r in conn.execute(q).fetchall()]
    digest = hashlib.sha256()
    for line in sorted(jsonvalues.canonical(r) for r in rows):
        digest.update(line.encode() + b"\n")
    return {"view": view, "columns": list(spec.columns), "rows": rows, "digest": digest.hexdigest()}


@extend_schema(
    tags=TAG,
    summary="The rows of one of this peer's dejima views, and their digest",
    responses={200: ViewRowsSerializer, 404: _err("not a dejima view of this peer"), **NOT_ALLOWED},
)
@api_view(["GET"])
def view_rows(request: HttpRequest, view: str) -> HttpResponse:
    rt = get_runtime()
    if view not in rt.directory.my_views:
        return _error(404, f"unknown view {view!r}; this peer shares {sorted(rt.directory.my_views)}")
    return exact_json(view_snapshot(view))


@extend_schema(
    tags=TAG,
    summary="Prepared transactions of this peer's database",
    responses={200: PreparedSerializer, **NOT_ALLOWED},
)
@api_view(["GET"])
def prepared(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"prepared": get_runtime().coordinator.prepared_transactions()})


SEAL_WAIT_MS = 2000  # GET /api/v1/txlog waits this long at most for the sealer thread, then answers without sealing
MAX_AT = 100  # seqs one GET /api/v1/txlog?at=… may ask for


@extend_schema(
    tags=TAG,
    summary="This peer's hash-chained transaction log",
    parameters=[
        OpenApiParameter(
            "limit",
            {"type": "integer", "minimum": 0, "maximum": 1000, "default": 20},
            description="how many of the newest entries",
        ),
        OpenApiParameter(
            "verify",
            OpenApiTypes.STR,
            description="1, true or yes: recompute every hash of the chain (else not), and say what the chain"
            " recorded of its partners' logs (`witnessed`) and which of this peer's entries theirs must know of"
            " (`witnessed_by`)",
        ),
        OpenApiParameter(
            "at", OpenApiTypes.STR, description=f"seqs, comma-separated (at most {MAX_AT}): the hash of each entry"
        ),
        OpenApiParameter(
            "pair",
            OpenApiTypes.STR,
            description="a partner's name: the entries behind `witnessed` and `witnessed_by` for it (with verify=1)",
        ),
    ],
    responses={
        200: TxlogSerializer,
        400: _err("limit is not a whole number in 0..1000, or `at` not seqs"),
        **NOT_ALLOWED,
    },
)
@api_view(["GET"])
def txlog_view(request: HttpRequest) -> HttpResponse:
    """This peer's hash-chained transaction log: its head, the last `limit` entries (default 20, at most 1000) and,
    with `verify=1`, the verdict of recomputing every hash of the chain (`ok`, `broken_at`: the first broken seq)
    with what it recorded of its partners' logs (`dejima check` compares those across peers: peer/dejima/txlog.py).
    The committed entries still staged are sealed first; when that fails (or the sealer holds the chain longer than
    SEAL_WAIT_MS) the log is answered as it is, with `seal_error`."""
    rt = get_runtime()
    try:
        limit = int(request.GET.get("limit", "20"))
    except ValueError:
        return _error(400, "limit must be a whole number")
    if not 0 <= limit <= 1000:
        return _error(400, "limit must be between 0 and 1000")
    at_text = request.GET.get("at", "")
    try:
        at = [int(part) for part in at_text.split(",") if part.strip()]
    except ValueError:
        return _error(400, "at must be seqs, comma-separated")
    if len(at) > MAX_AT or not all(0 <= seq < 2**63 for seq in at):
        return _error(400, f"at may name at most {MAX_AT} seqs, each in 0..2^63-1")
    verify = request.GET.get("verify") in ("1", "true", "yes")
    pair = request.GET.get("pair") or None
    rt.coordinator.settle()  # a write already reported committed is in the log
    seal_error = None
    with rt.pool.connection(timeout=5) as conn:
        try:  # the committed entries still staged join the chain first
            rt.coordinator.seal(conn, lock_timeout_ms=SEAL_WAIT_MS)
        except Exception as exc:  # noqa: BLE001 - whatever sealing met, the log is answered as it is
            log.warning("GET /api/v1/txlog: sealing failed, answering the chain as it is: %s", exc)
            seal_error = f"{type(exc).__name__}: {exc}".strip()
        entries = txlog.recent(conn, max(limit, 1))
        account = txlog.Accounting(rt.config.name, pair) if verify else None
        verdict = txlog.verify(conn, account) if verify else None
        length = conn.execute("SELECT count(*) FROM dejima.txlog").fetchone()
        hashes = txlog.hashes_at(conn, at) if at else None
    head = entries[0] if entries else None
    body: dict[str, Any] = {
        "peer": rt.config.name,
        "length": int(length[0]) if length else 0,
        "head": {k: head[k] for k in ("seq", "gxid", "hash", "committed_at")} if head else None,
        "entries": entries[:limit],
    }
    if verdict is not None and account is not None:
        body["verify"] = verdict.to_json()
        body.update(account.to_json())
        if pair is not None:
            body["pair"] = account.pair_json()
    if hashes is not None:
        body["at"] = {str(seq): h for seq, h in hashes.items()}
    if seal_error is not None:
        body["seal_error"] = seal_error
    return exact_json(body)


@extend_schema(
    tags=TAG,
    summary="Whether the triggers, functions and privileges in this peer's database are what its manifest generates",
    responses={200: MachinerySerializer, **NOT_ALLOWED},
)
@api_view(["GET"])
def machinery_view(request: HttpRequest) -> JsonResponse:
    """The inspection the peer runs at start (peer/dejima/machinery.py), run again now: `dejima check` reports every
    peer whose capture or putback triggers, functions or privileges differ from what its manifest generates."""
    rt = get_runtime()
    with rt.pool.connection(timeout=5) as conn:
        report = machinery.inspect(conn, rt.ptype, rt.expected, rt.roles, privileges=rt.least_privilege)
    return JsonResponse({"peer": rt.config.name, **report.to_json()})


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """404 for a path that is no endpoint (handler404 of peer/urls.py), in the API's error shape."""
    return _error(404, f"no endpoint at {request.path}", "not_found")
