"""throughput: committed global transactions per second under closed-loop clients, and the peers' memory.

``python -m peer.bench throughput [--json] [--quick] [--clients 1,4,16,32,64,128] [--seconds S] [--warmup-seconds S]
[--keys uniform,zipf] [--people N] [--commit-wait all|decision] [--front lean|gunicorn] [--peer-env DEJIMA_NAME=VALUE
…]``

The shipped example (government, bank, insurance), 1,000 people loaded at bank (`--people`). Each point runs C
closed-loop clients (one keep-alive HTTP connection each, all on one event loop: peer/bench/loop.py) spread
round-robin over the three peers; a client sends one global transaction, waits for its answer and sends the next at
once. A transaction updates one person's address at its peer (`UPDATE <peer>_users SET address = … WHERE first_name =
'p<k>'`): the address is in dejima_bank and dejima_insurance, so every transaction reaches both other peers (durable
2PC). k is drawn uniformly, or Zipf (theta 0.8, hot people spread by a seeded permutation). The clients send
`POST /api/v1/exec` to each peer's lean client listener (DEJIMA_API_BIND; `--front gunicorn`: to the REST API
under gunicorn and Django, the same endpoint and answers).

Each client transaction is a global one: it commits at all three peers or nowhere. Its origin may run it together
with other writes waiting there for a turn, as one protocol-level global transaction (DEJIMA_BATCH_MAX;
docs/decisions.md "Writes that wait run as one global transaction"): `batching` per point gives how many client
transactions and protocol-level ones the peers committed, and the client transactions per protocol-level one.

Per point: committed global txn/s in the measured window (after the warm-up seconds), abort rate = aborted /
(committed + aborted) (409 conflict, 503, 504), latency of the committed ones. The two key distributions alternate
which runs first at each client count. The peers' memory is sampled every 0.25 s during every point: VmRSS of each
peer's process tree (gunicorn master + worker) from /proc/<pid>/status, and VmHWM (peak) at the end.

After each point the bench waits until no peer has an open global transaction (`drain_s`: leftovers of an
overloaded point, e.g. participants waiting for a silent origin, must not pollute the next point).

Checks: every point finished something (zero commits with aborts is a figure, 0 txn/s); answers other than
committed/conflict/unavailable/timeout abort the run; the peers' `committed` counters grew at least by what the
clients counted; at the end every dejima view is identical across its group, every transaction log verifies and no
transaction is left prepared (`dejima check`).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from peer.bench.common import (
    SEED,
    BenchError,
    Zipf,
    check_consistency,
    cpu_by_process,
    cpu_split,
    log,
    machine,
    machine_cpu,
    memory_kib,
    pg_server,
    process_tree,
    running_network,
    total_stat,
    wait_quiet,
    with_env,
)
from peer.bench.loop import closed_loop
from peer.bench.propagation import PEOPLE, load_people
from peer.bench.report import Chart, machine_md, md_table, verdict_md
from peer.network import LocalNetwork, example_specs

NAME = "throughput"
HELP = "closed-loop clients over the three example peers: committed global txn/s, abort rate, peer RSS"
PEERS = ("bank", "government", "insurance")
TABLES = {"bank": "bank_users", "government": "government_users", "insurance": "insurance_users"}
THETA = {"uniform": 0.0, "zipf": 0.8}
DEFAULT_CLIENTS = (1, 4, 16, 32, 64, 128)
DEFAULT_SECONDS, QUICK_SECONDS = 15.0, 2.0
TARGET_TXN_S = 500.0
TARGET_RSS_MB = 150.0
TARGET = f">= {TARGET_TXN_S:.0f} committed global txn/s (3 peers, uniform keys, best client count); peer RSS <= 150 MB"


@dataclass
class MemorySampler:
    """Samples the peers' process trees (VmRSS) every `interval` seconds in a thread."""

    pids: dict[str, int]
    interval: float = 0.25
    max_rss_kib: dict[str, int] = field(default_factory=dict)
    stopped: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            rss = sum(memory_kib(p)[0] for p in process_tree(pid))
            self.max_rss_kib[name] = max(self.max_rss_kib.get(name, 0), rss)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def peaks(self) -> dict[str, dict[str, Any]]:
        """Per peer: the largest sampled VmRSS of its tree, and VmHWM of each process (worker = the largest)."""
        out: dict[str, dict[str, Any]] = {}
        for name, pid in self.pids.items():
            hwms = [memory_kib(p)[1] for p in process_tree(pid)]
            out[name] = {
                "max_rss_mb": round(self.max_rss_kib.get(name, 0) / 1024, 1),
                "hwm_mb_tree": round(sum(hwms) / 1024, 1),
                "hwm_mb_worker": round(max(hwms, default=0) / 1024, 1),
                "processes": len(hwms),
            }
        return out


