"""Smoke passes of the benchmarks: each runs (tiny), exits 0, prints valid JSON with the expected keys and writes its
results folder (JSON, Markdown, PNG). No timing is asserted: benchmarks are measurements, not tests. What is asserted
of a report is what the test knows without it: the counts it asked for (samples, clients, members, peers), the
messages and log entries the protocol makes for them, the machine and PostgreSQL server it gave the bench, and order
statistics; the figures computed from samples are checked against samples given by hand (unit tier).

Tiers: unit (no database: the instruments and the closed loop against a loopback server), integration (capture:
PostgreSQL only), cluster (every other bench starts real peer processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from peer.bench.capture import Samples, _size_result
from peer.bench.common import Zipf, cpu_split, latency_summary
from peer.bench.propagation import LOAD_CHUNK
from peer.bench.topology import manifest_text, random_tree, star_types, tree_types
from peer.pgserver import PgServer

REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("capture_ms", "floor_ms", "ratio", "capture_take_ms", "baseline_ms", "capture_p90_ms", "floor_p90_ms")
COMMON_KEYS = ("bench", "target", "meets_target", "machine", "elapsed_s", "outputs", "command")
PHASES = {"settle_ms", "local_ms", "propagate_ms", "prepare_ms", "finish_ms"}  # an origin's phases of a global write


def databases(pg_server: PgServer) -> set[str]:
    with psycopg.connect(pg_server.url("postgres")) as conn:
        return {str(r[0]) for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def server_setting(pg_server: PgServer, name: str) -> str:
    with psycopg.connect(pg_server.url("postgres")) as conn:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def bench(pg_server: PgServer, out: Path, *args: str) -> dict[str, Any]:
    """Run `dejima bench` on the test's PostgreSQL server; its report, with what every report must say checked
    against what the test knows: this machine, this server, no database of the bench left on it."""
    before = databases(pg_server)
    env = {**os.environ, "DEJIMA_DATABASE_URL": pg_server.url("postgres")}
    result = subprocess.run(
        [sys.executable, "-m", "peer.bench", *args, "--json", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    for key in COMMON_KEYS:
        assert key in report, key
    assert report["bench"] == args[0]
    assert report["meets_target"] is None or isinstance(report["meets_target"], bool)
    assert report["machine"]["cpus"] == os.cpu_count()
    assert report["machine"]["postgres_server"] == "external"  # the server the test gave it
    assert report["machine"]["postgres"]["server_version"] == server_setting(pg_server, "server_version")
    assert report["machine"]["postgres"]["max_prepared_transactions"] == server_setting(
        pg_server, "max_prepared_transactions"
    )
    assert_cpu_split(report["machine"]["cpu_during_run_pct"])
    assert "% stolen by the host" in (out / "report.md").read_text()
    assert json.loads((out / "result.json").read_text()) == report
    assert databases(pg_server) == before, "the bench left databases behind"
    assert (out / "report.md").read_text().startswith(f"# {args[0]}")
    plots = [Path(p) for p in report["outputs"]["plots"]]
    assert plots
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    return report


def assert_cpu_split(split: dict[str, float]) -> None:
    """Shares of the machine's CPU (/proc/stat): each within 0 to 100, together 100 but for rounding."""
    assert set(split) == {"busy", "idle", "stolen"}, split
    assert all(0 <= v <= 100 for v in split.values()), split
    assert abs(sum(split.values()) - 100) <= 0.2, split


@pytest.mark.unit
def test_cpu_split_counts_the_ticks_between_two_readings() -> None:
    #        user nice system idle iowait irq softirq steal
    before = (100, 0, 50, 1000, 10, 0, 5, 20)
    after = (160, 0, 70, 1090, 20, 0, 10, 70)  # +60 +0 +20 +90 +10 +0 +5 +50: 235 ticks
    assert cpu_split(before, after) == {"busy": 36.2, "idle": 42.6, "stolen": 21.3}
    assert cpu_split(before, before) is None  # no time passed
    assert cpu_split(None, after) is None
    assert cpu_split(before, after[:4]) is None


