"""Adversarial input, the part of the hand list tests/test_api_input.py and tests/test_auth.py do not cover yet:
transaction control and session state (a plain SET, RESET, …) smuggled into /api/v1/exec and /api/v1/query,
SQL-injection strings in identifiers (view, table and column names) and in values, an oversized body at the client,
and a delta that breaks a UNIQUE or NOT NULL constraint only a receiver has. Every refusal is checked against the
databases: nothing applied anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
import requests

from peer.dejima.sqlguard import session_state, statement_heads, transaction_control
from peer.network import LocalNetwork
from tests.test_api_input import (
    PEERS,
    assert_nothing_applied,
    base_rows,
    person,
    post,
    propagate,
    sent_messages,
    url,
)

TIMEOUT = 30
INJECTIONS = ["x'; DROP TABLE bank_users; --", 'x"; DROP TABLE bank_users; --', "1 OR 1=1", "$$; COMMIT; $$"]


# ---- transaction control -------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("COMMIT", "COMMIT"),
        ("insert into t values (1); commit", "COMMIT"),
        ("-- a comment\n/* nested /* */ begin */ rollback", "ROLLBACK"),
        ("prepare transaction 'x'", "PREPARE TRANSACTION"),
        ("start transaction", "START"),
        ("SAVEPOINT a", "SAVEPOINT"),
        ("SELECT 'COMMIT'; SELECT 1", None),
        ('SELECT "a;commit" FROM t', None),
        ("SELECT $q$ ; COMMIT $q$", None),
        ("SELECT E'\\'; COMMIT'", None),
        ("SELECT 1 -- ; COMMIT", None),
        ("DO $$ BEGIN COMMIT; END $$", None),  # PostgreSQL refuses this one inside a transaction block
        ("PREPARE p AS SELECT 1", None),
        ("UPDATE t SET x = 1 WHERE begin = 2", None),
        ("\u00ff\u00f83 ; commit", "COMMIT"),  # found by schemathesis: a non-ASCII letter once failed the lexer (500)
    ],
)
def test_it_finds_transaction_control_only_at_the_start_of_a_statement(sql: str, found: str | None) -> None:
    assert transaction_control([sql]) == found, statement_heads(sql)


INSERT = "INSERT INTO bank_users (first_name, last_name) VALUES ('Tx', 'Control')"


@pytest.mark.cluster
@pytest.mark.parametrize(
    "statements",
    [
        [INSERT, "COMMIT", "INSERT INTO bank_users (first_name) VALUES ('fails')"],
        [f"{INSERT}; COMMIT; INSERT INTO nope VALUES (1)"],  # noqa: S608
        [INSERT, "ROLLBACK"],
        [INSERT, "PREPARE TRANSACTION 'evil'"],
        ["BEGIN", INSERT],
        ["SAVEPOINT a", INSERT, "ROLLBACK TO SAVEPOINT a"],
        [INSERT, "END"],
    ],
    ids=["commit-then-fail", "commit-in-one-string", "rollback", "prepare", "begin", "savepoint", "end"],
)
def test_it_refuses_transaction_control_in_exec_and_applies_nothing(
    network: LocalNetwork, statements: list[str]
) -> None:
    sent = sent_messages(network)
    status, answer = network.exec("bank", statements)
    assert status == 400, answer
    assert "is not allowed" in answer["error"], answer
    assert_nothing_applied(network, sent)


@pytest.mark.cluster
def test_it_refuses_transaction_control_in_a_query(network: LocalNetwork) -> None:
    status, answer = post(network, "bank", "/api/v1/query", {"sql": f"COMMIT; {INSERT}"})
    assert status == 400, answer
    assert "COMMIT is not allowed" in answer["error"], answer
    assert_nothing_applied(network)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("SET search_path TO evil", "SET SEARCH_PATH"),
        ("select 1; set session statement_timeout = 0", "SET SESSION"),
        ("SET ROLE postgres", "SET ROLE"),
        ("SET TIME ZONE 'UTC'", "SET TIME"),
        ("RESET ALL", "RESET"),
        ("DISCARD PLANS", "DISCARD"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("DEALLOCATE ALL", "DEALLOCATE"),
        ("LISTEN channel", "LISTEN"),
        ("LOAD 'plugin'", "LOAD"),
        ("SET LOCAL statement_timeout = '1s'", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("SET CONSTRAINTS ALL DEFERRED", None),
        ("PREPARE TRANSACTION 'x'", None),  # transaction control: refused by transaction_control
        ("UPDATE t SET x = 1", None),
        ("SELECT 'SET search_path TO x'", None),
        ("SELECT set_config('search_path', 'x', true)", None),
    ],
)
def test_it_finds_statements_that_would_leave_state_on_the_session(sql: str, found: str | None) -> None:
    assert session_state([sql]) == found, statement_heads(sql)


@pytest.mark.cluster
@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
def test_it_refuses_session_state_and_leaves_later_requests_as_they_were(network: LocalNetwork, path: str) -> None:
    sent = sent_messages(network)
    status, answer = post(network, "bank", path, {"sql": ["SET search_path TO pg_catalog", INSERT]})
    assert status == 400, answer
    assert "SET SEARCH_PATH is not allowed" in answer["error"], answer
    assert "SET LOCAL" in answer["error"], answer
    assert_nothing_applied(network, sent)
    for _ in range(4):  # whatever pooled connection serves it
        assert network.query("bank", "SHOW search_path") == [{"search_path": '"$user", public'}]


# ---- SQL injection in identifiers and values ----------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("name", INJECTIONS)
def test_an_injected_view_name_is_an_unknown_view(network: LocalNetwork, name: str) -> None:
    resp = requests.get(
        url(network, "bank", "/api/v1/views/" + quote(name, safe="")), headers=network.auth_headers("bank"), timeout=10
    )
    assert resp.status_code == 404, resp.text
    assert resp.json()["kind"] in ("bad_request", "not_found"), resp.text
    assert_nothing_applied(network)


@pytest.mark.cluster
@pytest.mark.parametrize("limit", ["1; DROP TABLE dejima.txlog", "1 OR 1=1", "-1", "1e3"])
def test_an_injected_txlog_limit_is_refused(network: LocalNetwork, limit: str) -> None:
    resp = requests.get(
        url(network, "bank", "/api/v1/txlog"), params={"limit": limit}, headers=network.auth_headers("bank"), timeout=10
    )
    assert resp.status_code == 400, resp.text
    assert_nothing_applied(network)


@pytest.mark.cluster
@pytest.mark.parametrize("column", INJECTIONS)
def test_a_propagate_with_an_injected_column_name_is_refused(network: LocalNetwork, column: str) -> None:
    sent = sent_messages(network)
    status, answer = post(network, "government", "/peer/v1/message", propagate("dejima_bank", [person(**{column: 1})]))
    if column.startswith("$"):  # read as a marker: the coordinator votes no
        assert status == 200, answer
        assert answer["body"]["vote"] == "no", answer
        assert "unknown marker" in answer["body"]["error"], answer
    else:  # a column outside the view: refused at the door
        assert status == 403, answer
        assert "is not a column of dejima_bank" in answer["error"], answer
    assert_nothing_applied(network, sent)


@pytest.mark.cluster
def test_injected_values_are_stored_verbatim_everywhere(network: LocalNetwork) -> None:
    for i, value in enumerate(INJECTIONS):
        status, answer = post(
            network,
            "bank",
            "/api/v1/exec",
            {
                "sql": "INSERT INTO bank_users (first_name, last_name, address) "  # noqa: S608
                f"VALUES ('Inj{i}', 'Ection', {psycopg.sql.Literal(value).as_string()})"
            },
        )
        assert status == 200, answer
    expected = sorted((f"Inj{i}", v) for i, v in enumerate(INJECTIONS))
    for peer, rows in base_rows(network).items():  # address is the fifth column of every example base table
        assert sorted((r[1], r[4]) for r in rows) == expected, (peer, rows)


# ---- the client: injection in table and column names, an oversized body ---------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("name", INJECTIONS)
def test_the_client_refuses_injected_table_and_column_names(
    network: LocalNetwork, government_client: tuple[str, str], name: str
) -> None:
    base, password = government_client
    auth = ("admin", password)
    table = quote(name, safe="")
    resp = requests.post(f"{base}/client/api/v1/tables/{table}/rows", json={"first_name": "a"}, auth=auth, timeout=30)
    assert resp.status_code == 404, resp.text
    row = {"first_name": "Jane", "last_name": "Roe", name: "1"}
    resp = requests.post(f"{base}/client/api/v1/tables/government_users/rows", json=row, auth=auth, timeout=30)
    assert resp.status_code == 400, resp.text
    assert name in resp.json()["fields"], resp.text
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_the_client_refuses_an_oversized_or_malformed_body_with_4xx(
    network: LocalNetwork, government_client: tuple[str, str]
) -> None:
    base, password = government_client
    rows = f"{base}/client/api/v1/tables/government_users/rows"
    big = json.dumps({"first_name": "Big", "last_name": "Body", "address": "x" * 3_000_000})
    for data in (big, "{bad", "", json.dumps(["first_name"]), json.dumps("Jane")):
        resp = requests.post(
            rows, data=data, auth=("admin", password), headers={"Content-Type": "application/json"}, timeout=30
        )
        assert 400 <= resp.status_code < 500, (data[:20], resp.status_code, resp.text[:300])
        assert resp.json()["status"] == "error", resp.text[:300]
    assert_nothing_applied(network)


# ---- a delta that breaks a constraint only a receiver has ---------------------------------------------------------


@pytest.fixture
def insurance_constraint(network: LocalNetwork, request: pytest.FixtureRequest) -> Iterator[tuple[LocalNetwork, str]]:
    """A UNIQUE (address) or NOT NULL (address) constraint only insurance has, on its base table."""
    kind = request.param
    dsn = network.server.url(network.specs["insurance"].database)
    ddl = {
        "unique": "ALTER TABLE insurance_users ADD CONSTRAINT test_unique_address UNIQUE (address)",
        "not-null": "ALTER TABLE insurance_users ADD CONSTRAINT test_address_given CHECK (address IS NOT NULL)",
    }[kind]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
    try:
        yield network, kind
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE insurance_users DROP CONSTRAINT IF EXISTS test_unique_address")
            conn.execute("ALTER TABLE insurance_users DROP CONSTRAINT IF EXISTS test_address_given")


@pytest.mark.cluster
@pytest.mark.parametrize("insurance_constraint", ["unique", "not-null"], indirect=True)
@pytest.mark.parametrize("origin", ["government", "bank"], ids=["one-hop", "two-hops"])
def test_a_delta_breaking_a_receivers_constraint_aborts_everywhere_naming_peer_and_constraint(
    insurance_constraint: tuple[LocalNetwork, str], origin: str
) -> None:
    net, kind = insurance_constraint
    table = f"{origin}_users"
    if kind == "unique":
        status, answer = net.exec(
            "government",
            "INSERT INTO government_users (first_name, last_name, address) VALUES ('Ann', 'Taken', '1 Same St')",
        )
        assert status == 200, answer
        before = base_rows(net)
        statement = f"INSERT INTO {table} (first_name, last_name, address) VALUES ('Bob', 'Same', '1 Same St')"  # noqa: S608
        constraint = "test_unique_address"
    else:
        before = base_rows(net)
        statement = f"INSERT INTO {table} (first_name, last_name) VALUES ('No', 'Address')"  # noqa: S608
        constraint = "test_address_given"
    sent = sent_messages(net)
    status, answer = net.exec(origin, statement)
    assert status == 422, answer
    assert answer["kind"] == "constraint", answer
    assert "insurance:" in answer["error"], answer
    assert constraint in answer["error"], answer
    assert sent_messages(net) > sent, "the delta never reached insurance"
    assert base_rows(net) == before
    for peer in PEERS:
        assert net.get(peer, "/api/v1/prepared")["prepared"] == [], peer
    if kind == "not-null":
        assert_nothing_applied(net)
