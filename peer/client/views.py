"""The client web app (PEER_MODE=client): server-rendered pages to browse and edit the peer's base tables.

Every write is one global transaction at the peer (POST /api/v1/exec); the page says what became of it. Every page
but /health and /login needs a logged-in user (anonymous: 302 to /login?next=…; peer/client/auth.py). Forms are
protected by Django's CSRF middleware (a POST without the token is refused with 403).

| page | method | statuses |
|---|---|---|
| / | GET | 200 base tables, dejima views and their groups (the peer unreachable: 200 with a warning) |
| /health | GET | 200 {"status": "ok", "mode": "client", "peer": "reachable" or "unreachable"} (public) |
| /login, /logout | GET, POST / POST | Django's LoginView and LogoutView (peer/client/auth.py) |
| /tables/<table>/ | GET | 200 rows (?page=N) with sharing badges; 404 unknown table; 502/503/504 peer failed |
| /tables/<table>/add | GET, POST | 303 to the table on commit; 400 invalid value; 403 no CSRF token; else the peer's |
| | | status (409 + Retry-After conflict, 422 constraint, 503 unreachable, 504 timeout) with the form |
| /tables/<table>/rows/<id>/edit | GET, POST | as add (only the columns the person changed are written); 404 no row |
| /tables/<table>/rows/<id>/delete | GET, POST | GET asks for confirmation; POST deletes: as add; 404 no row |
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_not_required
from django.core import signing
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from peer.client.context import PAGE_SIZE, ClientContext, RowMissing, Snapshot, get_context
from peer.client.peer_api import Outcome, PeerUnavailable, QueryFailed
from peer.client.tables import RowInvalid, TableInfo, display, form_data, validate_row

log = logging.getLogger(__name__)
OUTCOME_SALT = "dejima.client.outcome"
OUTCOME_MAX_AGE = 600  # seconds a "committed …" banner link stays valid


def _page(request: HttpRequest, template: str, snap: Snapshot, status: int = 200, **extra: Any) -> HttpResponse:
    context = {"snap": snap, "peer_url": snap.config.peer_url_for_client, **extra}
    return render(request, f"client/{template}", context, status=status)


def _error_page(request: HttpRequest, snap: Snapshot, status: int, title: str, message: str) -> HttpResponse:
    return _page(request, "error.html", snap, status, title=title, message=message)


def _read_failure(request: HttpRequest, snap: Snapshot, exc: PeerUnavailable | QueryFailed) -> HttpResponse:
    status = exc.status if isinstance(exc, PeerUnavailable) else 502
    return _error_page(request, snap, status, "Cannot read from the peer", f"{exc}. Nothing was changed.")


def _unknown_table(request: HttpRequest, snap: Snapshot, table: str) -> HttpResponse:
    known = ", ".join(t.name for t in snap.tables)
    return _error_page(
        request, snap, 404, "No such table", f"unknown table {table!r}; this peer's base tables: {known}"
    )


def _table_url(table: TableInfo, outcome: Outcome | None = None) -> str:
    url = reverse("client-table", args=[table.name])
    if outcome is not None:
        token = signing.dumps({"ok": outcome.ok, "message": outcome.message, "gxid": outcome.gxid}, salt=OUTCOME_SALT)
        url += "?" + urlencode({"done": token})
    return url


def _done(request: HttpRequest) -> dict[str, Any] | None:
    token = request.GET.get("done")
    if not token:
        return None
    try:
        data = signing.loads(token, salt=OUTCOME_SALT, max_age=OUTCOME_MAX_AGE)
    except signing.BadSignature:
        return None
    return data if isinstance(data, dict) else None


def _with_retry_after(resp: HttpResponse, outcome: Outcome) -> HttpResponse:
    if outcome.retry_after:
        resp["Retry-After"] = outcome.retry_after
    return resp


def _fields(table: TableInfo, values: dict[str, Any], errors: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {"column": c, "value": display(values.get(c.name)), "errors": errors.get(c.name, [])} for c in table.editable
    ]


# ---- pages ----------------------------------------------------------------------------------------------------
@login_not_required
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    ctx = get_context()
    snap = ctx.snapshot()
    return JsonResponse(
        {
            "status": "ok",
            "mode": "client",
            "peer_url": ctx.config.peer_url_for_client,
            "peer": "reachable" if snap.status is not None else "unreachable",
            "peer_type": ctx.ptype.name,
        }
    )


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    ctx = get_context()
    snap = ctx.snapshot()
    counts: dict[str, int | None] = {}
    for table in snap.tables:
        try:
            counts[table.name] = ctx.count(table) if snap.status is not None else None
        except (PeerUnavailable, QueryFailed):
            counts[table.name] = None
    tables = [{"table": t, "count": counts[t.name]} for t in snap.tables]
    return _page(request, "home.html", snap, tables=tables)


@require_GET
def table_rows(request: HttpRequest, table: str) -> HttpResponse:
    ctx = get_context()
    snap = ctx.snapshot()
    info = snap.table(table)
    if info is None:
        return _unknown_table(request, snap, table)
    try:
        page = max(1, int(request.GET.get("page", "1")))
    except ValueError:
        page = 1
    try:
        rows, total = ctx.rows(info, PAGE_SIZE, (page - 1) * PAGE_SIZE)
    except (PeerUnavailable, QueryFailed) as exc:
        return _read_failure(request, snap, exc)
    shown = [{"id": r["id"], "cells": [r.get(c.name) for c in info.columns]} for r in rows]
    pages = max(1, -(-total // PAGE_SIZE))
    return _page(
        request,
        "table.html",
        snap,
        table=info,
        rows=shown,
        total=total,
        page=page,
        pages=pages,
        first=(page - 1) * PAGE_SIZE + 1 if rows else 0,
        last=(page - 1) * PAGE_SIZE + len(rows),
        done=_done(request),
    )


def _form_page(
    request: HttpRequest,
    snap: Snapshot,
    info: TableInfo,
    *,
    values: dict[str, Any],
    errors: dict[str, list[str]] | None = None,
    outcome: Outcome | None = None,
    row_id: int | None = None,
    originals: dict[str, Any] | None = None,
    status: int = 200,
) -> HttpResponse:
    errors = errors or {}
    fields = _fields(info, values, errors)
    if originals is not None:
        for f in fields:
            f["original"] = display(originals.get(f["column"].name))
    resp = _page(
        request,
        "row_form.html",
        snap,
        status,
        table=info,
        fields=fields,
        row_id=row_id,
        error_summary="; ".join(m for msgs in errors.values() for m in msgs),
        outcome=outcome,
    )
    return _with_retry_after(resp, outcome) if outcome else resp


@require_http_methods(["GET", "POST"])
def row_add(request: HttpRequest, table: str) -> HttpResponse:
    ctx = get_context()
    snap = ctx.snapshot()
    info = snap.table(table)
    if info is None:
        return _unknown_table(request, snap, table)
    if request.method != "POST":
        return _form_page(request, snap, info, values={})
    raw = form_data(info, request.POST)
    try:
        values = validate_row(info, {k: v for k, v in raw.items() if v is not None}, partial=False, strict=False)
    except RowInvalid as exc:
        return _form_page(request, snap, info, values=raw, errors=exc.errors, status=400)
    outcome = ctx.create(snap, info, values)
    if outcome.ok:
        return HttpResponseRedirect(_table_url(info, outcome), status=303)
    return _form_page(request, snap, info, values=raw, outcome=outcome, status=outcome.status)


@require_http_methods(["GET", "POST"])
def row_edit(request: HttpRequest, table: str, row_id: int) -> HttpResponse:
    ctx = get_context()
    snap = ctx.snapshot()
    info = snap.table(table)
    if info is None:
        return _unknown_table(request, snap, table)
    if request.method != "POST":
        try:
            row = ctx.row(info, row_id)
        except RowMissing:
            return _error_page(request, snap, 404, "No such row", f"row {row_id} of {info.name} does not exist")
        except (PeerUnavailable, QueryFailed) as exc:
            return _read_failure(request, snap, exc)
        return _form_page(request, snap, info, values=row, row_id=row_id, originals=row)
    raw = form_data(info, request.POST)
    originals = {c.name: request.POST.get(f"orig_{c.name}", "") for c in info.editable}
    # Only what the person changed is written: a concurrent change of another column is kept.
    changed = {k: v for k, v in raw.items() if display(v) != originals.get(k, "")}
    if not changed:
        return HttpResponseRedirect(
            _table_url(info, Outcome(True, 200, "committed", "nothing changed: the form had no edits")), status=303
        )
    try:
        values = validate_row(info, changed, partial=True, strict=False)
    except RowInvalid as exc:
        return _form_page(
            request, snap, info, values=raw, errors=exc.errors, row_id=row_id, originals=originals, status=400
        )
    try:
        outcome = ctx.update(snap, info, row_id, values)
    except RowMissing:
        return _error_page(request, snap, 404, "No such row", f"row {row_id} of {info.name} does not exist any more")
    except (PeerUnavailable, QueryFailed) as exc:
        return _read_failure(request, snap, exc)
    if outcome.ok:
        return HttpResponseRedirect(_table_url(info, outcome), status=303)
    return _form_page(
        request, snap, info, values=raw, outcome=outcome, row_id=row_id, originals=originals, status=outcome.status
    )


@require_http_methods(["GET", "POST"])
def row_delete(request: HttpRequest, table: str, row_id: int) -> HttpResponse:
    ctx: ClientContext = get_context()
    snap = ctx.snapshot()
    info = snap.table(table)
    if info is None:
        return _unknown_table(request, snap, table)
    try:
        row = ctx.row(info, row_id)
    except RowMissing:
        return _error_page(request, snap, 404, "No such row", f"row {row_id} of {info.name} does not exist")
    except (PeerUnavailable, QueryFailed) as exc:
        return _read_failure(request, snap, exc)
    cells = [{"column": c, "value": row.get(c.name)} for c in info.columns]
    if request.method != "POST":
        return _page(request, "confirm_delete.html", snap, table=info, row_id=row_id, cells=cells)
    try:
        outcome = ctx.delete(snap, info, row_id)
    except RowMissing:
        return _error_page(request, snap, 404, "No such row", f"row {row_id} of {info.name} does not exist any more")
    except (PeerUnavailable, QueryFailed) as exc:
        return _read_failure(request, snap, exc)
    if outcome.ok:
        return HttpResponseRedirect(_table_url(info, outcome), status=303)
    resp = _page(
        request, "confirm_delete.html", snap, outcome.status, table=info, row_id=row_id, cells=cells, outcome=outcome
    )
    return _with_retry_after(resp, outcome)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a form POST without a valid CSRF token (403), said plainly."""
    snap = get_context().snapshot()
    return _error_page(
        request,
        snap,
        403,
        "Form refused",
        "this form was not sent from this site's own page, or it expired; nothing was changed. "
        "Go back, reload the page and send it again.",
    )
