"""`dejima chaos`: its history checker (unit tier) and a short run under every fault kind (cluster tier).

The short run is the one `make test` carries (docs/chaos.md): 30 trials, so every fault kind occurs at least twice,
its own PostgreSQL (so the database restart fault is in), a fixed seed so that a failure can be replayed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peer.chaos import ABSENT, FAULT_KINDS, FINDINGS, Op, possible_states

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = ("cx0", "k1")


def ins(address: str) -> Op:
    return Op("insert", KEY, address)


def upd(address: str) -> Op:
    return Op("update", KEY, address)


DELETE = Op("delete", KEY)


@pytest.mark.unit
def test_it_allows_only_the_state_of_acknowledged_writes_in_order() -> None:
    assert possible_states([(ins("a"), "committed"), (upd("b"), "committed")]) == {"b"}
    assert possible_states([(ins("a"), "committed"), (DELETE, "committed")]) == {ABSENT}


@pytest.mark.unit
def test_it_never_allows_the_effect_of_a_failed_write() -> None:
    ops = [(ins("a"), "committed"), (upd("b"), "failed")]
    assert possible_states(ops) == {"a"}
    assert "b" in possible_states(ops, phantom=True), "the phantom rule names the failed write's state"


@pytest.mark.unit
def test_it_lets_a_write_in_doubt_apply_or_not_also_after_later_writes() -> None:
    ops = [(ins("a"), "committed"), (upd("b"), "unknown"), (upd("c"), "committed")]
    # b in doubt: never applied (c), or applied in place then overwritten (c), or applied late, after c (b)
    assert possible_states(ops) == {"b", "c"}


@pytest.mark.unit
def test_it_reports_a_missing_acknowledged_write_as_lost() -> None:
    ops = [(ins("a"), "committed")]
    assert ABSENT not in possible_states(ops)
    assert ABSENT in possible_states(ops, lost=True)


@pytest.mark.cluster
def test_a_short_chaos_run_injects_every_fault_kind_and_finds_nothing(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "peer.chaos", "--trials", "30", "--seed", "4", "--json", "--history", str(history)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads(result.stdout)
    findings = {k: report[k] for k in FINDINGS}
    if result.returncode != 0 or any(findings.values()):  # the whole report: pytest would shorten an assertion's
        pytest.fail(f"findings {findings}\n{json.dumps(report['details'], indent=1)}\n{result.stderr[-4000:]}")
    assert report["trials"] == 30
    assert set(report["faults"]) == set(FAULT_KINDS)
    assert all(n >= 1 for n in report["faults"].values()), report["faults"]
    assert report["committed"] > 0 and report["aborted"] > 0, report
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(records) == report["committed"] + report["aborted"] + report["unknown"]
    assert sum(r["acknowledged"] for r in records) == report["committed"]
