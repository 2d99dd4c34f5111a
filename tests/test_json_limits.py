"""Bad JSON gets a clear 400, never a 500 or a dead listener thread.

Unit tier: `jsonvalues.check_depth` against the nesting it measures (hypothesis), the request decoder's other
refusals (lone surrogates, NaN), the client app's parser and the middleware that turns a RecursionError into a 400.

Cluster tier: the same bodies at every endpoint that reads JSON, on real peer processes — `/api/v1/exec` and
`/api/v1/query` (gunicorn and the lean client listener), `/peer/v1/message` (gunicorn and the lean message listener)
and the client app's rows — each answered 400 with the API's error shape, nothing changed at any peer, and the peer
serving the next request (on the lean listeners over the same keep-alive connection).
"""

from __future__ import annotations

import base64
import decimal
import http.client
import io
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from django.http import JsonResponse
from django.test import RequestFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.client.parsers import DepthCheckedJSONParser, NestedTooDeep
from peer.dejima import jsonvalues
from peer.dejima.auth import read_envelope, sign_envelope, wire
from peer.dejima.directory import catalog_of
from peer.dejima.jsonvalues import MAX_DEPTH, TOO_DEEP_TO_HANDLE, TooDeep
from peer.middleware import RecursionIsBadRequest
from peer.network import LocalNetwork
from peer.testkit.proxy import settle
from peer.tlscerts import kit_ca
from tests.helpers import peer_type, sign_as

TOO_DEEP = {"status": "error", "kind": "bad_request", "error": f"JSON nested deeper than {MAX_DEPTH} levels"}


def nested(depth: int, kind: str = "[") -> bytes:
    """A JSON text of `depth` levels: arrays, or objects of one member."""
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def depth_of(value: Any) -> int:
    """How deep a decoded JSON value nests arrays and objects (a scalar: 0)."""
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


