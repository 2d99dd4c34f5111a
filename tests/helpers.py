"""Small helpers for the integration tests: read views and base tables, put a view, read raw capture records.

Every statement is composed with `psycopg.sql` (identifiers) and placeholders (values); nothing is formatted into
SQL text.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql
from psycopg.rows import dict_row

from peer.cli import check_network
from peer.dejima.auth import sign_envelope
from peer.dejima.delta import RowChange, begin_global, take_changes
from peer.dejima.install import COMMON_SQL, SQL_ROOT
from peer.dejima.manifest import MANIFEST_NAME, PeerType, View, load_peer_types
from peer.dejima.sqlgen import write_all
from peer.network import LocalNetwork, PeerSpec, example_specs, free_port
from peer.pgserver import PgServer
from peer.testkit.proxy import empty_base_tables, settle

Row = dict[str, Any]
Conn = psycopg.Connection[Any]

# A peer type with a row filter and defaults, for the tests that need them (the shipped types have neither).
# students rows with university 'Hosei' are outside both views; dejima_grades does not carry university, so an
# insert through it takes the default 'Keio' (inside the filter).
SCHOOL_MANIFEST = """\
peer_type = "school"
description = "Test peer type: a row filter and defaults."

[tables.students.columns]
first_name = "text not null"
last_name = "text not null"
university = "text not null"
grade = "integer"
note = "text not null"
enrolled = "date"
credits = "integer"

[views.dejima_students]
table = "students"
columns = ["first_name", "last_name", "university", "grade"]
key = ["first_name", "last_name"]
members = ["school"]
filter = [{ column = "university", op = "<>", value = "Hosei" }]
defaults = { note = "none" }

[views.dejima_grades]
table = "students"
columns = ["first_name", "last_name", "grade"]
key = ["first_name", "last_name"]
members = ["school"]
filter = [{ column = "university", op = "<>", value = "Hosei" }]
defaults = { university = "Keio", note = "none", enrolled = "2020-04-01", credits = 0 }
"""


def make_peer_type_root(root: Path, manifests: Mapping[str, str]) -> Path:
    """A folder of peer types (name -> manifest text) with common.sql and freshly generated SQL."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SQL_ROOT / COMMON_SQL, root / COMMON_SQL)
    for name, text in manifests.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")
    write_all(root)
    return root


def peer_type(name: str, root: Path = SQL_ROOT) -> PeerType:
    return load_peer_types(root)[name]


def _sort_key(row: Mapping[str, Any], columns: Sequence[str]) -> tuple[tuple[bool, str, str], ...]:
    # Any deterministic total order will do (tests compare sorted lists): NULLs last, then by type and repr.
    return tuple((row[c] is None, type(row[c]).__name__, repr(row[c])) for c in columns)


def sort_rows(rows: Iterable[Mapping[str, Any]], key: Sequence[str]) -> list[Row]:
    """Rows sorted by `key` (then by all columns, for rows that share a key)."""
    out = [dict(r) for r in rows]
    return sorted(out, key=lambda r: (_sort_key(r, key), _sort_key(r, sorted(r))))


def view_rows(conn: Conn, view: str, key: Sequence[str] = ("first_name", "last_name")) -> list[Row]:
    """The rows of a dejima view (or any relation) as dicts, sorted by `key`."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("public", view)))
        return sort_rows(cur.fetchall(), key)


def base_rows(conn: Conn, table: str) -> list[Row]:
    """Every row of a base table (all columns, id included), sorted by id."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier("public", table)))
        return cur.fetchall()


def insert_rows(conn: Conn, relation: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """INSERT each row (a dict of column -> value) into a table or view."""
    with conn.cursor() as cur:
        for row in rows:
            cols = list(row)
            cur.execute(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    sql.Identifier("public", relation),
                    sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(sql.Placeholder() * len(cols)),
                ),
                [row[c] for c in cols],
            )


def _key_of(row: Mapping[str, Any], key: Sequence[str]) -> tuple[Any, ...]:
    return tuple(row[k] for k in key)


def _where_key(key: Sequence[str]) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in key)


