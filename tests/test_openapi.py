"""The OpenAPI schemas of the peer and client APIs, and a bounded schemathesis run against real processes.

Unit: generating each schema (peer mode and client mode) gives no warning and no error, and validates as OpenAPI.
Cluster: schemathesis (fixed seed, a few examples per operation, examples + coverage + fuzzing phases, positive and
negative data) against a running peer of the example network and a running client in front of government: no 5xx,
every answer conforms to the schema (status, content type, body), schema-invalid input is refused with a 4xx, and
nothing is applied by any refused request: every peer's base table, dejima views, transaction log and prepared
transactions read the same before and after it. Unsigned peer messages are refused (401, or 400 when malformed).
The peer's API token is given to schemathesis as the schema's bearer scheme: its `ignored_auth` check also sends
each protected operation without it and with a wrong one, and expects 401 or 403.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import schemathesis
from psycopg import sql
from schemathesis import Case
from schemathesis.core.result import Ok
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.pytest._test_builder import build_operation_test

from peer.network import LocalNetwork
from peer.testkit.proxy import settle
from tests.helpers import browser_session, wait_until

ROOT = Path(__file__).resolve().parent.parent
PEER_SCHEMA = "/api/v1/openapi.json"
CLIENT_SCHEMA = "/client/api/v1/openapi.json"
SEED = 20260401
MAX_EXAMPLES = 30  # per operation, in the fuzzing phase; the examples and coverage phases add their own
PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
TIMEOUT = 30
# Statements schemathesis draws from for "sql" (half the time): reads, writes, bad names, constraint violations and
# SQL-injection strings, in values and in identifiers. Whatever is refused must change nothing anywhere.
SQL = [
    "SELECT count(*) FROM government_users",
    "SELECT * FROM government_users WHERE last_name = '' OR '1'='1'",
    "INSERT INTO government_users (first_name, last_name, phone) VALUES ('Rob', 'Tables''); DROP TABLE x; --', '1')",
    "UPDATE government_users SET phone = phone || '1' WHERE first_name = 'Rob'",
    "INSERT INTO government_users (first_name) VALUES ('Only')",
    "INSERT INTO \"government_users; DROP TABLE government_users; --\" (first_name) VALUES ('x')",
    'SELECT "first_name"; DROP TABLE government_users; --" FROM government_users',
    "DELETE FROM government_users WHERE first_name = 'Rob'",
    "SELECT 1; SELECT 2",
]

# ---- the schema generates cleanly ---------------------------------------------------------------------------------


def _spectacular(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "schema.json"
    return subprocess.run(
        [
            sys.executable,
            "manage.py",
            "spectacular",
            "--validate",
            "--fail-on-warn",
            "--format",
            "openapi-json",
            "--file",
            str(out),
        ],
        env={"PATH": os.environ.get("PATH", ""), "DEJIMA_DEBUG": "1", "PEER_TYPE": "government", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mode", "paths"),
    [
        ("peer", {"/peer/v1/message", "/api/v1/exec", "/api/v1/query", "/api/v1/views/{view}", "/api/v1/txlog"}),
        ("client", {"/client/api/v1/tables", "/client/api/v1/tables/{table}/rows/{row_id}"}),
    ],
)
def test_the_schema_generates_without_warnings_and_validates(mode: str, paths: set[str], tmp_path: Path) -> None:
    env = {
        "DEJIMA_DATABASE_URL": "postgresql://localhost/unused",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://localhost/unused",
    }
    if mode == "client":
        env = {"PEER_MODE": "client", "DEJIMA_PEER_URL": "http://127.0.0.1:1", "DEJIMA_CLIENT_DB": str(tmp_path / "u")}
    done = _spectacular(env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Error" not in done.stderr, done.stderr
    schema = schemathesis.openapi.from_path(str(tmp_path / "schema.json")).raw_schema
    assert paths <= set(schema["paths"]), sorted(schema["paths"])
    assert all(p.startswith("/client/api/v1/") for p in schema["paths"]) == (mode == "client")


# ---- the state of every peer: what a refused request must leave as it was ----------------------------------------


def peer_state(conn: psycopg.Connection[Any], peer: str) -> dict[str, Any]:
    """Base table, every dejima view, txlog length and prepared transactions of one peer's database."""
    views = [
        str(r[0])
        for r in conn.execute(
            "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'"
            " AND table_name LIKE 'dejima\\_%' ORDER BY 1"
        ).fetchall()
    ]
    state: dict[str, Any] = {}
    for relation in [TABLES[peer], *views]:
        rows = conn.execute(sql.SQL("SELECT to_jsonb(t)::text FROM {} t ORDER BY 1").format(sql.Identifier(relation)))
        state[relation] = [r[0] for r in rows.fetchall()]
    # the logged gxids, chained or still staged (the sealer may chain staged ones meanwhile)
    state["txlog"] = conn.execute(
        "SELECT array_agg(gxid ORDER BY gxid) FROM"
        " (SELECT gxid FROM dejima.txlog UNION ALL SELECT gxid FROM dejima.txlog_pending) AS logged"
    ).fetchone()
    state["prepared"] = conn.execute(
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
    ).fetchone()
    return state


