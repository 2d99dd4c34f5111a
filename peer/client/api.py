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
(malformed JSON), 405 `method_not_allowed`, 415 `invalid` (not application/json); 404 `not_found` for a path
under /client/api/ that is no endpoint; 400 `invalid` for a body over Django's DATA_UPLOAD_MAX_MEMORY_SIZE.

The OpenAPI schema of this API: GET /client/api/v1/openapi.json (login required, like every endpoint here); the
serializers below describe the bodies (the views validate against the manifest themselves, with their own messages).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from drf_spectacular.views import SpectacularJSONAPIView
from rest_framework import serializers
from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.exceptions import APIException, NotAuthenticated, ParseError, UnsupportedMediaType
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from peer.client.context import MAX_PAGE_SIZE, PAGE_SIZE, ClientContext, RowMissing, Snapshot, get_context
from peer.client.parsers import DepthCheckedJSONParser
from peer.client.peer_api import Outcome, PeerUnavailable, QueryFailed
from peer.client.tables import RowInvalid, TableInfo, validate_row

# ---- the wire schema (OpenAPI) -----------------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error: nothing was changed unless `kind` is `no_answer` (the outcome is unknown)."""

    status = serializers.ChoiceField(choices=["error"])
    kind = serializers.CharField(
        help_text="invalid, not_found, conflict, constraint, refused, internal, bad_answer, unreachable, timeout, "
        "no_answer, bad_request, not_authenticated, authentication_failed, permission_denied, method_not_allowed"
    )
    error = serializers.CharField(help_text="what went wrong, in plain words")
    detail = serializers.CharField(required=False, allow_blank=True, help_text="the peer's own words")
    # the JSON key "fields" (DRF's metaclass takes declared fields off the class: no clash with Serializer.fields)
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="invalid: column (or parameter) -> what is wrong with it",
    )
    retry_after = serializers.CharField(required=False, help_text="conflict: seconds to wait before a retry")


class ShareSerializer(serializers.Serializer[Any]):
    view = serializers.CharField(help_text="the dejima view that shares the column or table")
    peers = serializers.ListField(child=serializers.CharField())
    live = serializers.BooleanField(help_text="the peers come from the peer's current dejima groups")
    rows = serializers.CharField(help_text="which rows: all, or the view's row filter")


class ColumnSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    type = serializers.CharField()
    not_null = serializers.BooleanField()
    # the JSON key "read_only" (see ErrorSerializer.fields)
    read_only = serializers.BooleanField(  # type: ignore[assignment]
        help_text="the surrogate id, assigned by the peer"
    )
    shared = ShareSerializer(many=True)


class TableSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    columns = ColumnSerializer(many=True)
    shared = ShareSerializer(many=True)


class TablesSerializer(serializers.Serializer[Any]):
    peer = serializers.CharField()
    peer_type = serializers.CharField()
    peer_url = serializers.CharField()
    peer_reachable = serializers.BooleanField()
    problem = serializers.CharField(allow_null=True, allow_blank=True, help_text="why the peer cannot be used now")
    tables = TableSerializer(many=True)


ROW_SCHEMA = {
    "type": "object",
    "description": "a row: column -> value (text, integer, date as YYYY-MM-DD, or null)",
    "additionalProperties": {},
}
ROW_INPUT_SCHEMA = {
    "type": "object",
    "description": "column -> value for the table's columns (not id); checked against the manifest",
    "additionalProperties": True,
}


class RowsPageSerializer(serializers.Serializer[Any]):
    table = serializers.CharField()
    columns = serializers.ListField(child=serializers.CharField())
    rows = serializers.ListField(child=serializers.DictField(), help_text="rows ordered by id")
    total = serializers.IntegerField()
    limit = serializers.IntegerField()
    offset = serializers.IntegerField()


class CommittedSerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["committed"])
    message = serializers.CharField()
    gxid = serializers.CharField()
    participants = serializers.ListField(child=serializers.CharField(), help_text="the other peers it reached")
    row = serializers.DictField(required=False, help_text="the row as it is now (POST)")


