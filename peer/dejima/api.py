"""The client API's two hot endpoints, `POST /api/v1/exec` and `POST /api/v1/query`, as plain functions of the
decoded JSON body: run by their Django views (peer/dejima/views.py) and by the lean client listener
(DEJIMA_API_BIND, peer/dejima/peerserver.py), so both fronts check, answer and refuse exactly alike.

Each returns (HTTP status, the JSON answer's bytes, extra headers): 200 committed / the rows; 400 bad input or bad
SQL; 409 conflict (Retry-After) …, as in the table of peer/dejima/views.py.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads
from psycopg_pool import PoolTimeout

from peer.dejima import clientconn
from peer.dejima.coordinator import GlobalTxnError, client_error
from peer.dejima.runtime import get_runtime
from peer.dejima.sqlguard import session_state, transaction_control

Answer = tuple[int, bytes, dict[str, str]]


class BadInput(Exception):
    """The request is malformed or too large; nothing was done."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _json(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, default=str).encode()  # as Django's JsonResponse(…, {"default": str}) writes it


def error(
    status: int,
    message: str,
    kind: str = "bad_request",
    headers: dict[str, str] | None = None,
    sqlstate: str | None = None,
) -> Answer:
    body: dict[str, Any] = {"status": "error", "kind": kind, "error": message}
    if sqlstate:
        body["sqlstate"] = sqlstate  # PostgreSQL's code, when the client's own statement failed
    return status, _json(body), headers or {}


def statements(body: Any) -> list[str]:
    if not isinstance(body, dict) or set(body) - {"sql"}:
        raise BadInput(400, 'expected {"sql": "<statements>"} or {"sql": ["<statement>", …]}')
    stmts = body.get("sql")
    if isinstance(stmts, str):
        stmts = [stmts]
    if not isinstance(stmts, list) or not stmts or not all(isinstance(s, str) and s.strip() for s in stmts):
        raise BadInput(400, '"sql" must be a non-empty string or list of non-empty strings')
    control = transaction_control(stmts)
    if control is not None:
        raise BadInput(400, f"{control} is not allowed: the peer itself commits or aborts every request as a whole")
    state = session_state(stmts)
    if state is not None:
        raise BadInput(
            400,
            f"{state} is not allowed: it would outlive the request on the peer's pooled connection; "
            "use SET LOCAL (or set_config(…, true)) for this request's transaction only",
        )
    return stmts


def run_exec(body: Any) -> Answer:
    """Run the body's statements at this peer as one global transaction."""
    try:
        stmts = statements(body)
    except BadInput as exc:
        return error(exc.status, str(exc))
    try:
        outcome = get_runtime().coordinator.run(stmts)
    except GlobalTxnError as exc:
        retry = {"Retry-After": "1"} if exc.kind in ("conflict", "busy") else None
        return error(exc.status, str(exc), exc.kind, retry, exc.sqlstate)
    return 200, _json(outcome), {}


def run_query(body: Any) -> Answer:
    """Run the body's one read-only statement at this peer: {columns, rows}."""
    rt = get_runtime()
    try:
        stmts = statements(body)
    except BadInput as exc:
        return error(exc.status, str(exc))
    if len(stmts) != 1:
        return error(400, "query takes exactly one statement")
    rt.coordinator.settle()  # writes already committed whose COMMIT PREPARED is on its way here: wait for them
    timeout_s = rt.config.statement_timeout_ms / 1000
    try:
        # the client's statement runs under the client login (base tables and nothing else), bounded by the
        # watchdog: a SET TRANSACTION or set_config inside it can switch PostgreSQL's own timeouts off
        with rt.coordinator.client_pool.connection(timeout=5) as conn:
            conn.execute(_read_only_begin(rt.config.statement_timeout_ms))
            try:
                cur = conn.cursor()
                set_json_loads(json.loads, cur)  # a client's json/jsonb as before (a Decimal would answer as a string)
                with rt.coordinator.watchdog.guard(conn, time.monotonic() + timeout_s):
                    cur.execute(stmts[0].encode())
                columns = [d.name for d in cur.description or []]
                rows = [list(r) for r in cur.fetchall()] if cur.description else []
            finally:
                if not conn.broken:  # nothing it did is kept (even had it made its transaction writable), nor set
                    clientconn.rollback_and_clear(conn)
    except PoolTimeout:
        return error(503, f"{rt.config.name}: no database connection free for the query; try again", "busy")
    except psycopg.Error as exc:
        failure = client_error(rt.config.name, exc)
        status = 409 if failure.kind == "timeout" else failure.status
        return error(status, str(failure), failure.kind, None, failure.sqlstate)
    return 200, _json({"columns": columns, "rows": rows}), {}


@functools.cache
def _read_only_begin(statement_timeout_ms: int) -> bytes:
    """What opens a query's transaction, in one round trip (simple protocol): read only, with the statement timeout.
    SET LOCAL rather than set_config in a SELECT: a SELECT takes a snapshot, after which the client's own SET
    TRANSACTION (an isolation level) would be refused."""
    return (
        sql.SQL("BEGIN READ ONLY; SET LOCAL statement_timeout = {}")
        .format(sql.Literal(f"{statement_timeout_ms}ms"))
        .as_bytes(None)
    )
