"""propagation: latency of a committed write through the peer's REST API, by how far it travels.

``python -m peer.bench propagation [--json] [--quick] [--runs N] [--warmup N] [--commit-wait all|decision]``

The shipped example (government, bank, insurance: real peer processes, durable two-phase commit), 1,000 people
loaded at bank (they reach government and insurance). Four series, each a 1-row write through
``POST /api/v1/exec`` over a keep-alive connection (http.client, TCP_NODELAY):

| series | write | reaches |
|---|---|---|
| local_only | bank: UPDATE bank_users SET iban (in no view) | nobody |
| one_hop | bank: UPDATE bank_users SET phone (dejima_bank only) | government |
| two_hop | insurance: UPDATE insurance_users SET address | government (dejima_insurance), then bank (dejima_bank) |
| cycle | bank: INSERT a new person (name, phone, address, risk) | government and insurance in parallel (*) |

(*) each forwards to the other over dejima_insurance: the branches meet round the cycle
(ARCHITECTURE.md, "Cycles, diamonds and partial rows": A2).

Rounds of the four, rotated by one position per round (every series takes every position); warm-up rounds first.
With ``--commit-wait decision`` (the peers' default) an origin answers before COMMIT PREPARED has reached the
participants: after each write the bench makes an untimed query at each of its participants (which first waits for
the transactions prepared there, `Coordinator.settle`), so no sample overlaps the tail of the one before.
Per series: median / p95 / p99 of the client's wait, and the medians of the origin's `phases` (local, propagate,
prepare, finish) from the committed answers. Checks: every write committed with exactly the expected participants;
before measuring, one write of each series is run alone and the peers' `propagate_sent` counters must grow by the
expected number of messages (0, 1, 2, ≥ 3); at the end the last value of each series is read back where it should
have arrived.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from psycopg import sql

from peer.bench.common import (
    SEED,
    BenchError,
    JsonClient,
    latency_summary,
    log,
    machine,
    pg_server,
    running_network,
    settle,
    total_stat,
    with_env,
)
from peer.bench.report import Chart, machine_md, md_table, verdict_md
from peer.network import LocalNetwork, example_specs

NAME = "propagation"
HELP = "latency of a local-only, 1-hop, 2-hop and round-the-cycle write through the REST API (real peers, 2PC)"
PEOPLE = 1_000
LOAD_CHUNK = 100  # rows per global transaction while loading
ARRIVAL_TIMEOUT_S = 30.0  # loaded rows must be visible everywhere within this
SERIES = ("local_only", "one_hop", "two_hop", "cycle")
ORIGIN = {"local_only": "bank", "one_hop": "bank", "two_hop": "insurance", "cycle": "bank"}
PARTICIPANTS = {
    "local_only": [],
    "one_hop": ["government"],
    "two_hop": ["bank", "government"],
    "cycle": ["government", "insurance"],
}
MIN_MESSAGES = {"local_only": 0, "one_hop": 1, "two_hop": 2, "cycle": 3}
EXACT_MESSAGES = {"local_only", "one_hop", "two_hop"}
TARGET_RATIO = 3.0
TARGET = "one_hop (propagated 1-row write) median <= 3 x local_only median"
DEFAULT_RUNS, QUICK_RUNS = 500, 50


def _lit(v: str) -> sql.Composable:
    return sql.Literal(v)


def statement(kind: str, i: int, person: int) -> str:
    """The SQL of one write of a series (values as literals composed by psycopg)."""
    value = f"{kind} {i}"
    if kind == "local_only":
        q = sql.SQL("UPDATE bank_users SET iban = {} WHERE first_name = {}").format(_lit(value), _lit(f"p{person}"))
    elif kind == "one_hop":
        q = sql.SQL("UPDATE bank_users SET phone = {} WHERE first_name = {}").format(_lit(value), _lit(f"p{person}"))
    elif kind == "two_hop":
        q = sql.SQL("UPDATE insurance_users SET address = {} WHERE first_name = {}").format(
            _lit(value), _lit(f"p{person}")
        )
    else:
        q = sql.SQL(
            "INSERT INTO bank_users (first_name, last_name, phone, address, risk_factor)"
            " VALUES ({}, 'cycle', {}, {}, 3)"
        ).format(_lit(f"c{i}"), _lit(f"555-{i}"), _lit(f"{i} Cycle Road"))
    return q.as_string(None)


def load_people(net: LocalNetwork, origin: str = "bank", people: int = PEOPLE, chunk: int = LOAD_CHUNK) -> None:
    """p0 … p<people-1> (last name 'bench') inserted at `origin`, `chunk` rows per global transaction (one big
    transaction would make every participant apply it within one peer timeout); they reach every peer."""
    for start in range(0, people, chunk):
        values = sql.SQL(", ").join(
            sql.SQL("({}, 'bench', {}, {}, 1)").format(_lit(f"p{i}"), _lit(f"555-{i}"), _lit(f"{i} Main St"))
            for i in range(start, min(start + chunk, people))
        )
        load = sql.SQL("INSERT INTO bank_users (first_name, last_name, phone, address, risk_factor) VALUES {}").format(
            values
        )
        status, body = net.exec(origin, load.as_string(None), timeout=120)
        if status != 200:
            raise BenchError(f"loading people at {origin} failed: {body}")
    # with DEJIMA_COMMIT_WAIT=decision the last chunk's COMMIT PREPARED may still be on its way: wait for it
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    for peer, table in (("government", "government_users"), ("insurance", "insurance_users")):
        count_sql = sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table)).as_string(None)
        while (n := net.query(peer, count_sql)[0]["n"]) < people:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the loaded people did not reach {peer} within {ARRIVAL_TIMEOUT_S:g}s: {n} of {people}"
                )
            time.sleep(0.05)


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: int = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    warmup: int = args.warmup if args.warmup is not None else (5 if args.quick else 30)
    return run_propagation(runs, warmup, args.commit_wait, tls=not args.plain)


def run_propagation(runs: int, warmup: int, commit_wait: str = "decision", tls: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(SEED)  # noqa: S311 - row choice for a benchmark, not security
    latencies: dict[str, list[float]] = {k: [] for k in SERIES}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in SERIES}
    messages: dict[str, int | None] = {}
    last: dict[str, tuple[int, int]] = {}
    with pg_server() as server:
        described = machine(server)
        specs = with_env(example_specs(base_port=0, prefix="benchprop_", tls=tls), {"DEJIMA_COMMIT_WAIT": commit_wait})
        with running_network(server, specs) as net:
            load_people(net)
            clients = {
                name: JsonClient(spec.url, headers=net.auth_headers(name), context=net.client_context())
                for name, spec in net.specs.items()
            }

            def once(kind: str, i: int, record: bool) -> None:
                person = rng.randrange(PEOPLE)
                stmt = statement(kind, i, person)
                client = clients[ORIGIN[kind]]
                t0 = time.perf_counter_ns()
                status, answer = client.post("/api/v1/exec", {"sql": stmt})
                elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
                if status != 200 or not isinstance(answer, dict) or answer.get("status") != "committed":
                    raise BenchError(f"{kind} write failed: {status} {answer}")
                if answer.get("participants") != PARTICIPANTS[kind]:
                    raise BenchError(
                        f"{kind} write reached {answer.get('participants')}, expected {PARTICIPANTS[kind]}"
                    )
                last[kind] = (i, person)
                if commit_wait == "decision":
                    settle(net, clients, PARTICIPANTS[kind])  # untimed: every sample starts on a quiet network
                if record:
                    latencies[kind].append(elapsed_ms)
                    for phase, ms in (answer.get("phases") or {}).items():
                        if isinstance(ms, int | float):
                            phases[kind].setdefault(phase, []).append(float(ms))

            # Untimed: each series alone, counting the propagate messages it causes.
            for n, kind in enumerate(SERIES):
                before = total_stat(net, "propagate_sent")
                once(kind, -1000 - n, record=False)
                after = total_stat(net, "propagate_sent")
                messages[kind] = None if before is None or after is None else after - before
                sent = messages[kind]
                if sent is not None and (
                    sent < MIN_MESSAGES[kind] or (kind in EXACT_MESSAGES and sent != MIN_MESSAGES[kind])
                ):
                    raise BenchError(f"a {kind} write sent {sent} propagate messages, expected {MIN_MESSAGES[kind]}")
            log(f"{warmup} warm-up + {runs} measured rounds of {', '.join(SERIES)}")
            for i in range(warmup + runs):
                shift = i % len(SERIES)
                for kind in SERIES[shift:] + SERIES[:shift]:
                    once(kind, i, record=i >= warmup)
            for client in clients.values():
                client.close()
            _check_arrivals(net, last)
    report: dict[str, Any] = {}
    for kind in SERIES:
        report[kind] = {
            **latency_summary(latencies[kind]),
            "origin": ORIGIN[kind],
            "participants": PARTICIPANTS[kind],
            "propagate_messages": messages.get(kind),
            "phases_median_ms": {p: round(statistics.median(v), 3) for p, v in phases[kind].items()},
        }
    local = report["local_only"]["median_ms"]
    ratios = {kind: round(report[kind]["median_ms"] / local, 2) for kind in SERIES if kind != "local_only"}
    return {
        "bench": NAME,
        "series": report,
        **report,  # the series at top level too, as before (propagation.local_only.median_ms …)
        "ratio": ratios["one_hop"],
        "ratios_to_local": ratios,
        "target": TARGET,
        "meets_target": ratios["one_hop"] <= TARGET_RATIO,
        "runs": runs,
        "warmup": warmup,
        "commit_wait": commit_wait,
        "machine": described,
        "cpus": described["cpus"],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "method": "POST /api/v1/exec over one keep-alive http.client connection per origin; rounds of local_only, "
        "one_hop, two_hop, cycle rotated per round; durable 2PC; client-side perf_counter_ns; with commit_wait "
        "decision, after each write an untimed query at each of its participants (which first waits for the "
        "transactions prepared there to finish), so that no sample overlaps the previous write's COMMIT PREPARED",
    }


def _check_arrivals(net: LocalNetwork, last: dict[str, tuple[int, int]]) -> None:
    """The last write of each propagating series is visible where it should have arrived."""
    i1, p1 = last["one_hop"]
    i2, p2 = last["two_hop"]
    i3, _ = last["cycle"]
    checks: list[tuple[str, sql.Composed, dict[str, Any]]] = [
        (
            "government",
            sql.SQL("SELECT phone FROM government_users WHERE first_name = {}").format(_lit(f"p{p1}")),
            {"phone": f"one_hop {i1}"},
        ),
        (
            "bank",
            sql.SQL("SELECT address FROM bank_users WHERE first_name = {}").format(_lit(f"p{p2}")),
            {"address": f"two_hop {i2}"},
        ),
        (
            "insurance",
            sql.SQL("SELECT address, risk_factor FROM insurance_users WHERE first_name = {}").format(_lit(f"c{i3}")),
            {"address": f"{i3} Cycle Road", "risk_factor": 3},
        ),
    ]
    for peer, query, expected in checks:
        text = query.as_string(None)
        deadline = time.monotonic() + 10  # with --commit-wait decision, COMMIT PREPARED may still be on its way
        rows = net.query(peer, text)
        while rows != [expected] and time.monotonic() < deadline:
            time.sleep(0.05)
            rows = net.query(peer, text)
        if rows != [expected]:
            raise BenchError(f"a committed write did not arrive at {peer}: {text} -> {rows}, expected {expected}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peer.bench.runner import non_negative, positive

    parser.add_argument("--runs", type=positive, help=f"measured samples per series (default {DEFAULT_RUNS})")
    parser.add_argument("--warmup", type=non_negative, help="warm-up rounds (default 30)")
    parser.add_argument(
        "--commit-wait",
        choices=("all", "decision"),
        default="decision",
        help="the peers' DEJIMA_COMMIT_WAIT (default decision)",
    )


def markdown(report: dict[str, Any]) -> str:
    s = report["series"]
    phase_names = sorted({p for k in SERIES for p in s[k]["phases_median_ms"]})
    rows = [
        [
            k,
            f"{s[k]['origin']} → {', '.join(s[k]['participants']) or '-'}",
            s[k]["median_ms"],
            s[k]["p95_ms"],
            s[k]["p99_ms"],
            report["ratios_to_local"].get(k, 1.0),
            s[k]["propagate_messages"],
            *[s[k]["phases_median_ms"].get(p) for p in phase_names],
        ]
        for k in SERIES
    ]
    headers = ["series", "origin → participants", "median ms", "p95 ms", "p99 ms", "x local", "messages"]
    headers += [f"{p} (median)" for p in phase_names]
    return "\n\n".join(
        [
            "# propagation — committed 1-row write through the REST API",
            machine_md(report["machine"]),
            f"{report['runs']} samples per series (+{report['warmup']} warm-up rounds), interleaved; "
            f"DEJIMA_COMMIT_WAIT={report['commit_wait']}.",
            md_table(headers, rows),
            verdict_md(report) + f" (ratio {report['ratio']})",
            f"Method: {report['method']}.",
        ]
    )


def charts(report: dict[str, Any]) -> list[Chart]:
    s = report["series"]
    phase_names = sorted({p for k in SERIES for p in s[k]["phases_median_ms"]})
    out = [
        Chart(
            filename="propagation.png",
            title="Committed write latency by reach",
            xlabel="series",
            ylabel="ms",
            x=list(SERIES),
            series={q: [s[k][f"{q}_ms"] for k in SERIES] for q in ("median", "p95", "p99")},
            kind="bar",
            hlines={"3 x local median": TARGET_RATIO * s["local_only"]["median_ms"]},
        )
    ]
    if phase_names:
        out.append(
            Chart(
                filename="propagation_phases.png",
                title="Origin's phases (median)",
                xlabel="series",
                ylabel="ms",
                x=list(SERIES),
                series={p: [s[k]["phases_median_ms"].get(p) for k in SERIES] for p in phase_names},
                kind="bar",
            )
        )
    return out