def decoder_depth(text: str) -> int:
    """How deep Python's decoder could recurse into `text` before it stops: brackets outside strings, counted up
    to the first backslash outside a string (the decoder fails there at the latest)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
        elif ch == "\\":
            break
    return deepest


def refused(data: bytes, limit: int) -> bool:
    try:
        jsonvalues.check_depth(data, limit)
    except TooDeep as exc:
        message = str(exc)
    else:
        return False
    assert message == f"JSON nested deeper than {limit} levels"
    return True


# ---- unit: the depth check ------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["[", "{"])
def test_the_limit_itself_decodes_and_one_level_more_is_refused(kind: str) -> None:
    assert depth_of(jsonvalues.loads_request(nested(MAX_DEPTH, kind))) == MAX_DEPTH
    with pytest.raises(TooDeep, match=f"^JSON nested deeper than {MAX_DEPTH} levels$"):
        jsonvalues.loads_request(nested(MAX_DEPTH + 1, kind))


@pytest.mark.unit
@pytest.mark.parametrize(
    "body",
    [nested(100_000), nested(100_000, "{"), b"[" * 100_000, b'{"body":' + nested(100_000) + b',"x":1}'],
    ids=["arrays", "objects", "never-closed", "envelope-body"],
)
def test_a_hundred_thousand_levels_are_refused_before_decoding(body: bytes) -> None:
    with pytest.raises(TooDeep):
        jsonvalues.loads_request(body)
    with pytest.raises(TooDeep):
        read_envelope(body)  # the lean listeners' reader, and the reader of every peer's answer
    with pytest.raises(RecursionError):
        jsonvalues.loads(body)  # what happened before: the decoder itself runs out of stack


@pytest.mark.unit
def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = "[" * 1000 + "{" * 1000
    bodies = [
        json.dumps({"sql": deep_text}),
        json.dumps({"sql": f'"{deep_text}\\"'}),  # escaped quotes and backslashes around them
        json.dumps([deep_text, "\\", deep_text, '"', "]]]]"]),
        json.dumps({deep_text: deep_text}),
    ]
    for body in bodies:
        assert jsonvalues.loads_request(body.encode()) == json.loads(body)
    # … while a string that ends in an escaped backslash does not hide the brackets after it
    assert refused(json.dumps(["\\"]).encode()[:-1] + b"," + nested(MAX_DEPTH) + b"]", MAX_DEPTH)


@pytest.mark.unit
def test_a_large_flat_propagate_passes() -> None:
    rows = [{"first_name": f"Jané {i}", "last_name": f"[{i}]", "phone": None} for i in range(10_000)]
    body = wire({"protocol": "dejima/1", "kind": "propagate", "body": {"insertions": rows}, "signature": None})
    assert read_envelope(body)["body"]["insertions"] == rows


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9\n\U0001f600'),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a'), children, max_size=3)
    ),
    max_leaves=40,
)


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(value=json_values, ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]), slack=st.integers(-3, 3))
def test_check_depth_refuses_exactly_what_nests_deeper_than_the_limit(
    value: Any, ascii_only: bool, indent: int | None, slack: int
) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    limit = max(0, depth_of(value) + slack)
    assert refused(data, limit) == (depth_of(value) > limit)


@pytest.mark.unit
@pytest.mark.parametrize(("text", "limit"), [("[{}]}", 1), ("[[[]]]]]]", 2), ("{[]}]", 1), ("[{}]}}]", 1)])
def test_closers_after_dropped_empty_containers_do_not_hide_the_depth(text: str, limit: int) -> None:
    """Dropping empty containers may leave only closers: their running count below 0 is still 0 levels deep."""
    assert decoder_depth(text) > limit
    assert refused(text.encode(), limit)


@pytest.mark.unit
@settings(max_examples=600, deadline=None)
@given(text=st.text(alphabet='[]{}"\\ a:,'), limit=st.integers(0, 6))
def test_what_passes_the_check_never_takes_the_decoder_deeper_than_the_limit(text: str, limit: int) -> None:
    """Malformed text too: the check may refuse more than the decoder would reach, never less."""
    if not refused(text.encode(), limit):
        assert decoder_depth(text) <= limit


@pytest.mark.unit
def test_the_check_holds_in_a_thread_at_the_limit() -> None:
    """The lean listener serves each connection in a thread of its own: the deepest body allowed decodes there."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(jsonvalues.loads_request(nested(MAX_DEPTH, "{"))))
    thread.start()
    thread.join()
    assert len(out) == 1 and depth_of(out[0]) == MAX_DEPTH


# ---- unit: what else the request decoder refuses ----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"sql": "\\ud800"}', "lone surrogate \\ud800"),
        (b'{"sql": "\\uDC00 after"}', "lone surrogate \\uDC00"),
        (b'["\\ud800\\ud800\\udc00"]', "lone surrogate \\ud800"),  # the first high one has no low one after it
        (b'["\\ud83d\\\\\\ude00"]', "lone surrogate \\ud83d"),  # an escaped backslash between them
        (b'{"sql": "\xed\xa0\x80"}', "can't decode"),  # a surrogate's UTF-8 bytes
        (b'{"sql": NaN}', "NaN is not a JSON value"),
        (b'{"sql": -Infinity}', "-Infinity is not a JSON value"),
        (b"[Infinity]", "Infinity is not a JSON value"),
    ],
)
def test_the_request_decoder_refuses_what_is_not_json_text(body: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        jsonvalues.loads_request(body)
    assert not isinstance(err.value, TooDeep)
    with pytest.raises(ValueError, match=re.escape(says)):
        read_envelope(body)


@pytest.mark.unit
def test_the_request_decoder_takes_what_is_json_text() -> None:
    assert jsonvalues.loads_request(b'["\\ud83d\\ude00", "\\\\ud800", "\\u00e9"]') == ["\U0001f600", "\\ud800", "é"]
    assert jsonvalues.loads_request(b'{"n": 1e999999, "n": 2.50}') == {"n": decimal.Decimal("2.50")}  # the last
    assert jsonvalues.loads_request('{"sql": "SELECT 1"}'.encode("utf-16")) == {"sql": "SELECT 1"}


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None, min_codepoint=0xD7F0, max_codepoint=0xE010) | st.just("a")))
def test_a_string_is_refused_exactly_when_it_is_no_unicode_text(text: str) -> None:
    data = json.dumps([text]).encode()  # surrogates as \\u escapes; two in a row may pair up
    decoded = json.loads(data)[0]
    try:
        decoded.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(ValueError, match="lone surrogate"):
            jsonvalues.loads_request(data)
    else:
        assert jsonvalues.loads_request(data) == [decoded]


