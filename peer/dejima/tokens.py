"""API tokens: who may use a peer's client API (`/api/v1/…`; only `GET /health` and `POST /peer/v1/message` are open).

A token is `dj_` + `secrets.token_urlsafe(32)`, shown once when it is made and never stored: the table
`dejima.api_tokens` (sql_triggers/common.sql) keeps its name, its scopes (`read`: queries and every GET; `write`:
exec), the sha256 (hex) of its UTF-8 text, where it came from (`command`: the management command or the kit; `file`:
DEJIMA_API_TOKENS_FILE), when it was made and when it was revoked.

| function | what |
|---|---|
| `create(conn, name, scopes)` | a new token; returns its text (the only time it is seen). TokenError when the name is |
| | taken by a token not revoked (a revoked one is replaced: that is how a token is rotated) |
| `ensure(conn, name, scopes, token=… or sha256=…)` | token `name` exists with this secret (or hash) and these scopes, |
| | not revoked; nothing is written when it already does (the kit at every start, the tokens file) |
| `revoke(conn, name)` | revoked from now on (TokenError for an unknown name); False when it already was |
| `list_tokens(conn)` | every token without its secret (name, scopes, source, created, revoked) |
| `parse_tokens_file(text)` / `import_tokens(conn, entries)` | DEJIMA_API_TOKENS_FILE: lines `name scopes sha256hex` |
| `TokenStore(pool).authenticate(header)` | an `Authorization` header value -> `Principal(name, scopes)` or None |

`TokenStore` keeps the active tokens' hashes in memory and reads them again from the database at most every
`refresh_s` (1 s): a revocation takes effect within about a second, and a request costs no database round trip in
the common case. The presented token's sha256 is compared with `hmac.compare_digest` against every active token's
hash, without stopping at a match. A token is never logged.

Every statement uses placeholders; names and scopes are validated first (TokenError, nothing changed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors
from psycopg_pool import PoolTimeout

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

TOKEN_PREFIX = "dj_"  # noqa: S105  (a prefix, not a secret)
SCOPES = ("read", "write")  # in this order wherever scopes are written out
NAME_RE = re.compile(r"^[a-z0-9._-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SOURCES = ("command", "file")
REFRESH_S = 1.0  # the store reads the active tokens again at most this often
STALE_LIMIT_S = 10.0  # while the database cannot be read, the last tokens read serve at most this long
NOT_INSTALLED = "this database has no dejima.api_tokens table: install the peer type first (manage.py dejima_install)"


class TokenError(Exception):
    """A bad name, scope or hash, an unknown token, or a name already taken; nothing was changed."""


class TokensUnavailable(Exception):
    """The tokens cannot be read from the database (and those read before are too old to trust)."""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the name of its token and what that token may do."""

    name: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class TokenInfo:
    """A token as `list_tokens` shows it: never its secret nor its hash."""

    name: str
    scopes: tuple[str, ...]
    source: str
    created: datetime
    revoked: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "source": self.source,
            "created": self.created.isoformat(),
            "revoked": self.revoked.isoformat() if self.revoked else None,
        }


@dataclass(frozen=True)
class FileEntry:
    """One line of DEJIMA_API_TOKENS_FILE."""

    name: str
    scopes: tuple[str, ...]
    sha256: str
    line: int


