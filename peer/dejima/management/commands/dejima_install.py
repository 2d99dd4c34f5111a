"""`python manage.py dejima_install --database URL [--type T]`: install a peer type into a database (idempotent)."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from peer.dejima.install import InstallError, install
from peer.dejima.manifest import ManifestError


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # works without a configured peer (PEER_TYPE, DEJIMA_*)
    help = "Install a peer type's tables, dejima views and triggers into a database (idempotent)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--database", required=True, help="PostgreSQL URL of the peer's database")
        parser.add_argument("--type", default=None, help="peer type (default: $PEER_TYPE)")
        parser.add_argument("--root", type=Path, default=None, help="folder of peer types (default: sql_triggers/)")

    def handle(self, *args: Any, **options: Any) -> None:
        peer_type = options["type"] or settings.PEER_TYPE
        if not peer_type:
            raise CommandError("no peer type: pass --type or set PEER_TYPE")
        root: Path = options["root"] or settings.DEJIMA_SQL_ROOT
        try:
            digest = install(options["database"], peer_type, root)
        except (InstallError, ManifestError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"installed peer type {peer_type} (sql {digest[:12]})")
