"""Cluster tier: a crash (kill -9) at every fault point site of the commit protocol, a restart, and the outcome the
protocol promises (ARCHITECTURE.md "The write path"; docs/decisions.md).

Every `self.fault(step[, site])` call in peer/dejima/coordinator.py is a site; DEJIMA_FAULT_POINT=<step> crashes the
peer at any site of that step, `<step>:<site>` at that one only (`participant_after_prepare` is reached after a
prepare on the way and after the origin's prepare message). `test_every_fault_point_site_has_a_crash_test` reads the
sites from the source, so a new one without a test here fails.

Each case runs on a network of its own (the shipped example, no proxies, 3 s transactions, recovery every 0.5 s):
the rows the write needs are written first, without fault; the victim is restarted with the fault point (and, for a
step with two sites, first shown to survive a write that reaches the other site); then the write runs and the victim
kills itself at the site. While it is down the test asserts what the client was told and which transactions are
prepared (what tells the sites apart: before a prepare nothing is; after it the prepared ones wait). Then it restarts
without the fault point, and once nothing is open or prepared anywhere: `dejima check` is ok (every view identical
across its group, every chain intact, no prepared transaction), and the write took effect at every peer or at none,
as the origin's durable decision (a row in its `dejima.decisions`, read from its database) says, which is the outcome
the protocol promises for that site. A write that rolled back commits when run again.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from peer.dejima import coordinator
from peer.pgserver import PgServer
from tests.helpers import wait_until
from tests.proxy import ProxiedCluster

TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
SETTLE = 30.0  # seconds: a deadline against hanging only (recovery finishes within a few seconds)
ENV = {"DEJIMA_TXN_TIMEOUT": "3"}

Write = tuple[str, str]  # (origin, SQL) run as one global transaction
Applied = Callable[[ProxiedCluster], dict[str, bool]]  # per peer: whether a write's effect is there
A1: Write = (
    "government",
    "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
    " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')",
)
# government changes a column only dejima_insurance carries: one message, to insurance, which changes nothing it
# shares with anyone else; so insurance prepares on the way (the origin sends no prepare message)
BIRTHDATE: Write = (
    "government",
    "UPDATE government_users SET birthdate = '1980-05-18' WHERE first_name = 'Jane' AND last_name = 'Roe'",
)
# an insert at government reaches bank and insurance, neither of them a leaf (each shares a second view): both get
# the origin's prepare message
JUNE: Write = (
    "government",
    "INSERT INTO government_users (first_name, last_name, phone, address) VALUES ('June', 'Moe', '555-0111', '1 Ash')",
)


def rows_of(cluster: ProxiedCluster, peer: str, first: str, last: str) -> list[dict[str, Any]]:
    return [r for r in cluster.rows(peer, TABLES[peer]) if (r["first_name"], r["last_name"]) == (first, last)]


def inserted(first: str, last: str, phone: str, address: str, birthdate: str | None) -> Applied:
    """Per peer: the person is there, once, with what that peer's views carry of them (bank has no birthdate,
    insurance no phone); not there at all is the other answer; anything else (a partial row, two) fails."""

    def applied(cluster: ProxiedCluster) -> dict[str, bool]:
        out = {}
        for peer in TABLES:
            found = [(r.get("phone"), r["address"], r.get("birthdate")) for r in rows_of(cluster, peer, first, last)]
            whole = (
                None if peer == "insurance" else phone,
                address,
                None if peer == "bank" else birthdate,
            )
            assert found in ([], [whole]), f"{peer} holds {found} of {first} {last}, expected none or {whole}"
            out[peer] = bool(found)
        return out

    return applied


def birthdate_applied(cluster: ProxiedCluster) -> dict[str, bool]:
    """Per peer that holds a birthdate (government, insurance): Jane's is the new one."""
    found = {
        peer: [r["birthdate"] for r in rows_of(cluster, peer, "Jane", "Roe")] for peer in ("government", "insurance")
    }
    for peer, dates in found.items():
        assert dates in (["1980-05-17"], ["1980-05-18"]), f"{peer}: {dates}"
    return {peer: dates == ["1980-05-18"] for peer, dates in found.items()}


