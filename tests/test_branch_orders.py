"""Cluster tier: parallel branches of one global transaction meet in every order and end in the same state.

ARCHITECTURE.md ("Cycles, diamonds and partial rows"): A2, A8, A9 and A14 run with each branch delayed in turn, and
with each two branches delayed at once (the test kit's proxies between peers hold them back), and every order must end
in the same state. Every peer sits behind its own proxy (tests/proxy.py); delaying the requests of peer S at the proxy
of peer R holds back the branch S -> R. Each scenario runs once without delay (the reference), once per delayed
branch and once per pair of delayed branches, on one network per test (reset between orders), and compares the base
tables of every peer (without their `id`, which comes from each run's sequence), the dejima views across their
groups, and that nothing stays open. Each test asserts how many orders it ran.

A write is given WRITE_DEADLINE seconds to answer (the HTTP timeout: a guard against hanging, not a speed bound).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peer.pgserver import PgServer
from tests.helpers import wait_until
from tests.proxy import ProxiedCluster

pytestmark = pytest.mark.cluster

DELAY = 0.3  # seconds; well below the peer timeout (5 s), far above one hop on loopback (a few ms)
WRITE_DEADLINE = 15.0  # seconds a delayed write may take before it counts as hanging (requests' timeout)
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
Edge = tuple[str, str]  # (sender, receiver): the branch held back
Delays = tuple[Edge, ...]  # the branches held back at once
Write = tuple[str, str]  # (peer, SQL) run as one global transaction
State = dict[str, list[dict[str, Any]]]

A1 = (
    "government",
    "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
    " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')",
)
A2 = (
    "bank",
    "INSERT INTO bank_users (first_name, last_name, iban, address, phone)"
    " VALUES ('John', 'Doe', 'DE89', '1 Main St', '555-0100')",
)
A3 = [
    ("bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('Ann', 'Lee', '555-0301')"),
    ("bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('Bob', 'Kim', '555-0302')"),
]
A4 = ("bank", "UPDATE bank_users SET phone = '555-0200' WHERE first_name = 'John' AND last_name = 'Doe'")
A5 = ("insurance", "UPDATE insurance_users SET address = '3 Oak Ave' WHERE first_name = 'Jane' AND last_name = 'Roe'")
A6 = (
    "government",
    "UPDATE government_users SET birthdate = '1980-05-18' WHERE first_name = 'Jane' AND last_name = 'Roe'",
)
A8 = ("government", "DELETE FROM government_users WHERE first_name = 'Jane' AND last_name = 'Roe'")
A9 = ("bank", "UPDATE bank_users SET first_name = 'Jon' WHERE first_name = 'John' AND last_name = 'Doe'")

ALL_EDGES: list[Edge] = [
    ("bank", "government"),
    ("government", "bank"),
    ("bank", "insurance"),
    ("insurance", "bank"),
    ("government", "insurance"),
    ("insurance", "government"),
]


@pytest.fixture
def cluster(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The example network behind proxies, for this test only; logs printed when the test fails."""
    made = ProxiedCluster(pg_server, tmp_path / "net")
    try:
        made.start()
        yield made
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n{made.logs()}")
    finally:
        made.close()


def state(cluster: ProxiedCluster) -> State:
    """Every peer's base-table rows without their id, in key order."""
    return {
        peer: [{k: v for k, v in row.items() if k != "id"} for row in cluster.rows(peer, table)]
        for peer, table in TABLES.items()
    }


def run(cluster: ProxiedCluster, writes: list[Write]) -> None:
    for peer, statement in writes:
        status, body = cluster.exec(peer, statement, timeout=WRITE_DEADLINE)
        assert (status, body.get("status")) == (200, "committed"), (peer, statement, body)


def one_and_two_at_once(edges: list[Edge]) -> list[Delays]:
    """Each branch delayed alone, then each pair of branches delayed together."""
    return [(edge,) for edge in edges] + list(itertools.combinations(edges, 2))


def in_order(
    cluster: ProxiedCluster,
    delays: Delays,
    setup: list[Write],
    action: list[Write],
    after_setup: Callable[[ProxiedCluster], None] | None = None,
    origins: frozenset[str] = frozenset(),
) -> State:
    """From empty tables: `setup` without delay, then `action` with the branches `delays` held back at once; the
    end state once everything is quiet (and `dejima check` is ok). A held-back branch whose sender is one of
    `origins` must have carried a message (a check that the proxies are in the path)."""
    for proxy in cluster.proxies.values():
        proxy.clear()
    cluster.reset()
    run(cluster, setup)
    if after_setup is not None:
        after_setup(cluster)
    seen = {edge: cluster.proxies[edge[1]].requests_seen.get(edge[0], 0) for edge in delays}
    for sender, receiver in delays:
        cluster.proxies[receiver].delay_from(sender, DELAY)
    try:
        run(cluster, action)
    finally:
        for proxy in cluster.proxies.values():
            proxy.clear()
    for (sender, receiver), before in seen.items():
        if sender in origins:
            assert cluster.proxies[receiver].requests_seen.get(sender, 0) > before, (
                f"no message from {sender} to {receiver}"
            )
    wait_until(cluster.quiet, 10, "no open and no prepared transaction at any peer")
    report = cluster.check()
    assert report["ok"], (delays, report)
    return state(cluster)


