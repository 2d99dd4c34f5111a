"""Cluster tier: bad input at a running peer gets a 4xx (or a "no" vote) with a message naming what was wrong, and
nothing is applied anywhere.

Client API (`/api/v1/exec`, `/api/v1/query`, `/api/v1/views/<view>`) and the peer protocol (`/peer/v1/message`),
each checked against the databases afterwards: base tables unchanged at every peer, no propagate sent, no global
transaction left open, no prepared transaction left (`dejima check`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from peer.dejima.config import load_config
from peer.network import LocalNetwork
from peer.testkit.proxy import settle
from tests.helpers import check, claimed_sender, sign_as, wait_until

pytestmark = pytest.mark.cluster

PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
MAX_BODY = load_config(
    {
        "PEER_TYPE": "bank",
        "DEJIMA_DATABASE_URL": "postgresql://localhost/x",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@localhost/x",
        "DEJIMA_DEBUG": "1",
    }
).max_body_bytes
PROTOCOL = "dejima/1"
JSON = {"Content-Type": "application/json"}


# ---- helpers ----------------------------------------------------------------------------------------------------


def url(net: LocalNetwork, peer: str, path: str) -> str:
    return net.specs[peer].url + path


def auth(net: LocalNetwork, peer: str) -> dict[str, str]:
    """The headers of a JSON request to a peer's client API: its API token."""
    return {**JSON, **net.auth_headers(peer)}


def signed(net: LocalNetwork, message: Any) -> Any:
    """A peer message as the peer it claims to come from would send it (signed with that peer's key; a peer outside
    the network: signed by bank). Anything that is not an envelope with a body object is left as it is."""
    if not isinstance(message, dict) or not isinstance(message.get("body"), dict):
        return message
    claimed = claimed_sender(message)
    return sign_as(net, claimed if claimed in net.specs else "bank", message)


FRONTS = ["gunicorn", "api"]  # where a client's exec and query may go: the REST API, or the lean client listener


def post(net: LocalNetwork, peer: str, path: str, body: Any, front: str = "gunicorn") -> tuple[int, Any]:
    """POST `body` (bytes as they are, anything else as JSON; peer messages signed); (HTTP status, JSON answer).
    `front="lean"`: to the peer's lean listener for peer messages (DEJIMA_MESSAGE_BIND) instead of gunicorn;
    `front="api"`: to its lean client listener (DEJIMA_API_BIND). A client API call carries the peer's API token."""
    headers = JSON
    if path == "/peer/v1/message":
        body = signed(net, body)
    else:
        headers = {**JSON, **net.auth_headers(peer)}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    base = {"lean": net.specs[peer].message_url, "api": net.specs[peer].api_url}.get(front, net.specs[peer].url)
    resp = requests.post(base + path, data=data, headers=headers, timeout=30)
    return resp.status_code, resp.json()


def base_rows(net: LocalNetwork) -> dict[str, list[tuple[Any, ...]]]:
    """Every peer's base table, read straight from its database (committed state only), once the transactions
    prepared there have finished: with DEJIMA_COMMIT_WAIT=decision a write is answered before its COMMIT PREPARED
    reached the participants."""
    out = {}
    for peer in PEERS:
        settle(net.specs[peer].url, net.auth_headers(peer))
        with psycopg.connect(net.server.url(net.specs[peer].database)) as conn:
            out[peer] = conn.execute(f"SELECT * FROM {TABLES[peer]} ORDER BY id").fetchall()  # noqa: S608
    return out


def sent_messages(net: LocalNetwork) -> int:
    return sum(net.get(p, "/api/v1/status")["stats"]["propagate_sent"] for p in PEERS)


def assert_nothing_applied(net: LocalNetwork, sent_before: int | None = None) -> None:
    """Nothing changed anywhere: empty base tables, no global transaction open, none prepared, views identical."""
    wait_until(
        lambda: all(net.get(p, "/api/v1/status")["open_transactions"] == 0 for p in PEERS),
        15,
        "every global transaction to end",
    )
    assert base_rows(net) == {peer: [] for peer in PEERS}
    if sent_before is not None:
        assert sent_messages(net) == sent_before, "a propagate was sent for refused input"
    report = check(net)
    assert report["ok"], report


