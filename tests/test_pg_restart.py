"""PostgreSQL restarts while global transactions are prepared in it.

Cluster tier: the origin (government) kills itself at a fault point with both participants' parts prepared (bank's
and insurance's, in the one PostgreSQL the example network shares); PostgreSQL is restarted while they are prepared
and their peers run on, their connections broken. A prepared transaction is kept on disk by PostgreSQL: after the
restart the same ones are still prepared. Once the origin is back, the participants' recovery asks it and finishes
them as it decided: committed when the decision was durable (`origin_after_decision`), rolled back when there was none
(`origin_before_decision`). Afterwards `dejima check` is ok, nothing is prepared, and every peer takes a write again.

The server is the session's (tests/conftest.py `pg_server`): with an external one (DEJIMA_DATABASE_URL) the kit
cannot restart it, and `PgServer.restart` raises instead of doing nothing (unit tier, below), so this test fails
loudly rather than pass without a restart.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from peer.pgserver import PgServer, PgServerError
from tests.proxy import ProxiedCluster
from tests.test_crash_points import A1, A1_APPLIED, ENV, crashed, decisions, prepared_parts, quiet, run

PARTICIPANTS = ["bank", "insurance"]


def postmaster_started(server: PgServer) -> datetime.datetime:
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    started: datetime.datetime = row[0]
    return started


@pytest.fixture
def cluster(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The example network, no proxies, 3 s transactions; logs printed when the test fails."""
    made = ProxiedCluster(pg_server, tmp_path / "net", env=ENV, proxied=False)
    try:
        made.start()
        yield made
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n{made.logs(200)}")
    finally:
        made.close()


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("point", "outcome"), [("origin_after_decision", "committed"), ("origin_before_decision", "rolled back")]
)
def test_transactions_prepared_across_a_postgresql_restart_finish_as_their_origin_decided(
    cluster: ProxiedCluster, point: str, outcome: str
) -> None:
    cluster.restart("government", env={"DEJIMA_FAULT_POINT": point}, timeout=30)
    cluster.net.wait_ready(timeout=30)
    decided = decisions(cluster, "government")
    with pytest.raises(requests.ConnectionError):  # the origin dies while answering
        cluster.exec(*A1)
    crashed(cluster, "government", point)
    assert prepared_parts(cluster) == PARTICIPANTS
    held = cluster.prepared()

    started = postmaster_started(cluster.server)
    cluster.server.restart()  # returns once it accepts connections again
    assert postmaster_started(cluster.server) > started, "PostgreSQL did not restart"
    assert cluster.prepared() == held, "the prepared transactions did not survive the restart"
    for peer in PARTICIPANTS:  # the participants ran on through the restart
        assert cluster.net.procs[peer].poll() is None, f"{peer} exited:\n{cluster.net.tail(peer)}"

    cluster.restart("government", drop=("DEJIMA_FAULT_POINT",), timeout=30)
    report = quiet(cluster)  # the participants' recovery finished them; check ok
    assert report["prepared_transactions"] == []
    new = decisions(cluster, "government") - decided
    assert ("committed" if new else "rolled back") == outcome, new
    assert A1_APPLIED(cluster) == dict.fromkeys([*PARTICIPANTS, "government"], outcome == "committed")

    # the participants take a write again that reaches the two other peers, on connections made since the restart
    for peer, insert in (
        ("bank", "INSERT INTO bank_users (first_name, last_name, address) VALUES ('Ivy', 'Bank', '4 Elm')"),
        ("insurance", "INSERT INTO insurance_users (first_name, last_name, address) VALUES ('Ivy', 'Ins', '4 Elm')"),
    ):
        body = run(cluster, (peer, insert))
        assert sorted(body["participants"]) == sorted({"government", *PARTICIPANTS} - {peer}), body
    quiet(cluster)


@pytest.mark.unit
def test_restart_refuses_an_external_server() -> None:
    server = PgServer(state_dir=Path("unused"), kind="external", external_url="postgresql://u@db.invalid:5433/x")
    with pytest.raises(PgServerError, match=r"cannot restart the external server at db\.invalid:5433"):
        server.restart()