def put_view(conn: Conn, view: str, key: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Make `view` equal `rows` with INSERT/UPDATE/DELETE on the view only (its putback triggers do the rest).

    Keys not in `rows` are deleted, rows whose key exists but whose values differ are updated by key, new keys
    are inserted. Every statement must touch exactly one view row.
    """
    target = {_key_of(r, key): dict(r) for r in rows}
    current = {_key_of(r, key): r for r in view_rows(conn, view, key)}
    name = sql.Identifier("public", view)
    with conn.cursor() as cur:
        for k in current.keys() - target.keys():
            cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(name, _where_key(key)), list(k))
            assert cur.rowcount == 1, f"DELETE of {k!r} from {view} touched {cur.rowcount} rows"
        for k in current.keys() & target.keys():
            new = target[k]
            if new == current[k]:
                continue
            cols = list(new)
            cur.execute(
                sql.SQL("UPDATE {} SET {} WHERE {}").format(
                    name,
                    sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in cols),
                    _where_key(key),
                ),
                [new[c] for c in cols] + list(k),
            )
            assert cur.rowcount == 1, f"UPDATE of {k!r} in {view} touched {cur.rowcount} rows"
    insert_rows(conn, view, (target[k] for k in target.keys() - current.keys()))


def touch_view(conn: Conn, view: str, columns: Sequence[str]) -> int:
    """UPDATE every row of the view setting each column to itself (a putback of the current view). Row count."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET {}").format(
                sql.Identifier("public", view),
                sql.SQL(", ").join(sql.SQL("{0} = {0}").format(sql.Identifier(c)) for c in columns),
            )
        )
        return cur.rowcount


def delta_records(conn: Conn, gxid: str | None = None) -> list[Row]:
    """The raw content of dejima.delta (one gxid, or all), in capture order, without removing it."""
    with conn.cursor(row_factory=dict_row) as cur:
        query = sql.SQL("SELECT gxid, view_name, row_id, old_row, new_row FROM dejima.delta {} ORDER BY seq")
        if gxid is None:
            cur.execute(query.format(sql.SQL("")))
        else:
            cur.execute(query.format(sql.SQL("WHERE gxid = %s")), (gxid,))
        return cur.fetchall()


_TOKENS: dict[tuple[int, str], bytes] = {}


def register(conn: Conn, gxid: str) -> bytes:
    """Register the connection's open transaction as part of `gxid` (`peer.dejima.delta.begin_global`), as the peer
    service does first thing; the token is kept for `taken` and returned."""
    token = begin_global(conn, gxid)
    _TOKENS[id(conn), gxid] = token
    return token


def taken(conn: Conn, gxid: str) -> list[RowChange]:
    """`take_changes` with the token `register` got for this connection and gxid."""
    return take_changes(conn, _TOKENS[id(conn), gxid])


def to_json_row(row: Mapping[str, Any]) -> Row:
    """A view row as the capture triggers record it (jsonb: dates as ISO strings)."""
    return {k: v.isoformat() if isinstance(v, datetime.date) else v for k, v in row.items()}


def project(rows: Iterable[Mapping[str, Any]], view: View) -> list[Row]:
    """What `view` shows of these base rows (no filter applied), sorted by its key."""
    return sort_rows(({c: r[c] for c in view.columns} for r in rows), view.key)


def relations(conn: Conn) -> list[tuple[str, str, str]]:
    """Every (schema, name, kind) of tables, views, indexes and sequences outside the system schemas."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'"
        " ORDER BY 1, 2"
    ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# Two peer types sharing a selection view (only students not at Hosei), for tests that add types as data.
UNIVERSITY = """\
peer_type = "university"
description = "A university registry; shares only the students not at Hosei."

[tables.student.columns]
first_name = "text not null"
last_name = "text not null"
university = "text"
email = "text not null"

[views.dejima_students]
table = "student"
columns = ["first_name", "last_name", "university"]
key = ["first_name", "last_name"]
members = ["university", "agency"]
filter = [{ column = "university", op = "<>", value = "Hosei" }]
defaults = { email = "unknown@example.org" }
"""

AGENCY = """\
peer_type = "agency"
description = "A recruiting agency: applicants and their university."

[tables.applicant.columns]
first_name = "text not null"
last_name = "text not null"
university = "text"
phone = "text"

