"""Smoke passes of the benchmarks: each runs (tiny), exits 0, prints valid JSON with the expected keys and writes its
results folder (JSON, Markdown, PNG). No timing is asserted: benchmarks are measurements, not tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.bench.common import Zipf, cpu_split
from peer.bench.topology import manifest_text, random_tree, star_types, tree_types
from peer.pgserver import PgServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("capture_ms", "floor_ms", "ratio", "capture_take_ms", "baseline_ms", "capture_p90_ms", "floor_p90_ms")
COMMON_KEYS = ("bench", "target", "meets_target", "machine", "elapsed_s", "outputs", "command")


def bench(pg_server: PgServer, out: Path, *args: str) -> dict[str, Any]:
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
    assert report["machine"]["cpus"] >= 1
    assert report["machine"]["postgres"]["server_version"]
    assert report["machine"]["postgres"]["max_prepared_transactions"]
    assert_cpu_split(report["machine"]["cpu_during_run_pct"])
    assert "% stolen by the host" in (out / "report.md").read_text()
    assert json.loads((out / "result.json").read_text())["bench"] == args[0]
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


def test_cpu_split_counts_the_ticks_between_two_readings() -> None:
    #        user nice system idle iowait irq softirq steal
    before = (100, 0, 50, 1000, 10, 0, 5, 20)
    after = (160, 0, 70, 1090, 20, 0, 10, 70)  # +60 +0 +20 +90 +10 +0 +5 +50: 235 ticks
    assert cpu_split(before, after) == {"busy": 36.2, "idle": 42.6, "stolen": 21.3}
    assert cpu_split(before, before) is None  # no time passed
    assert cpu_split(None, after) is None
    assert cpu_split(before, after[:4]) is None


def test_a_peer_setting_for_a_bench_run_is_checked() -> None:
    import argparse

    from peer.bench.runner import peer_setting

    assert peer_setting("DEJIMA_BATCH_MAX=32") == ("DEJIMA_BATCH_MAX", "32")
    assert peer_setting("DEJIMA_SEEDS=") == ("DEJIMA_SEEDS", "")
    for bad in ("DEJIMA_BATCH_MAX", "BATCH_MAX=3", "dejima_batch_max=3", "DEJIMA_=1", "DEJIMA_A-B=1", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="DEJIMA_NAME=value"):
            peer_setting(bad)


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
    for key in ("median_ms", "p95_ms", "p99_ms"):
        assert isinstance(summary[key], int | float), (key, summary)
        assert summary[key] > 0, (key, summary)
    assert summary["samples"] == samples


def test_capture_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "capture", "--sizes", "500,2000", "--runs", "30", "--warmup", "2")

    assert report["target"] == "capture_ms <= 2 x floor_ms"
    assert report["postgres"]
    assert report["synchronous_commit"]
    assert report["fsync"]
    assert set(report["rows"]) == {"500", "2000"}
    for size, row in report["rows"].items():
        for name in ROW_FIELDS:
            value = row[name]
            assert isinstance(value, int | float), (size, name, value)
            assert value > 0, (size, name, value)
        assert row["capture_samples"] == 30
        assert row["capture_take_samples"] == 30
        assert row["floor_samples"] == 60
        assert row["baseline_samples"] >= 5
    assert report["meets_target"] == all(row["ratio"] <= 2 for row in report["rows"].values())


def test_propagation_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "propagation", "--runs", "4", "--warmup", "1")

    for kind, participants in (
        ("local_only", []),
        ("one_hop", ["government"]),
        ("two_hop", ["bank", "government"]),
        ("cycle", ["government", "insurance"]),
    ):
        series = report["series"][kind]
        assert_latency(series, 4)
        assert series["participants"] == participants
    assert set(report["ratios_to_local"]) == {"one_hop", "two_hop", "cycle"}
    assert report["meets_target"] == (report["ratio"] <= 3)


def test_throughput_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(
        pg_server,
        tmp_path,
        "throughput",
        *("--clients", "1,3", "--seconds", "1", "--warmup-seconds", "0.2", "--peer-env", "DEJIMA_BATCH_MAX=8"),
        *("--people", "300"),
    )

    assert [(p["clients"], p["keys"]) for p in report["points"]] == [
        (1, "uniform"),
        (1, "zipf"),
        (3, "zipf"),
        (3, "uniform"),
    ]
    for point in report["points"]:
        assert point["txn_per_s"] >= 0
        assert point["committed"] + point["aborted"] + point["finished_outside_window"] > 0
        assert_cpu_split(point["machine_cpu_pct"])
    assert report["points"][0]["committed"] > 0  # one client alone never conflicts
    # the origin's phases of its committed writes (each reaches both other peers: there is a propagation)
    assert {"settle_ms", "local_ms", "propagate_ms"} <= set(report["points"][0]["phases_median_ms"])
    assert all(v >= 0 for v in report["points"][0]["phases_median_ms"].values())
    assert report["peer_env"] == {"DEJIMA_BATCH_MAX": "8"}
    assert report["people"] == 300
    assert "DEJIMA_BATCH_MAX=8" in (tmp_path / "report.md").read_text()
    assert set(report["targets"]) == {"txn_per_s", "rss"}
    for peer in ("bank", "government", "insurance"):
        memory = report["memory"]["under_load"][peer]
        assert memory["max_rss_mb"] > 0
        assert memory["hwm_mb_tree"] >= memory["hwm_mb_worker"] > 0
    assert report["consistency"]["views_identical"] is True
    assert report["meets_target"] == all(t["met"] for t in report["targets"].values())


def test_ycsb_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "ycsb", "--peers", "3", "--seconds", "1", "--records", "50")

    (topology,) = report["topologies"]
    assert topology["peers"] == 3
    assert len(topology["edges"]) == 2
    assert topology["committed"] + topology["aborted"] + topology["finished_outside_window"] > 0
    assert topology["txn_per_s_per_participant"] == round(topology["txn_per_s"] / 3, 2)
    assert report["paper"]["txn_per_s_per_participant"] == 24.0
    assert report["meets_target"] is None


def test_discovery_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "discovery", "--peers", "3", "--observe-seconds", "0.5")

    (size,) = report["sizes"]
    assert size["peers"] == 3
    assert size["detect_s"] >= 0
    assert size["messages"] > 0
    assert size["group_sizes"] == {"dejima_bank": 2, "dejima_insurance": 2, "dejima_risk": 2}
    assert report["meets_target"] is None  # the target is about 20 peers


def test_fanout_bench_smoke(pg_server: PgServer, tmp_path: Path) -> None:
    report = bench(pg_server, tmp_path, "fanout", "--members", "2,3", "--runs", "4", "--warmup", "1")

    assert set(report["stars"]) == {"2", "3"}
    for k, star in report["stars"].items():
        assert_latency(star, 4)
        assert star["participants"] == int(k) - 1
        cpu = star["cpu_ms_per_write"]  # every process's CPU over the measured writes, per write
        # (4 writes: a process's CPU, read in ticks of 10 ms, may round to 0)
        assert min(cpu[p] for p in ("origin", "members", "postgres", "bench")) >= 0
        assert cpu["all"] >= cpu["origin"] + cpu["members"] + cpu["postgres"] - 0.005
        assert cpu["per_member"] == pytest.approx(cpu["members"] / (int(k) - 1), abs=0.002)
        assert cpu["floor_ms"] == pytest.approx(cpu["all"] / report["machine"]["cpus"], abs=0.002)
        assert_cpu_split(star["machine_cpu_during_writes_pct"])
    assert set(report["quiet_cpu_pct"]) == {"peers", "postgres", "seconds"}
    assert report["quiet_cpu_pct"]["seconds"] >= 2
    assert report["ratio_largest_to_smallest"] > 0
    assert report["meets_target"] is None  # stars of 2 and 10 were not both run


# ------------------------------------------------------------------------------------------------ no database


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
