"""capture: the cost of change capture on a committed 1-row update, against no trigger and the prototype's approach.

``python -m peer.bench capture [--json] [--quick] [--sizes 1000,10000,100000,1000000] [--runs N] [--warmup N]
[--baseline-runs N]``

The median latency of a committed 1-row update of a dejima view column (``bank_users.phone``, seen by
``dejima_bank``) with the capture triggers installed, against the same statements on a copy of the table without
triggers (the floor), and against the 2019 prototype's approach (the baseline), at each table size.

Method:
- One database ``bench_capture`` with peer type ``bank`` installed (``peer.dejima.install``). Per size, N rows are
  loaded into ``bank_users`` (INSERT … SELECT generate_series, no gxid: nothing is captured) and the same rows into
  ``bank_users_floor`` = ``(LIKE bank_users INCLUDING ALL)``: same columns and indexes, no triggers, and into
  ``bank_users_snapdiff`` (same again) for the baseline. Then VACUUM ANALYZE and CHECKPOINT.
- The baseline, written here (it is not the peer's code): the prototype's capture. A view ``bench_snap_view``
  (the columns of ``dejima_bank``) over ``bank_users_snapdiff``, a materialized snapshot of it, and one statement
  trigger (AFTER INSERT OR UPDATE OR DELETE) that diffs the view against the snapshot with EXCEPT both ways, records
  the difference in ``bench_snap_delta`` and refreshes the snapshot: cost proportional to the table.
- One persistent autocommit psycopg connection; every measured operation is one committed transaction of a global
  transaction, in the round trips the peer service uses: ``BEGIN; SELECT dejima.begin_global(<unique gxid>, <token
  hash>)`` (one round trip), ``UPDATE <table> SET phone = <new> WHERE id = <random>``, then ``SELECT
  dejima.end_global(<token>, …); COMMIT`` (one round trip, a pipeline), timed with ``time.perf_counter_ns`` from
  BEGIN sent to COMMIT answered (client round trips included). Every series pays the registration alike: the ratio
  is the cost of the capture trigger.
- ``capture_take`` is the capture operation plus ``peer.dejima.delta.take_changes`` (``dejima.take_delta``, the
  DELETE … RETURNING the peer service runs to consume the delta) before the end; every one must return exactly the
  one change made.
- Each round runs capture(a), floor(a), capture_take(b), floor(b) — a and b random row ids — and, every k-th round,
  baseline(a) (k chosen so the baseline gets its --baseline-runs samples: at 1M rows one baseline update takes
  seconds), rotated by one position every round: the series alternate, every series takes every position, and the
  tables receive the same updates. Warm-up rounds come first and are not recorded. Python's garbage collector is off
  while measuring.
- After each round, outside the timing, the records of the capture operation and of the baseline are consumed
  (DELETE … RETURNING), as the peer service consumes every transaction's records.
- Checks (a benchmark that measures nothing is worthless): the capture trigger exists and is enabled on
  ``bank_users``, the floor has no trigger, every UPDATE changed exactly one row, every capture_take took exactly
  its one ``dejima_bank`` change, after every round ``dejima.delta`` held exactly the one record of the capture
  operation, and every baseline update recorded exactly one deletion and one insertion (the new phone). Any failure
  aborts the run (exit status 2).
- The server keeps its durable settings (synchronous_commit, fsync); they are recorded in the output.

PostgreSQL: the server at ``DEJIMA_DATABASE_URL`` when it is set (database ``bench_capture`` is dropped at the end),
otherwise a server of our own (``peer.pgserver``, ``DEJIMA_PG``) in a temporary folder, stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from peer.bench.common import SEED, BenchError, log, machine, percentile, pg_server
from peer.bench.report import Chart, machine_md, md_table, verdict_md
from peer.dejima.delta import begin_sql, end_global, new_token, take_changes
from peer.dejima.install import install
from peer.pgserver import PgServerError

NAME = "capture"
HELP = "committed 1-row update of a view column: capture triggers vs no trigger vs the prototype's snapshot diff"
BENCH_DATABASE = "bench_capture"
PEER_TYPE = "bank"
TABLE = "bank_users"
FLOOR_TABLE = "bank_users_floor"
BASELINE_TABLE = "bank_users_snapdiff"
BASELINE_VIEW = "bench_snap_view"
BASELINE_SNAPSHOT = "bench_snap_snapshot"
BASELINE_DELTA = "bench_snap_delta"
VIEW = "dejima_bank"  # the dejima view that shows the updated column
VIEW_COLUMNS = ("first_name", "last_name", "phone", "address")
COLUMN = "phone"
CAPTURE_TRIGGER = "dejima_capture_upd"
TARGET_RATIO = 2.0
TARGET = "capture_ms <= 2 x floor_ms"
DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
DEFAULT_RUNS = 2_000
QUICK_RUNS = 200

CAPTURE, FLOOR, TAKE, BASELINE = "capture", "floor", "capture_take", "baseline"
SERIES = (CAPTURE, FLOOR, TAKE, BASELINE)
GXID_PREFIX = {CAPTURE: "bench-c-", FLOOR: "bench-f-", TAKE: "bench-t-", BASELINE: "bench-b-"}
TABLE_OF = {CAPTURE: TABLE, FLOOR: FLOOR_TABLE, TAKE: TABLE, BASELINE: BASELINE_TABLE}
PROTOTYPE_NOTES_MS = {"1000": 9.0, "10000": 46.9, "100000": 347.0, "1000000": 5178.0}  # docs/performance.md "Floors"


def _table(name: str) -> sql.Identifier:
    return sql.Identifier("public", name)


def _ms(ns: float) -> float:
    return round(ns / 1e6, 4)


@dataclass
class Samples:
    """Latencies in nanoseconds, per series."""

    by_series: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SERIES})

    def median_ms(self, series: str) -> float:
        return _ms(statistics.median(self.by_series[series]))

    def p90_ms(self, series: str) -> float:
        return _ms(percentile(self.by_series[series], 0.9))


# ------------------------------------------------------------------------------------------------ database setup

# The prototype's capture, as a baseline: static DDL (no value is formatted into it).
BASELINE_FUNCTION = sql.SQL(
    """
