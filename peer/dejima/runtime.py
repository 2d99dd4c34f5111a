"""The peer process: one per peer (gunicorn gthread, one worker, many threads), so that the database connection
of every open global transaction lives in one process across several HTTP requests.

`get_runtime()` builds it once: settings; the database checked (UTF8, no superuser login outside debug, a client
login that can do nothing but change base tables) and its machinery inspected and repaired (peer.dejima.machinery);
two connection pools (the peer's own login, and the client login a client's statements run under); the API tokens
(DEJIMA_API_TOKENS_FILE imported; `tokens`: the store every request's token is checked against); the directory
(discovery loop), the coordinator (recovery and sealer loops) and, with DEJIMA_MESSAGE_BIND and DEJIMA_API_BIND, the
lean listeners for peer messages and for a client's exec and query (peer.dejima.peerserver; the latter checks the
token first, as the REST API does), both over TLS with the peer's TLS settings (peer.dejima.tls; the message
listener asks for a client certificate with DEJIMA_TLS_CLIENT_CERTS=require).
"""

from __future__ import annotations

import json
import logging
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from peer.dejima import clientconn, machinery
from peer.dejima.auth import Authenticator, KeyFormatError, load_or_create_key, parse_private_key, trusted_keys
from peer.dejima.config import ConfigError, PeerConfig, load_config
from peer.dejima.coordinator import Coordinator
from peer.dejima.directory import Directory
from peer.dejima.install import InstallError, Roles
from peer.dejima.manifest import PeerType, load_peer_types
from peer.dejima.peerserver import Guard, PeerServer, Route, message_routes
from peer.dejima.tls import server_context
from peer.dejima.tokens import Principal, TokenError, TokenStore, authorize, import_tokens, log_refusal
from peer.dejima.transport import Transport

log = logging.getLogger(__name__)
API_EXEC = "/api/v1/exec"
API_QUERY = "/api/v1/query"
_lock = threading.Lock()
_runtime: PeerRuntime | None = None


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True  # the coordinator issues BEGIN / COMMIT / PREPARE TRANSACTION itself


IDLE_CHECK_S = 1.0  # a pooled connection idle this long is checked (one round trip) before it is handed out
_idle_since: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()


def _returned(conn: psycopg.Connection[Any]) -> None:
    """The pool's reset callback: remember when the connection came back."""
    _idle_since[conn] = time.monotonic()


def _readable(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection has something to read: the server's notice that it is terminating it (a database
    restart sends one to every client), or its EOF. An idle connection is sent nothing else here (no LISTEN)."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _check(conn: psycopg.Connection[Any]) -> None:
    """The pool's check before it hands a connection out: one closed by a database restart is replaced. A round trip
    (`check_connection`) only when the connection sat idle a second or more, or the server sent it something while
    it was idle (a restart's termination notice, EOF); otherwise a zero-timeout poll of its socket says enough — a
    round trip at every checkout cost each global transaction several database round trips per peer."""
    since = _idle_since.get(conn)
    if since is None or time.monotonic() - since >= IDLE_CHECK_S or _readable(conn):
        ConnectionPool.check_connection(conn)


def _pool(
    config: PeerConfig,
    url: str,
    min_size: int,
    max_size: int,
    reset: Callable[[psycopg.Connection[Any]], None],
    what: str,
) -> ConnectionPool[Any]:
    """A pool of autocommit connections to `url`, open and filled to `min_size`; one closed by a database restart is
    replaced (`_check`)."""
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        configure=_configure,
        reset=reset,
        check=_check,
        kwargs={"connect_timeout": 5},
        timeout=config.txn_timeout,
        name=f"{config.name}-{what}",
        open=True,
    )
    pool.wait(timeout=30)
    return pool