# ---- unit: the client app's parser and the middleware -------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("charset", ["utf-8", "utf-16"])
def test_the_client_parser_refuses_a_body_nested_too_deeply(charset: str) -> None:
    parser = DepthCheckedJSONParser()
    deep = json.dumps({"first_name": json.loads(nested(MAX_DEPTH))}).encode(charset)
    with pytest.raises(NestedTooDeep) as err:
        parser.parse(io.BytesIO(deep), "application/json", {"encoding": charset})
    assert (err.value.status_code, err.value.default_code, str(err.value.detail)) == (
        400,
        "bad_request",
        TOO_DEEP["error"],
    )
    flat = json.dumps({"first_name": "[[[[", "last_name": "Roe"}).encode(charset)
    assert parser.parse(io.BytesIO(flat), "application/json", {"encoding": charset}) == json.loads(flat.decode(charset))


@pytest.mark.unit
def test_the_middleware_answers_a_recursion_error_with_400_and_nothing_else() -> None:
    middleware = RecursionIsBadRequest(lambda request: pytest.fail("not called"))
    request = RequestFactory().post("/api/v1/query", b"{}", content_type="application/json")
    answer = middleware.process_exception(request, RecursionError("maximum recursion depth exceeded"))
    assert isinstance(answer, JsonResponse) and answer.status_code == 400
    assert json.loads(answer.content) == {"status": "error", "kind": "bad_request", "error": TOO_DEEP_TO_HANDLE}
    assert middleware.process_exception(request, ValueError("other")) is None


# ---- cluster: every endpoint that reads JSON, on real peer processes ---------------------------------------------


def send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes = b"",
    password: str | None = None,
    token: str | None = None,
) -> tuple[int, Any, str | None]:
    """Every request of the cluster tests goes through here, so their headers are set in this one place: the body
    as it is, as JSON; HTTP Basic as the client app's admin with `password`, or a peer's API token. (HTTP status,
    the decoded JSON answer, the Connection header.)"""
    headers = {"Content-Type": "application/json"}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), resp.getheader("Connection")


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn = (
        http.client.HTTPSConnection(host, parts.port, timeout=30, context=kit_ca().client_context())
        if parts.scheme == "https"
        else http.client.HTTPConnection(host, parts.port, timeout=30)
    )
    conn.connect()
    return conn


PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
LEAN = ("api_url", "message_url")  # the lean listeners: they keep a connection open after a 400
# (id, which listener of the peer, path)
ENDPOINTS = [
    ("exec-gunicorn", "url", "/api/v1/exec"),
    ("exec-lean", "api_url", "/api/v1/exec"),
    ("query-gunicorn", "url", "/api/v1/query"),
    ("query-lean", "api_url", "/api/v1/query"),
    ("message-gunicorn", "url", "/peer/v1/message"),
    ("message-lean", "message_url", "/peer/v1/message"),
]
ENDPOINT_IDS = [e[0] for e in ENDPOINTS]
DEEP_BODIES = {
    "arrays": nested(100_000),
    "objects": nested(100_000, "{"),
    "never-closed": b"[" * 100_000,
    "one-level-too-many": b'{"sql": ' + nested(MAX_DEPTH) + b"}",
}


