"""Cluster tier: the acceptance scenarios A1-A15 (docs/scenarios.md) on the shipped example, through the REST API.

Each test asserts the "expected afterwards" column of its scenario, then that `dejima check` is ok (every dejima
view identical across its group, no prepared transaction left) and that no global transaction is still open.

Ids: before each test every peer's id sequence is moved to its own range (government 1001…, bank 2001…,
insurance 3001…), so a row's id shows which sequence gave it: ids never travel between peers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql

from peer.dejima.config import load_config
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import load_peer_types
from peer.network import LocalNetwork
from peer.pgserver import PgServer
from tests.helpers import check, wait_until
from tests.proxy import ProxiedCluster

pytestmark = pytest.mark.cluster

PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
FIRST_ID = {"government": 1001, "bank": 2001, "insurance": 3001}
TYPES = load_peer_types(SQL_ROOT)
# the example network sets no DEJIMA_* timeout, so every peer runs with the defaults
TXN_TIMEOUT = load_config(
    {
        "PEER_TYPE": "bank",
        "DEJIMA_DATABASE_URL": "postgresql://localhost/x",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@localhost/x",
        "DEJIMA_DEBUG": "1",
    }
).txn_timeout

INSERT_JANE = (
    "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
    " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')"
)
INSERT_JOHN = (
    "INSERT INTO bank_users (first_name, last_name, iban, address, phone)"
    " VALUES ('John', 'Doe', 'DE89', '1 Main St', '555-0100')"
)


def default_of(peer_type: str, view: str, column: str) -> Any:
    """The manifest default a putback through `view` gives `column` (NULL when the manifest names none)."""
    return TYPES[peer_type].view(view).default_for(column)


# ---- helpers ----------------------------------------------------------------------------------------------------


def write(net: LocalNetwork, peer: str, statements: str | list[str]) -> dict[str, Any]:
    """Run a client write at `peer`; it must commit."""
    status, body = net.exec(peer, statements)
    assert (status, body.get("status")) == (200, "committed"), body
    answer: dict[str, Any] = body
    return answer


def rows(net: LocalNetwork, peer: str) -> list[dict[str, Any]]:
    """Every row of the peer's base table, by id."""
    return net.query(peer, f"SELECT * FROM {TABLES[peer]} ORDER BY id")  # noqa: S608  (fixed table names)


def everything(net: LocalNetwork) -> dict[str, list[dict[str, Any]]]:
    return {peer: rows(net, peer) for peer in PEERS}


def status_of(net: LocalNetwork, peer: str) -> dict[str, Any]:
    st: dict[str, Any] = net.get(peer, "/api/v1/status")
    return st


def stats(net: LocalNetwork) -> dict[str, dict[str, int]]:
    return {peer: dict(status_of(net, peer)["stats"]) for peer in PEERS}


def messages(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, tuple[int, int]]:
    """Per peer: (propagate messages sent, received) between two `stats` snapshots."""
    return {
        peer: (
            after[peer]["propagate_sent"] - before[peer]["propagate_sent"],
            after[peer]["propagate_received"] - before[peer]["propagate_received"],
        )
        for peer in PEERS
    }


def assert_network_ok(net: LocalNetwork) -> None:
    """`dejima check` is ok and no global transaction is left open at any peer."""
    wait_until(
        lambda: all(status_of(net, p)["open_transactions"] == 0 for p in PEERS), 10, "open global transactions to end"
    )
    report = check(net)
    assert report["ok"], report


def set_next_ids(net: LocalNetwork) -> None:
    """Move every peer's id sequence to its own range (directly in its database: no global transaction)."""
    for peer in PEERS:
        with psycopg.connect(net.server.url(net.specs[peer].database), autocommit=True) as conn:
            conn.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, false)", (TABLES[peer], FIRST_ID[peer]))


@pytest.fixture
def net(network: LocalNetwork) -> LocalNetwork:
    set_next_ids(network)
    return network


def a1(net: LocalNetwork) -> dict[str, Any]:
    return write(net, "government", INSERT_JANE)


def a2(net: LocalNetwork) -> dict[str, Any]:
    return write(net, "bank", INSERT_JOHN)


# ---- A1-A11 -----------------------------------------------------------------------------------------------------