[views.dejima_students]
table = "applicant"
columns = ["first_name", "last_name", "university"]
key = ["first_name", "last_name"]
members = ["university", "agency"]
"""


def claimed_sender(envelope: Mapping[str, Any]) -> str | None:
    """The peer a raw peer message says it comes from (sender, origin, asker or peer of its body)."""
    body = envelope.get("body")
    if not isinstance(body, dict):
        return None
    for field in ("sender", "origin", "asker", "peer"):
        if isinstance(body.get(field), str):
            return str(body[field])
    return None


def sign_as(net: LocalNetwork, peer: str, envelope: Mapping[str, Any]) -> dict[str, Any]:
    """A raw peer message signed with the key of `peer` of a LocalNetwork (the key file the network made)."""
    return sign_envelope(envelope, peer, net.key(peer))


def browser_session(url: str) -> requests.Session:
    """A requests.Session that says where its requests come from, as a browser does on a POST (`Origin`): over HTTPS
    (the kit's clients) Django's CSRF check refuses a POST that names neither its Origin nor a Referer."""
    session = requests.Session()
    session.headers["Origin"] = url.rstrip("/")
    return session


def start_peer_process(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a peer (or client) under gunicorn with `env` until it exits: for settings that must stop it."""
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"],
        env=dict(env),
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_client(net: LocalNetwork, state_dir: Path, name: str, peer_url: str) -> LocalNetwork:
    """A one-process LocalNetwork running the government client (PEER_MODE=client) against `peer_url`, with a token
    of that peer of `net` named after the client (`net.grant`; a URL of no peer of `net`: no token)."""
    env = {"DEJIMA_PEER_URL": peer_url, "DEJIMA_PEER_TIMEOUT": "20"}
    peer = net.peer_at(peer_url)
    if peer is not None:
        net.grant(peer, name)
        env["DEJIMA_PEER_TOKEN_FILE"] = str(net.token_path(name))
    else:
        env["DEJIMA_PEER_TOKEN"] = "dj_" + "x" * 43  # a well-formed token no peer knows
    spec = PeerSpec(
        name=name,
        peer_type="government",
        port=free_port(),
        database="",
        mode="client",
        env=env,
    )
    client = LocalNetwork(net.server, state_dir, [spec])
    client.start(name)
    try:
        client.wait_healthy(name, timeout=30)
    except Exception:
        client.stop_all()
        raise
    return client


def check(net: LocalNetwork) -> dict[str, Any]:
    """`dejima check` on the peers of a kit network, each asked with its API token."""
    urls = {name: spec.url for name, spec in net.specs.items() if spec.mode == "peer"}
    return check_network(urls, {name: net.auth_headers(name) for name in urls})


@contextlib.contextmanager
def running_example(
    pg_server: PgServer, state_dir: Path, env: dict[str, str] | None = None, prefix: str = "n"
) -> Iterator[LocalNetwork]:
    """The shipped example (government, bank, insurance) as real peer processes on free loopback ports, each peer
    with the settings `env`; stopped and its databases dropped at the end."""
    specs = example_specs(base_port=0, prefix=f"{prefix}{uuid.uuid4().hex[:6]}_")
    for spec in specs:
        spec.env.update(env or {})
    net = LocalNetwork(pg_server, state_dir, specs)
    try:
        net.start_all()
        net.wait_ready(timeout=60)
        yield net
    finally:
        net.stop_all()
        for spec in net.specs.values():
            pg_server.drop_database(spec.database)


def reset_network(net: LocalNetwork) -> None:
    """Empty every base table directly (no gxid: nothing is captured or propagated), once the peers have finished
    what they prepared (a COMMIT PREPARED landing afterwards would bring a row back)."""
    peers = [spec for spec in net.specs.values() if spec.mode == "peer"]
    for spec in peers:
        settle(spec.url, net.auth_headers(spec.name))
    for spec in peers:
        empty_base_tables(net.server.url(spec.database))


def fresh(net: LocalNetwork, request: pytest.FixtureRequest) -> Iterator[LocalNetwork]:
    """For a function-scoped fixture over a module's network: the peers a previous test stopped started again, the
    base tables empty; the peers' logs printed when the test failed."""
    for name, spec in net.specs.items():
        if not spec.pid:
            net.start(name)
    net.wait_ready(timeout=60)
    reset_network(net)
    yield net
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for name in net.specs:
            print(f"\n----- log of peer {name} -----\n{net.tail(name, 80)}")
