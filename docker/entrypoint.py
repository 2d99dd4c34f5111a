"""Entrypoint of the dejima-peer image (docker/Dockerfile).

With arguments it runs them (`docker run … dejima-peer:0.1.0 python manage.py dejima_sql --check`, or a gateway's
`python -m peer.relay …`). Without:

1. waits until every file named by a `DEJIMA_*_FILE` setting and by PGPASSFILE exists (secrets written by an init
   container on one host: docker/compose.yml, crane.yml);
2. peer mode: the install step. It waits until the database accepts the superuser of DEJIMA_ADMIN_DATABASE_URL
   (password: the file DEJIMA_ADMIN_PASSWORD_FILE, handed to the install process as PGPASSWORD, never on its
   command line), then runs `python manage.py dejima_install` with it: the roles (owner DEJIMA_DB_OWNER_ROLE, default
   `dejima_owner`; the peer's login, the user of DEJIMA_DATABASE_URL; the client login, the user of
   DEJIMA_CLIENT_DATABASE_URL; their passwords from DEJIMA_DB_PEER_PASSWORD_FILE / DEJIMA_DB_CLIENT_PASSWORD_FILE),
   the peer type's SQL and the grants (idempotent: unchanged SQL touches nothing). Then it checks that both logins
   work (their passwords come from PGPASSFILE);
3. removes the install step's four settings (ADMIN_SETTINGS) from the environment and runs gunicorn with
   peer/gunicorn_conf.py: the peer service, or the client app with PEER_MODE=client. The peer process never gets
   the superuser's URL or password through its settings (docs/deployment.md, "Database roles").

Each wait gives up after WAIT_SECONDS with a message naming what it waited for; the orchestrator restarts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

WAIT_SECONDS = 120.0
APP = Path(__file__).resolve().parents[1]
DEFAULT_OWNER_ROLE = "dejima_owner"
# The install step's settings: read here, removed from the environment before gunicorn starts.
ADMIN_SETTINGS = (
    "DEJIMA_ADMIN_DATABASE_URL",
    "DEJIMA_ADMIN_PASSWORD_FILE",
    "DEJIMA_DB_PEER_PASSWORD_FILE",
    "DEJIMA_DB_CLIENT_PASSWORD_FILE",
)


class EntrypointError(SystemExit):
    """A setting is missing or wrong, or a step failed: the message says which (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"dejima entrypoint: {message}")


def log(message: str) -> None:
    print(f"dejima entrypoint: {message}", file=sys.stderr, flush=True)


def files_to_wait_for(env: Mapping[str, str]) -> list[Path]:
    """The files the settings name (`DEJIMA_*_FILE`, PGPASSFILE), in a stable order."""
    names = sorted(k for k in env if (k.startswith("DEJIMA_") and k.endswith("_FILE")) or k == "PGPASSFILE")
    return [Path(env[k].strip()) for k in names if env[k].strip()]


def wait_for_files(paths: Sequence[Path], deadline: float) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        log(f"waiting for {', '.join(map(str, missing))}")
    while missing:
        if time.monotonic() > deadline:
            raise EntrypointError(f"still missing after {WAIT_SECONDS:.0f}s: {', '.join(map(str, missing))}")
        time.sleep(0.5)
        missing = [p for p in missing if not p.exists()]


def wait_for_database(url: str, deadline: float, password: str | None = None) -> None:
    """Until a connection to `url` succeeds (`password`, or libpq's own sources: PGPASSFILE, …)."""
    import psycopg

    last = ""
    while True:
        try:
            with psycopg.connect(url, connect_timeout=3, password=password) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            if str(exc) != last:
                last = str(exc)
                log(f"waiting for the database: {last.strip()}")
        if time.monotonic() > deadline:
            raise EntrypointError(f"the database did not answer in {WAIT_SECONDS:.0f}s: {last.strip()}")
        time.sleep(1.0)