class Watch:
    """Reads every peer's state straight from its database (autocommit: committed state only)."""

    def __init__(self, net: LocalNetwork) -> None:
        self.net = net
        self.conns = {
            p: psycopg.connect(net.server.url(net.specs[p].database), autocommit=True) for p in PEERS if p in net.specs
        }
        self.tally: Counter[str] = Counter()
        self.started = time.monotonic()

    def quiet(self) -> dict[str, Any]:
        """The state once nothing is prepared anywhere (a write's participants commit after its answer)."""
        # First let each peer finish what it prepared: the poll below reads the tables before the prepared count, so a
        # COMMIT PREPARED landing between the two would pass a state that misses the write.
        for peer in self.conns:
            settle(self.net.specs[peer].url, self.net.auth_headers(peer))

        def settled() -> dict[str, Any] | None:
            state = {p: peer_state(c, p) for p, c in self.conns.items()}
            return state if all(s["prepared"] == (0,) for s in state.values()) else None

        result: dict[str, Any] = wait_until(settled, 15, "no prepared transaction at any peer")
        return result

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def check_case(watch: Watch, case: Case[Any], **call: Any) -> None:
    """Call the API with the case; the answer conforms to the schema and, when it is a refusal, changed nothing."""
    before = watch.quiet()
    response = case.call(timeout=TIMEOUT, **call)
    status = response.status_code
    watch.tally[f"{case.operation.label} {status}"] += 1
    # not_a_server_error, status code / content type / body / headers conformance, negative data rejected (4xx), …
    case.validate_response(response, headers=call.get("headers"))
    assert status < 500, response.text
    if status >= 400:
        after = watch.quiet()
        assert after == before, f"{case.operation.label} answered {status} but changed: {response.text}"


# Not positive_data_acceptance: a string the schema allows as "sql" may still be SQL the peer refuses (400).
CHECKS: dict[str, Any] = {"positive_data_acceptance": {"enabled": False}}
GENERATION = {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none", "no-shrink": True}


def config(extra: dict[str, Any] | None = None) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": GENERATION,
            "phases": {"stateful": {"enabled": False}},
            "checks": CHECKS,
            "request-timeout": TIMEOUT,
            **(extra or {}),
        }
    )


def report(name: str, watch: Watch) -> Counter[str]:
    """Print what the run did (visible with -s), and start counting anew; the requests made, by operation and
    status."""
    elapsed = time.monotonic() - watch.started
    ops = {key.rsplit(" ", 1)[0] for key in watch.tally}
    print(f"\n{name}: {len(ops)} operations, {sum(watch.tally.values())} requests in {elapsed:.1f}s")
    for key, n in sorted(watch.tally.items()):
        print(f"  {key}: {n}")
    made = Counter(watch.tally)
    watch.tally.clear()
    watch.started = time.monotonic()
    return made


# The operations each run must drive, written out here (not read from the schema under test): a schema that lost an
# operation, or a run that generated nothing for one, fails. Each got at least MIN_REQUESTS requests: the fewest,
# an operation without parameters (GET /health), gets its examples and a 405 for each method it does not take.
PEER_OPERATIONS = {
    "GET /health",
    "GET /api/v1/status",
    "GET /api/v1/groups",
    "GET /api/v1/machinery",
    "GET /api/v1/prepared",
    "GET /api/v1/txlog",
    "GET /api/v1/views/{view}",
    "POST /api/v1/exec",
    "POST /api/v1/query",
    "POST /peer/v1/message",
}
CLIENT_OPERATIONS = {
    "GET /client/api/v1/tables",
    "GET /client/api/v1/tables/{table}",
    "GET /client/api/v1/tables/{table}/rows",
    "POST /client/api/v1/tables/{table}/rows",
    "GET /client/api/v1/tables/{table}/rows/{row_id}",
    "PATCH /client/api/v1/tables/{table}/rows/{row_id}",
    "DELETE /client/api/v1/tables/{table}/rows/{row_id}",
}
MIN_REQUESTS = 8


