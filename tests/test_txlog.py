"""Tamper evidence: every peer's hash-chained log of the global transactions it committed (`dejima.txlog`).

Unit: the entry summary is order-independent and the chain hash covers every field. Cluster (real peers): one
entry per committed global transaction at its origin and at every participant it changed, none for an aborted one;
`dejima check` names the peer and the seq of a chain tampered with in the database; a restart and concurrent
writes keep every chain valid.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import requests
from psycopg.types.json import Jsonb

from peer.dejima import txlog
from peer.dejima.delta import RowChange
from peer.network import LocalNetwork
from tests.helpers import wait_until
from tests.test_check import run_check

PEERS = ("government", "bank", "insurance")


# ---- unit -----------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_summary_counts_rows_and_does_not_depend_on_their_order() -> None:
    a = RowChange("dejima_bank", 1, None, {"first_name": "A", "last_name": "B"})
    b = RowChange("dejima_bank", 2, {"first_name": "C", "last_name": "D"}, {"first_name": "C", "last_name": "E"})
    same = RowChange("dejima_risk", 3, {"x": 1}, {"x": 1})  # no net change: not in the summary
    one, two = txlog.summary([a, b, same]), txlog.summary([b, a])
    assert one == two
    assert one["dejima_bank"]["insertions"] == 2
    assert one["dejima_bank"]["deletions"] == 1
    assert set(one) == {"dejima_bank"}


@pytest.mark.unit
def test_folding_batches_keeps_the_first_old_and_the_last_new_image() -> None:
    acc: dict[tuple[str, int], RowChange] = {}
    txlog.fold_into(acc, [RowChange("v", 1, None, {"k": 1})])
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 1}, {"k": 2})])
    assert acc[("v", 1)] == RowChange("v", 1, None, {"k": 2})
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 2}, None)])
    assert txlog.summary(acc.values()) == {}  # inserted then deleted in one gxid: no change


@pytest.mark.unit
def test_the_hash_covers_every_field_and_the_previous_hash() -> None:
    fields: dict[str, Any] = {
        "seq": 1,
        "gxid": "bank.1.a",
        "origin": "bank",
        "role": "origin",
        "views": {"v": {"insertions": 1, "deletions": 0, "digest": "d"}},
        "committed_at": "2024-01-01T00:00:00.000000+00:00",
    }
    base = txlog.chain_hash(txlog.GENESIS, txlog.canonical(**fields))
    for name, other in [("seq", 2), ("gxid", "x"), ("origin", "x"), ("role", "participant"), ("views", {})]:
        assert txlog.chain_hash(txlog.GENESIS, txlog.canonical(**{**fields, name: other})) != base, name
    assert txlog.chain_hash("1" * 64, txlog.canonical(**fields)) != base


# ---- cluster --------------------------------------------------------------------------------------------------
def db(net: LocalNetwork, peer: str) -> str:
    return net.server.url(net.specs[peer].database)


def entries(net: LocalNetwork, peer: str, seal: bool = True) -> list[tuple[int, str, str, str]]:
    """The chained entries, read from the database; with `seal`, after GET /api/v1/txlog chained what is staged (the
    sealer chains committed entries by itself too, a moment after each commit)."""
    if seal:
        net.get(peer, "/api/v1/txlog?limit=1")
    with psycopg.connect(db(net, peer)) as conn:
        rows = conn.execute("SELECT seq, gxid, origin, role FROM dejima.txlog ORDER BY seq").fetchall()
    return [(int(s), g, o, r) for s, g, o, r in rows]


def chain(net: LocalNetwork, peer: str) -> dict[str, Any]:
    body: dict[str, Any] = net.get(peer, "/api/v1/txlog?verify=1&limit=5")
    return body


def no_prepared(net: LocalNetwork) -> None:
    wait_until(lambda: not net.get("bank", "/api/v1/prepared")["prepared"], 20, "no prepared transaction left")


def insert(peer: str, first: str, last: str) -> str:
    table = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}[peer]
    return f"INSERT INTO {table} (first_name, last_name, address) VALUES ('{first}', '{last}', '1 Main St')"  # noqa: S608


def assert_logged(net: LocalNetwork, answers: list[dict[str, Any]], before: dict[str, int]) -> None:
    """Every committed answer has exactly one entry at its origin (role origin) and at each participant (role
    participant); nothing else was appended; every chain verifies."""
    expected: dict[str, dict[str, str]] = {p: {} for p in PEERS}
    for answer in answers:
        origin = answer["gxid"].split(".", 1)[0]
        expected[origin][answer["gxid"]] = "origin"
        for participant in answer["participants"]:
            expected[participant][answer["gxid"]] = "participant"
    for peer in PEERS:
        new = [e for e in entries(net, peer) if e[0] > before[peer]]
        assert {g: r for _, g, _, r in new} == expected[peer], peer
        assert len(new) == len(expected[peer]), f"{peer}: more than one entry for a gxid"
        verdict = chain(net, peer)["verify"]
        assert verdict == {**verdict, "ok": True, "broken_at": None}, (peer, verdict)


def lengths(net: LocalNetwork) -> dict[str, int]:
    return {p: (entries(net, p) or [(0, "", "", "")])[-1][0] for p in PEERS}


@pytest.mark.cluster
def test_every_committed_global_transaction_is_logged_at_its_origin_and_participants(network: LocalNetwork) -> None:
    before = lengths(network)
    answers = []
    for peer, statement in [
        ("bank", insert("bank", "Ann", "Lee")),
        ("government", "UPDATE government_users SET address = '2 Elm St' WHERE first_name = 'Ann'"),
        ("insurance", insert("insurance", "Bo", "Kim")),
        ("bank", "DELETE FROM bank_users WHERE first_name = 'Bo'"),
    ]:
        status, body = network.exec(peer, statement)
        assert status == 200, body
        assert body["participants"], body
        answers.append(body)
    # a write that changes no dejima view (nothing matches) changes no shared data: no entry anywhere
    status, body = network.exec("bank", "UPDATE bank_users SET phone = '1' WHERE first_name = 'Nobody'")
    assert status == 200, body
    assert_logged(network, answers, before)
    head = chain(network, "bank")
    assert head["head"]["gxid"] == answers[-1]["gxid"]
    assert head["length"] == len(entries(network, "bank"))
    code, report = run_check(network)
    assert code == 0, report
    chains: Any = report["chains"]
    assert set(chains) == set(PEERS)
    assert all(c["ok"] and c["broken_at"] is None for c in chains.values())


@pytest.mark.cluster
def test_an_aborted_global_transaction_leaves_no_entry_anywhere(network: LocalNetwork) -> None:
    before = lengths(network)
    # someone else locks insurance's staged entries: insurance cannot stage its entry, votes no at prepare, all
    # roll back (government may have prepared its entry already: it is rolled back with the data)
    with psycopg.connect(db(network, "insurance")) as holder:
        holder.execute("LOCK TABLE dejima.txlog_pending IN EXCLUSIVE MODE")
        status, body = network.exec("bank", insert("bank", "Cy", "Abe"))
        assert status == 409, body
        assert "insurance" in body["error"], body
        holder.rollback()
    no_prepared(network)
    assert lengths(network) == before
    assert network.query("government", "SELECT * FROM government_users WHERE first_name = 'Cy'") == []
    status, body = network.exec("bank", insert("bank", "Cy", "Abe"))
    assert status == 200, body
    assert_logged(network, [body], before)


@pytest.mark.cluster
def test_dejima_check_names_the_peer_and_seq_of_a_chain_tampered_with(network: LocalNetwork) -> None:
    for first in ("Di", "Ed", "Fay"):
        status, body = network.exec("bank", insert("bank", first, "Ng"))
        assert status == 200, body
    seq = entries(network, "government")[-2][0]  # not the head: the chain after it must break too
    with psycopg.connect(db(network, "government"), autocommit=True) as conn:
        original = conn.execute("SELECT views, hash FROM dejima.txlog WHERE seq = %s", (seq,)).fetchone()
        assert original is not None
        try:
            # an entry changed (the summary claims another row digest)
            conn.execute(
                "UPDATE dejima.txlog SET views = jsonb_set(views, '{dejima_bank,digest}', '\"0\"') WHERE seq = %s",
                (seq,),
            )
            code, report = run_check(network)
            assert code == 1
            chains: Any = report["chains"]
            assert chains["government"]["ok"] is False
            assert chains["government"]["broken_at"] == seq
            assert chains["bank"]["ok"] and chains["insurance"]["ok"]
            assert not report["ok"]
            # a hash changed (restoring the entry but forging its hash): broken at the same seq
            conn.execute(
                "UPDATE dejima.txlog SET views = %s, hash = repeat('f', 64) WHERE seq = %s",
                (Jsonb(original[0]), seq),
            )
            code, report = run_check(network)
            assert code == 1
            assert report["chains"]["government"]["broken_at"] == seq  # type: ignore[index]
        finally:
            conn.execute(
                "UPDATE dejima.txlog SET views = %s, hash = %s WHERE seq = %s",
                (Jsonb(original[0]), original[1], seq),
            )
    code, report = run_check(network)
    assert code == 0, report
    # an entry deleted: the chain breaks where it was
    with psycopg.connect(db(network, "insurance"), autocommit=True) as conn:
        seq = entries(network, "insurance")[-2][0]
        row = conn.execute("DELETE FROM dejima.txlog WHERE seq = %s RETURNING *", (seq,)).fetchone()
        assert row is not None
        try:
            code, report = run_check(network)
            assert code == 1
            assert report["chains"]["insurance"]["broken_at"] == seq  # type: ignore[index]
        finally:
            conn.execute(
                "INSERT INTO dejima.txlog VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (*row[:4], Jsonb(row[4]), *row[5:8], Jsonb(row[8])),
            )
    assert run_check(network)[0] == 0


@pytest.mark.cluster
def test_a_peer_restart_keeps_the_chain_valid(network: LocalNetwork) -> None:
    status, body = network.exec("bank", insert("bank", "Gus", "Oh"))
    assert status == 200, body
    head = chain(network, "insurance")["head"]
    network.stop("insurance")
    network.start("insurance")
    network.wait_ready(timeout=60)
    assert chain(network, "insurance")["verify"]["ok"]
    before = lengths(network)
    status, body = network.exec("bank", insert("bank", "Hal", "Oh"))
    assert status == 200, body
    assert_logged(network, [body], before)
    with psycopg.connect(db(network, "insurance")) as conn:
        row = conn.execute("SELECT seq, prev_hash FROM dejima.txlog ORDER BY seq DESC LIMIT 1").fetchone()
    assert row == (head["seq"] + 1, head["hash"])


@pytest.mark.cluster
def test_concurrent_writes_keep_every_chain_valid(network: LocalNetwork) -> None:
    before = lengths(network)
    committed: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def writer(peer: str, worker: int) -> None:
        for i in range(4):
            statement = insert(peer, f"W{worker}n{i}", peer)
            for _ in range(60):
                resp = requests.post(
                    network.specs[peer].url + "/api/v1/exec",
                    json={"sql": statement},
                    headers=network.auth_headers(peer),
                    timeout=60,
                ).json()
                if resp.get("status") == "committed":
                    with lock:
                        committed.append(resp)
                    break
                if resp.get("kind") not in ("conflict", "timeout"):
                    with lock:
                        failures.append(str(resp))
                    return
                time.sleep(0.05)
            else:
                with lock:
                    failures.append(f"{peer}: {statement} never committed")

    threads = [
        threading.Thread(target=writer, args=(peer, n * 10 + k)) for n, peer in enumerate(PEERS) for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(committed) == 24
    no_prepared(network)
    assert_logged(network, committed, before)
    code, report = run_check(network)
    assert code == 0, report


@pytest.mark.cluster
def test_the_sealer_chains_a_committed_entry_without_anyone_reading_the_log(network: LocalNetwork) -> None:
    before = {p: len(entries(network, p)) for p in PEERS}
    status, body = network.exec("bank", insert("bank", "Ivy", "Sealed"))
    assert status == 200, body
    # read straight from the databases (the API would seal first): the sealer threads chain it by themselves
    wait_until(
        lambda: all(len(entries(network, p, seal=False)) == before[p] + 1 for p in PEERS),
        10,
        "every peer chained its entry",
    )
    for peer in PEERS:
        with psycopg.connect(db(network, peer)) as conn:
            assert conn.execute("SELECT count(*) FROM dejima.txlog_pending").fetchone() == (0,), peer
            assert txlog.verify(conn).ok, peer
        assert entries(network, peer, seal=False)[-1][1] == body["gxid"], peer
