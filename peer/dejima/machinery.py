"""Is the machinery in the database what the manifest generates? Checked at every start, repaired when it is not.

The machinery is what makes a write reach the partners: the capture triggers on the base tables, the putback
triggers on the dejima views, their functions, the functions of a global transaction (common.sql), and who may do
what with them (peer.dejima.install, docs/security.md). A client can no longer touch any of it (its login may change
base tables and nothing else), but the database's administrator can, and an install from an older version may have
left something behind. A version row would not tell: what counts is what the catalog holds.

`expected(ptype, root)` reads the objects out of the SQL that `install` runs (every function `$dejima$`-quoted, every
trigger one `CREATE OR REPLACE TRIGGER` line). `inspect(conn, …)` compares the catalog with it and with the
privileges each role must have and must not have, and returns the problems, each with the statements that fix it:
a function is replaced (no lock anything else holds), a missing, changed or disabled trigger is created again and
enabled (the table's lock: it waits for a transaction prepared there), privileges are granted again. `ensure` runs
at start: inspect, repair as the owner (the peer's login may `SET ROLE` to it), inspect again; what cannot be
repaired stops the peer with a message. `GET /api/v1/machinery` and `dejima check` report the same inspection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from peer.dejima.install import (
    PEER_TABLES,
    TRANSACTION_FUNCTIONS,
    InstallError,
    Roles,
    grant,
    install_scripts,
    installed_digest,
    scripts_digest,
    setup,
)
from peer.dejima.manifest import PeerType

_FUNCTION = re.compile(
    r"CREATE OR REPLACE FUNCTION (?P<name>\S+?)\((?P<args>[^)]*)\)(?P<head>.*?)AS \$dejima\$(?P<body>.*?)\$dejima\$;",
    re.DOTALL,
)
_TRIGGER = re.compile(
    r"CREATE OR REPLACE TRIGGER (?P<name>\S+) (?P<timing>AFTER|BEFORE|INSTEAD OF) (?P<event>INSERT|UPDATE|DELETE|"
    r"TRUNCATE) ON (?P<table>\S+)(?: REFERENCING(?: OLD TABLE AS (?P<old>\S+))?(?: NEW TABLE AS (?P<new>\S+))?)?"
    r" FOR EACH (?P<level>ROW|STATEMENT) EXECUTE FUNCTION (?P<function>\S+?)\(\);"
)
_SET = re.compile(r"\bSET (\w+) = ([^\n]+?)\s*(?:$|\bAS\b)", re.MULTILINE)
# pg_trigger.tgtype bits (PostgreSQL's catalog/pg_trigger.h)
TG_ROW, TG_BEFORE, TG_INSERT, TG_DELETE, TG_UPDATE, TG_TRUNCATE, TG_INSTEAD = 1, 2, 4, 8, 16, 32, 64
EVENTS = {"INSERT": TG_INSERT, "DELETE": TG_DELETE, "UPDATE": TG_UPDATE, "TRUNCATE": TG_TRUNCATE}
CLIENT_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
NEVER_FOR_CLIENT = ("TRUNCATE", "REFERENCES", "TRIGGER")


def _ours(statement: str) -> sql.SQL:
    """A statement of our own install scripts, run as it is (it was read out of them, never composed from input)."""
    return sql.SQL(statement)


def unquote(name: str) -> tuple[str, ...]:
    """`"public"."bank_users"` or `dejima.f` -> its parts."""
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', name)
    return tuple(quoted.replace('""', '"') if quoted else plain for quoted, plain in parts)


@dataclass(frozen=True)
class Function:
    schema: str
    name: str
    statement: str  # the CREATE OR REPLACE FUNCTION statement, as install runs it
    body: str  # what PostgreSQL keeps as prosrc
    definer: bool
    config: tuple[str, ...]  # what PostgreSQL keeps as proconfig: ("search_path=pg_catalog, pg_temp",)


@dataclass(frozen=True)
class Trigger:
    schema: str
    table: str
    name: str
    statement: str
    tgtype: int
    function: tuple[str, str]
    old_table: str | None
    new_table: str | None


@dataclass(frozen=True)
class Expected:
    functions: dict[tuple[str, str], Function]
    triggers: list[Trigger]
    tables: tuple[str, ...]  # base tables (schema public)
    views: tuple[str, ...]  # dejima views (schema public)
    digest: str  # of the SQL install runs


@dataclass(frozen=True)
class Problem:
    """One way the database differs from what it must be, and how it is repaired: `fix` (statements, as the owner),
    granting every privilege again (`grants`), running the whole install as the owner (`install`), or only by an
    administrator (`admin`: an object of someone else, a privilege on the database or schema public)."""

    what: str  # one line, for the log, the status and `dejima check`
    fix: tuple[sql.Composed | sql.SQL, ...] = ()
    grants: bool = False
    install: bool = False
    admin: bool = False


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.what for p in self.problems]}


def expected(ptype: PeerType, root: Path) -> Expected:
    """The objects the peer type's install scripts create."""
    scripts = install_scripts(ptype, root)
    functions: dict[tuple[str, str], Function] = {}
    triggers: list[Trigger] = []
    for _, text in scripts:
        for m in _FUNCTION.finditer(text):
            schema, name = unquote(m.group("name"))
            head = m.group("head")
            config = tuple(f"{k}={v.strip()}" for k, v in _SET.findall(head))
            functions[schema, name] = Function(
                schema, name, m.group(0), m.group("body"), "SECURITY DEFINER" in head, config
            )
        for m in _TRIGGER.finditer(text):
            schema, table = unquote(m.group("table"))
            tgtype = EVENTS[m.group("event")]
            tgtype |= TG_ROW if m.group("level") == "ROW" else 0
            tgtype |= {"BEFORE": TG_BEFORE, "INSTEAD OF": TG_INSTEAD}.get(m.group("timing"), 0)
            fschema, fname = unquote(m.group("function"))
            triggers.append(
                Trigger(
                    schema,
                    table,
                    unquote(m.group("name"))[0],
                    m.group(0),
                    tgtype,
                    (fschema, fname),
                    m.group("old"),
                    m.group("new"),
                )
            )
    return Expected(
        functions,
        triggers,
        tuple(t.name for t in ptype.tables),
        tuple(v.name for v in ptype.views),
        scripts_digest(scripts),
    )


