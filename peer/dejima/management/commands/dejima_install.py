"""`python manage.py dejima_install --database URL [--type T] [--peer-role P --client-role C [--owner-role O]]`:
install a peer type into a database (idempotent).

With the roles (what a deployment runs, as the database's superuser, before the peer starts): the three roles of
docs/security.md are created or corrected — the owner of the machinery, the peer's own login, the login a client's
statements run under — the database is closed to every other role, the objects are handed to the owner and the SQL is
installed as the owner. The logins' passwords are set from files when given. Without the roles: only the SQL, as
whoever connects (a database for tests or for a look; a peer refuses to start on it outside debug).
"""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from peer.dejima.install import DEFAULT_OWNER, InstallError, Roles, install
from peer.dejima.manifest import ManifestError


def _password(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{option}: cannot read {path}: {exc}") from None
    if not value:
        raise CommandError(f"{option}: {path} is empty")
    return value


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # works without a configured peer (PEER_TYPE, DEJIMA_*)
    help = "Install a peer type's tables, dejima views, triggers and database roles into a database (idempotent)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--database", required=True, help="PostgreSQL URL of the peer's database (a superuser's, with roles)"
        )
        parser.add_argument("--type", default=None, help="peer type (default: $PEER_TYPE)")
        parser.add_argument("--root", type=Path, default=None, help="folder of peer types (default: sql_triggers/)")
        parser.add_argument(
            "--owner-role", default=DEFAULT_OWNER, help=f"owner of the machinery (default {DEFAULT_OWNER})"
        )
        parser.add_argument("--peer-role", default=None, help="the peer's own login (the user of DEJIMA_DATABASE_URL)")
        parser.add_argument(
            "--client-role", default=None, help="the login of clients' statements (user of DEJIMA_CLIENT_DATABASE_URL)"
        )
        parser.add_argument("--peer-password-file", type=Path, default=None, help="the peer login's password")
        parser.add_argument("--client-password-file", type=Path, default=None, help="the client login's password")

    def handle(self, *args: Any, **options: Any) -> None:
        peer_type = options["type"] or settings.PEER_TYPE
        if not peer_type:
            raise CommandError("no peer type: pass --type or set PEER_TYPE")
        root: Path = options["root"] or settings.DEJIMA_SQL_ROOT
        peer_role, client_role = options["peer_role"], options["client_role"]
        if (peer_role is None) != (client_role is None):
            raise CommandError("give both --peer-role and --client-role (or neither)")
        roles = None
        if peer_role is not None:
            roles = Roles(
                owner=options["owner_role"],
                peer=peer_role,
                client=client_role,
                peer_password=_password(options["peer_password_file"], "--peer-password-file"),
                client_password=_password(options["client_password_file"], "--client-password-file"),
            )
        elif options["peer_password_file"] or options["client_password_file"]:
            raise CommandError("a password file needs --peer-role and --client-role")
        try:
            digest = install(options["database"], peer_type, root, roles=roles)
        except (InstallError, ManifestError) as exc:
            raise CommandError(str(exc)) from None
        except psycopg.Error as exc:
            raise CommandError(f"the database: {str(exc).strip()}") from None
        with_roles = f"; roles {roles.owner}, {roles.peer}, {roles.client}" if roles else ""
        self.stdout.write(f"installed peer type {peer_type} (sql {digest[:12]}){with_roles}")
