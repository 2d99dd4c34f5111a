"""Putback on real PostgreSQL: writes through a dejima view become the right base-table changes.

Covers the single-database parts of docs/scenarios.md (A3, A9, A10, A11) and the putback contract of the generated SQL.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from peer.dejima.delta import to_deltas
from tests.helpers import (
    SCHOOL_MANIFEST,
    base_rows,
    insert_rows,
    make_peer_type_root,
    register,
    relations,
    taken,
    view_rows,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


@pytest.fixture
def government(peer_db: Callable[..., str]) -> Iterator[Conn]:
    with psycopg.connect(peer_db("government"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def bank(peer_db: Callable[..., str]) -> Iterator[Conn]:
    with psycopg.connect(peer_db("bank"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def school(peer_db: Callable[..., str], tmp_path: Path) -> Iterator[Conn]:
    root = make_peer_type_root(tmp_path / "types", {"school": SCHOOL_MANIFEST})
    with psycopg.connect(peer_db("school", root), autocommit=True) as conn:
        yield conn


def test_it_gives_two_inserts_in_two_transactions_distinct_ids_from_the_sequence(government: Conn) -> None:
    """A3: the prototype inserted every row with the constant id 100."""
    with government.transaction():
        insert_rows(government, "dejima_bank", [{"first_name": "Ann", "last_name": "Lee", "phone": "1"}])
    with government.transaction():
        insert_rows(government, "dejima_bank", [{"first_name": "Bob", "last_name": "Kim", "phone": "2"}])
    rows = base_rows(government, "government_users")
    assert [(r["first_name"], r["last_name"]) for r in rows] == [("Ann", "Lee"), ("Bob", "Kim")]
    assert rows[0]["id"] < rows[1]["id"]
    assert all(r["birthdate"] is None for r in rows)  # not in dejima_bank, no default: NULL


def test_it_renames_through_the_view_keeping_the_id_and_private_columns(government: Conn, bank: Conn) -> None:
    """A9 at both ends of dejima_bank: a key change is a rename in place."""
    insert_rows(
        government,
        "government_users",
        [
            {
                "first_name": "John",
                "last_name": "Doe",
                "phone": "555-0100",
                "address": "1 Main St",
                "birthdate": datetime.date(1970, 1, 2),
            },
            {"first_name": "Other", "last_name": "Person"},
        ],
    )
    insert_rows(
        bank,
        "bank_users",
        [{"first_name": "John", "last_name": "Doe", "iban": "DE89", "phone": "555-0100", "risk_factor": 5}],
    )
    for conn, table in ((government, "government_users"), (bank, "bank_users")):
        before = base_rows(conn, table)
        with conn.transaction():
            register(conn, "gx-rename")
            cur = conn.execute(
                "UPDATE dejima_bank SET first_name = %s WHERE first_name = %s AND last_name = %s",
                ("Jon", "John", "Doe"),
            )
            assert cur.rowcount == 1
            changes = [c for c in taken(conn, "gx-rename") if c.view == "dejima_bank"]
        assert len(changes) == 1
        assert changes[0].old is not None
        assert changes[0].new is not None
        assert (changes[0].old["first_name"], changes[0].new["first_name"]) == ("John", "Jon")
        after = base_rows(conn, table)
        assert after == [{**before[0], "first_name": "Jon"}, *before[1:]]
        assert changes[0].row_id == before[0]["id"]


def test_it_keeps_nulls_in_phone_and_address(government: Conn) -> None:
    """A10: NULLs are values, not missing keys."""
    with government.transaction():
        register(government, "gx-nul")
        insert_rows(
            government,
            "dejima_bank",
            [{"first_name": "Nul", "last_name": "Person", "phone": None, "address": None}],
        )
        deltas = to_deltas(taken(government, "gx-nul"))
    expected = {"first_name": "Nul", "last_name": "Person", "phone": None, "address": None}
    assert deltas["dejima_bank"].insertions == [expected]
    assert deltas["dejima_insurance"].insertions == [
        {"first_name": "Nul", "last_name": "Person", "address": None, "birthdate": None}
    ]
    assert view_rows(government, "dejima_bank") == [expected]
    (row,) = base_rows(government, "government_users")
    assert (row["phone"], row["address"], row["birthdate"]) == (None, None, None)


def test_it_keeps_quotes_and_sql_text_intact_and_runs_nothing_else(bank: Conn) -> None:
    """A11: O'Brien at `1 "Quote" St; DROP TABLE x` is data, nothing more."""
    bank.execute("CREATE TABLE x (i integer)")
    before = relations(bank)
    row = {
        "first_name": "Seán",
        "last_name": "O'Brien",
        "phone": "'; DROP TABLE x; --",
        "address": '1 "Quote" St; DROP TABLE x',
    }
    with bank.transaction():
        register(bank, "gx-quote")
        insert_rows(bank, "dejima_bank", [row])
        cur = bank.execute(
            "UPDATE dejima_bank SET address = address || %s WHERE last_name = %s", ("$dejima$ \\ %s", "O'Brien")
        )
        assert cur.rowcount == 1
        deltas = to_deltas(taken(bank, "gx-quote"))
    final = {**row, "address": '1 "Quote" St; DROP TABLE x$dejima$ \\ %s'}
    assert deltas["dejima_bank"].insertions == [final]
    assert view_rows(bank, "dejima_bank") == [final]
    (base,) = base_rows(bank, "bank_users")
    assert (base["first_name"], base["last_name"], base["address"]) == ("Seán", "O'Brien", final["address"])
    assert relations(bank) == before
    assert bank.execute("SELECT count(*) FROM x").fetchone() == (0,)


