"""A client's SQL runs with no more privilege than the base tables need (issue: trust boundaries, part 1).

Every attack a client with a valid write credential could try through `/api/v1/exec` or `/api/v1/query`, on a
real network of three peers: it is refused with a 4xx naming why (a PostgreSQL permission error is 403 `forbidden`),
nothing changed at any peer, the peer keeps serving, and a normal write afterwards still reaches every peer. The
boundary is the database's role system (peer/dejima/install.py, docs/security.md), not a statement filter: the
attacks reach around any parser (functions, DO blocks, set_config).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql

from peer.dejima.install import InstallError, install
from peer.network import LocalNetwork, db_roles, example_specs
from peer.pgserver import PgServer
from tests.helpers import fresh, running_example, start_peer_process, wait_until

pytestmark = pytest.mark.cluster

TXN_TIMEOUT_S = 3.0  # short, so the attack that switches PostgreSQL's timeouts off is over quickly
PEERS = ("government", "bank", "insurance")


@pytest.fixture(scope="module")
def trust_network(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    env = {"DEJIMA_TXN_TIMEOUT": str(TXN_TIMEOUT_S), "DEJIMA_STATEMENT_TIMEOUT_MS": "3000"}
    with running_example(pg_server, tmp_path_factory.mktemp("trust"), env, prefix="t") as net:
        yield net


@pytest.fixture
def net(trust_network: LocalNetwork, request: pytest.FixtureRequest) -> Iterator[LocalNetwork]:
    yield from fresh(trust_network, request)


# ---- helpers ----------------------------------------------------------------------------------------------------


def headers(net: LocalNetwork, name: str) -> dict[str, str]:
    """What a client of the kit sends with every request: its API token."""
    return net.auth_headers(name)


def call(net: LocalNetwork, name: str, path: str, statements: str | list[str]) -> tuple[int, dict[str, Any]]:
    resp = requests.post(
        net.specs[name].url + path, json={"sql": statements}, headers=headers(net, name), timeout=TXN_TIMEOUT_S + 20
    )
    return resp.status_code, resp.json()


def exec_sql(net: LocalNetwork, name: str, statements: str | list[str]) -> tuple[int, dict[str, Any]]:
    return call(net, name, "/api/v1/exec", statements)


def query(net: LocalNetwork, name: str, statement: str) -> tuple[int, dict[str, Any]]:
    return call(net, name, "/api/v1/query", statement)


def admin(net: LocalNetwork, name: str) -> psycopg.Connection[Any]:
    """The kit's superuser connection to a peer's database (never a peer's own login)."""
    return psycopg.connect(net.server.url(net.specs[name].database), autocommit=True)


def quiet(net: LocalNetwork) -> None:
    """Every peer finished what it prepared and chained its staged log entries (reading the log seals them)."""
    for name, spec in net.specs.items():
        resp = requests.get(spec.url + "/api/v1/txlog?limit=0", headers=headers(net, name), timeout=10)
        assert resp.status_code == 200, resp.text


def state(net: LocalNetwork) -> dict[str, Any]:
    """Everything an attack could change at any peer (once it is quiet): the rows of every base table, the log, the
    triggers and whether they are enabled, the protocol's tables."""
    quiet(net)
    out: dict[str, Any] = {}
    for name in PEERS:
        with admin(net, name) as conn:
            tables = conn.execute(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('public', 'dejima')"
                " AND tablename NOT IN ('peers', 'groups', 'state', 'installed') ORDER BY 1, 2"
            ).fetchall()
            for schema, table in tables:
                rows = conn.execute(
                    sql.SQL("SELECT to_jsonb(t)::text FROM {} AS t ORDER BY 1").format(sql.Identifier(schema, table))
                ).fetchall()
                out[f"{name}.{schema}.{table}"] = [r[0] for r in rows]
            out[f"{name}.triggers"] = conn.execute(
                "SELECT tgrelid::regclass::text, tgname, tgenabled::text FROM pg_trigger WHERE NOT tgisinternal"
                " ORDER BY 1, 2"
            ).fetchall()
            out[f"{name}.functions"] = conn.execute(
                "SELECT p.oid::regprocedure::text, md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n"
                " ON n.oid = p.pronamespace WHERE n.nspname IN ('public', 'dejima') ORDER BY 1"
            ).fetchall()
    return out


def person(first: str, phone: str = "555-0100") -> str:
    return (
        sql.SQL(
            "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
            " VALUES ({}, 'Trust', {}, '1 Main St', '1980-01-01')"
        )
        .format(sql.Literal(first), sql.Literal(phone))
        .as_string(None)
    )


def still_serves(net: LocalNetwork) -> None:
    """A normal write at government reaches bank (phone) and insurance (birthdate) and the views agree."""
    first = f"Ok{uuid.uuid4().hex[:6]}"
    status, body = exec_sql(net, "government", person(first))
    assert status == 200 and body["status"] == "committed", body
    assert sorted(body["participants"]) == ["bank", "insurance"], body
    for peer, table in (("bank", "bank_users"), ("insurance", "insurance_users")):
        statement = sql.SQL("SELECT count(*) FROM {} WHERE first_name = {}").format(
            sql.Identifier(table), sql.Literal(first)
        )
        status, rows = query(net, peer, statement.as_string(None))
        assert status == 200 and rows["rows"] == [[1]], (peer, rows)


def refused(
    net: LocalNetwork,
    peer: str,
    statements: str | list[str],
    status: int = 403,
    kind: str = "forbidden",
    sqlstate: str | None = "42501",
    path: str = "/api/v1/exec",
) -> dict[str, Any]:
    """The attack is refused with `status`/`kind` (and PostgreSQL's `sqlstate`), changes nothing anywhere, and the
    network goes on serving."""
    before = state(net)
    code, body = call(net, peer, path, statements)
    assert (code, body.get("kind")) == (status, kind), body
    if sqlstate is not None:
        assert body.get("sqlstate") == sqlstate, body
    assert state(net) == before
    still_serves(net)
    return body


# ---- the attacks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
def test_copy_to_program_is_refused(net: LocalNetwork, path: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # were the program run, the database server's user could write here
    marker = tmp_path / "owned"
    body = refused(net, "bank", f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'", path=path)
    assert "pg_execute_server_program" in body["error"] or "permission denied" in body["error"], body
    assert not marker.exists()


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TRIGGER dejima_capture_ins ON bank_users",
        "ALTER TABLE bank_users DISABLE TRIGGER dejima_capture_ins",
        "ALTER TABLE bank_users DISABLE TRIGGER ALL",
        "DROP VIEW dejima_bank",
        "CREATE OR REPLACE FUNCTION dejima.capture_bank_users_ins() RETURNS trigger LANGUAGE plpgsql"
        " AS $f$ BEGIN RETURN NULL; END $f$",
        "ALTER FUNCTION dejima.take_delta(bytea) SECURITY INVOKER",
    ],
    ids=["drop-trigger", "disable-trigger", "disable-all-triggers", "drop-view", "replace-capture", "alter-function"],
)
def test_the_machinery_cannot_be_switched_off(net: LocalNetwork, statement: str) -> None:
    refused(net, "bank", [statement, "UPDATE bank_users SET risk_factor = 9"])


@pytest.mark.parametrize(
    "statement",
    [
        "SET LOCAL session_replication_role = replica",
        "SELECT set_config('session_replication_role', 'replica', true)",
        "SELECT set_config('session_replication_role', 'replica', false)",
    ],
    ids=["set-local", "set-config-local", "set-config-session"],
)
def test_replica_mode_cannot_be_switched_on(net: LocalNetwork, statement: str) -> None:
    """With session_replication_role = replica the triggers would not fire: a write would commit here and reach
    nobody (and set for the session, it would poison the pooled connection for every later client)."""
    refused(net, "government", [statement, person("Replica")])
    refused(net, "government", statement, path="/api/v1/query")


def test_setting_the_gxid_of_earlier_versions_changes_nothing(net: LocalNetwork) -> None:
    """The capture no longer reads a setting a client can change: a write with the old setting emptied is captured
    and reaches its partners like any other."""
    status, body = exec_sql(net, "government", ["SELECT set_config('dejima.gxid', '', true)", person("Gx")])
    assert status == 200 and sorted(body["participants"]) == ["bank", "insurance"], body
    status, rows = query(net, "bank", "SELECT phone FROM bank_users WHERE first_name = 'Gx'")
    assert rows["rows"] == [["555-0100"]], rows


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM dejima.txlog WHERE seq = (SELECT max(seq) FROM dejima.txlog)",
        "UPDATE dejima.txlog SET views = '{}'",
        "INSERT INTO dejima.decisions (gxid, participants) VALUES ('bank.1.x', '{}')",
        "DELETE FROM dejima.delta",
        "INSERT INTO dejima.delta (gxid, view_name, row_id, new_row) VALUES ('x', 'dejima_risk', 1, '{}')",
        "DELETE FROM dejima.active",
        "UPDATE dejima.peers SET url = 'http://127.0.0.1:1'",
        "SELECT count(*) FROM dejima.api_tokens",
    ],
    ids=[
        "truncate-log",
        "rewrite-log",
        "forge-decision",
        "swallow-delta",
        "forge-delta",
        "unregister",
        "peers",
        "tokens",
    ],
)
def test_the_protocols_tables_are_out_of_reach(net: LocalNetwork, statement: str) -> None:
    still_serves(net)  # the logs hold an entry
    refused(net, "bank", ["UPDATE bank_users SET risk_factor = 3", statement])


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM dejima.take_delta('\\x00'::bytea)",
        "SELECT dejima.end_global('\\x00'::bytea, NULL, NULL, NULL, NULL)",
        "SELECT dejima.commit_point('\\x00'::bytea, '{}', 'bank', NULL, NULL)",
        "SELECT dejima.begin_global('bank.1.forged', sha256('x'))",
        "SELECT dejima.own_gxid('\\x00'::bytea)",
    ],
    ids=["take-delta", "end-global", "commit-point", "begin-global", "own-gxid"],
)
def test_the_transaction_functions_need_the_peers_token(net: LocalNetwork, statement: str) -> None:
    """The functions a global transaction's database transaction calls (they run as the owner) are the client's to
    call, in the very transaction its statements run in: without the token only the peer knows, they refuse."""
    refused(net, "bank", ["UPDATE bank_users SET risk_factor = 4", statement])


