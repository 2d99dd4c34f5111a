"""The machinery in the database and who may touch it: install's roles, the inspection, the repair at start, and the
settings a peer refuses to start with (peer/dejima/install.py, peer/dejima/machinery.py, peer/dejima/runtime.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import errors, sql

from peer.cli import check_network
from peer.dejima.install import SQL_ROOT, InstallError, Roles, install
from peer.dejima.machinery import expected, inspect, repair
from peer.dejima.manifest import load_peer_types
from peer.network import LocalNetwork, db_roles, example_specs
from peer.pgserver import PgServer
from tests.helpers import register, start_peer_process, taken, wait_until

BANK = load_peer_types(SQL_ROOT)["bank"]
EXPECTED = expected(BANK, SQL_ROOT)


@pytest.fixture
def bank_db(make_database: Callable[[str], str], pg_server: PgServer) -> tuple[str, Roles]:
    """A database with peer type bank installed with roles of its own: (the superuser's URL, the roles)."""
    url = make_database("bank")
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    roles = db_roles(str(name), "pw-" + uuid.uuid4().hex)
    install(url, "bank", SQL_ROOT, roles=roles)
    return url, roles


def login(url: str, user: str, password: str | None) -> psycopg.Connection[Any]:
    return psycopg.connect(psycopg.conninfo.make_conninfo(url, user=user, password=password), autocommit=True)


@pytest.mark.integration
def test_a_fresh_install_with_roles_passes_inspection_and_a_second_install_changes_nothing(
    bank_db: tuple[str, Roles],
) -> None:
    url, roles = bank_db
    with psycopg.connect(url, autocommit=True) as conn:
        assert inspect(conn, BANK, EXPECTED, roles).problems == []
        before = conn.execute("SELECT sql_sha256, installed_at FROM dejima.installed").fetchall()
    install(url, "bank", SQL_ROOT, roles=roles)
    with psycopg.connect(url, autocommit=True) as conn:
        assert inspect(conn, BANK, EXPECTED, roles).problems == []
        assert conn.execute("SELECT sql_sha256, installed_at FROM dejima.installed").fetchall() == before


@pytest.mark.integration
def test_the_client_login_changes_base_tables_and_nothing_else(bank_db: tuple[str, Roles]) -> None:
    url, roles = bank_db
    with login(url, roles.client, roles.client_password) as client:
        with client.transaction(force_rollback=True):
            client.execute("INSERT INTO bank_users (first_name, last_name) VALUES ('A', 'B')")
            client.execute("UPDATE dejima_risk SET risk_factor = 2 WHERE first_name = 'A'")
            assert client.execute("SELECT risk_factor FROM bank_users").fetchall() == [(2,)]
            client.execute("DELETE FROM dejima_bank")
        for statement in (
            "SELECT * FROM dejima.delta",
            "SELECT * FROM dejima.txlog",
            "SELECT * FROM dejima.active",
            "SELECT * FROM dejima.decisions",
            "SELECT dejima.own_gxid('\\x00'::bytea)",
            "TRUNCATE bank_users",
            "CREATE TEMP TABLE t (a int)",
            "CREATE TABLE public.t (a int)",
            "ALTER TABLE bank_users DISABLE TRIGGER dejima_capture_upd",
            f"SET ROLE {roles.peer}",
            f"SET ROLE {roles.owner}",
            "SET session_replication_role = replica",
            "COPY (SELECT 1) TO PROGRAM 'true'",
        ):
            with pytest.raises(errors.InsufficientPrivilege), client.transaction():
                client.execute(statement)
    with login(url, roles.peer, roles.peer_password) as peer:
        for statement in ("SELECT * FROM dejima.delta", "DROP TRIGGER dejima_capture_upd ON bank_users"):
            with pytest.raises(errors.InsufficientPrivilege), peer.transaction():
                peer.execute(statement)
        with peer.transaction(force_rollback=True):  # only as the owner, which it becomes to repair
            peer.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(roles.owner)))
            peer.execute("ALTER TABLE bank_users DISABLE TRIGGER dejima_capture_upd")