def assert_every_operation_driven(made: Counter[str], operations: set[str]) -> None:
    """Every operation got requests, MIN_REQUESTS or more, and at least one was refused (and so checked to have
    changed nothing); together at least MAX_EXAMPLES per operation (the fuzzing phase alone may draw that many)."""
    by_operation: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for key, n in made.items():
        operation, status = key.rsplit(" ", 1)
        by_operation[operation] += n
        if int(status) >= 400:
            refused[operation] += n
    assert set(by_operation) == operations, sorted(set(by_operation) ^ operations)
    assert min(by_operation.values()) >= MIN_REQUESTS, by_operation
    assert set(refused) == operations, sorted(operations - set(refused))
    assert sum(by_operation.values()) >= MAX_EXAMPLES * len(operations), by_operation


def run_schemathesis(schema: schemathesis.BaseSchema, test: Callable[[Case[Any]], None]) -> dict[str, str]:
    """Run `test` on the cases schemathesis generates for every operation of `schema` (its phases, settings and seed
    from the schema's config); the failures, by operation. (Schemathesis' own pytest integration does not run under
    this pytest, so the operations are driven here with the builder it uses.)"""
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures[str(result.err())] = "the schema is invalid here"
            continue
        operation = result.ok()
        hypothesis_test = build_operation_test(
            config=schema.config, operation=operation, test_func=test, given_kwargs={}, feedback=FeedbackSources()
        )
        try:
            hypothesis_test()
        except Exception as exc:  # noqa: BLE001  (every failure is reported, by operation)
            failures[operation.label] = f"{type(exc).__name__}: {exc}"
    return failures


# ---- the peer ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def watch(example_network: LocalNetwork) -> Iterator[Watch]:
    watch = Watch(example_network)
    yield watch
    watch.close()


@pytest.mark.cluster
def test_the_peer_api_never_fails_and_changes_nothing_it_refuses(network: LocalNetwork, watch: Watch) -> None:
    schema = schemathesis.openapi.from_url(
        network.specs["government"].url + PEER_SCHEMA,
        headers=network.auth_headers("government"),  # the schema itself needs a token with the read scope
        config=config(
            {
                "auth": {"openapi": {"bearerToken": {"bearer": network.token("government")}}},
                "dictionaries": {"views": {"values": ["dejima_bank", "dejima_insurance"]}, "sql": {"values": SQL}},
                "parameters": {
                    "path.view": {"dictionary": "views", "probability": 0.5},
                    "body.sql": {"dictionary": "sql", "probability": 0.5},
                },
            }
        ),
    )

    def test(case: Case[Any]) -> None:
        if case.operation.path != "/peer/v1/message":
            check_case(watch, case)
            return
        before = watch.quiet()
        response = case.call(timeout=TIMEOUT)
        watch.tally[f"{case.operation.label} {response.status_code}"] += 1
        case.validate_response(response)
        # nothing here is signed by a trusted peer: refused (401), or malformed (400) before that
        assert response.status_code in (400, 401, 405), response.text
        assert watch.quiet() == before

    failures = run_schemathesis(schema, test)
    made = report("peer (government)", watch)
    assert not failures, "\n\n".join(f"{op}: {text}" for op, text in failures.items())
    assert_every_operation_driven(made, PEER_OPERATIONS)
    assert made["POST /peer/v1/message 401"] > 0, "no well-formed unsigned message was sent"
    assert made["POST /api/v1/exec 200"] > 0, "no write was accepted: the accepted path went untried"