@pytest.mark.parametrize(
    "statement",
    ["SET LOCAL ROLE {peer}", "SELECT set_config('role', '{peer}', true)", "SET LOCAL SESSION AUTHORIZATION {peer}"],
    ids=["set-local-role", "set-config-role", "session-authorization"],
)
def test_the_client_cannot_become_a_stronger_role(net: LocalNetwork, statement: str) -> None:
    peer_login = f"{net.specs['bank'].database}_peer"
    refused(net, "bank", [statement.format(peer=peer_login), "DELETE FROM dejima.txlog"])


def test_a_plain_set_role_is_refused_as_session_state(net: LocalNetwork) -> None:
    refused(net, "bank", "RESET ROLE", status=400, kind="bad_request", sqlstate=None)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TEMP TABLE stash (a int)",
        "CREATE TABLE public.stash (a int)",
        "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE SCHEMA stash",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT lo_import('/etc/passwd')",
        "TRUNCATE bank_users",
        "CREATE TRIGGER t AFTER INSERT ON bank_users FOR EACH ROW EXECUTE FUNCTION dejima.current_gxid()",
    ],
    ids=["temp-table", "table", "function", "schema", "read-file", "lo-import", "truncate", "trigger"],
)
def test_nothing_but_the_base_tables(net: LocalNetwork, statement: str) -> None:
    refused(net, "bank", statement)