def snapshot(net: LocalNetwork) -> dict[str, Any]:
    """What a peer's state is made of: its base table, its transaction log's length, what it has open or prepared
    (after the transactions prepared there finished: with DEJIMA_COMMIT_WAIT=decision a write is answered first)."""
    out: dict[str, Any] = {}
    for peer in PEERS:
        url = net.specs[peer].url
        settle(url, net.auth_headers(peer))
        with psycopg.connect(net.server.url(net.specs[peer].database)) as conn:
            rows = conn.execute(f"SELECT * FROM {TABLES[peer]} ORDER BY id").fetchall()  # noqa: S608
        status = net.get(peer, "/api/v1/status")
        out[peer] = {
            "rows": rows,
            "txlog": net.get(peer, "/api/v1/txlog?limit=0")["length"],
            "open": status["open_transactions"],
            "prepared": net.get(peer, "/api/v1/prepared")["prepared"],
        }
    return out


@pytest.fixture
def net(network: LocalNetwork) -> Iterator[LocalNetwork]:
    """The example network with empty tables; every test leaves it as it found it (nothing changed anywhere)."""
    before = snapshot(network)
    yield network
    assert snapshot(network) == before


def good_request(net: LocalNetwork, path: str) -> tuple[bytes, int, dict[str, Any]]:
    """A request `path` serves normally, changing nothing: (body, status, what the answer holds)."""
    if path == "/api/v1/query":
        return b'{"sql": "SELECT 1 AS one"}', 200, {"rows": [[1]]}
    if path == "/api/v1/exec":
        return b'{"sql": "SELECT 1"}', 200, {"status": "committed", "participants": []}
    ask = {"protocol": "dejima/1", "kind": "decision_query", "body": {"gxid": "bank.0.x", "asker": "bank"}}
    return wire(sign_as(net, "bank", {**ask, "signature": None})), 200, {"kind": "decision_reply"}


def served_on(net: LocalNetwork, conn: http.client.HTTPConnection, path: str, peer: str) -> None:
    body, status, holds = good_request(net, path)
    got, answer, _ = send(conn, "POST", path, body, token=net.token(peer))
    assert got == status, answer
    assert {k: answer.get(k) for k in holds} == holds, answer


def bad_then_good(net: LocalNetwork, listener: str, path: str, body: bytes) -> tuple[int, Any]:
    """POST `body` to one listener of bank (government for peer messages), then a normal request: over the same
    connection on a lean listener (it must have kept it open), over a new one on gunicorn."""
    peer = "government" if path == "/peer/v1/message" else "bank"
    conn = connect(getattr(net.specs[peer], listener))
    try:
        local = conn.sock.getsockname()
        status, answer, connection = send(conn, "POST", path, body, token=net.token(peer))
        if listener in LEAN:
            assert connection is None, "the lean listener closed the connection"
            served_on(net, conn, path, peer)
            assert conn.sock is not None and conn.sock.getsockname() == local, "not the same connection"
    finally:
        conn.close()
    again = connect(getattr(net.specs[peer], listener))
    try:
        served_on(net, again, path, peer)
    finally:
        again.close()
    return status, answer


@pytest.mark.cluster
@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
@pytest.mark.parametrize(("listener", "path"), [e[1:] for e in ENDPOINTS], ids=ENDPOINT_IDS)
def test_a_body_nested_too_deeply_is_a_400_and_the_peer_serves_on(
    net: LocalNetwork, listener: str, path: str, body: bytes
) -> None:
    assert bad_then_good(net, listener, path, body) == (400, TOO_DEEP)


@pytest.mark.cluster
@pytest.mark.parametrize(("listener", "path"), [e[1:] for e in ENDPOINTS], ids=ENDPOINT_IDS)
def test_a_body_at_the_limit_gets_the_endpoints_own_answer(net: LocalNetwork, listener: str, path: str) -> None:
    status, answer = bad_then_good(net, listener, path, b'{"sql": ' + nested(MAX_DEPTH - 1) + b"}")
    assert status == 400, answer
    assert answer["error"] != TOO_DEEP["error"]
    assert ('"sql"' if path.startswith("/api/") else "protocol") in answer["error"], answer