@pytest.mark.cluster
def test_the_peer_serves_its_schema_at_a_stable_url(network: LocalNetwork) -> None:
    resp = requests.get(network.specs["bank"].url + PEER_SCHEMA, headers=network.auth_headers("bank"), timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/vnd.oai.openapi+json"
    schema = resp.json()
    assert schema["openapi"].startswith("3.")
    exec_op = schema["paths"]["/api/v1/exec"]["post"]
    assert {"200", "400", "401", "403", "409", "413", "422"} <= set(exec_op["responses"])
    assert "requestBody" in exec_op
    # the API token: a bearer scheme on every operation but the two open ones, whose 401 and 403 are documented
    assert schema["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerToken"]["description"],
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in ("/health", "/peer/v1/message"):
                assert all(not requirement for requirement in operation.get("security", [])), (path, method)
                continue
            assert operation["security"] == [{"bearerToken": []}], (path, method)
            assert {"401", "403"} <= set(operation["responses"]), (path, method)
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"], (path, method)
    assert "'write' scope" in exec_op["responses"]["403"]["description"]
    assert "'read' scope" in schema["paths"]["/api/v1/query"]["post"]["responses"]["403"]["description"]


@pytest.mark.cluster
def test_an_unknown_path_is_a_json_404(network: LocalNetwork) -> None:
    resp = requests.get(
        network.specs["bank"].url + "/api/v1/nope", headers=network.auth_headers("bank"), timeout=TIMEOUT
    )
    assert resp.status_code == 404
    assert resp.json()["kind"] == "not_found", resp.text


# ---- the client ----------------------------------------------------------------------------------------------------


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()


def login(url: str, password: str) -> requests.Session:
    """A session logged in through the client's login form, sending its CSRF token as X-CSRFToken (as a script using
    the REST API with a session must). Cheaper per request than HTTP Basic, which hashes the password every time."""
    session = browser_session(url)
    form = session.get(f"{url}/login", timeout=TIMEOUT)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert token, form.text
    resp = session.post(
        f"{url}/login",
        data={"username": "admin", "password": password, "csrfmiddlewaretoken": token.group(1), "next": "/"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 302, resp.text
    session.headers["X-CSRFToken"] = next(str(c.value) for c in session.cookies if c.name.endswith("_csrftoken"))
    return session


@pytest.mark.cluster
def test_the_client_api_never_fails_and_changes_nothing_it_refuses(
    network: LocalNetwork, government_client: tuple[str, str], watch: Watch
) -> None:
    url, password = government_client
    people = [f"('Row{i}', 'Seed', '555-01{i:02d}', '{i} Elm St')" for i in range(4)]
    status, answer = network.exec(
        "government",
        "INSERT INTO government_users (first_name, last_name, phone, address) VALUES " + ", ".join(people),  # noqa: S608
    )
    assert status == 200, answer
    ids = [r["id"] for r in network.query("government", "SELECT id FROM government_users ORDER BY id")]
    with login(url, password) as session:
        resp = session.get(url + CLIENT_SCHEMA, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        schema = schemathesis.openapi.from_dict(
            resp.json(),
            config=config(
                {
                    "base-url": url,
                    # the session logs in; ignored_auth would resend through it (anonymous 401s: test_client.py)
                    "generation": {**GENERATION, "with-security-parameters": False},
                    "checks": {**CHECKS, "ignored_auth": {"enabled": False}},
                    "dictionaries": {"tables": {"values": ["government_users"]}, "ids": {"values": ids}},
                    "parameters": {
                        "path.table": {"dictionary": "tables", "probability": 0.8},
                        "path.row_id": {"dictionary": "ids", "probability": 0.5},
                    },
                }
            ),
        )
        failures = run_schemathesis(schema, lambda case: check_case(watch, case, session=session))
    made = report("client (government-client)", watch)
    assert not failures, "\n\n".join(f"{op}: {text}" for op, text in failures.items())
    assert_every_operation_driven(made, CLIENT_OPERATIONS)
    assert made["DELETE /client/api/v1/tables/{table}/rows/{row_id} 200"] > 0, "no row of the seeded ones was deleted"


@pytest.mark.cluster
def test_the_client_schema_needs_a_login(government_client: tuple[str, str]) -> None:
    url, password = government_client
    anonymous = requests.get(url + CLIENT_SCHEMA, timeout=TIMEOUT)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    resp = requests.get(url + CLIENT_SCHEMA, headers={"Authorization": basic(password)}, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert "/client/api/v1/tables/{table}/rows" in resp.json()["paths"]
    missing = requests.get(url + "/client/api/v1/nope", headers={"Authorization": basic(password)}, timeout=TIMEOUT)
    assert (missing.status_code, missing.json()["kind"]) == (404, "not_found")
