"""Install a peer type into a database: its roles, then one idempotent transaction (common SQL, generated SQL,
hand-written SQL, the privileges of each role).

The roles (docs/security.md):

- the **owner** (NOLOGIN, DEJIMA_DB_OWNER_ROLE, default `dejima_owner`) owns schema `dejima`, its tables and
  functions, the base tables, the dejima views and their triggers; the capture functions and the functions that
  read and end a global transaction's work run as it (SECURITY DEFINER, fixed search_path);
- the **peer** login (the user of DEJIMA_DATABASE_URL) is the peer service's own: it reads and writes the base
  tables, the views and the protocol's tables (known peers, groups, decisions, the gxids it finished, the log),
  NOINHERIT member of the owner, which it becomes (SET ROLE) only to repair the machinery at start
  (peer.dejima.machinery);
- the **client** login (the user of DEJIMA_CLIENT_DATABASE_URL) runs the statements of the organization's clients:
  it reads and writes the base tables and the dejima views, and may call the few functions a global transaction
  needs, each of which asks for the transaction's token that only the peer service knows. Nothing else: no table of
  schema `dejima`, no CREATE anywhere, no temporary tables, no role it could switch to.

`install(admin_url, peer_type, roles=Roles(...))` is what an administrator runs once per database (a superuser, or a
role that may create roles and is a member of the owner): it creates or corrects the roles, hands the peer type's
objects to the owner, then installs as the owner. `setup` is the part the owner itself can do (the peer's repair at
start uses it). Without `roles`, `install` only runs the SQL as whoever connects (the single-database tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from peer.dejima.manifest import PeerType, load_peer_types
from peer.dejima.sqlgen import GENERATED_NAME, generate

SQL_ROOT = Path(__file__).resolve().parents[2] / "sql_triggers"
COMMON_SQL = "common.sql"
INSTALL_LOCK = 0x64656A696D61  # "dejima": serialises concurrent installs into one database
DEFAULT_OWNER = "dejima_owner"
DEFAULT_PEER = "dejima_peer"
DEFAULT_CLIENT = "dejima_client"
# the functions of common.sql a global transaction's database transaction calls (each checks its token but
# current_gxid, which only tells): the peer's and the client's logins may execute them, nobody else
TRANSACTION_FUNCTIONS = ("current_gxid", "begin_global", "take_delta", "commit_point", "end_global")
# the protocol's tables the peer login reads and writes directly; dejima.delta and dejima.active are reached only
# through the functions above, dejima.installed is read only
PEER_TABLES = ("peers", "groups", "state", "decisions", "finished", "txlog", "txlog_pending", "api_tokens")
READ_WRITE = sql.SQL("SELECT, INSERT, UPDATE, DELETE")


class InstallError(Exception):
    """The peer type cannot be installed; nothing was changed."""


@dataclass(frozen=True)
class Roles:
    """The database roles of one peer (docs/security.md); passwords are set only when given."""

    owner: str = DEFAULT_OWNER
    peer: str = DEFAULT_PEER
    client: str = DEFAULT_CLIENT
    peer_password: str | None = None
    client_password: str | None = None

    def check(self) -> None:
        """Raises InstallError unless these are three different, valid role names."""
        names = [self.owner, self.peer, self.client]
        for name in names:
            if not name or len(name) > 63:
                raise InstallError(f"role name {name!r}: 1..63 characters")
        if len(set(names)) != 3:
            raise InstallError(f"the owner, peer and client roles must be three different roles, got {names}")


def install_scripts(ptype: PeerType, root: Path) -> list[tuple[str, str]]:
    """The SQL files to run, in order, as (name, text). The generated file must be fresh."""
    generated = ptype.path.parent / GENERATED_NAME
    expected = generate(ptype)
    if not generated.exists() or generated.read_text() != expected:
        raise InstallError(f"{generated} is missing or stale: run `python manage.py dejima_sql`")
    common = root / COMMON_SQL if (root / COMMON_SQL).exists() else SQL_ROOT / COMMON_SQL  # shared by every root
    scripts = [(str(common), common.read_text()), (str(generated), expected)]
    scripts += [(str(p), p.read_text()) for p in ptype.extra_sql]
    return scripts


def scripts_digest(scripts: Iterable[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(text for _, text in scripts).encode()).hexdigest()


def installed_digest(conn: psycopg.Connection[Any], peer_type: str) -> str | None:
    """The sha256 of the SQL last installed for `peer_type` here, or None (never installed)."""
    row = conn.execute("SELECT to_regclass('dejima.installed') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = conn.execute("SELECT sql_sha256 FROM dejima.installed WHERE peer_type = %s", (peer_type,)).fetchone()
    return str(found[0]) if found else None


def load_type(peer_type: str, root: Path) -> PeerType:
    types = load_peer_types(root)
    if peer_type not in types:
        raise InstallError(f"unknown peer type {peer_type!r}; known: {', '.join(sorted(types)) or '(none)'}")
    return types[peer_type]


def install(
    conninfo: str, peer_type: str, root: Path = SQL_ROOT, timeout: float = 30.0, roles: Roles | None = None
) -> str:
    """Install `peer_type` (a folder under root) into the database at conninfo. Returns the SQL's sha256.

    With `roles`, conninfo is an administrator's: the roles are created or corrected first, the objects handed to
    the owner, and everything installed as the owner, each role granted what it needs."""
    ptype = load_type(peer_type, root)
    scripts = install_scripts(ptype, root)
    digest = scripts_digest(scripts)
    with psycopg.connect(conninfo, connect_timeout=max(1, int(timeout)), autocommit=False) as conn:
        if roles is None and installed_digest(conn, peer_type) == digest:
            # Already installed, unchanged: touch nothing. DDL would wait for the locks of prepared transactions
            # a crashed peer left behind, and the peer must start to recover them.
            return digest
        conn.rollback()
        check_encoding(conn)
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(timeout * 1000)}ms")))
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
        if roles is not None:
            roles.check()
            bootstrap(conn, ptype, roles)
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(roles.owner)))
        setup(conn, ptype, scripts, digest, roles)
    return digest


def database_encoding(conn: psycopg.Connection[Any]) -> str:
    """The encoding of the connected database (psycopg answers bytes for text in a SQL_ASCII one)."""
    row = conn.execute("SELECT getdatabaseencoding()").fetchone()
    value = row[0] if row else ""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def check_encoding(conn: psycopg.Connection[Any]) -> None:
    """Raises InstallError unless the database is encoded in UTF8: every value a peer exchanges is JSON text, and a
    SQL_ASCII database (what a C-locale server creates by default) cannot say what its text means."""
    encoding = database_encoding(conn)
    if encoding != "UTF8":
        raise InstallError(
            f"database {conn.info.dbname} is encoded {encoding}; a peer needs UTF8"
            " (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)"
        )


def setup(
    conn: psycopg.Connection[Any],
    ptype: PeerType,
    scripts: list[tuple[str, str]],
    digest: str,
    roles: Roles | None,
    force: bool = False,
) -> None:
    """Run the SQL (when it is not installed as it is, or `force`) and grant each role its privileges, in the
    caller's transaction, as the owner (or, without roles, as whoever is connected)."""
    conn.execute("CREATE SCHEMA IF NOT EXISTS dejima")
    have: list[tuple[str]] = []
    if conn.execute("SELECT to_regclass('dejima.installed') IS NOT NULL").fetchone() == (True,):
        have = conn.execute("SELECT peer_type FROM dejima.installed WHERE peer_type <> %s", (ptype.name,)).fetchall()
    if have:
        raise InstallError(f"this database already holds peer type {have[0][0]!r}; one peer type per database")
    if force or installed_digest(conn, ptype.name) != digest:
        for name, text in scripts:
            try:
                conn.execute(text.encode())
            except psycopg.Error as exc:
                raise InstallError(f"{name}: {exc}") from exc
        conn.execute(
            "INSERT INTO dejima.installed (peer_type, sql_sha256) VALUES (%s, %s)"
            " ON CONFLICT (peer_type) DO UPDATE SET sql_sha256 = EXCLUDED.sql_sha256, installed_at = now()",
            (ptype.name, digest),
        )
    if roles is not None:
        grant(conn, ptype, roles)