def test_it_copies_a_government_insert_to_bank_and_insurance_a1(net: LocalNetwork) -> None:
    body = a1(net)

    assert body["participants"] == ["bank", "insurance"]
    assert everything(net) == {
        "government": [
            {
                "id": 1001,
                "first_name": "Jane",
                "last_name": "Roe",
                "phone": "555-0199",
                "address": "2 Elm St",
                "birthdate": "1980-05-17",
            }
        ],
        "bank": [
            {
                "id": 2001,
                "first_name": "Jane",
                "last_name": "Roe",
                "iban": default_of("bank", "dejima_bank", "iban"),
                "address": "2 Elm St",
                "phone": "555-0199",
                "risk_factor": default_of("bank", "dejima_bank", "risk_factor"),
            }
        ],
        "insurance": [
            {
                "id": 3001,
                "first_name": "Jane",
                "last_name": "Roe",
                "insurance_number": default_of("insurance", "dejima_insurance", "insurance_number"),
                "address": "2 Elm St",
                "birthdate": "1980-05-17",
                "risk_factor": default_of("insurance", "dejima_insurance", "risk_factor"),
            }
        ],
    }
    assert_network_ok(net)


def test_it_copies_a_bank_insert_to_government_and_once_to_insurance_a2(net: LocalNetwork) -> None:
    a2(net)

    assert everything(net) == {
        "government": [
            {
                "id": 1001,
                "first_name": "John",
                "last_name": "Doe",
                "phone": "555-0100",
                "address": "1 Main St",
                "birthdate": default_of("government", "dejima_bank", "birthdate"),
            }
        ],
        "bank": [
            {
                "id": 2001,
                "first_name": "John",
                "last_name": "Doe",
                "iban": "DE89",
                "address": "1 Main St",
                "phone": "555-0100",
                "risk_factor": None,
            }
        ],
        # one row, although John Doe reached insurance twice: through government and through dejima_risk
        "insurance": [
            {
                "id": 3001,
                "first_name": "John",
                "last_name": "Doe",
                "insurance_number": default_of("insurance", "dejima_insurance", "insurance_number"),
                "address": "1 Main St",
                "birthdate": default_of("government", "dejima_bank", "birthdate"),
                "risk_factor": None,
            }
        ],
    }
    assert_network_ok(net)


def test_it_gives_each_row_a_fresh_id_from_the_receivers_own_sequence_a3(net: LocalNetwork) -> None:
    write(net, "bank", "INSERT INTO bank_users (first_name, last_name) VALUES ('Ann', 'Lee')")
    write(net, "bank", "INSERT INTO bank_users (first_name, last_name) VALUES ('Bob', 'Kim')")

    for peer in PEERS:
        got = [(r["id"], r["first_name"], r["last_name"]) for r in rows(net, peer)]
        first = FIRST_ID[peer]
        assert got == [(first, "Ann", "Lee"), (first + 1, "Bob", "Kim")], peer
    assert_network_ok(net)


def test_it_updates_a_phone_in_place_at_government_and_sends_nothing_to_insurance_a4(net: LocalNetwork) -> None:
    a2(net)
    write(net, "government", "UPDATE government_users SET birthdate = '1970-01-02' WHERE first_name = 'John'")
    government, insurance = rows(net, "government"), rows(net, "insurance")
    before = stats(net)

    body = write(
        net, "bank", "UPDATE bank_users SET phone = '555-0200' WHERE first_name = 'John' AND last_name = 'Doe'"
    )

    sent = messages(before, stats(net))
    assert body["participants"] == ["government"]
    assert rows(net, "government") == [{**government[0], "phone": "555-0200"}]  # same id, birthdate kept
    assert rows(net, "government")[0]["birthdate"] == "1970-01-02"
    assert sent["insurance"] == (0, 0), sent  # phone is not shared with insurance: nothing sent there
    assert rows(net, "insurance") == insurance
    assert_network_ok(net)


def test_it_carries_an_insurance_address_change_two_hops_to_bank_a5(net: LocalNetwork) -> None:
    a1(net)
    write(net, "bank", "UPDATE bank_users SET iban = 'DE00 1234' WHERE first_name = 'Jane'")
    government, bank = rows(net, "government"), rows(net, "bank")
    before = stats(net)

    body = write(net, "insurance", "UPDATE insurance_users SET address = '3 Oak Ave' WHERE first_name = 'Jane'")

    sent = messages(before, stats(net))
    assert body["participants"] == ["bank", "government"]
    assert rows(net, "government") == [{**government[0], "address": "3 Oak Ave"}]  # phone, birthdate, id kept
    assert rows(net, "bank") == [{**bank[0], "address": "3 Oak Ave"}]  # iban and id kept
    assert rows(net, "bank")[0]["iban"] == "DE00 1234"
    assert sent["insurance"][1] == 0, f"a message went back to insurance: {sent}"
    assert_network_ok(net)


