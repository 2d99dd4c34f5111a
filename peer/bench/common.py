"""Shared instruments of the benchmarks: errors, statistics, the machine description, PostgreSQL and peer networks,
a lean keep-alive JSON client, a Zipf sampler and process memory readings.

Benchmarks are measurements, never tests: each checks that it measured something real (rows changed, commits
counted, messages seen) and raises `BenchError` otherwise; the runner turns that into exit status 2.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import platform
import random
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from peer.network import LocalNetwork, NetworkError, PeerSpec
from peer.pgserver import PgServer, PgServerError

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_ROOT = REPO_ROOT / "bench-results"
SEED = 20261122
PG_SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
    "shared_buffers",
    "max_connections",
    "max_prepared_transactions",
    "wal_level",
)


class BenchError(Exception):
    """The benchmark could not measure what it claims to measure (exit status 2)."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """median / p95 / p99 / mean of latencies in milliseconds."""
    if not samples_ms:
        raise BenchError("no samples")
    return {
        "median_ms": round(statistics.median(samples_ms), 3),
        "p95_ms": round(percentile(samples_ms, 0.95), 3),
        "p99_ms": round(percentile(samples_ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples_ms), 3),
        "samples": len(samples_ms),
    }


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def pg_settings(url: str) -> dict[str, str]:
    """The server settings that matter for the figures (version, durability, limits)."""
    with psycopg.connect(url, autocommit=True) as conn:
        out: dict[str, str] = {}
        for name in PG_SETTINGS:
            row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
            out[name] = str(row[0]) if row and row[0] is not None else ""
        return out


def machine(server: PgServer | None = None) -> dict[str, Any]:
    """Where the figures were taken: cores, CPU, memory, kernel, Python, load, and the PostgreSQL settings."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }
    if server is not None:
        out["postgres_server"] = server.kind
        try:
            out["postgres"] = pg_settings(server.url("postgres"))
        except psycopg.Error as exc:
            out["postgres"] = {"error": str(exc)}
    return out


# ------------------------------------------------------------------------------------------------ PostgreSQL


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    """The server at DEJIMA_DATABASE_URL, or one of our own in a temporary folder; stops what it started."""
    if os.environ.get("DEJIMA_DATABASE_URL", "").strip():
        server = PgServer.from_env(Path(tempfile.gettempdir()))
        server.start()
        yield server
        return
    state_dir = Path(tempfile.mkdtemp(prefix="dejima-bench-"))
    try:
        # A free port, whatever DEJIMA_PG_PORT says: the bench may run beside `make demo`.
        server = dataclasses.replace(PgServer.from_env(state_dir), port=None)
        log(f"starting PostgreSQL ({server.kind}) in {state_dir}")
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ peer networks


def with_env(specs: Sequence[PeerSpec], env: dict[str, str]) -> list[PeerSpec]:
    """The specs with `env` added to each one's environment (a spec's own entries win)."""
    for spec in specs:
        spec.env = {**env, **spec.env}
    return list(specs)


@contextlib.contextmanager
def running_network(
    server: PgServer,
    specs: Sequence[PeerSpec],
    sql_root: Path | None = None,
    timeout: float = 180.0,
    wait: bool = True,
) -> Iterator[LocalNetwork]:
    """Fresh databases, the peers started (and with `wait`, ready: healthy and groups formed); every peer stopped by
    pid and the databases dropped at the end, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="dejima-bench-net-") as tmp:
        net = LocalNetwork(server, Path(tmp), list(specs), sql_root=sql_root)
        try:
            for spec in specs:
                server.create_database(spec.database, replace=True)
            if wait:
                net.start_all()
                net.wait_ready(timeout=timeout)
            yield net
        except NetworkError as exc:
            raise BenchError(f"the peer network did not start: {exc}") from None
        finally:
            net.stop_all()
            for spec in specs:
                with contextlib.suppress(PgServerError, psycopg.Error):
                    server.drop_database(spec.database)


def peer_stats(net: LocalNetwork, name: str) -> dict[str, Any]:
    """The `stats` counters of a peer's /api/v1/status ({} when it has none)."""
    stats = net.get(name, "/api/v1/status").get("stats")
    return dict(stats) if isinstance(stats, dict) else {}


def total_stat(net: LocalNetwork, key: str) -> int | None:
    """The sum of one `stats` counter over every peer of the network, None when a peer does not report it."""
    total = 0
    for name, spec in net.specs.items():
        if spec.mode != "peer":
            continue
        value = peer_stats(net, name).get(key)
        if not isinstance(value, int):
            return None
        total += value
    return total


# ------------------------------------------------------------------------------------------------ HTTP client


