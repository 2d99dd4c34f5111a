"""A local Dejima network: real peer processes (gunicorn) on loopback, one database each on one PostgreSQL.

Used by `dejima up`/`down` and by the cluster tests. Processes run in their own session, their pids are kept in
`<state dir>/network.json`, so `dejima down` (another process) stops exactly what `up` started.

Authenticated peers: each peer's key pair is created up front in `<state dir>/<name>.key` (mode 0600, kept across
restarts) and every peer is given the public keys of all the others, each bound to that peer's type (DEJIMA_KEY_FILE,
DEJIMA_TRUSTED_KEYS `name=key@type`: what it may hold), so the network works with no manual step. Tests sign their
own peer messages with these files (`LocalNetwork.key`).

API tokens: before a peer starts, the kit makes sure `<state dir>/<peer>.token` exists (mode 0600, generated once,
kept across restarts) and that the peer's database holds it (scopes read, write; named after the peer). Each client
gets `<state dir>/<client>.token`, a token of its peer named after the client, as DEJIMA_PEER_TOKEN_FILE.
`LocalNetwork.token(name)` / `auth_headers(name)` give them to the CLI, the benchmarks, chaos and the tests;
`exec`, `query` and `get` send them.

Client login: each client gets its own user store `<state dir>/<name>.sqlite3` (DEJIMA_CLIENT_DB) and a generated
password for its user `admin` in `<state dir>/<name>.password` (mode 0600, next to its log, kept across restarts;
DEJIMA_CLIENT_PASSWORD_FILE). `LocalNetwork.password_path(name)` / `password(name)` give it to the kit and the tests.

Least privilege in the database, as in production: before a peer starts, the kit installs its peer type as the
server's superuser with three roles of its own (`db_roles`: `<database>_owner`, `<database>_peer`,
`<database>_client`, passwords generated once into `<state dir>/db_password`, mode 0600), and the peer logs in as
`<database>_peer` (DEJIMA_DATABASE_URL) and runs its clients' statements as `<database>_client`
(DEJIMA_CLIENT_DATABASE_URL). The superuser's URL stays with the kit (`LocalNetwork.admin_url`), for the tests'
direct looks into a database.

TLS, as in production (peer.dejima.tls): a peer or client whose spec has `tls` (the default) gets a certificate of
the kit's CA (peer.tlscerts.kit_ca: one CA per process, `.dejima/ca` of the checkout unless DEJIMA_KIT_CA_DIR names
another folder) for 127.0.0.1, localhost and its name, in `<state dir>/tls/<name>.pem` (key `<name>-key.pem`, mode
0600, issued again when missing, expiring or for other names), and DEJIMA_TLS_CERT_FILE, DEJIMA_TLS_KEY_FILE and
DEJIMA_TLS_CA_FILE: every URL of the network is https, and every listener of it speaks TLS. A spec with `tls` False
runs plain HTTP, allowed explicitly (DEJIMA_ALLOW_PLAIN_HTTP=1). The kit's own calls (`get`, `exec`, `query`,
`wait_healthy`) verify against the CA (`LocalNetwork.verify`, a path for `requests`; `client_context()` for other
clients).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer import tlscerts
from peer.dejima import tokens
from peer.dejima.auth import load_or_create_key, public_b64
from peer.dejima.install import SQL_ROOT, Roles, install
from peer.pgserver import PgServer

EXAMPLE = (("government", 8001), ("bank", 8002), ("insurance", 8003))
CLIENT_USER = "admin"  # the user of every client of a local network (its password: LocalNetwork.password_path)


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_start() -> int:
    """The first port the kernel may give an outgoing connection (ports below it are never taken that way)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, never handed out before by this process, and (when there is room) below the
    kernel's ephemeral range: a port chosen up front stays free until its peer binds it, even while other peers
    open outgoing connections (which take ephemeral ports) and however many ports a network needs."""
    low, high = 20000, _ephemeral_start()
    with _ports_lock:
        for _ in range(200 if high - low > 1000 else 0):
            port = random.randrange(low, high)  # noqa: S311 - a port number, not a secret
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        while True:  # no room below the ephemeral range: the kernel's choice, still never twice
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


@dataclass
class PeerSpec:
    name: str
    peer_type: str
    port: int
    database: str
    mode: str = "peer"
    env: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    # the peer's lean listener for peer messages (DEJIMA_MESSAGE_BIND); 0: none, other peers then use `url`
    message_port: int = field(default_factory=free_port)
    # the peer's lean client listener for /api/v1/exec and /api/v1/query (DEJIMA_API_BIND); 0: none
    api_port: int = field(default_factory=free_port)
    # TLS on every listener, a certificate of the kit's CA (DEJIMA_TLS_*); False: plain HTTP (DEJIMA_ALLOW_PLAIN_HTTP)
    tls: bool = True

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """gunicorn: the REST API (and peer messages too)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """Where a client's exec and query may go: the lean client listener, or gunicorn without one."""
        return f"{self.scheme}://127.0.0.1:{self.api_port}" if self.api_port else self.url

    @property
    def message_url(self) -> str:
        """Where other peers send their messages (advertised as DEJIMA_URL)."""
        return f"{self.scheme}://127.0.0.1:{self.message_port}" if self.message_port else self.url


