"""Cluster tier: client writes that wait for a turn at their origin run together as one global transaction
(DEJIMA_BATCH_MAX, DEJIMA_BATCH_RUNNING; docs/decisions.md "Writes that wait run as one global transaction").

To make a batch for sure, a first write at government is held at insurance's proxy: it keeps government's one turn
for writes while the next ones queue (`queued_transactions` in /api/v1/status); once released, the queued writes run
as one batch. Each test checks what every peer holds afterwards, and that the views agree everywhere. Nothing is
timed: each step waits (with a deadline that only guards against hanging) for what it needs to see first.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from peer.dejima.coordinator import batchable
from peer.pgserver import PgServer
from peer.testkit.proxy import ProxiedCluster, proxied_cluster
from tests.helpers import wait_until
from tests.test_faults import TABLES, settled

pytestmark = pytest.mark.cluster

HOLDER = "UPDATE government_users SET address = 'held' WHERE first_name = 'Holder'"  # reaches insurance


def person(first: str, phone: str = "555-0100") -> str:
    return (
        sql.SQL(
            "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
            " VALUES ({}, 'Batch', {}, '1 Main St', '1990-01-01')"
        )
        .format(sql.Literal(first), sql.Literal(phone))
        .as_string(None)
    )


@pytest.fixture(scope="module")
def module_cluster(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedCluster]:
    env = {"DEJIMA_PEER_TIMEOUT": "8", "DEJIMA_LOCK_TIMEOUT_MS": "5000"}
    with proxied_cluster(pg_server, Path(tmp_path_factory.mktemp("batching")), env=env) as c:
        yield c


@pytest.fixture
def cluster(module_cluster: ProxiedCluster, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The module's cluster with empty tables, one person (Holder) everywhere, and the proxies passing again."""
    module_cluster.reset()
    status, body = module_cluster.exec("government", person("Holder"))
    assert status == 200, body
    yield module_cluster
    for proxy in module_cluster.proxies.values():
        proxy.clear()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n{module_cluster.logs()}")


def stats(cluster: ProxiedCluster, peer: str = "government") -> dict[str, int]:
    return dict(cluster.net.get(peer, "/api/v1/status")["stats"])


def queued_behind_a_held_write(cluster: ProxiedCluster, writes: list[str | list[str]]) -> list[tuple[int, Any]]:
    """Run HOLDER at government while insurance is held; send `writes` at government one after the other (each
    queued before the next is sent), then release insurance. The answers of `writes`, in order (HOLDER's must be
    committed)."""
    insurance = cluster.proxies["insurance"]
    with ThreadPoolExecutor(len(writes) + 1) as pool:
        insurance.hold()
        try:
            holder = pool.submit(cluster.exec, "government", HOLDER)
            wait_until(lambda: cluster.open_transactions()["government"] >= 1, 10, "the held write to start")
            futures: list[Future[tuple[int, Any]]] = []
            for n, write in enumerate(writes, start=1):
                futures.append(pool.submit(cluster.exec, "government", write))
                wait_until(
                    lambda n=n: cluster.net.get("government", "/api/v1/status")["queued_transactions"] == n,  # type: ignore[misc]
                    10,
                    f"{n} writes queued at government",
                )
            assert not holder.done(), holder.result()
        finally:
            insurance.release()
        status, body = holder.result(timeout=30)
        assert (status, body.get("status"), body.get("batch")) == (200, "committed", 1), body
        return [f.result(timeout=60) for f in futures]


def firsts(cluster: ProxiedCluster) -> dict[str, set[str]]:
    """The first names of the Batch people each peer's base table holds."""
    return {
        peer: {r["first_name"] for r in cluster.rows(peer, table) if r["last_name"] == "Batch"} - {"Holder"}
        for peer, table in TABLES.items()
    }


def everywhere(names: set[str]) -> dict[str, set[str]]:
    return dict.fromkeys(TABLES, names)


