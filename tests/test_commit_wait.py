"""Cluster tier: when the client hears "committed" (DEJIMA_COMMIT_WAIT). By default (`decision`) an origin answers
once its decision is durable and sends COMMIT PREPARED afterwards; a client statement at a participant first lets
the transactions prepared there finish (`Coordinator.settle`), so a read right after the answer sees the write.
Real peers, real 2PC.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from psycopg import sql

from peer.network import LocalNetwork
from tests.test_api_input import EVE_AT_BANK, PEERS, person, post, propagate
from tests.test_prepare_on_the_way import committed, finish, prepared_gids

pytestmark = pytest.mark.cluster

ROUNDS = 30


def statement(template: str, *values: str) -> str:
    return sql.SQL(template).format(*map(sql.Literal, values)).as_string(None)


def test_a_read_at_a_participant_right_after_committed_sees_the_write(network: LocalNetwork) -> None:
    committed(
        network, "bank", "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('R', 'W', '0', 'a')"
    )
    assert network.get("government", "/api/v1/status")["commit_wait"] == "decision"
    for i in range(1, ROUNDS + 1):
        status_code, body = network.exec(
            "bank", statement("UPDATE bank_users SET phone = {} WHERE first_name = 'R'", str(i))
        )
        assert (status_code, body["status"], body["phases"]["finish_ms"] < 1.0) == (200, "committed", True), body
        # at once, through both client paths of a participant: a read-only query and a global transaction
        assert network.query("government", "SELECT phone FROM government_users") == [{"phone": str(i)}], i
        status_code, body = network.exec(
            "government", statement("UPDATE government_users SET address = {} WHERE phone = {}", f"r{i}", str(i))
        )
        assert (status_code, body["status"]) == (200, "committed"), body
        assert body["participants"] == ["bank", "insurance"], (i, body)  # the WHERE found the row: it saw phone i
    assert network.get("government", "/api/v1/status")["stats"]["settle_timeouts"] == 0


def settle_stats(network: LocalNetwork) -> tuple[int, int]:
    stats = network.get("government", "/api/v1/status")["stats"]
    return stats["settle_asked"], stats["settle_timeouts"]


def test_a_read_waits_for_a_late_commit_at_most_its_bound_then_asks_the_origin(network: LocalNetwork) -> None:
    # bank never finishes it, and never decided it (it did not run it): asked, bank presumes abort
    message = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK, prepare=True)
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    assert f"dejima:{gxid}:government" in prepared_gids(network)
    asked, timeouts = settle_stats(network)
    try:
        started = time.monotonic()
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        waited = time.monotonic() - started
        assert 0.9 <= waited < 4.0, waited  # READ_SETTLE_S (1 s), then one question, not the transaction's life
        assert settle_stats(network) == (asked + 1, timeouts)
        assert f"dejima:{gxid}:government" not in prepared_gids(network)  # rolled back, as its origin said
    finally:
        for peer in PEERS:
            assert finish(network, peer, gxid, "abort")["ok"]
    started = time.monotonic()  # nothing prepared any more: no wait
    assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
    assert time.monotonic() - started < 0.9


def test_a_read_runs_after_its_bound_when_the_origin_cannot_say(network: LocalNetwork) -> None:
    # the origin is no peer government knows: nobody can tell the decision, the transaction stays prepared
    message = propagate("dejima_bank", [person()], origin="nowhere", origin_keys=EVE_AT_BANK, prepare=True)
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    asked, timeouts = settle_stats(network)
    try:
        started = time.monotonic()
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        assert 0.9 <= time.monotonic() - started < 4.0
        assert settle_stats(network) == (asked + 1, timeouts + 1)
        assert f"dejima:{gxid}:government" in prepared_gids(network)
        # after a restart it is prepared here still, though this run of government never saw it: reads wait for it
        network.stop("government")
        network.start("government")
        network.wait_ready(timeout=60)
        started = time.monotonic()
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        assert 0.9 <= time.monotonic() - started < 4.0
        assert settle_stats(network) == (1, 1)
    finally:
        for peer in PEERS:
            assert finish(network, peer, gxid, "abort")["ok"]


def test_strict_mode_answers_after_commit_prepared(network: LocalNetwork) -> None:
    """DEJIMA_COMMIT_WAIT=all (the peers' own setting, read at start): the finish round is inside the answer."""
    names = ("government", "bank", "insurance")
    for name in names:
        network.specs[name].env["DEJIMA_COMMIT_WAIT"] = "all"
    try:
        for name in names:
            network.stop(name)
            network.start(name)
        network.wait_ready(timeout=60)
        assert network.get("bank", "/api/v1/status")["commit_wait"] == "all"
        committed(
            network,
            "bank",
            "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('S', 'M', '1', 'a')",
        )
        status_code, body = network.exec("bank", "UPDATE bank_users SET phone = '2' WHERE first_name = 'S'")
        assert (status_code, body["status"], body["participants"]) == (200, "committed", ["government"]), body
        assert body["phases"]["finish_ms"] > 0.1, body  # it waited for government's COMMIT PREPARED
        assert prepared_gids(network) == []
        assert network.query("government", "SELECT phone FROM government_users") == [{"phone": "2"}]
    finally:
        for name in names:
            network.specs[name].env.pop("DEJIMA_COMMIT_WAIT", None)
            network.stop(name)
            network.start(name)
        network.wait_ready(timeout=60)


def test_a_write_whose_row_a_transaction_prepared_here_inserted_applies_once_that_commits(
    network: LocalNetwork,
) -> None:
    # the insert of Eve is prepared at government (its COMMIT PREPARED still on its way) when the next write, an
    # update of Eve, arrives: its apply does not see the row, waits on the key, and must apply as an update once the
    # first commits, not fail as a duplicate key
    first = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK, prepare=True)
    status, answer = post(network, "government", "/peer/v1/message", first)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    update = propagate(
        "dejima_bank", [person(phone="555-0777")], deletions=[person()], origin_keys=EVE_AT_BANK, timeout_ms=20_000
    )
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(post, network, "government", "/peer/v1/message", update)
        time.sleep(0.5)
        assert not second.done(), second.result()  # waiting on Eve's key
        for peer in ("government", "insurance"):
            assert finish(network, peer, first["body"]["gxid"], "commit")["ok"]
        status, answer = second.result(timeout=30)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    for peer in ("government", "insurance"):
        finish(network, peer, update["body"]["gxid"], "abort")