@pytest.mark.unit
def test_a_peer_setting_for_a_bench_run_is_checked() -> None:
    import argparse

    from peer.bench.runner import peer_setting

    assert peer_setting("DEJIMA_BATCH_MAX=32") == ("DEJIMA_BATCH_MAX", "32")
    assert peer_setting("DEJIMA_SEEDS=") == ("DEJIMA_SEEDS", "")
    for bad in ("DEJIMA_BATCH_MAX", "BATCH_MAX=3", "dejima_batch_max=3", "DEJIMA_=1", "DEJIMA_A-B=1", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="DEJIMA_NAME=value"):
            peer_setting(bad)


@pytest.mark.unit
def test_the_closed_loop_reads_an_answer_by_its_length_or_its_chunks() -> None:
    from peer.bench.loop import parse_answer

    sized = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": 1234}'
    assert parse_answer(sized + b"HTTP/1.1 ...") == (200, b'{"a": 1234}', False, len(sized))  # the next one stays
    for cut in (10, sized.index(b"\r\n\r\n") + 2, len(sized) - 1):
        assert parse_answer(sized[:cut]) is None  # not complete yet
    chunked = (
        b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert parse_answer(chunked) == (409, b"abcde", True, len(chunked))
    assert parse_answer(chunked[:-1]) is None
    assert parse_answer(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n") == (200, b"", True, 38)
    for bad in (
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nbody without a length",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with pytest.raises(ValueError):
            parse_answer(bad)
    with pytest.raises(ValueError, match="no end of the headers"):
        parse_answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000)


def assert_latency(summary: dict[str, Any], samples: int) -> None:
    """`samples` latencies summarized: positive, and ordered as quantiles are."""
    for key in ("median_ms", "p95_ms", "p99_ms"):
        assert isinstance(summary[key], int | float), (key, summary)
        assert summary[key] > 0, (key, summary)
    assert summary["median_ms"] <= summary["p95_ms"] <= summary["p99_ms"], summary
    assert summary["samples"] == samples


@pytest.mark.integration
def test_capture_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    args = ("--sizes", "500,2000", "--runs", "30", "--warmup", "2", "--baseline-runs", "6")
    report = bench(pg_server, tmp_path, "capture", *args)

    assert report["target"] == "capture_ms <= 2 x floor_ms"
    assert report["postgres"] == server_setting(pg_server, "server_version")
    assert report["synchronous_commit"] == server_setting(pg_server, "synchronous_commit")
    assert report["fsync"] == server_setting(pg_server, "fsync")
    assert (report["runs"], report["warmup"]) == (30, 2)
    assert set(report["rows"]) == {"500", "2000"}
    for size, row in report["rows"].items():
        for name in ROW_FIELDS:
            value = row[name]
            assert isinstance(value, int | float), (size, name, value)
            assert value > 0, (size, name, value)
        # the samples asked for: 30 rounds, each with capture, capture+take and two floors; 6 baselines
        samples = {k: row[f"{k}_samples"] for k in ("capture", "capture_take", "floor", "baseline")}
        assert samples == {"capture": 30, "capture_take": 30, "floor": 60, "baseline": 6}, (size, row)
        for series in ("capture", "floor", "capture_take", "baseline"):
            assert row[f"{series}_ms"] <= row[f"{series}_p90_ms"], (size, series, row)


@pytest.mark.cluster
def test_propagation_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "propagation", "--runs", "4", "--warmup", "1")

    # each kind of write: its origin and participants, and the propagate messages the example's views make for it
    # (a cycle: bank to government and insurance, and at least one of them on to the other)
    for kind, origin, participants, messages in (
        ("local_only", "bank", [], 0),
        ("one_hop", "bank", ["government"], 1),
        ("two_hop", "insurance", ["bank", "government"], 2),
        ("cycle", "bank", ["government", "insurance"], 3),
    ):
        series = report["series"][kind]
        assert_latency(series, 4)
        assert (series["origin"], series["participants"]) == (origin, participants), kind
        if kind == "cycle":
            assert series["propagate_messages"] >= messages, series
        else:
            assert series["propagate_messages"] == messages, series
        assert report[kind] == series  # the series at top level too
        if participants:  # the origin's phases of a write that propagates
            assert set(series["phases_median_ms"]) == PHASES, (kind, series)
            assert series["phases_median_ms"]["propagate_ms"] > 0, (kind, series)
        else:
            assert series["phases_median_ms"] == {}, series
    assert set(report["ratios_to_local"]) == {"one_hop", "two_hop", "cycle"}
    assert (report["runs"], report["warmup"]) == (4, 1)


@pytest.mark.cluster
def test_throughput_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    people = 300
    report = bench(
        pg_server,
        tmp_path,
        "throughput",
        *("--clients", "1,3", "--seconds", "1", "--warmup-seconds", "0.2", "--peer-env", "DEJIMA_BATCH_MAX=8"),
        *("--people", str(people)),
    )

    assert [(p["clients"], p["keys"]) for p in report["points"]] == [
        (1, "uniform"),
        (1, "zipf"),
        (3, "zipf"),
        (3, "uniform"),
    ]
    for point in report["points"]:
        assert point["committed"] + point["aborted"] + point["finished_outside_window"] > 0
        assert point["committed"] <= point["client_committed"], point  # the window's commits are among all of them
        # what the clients were answered "committed" is what the peers counted as committed client transactions
        assert point["client_committed"] == point["batching"]["client_txns"], point
        assert_cpu_split(point["machine_cpu_pct"])
    assert report["points"][0]["committed"] > 0  # one client alone never conflicts
    # the origin's phases of its committed writes (each reaches both other peers: there is a propagation)
    assert set(report["points"][0]["phases_median_ms"]) == PHASES
    assert report["points"][0]["phases_median_ms"]["propagate_ms"] > 0
    # every global transaction (the loading ones, the measured ones) reaches all three peers: one log entry at each
    loading = math.ceil(people / LOAD_CHUNK)
    global_txns = sum(p["batching"]["global_txns"] for p in report["points"])
    assert report["consistency"] == {
        "views_identical": True,
        "txlog_entries": dict.fromkeys(("government", "bank", "insurance"), loading + global_txns),
    }
    assert report["peer_env"] == {"DEJIMA_BATCH_MAX": "8"}
    assert report["people"] == people
    assert "DEJIMA_BATCH_MAX=8" in (tmp_path / "report.md").read_text()
    assert set(report["targets"]) == {"txn_per_s", "rss"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    for peer in ("bank", "government", "insurance"):
        memory = report["memory"]["under_load"][peer]
        assert memory["max_rss_mb"] > 0
        assert memory["hwm_mb_tree"] >= memory["hwm_mb_worker"] > 0


@pytest.mark.cluster
def test_ycsb_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "ycsb", "--peers", "3", "--seconds", "1", "--records", "50")

    (topology,) = report["topologies"]
    assert topology["peers"] == 3
    # a tree of 3 peers: 2 edges joining p0, p1, p2 (each child after its parent), with the degrees they give
    edges = topology["edges"]
    assert len(edges) == 2 and all(parent < child for parent, child in edges), edges
    assert {n for edge in edges for n in edge} == {0, 1, 2}
    assert topology["degrees"] == {f"p{n}": sum(n in edge for edge in edges) for n in range(3)}
    assert topology["clients"] == 3  # one per peer
    assert topology["committed"] + topology["aborted"] + topology["finished_outside_window"] > 0
    assert topology["consistency"]["views_identical"] is True
    assert set(topology["consistency"]["txlog_entries"]) == {"p0", "p1", "p2"}
    assert (report["records_per_peer"], report["ops_per_txn"]) == (50, {"reads": 5, "writes": 5})
    assert report["paper"]["txn_per_s_per_participant"] == 24.0
    assert report["meets_target"] is None


@pytest.mark.cluster
def test_discovery_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "discovery", "--peers", "3", "--observe-seconds", "0.5")

    (size,) = report["sizes"]
    assert size["peers"] == 3
    assert size["by_type"] == {"government": 1, "bank": 1, "insurance": 1}
    # the groups are stable after the last peer was ready, which was after the last peer was spawned
    assert size["detect_s"] <= size["detect_s_from_last_spawn"], size
    assert size["messages"] > 0
    assert size["group_sizes"] == {"dejima_bank": 2, "dejima_insurance": 2, "dejima_risk": 2}
    assert report["meets_target"] is None  # the target is about 20 peers