class NetworkError(Exception):
    pass


def db_roles(database: str, password: str | None = None) -> Roles:
    """The database roles of the peer whose database is `database` (several peers share one server locally, and
    roles belong to the server: each peer has its own)."""
    return Roles(
        owner=f"{database}_owner",
        peer=f"{database}_peer",
        client=f"{database}_client",
        peer_password=password,
        client_password=password,
    )


class LocalNetwork:
    def __init__(
        self,
        server: PgServer,
        state_dir: Path,
        specs: list[PeerSpec],
        sql_root: Path | None = None,
        ca: tlscerts.KitCa | None = None,
    ) -> None:
        """`ca`: the CA of the network's certificates (default: the process's kit CA, `tlscerts.kit_ca`)."""
        self.server = server
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.specs = {s.name: s for s in specs}
        self.sql_root = sql_root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ca = ca or tlscerts.kit_ca()

    # ---- TLS ------------------------------------------------------------------------------------------------
    @property
    def verify(self) -> str:
        """What `requests` verifies the network's peers against (`verify=`): the kit's CA file."""
        return str(self.ca.cert_file)

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that verifies the network's peers (the kit's CA), for clients other than `requests`."""
        return self.ca.client_context()

    def cert_path(self, name: str) -> Path:
        """The certificate of a peer or client of this network (its key: `tls_key_path`)."""
        return self.state_dir / "tls" / f"{name}.pem"

    def tls_key_path(self, name: str) -> Path:
        return self.state_dir / "tls" / f"{name}-key.pem"

    def tls_env(self, name: str) -> dict[str, str]:
        """The TLS settings of a peer or client of this network: its certificate (issued by the kit's CA for
        127.0.0.1, localhost and its name, when it has none yet or another), its key and the CA."""
        self.ca.issue_files(self.cert_path(name), self.tls_key_path(name), name, [*tlscerts.LOCAL_NAMES, name])
        return {
            "DEJIMA_TLS_CERT_FILE": str(self.cert_path(name)),
            "DEJIMA_TLS_KEY_FILE": str(self.tls_key_path(name)),
            "DEJIMA_TLS_CA_FILE": str(self.ca.cert_file),
        }

    # ---- keys -----------------------------------------------------------------------------------------------
    def key_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.key"

    def key(self, name: str) -> Ed25519PrivateKey:
        """The private key of a peer of this network (created when it has none yet)."""
        return load_or_create_key(self.key_path(name))

    def public_keys(self) -> dict[str, str]:
        """name -> base64 public key of every peer (not client) of this network."""
        return {name: public_b64(self.key(name)) for name, s in self.specs.items() if s.mode == "peer"}

    def trusted_keys(self, name: str, keys: dict[str, str] | None = None) -> str:
        """DEJIMA_TRUSTED_KEYS of peer `name`: every other peer's key bound to its peer type (`other=key@type`), which
        decides which of `name`'s views it may hold."""
        keys = self.public_keys() if keys is None else keys
        return ",".join(f"{n}={k}@{self.specs[n].peer_type}" for n, k in sorted(keys.items()) if n != name)

    # ---- client login -------------------------------------------------------------------------------------------
    def password_path(self, name: str) -> Path:
        """Where the generated password of a client's user (CLIENT_USER) is kept: next to its log, mode 0600."""
        return self.state_dir / f"{name}.password"

    def password(self, name: str) -> str:
        """The password of a client's user (generated when it has none yet)."""
        path = self.password_path(name)
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(18))
        return path.read_text().strip()

    # ---- the peer's database ------------------------------------------------------------------------------------
    def db_password(self) -> str:
        """The password of the kit's database logins (generated once, mode 0600): trust authentication locally does
        not ask for it, an external server (DEJIMA_DATABASE_URL) may."""
        path = self.state_dir / "db_password"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def admin_url(self, name: str) -> str:
        """The superuser's URL of a peer's database: the kit's own, never given to a peer."""
        return self.server.url(self.specs[name].database)

    def install(self, name: str) -> None:
        """Create the peer's database and roles and install its peer type, as the superuser (idempotent)."""
        spec = self.specs[name]
        if spec.database not in self.server.list_databases():
            self.server.create_database(spec.database)
        roles = db_roles(spec.database, self.db_password())
        root = Path(spec.env["DEJIMA_SQL_ROOT"]) if spec.env.get("DEJIMA_SQL_ROOT") else self.sql_root or SQL_ROOT
        install(self.admin_url(name), spec.peer_type, root, roles=roles)

    # ---- API tokens -----------------------------------------------------------------------------------------------
    def token_path(self, name: str) -> Path:
        """Where the API token of a peer (its own) or of a client (one of its peer) is kept: mode 0600."""
        return self.state_dir / f"{name}.token"

    def token(self, name: str) -> str:
        """The API token of a peer or client of this network (generated when it has none yet; a peer's database
        learns it when the kit starts the peer, a client's peer when the kit starts the client)."""
        path = self.token_path(name)
        if not path.exists():  # written whole, then linked into place: a reader never sees half a file
            draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(tokens.new_token() + "\n")
                with contextlib.suppress(FileExistsError):  # another process made it meanwhile: theirs it is
                    os.link(draft, path)
            finally:
                draft.unlink(missing_ok=True)
        return path.read_text().strip()

    def auth_headers(self, name: str) -> dict[str, str]:
        """The header that lets a request through to peer `name` (its own token), or, for a client's name, to the
        client's peer (the client's token)."""
        return {"Authorization": f"Bearer {self.token(name)}"}

    def grant(self, peer: str, name: str, scopes: tuple[str, ...] = tokens.SCOPES) -> str:
        """Make token `name` (its file in the state dir) a token of `peer` of this network, in its database (created
        and installed when it is not yet). Returns the token."""
        spec = self.specs[peer]
        if spec.mode != "peer":
            raise NetworkError(f"{peer} is a client, not a peer: it has no API tokens")
        self.install(peer)  # the table of tokens is part of the peer's SQL
        token = self.token(name)
        with psycopg.connect(self.admin_url(peer), autocommit=True, connect_timeout=10) as conn:
            tokens.ensure(conn, name, scopes, token=token)
        return token

    def peer_at(self, url: str) -> str | None:
        """The name of the peer of this network that serves its client API at `url` (gunicorn or the lean client
        listener), None when none does."""
        url = url.rstrip("/")
        found = [n for n, s in self.specs.items() if s.mode == "peer" and url in (s.url, s.api_url)]
        return found[0] if found else None

    def _ensure_tokens(self, spec: PeerSpec) -> None:
        """Before a peer or client starts: a peer's own token in its database; a client's token at its peer, given
        to it as DEJIMA_PEER_TOKEN_FILE (unless its env names a token already: a client of a peer elsewhere)."""
        if spec.mode == "peer":
            self.grant(spec.name, spec.name)
            return
        if "DEJIMA_PEER_TOKEN" in spec.env or "DEJIMA_PEER_TOKEN_FILE" in spec.env:
            return
        peer = self.peer_at(spec.env.get("DEJIMA_PEER_URL", ""))
        if peer is None:
            raise NetworkError(
                f"client {spec.name}: its peer {spec.env.get('DEJIMA_PEER_URL')!r} is not in this network; give it"
                " DEJIMA_PEER_TOKEN_FILE (a token of that peer, e.g. from LocalNetwork.grant)"
            )
        self.grant(peer, spec.name)
        spec.env["DEJIMA_PEER_TOKEN_FILE"] = str(self.token_path(spec.name))

    # ---- processes ------------------------------------------------------------------------------------------
    def env_for(self, spec: PeerSpec) -> dict[str, str]:
        seeds = ",".join(s.message_url for s in self.specs.values() if s.name != spec.name and s.mode == "peer")
        roles = db_roles(spec.database or spec.name.replace("-", "_"), self.db_password())
        # a peer trusts what its settings say, never a CA bundle of the environment (REQUESTS_CA_BUNDLE, …)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DEJIMA_", "PEER_")) and k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
        }
        env.update(
            {
                "PEER_TYPE": spec.peer_type,
                "PEER_MODE": spec.mode,
                "DEJIMA_PEER_NAME": spec.name,
                "DEJIMA_URL": spec.message_url if spec.mode == "peer" else spec.url,
                "DEJIMA_BIND": f"127.0.0.1:{spec.port}",
                "DEJIMA_DATABASE_URL": self.server.url(spec.database, roles.peer, roles.peer_password),
                "DEJIMA_CLIENT_DATABASE_URL": self.server.url(spec.database, roles.client, roles.client_password),
                "DEJIMA_DB_OWNER_ROLE": roles.owner,
                "DEJIMA_SEEDS": seeds,
                "DJANGO_SETTINGS_MODULE": "peer.settings",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.sql_root is not None:
            env["DEJIMA_SQL_ROOT"] = str(self.sql_root)
        if spec.mode == "peer":
            keys = self.public_keys()
            env["DEJIMA_KEY_FILE"] = str(self.key_path(spec.name))
            if spec.message_port:
                env["DEJIMA_MESSAGE_BIND"] = f"127.0.0.1:{spec.message_port}"
            if spec.api_port:
                env["DEJIMA_API_BIND"] = f"127.0.0.1:{spec.api_port}"
            env["DEJIMA_TRUSTED_KEYS"] = self.trusted_keys(spec.name, keys)
        if spec.mode == "client":  # a client talks only to its peer service (DEJIMA_PEER_URL in spec.env)
            del env["DEJIMA_DATABASE_URL"], env["DEJIMA_CLIENT_DATABASE_URL"], env["DEJIMA_DB_OWNER_ROLE"]
            del env["DEJIMA_SEEDS"]
            self.password(spec.name)  # its own user store and a generated password (login required)
            env["DEJIMA_CLIENT_DB"] = str(self.state_dir / f"{spec.name}.sqlite3")
            env["DEJIMA_CLIENT_USER"] = CLIENT_USER
            env["DEJIMA_CLIENT_PASSWORD_FILE"] = str(self.password_path(spec.name))
            if spec.tls:
                env["DEJIMA_CLIENT_SECURE_COOKIES"] = "1"  # served over HTTPS
        if spec.tls:
            env.update(self.tls_env(spec.name))
        else:
            env["DEJIMA_ALLOW_PLAIN_HTTP"] = "1"
        secret = self.state_dir / "secret_key"  # a generated secret (outside debug a peer refuses the default)
        if not secret.exists():
            secret.touch(mode=0o600)
            secret.write_text(secrets.token_urlsafe(50))
        env["DEJIMA_SECRET_KEY_FILE"] = str(secret)
        env.update(spec.env)
        return env

    def log_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def start(self, name: str) -> None:
        spec = self.specs[name]
        self._ensure_tokens(spec)  # a peer's: installs its database and roles first
        log = self.log_path(name).open("ab")
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"]
        repo = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(
            cmd, env=self.env_for(spec), stdout=log, stderr=subprocess.STDOUT, cwd=repo, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        spec.pid = proc.pid
        self.save()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        spec = self.specs[name]
        if not spec.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(spec.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(spec.pid, self.procs.get(name)):
            time.sleep(0.05)
        if _alive(spec.pid, self.procs.get(name)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(spec.pid, signal.SIGKILL)
            proc = self.procs.get(name)
            if proc is not None:
                proc.wait(timeout=5)
        self.procs.pop(name, None)
        spec.pid = 0
        self.save()

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def start_all(self) -> None:
        for name in self.specs:
            self.start(name)

    def stop_all(self) -> None:
        for name in list(self.specs):
            self.stop(name)

    # ---- readiness ------------------------------------------------------------------------------------------
    def get(self, name: str, path: str, timeout: float = 5.0) -> Any:
        resp = requests.get(
            self.specs[name].url + path, headers=self.auth_headers(name), timeout=timeout, verify=self.verify
        )
        resp.raise_for_status()
        return resp.json()

    def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise NetworkError(f"peer {name} exited with {proc.returncode}:\n{self.tail(name)}")
            try:
                if requests.get(self.specs[name].url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return
            except requests.RequestException as exc:
                last = str(exc)
            time.sleep(0.05)
        raise NetworkError(f"peer {name} not healthy after {timeout}s ({last}):\n{self.tail(name)}")

    def groups_complete(self) -> bool:
        """Every peer knows every other peer that shares one of its views."""
        status = {n: self.get(n, "/api/v1/status") for n, s in self.specs.items() if s.mode == "peer"}
        for st in status.values():
            for view, members in st["groups"].items():
                expected = sorted(n for n, other in status.items() if view in other["views"])
                if members != expected:
                    return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        for name in self.specs:
            self.wait_healthy(name, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.groups_complete():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise NetworkError("dejima groups did not form in time")

    def exec(self, name: str, statements: str | list[str], timeout: float = 30.0) -> tuple[int, Any]:
        """Run statements at a peer as one global transaction: (HTTP status, JSON answer)."""
        resp = requests.post(
            self.specs[name].url + "/api/v1/exec",
            json={"sql": statements},
            headers=self.auth_headers(name),
            timeout=timeout,
            verify=self.verify,
        )
        return resp.status_code, resp.json()

    def query(self, name: str, statement: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Rows of a read-only query at a peer, as dicts."""
        resp = requests.post(
            self.specs[name].url + "/api/v1/query",
            json={"sql": statement},
            headers=self.auth_headers(name),
            timeout=timeout,
            verify=self.verify,
        )
        resp.raise_for_status()
        body = resp.json()
        return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- state file -----------------------------------------------------------------------------------------
    def save(self) -> None:
        data = {"peers": [asdict(s) for s in self.specs.values()], "ca": str(self.ca.directory)}
        (self.state_dir / "network.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, server: PgServer, state_dir: Path) -> LocalNetwork:
        path = state_dir / "network.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        # a network saved before TLS ran plain HTTP
        specs = [PeerSpec(**{"tls": False, **s}) for s in data.get("peers", [])]
        ca = tlscerts.KitCa(Path(data["ca"])) if data.get("ca") else None  # the CA its certificates came from
        return cls(server, state_dir, specs, ca=ca)


def _alive(pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def example_specs(
    base_port: int | None = None, prefix: str = "", clients: bool = False, tls: bool = True
) -> list[PeerSpec]:
    """The shipped example: government, bank, insurance (fixed ports 8001-8003 by default, their peer-message
    listeners 9001-9003; free ports for tests), and with `clients` their client apps (ports 8101-8103); TLS on every
    one unless `tls` is False (plain HTTP, allowed explicitly)."""
    specs = []
    for name, port in EXAMPLE:
        specs.append(
            PeerSpec(
                name=name,
                peer_type=name,
                port=port if base_port is None else free_port(),
                database=f"{prefix}{name}",
                message_port=port + 1000 if base_port is None else free_port(),
                api_port=port + 2000 if base_port is None else free_port(),
                tls=tls,
            )
        )
    if clients:
        for peer in list(specs):
            specs.append(
                PeerSpec(
                    name=f"{peer.name}-client",
                    peer_type=peer.peer_type,
                    port=peer.port + 100 if base_port is None else free_port(),
                    database="",
                    mode="client",
                    env={"DEJIMA_PEER_URL": peer.url},
                    message_port=0,
                    api_port=0,
                    tls=tls,
                )
            )
    return specs
