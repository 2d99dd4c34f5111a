"""ycsb: the workload of the Dejima paper draft on random tree topologies of generated peers.

``python -m peer.bench ycsb [--json] [--quick] [--peers 3,5,10,20] [--seconds S] [--records N]
[--clients-per-peer N] [--commit-wait all|decision]``

Per topology size N: a random recursive tree on peers p0 … p<N-1> (seeded), one generated peer type per peer in a
temporary sql root (peer/bench/topology.py): table `usertable(ycsb_key, home, field0)`, one dejima view per tree
edge a-b sharing the records whose home is a or b. Records are spread over the participants: `--records` per peer
(its home records), each also held by the home's neighbours. One database per peer on one PostgreSQL; the records
are loaded directly into every database that holds them before the peers start (no gxid: nothing propagates).

Workload (closed loop, `--clients-per-peer` clients at every peer): a transaction is 10 operations on 10 distinct
records the origin holds, drawn Zipf 0.8 (hot records spread by a seeded permutation): 5 reads (SELECT field0) and
5 writes (UPDATE field0), in key order (fewer deadlocks), sent as one `POST /api/v1/exec` (one global transaction;
a write reaches the record's other holders: 1 hop from its home, 2 hops from a neighbour of the home).
Figures per N: committed txn/s in total and per participant, abort rate, latency. The paper draft reports ≈ 24
committed txn/s per participant at 20 participants on an 8-core machine (its unit is not stated); ours is printed
beside it.

Checks: every topology committed something, the peers' `committed` counters grew at least by what the clients
counted, and after each run every dejima view is identical across its group (`dejima check`).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from peer.bench.common import (
    SEED,
    BenchError,
    Zipf,
    check_consistency,
    log,
    machine,
    pg_server,
    running_network,
    total_stat,
)
from peer.bench.loop import closed_loop
from peer.bench.report import Chart, machine_md, md_table
from peer.bench.topology import YCSB_TABLE, neighbours, random_tree, tree_peer, tree_types, write_root
from peer.network import PeerSpec, free_port
from peer.pgserver import PgServer

NAME = "ycsb"
HELP = "the paper draft's YCSB workload (10 ops: 5 reads, 5 writes, Zipf 0.8) on random trees of 3..20 peers"
DEFAULT_PEERS, QUICK_PEERS = (3, 5, 10, 20), (3, 5)
DEFAULT_SECONDS, QUICK_SECONDS = 20.0, 3.0
DEFAULT_RECORDS, QUICK_RECORDS = 1_000, 200
OPS, READS = 10, 5
THETA = 0.8
PAPER: dict[str, Any] = {
    "participants": 20,
    "txn_per_s_per_participant": 24.0,
    "machine": "8 cores",
    "note": "Dejima paper draft; the unit is not stated (read as committed txn/s per participant)",
}
TARGET = "none (compared with the paper draft: ≈ 24 committed txn/s per participant at 20 participants, 8 cores)"


def _load(url: str, homes: list[int], records: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for h in homes:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (ycsb_key, home, field0) SELECT %s::bigint * %s + g, %s, 'init'"
                    " FROM generate_series(0, %s - 1) AS g"
                ).format(sql.Identifier(YCSB_TABLE)),
                (h, records, h, records),
            )
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(YCSB_TABLE)))
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(YCSB_TABLE))).fetchone()
        if row is None or row[0] != len(homes) * records:
            raise BenchError(f"loading {url}: {row} rows, expected {len(homes) * records}")


def transaction(keys: list[tuple[int, int]], rng: random.Random, tag: str) -> list[str]:
    """10 operations on the given (key, home) records: the first READS drawn are read, the others written; sent in
    key order."""
    writes = set(rng.sample(range(len(keys)), len(keys) - READS))
    ops: list[tuple[int, str]] = []
    for i, (key, home) in enumerate(keys):
        if i in writes:
            q = sql.SQL("UPDATE {} SET field0 = {} WHERE ycsb_key = {} AND home = {}").format(
                sql.Identifier(YCSB_TABLE), sql.Literal(tag), sql.Literal(key), sql.Literal(home)
            )
        else:
            q = sql.SQL("SELECT field0 FROM {} WHERE ycsb_key = {} AND home = {}").format(
                sql.Identifier(YCSB_TABLE), sql.Literal(key), sql.Literal(home)
            )
        ops.append((key, q.as_string(None)))
    return [stmt for _, stmt in sorted(ops)]


def run_topology(
    server: PgServer,
    n: int,
    seconds: float,
    warmup_s: float,
    records: int,
    per_peer: int,
    commit_wait: str,
    tmp: Path,
    tls: bool = True,
) -> dict[str, Any]:
    rng = random.Random(SEED + n)  # noqa: S311 - topology for a benchmark, not security
    edges = random_tree(n, rng)
    nbrs = neighbours(n, edges)
    root = write_root(tmp / f"types{n}", tree_types(n, edges))
    env = {"DEJIMA_COMMIT_WAIT": commit_wait, "DEJIMA_POOL_SIZE": "6" if n > 5 else "20"}
    specs = [
        PeerSpec(
            name=tree_peer(i),
            peer_type=tree_peer(i),
            port=free_port(),
            database=f"bench_ycsb_p{i}",
            env=dict(env),
            tls=tls,
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    with running_network(server, specs, sql_root=root, wait=False) as net:
        held: dict[int, list[tuple[int, int]]] = {}
        for i, spec in enumerate(specs):
            net.install(spec.name)  # its roles too, as the peer will need them
            homes = [i, *nbrs[i]]
            _load(net.admin_url(spec.name), homes, records)
            held[i] = [(h * records + r, h) for h in homes for r in range(records)]
        net.start_all()
        net.wait_ready(timeout=120 + 15 * n)
        startup_s = round(time.perf_counter() - started, 1)
        zipfs = {i: Zipf(len(held[i]), THETA, seed=SEED + 31 * n + i) for i in range(n)}
        origin = [i for i in range(n) for _ in range(per_peer)]

        def body(c: int, crng: random.Random, k: int) -> dict[str, Any]:
            i = origin[c]
            picks = [held[i][j] for j in zipfs[i].distinct(crng, OPS)]
            return {"sql": transaction(picks, crng, f"y{n}-{c}-{k}")}

        log(f"{n} peers (tree {edges}): {len(origin)} clients, {warmup_s} s warm-up + {seconds} s")
        before = total_stat(net, "committed")
        auth = [net.auth_headers(specs[i].name) for i in origin]
        point = closed_loop(
            [specs[i].url for i in origin],
            body,
            seconds,
            warmup_s,
            SEED + n,
            headers=auth,
            context=net.client_context(),
        )
        after = total_stat(net, "committed")
        if before is not None and after is not None and after - before < point["client_committed"]:
            raise BenchError(f"the peers counted {after - before} commits, the clients {point['client_committed']}")
        consistency = check_consistency(net)
    point.pop("clients")
    return {
        "peers": n,
        "edges": edges,
        "degrees": {tree_peer(i): len(v) for i, v in nbrs.items()},
        "clients": len(origin),
        **point,
        "txn_per_s_per_participant": round(point["txn_per_s"] / n, 2),
        "startup_s": startup_s,
        "consistency": consistency,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes: tuple[int, ...] = args.peers or (QUICK_PEERS if args.quick else DEFAULT_PEERS)
    if any(s < 2 for s in sizes):
        raise BenchError("a tree needs at least 2 peers")
    seconds: float = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    warmup_s: float = 0.5 if args.quick else 3.0
    records: int = args.records or (QUICK_RECORDS if args.quick else DEFAULT_RECORDS)
    if records < OPS:
        raise BenchError(f"--records must be at least {OPS}")
    started = time.perf_counter()
    results = []
    with pg_server() as server, tempfile.TemporaryDirectory(prefix="dejima-bench-ycsb-") as tmp:
        described = machine(server)
        for n in sizes:
            results.append(
                run_topology(
                    server,
                    n,
                    seconds,
                    warmup_s,
                    records,
                    args.clients_per_peer,
                    args.commit_wait,
                    Path(tmp),
                    tls=not args.plain,
                )
            )
            log(f"  {results[-1]['txn_per_s']} txn/s, {results[-1]['txn_per_s_per_participant']} per participant")
    ours = next((r for r in results if r["peers"] == PAPER["participants"]), None)
    return {
        "bench": NAME,
        "topologies": results,
        "paper": PAPER,
        "ours_at_paper_size": None
        if ours is None
        else {"participants": ours["peers"], "txn_per_s_per_participant": ours["txn_per_s_per_participant"]},
        "target": TARGET,
        "meets_target": None,
        "records_per_peer": records,
        "ops_per_txn": {"reads": READS, "writes": OPS - READS},
        "theta": THETA,
        "clients_per_peer": args.clients_per_peer,
        "seconds": seconds,
        "warmup_seconds": warmup_s,
        "commit_wait": args.commit_wait,
        "machine": described,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "method": "random recursive tree per size (seeded), one generated peer type per peer, one view per edge "
        "(records whose home is either end); closed-loop clients at every peer; 10 distinct Zipf(0.8) records of "
        "the origin per txn, 5 read + 5 written, in key order, one POST /api/v1/exec",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peer.bench.runner import int_list, positive, positive_float

    parser.add_argument("--peers", type=int_list, help="tree sizes (default 3,5,10,20)")
    parser.add_argument("--seconds", type=positive_float, help=f"measured seconds per size (default {DEFAULT_SECONDS})")
    parser.add_argument("--records", type=positive, help=f"records per peer (default {DEFAULT_RECORDS})")
    parser.add_argument("--clients-per-peer", type=positive, default=1, help="closed-loop clients at each peer")
    parser.add_argument("--commit-wait", choices=("all", "decision"), default="decision", help="DEJIMA_COMMIT_WAIT")


def markdown(report: dict[str, Any]) -> str:
    rows = [
        [
            r["peers"],
            r["clients"],
            r["txn_per_s"],
            r["txn_per_s_per_participant"],
            PAPER["txn_per_s_per_participant"] if r["peers"] == PAPER["participants"] else None,
            r["abort_rate"],
            (r["latency"] or {}).get("median_ms"),
            (r["latency"] or {}).get("p99_ms"),
            max(r["degrees"].values()),
        ]
        for r in report["topologies"]
    ]
    return "\n\n".join(
        [
            "# ycsb — the paper draft's workload on random trees",
            machine_md(report["machine"]),
            f"{report['seconds']} s measured per size after {report['warmup_seconds']} s; {report['records_per_peer']} "
            f"records per peer; {report['clients_per_peer']} closed-loop client(s) per peer; 10 ops (5 reads, "
            f"5 writes), Zipf {report['theta']}.",
            md_table(
                [
                    "peers",
                    "clients",
                    "committed txn/s",
                    "per participant",
                    "paper per participant",
                    "abort rate",
                    "median ms",
                    "p99 ms",
                    "max degree",
                ],
                rows,
            ),
            f"Paper draft: {PAPER['txn_per_s_per_participant']} per participant at {PAPER['participants']} "
            f"participants, {PAPER['machine']} ({PAPER['note']}). No target.",
            f"Method: {report['method']}.",
        ]
    )


def charts(report: dict[str, Any]) -> list[Chart]:
    sizes = [r["peers"] for r in report["topologies"]]
    return [
        Chart(
            filename="ycsb.png",
            title="Committed txn/s per participant",
            xlabel="peers (random tree)",
            ylabel="txn/s per participant",
            x=sizes,
            series={"ours": [r["txn_per_s_per_participant"] for r in report["topologies"]]},
            hlines={"paper draft, 20 participants, 8 cores": PAPER["txn_per_s_per_participant"]},
        ),
        Chart(
            filename="ycsb_abort.png",
            title="Abort rate",
            xlabel="peers (random tree)",
            ylabel="aborted / (committed + aborted)",
            x=sizes,
            series={"abort rate": [r["abort_rate"] for r in report["topologies"]]},
        ),
    ]