@pytest.fixture
def net(network: LocalNetwork) -> LocalNetwork:
    return network


def new_gxid(origin: str) -> str:
    return f"{origin}.{time.time_ns():x}.{uuid.uuid4().hex[:8]}"


def envelope(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "kind": kind, "body": body, "signature": None}


def propagate(
    view: str,
    insertions: list[dict[str, Any]],
    sender: str = "bank",
    origin: str | None = None,
    deletions: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    origin = origin or sender
    body = {
        "gxid": new_gxid(origin),
        "origin": origin,
        "sender": sender,
        "view": view,
        "insertions": insertions,
        "deletions": deletions or [],
        "timeout_ms": 5000,
        "message_id": uuid.uuid4().hex,
    }
    body.update(overrides)
    return envelope("propagate", body)


def person(**values: Any) -> dict[str, Any]:
    """A dejima_bank row."""
    return {"first_name": "Eve", "last_name": "Spy", "phone": "555-0666", "address": "6 Dark Rd", **values}


# ---- client API: /api/v1/exec and /api/v1/query ----------------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{bad", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe{}", "malformed JSON"),
        (b'{"sql": "SELECT 1"', "malformed JSON"),
    ],
    ids=["broken", "empty-body", "not-utf8", "truncated"],
)
def test_it_refuses_malformed_json_with_400(net: LocalNetwork, path: str, body: bytes, says: str, front: str) -> None:
    sent = sent_messages(net)
    status, answer = post(net, "bank", path, body, front)
    assert status == 400, answer
    assert says in answer["error"], answer
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
@pytest.mark.parametrize(
    "body",
    [
        {"sql": 5},
        {"sql": None},
        {"sql": True},
        {"sql": [1]},
        {"sql": {"text": "SELECT 1"}},
        {"sql": ["SELECT 1", 2]},
        {},
        {"statements": "SELECT 1"},
        {"sql": "SELECT 1", "extra": 1},
        [],
        ["SELECT 1"],
        "SELECT 1",
        5,
        None,
    ],
    ids=lambda b: json.dumps(b),
)
def test_it_refuses_wrong_types_with_400_naming_sql(net: LocalNetwork, path: str, body: Any, front: str) -> None:
    sent = sent_messages(net)
    status, answer = post(net, "bank", path, body, front)
    assert status == 400, answer
    assert '"sql"' in answer["error"], answer
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
@pytest.mark.parametrize("sql", ["", "   ", "\n\t", [], [""], ["SELECT 1", "  "]], ids=repr)
def test_it_refuses_empty_statements_with_400(net: LocalNetwork, path: str, sql: Any, front: str) -> None:
    sent = sent_messages(net)
    status, answer = post(net, "bank", path, {"sql": sql}, front)
    assert status == 400, answer
    assert "non-empty" in answer["error"], answer
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(
    ("path", "sql", "names"),
    [
        ("/api/v1/exec", "INSERT INTO nope (first_name) VALUES ('x')", '"nope"'),
        ("/api/v1/exec", "UPDATE bank_users SET nope = 1", '"nope"'),
        ("/api/v1/exec", "INSERT INTO bank_users (first_name, last_name, nope) VALUES ('a', 'b', 1)", '"nope"'),
        ("/api/v1/exec", "SELECT 1; garbage", '"garbage"'),
        ("/api/v1/query", "SELECT nope FROM bank_users", '"nope"'),
        ("/api/v1/query", "SELECT * FROM government_users", '"government_users"'),  # another peer's table
    ],
)
def test_it_refuses_unknown_tables_and_columns_with_400(
    net: LocalNetwork, path: str, sql: str, names: str, front: str
) -> None:
    sent = sent_messages(net)
    status, answer = post(net, "bank", path, {"sql": sql}, front)
    assert status == 400, answer
    assert names in answer["error"], answer
    assert_nothing_applied(net, sent)