def inspect(
    conn: psycopg.Connection[Any], ptype: PeerType, exp: Expected, roles: Roles, privileges: bool = True
) -> Report:
    """What differs from `exp` in the connected database, and (with `privileges`) who owns it and what each role
    may do that it must not, or may not do that it must. Reads the catalog only."""
    report = Report()
    problems = report.problems
    if installed_digest(conn, ptype.name) is None:
        problems.append(Problem(f"peer type {ptype.name} is not installed in this database", admin=True))
        return report
    if installed_digest(conn, ptype.name) != exp.digest:
        problems.append(
            Problem("the installed SQL is from another version of the manifest or of common.sql", install=True)
        )
    _inspect_functions(conn, exp, roles if privileges else None, problems)
    _inspect_triggers(conn, exp, problems)
    _inspect_relations(conn, exp, roles if privileges else None, problems)
    if privileges:
        _inspect_privileges(conn, exp, roles, problems)
    return report


def _inspect_functions(
    conn: psycopg.Connection[Any], exp: Expected, roles: Roles | None, problems: list[Problem]
) -> None:
    rows = conn.execute(
        "SELECT n.nspname, p.proname, p.prosrc, p.prosecdef, coalesce(p.proconfig, '{}'),"
        " pg_get_userbyid(p.proowner) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = ANY(%s)",
        (sorted({s for s, _ in exp.functions}),),
    ).fetchall()
    found = {(str(r[0]), str(r[1])): r for r in rows}
    for key, function in exp.functions.items():
        name = f"{function.schema}.{function.name}"
        fix = (_ours(function.statement),)
        row = found.get(key)
        if row is None:
            problems.append(Problem(f"function {name} is missing", fix))
        elif row[2] != function.body:
            problems.append(Problem(f"function {name} is not what the manifest generates", fix))
        elif bool(row[3]) != function.definer or tuple(row[4]) != function.config:
            problems.append(Problem(f"function {name} runs with other rights or settings than generated", fix))
        elif roles is not None and row[5] != roles.owner:
            problems.append(Problem(f"function {name} is owned by {row[5]}, not {roles.owner}", admin=True))


