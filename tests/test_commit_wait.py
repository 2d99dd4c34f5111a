"""Cluster tier: when the client hears "committed" (DEJIMA_COMMIT_WAIT). By default (`decision`) an origin answers
once its decision is durable and sends COMMIT PREPARED afterwards; a client statement at a participant first lets
the transactions prepared there finish (`Coordinator.settle`), so a read right after the answer sees the write.
Real peers, real 2PC.

Nothing here is timed. Where a test needs the COMMIT PREPARED late, it holds the origin's `finish` messages back at
the participant's proxy (a plain-HTTP cluster of the test kit, whose proxies can tell a message's kind), and it
orders its steps by what it can see: a message held at a proxy, a counter of /api/v1/status, a prepared transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from peer.network import LocalNetwork
from peer.pgserver import PgServer
from peer.testkit.proxy import ProxiedCluster, message_kind, proxied_cluster
from tests.helpers import wait_until
from tests.test_api_input import EVE_AT_BANK, PEERS, person, post, propagate
from tests.test_prepare_on_the_way import committed, finish, prepared_gids

pytestmark = pytest.mark.cluster

ROUNDS = 30
# peers of the held clusters: a call to a peer waits this long before it gives up, longer than a client of these
# tests waits for any answer (30 s): an answer that waits for a held message hangs the test, and fails it, instead
# of coming late
HELD_ENV = {"DEJIMA_PEER_TIMEOUT": "60"}


def is_finish(request: bytes) -> bool:
    return message_kind(request) == "finish"


def is_decision_query(request: bytes) -> bool:
    return message_kind(request) == "decision_query"


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
        assert (status_code, body["status"]) == (200, "committed"), body
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


@pytest.fixture(scope="module")
def held_cluster(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedCluster]:
    """The example behind proxies, on plain HTTP: the proxies read each message's kind (`hold_from(…, is_finish)`)."""
    with proxied_cluster(pg_server, Path(tmp_path_factory.mktemp("held")), env=HELD_ENV, tls=False) as cluster:
        yield cluster