def test_it_applies_none_of_several_statements_when_one_is_bad(net: LocalNetwork) -> None:
    sent = sent_messages(net)
    status, answer = net.exec(
        "bank",
        [
            "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('Jane', 'Roe', '555-0199')",
            "INSERT INTO nope VALUES (1)",
        ],
    )
    assert status == 400, answer
    assert '"nope"' in answer["error"], answer
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("front", FRONTS)
def test_it_refuses_a_write_through_the_query_endpoint(net: LocalNetwork, front: str) -> None:
    sent = sent_messages(net)
    status, answer = post(
        net, "bank", "/api/v1/query", {"sql": "INSERT INTO bank_users (first_name, last_name) VALUES ('a', 'b')"}, front
    )
    assert status == 400, answer
    assert "read-only" in answer["error"], answer
    assert_nothing_applied(net, sent)


def test_a_query_runs_read_only_under_the_statement_timeout_and_a_failed_one_leaves_nothing_open(
    net: LocalNetwork,
) -> None:
    timeout_ms = load_config(
        {
            "PEER_TYPE": "bank",
            "DEJIMA_DATABASE_URL": "postgresql://localhost/x",
            "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@localhost/x",
            "DEJIMA_DEBUG": "1",
        }
    ).statement_timeout_ms
    for _ in range(12):  # more than the pool's connections: each one comes back out of its transaction
        status, answer = post(net, "bank", "/api/v1/query", {"sql": "SELECT nope FROM bank_users"})
        assert status == 400 and '"nope"' in answer["error"], answer
        status, answer = post(
            net,
            "bank",
            "/api/v1/query",
            {"sql": "SELECT current_setting('transaction_read_only') AS ro, current_setting('statement_timeout') AS t"},
        )
        assert status == 200, answer
        assert answer["rows"] == [["on", f"{timeout_ms}ms" if timeout_ms % 1000 else f"{timeout_ms // 1000}s"]]
    idle_in_transaction = net.query(
        "bank",
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in%'",
    )
    assert idle_in_transaction == [{"n": 0}]


@pytest.mark.parametrize("front", FRONTS)
def test_a_query_answers_numbers_as_it_always_did(net: LocalNetwork, front: str) -> None:
    """numeric as a string (exact for any client), a number inside json/jsonb as a JSON number."""
    status, answer = post(
        net, "bank", "/api/v1/query", {"sql": """SELECT 12.50::numeric AS n, '{"a": 1.5}'::jsonb AS j"""}, front
    )
    assert status == 200, answer
    assert answer == {"columns": ["n", "j"], "rows": [["12.50", {"a": 1.5}]]}


@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query", "/peer/v1/message"])
def test_it_refuses_a_body_over_the_limit_with_413(net: LocalNetwork, path: str) -> None:
    sent = sent_messages(net)
    body = json.dumps({"sql": "SELECT 1 -- " + "x" * MAX_BODY}).encode()
    status, answer = post(net, "bank", path, body)
    assert status == 413, answer
    assert str(MAX_BODY) in answer["error"], answer
    assert_nothing_applied(net, sent)


def test_it_accepts_a_body_just_under_the_limit(net: LocalNetwork) -> None:
    stmt = "INSERT INTO bank_users (first_name, last_name) VALUES ('Big', 'Body') -- "
    padding = MAX_BODY - len(json.dumps({"sql": stmt})) - 16
    status, answer = post(net, "bank", "/api/v1/exec", {"sql": stmt + "x" * padding})
    assert (status, answer.get("status")) == (200, "committed"), answer
    for peer in PEERS:
        assert [(r[1], r[2]) for r in base_rows(net)[peer]] == [("Big", "Body")], peer


def _chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 64 * 1024):
        yield data[i : i + 64 * 1024]