def _inspect_triggers(conn: psycopg.Connection[Any], exp: Expected, problems: list[Problem]) -> None:
    rows = conn.execute(
        "SELECT n.nspname, c.relname, t.tgname, t.tgtype, t.tgenabled::text, fn.nspname, f.proname,"
        " t.tgoldtable, t.tgnewtable"
        " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_proc f ON f.oid = t.tgfoid JOIN pg_namespace fn ON fn.oid = f.pronamespace"
        " WHERE NOT t.tgisinternal"
    ).fetchall()
    found = {(str(r[0]), str(r[1]), str(r[2])): r for r in rows}
    for trigger in exp.triggers:
        where = f"trigger {trigger.name} on {trigger.schema}.{trigger.table}"
        table = sql.Identifier(trigger.schema, trigger.table)
        recreate = _ours(trigger.statement)
        enable = sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(table, sql.Identifier(trigger.name))
        row = found.get((trigger.schema, trigger.table, trigger.name))
        if row is None:
            problems.append(Problem(f"{where} is missing", (recreate, enable)))
        elif (int(row[3]), (str(row[5]), str(row[6])), row[7], row[8]) != (
            trigger.tgtype,
            trigger.function,
            trigger.old_table,
            trigger.new_table,
        ):
            problems.append(Problem(f"{where} is not what the manifest generates", (recreate, enable)))
        elif row[4] != "O":
            problems.append(Problem(f"{where} is disabled", (enable,)))


def _inspect_relations(
    conn: psycopg.Connection[Any], exp: Expected, roles: Roles | None, problems: list[Problem]
) -> None:
    names = [*exp.tables, *exp.views]
    rows = conn.execute(
        "SELECT c.relname, c.relkind::text, pg_get_userbyid(c.relowner) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = ANY(%s)",
        (names,),
    ).fetchall()
    found = {str(r[0]): r for r in rows}
    for name in names:
        kind = "view" if name in exp.views else "table"
        row = found.get(name)
        if row is None or row[1] != ("v" if kind == "view" else "r"):
            problems.append(Problem(f"{kind} public.{name} is missing", install=True))
        elif roles is not None and row[2] != roles.owner:
            problems.append(Problem(f"{kind} public.{name} is owned by {row[2]}, not {roles.owner}", admin=True))
    if roles is None:
        return
    owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'dejima'").fetchone()
    if owner is None or owner[0] != roles.owner:
        problems.append(Problem(f"schema dejima is owned by {owner and owner[0]}, not {roles.owner}", admin=True))