A1_APPLIED = inserted("Jane", "Roe", "555-0199", "2 Elm St", "1980-05-17")
JUNE_APPLIED = inserted("June", "Moe", "555-0111", "1 Ash", None)


@dataclass(frozen=True)
class Site:
    """One fault point site, and what the protocol promises when its peer is killed there."""

    point: str  # DEJIMA_FAULT_POINT
    victim: str
    write: Write
    applied: Applied
    told: str  # what the client hears: "committed", "refused" (an error naming the victim), "lost" (no answer)
    prepared: tuple[str, ...]  # the peers whose part stays prepared while the victim is down
    outcome: str  # "committed" or "rolled back" everywhere, once the victim is back
    setup: tuple[Write, ...] = ()  # written before the fault point is set
    other_site: Write | None = None  # a write that reaches the same step at its other site: it must not crash


SITES = [
    # insurance applied A1's delta in its open transaction and dies before answering: nothing was prepared
    Site("participant_while_propagating", "insurance", A1, A1_APPLIED, "refused", (), "rolled back"),
    # government heard every participant vote yes and dies before asking any to prepare: the participants' open
    # transactions are rolled back once their origin went silent
    Site("origin_before_prepare", "government", A1, A1_APPLIED, "lost", (), "rolled back"),
    # insurance prepared on the way and dies before answering: government cannot know, aborts; insurance's recovery
    # finds no decision (presumed abort)
    Site(
        "participant_after_prepare:on_the_way",
        "insurance",
        BIRTHDATE,
        birthdate_applied,
        "refused",
        ("insurance",),
        "rolled back",
        setup=(A1,),
        other_site=JUNE,
    ),
    # insurance prepared on government's prepare message and dies before acknowledging it: the same
    Site(
        "participant_after_prepare:on_prepare",
        "insurance",
        JUNE,
        JUNE_APPLIED,
        "refused",
        ("insurance",),
        "rolled back",
        setup=(A1,),  # Jane, whom the other site's write changes
        other_site=BIRTHDATE,
    ),
    # both participants prepared; government dies before its decision: no decision row, they roll back
    Site("origin_before_decision", "government", A1, A1_APPLIED, "lost", ("bank", "insurance"), "rolled back"),
    # government's decision (its own commit) is durable; it dies before telling anyone: they commit once it is back
    Site("origin_after_decision", "government", A1, A1_APPLIED, "lost", ("bank", "insurance"), "committed"),
    # the decision is durable and the client is told so; bank dies on the commit message, and commits once back
    Site("participant_before_commit", "bank", A1, A1_APPLIED, "committed", ("bank",), "committed"),
]