def post_chunked(net: LocalNetwork, peer: str, path: str, data: bytes, front: str) -> requests.Response:
    """POST `data` with Transfer-Encoding: chunked (no Content-Length) to `front` of the peer (see `post`)."""
    base = {"lean": net.specs[peer].message_url, "api": net.specs[peer].api_url}.get(front, net.specs[peer].url)
    headers = JSON if path == "/peer/v1/message" else auth(net, peer)
    resp = requests.post(base + path, data=_chunks(data), headers=headers, timeout=30)
    assert resp.request.headers.get("Transfer-Encoding") == "chunked", resp.request.headers
    assert "Content-Length" not in resp.request.headers, resp.request.headers
    return resp


# What each front does with a chunked body: gunicorn reads it (Django's views read wsgi.input, which gunicorn
# de-chunks) within the same limit as a sized one; the lean listeners take sized bodies only and answer 411 before
# reading a byte of it, whatever its size.


def test_the_rest_api_reads_a_chunked_query_body(net: LocalNetwork) -> None:
    data = json.dumps({"sql": "SELECT 1 AS one, 'chunked' AS how"}).encode()
    resp = post_chunked(net, "bank", "/api/v1/query", data, "gunicorn")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"columns": ["one", "how"], "rows": [[1, "chunked"]]}


def test_the_rest_api_reads_a_chunked_exec_body_of_several_chunks_and_commits_it(net: LocalNetwork) -> None:
    stmt = "INSERT INTO bank_users (first_name, last_name) VALUES ('Chunk', 'Ed') -- "
    data = json.dumps({"sql": stmt + "x" * (3 * 64 * 1024)}).encode()  # four chunks, each read whole
    assert len(data) <= MAX_BODY
    resp = post_chunked(net, "bank", "/api/v1/exec", data, "gunicorn")
    assert (resp.status_code, resp.json().get("status")) == (200, "committed"), resp.text
    for peer in PEERS:
        assert [(r[1], r[2]) for r in base_rows(net)[peer]] == [("Chunk", "Ed")], peer


@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query", "/peer/v1/message"])
def test_the_rest_api_refuses_an_oversized_chunked_body_with_413(net: LocalNetwork, path: str) -> None:
    sent = sent_messages(net)
    stmt = "INSERT INTO bank_users (first_name, last_name) VALUES ('Too', 'Big') -- "
    data = json.dumps({"sql": stmt + "x" * MAX_BODY}).encode()
    resp = post_chunked(net, "bank", path, data, "gunicorn")
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"] == f"body is larger than the limit of {MAX_BODY} bytes", resp.text
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize(
    ("front", "path"), [("api", "/api/v1/exec"), ("api", "/api/v1/query"), ("lean", "/peer/v1/message")]
)
@pytest.mark.parametrize("size", ["small", "oversized"])
def test_the_lean_listeners_refuse_a_chunked_body_with_411(net: LocalNetwork, front: str, path: str, size: str) -> None:
    sent = sent_messages(net)
    stmt = "INSERT INTO bank_users (first_name, last_name) VALUES ('Not', 'Read')"
    data = json.dumps({"sql": stmt + (" -- " + "x" * MAX_BODY if size == "oversized" else "")}).encode()
    resp = post_chunked(net, "bank", path, data, front)
    assert resp.status_code == 411, resp.text
    assert resp.json()["error"] == "send the body with a Content-Length (chunked bodies are not taken here)"
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("path", ["/api/v1/exec", "/api/v1/query"])
def test_the_client_listener_refuses_a_body_over_the_limit_with_413(net: LocalNetwork, path: str) -> None:
    sent = sent_messages(net)
    status, answer = post(net, "bank", path, json.dumps({"sql": "SELECT 1 -- " + "x" * MAX_BODY}).encode(), "api")
    assert status == 413, answer
    assert str(MAX_BODY) in answer["error"], answer
    assert_nothing_applied(net, sent)


