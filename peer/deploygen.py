"""Deployment files for a network of many peers: their secrets and a docker swarm stack (docs/deployment.md).

    python -m peer.deploygen secrets deploy/secrets --per-type 20     # keys and passwords of 60 peers (idempotent)
    python -m peer.deploygen stack --per-type 20 -o deploy/stack-20.yml
    python -m peer.deploygen secrets deploy/secrets --per-type 20 --rotate bank-3   # a new key pair for bank-3

Peers are named `<peer type>-<i>` (`bank-1` … `bank-20`). Every peer gets, in DIR/<peer>/: `private_key` (Ed25519,
PEM), `secret_key` (Django), `db_password` (its PostgreSQL user `dejima`), `pgpass` (the same password in libpq's
passfile format, for PGPASSFILE), `client_password` (the client app's user `admin`), `client_token` (the API token
the client sends its peer: DEJIMA_PEER_TOKEN_FILE) and `api_tokens` (its hash as the peer's tokens file, a line
`client-app read,write <sha256>`: DEJIMA_API_TOKENS_FILE); DIR/trusted_keys holds the
public key of every peer found in DIR (`name base64key` a line: DEJIMA_TRUSTED_KEYS_FILE). Files are created mode
0600 and never overwritten, except the rotated key and trusted_keys.

The stack runs, per peer, three services: `<peer>-db` (PostgreSQL with prepared transactions), `<peer>-peer` and
`<peer>-client`, pinned to the swarm nodes labelled `dejima.<peer>=true`, with a private overlay network per peer and
one overlay network `peers` for all peer services. Secret files are read by `docker stack deploy` on the manager;
their swarm names carry `--version`, so a rotation deploys new secrets (swarm secrets cannot change).
"""

from __future__ import annotations

import argparse
import secrets as random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.dejima.auth import parse_private_key, private_pem, public_b64
from peer.dejima.config import DEFAULT_SQL_ROOT, PEER_NAME_RE
from peer.dejima.tokens import new_token, token_sha256

EXAMPLE_TYPES = ("government", "bank", "insurance")
PEER_IMAGE = "dejima-peer:0.1.0"
# PostgreSQL 17.6 (Debian bookworm), pinned by digest; docker/compose.yml and crane.yml use the same image.
POSTGRES_IMAGE = "postgres:17.6-bookworm@sha256:f3bd19c606e442c3d7bdfa8002e03fe260a1023351e0ea4598032022b68dd6e3"
MAX_PREPARED_TRANSACTIONS = 100  # PostgreSQL's default is 0: two-phase commit needs it above the peer's pool size
DB_USER = "dejima"
DB_NAME = "dejima"
UID = "10001"  # the image's user `dejima` (docker/Dockerfile)
PORT = 8000  # every peer and client listens on it inside its container (DEJIMA_BIND in docker/Dockerfile)
MESSAGE_PORT = 9000  # a peer's lean listener for peer messages, inside its container (DEJIMA_MESSAGE_BIND there)
FIRST_CLIENT_PORT = 8101  # published ports of the clients: 8101, 8102, …
STATE_DIR = "/var/lib/dejima"  # the image's volume: the client's user store
TRUSTED_KEYS_PATH = "/etc/dejima/trusted_keys"
PEER_SECRETS = ("private_key", "secret_key", "db_password", "pgpass", "client_password", "client_token", "api_tokens")
CLIENT_TOKEN_NAME = "client-app"  # noqa: S105  (a name: the client's token at its peer, source `file`)
TRUSTED_KEYS = "trusted_keys"


class DeployError(Exception):
    """Bad arguments for the generator; the message says which."""


@dataclass(frozen=True)
class Peer:
    name: str  # the peer's name (DEJIMA_PEER_NAME), also the prefix of its services
    peer_type: str
    client_port: int  # where its client app is published on every swarm node


