"""Cluster tier: the commit protocol under faults (ARCHITECTURE.md "The write path", steps 8-11).

Each test builds its own network of the shipped example (government, bank, insurance) on loopback, with the
peer-to-peer traffic going through the test kit's proxies where the test needs to interfere with it, and crash
points (`DEJIMA_FAULT_POINT`) set on one peer where it needs a crash. Recovery runs every 0.5 s. Nothing is timed:
a test orders its steps by what it can see (a global transaction open at a peer, a write queued for a turn), and
every wait has a deadline that only guards against hanging; the peer logs are printed when a test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from peer.pgserver import PgServer
from tests.helpers import wait_until
from tests.proxy import ProxiedCluster
from tests.test_api_input import person, post, propagate

pytestmark = pytest.mark.cluster

MakeCluster = Callable[..., ProxiedCluster]
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
A1 = (
    "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
    " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')"
)
SETTLE = 20.0  # seconds: deadline for recovery to finish what a fault left behind


@pytest.fixture
def make_cluster(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeCluster]:
    """make_cluster(env=…, peer_env=…, proxied=…) -> a started cluster; stopped, databases dropped afterwards."""
    made: list[ProxiedCluster] = []

    def make(
        env: dict[str, str] | None = None,
        peer_env: dict[str, dict[str, str]] | None = None,
        proxied: bool = True,
    ) -> ProxiedCluster:
        cluster = ProxiedCluster(pg_server, tmp_path / f"net{len(made)}", env, peer_env, proxied)
        made.append(cluster)
        return cluster.start()

    yield make
    report = getattr(request.node, "rep_call", None)
    for cluster in made:
        try:
            if report is not None and report.failed:
                print(f"\n{cluster.logs()}")
        finally:
            cluster.close()


def janes(cluster: ProxiedCluster) -> dict[str, int]:
    """How many Jane Roe rows each peer's base table holds (read from the databases directly)."""
    return {
        peer: sum(1 for r in cluster.rows(peer, table) if (r["first_name"], r["last_name"]) == ("Jane", "Roe"))
        for peer, table in TABLES.items()
    }


def everywhere(n: int) -> dict[str, int]:
    return dict.fromkeys(TABLES, n)


def settled(cluster: ProxiedCluster) -> dict[str, Any]:
    """Wait until no global transaction is open and no transaction is prepared anywhere; the check report."""
    wait_until(cluster.quiet, SETTLE, "no open and no prepared transaction at any peer")
    report = cluster.check()
    assert report["ok"], report
    return report


def exec_lost(cluster: ProxiedCluster, peer: str, statement: str) -> None:
    """Run a write at a peer that crashes while answering: the client gets no answer."""
    with pytest.raises(requests.ConnectionError):
        cluster.exec(peer, statement)


def assert_fault_reached(cluster: ProxiedCluster, peer: str, step: str) -> None:
    wait_until(lambda: f"fault point {step} reached" in cluster.net.tail(peer, 400), 10, f"{peer} to crash at {step}")


def assert_jane_committed(cluster: ProxiedCluster) -> None:
    bank = [r for r in cluster.rows("bank", "bank_users") if r["first_name"] == "Jane"]
    assert [(r["phone"], r["address"]) for r in bank] == [("555-0199", "2 Elm St")]
    insurance = [r for r in cluster.rows("insurance", "insurance_users") if r["first_name"] == "Jane"]
    assert [(r["address"], r["birthdate"]) for r in insurance] == [("2 Elm St", "1980-05-17")]


def crashing_cluster(make_cluster: MakeCluster, peer: str, step: str) -> ProxiedCluster:
    """A cluster (no proxies, 3 s transactions) in which `peer` crashes at `step` of the commit protocol."""
    return make_cluster(env={"DEJIMA_TXN_TIMEOUT": "3"}, peer_env={peer: {"DEJIMA_FAULT_POINT": step}}, proxied=False)


def assert_a1_commits_now(cluster: ProxiedCluster) -> None:
    """After the fault: the same write (A1) at government commits everywhere, and everything settles."""
    status, body = cluster.exec("government", A1)
    assert (status, body.get("status")) == (200, "committed"), body
    assert_jane_committed(cluster)
    settled(cluster)