def test_the_client_listener_commits_like_the_rest_api_and_serves_nothing_else(net: LocalNetwork) -> None:
    """The same write through either front: the same answer (but its gxid) and the same rows everywhere."""
    stmt = "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('{}', 'Roe', '555-0100')"
    answers = {front: post(net, "bank", "/api/v1/exec", {"sql": stmt.format(front)}, front) for front in FRONTS}
    for status, answer in answers.values():
        assert (status, answer["status"], answer["participants"]) == (200, "committed", ["government", "insurance"])
    rows = {peer: sorted(r[1] for r in base_rows(net)[peer]) for peer in PEERS}
    assert rows == {peer: sorted(FRONTS) for peer in PEERS}
    queried = {
        front: post(net, "bank", "/api/v1/query", {"sql": "SELECT first_name FROM bank_users"}, front)[1]
        for front in FRONTS
    }
    assert queried["api"] == queried["gunicorn"] and len(queried["api"]["rows"]) == 2
    api = net.specs["bank"].api_url
    for path in ("/api/v1/status", "/peer/v1/message", "/client/"):  # the rest of the API, and peer messages
        resp = requests.post(api + path, data=b"{}", headers=auth(net, "bank"), timeout=30)
        assert resp.status_code == 404, (path, resp.text)
    resp = requests.get(api + "/api/v1/exec", headers=net.auth_headers("bank"), timeout=30)
    assert (resp.status_code, resp.headers.get("Allow")) == (405, "POST")
    assert check(net)["ok"]


@pytest.mark.parametrize(
    ("statements", "names"),
    [
        (["INSERT INTO bank_users (first_name) VALUES ('Jane')"], '"last_name"'),
        (
            [
                "INSERT INTO bank_users (first_name, last_name) VALUES ('Jane', 'Roe')",
                "INSERT INTO bank_users (first_name, last_name) VALUES ('Jane', 'Roe')",
            ],
            "(first_name, last_name)=(Jane, Roe) already exists",
        ),
    ],
    ids=["not-null", "duplicate-key"],
)
def test_it_answers_422_for_a_constraint_violated_at_the_origin(
    net: LocalNetwork, statements: list[str], names: str
) -> None:
    sent = sent_messages(net)
    status, answer = net.exec("bank", statements)
    assert status == 422, answer
    assert answer["kind"] == "constraint", answer
    assert names in answer["error"], answer
    assert answer["error"].startswith("bank:"), answer
    assert_nothing_applied(net, sent)


@pytest.mark.parametrize("view", ["nope", "dejima_insurance", "bank_users"])
def test_it_answers_404_for_an_unknown_view(net: LocalNetwork, view: str) -> None:
    resp = requests.get(url(net, "bank", f"/api/v1/views/{view}"), headers=net.auth_headers("bank"), timeout=10)
    assert resp.status_code == 404, resp.text
    assert repr(view) in resp.json()["error"], resp.text


# ---- peer protocol: /peer/v1/message ---------------------------------------------------------------------------


