"""The client REST API (PEER_MODE=client), under /client/api/v1/: the same as the web app, as JSON.

Every endpoint needs a user of the client (peer/client/auth.py): HTTP Basic (for scripts), or the session cookie of
/login — then POST, PATCH and DELETE also need the CSRF token in an X-CSRFToken header, as DRF's
SessionAuthentication checks. Anonymous or a wrong password: 401 `not_authenticated` / `authentication_failed`
(with WWW-Authenticate: Basic); a session write without the CSRF token: 403 `permission_denied`.
Bodies are JSON only (a cross-site HTML form cannot post JSON). Values are checked
against the manifest's columns and types before anything is sent to the peer; every write is one global
transaction at the peer (POST /api/v1/exec) and the answer mirrors the peer's status.

| endpoint | method | statuses |
|---|---|---|
| /client/api/v1/tables | GET | 200 {peer, peer_type, tables: [{name, columns: [{name, type, shared}], shared}]} |
| /client/api/v1/tables/<t> | GET | 200 one table; 404 unknown table |
| /client/api/v1/tables/<t>/rows | GET ?limit=&offset= | 200 {table, columns, rows, total, limit, offset}; 404 |
| /client/api/v1/tables/<t>/rows | POST {column: value} | 201 {status: committed, participants, message, row} |
| /client/api/v1/tables/<t>/rows/<id> | GET | 200 the row; 404 unknown table or row |
| /client/api/v1/tables/<t>/rows/<id> | PATCH {column: value} | 200 {status: committed, …, row} |
| /client/api/v1/tables/<t>/rows/<id> | DELETE | 200 {status: committed, participants, message} |

Errors are {"status": "error", "kind", "error" (plain words), "detail" (the peer's words)}: 400 `invalid`
(unknown column, wrong type, missing required column; `fields` names them) or the peer's `bad_request`;
404 `not_found`; 409 `conflict` with Retry-After; 422 `constraint`; 403 `refused`; 502 `internal` (the peer failed);
503 `unreachable` (another peer, or the peer service itself: nothing was changed); 504 `timeout` (the peer gave
up: nothing was changed) or `no_answer` (no answer in DEJIMA_PEER_TIMEOUT: the outcome is unknown);
502 `bad_answer` (the peer answered something that is not a Dejima answer). The framework's own: 400 `invalid`
(malformed JSON), 405 `method_not_allowed`, 415 `invalid` (not application/json).
"""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.exceptions import APIException, NotAuthenticated, ParseError, UnsupportedMediaType
from rest_framework.parsers import JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from peer.client.context import MAX_PAGE_SIZE, PAGE_SIZE, ClientContext, RowMissing, Snapshot, get_context
from peer.client.peer_api import Outcome, PeerUnavailable, QueryFailed
from peer.client.tables import RowInvalid, TableInfo, validate_row


def _error(status: int, kind: str, message: str, **extra: Any) -> Response:
    return Response({"status": "error", "kind": kind, "error": message, **extra}, status=status)


def _outcome(outcome: Outcome, ok_status: int = 200) -> Response:
    resp = Response(outcome.to_json(), status=ok_status if outcome.ok else outcome.status)
    if outcome.retry_after:
        resp["Retry-After"] = outcome.retry_after
    return resp


def _read_failure(exc: PeerUnavailable | QueryFailed) -> Response:
    if isinstance(exc, PeerUnavailable):
        return _error(exc.status, exc.kind, f"{exc}; nothing was changed")
    return _error(502, "bad_answer", f"the peer refused to read: {exc}")


def _invalid(exc: RowInvalid) -> Response:
    return _error(400, "invalid", str(exc), fields=exc.errors)


NOT_LOGGED_IN = (
    "log in first: send HTTP Basic credentials of a client user, or the session cookie of /login"
    " (with an X-CSRFToken header for POST, PATCH and DELETE)"
)