def test_a_delete_of_a_row_a_transaction_prepared_here_inserted_waits_for_it_and_deletes_it(
    network: LocalNetwork,
) -> None:
    # the insert of Eve is prepared at government (its COMMIT PREPARED still on its way) when the delete of Eve
    # arrives: the row is invisible to the delete's read (an uncommitted insert takes no lock a read would wait on),
    # so the delete must wait for the insert to finish, not find nothing and vote yes: the insert would then
    # commit after it and Eve would stay at government while bank has deleted her (the chaos run found this)
    first = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK, prepare=True)
    delete = propagate(
        "dejima_bank", [], deletions=[person()], origin_keys=EVE_AT_BANK, timeout_ms=20_000, prepare=True
    )
    gxids = [first["body"]["gxid"], delete["body"]["gxid"]]
    try:
        status, answer = post(network, "government", "/peer/v1/message", first)
        assert (status, answer["body"]["vote"]) == (200, "yes"), answer
        before = network.get("government", "/api/v1/status")["stats"]["unseen_waits"]
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(post, network, "government", "/peer/v1/message", delete)
            time.sleep(0.3)  # less than READ_SETTLE_S: after it, government would ask bank, which never decided it
            assert not second.done(), second.result()  # waiting for the insert
            for peer in PEERS:
                assert finish(network, peer, gxids[0], "commit")["ok"]
            status, answer = second.result(timeout=30)
        assert (status, answer["body"]["vote"]) == (200, "yes"), answer
        assert "insurance" in answer["body"]["reached"], answer  # the delete went on to insurance
        assert network.get("government", "/api/v1/status")["stats"]["unseen_waits"] == before + 1
        for peer in PEERS:
            assert finish(network, peer, gxids[1], "commit")["ok"]
        for peer, table in (("government", "government_users"), ("insurance", "insurance_users")):
            count = sql.SQL("SELECT count(*) AS n FROM {} WHERE first_name = 'Eve'").format(sql.Identifier(table))
            assert network.query(peer, count.as_string(None)) == [{"n": 0}], peer
    finally:  # nothing left prepared when it failed (a committed one stays committed)
        for gxid in gxids:
            for peer in PEERS:
                finish(network, peer, gxid, "abort")