def test_it_sends_a_birthdate_change_to_insurance_and_nothing_to_bank_a6(net: LocalNetwork) -> None:
    a1(net)
    bank, insurance = rows(net, "bank"), rows(net, "insurance")
    before = stats(net)

    body = write(net, "government", "UPDATE government_users SET birthdate = '1980-05-18' WHERE first_name = 'Jane'")

    sent = messages(before, stats(net))
    assert body["participants"] == ["insurance"]
    assert rows(net, "insurance") == [{**insurance[0], "birthdate": "1980-05-18"}]
    assert sent["bank"] == (0, 0), sent
    assert rows(net, "bank") == bank
    assert_network_ok(net)


def test_it_sends_no_message_for_changes_of_private_columns_a7(net: LocalNetwork) -> None:
    a1(net)
    state = everything(net)
    before = stats(net)

    bank = write(net, "bank", "UPDATE bank_users SET iban = 'DE44 5001' WHERE first_name = 'Jane'")
    insurance = write(
        net, "insurance", "UPDATE insurance_users SET insurance_number = 'INS-7' WHERE first_name = 'Jane'"
    )

    assert (bank["participants"], insurance["participants"]) == ([], [])
    assert messages(before, stats(net)) == dict.fromkeys(PEERS, (0, 0))
    assert everything(net) == {
        "government": state["government"],
        "bank": [{**state["bank"][0], "iban": "DE44 5001"}],
        "insurance": [{**state["insurance"][0], "insurance_number": "INS-7"}],
    }
    assert_network_ok(net)


def test_it_propagates_a_deletion_only_change_a8(net: LocalNetwork) -> None:
    a1(net)

    body = write(net, "government", "DELETE FROM government_users WHERE first_name = 'Jane' AND last_name = 'Roe'")

    assert body["participants"] == ["bank", "insurance"]
    assert everything(net) == {peer: [] for peer in PEERS}
    assert_network_ok(net)


def test_it_renames_a_key_in_place_at_every_peer_a9(net: LocalNetwork) -> None:
    a2(net)
    write(net, "government", "UPDATE government_users SET birthdate = '1970-01-02' WHERE first_name = 'John'")
    state = everything(net)

    write(net, "bank", "UPDATE bank_users SET first_name = 'Jon' WHERE first_name = 'John' AND last_name = 'Doe'")

    # every peer keeps its row (same id, phone, birthdate, private columns): a rename, not delete + insert
    assert everything(net) == {peer: [{**state[peer][0], "first_name": "Jon"}] for peer in PEERS}
    assert_network_ok(net)


def test_it_carries_nulls_over_the_wire_a10(net: LocalNetwork) -> None:
    write(
        net,
        "bank",
        "INSERT INTO bank_users (first_name, last_name, address, phone) VALUES ('Nul', 'Person', NULL, NULL)",
    )

    government = rows(net, "government")
    assert [(r["first_name"], r["last_name"], r["phone"], r["address"]) for r in government] == [
        ("Nul", "Person", None, None)
    ]
    insurance = rows(net, "insurance")
    assert [(r["first_name"], r["last_name"], r["address"]) for r in insurance] == [("Nul", "Person", None)]
    assert_network_ok(net)


def test_it_carries_quotes_and_injection_strings_intact_a11(net: LocalNetwork) -> None:
    address = '1 "Quote" St; DROP TABLE x'
    write(
        net,
        "bank",
        "INSERT INTO bank_users (first_name, last_name, address, phone)"
        " VALUES ('Seán', 'O''Brien', '1 \"Quote\" St; DROP TABLE x', '555''0; --')",
    )

    everywhere = everything(net)
    assert [(r["first_name"], r["last_name"], r["address"]) for r in everywhere["government"]] == [
        ("Seán", "O'Brien", address)
    ]
    assert everywhere["government"][0]["phone"] == "555'0; --"
    assert everywhere["bank"][0]["phone"] == "555'0; --"
    assert [(r["first_name"], r["last_name"], r["address"]) for r in everywhere["insurance"]] == [
        ("Seán", "O'Brien", address)
    ]
    # nothing else happened: every table still there, one row each
    assert {peer: len(r) for peer, r in everywhere.items()} == dict.fromkeys(PEERS, 1)
    assert_network_ok(net)


# ---- A12, A13: availability and concurrency ---------------------------------------------------------------------


