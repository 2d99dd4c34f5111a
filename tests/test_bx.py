"""The BX laws of every shipped dejima view (and of filtered views), as properties on real PostgreSQL.

- GetPut: putting the view it currently reads changes nothing: every base row (id and private columns included)
  stays as it was, and nothing is captured.
- PutGet: after putting V, the view reads V; base rows whose key stays keep their id and private columns, and the
  captured delta of the view is exactly the difference between the old view and V.

One database per test; every example runs in a transaction that is rolled back.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.dejima.delta import to_deltas
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import Column, PeerType, Table, View, load_peer_types
from tests.helpers import (
    SCHOOL_MANIFEST,
    base_rows,
    delta_records,
    insert_rows,
    make_peer_type_root,
    put_view,
    register,
    sort_rows,
    taken,
    to_json_row,
    touch_view,
    view_rows,
)

pytestmark = pytest.mark.integration

BX_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GX = "gx-bx"

# Strings that break naive quoting, formatting or encoding.
NASTY = (
    "",
    " ",
    "O'Brien",
    "'; DROP TABLE x; --",
    '1 "Quote" St; DROP TABLE x',
    "$dejima$",
    "$$",
    "\\",
    "%s",
    "%(x)s",
    "{}",
    "NULL",
    "null",
    "a\nb\tc",
    "Zoë",
    "Straße",
    "李小龍",
    "🙂",
    "\u200b",
)
NAMES = ("Ann", "Bob", "John", "Jane", "O'Brien", "Zoë", "'; DROP TABLE x; --")
TEXT = st.one_of(
    st.sampled_from(NASTY),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
)
KEY_TEXT = st.one_of(st.sampled_from(NAMES), TEXT)

VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": TEXT,
    "integer": st.integers(-(2**31), 2**31 - 1),
    "bigint": st.integers(-(2**63), 2**63 - 1),
    "numeric": st.decimals(min_value=-(10**9), max_value=10**9, places=4, allow_nan=False, allow_infinity=False),
    "double precision": st.floats(allow_nan=False, allow_infinity=False),
    "boolean": st.booleans(),
    "date": st.dates(),
    "timestamptz": st.datetimes(
        min_value=datetime.datetime(1900, 1, 1),
        max_value=datetime.datetime(2200, 1, 1),
        timezones=st.just(datetime.UTC),
    ),
}


def value_strategy(column: Column, keys: set[str]) -> st.SearchStrategy[Any]:
    base = KEY_TEXT if column.name in keys and column.type == "text" else VALUES[column.type]
    return base if column.not_null else st.one_of(st.none(), base)


def key_of(view: View) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    return lambda row: tuple(row[k] for k in view.key)


def base_strategy(ptype: PeerType, table: Table) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Base rows of `table` (every column, private ones too) whose keys are unique for every view of the table."""
    views = ptype.views_of(table.name)
    keys = {k for v in views for k in v.key}
    row = st.fixed_dictionaries({c.name: value_strategy(c, keys) for c in table.columns})
    return st.lists(row, max_size=8, unique_by=tuple(key_of(v) for v in views))