class PeerRuntime:
    def __init__(self, config: PeerConfig, background: bool = True) -> None:
        self.started = time.time()  # no request signed before this is accepted (replays across a restart)
        self.config = config
        types = load_peer_types(config.sql_root)
        self.ptype: PeerType = types[config.peer_type]
        self.expected = machinery.expected(self.ptype, config.sql_root)
        self.roles, self.least_privilege = check_database(config, self.ptype)
        # the peer's own login (participants, recovery, the log, discovery), and the client login a client's
        # statements run under (peer.dejima.install): cleared of what they may leave on it when it comes back
        self.pool = _pool(config, config.database_url, 2, config.pool_size, _returned, "db")
        self.client_pool = _pool(
            config, config.client_database_url, 1, config.client_pool_size, clientconn.returned(_returned), "client-db"
        )
        if config.api_tokens_file is not None:
            self._import_tokens(config)
        self.tokens = TokenStore(self.pool)
        self.auth = make_authenticator(config, not_before=self.started)
        self.transport = Transport(config.name, self.auth, tls=config.tls)
        self.directory = Directory(config, self.ptype, self.pool, self.transport)
        self.coordinator = Coordinator(
            config, self.ptype, self.pool, self.directory, self.transport, client_pool=self.client_pool
        )
        if adopted := self.coordinator.adopt_prepared():
            log.info("peer %s: %d transactions left prepared here; recovery finishes them", config.name, adopted)
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.listeners: list[PeerServer] = []  # the lean listeners (DEJIMA_MESSAGE_BIND, DEJIMA_API_BIND)
        self.listener_names: dict[str, PeerServer] = {}  # "message", "api" -> its listener
        if background:
            self.start_background()
        log.info("peer %s (%s) ready at %s", config.name, config.peer_type, config.url)

    def start_background(self) -> None:
        loops = {
            "discovery": self.directory.run,
            "recovery": lambda: self.coordinator.run_recovery(self.stopped),
            "sealer": lambda: self.coordinator.run_sealer(self.stopped),
        }
        for name, target in loops.items():
            thread = threading.Thread(target=target, name=f"{self.config.name}-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.config.message_bind is not None:
            from peer.dejima.inbox import handle_message  # it reaches this runtime through get_runtime()

            tls = self.config.tls
            context = server_context(tls, client_certs=tls.require_client_certs) if tls is not None else None
            self.listener_names["message"] = self._listen(
                "DEJIMA_MESSAGE_BIND",
                self.config.message_bind,
                message_routes(handle_message),
                "peer messages",
                tls=context,
            )
        if self.config.api_bind is not None:
            from peer.dejima import api  # likewise

            routes = {API_EXEC: _drop_remote(api.run_exec), API_QUERY: _drop_remote(api.run_query)}
            self.listener_names["api"] = self._listen(
                "DEJIMA_API_BIND",
                self.config.api_bind,
                routes,
                "client exec and query",
                token_guard(self.tokens),
                tls=server_context(self.config.tls) if self.config.tls is not None else None,
            )

    def _import_tokens(self, config: PeerConfig) -> None:
        """DEJIMA_API_TOKENS_FILE (read and checked by load_config) into dejima.api_tokens, all or nothing."""
        try:
            with self.pool.connection(timeout=10) as conn:
                changed = import_tokens(conn, config.api_tokens)
        except TokenError as exc:
            self.pool.close()
            raise ConfigError("DEJIMA_API_TOKENS_FILE", f"{config.api_tokens_file}: {exc}") from None
        log.info(
            "peer %s: %d API tokens from %s (%d changed)",
            config.name,
            len(config.api_tokens),
            config.api_tokens_file,
            changed,
        )

    def _listen(
        self,
        setting: str,
        bind: tuple[str, int],
        routes: dict[str, Route],
        what: str,
        guard: Guard | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> PeerServer:
        host, port = bind
        try:
            listener = PeerServer(
                routes,
                host,
                port,
                self.config.max_body_bytes,
                read_timeout=self.config.peer_timeout,
                name=self.config.name,
                guard=guard,
                tls=tls,
            )
        except OSError as exc:
            for started in self.listeners:
                started.close()
            raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc}") from None
        listener.start()
        self.listeners.append(listener)
        if tls is None:
            how = "plain HTTP"
        elif tls.verify_mode == ssl.CERT_REQUIRED:
            how = "TLS, client certificates required"
        else:
            how = "TLS"
        log.info("peer %s: %s also at %s:%d (%s, %s)", self.config.name, what, host, port, setting, how)
        return listener

    def tls_status(self) -> dict[str, Any]:
        """TLS in /api/v1/status: on or off, whether the message listener requires client certificates, the
        transport's connections and handshakes (full, resumed, failed) and each lean listener's."""
        tls = self.config.tls
        return {
            "enabled": tls is not None,
            "client_certs": tls.client_certs if tls is not None else "none",
            "transport": self.transport.connections.snapshot(),
            "listeners": {name: listener.stats() for name, listener in self.listener_names.items()},
        }

    def close(self) -> None:
        self.stopped.set()
        for listener in self.listeners:
            listener.close()
        self.coordinator.seal_wanted.set()  # the sealer sees `stopped` at once
        self.directory.stop()
        self.transport.close()
        self.coordinator.watchdog.close()
        self.client_pool.close()
        self.pool.close()


def _drop_remote(run: Callable[[Any], tuple[int, bytes, dict[str, str]]]) -> Route:
    """A route for a client API function, which does not ask who calls: the listener's guard did (`token_guard`)."""
    return lambda body, remote: run(body)


ROLE_SQL = (  # text as bytea: in a SQL_ASCII database psycopg would answer bytes
    "SELECT convert_to(session_user, 'UTF8'), r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication,"
    " r.rolbypassrls, (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid),"
    " convert_to(getdatabaseencoding(), 'UTF8'), convert_to(current_database(), 'UTF8')"
    " FROM pg_roles r WHERE r.rolname = session_user"
)


def _texts(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    assert row is not None
    return tuple(bytes(v).decode() if isinstance(v, bytes | memoryview) else v for v in row)


def check_database(config: PeerConfig, ptype: PeerType) -> tuple[Roles, bool]:
    """Before the peer serves anything: its database is UTF8; its own login is no superuser (only in debug, with a
    warning); the login of a client's statements is another one, with no special attribute and no role it could
    switch to (its privileges: docs/security.md); the machinery is what the manifest generates, repaired as its
    owner when it is not (peer.dejima.machinery). The three roles, and whether the logins are the least-privilege
    ones (not so only in debug). Raises ConfigError naming the setting."""
    try:
        with psycopg.connect(config.database_url, connect_timeout=10, autocommit=True) as conn:
            peer = _texts(conn.execute(ROLE_SQL).fetchone())
            with psycopg.connect(config.client_database_url, connect_timeout=10, autocommit=True) as client_conn:
                client = _texts(client_conn.execute(ROLE_SQL).fetchone())
            least = _check_logins(config, peer, client)
            roles = Roles(owner=config.db_owner_role, peer=str(peer[0]), client=str(client[0]))
            repaired = machinery.ensure(conn, ptype, config.sql_root, roles, privileges=least)
    except psycopg.OperationalError as exc:
        raise ConfigError("DEJIMA_DATABASE_URL", f"cannot connect: {str(exc).strip()}") from None
    except InstallError as exc:
        raise ConfigError("DEJIMA_DATABASE_URL", f"the peer type's machinery in the database: {exc}") from None
    for what in repaired:
        log.warning("peer %s: repaired the machinery in the database: %s", config.name, what)
    return roles, least


def _check_logins(config: PeerConfig, peer: tuple[Any, ...], client: tuple[Any, ...]) -> bool:
    """Raises ConfigError for a database or logins the peer must not run with; False when it runs with them all the
    same (debug)."""
    encoding, database = peer[7], peer[8]
    if encoding != "UTF8":
        raise ConfigError(
            "DEJIMA_DATABASE_URL",
            f"database {database} is encoded {encoding}; the peer needs UTF8 (CREATE DATABASE … ENCODING 'UTF8'"
            " TEMPLATE template0): every value it exchanges is JSON text",
        )
    if client[8] != database:
        raise ConfigError(
            "DEJIMA_CLIENT_DATABASE_URL", f"names database {client[8]}, DEJIMA_DATABASE_URL names {database}"
        )
    weak: list[tuple[str, str]] = []
    if peer[1]:
        weak.append(("DEJIMA_DATABASE_URL", f"logs in as {peer[0]}, a superuser"))
    if client[0] == peer[0]:
        weak.append(("DEJIMA_CLIENT_DATABASE_URL", f"logs in as {client[0]}, the peer's own login"))
    special = [
        a
        for a, on in zip(("superuser", "createrole", "createdb", "replication", "bypassrls"), client[1:6], strict=True)
        if on
    ]
    if special:
        weak.append(("DEJIMA_CLIENT_DATABASE_URL", f"logs in as {client[0]}, which has {', '.join(special)}"))
    if client[6] and client[0] != peer[0]:
        weak.append(("DEJIMA_CLIENT_DATABASE_URL", f"logs in as {client[0]}, a member of other roles"))
    for setting, what in weak:
        message = (
            f"{what}: a client's SQL must run with no more privilege than the base tables need"
            " (roles: `python manage.py dejima_install --peer-role … --client-role …`, docs/security.md)"
        )
        if not config.debug:
            raise ConfigError(setting, message + "; only debug (DEJIMA_DEBUG=1) starts like this")
        log.warning("peer %s: %s: %s (started anyway: DEJIMA_DEBUG=1)", config.name, setting, message)
    return not weak


def token_guard(store: TokenStore) -> Guard:
    """The lean client listener's check of each request's API token, before its body is read: what the REST API's
    default authentication and permission do (peer/dejima/apiauth.py), with the same statuses and bodies."""

    def guard(
        method: str, path: str, remote: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes, dict[str, str]] | None:
        verdict = authorize(store, method, path, headers.get("authorization"))
        if isinstance(verdict, Principal):
            return None
        log_refusal(verdict, method, path, remote)
        return verdict.status, json.dumps(verdict.body()).encode(), verdict.headers()

    return guard


def make_authenticator(config: PeerConfig, not_before: float | None = None) -> Authenticator:
    """This peer's key (given, or kept in DEJIMA_KEY_FILE and created at first start) and the keys it trusts (each
    bound to what it may hold here: `PeerConfig.entitlements`, logged); `not_before`: when this process started (it
    accepts no request signed earlier: peer.dejima.auth)."""
    if config.private_key:
        key = parse_private_key(config.private_key)
    else:
        try:
            key = load_or_create_key(config.key_file)
        except (OSError, KeyFormatError) as exc:
            raise ConfigError("DEJIMA_KEY_FILE", f"cannot read or create {config.key_file}: {exc}") from None
    try:
        auth = Authenticator(
            config.name, key, trusted_keys(config.trusted_keys), config.replay_window, not_before=not_before
        )
    except ValueError as exc:
        raise ConfigError("DEJIMA_TRUSTED_KEYS", str(exc)) from None
    others = sorted(set(auth.trusted) - {config.name})
    if not others:
        log.warning("peer %s trusts no other peer's key (DEJIMA_TRUSTED_KEYS): it refuses every message", config.name)
    entitlements = config.entitlements
    trusts = [f"{n} ({entitlements[n].describe() if n in entitlements else 'no entitlement'})" for n in others]
    log.info("peer %s public key %s; trusts %s", config.name, auth.public_key, ", ".join(trusts) or "nobody")
    return auth


def get_runtime() -> PeerRuntime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = PeerRuntime(load_config())
        return _runtime
