"""Report helpers: a results folder per benchmark with the JSON, a Markdown report and PNG plots (matplotlib, Agg).

`bench-results/<name>/` by default (gitignored), or `--out DIR`:
- `result.json`: the report the command prints with `--json`;
- `report.md`: the figures as Markdown tables, the target and the method;
- `*.png`: plots.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Chart:
    """One plot: a line chart over numeric x (`kind="line"`) or grouped bars over categories (`kind="bar"`)."""

    filename: str
    title: str
    xlabel: str
    ylabel: str
    x: Sequence[Any]
    series: Mapping[str, Sequence[float | None]]
    kind: str = "line"
    logx: bool = False
    logy: bool = False
    hlines: Mapping[str, float] = field(default_factory=dict)  # label -> y (targets, reference figures)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_md(machine: Mapping[str, Any]) -> str:
    pg = machine.get("postgres") or {}
    parts = [
        f"{machine.get('cpus')} cores ({machine.get('cpu_model')}), {machine.get('mem_total_gib')} GiB",
        f"{machine.get('kernel')}, Python {machine.get('python')}",
        f"load average at start {machine.get('loadavg_at_start')}",
    ]
    split = machine.get("cpu_during_run_pct")
    if isinstance(split, Mapping):
        parts.append(
            f"the machine's CPU during the run: {split.get('busy')} % busy, {split.get('idle')} % idle, "
            f"{split.get('stolen')} % stolen by the host"
        )
    if isinstance(pg, Mapping) and pg.get("server_version"):
        parts.append(
            f"PostgreSQL {pg.get('server_version')} ({machine.get('postgres_server')}): "
            + ", ".join(f"{k}={v}" for k, v in pg.items() if k != "server_version")
        )
    return "Machine: " + "; ".join(parts) + "."


def verdict_md(report: Mapping[str, Any]) -> str:
    met = report.get("meets_target")
    word = "n/a" if met is None else ("**met**" if met else "**NOT met**")
    return f"Target: {report.get('target')} — {word}."


def draw(chart: Chart, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        if chart.kind == "bar":
            names = list(chart.series)
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(chart.x))]
                ys = [float(v) if v is not None else 0.0 for v in chart.series[name]]
                ax.bar(xs, ys, width=width, label=name)
            ax.set_xticks(range(len(chart.x)), [str(x) for x in chart.x])
        else:
            for name, values in chart.series.items():
                pts = [(x, y) for x, y in zip(chart.x, values, strict=True) if y is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            if chart.logx:
                ax.set_xscale("log")
        if chart.logy:
            ax.set_yscale("log")
        for label, y in chart.hlines.items():
            ax.axhline(y, linestyle="--", linewidth=1, color="grey")
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, color="grey")
        ax.set_title(chart.title)
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_outputs(out_dir: Path, report: dict[str, Any], markdown: str, charts: Sequence[Chart]) -> dict[str, Any]:
    """Write result.json, report.md and the plots into out_dir; returns their paths (also put in the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "dir": str(out_dir),
        "json": str(out_dir / "result.json"),
        "markdown": str(out_dir / "report.md"),
        "plots": [str(out_dir / c.filename) for c in charts],
    }
    report["outputs"] = outputs
    for chart in charts:
        draw(chart, out_dir / chart.filename)
    images = "\n".join(f"![{c.title}]({c.filename})" for c in charts)
    (out_dir / "report.md").write_text(markdown.rstrip() + "\n\n" + images + "\n")
    (out_dir / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    return outputs
