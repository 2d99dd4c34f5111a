"""Benchmarks of the peer (measurements, never tests).

``python -m peer.bench capture [--json] [--quick] [--sizes 1000,100000,1000000] [--runs N] [--warmup N]``

capture: the median latency of a committed 1-row update of a dejima view column (``bank_users.phone``, seen by
``dejima_bank``) with the capture triggers installed, against the same statements on a copy of the table without
triggers (the floor), at each table size.

Method:
- One database ``bench_capture`` with peer type ``bank`` installed (``peer.dejima.install``). Per size, N rows are
  loaded into ``bank_users`` (INSERT … SELECT generate_series, no gxid: nothing is captured) and the same rows into
  ``bank_users_floor`` = ``(LIKE bank_users INCLUDING ALL)``: same columns and indexes, no triggers. Then VACUUM
  ANALYZE and CHECKPOINT, so both tables start from the same state.
- One persistent autocommit psycopg connection; every measured operation is one committed transaction:
  ``BEGIN; set_config('dejima.gxid', <unique>, true); UPDATE <table> SET phone = <new> WHERE id = <random>;
  COMMIT``, timed with ``time.perf_counter_ns`` from BEGIN sent to COMMIT answered (client round trips included).
- ``capture_take`` is the capture operation plus ``peer.dejima.delta.take_changes`` (the DELETE … RETURNING the
  peer service runs to consume the delta) before COMMIT; every one must return exactly the one change made.
- Each round runs capture(a), floor(a), capture_take(b), floor(b) — a and b random row ids — rotated by one
  position every round: capture and floor alternate, every series takes every position equally often, and both
  tables receive exactly the same updates (so the same dead tuples and HOT chains). Warm-up rounds come first and
  are not recorded. Python's garbage collector is off while measuring.
- After each round, outside the timing, the record of the capture operation is consumed (DELETE … RETURNING),
  as the peer service consumes every transaction's records: ``dejima.delta`` stays as small as in production
  instead of growing by one row per capture sample, which is not what the take meets in production.
- Checks (a benchmark that measures nothing is worthless): the capture trigger exists and is enabled on
  ``bank_users``, the floor has no trigger, every UPDATE changed exactly one row, every capture_take took exactly
  its one ``dejima_bank`` change, and after every round ``dejima.delta`` held exactly the one record of the
  capture operation (none from the floor). Any failure aborts the run (exit status 2).
- The server keeps its durable settings (synchronous_commit, fsync); they are recorded in the output.

PostgreSQL: the server at ``DEJIMA_DATABASE_URL`` when it is set (database ``bench_capture`` is dropped at the end),
otherwise a server of our own (``peer.pgserver``, ``DEJIMA_PG``) in a temporary folder, stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql

from peer.dejima.delta import set_gxid, take_changes
from peer.dejima.install import InstallError, install
from peer.pgserver import PgServer, PgServerError

BENCH_DATABASE = "bench_capture"
PEER_TYPE = "bank"
TABLE = "bank_users"
FLOOR_TABLE = "bank_users_floor"
VIEW = "dejima_bank"  # the dejima view that shows the updated column
COLUMN = "phone"
CAPTURE_TRIGGER = "dejima_capture_upd"
TARGET_RATIO = 2.0
TARGET = "capture_ms <= 2 x floor_ms"
DEFAULT_SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
DEFAULT_RUNS = 2_000
QUICK_RUNS = 200
SEED = 20261122

CAPTURE, FLOOR, TAKE = "capture", "floor", "capture_take"
SERIES = (CAPTURE, FLOOR, TAKE)
GXID_PREFIX = {CAPTURE: "bench-c-", FLOOR: "bench-f-", TAKE: "bench-t-"}


class BenchError(Exception):
    """The benchmark could not measure what it claims to measure."""


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _table(name: str) -> sql.Identifier:
    return sql.Identifier("public", name)


# ------------------------------------------------------------------------------------------------ statistics


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(ns: float) -> float:
    return round(ns / 1e6, 4)


@dataclass
class Samples:
    """Latencies in nanoseconds, per series."""

    by_series: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SERIES})

    def median_ms(self, series: str) -> float:
        return _ms(statistics.median(self.by_series[series]))

    def p90_ms(self, series: str) -> float:
        return _ms(_percentile(self.by_series[series], 0.9))


# ------------------------------------------------------------------------------------------------ database setup


def _setting(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    if row is None:
        raise BenchError(f"no setting {name}")
    return str(row[0])


def _prepare_schema(conn: psycopg.Connection[Any]) -> None:
    """The floor table, and the checks that capture is installed on the table and absent from the floor."""
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)").format(_table(FLOOR_TABLE), _table(TABLE))
    )
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s AND tgenabled <> 'D'",
        (f"public.{TABLE}", CAPTURE_TRIGGER),
    ).fetchone()
    if row is None or row[0] != 1:
        raise BenchError(f"the capture trigger {CAPTURE_TRIGGER} is not installed and enabled on {TABLE}")
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal",
        (f"public.{FLOOR_TABLE}",),
    ).fetchone()
    if row is None or row[0] != 0:
        raise BenchError(f"the floor table {FLOOR_TABLE} must have no trigger")
    row = conn.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s"
        " AND column_name = %s",
        (VIEW, COLUMN),
    ).fetchone()
    if row is None or row[0] != 1:
        raise BenchError(f"view {VIEW} does not show column {COLUMN}: the update would not be a view change")


def _load(conn: psycopg.Connection[Any], size: int) -> float:
    """Load `size` rows into both tables (same rows, same order), vacuum, analyze, checkpoint. Returns seconds."""
    started = time.perf_counter()
    conn.execute(
        sql.SQL("TRUNCATE {}, {}, dejima.delta").format(_table(TABLE), _table(FLOOR_TABLE)),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, first_name, last_name, iban, address, phone, risk_factor)"
            " SELECT g, 'First' || g, 'Last' || g, 'XX00BENCH' || lpad(g::text, 12, '0'), g || ' Bench Street',"
            " '+1-555-' || g, mod(g, 10)"
            " FROM generate_series(1, %s) AS g"
        ).format(_table(TABLE)),
        (size,),
    )
    conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} ORDER BY id").format(_table(FLOOR_TABLE), _table(TABLE)))
    for table in (TABLE, FLOOR_TABLE):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(table))).fetchone()
        if row is None or row[0] != size:
            raise BenchError(f"{table} holds {row[0] if row else None} rows, expected {size}")
    row = conn.execute("SELECT count(*) FROM dejima.delta").fetchone()
    if row is None or row[0] != 0:
        raise BenchError("loading without a gxid was captured: dejima.delta is not empty")
    conn.execute(sql.SQL("VACUUM ANALYZE {}, {}, dejima.delta").format(_table(TABLE), _table(FLOOR_TABLE)))
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        _log("no privilege for CHECKPOINT; measuring without one")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class Op:
    series: str
    table: str
    row_id: int


def _rounds(size: int, count: int, rng: random.Random) -> Iterator[list[Op]]:
    """`count` rounds of capture(a), floor(a), capture_take(b), floor(b), rotated by one position per round."""
    for r in range(count):
        a = rng.randint(1, size)
        b = rng.randint(1, size)
        ops = [Op(CAPTURE, TABLE, a), Op(FLOOR, FLOOR_TABLE, a), Op(TAKE, TABLE, b), Op(FLOOR, FLOOR_TABLE, b)]
        shift = r % len(ops)
        yield ops[shift:] + ops[:shift]


CONSUME_SQL = "DELETE FROM dejima.delta RETURNING gxid, view_name, new_row ->> %s"


def _measure(conn: psycopg.Connection[Any], size: int, runs: int, warmup: int, rng: random.Random) -> Samples:
    updates = {
        table: sql.SQL("UPDATE {} SET {} = %s WHERE id = %s").format(_table(table), sql.Identifier(COLUMN))
        for table in (TABLE, FLOOR_TABLE)
    }
    samples = Samples()
    wrong: list[str] = []
    gc.collect()
    gc.disable()
    try:
        for r, ops in enumerate(_rounds(size, warmup + runs, rng)):
            captured: tuple[str, str, str] | None = None
            for k, op in enumerate(ops):
                gxid = f"{GXID_PREFIX[op.series]}{size}-{r}-{k}"
                phone = f"+9-{size}-{r}-{k}"
                update = updates[op.table]
                take = op.series == TAKE
                changes = None
                # ---- timed: one committed transaction
                t0 = time.perf_counter_ns()
                conn.execute("BEGIN")
                set_gxid(conn, gxid)
                cur = conn.execute(update, (phone, op.row_id))
                if take:
                    changes = take_changes(conn, gxid)
                conn.execute("COMMIT")
                elapsed = time.perf_counter_ns() - t0
                # ---- end of timing
                if cur.rowcount != 1:
                    wrong.append(f"{op.series}: UPDATE of id {op.row_id} changed {cur.rowcount} rows")
                if take and (
                    changes is None
                    or len(changes) != 1
                    or changes[0].view != VIEW
                    or changes[0].new is None
                    or changes[0].new.get(COLUMN) != phone
                ):
                    wrong.append(f"capture_take {gxid}: took {changes!r}, expected one {VIEW} change to {phone}")
                if op.series == CAPTURE:
                    captured = (gxid, VIEW, phone)
                if r >= warmup:
                    samples.by_series[op.series].append(elapsed)
            # Untimed: consume what the capture operation recorded, as the peer service would, so dejima.delta
            # stays as small as in production; it must be exactly that one record (none from floor or take).
            left = [tuple(row) for row in conn.execute(CONSUME_SQL, (COLUMN,)).fetchall()]
            if left != [captured]:
                wrong.append(f"round {r}: dejima.delta held {left!r}, expected only the capture record {captured!r}")
            if wrong:
                break
    finally:
        gc.enable()
    if wrong:
        raise BenchError("the benchmark did not measure what it should: " + "; ".join(wrong[:10]))
    return samples


def _size_result(samples: Samples, load_s: float) -> dict[str, float | int]:
    capture = samples.median_ms(CAPTURE)
    floor = samples.median_ms(FLOOR)
    take = samples.median_ms(TAKE)
    return {
        "capture_ms": capture,
        "floor_ms": floor,
        "ratio": round(capture / floor, 3),
        "capture_take_ms": take,
        "take_ratio": round(take / floor, 3),
        "capture_overhead_ms": round(capture - floor, 4),
        "capture_p90_ms": samples.p90_ms(CAPTURE),
        "floor_p90_ms": samples.p90_ms(FLOOR),
        "capture_take_p90_ms": samples.p90_ms(TAKE),
        "capture_samples": len(samples.by_series[CAPTURE]),
        "floor_samples": len(samples.by_series[FLOOR]),
        "capture_take_samples": len(samples.by_series[TAKE]),
        "load_s": round(load_s, 2),
    }


# ------------------------------------------------------------------------------------------------ server


@contextlib.contextmanager
def _server() -> Iterator[PgServer]:
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
        _log(f"starting PostgreSQL ({server.kind}) in {state_dir}")
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def run_capture(sizes: Sequence[int], runs: int, warmup: int) -> dict[str, Any]:
    """Run the capture benchmark and return its report (the JSON document)."""
    started = time.perf_counter()
    rng = random.Random(SEED)  # noqa: S311 - row ids for a benchmark, not security
    rows: dict[str, dict[str, float | int]] = {}
    with _server() as server:
        url = server.create_database(BENCH_DATABASE, replace=True)
        try:
            install(url, PEER_TYPE)
            with psycopg.connect(url, autocommit=True) as conn:
                _prepare_schema(conn)
                settings = {
                    name: _setting(conn, name)
                    for name in ("server_version", "synchronous_commit", "fsync", "full_page_writes", "shared_buffers")
                }
                for size in sizes:
                    _log(f"{size} rows: loading")
                    load_s = _load(conn, size)
                    _log(f"{size} rows: loaded in {load_s:.1f}s; {warmup} warm-up + {runs} measured rounds")
                    rows[str(size)] = _size_result(_measure(conn, size, runs, warmup, rng), load_s)
        finally:
            if server.kind == "external":
                with contextlib.suppress(PgServerError):  # never hide the real error
                    server.drop_database(BENCH_DATABASE)
        server_kind = server.kind
    return {
        "rows": rows,
        "target": TARGET,
        "meets_target": all(float(r["ratio"]) <= TARGET_RATIO for r in rows.values()),
        "postgres": settings["server_version"],
        "runs": runs,
        "warmup": warmup,
        "synchronous_commit": settings["synchronous_commit"],
        "fsync": settings["fsync"],
        "full_page_writes": settings["full_page_writes"],
        "shared_buffers": settings["shared_buffers"],
        "server": server_kind,
        "peer_type": PEER_TYPE,
        "updated": f"{TABLE}.{COLUMN} of one row by id (a column of view {VIEW})",
        "method": (
            "one autocommit connection; each sample = BEGIN; set_config('dejima.gxid'); UPDATE 1 row; COMMIT "
            "(capture_take: + take_changes before COMMIT); rounds of capture(a), floor(a), capture_take(b), "
            "floor(b) rotated per round; the capture record consumed after each round, untimed; "
            "medians of perf_counter_ns"
        ),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------ output and CLI


# ------------------------------------------------------------------------------------------------ propagation

PROPAGATION_PEOPLE = 1_000


def run_propagation(runs: int, warmup: int, commit_wait: str = "all") -> dict[str, Any]:
    """Median/p99 latency, through the peer's REST API, of a 1-row update at bank that reaches government and
    insurance (address: dejima_bank, then dejima_insurance) against a local-only update (iban: in no view)."""
    import requests

    from peer.network import LocalNetwork, example_specs

    started = time.perf_counter()
    rng = random.Random(SEED)  # noqa: S311 - row ids for a benchmark, not security
    with _server() as server, tempfile.TemporaryDirectory(prefix="dejima-bench-net-") as tmp:
        specs = example_specs(base_port=0, prefix="benchprop_")
        for spec in specs:
            spec.env["DEJIMA_COMMIT_WAIT"] = commit_wait
        net = LocalNetwork(server, Path(tmp), specs)
        try:
            for spec in net.specs.values():
                server.create_database(spec.database, replace=True)
            net.start_all()
            net.wait_ready(timeout=60)
            values = sql.SQL(", ").join(
                sql.SQL("({}, 'bench', {})").format(sql.Literal(f"p{i}"), sql.Literal(f"{i} Main St"))
                for i in range(PROPAGATION_PEOPLE)
            )
            load = sql.SQL("INSERT INTO bank_users (first_name, last_name, address) VALUES {}").format(values)
            status, body = net.exec("bank", load.as_string(None))
            if status != 200:
                raise BenchError(f"loading people at bank failed: {body}")
            session = requests.Session()
            url = net.specs["bank"].url + "/api/v1/exec"
            series: dict[str, list[float]] = {"propagated": [], "local_only": []}

            def once(kind: str, i: int) -> None:
                person = rng.randrange(PROPAGATION_PEOPLE)
                column = "address" if kind == "propagated" else "iban"
                stmt = (
                    sql.SQL("UPDATE bank_users SET {} = {} WHERE first_name = {}")
                    .format(sql.Identifier(column), sql.Literal(f"{kind} {i}"), sql.Literal(f"p{person}"))
                    .as_string(None)
                )
                t0 = time.perf_counter_ns()
                resp = session.post(url, json={"sql": stmt}, timeout=30)
                elapsed = time.perf_counter_ns() - t0
                answer = resp.json()
                if resp.status_code != 200 or answer.get("status") != "committed":
                    raise BenchError(f"{kind} write failed: {resp.status_code} {answer}")
                expected = ["government", "insurance"] if kind == "propagated" else []
                if answer.get("participants") != expected:
                    raise BenchError(f"{kind} write reached {answer.get('participants')}, expected {expected}")
                if i >= 0:
                    series[kind].append(elapsed / 1e6)

            for i in range(warmup):
                once("propagated", -1 - i)
                once("local_only", -1 - i)
            for i in range(runs):
                order = ("propagated", "local_only") if i % 2 == 0 else ("local_only", "propagated")
                for kind in order:
                    once(kind, i)
            session.close()
        finally:
            net.stop_all()
    report: dict[str, Any] = {}
    for kind, samples in series.items():
        report[kind] = {
            "median_ms": round(statistics.median(samples), 3),
            "p99_ms": round(_percentile(samples, 0.99), 3),
            "samples": len(samples),
        }
    ratio = report["propagated"]["median_ms"] / report["local_only"]["median_ms"]
    return {
        **report,
        "ratio": round(ratio, 2),
        "target": "propagated median <= 3 x local-only median",
        "meets_target": ratio <= 3.0,
        "runs": runs,
        "warmup": warmup,
        "commit_wait": commit_wait,
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "method": "POST /api/v1/exec at bank over a keep-alive session; propagated = UPDATE address (reaches "
        "government via dejima_bank and insurance via dejima_insurance, 2PC); local-only = UPDATE iban; interleaved",
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"capture benchmark: PostgreSQL {report['postgres']} ({report['server']}), "
        f"synchronous_commit={report['synchronous_commit']}, fsync={report['fsync']}, "
        f"{report['runs']} runs per series (+{report['warmup']} warm-up rounds)",
        "committed 1-row UPDATE of a view column; median ms (p90)",
        "",
        f"{'rows':>10}  {'capture':>16}  {'floor':>16}  {'ratio':>6}  {'capture+take':>16}  {'ratio':>6}",
    ]
    for size, r in report["rows"].items():
        lines.append(
            f"{int(size):>10,}  {r['capture_ms']:>7.3f} ({r['capture_p90_ms']:>6.3f})  "
            f"{r['floor_ms']:>7.3f} ({r['floor_p90_ms']:>6.3f})  {r['ratio']:>5.2f}x  "
            f"{r['capture_take_ms']:>7.3f} ({r['capture_take_p90_ms']:>6.3f})  {r['take_ratio']:>5.2f}x"
        )
    verdict = "met" if report["meets_target"] else "NOT met"
    lines += ["", f"target {report['target']}: {verdict}  ({report['elapsed_s']} s)"]
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated row counts, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive row counts, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peer.bench", description="Benchmarks of the Dejima peer.")
    sub = parser.add_subparsers(dest="bench", required=True)
    capture = sub.add_parser(
        "capture",
        help="committed 1-row update of a view column: capture triggers vs. the same table without triggers",
    )
    capture.add_argument("--json", action="store_true", help="print the report as JSON")
    capture.add_argument("--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}, {QUICK_RUNS} runs")
    capture.add_argument("--sizes", type=_sizes, help="comma-separated table sizes (default 1000,100000,1000000)")
    capture.add_argument("--runs", type=_positive, help=f"measured samples per series (default {DEFAULT_RUNS})")
    capture.add_argument("--warmup", type=_non_negative, help="warm-up rounds per size (default runs/10, 20..200)")
    prop = sub.add_parser("propagation", help="1-row update at bank reaching government and insurance vs local-only")
    prop.add_argument("--json", action="store_true", help="print the report as JSON")
    prop.add_argument("--quick", action="store_true", help="smoke run: 30 runs")
    prop.add_argument("--runs", type=_positive, help="measured samples per series (default 500)")
    prop.add_argument("--warmup", type=_non_negative, help="warm-up rounds (default 30)")
    prop.add_argument(
        "--commit-wait", choices=("all", "decision"), default="all", help="the peers' DEJIMA_COMMIT_WAIT (default all)"
    )
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the server we started


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.bench == "propagation":
            runs: int = args.runs or (30 if args.quick else 500)
            warmup: int = args.warmup if args.warmup is not None else (5 if args.quick else 30)
            report = run_propagation(runs, warmup, args.commit_wait)
            print(json.dumps(report, indent=2))
            return 0
        sizes: tuple[int, ...] = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
        runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
        warmup = args.warmup if args.warmup is not None else max(20, min(200, runs // 10))
        report = run_capture(sizes, runs, warmup)
    except (BenchError, InstallError, PgServerError, psycopg.Error) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
