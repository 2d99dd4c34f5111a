"""Cluster tier: a global transaction whose propagation is a chain (each sender sends to exactly one other peer)
prepares on the way — the receiver prepares before it answers (`Propagate.prepare`, `PropagateReply.prepared`) —
and the origin sends no prepare round; a write whose branches may meet still gets one. Real peers, real 2PC.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from peer.bench.topology import star_types, tree_types, write_root
from peer.network import LocalNetwork, PeerSpec, free_port
from peer.pgserver import PgServer
from tests.test_api_input import EVE_AT_BANK, PEERS, envelope, person, post, propagate

pytestmark = pytest.mark.cluster


def stats(net: LocalNetwork) -> dict[str, dict[str, int]]:
    return {p: net.get(p, "/api/v1/status")["stats"] for p in PEERS}


def grew(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], counter: str) -> dict[str, int]:
    return {p: after[p][counter] - before[p][counter] for p in PEERS}


def committed(net: LocalNetwork, peer: str, statement: str) -> None:
    status, body = net.exec(peer, statement)
    assert (status, body.get("status")) == (200, "committed"), body


def prepared_gids(net: LocalNetwork) -> list[str]:
    with psycopg.connect(net.server.url("postgres"), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT gid FROM pg_prepared_xacts ORDER BY gid")]


def finish(net: LocalNetwork, peer: str, gxid: str, decision: str) -> dict[str, Any]:
    status, answer = post(
        net, peer, "/peer/v1/message", envelope("finish", {"gxid": gxid, "origin": "bank", "decision": decision})
    )
    assert status == 200, answer
    return dict(answer["body"])


def test_a_chain_prepares_on_the_way_and_a_write_whose_branches_may_meet_gets_a_prepare_round(
    network: LocalNetwork,
) -> None:
    before = stats(network)  # a new person at bank reaches government and insurance at once: two branches
    committed(
        network, "bank", "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('C', 'H', '1', 'a')"
    )
    after = stats(network)
    assert grew(before, after, "prepare_sent") == {"government": 0, "bank": 2, "insurance": 0}
    assert grew(before, after, "prepared_on_the_way") == dict.fromkeys(PEERS, 0)

    before = after  # bank's phone column is in dejima_bank only: bank -> government, one hop
    committed(network, "bank", "UPDATE bank_users SET phone = '2' WHERE first_name = 'C'")
    after = stats(network)
    assert grew(before, after, "prepare_sent") == dict.fromkeys(PEERS, 0)
    assert grew(before, after, "prepared_on_the_way") == {"government": 1, "bank": 0, "insurance": 0}

    before = after  # insurance's address: insurance -> government -> bank, a chain of two hops
    committed(network, "insurance", "UPDATE insurance_users SET address = 'b' WHERE first_name = 'C'")
    after = stats(network)
    assert grew(before, after, "prepare_sent") == dict.fromkeys(PEERS, 0)
    assert grew(before, after, "prepared_on_the_way") == {"government": 1, "bank": 1, "insurance": 0}

    assert network.query("government", "SELECT phone, address FROM government_users") == [
        {"phone": "2", "address": "b"}
    ]
    assert network.query("bank", "SELECT phone, address FROM bank_users") == [{"phone": "2", "address": "b"}]
    assert prepared_gids(network) == []


def test_a_receiver_told_to_prepare_prepares_its_branch_before_it_answers(network: LocalNetwork) -> None:
    # as bank would send it alone: government applies it and forwards to insurance (its only target), which
    # prepares and answers; then government prepares too
    message = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK, prepare=True)
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert status == 200, answer
    reply = answer["body"]
    assert (reply["vote"], reply["prepared"], reply["reached"]) == (
        "yes",
        ["government", "insurance"],
        [
            "government",
            "insurance",
        ],
    ), reply
    assert prepared_gids(network) == [f"dejima:{gxid}:government", f"dejima:{gxid}:insurance"]
    # not yet (read from the database itself: a read through the peer would wait a second for the prepared
    # transaction, then ask bank, which never ran it, and roll it back as bank would say)
    with psycopg.connect(network.server.url(network.specs["government"].database)) as conn:
        assert conn.execute("SELECT count(*) FROM government_users").fetchone() == (0,)
    for peer in ("government", "insurance"):
        assert finish(network, peer, gxid, "commit")["ok"]
    assert prepared_gids(network) == []
    assert network.query("government", "SELECT first_name FROM government_users") == [{"first_name": "Eve"}]
    assert network.query("insurance", "SELECT first_name FROM insurance_users") == [{"first_name": "Eve"}]


def test_a_commit_for_a_transaction_never_prepared_is_refused_and_the_abort_still_works(network: LocalNetwork) -> None:
    message = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK)  # no prepare: it stays open
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert (status, answer["body"]["vote"], answer["body"]["prepared"]) == (200, "yes", []), answer
    assert prepared_gids(network) == []
    refused = finish(network, "government", gxid, "commit")
    assert (refused["ok"], refused["error_kind"]) == (False, "refused"), refused
    assert "never prepared" in refused["error"], refused
    for peer in ("government", "insurance"):
        assert finish(network, peer, gxid, "abort")["ok"]
    assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
    assert network.query("insurance", "SELECT count(*) AS n FROM insurance_users") == [{"n": 0}]


@pytest.fixture(scope="module")
def star_and_tree(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """A star of 3 (one view shared by s3m0, s3m1, s3m2) and the tree p1 - p0 - p2 - p3 (a view per edge), generated
    like the benchmarks' topologies, as real peers."""
    tmp = tmp_path_factory.mktemp("leaves")
    root = write_root(tmp / "types", [*star_types(3), *tree_types(4, [(0, 1), (0, 2), (2, 3)])])
    prefix = f"l{uuid.uuid4().hex[:6]}_"
    specs = [
        PeerSpec(name=name, peer_type=name, port=free_port(), database=f"{prefix}{name}")
        for name in ("s3m0", "s3m1", "s3m2", "p0", "p1", "p2", "p3")
    ]
    for group in (specs[:3], specs[3:]):
        for spec in group:
            spec.env["DEJIMA_SEEDS"] = ",".join(s.message_url for s in group if s is not spec)
    net = LocalNetwork(pg_server, tmp / "state", specs, sql_root=root)
    try:
        for spec in specs:
            pg_server.create_database(spec.database, replace=True)
        net.start_all()
        net.wait_ready(timeout=90)
        yield net
    finally:
        net.stop_all()
        for spec in specs:
            pg_server.drop_database(spec.database)