CREATE OR REPLACE FUNCTION public.bench_snapdiff() RETURNS trigger LANGUAGE plpgsql AS $bench$
BEGIN
    INSERT INTO {delta} (gxid, sign, row_data)
        SELECT dejima.current_gxid(), '+', to_jsonb(d)
        FROM (SELECT * FROM {view} EXCEPT SELECT * FROM {snapshot}) AS d;
    INSERT INTO {delta} (gxid, sign, row_data)
        SELECT dejima.current_gxid(), '-', to_jsonb(d)
        FROM (SELECT * FROM {snapshot} EXCEPT SELECT * FROM {view}) AS d;
    REFRESH MATERIALIZED VIEW {snapshot};
    RETURN NULL;
END
$bench$
"""
)


def _prepare_schema(conn: psycopg.Connection[Any]) -> None:
    """The floor and baseline tables, the baseline's view, snapshot and trigger, and the checks that capture is
    installed on the table and absent from the floor."""
    for copy in (FLOOR_TABLE, BASELINE_TABLE):
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)").format(_table(copy), _table(TABLE))
        )
    conn.execute(
        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {}").format(
            _table(BASELINE_VIEW), sql.SQL(", ").join(map(sql.Identifier, VIEW_COLUMNS)), _table(BASELINE_TABLE)
        )
    )
    conn.execute(
        sql.SQL("CREATE MATERIALIZED VIEW IF NOT EXISTS {} AS SELECT * FROM {}").format(
            _table(BASELINE_SNAPSHOT), _table(BASELINE_VIEW)
        )
    )
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (gxid text, sign text NOT NULL, row_data jsonb NOT NULL)").format(
            _table(BASELINE_DELTA)
        )
    )
    conn.execute(
        BASELINE_FUNCTION.format(
            delta=_table(BASELINE_DELTA), view=_table(BASELINE_VIEW), snapshot=_table(BASELINE_SNAPSHOT)
        )
    )
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS bench_snapdiff ON {}").format(_table(BASELINE_TABLE)))
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER bench_snapdiff AFTER INSERT OR UPDATE OR DELETE ON {}"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.bench_snapdiff()"
        ).format(_table(BASELINE_TABLE))
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
    """Load `size` rows into the three tables (same rows, same order), refresh the baseline's snapshot, vacuum,
    analyze, checkpoint. Returns seconds."""
    started = time.perf_counter()
    conn.execute(
        sql.SQL("TRUNCATE {}, {}, {}, {}, dejima.delta").format(
            _table(TABLE), _table(FLOOR_TABLE), _table(BASELINE_TABLE), _table(BASELINE_DELTA)
        ),
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
    with conn.transaction():  # no diff on the load itself: the snapshot is refreshed once below
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER bench_snapdiff").format(_table(BASELINE_TABLE)))
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM {} ORDER BY id").format(_table(BASELINE_TABLE), _table(TABLE))
        )
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER bench_snapdiff").format(_table(BASELINE_TABLE)))
    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(_table(BASELINE_SNAPSHOT)))
    for table in (TABLE, FLOOR_TABLE, BASELINE_TABLE, BASELINE_SNAPSHOT):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(table))).fetchone()
        if row is None or row[0] != size:
            raise BenchError(f"{table} holds {row[0] if row else None} rows, expected {size}")
    row = conn.execute("SELECT count(*) FROM dejima.delta").fetchone()
    if row is None or row[0] != 0:
        raise BenchError("loading without a gxid was captured: dejima.delta is not empty")
    conn.execute(
        sql.SQL("VACUUM ANALYZE {}, {}, {}, {}, dejima.delta").format(
            _table(TABLE), _table(FLOOR_TABLE), _table(BASELINE_TABLE), _table(BASELINE_SNAPSHOT)
        )
    )
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        log("no privilege for CHECKPOINT; measuring without one")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class Op:
    series: str
    row_id: int


def _rounds(size: int, count: int, baseline_every: int, rng: random.Random) -> Iterator[list[Op]]:
    """`count` rounds of capture(a), floor(a), capture_take(b), floor(b) (+ baseline(a) every `baseline_every`-th
    round), rotated by one position per round."""
    for r in range(count):
        a = rng.randint(1, size)
        b = rng.randint(1, size)
        ops = [Op(CAPTURE, a), Op(FLOOR, a), Op(TAKE, b), Op(FLOOR, b)]
        if r % baseline_every == 0:
            ops.insert(2, Op(BASELINE, a))
        shift = r % len(ops)
        yield ops[shift:] + ops[:shift]


CONSUME_SQL = "DELETE FROM dejima.delta RETURNING gxid, view_name, new_row ->> %s"


def _measure(
    conn: psycopg.Connection[Any], size: int, runs: int, warmup: int, baseline_runs: int, rng: random.Random
) -> Samples:
    updates = {
        series: sql.SQL("UPDATE {} SET {} = %s WHERE id = %s").format(_table(table), sql.Identifier(COLUMN))
        for series, table in TABLE_OF.items()
    }
    consume_baseline = sql.SQL("DELETE FROM {} RETURNING sign, row_data ->> %s").format(_table(BASELINE_DELTA))
    baseline_every = max(1, math.ceil(runs / max(1, baseline_runs)))
    samples = Samples()
    wrong: list[str] = []
    gc.collect()
    gc.disable()
    try:
        for r, ops in enumerate(_rounds(size, warmup + runs, baseline_every, rng)):
            captured: tuple[str, str, str] | None = None
            baseline_phone: str | None = None
            for k, op in enumerate(ops):
                gxid = f"{GXID_PREFIX[op.series]}{size}-{r}-{k}"
                phone = f"+9-{size}-{r}-{k}"
                update = updates[op.series]
                take = op.series == TAKE
                changes = None
                token = new_token()
                begin = sql.SQL("BEGIN; {}").format(begin_sql(gxid, token))
                # ---- timed: one committed transaction
                t0 = time.perf_counter_ns()
                conn.execute(begin)
                cur = conn.execute(update, (phone, op.row_id))
                if take:
                    changes = take_changes(conn, token)
                with conn.pipeline():
                    end_global(conn, token)
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
                if op.series == BASELINE:
                    baseline_phone = phone
                if r >= warmup:
                    samples.by_series[op.series].append(elapsed)
            # Untimed: consume what the capture operation recorded, as the peer service would, so dejima.delta
            # stays as small as in production; it must be exactly that one record (none from floor or take).
            left = [tuple(row) for row in conn.execute(CONSUME_SQL, (COLUMN,)).fetchall()]
            if left != [captured]:
                wrong.append(f"round {r}: dejima.delta held {left!r}, expected only the capture record {captured!r}")
            got = sorted(tuple(row) for row in conn.execute(consume_baseline, (COLUMN,)).fetchall())
            if baseline_phone is not None:
                if len(got) != 2 or ("+", baseline_phone) not in got or not any(s == "-" for s, _ in got):
                    wrong.append(f"round {r}: the baseline recorded {got!r}, expected -old and +{baseline_phone}")
            elif got:
                wrong.append(f"round {r}: the baseline recorded {got!r} without a baseline update")
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
    baseline = samples.median_ms(BASELINE)
    return {
        "capture_ms": capture,
        "floor_ms": floor,
        "ratio": round(capture / floor, 3),
        "capture_take_ms": take,
        "take_ratio": round(take / floor, 3),
        "baseline_ms": baseline,
        "baseline_ratio": round(baseline / floor, 3),
        "baseline_over_capture": round(baseline / capture, 1),
        "capture_overhead_ms": round(capture - floor, 4),
        "capture_p90_ms": samples.p90_ms(CAPTURE),
        "floor_p90_ms": samples.p90_ms(FLOOR),
        "capture_take_p90_ms": samples.p90_ms(TAKE),
        "baseline_p90_ms": samples.p90_ms(BASELINE),
        "capture_samples": len(samples.by_series[CAPTURE]),
        "floor_samples": len(samples.by_series[FLOOR]),
        "capture_take_samples": len(samples.by_series[TAKE]),
        "baseline_samples": len(samples.by_series[BASELINE]),
        "load_s": round(load_s, 2),
    }


def default_baseline_runs(size: int, runs: int) -> int:
    """Baseline samples at a size: all `runs` at 1k rows, ≈ runs x 1000 / size above (its cost grows with the
    table: ≈ 5 s per update at 1M rows), at least 5."""
    return max(5, min(runs, runs * 1_000 // size))


def run_capture(sizes: Sequence[int], runs: int, warmup: int, baseline_runs: int | None = None) -> dict[str, Any]:
    """Run the capture benchmark and return its report (the JSON document)."""
    started = time.perf_counter()
    rng = random.Random(SEED)  # noqa: S311 - row ids for a benchmark, not security
    rows: dict[str, dict[str, float | int]] = {}
    with pg_server() as server:
        described = machine(server)
        url = server.create_database(BENCH_DATABASE, replace=True)
        try:
            install(url, PEER_TYPE)
            with psycopg.connect(url, autocommit=True) as conn:
                _prepare_schema(conn)
                for size in sizes:
                    b_runs = baseline_runs or default_baseline_runs(size, runs)
                    log(f"{size} rows: loading")
                    load_s = _load(conn, size)
                    log(f"{size} rows: loaded in {load_s:.1f}s; {warmup} warm-up + {runs} measured rounds")
                    rows[str(size)] = _size_result(_measure(conn, size, runs, warmup, b_runs, rng), load_s)
        finally:
            with contextlib.suppress(PgServerError, psycopg.Error):  # never hide the real error
                server.drop_database(BENCH_DATABASE)
        server_kind = server.kind
    pg = described.get("postgres", {})
    return {
        "bench": NAME,
        "rows": rows,
        "target": TARGET,
        "meets_target": all(float(r["ratio"]) <= TARGET_RATIO for r in rows.values()),
        "postgres": pg.get("server_version", ""),
        "runs": runs,
        "warmup": warmup,
        "synchronous_commit": pg.get("synchronous_commit", ""),
        "fsync": pg.get("fsync", ""),
        "full_page_writes": pg.get("full_page_writes", ""),
        "shared_buffers": pg.get("shared_buffers", ""),
        "server": server_kind,
        "peer_type": PEER_TYPE,
        "updated": f"{TABLE}.{COLUMN} of one row by id (a column of view {VIEW})",
        "baseline": (
            "the 2019 prototype's capture, written in the bench: a statement trigger that diffs the view against a "
            "materialized snapshot with EXCEPT both ways, records the difference and refreshes the snapshot"
        ),
        "prototype_notes_ms": PROTOTYPE_NOTES_MS,
        "method": (
            "one autocommit connection; each sample = BEGIN; dejima.begin_global(gxid, token hash) | UPDATE 1 row | "
            "dejima.end_global(token); COMMIT (capture_take: + take_changes before the end); rounds of capture(a), "
            "floor(a), capture_take(b), "
            "floor(b) (+ baseline(a) every k-th round) rotated per round; the records consumed after each round, "
            "untimed; medians of perf_counter_ns"
        ),
        "machine": described,
        "cpus": described["cpus"],
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------ CLI and report


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated row counts, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive row counts, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peer.bench.runner import non_negative, positive

    parser.add_argument("--sizes", type=_sizes, help="comma-separated table sizes (default 1000,10000,100000,1000000)")
    parser.add_argument("--runs", type=positive, help=f"measured samples per series (default {DEFAULT_RUNS})")
    parser.add_argument("--warmup", type=non_negative, help="warm-up rounds per size (default runs/10, 20..200)")
    parser.add_argument(
        "--baseline-runs", type=positive, help="baseline samples per size (default runs x 1000 / size, at least 5)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes: tuple[int, ...] = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    runs: int = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    warmup: int = args.warmup if args.warmup is not None else max(20, min(200, runs // 10))
    return run_capture(sizes, runs, warmup, args.baseline_runs)


def markdown(report: dict[str, Any]) -> str:
    rows = [
        [
            int(size),
            r["capture_ms"],
            r["floor_ms"],
            r["ratio"],
            r["capture_take_ms"],
            r["baseline_ms"],
            r["baseline_samples"],
            PROTOTYPE_NOTES_MS.get(size),
        ]
        for size, r in report["rows"].items()
    ]
    table = md_table(
        [
            "rows",
            "capture ms",
            "floor ms",
            "ratio",
            "capture + take ms",
            "baseline (snapshot diff) ms",
            "baseline samples",
            "notes: snapshot diff ms",
        ],
        rows,
    )
    return "\n\n".join(
        [
            "# capture — committed 1-row update of a view column",
            machine_md(report["machine"]),
            f"Medians; {report['runs']} samples per series (+{report['warmup']} warm-up rounds); baseline fewer at "
            "large sizes. Last column: the snapshot diff measured before the project (docs/performance.md, Floors;"
            " synchronous_commit off).",
            table,
            verdict_md(report),
            f"Method: {report['method']}. Baseline: {report['baseline']}.",
        ]
    )


def charts(report: dict[str, Any]) -> list[Chart]:
    sizes = [int(s) for s in report["rows"]]
    rows = list(report["rows"].values())
    return [
        Chart(
            filename="capture.png",
            title="Committed 1-row update (median)",
            xlabel="rows in the table",
            ylabel="ms (log)",
            x=sizes,
            series={
                "capture": [r["capture_ms"] for r in rows],
                "capture + take": [r["capture_take_ms"] for r in rows],
                "no trigger (floor)": [r["floor_ms"] for r in rows],
                "prototype snapshot diff": [r["baseline_ms"] for r in rows],
            },
            logx=True,
            logy=True,
        ),
        Chart(
            filename="capture_ratio.png",
            title="Capture / floor",
            xlabel="rows in the table",
            ylabel="ratio",
            x=sizes,
            series={
                "capture / floor": [r["ratio"] for r in rows],
                "capture+take / floor": [r["take_ratio"] for r in rows],
            },
            logx=True,
            hlines={"target 2x": TARGET_RATIO},
        ),
    ]