def test_it_fills_columns_the_view_does_not_carry_with_the_manifest_defaults(school: Conn) -> None:
    insert_rows(school, "dejima_grades", [{"first_name": "Ann", "last_name": "Lee", "grade": 2}])
    insert_rows(school, "dejima_students", [{"first_name": "Bo", "last_name": "Li", "university": "Waseda"}])
    rows = {r["first_name"]: r for r in base_rows(school, "students")}
    assert {k: v for k, v in rows["Ann"].items() if k != "id"} == {
        "first_name": "Ann",
        "last_name": "Lee",
        "university": "Keio",
        "grade": 2,
        "note": "none",
        "enrolled": datetime.date(2020, 4, 1),
        "credits": 0,
    }
    assert {k: v for k, v in rows["Bo"].items() if k != "id"} == {
        "first_name": "Bo",
        "last_name": "Li",
        "university": "Waseda",
        "grade": None,
        "note": "none",
        "enrolled": None,
        "credits": None,
    }


def test_it_updates_in_place_keeping_the_private_columns(bank: Conn) -> None:
    insert_rows(
        bank,
        "bank_users",
        [
            {"first_name": "Ann", "last_name": "Lee", "iban": "DE1", "phone": "1", "address": "a", "risk_factor": 1},
            {"first_name": "Bob", "last_name": "Kim", "iban": "DE2", "phone": "2", "address": "b", "risk_factor": 2},
        ],
    )
    before = base_rows(bank, "bank_users")
    cur = bank.execute("UPDATE dejima_bank SET phone = 'new', address = NULL WHERE first_name = 'Ann'")
    assert cur.rowcount == 1
    cur = bank.execute("UPDATE dejima_risk SET risk_factor = 9 WHERE last_name = 'Kim'")
    assert cur.rowcount == 1
    assert base_rows(bank, "bank_users") == [
        {**before[0], "phone": "new", "address": None},
        {**before[1], "risk_factor": 9},
    ]


def test_it_deletes_the_base_row(bank: Conn) -> None:
    insert_rows(
        bank,
        "bank_users",
        [{"first_name": "Ann", "last_name": "Lee", "iban": "DE1"}, {"first_name": "Bob", "last_name": "Kim"}],
    )
    bob = base_rows(bank, "bank_users")[1]
    cur = bank.execute("DELETE FROM dejima_risk WHERE first_name = 'Ann' AND last_name = 'Lee'")
    assert cur.rowcount == 1
    assert base_rows(bank, "bank_users") == [bob]
    assert view_rows(bank, "dejima_bank") == [{"first_name": "Bob", "last_name": "Kim", "phone": None, "address": None}]