@pytest.fixture
def held(held_cluster: ProxiedCluster, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The held cluster with empty tables, nothing open or prepared, and its proxies passing everything."""
    held_cluster.reset()
    wait_until(held_cluster.quiet, 20, "no open and no prepared transaction at any peer")
    yield held_cluster
    for proxy in held_cluster.proxies.values():
        proxy.clear()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n{held_cluster.logs()}")


def status_stats(cluster: ProxiedCluster, peer: str) -> dict[str, int]:
    return dict(cluster.net.get(peer, "/api/v1/status")["stats"])


def test_the_client_hears_committed_before_commit_prepared_reaches_a_participant(held: ProxiedCluster) -> None:
    """DEJIMA_COMMIT_WAIT=decision: the answer does not wait for the finish round. With bank's COMMIT PREPARED held
    at government's proxy, bank's client is told "committed" while government still has its branch prepared; a
    read at government right then waits its bound for it (READ_SETTLE_S), asks bank, and sees the write."""
    committed(
        held.net, "bank", "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('R', 'W', '0', 'a')"
    )
    wait_until(held.quiet, 20, "the insert finished everywhere")  # its finish is not the one held below
    assert held.net.get("bank", "/api/v1/status")["commit_wait"] == "decision"
    gov = held.proxies["government"]
    finishes = gov.held.get("bank", 0)
    gov.hold_from("bank", is_finish)
    try:
        status_code, body = held.exec("bank", "UPDATE bank_users SET phone = '1' WHERE first_name = 'R'")
        assert (status_code, body["status"], body["participants"]) == (200, "committed", ["government"]), body
        gov.wait_held("bank", finishes + 1)  # its COMMIT PREPARED for government: on its way, held
        gid = f"dejima:{body['gxid']}:government"
        assert held.prepared() == [gid]  # the client was told before government committed
        before = status_stats(held, "government")
        assert held.net.query("government", "SELECT phone FROM government_users") == [{"phone": "1"}]
        after = status_stats(held, "government")
        # the read asked bank (once), which told it "commit": it did not wait for the held finish
        assert (after["settle_asked"], after["settle_timeouts"]) == (
            before["settle_asked"] + 1,
            before["settle_timeouts"],
        )
        assert held.prepared() == []
    finally:
        gov.release_from("bank")
    wait_until(held.quiet, 20, "the late finish to land")  # it finds the branch committed already: nothing to do
    report = held.check()
    assert report["ok"], report


def test_a_read_asks_the_origin_of_a_late_commit_and_finishes_it_as_told(network: LocalNetwork) -> None:
    # bank never finishes it, and never decided it (it did not run it): asked, bank presumes abort
    message = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK, prepare=True)
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    assert f"dejima:{gxid}:government" in prepared_gids(network)
    asked, timeouts = settle_stats(network)
    try:
        # the read runs once its bound has passed and bank has answered: not after the transaction's life (the
        # request's own timeout would fail it), and after one question to bank, whose "abort" government applied
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        assert settle_stats(network) == (asked + 1, timeouts)
        assert f"dejima:{gxid}:government" not in prepared_gids(network)  # rolled back, as its origin said
    finally:
        for peer in PEERS:
            assert finish(network, peer, gxid, "abort")["ok"]
    # nothing prepared any more: the read asks nobody
    assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
    assert settle_stats(network) == (asked + 1, timeouts)


def test_a_read_runs_after_its_bound_when_the_origin_cannot_say(network: LocalNetwork) -> None:
    # the origin is no peer government knows: nobody can tell the decision, the transaction stays prepared
    message = propagate("dejima_bank", [person()], origin="nowhere", origin_keys=EVE_AT_BANK, prepare=True)
    gxid = message["body"]["gxid"]
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    asked, timeouts = settle_stats(network)
    try:
        # it ran though the transaction is still prepared: it waited its bound, asked, got no answer, and ran
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        assert settle_stats(network) == (asked + 1, timeouts + 1)
        assert f"dejima:{gxid}:government" in prepared_gids(network)
        # after a restart it is prepared here still, though this run of government never saw it: reads wait for it
        network.stop("government")
        network.start("government")
        network.wait_ready(timeout=60)
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 0}]
        assert settle_stats(network) == (1, 1)  # the new run's counters: the read waited for it and asked
    finally:
        for peer in PEERS:
            assert finish(network, peer, gxid, "abort")["ok"]


def test_strict_mode_answers_after_commit_prepared(pg_server: PgServer, tmp_path: Path) -> None:
    """DEJIMA_COMMIT_WAIT=all (the peers' own setting, read at start): the finish round is inside the answer. With
    bank's COMMIT PREPARED held at government's proxy, bank's client has no answer; once it passes, the answer
    comes and nothing is left prepared."""
    env = {**HELD_ENV, "DEJIMA_COMMIT_WAIT": "all"}
    with proxied_cluster(pg_server, tmp_path, env=env, tls=False) as strict:
        assert strict.net.get("bank", "/api/v1/status")["commit_wait"] == "all"
        committed(
            strict.net,
            "bank",
            "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('S', 'M', '1', 'a')",
        )
        assert strict.prepared() == []  # strict: its finish round was inside its answer too
        gov = strict.proxies["government"]
        finishes = gov.held.get("bank", 0)

        def update() -> tuple[int, Any, list[str]]:
            """The answer, and what is prepared the moment it came."""
            status_code, body = strict.exec("bank", "UPDATE bank_users SET phone = '2' WHERE first_name = 'S'")
            return status_code, body, strict.prepared()

        gov.hold_from("bank", is_finish)
        with ThreadPoolExecutor(1) as pool:
            try:
                answer = pool.submit(update)
                gov.wait_held("bank", finishes + 1)  # bank decided and sent government its COMMIT PREPARED …
                assert not answer.done(), answer.result()  # … and waits for it: its transaction is still running
                assert strict.open_transactions() == {"government": 1, "bank": 1, "insurance": 0}
                assert len(strict.prepared()) == 1, strict.prepared()  # government's branch, not yet committed
            finally:
                gov.release_from("bank")
            status_code, body, prepared_at_answer = answer.result(timeout=30)
        assert (status_code, body["status"], body["participants"]) == (200, "committed", ["government"]), body
        assert prepared_at_answer == []  # committed at government before the answer
        assert strict.net.query("government", "SELECT phone FROM government_users") == [{"phone": "2"}]


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
    lock_waits = network.get("government", "/api/v1/status")["stats"]["apply_lock_waits"]
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(post, network, "government", "/peer/v1/message", update)
        wait_until(
            lambda: network.get("government", "/api/v1/status")["stats"]["apply_lock_waits"] > lock_waits,
            10,
            "the update's apply at government to wait for a lock",
        )
        # waiting on Eve's key (in slices, up to its own 20 s deadline: the prepared insert is no younger open
        # transaction it would die for)
        assert not second.done(), second.result()
        for peer in ("government", "insurance"):
            assert finish(network, peer, first["body"]["gxid"], "commit")["ok"]
        status, answer = second.result(timeout=30)
    assert (status, answer["body"]["vote"]) == (200, "yes"), answer
    for peer in ("government", "insurance"):
        finish(network, peer, update["body"]["gxid"], "abort")


def test_a_delete_of_a_row_a_transaction_prepared_here_inserted_waits_for_it_and_deletes_it(
    held: ProxiedCluster,
) -> None:
    # bank inserts Eve and tells its client "committed"; her insert is still prepared at government (bank's COMMIT
    # PREPARED held at government's proxy) when bank's delete of Eve arrives: the row is invisible to the delete's
    # read (an uncommitted insert takes no lock a read would wait on), so the delete must wait for the insert to
    # finish, not find nothing and vote yes: the insert would then commit after it and Eve would stay at
    # government while bank has deleted her (the chaos run found this). Government cannot ask bank for the decision
    # meanwhile (held at bank's proxy), so the held finish is the only way the insert can end there.
    gov, bank = held.proxies["government"], held.proxies["bank"]
    finishes = gov.held.get("bank", 0)
    gov.hold_from("bank", is_finish)
    bank.hold_from("government", is_decision_query)
    try:
        committed(
            held.net,
            "bank",
            "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('Eve', 'Spy', '555-0666', 'd')",
        )
        gov.wait_held("bank", finishes + 1)
        # insurance's branch commits (its finish passes); government's stays prepared
        wait_until(lambda: [g.rsplit(":", 1)[1] for g in held.prepared()] == ["government"], 10, "insurance's commit")
        before = status_stats(held, "government")["unseen_waits"]
        with ThreadPoolExecutor(1) as pool:
            delete = pool.submit(held.exec, "bank", "DELETE FROM bank_users WHERE first_name = 'Eve'")
            wait_until(
                lambda: status_stats(held, "government")["unseen_waits"] > before,
                10,
                "the delete at government to find no row and wait for the insert prepared there",
            )
            assert not delete.done(), delete.result()  # waiting for the insert
            gov.release_from("bank")  # the insert's COMMIT PREPARED lands: the delete goes on
            status, body = delete.result(timeout=30)
    finally:
        gov.release_from("bank")
        bank.release_from("government")
    assert (status, body["status"], body["participants"]) == (200, "committed", ["government", "insurance"]), body
    assert status_stats(held, "government")["unseen_waits"] == before + 1
    wait_until(held.quiet, 20, "every finish to land")
    for peer, table in (("government", "government_users"), ("bank", "bank_users"), ("insurance", "insurance_users")):
        assert [r for r in held.rows(peer, table) if r["first_name"] == "Eve"] == [], peer
    report = held.check()
    assert report["ok"], report
