"""The peer's settings, read from the environment once and validated (docs/settings.md lists every one).

A bad value raises `ConfigError` naming the setting; the peer refuses to start (and `manage.py check` reports it).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from peer.dejima import tls
from peer.dejima.auth import KeyFormatError, parse_private_key, parse_public_key, read_key_file
from peer.dejima.manifest import ManifestError, PeerType, load_peer_types
from peer.dejima.tls import TlsSettings
from peer.dejima.tokens import FileEntry, TokenError, parse_tokens_file

PEER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
ROLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SETTING_NAME_RE = re.compile(r"^(?:PEER|DEJIMA)_[A-Z0-9_]+$")
DEFAULT_SQL_ROOT = Path(__file__).resolve().parents[2] / "sql_triggers"


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


@dataclass(frozen=True)
class Trust:
    """One entry of DEJIMA_TRUSTED_KEYS[_FILE] as written: a peer's public key and what it is trusted as, its peer type
    or the views named (resolved against the manifests by `resolve_entitlements`)."""

    key: str  # base64 of the 32 raw bytes of the public key
    peer_type: str = ""  # `@type` / a line's third field: the peer type it runs ("" when views are named)
    views: tuple[str, ...] = ()  # `@v1+v2` / `views=v1,v2`: the views it may hold


@dataclass(frozen=True)
class Entitlement:
    """Which of this peer's views a trusted peer may hold, decided by this peer's configuration alone: the views whose
    manifest `members` include its peer type, or the views named for it (each one of this peer's). A greeting's claim
    to any other view of this peer is refused, and so is a greeting announcing another peer type."""

    peer_type: str  # the peer type it is trusted as ("" when its views are named: any type it announces)
    views: frozenset[str]  # this peer's views it may hold

    def describe(self) -> str:
        views = ", ".join(sorted(self.views)) or "none of this peer's views"
        return f"{self.peer_type}: {views}" if self.peer_type else f"views={views}"


@dataclass(frozen=True)
class PeerConfig:
    peer_type: str
    mode: str  # "peer" | "client"
    name: str
    url: str  # advertised URL other peers use to reach this one
    database_url: str
    sql_root: Path
    seeds: dict[str, tuple[str, ...]]  # view -> seed peer URLs ("*" = every view)
    peer_timeout: float  # seconds, every call to another peer
    txn_timeout: float  # seconds, a whole global transaction
    lock_timeout_ms: int
    statement_timeout_ms: int
    max_body_bytes: int
    discovery_interval: float
    discovery_max_backoff: float
    recovery_interval: float
    commit_wait: str  # "all": answer after COMMIT PREPARED everywhere; "decision": once the decision is durable
    pool_size: int
    # the lean peer-to-peer listener (peer.dejima.peerserver): (host, port), or None when it is off
    message_bind: tuple[str, int] | None = None
    # the lean client listener for POST /api/v1/exec and /api/v1/query: (host, port), or None when it is off
    api_bind: tuple[str, int] | None = None
    # at most this many global transactions started here run at once; the next ones wait their turn (0: no bound)
    max_active: int = 0
    batch_max: int = 1  # client transactions waiting for a turn that may run as one global transaction
    batch_running: int = 1  # batches of writes (batchable requests) running at once at this origin
    peer_url_for_client: str = ""  # client mode: the peer service this client talks to
    fault_point: str = ""  # test-only: crash the process at this step of the commit protocol
    # authenticated peers (peer.dejima.auth): this peer's private key (PEM or base64, from DEJIMA_PRIVATE_KEY[_FILE];
    # empty: kept in key_file, created at first start), the public keys it trusts (name -> base64), the replay window
    private_key: str = field(default="", repr=False)
    key_file: Path = Path("peer.key")
    trusted_keys: dict[str, str] = field(default_factory=dict)
    replay_window: float = 60.0
    # which of this peer's views each trusted peer may hold (DEJIMA_TRUSTED_KEYS[_FILE]: its peer type, or views);
    # a trusted peer without an entry holds none (peer.dejima.directory)
    entitlements: dict[str, Entitlement] = field(default_factory=dict)
    # client mode (peer.client.auth): the client's own user store (SQLite, Django auth and sessions) and the initial
    # user, created or updated at start
    client_db: Path = Path("client.sqlite3")
    client_user: str = "admin"
    client_password: str = field(default="", repr=False)
    # least privilege in the database (peer.dejima.install, docs/security.md): the login a client's statements run
    # under, the role that owns the machinery (the peer's own login may become it to repair it at start), how many
    # connections of the client login the peer keeps; `debug` (DEJIMA_DEBUG=1) lets a peer start with a superuser
    client_database_url: str = field(default="", repr=False)
    db_owner_role: str = "dejima_owner"
    client_pool_size: int = 10
    debug: bool = False
    # API tokens (peer.dejima.tokens): a peer's DEJIMA_API_TOKENS_FILE, read and checked here, upserted at start
    api_tokens_file: Path | None = None
    api_tokens: tuple[FileEntry, ...] = ()
    # client mode: the token it sends its peer (DEJIMA_PEER_TOKEN[_FILE]); "" in debug without one
    peer_token: str = field(default="", repr=False)
    # TLS (peer.dejima.tls): the certificate, its key and the CA of every listener and every call to another peer (or,
    # in client mode, to its peer); None: plain HTTP, which a peer serves only with `allow_plain`
    # (DEJIMA_ALLOW_PLAIN_HTTP=1) or in debug (`check_transport`)
    tls: TlsSettings | None = None
    allow_plain: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(name, "is required")
    return default


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(name, f"{value} is outside {low}..{high}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(name, f"{value} is outside {low}..{high}")
    return value


def _http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"{raw!r} is not an http(s) URL")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ConfigError(name, f"{raw!r} has a bad port") from None
    return raw.rstrip("/")


def parse_bind(name: str, raw: str) -> tuple[str, int] | None:
    """`host:port` (an IPv6 host in brackets: `[::]:8001`); empty: None."""
    if not raw.strip():
        return None
    host, sep, port = raw.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(name, f"{raw!r} is not host:port (a port of 1..65535), e.g. 0.0.0.0:8001")
    return host, int(port)


def parse_seeds(name: str, raw: str) -> dict[str, tuple[str, ...]]:
    """`view=url,url;view2=url` or plain `url,url` (seeds for every view)."""
    seeds: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        view, sep, urls = part.partition("=")
        if not sep:
            view, urls = "*", part
        view = view.strip()
        if view != "*" and not re.match(r"^[a-z_][a-z0-9_]*$", view):
            raise ConfigError(name, f"{view!r} is not a view name")
        seeds[view] = seeds.get(view, ()) + tuple(_http_url(name, u.strip()) for u in urls.split(",") if u.strip())
    return seeds


def _read_file(name: str, raw: str) -> str:
    try:
        return Path(raw).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"cannot read {raw}: {exc}") from None


TRUST_FORMS = {
    False: "name=base64key@peer_type or name=base64key@view1+view2",
    True: "a line 'name base64key peer_type' or 'name base64key views=view1,view2'",
}


def _grant(setting: str, peer: str, text: str, lines: bool) -> tuple[str, tuple[str, ...]]:
    """What a trusted key is bound to: (peer type, ()) or ("", views). `views=` names views; so does a list with `+`
    (or `,` in the file); a single name is a peer type (`resolve_entitlements` takes it for a view of this peer when
    no peer type has that name)."""
    explicit = text.startswith("views=")
    body = text.removeprefix("views=")
    names = [n.strip() for n in re.split(r"[+,]" if lines else r"\+", body)]
    if not all(re.match(r"^[a-z_][a-z0-9_]{0,47}$", n) for n in names):
        raise ConfigError(
            setting,
            f"the entitlement of {peer!r}: {text[:60]!r} is not a peer type or a list of views (names: lower-case"
            f" letters, digits and _); write {TRUST_FORMS[lines]}",
        )
    if explicit or len(names) > 1:
        return "", tuple(sorted(set(names)))
    return names[0], ()


def parse_trusted_keys(name: str, raw: str, lines: bool = False) -> dict[str, Trust]:
    """Trusted public keys, each bound to the peer type it runs or to the views it may hold: `name=base64@type,
    name2=base64@view1+view2`, or with `lines` one `name base64 type` or `name base64 views=v1,v2` a line (blank lines
    and `#` comments skipped). A key without that binding is refused: being trusted is not being entitled."""
    expected = TRUST_FORMS[lines]
    trusts: dict[str, Trust] = {}
    parts = [p.split("#", 1)[0] for p in raw.splitlines()] if lines else raw.split(",")
    for part in filter(None, (p.strip() for p in parts)):
        if lines:
            fields = part.split()
        else:
            peer_part, _, rest = part.partition("=")
            key_part, at, grant_part = rest.rpartition("@") if "@" in rest else (rest, "", "")
            fields = [peer_part.strip(), key_part.strip(), *([grant_part.strip()] if at else [])]
        if len(fields) not in (2, 3) or not PEER_NAME_RE.match(fields[0]) or not fields[1]:
            raise ConfigError(name, f"{part[:60]!r} is not {expected} (names: lower-case letters, digits, - and _)")
        peer, key = fields[0], fields[1]
        try:
            parse_public_key(key)
        except KeyFormatError as exc:
            raise ConfigError(name, f"the key of {peer!r}: {exc}") from None
        if len(fields) == 2 or not fields[2]:
            raise ConfigError(
                name,
                f"{peer!r} is trusted without an entitlement: write {expected} (the peer type it runs, or the views"
                " of this peer it may hold; a trusted key alone entitles to nothing, docs/settings.md)",
            )
        peer_type, views = _grant(name, peer, fields[2], lines)
        trust = Trust(key, peer_type, views)
        if trusts.get(peer, trust) != trust:
            raise ConfigError(name, f"{peer!r} is given twice, with different keys or entitlements")
        trusts[peer] = trust
    return trusts


def views_for_type(ptype: PeerType, member_type: str) -> frozenset[str]:
    """The views of `ptype` a peer of `member_type` may hold: those whose manifest `members` include that type."""
    return frozenset(v.name for v in ptype.views if member_type in v.members)


def resolve_entitlements(
    trusts: Mapping[str, tuple[str, Trust]], own_name: str, own_type: str, types: Mapping[str, PeerType]
) -> dict[str, Entitlement]:
    """Each trusted peer's entitlement at this peer (of `own_type`), from entries `peer -> (setting, Trust)`.
    Raises ConfigError naming the setting for an unknown peer type, a view this peer does not have, or this peer's
    own name bound to another type."""
    mine = types[own_type]
    my_views = {v.name for v in mine.views}
    known = ", ".join(sorted(types))
    out: dict[str, Entitlement] = {}
    for peer, (setting, trust) in trusts.items():
        peer_type, views = trust.peer_type, trust.views
        if peer_type and peer_type not in types:
            if peer_type not in my_views:
                raise ConfigError(
                    setting,
                    f"the entitlement of {peer!r}: {peer_type!r} is neither a peer type under DEJIMA_SQL_ROOT"
                    f" ({known}) nor a view of this peer ({', '.join(sorted(my_views)) or 'none'})",
                )
            peer_type, views = "", (peer_type,)  # a single view named
        if peer == own_name and peer_type not in ("", own_type):
            raise ConfigError(setting, f"{peer!r} is this peer, of type {own_type!r}, not {peer_type!r}")
        if peer_type:
            out[peer] = Entitlement(peer_type, views_for_type(mine, peer_type))
            continue
        unknown = [v for v in views if v not in my_views]
        if unknown:
            raise ConfigError(
                setting,
                f"the entitlement of {peer!r}: {unknown[0]!r} is not a view of this peer (peer type {own_type!r}:"
                f" {', '.join(sorted(my_views)) or 'no views'})",
            )
        out[peer] = Entitlement("", frozenset(views))
    return out


def _private_key(env: Mapping[str, str]) -> str:
    """DEJIMA_PRIVATE_KEY or the content of DEJIMA_PRIVATE_KEY_FILE (validated); "" when neither is set."""
    private_key = ""
    for setting in ("DEJIMA_PRIVATE_KEY", "DEJIMA_PRIVATE_KEY_FILE"):
        raw = env.get(setting, "").strip()
        if not raw:
            continue
        if private_key:
            raise ConfigError(setting, "give the private key once: DEJIMA_PRIVATE_KEY or DEJIMA_PRIVATE_KEY_FILE")
        private_key = _read_file(setting, raw) if setting.endswith("_FILE") else raw
        try:
            parse_private_key(private_key)
        except KeyFormatError as exc:
            raise ConfigError(setting, str(exc)) from None
    return private_key


def _key_file(env: Mapping[str, str], name: str, check: bool) -> Path:
    """DEJIMA_KEY_FILE (default ~/.dejima/<name>.key); when it exists and `check`: a valid key, mode 0600."""
    key_file = Path(_get(env, "DEJIMA_KEY_FILE", str(Path.home() / ".dejima" / f"{name}.key"))).expanduser()
    if check and key_file.exists():
        try:
            read_key_file(key_file)
        except (OSError, KeyFormatError) as exc:
            raise ConfigError("DEJIMA_KEY_FILE", str(exc)) from None
    return key_file


def _trusted_keys(env: Mapping[str, str]) -> dict[str, tuple[str, Trust]]:
    """The entries of DEJIMA_TRUSTED_KEYS and DEJIMA_TRUSTED_KEYS_FILE: peer -> (the setting it came from, Trust)."""
    trusted = {
        peer: ("DEJIMA_TRUSTED_KEYS", trust)
        for peer, trust in parse_trusted_keys("DEJIMA_TRUSTED_KEYS", env.get("DEJIMA_TRUSTED_KEYS", "")).items()
    }
    path = env.get("DEJIMA_TRUSTED_KEYS_FILE", "").strip()
    if path:
        text = _read_file("DEJIMA_TRUSTED_KEYS_FILE", path)
        for peer, trust in parse_trusted_keys("DEJIMA_TRUSTED_KEYS_FILE", text, lines=True).items():
            if peer in trusted and trusted[peer][1] != trust:
                raise ConfigError(
                    "DEJIMA_TRUSTED_KEYS_FILE", f"{peer!r} has another key or entitlement in DEJIMA_TRUSTED_KEYS"
                )
            trusted[peer] = trusted.get(peer, ("DEJIMA_TRUSTED_KEYS_FILE", trust))
    return trusted


def _entitlements(
    trusted: Mapping[str, tuple[str, Trust]], name: str, peer_type: str, sql_root: Path
) -> dict[str, Entitlement]:
    """The trusted peers' entitlements, resolved against the peer types under DEJIMA_SQL_ROOT."""
    if not trusted:
        return {}
    try:
        types = load_peer_types(sql_root)
    except ManifestError as exc:
        raise ConfigError("DEJIMA_SQL_ROOT", str(exc)) from None
    return resolve_entitlements(trusted, name, peer_type, types)


DEV_SECRET_KEY = "dev-only-not-secret"  # noqa: S105  (debug only: DEJIMA_DEBUG=1)
DEFAULT_SECRET_KEYS = frozenset({DEV_SECRET_KEY, "changeme", "change-me", "secret", "secret-key", "insecure"})


def secret_key(env: Mapping[str, str]) -> str:
    """Django's SECRET_KEY from DEJIMA_SECRET_KEY or the file DEJIMA_SECRET_KEY_FILE (docker secrets). Outside
    debug (DEJIMA_DEBUG != 1) an empty or default secret is refused: ConfigError naming the setting."""
    setting, value = "DEJIMA_SECRET_KEY", env.get("DEJIMA_SECRET_KEY", "").strip()
    path = env.get("DEJIMA_SECRET_KEY_FILE", "").strip()
    if path:
        if value:
            raise ConfigError(setting + "_FILE", "give the secret once: DEJIMA_SECRET_KEY or DEJIMA_SECRET_KEY_FILE")
        setting = "DEJIMA_SECRET_KEY_FILE"
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(setting, f"cannot read {path}: {exc}") from None
    weak = not value or value in DEFAULT_SECRET_KEYS or value.startswith("django-insecure")
    if not weak:
        return value
    if env.get("DEJIMA_DEBUG", "").strip() == "1":
        return value or DEV_SECRET_KEY
    what = "empty" if not value else "a well-known default"
    raise ConfigError(
        setting,
        f"is {what}; outside debug (DEJIMA_DEBUG=1) the peer needs a long random secret, e.g. from"
        " `python -c 'import secrets; print(secrets.token_urlsafe(50))'`",
    )


DEV_CLIENT_PASSWORD = "dev-only-password"  # noqa: S105  (debug only: DEJIMA_DEBUG=1)
DEFAULT_CLIENT_PASSWORDS = frozenset(
    {DEV_CLIENT_PASSWORD, "admin", "password", "changeme", "change-me", "secret", "dejima", "12345678", "letmein"}
)
MIN_CLIENT_PASSWORD = 8
USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")  # Django's username characters


def client_db(env: Mapping[str, str], name: str | None = None) -> Path:
    """DEJIMA_CLIENT_DB: the client's user store (SQLite), default ~/.dejima/<name>-client.sqlite3."""
    name = name or env.get("DEJIMA_PEER_NAME", "").strip() or env.get("PEER_TYPE", "").strip() or "dejima"
    default = Path.home() / ".dejima" / f"{name}-client.sqlite3"
    return Path(env.get("DEJIMA_CLIENT_DB", "").strip() or str(default)).expanduser()


def client_password(env: Mapping[str, str]) -> str:
    """The initial user's password from DEJIMA_CLIENT_PASSWORD or the file DEJIMA_CLIENT_PASSWORD_FILE (docker
    secrets). Outside debug (DEJIMA_DEBUG != 1) a missing, empty, short or default password is refused:
    ConfigError naming the setting."""
    setting, value = "DEJIMA_CLIENT_PASSWORD", env.get("DEJIMA_CLIENT_PASSWORD", "").strip()
    path = env.get("DEJIMA_CLIENT_PASSWORD_FILE", "").strip()
    if path:
        if value:
            raise ConfigError(
                setting + "_FILE", "give the password once: DEJIMA_CLIENT_PASSWORD or DEJIMA_CLIENT_PASSWORD_FILE"
            )
        setting = "DEJIMA_CLIENT_PASSWORD_FILE"
        value = _read_file(setting, path).strip()
    if value and value.lower() not in DEFAULT_CLIENT_PASSWORDS and len(value) >= MIN_CLIENT_PASSWORD:
        return value
    if env.get("DEJIMA_DEBUG", "").strip() == "1":
        return value or DEV_CLIENT_PASSWORD
    if not value:
        what = "missing" if setting not in env and not path else "empty"
    elif len(value) < MIN_CLIENT_PASSWORD:
        what = f"shorter than {MIN_CLIENT_PASSWORD} characters"
    else:
        what = "a well-known default"
    raise ConfigError(
        setting,
        f"is {what}; outside debug (DEJIMA_DEBUG=1) client mode needs a password for its user"
        f" {env.get('DEJIMA_CLIENT_USER', '').strip() or 'admin'!r}, e.g. from"
        " `python -c 'import secrets; print(secrets.token_urlsafe(16))'`",
    )


def api_tokens_file(env: Mapping[str, str]) -> tuple[Path | None, tuple[FileEntry, ...]]:
    """DEJIMA_API_TOKENS_FILE: its path and its tokens (lines `name scopes sha256hex`); a bad line is a ConfigError
    naming the setting and the line."""
    raw = env.get("DEJIMA_API_TOKENS_FILE", "").strip()
    if not raw:
        return None, ()
    try:
        entries = parse_tokens_file(_read_file("DEJIMA_API_TOKENS_FILE", raw))
    except TokenError as exc:
        raise ConfigError("DEJIMA_API_TOKENS_FILE", f"{raw}: {exc}") from None
    return Path(raw), tuple(entries)


BEARER_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # RFC 6750 b64token: what an Authorization header carries
MIN_PEER_TOKEN = 16


def peer_token(env: Mapping[str, str]) -> str:
    """Client mode: the API token it sends its peer, from DEJIMA_PEER_TOKEN or the file DEJIMA_PEER_TOKEN_FILE.
    Outside debug (DEJIMA_DEBUG != 1) it is required: ConfigError naming the setting."""
    setting, value = "DEJIMA_PEER_TOKEN", env.get("DEJIMA_PEER_TOKEN", "").strip()
    path = env.get("DEJIMA_PEER_TOKEN_FILE", "").strip()
    if path:
        if value:
            raise ConfigError(setting + "_FILE", "give the token once: DEJIMA_PEER_TOKEN or DEJIMA_PEER_TOKEN_FILE")
        setting = "DEJIMA_PEER_TOKEN_FILE"
        value = _read_file(setting, path).strip()
    if value:
        if not BEARER_TOKEN_RE.match(value) or not MIN_PEER_TOKEN <= len(value) <= 1024:
            raise ConfigError(
                setting,
                f"is not an API token: {MIN_PEER_TOKEN} to 1024 of letters, digits and -._~+/ (as `manage.py "
                "dejima_token create` makes them at the peer)",
            )
        return value
    if env.get("DEJIMA_DEBUG", "").strip() == "1":
        return ""
    what = "empty" if setting in env or path else "missing"
    raise ConfigError(
        setting,
        f"is {what}; outside debug (DEJIMA_DEBUG=1) client mode needs the API token it sends its peer"
        " (DEJIMA_PEER_URL): make one at the peer with"
        " `python manage.py dejima_token create NAME --scope read --scope write`",
    )


def tls_settings(env: Mapping[str, str]) -> TlsSettings | None:
    """DEJIMA_TLS_CERT_FILE, DEJIMA_TLS_KEY_FILE, DEJIMA_TLS_CA_FILE (all three, or none: plain HTTP) and
    DEJIMA_TLS_CLIENT_CERTS (`none` or `require`), the files checked (peer.dejima.tls.check_files): a ConfigError
    names the setting at fault."""
    given = {setting: env.get(setting, "").strip() for setting in tls.FILE_SETTINGS}
    client_certs = env.get(tls.CLIENT_CERTS_SETTING, "").strip().lower() or "none"
    if client_certs not in tls.CLIENT_CERTS:
        raise ConfigError(tls.CLIENT_CERTS_SETTING, f"{client_certs!r} must be 'none' or 'require'")
    if not any(given.values()):
        if client_certs != "none":
            raise ConfigError(
                tls.CLIENT_CERTS_SETTING,
                f"needs TLS: give {', '.join(tls.FILE_SETTINGS)} (client certificates are checked against the CA)",
            )
        return None
    for setting, value in given.items():
        if not value:
            others = ", ".join(s for s in tls.FILE_SETTINGS if s != setting)
            raise ConfigError(setting, f"is required with {others}: TLS needs the certificate, its key and the CA")
    settings = TlsSettings(
        cert_file=Path(given[tls.CERT_SETTING]).expanduser(),
        key_file=Path(given[tls.KEY_SETTING]).expanduser(),
        ca_file=Path(given[tls.CA_SETTING]).expanduser(),
        client_certs=client_certs,
    )
    try:
        tls.check_files(settings)
    except tls.TlsSettingError as exc:
        raise ConfigError(exc.setting, str(exc)) from None
    return settings


def _allow_plain(env: Mapping[str, str], settings: TlsSettings | None) -> bool:
    raw = env.get(tls.PLAIN_SETTING, "").strip()
    if raw not in ("", "0", "1"):
        raise ConfigError(tls.PLAIN_SETTING, f"{raw!r} must be 1 (allowed) or 0 (not allowed)")
    if raw == "1" and settings is not None:
        raise ConfigError(
            tls.PLAIN_SETTING, f"TLS is on ({tls.CERT_SETTING} is given): plain HTTP cannot be allowed as well"
        )
    return raw == "1"


def _https_only(name: str, urls: tuple[str, ...] | list[str]) -> None:
    """With TLS on, every URL this peer calls or advertises must be https: a peer never speaks clear text then."""
    for url in urls:
        if urlsplit(url).scheme != "https":
            raise ConfigError(name, f"{url!r} is plain http, but TLS is on ({tls.CERT_SETTING}): give its https:// URL")


def check_transport(config: PeerConfig) -> list[str]:
    """The policy on clear text, checked when a peer or client starts (gunicorn's on_starting, `manage.py check`):
    TLS, or plain HTTP explicitly allowed (DEJIMA_ALLOW_PLAIN_HTTP=1), or debug (DEJIMA_DEBUG=1). Returns the
    warnings to log (plain HTTP, allowed); raises ConfigError naming the settings when neither is given."""
    if config.tls is not None:
        return []
    what = "peer messages and the rows they carry" if config.mode == "peer" else "the client's calls to its peer"
    if config.allow_plain:
        return [
            f"plain HTTP (DEJIMA_ALLOW_PLAIN_HTTP=1): {what} cross the network in clear text; give"
            f" {', '.join(tls.FILE_SETTINGS)} to encrypt them"
        ]
    if config.debug:
        return [
            f"plain HTTP in debug (DEJIMA_DEBUG=1): {what} cross the network in clear text; outside debug give"
            f" {', '.join(tls.FILE_SETTINGS)} or DEJIMA_ALLOW_PLAIN_HTTP=1"
        ]
    raise ConfigError(
        tls.CERT_SETTING,
        f"no TLS: give {', '.join(tls.FILE_SETTINGS)} (HTTPS with certificate verification), or allow clear text"
        f" explicitly with {tls.PLAIN_SETTING}=1 ({what} would cross the network unencrypted)",
    )


def load_config(env: Mapping[str, str] | None = None) -> PeerConfig:
    env = os.environ if env is None else env
    sql_root = Path(_get(env, "DEJIMA_SQL_ROOT", str(DEFAULT_SQL_ROOT)))
    if not sql_root.is_dir():
        raise ConfigError("DEJIMA_SQL_ROOT", f"{sql_root} is not a folder")
    peer_type = _get(env, "PEER_TYPE")
    if not (sql_root / peer_type / "manifest.toml").is_file():
        known = sorted(p.name for p in sql_root.iterdir() if (p / "manifest.toml").is_file())
        raise ConfigError("PEER_TYPE", f"unknown peer type {peer_type!r}; known: {', '.join(known)}")
    mode = _get(env, "PEER_MODE", "peer")
    if mode not in ("peer", "client"):
        raise ConfigError("PEER_MODE", f"{mode!r} must be 'peer' or 'client'")
    name = _get(env, "DEJIMA_PEER_NAME", peer_type)
    if not PEER_NAME_RE.match(name):
        raise ConfigError("DEJIMA_PEER_NAME", f"{name!r}: use lower-case letters, digits, - and _ (at most 40)")
    # Client mode talks only to its peer service over HTTP: no database, but DEJIMA_PEER_URL is required.
    database_url = _get(env, "DEJIMA_DATABASE_URL", "" if mode == "client" else None)
    if database_url and urlsplit(database_url).scheme not in ("postgresql", "postgres"):
        raise ConfigError("DEJIMA_DATABASE_URL", "must be a postgresql:// URL")
    client_database_url = _get(env, "DEJIMA_CLIENT_DATABASE_URL", "" if mode == "client" else None)
    if client_database_url and urlsplit(client_database_url).scheme not in ("postgresql", "postgres"):
        raise ConfigError("DEJIMA_CLIENT_DATABASE_URL", "must be a postgresql:// URL")
    db_owner_role = _get(env, "DEJIMA_DB_OWNER_ROLE", "dejima_owner")
    if not ROLE_NAME_RE.match(db_owner_role):
        raise ConfigError(
            "DEJIMA_DB_OWNER_ROLE", f"{db_owner_role!r}: use lower-case letters, digits and _ (at most 63)"
        )
    if mode == "client" and not env.get("DEJIMA_PEER_URL", "").strip():
        raise ConfigError("DEJIMA_PEER_URL", "is required in client mode (the URL of this organization's peer service)")
    commit_wait = _get(env, "DEJIMA_COMMIT_WAIT", "decision")
    if commit_wait not in ("all", "decision"):
        raise ConfigError("DEJIMA_COMMIT_WAIT", f"{commit_wait!r} must be 'all' or 'decision'")
    # Client mode: the timeout of every call to its peer service; a write waits for a whole global transaction.
    peer_timeout = _float(env, "DEJIMA_PEER_TIMEOUT", 5.0 if mode == "peer" else 30.0, 0.05, 300.0)
    secret_key(env)  # outside debug: no default or empty secret (Django's SECRET_KEY, read by peer/settings.py)
    private_key = _private_key(env)
    client_user = _get(env, "DEJIMA_CLIENT_USER", "admin")
    if not USERNAME_RE.match(client_user):
        raise ConfigError("DEJIMA_CLIENT_USER", f"{client_user!r}: use letters, digits and @ . + - _ (at most 150)")
    # Client mode: login is required (peer.client.auth); outside debug its initial user needs a real password.
    password = client_password(env) if mode == "client" else ""
    token = peer_token(env) if mode == "client" else ""
    tokens_file, api_tokens = api_tokens_file(env) if mode == "peer" else (None, ())
    pool_size = _int(env, "DEJIMA_POOL_SIZE", 20, 2, 500)
    client_pool_size = _int(env, "DEJIMA_CLIENT_POOL_SIZE", max(2, pool_size // 2), 2, 500)
    # each global transaction started here holds a connection at the origin and at each participant, which serve
    # the others' too: a quarter of the pool leaves room for three peers' transactions in every pool
    max_active = _int(env, "DEJIMA_MAX_ACTIVE", max(1, pool_size // 4), 0, 10_000)
    tls_on = tls_settings(env)
    allow_plain = _allow_plain(env, tls_on)
    url = _http_url("DEJIMA_URL", _get(env, "DEJIMA_URL", f"{'https' if tls_on else 'http'}://127.0.0.1:8000"))
    seeds = parse_seeds("DEJIMA_SEEDS", env.get("DEJIMA_SEEDS", ""))
    peer_url = _http_url("DEJIMA_PEER_URL", env["DEJIMA_PEER_URL"]) if env.get("DEJIMA_PEER_URL", "").strip() else ""
    if tls_on is not None:
        if mode == "peer":
            _https_only("DEJIMA_URL", [url])
            _https_only("DEJIMA_SEEDS", [u for urls in seeds.values() for u in urls])
        else:
            _https_only("DEJIMA_PEER_URL", [peer_url])
        if tls_on.require_client_certs and mode == "peer" and not env.get("DEJIMA_MESSAGE_BIND", "").strip():
            raise ConfigError(
                tls.CLIENT_CERTS_SETTING,
                "require needs the message listener (DEJIMA_MESSAGE_BIND): it is the one that checks a partner's"
                " certificate",
            )
    trusted = _trusted_keys(env)
    return PeerConfig(
        peer_type=peer_type,
        mode=mode,
        name=name,
        url=url,
        database_url=database_url,
        sql_root=sql_root,
        seeds=seeds,
        peer_timeout=peer_timeout,
        txn_timeout=_float(env, "DEJIMA_TXN_TIMEOUT", 10.0, 0.1, 600.0),
        lock_timeout_ms=_int(env, "DEJIMA_LOCK_TIMEOUT_MS", 2000, 1, 600_000),
        statement_timeout_ms=_int(env, "DEJIMA_STATEMENT_TIMEOUT_MS", 10_000, 1, 3_600_000),
        max_body_bytes=_int(env, "DEJIMA_MAX_BODY_BYTES", 1_048_576, 1024, 1_073_741_824),
        discovery_interval=_float(env, "DEJIMA_DISCOVERY_INTERVAL", 1.0, 0.05, 3600.0),
        discovery_max_backoff=_float(env, "DEJIMA_DISCOVERY_MAX_BACKOFF", 15.0, 0.1, 3600.0),
        recovery_interval=_float(env, "DEJIMA_RECOVERY_INTERVAL", 5.0, 0.1, 3600.0),
        commit_wait=commit_wait,
        pool_size=pool_size,
        message_bind=parse_bind("DEJIMA_MESSAGE_BIND", env.get("DEJIMA_MESSAGE_BIND", "")),
        api_bind=parse_bind("DEJIMA_API_BIND", env.get("DEJIMA_API_BIND", "")),
        max_active=max_active,
        batch_max=_int(env, "DEJIMA_BATCH_MAX", 16, 1, 64),
        batch_running=_int(env, "DEJIMA_BATCH_RUNNING", 1, 1, 10_000),
        peer_url_for_client=peer_url,
        fault_point=env.get("DEJIMA_FAULT_POINT", "").strip(),
        private_key=private_key,
        key_file=_key_file(env, name, check=mode == "peer" and not private_key),
        trusted_keys={peer: trust.key for peer, (_, trust) in trusted.items()},
        replay_window=_float(env, "DEJIMA_REPLAY_WINDOW", 60.0, 1.0, 3600.0),
        entitlements=_entitlements(trusted, name, peer_type, sql_root),
        client_db=client_db(env, name),
        client_user=client_user,
        client_password=password,
        client_database_url=client_database_url,
        db_owner_role=db_owner_role,
        client_pool_size=client_pool_size,
        debug=env.get("DEJIMA_DEBUG", "").strip() == "1",
        api_tokens_file=tokens_file,
        api_tokens=api_tokens,
        peer_token=token,
        tls=tls_on,
        allow_plain=allow_plain,
    )


def setting_names() -> frozenset[str]:
    """The name of every setting a peer or client reads at start: each `PEER_*`/`DEJIMA_*` name written in this
    module, in peer/dejima/tls.py, in peer/settings.py, in peer/gunicorn_conf.py and in the image's entrypoint
    (docker/entrypoint.py, when it is there: its install step's own settings), read from their source, so it follows
    the code. Deployment files are checked against it (tests/test_deploy.py); the development kit's own settings
    (`DEJIMA_PG`, … in peer/pgserver.py) are not among them."""
    package = Path(__file__).resolve().parents[1]
    sources = [
        Path(__file__),
        Path(__file__).with_name("tls.py"),
        package / "settings.py",
        package / "gunicorn_conf.py",
    ]
    entrypoint = package.parent / "docker" / "entrypoint.py"
    names: set[str] = set()
    for source in [*sources, *([entrypoint] if entrypoint.is_file() else [])]:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SETTING_NAME_RE.match(node.value):
                names.add(node.value)
    return frozenset(names)
