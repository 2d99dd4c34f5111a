"""Deployment files for a network of many peers: their secrets and a docker swarm stack (docs/deployment.md).

    python -m peer.deploygen secrets deploy/secrets --per-type 20     # keys and passwords of 60 peers (idempotent)
    python -m peer.deploygen stack --per-type 20 -o deploy/stack-20.yml
    python -m peer.deploygen secrets deploy/secrets --per-type 20 --rotate bank-3   # a new key pair for bank-3
    python -m peer.deploygen secrets DIR government bank --alias government=gov    # names: gov-gateway, …

Peers are named `<peer type>-<i>` (`bank-1` … `bank-20`). Every peer gets, in DIR/<peer>/ (`PEER_SECRETS`):
`private_key` (Ed25519, PEM), `secret_key` (Django), `db_password` (the PostgreSQL superuser `dejima`, used only by
the install step), `db_peer_password` and `db_client_password` (the peer's two logins `dejima_peer` and
`dejima_client`), `pgpass` (those two passwords in libpq's passfile format, for PGPASSFILE; not the superuser's),
`client_password` (the client app's user `admin`), `client_token` (the API token the client app sends to its peer)
and `api_tokens` (its name, scopes and SHA-256, for the peer's DEJIMA_API_TOKENS_FILE). DIR/trusted_keys holds the
public key of every peer found in DIR bound to its peer type (`name base64key type` a line: DEJIMA_TRUSTED_KEYS_FILE;
the type decides which views of the reader the peer may hold). A peer's type is its name when that is a peer type
(`bank`), the name without its number (`bank-3`), or given as `NAME:TYPE` (kept in DIR/<peer>/peer_type). Files are
created mode 0600 and never overwritten, except the rotated key and the files derived from others (`pgpass`,
`api_tokens`, `trusted_keys`), rewritten when they no longer match. `--deliver ROOT` also copies each consumer's files
(`CONSUMERS`: the database, the peer, the client) into ROOT/<peer>/<consumer>/ (the one-host files mount one volume
per consumer there; run as root, the copies are given to the user that reads them).

TLS (docs/security.md "A network observer"): DIR/tls_ca is the deployment's CA certificate (DEJIMA_TLS_CA_FILE of
every peer and client; public, 0644) and DIR/tls_ca_key its key (0600; it stays in DIR, delivered to nobody). Each
peer gets `tls_cert` and `tls_key`, a certificate of that CA for the names its partners and its client use
(`tls_names`: `<peer>-gateway`, the host of its URL, which the egress routes by and the caller checks;
`<peer>-peer`, its client's DEJIMA_PEER_URL; 127.0.0.1 and localhost, its health check and the operator), and its
client app `client_tls_cert` and `client_tls_key` (`<peer>-client`, 127.0.0.1, localhost). `--alias NAME=SHORT`
adds the names of a peer whose services are called SHORT (the one-host files' `gov-…`). A certificate is issued
again when it is not the CA's, names other hosts, or expires within 30 days; its key with it.

The stack runs, per peer, five services: `<peer>-db` (PostgreSQL with prepared transactions), `<peer>-peer`,
`<peer>-client`, `<peer>-gateway` and `<peer>-egress`, pinned to the swarm nodes labelled `dejima.<peer>=true`. The
database, the peer and the client are only on the peer's private overlay network `org-<peer>`. The overlay network
`peers` joins only the relays (peer/relay.py): the gateway, which relays to the peer's message listener and nothing
else, and the egress, through which the peer reaches the other peers' gateways. Secret files are read by `docker
stack deploy` on the manager; their swarm names carry `--version`, so a rotation deploys new secrets (swarm secrets
cannot change).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets as random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer import tlscerts
from peer.dejima.auth import parse_private_key, private_pem, public_b64
from peer.dejima.config import DEFAULT_SQL_ROOT, PEER_NAME_RE

EXAMPLE_TYPES = ("government", "bank", "insurance")
PEER_IMAGE = "dejima-peer:0.1.0"
# PostgreSQL 17.6 (Debian bookworm), pinned by digest; docker/compose.yml and crane.yml use the same image.
POSTGRES_IMAGE = "postgres:17.6-bookworm@sha256:f3bd19c606e442c3d7bdfa8002e03fe260a1023351e0ea4598032022b68dd6e3"
MAX_PREPARED_TRANSACTIONS = 100  # PostgreSQL's default is 0: two-phase commit needs it above the peer's pool size
DB_ADMIN = "dejima"  # POSTGRES_USER: the postgres image's superuser; only the install step logs in as it
DB_OWNER_ROLE = "dejima_owner"  # owns the peer's schema and tables (NOLOGIN; made by the install step)
DB_PEER_ROLE = "dejima_peer"  # the peer's own login (DEJIMA_DATABASE_URL)
DB_CLIENT_ROLE = "dejima_client"  # the login a client's SQL runs as (DEJIMA_CLIENT_DATABASE_URL)
DB_NAME = "dejima"
UID = "10001"  # the image's user `dejima` (docker/Dockerfile)
PORT = 8000  # every peer and client listens on it inside its container (DEJIMA_BIND in docker/Dockerfile)
MESSAGE_PORT = 9000  # a peer's lean listener for peer messages, inside its container (DEJIMA_MESSAGE_BIND there)
RELAY_PORT = 9000  # where the gateways and egresses listen: peers' URLs are https://<peer>-gateway:9000
FIRST_CLIENT_PORT = 8101  # published ports of the clients: 8101, 8102, …
STATE_DIR = "/var/lib/dejima"  # the image's volume: the client's user store
TRUSTED_KEYS_PATH = "/etc/dejima/trusted_keys"
TLS_CA_PATH = "/etc/dejima/tls_ca.pem"
CLIENT_TOKEN_NAME = "client-app"  # noqa: S105  (a name: the client app's API token, its scopes in api_tokens)
CLIENT_TOKEN_SCOPES = ("read", "write")
PEER_SECRETS = (
    "private_key",
    "secret_key",
    "db_password",
    "db_peer_password",
    "db_client_password",
    "pgpass",
    "client_password",
    "client_token",
    "api_tokens",
    "tls_cert",
    "tls_key",
    "client_tls_cert",
    "client_tls_key",
)
# Who gets which secret, and nothing more: the superuser's password goes to the database (POSTGRES_PASSWORD_FILE)
# and to the peer's install step only; the client gets no database credential.
CONSUMERS: dict[str, tuple[str, ...]] = {
    "db": ("db_password",),
    "peer": (
        "private_key",
        "secret_key",
        "pgpass",
        "db_password",
        "db_peer_password",
        "db_client_password",
        "api_tokens",
        "tls_cert",
        "tls_key",
    ),
    "client": ("client_password", "secret_key", "client_token", "client_tls_cert", "client_tls_key"),
}
CONSUMER_UID = {"db": "0", "peer": UID, "client": UID}  # the postgres image reads its password file as root
TRUSTED_KEYS = "trusted_keys"
TLS_CA = "tls_ca"  # the CA certificate: public, every peer and client verifies with it (and gets it delivered)
TLS_CA_KEY = "tls_ca_key"  # its key: stays in the secrets folder
TLS_CA_NAME = "Dejima deployment CA"


def tls_names(name: str, aliases: Sequence[str] = (), client: bool = False) -> list[str]:
    """The names a peer's certificate (or, with `client`, its client app's) is for: its gateway (its URL) and its
    service (its client's DEJIMA_PEER_URL), or the client's service; also under each alias; and loopback."""
    kinds = ("client",) if client else ("gateway", "peer")
    return [f"{prefix}-{kind}" for prefix in (name, *aliases) for kind in kinds] + list(tlscerts.LOCAL_NAMES)


PEER_TYPE_FILE = "peer_type"  # DIR/<peer>/peer_type: the peer type given as NAME:TYPE (not a secret)


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


def _write_derived(path: Path, text: str, mode: int = 0o600) -> bool:
    """Make `path` hold `text` (a file derived from others): False when it does already, else replaced whole (a
    reader never sees it half written)."""
    if path.is_file() and path.read_text() == text and path.stat().st_mode & 0o777 == mode:
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    new = path.with_name(f".{path.name}.new")
    new.unlink(missing_ok=True)
    with new.open("x") as fh:
        new.chmod(mode)
        fh.write(text)
    new.replace(path)
    return True


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_text(peer_password: str, client_password: str) -> str:
    """libpq's passfile (PGPASSFILE) with the peer's two logins; the superuser is not in it."""
    return "".join(
        f"*:*:*:{role}:{_pgpass_field(password)}\n"
        for role, password in ((DB_PEER_ROLE, peer_password), (DB_CLIENT_ROLE, client_password))
    )


def api_tokens_text(client_token: str) -> str:
    """The peer's DEJIMA_API_TOKENS_FILE: the client app's token as `name scopes sha256hex` (a hash, no secret)."""
    digest = hashlib.sha256(client_token.encode("utf-8")).hexdigest()
    return (
        "# name scopes sha256-of-the-token (DEJIMA_API_TOKENS_FILE; written by peer.deploygen)\n"
        f"{CLIENT_TOKEN_NAME} {','.join(CLIENT_TOKEN_SCOPES)} {digest}\n"
    )


def new_token() -> str:
    """An API token string, as the peer's token command makes them."""
    return "dj_" + random.token_urlsafe(32)


def write_tls_ca(directory: Path) -> list[Path]:
    """DIR/tls_ca and DIR/tls_ca_key, made once (the key first: a CA certificate is never without its key)."""
    if (directory / TLS_CA).exists() and (directory / TLS_CA_KEY).exists():
        return []
    cert, key = tlscerts.make_ca(TLS_CA_NAME)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tlscerts.write_file(directory / TLS_CA_KEY, key, 0o600)
    tlscerts.write_file(directory / TLS_CA, cert, 0o644)
    return [directory / TLS_CA_KEY, directory / TLS_CA]


def write_tls(directory: Path, name: str, aliases: Sequence[str] = ()) -> list[Path]:
    """The certificates of peer `name` and of its client app (module docstring), issued when they are not right."""
    ca_cert, ca_key = (directory / TLS_CA).read_bytes(), (directory / TLS_CA_KEY).read_bytes()
    written: list[Path] = []
    for prefix, client in (("", False), ("client_", True)):
        cert, key = directory / name / f"{prefix}tls_cert", directory / name / f"{prefix}tls_key"
        common = f"{name}-client" if client else name
        if tlscerts.ensure_issued(ca_cert, ca_key, cert, key, common, tls_names(name, aliases, client)):
            written += [cert, key]
    return written


def parse_aliases(texts: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=SHORT` (repeatable) -> {name: [short, …]}."""
    aliases: dict[str, list[str]] = {}
    for text in texts:
        name, sep, short = text.partition("=")
        if not sep or not PEER_NAME_RE.match(name) or not PEER_NAME_RE.match(short):
            raise DeployError(f"--alias {text!r}: give NAME=SHORT (peer names)")
        aliases.setdefault(name, []).append(short)
    return aliases


def peer_type_of(directory: Path, name: str, given: Mapping[str, str], sql_root: Path = DEFAULT_SQL_ROOT) -> str:
    """The peer type of peer `name`: given (NAME:TYPE), kept from an earlier run (DIR/<name>/peer_type), or read from
    its name (`bank`, `bank-3`). It must be a peer type under `sql_root`."""
    kept = directory / name / PEER_TYPE_FILE
    peer_type = given.get(name) or (kept.read_text().strip() if kept.is_file() else "")
    if not peer_type:
        match = re.fullmatch(r"(.+)-[0-9]+", name)
        candidates = [name, *([match.group(1)] if match else [])]
        peer_type = next((c for c in candidates if (sql_root / c / "manifest.toml").is_file()), "")
        if not peer_type:
            raise DeployError(
                f"the peer type of {name!r}: name it <type> or <type>-<n>, or give it as {name}:TYPE"
                " (trusted_keys binds every key to its peer type)"
            )
    if not (sql_root / peer_type / "manifest.toml").is_file():
        raise DeployError(f"unknown peer type {peer_type!r} of {name!r}: no {sql_root / peer_type / 'manifest.toml'}")
    return peer_type


def trusted_keys_text(directory: Path, types: Mapping[str, str]) -> str:
    """DIR/trusted_keys: every peer found in DIR (a private key), its public key and peer type (`types`)."""
    keys = sorted(
        (path.parent.name, public_b64(parse_private_key(path.read_bytes()))) for path in directory.glob("*/private_key")
    )
    return "# name public-key peer-type (DEJIMA_TRUSTED_KEYS_FILE; written by peer.deploygen)\n" + "".join(
        f"{name} {key} {types[name]}\n" for name, key in keys
    )


def write_secrets(
    directory: Path,
    names: Sequence[str],
    rotate: Sequence[str] = (),
    deliver: Path | None = None,
    types: Mapping[str, str] | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> list[Path]:
    """Create the missing secret files of each peer in `names` (and a new private key for each in `rotate`), bring
    the derived files up to date (pgpass, api_tokens, then DIR/trusted_keys from every private key in DIR, each bound
    to its peer type: `types` given, else `peer_type_of`; the TLS certificates) and, with `deliver`, copy each
    consumer's files there. `aliases`: more names of a peer's services (its certificates name them too). Returns the
    files written."""
    given = dict(types or {})
    for name in [*names, *rotate, *given]:
        if not PEER_NAME_RE.match(name):
            raise DeployError(f"{name!r} is not a peer name (lower-case letters, digits, - and _; at most 40)")
    existing = [path.parent.name for path in directory.glob("*/private_key")] if directory.is_dir() else []
    peer_types = {name: peer_type_of(directory, name, given) for name in dict.fromkeys([*names, *existing])}
    for name, peer_type in given.items():
        kept = directory / name / PEER_TYPE_FILE
        if kept.is_file() and kept.read_text().strip() != peer_type:
            raise DeployError(f"{name}:{peer_type}: {name} is a peer of type {kept.read_text().strip()!r} ({kept})")
    written: list[Path] = write_tls_ca(directory) if names else []
    for name, peer_type in given.items():
        if _write_derived(directory / name / PEER_TYPE_FILE, peer_type + "\n", 0o644):
            written.append(directory / name / PEER_TYPE_FILE)
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
        values = {
            "private_key": private_pem(Ed25519PrivateKey.generate()).decode(),
            "secret_key": random.token_urlsafe(50),
            "client_password": random.token_urlsafe(18),
            "db_password": random.token_urlsafe(24),
            "db_peer_password": random.token_urlsafe(24),
            "db_client_password": random.token_urlsafe(24),
            "client_token": new_token(),
        }
        for kind, text in values.items():
            if _write_new(directory / name / kind, text + ("" if text.endswith("\n") else "\n")):
                written.append(directory / name / kind)

        def read(kind: str, peer: str = name) -> str:
            return (directory / peer / kind).read_text().strip()

        derived = {
            "pgpass": pgpass_text(read("db_peer_password"), read("db_client_password")),
            "api_tokens": api_tokens_text(read("client_token")),
        }
        for kind, text in derived.items():
            if _write_derived(directory / name / kind, text):
                written.append(directory / name / kind)
        written += write_tls(directory, name, (aliases or {}).get(name, ()))
    if _write_derived(directory / TRUSTED_KEYS, trusted_keys_text(directory, peer_types), 0o644):
        written.append(directory / TRUSTED_KEYS)  # public keys: readable by the peers, whatever their user
    if deliver is not None:
        for name in dict.fromkeys([*names, *rotate]):
            written += deliver_secrets(directory, deliver, name)
    return written


def deliver_secrets(directory: Path, root: Path, name: str) -> list[Path]:
    """Copy the secrets of peer `name` to ROOT/<name>/<consumer>/, each consumer's own (`CONSUMERS`; the peer also
    gets trusted_keys, the peer and the client the CA certificate tls_ca), and remove anything else there. Run as
    root, each folder and file is given to the user that reads it (`CONSUMER_UID`); as anyone else, they stay the
    runner's. Returns the files written."""
    written: list[Path] = []
    for consumer, kinds in CONSUMERS.items():
        folder = root / name / consumer
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        files = {kind: ((directory / name / kind).read_text(), 0o600) for kind in kinds}
        if consumer == "peer":
            files[TRUSTED_KEYS] = ((directory / TRUSTED_KEYS).read_text(), 0o644)
        if consumer in ("peer", "client"):
            files[TLS_CA] = ((directory / TLS_CA).read_text(), 0o644)
        for stale in folder.iterdir():
            if stale.name not in files and (stale.is_file() or stale.is_symlink()):
                stale.unlink()
        for kind, (text, mode) in files.items():
            if _write_derived(folder / kind, text, mode):
                written.append(folder / kind)
        if os.geteuid() == 0:
            uid = int(CONSUMER_UID[consumer])
            for path in (folder, *(folder / kind for kind in files)):
                os.chown(path, uid, uid)
    return written


# ---- the swarm stack --------------------------------------------------------------------------------------------
def _secret(source: str, target: str, uid: str = UID) -> dict[str, Any]:
    return {"source": source, "target": target, "uid": uid, "gid": uid, "mode": 0o400}


def _placement(peer: Peer) -> dict[str, Any]:
    return {"constraints": [f"node.labels.dejima.{peer.name} == true"]}


def _restart() -> dict[str, Any]:
    return {"condition": "any", "delay": "5s", "window": "60s"}


def gateway(name: str) -> str:
    """The service a peer's URL names: it relays to the peer's message listener only."""
    return f"{name}-gateway"


def gateway_on_peers(name: str) -> str:
    """The gateway's name on the network `peers` only: the egresses relay there (the gateway's own name is an alias
    of the egress on every other organization's network, so an egress could resolve it to itself)."""
    return f"{name}-gateway-peers"


def relay_command(*arguments: str) -> list[str]:
    return ["python", "-m", "peer.relay", "--listen", f"0.0.0.0:{RELAY_PORT}", *arguments]


def gateway_command(name: str) -> list[str]:
    return relay_command("--to", f"{name}-peer:{MESSAGE_PORT}")


def egress_command(others: Sequence[str]) -> list[str]:
    routes = [f"{gateway(other)}:{RELAY_PORT}={gateway_on_peers(other)}:{RELAY_PORT}" for other in others]
    return relay_command(*(arg for route in routes for arg in ("--route", route)))


RELAY_HEALTHCHECK = ["CMD", "python", "-m", "peer.relay", "--check", f"127.0.0.1:{RELAY_PORT}"]


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
        seeds = [f"https://{gateway(first.name)}:{RELAY_PORT}" for first in firsts.values() if first != peer]
        others = [other.name for other in peers if other != peer]
        common = {"PEER_TYPE": peer.peer_type, "DEJIMA_PEER_NAME": peer.name}
        db_url = f"@{peer.name}-db:5432/{DB_NAME}"

        def own_secrets(consumer: str, peer: Peer = peer) -> list[dict[str, Any]]:
            uid = CONSUMER_UID[consumer]
            return [_secret(f"{peer.name}-{kind}", kind, uid) for kind in CONSUMERS[consumer]]

        services[f"{peer.name}-db"] = {
            "image": POSTGRES_IMAGE,
            "command": ["postgres", "-c", f"max_prepared_transactions={MAX_PREPARED_TRANSACTIONS}"],
            "environment": {
                "POSTGRES_USER": DB_ADMIN,
                "POSTGRES_DB": DB_NAME,
                "POSTGRES_PASSWORD_FILE": "/run/secrets/db_password",
            },
            "secrets": own_secrets("db"),
            "volumes": [f"{peer.name}-pgdata:/var/lib/postgresql/data"],
            "networks": [private],
            "healthcheck": {"test": ["CMD", "pg_isready", "-U", DB_ADMIN, "-d", DB_NAME], **healthcheck},
            "deploy": {"placement": _placement(peer), "restart_policy": _restart()},
            "stop_grace_period": "60s",
        }
        services[f"{peer.name}-peer"] = {
            "image": image,
            "environment": {
                **common,
                "DEJIMA_URL": f"https://{gateway(peer.name)}:{RELAY_PORT}",
                "DEJIMA_MESSAGE_BIND": f"0.0.0.0:{MESSAGE_PORT}",  # the listener its gateway relays to
                "DEJIMA_SEEDS": ",".join(seeds),
                "DEJIMA_DATABASE_URL": f"postgresql://{DB_PEER_ROLE}{db_url}",
                "DEJIMA_CLIENT_DATABASE_URL": f"postgresql://{DB_CLIENT_ROLE}{db_url}",
                "DEJIMA_ADMIN_DATABASE_URL": f"postgresql://{DB_ADMIN}{db_url}",
                "DEJIMA_ADMIN_PASSWORD_FILE": "/run/secrets/db_password",
                "DEJIMA_DB_PEER_PASSWORD_FILE": "/run/secrets/db_peer_password",
                "DEJIMA_DB_CLIENT_PASSWORD_FILE": "/run/secrets/db_client_password",
                "PGPASSFILE": "/run/secrets/pgpass",
                "DEJIMA_API_TOKENS_FILE": "/run/secrets/api_tokens",
                "DEJIMA_PRIVATE_KEY_FILE": "/run/secrets/private_key",
                "DEJIMA_TRUSTED_KEYS_FILE": TRUSTED_KEYS_PATH,
                "DEJIMA_SECRET_KEY_FILE": "/run/secrets/secret_key",
                "DEJIMA_TLS_CERT_FILE": "/run/secrets/tls_cert",
                "DEJIMA_TLS_KEY_FILE": "/run/secrets/tls_key",
                "DEJIMA_TLS_CA_FILE": TLS_CA_PATH,
                "DEJIMA_TLS_CLIENT_CERTS": "require",  # partners present a certificate of the CA at the handshake
            },
            "secrets": own_secrets("peer"),
            "configs": [
                {"source": TRUSTED_KEYS, "target": TRUSTED_KEYS_PATH, "mode": 0o444},
                {"source": TLS_CA, "target": TLS_CA_PATH, "mode": 0o444},
            ],
            "networks": [private],
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
                "DEJIMA_PEER_URL": f"https://{peer.name}-peer:{PORT}",
                "DEJIMA_PEER_TOKEN_FILE": "/run/secrets/client_token",
                "DEJIMA_CLIENT_DB": f"{STATE_DIR}/client.sqlite3",
                "DEJIMA_CLIENT_PASSWORD_FILE": "/run/secrets/client_password",
                "DEJIMA_SECRET_KEY_FILE": "/run/secrets/secret_key",
                "DEJIMA_TLS_CERT_FILE": "/run/secrets/client_tls_cert",
                "DEJIMA_TLS_KEY_FILE": "/run/secrets/client_tls_key",
                "DEJIMA_TLS_CA_FILE": TLS_CA_PATH,
                "DEJIMA_CLIENT_SECURE_COOKIES": "1",  # served over HTTPS
            },
            "secrets": own_secrets("client"),
            "configs": [{"source": TLS_CA, "target": TLS_CA_PATH, "mode": 0o444}],
            "volumes": [f"{peer.name}-client:{STATE_DIR}"],
            "networks": [private],
            "ports": [{"target": PORT, "published": peer.client_port, "protocol": "tcp", "mode": "ingress"}],
            "deploy": {"placement": _placement(peer), "restart_policy": _restart()},
        }
        relay = {
            "image": image,
            "healthcheck": {"test": RELAY_HEALTHCHECK, **healthcheck, "start_period": "10s"},
            "deploy": {"placement": _placement(peer), "restart_policy": _restart()},
        }
        services[gateway(peer.name)] = {
            **relay,
            "command": gateway_command(peer.name),
            "networks": {"peers": {"aliases": [gateway_on_peers(peer.name)]}, private: {}},
        }
        services[f"{peer.name}-egress"] = {
            **relay,
            "command": egress_command(others),
            "networks": {"peers": {}, private: {"aliases": [gateway(other) for other in others]}},
        }
        volumes[f"{peer.name}-pgdata"] = {}
        volumes[f"{peer.name}-client"] = {}
    configs = {
        kind: {"file": f"{secrets_dir}/{kind}", "name": f"dejima-v{version}-{kind}"} for kind in (TRUSTED_KEYS, TLS_CA)
    }
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
    sec.add_argument("names", nargs="*", help="peer names, NAME or NAME:TYPE (or --per-type)")
    sec.add_argument("--per-type", type=int, default=0, help="peers <type>-1 … <type>-N of each --types")
    sec.add_argument("--types", default=",".join(EXAMPLE_TYPES), help="peer types, comma-separated")
    sec.add_argument("--rotate", action="append", default=[], metavar="NAME", help="a new key pair for NAME")
    sec.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME=SHORT",
        help="peer NAME's services are also called SHORT-peer, SHORT-gateway, SHORT-client (its certificates say so)",
    )
    sec.add_argument(
        "--deliver",
        type=Path,
        default=None,
        metavar="ROOT",
        help="copy each consumer's files to ROOT/<peer>/<consumer>/",
    )
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
            given = dict(n.split(":", 1) for n in args.names if ":" in n)
            names = [n.split(":", 1)[0] for n in args.names]
            names += [p.name for p in (peers_per_type(args.per_type, types) if args.per_type else [])]
            if not names and not args.rotate:
                raise DeployError("name the peers, or give --per-type N")
            aliases = parse_aliases(args.alias)
            for path in write_secrets(args.directory, names, args.rotate, args.deliver, given, aliases):
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