# ---- values ----------------------------------------------------------------------------------------------------


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """What the table keeps of a token: the sha256 (hex) of its UTF-8 text."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TokenError(f"{name!r} is not a token name: 1 to 64 of lower-case letters, digits, '.', '_' and '-'")
    return name


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes in canonical order; at least one, each of `SCOPES`."""
    given = list(scopes)
    unknown = sorted({s for s in given if s not in SCOPES}, key=str)
    if unknown:
        raise TokenError(f"unknown scope {', '.join(map(repr, unknown))}: the scopes are {', '.join(SCOPES)}")
    if not given:
        raise TokenError(f"a token needs at least one scope of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in given)


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise TokenError("a token hash is the sha256 of the token in hex: 64 of 0-9 and a-f")
    return value


# ---- the table -------------------------------------------------------------------------------------------------


def _missing_table(exc: psycopg.Error) -> bool:
    return isinstance(exc, errors.UndefinedTable | errors.InvalidSchemaName)


def create(conn: psycopg.Connection[Any], name: str, scopes: Iterable[str], source: str = "command") -> str:
    """A new token `name`; returns the token (shown once, never stored). A revoked token of that name is replaced."""
    name, wanted = check_name(name), check_scopes(scopes)
    if source not in SOURCES:
        raise TokenError(f"unknown source {source!r}")
    token = new_token()
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO dejima.api_tokens (name, scopes, token_sha256, source) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET scopes = EXCLUDED.scopes, token_sha256 = EXCLUDED.token_sha256,"
                " source = EXCLUDED.source, created_at = now(), revoked_at = NULL"
                " WHERE dejima.api_tokens.revoked_at IS NOT NULL RETURNING name",
                (name, list(wanted), token_sha256(token), source),
            ).fetchone()
    except psycopg.Error as exc:
        if _missing_table(exc):
            raise TokenError(NOT_INSTALLED) from None
        raise
    if row is None:
        raise TokenError(f"a token named {name!r} exists already: revoke it first, or choose another name")
    return token


def ensure(
    conn: psycopg.Connection[Any],
    name: str,
    scopes: Iterable[str],
    *,
    token: str | None = None,
    sha256: str | None = None,
    source: str = "command",
) -> bool:
    """Token `name` exists with this secret (`token`) or this hash (`sha256`), these scopes and this source, not
    revoked. Returns whether anything was written (nothing when it already was so)."""
    name, wanted = check_name(name), check_scopes(scopes)
    if (token is None) == (sha256 is None):
        raise TokenError("give the token or its sha256, not both")
    if source not in SOURCES:
        raise TokenError(f"unknown source {source!r}")
    if token is not None and not token:
        raise TokenError("the token is empty")
    digest = token_sha256(token) if token is not None else check_sha256(str(sha256))
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO dejima.api_tokens (name, scopes, token_sha256, source) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET scopes = EXCLUDED.scopes, token_sha256 = EXCLUDED.token_sha256,"
                " source = EXCLUDED.source, revoked_at = NULL"
                " WHERE (dejima.api_tokens.scopes, dejima.api_tokens.token_sha256, dejima.api_tokens.source)"
                " IS DISTINCT FROM (EXCLUDED.scopes, EXCLUDED.token_sha256, EXCLUDED.source)"
                " OR dejima.api_tokens.revoked_at IS NOT NULL"
                " RETURNING name",
                (name, list(wanted), digest, source),
            ).fetchone()
    except errors.UniqueViolation:
        raise TokenError(f"token {name!r}: another token has the same secret") from None
    except psycopg.Error as exc:
        if _missing_table(exc):
            raise TokenError(NOT_INSTALLED) from None
        raise
    return row is not None


def revoke(conn: psycopg.Connection[Any], name: str) -> bool:
    """Revoke token `name` from now on; False when it was revoked already. TokenError for an unknown name."""
    check_name(name)
    try:
        with conn.transaction():
            cur = conn.execute(
                "UPDATE dejima.api_tokens SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL", (name,)
            )
            if cur.rowcount:
                return True
            known = conn.execute("SELECT 1 FROM dejima.api_tokens WHERE name = %s", (name,)).fetchone()
    except psycopg.Error as exc:
        if _missing_table(exc):
            raise TokenError(NOT_INSTALLED) from None
        raise
    if known is None:
        raise TokenError(f"no token named {name!r} (`dejima_token list` shows them)")
    return False


def list_tokens(conn: psycopg.Connection[Any]) -> list[TokenInfo]:
    """Every token, by name: name, scopes, source, created, revoked. Never the secret nor its hash."""
    try:
        with conn.transaction():
            rows = conn.execute(
                "SELECT name, scopes, source, created_at, revoked_at FROM dejima.api_tokens ORDER BY name"
            ).fetchall()
    except psycopg.Error as exc:
        if _missing_table(exc):
            raise TokenError(NOT_INSTALLED) from None
        raise
    return [TokenInfo(str(n), tuple(s), str(src), created, revoked) for n, s, src, created, revoked in rows]