BAD_VALUES = {
    "lone-surrogate": (b'{"sql": "SELECT \'\\ud800\'"}', "malformed JSON: a string holds a lone surrogate \\ud800"),
    "surrogate-bytes": (b'{"sql": "SELECT \'\xed\xa0\x80\'"}', "malformed JSON: 'utf-8' codec can't decode"),
    "nan": (b'{"sql": NaN}', "malformed JSON: NaN is not a JSON value"),
    "infinity": (b'{"sql": ["SELECT 1", -Infinity]}', "malformed JSON: -Infinity is not a JSON value"),
    "huge-number": (b'{"sql": 1e999999}', '"sql" must be'),
    "huge-integer": (b'{"sql": ' + b"9" * 5000 + b"}", "malformed JSON: Exceeds the limit"),
    "not-an-object": (b'["SELECT 1"]', 'expected {"sql"'),
}


@pytest.mark.cluster
@pytest.mark.parametrize(("body", "says"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize(("listener", "path"), [e[1:] for e in ENDPOINTS[:4]], ids=ENDPOINT_IDS[:4])
def test_a_bad_value_in_a_client_body_is_a_400(
    net: LocalNetwork, listener: str, path: str, body: bytes, says: str
) -> None:
    """A lone surrogate reached psycopg before (UnicodeEncodeError: 500); the others were 400s already."""
    status, answer = bad_then_good(net, listener, path, body)
    assert (status, answer["kind"]) == (400, "bad_request"), answer
    assert answer["error"].startswith(says), answer


@pytest.mark.cluster
@pytest.mark.parametrize("listener", ["url", "message_url"], ids=["gunicorn", "lean"])
@pytest.mark.parametrize("name", ["lone-surrogate", "nan", "not-an-object"])
def test_a_bad_value_in_a_peer_message_is_a_400(net: LocalNetwork, listener: str, name: str) -> None:
    body, says = BAD_VALUES[name]
    status, answer = bad_then_good(net, listener, "/peer/v1/message", body)
    assert status == 400, answer
    assert answer["error"].startswith("a message must be" if name == "not-an-object" else says), answer


@pytest.mark.cluster
@pytest.mark.parametrize("listener", ["url", "api_url"], ids=["gunicorn", "lean"])
def test_a_query_result_nested_too_deeply_to_handle_is_a_400(net: LocalNetwork, listener: str) -> None:
    """PostgreSQL nests jsonb deeper than Python decodes: RecursionError while answering, now a 400."""
    deep = b"{\"sql\": \"SELECT (repeat('[', 5000) || repeat(']', 5000))::jsonb AS j\"}"
    status, answer = bad_then_good(net, listener, "/api/v1/query", deep)
    assert (status, answer) == (400, {"status": "error", "kind": "bad_request", "error": TOO_DEEP_TO_HANDLE})


def signed_by_bank(net: LocalNetwork, kind: str, body: dict[str, Any], ts: int | None = None) -> bytes:
    envelope = {"protocol": "dejima/1", "kind": kind, "body": body, "signature": None}
    return wire(sign_envelope(envelope, "bank", net.key("bank"), ts=ts))


def bank_hello(**overrides: Any) -> dict[str, Any]:
    body = {"peer": "bank", "url": "", "peer_type": "bank", "catalog": catalog_of(peer_type("bank")), "known": []}
    return {**body, **overrides}


@pytest.mark.cluster
@pytest.mark.parametrize("listener", ["url", "message_url"], ids=["gunicorn", "lean"])
def test_a_trusted_peers_message_with_values_out_of_shape_is_refused_not_a_500(
    net: LocalNetwork, listener: str
) -> None:
    """Signed by bank, a peer government trusts: values that made the handler fail with 500 before."""
    propagate = {
        "gxid": f"bank.{uuid.uuid4().int % 2**60:x}.x",
        "origin": "bank",
        "sender": "bank",
        "view": "dejima_bank",
        "insertions": [],
        "deletions": [],
        "timeout_ms": 10**400,  # OverflowError dividing it
    }
    cases = [
        (signed_by_bank(net, "propagate", propagate), 400, "timeout_ms must be positive (and a 64-bit integer)"),
        (signed_by_bank(net, "hello", bank_hello(known=[5])), 400, "hello: known must be"),  # AttributeError
        (signed_by_bank(net, "hello", bank_hello(catalog=[{"view": "dejima_bank"}])), 400, "hello: catalog"),
        (signed_by_bank(net, "decision_query", {"gxid": "x", "asker": "bank"}, ts=10**400), 401, "64-bit integer"),
    ]
    for body, status, says in cases:
        got, answer = bad_then_good(net, listener, "/peer/v1/message", body)
        assert got == status and says in answer["error"], answer
    assert net.get("government", "/api/v1/status")["groups"]["dejima_bank"] == ["bank", "government"]


@pytest.mark.cluster
def test_a_catalog_with_a_number_in_it_is_taken(net: LocalNetwork) -> None:
    """Read as a Decimal, a number in a greeting's catalog failed to be saved (TypeError: 500)."""
    catalog = [{**view, "since": 1.5} for view in catalog_of(peer_type("bank"))]
    hello = signed_by_bank(net, "hello", bank_hello(url=net.specs["bank"].message_url, catalog=catalog))
    status, answer = bad_then_good(net, "url", "/peer/v1/message", hello)
    assert (status, answer["kind"]) == (200, "hello"), answer
    assert net.get("government", "/api/v1/status")["groups"]["dejima_bank"] == ["bank", "government"]


# ---- cluster: the client app ------------------------------------------------------------------------------------


ROWS = "/client/api/v1/tables/government_users/rows"
CLIENT_BAD = {
    "nan": (b'{"first_name": NaN, "last_name": "Roe"}', "invalid", "JSON parse error"),
    "lone-surrogate": (b'{"first_name": "\\ud800", "last_name": "Roe"}', "invalid", "first_name: Surrogate"),
    "surrogate-bytes": (b'{"first_name": "\xed\xa0\x80", "last_name": "Roe"}', "invalid", "JSON parse error"),
    "huge-number": (b'{"first_name": "Jane", "last_name": 1e999999}', "invalid", "last_name: inf is not text"),
    "not-an-object": (b'["Jane", "Roe"]', "invalid", "expected a JSON object"),
}


@pytest.mark.cluster
@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_the_client_app_refuses_a_body_nested_too_deeply(
    net: LocalNetwork, government_client: tuple[str, str], method: str, body: bytes
) -> None:
    client, password = government_client
    conn = connect(client)
    try:
        status, answer, _ = send(conn, method, ROWS + ("/1" if method == "PATCH" else ""), body, password)
        assert (status, answer) == (400, TOO_DEEP)
    finally:
        conn.close()
    conn = connect(client)
    try:
        status, answer, _ = send(conn, "GET", "/client/api/v1/tables", b"", password)
        assert status == 200 and answer["peer_reachable"], answer
    finally:
        conn.close()


@pytest.mark.cluster
@pytest.mark.parametrize(("body", "kind", "says"), CLIENT_BAD.values(), ids=CLIENT_BAD.keys())
def test_the_client_app_refuses_other_bad_bodies_with_400(
    net: LocalNetwork, government_client: tuple[str, str], body: bytes, kind: str, says: str
) -> None:
    client, password = government_client
    conn = connect(client)
    try:
        status, answer, _ = send(conn, "POST", ROWS, body, password)
    finally:
        conn.close()
    assert (status, answer["status"], answer["kind"]) == (400, "error", kind), answer
    assert answer["error"].startswith(says), answer
