"""`python manage.py dejima_token …`: the API tokens of a peer (peer/dejima/tokens.py), in its database.

    dejima_token create NAME --scope read [--scope write] [--out FILE]   # prints the token once (or writes FILE, 0600)
    dejima_token list [--json]                                          # name, scopes, source, created, revoked
    dejima_token revoke NAME                                            # refused from within about a second

Every subcommand takes `--database URL` (default: DEJIMA_DATABASE_URL). A bad name or scope, an unknown token or a
name already taken is a clear error (exit status 1) and changes nothing.
"""

from __future__ import annotations

import json
import os
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError

from peer.dejima import tokens
from peer.dejima.tokens import TokenError


class Command(BaseCommand):
    requires_system_checks: list[str] = []  # works without a configured peer (PEER_TYPE, DEJIMA_*)
    help = "Create, list or revoke the API tokens of a peer (its client API needs one: Authorization: Bearer …)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        def database(p: ArgumentParser) -> None:
            p.add_argument(
                "--database", default=None, help="PostgreSQL URL of the peer's database ($DEJIMA_DATABASE_URL)"
            )

        create = sub.add_parser("create", help="a new token; printed once (never stored, only its sha256)")
        create.add_argument("name", help="1-64 of lower-case letters, digits, '.', '_', '-'")
        create.add_argument(
            "--scope",
            action="append",
            required=True,
            choices=tokens.SCOPES,
            help="read: queries and every GET; write: exec (repeat for both)",
        )
        create.add_argument("--out", type=Path, default=None, help="write the token to this new file (mode 0600)")
        database(create)
        listing = sub.add_parser("list", help="every token: name, scopes, source, created, revoked (no secret)")
        listing.add_argument("--json", action="store_true")
        database(listing)
        revoke = sub.add_parser("revoke", help="revoke a token (its requests are refused within about a second)")
        revoke.add_argument("name")
        database(revoke)

    def handle(self, *args: Any, **options: Any) -> None:
        url = options["database"] or os.environ.get("DEJIMA_DATABASE_URL", "").strip()
        if not url:
            raise CommandError("no database: pass --database URL or set DEJIMA_DATABASE_URL")
        action = options["action"]
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                if action == "create":
                    self.create(conn, options["name"], options["scope"], options["out"])
                elif action == "list":
                    self.list(conn, options["json"])
                else:
                    self.revoke(conn, options["name"])
        except TokenError as exc:
            raise CommandError(str(exc)) from None
        except psycopg.Error as exc:
            raise CommandError(f"the database: {str(exc).strip()}") from None

    def create(self, conn: psycopg.Connection[Any], name: str, scopes: list[str], out: Path | None) -> None:
        tokens.check_name(name)
        wanted = tokens.check_scopes(scopes)
        if out is None:
            token = tokens.create(conn, name, wanted)
            self.stdout.write(token)
            return
        # A new file (0600, never an existing one), the token written into it inside the transaction that makes it:
        # a failure of either leaves neither.
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise CommandError(f"cannot create {out}: {exc.strerror} (an existing file is never overwritten)") from None
        with os.fdopen(fd, "w") as fh:
            try:
                with conn.transaction():
                    token = tokens.create(conn, name, wanted)
                    fh.write(token + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            except BaseException:
                out.unlink(missing_ok=True)
                raise
        self.stdout.write(f"token {name} ({','.join(wanted)}) written to {out}")

    def list(self, conn: psycopg.Connection[Any], as_json: bool) -> None:
        found = tokens.list_tokens(conn)
        if as_json:
            self.stdout.write(json.dumps([t.to_json() for t in found], indent=2))
            return
        if not found:
            self.stdout.write("no tokens")
            return
        self.stdout.write(f"{'name':<24} {'scopes':<11} {'source':<8} {'created':<25} revoked")
        for t in found:
            created = t.created.isoformat(timespec="seconds")
            revoked = t.revoked.isoformat(timespec="seconds") if t.revoked else "-"
            self.stdout.write(f"{t.name:<24} {','.join(t.scopes):<11} {t.source:<8} {created:<25} {revoked}")

    def revoke(self, conn: psycopg.Connection[Any], name: str) -> None:
        if tokens.revoke(conn, name):
            self.stdout.write(f"token {name} revoked")
        else:
            self.stdout.write(f"token {name} was revoked already")