def test_it_refuses_a_write_while_a_member_is_down_and_accepts_it_after_restart_a12(net: LocalNetwork) -> None:
    insert_max = "INSERT INTO government_users (first_name, last_name, address) VALUES ('Max', 'Muster', '9 Ring')"
    net.stop("insurance")
    try:
        status, body = net.exec("government", insert_max)

        assert status == 503, body
        assert body["kind"] == "unreachable", body
        assert "insurance" in body["error"], body
        assert rows(net, "government") == []
        assert rows(net, "bank") == []
    finally:
        net.start("insurance")
        net.wait_ready(timeout=60)
    assert rows(net, "insurance") == []

    write(net, "government", insert_max)

    for peer in PEERS:
        assert [(r["first_name"], r["last_name"], r["address"]) for r in rows(net, peer)] == [
            ("Max", "Muster", "9 Ring")
        ], peer
    assert_network_ok(net)


Answer = tuple[int, dict[str, Any], dict[str, str]]  # HTTP status, JSON body, headers
GATE = 3113  # the advisory lock key of `concurrent_writes`' gate (no peer uses it)


def gate_waiters(conn: psycopg.Connection[Any]) -> int:
    """Sessions of `conn`'s database waiting for the gate now (PostgreSQL's own lock table)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE d.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted AND l.objid = %s",
        (GATE,),
    ).fetchone()
    return int(row[0]) if row else 0


def concurrent_writes(net: LocalNetwork, writes: dict[str, sql.Composable]) -> dict[str, Answer]:
    """Run each peer's statement as a client write there, all of them overlapping for sure; every answer.

    Each write, once its statement has run (its rows changed and locked), waits at a gate in its own database (an
    advisory lock the test holds) before it goes on to propagate; once every write waits at its gate, the test
    opens them all. So each write reaches the others while all of them are open: no write can commit before
    another starts. The writes wait with a lock timeout of their own (SET LOCAL), far beyond the test's steps."""
    answers: dict[str, Answer] = {}

    def run(peer: str, statement: sql.Composable) -> None:
        statements = [
            "SET LOCAL lock_timeout = '60s'",
            statement.as_string(None),
            sql.SQL("SELECT pg_advisory_xact_lock_shared({})").format(sql.Literal(GATE)).as_string(None),
        ]
        resp = requests.post(
            net.specs[peer].url + "/api/v1/exec",
            json={"sql": statements},
            headers=net.auth_headers(peer),
            timeout=TXN_TIMEOUT + 30,
        )
        answers[peer] = (resp.status_code, resp.json(), dict(resp.headers))

    gates = {peer: psycopg.connect(net.server.url(net.specs[peer].database), autocommit=True) for peer in writes}
    threads = [threading.Thread(target=run, args=item) for item in writes.items()]
    try:
        for conn in gates.values():
            conn.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        for t in threads:
            t.start()
        wait_until(
            lambda: all(gate_waiters(conn) == 1 for conn in gates.values()),
            10,
            f"the writes at {sorted(writes)} to wait at their gates",
        )
    finally:
        for conn in gates.values():
            conn.execute("SELECT pg_advisory_unlock_all()")
            conn.close()
        for t in threads:
            t.join()
    return answers


def test_it_commits_exactly_one_of_two_concurrent_conflicting_writes_a13(net: LocalNetwork) -> None:
    a1(net)
    for attempt in range(3):
        addresses = {"bank": f"4 Pine Rd #{attempt}", "insurance": f"5 Birch Ln #{attempt}"}
        before = stats(net)
        answers = concurrent_writes(
            net,
            {
                peer: sql.SQL("UPDATE {} SET address = {} WHERE first_name = 'Jane' AND last_name = 'Roe'").format(
                    sql.Identifier(TABLES[peer]), sql.Literal(address)
                )
                for peer, address in addresses.items()
            },
        )

        outcomes = sorted((code, body.get("status")) for code, body, _ in answers.values())
        assert outcomes == [(200, "committed"), (409, "error")], answers
        winner = next(p for p, a in answers.items() if a[0] == 200)
        loser = next(p for p, a in answers.items() if a[0] == 409)
        assert answers[loser][1]["kind"] == "conflict", answers[loser]
        assert answers[loser][2].get("Retry-After"), f"409 without Retry-After: {answers[loser][2]}"
        # the conflict was found by wait-die (a younger write gives up where an older one holds its rows), not by
        # a lock or transaction timing out
        after = stats(net)
        died = {p: after[p]["wait_die_conflicts"] - before[p]["wait_die_conflicts"] for p in PEERS}
        assert sum(died.values()) >= 1, died
        assert "an older global transaction" in answers[loser][1]["error"], answers[loser]
        address = addresses[winner]
        for peer in PEERS:
            assert [r["address"] for r in rows(net, peer)] == [address], (peer, winner)
        assert_network_ok(net)