def test_writes_that_queue_commit_as_one_global_transaction(cluster: ProxiedCluster) -> None:
    before = stats(cluster)
    names = [f"B{i}" for i in range(5)]
    answers = queued_behind_a_held_write(cluster, [person(n) for n in names])
    assert all((s, b["status"], b["batch"]) == (200, "committed", 5) for s, b in answers), answers
    assert len({b["gxid"] for _, b in answers}) == 1, answers
    assert all(b["participants"] == ["bank", "insurance"] for _, b in answers), answers
    settled(cluster)  # every view agrees across its group, every transaction log verifies
    assert firsts(cluster) == everywhere(set(names))
    after = stats(cluster)
    assert after["committed"] - before["committed"] == 6  # the held write and the five
    assert after["global_committed"] - before["global_committed"] == 2
    assert after["batched"] - before["batched"] == 5
    # the participants count global transactions, not client ones: one decision for the batch
    gxid = answers[0][1]["gxid"]
    entries = cluster.net.get("bank", "/api/v1/txlog")["entries"]
    assert [e["gxid"] for e in entries].count(gxid) == 1, entries


def test_a_member_whose_statement_fails_fails_alone(cluster: ProxiedCluster) -> None:
    writes: list[str | list[str]] = [
        person("Good1"),
        "INSERT INTO no_such_table VALUES (1)",  # unknown table: 400
        person("Good2") + " -- a trailing comment, then the batch's savepoint on the next line",
        person("Open") + " /* never closed",  # does not parse: 400, and only this one
        "INSERT INTO government_users (first_name, last_name) VALUES (NULL, 'Batch')",  # NOT NULL: 422
        [person("Two1"), person("Two2"), "UPDATE government_users SET nope = 1"],  # its last statement fails: 400
        [person("Three1"), "UPDATE government_users SET phone = '1' WHERE first_name = 'Three1'"],
    ]
    answers = queued_behind_a_held_write(cluster, writes)
    codes = [s for s, _ in answers]
    assert codes == [200, 400, 200, 400, 422, 400, 200], answers
    good = [b for s, b in answers if s == 200]
    assert len({b["gxid"] for b in good}) == 1 and all(b["batch"] == 3 for b in good), good
    assert answers[1][1]["kind"] == "bad_sql" and "no_such_table" in answers[1][1]["error"], answers[1]
    assert answers[1][1]["sqlstate"] == "42P01", answers[1]
    assert answers[4][1]["kind"] == "constraint", answers[4]
    settled(cluster)
    assert firsts(cluster) == everywhere({"Good1", "Good2", "Three1"})
    phones = {r["first_name"]: r["phone"] for r in cluster.rows("bank", "bank_users")}
    assert phones["Three1"] == "1", phones


