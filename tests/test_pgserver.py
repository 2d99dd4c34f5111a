"""peer.pgserver: the project's PostgreSQL kit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from peer.pgserver import PgServer, PgServerError

REPO_ROOT = Path(__file__).resolve().parent.parent
MakeDatabase = Callable[[str], str]
DEJIMA_ENV = ("DEJIMA_DATABASE_URL", "DEJIMA_PG", "DEJIMA_PG_BIN", "DEJIMA_PG_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in DEJIMA_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def own_server(tmp_path: Path, pg_server: PgServer) -> Iterator[PgServer]:
    """A second local server in its own folder, so tests may stop and break it; the session server is untouched."""
    if pg_server.kind == "external":
        server = PgServer(state_dir=tmp_path / "pg", kind="embedded")
    else:
        server = PgServer(state_dir=tmp_path / "pg", kind=pg_server.kind, bin_dir=pg_server.bin_dir)
    try:
        yield server
    finally:
        server.stop()


def _processes_of(data_dir: Path) -> set[int]:
    """Live (non-zombie) processes of the postmaster started on data_dir, and everything under it."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        parents[int(entry.name)] = int(fields[1])
        if str(data_dir).encode() in cmdline:
            roots.add(int(entry.name))
    found = set(roots)
    changed = True
    while changed:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        changed = bool(more)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_it_accepts_connections(pg_server: PgServer) -> None:
    assert pg_server.is_running()
    assert _scalar(pg_server.url(), "SELECT 1") == 1
    if pg_server.kind != "external":
        assert _scalar(pg_server.url(), "SHOW max_connections") == "200"
        assert _scalar(pg_server.url(), "SHOW listen_addresses") == "127.0.0.1"
        assert _scalar(pg_server.url(), "SHOW fsync") == "on"


@pytest.mark.integration
def test_it_starts_idempotently(pg_server: PgServer) -> None:
    url = pg_server.url()
    pg_server.start()
    assert pg_server.url() == url
    assert _scalar(url, "SELECT 1") == 1


@pytest.mark.integration
def test_it_runs_a_prepared_transaction_round_trip(pg_server: PgServer, make_database: MakeDatabase) -> None:
    url = make_database("t_tpc")
    assert int(str(_scalar(url, "SHOW max_prepared_transactions"))) > 0
    gid = f"test-{uuid.uuid4()}"  # gids are unique per cluster
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (42)")
        conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
    # The prepared transaction outlives its session; another session finishes it.
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
        prepared = conn.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchall()
        assert prepared == [(gid,)]
        conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
        assert conn.execute("SELECT v FROM t").fetchall() == [(42,)]
        assert conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone() == (0,)


@pytest.mark.integration
def test_it_creates_and_drops_a_database(pg_server: PgServer) -> None:
    name = f"t_create_{uuid.uuid4().hex[:12]}"
    try:
        url = pg_server.create_database(name)
        assert name in pg_server.list_databases()
        assert _scalar(url, "SELECT current_database()") == name
        assert pg_server.create_database(name) == url  # already there: kept
    finally:
        pg_server.drop_database(name)
    assert name not in pg_server.list_databases()
    pg_server.drop_database(name)  # missing: no error


@pytest.mark.integration
def test_it_replaces_a_database_when_asked(pg_server: PgServer, make_database: MakeDatabase) -> None:
    url = make_database("t_replace")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE old_stuff (v int)")
        name = conn.info.dbname
        # An open session does not block the replacement (DROP ... WITH (FORCE)).
        assert pg_server.create_database(name, replace=True) == url
    assert _scalar(url, "SELECT count(*) FROM pg_tables WHERE tablename = 'old_stuff'") == 0


@pytest.mark.integration
@pytest.mark.parametrize("name", ["Bank", "1bank", "bank-1", "bank;drop", 'a"b', "", "x" * 64, "bänk", "bank\n"])
def test_it_refuses_an_invalid_database_name_and_creates_nothing(pg_server: PgServer, name: str) -> None:
    before = pg_server.list_databases()
    with pytest.raises(PgServerError, match="invalid database name"):
        pg_server.create_database(name)
    with pytest.raises(PgServerError, match="invalid database name"):
        pg_server.drop_database(name)
    assert pg_server.list_databases() == before


@pytest.mark.integration
def test_it_refuses_to_drop_a_system_database(pg_server: PgServer) -> None:
    with pytest.raises(PgServerError, match="system database"):
        pg_server.drop_database("postgres")
    assert "postgres" in pg_server.list_databases()