def fault_sites_in_the_source() -> set[str]:
    """Every value of DEJIMA_FAULT_POINT that crashes at exactly one site: `step` for a step called at one place,
    `step:site` for each place of a step called at several (the calls `self.fault(...)` in coordinator.py)."""
    calls: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(Path(coordinator.__file__).read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fault":
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            assert len(args) == len(node.args) >= 1, f"line {node.lineno}: a fault point named by a constant"
            calls.append((args[0], args[1] if len(args) > 1 else ""))
    assert len(set(calls)) == len(calls), f"two sites share a name: {calls}"
    names = set()
    for step, group in itertools.groupby(sorted(calls), key=lambda c: c[0]):
        sites = [site for _, site in group]
        assert len(sites) == 1 or all(sites), f"{step} is reached at several places: each needs a site name"
        names |= {f"{step}:{site}" if len(sites) > 1 else step for site in sites}
    return names


@pytest.mark.unit
def test_every_fault_point_site_has_a_crash_test() -> None:
    assert {site.point for site in SITES} == fault_sites_in_the_source()


# ---- the cluster ------------------------------------------------------------------------------------------------
@pytest.fixture
def cluster(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxiedCluster]:
    """The example network for one test, no proxies, 3 s transactions; logs printed when the test fails."""
    made = ProxiedCluster(pg_server, tmp_path / "net", env=ENV, proxied=False)
    try:
        made.start()
        yield made
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n{made.logs(200)}")
    finally:
        made.close()


def run(cluster: ProxiedCluster, write: Write) -> dict[str, Any]:
    """Run a write that must commit."""
    status, body = cluster.exec(*write)
    assert (status, body.get("status")) == (200, "committed"), (write, body)
    answer: dict[str, Any] = body
    return answer


def decisions(cluster: ProxiedCluster, origin: str) -> set[str]:
    """The gxids `origin` decided to commit: its `dejima.decisions`, read from its database (works while it is down)."""
    with psycopg.connect(cluster.server.url(cluster.net.specs[origin].database), autocommit=True) as conn:
        return {str(r[0]) for r in conn.execute("SELECT gxid FROM dejima.decisions").fetchall()}


def prepared_parts(cluster: ProxiedCluster) -> list[str]:
    """The peers whose part of a global transaction is prepared now (gid `dejima:<gxid>:<peer>`), sorted."""
    return sorted(gid.rsplit(":", 1)[1] for gid in cluster.prepared())


def quiet(cluster: ProxiedCluster) -> dict[str, Any]:
    """Once nothing is open or prepared anywhere: the `dejima check` report, which must be ok."""
    wait_until(cluster.quiet, SETTLE, "no open and no prepared transaction at any peer")
    report = cluster.check()
    assert report["ok"], report
    assert report["prepared_transactions"] == []
    return report


def arm(cluster: ProxiedCluster, victim: str, point: str) -> None:
    """Restart `victim` with the fault point set; wait until every group has formed again."""
    cluster.restart(victim, env={"DEJIMA_FAULT_POINT": point}, timeout=30)
    cluster.net.wait_ready(timeout=30)


def crashed(cluster: ProxiedCluster, victim: str, point: str) -> None:
    """The victim killed itself at the fault point: its log says so, its process is gone."""
    wait_until(lambda: f"fault point {point} reached" in cluster.net.tail(victim, 400), 10, f"{victim} at {point}")
    proc = cluster.net.procs[victim]
    wait_until(lambda: proc.poll() is not None, 10, f"{victim}'s process to end")
    assert proc.returncode == -9, f"{victim} ended with {proc.returncode}, not by SIGKILL"


@pytest.mark.cluster
@pytest.mark.parametrize("site", SITES, ids=[s.point for s in SITES])
def test_a_crash_at_the_site_ends_as_the_protocol_promises_once_the_peer_restarts(
    cluster: ProxiedCluster, site: Site
) -> None:
    origin = site.write[0]
    for write in site.setup:
        run(cluster, write)
    quiet(cluster)
    arm(cluster, site.victim, site.point)
    if site.other_site is not None:  # the same step at its other site: no crash there
        run(cluster, site.other_site)
        quiet(cluster)
        assert cluster.net.procs[site.victim].poll() is None, f"{site.victim} crashed at the other site"
        assert f"fault point {site.point} reached" not in cluster.net.tail(site.victim, 400)
    before = site.applied(cluster)
    assert not any(before.values()), before
    decided = decisions(cluster, origin)

    try:
        status, body = cluster.exec(*site.write)
    except requests.ConnectionError:
        status, body = 0, {}
    crashed(cluster, site.victim, site.point)
    if site.told == "committed":
        assert (status, body.get("status")) == (200, "committed"), body
    elif site.told == "refused":
        assert status in (503, 504), body
        assert site.victim in body["error"], body
    else:
        assert status == 0, f"the origin died at {site.point}, yet answered {status} {body}"
    # while the victim is down: exactly these parts are prepared (others the origin aborts or commits meanwhile)
    wait_until(lambda: prepared_parts(cluster) == sorted(site.prepared), 10, f"prepared: {site.prepared}")

    cluster.restart(site.victim, drop=("DEJIMA_FAULT_POINT",), timeout=30)
    quiet(cluster)
    new = decisions(cluster, origin) - decided
    assert len(new) <= 1, new
    outcome = "committed" if new else "rolled back"
    assert outcome == site.outcome, f"{site.point}: the origin's decision says {outcome}"
    applied = site.applied(cluster)
    assert applied == dict.fromkeys(applied, outcome == "committed"), (outcome, applied)
    if outcome == "rolled back":
        run(cluster, site.write)  # and the same write commits now
        assert site.applied(cluster) == dict.fromkeys(applied, True)
        quiet(cluster)
