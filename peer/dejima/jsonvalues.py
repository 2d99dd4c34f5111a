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
"""

from __future__ import annotations

import decimal
import json
from typing import Any

import simplejson
from psycopg.types.json import set_json_dumps, set_json_loads

_DECODER = json.JSONDecoder(parse_float=decimal.Decimal)
_OPTIONS: dict[str, Any] = {"separators": (",", ":"), "use_decimal": True, "namedtuple_as_object": False}
_COMPACT = simplejson.JSONEncoder(**_OPTIONS)
_CANONICAL = simplejson.JSONEncoder(sort_keys=True, **_OPTIONS)
_CANONICAL_OR_TEXT = simplejson.JSONEncoder(sort_keys=True, default=str, **_OPTIONS)


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
