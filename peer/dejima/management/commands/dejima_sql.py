"""`python manage.py dejima_sql [--root DIR] [--check]`: generate each peer type's SQL from its manifest."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from peer.dejima.manifest import ManifestError
from peer.dejima.sqlgen import stale_files, write_all


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # works without a configured peer (PEER_TYPE, DEJIMA_*)
    help = "Generate sql_triggers/<type>/generated.sql from the manifests (--check: fail when stale)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--root", type=Path, default=None, help="folder of peer types (default: sql_triggers/)")
        parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")

    def handle(self, *args: Any, **options: Any) -> None:
        root: Path = options["root"] or settings.DEJIMA_SQL_ROOT
        try:
            if options["check"]:
                stale = stale_files(root)
                if stale:
                    names = ", ".join(str(p) for p in stale)
                    raise CommandError(f"generated SQL is stale: {names}; run `python manage.py dejima_sql`")
                self.stdout.write("generated SQL is up to date")
                return
            written = write_all(root)
        except ManifestError as exc:
            raise CommandError(str(exc)) from None
        for path in written:
            self.stdout.write(f"wrote {path}")
        if not written:
            self.stdout.write("generated SQL is up to date")
