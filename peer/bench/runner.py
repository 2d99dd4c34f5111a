"""The command line of the benchmarks: ``python -m peer.bench <name> [--quick] [--json] [--out DIR] …`` (also
``dejima bench <name> …``) and ``python -m peer.bench all [--quick]`` (every benchmark in turn; ``make bench``).

Each benchmark writes ``result.json``, ``report.md`` and PNG plots into ``bench-results/<name>/`` (or ``--out``),
prints its JSON with ``--json`` (else the Markdown report), and exits 0 after a sound measurement, 2 when the run
was broken (it could not measure what it claims: nothing committed, rows not changed, a peer that did not start).
A target not met is a figure, not a failure: exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import psycopg

from peer.bench.common import RESULTS_ROOT, BenchError, cpu_split, log, machine_cpu
from peer.dejima.install import InstallError
from peer.dejima.manifest import ManifestError
from peer.network import NetworkError
from peer.pgserver import PgServerError

ORDER = ("capture", "propagation", "throughput", "ycsb", "discovery", "fanout")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """`1,4,16` -> (1, 4, 16), each >= 1."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def peer_setting(text: str) -> tuple[str, str]:
    """`DEJIMA_BATCH_MAX=32` -> ("DEJIMA_BATCH_MAX", "32"): a setting of every peer of the run (docs/settings.md)."""
    name, eq, value = text.partition("=")
    if not eq or not name.startswith("DEJIMA_") or not name[7:].replace("_", "").isalnum() or not name.isupper():
        raise argparse.ArgumentTypeError(f"expected DEJIMA_NAME=value, got {text!r}")
    return name, value


def modules() -> dict[str, ModuleType]:
    from peer.bench import capture, discovery, fanout, propagation, throughput, ycsb

    return {m.NAME: m for m in (capture, propagation, throughput, ycsb, discovery, fanout)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peer.bench", description="Benchmarks of the Dejima peer.")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, module in modules().items():
        p = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or "").split("\n\n")[0])
        _common(p, f"bench-results/{name}")
        module.add_arguments(p)
    every = sub.add_parser("all", help="every benchmark in turn, each with its own defaults (make bench: --quick)")
    _common(every, "bench-results (one folder per benchmark)")
    every.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    return parser


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON (else the Markdown report)")
    p.add_argument("--quick", action="store_true", help="a short run (make bench): fewer sizes, samples, seconds")
    p.add_argument("--out", type=Path, help=f"results folder (default {out})")
    p.add_argument(
        "--plain",
        action="store_true",
        help="peers on plain HTTP (DEJIMA_ALLOW_PLAIN_HTTP=1) instead of TLS, the kit's default: for A/B runs",
    )


def run_one(module: ModuleType, args: argparse.Namespace, out_dir: Path, argv: Sequence[str]) -> dict[str, Any]:
    from peer.bench.report import write_outputs

    cpu_before = machine_cpu()
    report: dict[str, Any] = module.run(args)
    if isinstance(report.get("machine"), dict):
        report["machine"]["cpu_during_run_pct"] = cpu_split(cpu_before, machine_cpu())
    report.setdefault("bench", module.NAME)
    report["quick"] = bool(args.quick)
    report["command"] = " ".join(["python -m peer.bench", *argv])
    write_outputs(out_dir, report, module.markdown(report), module.charts(report))
    return report


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the peers and the server we started


BROKEN = (BenchError, InstallError, ManifestError, NetworkError, PgServerError, psycopg.Error)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.bench == "all":
            return _run_all(args)
        module = modules()[args.bench]
        try:
            report = run_one(module, args, args.out or RESULTS_ROOT / module.NAME, argv)
        except BROKEN as exc:
            print(f"bench {args.bench}: broken run: {exc}", file=sys.stderr)
            return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(report, indent=2) if args.json else module.markdown(report))
    return 0


def _run_all(args: argparse.Namespace) -> int:
    names = [n.strip() for n in (args.only or ",".join(ORDER)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        print(f"bench all: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    mods = modules()
    root = args.out or RESULTS_ROOT
    reports: dict[str, Any] = {}
    code = 0
    started = time.perf_counter()
    for name in names:
        sub_argv = [name, *(["--quick"] if args.quick else [])]
        sub = build_parser().parse_args(sub_argv)
        t0 = time.perf_counter()
        log(f"===== {name}{' (quick)' if args.quick else ''}")
        try:
            report = run_one(mods[name], sub, root / name, sub_argv)
        except BROKEN as exc:
            print(f"bench {name}: broken run: {exc}", file=sys.stderr)
            reports[name] = {"bench": name, "broken": str(exc)}
            code = 2
            continue
        reports[name] = report
        log(f"{name}: meets_target={report.get('meets_target')} in {time.perf_counter() - t0:.0f} s")
    summary = {
        name: {"meets_target": r.get("meets_target"), "target": r.get("target"), "broken": r.get("broken")}
        for name, r in reports.items()
    }
    total = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps({"summary": summary, "elapsed_s": total, "reports": reports}, indent=2))
    else:
        for name, s in summary.items():
            verdict = "BROKEN" if s["broken"] else {True: "met", False: "NOT met", None: "n/a"}[s["meets_target"]]
            print(f"{name:<12} {verdict:<8} {s['target']}")
        print(f"total {total} s; reports under {root}/<name>/report.md")
    return code
