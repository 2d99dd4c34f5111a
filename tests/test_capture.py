"""Change capture on real PostgreSQL: the statement triggers record exactly the view delta of what changed."""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from peer.dejima import jsonvalues
from peer.dejima.apply import GxState, apply_delta, outgoing
from peer.dejima.delta import RowChange, begin_sql, end_global, new_token, take_changes, to_deltas
from peer.dejima.manifest import load_peer_types
from tests.helpers import (
    SCHOOL_MANIFEST,
    base_rows,
    delta_records,
    insert_rows,
    make_peer_type_root,
    register,
    taken,
    view_rows,
)

pytestmark = pytest.mark.integration

GX = "gx-capture-1"
JOHN = {
    "first_name": "John",
    "last_name": "Doe",
    "iban": "DE89",
    "address": "1 Main St",
    "phone": "555-0100",
    "risk_factor": 3,
}
JOHN_BANK = {"first_name": "John", "last_name": "Doe", "phone": "555-0100", "address": "1 Main St"}
JOHN_RISK = {"first_name": "John", "last_name": "Doe", "risk_factor": 3}


@pytest.fixture
def bank(peer_db: Callable[..., str]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(peer_db("bank"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def school(peer_db: Callable[..., str], tmp_path: Path) -> Iterator[psycopg.Connection[Any]]:
    root = make_peer_type_root(tmp_path / "types", {"school": SCHOOL_MANIFEST})
    with psycopg.connect(peer_db("school", root), autocommit=True) as conn:
        yield conn


def john_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT id FROM bank_users WHERE first_name = 'John' AND last_name = 'Doe'").fetchone()
    assert row is not None
    return int(row[0])


def with_john(conn: psycopg.Connection[Any]) -> int:
    """John Doe in bank_users, written outside any global transaction (so not captured)."""
    insert_rows(conn, "bank_users", [JOHN])
    return john_id(conn)


def test_it_records_an_insert_as_an_insertion_into_every_view_of_the_table(bank: psycopg.Connection[Any]) -> None:
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        insert_rows(bank, "bank_users", [JOHN])
        rid = john_id(bank)
        raw = delta_records(bank)
        assert raw == [
            {"gxid": GX, "view_name": "dejima_bank", "row_id": rid, "old_row": None, "new_row": JOHN_BANK},
            {"gxid": GX, "view_name": "dejima_risk", "row_id": rid, "old_row": None, "new_row": JOHN_RISK},
        ]
        changes = taken(bank, GX)
        assert changes == [
            RowChange("dejima_bank", rid, None, JOHN_BANK),
            RowChange("dejima_risk", rid, None, JOHN_RISK),
        ]
        deltas = to_deltas(changes)
        assert deltas["dejima_bank"].insertions == [JOHN_BANK]
        assert deltas["dejima_bank"].deletions == []
        assert delta_records(bank) == []  # taken = removed


def test_it_records_a_delete_as_a_deletion_from_every_view(bank: psycopg.Connection[Any]) -> None:
    rid = with_john(bank)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        bank.execute("DELETE FROM bank_users WHERE id = %s", (rid,))
        assert [(r["view_name"], r["old_row"], r["new_row"]) for r in delta_records(bank)] == [
            ("dejima_bank", JOHN_BANK, None),
            ("dejima_risk", JOHN_RISK, None),
        ]
        assert taken(bank, GX) == [
            RowChange("dejima_bank", rid, JOHN_BANK, None),
            RowChange("dejima_risk", rid, JOHN_RISK, None),
        ]


def test_it_records_an_update_of_a_view_column_only_in_the_views_that_carry_it(bank: psycopg.Connection[Any]) -> None:
    rid = with_john(bank)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        bank.execute("UPDATE bank_users SET phone = '555-0200' WHERE id = %s", (rid,))
        changes = taken(bank, GX)
        assert changes == [RowChange("dejima_bank", rid, JOHN_BANK, {**JOHN_BANK, "phone": "555-0200"})]
        delta = to_deltas(changes)["dejima_bank"]
        assert delta.deletions == [JOHN_BANK]
        assert delta.insertions == [{**JOHN_BANK, "phone": "555-0200"}]


def test_it_records_nothing_for_an_update_of_a_private_column(bank: psycopg.Connection[Any]) -> None:
    rid = with_john(bank)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        cur = bank.execute("UPDATE bank_users SET iban = 'GB33' WHERE id = %s", (rid,))
        assert cur.rowcount == 1
        assert delta_records(bank) == []
        assert taken(bank, GX) == []


def test_it_records_nothing_for_a_no_op_update(bank: psycopg.Connection[Any]) -> None:
    with_john(bank)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        cur = bank.execute(
            "UPDATE bank_users SET first_name = first_name, last_name = last_name, phone = phone,"
            " address = address, risk_factor = risk_factor, iban = iban"
        )
        assert cur.rowcount == 1
        assert delta_records(bank) == []
        assert taken(bank, GX) == []


def test_it_records_nothing_for_a_no_op_update_of_nulls(bank: psycopg.Connection[Any]) -> None:
    insert_rows(bank, "bank_users", [{"first_name": "Nul", "last_name": "Person"}])
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        bank.execute("UPDATE bank_users SET phone = NULL, address = NULL, risk_factor = NULL")
        assert delta_records(bank) == []


def test_it_folds_an_insert_and_two_updates_into_one_insertion_with_the_final_values(
    bank: psycopg.Connection[Any],
) -> None:
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        insert_rows(bank, "bank_users", [JOHN])
        rid = john_id(bank)
        bank.execute("UPDATE bank_users SET phone = '555-0200' WHERE id = %s", (rid,))
        bank.execute("UPDATE bank_users SET address = '9 Side St', risk_factor = 7 WHERE id = %s", (rid,))
        assert len(delta_records(bank)) == 5  # 2 (insert) + 1 (phone) + 2 (address in bank, risk in risk)
        changes = taken(bank, GX)
        final_bank = {**JOHN_BANK, "phone": "555-0200", "address": "9 Side St"}
        assert changes == [
            RowChange("dejima_bank", rid, None, final_bank),
            RowChange("dejima_risk", rid, None, {**JOHN_RISK, "risk_factor": 7}),
        ]
        assert to_deltas(changes)["dejima_bank"].insertions == [final_bank]
        assert to_deltas(changes)["dejima_bank"].deletions == []


def test_it_folds_an_insert_then_a_delete_into_nothing(bank: psycopg.Connection[Any]) -> None:
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        insert_rows(bank, "bank_users", [JOHN])
        bank.execute("DELETE FROM bank_users")
        assert len(delta_records(bank)) == 4
        assert taken(bank, GX) == []
        assert to_deltas([]) == {}
        assert delta_records(bank) == []


def test_it_folds_an_update_and_its_reversal_into_nothing(bank: psycopg.Connection[Any]) -> None:
    with_john(bank)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        bank.execute("UPDATE bank_users SET phone = '555-0999'")
        bank.execute("UPDATE bank_users SET phone = '555-0100'")
        assert len(delta_records(bank)) == 2
        assert taken(bank, GX) == []


def test_it_records_a_key_change_as_one_row_change_with_the_same_row_id(bank: psycopg.Connection[Any]) -> None:
    rid = with_john(bank)
    before = base_rows(bank, "bank_users")
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        cur = bank.execute("UPDATE dejima_bank SET first_name = 'Jon' WHERE first_name = 'John' AND last_name = 'Doe'")
        assert cur.rowcount == 1
        changes = taken(bank, GX)
        assert changes == [
            RowChange("dejima_bank", rid, JOHN_BANK, {**JOHN_BANK, "first_name": "Jon"}),
            RowChange("dejima_risk", rid, JOHN_RISK, {**JOHN_RISK, "first_name": "Jon"}),
        ]
        # the base row was renamed in place: same id, private columns kept
        assert base_rows(bank, "bank_users") == [{**before[0], "first_name": "Jon"}]
        assert before[0]["id"] == rid


def test_it_records_a_row_moving_into_the_filter_as_an_insertion(school: psycopg.Connection[Any]) -> None:
    insert_rows(school, "students", [{"first_name": "Ann", "last_name": "Lee", "university": "Hosei", "note": "x"}])
    rid = base_rows(school, "students")[0]["id"]
    with school.transaction(force_rollback=True):
        register(school, GX)
        school.execute("UPDATE students SET university = 'Keio'")
        assert taken(school, GX) == [
            RowChange(
                "dejima_students",
                rid,
                None,
                {"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": None},
            ),
            RowChange("dejima_grades", rid, None, {"first_name": "Ann", "last_name": "Lee", "grade": None}),
        ]


def test_it_records_a_row_moving_out_of_the_filter_as_a_deletion(school: psycopg.Connection[Any]) -> None:
    insert_rows(
        school, "students", [{"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": 2, "note": "x"}]
    )
    rid = base_rows(school, "students")[0]["id"]
    with school.transaction(force_rollback=True):
        register(school, GX)
        school.execute("UPDATE students SET university = 'Hosei', grade = 3")
        deltas = to_deltas(taken(school, GX))
        assert deltas["dejima_students"].insertions == []
        assert deltas["dejima_students"].deletions == [
            {"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": 2}
        ]
        assert deltas["dejima_grades"].deletions == [{"first_name": "Ann", "last_name": "Lee", "grade": 2}]
        assert deltas["dejima_grades"].insertions == []
        assert delta_records(school) == []  # taken = removed
        assert rid == base_rows(school, "students")[0]["id"]


def test_it_records_nothing_for_changes_outside_the_filter(school: psycopg.Connection[Any]) -> None:
    insert_rows(school, "students", [{"first_name": "Ann", "last_name": "Lee", "university": "Hosei", "note": "x"}])
    with school.transaction(force_rollback=True):
        register(school, GX)
        school.execute("UPDATE students SET grade = 5, first_name = 'Anna'")
        insert_rows(school, "students", [{"first_name": "Bo", "last_name": "Li", "university": "Hosei", "note": "y"}])
        school.execute("DELETE FROM students WHERE first_name = 'Anna'")
        assert delta_records(school) == []


def test_it_records_a_view_column_change_inside_the_filter_only_where_the_column_is_shown(
    school: psycopg.Connection[Any],
) -> None:
    insert_rows(
        school, "students", [{"first_name": "Ann", "last_name": "Lee", "university": "Keio", "grade": 2, "note": "x"}]
    )
    with school.transaction(force_rollback=True):
        register(school, GX)
        school.execute("UPDATE students SET university = 'Waseda', note = 'y'")
        changes = taken(school, GX)
        assert [c.view for c in changes] == ["dejima_students"]
        assert changes[0].old is not None
        assert changes[0].new is not None
        assert (changes[0].old["university"], changes[0].new["university"]) == ("Keio", "Waseda")


def _bulk_load(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        "INSERT INTO bank_users (first_name, last_name, iban, phone, address, risk_factor)"
        " SELECT 'First' || i, 'Last' || i, 'IBAN' || i, NULL, 'Street ' || i, i %% 10"
        " FROM generate_series(1, %s) AS i",
        (n,),
    )


def test_it_records_exactly_the_10000_rows_of_a_10000_row_update(bank: psycopg.Connection[Any]) -> None:
    _bulk_load(bank, 10_000)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        cur = bank.execute("UPDATE bank_users SET phone = 'p' || id")
        assert cur.rowcount == 10_000
        count = bank.execute(
            "SELECT count(*), count(DISTINCT row_id), min(view_name), max(view_name) FROM dejima.delta WHERE gxid = %s",
            (GX,),
        ).fetchone()
        assert count == (10_000, 10_000, "dejima_bank", "dejima_bank")
        changes = taken(bank, GX)
        assert len(changes) == 10_000
        assert all(c.old is not None and c.new is not None for c in changes)
        assert all(c.old["phone"] is None and c.new["phone"] == f"p{c.row_id}" for c in changes)  # type: ignore[index]
        delta = to_deltas(changes)["dejima_bank"]
        assert len(delta.insertions) == len(delta.deletions) == 10_000


def test_it_records_nothing_for_a_10000_row_update_of_a_private_column(bank: psycopg.Connection[Any]) -> None:
    _bulk_load(bank, 10_000)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        cur = bank.execute("UPDATE bank_users SET iban = 'X' || id")
        assert cur.rowcount == 10_000
        assert bank.execute("SELECT count(*) FROM dejima.delta").fetchone() == (0,)
        assert taken(bank, GX) == []


def test_it_records_one_row_when_one_row_of_a_large_table_changes(bank: psycopg.Connection[Any]) -> None:
    _bulk_load(bank, 10_000)
    with bank.transaction(force_rollback=True):
        register(bank, GX)
        bank.execute("UPDATE bank_users SET risk_factor = 42 WHERE first_name = 'First77'")
        changes = taken(bank, GX)
        assert [(c.view, c.new["risk_factor"] if c.new else None) for c in changes] == [("dejima_risk", 42)]


def test_it_records_nothing_in_a_transaction_the_peer_did_not_register(bank: psycopg.Connection[Any]) -> None:
    with bank.transaction(force_rollback=True):
        insert_rows(bank, "bank_users", [JOHN])
        bank.execute("UPDATE bank_users SET phone = '1'")
        bank.execute("DELETE FROM bank_users")
        assert delta_records(bank) == []
    with bank.transaction(force_rollback=True):  # the setting of earlier versions means nothing any more
        bank.execute("SELECT set_config('dejima.gxid', 'gx-forged', true)")
        insert_rows(bank, "bank_users", [JOHN])
        assert delta_records(bank) == []
    # the registration ends with its transaction: a later transaction records nothing
    with bank.transaction():
        end_global(bank, register(bank, GX))
    insert_rows(bank, "bank_users", [JOHN])
    assert delta_records(bank) == []
    assert bank.execute("SELECT count(*) FROM dejima.active").fetchone() == (0,)


def test_it_refuses_an_empty_gxid() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        begin_sql("", new_token())


def test_a_transaction_belongs_to_one_global_transaction_only(bank: psycopg.Connection[Any]) -> None:
    with bank.transaction(force_rollback=True):
        register(bank, "gx-a")
        insert_rows(bank, "bank_users", [JOHN])
        with pytest.raises(errors.InsufficientPrivilege, match="belongs to a global transaction already"):
            register(bank, "gx-b")
    with bank.transaction(force_rollback=True):
        register(bank, "gx-a")
        insert_rows(bank, "bank_users", [JOHN])
        assert [r["gxid"] for r in delta_records(bank)] == ["gx-a", "gx-a"]
        with pytest.raises(errors.InsufficientPrivilege, match="not the token"):
            take_changes(bank, b"\x00" * 32)  # not its token: nothing taken
    with bank.transaction(force_rollback=True):
        register(bank, "gx-a")
        insert_rows(bank, "bank_users", [JOHN])
        assert [c.view for c in taken(bank, "gx-a")] == ["dejima_bank", "dejima_risk"]
        assert taken(bank, "gx-a") == []


def test_it_keeps_records_of_other_gxids_committed_by_another_transaction(peer_db: Callable[..., str]) -> None:
    url = peer_db("bank")
    with psycopg.connect(url, autocommit=True) as other, psycopg.connect(url, autocommit=True) as conn:
        with other.transaction():
            register(other, "gx-other")
            insert_rows(other, "bank_users", [JOHN])
        with conn.transaction(force_rollback=True):
            register(conn, GX)
            conn.execute("UPDATE bank_users SET risk_factor = 4")
            assert [c.view for c in taken(conn, GX)] == ["dejima_risk"]
            assert [r["gxid"] for r in delta_records(conn)] == ["gx-other", "gx-other"]


def test_it_refuses_truncate_inside_a_global_transaction(bank: psycopg.Connection[Any]) -> None:
    with_john(bank)
    with bank.transaction():
        register(bank, GX)
        with pytest.raises(errors.FeatureNotSupported, match="TRUNCATE") as info, bank.transaction():
            bank.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier("bank_users")))
        assert "bank_users" in str(info.value)
        assert len(view_rows(bank, "dejima_bank")) == 1
    # outside a global transaction it is the administrator's business
    bank.execute("TRUNCATE bank_users")
    assert view_rows(bank, "dejima_bank") == []


LEDGER_MANIFEST = """\
peer_type = "ledger"

[tables.accounts.columns]
owner = "text not null"
balance = "numeric"

[views.dejima_accounts]
table = "accounts"
columns = ["owner", "balance"]
key = ["owner"]
members = ["ledger"]
"""


def test_it_keeps_numeric_values_exact_in_the_captured_delta(peer_db: Callable[..., str], tmp_path: Path) -> None:
    exact = decimal.Decimal("12345678901234567890.123456")
    root = make_peer_type_root(tmp_path / "types", {"ledger": LEDGER_MANIFEST})
    with psycopg.connect(peer_db("ledger", root), autocommit=True) as conn, conn.transaction(force_rollback=True):
        register(conn, GX)
        insert_rows(conn, "accounts", [{"owner": "Ann", "balance": exact}])
        (change,) = taken(conn, GX)
        assert change.new is not None
        assert change.new["balance"] == exact
        assert isinstance(change.new["balance"], decimal.Decimal)


def test_numeric_values_cross_the_wire_and_apply_exactly(peer_db: Callable[..., str], tmp_path: Path) -> None:
    """A numeric of 26 digits, captured at one peer, sent as a message body (JSON and back), applied at another,
    then updated from the exact old value (which the receiver must recognise as its row's)."""
    exact = decimal.Decimal("12345678901234567890.123456")
    root = make_peer_type_root(tmp_path / "types", {"ledger": LEDGER_MANIFEST})
    ptype = load_peer_types(root)["ledger"]
    with (
        psycopg.connect(peer_db("ledger", root)) as origin,
        psycopg.connect(peer_db("ledger", root)) as receiver,
    ):
        for n, (statement, params, balance) in enumerate(
            [
                (
                    "INSERT INTO accounts (owner, balance) VALUES (%s, %s)",
                    ("Ann", exact),
                    "12345678901234567890.123456",
                ),
                ("UPDATE accounts SET balance = balance + 1 WHERE owner = %s", ("Ann",), "12345678901234567891.123456"),
            ]
        ):
            gxid = f"{GX}-{n}"  # two global transactions, one after the other
            sent = GxState(gxid=gxid, ptype=ptype, conn=origin, token=register(origin, gxid), peer="ledger")
            got = GxState(gxid=gxid, ptype=ptype, conn=receiver, token=register(receiver, gxid), peer="ledger")
            origin.execute(statement, params)
            delta = outgoing(sent, taken(origin, gxid))["dejima_accounts"]
            body = jsonvalues.dumps({"insertions": delta.insertions, "deletions": delta.deletions})
            assert f'"balance":{balance}' in body
            wire = jsonvalues.loads(body)
            apply_delta(got, "dejima_accounts", wire["insertions"], wire["deletions"])
            taken(receiver, gxid)
            origin.commit()
            receiver.commit()
        (stored,) = receiver.execute("SELECT balance FROM accounts WHERE owner = 'Ann'").fetchone() or (None,)
        assert stored == exact + 1
