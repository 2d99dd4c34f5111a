"""Unit tier: `peer.dejima.jsonvalues` keeps numbers exact and writes what the standard library writes otherwise."""

from __future__ import annotations

import datetime
import decimal
import json
from typing import Any

import pytest

from peer.dejima import jsonvalues

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text", ["12345678901234567890.123456", "1.50", "1E+400", "123456789012345678901234567890"])
def test_a_number_comes_back_as_the_same_text(text: str) -> None:
    value = jsonvalues.loads(f'{{"n": {text}}}'.encode())
    assert jsonvalues.dumps(value) == f'{{"n":{text}}}'
    assert jsonvalues.canonical(value) == f'{{"n":{text}}}'


def test_a_tiny_number_comes_back_exact_in_exponent_form() -> None:
    value = jsonvalues.loads('{"n": -0.000000000000000000001}')
    assert jsonvalues.dumps(value) == '{"n":-1E-21}'
    assert jsonvalues.loads(jsonvalues.dumps(value)) == value == {"n": decimal.Decimal("-1e-21")}


def test_fractions_load_as_decimals_and_integers_as_ints() -> None:
    value = jsonvalues.loads('[1.5, 2, 10000000000000000000001, "3.5", true, null]')
    assert value == [decimal.Decimal("1.5"), 2, 10000000000000000000001, "3.5", True, None]
    assert [type(v) for v in value[:3]] == [decimal.Decimal, int, int]


@pytest.mark.parametrize(
    "value",
    [{"b": [1, 2.5, None], "a": "é ☃ \u2028 \x01", "c": {"z": True, "y": -3}}, [], "", 0.1, 10**30],
)
def test_without_decimals_it_writes_what_the_standard_library_writes(value: Any) -> None:
    assert jsonvalues.dumps(value) == json.dumps(value, separators=(",", ":"))
    assert jsonvalues.canonical(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def test_what_json_has_no_form_for_is_an_error_unless_asked_for_text() -> None:
    with pytest.raises(TypeError):
        jsonvalues.canonical({"d": datetime.date(2024, 4, 1)})
    assert jsonvalues.canonical({"d": datetime.date(2024, 4, 1)}, anything_as_text=True) == '{"d":"2024-04-01"}'


def test_malformed_input_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsonvalues.loads(b'{"n": 1.5')
    with pytest.raises(ValueError):
        jsonvalues.loads(b"\xff\xfe\x00")