def test_transaction_control_inside_a_do_block_is_the_clients_bad_sql(net: LocalNetwork) -> None:
    body = refused(net, "bank", "DO $$ BEGIN COMMIT; END $$", status=400, kind="bad_sql", sqlstate="2D000")
    assert "bank:" in body["error"]


def test_a_failing_statement_of_the_client_is_bad_sql_with_postgresqls_code(net: LocalNetwork) -> None:
    body = refused(net, "bank", "SELEC 1", status=400, kind="bad_sql", sqlstate="42601")
    assert "syntax error" in body["error"]
    body = refused(
        net, "bank", "DO $$ BEGIN RAISE EXCEPTION 'no'; END $$", status=400, kind="bad_sql", sqlstate="P0001"
    )
    assert "no" in body["error"]


def test_settings_a_client_makes_for_its_transaction_do_not_reach_the_protocol(net: LocalNetwork) -> None:
    """After the client's statements the peer puts back the timeouts, the durability of the commit point and the
    search path for the rest of the transaction; what it cannot put back (a read-only transaction) fails as the
    client's bad SQL, with nothing changed."""
    status, body = exec_sql(
        net,
        "government",
        [
            person("Settings"),
            "SET LOCAL statement_timeout = '1ms'",
            "SET LOCAL lock_timeout = '1ms'",
            "SET LOCAL synchronous_commit = off",
            "SET LOCAL search_path = pg_temp",
        ],
    )
    assert status == 200 and sorted(body["participants"]) == ["bank", "insurance"], body
    refused(net, "government", [person("ReadOnly"), "SET TRANSACTION READ ONLY"], 400, "bad_sql", "25006")