def _inspect_privileges(conn: psycopg.Connection[Any], exp: Expected, roles: Roles, problems: list[Problem]) -> None:
    """What the client login must not do (anything but the base tables, the views and the transaction functions)
    and what both logins must be able to do."""
    client, peer = roles.client, roles.peer
    for name in [*exp.tables, *exp.views]:
        relation = f"public.{name}"
        for role in (client, peer):
            missing = [p for p in CLIENT_TABLE_PRIVILEGES if not _has(conn, "table", role, f'"public"."{name}"', p)]
            if missing:
                problems.append(Problem(f"{role} may not {', '.join(missing)} on {relation}", grants=True))
        extra = [p for p in NEVER_FOR_CLIENT if _has(conn, "table", client, f'"public"."{name}"', p)]
        if extra:
            problems.append(Problem(f"{client} may {', '.join(extra)} on {relation}", grants=True))
    for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'dejima'").fetchall():
        if _has(
            conn, "table", client, f'"dejima"."{table}"', "SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER"
        ):
            problems.append(Problem(f"{client} has a privilege on dejima.{table}", grants=True))
        if table in PEER_TABLES and not _has(conn, "table", peer, f'"dejima"."{table}"', "SELECT,INSERT,UPDATE,DELETE"):
            problems.append(Problem(f"{peer} may not read and write dejima.{table}", grants=True))
    rows = conn.execute(
        "SELECT p.proname, p.oid::regprocedure::text, has_function_privilege(%s, p.oid, 'EXECUTE'),"
        " has_function_privilege(%s, p.oid, 'EXECUTE'), has_function_privilege('public', p.oid, 'EXECUTE')"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dejima'",
        (client, peer),
    ).fetchall()
    for name, signature, by_client, by_peer, by_public in rows:
        if by_public:
            problems.append(Problem(f"everyone may execute {signature}", grants=True))
        elif name in TRANSACTION_FUNCTIONS and not (by_client and by_peer):
            problems.append(Problem(f"{client} or {peer} may not execute {signature}", grants=True))
        elif name not in TRANSACTION_FUNCTIONS and by_client:
            problems.append(Problem(f"{client} may execute {signature}", grants=True))
    for schema in ("public", "dejima"):
        if _has(conn, "schema", client, schema, "CREATE"):
            problems.append(Problem(f"{client} may create objects in schema {schema}", admin=True))
    if conn.execute(
        "SELECT has_database_privilege(%s, current_database(), 'CREATE,TEMPORARY')", (client,)
    ).fetchone() == (True,):
        problems.append(Problem(f"{client} may create schemas or temporary tables in this database", admin=True))


def _has(conn: psycopg.Connection[Any], kind: str, role: str, target: str, privilege: str) -> bool:
    query = {
        "table": "SELECT has_table_privilege(%s, %s, %s)",
        "schema": "SELECT has_schema_privilege(%s, %s, %s)",
    }[kind]
    row = conn.execute(query, (role, target, privilege)).fetchone()
    return bool(row and row[0])


def repair(conn: psycopg.Connection[Any], ptype: PeerType, root: Path, report: Report, roles: Roles | None) -> None:
    """Fix every problem of `report` as the owner (`roles` None: as whoever is connected), in one transaction of
    its own (the caller's connection must be idle and allowed to SET ROLE to the owner). Raises InstallError when
    it cannot."""
    admin = [p.what for p in report.problems if p.admin]
    if admin:
        raise InstallError(
            "only an administrator can repair this (run `python manage.py dejima_install` with a superuser's URL and"
            " the roles, docs/security.md): " + "; ".join(admin)
        )
    with conn.transaction():
        if roles is not None:
            try:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(roles.owner)))
            except psycopg.Error as exc:
                raise InstallError(f"cannot become the owner role {roles.owner} to repair: {exc}".strip()) from None
        if any(p.install for p in report.problems):
            scripts = install_scripts(ptype, root)
            setup(conn, ptype, scripts, scripts_digest(scripts), roles, force=True)
            return
        for problem in report.problems:
            for statement in problem.fix:
                conn.execute(statement)
        if roles is not None:
            grant(conn, ptype, roles)


def ensure(
    conn: psycopg.Connection[Any], ptype: PeerType, root: Path, roles: Roles, privileges: bool = True
) -> list[str]:
    """At start: inspect, repair what differs (as the owner), inspect again. Returns what was repaired; raises
    InstallError naming what is still wrong (the peer then refuses to start). Without `privileges` (a debug peer
    whose logins are not the least-privilege roles) only the functions and triggers are checked."""
    exp = expected(ptype, root)
    report = inspect(conn, ptype, exp, roles, privileges)
    if report.ok:
        return []
    repair(conn, ptype, root, report, roles if privileges else None)
    after = inspect(conn, ptype, exp, roles, privileges)
    if not after.ok:
        raise InstallError("the repair left: " + "; ".join(p.what for p in after.problems))
    return [p.what for p in report.problems]