def counters(net: LocalNetwork, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    out = {}
    for name in names:
        s = net.get(name, "/api/v1/status")["stats"]
        out[name] = (s["prepare_sent"], s["prepared_on_the_way"])
    return out


def test_a_fan_out_to_leaves_only_prepares_them_on_the_way(star_and_tree: LocalNetwork) -> None:
    net, star = star_and_tree, ("s3m0", "s3m1", "s3m2")
    committed(net, "s3m0", "INSERT INTO items (item_key, value) VALUES (1, 'a')")
    before = counters(net, star)
    status, body = net.exec("s3m0", "UPDATE items SET value = 'b' WHERE item_key = 1")
    assert (status, body["participants"]) == (200, ["s3m1", "s3m2"]), body
    after = counters(net, star)
    # no prepare round (the origin sent no prepare message, whatever its phases took): both receivers are leaves of
    # the one view (they share nothing else) and prepared before answering
    assert {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in star} == {
        "s3m0": (0, 0),
        "s3m1": (0, 1),
        "s3m2": (0, 1),
    }
    for name in star:
        assert net.query(name, "SELECT value FROM items WHERE item_key = 1") == [{"value": "b"}]


def test_a_fan_out_to_a_peer_with_other_views_keeps_its_prepare_round(star_and_tree: LocalNetwork) -> None:
    net, tree = star_and_tree, ("p0", "p1", "p2", "p3")
    # the tree p1 - p0 - p2 - p3: a record homed at p0 reaches p1 (a leaf) and p2, which also shares a view with p3
    before = counters(net, tree)
    status, body = net.exec("p0", "INSERT INTO usertable (ycsb_key, home, field0) VALUES (1, 0, 'a')")
    assert (status, body["participants"]) == (200, ["p1", "p2"]), body
    after = counters(net, tree)
    assert {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in tree} == {
        "p0": (2, 0),  # a prepare round for both
        "p1": (0, 0),
        "p2": (0, 0),
        "p3": (0, 0),
    }
    before = after  # a record homed at p3 reaches p2 alone: a chain of one, prepared on the way
    status, body = net.exec("p3", "INSERT INTO usertable (ycsb_key, home, field0) VALUES (2, 3, 'b')")
    assert (status, body["participants"]) == (200, ["p2"]), body
    after = counters(net, tree)
    assert {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in tree} == {
        "p0": (0, 0),
        "p1": (0, 0),
        "p2": (0, 1),
        "p3": (0, 0),
    }
    for name in ("p0", "p1", "p2"):
        assert net.query(name, "SELECT field0 FROM usertable WHERE ycsb_key = 1") == [{"field0": "a"}]