GOOD_PROPAGATE_BODY = propagate("dejima_bank", [person()])["body"]


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (b"{bad", "malformed JSON"),
        (b"", "malformed JSON"),
        ([], "must be a JSON object"),
        ("hello", "must be a JSON object"),
        ({"kind": "propagate", "body": GOOD_PROPAGATE_BODY}, "protocol"),
        ({"protocol": "dejima/0", "kind": "propagate", "body": GOOD_PROPAGATE_BODY}, "dejima/0"),
        ({"protocol": PROTOCOL, "kind": "gossip", "body": {}}, "'gossip'"),
        ({"protocol": PROTOCOL, "body": GOOD_PROPAGATE_BODY}, "kind"),
        ({"protocol": PROTOCOL, "kind": "propagate"}, "body"),
        ({"protocol": PROTOCOL, "kind": "propagate", "body": []}, "body"),
        (envelope("propagate", {k: v for k, v in GOOD_PROPAGATE_BODY.items() if k != "gxid"}), "'gxid'"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "evil": 1}), "'evil'"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "timeout_ms": "5000"}), "'timeout_ms'"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "timeout_ms": 0}), "timeout_ms"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "insertions": {"first_name": "Eve"}}), "'insertions'"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "insertions": ["Eve"]}), "row"),
        (envelope("propagate", {**GOOD_PROPAGATE_BODY, "view": 7}), "'view'"),
        (envelope("propagate_reply", {"gxid": "x", "peer": "bank", "vote": "yes", "reached": []}), "not a request"),
    ],
    ids=[
        "broken-json",
        "empty",
        "array",
        "string",
        "no-protocol",
        "wrong-protocol",
        "unknown-kind",
        "no-kind",
        "no-body",
        "body-not-object",
        "missing-field",
        "unknown-field",
        "timeout-as-string",
        "timeout-zero",
        "insertions-not-list",
        "row-not-object",
        "view-not-string",
        "reply-as-request",
    ],
)
@pytest.mark.parametrize("front", ["gunicorn", "lean"])
def test_it_refuses_a_malformed_peer_message_with_400(net: LocalNetwork, message: Any, says: str, front: str) -> None:
    status, answer = post(net, "government", "/peer/v1/message", message, front)
    assert status == 400, answer
    assert says in answer["error"], answer
    assert_nothing_applied(net)


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (propagate("dejima_nope", [person()]), "unknown view 'dejima_nope'"),
        (propagate("dejima_risk", [{"first_name": "Eve", "last_name": "Spy", "risk_factor": 1}]), "dejima_risk"),
        (propagate("dejima_bank", [person()], sender="insurance"), "'insurance' is not entitled to dejima_bank"),
        (propagate("dejima_bank", [person()], sender="mallory"), "claims to come from 'mallory'"),
        (propagate("dejima_bank", [person(iban="DE89")]), "'iban' is not a column of dejima_bank"),
        (propagate("dejima_bank", [person(birthdate="1980-01-01")]), "'birthdate' is not a column"),
        (propagate("dejima_bank", [person(phone=5)]), "column 'phone' must be text"),
        (propagate("dejima_bank", [person(first_name=None)]), "'first_name' may not be null"),
        (propagate("dejima_bank", [{"first_name": "Eve", "phone": None, "address": None}]), "'last_name' is missing"),
        (propagate("dejima_bank", [person(**{"$unknown": ["first_name"]})]), "key column 'first_name'"),
        (propagate("dejima_bank", [person(**{"$bogus": 1})]), "'$bogus'"),
        (propagate("dejima_bank", [person(), person()]), "inserted twice"),
        (
            propagate(
                "dejima_insurance",
                [{"first_name": "Eve", "last_name": "Spy", "address": None, "birthdate": "yesterday"}],
                sender="insurance",
            ),
            "'birthdate'",
        ),
        (
            propagate(
                "dejima_insurance",
                [{"first_name": "Eve", "last_name": "Spy", "address": None, "birthdate": 19800101}],
                sender="insurance",
            ),
            "'birthdate'",
        ),
        (propagate("dejima_bank", [person()], gxid=new_gxid("insurance")), "does not belong to origin"),
    ],
    ids=[
        "unknown-view",
        "view-not-shared-here",
        "sender-not-member",
        "unknown-sender",
        "column-not-in-view",
        "column-of-another-view",
        "text-as-number",
        "null-key",
        "missing-key",
        "unknown-key",
        "unknown-marker",
        "same-key-twice",
        "bad-date",
        "date-as-number",
        "forged-origin",
    ],
)
@pytest.mark.parametrize("front", ["gunicorn", "lean"])
def test_it_votes_no_on_a_bad_propagate_and_applies_nothing(
    net: LocalNetwork, message: dict[str, Any], says: str, front: str
) -> None:
    # made when the module was collected: a gxid begun that long ago would be refused for its age alone (a
    # participant never opens a gxid older than the transaction timeout plus the replay window); its origin stays
    body = message["body"]
    if isinstance(body.get("gxid"), str):
        body = {**body, "gxid": new_gxid(body["gxid"].split(".", 1)[0]), "message_id": uuid.uuid4().hex}
    message = {**message, "body": body}
    sent = sent_messages(net)
    status, answer = post(net, "government", "/peer/v1/message", message, front)
    if status == 200:
        assert answer["kind"] == "propagate_reply", answer
        reply = answer["body"]
        assert reply["vote"] == "no", reply
        assert reply["peer"] == "government", reply
        assert reply["error"].startswith("government:"), reply
        assert says in reply["error"], reply
    else:  # 403: signed by another peer than the sender, or the sender is not entitled to the view here
        assert status in (400, 403), answer
        assert says in answer["error"], answer
    assert_nothing_applied(net, sent)