@pytest.mark.cluster
def test_fanout_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    runs, warmup = 4, 1
    report = bench(pg_server, tmp_path, "fanout", "--members", "2,3", "--runs", str(runs), "--warmup", str(warmup))

    assert set(report["stars"]) == {"2", "3"}
    for k, star in report["stars"].items():
        assert_latency(star, runs)
        assert (star["members"], star["participants"]) == (int(k), int(k) - 1)
        assert set(star["phases_median_ms"]) == PHASES
        cpu = star["cpu_ms_per_write"]  # every process's CPU over the measured writes, per write
        assert set(cpu) == {"origin", "members", "per_member", "postgres", "bench", "all", "floor_ms"}
        assert cpu["all"] > 0
        assert_cpu_split(star["machine_cpu_during_writes_pct"])
    # every write (warm-up ones too) changes the star's shared view: one log entry at each member
    assert report["consistency"] == {
        "views_identical": True,
        "txlog_entries": {f"s{k}m{m}": runs + warmup for k in (2, 3) for m in range(k)},
    }
    assert set(report["quiet_cpu_pct"]) == {"peers", "postgres", "seconds"}
    assert report["meets_target"] is None  # stars of 2 and 10 were not both run


# ------------------------------------------------------------------------------------------------ no database


@pytest.mark.unit
def test_latencies_are_summarized_as_computed_by_hand() -> None:
    # sorted 1 2 3 4 10: median 3; p95 at rank 4 x 0.95 = 3.8: 4 + 0.8 x (10 - 4) = 8.8; p99 at 3.96: 9.76
    assert latency_summary([10.0, 2.0, 4.0, 1.0, 3.0]) == {
        "median_ms": 3.0,
        "p95_ms": 8.8,
        "p99_ms": 9.76,
        "mean_ms": 4.0,
        "samples": 5,
    }