def view_strategy(
    view: View, table: Table, **override: st.SearchStrategy[Any]
) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Target contents of `view`: rows with unique keys."""
    columns = {c.name: c for c in table.columns}
    row = st.fixed_dictionaries({c: override.get(c, value_strategy(columns[c], set(view.key))) for c in view.columns})
    return st.lists(row, max_size=8, unique_by=key_of(view))


@dataclass
class Subject:
    conn: psycopg.Connection[Any]
    ptype: PeerType
    view: View
    table: Table

    @property
    def private(self) -> list[str]:
        return ["id", *(c for c in self.table.column_names if c not in self.view.columns)]


SHIPPED = load_peer_types(SQL_ROOT)
SHIPPED_VIEWS = [(p.name, v.name) for p in SHIPPED.values() for v in p.views]


def test_it_covers_every_view_of_the_shipped_example() -> None:
    assert sorted(SHIPPED_VIEWS) == [
        ("bank", "dejima_bank"),
        ("bank", "dejima_risk"),
        ("government", "dejima_bank"),
        ("government", "dejima_insurance"),
        ("insurance", "dejima_insurance"),
        ("insurance", "dejima_risk"),
    ]


@pytest.fixture(params=SHIPPED_VIEWS, ids=[f"{t}-{v}" for t, v in SHIPPED_VIEWS])
def shipped(request: pytest.FixtureRequest, peer_db: Callable[..., str]) -> Iterator[Subject]:
    type_name, view_name = request.param
    ptype = SHIPPED[type_name]
    view = ptype.view(view_name)
    with psycopg.connect(peer_db(type_name), autocommit=True) as conn:
        yield Subject(conn, ptype, view, ptype.table(view.table))


def check_getput(s: Subject, base: list[dict[str, Any]]) -> None:
    conn, view = s.conn, s.view
    with conn.transaction(force_rollback=True):
        insert_rows(conn, s.table.name, base)
        before = base_rows(conn, s.table.name)
        current = view_rows(conn, view.name, view.key)
        register(conn, GX)
        put_view(conn, view.name, view.key, current)
        # the same put, written as an UPDATE of every view row to its own values (the triggers do run)
        assert touch_view(conn, view.name, view.columns) == len(current)
        assert base_rows(conn, s.table.name) == before
        assert view_rows(conn, view.name, view.key) == current
        assert delta_records(conn) == []
        assert taken(conn, GX) == []


def check_putget(s: Subject, base: list[dict[str, Any]], target: list[dict[str, Any]]) -> None:
    conn, view = s.conn, s.view
    key = key_of(view)
    with conn.transaction(force_rollback=True):
        insert_rows(conn, s.table.name, base)
        before = base_rows(conn, s.table.name)
        before_view = view_rows(conn, view.name, view.key)
        register(conn, GX)
        put_view(conn, view.name, view.key, target)
        assert view_rows(conn, view.name, view.key) == sort_rows(target, view.key)
        # rows whose key stays in the view keep their id and private columns
        kept = {key(r) for r in target}
        after = {r["id"]: r for r in base_rows(conn, s.table.name)}
        shown = {key(r) for r in before_view}
        for row in before:
            if key(row) in kept and key(row) in shown and _in_view(s, row):
                assert row["id"] in after
                assert {c: after[row["id"]][c] for c in s.private} == {c: row[c] for c in s.private}
        # and the captured delta of the view is exactly the difference
        delta = to_deltas(taken(conn, GX)).get(view.name)
        deletions = [to_json_row(r) for r in before_view if r not in target]
        insertions = [to_json_row(r) for r in target if r not in before_view]
        assert sort_rows(delta.deletions if delta else [], view.key) == sort_rows(deletions, view.key)
        assert sort_rows(delta.insertions if delta else [], view.key) == sort_rows(insertions, view.key)


def _in_view(s: Subject, row: dict[str, Any]) -> bool:
    # only the school type has a filter: university <> 'Hosei'
    return not s.view.filter or row["university"] != "Hosei"


@BX_SETTINGS
@given(data=st.data())
def test_it_satisfies_getput_for_every_shipped_view(shipped: Subject, data: st.DataObject) -> None:
    check_getput(shipped, data.draw(base_strategy(shipped.ptype, shipped.table), label="base"))


@BX_SETTINGS
@given(data=st.data())
def test_it_satisfies_putget_for_every_shipped_view(shipped: Subject, data: st.DataObject) -> None:
    base = data.draw(base_strategy(shipped.ptype, shipped.table), label="base")
    target = data.draw(view_strategy(shipped.view, shipped.table), label="target")
    check_putget(shipped, base, target)


# Filtered views: the school test type (dejima_students shows university, dejima_grades does not and takes the
# default 'Keio'); rows at 'Hosei' are outside both views and may share a key with a row inside.
UNIVERSITY = st.one_of(st.sampled_from(("Keio", "Waseda", "Hosei")), TEXT)
INSIDE = UNIVERSITY.filter(lambda u: u != "Hosei")
SCHOOL_VIEWS = ["dejima_students", "dejima_grades"]


def school_base_strategy(ptype: PeerType) -> st.SearchStrategy[list[dict[str, Any]]]:
    table = ptype.table("students")
    key = key_of(ptype.view("dejima_students"))
    columns = {c.name: value_strategy(c, {"first_name", "last_name"}) for c in table.columns}
    inside = st.lists(st.fixed_dictionaries({**columns, "university": INSIDE}), max_size=6, unique_by=key)
    outside = st.lists(st.fixed_dictionaries({**columns, "university": st.just("Hosei")}), max_size=4, unique_by=key)
    return st.tuples(inside, outside).map(lambda pair: pair[0] + pair[1])


@pytest.fixture(params=SCHOOL_VIEWS)
def filtered(request: pytest.FixtureRequest, peer_db: Callable[..., str], tmp_path: Path) -> Iterator[Subject]:
    root = make_peer_type_root(tmp_path / "types", {"school": SCHOOL_MANIFEST})
    ptype = load_peer_types(root)["school"]
    view = ptype.view(request.param)
    with psycopg.connect(peer_db("school", root), autocommit=True) as conn:
        yield Subject(conn, ptype, view, ptype.table(view.table))


@BX_SETTINGS
@given(data=st.data())
def test_it_satisfies_getput_for_a_filtered_view(filtered: Subject, data: st.DataObject) -> None:
    check_getput(filtered, data.draw(school_base_strategy(filtered.ptype), label="base"))


@BX_SETTINGS
@given(data=st.data())
def test_it_satisfies_putget_for_a_filtered_view_with_targets_inside_the_filter(
    filtered: Subject, data: st.DataObject
) -> None:
    base = data.draw(school_base_strategy(filtered.ptype), label="base")
    override = {"university": INSIDE} if "university" in filtered.view.columns else {}
    target = data.draw(view_strategy(filtered.view, filtered.table, **override), label="target")
    check_putget(filtered, base, target)