@pytest.mark.integration
def test_it_stops_without_leaving_a_process_and_keeps_the_data_on_restart(own_server: PgServer) -> None:
    own_server.start()
    port = own_server.port
    url = own_server.create_database("kept")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('still here')")
    processes = _processes_of(own_server.data_dir)
    assert len(processes) > 1  # the postmaster and its helpers

    own_server.stop()

    assert not own_server.is_running()
    assert _processes_of(own_server.data_dir) == set()
    assert not any(_alive(pid) for pid in processes)
    own_server.stop()  # already stopped: nothing to do

    again = PgServer(state_dir=own_server.state_dir, kind=own_server.kind, bin_dir=own_server.bin_dir)
    again.start()
    assert again.port == port  # chosen once, kept in the state file
    assert _scalar(url, "SELECT v FROM t") == "still here"
    own_server.stop()  # any handle on the same folder stops it
    assert _processes_of(own_server.data_dir) == set()


@pytest.mark.integration
def test_it_reports_the_server_log_when_startup_fails(own_server: PgServer) -> None:
    own_server.start()
    own_server.stop()
    with (own_server.data_dir / "postgresql.auto.conf").open("a") as conf:
        conf.write("shared_buffers = 'plenty'\n")

    with pytest.raises(PgServerError, match="did not start") as failure:
        own_server.start(timeout=20)

    assert "plenty" in str(failure.value)  # the log tail names the bad setting
    assert not own_server.is_running()
    assert _processes_of(own_server.data_dir) == set()


@pytest.mark.integration
def test_it_refuses_to_start_on_a_port_another_program_holds(tmp_path: Path, pg_server: PgServer) -> None:
    kind, bin_dir = ("embedded", None) if pg_server.kind == "external" else (pg_server.kind, pg_server.bin_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = PgServer(state_dir=tmp_path / "pg", kind=kind, bin_dir=bin_dir, port=port)
        with pytest.raises(PgServerError, match=f"port {port} .* taken"):
            server.start()
    assert not server.is_running()


# --------------------------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_it_reads_its_kind_from_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert PgServer.from_env(tmp_path).kind == "embedded"
    clean_env.setenv("DEJIMA_PG", "system")
    clean_env.setenv("DEJIMA_PG_PORT", "6543")
    server = PgServer.from_env(tmp_path)
    assert (server.kind, server.port) == ("system", 6543)
    assert server.url("bank") == "postgresql://postgres@127.0.0.1:6543/bank"
    clean_env.setenv("DEJIMA_DATABASE_URL", "postgresql://u:secret@db.example:5433/main?sslmode=require")
    server = PgServer.from_env(tmp_path)
    assert server.kind == "external"
    assert server.url("bank") == "postgresql://u:secret@db.example:5433/bank?sslmode=require"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEJIMA_PG", "mysql"),
        ("DEJIMA_PG", "Embedded"),
        ("DEJIMA_PG_PORT", "abc"),
        ("DEJIMA_PG_PORT", "0"),
        ("DEJIMA_PG_PORT", "70000"),
        ("DEJIMA_PG_BIN", "/nonexistent/bin"),
        ("DEJIMA_DATABASE_URL", "mysql://db.example/main"),
    ],
)
def test_it_rejects_a_bad_environment_value_naming_the_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    if variable == "DEJIMA_PG_BIN":
        clean_env.setenv("DEJIMA_PG", "system")
    clean_env.setenv(variable, value)
    with pytest.raises(PgServerError, match=variable):
        PgServer.from_env(tmp_path)


@pytest.mark.unit
def test_it_rejects_a_bad_dejima_pg_value_naming_the_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("DEJIMA_PG", "docker")
    with pytest.raises(PgServerError, match="DEJIMA_PG must be 'embedded' or 'system', got 'docker'"):
        PgServer.from_env(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in DEJIMA_ENV}
    return subprocess.run(
        [sys.executable, "-m", "peer.pgserver", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.unit
def test_its_cli_reports_the_status_of_a_server_never_started(tmp_path: Path) -> None:
    result = _cli("status", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"kind": "embedded", "running": False, "port": None, "url": None}


@pytest.mark.unit
def test_its_cli_fails_with_a_one_line_message(tmp_path: Path) -> None:
    result = _cli("url", "--state-dir", str(tmp_path), "bank")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("pgserver: error: ")
    assert "never been started" in result.stderr
