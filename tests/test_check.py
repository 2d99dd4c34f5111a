"""Cluster tier: `dejima check` passes on a consistent network and fails on a deliberately diverged database."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from peer.network import LocalNetwork
from peer.testkit.proxy import settle

pytestmark = pytest.mark.cluster


def run_check(network: LocalNetwork) -> tuple[int, dict[str, object]]:
    # the peers by URL: the CLI finds each one's API token in the network's folder
    args = [sys.executable, "-m", "peer.cli", "--network", str(network.state_dir), "check", "--json"]
    for spec in network.specs.values():
        args += ["--peer", spec.url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, json.loads(done.stdout)


def test_it_passes_when_every_view_is_identical_and_nothing_is_prepared(network: LocalNetwork) -> None:
    status, body = network.exec(
        "bank", "INSERT INTO bank_users (first_name, last_name, address, phone) VALUES ('Ann', 'Lee', '1 Main', '5')"
    )
    assert status == 200, body
    code, report = run_check(network)
    assert (code, report["ok"], report["divergent_views"]) == (0, True, [])


def test_it_fails_on_a_database_tampered_with_directly(network: LocalNetwork) -> None:
    status, body = network.exec(
        "bank", "INSERT INTO bank_users (first_name, last_name, address, phone) VALUES ('Ann', 'Lee', '1 Main', '5')"
    )
    assert status == 200, body
    # The origin answers once it decided (DEJIMA_COMMIT_WAIT=decision): government may not have committed the row yet,
    # and an UPDATE behind its back would then find nothing to change.
    settle(network.specs["government"].url, network.auth_headers("government"))
    # A direct write without a gxid bypasses Dejima: nothing is captured or propagated.
    with psycopg.connect(network.server.url(network.specs["government"].database), autocommit=True) as conn:
        conn.execute("UPDATE government_users SET address = 'tampered' WHERE first_name = 'Ann'")
    code, report = run_check(network)
    assert code == 1
    assert report["divergent_views"] == ["dejima_bank", "dejima_insurance"]
    assert not report["ok"]


def test_it_fails_on_a_leftover_prepared_transaction(network: LocalNetwork) -> None:
    url = network.server.url(network.specs["insurance"].database)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO insurance_users (first_name, last_name) VALUES ('Left', 'Over')")
        conn.execute("PREPARE TRANSACTION 'manual-leftover'")
    try:
        code, report = run_check(network)
        assert code == 1
        assert report["prepared_transactions"] == ["manual-leftover"]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ROLLBACK PREPARED 'manual-leftover'")
