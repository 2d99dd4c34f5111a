"""Entrypoint of the dejima-peer image (docker/Dockerfile).

With arguments it runs them (`docker run … dejima-peer:0.1.0 python manage.py dejima_sql --check`). Without:

1. waits until every file named by a `DEJIMA_*_FILE` setting and by PGPASSFILE exists (secrets written by an init
   container on one host: docker/compose.yml, crane.yml);
2. peer mode: waits until its database (DEJIMA_DATABASE_URL) accepts connections, then installs the peer type's SQL
   (`python manage.py dejima_install`, idempotent: unchanged SQL touches nothing);
3. runs gunicorn with peer/gunicorn_conf.py: the peer service, or the client app with PEER_MODE=client.

Each wait gives up after WAIT_SECONDS with a message naming what it waited for; the orchestrator restarts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

WAIT_SECONDS = 120.0
APP = Path(__file__).resolve().parents[1]


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
            raise SystemExit(
                f"dejima entrypoint: still missing after {WAIT_SECONDS:.0f}s: {', '.join(map(str, missing))}"
            )
        time.sleep(0.5)
        missing = [p for p in missing if not p.exists()]


def wait_for_database(url: str, deadline: float) -> None:
    """Until a connection to `url` succeeds (the password may come from PGPASSFILE)."""
    import psycopg

    last = ""
    while True:
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            if str(exc) != last:
                last = str(exc)
                log(f"waiting for the database: {last.strip()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"dejima entrypoint: the database did not answer in {WAIT_SECONDS:.0f}s: {last.strip()}")
        time.sleep(1.0)


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"]


def install_command(env: Mapping[str, str]) -> list[str]:
    return [sys.executable, str(APP / "manage.py"), "dejima_install", "--database", env["DEJIMA_DATABASE_URL"].strip()]


def main(argv: Sequence[str]) -> None:
    if argv:
        os.execvp(argv[0], list(argv))  # noqa: S606  (the command the operator gave)
    env = os.environ
    deadline = time.monotonic() + WAIT_SECONDS
    wait_for_files(files_to_wait_for(env), deadline)
    if env.get("PEER_MODE", "").strip() != "client":
        url = env.get("DEJIMA_DATABASE_URL", "").strip()
        if not url:
            raise SystemExit("dejima entrypoint: DEJIMA_DATABASE_URL is required in peer mode (docs/settings.md)")
        wait_for_database(url, deadline)
        if subprocess.run(install_command(env), cwd=APP, check=False).returncode != 0:
            raise SystemExit("dejima entrypoint: installing the peer type's SQL failed (see above)")
    os.chdir(APP)
    command = gunicorn_command()
    os.execv(command[0], command)  # noqa: S606  (replaces this process: signals reach gunicorn)


if __name__ == "__main__":
    main(sys.argv[1:])