class JsonClient:
    """A lean keep-alive JSON client (http.client, TCP_NODELAY): one connection, one thread.

    Cheaper per call than `requests` (its client CPU per call is several times less), so the client costs the
    shared cores as little as possible. A connection the server closed while idle is reopened once. An https URL is
    verified with `context` (the kit's CA: `LocalNetwork.client_context()`; None: the system's CAs)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}  # e.g. the API token
        self.context = context
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = (
            http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.context or ssl.create_default_context()
            )
            if self.https
            else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        )
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        return conn

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; (HTTP status, decoded JSON answer or None)."""
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            reused = self.conn is not None
            conn = self.conn or self._connect()
            try:
                conn.request("POST", path, body=data, headers=self.headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or not reused:
                    raise
                continue
            if (resp.getheader("Connection") or "").lower() == "close":
                self.close()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, {"error": raw[:300].decode(errors="replace")}
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def settle(net: LocalNetwork, clients: dict[str, JsonClient], peers: Iterable[str]) -> None:
    """Untimed, between two samples: a query at each of `peers`, which first waits for the transactions prepared
    there to finish (`Coordinator.settle`). With DEJIMA_COMMIT_WAIT=decision an origin answers before COMMIT PREPARED
    has reached its participants: without this the next sample would overlap the previous write's tail. `clients`
    gains a connection per peer it lacks."""
    for peer in peers:
        client = clients.get(peer)
        if client is None:
            client = clients[peer] = JsonClient(
                net.specs[peer].url, headers=net.auth_headers(peer), context=net.client_context()
            )
        status, answer = client.post("/api/v1/query", {"sql": "SELECT 1"})
        if status != 200:
            raise BenchError(f"the settling query at {peer} failed: {status} {answer}")


# ------------------------------------------------------------------------------------------------ key choice


class Zipf:
    """Ranks 0..n-1 drawn with P(rank i) ∝ 1 / (i + 1)^theta (theta 0 = uniform), mapped through a seeded
    permutation so the hot items are spread over the key space (and over the peers that own them)."""

    def __init__(self, n: int, theta: float, seed: int = SEED) -> None:
        if n < 1:
            raise BenchError("Zipf over an empty set")
        self.n = n
        self.theta = theta
        self.cum = list(itertools.accumulate(1.0 / (i + 1) ** theta for i in range(n)))
        self.perm = list(range(n))
        random.Random(seed).shuffle(self.perm)  # noqa: S311 - key choice, not security

    def draw(self, rng: random.Random) -> int:
        i = bisect.bisect_left(self.cum, rng.random() * self.cum[-1])
        return self.perm[min(i, self.n - 1)]

    def distinct(self, rng: random.Random, k: int) -> list[int]:
        """k distinct items (k <= n)."""
        k = min(k, self.n)
        out: dict[int, None] = {}
        while len(out) < k:
            out[self.draw(rng)] = None
        return list(out)


# ------------------------------------------------------------------------------------------------ memory


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in task.read_text().split()]
    return out


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time the processes have used so far (/proc/<pid>/stat); a process gone counts 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLOCK_TICKS


def cpu_by_process(net: LocalNetwork) -> dict[str, float]:
    """CPU seconds used so far by each peer (gunicorn arbiter + worker), PostgreSQL (every process of the server;
    absent for an external one) and this bench process (`bench`)."""
    out = {name: cpu_seconds(process_tree(spec.pid)) for name, spec in net.specs.items()}
    postmaster = net.server.postmaster_pid()
    if postmaster is not None:
        out["postgres"] = cpu_seconds(process_tree(postmaster))
    out["bench"] = time.process_time()
    return out


_STAT_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> tuple[int, ...] | None:
    """The whole machine's CPU time so far by kind (`_STAT_KINDS`, the first line of /proc/stat, in ticks); None
    without /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return tuple(int(x) for x in fields[1 : 1 + len(_STAT_KINDS)])
    except (OSError, ValueError, IndexError):
        return None


def cpu_split(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> dict[str, float] | None:
    """How the machine's CPU time went between two `machine_cpu` readings, in % of it: `busy` (user, system,
    interrupts), `idle` (waiting for I/O included) and `stolen` (a virtual machine's CPU the host gave to someone
    else meanwhile: on a shared host it varies by the hour, and the figures with it). None when unknown."""
    if before is None or after is None or len(before) != len(after):
        return None
    d = dict(zip(_STAT_KINDS, (b - a for a, b in zip(before, after, strict=True)), strict=False))
    total = sum(d.values())
    if total <= 0:
        return None
    busy = d["user"] + d["nice"] + d["system"] + d["irq"] + d["softirq"]
    return {
        "busy": round(100 * busy / total, 1),
        "idle": round(100 * (d["idle"] + d["iowait"]) / total, 1),
        "stolen": round(100 * d.get("steal", 0) / total, 1),
    }


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB; (0, 0) when it is gone."""
    rss = hwm = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def elapsed_since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


def check_consistency(net: LocalNetwork, timeout: float = 60.0) -> dict[str, Any]:
    """`dejima check` on the network after a run: every dejima view identical across its group, every transaction
    log verified, nothing left prepared (retried for `timeout` s: COMMIT PREPARED may still be on its way)."""
    from peer.cli import check_network

    urls = {name: spec.url for name, spec in net.specs.items() if spec.mode == "peer"}
    auth = {name: net.auth_headers(name) for name in urls}
    deadline = time.monotonic() + timeout
    report = check_network(urls, auth, net.verify)
    while not report["ok"] and time.monotonic() < deadline:
        time.sleep(0.25)
        report = check_network(urls, auth, net.verify)
    if not report["ok"]:
        bad = {k: report[k] for k in ("divergent_views", "broken_chains", "prepared_transactions", "errors")}
        raise BenchError(f"after the run the peers disagree: {bad}")
    return {"views_identical": True, "txlog_entries": {p: c["length"] for p, c in report["chains"].items()}}


def wait_quiet(net: LocalNetwork, timeout: float = 60.0) -> float | None:
    """Wait until no peer has an open global transaction (/api/v1/status open_transactions == 0): leftovers of a
    loaded point (participants waiting for a silent origin, recovery) must not pollute the next one. Returns the
    seconds it took, None when still busy after `timeout` (a figure worth reporting, not a broken run)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            busy = [
                n
                for n, s in net.specs.items()
                if s.mode == "peer" and net.get(n, "/api/v1/status").get("open_transactions", 0) != 0
            ]
        except OSError:
            busy = ["?"]
        if not busy:
            return round(time.monotonic() - started, 2)
        time.sleep(0.1)
    return None
