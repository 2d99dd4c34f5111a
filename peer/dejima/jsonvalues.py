"""JSON that keeps a view's numbers exact, from the capture trigger to the other peers and back.

A dejima view's row travels as JSON: captured by the triggers as jsonb, carried in signed messages, compared and
written at the other peers, hashed into view digests and the transaction log. Python's `json` reads a number with a
fraction or an exponent as a float, which keeps about 16 significant digits: a `numeric` balance of
12345678901234567890.123456 would reach the other peers changed. Here such a number is read as a `decimal.Decimal`
(integers stay `int`, exact at any size) and written back as the same JSON number — `simplejson` writes a Decimal as
a number; the standard library cannot.

Importing this module makes psycopg load json and jsonb values with `loads` and dump `Json`/`Jsonb` parameters with
`dumps`, for every connection opened afterwards in the process (`psycopg.types.json.set_json_loads` and
`set_json_dumps`): the captured changes, the rows `apply` reads to compare, and the view snapshots then hold the
same values as the messages. `peer.dejima.delta` imports it, so does everything that reads or writes them.

A request body from outside (a client's exec or query, a peer message, a peer's answer) is read with
`loads_request` (`peer.dejima.auth.read_envelope` with `request_text`): its text is checked before anything decodes
it. Nested deeper than `MAX_DEPTH` is `TooDeep`; not UTF-8/16/32 (an encoded surrogate is not UTF-8 either), a string
with a lone surrogate (`"\\ud800"`: no PostgreSQL text can hold it, psycopg cannot encode it) and `NaN`/`Infinity`
(not JSON) are ValueErrors. Duplicate keys are taken as JSON allows: the last one counts.
"""

from __future__ import annotations

import decimal
import itertools
import json
import re
from typing import Any

import simplejson
from psycopg.types.json import set_json_dumps, set_json_loads

_DECODER = json.JSONDecoder(parse_float=decimal.Decimal)
_OPTIONS: dict[str, Any] = {"separators": (",", ":"), "use_decimal": True, "namedtuple_as_object": False}
_COMPACT = simplejson.JSONEncoder(**_OPTIONS)
_CANONICAL = simplejson.JSONEncoder(sort_keys=True, **_OPTIONS)
_CANONICAL_OR_TEXT = simplejson.JSONEncoder(sort_keys=True, default=str, **_OPTIONS)


# How deep a request's JSON may nest: arrays and objects inside each other, the top one being level 1. The deepest
# body the protocol sends has 6 levels (a hello: envelope, body, catalog, view, its columns, a [name, type] pair; a
# propagate's "$was" in a row: 5), a client's exec or query body 2, a client app's row 1; view columns are scalars.
# Python's decoder recurses once per level and fails with RecursionError at the interpreter's recursion limit (1000
# frames, less the stack in use: a thread of gunicorn or of the lean listener stops short of it), and every later
# step (signature check, encoding the answer) recurses again: a body is refused far below that, with room to spare
# for the protocol.
MAX_DEPTH = 64


# The answer to a request whose handling still ran out of stack (RecursionError): a 400, as for TooDeep.
TOO_DEEP_TO_HANDLE = f"nested too deeply to handle (JSON may nest at most {MAX_DEPTH} levels)"


class TooDeep(ValueError):
    """A JSON text nests arrays and objects deeper than the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"JSON nested deeper than {limit} levels")


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON value")


_REQUEST_DECODER = json.JSONDecoder(parse_float=decimal.Decimal, parse_constant=_not_json)
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}')  # translate() deletes all but quotes and brackets
_SIGNED = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # a bracket as a signed byte: +1 opens, -1 closes
_ESCAPES = re.compile(rb'\\(?:"|u[dD][89a-fA-F])')  # a backslash before a quote; a surrogate's escape
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_HEX2 = rb"[0-9a-fA-F]{2}"
_HIGH = rb"\\u[dD][89abAB]" + _HEX2
_LOW = rb"\\u[dD][c-fC-F]" + _HEX2
# a high surrogate's escape without a low one right after, or a low one without a high one right before
_LONE_SURROGATE = re.compile(_HIGH + rb"(?!" + _LOW + rb")|" + _LOW + rb"(?<!" + _HIGH + _LOW + rb")")


def _deepest(brackets: bytes) -> int:
    """The deepest nesting of a string of brackets: the highest running count of openers less closers, counted from
    0 before the first bracket (so never below 0, even when the text starts with closers)."""
    return max(itertools.accumulate(memoryview(brackets.translate(_SIGNED)).cast("b"), initial=0))


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep when the JSON text `data` (UTF-8, or any encoding that writes ASCII as ASCII) nests arrays and
    objects deeper than `limit`: deeper than the decoder would recurse. Not a parse: one pass of bytes.translate over
    the text and a few over what it leaves (about 0.8 ms per MB of a flat body here, a sixth of decoding it).

    The brackets outside strings decide. Escaped quotes are dropped first (escaped backslashes before them), so that
    every quote left opens or closes a string; then everything but quotes and brackets. When every string is then
    an adjacent pair of quotes, no string holds a bracket and the quotes go at once; else the strings are cut out.
    Empty containers are dropped once before counting (two replace() calls: each lowers the deepest level by one at
    most), so a flat body is counted on a few bytes; one that comes within two levels of the limit is counted whole.

    Malformed text is counted the same way up to where the decoder stops (at the latest, a backslash outside a
    string): what passes here never takes the decoder deeper than `limit`."""
    _check_depth(data, limit, b"\\" in data and b'\\"' in data)


