"""API tokens (peer/dejima/tokens.py, apiauth.py): nobody uses a peer's client API without a token.

Unit: names, scopes, hashes, the Authorization header, the tokens file and the client's token setting.
Integration (real PostgreSQL): create / ensure / revoke / list, the store's cache, the tokens file's import, the
management command end to end. Cluster (real peer processes): the whole lifecycle on both fronts (gunicorn and the
lean client listener), the same refusals on both, a failed attempt logged without the token, the tokens file at
start, the kit's token files, the CLI, a client whose token is refused, and the property that no route of the URL
conf and no operation of the OpenAPI schema but /health and /peer/v1/message answers 2xx without a valid token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from django.urls import URLPattern, URLResolver
from psycopg_pool import ConnectionPool

from peer.dejima import tokens
from peer.dejima.config import ConfigError, load_config
from peer.dejima.tokens import Principal, TokenError, TokenStore
from peer.network import LocalNetwork, free_port
from tests.conftest import PeerDb
from tests.helpers import start_client, start_peer_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30
OPEN = {"/health", "/peer/v1/message"}
GARBAGE = "dj_" + "garbage" * 6
QUERY = {"sql": "SELECT 1 AS one"}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PEER_ENV = {
    "PEER_TYPE": "government",
    "DEJIMA_DATABASE_URL": "postgresql://localhost/x",
    "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@localhost/x",
    "DEJIMA_DEBUG": "1",
}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- unit ----------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_names_scopes_and_hashes_are_checked() -> None:
    for good in ("a", "client-app", "bank.reader_2", "x" * 64):
        assert tokens.check_name(good) == good
    for bad in ("", "A", "with space", "x" * 65, "semi;colon", "ünï"):
        with pytest.raises(TokenError, match="is not a token name"):
            tokens.check_name(bad)
    assert tokens.check_scopes(["write", "read", "write"]) == ("read", "write")
    with pytest.raises(TokenError, match="at least one scope"):
        tokens.check_scopes([])
    with pytest.raises(TokenError, match="unknown scope 'admin'"):
        tokens.check_scopes(["read", "admin"])
    assert tokens.check_sha256(sha("x")) == sha("x")
    with pytest.raises(TokenError, match="64 of 0-9 and a-f"):
        tokens.check_sha256(sha("x").upper())
    token = tokens.new_token()
    assert token.startswith("dj_") and len(token) == 46 and tokens.new_token() != token
    assert tokens.token_sha256(token) == sha(token)


@pytest.mark.unit
def test_the_authorization_header_and_the_scope_a_request_needs() -> None:
    assert tokens.bearer("Bearer abc") == "abc"
    assert tokens.bearer("bearer   abc  ") == "abc"
    for bad in (None, "", "abc", "Basic abc", "Bearer", "Bearer a b"):
        assert tokens.bearer(bad) is None
    assert tokens.needed_scope("GET", "/api/v1/status") == "read"
    assert tokens.needed_scope("HEAD", "/api/v1/anything") == "read"
    assert tokens.needed_scope("POST", "/api/v1/query") == "read"
    assert tokens.needed_scope("POST", "/api/v1/exec") == "write"
    assert tokens.needed_scope("POST", "/api/v1/a-new-endpoint") == "write"  # a new write needs write by default
    reader = Principal("r", frozenset({"read"}))
    assert tokens.permitted(reader, "GET", "/api/v1/status") is None
    refusal = tokens.permitted(reader, "POST", "/api/v1/exec")
    assert refusal is not None and (refusal.status, refusal.kind) == (403, "forbidden")
    assert refusal.message == "API token 'r' lacks the 'write' scope, which POST /api/v1/exec needs"


@pytest.mark.unit
def test_the_tokens_file_is_parsed_and_a_bad_line_is_named(tmp_path: Path) -> None:
    good = f"# the client app\n\nclient-app read,write {sha('a')}\nauditor read {sha('b')}  # read only\n"
    entries = tokens.parse_tokens_file(good)
    assert [(e.name, e.scopes, e.sha256, e.line) for e in entries] == [
        ("client-app", ("read", "write"), sha("a"), 3),
        ("auditor", ("read",), sha("b"), 4),
    ]
    bad_lines = {
        "client-app read": "line 2: expected 'name scopes sha256hex'",
        f"Client read {sha('a')}": "line 2: 'Client' is not a token name",
        f"app admin {sha('a')}": "line 2: unknown scope 'admin'",
        "app read deadbeef": "line 2: a token hash is the sha256",
        f"auditor read {sha('c')}": "line 2: token 'auditor' is given twice (also line 1)",
        f"other read {sha('b')}": "line 2: the same hash as line 1",
    }
    for line, message in bad_lines.items():
        text = f"auditor read {sha('b')}\n{line}\n"
        with pytest.raises(TokenError) as err:
            tokens.parse_tokens_file(text)
        assert message in str(err.value)
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ConfigError) as config_err:
            load_config({**PEER_ENV, "DEJIMA_API_TOKENS_FILE": str(path)})
        assert config_err.value.setting == "DEJIMA_API_TOKENS_FILE"
        assert message in str(config_err.value)
    path = tmp_path / "tokens"
    path.write_text(good)
    config = load_config({**PEER_ENV, "DEJIMA_API_TOKENS_FILE": str(path)})
    assert (config.api_tokens_file, [e.name for e in config.api_tokens]) == (path, ["client-app", "auditor"])
    with pytest.raises(ConfigError, match=r"^DEJIMA_API_TOKENS_FILE: cannot read"):
        load_config({**PEER_ENV, "DEJIMA_API_TOKENS_FILE": str(tmp_path / "missing")})


@pytest.mark.unit
def test_a_client_needs_its_token_outside_debug(tmp_path: Path) -> None:
    env = {
        "PEER_TYPE": "government",
        "PEER_MODE": "client",
        "DEJIMA_PEER_URL": "http://127.0.0.1:8001",
        "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
        "DEJIMA_CLIENT_PASSWORD": "a-long-client-password",
    }
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert err.value.setting == "DEJIMA_PEER_TOKEN"
    assert "is missing; outside debug (DEJIMA_DEBUG=1)" in str(err.value)
    assert load_config({**env, "DEJIMA_DEBUG": "1"}).peer_token == ""
    token = tokens.new_token()
    config = load_config({**env, "DEJIMA_PEER_TOKEN": token})
    assert config.peer_token == token and token not in repr(config)
    path = tmp_path / "token"
    path.write_text(token + "\n")
    assert load_config({**env, "DEJIMA_PEER_TOKEN_FILE": str(path)}).peer_token == token
    for bad_env, setting, message in (
        ({"DEJIMA_PEER_TOKEN": "short"}, "DEJIMA_PEER_TOKEN", "is not an API token"),
        ({"DEJIMA_PEER_TOKEN": "dj_" + "x" * 20 + " y"}, "DEJIMA_PEER_TOKEN", "is not an API token"),
        ({"DEJIMA_PEER_TOKEN": "  "}, "DEJIMA_PEER_TOKEN", "is empty"),
        ({"DEJIMA_PEER_TOKEN": token, "DEJIMA_PEER_TOKEN_FILE": str(path)}, "DEJIMA_PEER_TOKEN_FILE", "give the token"),
        ({"DEJIMA_PEER_TOKEN_FILE": str(tmp_path / "missing")}, "DEJIMA_PEER_TOKEN_FILE", "cannot read"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config({**env, **bad_env})
        assert err.value.setting == setting and message in str(err.value), str(err.value)
    assert load_config({**PEER_ENV, "DEJIMA_DEBUG": ""} | {"DEJIMA_SECRET_KEY": "x" * 40}).peer_token == ""  # a peer


# ---- integration: the table and the store ------------------------------------------------------------------------


@pytest.fixture
def db(peer_db: PeerDb) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(peer_db("government"), autocommit=True) as conn:
        yield conn


def rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT * FROM dejima.api_tokens ORDER BY name").fetchall()


@pytest.mark.integration
def test_create_list_revoke_and_ensure(db: psycopg.Connection[Any]) -> None:
    token = tokens.create(db, "app", ["write", "read"])
    (row,) = rows(db)
    assert row[:4] == ("app", ["read", "write"], sha(token), "command") and row[5] is None
    (listed,) = tokens.list_tokens(db)
    assert (listed.name, listed.scopes, listed.source, listed.revoked) == ("app", ("read", "write"), "command", None)
    shown = json.dumps([t.to_json() for t in tokens.list_tokens(db)])
    assert token not in shown and sha(token) not in shown
    # bad input: a clear error, nothing changed
    before = rows(db)
    for call, message in (
        (lambda: tokens.create(db, "app", ["read"]), "exists already"),
        (lambda: tokens.create(db, "Bad Name", ["read"]), "is not a token name"),
        (lambda: tokens.create(db, "other", ["admin"]), "unknown scope"),
        (lambda: tokens.revoke(db, "nobody"), "no token named 'nobody'"),
        (lambda: tokens.ensure(db, "twin", ["read"], token=token), "another token has the same secret"),
        (lambda: tokens.ensure(db, "app", ["read"], token="a", sha256=sha("a")), "not both"),
    ):
        with pytest.raises(TokenError, match=message):
            call()
        assert rows(db) == before
    assert tokens.revoke(db, "app") is True
    assert tokens.revoke(db, "app") is False  # already
    assert rows(db)[0][5] is not None
    rotated = tokens.create(db, "app", ["read"])  # a revoked name is taken anew: a new secret
    assert rotated != token and rows(db)[0][2] == sha(rotated) and rows(db)[0][5] is None
    # ensure: written once, then nothing to do; it un-revokes and changes scopes or secret
    assert tokens.ensure(db, "kit", ["read", "write"], token="dj_kit-token-0123456789") is True
    assert tokens.ensure(db, "kit", ["read", "write"], token="dj_kit-token-0123456789") is False
    tokens.revoke(db, "kit")
    assert tokens.ensure(db, "kit", ["read", "write"], token="dj_kit-token-0123456789") is True
    assert tokens.ensure(db, "kit", ["read"], sha256=sha("other")) is True
    assert rows(db)[0][:3] == ("app", ["read"], sha(rotated))
    assert rows(db)[1][:3] == ("kit", ["read"], sha("other"))


@pytest.mark.integration
def test_an_uninstalled_database_is_said_plainly(make_database: Any) -> None:
    with psycopg.connect(make_database("bare"), autocommit=True) as conn:
        with pytest.raises(TokenError, match="install the peer type first"):
            tokens.create(conn, "app", ["read"])
        with pytest.raises(TokenError, match="install the peer type first"):
            tokens.list_tokens(conn)


@pytest.mark.integration
def test_the_store_caches_and_sees_a_revocation_at_its_next_read(db: psycopg.Connection[Any], peer_db: PeerDb) -> None:
    url = db.info.dsn
    token = tokens.create(db, "app", ["read"])
    now = [0.0]
    with ConnectionPool(url, min_size=1, max_size=2, open=True, kwargs={"autocommit": True}) as pool:
        store = TokenStore(pool, refresh_s=1.0, clock=lambda: now[0])
        assert store.authenticate(f"Bearer {token}") == Principal("app", frozenset({"read"}))
        assert store.authenticate(f"Bearer {GARBAGE}") is None
        assert store.authenticate(f"Basic {token}") is None
        tokens.revoke(db, "app")
        now[0] = 0.5  # within refresh_s: the cached tokens answer, no database read
        assert store.authenticate(f"Bearer {token}") is not None
        now[0] = 1.5
        assert store.authenticate(f"Bearer {token}") is None
        fresh = tokens.create(db, "app", ["read", "write"])
        now[0] = 3.0
        assert store.authenticate(f"Bearer {fresh}") == Principal("app", frozenset({"read", "write"}))
        # the database out of reach: what was read serves for stale_limit_s, then the peer says it cannot check (503)
        pool.close()
        now[0] = 5.0
        assert store.authenticate(f"Bearer {fresh}") is not None
        now[0] = 3.0 + tokens.STALE_LIMIT_S + 1
        with pytest.raises(tokens.TokensUnavailable):
            store.authenticate(f"Bearer {fresh}")
        refusal = tokens.identify(store, f"Bearer {fresh}")
        assert isinstance(refusal, tokens.Refusal) and (refusal.status, refusal.kind) == (503, "unreachable")
        assert fresh not in refusal.message


@pytest.mark.integration
def test_the_tokens_file_is_imported_all_or_nothing(db: psycopg.Connection[Any]) -> None:
    tokens.create(db, "by-hand", ["read"])
    first = tokens.parse_tokens_file(f"client-app read,write {sha('a')}\nauditor read {sha('b')}\n")
    assert tokens.import_tokens(db, first) == 2
    assert tokens.import_tokens(db, first) == 0  # nothing to do the second time
    sources = {r[0]: (r[1], r[3], r[5] is None) for r in rows(db)}
    assert sources == {
        "auditor": (["read"], "file", True),
        "by-hand": (["read"], "command", True),
        "client-app": (["read", "write"], "file", True),
    }
    # a line dropped from the file: its token is revoked; one changed: updated; a hand-made token is left alone
    second = tokens.parse_tokens_file(f"client-app read {sha('c')}\n")
    assert tokens.import_tokens(db, second) == 2
    state = {r[0]: (r[2], r[5] is None) for r in rows(db)}
    assert state == {
        "auditor": (sha("b"), False),
        "by-hand": (state["by-hand"][0], True),
        "client-app": (sha("c"), True),
    }
    # a conflict (the hash of the hand-made token) changes nothing at all
    before = rows(db)
    hand_hash = state["by-hand"][0]
    conflicting = tokens.parse_tokens_file(f"new-one read {sha('d')}\nthief read {hand_hash}\n")
    with pytest.raises(TokenError, match="line 2: token 'thief': another token has the same secret"):
        tokens.import_tokens(db, conflicting)
    assert rows(db) == before


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    return subprocess.run(
        [sys.executable, "manage.py", "dejima_token", *args],
        env={**base, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_the_management_command_end_to_end(db: psycopg.Connection[Any], tmp_path: Path) -> None:
    url = db.info.dsn
    done = manage("create", "reader", "--scope", "read", "--database", url)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert re.fullmatch(r"dj_[A-Za-z0-9_-]{43}", token), done.stdout
    out = tmp_path / "writer.token"
    done = manage(
        "create", "writer", "--scope", "read", "--scope", "write", "--out", str(out), env={"DEJIMA_DATABASE_URL": url}
    )
    assert done.returncode == 0, done.stderr
    written = out.read_text().strip()
    assert written not in done.stdout and stat.S_IMODE(out.stat().st_mode) == 0o600
    listed = manage("list", "--json", "--database", url)
    assert listed.returncode == 0, listed.stderr
    assert [(t["name"], t["scopes"], t["source"], t["revoked"]) for t in json.loads(listed.stdout)] == [
        ("reader", ["read"], "command", None),
        ("writer", ["read", "write"], "command", None),
    ]
    text = manage("list", "--database", url).stdout
    for secret in (token, written, sha(token), sha(written)):
        assert secret not in listed.stdout and secret not in text
    # bad input: non-zero, a clear message, nothing changed
    before = rows(db)
    for args, message in (
        (["revoke", "nobody"], "no token named 'nobody'"),
        (["create", "reader", "--scope", "read"], "exists already"),
        (["create", "Bad", "--scope", "read"], "is not a token name"),
        (["create", "x", "--scope", "admin"], "invalid choice: 'admin'"),
        (["create", "x"], "--scope"),
        (["create", "y", "--scope", "read", "--out", str(out)], "never overwritten"),
    ):
        done = manage(*args, "--database", url)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
        assert rows(db) == before, args
    assert out.read_text().strip() == written
    missing = manage("list")
    assert missing.returncode != 0 and "DEJIMA_DATABASE_URL" in missing.stderr
    done = manage("revoke", "reader", "--database", url)
    assert (done.returncode, done.stdout.strip()) == (0, "token reader revoked"), done.stderr
    assert manage("revoke", "reader", "--database", url).stdout.strip() == "token reader was revoked already"
    assert json.loads(manage("list", "--json", "--database", url).stdout)[0]["revoked"] is not None


# ---- cluster: real peers -----------------------------------------------------------------------------------------


def make_token(net: LocalNetwork, peer: str, *scopes: str) -> tuple[str, str]:
    """(name, token) of a new token of `peer` with `scopes`, made by the management command."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    args = ["create", name, *(a for s in scopes for a in ("--scope", s))]
    done = manage(*args, "--database", net.server.url(net.specs[peer].database))
    assert done.returncode == 0, done.stderr
    return name, done.stdout.strip()