@pytest.mark.unit
def test_capture_figures_are_the_ratios_of_their_medians_computed_by_hand() -> None:
    samples = Samples()
    samples.by_series.update(
        {
            "capture": [3_000_000, 1_000_000, 2_000_000],  # ns: median 2 ms, p90 at rank 1.8: 2.8 ms
            "floor": [1_000_000, 500_000, 1_500_000, 1_000_000],  # median 1 ms, p90 at rank 2.7: 1.35 ms
            "capture_take": [2_500_000],
            "baseline": [5_000_000, 7_000_000],  # median 6 ms, p90 at rank 0.9: 6.8 ms
        }
    )
    assert _size_result(samples, 0.123) == {
        "capture_ms": 2.0,
        "floor_ms": 1.0,
        "ratio": 2.0,
        "capture_take_ms": 2.5,
        "take_ratio": 2.5,
        "baseline_ms": 6.0,
        "baseline_ratio": 6.0,
        "baseline_over_capture": 3.0,
        "capture_overhead_ms": 1.0,
        "capture_p90_ms": 2.8,
        "floor_p90_ms": 1.35,
        "capture_take_p90_ms": 2.5,
        "baseline_p90_ms": 6.8,
        "capture_samples": 3,
        "floor_samples": 4,
        "capture_take_samples": 1,
        "baseline_samples": 2,
        "load_s": 0.12,
    }


