"""Install a peer type into a database: one idempotent transaction (common SQL, generated SQL, hand-written SQL)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from peer.dejima.manifest import PeerType, load_peer_types
from peer.dejima.sqlgen import GENERATED_NAME, generate

SQL_ROOT = Path(__file__).resolve().parents[2] / "sql_triggers"
COMMON_SQL = "common.sql"
INSTALL_LOCK = 0x64656A696D61  # "dejima": serialises concurrent installs into one database


class InstallError(Exception):
    """The peer type cannot be installed; nothing was changed."""


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


def _installed_digest(conn: psycopg.Connection[Any], peer_type: str) -> str | None:
    row = conn.execute(
        "SELECT to_regclass('dejima.installed') IS NOT NULL",
    ).fetchone()
    if row is None or not row[0]:
        return None
    found = conn.execute("SELECT sql_sha256 FROM dejima.installed WHERE peer_type = %s", (peer_type,)).fetchone()
    conn.rollback()
    return str(found[0]) if found else None


def install(conninfo: str, peer_type: str, root: Path = SQL_ROOT, timeout: float = 30.0) -> str:
    """Install `peer_type` (a folder under root) into the database at conninfo. Returns the SQL's sha256."""
    types = load_peer_types(root)
    if peer_type not in types:
        raise InstallError(f"unknown peer type {peer_type!r}; known: {', '.join(sorted(types)) or '(none)'}")
    scripts = install_scripts(types[peer_type], root)
    digest = hashlib.sha256("".join(text for _, text in scripts).encode()).hexdigest()
    with psycopg.connect(conninfo, connect_timeout=max(1, int(timeout)), autocommit=False) as conn:
        if _installed_digest(conn, peer_type) == digest:
            # Already installed, unchanged: touch nothing. DDL would wait for the locks of prepared transactions
            # a crashed peer left behind, and the peer must start to recover them.
            return digest
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(timeout * 1000)}ms")))
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS dejima")
        have: list[tuple[str]] = []
        if conn.execute("SELECT to_regclass('dejima.installed') IS NOT NULL").fetchone() == (True,):
            have = conn.execute("SELECT peer_type FROM dejima.installed WHERE peer_type <> %s", (peer_type,)).fetchall()
        if have:
            raise InstallError(f"this database already holds peer type {have[0][0]!r}; one peer type per database")
        for name, text in scripts:
            try:
                conn.execute(text.encode())
            except psycopg.Error as exc:
                raise InstallError(f"{name}: {exc}") from exc
        conn.execute(
            "INSERT INTO dejima.installed (peer_type, sql_sha256) VALUES (%s, %s)"
            " ON CONFLICT (peer_type) DO UPDATE SET sql_sha256 = EXCLUDED.sql_sha256, installed_at = now()",
            (peer_type, digest),
        )
    return digest