def test_a_member_a_participant_refuses_is_run_alone_and_the_others_commit(cluster: ProxiedCluster) -> None:
    bank_db = cluster.server.url(cluster.net.specs["bank"].database)
    with psycopg.connect(bank_db, autocommit=True) as conn:  # only bank refuses long phone numbers
        conn.execute("ALTER TABLE bank_users ADD CONSTRAINT short_phone CHECK (length(phone) < 20)")
    try:
        before = stats(cluster)
        writes: list[str | list[str]] = [person("Ok1"), person("Long", "5" * 30), person("Ok2")]
        answers = queued_behind_a_held_write(cluster, writes)
        assert [s for s, _ in answers] == [200, 422, 200], answers
        assert "bank" in answers[1][1]["error"] and "short_phone" in answers[1][1]["error"], answers[1]
        # the batch failed at bank, so each ran again alone: two global transactions of one write each
        assert [b["batch"] for s, b in answers if s == 200] == [1, 1], answers
        assert stats(cluster)["batch_retried"] - before["batch_retried"] == 3
        settled(cluster)
        assert firsts(cluster) == everywhere({"Ok1", "Ok2"})
    finally:
        with psycopg.connect(bank_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE bank_users DROP CONSTRAINT short_phone")


def test_a_member_that_meets_a_locked_row_is_put_off_not_the_batch(cluster: ProxiedCluster) -> None:
    status, body = cluster.exec("government", person("Locked"))
    assert status == 200, body
    gov_db = cluster.server.url(cluster.net.specs["government"].database)
    before = stats(cluster)
    with psycopg.connect(gov_db) as locker:  # another session holds Locked's row at government
        locker.execute("SELECT 1 FROM government_users WHERE first_name = 'Locked' FOR UPDATE")
        insurance = cluster.proxies["insurance"]
        with ThreadPoolExecutor(3) as pool:
            insurance.hold()
            try:
                holder = pool.submit(cluster.exec, "government", HOLDER)
                wait_until(lambda: cluster.open_transactions()["government"] >= 1, 10, "the held write to start")
                free = pool.submit(cluster.exec, "government", person("Free"))
                wait_until(lambda: stats_queued(cluster) == 1, 10, "the first write queued")
                locked = pool.submit(
                    cluster.exec, "government", "UPDATE government_users SET phone = 'new' WHERE first_name = 'Locked'"
                )
                wait_until(lambda: stats_queued(cluster) == 2, 10, "the second write queued")
            finally:
                insurance.release()
            assert holder.result(timeout=30)[0] == 200
            status, body = free.result(timeout=30)  # its batch did not wait for the locked row
            assert (status, body["batch"]) == (200, 1), body
            # put off (run once more), it now waits for the row lock in government's database, first of its batch
            # (with the origin's lock timeout, DEJIMA_LOCK_TIMEOUT_MS: 5 s)
            wait_until(
                lambda: stats(cluster)["batch_retried"] == before["batch_retried"] + 1 and lock_waits(gov_db) == 1,
                10,
                "the put-off write to wait for the locked row",
            )
            assert not locked.done(), locked.result()
            locker.rollback()
            status, locked_body = locked.result(timeout=30)
    assert (status, locked_body["batch"]) == (200, 1), locked_body
    assert locked_body["gxid"] != body["gxid"]
    assert stats(cluster)["batch_retried"] - before["batch_retried"] == 1
    settled(cluster)
    assert "Free" in firsts(cluster)["insurance"]
    phones = {r["first_name"]: r["phone"] for r in cluster.rows("bank", "bank_users")}
    assert phones["Locked"] == "new", phones


def lock_waits(database_url: str) -> int:
    """Sessions of that database waiting for a lock now (PostgreSQL's own view of its backends)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def stats_queued(cluster: ProxiedCluster) -> int:
    return int(cluster.net.get("government", "/api/v1/status")["queued_transactions"])


def test_batching_can_be_switched_off(pg_server: PgServer, tmp_path: Path) -> None:
    env = {"DEJIMA_PEER_TIMEOUT": "8", "DEJIMA_BATCH_MAX": "1", "DEJIMA_MAX_ACTIVE": "1"}  # one at a time, each alone
    with proxied_cluster(pg_server, tmp_path, env=env) as alone:
        status, body = alone.exec("government", person("Holder"))
        assert status == 200, body
        answers = queued_behind_a_held_write(alone, [person(f"A{i}") for i in range(3)])
        assert [(s, b["batch"]) for s, b in answers] == [(200, 1)] * 3, answers
        assert len({b["gxid"] for _, b in answers}) == 3, answers
        settled(alone)
        assert firsts(alone) == everywhere({"A0", "A1", "A2"})


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        (["UPDATE t SET a = 1"], True),
        (["insert into t values (1); delete from t where a = 2"], True),
        (["MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE"], True),
        (["/* note */ UPDATE t SET a = 'x;y' -- done"], True),
        (["SELECT set_config('lock_timeout', '0', false)"], False),
        (["WITH x AS (SELECT 1) UPDATE t SET a = 1"], False),
        (["SET lock_timeout = 0", "UPDATE t SET a = 1"], False),
        (["UPDATE t SET a = 1", "DO $$ BEGIN PERFORM 1; END $$"], False),
        (["CREATE TABLE x (a int)"], False),
    ],
)
def test_only_plain_writes_are_batched(statements: list[str], expected: bool) -> None:
    assert batchable(statements) is expected


def test_a_write_sees_what_committed_before_it_came_without_a_bound_too(pg_server: PgServer, tmp_path: Path) -> None:
    # DEJIMA_MAX_ACTIVE=0: no turns, no batches; a write still settles what was prepared at its origin when it came
    with proxied_cluster(pg_server, tmp_path, env={"DEJIMA_MAX_ACTIVE": "0"}) as unbounded:
        status, body = unbounded.exec(
            "bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('R', 'W', '0')"
        )
        assert status == 200, body
        for i in range(1, 16):
            phone = sql.Literal(str(i))
            update = sql.SQL("UPDATE bank_users SET phone = {} WHERE first_name = 'R'").format(phone)
            status, body = unbounded.exec("bank", update.as_string(None))
            assert (status, body["batch"]) == (200, 1), body
            follow = sql.SQL("UPDATE government_users SET address = {} WHERE phone = {}").format(
                sql.Literal(f"r{i}"), phone
            )
            status, body = unbounded.exec("government", follow.as_string(None))
            assert (status, body["participants"]) == (200, ["bank", "insurance"]), (i, body)  # it saw phone i
        settled(unbounded)
