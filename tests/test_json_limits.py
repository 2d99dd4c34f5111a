"""Bad JSON gets a clear 400, never a 500 or a dead listener thread.

Unit tier: `jsonvalues.check_depth` against the nesting it measures (hypothesis), the request decoder's other
refusals (lone surrogates, NaN), the client app's parser and the middleware that turns a RecursionError into a 400.
The lean listener's answer to a body nested too deeply: tests/test_peerserver.py.
"""

from __future__ import annotations

import decimal
import io
import json
import re
import threading
from typing import Any

import pytest
from django.http import JsonResponse
from django.test import RequestFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.client.parsers import DepthCheckedJSONParser, NestedTooDeep
from peer.dejima import jsonvalues
from peer.dejima.auth import read_envelope, wire
from peer.dejima.jsonvalues import MAX_DEPTH, TOO_DEEP_TO_HANDLE, TooDeep
from peer.middleware import RecursionIsBadRequest

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
