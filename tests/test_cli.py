"""The `dejima` command as a person runs it: the console script pip installed (`[project.scripts] dejima =
"peer.cli:main"`, next to the virtualenv's python), run as a subprocess.

Cluster tier: `up` starts PostgreSQL and the example network (three peers, three clients), `status`, `exec`,
`query` and `check` talk to it, bad input gets a clear error and an exit code and changes nothing, `down` stops every
process `up` started (their pids, and PostgreSQL's). Every run keeps its state in a temporary folder
(`dejima --state-dir DIR`: PostgreSQL in DIR/pg, the network in DIR/network; the kit's CA in DEJIMA_KIT_CA_DIR) and
its peers on free ports (`up --free-ports`), so the checkout's `.dejima` and a running `make demo` are never touched;
`down` runs in a `finally`. The command always starts a PostgreSQL of its own here (DEJIMA_DATABASE_URL is not passed
on): `down` must stop it, and the example's databases must not land on a shared server.

Unit tier: `bench` and `chaos` parse their own options; `dejima` puts `--` after the command (`pass_through`) so that
argparse hands them every argument as given: the rewritten argv, and what each command then receives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql
from psycopg.rows import dict_row

from peer import bench, chaos, cli
from peer.pgserver import PgServer
from peer.testkit.proxy import process_tree

DEJIMA = Path(sys.executable).with_name("dejima")  # the console script of `pip install -e .`
REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS = ("government", "bank", "insurance")
CLIENTS = tuple(f"{p}-client" for p in PEERS)
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
GROUPS = {  # what every peer must report of its dejima groups (the shipped manifests)
    "government": {"dejima_bank": ["bank", "government"], "dejima_insurance": ["government", "insurance"]},
    "bank": {"dejima_bank": ["bank", "government"], "dejima_risk": ["bank", "insurance"]},
    "insurance": {"dejima_insurance": ["government", "insurance"], "dejima_risk": ["bank", "insurance"]},
}
UP_TIMEOUT = 180.0  # seconds: a deadline against hanging only (`up` takes a few seconds)


@dataclass
class Demo:
    """A network `dejima up` started: its state folder, the kit CA's folder, what `up` printed."""

    state: Path
    ca: Path
    up: subprocess.CompletedProcess[str]

    @property
    def network(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.state / "network" / "network.json").read_text())
        return loaded

    def spec(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(p for p in self.network["peers"] if p["name"] == name)
        return found

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.spec(name)['port']}"

    @property
    def server(self) -> PgServer:
        """The PostgreSQL `up` started (its port is kept in DIR/pg/state.json)."""
        return PgServer(state_dir=self.state / "pg")

    def rows(self, peer: str) -> list[dict[str, Any]]:
        """A peer's base table, read as the superuser straight from its database, by id."""
        query = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(TABLES[peer]))
        with psycopg.connect(self.server.url(peer), autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(query).fetchall()

    def everything(self) -> dict[str, list[dict[str, Any]]]:
        return {peer: self.rows(peer) for peer in PEERS}

    def pids(self) -> set[int]:
        """Every process of the network now: each peer's and client's gunicorn (arbiter and workers) and PostgreSQL
        (postmaster and its children)."""
        roots = [int(p["pid"]) for p in self.network["peers"] if p["pid"]]
        postmaster = self.state / "pg" / "data" / "postmaster.pid"
        roots.append(int(postmaster.read_text().split()[0]))
        return {pid for root in roots for pid in process_tree(root)}


def cli_env(ca: Path) -> dict[str, str]:
    """The environment of the command: a PostgreSQL of its own (module docstring), the CA in `ca`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEJIMA_DATABASE_URL", "DEJIMA_PG_PORT")}
    if env.get("DEJIMA_PG") == "external":
        del env["DEJIMA_PG"]
    env["DEJIMA_KIT_CA_DIR"] = str(ca)
    return env


def dejima(demo: Demo, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `dejima --state-dir <the demo's> ARGS…` as a person would; its exit code and output, never raising."""
    return run_dejima(demo.state, demo.ca, *args, timeout=timeout)


def run_dejima(state: Path, ca: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    assert DEJIMA.is_file(), f"{DEJIMA} is missing: the project is not installed in this virtualenv (make venv)"
    return subprocess.run(
        [str(DEJIMA), "--state-dir", str(state), *args],
        env=cli_env(ca),
        cwd=state.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    """The process runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def refuses(port: int) -> bool:
    """Nothing listens on this loopback port."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def checkout_state() -> dict[str, float]:
    """Every file under the checkout's `.dejima` with its modification time (empty when there is none)."""
    root = REPO_ROOT / ".dejima"
    return (
        {str(f.relative_to(root)): f.stat().st_mtime for f in root.rglob("*") if f.is_file()} if root.is_dir() else {}
    )


def start(state: Path, ca: Path) -> Demo:
    """`dejima up --free-ports` in state folder `state`; the caller runs `stop` in a finally."""
    done = run_dejima(state, ca, "up", "--free-ports", timeout=UP_TIMEOUT)
    demo = Demo(state, ca, done)
    assert done.returncode == 0, f"dejima up failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return demo


def stop(demo: Demo, pids: set[int]) -> None:
    """`dejima down`; then, should it have left any, the processes the network had (`pids`) are killed by pid."""
    try:
        run_dejima(demo.state, demo.ca, "down", timeout=UP_TIMEOUT)
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One network `dejima up` started for the module's tests (each uses people of its own); `down` at the end."""
    root = tmp_path_factory.mktemp("cli")
    state, ca = root / "state", root / "ca"
    pids: set[int] = set()
    try:
        made = start(state, ca)
        pids = made.pids()
        yield made
    finally:
        stop(Demo(state, ca, subprocess.CompletedProcess([], 0)), pids)


# the statements a person would type (each test writes people of its own)
INSERT_ANN = (
    "INSERT INTO government_users (first_name, last_name, phone, address)"
    " VALUES ('Ann', 'Execson', '555-0199', '2 Elm St')"
)
INSERT_PRI = (
    "INSERT INTO bank_users (first_name, last_name, iban, address, phone)"
    " VALUES ('Pri', 'Vateson', 'DE89', '1 Main St', '555-0100')"
)
INSERT_NUL = "INSERT INTO insurance_users (first_name, last_name, address) VALUES ('Nul', 'Lson', '3 Oak Ave')"
INSERT_TAM = (
    "INSERT INTO bank_users (first_name, last_name, iban, address, phone)"
    " VALUES ('Tam', 'Checkson', 'DE89', '1 Main St', '555-0100')"
)
INSERT_HALF_THEN_FAIL = (
    "INSERT INTO government_users (first_name, last_name) VALUES ('Half', 'Done'); INSERT INTO nosuch (x) VALUES (1)"
)


def people(demo: Demo, last: str) -> dict[str, list[dict[str, Any]]]:
    """Per peer, its rows of family `last` without their ids (ids come from each peer's own sequence)."""
    return {
        peer: [{k: v for k, v in r.items() if k != "id"} for r in rows if r["last_name"] == last]
        for peer, rows in demo.everything().items()
    }


# ---- up ----------------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_up_starts_every_peer_and_client_and_prints_where_they_are(demo: Demo) -> None:
    out = demo.up.stdout
    assert out.startswith("PostgreSQL ("), out
    assert f"postgresql://postgres@127.0.0.1:{demo.server.port}/postgres" in out
    specs = {p["name"]: p for p in demo.network["peers"]}
    assert sorted(specs) == sorted((*PEERS, *CLIENTS))
    for name, spec in specs.items():
        url = demo.url(name)
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert url in line, (name, line)
        assert spec["port"] not in (8001, 8002, 8003, 8101, 8102, 8103), "--free-ports used a fixed port"
        assert alive(spec["pid"]), f"{name} (pid {spec['pid']}) is not running"
        health = requests.get(url + "/health", verify=str(demo.ca / "ca.pem"), timeout=10)
        assert (health.status_code, health.json().get("status")) == (200, "ok"), (name, health.text)
    for peer in PEERS:
        token = demo.state / "network" / f"{peer}.token"
        assert f"API token in {token}" in out
        assert token.stat().st_mode & 0o777 == 0o600
    assert f"Logs: {demo.state / 'network'}/<peer>.log" in out


@pytest.mark.cluster
def test_up_again_keeps_the_running_network(demo: Demo) -> None:
    before = {p["name"]: (p["pid"], p["port"]) for p in demo.network["peers"]}
    again = dejima(demo, "up", "--free-ports", timeout=UP_TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert {p["name"]: (p["pid"], p["port"]) for p in demo.network["peers"]} == before


# ---- status ------------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_status_reports_every_peer_healthy_with_its_groups(demo: Demo) -> None:
    done = dejima(demo, "status", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert sorted(report) == sorted((*PEERS, *CLIENTS))
    assert {name: info["health"] for name, info in report.items()} == dict.fromkeys(report, "ok")
    assert {peer: report[peer]["groups"] for peer in PEERS} == GROUPS
    assert all(report[client]["groups"] is None for client in CLIENTS)  # a client's health says enough

    text = dejima(demo, "status")
    assert text.returncode == 0, text.stderr
    for peer in PEERS:
        assert any(line.split() == [peer, demo.url(peer), "ok"] for line in text.stdout.splitlines()), text.stdout
    assert any(line.split() == ["dejima_risk", "bank,", "insurance"] for line in text.stdout.splitlines())


@pytest.mark.cluster
def test_status_exits_non_zero_when_a_peer_is_down(tmp_path: Path, demo: Demo) -> None:
    # the module's network stays up: a copy of its network.json names one more peer, at a port nothing listens on
    network = tmp_path / "network"
    network.mkdir()
    data = demo.network
    ghost = {**data["peers"][0], "name": "ghost", "port": 1, "pid": 0}
    (network / "network.json").write_text(json.dumps({**data, "peers": [*data["peers"], ghost]}))
    for peer in PEERS:  # its tokens, so that the live peers answer
        (network / f"{peer}.token").write_text((demo.state / "network" / f"{peer}.token").read_text())
    (network / "ghost.token").write_text((demo.state / "network" / "government.token").read_text())
    done = dejima(demo, "--network", str(network), "status", "--json")
    assert done.returncode == 1, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["ghost"]["health"] == "unreachable"
    assert "is unreachable" in report["ghost"]["error"]
    assert all(report[peer]["health"] == "ok" for peer in PEERS)


# ---- exec and query ----------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_exec_commits_one_global_transaction_that_query_then_shows_at_every_member(demo: Demo) -> None:
    done = dejima(demo, "exec", "government", INSERT_ANN)
    assert done.returncode == 0, (done.stdout, done.stderr)
    words = done.stdout.split()
    assert words[0] == "committed" and words[1].startswith("government."), done.stdout
    assert done.stdout.rstrip().endswith("(reached bank, insurance)"), done.stdout

    bank = dejima(
        demo, "query", "bank", "SELECT first_name, phone, address FROM bank_users WHERE last_name = 'Execson'"
    )
    assert bank.returncode == 0, bank.stderr
    assert bank.stdout.splitlines() == ["first_name | phone | address", "Ann | 555-0199 | 2 Elm St"]
    insurance = dejima(
        demo, "query", "insurance", "SELECT * FROM insurance_users WHERE last_name = 'Execson'", "--json"
    )
    assert insurance.returncode == 0, insurance.stderr
    body = json.loads(insurance.stdout)
    got = [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]
    assert [(r["first_name"], r["address"], r.get("phone")) for r in got] == [
        ("Ann", "2 Elm St", None)  # insurance is not told the phone
    ]
    assert [r["insurance_number"] for r in got] == [None]
    # what the databases hold, read behind the peers' backs
    assert people(demo, "Execson")["government"] == [
        {"first_name": "Ann", "last_name": "Execson", "phone": "555-0199", "address": "2 Elm St", "birthdate": None}
    ]


@pytest.mark.cluster
def test_exec_of_a_write_that_changes_no_shared_view_reaches_no_other_peer(demo: Demo) -> None:
    assert dejima(demo, "exec", "bank", INSERT_PRI).returncode == 0
    dejima(demo, "query", "government", "SELECT 1")  # the participants finished (a client statement waits for them)
    done = dejima(demo, "exec", "bank", "UPDATE bank_users SET iban = 'DE00' WHERE last_name = 'Vateson'")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("(reached no other peer)"), done.stdout
    assert [r["iban"] for r in demo.rows("bank") if r["last_name"] == "Vateson"] == ["DE00"]


@pytest.mark.cluster
def test_query_prints_null_for_a_missing_value(demo: Demo) -> None:
    assert dejima(demo, "exec", "insurance", INSERT_NUL).returncode == 0
    done = dejima(
        demo, "query", "insurance", "SELECT first_name, risk_factor FROM insurance_users WHERE last_name = 'Lson'"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["first_name | risk_factor", "Nul | NULL"]


# ---- check -------------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_check_is_ok_on_the_network_and_names_a_view_tampered_with(demo: Demo) -> None:
    assert dejima(demo, "exec", "bank", INSERT_TAM).returncode == 0
    for peer in PEERS:  # each peer finished what it prepared
        assert dejima(demo, "query", peer, "SELECT 1").returncode == 0
    done = dejima(demo, "check")
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert lines[-1] == "ok"
    for view, members in (("dejima_bank", "government, bank"), ("dejima_risk", "bank, insurance")):
        assert any(line.split()[:3] == [view, "identical", "across"] and line.endswith(members) for line in lines)
    assert all(any(line.startswith(f"txlog {peer}") and " ok (" in line for line in lines) for peer in PEERS)

    # a write behind the peers' backs (no global transaction): bank's copy of dejima_bank differs from government's
    tamper = sql.SQL("UPDATE bank_users SET phone = %s WHERE last_name = 'Checkson'")
    with psycopg.connect(demo.server.url("bank"), autocommit=True) as conn:
        conn.execute(tamper, ("tampered",))
    try:
        bad = dejima(demo, "check")
        assert bad.returncode == 1, (bad.stdout, bad.stderr)
        assert any(line.split()[:2] == ["dejima_bank", "DIVERGENT"] for line in bad.stdout.splitlines()), bad.stdout
        assert bad.stdout.splitlines()[-1] == "NOT OK"
    finally:
        with psycopg.connect(demo.server.url("bank"), autocommit=True) as conn:
            conn.execute(tamper, ("555-0100",))
    assert dejima(demo, "check").returncode == 0


# ---- bad input: a clear error, an exit code, nothing changed ------------------------------------------------------
BAD_INPUT = [
    pytest.param(
        ["exec", "nobody", "SELECT 1"],
        2,
        "dejima: unknown peer 'nobody'; known peers: government, bank, insurance\n",
        id="unknown-peer",
    ),
    pytest.param(
        ["exec", "government", "INSERT INTO nosuch (x) VALUES (1)"],
        1,
        'aborted (400 bad_sql): government: relation "nosuch" does not exist',
        id="unknown-table",
    ),
    pytest.param(
        ["exec", "government", INSERT_HALF_THEN_FAIL],
        1,
        'aborted (400 bad_sql): government: relation "nosuch" does not exist',
        id="half-a-transaction",
    ),
    pytest.param(
        ["exec", "government", "COMMIT"],
        1,
        "aborted (400 bad_request): COMMIT is not allowed",
        id="transaction-control",
    ),
    pytest.param(
        ["query", "bank", "DELETE FROM bank_users"],
        1,
        "error (400): bank: cannot execute DELETE in a read-only transaction",
        id="write-in-a-query",
    ),
    pytest.param(
        ["exec", "government"], 2, "dejima exec: error: the following arguments are required: sql", id="missing-sql"
    ),
    pytest.param(
        ["frobnicate"], 2, "dejima: error: argument command: invalid choice: 'frobnicate'", id="unknown-command"
    ),
    pytest.param(
        ["exec", "https://127.0.0.1:1", "SELECT 1"],
        2,
        "dejima: https://127.0.0.1:1 is unreachable",
        id="unreachable-url",
    ),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT)
def test_bad_input_gets_a_clear_error_and_an_exit_code_and_changes_nothing(
    demo: Demo, args: list[str], code: int, message: str
) -> None:
    for peer in PEERS:
        dejima(demo, "query", peer, "SELECT 1")  # what earlier tests wrote has finished everywhere
    before, network = demo.everything(), demo.network
    done = dejima(demo, *args)
    assert (done.returncode, done.stdout) == (code, ""), (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert demo.everything() == before
    assert demo.network == network
    assert dejima(demo, "check").returncode == 0


# ---- down --------------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_down_stops_every_process_up_started_and_postgresql(tmp_path: Path) -> None:
    outside = checkout_state()
    state, ca = tmp_path / "state", tmp_path / "ca"
    pids: set[int] = set()
    demo = Demo(state, ca, subprocess.CompletedProcess([], 0))
    try:
        demo = start(state, ca)
        pids = demo.pids()
        specs = demo.network["peers"]
        ports = [port for p in specs for port in (p["port"], p["message_port"], p["api_port"]) if port]
        ports.append(demo.server.port or 0)
        assert len(pids) > len(specs) + 1, pids  # each gunicorn has a worker; PostgreSQL its background processes
        assert all(alive(pid) for pid in pids)
        assert not any(refuses(port) for port in ports)

        done = run_dejima(state, ca, "down", timeout=UP_TIMEOUT)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert done.stdout.strip() == "stopped peers and PostgreSQL"
        assert sorted(pid for pid in pids if alive(pid)) == []
        assert all(refuses(port) for port in ports)
        assert not (state / "network" / "network.json").exists()
        assert not (state / "pg" / "data" / "postmaster.pid").exists()
        assert not demo.server.is_running()

        # afterwards: status and check say there is nothing to talk to; down again is harmless
        for command in ("status", "check"):
            after = run_dejima(state, ca, command)
            assert after.returncode == 2, (command, after.stdout, after.stderr)
            assert f"dejima: no peers known in {state / 'network'}; run `dejima up`" in after.stderr
        again = run_dejima(state, ca, "down", timeout=UP_TIMEOUT)
        assert (again.returncode, again.stdout.strip()) == (0, "stopped peers and PostgreSQL"), again.stderr
    finally:
        stop(demo, pids)
    assert checkout_state() == outside, "the command changed the checkout's .dejima"


# ---- bench and chaos: their own arguments, as given -------------------------------------------------------------
PASS_THROUGH = [
    pytest.param(
        ["chaos", "--trials", "30", "--seed", "4", "--json"],
        ["chaos", "--", "--trials", "30", "--seed", "4", "--json"],
        id="chaos-options",
    ),
    pytest.param(["chaos"], ["chaos", "--"], id="chaos-alone"),
    pytest.param(["chaos", "--help"], ["chaos", "--", "--help"], id="chaos-help"),
    pytest.param(["chaos", "--", "--seconds", "600"], ["chaos", "--", "--seconds", "600"], id="chaos-dashes-given"),
    pytest.param(
        ["bench", "propagation", "--quick", "--json"],
        ["bench", "--", "propagation", "--quick", "--json"],
        id="bench-name-first",
    ),
    pytest.param(["bench", "--out", "x", "capture"], ["bench", "--", "--out", "x", "capture"], id="bench-option-first"),
    pytest.param(
        ["--state-dir", "/s", "chaos", "--trials", "3"],
        ["--state-dir", "/s", "chaos", "--", "--trials", "3"],
        id="after-a-global-option",
    ),
    pytest.param(
        ["--network=/n", "bench", "--quick"],
        ["--network=/n", "bench", "--", "--quick"],
        id="after-a-global-option-with-equals",
    ),
    pytest.param(
        ["--state-dir", "chaos", "bench", "--json"],
        ["--state-dir", "chaos", "bench", "--", "--json"],
        id="a-folder-named-chaos",
    ),
]


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "rewritten"), PASS_THROUGH)
def test_bench_and_chaos_get_a_double_dash_after_the_command(argv: list[str], rewritten: list[str]) -> None:
    assert cli.pass_through(cli.build_parser(), argv) == rewritten


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "rewritten"), PASS_THROUGH)
def test_bench_and_chaos_receive_their_arguments_as_given(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], rewritten: list[str]
) -> None:
    received: dict[str, list[str]] = {}

    def fake(command: str) -> Any:
        def main(args: list[str]) -> int:
            received[command] = list(args)
            return 7  # handed back as the exit code

        return main

    monkeypatch.setattr(bench, "main", fake("bench"))
    monkeypatch.setattr(chaos, "main", fake("chaos"))
    assert cli.main(argv) == 7
    at = rewritten.index("--")
    assert received == {rewritten[at - 1]: rewritten[at + 1 :]}


@pytest.mark.unit
@pytest.mark.parametrize(
    "argv",
    [["exec", "chaos", "SELECT 1"], ["query", "bench", "--json", "SELECT 1"], ["--network", "bench", "status"], []],
)
def test_other_commands_are_not_rewritten(argv: list[str]) -> None:
    assert cli.pass_through(cli.build_parser(), argv) == argv
