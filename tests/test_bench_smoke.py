"""Smoke run of the capture benchmark: it runs and reports numbers of the right shape. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peer.pgserver import PgServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("capture_ms", "floor_ms", "ratio", "capture_take_ms", "capture_p90_ms", "floor_p90_ms")


def test_capture_bench_quick_json(pg_server: PgServer) -> None:
    env = {**os.environ, "DEJIMA_DATABASE_URL": pg_server.url("postgres")}
    result = subprocess.run(
        [sys.executable, "-m", "peer.bench", "capture", "--quick", "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["target"] == "capture_ms <= 2 x floor_ms"
    assert isinstance(report["meets_target"], bool)
    assert isinstance(report["postgres"], str)
    assert report["postgres"]
    assert isinstance(report["runs"], int)
    assert report["runs"] > 0
    assert report["synchronous_commit"]
    assert report["fsync"]
    assert set(report["rows"]) == {"1000", "10000"}
    for size, row in report["rows"].items():
        for name in ROW_FIELDS:
            value = row[name]
            assert isinstance(value, int | float), (size, name, value)
            assert value > 0, (size, name, value)
        assert row["capture_samples"] == report["runs"]
        assert row["capture_take_samples"] == report["runs"]
    assert report["meets_target"] == all(row["ratio"] <= 2 for row in report["rows"].values())