def peers_per_type(count: int, types: Sequence[str] = EXAMPLE_TYPES, sql_root: Path = DEFAULT_SQL_ROOT) -> list[Peer]:
    """`count` peers of each type, named `<type>-<i>`, clients published from FIRST_CLIENT_PORT on."""
    if not 1 <= count <= 999:
        raise DeployError(f"--per-type {count}: give 1..999 peers per type")
    for peer_type in types:
        if not (sql_root / peer_type / "manifest.toml").is_file():
            raise DeployError(f"unknown peer type {peer_type!r}: no {sql_root / peer_type / 'manifest.toml'}")
    names = [(f"{peer_type}-{i}", peer_type) for peer_type in types for i in range(1, count + 1)]
    for name, _ in names:
        if not PEER_NAME_RE.match(name):
            raise DeployError(f"{name!r} is not a peer name (lower-case letters, digits, - and _; at most 40)")
    return [Peer(name, peer_type, FIRST_CLIENT_PORT + i) for i, (name, peer_type) in enumerate(names)]


# ---- secrets ----------------------------------------------------------------------------------------------------
def _write_new(path: Path, text: str) -> bool:
    """Create `path` (mode 0600) with `text`; False when it exists already (never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with path.open("x") as fh:
            path.chmod(0o600)
            fh.write(text)
    except FileExistsError:
        return False
    return True


def write_secrets(directory: Path, names: Sequence[str], rotate: Sequence[str] = ()) -> list[Path]:
    """Create the missing secret files of each peer in `names` (and a new private key for each in `rotate`), then
    rewrite DIR/trusted_keys from every private key in DIR. Returns the files written."""
    for name in [*names, *rotate]:
        if not PEER_NAME_RE.match(name):
            raise DeployError(f"{name!r} is not a peer name (lower-case letters, digits, - and _; at most 40)")
    written: list[Path] = []
    for name in rotate:
        key_path = directory / name / "private_key"
        if not key_path.exists():
            raise DeployError(f"--rotate {name}: {key_path} does not exist")
        replacement = key_path.with_name("private_key.new")
        replacement.unlink(missing_ok=True)
        _write_new(replacement, private_pem(Ed25519PrivateKey.generate()).decode())
        replacement.replace(key_path)
        written.append(key_path)
    for name in names:
        password = random.token_urlsafe(24)
        values = {
            "private_key": private_pem(Ed25519PrivateKey.generate()).decode(),
            "secret_key": random.token_urlsafe(50),
            "client_password": random.token_urlsafe(18),
        }
        for kind, text in values.items():
            if _write_new(directory / name / kind, text + ("" if text.endswith("\n") else "\n")):
                written.append(directory / name / kind)
        # The database password twice: plain for the postgres image, as a passfile line for the peer (libpq).
        if _write_new(directory / name / "db_password", password + "\n"):
            written.append(directory / name / "db_password")
            (directory / name / "pgpass").unlink(missing_ok=True)
        plain = (directory / name / "db_password").read_text().strip()
        if _write_new(directory / name / "pgpass", f"*:*:*:{DB_USER}:{plain}\n"):
            written.append(directory / name / "pgpass")
        # The client's API token twice too: the token for the client, its hash in the peer's tokens file.
        if _write_new(directory / name / "client_token", new_token() + "\n"):
            written.append(directory / name / "client_token")
            (directory / name / "api_tokens").unlink(missing_ok=True)
        token = (directory / name / "client_token").read_text().strip()
        line = f"{CLIENT_TOKEN_NAME} read,write {token_sha256(token)}\n"
        if _write_new(directory / name / "api_tokens", "# name scopes sha256 (DEJIMA_API_TOKENS_FILE)\n" + line):
            written.append(directory / name / "api_tokens")
    keys = sorted(
        (path.parent.name, public_b64(parse_private_key(path.read_bytes()))) for path in directory.glob("*/private_key")
    )
    trusted = directory / TRUSTED_KEYS
    lines = "".join(f"{name} {key}\n" for name, key in keys)
    if not trusted.exists() or trusted.read_text() != "# name public-key (DEJIMA_TRUSTED_KEYS_FILE)\n" + lines:
        trusted.unlink(missing_ok=True)
        _write_new(trusted, "# name public-key (DEJIMA_TRUSTED_KEYS_FILE)\n" + lines)
        trusted.chmod(0o644)  # public keys: readable by the peers of a one-host network, whatever their user
        written.append(trusted)
    return written


# ---- the swarm stack --------------------------------------------------------------------------------------------
def _secret(source: str, target: str, uid: str = UID) -> dict[str, Any]:
    return {"source": source, "target": target, "uid": uid, "gid": uid, "mode": 0o400}


def _placement(peer: Peer) -> dict[str, Any]:
    return {"constraints": [f"node.labels.dejima.{peer.name} == true"]}


def _restart() -> dict[str, Any]:
    return {"condition": "any", "delay": "5s", "window": "60s"}


def stack(
    peers: Sequence[Peer], image: str = PEER_IMAGE, version: int = 1, secrets_dir: str = "./secrets"
) -> dict[str, Any]:
    """The docker swarm stack of `peers` (a compose file, version 3.8). `secrets_dir` is where the files of
    `write_secrets` are, relative to the stack file."""
    if not peers:
        raise DeployError("no peers")
    if version < 1:
        raise DeployError(f"--version {version}: give 1 or more")
    firsts: dict[str, Peer] = {}
    for peer in peers:
        firsts.setdefault(peer.peer_type, peer)
    services: dict[str, Any] = {}
    networks: dict[str, Any] = {"peers": {"driver": "overlay", "driver_opts": {"encrypted": "true"}}}
    volumes: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    healthcheck = {"interval": "10s", "timeout": "5s", "retries": 3, "start_period": "60s"}
    for peer in peers:
        private = f"org-{peer.name}"
        networks[private] = {"driver": "overlay", "driver_opts": {"encrypted": "true"}}
        for kind in PEER_SECRETS:
            secrets[f"{peer.name}-{kind}"] = {
                "file": f"{secrets_dir}/{peer.name}/{kind}",
                "name": f"dejima-v{version}-{peer.name}-{kind}",
            }
        seeds = [f"http://{first.name}-peer:{MESSAGE_PORT}" for first in firsts.values() if first != peer]
        common = {"PEER_TYPE": peer.peer_type, "DEJIMA_PEER_NAME": peer.name}
        services[f"{peer.name}-db"] = {
            "image": POSTGRES_IMAGE,
            "command": ["postgres", "-c", f"max_prepared_transactions={MAX_PREPARED_TRANSACTIONS}"],
            "environment": {
                "POSTGRES_USER": DB_USER,
                "POSTGRES_DB": DB_NAME,
                "POSTGRES_PASSWORD_FILE": "/run/secrets/db_password",
            },
            "secrets": [_secret(f"{peer.name}-db_password", "db_password", uid="0")],
            "volumes": [f"{peer.name}-pgdata:/var/lib/postgresql/data"],
            "networks": [private],
            "healthcheck": {"test": ["CMD", "pg_isready", "-U", DB_USER, "-d", DB_NAME], **healthcheck},
            "deploy": {"placement": _placement(peer), "restart_policy": _restart()},
            "stop_grace_period": "60s",
        }
        services[f"{peer.name}-peer"] = {
            "image": image,
            "environment": {
                **common,
                "DEJIMA_URL": f"http://{peer.name}-peer:{MESSAGE_PORT}",
                "DEJIMA_DATABASE_URL": f"postgresql://{DB_USER}@{peer.name}-db:5432/{DB_NAME}",
                "DEJIMA_SEEDS": ",".join(seeds),
                "DEJIMA_PRIVATE_KEY_FILE": "/run/secrets/private_key",
                "DEJIMA_TRUSTED_KEYS_FILE": TRUSTED_KEYS_PATH,
                "DEJIMA_SECRET_KEY_FILE": "/run/secrets/secret_key",
                "DEJIMA_API_TOKENS_FILE": "/run/secrets/api_tokens",
                "PGPASSFILE": "/run/secrets/pgpass",
            },
            "secrets": [
                _secret(f"{peer.name}-{kind}", kind) for kind in ("private_key", "secret_key", "pgpass", "api_tokens")
            ],
            "configs": [{"source": TRUSTED_KEYS, "target": TRUSTED_KEYS_PATH, "mode": 0o444}],
            "networks": ["peers", private],
            "deploy": {
                "replicas": 1,  # one process owns the peer's open global transactions: never two at once
                "placement": _placement(peer),
                "restart_policy": _restart(),
                "update_config": {"order": "stop-first", "failure_action": "rollback"},
            },
            "stop_grace_period": "30s",
        }
        services[f"{peer.name}-client"] = {
            "image": image,
            "environment": {
                **common,
                "PEER_MODE": "client",
                "DEJIMA_PEER_URL": f"http://{peer.name}-peer:{PORT}",
                "DEJIMA_CLIENT_DB": f"{STATE_DIR}/client.sqlite3",
                "DEJIMA_CLIENT_PASSWORD_FILE": "/run/secrets/client_password",
                "DEJIMA_PEER_TOKEN_FILE": "/run/secrets/client_token",
                "DEJIMA_SECRET_KEY_FILE": "/run/secrets/secret_key",
            },
            "secrets": [
                _secret(f"{peer.name}-{kind}", kind) for kind in ("client_password", "client_token", "secret_key")
            ],
            "volumes": [f"{peer.name}-client:{STATE_DIR}"],
            "networks": [private],
            "ports": [{"target": PORT, "published": peer.client_port, "protocol": "tcp", "mode": "ingress"}],
            "deploy": {"placement": _placement(peer), "restart_policy": _restart()},
        }
        volumes[f"{peer.name}-pgdata"] = {}
        volumes[f"{peer.name}-client"] = {}
    configs = {TRUSTED_KEYS: {"file": f"{secrets_dir}/{TRUSTED_KEYS}", "name": f"dejima-v{version}-{TRUSTED_KEYS}"}}
    return {
        "version": "3.8",
        "services": services,
        "networks": networks,
        "volumes": volumes,
        "secrets": secrets,
        "configs": configs,
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # every service spelled out: the generator is the one place that repeats


def render(peers: Sequence[Peer], image: str = PEER_IMAGE, version: int = 1, secrets_dir: str = "./secrets") -> str:
    """The stack file's text (generated: edit the generator, not the file)."""
    kinds = sorted({p.peer_type for p in peers})
    header = (
        f"# Generated by `python -m peer.deploygen stack`: {len(peers)} peers ({', '.join(kinds)}).\n"
        "# Do not edit; regenerate. Runbook: docs/deployment.md.\n"
    )
    body = yaml.dump(
        stack(peers, image, version, secrets_dir), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120
    )
    return header + body