# ---- a participant that does not answer in time ----------------------------------------------------------------
def test_it_aborts_a_write_whose_participant_times_out_and_the_same_write_succeeds_later(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(env={"DEJIMA_PEER_TIMEOUT": "1", "DEJIMA_TXN_TIMEOUT": "2"})
    insurance = cluster.proxies["insurance"]
    aborted = cluster.net.get("government", "/api/v1/status")["stats"]["aborted"]
    insurance.hold()  # every message to insurance is held back until the client has its answer
    try:
        status, body = cluster.exec("government", A1)
        # answered while insurance still holds everything: the timeouts, not insurance, ended the write
        assert status in (503, 504), body
        assert body["kind"] in ("timeout", "unreachable"), body
        assert "insurance" in body["error"], body
        assert cluster.net.get("government", "/api/v1/status")["stats"]["aborted"] == aborted + 1
        assert janes(cluster) == everywhere(0)
    finally:
        insurance.release()  # the late messages now reach insurance: they must not revive the transaction
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    status, body = cluster.exec("government", A1)
    assert (status, body.get("status")) == (200, "committed"), body
    assert janes(cluster) == everywhere(1)
    assert_jane_committed(cluster)
    settled(cluster)


# ---- crashes at each step of the commit protocol --------------------------------------------------------------
def test_it_refuses_a_write_whose_participant_dies_while_propagating_and_changes_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = crashing_cluster(make_cluster, "insurance", "participant_while_propagating")
    status, body = cluster.exec("government", A1)
    # insurance applied the delta in its open transaction and died before answering: nothing was prepared
    assert status in (503, 504), body
    assert "insurance" in body["error"], body
    assert_fault_reached(cluster, "insurance", "participant_while_propagating")
    assert janes(cluster) == everywhere(0)
    cluster.restart("insurance", drop=("DEJIMA_FAULT_POINT",))
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    assert_a1_commits_now(cluster)


def test_it_rolls_back_a_participant_killed_right_after_prepare_once_it_restarts(make_cluster: MakeCluster) -> None:
    cluster = crashing_cluster(make_cluster, "insurance", "participant_after_prepare")
    status, body = cluster.exec("government", A1)
    # insurance prepared, then died before acknowledging: the origin cannot know, so it aborts
    assert status == 503, body
    assert "insurance" in body["error"], body
    assert_fault_reached(cluster, "insurance", "participant_after_prepare")
    cluster.restart("insurance", drop=("DEJIMA_FAULT_POINT",))
    # insurance's recovery asks government, which has no decision row: presumed abort
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    assert_a1_commits_now(cluster)


def test_it_commits_at_the_participants_when_the_origin_dies_after_its_decision(make_cluster: MakeCluster) -> None:
    cluster = crashing_cluster(make_cluster, "government", "origin_after_decision")
    exec_lost(cluster, "government", A1)
    assert_fault_reached(cluster, "government", "origin_after_decision")
    prepared = cluster.prepared()
    assert sorted(g.rsplit(":", 1)[1] for g in prepared) == ["bank", "insurance"], prepared
    assert janes(cluster)["government"] == 1, "the decision (government's own commit) is durable"
    cluster.restart("government", drop=("DEJIMA_FAULT_POINT",))
    # the participants' recovery asks government, which finds its decision row: commit
    settled(cluster)
    assert janes(cluster) == everywhere(1)
    assert_jane_committed(cluster)


def test_it_rolls_back_the_participants_when_the_origin_dies_before_its_decision(make_cluster: MakeCluster) -> None:
    cluster = crashing_cluster(make_cluster, "government", "origin_before_decision")
    exec_lost(cluster, "government", A1)
    assert_fault_reached(cluster, "government", "origin_before_decision")
    prepared = cluster.prepared()
    assert sorted(g.rsplit(":", 1)[1] for g in prepared) == ["bank", "insurance"], prepared
    cluster.restart("government", drop=("DEJIMA_FAULT_POINT",))
    # no decision row at government: the participants roll back (presumed abort)
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    assert_a1_commits_now(cluster)


def test_it_commits_at_a_participant_killed_before_commit_prepared_once_it_restarts(
    make_cluster: MakeCluster,
) -> None:
    cluster = crashing_cluster(make_cluster, "bank", "participant_before_commit")
    status, body = cluster.exec("government", A1)
    # the decision was durable before bank died: the client is told "committed"
    assert (status, body.get("status")) == (200, "committed"), body
    assert_fault_reached(cluster, "bank", "participant_before_commit")
    cluster.restart("bank", drop=("DEJIMA_FAULT_POINT",))
    settled(cluster)
    assert janes(cluster) == everywhere(1)
    assert_jane_committed(cluster)


# ---- open transactions of a silent origin fill the pool ---------------------------------------------------------
def test_it_frees_a_pool_filled_by_open_transactions_whose_origin_went_silent(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        env={"DEJIMA_TXN_TIMEOUT": "2"}, peer_env={"government": {"DEJIMA_POOL_SIZE": "2"}}, proxied=False
    )
    # two propagates "from bank" that bank's coordinator never started: nobody will prepare or finish them, and
    # each holds one of government's two database connections open (bank, reached again round the cycle through
    # insurance, refuses them: they are not running there, so government's vote is no, but it still waits for the
    # origin's decision)
    for n in range(2):
        status, answer = post(
            cluster.net, "government", "/peer/v1/message", propagate("dejima_bank", [person(first_name=f"Eve{n}")])
        )
        assert status == 200, answer
        assert answer["body"]["vote"] == "no" and "is not running here" in answer["body"]["error"], answer
    # recovery itself needs a connection; its janitor must not wait for one to roll the silent ones back. A write
    # that reaches government as a participant needs one of those two connections (a write started at government
    # runs on its client login's connections, which the silent ones do not hold)
    bank_write = (
        "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('Bo', 'Bank', '555-0111', '2 Elm')"
    )
    wait_until(lambda: cluster.exec("bank", bank_write)[0] == 200, 30, "a write reaching government to commit again")
    assert "went silent; rolling back" in cluster.net.tail("government", 400)
    assert cluster.exec("government", A1)[0] == 200
    settled(cluster)
    assert_jane_committed(cluster)
    assert not [r for r in cluster.rows("government", "government_users") if r["first_name"].startswith("Eve")]


# ---- a cut link between peers ---------------------------------------------------------------------------------
def test_it_refuses_a_write_while_a_peer_is_cut_off_and_accepts_it_after_restore(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    cluster.proxies["insurance"].cut()  # no peer can reach insurance
    try:
        status, body = cluster.exec("government", A1)
        assert status == 503, body
        assert body["kind"] == "unreachable", body
        assert "insurance" in body["error"], body
    finally:
        cluster.proxies["insurance"].restore()
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    assert_a1_commits_now(cluster)


def test_it_refuses_a_write_while_the_link_between_two_peers_is_cut(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    # only bank -> insurance is down: government reaches both, but bank's forward on dejima_risk cannot pass
    cluster.proxies["insurance"].cut_from("bank")
    try:
        status, body = cluster.exec("government", A1)
        assert status == 503, body
        assert body["kind"] == "unreachable", body
        assert "insurance" in body["error"], body
    finally:
        cluster.proxies["insurance"].restore()
    settled(cluster)
    assert janes(cluster) == everywhere(0)

    assert_a1_commits_now(cluster)


# ---- admission: at most DEJIMA_MAX_ACTIVE global transactions started at a peer run at once ---------------------
def test_a_write_beyond_max_active_waits_its_turn_and_one_that_waits_too_long_is_busy(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(
        env={"DEJIMA_PEER_TIMEOUT": "4", "DEJIMA_TXN_TIMEOUT": "5"}, peer_env={"government": {"DEJIMA_MAX_ACTIVE": "1"}}
    )
    insurance = cluster.proxies["insurance"]
    second = A1.replace("'Jane'", "'June'")
    with ThreadPoolExecutor(2) as pool:
        insurance.hold()  # the first write waits for insurance: it keeps government's only turn
        try:
            first = pool.submit(cluster.exec, "government", A1)
            wait_until(lambda: running_at_government(cluster) == 1, 10, "the first write to take the turn")
            queued = pool.submit(cluster.exec, "government", second)
            wait_until(lambda: queued_at_government(cluster) == 1, 10, "the second write to queue for a turn")
            assert not queued.done(), queued.result()  # it waits its turn, not beside the first
            assert running_at_government(cluster) == 1
        finally:
            insurance.release()
        for fut in (first, queued):  # both commit, one after the other
            status, body = fut.result(timeout=30)
            assert (status, body.get("status")) == (200, "committed"), body
    assert janes(cluster) == everywhere(1)
    assert queued_at_government(cluster) == 0
    busy = cluster.net.get("government", "/api/v1/status")["stats"]["busy"]

    # now insurance stays silent: Jim holds the turn until its calls to insurance time out (4 s), and then until
    # its abort's finish to insurance times out too: longer than the transaction timeout (5 s) that Jon, queued
    # right behind it, waits for a turn. Jon is refused as busy, with nothing done.
    insurance.hold()
    with ThreadPoolExecutor(2) as pool:
        try:
            jim = pool.submit(cluster.exec, "government", A1.replace("'Jane'", "'Jim'"))
            wait_until(lambda: running_at_government(cluster) == 1, 10, "Jim to take the turn")
            jon = pool.submit(cluster.exec, "government", A1.replace("'Jane'", "'Jon'"))
            wait_until(lambda: queued_at_government(cluster) == 1, 10, "Jon to queue for a turn")
            assert not jon.done(), jon.result()
            status, body = jon.result(timeout=30)
            jim_status, jim_body = jim.result(timeout=30)  # insurance still silent: Jim cannot commit
        finally:
            insurance.release()
    assert (status, body["kind"]) == (503, "busy"), body
    assert "DEJIMA_MAX_ACTIVE" in body["error"], body
    assert jim_status in (503, 504) and "insurance" in jim_body["error"], jim_body
    settled(cluster)
    assert cluster.net.get("government", "/api/v1/status")["stats"]["busy"] == busy + 1  # Jon, and only Jon
    assert janes(cluster) == everywhere(1)
    names = {r["first_name"] for r in cluster.rows("government", "government_users")}
    assert names == {"Jane", "June"}, names


def running_at_government(cluster: ProxiedCluster) -> int:
    """Global transactions open at government (here: those it started, each holding a turn)."""
    return int(cluster.net.get("government", "/api/v1/status")["open_transactions"])


def queued_at_government(cluster: ProxiedCluster) -> int:
    """Client transactions waiting for a turn at government."""
    return int(cluster.net.get("government", "/api/v1/status")["queued_transactions"])