@pytest.mark.unit
def test_generated_trees_and_stars_are_valid_manifests(tmp_path: Path) -> None:
    import random

    from peer.bench.topology import write_root
    from peer.dejima.manifest import load_peer_types

    edges = random_tree(6, random.Random(1))
    assert len(edges) == 5
    assert all(parent < child for parent, child in edges)
    root = write_root(tmp_path / "types", [*tree_types(6, edges), *star_types(3)])
    types = load_peer_types(root)
    assert set(types) == {"p0", "p1", "p2", "p3", "p4", "p5", "s3m0", "s3m1", "s3m2"}
    assert sum(len(types[f"p{i}"].views) for i in range(6)) == 2 * len(edges)
    assert 'filter = [{ column = "home", op = "in"' in manifest_text(tree_types(6, edges)[0])


@pytest.mark.unit
def test_zipf_is_skewed_and_uniform_is_not() -> None:
    import random

    rng = random.Random(7)
    zipf, uniform = Zipf(100, 0.8, seed=1), Zipf(100, 0.0, seed=1)
    hot = zipf.perm[0]
    draws = [zipf.draw(rng) for _ in range(5000)]
    assert draws.count(hot) > 5000 / 100 * 5
    flat = [uniform.draw(rng) for _ in range(5000)]
    assert max(flat.count(k) for k in range(100)) < 5000 / 100 * 2
    assert len(set(zipf.distinct(rng, 10))) == 10


class _TinyServer:
    """A loopback HTTP server for the closed loop's own checks: `mode` "ok" answers every request committed and
    closes every second connection after its answer; "silent" reads requests and never answers; "drop" closes each
    connection as soon as a request arrives."""

    def __init__(self, mode: str) -> None:
        import socket
        import threading

        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests = 0
        self.threads: list[threading.Thread] = []
        self.stopped = threading.Event()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()

    def _accept(self) -> None:
        import threading

        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: Any) -> None:
        with conn:
            served = 0
            buf = b""
            while not self.stopped.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                fields = dict(h.partition(b":")[::2] for h in head.split(b"\r\n")[1:])
                length = int(fields[b"Content-Length"])
                if len(rest) < length:
                    continue
                buf = rest[length:]
                self.requests += 1
                if self.mode == "drop":
                    return
                if self.mode == "silent":
                    continue
                served += 1
                body = b'{"status": "committed", "phases": {"local_ms": 1.5}}'
                close = served == 2
                closing = b"Connection: close\r\n" if close else b""
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), closing) + body)
                if close:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.mark.unit
def test_the_closed_loop_reconnects_when_the_server_closes_and_stops_on_a_hung_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peer.bench import loop
    from peer.bench.common import BenchError

    server = _TinyServer("ok")
    try:
        point = loop.closed_loop([server.url] * 3, lambda c, rng, n: {"sql": "UPDATE t SET v = v + 1"}, 0.3, 0.1, 1)
    finally:
        server.close()
    assert point["clients"] == 3
    assert point["committed"] > 6 and point["aborted"] == 0  # past every second answer's Connection: close
    assert point["client_committed"] == server.requests  # each request answered once, none sent twice
    assert point["phases_median_ms"] == {"local_ms": 1.5}

    monkeypatch.setattr(loop, "REQUEST_TIMEOUT_S", 0.5)
    for mode, message in (("silent", "a request hung"), ("drop", "closed the connection without an answer")):
        server = _TinyServer(mode)
        try:
            with pytest.raises(BenchError, match=message):
                loop.closed_loop([server.url], lambda c, rng, n: {"sql": "SELECT 1"}, 0.2, 0.0, 1)
        finally:
            server.close()
