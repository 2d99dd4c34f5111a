"""Cluster tier: a global transaction whose propagation is a chain (each sender sends to exactly one other peer)
prepares on the way — the receiver prepares before it answers (`Propagate.prepare`, `PropagateReply.prepared`) —
and the origin sends no prepare round; a write whose branches may meet still gets one. Real peers, real 2PC.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from peer.network import LocalNetwork
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
    assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]  # not yet
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