def damage(url: str, roles: Roles) -> None:
    """What an administrator (or an older version) could leave behind."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER dejima_capture_ins ON bank_users")
        conn.execute("ALTER TABLE bank_users DISABLE TRIGGER dejima_capture_del")
        conn.execute(
            "CREATE OR REPLACE FUNCTION dejima.capture_bank_users_upd() RETURNS trigger LANGUAGE plpgsql"
            " SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$ BEGIN RETURN NULL; END $f$"
        )
        conn.execute(sql.SQL("GRANT SELECT ON dejima.txlog TO {}").format(sql.Identifier(roles.client)))
        conn.execute("GRANT EXECUTE ON FUNCTION dejima.own_gxid(bytea) TO PUBLIC")
        conn.execute(sql.SQL("GRANT TRUNCATE ON bank_users TO {}").format(sql.Identifier(roles.client)))


@pytest.mark.integration
def test_the_inspection_names_each_damage_and_the_peer_login_repairs_it_as_the_owner(
    bank_db: tuple[str, Roles],
) -> None:
    url, roles = bank_db
    damage(url, roles)
    with psycopg.connect(url, autocommit=True) as conn:
        found = [p.what for p in inspect(conn, BANK, EXPECTED, roles).problems]
    for expected_problem in (
        "trigger dejima_capture_ins on public.bank_users is missing",
        "trigger dejima_capture_del on public.bank_users is disabled",
        "function dejima.capture_bank_users_upd is not what the manifest generates",
        f"{roles.client} has a privilege on dejima.txlog",
        "everyone may execute dejima.own_gxid(bytea)",
        f"{roles.client} may TRUNCATE on public.bank_users",
    ):
        assert expected_problem in found, found
    with login(url, roles.peer, roles.peer_password) as peer:
        report = inspect(peer, BANK, EXPECTED, roles)
        repair(peer, BANK, SQL_ROOT, report, roles)
        assert inspect(peer, BANK, EXPECTED, roles).problems == []
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction(force_rollback=True):  # capture works
        register(conn, "gx-repaired")
        conn.execute("INSERT INTO bank_users (first_name, last_name) VALUES ('A', 'B')")
        assert [c.view for c in taken(conn, "gx-repaired")] == ["dejima_bank", "dejima_risk"]


@pytest.mark.integration
def test_what_only_an_administrator_can_repair_is_named(bank_db: tuple[str, Roles]) -> None:
    url, roles = bank_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE bank_users OWNER TO postgres")
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(roles.client)))
        report = inspect(conn, BANK, EXPECTED, roles)
    with login(url, roles.peer, roles.peer_password) as peer, pytest.raises(InstallError) as info:
        repair(peer, BANK, SQL_ROOT, report, roles)
    assert "only an administrator" in str(info.value)
    assert "table public.bank_users is owned by postgres" in str(info.value)
    assert f"{roles.client} may create objects in schema public" in str(info.value)
    install(url, "bank", SQL_ROOT, roles=roles)  # the administrator's install puts it right
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(sql.Identifier(roles.client)))
        assert inspect(conn, BANK, EXPECTED, roles).problems == []


@pytest.mark.integration
def test_install_with_roles_refuses_an_administrator_that_cannot_create_roles(bank_db: tuple[str, Roles]) -> None:
    url, roles = bank_db
    with pytest.raises(InstallError, match="superuser, or a role that may create roles"):
        install(psycopg.conninfo.make_conninfo(url, user=roles.peer, password=roles.peer_password), "bank", roles=roles)
    with pytest.raises(InstallError, match="three different roles"):
        install(url, "bank", roles=Roles(owner="o", peer="same", client="same"))


# ---- the peer at start ------------------------------------------------------------------------------------------


@pytest.fixture
def one_peer(pg_server: PgServer, tmp_path: Path) -> Iterator[LocalNetwork]:
    """A one-peer network (bank), installed, not started."""
    spec = example_specs(base_port=0, prefix=f"m{uuid.uuid4().hex[:6]}_")[1]
    net = LocalNetwork(pg_server, tmp_path / "net", [spec])
    net.install(spec.name)
    try:
        yield net
    finally:
        net.stop_all()
        pg_server.drop_database(spec.database)


def start_env(net: LocalNetwork, **changes: str) -> dict[str, str]:
    return {**net.env_for(net.specs["bank"]), "DEJIMA_BIND": "127.0.0.1:0", **changes}


@pytest.mark.integration
def test_outside_debug_a_peer_refuses_to_log_in_as_a_superuser(one_peer: LocalNetwork) -> None:
    done = start_peer_process(start_env(one_peer, DEJIMA_DATABASE_URL=one_peer.admin_url("bank")))
    assert done.returncode != 0
    assert "DEJIMA_DATABASE_URL: logs in as postgres, a superuser" in done.stderr
    assert "DEJIMA_DEBUG=1" in done.stderr


@pytest.mark.integration
def test_outside_debug_a_peer_refuses_a_client_login_that_is_no_least_privilege_one(one_peer: LocalNetwork) -> None:
    spec = one_peer.specs["bank"]
    roles = db_roles(spec.database, one_peer.db_password())
    same = start_peer_process(
        start_env(one_peer, DEJIMA_CLIENT_DATABASE_URL=one_peer.env_for(spec)["DEJIMA_DATABASE_URL"])
    )
    assert same.returncode != 0
    assert f"DEJIMA_CLIENT_DATABASE_URL: logs in as {roles.peer}, the peer's own login" in same.stderr
    with psycopg.connect(one_peer.admin_url("bank"), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT pg_read_server_files TO {}").format(sql.Identifier(roles.client)))
    member = start_peer_process(start_env(one_peer))
    assert member.returncode != 0
    assert f"DEJIMA_CLIENT_DATABASE_URL: logs in as {roles.client}, a member of other roles" in member.stderr
    one_peer.install("bank")  # install takes the membership away again
    with psycopg.connect(one_peer.admin_url("bank"), autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s",
            (roles.client,),
        ).fetchone() == (0,)


@pytest.mark.integration
def test_in_debug_a_superuser_login_starts_with_a_warning(one_peer: LocalNetwork) -> None:
    spec = one_peer.specs["bank"]
    spec.env.update({"DEJIMA_DATABASE_URL": one_peer.admin_url("bank"), "DEJIMA_DEBUG": "1"})
    one_peer.start("bank")
    one_peer.wait_healthy("bank", timeout=30)
    assert "logs in as postgres, a superuser" in one_peer.tail("bank", 200)
    assert "started anyway: DEJIMA_DEBUG=1" in one_peer.tail("bank", 200)


@pytest.mark.cluster
def test_a_peer_repairs_its_machinery_at_start_and_dejima_check_reports_it_before(network: LocalNetwork) -> None:
    name = "bank"
    spec = network.specs[name]
    roles = db_roles(spec.database)
    damage(network.admin_url(name), roles)
    headers = network.auth_headers(name)
    machinery = requests.get(spec.url + "/api/v1/machinery", headers=headers, timeout=10).json()
    assert machinery["ok"] is False
    assert "trigger dejima_capture_ins on public.bank_users is missing" in machinery["problems"], machinery
    everyone = {n: network.auth_headers(n) for n in network.specs}
    report = check_network({n: s.url for n, s in network.specs.items()}, everyone)
    assert report["ok"] is False and report["damaged_machinery"] == ["bank"], report
    network.stop(name)
    network.start(name)
    network.wait_ready(timeout=60)
    log = network.tail(name, 400)
    assert "repaired the machinery in the database: trigger dejima_capture_ins on public.bank_users is missing" in log
    status, body = network.exec(
        name, "INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ('Re', 'Paired', '1', 'x')"
    )
    assert status == 200 and sorted(body["participants"]) == ["government", "insurance"], body
    wait_until(lambda: check_network({n: s.url for n, s in network.specs.items()}, everyone)["ok"], 20, "a clean check")