def _exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def bootstrap(conn: psycopg.Connection[Any], ptype: PeerType, roles: Roles) -> None:
    """The administrator's part (caller's transaction): create or correct the three roles, let the peer become the
    owner, close the database to everyone else, and hand the peer type's objects that exist already (an install
    from before the roles, as the administrator) to the owner."""
    me = conn.execute("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
    if me is None or not (me[0] or me[1]):
        raise InstallError("installing with roles needs a superuser, or a role that may create roles")
    owner, peer, client = (sql.Identifier(r) for r in (roles.owner, roles.peer, roles.client))
    plain = sql.SQL("NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
    for name, login in ((roles.owner, "NOLOGIN"), (roles.peer, "LOGIN"), (roles.client, "LOGIN")):
        verb = "ALTER" if _exists(conn, name) else "CREATE"
        conn.execute(
            sql.SQL("{} ROLE {} {} {} NOINHERIT").format(sql.SQL(verb), sql.Identifier(name), sql.SQL(login), plain)
        )
    for role, password in ((peer, roles.peer_password), (client, roles.client_password)):
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(password)))
    # the client becomes no other role (it must not reach a privilege through a membership), the owner neither
    for member in (roles.client, roles.owner):
        granted = conn.execute(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            (member,),
        ).fetchall()
        for (role_name,) in granted:
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(role_name), sql.Identifier(member)))
    conn.execute(sql.SQL("GRANT {} TO {}").format(owner, peer))
    database = sql.Identifier(str(conn.info.dbname))
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(database, client))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(database, peer, client))
    conn.execute(sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(database, owner))
    conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(owner))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS dejima AUTHORIZATION {}").format(owner))
    conn.execute(sql.SQL("ALTER SCHEMA dejima OWNER TO {}").format(owner))
    _hand_over(conn, ptype, roles.owner)