def _check_depth(data: bytes, limit: int, quotes_escaped: bool) -> None:
    if len(data) <= limit:
        return  # too short to open limit + 1 levels
    if quotes_escaped:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = data.translate(None, _NOT_MARKS)
    brackets = marks.translate(None, b'"')
    if 2 * marks.count(b'""') != len(marks) - len(brackets):  # a string holds a bracket (or is not closed)
        # dropping two adjacent quotes drops an empty string, or joins two strings with nothing between them
        brackets = b"".join(marks.replace(b'""', b"").split(b'"')[::2])
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return
    deepest = _deepest(brackets.replace(b"{}", b"").replace(b"[]", b""))
    if limit - 2 < deepest <= limit:
        deepest = _deepest(brackets)  # as deep as that, or up to two levels deeper
    if deepest > limit:
        raise TooDeep(limit)


def request_text(data: bytes, max_depth: int = MAX_DEPTH) -> str:
    """The text of a JSON request body, checked before any decoding: raises TooDeep when nested deeper than
    `max_depth`, ValueError when it is not UTF-8/16/32 text or a string holds a lone surrogate."""
    encoding = json.detect_encoding(data)
    text = data.decode(encoding)  # strict: the UTF-8 bytes of a surrogate are malformed
    raw = data if encoding == "utf-8" else text.encode()
    escapes = b"\\" in raw and _ESCAPES.search(raw) is not None  # memchr: most bodies hold no backslash
    _check_depth(raw, max_depth, escapes and b'\\"' in raw)
    if escapes and _SURROGATE.search(raw):
        lone = _LONE_SURROGATE.search(raw.replace(b"\\\\", b"__"))  # an escaped backslash escapes no "u"
        if lone is not None:
            raise ValueError(f"a string holds a lone surrogate {lone.group().decode()}, which is not text")
    return text


def decode_request(text: str) -> Any:
    """Parse the text `request_text` returned, as `loads` but refusing NaN and Infinity."""
    return _REQUEST_DECODER.decode(text)


def decode_request_at(text: str, start: int) -> tuple[Any, int]:
    """As `loads_at`, for the text `request_text` returned (NaN and Infinity refused)."""
    return _REQUEST_DECODER.raw_decode(text, start)


def loads_request(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON request body: `request_text` (TooDeep, ValueError) then `decode_request`."""
    return decode_request(request_text(data, max_depth))


def loads(data: str | bytes | bytearray) -> Any:
    """Parse JSON; a number with a fraction or an exponent becomes a Decimal."""
    if not isinstance(data, str):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return _DECODER.decode(data)


def loads_at(text: str, start: int) -> tuple[Any, int]:
    """Parse the one JSON value that begins at `start` of `text` (no blank before it): the value and where it
    ends."""
    return _DECODER.raw_decode(text, start)


def dumps(value: Any) -> str:
    """Compact JSON (no spaces, non-ASCII escaped); a Decimal is written as the number it holds."""
    return _COMPACT.encode(value)


def canonical(value: Any, anything_as_text: bool = False) -> str:
    """The canonical text signed and hashed: keys sorted, compact, ASCII; a Decimal as the number it holds. What
    JSON has no form for is a TypeError, or its str() with `anything_as_text`."""
    return (_CANONICAL_OR_TEXT if anything_as_text else _CANONICAL).encode(value)


set_json_loads(loads)
set_json_dumps(dumps)
