"""fanout: commit latency of a write to one view shared by 2, 5 and 10 members (generated star topologies).

``python -m peer.bench fanout [--json] [--quick] [--members 2,5,10] [--runs N] [--warmup N]
[--commit-wait all|decision]``

One generated sql root holds a star per size k (peer/bench/topology.py): peer types s<k>m0 … s<k>m<k-1>, each with
a table `items(item_key, value)` and one dejima view star<k> shared by all k. Every star runs at the same time on one
PostgreSQL (each peer seeded with the members of its own star only), so their samples can be interleaved: each round
writes once at m0 of every star, in an order rotated per round. A write is `UPDATE items SET value = … WHERE
item_key = <random>` at m0 through `POST /api/v1/exec` (keep-alive http.client); it reaches the k - 1 other members
in one parallel hop (durable 2PC). With ``--commit-wait decision`` (the peers' default) the origin answers before
COMMIT PREPARED has reached the members: after each write an untimed query at each of them (which first waits for
the transactions prepared there) keeps a sample from overlapping the tail of the one before.

Figures per star: median / p95 / p99 commit latency and the origin's phase medians; ratio of the largest star's
median to the smallest's; the CPU one write costs (`cpu_ms_per_write`: every peer process and PostgreSQL read from
/proc right before and right after each measured write, the bench's own process time inside the window only) and
its floor on this machine (that CPU over the cores), with the machine's busy / idle / stolen split over the
writes; and what the network uses with no writes at all (`quiet_cpu_pct`, 2 s before the rounds). Checks: every
write committed with exactly the other k - 1 members as participants, and after the run every view is identical
across its group (`dejima check`).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from peer.bench.common import (
    SEED,
    BenchError,
    JsonClient,
    check_consistency,
    cpu_by_process,
    cpu_split,
    latency_summary,
    log,
    machine,
    machine_cpu,
    pg_server,
    running_network,
    settle,
)
from peer.bench.report import Chart, machine_md, md_table, verdict_md
from peer.bench.topology import STAR_TABLE, star_peer, star_types, write_root
from peer.network import PeerSpec, free_port

NAME = "fanout"
HELP = "commit latency of a write to one view shared by 2, 5 and 10 members (generated stars, interleaved)"
DEFAULT_MEMBERS, QUICK_MEMBERS = (2, 5, 10), (2, 5)
DEFAULT_RUNS, QUICK_RUNS = 300, 40
ITEMS = 1_000
TARGET_RATIO = 1.5
QUIET_S = 2.0  # seconds of no writes before the rounds, to read the network's own CPU use
CPU_COLUMNS = ("origin", "members", "per_member", "postgres", "bench", "all", "floor_ms")
TARGET = "star of 10 median <= 1.5 x star of 2 median"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes: tuple[int, ...] = tuple(sorted(set(args.members or (QUICK_MEMBERS if args.quick else DEFAULT_MEMBERS))))
    if any(k < 2 for k in sizes):
        raise BenchError("a shared view has at least 2 members")
    runs: int = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    warmup: int = args.warmup if args.warmup is not None else (5 if args.quick else 30)
    started = time.perf_counter()
    rng = random.Random(SEED)  # noqa: S311 - row choice for a benchmark, not security
    latencies: dict[int, list[float]] = {k: [] for k in sizes}
    phases: dict[int, dict[str, list[float]]] = {k: {} for k in sizes}
    # CPU seconds used while a measured write of star k was in flight, by process (peer name, postgres, bench),
    # and the machine's CPU ticks by kind meanwhile: what one write costs, all processes together
    cpu: dict[int, dict[str, float]] = {k: {} for k in sizes}
    ticks: dict[int, list[int]] = {k: [] for k in sizes}
    with pg_server() as server, tempfile.TemporaryDirectory(prefix="dejima-bench-fanout-") as tmp:
        described = machine(server)
        root = write_root(Path(tmp) / "types", [t for k in sizes for t in star_types(k)])
        total = sum(sizes)
        specs: list[PeerSpec] = []
        for k in sizes:
            star = [
                PeerSpec(
                    name=star_peer(k, i),
                    peer_type=star_peer(k, i),
                    port=free_port(),
                    database=f"bench_fan_{star_peer(k, i)}",
                    env={"DEJIMA_COMMIT_WAIT": args.commit_wait, "DEJIMA_POOL_SIZE": "6" if total > 8 else "20"},
                    tls=not args.plain,
                )
                for i in range(k)
            ]
            for spec in star:
                spec.env["DEJIMA_SEEDS"] = ",".join(s.url for s in star if s is not spec)
            specs += star
        with running_network(server, specs, sql_root=root, wait=False) as net:
            for spec in specs:
                net.install(spec.name)  # its roles too, as the peer will need them
                with psycopg.connect(net.admin_url(spec.name), autocommit=True) as conn:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (item_key, value) SELECT g, 'init' FROM generate_series(0, %s - 1) AS g"
                        ).format(sql.Identifier(STAR_TABLE)),
                        (ITEMS,),
                    )
            net.start_all()
            net.wait_ready(timeout=120 + 10 * total)
            clients = {
                k: JsonClient(
                    net.specs[star_peer(k, 0)].url,
                    headers=net.auth_headers(star_peer(k, 0)),
                    context=net.client_context(),
                )
                for k in sizes
            }
            members: dict[str, JsonClient] = {}  # the participants, for `settle`
            expected = {k: [star_peer(k, i) for i in range(1, k)] for k in sizes}
            # what the network costs when nobody writes (discovery's greetings, the sealer, the pools' checks)
            quiet0, quiet_t0 = cpu_by_process(net), time.perf_counter()
            time.sleep(QUIET_S)
            quiet1, quiet_s = cpu_by_process(net), time.perf_counter() - quiet_t0
            quiet = {p: v - quiet0.get(p, v) for p, v in quiet1.items() if p != "bench"}
            log(f"stars {sizes}: {warmup} warm-up + {runs} measured rounds")
            for r in range(warmup + runs):
                shift = r % len(sizes)
                for k in sizes[shift:] + sizes[:shift]:
                    stmt = (
                        sql.SQL("UPDATE {} SET value = {} WHERE item_key = {}")
                        .format(sql.Identifier(STAR_TABLE), sql.Literal(f"f{k}-{r}"), sql.Literal(rng.randrange(ITEMS)))
                        .as_string(None)
                    )
                    # the readings of /proc come before and after the timed window: only the bench's own
                    # process time is read inside it (reading every process's stat costs ms of CPU)
                    cpu0 = cpu_by_process(net)
                    ticks0, bench0 = machine_cpu(), time.process_time()
                    t0 = time.perf_counter_ns()
                    status, answer = clients[k].post("/api/v1/exec", {"sql": stmt})
                    ms = (time.perf_counter_ns() - t0) / 1e6
                    bench1, ticks1 = time.process_time(), machine_cpu()
                    cpu1 = cpu_by_process(net)
                    cpu0["bench"], cpu1["bench"] = bench0, bench1
                    if status != 200 or not isinstance(answer, dict) or answer.get("status") != "committed":
                        raise BenchError(f"star of {k}: write failed: {status} {answer}")
                    if answer.get("participants") != expected[k]:
                        raise BenchError(f"star of {k}: reached {answer.get('participants')}, expected {expected[k]}")
                    if args.commit_wait == "decision":
                        settle(net, members, expected[k])  # untimed: no sample overlaps the tail of the one before
                    if r >= warmup:
                        latencies[k].append(ms)
                        for proc, seconds in cpu1.items():
                            cpu[k][proc] = cpu[k].get(proc, 0.0) + seconds - cpu0.get(proc, seconds)
                        if ticks0 is not None and ticks1 is not None:
                            spent = [b - a for a, b in zip(ticks0, ticks1, strict=True)]
                            ticks[k] = [a + b for a, b in zip(ticks[k], spent, strict=True)] if ticks[k] else spent
                        for phase, v in (answer.get("phases") or {}).items():
                            if isinstance(v, int | float):
                                phases[k].setdefault(phase, []).append(float(v))
            for c in [*clients.values(), *members.values()]:
                c.close()
            consistency = check_consistency(net)
    stars: dict[str, dict[str, Any]] = {
        str(k): {
            **latency_summary(latencies[k]),
            "members": k,
            "participants": k - 1,
            "phases_median_ms": {p: round(statistics.median(v), 3) for p, v in phases[k].items()},
            "cpu_ms_per_write": write_cpu(cpu[k], k, runs),
            "machine_cpu_during_writes_pct": cpu_split((0,) * len(ticks[k]), tuple(ticks[k])) if ticks[k] else None,
        }
        for k in sizes
    }
    small, large = str(sizes[0]), str(sizes[-1])
    ratio = round(stars[large]["median_ms"] / stars[small]["median_ms"], 2)
    has_target = "2" in stars and "10" in stars
    target_ratio = round(stars["10"]["median_ms"] / stars["2"]["median_ms"], 2) if has_target else None
    return {
        "bench": NAME,
        "stars": stars,
        "ratio_largest_to_smallest": ratio,
        "ratio_10_to_2": target_ratio,
        "target": TARGET,
        "meets_target": None if target_ratio is None else target_ratio <= TARGET_RATIO,
        "target_note": None if has_target else "not evaluated: stars of 2 and 10 not both run (quick runs 2 and 5)",
        "quiet_cpu_pct": {
            "peers": round(100 * sum(v for p, v in quiet.items() if p != "postgres") / quiet_s, 1),
            "postgres": round(100 * quiet.get("postgres", 0.0) / quiet_s, 1),
            "seconds": round(quiet_s, 2),
        },
        "runs": runs,
        "warmup": warmup,
        "items": ITEMS,
        "commit_wait": args.commit_wait,
        "consistency": consistency,
        "machine": described,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "method": "all stars running at once; rounds of one write at m0 of every star, rotated per round; "
        "POST /api/v1/exec over keep-alive http.client; durable 2PC; with commit_wait decision, after each write an "
        "untimed query at each member (which first waits for the transactions prepared there)",
    }


def write_cpu(spent: dict[str, float], k: int, runs: int) -> dict[str, float]:
    """CPU milliseconds per measured write of a star of k: at its origin (m0), at its k - 1 members together and per
    member, PostgreSQL (every backend), this bench process, and `all` (every process of the run); `floor_ms` is `all`
    over the machine's cores (no write can commit sooner with every core its own)."""
    if not spent or runs <= 0:
        return {}
    per = {proc: 1000 * seconds / runs for proc, seconds in spent.items()}
    members = sum(per.get(star_peer(k, i), 0.0) for i in range(1, k))
    total = sum(per.values())
    out = {
        "origin": per.get(star_peer(k, 0), 0.0),
        "members": members,
        "per_member": members / (k - 1),
        "postgres": per.get("postgres", 0.0),
        "bench": per.get("bench", 0.0),
        "all": total,
        "floor_ms": total / (os.cpu_count() or 1),
    }
    return {name: round(v, 3) for name, v in out.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peer.bench.runner import int_list, non_negative, positive

    parser.add_argument("--members", type=int_list, help="star sizes (default 2,5,10; quick 2,5)")
    parser.add_argument("--runs", type=positive, help=f"measured writes per star (default {DEFAULT_RUNS})")
    parser.add_argument("--warmup", type=non_negative, help="warm-up rounds (default 30)")
    parser.add_argument("--commit-wait", choices=("all", "decision"), default="decision", help="DEJIMA_COMMIT_WAIT")


def markdown(report: dict[str, Any]) -> str:
    stars = report["stars"]
    phase_names = sorted({p for s in stars.values() for p in s["phases_median_ms"]})
    rows = [
        [
            s["members"],
            s["median_ms"],
            s["p95_ms"],
            s["p99_ms"],
            round(s["median_ms"] / stars[next(iter(stars))]["median_ms"], 2),
            *[s["phases_median_ms"].get(p) for p in phase_names],
        ]
        for s in stars.values()
    ]
    return "\n\n".join(
        [
            "# fanout — one view shared by k members",
            machine_md(report["machine"]),
            f"{report['runs']} writes per star (+{report['warmup']} warm-up rounds), interleaved across stars; "
            f"DEJIMA_COMMIT_WAIT={report['commit_wait']}.",
            md_table(
                ["members", "median ms", "p95 ms", "p99 ms", "x smallest", *[f"{p} (median)" for p in phase_names]],
                rows,
            ),
            f"With no writes (before the rounds, {report['quiet_cpu_pct']['seconds']} s) the peers used "
            f"{report['quiet_cpu_pct']['peers']} % of a core and PostgreSQL {report['quiet_cpu_pct']['postgres']} %. "
            "CPU per measured write (ms, all processes; read from /proc before and after each write: the "
            "tail of COMMIT PREPARED at the members comes after and is not counted), and the machine meanwhile:",
            md_table(
                ["members", *CPU_COLUMNS, "busy %", "idle %", "stolen %"],
                [
                    [
                        s["members"],
                        *[(s.get("cpu_ms_per_write") or {}).get(c) for c in CPU_COLUMNS],
                        *[(s.get("machine_cpu_during_writes_pct") or {}).get(c) for c in ("busy", "idle", "stolen")],
                    ]
                    for s in stars.values()
                ],
            ),
            verdict_md(report) + (f" ({report['target_note']})" if report.get("target_note") else ""),
            f"Method: {report['method']}.",
        ]
    )


def charts(report: dict[str, Any]) -> list[Chart]:
    stars = report["stars"]
    members = [s["members"] for s in stars.values()]
    smallest = next(iter(stars.values()))["median_ms"]
    return [
        Chart(
            filename="fanout.png",
            title="Commit latency by members of the view",
            xlabel="members",
            ylabel="ms",
            x=members,
            series={q: [s[f"{q}_ms"] for s in stars.values()] for q in ("median", "p95", "p99")},
            hlines={"1.5 x smallest median": TARGET_RATIO * smallest},
        )
    ]
