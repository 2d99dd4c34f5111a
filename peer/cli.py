"""The `dejima` command: the user's handle on a local Dejima network.

Today: `up` (PostgreSQL + one installed database per example peer), `down`, `status`, `bench`.
The coordination layer adds the peer services, `exec`, `query` and `check`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psycopg

from peer.dejima.install import SQL_ROOT, InstallError, install
from peer.dejima.manifest import ManifestError, load_peer_types
from peer.pgserver import PgServer, PgServerError

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / ".dejima" / "pg"
EXAMPLE_PEERS = ("government", "bank", "insurance")


def _server() -> PgServer:
    return PgServer.from_env(STATE_DIR)


def _database_exists(server: PgServer, name: str) -> bool:
    return name in server.list_databases()


def cmd_up(args: argparse.Namespace) -> int:
    server = _server()
    server.start()
    types = load_peer_types(SQL_ROOT)
    print(f"PostgreSQL ({server.kind}) is running: {server.url('postgres')}")
    for peer in EXAMPLE_PEERS:
        url = server.url(peer) if _database_exists(server, peer) else server.create_database(peer)
        install(url, peer)
        views = ", ".join(v.name for v in types[peer].views)
        tables = ", ".join(t.name for t in types[peer].tables)
        print(f"  {peer:<11} {url}   tables: {tables}   dejima views: {views}")
    print()
    look = "'TABLE bank_users' -c 'TABLE dejima_bank'"
    write = "\"INSERT INTO dejima_bank VALUES ('Jane', 'Roe', '555-0199', '2 Elm St')\""
    print("Look at a peer's data, for example:")
    print("  psql", server.url("bank"), "-c", look)
    print("Write through a dejima view (putback; the capture triggers record it inside a global transaction):")
    print("  psql", server.url("government"), "-c", write)
    print("Stop everything with `dejima down` (or `make down`).")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    server = _server()
    server.stop()
    print("stopped" if server.kind != "external" else "external PostgreSQL left running (DEJIMA_DATABASE_URL)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    server = _server()
    running = server.is_running()
    peers: dict[str, object] = {}
    if running:
        for peer in EXAMPLE_PEERS:
            if not _database_exists(server, peer):
                peers[peer] = {"installed": False}
                continue
            with psycopg.connect(server.url(peer), connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT peer_type, installed_at::text FROM dejima.installed"
                    " WHERE to_regclass('dejima.installed') IS NOT NULL"
                ).fetchone()
            peers[peer] = {"installed": row is not None, "url": server.url(peer)}
    status = {"postgres": {"kind": server.kind, "running": running}, "peers": peers}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"PostgreSQL ({server.kind}): {'running' if running else 'stopped'}")
        for peer, info in peers.items():
            print(f"  {peer}: {info}")
    return 0 if running else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from peer import bench

    return bench.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dejima", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL and install the example peers' databases")
    up.add_argument("--detach", action="store_true", help="return once ready (the default today)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="PostgreSQL and peers")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    bench = sub.add_parser("bench", help="benchmarks (JSON output); see `dejima bench --help`", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (PgServerError, InstallError, ManifestError, psycopg.Error) as exc:
        print(f"dejima: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