# ---- command line -----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.deploygen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sec = sub.add_parser("secrets", help="create the missing secret files of each peer (idempotent)")
    sec.add_argument("directory", type=Path)
    sec.add_argument("names", nargs="*", help="peer names (or --per-type)")
    sec.add_argument("--per-type", type=int, default=0, help="peers <type>-1 … <type>-N of each --types")
    sec.add_argument("--types", default=",".join(EXAMPLE_TYPES), help="peer types, comma-separated")
    sec.add_argument("--rotate", action="append", default=[], metavar="NAME", help="a new key pair for NAME")
    stk = sub.add_parser("stack", help="write a docker swarm stack for N peers of each type")
    stk.add_argument("--per-type", type=int, required=True)
    stk.add_argument("--types", default=",".join(EXAMPLE_TYPES), help="peer types, comma-separated")
    stk.add_argument("--image", default=PEER_IMAGE, help="the peer image, as every swarm node can pull it")
    stk.add_argument("--version", type=int, default=1, help="suffix of the secrets' names: raise it to rotate")
    stk.add_argument("--secrets-dir", default="./secrets", help="the secret files, relative to the stack file")
    stk.add_argument("-o", "--output", type=Path, default=None, help="the stack file (default: stdout)")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    try:
        if args.command == "secrets":
            names = list(args.names) + [p.name for p in (peers_per_type(args.per_type, types) if args.per_type else [])]
            if not names and not args.rotate:
                raise DeployError("name the peers, or give --per-type N")
            for path in write_secrets(args.directory, names, args.rotate):
                print(f"wrote {path}")
            return 0
        text = render(peers_per_type(args.per_type, types), args.image, args.version, args.secrets_dir)
    except DeployError as exc:
        print(f"deploygen: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
