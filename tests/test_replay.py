"""Replays and reopening (peer/dejima/auth.py `not_before`, peer/dejima/coordinator.py `_refusal`, common.sql
`dejima.finished`), and a sealer that meets a duplicate or fails (peer/dejima/txlog.py `seal`).

Cluster tier: the shipped example (government, bank, insurance) with every peer-to-peer message passing the test kit's
proxies, so a test can capture what bank sends insurance as an eavesdropper would. Each test checks that what it
refused applied nothing anywhere: the copies of every view agree, no transaction is left open or prepared, `dejima
check` is green, and the peer keeps serving. Unit tier: the Authenticator's start boundary.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.dejima import txlog
from peer.dejima.auth import Authenticator, AuthError, sign_envelope
from peer.dejima.messages import Finish, Propagate
from peer.pgserver import PgServer
from peer.testkit.proxy import request_body
from tests.helpers import sign_as, wait_until
from tests.proxy import ProxiedCluster

MESSAGE = "/peer/v1/message"
PEERS = ("government", "bank", "insurance")
SETTLE = 20.0


# ---- unit: the start boundary -----------------------------------------------------------------------------------
BANK = Ed25519PrivateKey.generate()
GOV = Ed25519PrivateKey.generate()


def a_message(ts: int | None = None) -> dict[str, Any]:
    envelope = Finish("bank.1.x", "bank", "abort").to_json()
    return sign_envelope(envelope, "bank", BANK, ts=ts)


@pytest.mark.unit
def test_a_request_signed_before_the_receiver_started_is_refused_as_a_replay() -> None:
    started = time.time()
    auth = Authenticator("government", GOV, {"bank": BANK.public_key()}, 60.0, not_before=started)
    before = a_message(ts=int(started * 1000) - 1)
    with pytest.raises(AuthError) as err:
        auth.verify_request(before, now=started + 1)
    assert err.value.status == 401
    assert "replayed message" in str(err.value) and "before this peer started" in str(err.value)
    # the same body signed anew after the start: accepted once, then refused as a replay (remembered in memory)
    after = a_message(ts=int(started * 1000) + 1)
    assert auth.verify_request(after, now=started + 1) == "bank"
    with pytest.raises(AuthError, match="replayed message"):
        auth.verify_request(after, now=started + 2)
    # without a boundary (a receiver built by hand), the first is accepted: the boundary is what refuses it
    assert Authenticator("government", GOV, {"bank": BANK.public_key()}).verify_request(before, now=started + 1)


# ---- cluster ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_cluster(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedCluster]:
    # without TLS: the test replays what an eavesdropper on the link captured (TLS would leave it nothing to replay)
    cluster = ProxiedCluster(pg_server, tmp_path_factory.mktemp("replay"), tls=False)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def cluster(module_cluster: ProxiedCluster, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The module's cluster, every peer running, nothing captured, base tables empty; the logs printed on failure."""
    for name, spec in module_cluster.net.specs.items():
        if not spec.pid:
            module_cluster.net.start(name)
    module_cluster.net.wait_ready(timeout=60)
    for proxy in module_cluster.proxies.values():
        proxy.clear()
        proxy.captured.clear()
    module_cluster.reset()
    yield module_cluster
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n{module_cluster.logs()}")


