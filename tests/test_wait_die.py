"""Cluster tier: wait-die at a participant looks at who holds the rows an apply needs (`Coordinator._older_holder`).

An apply that meets a locked row waits for its holder when the holder is prepared (it waits for nothing but its
decision) or younger; it gives up (a conflict: the global transaction aborts, its client may retry) when the
holder is an older global transaction still open here, and then at once, before any lock wait. Messages are sent
by hand, signed as bank would sign them, to government, where they stay open or prepared as each test needs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from psycopg import sql

from peer.network import LocalNetwork
from tests.helpers import wait_until
from tests.test_api_input import post, propagate
from tests.test_prepare_on_the_way import committed, finish, prepared_gids

pytestmark = pytest.mark.cluster

PEOPLE = {"Ann": "Lee", "Bob": "Ray", "Cyd": "Fox"}


def phone_change(first: str, old: str, new: str, **overrides: Any) -> dict[str, Any]:
    """bank's propagate of a new phone for one person (dejima_bank only: government forwards nothing)."""

    def row(phone: str) -> dict[str, Any]:
        return {"first_name": first, "last_name": PEOPLE[first], "phone": phone, "address": f"{first}'s"}

    keys = {"dejima_bank": [[first, PEOPLE[first]]]}
    return propagate("dejima_bank", [row(new)], deletions=[row(old)], origin_keys=keys, **overrides)


def stats(network: LocalNetwork) -> dict[str, int]:
    return dict(network.get("government", "/api/v1/status")["stats"])


def send(network: LocalNetwork, message: dict[str, Any]) -> dict[str, Any]:
    status, answer = post(network, "government", "/peer/v1/message", message)
    assert status == 200, answer
    return dict(answer["body"])


@pytest.fixture
def people(network: LocalNetwork) -> LocalNetwork:
    for first, last in PEOPLE.items():
        insert = sql.SQL("INSERT INTO bank_users (first_name, last_name, phone, address) VALUES ({}, {}, '0', {})")
        committed(network, "bank", insert.format(*map(sql.Literal, (first, last, f"{first}'s"))).as_string(None))
    return network


def test_an_apply_waits_for_a_prepared_holder_while_an_older_transaction_is_open_here(people: LocalNetwork) -> None:
    oldest = phone_change("Ann", "0", "1")  # open at government, holding Ann's row
    assert send(people, oldest)["vote"] == "yes"
    holder = phone_change("Bob", "0", "2", prepare=True)  # prepared at government, holding Bob's row
    assert send(people, holder)["prepared"] == ["government"]
    waiting = phone_change("Bob", "2", "3")  # younger than both: Bob's row is what it waits for
    before = stats(people)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send, people, waiting)
        # it ran out of two slices of lock wait and chose to wait on both times: the holder is prepared, and the
        # older one open here holds nothing it needs (the rule before gave up at the first, the oldest being open)
        wait_until(lambda: stats(people)["apply_lock_waits"] >= before["apply_lock_waits"] + 2, 20, "two lock waits")
        assert finish(people, "government", holder["body"]["gxid"], "commit")["ok"]
        assert answer.result(timeout=30)["vote"] == "yes"
    after = stats(people)
    assert after["wait_die_conflicts"] == before["wait_die_conflicts"]
    for message in (oldest, waiting):
        assert finish(people, "government", message["body"]["gxid"], "abort")["ok"]
    assert prepared_gids(people) == []


def test_an_apply_gives_up_at_once_on_a_row_an_older_open_transaction_holds(people: LocalNetwork) -> None:
    older = phone_change("Ann", "0", "1")
    assert send(people, older)["vote"] == "yes"
    before = stats(people)
    reply = send(people, phone_change("Ann", "0", "5"))
    assert (reply["vote"], reply["error_kind"]) == ("no", "conflict"), reply
    assert "older global transaction" in reply["error"], reply
    after = stats(people)
    assert after["conflicts_before_waiting"] == before["conflicts_before_waiting"] + 1
    assert after["apply_lock_waits"] == before["apply_lock_waits"]  # it gave up before any wait
    assert finish(people, "government", older["body"]["gxid"], "abort")["ok"]
    assert prepared_gids(people) == []


def test_an_older_apply_waits_for_a_younger_open_holder_until_it_ends(people: LocalNetwork) -> None:
    older = phone_change("Cyd", "0", "7")  # its gxid is the older: made first
    younger = phone_change("Cyd", "0", "8")
    assert send(people, younger)["vote"] == "yes"  # open at government, holding Cyd's row
    before = stats(people)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send, people, older)
        wait_until(lambda: stats(people)["apply_lock_waits"] > before["apply_lock_waits"], 20, "a lock wait")
        assert finish(people, "government", younger["body"]["gxid"], "abort")["ok"]
        assert answer.result(timeout=30)["vote"] == "yes"
    assert stats(people)["wait_die_conflicts"] == before["wait_die_conflicts"]
    assert finish(people, "government", older["body"]["gxid"], "abort")["ok"]
    assert people.query("government", "SELECT phone FROM government_users WHERE first_name = 'Cyd'") == [{"phone": "0"}]