def test_session_state_a_client_leaves_is_cleared(net: LocalNetwork) -> None:
    """set_config(…, false) and session advisory locks outlive a transaction on a pooled connection: the peer clears
    them when the connection comes back, so no later request runs with them."""
    poison = (
        "SELECT set_config('default_transaction_read_only', 'on', false),"
        " set_config('search_path', 'pg_catalog', false), pg_advisory_lock(4242)"
    )
    for _ in range(3):  # several pooled connections
        status, body = query(net, "government", poison)
        assert status == 200, body
        status, body = exec_sql(net, "government", poison)
        assert status == 200, body
    with admin(net, "government") as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
    for _ in range(5):
        still_serves(net)
        status, body = query(net, "government", "SHOW default_transaction_read_only")
        assert body["rows"] == [["off"]], body


def test_a_client_cannot_switch_the_timeouts_off_to_hold_the_peer(net: LocalNetwork) -> None:
    """PostgreSQL's own timeouts are settings the client may change; the peer's watchdog still cancels its statement
    at the transaction's deadline."""
    started = time.monotonic()
    code, body = exec_sql(
        net, "bank", ["SET LOCAL statement_timeout = 0", "SET LOCAL lock_timeout = 0", "SELECT pg_sleep(60)"]
    )
    assert (code, body["kind"]) == (504, "timeout"), body
    assert time.monotonic() - started < TXN_TIMEOUT_S + 10
    started = time.monotonic()
    code, body = query(net, "bank", "SELECT pg_sleep(60)")
    assert code == 409 and body["kind"] == "timeout", body
    assert time.monotonic() - started < 3 + 10
    still_serves(net)


def test_a_sql_ascii_database_is_refused_at_start(net: LocalNetwork, tmp_path: Path) -> None:
    """A C-locale server an operator brings makes SQL_ASCII databases easily: the peer refuses one, naming it."""
    name = f"ascii_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
    spec = example_specs(base_port=0, prefix="")[1]
    spec.name, spec.database = "ascii", name
    alone = LocalNetwork(net.server, tmp_path / "ascii", [spec])
    try:
        with pytest.raises(InstallError, match=f"database {name} is encoded SQL_ASCII; a peer needs UTF8"):
            alone.install("ascii")
        # its logins made in a UTF8 database (roles belong to the server): the peer itself refuses the database
        utf8 = f"{name}_utf8"
        net.server.create_database(utf8)
        install(net.server.url(utf8), "bank", roles=db_roles(name, alone.db_password()))
        done = start_peer_process({**alone.env_for(spec), "DEJIMA_BIND": "127.0.0.1:0"})
        assert done.returncode != 0
        assert f"DEJIMA_DATABASE_URL: database {name} is encoded SQL_ASCII; the peer needs UTF8" in done.stderr
    finally:
        net.server.drop_database(name)
        net.server.drop_database(f"{name}_utf8")


def test_the_pool_and_the_log_survive_every_attack(net: LocalNetwork) -> None:
    """After a burst of refused attacks (each on a pooled connection), the peer answers, and `dejima check` finds
    every view identical, every log intact and the machinery whole."""
    from peer.cli import check_network

    everyone = {n: net.auth_headers(n) for n in net.specs}
    for _ in range(3):
        for statement in (
            "SELECT set_config('session_replication_role', 'replica', false)",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "DELETE FROM dejima.txlog",
        ):
            exec_sql(net, "bank", statement)
            query(net, "bank", statement)
    still_serves(net)
    report = wait_until(
        lambda: (r := check_network({n: s.url for n, s in net.specs.items()}, everyone))["ok"] and r,
        timeout=20,
        what="a clean dejima check",
    )
    assert report["damaged_machinery"] == []