def _finish(net: LocalNetwork, peers: list[str], gxid: str, origin: str, decision: str) -> None:
    for peer in peers:
        status, answer = post(
            net, peer, "/peer/v1/message", envelope("finish", {"gxid": gxid, "origin": origin, "decision": decision})
        )
        assert status == 200, answer
        assert answer["body"]["ok"], answer


# What bank's own insert of Eve Spy would tell its peers: it changed that key on its views itself, so nobody sends it
# back to bank (which would refuse a global transaction it is not running).
EVE_AT_BANK = {"dejima_bank": [["Eve", "Spy"]], "dejima_risk": [["Eve", "Spy"]]}


def test_it_answers_a_duplicate_propagate_with_its_first_answer(net: LocalNetwork) -> None:
    message = propagate("dejima_bank", [person()], origin_keys=EVE_AT_BANK)
    gxid = message["body"]["gxid"]
    try:
        first = post(net, "government", "/peer/v1/message", message)
        again = post(net, "government", "/peer/v1/message", message)

        assert first[0] == 200, first
        assert first[1]["body"]["vote"] == "yes", first
        # a retry is signed anew (a replay of the same signature is refused: test_auth); same first answer
        assert (again[0], again[1]["body"]) == (first[0], first[1]["body"])
    finally:
        # as the origin (bank) would: abort everywhere the propagation reached
        _finish(net, list(PEERS), gxid, "bank", "abort")
    assert_nothing_applied(net)


def test_it_answers_a_duplicate_of_a_refused_propagate_with_its_first_answer(net: LocalNetwork) -> None:
    message = propagate("dejima_bank", [person(phone=5)])  # phone must be text: a "no" vote
    first = post(net, "government", "/peer/v1/message", message)
    again = post(net, "government", "/peer/v1/message", message)
    assert first[1]["body"]["vote"] == "no", first
    assert again[1]["body"]["vote"] == "no", again
    assert_nothing_applied(net)
    assert {k: v for k, v in again[1]["body"].items() if k != "message_id"} == {
        k: v for k, v in first[1]["body"].items() if k != "message_id"
    }


# ---- a delta that violates a base-table constraint at a receiver ------------------------------------------------


@pytest.fixture
def insurance_refuses_nowhere(net: LocalNetwork) -> Iterator[LocalNetwork]:
    """A constraint only insurance has (its own business rule, added to its base table): no address 'Nowhere'.
    The shipped schema gives no such case: every member's view columns have the same types, every private column
    is nullable, and each view sees its whole table, so a valid delta never breaks a receiver's constraint."""
    dsn = net.server.url(net.specs["insurance"].database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE insurance_users ADD CONSTRAINT test_no_nowhere CHECK (address IS DISTINCT FROM 'Nowhere')"
        )
    try:
        yield net
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE insurance_users DROP CONSTRAINT IF EXISTS test_no_nowhere")


@pytest.mark.parametrize(
    ("origin", "statement"),
    [
        (
            "government",
            "INSERT INTO government_users (first_name, last_name, address) VALUES ('Con', 'Straint', 'Nowhere')",
        ),
        ("bank", "INSERT INTO bank_users (first_name, last_name, address) VALUES ('Con', 'Straint', 'Nowhere')"),
    ],
    ids=["one-hop", "two-hops"],
)
def test_it_aborts_everywhere_when_a_receiver_violates_a_constraint(
    insurance_refuses_nowhere: LocalNetwork, origin: str, statement: str
) -> None:
    net = insurance_refuses_nowhere
    status, answer = net.exec(origin, statement)
    assert status == 422, answer
    assert answer["kind"] == "constraint", answer
    assert "insurance:" in answer["error"], answer
    assert "test_no_nowhere" in answer["error"], answer
    assert_nothing_applied(net)