def _hand_over(conn: psycopg.Connection[Any], ptype: PeerType, owner: str) -> None:
    """Make `owner` the owner of what schema dejima holds and of the peer type's tables, views and sequences."""
    names = [t.name for t in ptype.tables] + [v.name for v in ptype.views]
    relations = conn.execute(
        "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'v', 'p', 'm', 'f')"
        " AND (n.nspname = 'dejima' OR (n.nspname = 'public' AND c.relname = ANY(%s)))"
        " AND pg_get_userbyid(c.relowner) <> %s",
        (names, owner),
    ).fetchall()
    kinds = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}
    for schema, name, kind in relations:
        conn.execute(
            sql.SQL("ALTER {} {} OWNER TO {}").format(
                sql.SQL(kinds.get(kind, "TABLE")), sql.Identifier(schema, name), sql.Identifier(owner)
            )
        )
    functions = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'dejima' AND pg_get_userbyid(p.proowner) <> %s",
        (owner,),
    ).fetchall()
    for (signature,) in functions:  # regprocedure's text is already quoted and qualified where it must be
        conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(sql.SQL(signature), sql.Identifier(owner)))


def grant(conn: psycopg.Connection[Any], ptype: PeerType, roles: Roles) -> None:
    """Each role's privileges on the objects of the peer type and of schema dejima (as their owner; idempotent, and
    it takes no lock a prepared transaction holds: the peer's repair at start may run it at any time)."""
    peer, client = sql.Identifier(roles.peer), sql.Identifier(roles.client)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA dejima TO {}, {}").format(peer, client))
    for relation in [t.name for t in ptype.tables] + [v.name for v in ptype.views]:
        name = sql.Identifier("public", relation)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}, {}").format(name, peer, client))
        conn.execute(sql.SQL("GRANT {} ON {} TO {}, {}").format(READ_WRITE, name, peer, client))
    for table in ptype.tables:
        sequence = conn.execute(
            "SELECT pg_get_serial_sequence(%s, 'id')", (sql.Identifier("public", table.name).as_string(conn),)
        ).fetchone()
        if sequence and sequence[0]:
            conn.execute(
                sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}, {}").format(sql.SQL(sequence[0]), peer, client)
            )
    tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'dejima'").fetchall()]
    for table in tables:
        name = sql.Identifier("dejima", table)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}, {}").format(name, peer, client))
        if table in PEER_TABLES:
            conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(READ_WRITE, name, peer))
        elif table == "installed":
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(name, peer))
    for (signature,) in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'dejima'"
    ).fetchall():
        conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC, {}, {}").format(sql.SQL(signature), peer, client))
    for function in TRANSACTION_FUNCTIONS:
        signature = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'dejima' AND p.proname = %s",
            (function,),
        ).fetchone()
        if signature is None:
            raise InstallError(f"function dejima.{function} is missing: common.sql was not installed")
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}, {}").format(sql.SQL(signature[0]), peer, client))