def check_login(url: str, setting: str) -> None:
    """One connection as the login of `url` (its password from PGPASSFILE), or a message naming the setting."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise EntrypointError(
            f"{setting}: cannot log in as {urlsplit(url).username!r} after the install step: {str(exc).strip()} "
            "(is its password in PGPASSFILE the one of its password file?)"
        ) from None


def required(env: Mapping[str, str], setting: str) -> str:
    value = env.get(setting, "").strip()
    if not value:
        raise EntrypointError(f"{setting} is required in peer mode (docs/settings.md)")
    return value


def database_url(env: Mapping[str, str], setting: str) -> str:
    """A postgresql:// URL that names its user and carries no password (passwords come from files)."""
    url = required(env, setting)
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.username:
        raise EntrypointError(f"{setting}: give postgresql://USER@HOST:PORT/DB")
    if parts.password is not None:
        raise EntrypointError(f"{setting}: no password in the URL (a file gives it: docs/deployment.md)")
    return url


def read_secret(env: Mapping[str, str], setting: str) -> str:
    path = env[setting].strip()
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise EntrypointError(f"{setting}: {exc}") from None
    if not value:
        raise EntrypointError(f"{setting}: {path} is empty")
    return value


def install_command(env: Mapping[str, str]) -> list[str]:
    """`manage.py dejima_install` as the superuser of DEJIMA_ADMIN_DATABASE_URL: roles, SQL and grants. The role
    names come from the URLs the peer logs in with, so that install and peer agree by construction."""
    command = [
        sys.executable,
        str(APP / "manage.py"),
        "dejima_install",
        "--database",
        database_url(env, "DEJIMA_ADMIN_DATABASE_URL"),
        "--type",
        required(env, "PEER_TYPE"),
        "--owner-role",
        env.get("DEJIMA_DB_OWNER_ROLE", "").strip() or DEFAULT_OWNER_ROLE,
        "--peer-role",
        urlsplit(database_url(env, "DEJIMA_DATABASE_URL")).username or "",
        "--client-role",
        urlsplit(database_url(env, "DEJIMA_CLIENT_DATABASE_URL")).username or "",
    ]
    for option, setting in (
        ("--peer-password-file", "DEJIMA_DB_PEER_PASSWORD_FILE"),
        ("--client-password-file", "DEJIMA_DB_CLIENT_PASSWORD_FILE"),
    ):
        if env.get(setting, "").strip():
            command += [option, env[setting].strip()]
    return command


def install_env(env: Mapping[str, str]) -> dict[str, str]:
    """The install process's environment: the service's, and the superuser's password as PGPASSWORD (libpq takes
    it before PGPASSFILE) when DEJIMA_ADMIN_PASSWORD_FILE is given."""
    child = service_env(env)
    child.pop("PGPASSWORD", None)
    if env.get("DEJIMA_ADMIN_PASSWORD_FILE", "").strip():
        child["PGPASSWORD"] = read_secret(env, "DEJIMA_ADMIN_PASSWORD_FILE")
    return child


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment gunicorn gets: everything but the install step's settings."""
    return {k: v for k, v in env.items() if k not in ADMIN_SETTINGS}


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"]


def install(env: Mapping[str, str], deadline: float) -> None:
    """The install step of peer mode (2. in the module's docstring)."""
    command = install_command(env)  # every setting checked before anything waits
    child = install_env(env)
    wait_for_database(command[command.index("--database") + 1], deadline, child.get("PGPASSWORD"))
    if subprocess.run(command, cwd=APP, env=child, check=False).returncode != 0:
        raise EntrypointError("the install step (manage.py dejima_install) failed (see above)")
    for setting in ("DEJIMA_DATABASE_URL", "DEJIMA_CLIENT_DATABASE_URL"):
        check_login(env[setting].strip(), setting)


def main(argv: Sequence[str]) -> None:
    if argv:
        os.execvp(argv[0], list(argv))  # noqa: S606  (the command the operator gave)
    env = dict(os.environ)
    deadline = time.monotonic() + WAIT_SECONDS
    wait_for_files(files_to_wait_for(env), deadline)
    if env.get("PEER_MODE", "").strip() != "client":
        install(env, deadline)
    os.chdir(APP)
    command = gunicorn_command()
    os.execve(command[0], command, service_env(env))  # noqa: S606  (replaces this process: signals reach gunicorn)


if __name__ == "__main__":
    main(sys.argv[1:])