# ---- DEJIMA_API_TOKENS_FILE --------------------------------------------------------------------------------------


def parse_tokens_file(text: str) -> list[FileEntry]:
    """Lines `name scopes sha256hex` (scopes comma-separated; `#` comments and blank lines skipped). A bad line
    raises TokenError naming the line (`config.load_config` makes it a ConfigError naming the setting)."""
    entries: list[FileEntry] = []
    seen: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"line {number}"
        if len(fields) != 3:
            raise TokenError(f"{where}: expected 'name scopes sha256hex', e.g. 'client-app read,write <64 hex>'")
        name, scopes, digest = fields
        try:
            entry = FileEntry(check_name(name), check_scopes(scopes.split(",")), check_sha256(digest.lower()), number)
        except TokenError as exc:
            raise TokenError(f"{where}: {exc}") from None
        if name in seen:
            raise TokenError(f"{where}: token {name!r} is given twice (also line {seen[name]})")
        if entry.sha256 in hashes:
            raise TokenError(f"{where}: the same hash as line {hashes[entry.sha256]}")
        seen[name], hashes[entry.sha256] = number, number
        entries.append(entry)
    return entries


def import_tokens(conn: psycopg.Connection[Any], entries: Sequence[FileEntry]) -> int:
    """Make the table hold the file's tokens (upserted, source `file`, un-revoked) and revoke the tokens an earlier
    version of the file brought that it no longer lists: the file is the truth for the tokens it brings. One
    transaction (all or nothing); returns how many tokens changed. A conflict (the hash of another token) raises
    TokenError naming the line."""
    changed = 0
    try:
        with conn.transaction():
            for entry in entries:
                try:
                    changed += ensure(conn, entry.name, entry.scopes, sha256=entry.sha256, source="file")
                except TokenError as exc:
                    raise TokenError(f"line {entry.line}: {exc}") from None
            cur = conn.execute(
                "UPDATE dejima.api_tokens SET revoked_at = now()"
                " WHERE source = 'file' AND revoked_at IS NULL AND NOT (name = ANY(%s))",
                ([e.name for e in entries],),
            )
            changed += cur.rowcount
    except psycopg.Error as exc:
        if _missing_table(exc):
            raise TokenError(NOT_INSTALLED) from None
        raise
    return changed