# ---- A14: message counts ----------------------------------------------------------------------------------------

# (step, peer, statements, propagate messages the step causes in total). Derivation, views and their one edge each:
# dejima_bank gov-bank, dejima_insurance gov-insurance, dejima_risk bank-insurance.
# A1: gov→bank, gov→insurance; bank and insurance each put Jane in dejima_risk (risk_factor unknown) and send it
#     to the other, who merges it without a change: 4. A2 and A3: bank→gov, bank→insurance, gov→insurance, and
#     insurance→gov only when bank's direct row reaches insurance before government's (insurance then created the
#     row without the address and tells government): 3 or 4, by arrival order. The range is (fewest, most).
# A4: bank→gov only (phone is in dejima_bank only): 1. A5: insurance→gov, gov→bank (address is not in
#     dejima_risk): 2. A6: gov→insurance (birthdate is in dejima_insurance only): 1.
A1_TO_A6 = [
    ("A1", "government", [INSERT_JANE], (3, 4)),
    ("A2", "bank", [INSERT_JOHN], (3, 4)),
    ("A3", "bank", ["INSERT INTO bank_users (first_name, last_name) VALUES ('Ann', 'Lee')"], (3, 4)),
    ("A3", "bank", ["INSERT INTO bank_users (first_name, last_name) VALUES ('Bob', 'Kim')"], (3, 4)),
    ("A4", "bank", ["UPDATE bank_users SET phone = '555-0200' WHERE first_name = 'John'"], (1, 1)),
    ("A5", "insurance", ["UPDATE insurance_users SET address = '3 Oak Ave' WHERE first_name = 'Jane'"], (2, 2)),
    ("A6", "government", ["UPDATE government_users SET birthdate = '1980-05-18' WHERE first_name = 'Jane'"], (1, 1)),
]
# Who must receive nothing in a step, whatever the arrival order: the origin never gets its own change back, and
# A4 insurance, A6 bank have nothing to receive. (A2/A3: bank receives nothing only while its direct branch to
# insurance is faster than the two hops through government; the other order is pinned down below.)
SILENT = {
    "A1": {"government"},
    "A2": set(),
    "A3": set(),
    "A4": {"bank", "insurance"},
    "A5": {"insurance"},
    "A6": {"government", "bank"},
}
GROUP_EDGES = 3  # one pair of members per view in the example


def test_it_sends_each_delta_once_per_group_edge_and_terminates_a14(net: LocalNetwork) -> None:
    for step, origin, statements, expected in A1_TO_A6:
        before = stats(net)
        body = write(net, origin, statements)  # it answered: the global transaction terminated
        after = stats(net)
        sent = messages(before, after)

        assert after[origin]["committed"] == before[origin]["committed"] + 1, step
        assert all(after[p]["aborted"] == before[p]["aborted"] for p in PEERS), (step, after)
        total_sent = sum(s for s, _ in sent.values())
        total_received = sum(r for _, r in sent.values())
        assert total_sent == total_received, (step, sent)
        assert total_sent <= 2 * GROUP_EDGES, (step, sent)  # never more than once per edge and direction
        assert expected[0] <= total_sent <= expected[1], (step, sent)
        for peer in SILENT[step]:
            assert sent[peer][1] == 0, f"{step}: {peer} received {sent[peer][1]} message(s): {sent}"
        assert set(body["participants"]) == {p for p in PEERS if p != origin and sent[p][1] > 0}, (step, body, sent)
        assert_network_ok(net)