def test_it_refuses_an_insert_outside_the_row_filter_and_changes_nothing(school: Conn) -> None:
    insert_rows(school, "students", [{"first_name": "Ann", "last_name": "Lee", "university": "Keio", "note": "n"}])
    before = base_rows(school, "students")
    with school.transaction():
        register(school, "gx-out")
        with pytest.raises(errors.CheckViolation) as info, school.transaction():
            insert_rows(school, "dejima_students", [{"first_name": "Bo", "last_name": "Li", "university": "Hosei"}])
        assert info.value.sqlstate == "23514"
        assert "dejima_students" in str(info.value)
        assert taken(school, "gx-out") == []
    assert base_rows(school, "students") == before


def test_it_refuses_an_update_moving_a_row_out_of_the_filter_and_changes_nothing(school: Conn) -> None:
    insert_rows(
        school,
        "students",
        [
            {"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": 1, "note": "n"},
            {"first_name": "Bo", "last_name": "Li", "university": "Todai", "grade": 2, "note": "m"},
        ],
    )
    before = base_rows(school, "students")
    with pytest.raises(errors.CheckViolation, match="dejima_students") as info:
        school.execute("UPDATE dejima_students SET university = 'Hosei', grade = 5")
    assert info.value.sqlstate == "23514"
    assert base_rows(school, "students") == before


def test_it_never_touches_a_row_outside_the_filter_that_shares_the_key(school: Conn) -> None:
    insert_rows(
        school,
        "students",
        [
            {"first_name": "Ann", "last_name": "Lee", "university": "Hosei", "grade": 1, "note": "hidden"},
            {"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": 2, "note": "shown"},
        ],
    )
    hidden, shown = base_rows(school, "students")
    assert school.execute("UPDATE dejima_grades SET grade = 3").rowcount == 1
    assert base_rows(school, "students") == [hidden, {**shown, "grade": 3}]
    assert school.execute("DELETE FROM dejima_students").rowcount == 1
    assert base_rows(school, "students") == [hidden]
    insert_rows(school, "dejima_grades", [{"first_name": "Ann", "last_name": "Lee", "grade": 4}])
    assert view_rows(school, "dejima_grades") == [{"first_name": "Ann", "last_name": "Lee", "grade": 4}]
    assert base_rows(school, "students")[0] == hidden


def test_it_refuses_a_duplicate_key_and_changes_nothing(government: Conn) -> None:
    insert_rows(government, "government_users", [{"first_name": "Ann", "last_name": "Lee", "phone": "1"}])
    before = base_rows(government, "government_users")
    with government.transaction():
        register(government, "gx-dup")
        with pytest.raises(errors.UniqueViolation) as info, government.transaction():
            insert_rows(government, "dejima_insurance", [{"first_name": "Ann", "last_name": "Lee", "address": "x"}])
        assert info.value.sqlstate == "23505"
        assert taken(government, "gx-dup") == []
    assert base_rows(government, "government_users") == before


def test_it_refuses_a_rename_onto_an_existing_key_and_changes_nothing(government: Conn) -> None:
    insert_rows(government, "government_users", [{"first_name": "Ann", "last_name": "Lee"}])
    insert_rows(government, "dejima_bank", [{"first_name": "Bob", "last_name": "Kim", "phone": "2"}])
    before = base_rows(government, "government_users")
    with pytest.raises(errors.UniqueViolation):
        government.execute("UPDATE dejima_bank SET first_name = 'Ann', last_name = 'Lee' WHERE first_name = 'Bob'")
    assert base_rows(government, "government_users") == before


def test_it_changes_nothing_when_an_update_or_delete_matches_no_key(government: Conn) -> None:
    insert_rows(government, "government_users", [{"first_name": "Ann", "last_name": "Lee"}])
    before = base_rows(government, "government_users")
    assert government.execute("UPDATE dejima_bank SET phone = '2' WHERE first_name = 'Nobody'").rowcount == 0
    assert government.execute("DELETE FROM dejima_insurance WHERE last_name = 'Nobody'").rowcount == 0
    assert base_rows(government, "government_users") == before