def _err(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


COMMON = {
    401: _err("not logged in (HTTP Basic or the session of /login): not_authenticated, authentication_failed"),
    405: _err("method_not_allowed"),
}
NO_TABLE = {404: _err("not_found: unknown table (or row)")}
READ_FAILED = {
    502: _err("bad_answer: the peer refused to read or answered something else"),
    503: _err("unreachable: the peer service is down; nothing was changed"),
    504: _err("timeout: the peer gave up; nothing was changed"),
}
WRITE = {
    400: _err("invalid (unknown column, wrong type, missing required column; `fields`), or the peer's bad_request"),
    403: _err("permission_denied: a session write without the CSRF token; or refused by a peer"),
    409: _err("conflict: someone else changed the row at the same time; nothing was changed (Retry-After)"),
    415: _err("invalid: the body is not application/json"),
    422: _err("constraint: e.g. a row with that key already exists; nothing was changed"),
    **READ_FAILED,
    502: _err("internal or bad_answer: the peer failed; nothing was changed"),
    504: _err("timeout (nothing was changed) or no_answer (no answer in DEJIMA_PEER_TIMEOUT: outcome unknown)"),
}
TABLE = OpenApiParameter("table", str, OpenApiParameter.PATH, description="a base table of this peer")


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

    parser_classes = [DepthCheckedJSONParser]  # JSONParser, refusing a body nested too deeply (400 bad_request)
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


@extend_schema_view(
    get=extend_schema(
        operation_id="tables_list", summary="This peer's base tables", responses={200: TablesSerializer, **COMMON}
    )
)
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


@extend_schema_view(
    get=extend_schema(
        operation_id="table_retrieve",
        summary="One base table: its columns and what is shared with whom",
        parameters=[TABLE],
        responses={200: TableSerializer, **NO_TABLE, **COMMON},
    )
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


@extend_schema_view(
    get=extend_schema(
        operation_id="rows_list",
        summary="One page of a table's rows, ordered by id",
        parameters=[
            TABLE,
            OpenApiParameter(
                "limit", {"type": "integer", "minimum": 0, "maximum": MAX_PAGE_SIZE, "default": PAGE_SIZE}
            ),
            OpenApiParameter("offset", {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0}),
        ],
        responses={
            200: RowsPageSerializer,
            400: _err("invalid: limit or offset is not a whole number in range (`fields`)"),
            **NO_TABLE,
            **READ_FAILED,
            **COMMON,
        },
    ),
    post=extend_schema(
        operation_id="row_create",
        summary="Add a row: one global transaction at the peer",
        parameters=[TABLE],
        request={"application/json": ROW_INPUT_SCHEMA},
        responses={201: CommittedSerializer, **WRITE, **NO_TABLE, **COMMON},
    ),
)
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


ROW_ID = OpenApiParameter("row_id", int, OpenApiParameter.PATH, description="the row's surrogate id")


@extend_schema_view(
    get=extend_schema(
        operation_id="row_retrieve",
        summary="One row",
        parameters=[TABLE, ROW_ID],
        responses={200: OpenApiResponse(ROW_SCHEMA), **NO_TABLE, **READ_FAILED, **COMMON},
    ),
    patch=extend_schema(
        operation_id="row_update",
        summary="Change some columns of a row: one global transaction at the peer",
        parameters=[TABLE, ROW_ID],
        request={"application/json": ROW_INPUT_SCHEMA},
        responses={200: CommittedSerializer, **WRITE, **NO_TABLE, **COMMON},
    ),
    delete=extend_schema(
        operation_id="row_delete",
        summary="Delete a row: one global transaction at the peer",
        parameters=[TABLE, ROW_ID],
        responses={200: CommittedSerializer, **WRITE, **NO_TABLE, **COMMON},
    ),
)
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


class SchemaView(SpectacularJSONAPIView):
    """GET /client/api/v1/openapi.json: the schema of this API, for a logged-in user like every endpoint here."""

    authentication_classes = [BasicAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """404 for a path that is no endpoint: JSON under /client/api/, the plain page elsewhere."""
    if request.path.startswith("/client/api/"):
        body = {"status": "error", "kind": "not_found", "error": f"no endpoint at {request.path}"}
        return JsonResponse(body, status=404)
    return defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """400 for a request Django refuses before any view (a body over DATA_UPLOAD_MAX_MEMORY_SIZE): JSON under
    /client/api/, the plain page elsewhere."""
    if request.path.startswith("/client/api/"):
        body = {"status": "error", "kind": "invalid", "error": f"bad request: {type(exception).__name__}"}
        return JsonResponse(body, status=400)
    return defaults.bad_request(request, exception)