class ClientAPIView(APIView):
    """JSON in, JSON out; errors of the framework itself (malformed JSON, wrong media type, not logged in) in the
    same shape. Basic first: an anonymous request gets 401 with WWW-Authenticate: Basic."""

    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    authentication_classes = [BasicAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]

    def handle_exception(self, exc: Exception) -> Response:
        resp = super().handle_exception(exc)
        if isinstance(exc, APIException):
            kind = "invalid" if isinstance(exc, ParseError | UnsupportedMediaType) else str(exc.default_code)
            message = NOT_LOGGED_IN if isinstance(exc, NotAuthenticated) else str(exc.detail)
            resp.data = {"status": "error", "kind": kind, "error": message}
        return resp

    def lookup(self, table: str) -> tuple[ClientContext, Snapshot, TableInfo | Response]:
        ctx = get_context()
        snap = ctx.snapshot()
        info = snap.table(table)
        if info is None:
            known = ", ".join(t.name for t in snap.tables)
            return ctx, snap, _error(404, "not_found", f"unknown table {table!r}; this peer's base tables: {known}")
        return ctx, snap, info


class TablesView(ClientAPIView):
    def get(self, request: Request) -> Response:
        snap = get_context().snapshot()
        return Response(
            {
                "peer": snap.peer_name,
                "peer_type": snap.ptype.name,
                "peer_url": snap.config.peer_url_for_client,
                "peer_reachable": snap.status is not None,
                "problem": snap.problem or snap.warning,
                "tables": [t.to_json() for t in snap.tables],
            }
        )


class TableView(ClientAPIView):
    def get(self, request: Request, table: str) -> Response:
        _, _, info = self.lookup(table)
        return info if isinstance(info, Response) else Response(info.to_json())


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise RowInvalid({name: [f"{name}: {raw!r} is not a whole number"]}) from None
    if not 0 <= value <= high:
        raise RowInvalid({name: [f"{name}: {value} is outside 0..{high}"]})
    return value


class RowsView(ClientAPIView):
    def get(self, request: Request, table: str) -> Response:
        ctx, _, info = self.lookup(table)
        if isinstance(info, Response):
            return info
        try:
            limit = _int_param(request, "limit", PAGE_SIZE, MAX_PAGE_SIZE)
            offset = _int_param(request, "offset", 0, 2**62)
        except RowInvalid as exc:
            return _invalid(exc)
        try:
            rows, total = ctx.rows(info, limit, offset)
        except (PeerUnavailable, QueryFailed) as exc:
            return _read_failure(exc)
        return Response(
            {
                "table": info.name,
                "columns": list(info.column_names),
                "rows": rows,
                "total": total,
                "limit": limit,
                "offset": offset,
            }
        )

    def post(self, request: Request, table: str) -> Response:
        ctx, snap, info = self.lookup(table)
        if isinstance(info, Response):
            return info
        try:
            values = validate_row(info, request.data, partial=False, strict=True)
        except RowInvalid as exc:
            return _invalid(exc)
        outcome = ctx.create(snap, info, values)
        resp = _outcome(outcome, ok_status=201)
        row = outcome.extra.get("row")
        if outcome.ok and isinstance(row, dict):
            resp["Location"] = f"{request.path.rstrip('/')}/{row['id']}"
        return resp


class RowView(ClientAPIView):
    def get(self, request: Request, table: str, row_id: int) -> Response:
        ctx, _, info = self.lookup(table)
        if isinstance(info, Response):
            return info
        try:
            return Response(ctx.row(info, row_id))
        except RowMissing:
            return _error(404, "not_found", f"row {row_id} of {info.name} does not exist")
        except (PeerUnavailable, QueryFailed) as exc:
            return _read_failure(exc)

    def patch(self, request: Request, table: str, row_id: int) -> Response:
        ctx, snap, info = self.lookup(table)
        if isinstance(info, Response):
            return info
        try:
            values = validate_row(info, request.data, partial=True, strict=True)
        except RowInvalid as exc:
            return _invalid(exc)
        try:
            return _outcome(ctx.update(snap, info, row_id, values))
        except RowMissing:
            return _error(404, "not_found", f"row {row_id} of {info.name} does not exist")
        except (PeerUnavailable, QueryFailed) as exc:
            return _read_failure(exc)

    def delete(self, request: Request, table: str, row_id: int) -> Response:
        ctx, snap, info = self.lookup(table)
        if isinstance(info, Response):
            return info
        try:
            return _outcome(ctx.delete(snap, info, row_id))
        except RowMissing:
            return _error(404, "not_found", f"row {row_id} of {info.name} does not exist")
        except (PeerUnavailable, QueryFailed) as exc:
            return _read_failure(exc)