def post(cluster: ProxiedCluster, peer: str, data: bytes | dict[str, Any]) -> tuple[int, Any]:
    """To the peer's listener for peer messages, directly (not through its proxy)."""
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    resp = requests.post(
        cluster.net.specs[peer].message_url + MESSAGE,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    return resp.status_code, resp.json()


def exec_ok(cluster: ProxiedCluster, peer: str, statement: str) -> dict[str, Any]:
    status, body = cluster.exec(peer, statement)
    assert (status, body.get("status")) == (200, "committed"), body
    return dict(body)


def risk(cluster: ProxiedCluster, peer: str, first: str) -> list[str | None]:
    table = {"bank": "bank_users", "insurance": "insurance_users"}[peer]
    return [r["risk_factor"] for r in cluster.rows(peer, table) if r["first_name"] == first]


def settled(cluster: ProxiedCluster) -> dict[str, Any]:
    """Nothing open or prepared anywhere, and `dejima check` green (every view's copies agree, every log intact)."""
    wait_until(cluster.quiet, SETTLE, "no open and no prepared transaction at any peer")
    report = cluster.check()
    assert report["ok"], report
    return report


def still_serves(cluster: ProxiedCluster, first: str, value: int) -> None:
    """A write at bank reaches insurance, and every peer's log answers."""
    exec_ok(cluster, "bank", f"UPDATE bank_users SET risk_factor = {value} WHERE first_name = '{first}'")  # noqa: S608
    assert risk(cluster, "insurance", first) == [str(value)]
    for peer in PEERS:
        assert cluster.net.get(peer, "/api/v1/txlog?limit=1")["peer"] == peer


def logged(cluster: ProxiedCluster, peer: str, says: str) -> None:
    wait_until(lambda: says in cluster.net.tail(peer, 400), 5, f"{peer} to log {says!r}")


def captured_propagate(cluster: ProxiedCluster, gxid: str) -> bytes:
    """The body of the propagate of `gxid` bank sent insurance, as the proxy in front of insurance saw it go by."""
    bodies = [request_body(r) for r in cluster.proxies["insurance"].captured]
    found = [b for b in bodies if json.loads(b).get("kind") == "propagate" and json.loads(b)["body"]["gxid"] == gxid]
    assert len(found) == 1, [json.loads(b).get("kind") for b in bodies]
    return found[0]


def resigned(cluster: ProxiedCluster, body: bytes | dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The same message signed again by its sender with a new message id (and `changes` to its body)."""
    envelope = json.loads(body) if isinstance(body, bytes) else dict(body)
    envelope = {k: v for k, v in envelope.items() if k != "signature"}
    envelope["body"] = {**envelope["body"], "message_id": uuid.uuid4().hex, **changes}
    return sign_as(cluster.net, "bank", envelope)


def sign_as_bank(cluster: ProxiedCluster, envelope: dict[str, Any]) -> dict[str, Any]:
    return sign_as(cluster.net, "bank", envelope)


def refused_vote(answer: dict[str, Any], says: str) -> None:
    body = answer["body"]
    assert (body["vote"], body["error_kind"]) == ("no", "refused"), body
    assert says in body["error"], body


@pytest.mark.cluster
def test_a_propagate_captured_and_replayed_after_the_receivers_restart_is_refused(cluster: ProxiedCluster) -> None:
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Rita', 'Risk', 1)")
    cluster.proxies["insurance"].capture_from("bank")
    two = exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 2 WHERE first_name = 'Rita'")
    assert two["participants"] == ["insurance"], two
    captured = captured_propagate(cluster, two["gxid"])
    cluster.proxies["insurance"].clear()
    exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 3 WHERE first_name = 'Rita'")
    assert risk(cluster, "insurance", "Rita") == ["3"]
    settled(cluster)

    cluster.restart("insurance")  # killed and started again: its memory of signature ids is gone
    status, answer = post(cluster, "insurance", captured)  # the captured bytes, well within the replay window
    assert status == 401, answer
    assert "replayed message" in answer["error"] and "before this peer started" in answer["error"], answer
    logged(cluster, "insurance", "refused a propagate (signed by 'bank')")

    assert risk(cluster, "insurance", "Rita") == ["3"]
    assert risk(cluster, "bank", "Rita") == ["3"]
    report = settled(cluster)
    assert report["views"]["dejima_risk"]["identical"], report
    still_serves(cluster, "Rita", 4)
    settled(cluster)


@pytest.mark.cluster
def test_a_committed_global_transaction_resigned_by_its_sender_is_not_opened_again(cluster: ProxiedCluster) -> None:
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Cole', 'Mit', 1)")
    cluster.proxies["insurance"].capture_from("bank")
    two = exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 2 WHERE first_name = 'Cole'")
    captured = captured_propagate(cluster, two["gxid"])
    cluster.proxies["insurance"].clear()
    exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 3 WHERE first_name = 'Cole'")
    settled(cluster)
    for restarted in (False, True):
        if restarted:
            cluster.restart("insurance")
        status, answer = post(cluster, "insurance", resigned(cluster, captured))
        assert status == 200, answer
        refused_vote(answer, f"global transaction {two['gxid']} was committed here already")
        logged(cluster, "insurance", f"gxid {two['gxid']}")
        assert cluster.open_transactions()["insurance"] == 0
        assert risk(cluster, "insurance", "Cole") == ["3"]
        settled(cluster)
    # a finish(abort) for it now contradicts what happened here: refused, nothing changes
    abort = sign_as_bank(cluster, Finish(two["gxid"], "bank", "abort").to_json())
    status, answer = post(cluster, "insurance", abort)
    assert status == 200, answer
    assert (answer["body"]["ok"], answer["body"]["error_kind"]) == (False, "refused"), answer
    still_serves(cluster, "Cole", 5)
    settled(cluster)


def risk_update(gxid: str, first: str, old: Any, new: Any, message_id: str | None = None) -> dict[str, Any]:
    """bank's propagate of dejima_risk changing `first`'s risk factor (it changes nothing insurance forwards)."""
    row = {"first_name": first, "last_name": "Abort"}
    return Propagate(
        gxid=gxid,
        origin="bank",
        sender="bank",
        view="dejima_risk",
        insertions=[{**row, "risk_factor": new}],
        deletions=[{**row, "risk_factor": old}],
        timeout_ms=5000,
        message_id=message_id or uuid.uuid4().hex,
    ).to_json()


def new_gxid(offset_s: float = 0.0) -> str:
    return f"bank.{int((time.time() + offset_s) * 1e9):x}.{uuid.uuid4().hex[:8]}"


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["finish-abort", "voted-no"])
def test_an_aborted_global_transaction_resigned_by_its_sender_is_not_opened_again(
    cluster: ProxiedCluster, how: str
) -> None:
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Al', 'Abort', 1)")
    assert risk(cluster, "insurance", "Al") == ["1"]
    gxid = new_gxid()
    if how == "finish-abort":  # insurance votes yes, then its origin aborts it
        status, answer = post(cluster, "insurance", sign_as_bank(cluster, risk_update(gxid, "Al", 1, 7)))
        assert (status, answer["body"]["vote"]) == (200, "yes"), answer
        assert cluster.open_transactions()["insurance"] == 1
        status, answer = post(cluster, "insurance", sign_as_bank(cluster, Finish(gxid, "bank", "abort").to_json()))
        assert (status, answer["body"]["ok"]) == (200, True), answer
    else:  # insurance cannot apply it and votes no: it rolls back by itself
        status, answer = post(cluster, "insurance", sign_as_bank(cluster, risk_update(gxid, "Al", 1, "seven")))
        assert (status, answer["body"]["vote"]) == (200, "no"), answer
    wait_until(lambda: cluster.open_transactions()["insurance"] == 0, 10, "insurance to roll back")
    for restarted in (False, True):
        if restarted:
            cluster.restart("insurance")  # the in-memory tombstone is gone; the record in its database is not
        status, answer = post(cluster, "insurance", sign_as_bank(cluster, risk_update(gxid, "Al", 1, 8)))
        assert status == 200, answer
        refused_vote(answer, "aborted here already")
        assert cluster.open_transactions()["insurance"] == 0
        assert risk(cluster, "insurance", "Al") == ["1"]
    # a finish(commit) for it contradicts what happened here: refused
    status, answer = post(cluster, "insurance", sign_as_bank(cluster, Finish(gxid, "bank", "commit").to_json()))
    assert (status, answer["body"]["ok"], answer["body"]["error_kind"]) == (200, False, "refused"), answer
    settled(cluster)
    still_serves(cluster, "Al", 2)
    settled(cluster)


@pytest.mark.cluster
@pytest.mark.parametrize(("offset", "says"), [(-200.0, "began"), (200.0, "begins")])
def test_a_global_transaction_past_the_horizon_is_refused_without_looking_it_up(
    cluster: ProxiedCluster, offset: float, says: str
) -> None:
    """A gxid older than the transaction timeout plus the replay window (or as far in the future) is refused by its
    start time alone: its origin gave up on it long ago, so nothing needs remembering it that long."""
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Hal', 'Abort', 1)")
    status, answer = post(cluster, "insurance", sign_as_bank(cluster, risk_update(new_gxid(offset), "Hal", 1, 9)))
    assert status == 200, answer
    refused_vote(answer, says)
    assert cluster.open_transactions()["insurance"] == 0
    assert risk(cluster, "insurance", "Hal") == ["1"]
    settled(cluster)


def db(cluster: ProxiedCluster, peer: str) -> str:
    return cluster.server.url(cluster.net.specs[peer].database)


@pytest.mark.cluster
def test_the_sealer_drops_a_duplicate_and_the_log_keeps_answering(cluster: ProxiedCluster) -> None:
    """What the replay of issue 24 left behind: an entry staged a second time for a gxid the chain holds. The sealer
    drops it (and says so); it never fails on it, and GET /api/v1/txlog answers 200 throughout."""
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Dup', 'Lee', 1)")
    before = cluster.net.get("insurance", "/api/v1/txlog?verify=1&limit=1")
    assert before["verify"]["ok"], before
    last = before["entries"][0]
    with psycopg.connect(db(cluster, "insurance"), autocommit=True) as conn:
        txlog.stage(conn, last["gxid"], last["origin"], last["role"], last["views"], last["witness"])
    # the sealer thread (woken by the next commit there, or its interval) and the API both meet it
    exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 2 WHERE first_name = 'Dup'")
    logged(cluster, "insurance", f"dropped a staged entry for {last['gxid']}")
    after = cluster.net.get("insurance", "/api/v1/txlog?verify=1&limit=2")
    assert "seal_error" not in after, after
    assert after["verify"]["ok"], after
    assert after["length"] == before["length"] + 1, after
    assert after["entries"][1]["gxid"] == last["gxid"]
    with psycopg.connect(db(cluster, "insurance")) as conn:
        assert conn.execute("SELECT count(*) FROM dejima.txlog_pending").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM dejima.txlog WHERE gxid = %s", (last["gxid"],)).fetchone() == (1,)
    assert "sealing the txlog failed" not in cluster.net.tail("insurance", 400)
    still_serves(cluster, "Dup", 3)
    settled(cluster)


@pytest.mark.cluster
def test_the_log_answers_while_sealing_cannot_run(cluster: ProxiedCluster) -> None:
    """Whatever stops sealing (here: someone holds the chain's lock), GET /api/v1/txlog answers with the chain as it
    is, says why it could not seal, and seals the next time."""
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, risk_factor) VALUES ('Lock', 'Ed', 1)")
    length = cluster.net.get("insurance", "/api/v1/txlog?limit=0")["length"]
    with psycopg.connect(db(cluster, "insurance"), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (txlog.CHAIN_LOCK,))
        try:
            exec_ok(cluster, "bank", "UPDATE bank_users SET risk_factor = 2 WHERE first_name = 'Lock'")
            body = cluster.net.get("insurance", "/api/v1/txlog?verify=1&limit=1", timeout=30)
            assert "seal_error" in body and "lock" in body["seal_error"], body
            assert body["verify"]["ok"] and body["length"] == length, body
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (txlog.CHAIN_LOCK,))
    body = cluster.net.get("insurance", "/api/v1/txlog?verify=1&limit=1")
    assert "seal_error" not in body and body["length"] == length + 1, body
    settled(cluster)


@pytest.mark.cluster
def test_a_global_transaction_committed_here_without_a_change_is_not_opened_again(cluster: ProxiedCluster) -> None:
    """A participant whose data a write did not change logs no entry for it; it records the gxid all the same."""
    exec_ok(cluster, "bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('Nil', 'Change', '1')")
    with psycopg.connect(db(cluster, "government"), autocommit=True) as conn:  # government has the new phone already
        conn.execute("UPDATE government_users SET phone = '2' WHERE first_name = 'Nil'")
    cluster.proxies["government"].capture_from("bank")
    same = exec_ok(cluster, "bank", "UPDATE bank_users SET phone = '2' WHERE first_name = 'Nil'")
    assert same["participants"] == ["government"], same
    bodies = [request_body(r) for r in cluster.proxies["government"].captured]
    captured = [b for b in bodies if json.loads(b).get("kind") == "propagate"]
    assert len(captured) == 1
    settled(cluster)
    with psycopg.connect(db(cluster, "government"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM dejima.txlog WHERE gxid = %s", (same["gxid"],)).fetchone() == (0,)
        outcome = conn.execute("SELECT outcome FROM dejima.finished WHERE gxid = %s", (same["gxid"],)).fetchall()
    assert outcome == [("committed",)]
    cluster.restart("government")
    status, answer = post(cluster, "government", resigned(cluster, captured[0]))
    assert status == 200, answer
    refused_vote(answer, "was committed here already")
    settled(cluster)


@pytest.mark.cluster
def test_what_a_participant_finished_is_forgotten_only_past_the_horizon(cluster: ProxiedCluster) -> None:
    """The records old enough for their gxid's start time to refuse it are the only ones pruned (by the recovery
    loop, at most once a minute: at the first pass after a start)."""
    old, recent = new_gxid(-3600), new_gxid()
    with psycopg.connect(db(cluster, "insurance"), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dejima.finished (gxid, outcome, at) VALUES (%s, 'aborted', now() - interval '1 hour')", (old,)
        )
        conn.execute("INSERT INTO dejima.finished (gxid, outcome) VALUES (%s, 'aborted')", (recent,))
    cluster.restart("insurance")

    def kept() -> list[str]:
        with psycopg.connect(db(cluster, "insurance"), autocommit=True) as conn:
            rows = conn.execute("SELECT gxid FROM dejima.finished WHERE gxid = ANY(%s)", ([old, recent],)).fetchall()
        return sorted(r[0] for r in rows)

    wait_until(lambda: kept() == [recent], 20, "the old record pruned, the recent one kept")
    status, answer = post(cluster, "insurance", sign_as_bank(cluster, risk_update(recent, "Nobody", 1, 2)))
    assert status == 200, answer
    refused_vote(answer, "aborted here already")