@pytest.fixture
def proxied(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The example network with every peer behind its own proxy (tests/proxy.py), for this test only."""
    cluster = ProxiedCluster(pg_server, tmp_path / "proxied")
    try:
        cluster.start()
        yield cluster
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n{cluster.logs()}")
    finally:
        cluster.close()


def test_it_never_sends_the_origin_its_own_change_back_whichever_branch_is_slower_a14(
    proxied: ProxiedCluster,
) -> None:
    net = proxied.net
    before = net.get("bank", "/api/v1/status")["stats"]
    # what reached insurance, by view: dejima_risk only from bank (its one other member), dejima_insurance only
    # from government
    views_before = net.get("insurance", "/api/v1/status")["propagates_received"]
    seen = proxied.proxies["insurance"].requests_seen.get("bank", 0)
    proxied.proxies["insurance"].delay_from("bank", 0.3)  # hold back bank -> insurance
    try:
        write(net, "bank", INSERT_JOHN)
    finally:
        proxied.proxies["insurance"].clear()
    after = net.get("bank", "/api/v1/status")["stats"]
    views_after = net.get("insurance", "/api/v1/status")["propagates_received"]

    assert_network_ok(net)
    # the held-back branch carried bank's dejima_risk delta through the delaying proxy; the other branch carried
    # government's dejima_insurance delta: two branches, one each
    assert proxied.proxies["insurance"].requests_seen.get("bank", 0) > seen, "nothing from bank passed the delay"
    arrived = {v: views_after.get(v, 0) - views_before.get(v, 0) for v in ("dejima_risk", "dejima_insurance")}
    assert arrived == {"dejima_risk": 1, "dejima_insurance": 1}, arrived
    received = after["propagate_received"] - before["propagate_received"]
    assert received == 0, f"bank (the origin) received {received} propagate message(s) of its own insert"


# ---- A15: restarts ----------------------------------------------------------------------------------------------


def test_it_keeps_the_shared_state_when_a_peer_and_the_database_restart_a15(net: LocalNetwork) -> None:
    a1(net)
    a2(net)
    state = everything(net)

    net.kill("bank")  # kill -9: no goodbye
    net.start("bank")
    net.wait_ready(timeout=60)

    assert everything(net) == state  # nothing lost, nothing duplicated, same ids
    assert_network_ok(net)
    write(net, "bank", "UPDATE bank_users SET phone = '555-0300' WHERE first_name = 'John'")
    state["bank"][1]["phone"] = state["government"][1]["phone"] = "555-0300"
    assert everything(net) == state

    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    net.server.restart()  # an external server (DEJIMA_DATABASE_URL) cannot be restarted: PgServerError, loudly
    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        restarted = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert started is not None and restarted is not None and restarted[0] > started[0], "PostgreSQL did not restart"
    net.wait_ready(timeout=60)

    assert everything(net) == state
    assert_network_ok(net)
    write(net, "government", "UPDATE government_users SET address = '7 New St' WHERE first_name = 'Jane'")
    for peer in PEERS:
        jane = next(r for r in rows(net, peer) if r["first_name"] == "Jane")
        assert jane["address"] == "7 New St", peer
    assert_network_ok(net)


def test_it_serves_writes_as_soon_as_its_database_is_back_a15(net: LocalNetwork) -> None:
    a1(net)
    a2(net)
    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    # returns once the server accepts connections again; an external server (DEJIMA_DATABASE_URL) cannot be
    # restarted: PgServerError, loudly
    net.server.restart()
    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        restarted = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert started is not None and restarted is not None and restarted[0] > started[0], "PostgreSQL did not restart"
    # the first write at each peer since the restart changes shared rows: it needs the origin's connections and
    # those of every participant it reaches, all of them broken by the restart
    writes = {
        "government": ("UPDATE government_users SET phone = '555-0301' WHERE first_name = 'Jane'", ["bank"]),
        "bank": ("UPDATE bank_users SET risk_factor = 3 WHERE first_name = 'John'", ["insurance"]),
        "insurance": ("UPDATE insurance_users SET address = '9 Pine Rd' WHERE first_name = 'Jane'", PEERS[:2]),
    }
    try:
        answers = {peer: net.exec(peer, statement) for peer, (statement, _) in writes.items()}
        told = {
            peer: (status, body.get("status"), sorted(body.get("participants", [])))
            for peer, (status, body) in answers.items()
        }
        assert told == {peer: (200, "committed", sorted(reached)) for peer, (_, reached) in writes.items()}, answers
    finally:
        net.wait_ready(timeout=60)
    jane = {peer: next(r for r in rows(net, peer) if r["first_name"] == "Jane") for peer in PEERS}
    assert (jane["government"]["phone"], jane["government"]["address"]) == ("555-0301", "9 Pine Rd")
    assert (jane["bank"]["phone"], jane["bank"]["address"]) == ("555-0301", "9 Pine Rd")
    assert jane["insurance"]["address"] == "9 Pine Rd"
    john = {peer: next(r for r in rows(net, peer) if r["first_name"] == "John") for peer in ("bank", "insurance")}
    assert {peer: r["risk_factor"] for peer, r in john.items()} == {"bank": 3, "insurance": 3}
    assert_network_ok(net)