def call(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    body = QUERY if method in ("POST", "PUT", "PATCH") else None
    return requests.request(method, base + path, json=body, headers=headers, timeout=TIMEOUT, allow_redirects=False)


def fronts(net: LocalNetwork, peer: str) -> dict[str, str]:
    return {"gunicorn": net.specs[peer].url, "lean": net.specs[peer].api_url}


def refused(resp: requests.Response, status: int, kind: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert (body["status"], body["kind"]) == ("error", kind), body
    if status == 401:
        assert resp.headers["WWW-Authenticate"] == tokens.WWW_AUTHENTICATE
    return body


@pytest.mark.cluster
def test_a_tokens_lifecycle_on_both_fronts(network: LocalNetwork) -> None:
    reader_name, reader = make_token(network, "bank", "read")
    writer_name, writer = make_token(network, "bank", "read", "write")
    insert = {"sql": "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('Tok', 'En', '1')"}
    answers: dict[str, list[dict[str, Any]]] = {}
    for front, base in fronts(network, "bank").items():
        ok = requests.post(base + "/api/v1/query", json=QUERY, headers=bearer(reader), timeout=TIMEOUT)
        assert (ok.status_code, ok.json()["rows"]) == (200, [[1]]), (front, ok.text)
        wrong = requests.post(base + "/api/v1/query", json=QUERY, headers=bearer(GARBAGE), timeout=TIMEOUT)
        missing = requests.post(base + "/api/v1/query", json=QUERY, timeout=TIMEOUT)
        basic = requests.post(base + "/api/v1/query", json=QUERY, headers={"Authorization": "Basic eDp5"}, timeout=30)
        read_only = requests.post(base + "/api/v1/exec", json=insert, headers=bearer(reader), timeout=TIMEOUT)
        answers[front] = [
            refused(wrong, 401, "unauthorized"),
            refused(missing, 401, "unauthorized"),
            refused(basic, 401, "unauthorized"),
            refused(read_only, 403, "forbidden"),
        ]
        assert reader not in json.dumps(answers[front])
        assert f"{reader_name!r} lacks the 'write' scope" in answers[front][3]["error"]
    assert answers["gunicorn"] == answers["lean"]  # the same refusals, word for word
    assert network.query("bank", "SELECT * FROM bank_users") == []  # the refused write did nothing
    # a write token writes; GETs need read
    for front, base in fronts(network, "bank").items():
        body = {"sql": insert["sql"].replace("'Tok'", f"'{front}'")}
        done = requests.post(base + "/api/v1/exec", json=body, headers=bearer(writer), timeout=TIMEOUT)
        assert (done.status_code, done.json()["status"]) == (200, "committed"), done.text
    status = requests.get(network.specs["bank"].url + "/api/v1/status", headers=bearer(reader), timeout=TIMEOUT)
    assert status.status_code == 200 and status.json()["peer"] == "bank"
    # revoked: refused on both fronts within about a second (the store reads the tokens again)
    revoked = manage("revoke", reader_name, "--database", network.server.url(network.specs["bank"].database))
    assert revoked.returncode == 0, revoked.stderr

    def refused_everywhere() -> bool:
        return all(
            requests.post(base + "/api/v1/query", json=QUERY, headers=bearer(reader), timeout=TIMEOUT).status_code
            == 401
            for base in fronts(network, "bank").values()
        )

    wait_until(refused_everywhere, 10, "the revoked token to be refused on both fronts")
    assert requests.post(
        network.specs["bank"].api_url + "/api/v1/query", json=QUERY, headers=bearer(writer), timeout=TIMEOUT
    ).ok, "another token goes on working"
    listed = manage("list", "--json", "--database", network.server.url(network.specs["bank"].database)).stdout
    assert reader not in listed and writer not in listed and writer_name in listed


@pytest.mark.cluster
def test_the_lean_listener_checks_the_token_before_it_reads_the_body(network: LocalNetwork) -> None:
    api = network.specs["bank"].api_url
    for method, data, status in (("GET", None, 405), ("POST", b"{not json", 400)):
        without = requests.request(method, api + "/api/v1/exec", data=data, timeout=TIMEOUT)
        refused(without, 401, "unauthorized")
        gunicorn = requests.request(method, network.specs["bank"].url + "/api/v1/exec", data=data, timeout=TIMEOUT)
        assert gunicorn.json() == without.json()
        with_token = requests.request(
            method, api + "/api/v1/exec", data=data, headers=network.auth_headers("bank"), timeout=TIMEOUT
        )
        assert with_token.status_code == status, with_token.text
    # a refused request's body is skipped: the kept-alive connection serves the next request
    with requests.Session() as session:
        refused(session.post(api + "/api/v1/query", json=QUERY, timeout=TIMEOUT), 401, "unauthorized")
        again = session.post(api + "/api/v1/query", json=QUERY, headers=network.auth_headers("bank"), timeout=TIMEOUT)
        assert again.status_code == 200, again.text


@pytest.mark.cluster
def test_a_failed_attempt_is_logged_with_the_address_and_without_the_token(network: LocalNetwork) -> None:
    secret = "dj_" + uuid.uuid4().hex + uuid.uuid4().hex[:11]
    for front, base in fronts(network, "insurance").items():
        path = "/api/v1/query" if front == "lean" else "/api/v1/status"
        method = "POST" if front == "lean" else "GET"
        refused(call(base, method, path, bearer(secret)), 401, "unauthorized")
        line = f"refused {method} {path} from 127.0.0.1: 401 {tokens.BAD_TOKEN}"

        def logged(line: str = line) -> bool:
            return line in network.tail("insurance", 400)

        wait_until(logged, 10, f"the log line {line!r}")
    assert secret not in network.tail("insurance", 2000)
    assert secret[3:20] not in network.tail("insurance", 2000)


def routes(patterns: list[URLPattern | URLResolver], prefix: str = "") -> list[str]:
    """Every route of a URL conf, resolved recursively, as a path (a converter replaced by a plausible value)."""
    out: list[str] = []
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            out += routes(list(pattern.url_patterns), route)
        else:
            out.append("/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "dejima_bank" if m[1] == "view" else "x", route))
    return out


@pytest.mark.cluster
def test_no_route_and_no_operation_answers_2xx_without_a_valid_token(network: LocalNetwork) -> None:
    from peer import urls

    paths = {(path, method) for path in routes(urls.urlpatterns) for method in METHODS}
    schema = network.get("bank", "/api/v1/openapi.json")
    for path, operations in schema["paths"].items():
        for method in operations:
            paths.add((re.sub(r"\{view\}", "dejima_bank", re.sub(r"\{(?!view)\w+\}", "x", path)), method.upper()))
    lean = {("/api/v1/exec", m) for m in METHODS} | {("/api/v1/query", m) for m in METHODS}
    assert {"/api/v1/openapi.json", "/api/v1/exec", "/api/v1/views/dejima_bank"} <= {p for p, _ in paths}
    assert len({p for p, _ in paths}) >= 10
    answered: dict[tuple[str, str, str, str], int] = {}
    for front, base, targets in (
        ("gunicorn", network.specs["bank"].url, paths),
        ("lean", network.specs["bank"].api_url, lean),
    ):
        for path, method in sorted(targets):
            for credential, headers in (
                ("none", {}),
                ("garbage", bearer(GARBAGE)),
                ("malformed", {"Authorization": "x"}),
            ):
                answered[(front, path, method, credential)] = call(base, method, path, headers).status_code
    successes = {key: status for key, status in answered.items() if 200 <= status < 300}
    assert {key[1] for key in successes} <= OPEN, successes
    assert ("gunicorn", "/health", "GET", "none") in successes  # the open ones stay open
    protected = {key: s for key, s in answered.items() if key[1] not in OPEN}
    assert set(protected.values()) == {401}, {k: s for k, s in protected.items() if s != 401}
    assert network.query("bank", "SELECT * FROM bank_users") == []


@pytest.mark.cluster
def test_the_tokens_file_is_imported_at_start(network: LocalNetwork, tmp_path: Path) -> None:
    file_token = tokens.new_token()
    path = tmp_path / "api_tokens"
    path.write_text(f"# deployed\nfrom-file read {sha(file_token)}\n")
    spec = network.specs["insurance"]
    network.stop("insurance")
    spec.env["DEJIMA_API_TOKENS_FILE"] = str(path)
    try:
        network.start("insurance")
        network.wait_healthy("insurance")
        ok = call(spec.api_url, "POST", "/api/v1/query", bearer(file_token))
        assert ok.status_code == 200, ok.text
        refused(call(spec.url, "POST", "/api/v1/exec", bearer(file_token)), 403, "forbidden")
        listed = manage("list", "--json", "--database", network.server.url(spec.database)).stdout
        assert {"name": "from-file", "source": "file", "scopes": ["read"]}.items() <= next(
            t for t in json.loads(listed) if t["name"] == "from-file"
        ).items()
        # the line dropped: revoked at the next start
        path.write_text("# nobody\n")
        network.stop("insurance")
        network.start("insurance")
        network.wait_healthy("insurance")
        refused(call(spec.url, "POST", "/api/v1/query", bearer(file_token)), 401, "unauthorized")
    finally:
        network.stop("insurance")
        spec.env.pop("DEJIMA_API_TOKENS_FILE", None)
        network.start("insurance")
        network.wait_ready()


@pytest.mark.integration
def test_a_peer_with_a_bad_tokens_file_refuses_to_start_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens"
    path.write_text(f"ok read {sha('a')}\nbroken read,admin {sha('b')}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    env.update({**PEER_ENV, "DEJIMA_API_TOKENS_FILE": str(path), "DEJIMA_BIND": f"127.0.0.1:{free_port()}"})
    done = start_peer_process(env)
    assert done.returncode != 0
    assert f"bad setting DEJIMA_API_TOKENS_FILE: {path}: line 2: unknown scope 'admin'" in done.stderr, done.stderr


@pytest.mark.cluster
def test_the_kit_keeps_each_peers_token_in_a_private_file_across_restarts(network: LocalNetwork) -> None:
    tokens_before = {}
    for name in network.specs:
        path = network.token_path(name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        tokens_before[name] = network.token(name)
        assert network.auth_headers(name) == bearer(tokens_before[name])
    assert len(set(tokens_before.values())) == len(tokens_before)
    network.stop("government")
    network.start("government")
    network.wait_healthy("government")
    assert network.token("government") == tokens_before["government"]
    assert network.query("government", "SELECT 1 AS one") == [{"one": 1}]
    # one peer's token is not another's
    other = call(network.specs["bank"].url, "GET", "/api/v1/status", network.auth_headers("government"))
    refused(other, 401, "unauthorized")


@pytest.mark.cluster
def test_the_cli_sends_the_kits_token(network: LocalNetwork) -> None:
    cli = [sys.executable, "-m", "peer.cli", "--network", str(network.state_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    for peer in ("bank", network.specs["bank"].url):
        done = subprocess.run(
            [*cli, "query", peer, "SELECT 1 AS one", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0 and json.loads(done.stdout)["rows"] == [[1]], done.stderr
    # a URL outside the network: DEJIMA_PEER_TOKEN, else no token (and the peer's refusal, said plainly)
    elsewhere = network.specs["bank"].url.replace("127.0.0.1", "localhost")
    done = subprocess.run(
        [*cli, "query", elsewhere, "SELECT 1"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1 and "needs an API token" in done.stderr, done.stderr
    with_env = {**env, "DEJIMA_PEER_TOKEN": network.token("bank")}
    done = subprocess.run(
        [*cli, "query", elsewhere, "SELECT 1"], env=with_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.cluster
def test_a_client_whose_token_is_refused_says_which_setting_to_fix(network: LocalNetwork, tmp_path: Path) -> None:
    # a URL of government that the kit does not know as such: start_client gives the client a token nobody knows
    url = network.specs["government"].url.replace("127.0.0.1", "localhost")
    client = start_client(network, tmp_path, "stranger-client", url)
    try:
        base, password = client.specs["stranger-client"].url, client.password("stranger-client")
        resp = requests.post(
            f"{base}/client/api/v1/tables/government_users/rows",
            json={"first_name": "No", "last_name": "Token", "phone": "1"},
            auth=("admin", password),
            timeout=TIMEOUT,
        )
        assert resp.status_code == 502, resp.text
        assert "refused this client's API token" in resp.json()["error"]
        assert "DEJIMA_PEER_TOKEN" in resp.json()["error"]
    finally:
        client.stop_all()
    assert network.query("government", "SELECT * FROM government_users") == []