def assert_same_in_every_order(
    cluster: ProxiedCluster,
    edges: list[Edge],
    setup: list[Write],
    action: list[Write],
    expect: Callable[[State], None],
    after_setup: Callable[[ProxiedCluster], None] | None = None,
    after_action: Callable[[ProxiedCluster], None] | None = None,
) -> int:
    """The reference order, then every branch of `edges` delayed alone and every two of them delayed together:
    each ends in the reference's state. Returns how many orders ran."""
    # A branch whose sender is an origin always carries messages (propagate, prepare, finish). Any other branch is a
    # forward that exists only in some arrival orders: e.g. in A2 insurance forwards John Doe to government only
    # when bank's dejima_risk delta reaches it before government's dejima_insurance delta does.
    origins = frozenset(peer for peer, _ in action)
    reference = in_order(cluster, (), setup, action, after_setup)
    expect(reference)
    if after_action is not None:
        after_action(cluster)
    orders = 1
    for delays in one_and_two_at_once(edges):
        got = in_order(cluster, delays, setup, action, after_setup, origins)
        held = ", ".join(f"{s} -> {r}" for s, r in delays)
        assert got == reference, f"with {held} held back the end state differs"
        if after_action is not None:
            after_action(cluster)
        orders += 1
    return orders


def only(rows: list[dict[str, Any]], first: str, last: str) -> dict[str, Any]:
    match = [r for r in rows if (r["first_name"], r["last_name"]) == (first, last)]
    assert len(match) == 1, f"expected one {first} {last}, got {match}"
    return match[0]


def none_of(rows: list[dict[str, Any]], first: str, last: str) -> None:
    assert not [r for r in rows if (r["first_name"], r["last_name"]) == (first, last)]


# ---- A2: bank inserts John Doe; insurance hears of him directly (dejima_risk) and through government -----------
def test_it_ends_a2_in_the_same_state_whichever_one_or_two_branches_are_delayed(cluster: ProxiedCluster) -> None:
    def expect(st: State) -> None:
        gov = only(st["government"], "John", "Doe")
        assert (gov["phone"], gov["address"], gov["birthdate"]) == ("555-0100", "1 Main St", None)
        ins = only(st["insurance"], "John", "Doe")
        assert ins["address"] == "1 Main St"
        assert only(st["bank"], "John", "Doe")["iban"] == "DE89"

    orders = assert_same_in_every_order(
        cluster,
        [("bank", "government"), ("bank", "insurance"), ("government", "insurance"), ("insurance", "government")],
        setup=[],
        action=[A2],
        expect=expect,
    )
    assert orders == 1 + 4 + 6  # the reference, 4 branches alone, 6 pairs


# ---- A8: after A1, government deletes Jane Roe ------------------------------------------------------------------
def test_it_ends_a8_in_the_same_state_whichever_one_or_two_branches_are_delayed(cluster: ProxiedCluster) -> None:
    def expect(st: State) -> None:
        for rows in st.values():
            none_of(rows, "Jane", "Roe")

    orders = assert_same_in_every_order(
        cluster,
        [("government", "bank"), ("government", "insurance"), ("bank", "insurance"), ("insurance", "bank")],
        setup=[A1],
        action=[A8],
        expect=expect,
    )
    assert orders == 1 + 4 + 6


# ---- A9: after A2, bank renames John Doe to Jon Doe (a rename in place: ids kept) --------------------------------
def test_it_ends_a9_in_the_same_state_whichever_one_or_two_branches_are_delayed(cluster: ProxiedCluster) -> None:
    ids: dict[str, str] = {}

    def remember_ids(c: ProxiedCluster) -> None:
        ids.clear()
        for peer, table in TABLES.items():
            ids[peer] = only(c.rows(peer, table), "John", "Doe")["id"]

    def ids_kept(c: ProxiedCluster) -> None:
        for peer, table in TABLES.items():
            rows = c.rows(peer, table)
            none_of(rows, "John", "Doe")
            assert only(rows, "Jon", "Doe")["id"] == ids[peer], f"{peer} did not rename in place"

    def expect(st: State) -> None:
        for rows in st.values():
            none_of(rows, "John", "Doe")
        gov = only(st["government"], "Jon", "Doe")
        assert (gov["phone"], gov["address"], gov["birthdate"]) == ("555-0100", "1 Main St", None)
        assert only(st["insurance"], "Jon", "Doe")["address"] == "1 Main St"

    orders = assert_same_in_every_order(
        cluster,
        [("bank", "government"), ("bank", "insurance"), ("government", "insurance"), ("insurance", "government")],
        setup=[A2],
        action=[A9],
        expect=expect,
        after_setup=remember_ids,
        after_action=ids_kept,
    )
    assert orders == 1 + 4 + 6


# ---- A14: A1-A6 with each branch delayed; every global transaction terminates ------------------------------------
def test_it_terminates_every_global_transaction_of_a1_to_a6_whichever_one_or_two_branches_are_delayed(
    cluster: ProxiedCluster,
) -> None:
    def expect(st: State) -> None:
        jane = only(st["bank"], "Jane", "Roe")
        assert (jane["phone"], jane["address"]) == ("555-0199", "3 Oak Ave")
        jane = only(st["government"], "Jane", "Roe")
        assert (jane["phone"], jane["address"], jane["birthdate"]) == ("555-0199", "3 Oak Ave", "1980-05-18")
        jane = only(st["insurance"], "Jane", "Roe")
        assert (jane["address"], jane["birthdate"]) == ("3 Oak Ave", "1980-05-18")
        assert only(st["government"], "John", "Doe")["phone"] == "555-0200"
        for peer in TABLES:
            assert len(st[peer]) == 4, st[peer]  # Jane, John, Ann, Bob: one row each

    orders = assert_same_in_every_order(cluster, ALL_EDGES, setup=[], action=[A1, A2, *A3, A4, A5, A6], expect=expect)
    assert orders == 1 + 6 + 15  # the reference, 6 branches alone, 15 pairs