def _update(peer: str, person: int, value: str) -> str:
    return (
        sql.SQL("UPDATE {} SET address = {} WHERE first_name = {}")
        .format(sql.Identifier(TABLES[peer]), sql.Literal(value), sql.Literal(f"p{person}"))
        .as_string(None)
    )


def run_point(
    net: LocalNetwork,
    clients: int,
    keys: str,
    seconds: float,
    warmup_s: float,
    point_id: int,
    people: int = PEOPLE,
    front: str = "lean",
) -> dict[str, Any]:
    """One measurement: `clients` closed-loop clients spread round-robin over the peers for warmup_s + seconds."""
    zipf = Zipf(people, THETA[keys], seed=SEED + point_id)
    peers = [PEERS[c % len(PEERS)] for c in range(clients)]

    def body(c: int, rng: random.Random, n: int) -> dict[str, Any]:
        return {"sql": _update(peers[c], zipf.draw(rng), f"tp {point_id}-{c}-{n}")}

    committed_before = total_stat(net, "committed")
    global_before = total_stat(net, "global_committed")
    cpu_before, wall_before, machine_before = cpu_by_process(net), time.perf_counter(), machine_cpu()
    urls = {p: net.specs[p].api_url if front == "lean" else net.specs[p].url for p in PEERS}
    auth = {p: net.auth_headers(p) for p in PEERS}
    point = closed_loop(
        [urls[p] for p in peers],
        body,
        seconds,
        warmup_s,
        SEED + point_id,
        headers=[auth[p] for p in peers],
        context=net.client_context(),
    )
    cpu_after, wall = cpu_by_process(net), time.perf_counter() - wall_before
    machine_split = cpu_split(machine_before, machine_cpu())
    committed_after = total_stat(net, "committed")
    global_after = total_stat(net, "global_committed")
    if (
        committed_before is not None
        and committed_after is not None
        and committed_after - committed_before < point["client_committed"]
    ):
        raise BenchError(
            f"the peers counted {committed_after - committed_before} commits, the clients {point['client_committed']}"
        )
    drain_s = wait_quiet(net)
    if drain_s is None:
        log(f"  the peers still had open global transactions {60} s after the point")
    cpu: dict[str, Any] = {}
    if committed_before is not None and committed_after is not None and committed_after > committed_before:
        n = committed_after - committed_before
        used = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
        cpu = {k: round(v * 1000 / n, 2) for k, v in used.items()}
        cpu["total"] = round(sum(used.values()) * 1000 / n, 2)
        cpu["cores_busy"] = round(sum(used.values()) / wall, 2)
    batches: dict[str, Any] = {}
    if None not in (committed_before, committed_after, global_before, global_after):
        assert committed_before is not None and committed_after is not None
        assert global_before is not None and global_after is not None
        clients_n, global_n = committed_after - committed_before, global_after - global_before
        batches = {
            "client_txns": clients_n,
            "global_txns": global_n,
            "per_global_txn": round(clients_n / global_n, 2) if global_n else None,
        }
    return {
        "keys": keys,
        **point,
        "drain_s": drain_s,
        "cpu_ms_per_txn": cpu,
        "machine_cpu_pct": machine_split,
        "batching": batches,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts: tuple[int, ...] = args.clients or DEFAULT_CLIENTS
    seconds: float = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    warmup_s: float = args.warmup_seconds if args.warmup_seconds is not None else (0.5 if args.quick else 2.0)
    keys: list[str] = [k.strip() for k in (args.keys or "uniform,zipf").split(",") if k.strip()]
    if not keys or set(keys) - set(THETA):
        raise BenchError(f"--keys takes uniform and/or zipf, got {args.keys!r}")
    started = time.perf_counter()
    points: list[dict[str, Any]] = []
    with pg_server() as server:
        described = machine(server)
        peer_env = {"DEJIMA_COMMIT_WAIT": args.commit_wait, **dict(args.peer_env)}
        specs = with_env(example_specs(base_port=0, prefix="benchtp_", tls=not args.plain), peer_env)
        with running_network(server, specs) as net:
            load_people(net, people=args.people)
            sampler = MemorySampler({name: spec.pid for name, spec in net.specs.items()})
            sampler.sample()
            idle = {name: round(kib / 1024, 1) for name, kib in sampler.max_rss_kib.items()}
            sampler.max_rss_kib.clear()
            thread = threading.Thread(target=sampler.run, daemon=True)
            thread.start()
            try:
                for n, clients in enumerate(counts):
                    order = keys if n % 2 == 0 else list(reversed(keys))
                    for k in order:
                        log(f"{clients} clients, {k} keys: {warmup_s} s warm-up + {seconds} s")
                        point = run_point(net, clients, k, seconds, warmup_s, len(points), args.people, args.front)
                        log(f"  {point['txn_per_s']} txn/s, abort rate {point['abort_rate']}")
                        points.append(point)
            finally:
                sampler.stopped.set()
                thread.join()
            memory = sampler.peaks()
            consistency = check_consistency(net)
    uniform = [p for p in points if p["keys"] == "uniform"]
    best = max(uniform or points, key=lambda p: p["txn_per_s"])
    worst_rss = max(max(m["max_rss_mb"], m["hwm_mb_tree"]) for m in memory.values())
    targets = {
        "txn_per_s": {
            "target": f">= {TARGET_TXN_S:.0f} committed global txn/s, uniform keys, best client count",
            "value": best["txn_per_s"],
            "clients": best["clients"],
            "met": bool(uniform) and best["txn_per_s"] >= TARGET_TXN_S,
        },
        "rss": {
            "target": "peer RSS <= 150 MB under load (max over peers of VmRSS/VmHWM of master + worker)",
            "value_mb": worst_rss,
            "met": worst_rss <= TARGET_RSS_MB,
        },
    }
    return {
        "bench": NAME,
        "points": points,
        "best_uniform": {"clients": best["clients"], "txn_per_s": best["txn_per_s"]},
        "memory": {"idle_rss_mb": idle, "under_load": memory},
        "targets": targets,
        "target": TARGET,
        "meets_target": all(t["met"] for t in targets.values()),
        "consistency": consistency,
        "people": args.people,
        "seconds": seconds,
        "warmup_seconds": warmup_s,
        "commit_wait": args.commit_wait,
        "peer_env": dict(args.peer_env),
        "front": args.front,
        "machine": described,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "method": "closed-loop clients (keep-alive HTTP, one event loop in the bench process) spread round-robin "
        "over bank, government, insurance; each txn = UPDATE address of one person at the client's peer (reaches "
        "both other peers, 2PC); "
        "CPU per transaction from /proc/<pid>/stat of every peer process, every PostgreSQL process and this one; "
        "the bench's clients share the machine with the peers",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peer.bench.runner import int_list, peer_setting, positive, positive_float

    parser.add_argument("--clients", type=int_list, help="client counts (default 1,4,16,32,64,128)")
    parser.add_argument(
        "--seconds", type=positive_float, help=f"measured seconds per point (default {DEFAULT_SECONDS})"
    )
    parser.add_argument("--warmup-seconds", type=float, help="unmeasured seconds before each point (default 2)")
    parser.add_argument("--keys", help="uniform,zipf (default both)")
    parser.add_argument(
        "--people", type=positive, default=PEOPLE, help=f"people loaded, the keys drawn from (default {PEOPLE:,})"
    )
    parser.add_argument("--commit-wait", choices=("all", "decision"), default="decision", help="DEJIMA_COMMIT_WAIT")
    parser.add_argument(
        "--front",
        choices=("lean", "gunicorn"),
        default="lean",
        help="where the clients send their writes: each peer's lean client listener (DEJIMA_API_BIND, the default) "
        "or gunicorn's REST API; the same endpoint and answers",
    )
    parser.add_argument(
        "--peer-env",
        type=peer_setting,
        action="append",
        default=[],
        metavar="DEJIMA_NAME=VALUE",
        help="a setting for every peer of the run (repeatable), e.g. DEJIMA_BATCH_MAX=32",
    )


def markdown(report: dict[str, Any]) -> str:
    rows = [
        [
            p["clients"],
            p["keys"],
            p["txn_per_s"],
            p["abort_rate"],
            p["committed"],
            p["aborted"],
            (p["latency"] or {}).get("median_ms"),
            (p["latency"] or {}).get("p99_ms"),
            (p.get("batching") or {}).get("per_global_txn"),
            p.get("drain_s"),
        ]
        for p in report["points"]
    ]
    mem = [
        [name, report["memory"]["idle_rss_mb"].get(name), m["max_rss_mb"], m["hwm_mb_worker"], m["hwm_mb_tree"]]
        for name, m in report["memory"]["under_load"].items()
    ]
    cpu_columns = ["government", "bank", "insurance", "postgres", "bench", "total"]
    cpu_rows = [
        [
            p["clients"],
            p["keys"],
            *[(p.get("cpu_ms_per_txn") or {}).get(c) for c in cpu_columns],
            (p.get("cpu_ms_per_txn") or {}).get("cores_busy"),
            (p.get("machine_cpu_pct") or {}).get("idle"),
            (p.get("machine_cpu_pct") or {}).get("stolen"),
        ]
        for p in report["points"]
    ]
    phase_names = ("settle_ms", "local_ms", "propagate_ms", "prepare_ms", "finish_ms")
    phase_rows = [
        [
            p["clients"],
            p["keys"],
            (p["latency"] or {}).get("median_ms"),
            *[(p.get("phases_median_ms") or {}).get(n) for n in phase_names],
        ]
        for p in report["points"]
    ]
    t = report["targets"]
    return "\n\n".join(
        [
            "# throughput — closed-loop clients over the three example peers",
            machine_md(report["machine"]),
            f"{report['seconds']} s measured per point after {report['warmup_seconds']} s warm-up; "
            f"clients at the {report.get('front', 'gunicorn')} front; DEJIMA_COMMIT_WAIT={report['commit_wait']}"
            + "".join(f", {k}={v}" for k, v in (report.get("peer_env") or {}).items())
            + ".",
            md_table(
                [
                    "clients",
                    "keys",
                    "committed txn/s",
                    "abort rate",
                    "committed",
                    "aborted",
                    "median ms",
                    "p99 ms",
                    "per batch",
                    "drain s",
                ],
                rows,
            ),
            "Peer memory (MB): idle VmRSS, the largest VmRSS sampled under load, VmHWM of the worker, VmHWM of "
            "master + worker.",
            md_table(["peer", "idle RSS", "max RSS under load", "HWM worker", "HWM master+worker"], mem),
            "Where the CPU goes: CPU time (user + system, /proc/<pid>/stat) of each process over the point (warm-up "
            "included) divided by the client transactions the peers committed meanwhile, in ms; `bench` is this "
            "process (its clients' event loop); cores busy = all of it / the point's wall time; idle % and stolen % "
            "of the machine's CPU over the point (/proc/stat; stolen: taken by the host of this virtual machine).",
            md_table(["clients", "keys", *cpu_columns, "cores busy", "idle %", "stolen %"], cpu_rows),
            "Where a committed write's time goes at its origin (medians of its answer's `phases`, ms): its global "
            "transaction's local part (the batch's statements and captured changes), propagation (every hop's "
            "apply, and each participant's PREPARE on the way), the PREPAREs still to send, and the hand-off of "
            "the finish round; the rest of the client's wait is its turn in the queue, the decision's commit and "
            "HTTP.",
            md_table(["clients", "keys", "median ms", *phase_names], phase_rows),
            verdict_md(report)
            + f" Best uniform: {t['txn_per_s']['value']} txn/s at {t['txn_per_s']['clients']} clients "
            + f"({'met' if t['txn_per_s']['met'] else 'not met'}); largest peer memory {t['rss']['value_mb']} MB "
            + f"({'met' if t['rss']['met'] else 'not met'}).",
            f"Method: {report['method']}.",
        ]
    )


def charts(report: dict[str, Any]) -> list[Chart]:
    counts = sorted({p["clients"] for p in report["points"]})
    keys = sorted({p["keys"] for p in report["points"]})

    def value(k: str, c: int, field_name: str) -> float | None:
        for p in report["points"]:
            if p["keys"] == k and p["clients"] == c:
                return float(p[field_name])
        return None

    return [
        Chart(
            filename="throughput.png",
            title="Committed global txn/s",
            xlabel="closed-loop clients",
            ylabel="txn/s",
            x=counts,
            series={k: [value(k, c, "txn_per_s") for c in counts] for k in keys},
            logx=True,
            hlines={"target 500": TARGET_TXN_S},
        ),
        Chart(
            filename="abort_rate.png",
            title="Abort rate",
            xlabel="closed-loop clients",
            ylabel="aborted / (committed + aborted)",
            x=counts,
            series={k: [value(k, c, "abort_rate") for c in counts] for k in keys},
            logx=True,
        ),
        Chart(
            filename="memory.png",
            title="Peer memory under load",
            xlabel="peer",
            ylabel="MB",
            x=list(report["memory"]["under_load"]),
            series={
                "max VmRSS (tree)": [m["max_rss_mb"] for m in report["memory"]["under_load"].values()],
                "VmHWM (tree)": [m["hwm_mb_tree"] for m in report["memory"]["under_load"].values()],
            },
            kind="bar",
            hlines={"target 150 MB": TARGET_RSS_MB},
        ),
    ]