# ---- the store: Authorization header -> principal ----------------------------------------------------------------


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (the scheme in any case); None otherwise."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class TokenStore:
    """The active tokens of one peer database, cached (module docstring). Thread-safe."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        refresh_s: float = REFRESH_S,
        stale_limit_s: float = STALE_LIMIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.refresh_s = refresh_s
        self.stale_limit_s = stale_limit_s
        self.clock = clock
        self._active: tuple[tuple[bytes, Principal], ...] | None = None
        self._loaded_at = float("-inf")  # when _active was read (clock)
        self._tried_at = float("-inf")  # when a read was last tried
        self._failure = ""  # why the last read failed ("" when it did not)
        self._refreshing = threading.Lock()

    def _read(self) -> tuple[tuple[bytes, Principal], ...]:
        with self.pool.connection(timeout=5) as conn:
            rows = conn.execute(
                "SELECT name, scopes, token_sha256 FROM dejima.api_tokens WHERE revoked_at IS NULL"
            ).fetchall()
        return tuple((str(h).encode(), Principal(str(n), frozenset(s))) for n, s, h in rows)

    def _usable(self, now: float) -> tuple[tuple[bytes, Principal], ...]:
        if self._active is not None and now - self._loaded_at < self.stale_limit_s:
            return self._active
        raise TokensUnavailable(f"cannot read the API tokens: {self._failure or 'not read yet'}")

    def active(self) -> tuple[tuple[bytes, Principal], ...]:
        """(sha256 hex as bytes, principal) of every token not revoked, read again when the last try is older than
        refresh_s. One thread reads while the others go on with what was read before; while the database cannot be
        read, that serves for stale_limit_s, then TokensUnavailable (tried again every refresh_s)."""
        now = self.clock()
        if now - self._tried_at < self.refresh_s or not self._refreshing.acquire(blocking=self._active is None):
            return self._usable(now)
        try:
            if self.clock() - self._tried_at < self.refresh_s:  # another thread read (or tried) meanwhile
                return self._usable(self.clock())
            self._tried_at = self.clock()
            try:
                fresh = self._read()
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                self._failure = str(exc).strip() or type(exc).__name__
                log.warning(
                    "cannot read the API tokens (%s); the last ones read serve for at most %g s",
                    self._failure,
                    self.stale_limit_s,
                )
                return self._usable(self.clock())
            self._active, self._loaded_at, self._failure = fresh, self.clock(), ""
            return fresh
        finally:
            self._refreshing.release()

    def authenticate(self, header: str | None) -> Principal | None:
        """The principal of an `Authorization` header value, None for no, a malformed, an unknown or a revoked token.
        Raises TokensUnavailable when the tokens cannot be read."""
        token = bearer(header)
        if token is None:
            return None
        active = self.active()
        presented = token_sha256(token).encode()
        found: Principal | None = None
        for digest, principal in active:  # every one compared: the time does not tell which matched, or where
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


# ---- who may do what: shared by both fronts (peer/dejima/apiauth.py for Django, the lean client listener) ----------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POSTS = frozenset({"/api/v1/query"})  # a POST that only reads
WWW_AUTHENTICATE = 'Bearer realm="dejima"'
# the words of the refusals (not secrets)
NO_TOKEN = "this endpoint needs an API token: send the header 'Authorization: Bearer <token>'"  # noqa: S105
NOT_BEARER = "the Authorization header must be 'Bearer <token>'"
BAD_TOKEN = "unknown or revoked API token"  # noqa: S105


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, as both fronts answer it: 401 `unauthorized` (with WWW-Authenticate: Bearer),
    403 `forbidden`, or 503 when the tokens cannot be read."""

    status: int
    kind: str
    message: str

    def body(self) -> dict[str, str]:
        return {"status": "error", "kind": self.kind, "error": self.message}

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": WWW_AUTHENTICATE} if self.status == 401 else {}


def needed_scope(method: str, path: str) -> str:
    """`read` for every GET (HEAD, OPTIONS) and for the POSTs that only read (query); `write` for anything else, so
    that a new endpoint that changes something needs `write` unless it is listed here."""
    return "read" if method.upper() in SAFE_METHODS or path in READ_POSTS else "write"


def identify(store: TokenStore, header: str | None) -> Principal | Refusal:
    """The principal of a request's Authorization header, or why not (401; 503 when the tokens cannot be read)."""
    if header is None or not header.strip():
        return Refusal(401, "unauthorized", NO_TOKEN)
    if bearer(header) is None:
        return Refusal(401, "unauthorized", NOT_BEARER)
    try:
        principal = store.authenticate(header)
    except TokensUnavailable as exc:
        return Refusal(503, "unreachable", f"this peer cannot check API tokens now ({exc}); try again")
    return principal if principal is not None else Refusal(401, "unauthorized", BAD_TOKEN)


def permitted(principal: Principal, method: str, path: str) -> Refusal | None:
    """None when the principal's token has the scope `method path` needs, else the 403."""
    scope = needed_scope(method, path)
    if scope in principal.scopes:
        return None
    return Refusal(
        403, "forbidden", f"API token {principal.name!r} lacks the {scope!r} scope, which {method} {path} needs"
    )


def authorize(store: TokenStore, method: str, path: str, header: str | None) -> Principal | Refusal:
    """Both checks: who (401) and whether they may (403)."""
    verdict = identify(store, header)
    if isinstance(verdict, Refusal):
        return verdict
    return permitted(verdict, method, path) or verdict


def log_refusal(refusal: Refusal, method: str, path: str, remote: str) -> None:
    """A failed attempt, with who tried and where; never the token (no message above holds it)."""
    log.warning("refused %s %s from %s: %d %s", method, path, remote or "?", refusal.status, refusal.message)
