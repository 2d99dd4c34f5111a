"""Tamper evidence: every peer's hash-chained log of the global transactions it committed (`dejima.txlog`).

Unit: the entry summary is order-independent, the chain hash covers every field, and known entries hash to known
values (computed outside Python: the hashing cannot change unnoticed). Integration: sealed in a database, they give
those hashes. Cluster (real peers): one entry per committed global transaction at its origin and at every participant
it changed, none for an aborted one; `dejima check` names the peer and the seq of a chain tampered with in the
database; a restart and concurrent writes keep every chain valid.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import hashlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import requests
from psycopg.types.json import Jsonb

from peer.dejima import txlog
from peer.dejima.delta import RowChange
from peer.network import LocalNetwork
from tests.helpers import check, wait_until
from tests.test_check import run_check

PEERS = ("government", "bank", "insurance")


# ---- unit -----------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_summary_counts_rows_and_does_not_depend_on_their_order() -> None:
    a = RowChange("dejima_bank", 1, None, {"first_name": "A", "last_name": "B"})
    b = RowChange("dejima_bank", 2, {"first_name": "C", "last_name": "D"}, {"first_name": "C", "last_name": "E"})
    same = RowChange("dejima_risk", 3, {"x": 1}, {"x": 1})  # no net change: not in the summary
    one, two = txlog.summary([a, b, same]), txlog.summary([b, a])
    assert one == two
    assert one["dejima_bank"]["insertions"] == 2
    assert one["dejima_bank"]["deletions"] == 1
    assert set(one) == {"dejima_bank"}


@pytest.mark.unit
def test_folding_batches_keeps_the_first_old_and_the_last_new_image() -> None:
    acc: dict[tuple[str, int], RowChange] = {}
    txlog.fold_into(acc, [RowChange("v", 1, None, {"k": 1})])
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 1}, {"k": 2})])
    assert acc[("v", 1)] == RowChange("v", 1, None, {"k": 2})
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 2}, None)])
    assert txlog.summary(acc.values()) == {}  # inserted then deleted in one gxid: no change


@pytest.mark.unit
def test_the_hash_covers_every_field_and_the_previous_hash() -> None:
    fields: dict[str, Any] = {
        "seq": 1,
        "gxid": "bank.1.a",
        "origin": "bank",
        "role": "origin",
        "views": {"v": {"insertions": 1, "deletions": 0, "digest": "d"}},
        "committed_at": "2024-01-01T00:00:00.000000+00:00",
        "witness": {"government": {"seq": 0, "hash": txlog.GENESIS}},
    }
    # every parameter of the canonical form is changed below: a field added to it must be added here too
    assert set(inspect.signature(txlog.canonical).parameters) == set(fields)
    base = txlog.chain_hash(txlog.GENESIS, txlog.canonical(**fields))
    changes: list[tuple[str, Any]] = [
        ("seq", 2),
        ("gxid", "x"),
        ("origin", "x"),
        ("role", "participant"),
        ("views", {}),
        ("views", {"v": {"insertions": 1, "deletions": 0, "digest": "e"}}),
        ("committed_at", "2024-01-01T00:00:00.000001+00:00"),
        ("witness", {"government": {"seq": 1, "hash": txlog.GENESIS}}),
        ("witness", None),
    ]
    assert {name for name, _ in changes} == set(fields)
    for name, other in changes:
        assert txlog.chain_hash(txlog.GENESIS, txlog.canonical(**{**fields, name: other})) != base, (name, other)
    assert txlog.chain_hash("1" * 64, txlog.canonical(**fields)) != base


# ---- known answers: the hashing pinned to literal values ---------------------------------------------------------
# Computed once outside Python, from the canonical form the module docstring documents (the JSON of the entry with
# sorted keys, no spaces, ASCII) and sha256 as coreutils computes it, e.g. for the first entry:
#     printf '%s%s' "$(printf '0%.0s' $(seq 64))" "$CANONICAL_1" | sha256sum
# A change of the canonical form, of a field's text (the commit time's above all) or of how entries are chained
# changes these hashes: the chains every peer stored would no longer verify.
A64, B64, C64, D64, E64 = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)
KNOWN_ENTRIES: list[dict[str, Any]] = [
    {  # an origin's entry, with what its participant told (witness with `logged` and the staged entry's digest)
        "seq": 1,
        "gxid": "bank.1.a",
        "origin": "bank",
        "role": "origin",
        "views": {"dejima_bank": {"insertions": 1, "deletions": 0, "digest": A64}},
        "committed_at": "2024-01-01T00:00:00.000000+00:00",
        "witness": {"government": {"seq": 0, "hash": txlog.GENESIS, "logged": True, "entry": B64}},
    },
    {  # a participant's entry, with its origin's head
        "seq": 2,
        "gxid": "government.7.b",
        "origin": "government",
        "role": "participant",
        "views": {"dejima_bank": {"insertions": 0, "deletions": 1, "digest": C64}},
        "committed_at": "2024-02-29T12:34:56.789012+00:00",
        "witness": {"government": {"seq": 5, "hash": D64}},
    },
    {  # an entry from before witnesses (none in its canonical form), two views given out of order
        "seq": 3,
        "gxid": "insurance.3.c",
        "origin": "insurance",
        "role": "participant",
        "views": {
            "dejima_risk": {"insertions": 2, "deletions": 0, "digest": A64},
            "dejima_bank": {"insertions": 1, "deletions": 1, "digest": E64},
        },
        "committed_at": "2023-12-31T23:59:59.999999+00:00",
        "witness": None,
    },
]
KNOWN_CANONICAL = [
    '{"committed_at":"2024-01-01T00:00:00.000000+00:00","gxid":"bank.1.a","origin":"bank","role":"origin","seq":1,'
    f'"views":{{"dejima_bank":{{"deletions":0,"digest":"{A64}","insertions":1}}}},'
    f'"witness":{{"government":{{"entry":"{B64}","hash":"{txlog.GENESIS}","logged":true,"seq":0}}}}}}',
    '{"committed_at":"2024-02-29T12:34:56.789012+00:00","gxid":"government.7.b","origin":"government",'
    f'"role":"participant","seq":2,"views":{{"dejima_bank":{{"deletions":1,"digest":"{C64}","insertions":0}}}},'
    f'"witness":{{"government":{{"hash":"{D64}","seq":5}}}}}}',
    '{"committed_at":"2023-12-31T23:59:59.999999+00:00","gxid":"insurance.3.c","origin":"insurance",'
    f'"role":"participant","seq":3,"views":{{"dejima_bank":{{"deletions":1,"digest":"{E64}","insertions":1}},'
    f'"dejima_risk":{{"deletions":0,"digest":"{A64}","insertions":2}}}}}}',
]
KNOWN_HASHES = [
    "2e8f556a7a18461738cc634011c9dbd0faea7c7b2555ba1f4e172d173be3f032",
    "7a14336fd3d46ecccdf2ddec5007e96f37f08c671453a9aef55fcfc2adf8a457",
    "6df3b923601732e841af12cb084ad408ea619c9f13d5de321a9a13ad121b125f",
]


@pytest.mark.unit
def test_the_chain_hashes_known_entries_to_their_known_hashes() -> None:
    prev = txlog.GENESIS
    for entry, text, expected in zip(KNOWN_ENTRIES, KNOWN_CANONICAL, KNOWN_HASHES, strict=True):
        assert txlog.canonical(**entry) == text, entry["seq"]
        assert txlog.chain_hash(prev, text) == expected, entry["seq"]
        prev = expected


@pytest.mark.unit
def test_the_entry_digest_the_summary_and_the_commit_time_have_known_answers() -> None:
    # entry_digest: sha256 of the canonical {gxid, origin, role, views, witness} (seq, time and prev_hash left out)
    first = {k: v for k, v in KNOWN_ENTRIES[0].items() if k not in ("seq", "committed_at")}
    assert txlog.entry_digest(**first) == "243a4d902fb0e29d1e78bbd6d4a1c57076c1a5569a2ea3063273fc374b7b8644"
    # printf '%s' '{"gxid":"insurance.3.c","origin":"insurance","role":"participant","views":{},"witness":null}'
    assert (
        txlog.entry_digest("insurance.3.c", "insurance", "participant", {}, None)
        == "6ebafcff23b5ea1bd6f801e3c8939584932d5f839749f221ae497786368d503c"
    )
    # summary: sha256 of the sorted lines "+row\n" / "-row\n" (rows canonical: ASCII, a Decimal as its digits, a
    # date as its ISO text); printf '%s\n%s\n' '+{"birthdate":"1980-05-17",...}' '-{"first_name":"A",...}'
    inserted = {
        "first_name": "Zo\u00eb",
        "last_name": "O'Brien",
        "risk": decimal.Decimal("1.50"),
        "birthdate": datetime.date(1980, 5, 17),
    }
    changes = [
        RowChange("dejima_bank", 2, {"first_name": "A", "last_name": "B"}, None),
        RowChange("dejima_bank", 1, None, inserted),
    ]
    assert txlog.summary(changes) == {
        "dejima_bank": {
            "insertions": 1,
            "deletions": 1,
            "digest": "d8bf2e5bb8df625c741f31d836be574b053ee2d5d3a65a1722c084447c031b08",
        }
    }
    # the commit time: UTC, microseconds, whatever zone it was read in
    nine_hours_east = datetime.timezone(datetime.timedelta(hours=9))
    at = datetime.datetime(2024, 2, 29, 21, 34, 56, 789012, tzinfo=nine_hours_east)
    assert txlog.timestamp(at) == KNOWN_ENTRIES[1]["committed_at"]
    assert txlog.timestamp(at.replace(microsecond=0)) == "2024-02-29T12:34:56.000000+00:00"


@pytest.mark.integration
def test_sealing_in_the_database_gives_the_known_hashes_and_verify_covers_the_commit_time(
    peer_db: Callable[..., str],
) -> None:
    """The known entries staged in a peer's database (commit times written in other zones), sealed: the stored
    chain holds exactly the known hashes, and `verify` recomputes them; a commit time moved by one microsecond
    breaks the chain at that entry."""
    zones = ["2024-01-01 09:00:00+09", "2024-02-29 07:04:56.789012-05:30", "2023-12-31 23:59:59.999999+00"]
    with psycopg.connect(peer_db("bank"), autocommit=True) as conn:
        for entry, at in zip(KNOWN_ENTRIES, zones, strict=True):
            conn.execute(
                "INSERT INTO dejima.txlog_pending (gxid, origin, role, views, committed_at, witness)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    entry["gxid"],
                    entry["origin"],
                    entry["role"],
                    Jsonb(entry["views"]),
                    at,
                    Jsonb(entry["witness"]) if entry["witness"] is not None else None,
                ),
            )
        assert txlog.seal_all(conn) == (3, txlog.Head(3, KNOWN_HASHES[2]))
        rows = conn.execute("SELECT seq, gxid, prev_hash, hash FROM dejima.txlog ORDER BY seq").fetchall()
        assert rows == [
            (1, "bank.1.a", txlog.GENESIS, KNOWN_HASHES[0]),
            (2, "government.7.b", KNOWN_HASHES[0], KNOWN_HASHES[1]),
            (3, "insurance.3.c", KNOWN_HASHES[1], KNOWN_HASHES[2]),
        ]
        assert txlog.verify(conn).to_json() == {
            "ok": True,
            "length": 3,
            "broken_at": None,
            "reason": "",
            "head_hash": KNOWN_HASHES[2],
        }
        conn.execute("UPDATE dejima.txlog SET committed_at = committed_at + interval '1 microsecond' WHERE seq = 2")
        verdict = txlog.verify(conn)
        assert (verdict.ok, verdict.broken_at, verdict.reason) == (False, 2, "hash does not match the entry")


Entry = tuple[str, str, str, dict[str, Any], dict[str, Any] | None]  # gxid, origin, role, views, witness
VIEWS = {"dejima_bank": {"insertions": 1, "deletions": 0, "digest": "a" * 64}}


def participant_entry(gxid: str, origin: str, head: txlog.Head) -> Entry:
    return (gxid, origin, "participant", VIEWS, {origin: head.to_json()})


def origin_entry(gxid: str, origin: str, told: dict[str, tuple[txlog.Head, Entry | None]]) -> Entry:
    """The origin's entry, recording what each participant told: its head, and the entry it staged (or none)."""
    witness = {}
    for peer, (head, staged) in told.items():
        digest = txlog.entry_digest(*staged) if staged is not None else ""
        witness[peer] = txlog.witness_of(head.seq, head.hash, staged is not None, digest)
    return (gxid, origin, "origin", VIEWS, witness)


def compare(
    chains: dict[str, list[Entry]],
    hashes: dict[str, dict[int, str]] | None = None,
    asked: list[tuple[str, str]] | None = None,
) -> txlog.Damage:
    """`cross_check` over chains given as their entries (seq 1, 2, …); `asked`: gets every (peer, partner) whose
    items cross_check asked for."""

    def account(peer: str, pair: str | None = None) -> txlog.Accounting:
        acc = txlog.Accounting(peer, pair)
        for seq, entry in enumerate(chains[peer], 1):
            acc.add(seq, *entry)
        return acc

    reports = {}
    for peer, entries_ in chains.items():
        summary = account(peer).to_json()
        reports[peer] = txlog.ChainReport(True, len(entries_), summary["witnessed"], summary["witnessed_by"])
    known = hashes or {}

    def pair(peer: str, other: str) -> dict[str, Any]:
        if asked is not None:
            asked.append((peer, other))
        return account(peer, other).pair_json()

    return txlog.cross_check(reports, lambda peer, seqs: {seq: known.get(peer, {}).get(seq) for seq in seqs}, pair)


@pytest.mark.unit
def test_the_cross_check_finds_entries_a_partner_recorded_and_a_log_no_longer_has() -> None:
    h0 = txlog.EMPTY
    g1_gov = participant_entry("bank.1.a", "bank", h0)
    # insurance took part and staged no entry (its data did not change): nothing to owe, nothing to record
    g1_bank = origin_entry("bank.1.a", "bank", {"government": (h0, g1_gov), "insurance": (h0, None)})
    g2_bank = participant_entry("government.2.b", "government", txlog.Head(1, "h-gov-1"))
    g2_gov = origin_entry("government.2.b", "government", {"bank": (txlog.Head(1, "h-bank-1"), g2_bank)})
    good: dict[str, list[Entry]] = {"bank": [g1_bank, g2_bank], "government": [g1_gov, g2_gov], "insurance": []}
    hashes = {"bank": {1: "h-bank-1"}, "government": {1: "h-gov-1"}}
    assert compare(good, hashes) == {}
    # the newest entry of a participant gone: its origin recorded it (insurance logged nothing: it owes nothing)
    found = compare({**good, "bank": [g1_bank]}, hashes)
    assert {peer: seq for peer, (seq, _) in found.items()} == {"bank": 2}
    assert "government.2.b" in found["bank"][1] and "government" in found["bank"][1]
    # the newest entry of an origin gone: its participant recorded it
    found = compare({**good, "government": [g1_gov]}, hashes)
    assert {peer: seq for peer, (seq, _) in found.items()} == {"government": 2}
    # a participant's entry with other content (its hash recomputed, so its chain verifies): not what it staged
    changed = (*g2_bank[:3], {"dejima_bank": {**VIEWS["dejima_bank"], "digest": "b" * 64}}, g2_bank[4])
    found = compare({**good, "bank": [g1_bank, changed]}, hashes)
    assert {peer: seq for peer, (seq, _) in found.items()} == {"bank": 2}
    # a head a partner recorded beyond the log's length, or with another hash
    assert {p: s for p, (s, _) in compare({**good, "government": []}, hashes).items()} == {"government": 1}
    found = compare(good, {**hashes, "government": {1: "rewritten"}})
    assert {peer: seq for peer, (seq, _) in found.items()} == {"government": 1}
    assert "not the one bank recorded" in found["government"][1]


@pytest.mark.unit
def test_an_entry_from_before_witnesses_counts_on_neither_side() -> None:
    old = ("bank.0.z", "bank", "participant", VIEWS, None)
    assert compare({"bank": [("bank.0.z", "bank", "origin", VIEWS, None)], "government": [old]}) == {}


@pytest.mark.unit
def test_folding_keeps_an_old_image_from_before_the_gxid_and_the_summary_counts_every_row() -> None:
    acc: dict[tuple[str, int], RowChange] = {}
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 0}, {"k": 1})])
    txlog.fold_into(acc, [RowChange("v", 1, {"k": 1}, {"k": 2})])
    assert acc == {("v", 1): RowChange("v", 1, {"k": 0}, {"k": 2})}
    # a row without a net change first, then two deletions and an insertion: every change counted
    changes = [
        RowChange("v", 9, {"x": 1}, {"x": 1}),
        RowChange("v", 1, {"k": 1}, None),
        RowChange("v", 2, {"k": 2}, None),
        RowChange("v", 3, None, {"k": 3}),
    ]
    assert {k: v for k, v in txlog.summary(changes)["v"].items() if k != "digest"} == {"insertions": 1, "deletions": 2}


@pytest.mark.unit
def test_the_commit_time_is_utc_whatever_the_zone_of_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose host runs in another zone writes the same canonical time (and so the same hashes)."""
    at = datetime.datetime(2024, 2, 29, 21, 34, 56, 789012, tzinfo=datetime.timezone(datetime.timedelta(hours=9)))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert txlog.timestamp(at) == "2024-02-29T12:34:56.789012+00:00"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.unit
def test_a_witness_record_and_a_head_read_back_from_one_have_known_forms() -> None:
    # what an entry stores of a partner (hashed with it): the origin's head; a participant's, with what it staged
    assert txlog.witness_of(3, "h") == {"seq": 3, "hash": "h"}
    assert txlog.witness_of(3, "h", True, "d") == {"seq": 3, "hash": "h", "logged": True, "entry": "d"}
    assert txlog.witness_of(0, txlog.GENESIS, False) == {"seq": 0, "hash": txlog.GENESIS, "logged": False, "entry": ""}
    assert txlog.head_of({"seq": 0, "hash": txlog.GENESIS}) == txlog.EMPTY
    assert txlog.head_of({"seq": 7, "hash": "h", "logged": True}) == txlog.Head(7, "h")
    for bad in ({"seq": -1, "hash": "h"}, {"seq": True, "hash": "h"}, {"seq": "7", "hash": "h"}, {"seq": 7}, None):
        assert txlog.head_of(bad) is None, bad
    assert txlog.head_of({"seq": 7, "hash": 5}) is None
    assert txlog.head_of({"seq": -1, "hash": 5}) is None


# sha256 of "bank.1.a\nd1" and of "government.2.b\n" (coreutils: printf 'bank.1.a\nd1' | sha256sum)
SHA_G1_D1 = "1fcb45aadc5b6aa0275851e7ee525966b95afd53c8b31a5717b8ce2a685cf927"
SHA_G2 = "da12a9d06297bc38f0b56f6805e334f49e6c7ce8d3b9022052c045a2fcfe8a8f"


def xor_digest(*hexes: str) -> str:
    out = 0
    for h in hexes:
        out ^= int(h, 16)
    return f"{out:064x}"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.unit
def test_an_entry_set_is_its_size_and_the_xor_of_its_pairs_hashes() -> None:
    entries = txlog.EntrySet(items=[])
    entries.add("bank.1.a", "d1", 1)
    entries.add("government.2.b", "", 5)
    assert entries.to_json() == {"count": 2, "digest": xor_digest(SHA_G1_D1, SHA_G2)}
    assert entries.items == [("bank.1.a", "d1", 1), ("government.2.b", "", 5)]
    assert txlog.EntrySet().to_json() == {"count": 0, "digest": "0" * 64}


@pytest.mark.unit
def test_the_accounting_of_a_chain_records_each_partners_highest_head_and_entries() -> None:
    """bank's chain: an origin entry (government logged, insurance did not), a participant entry of government's
    global transaction, another origin entry with a head of government seen before. Witness records of bank itself,
    of a malformed partner and, in a participant's entry, of others than the origin are ignored."""
    g1, g2, g3 = "bank.1.a", "government.2.b", "bank.3.c"
    chain: list[tuple[int, str, str, str, Any, Any]] = [
        (
            1,
            g1,
            "bank",
            "origin",
            VIEWS,
            {
                "bank": txlog.witness_of(9, "self", True, "x"),
                "risk": "not a record",
                "government": txlog.witness_of(3, "h3", True, "d1"),
                "insurance": txlog.witness_of(0, txlog.GENESIS, False),
            },
        ),
        (
            2,
            g2,
            "government",
            "participant",
            VIEWS,
            {"insurance": {"seq": 9, "hash": "i9"}, "government": {"seq": 4, "hash": "h4"}},
        ),
        (3, g3, "bank", "origin", VIEWS, {"government": txlog.witness_of(4, "h4", True, "d3")}),
        (4, "bank.4.d", "bank", "origin", VIEWS, None),  # from before witnesses
    ]
    acc = txlog.Accounting("bank", pair="government")
    for entry in chain:
        acc.add(*entry)
    owed_g2 = txlog.entry_digest(g2, "government", "participant", VIEWS, chain[1][5])
    assert acc.to_json() == {
        "witnessed": {
            "government": {
                "head": {"seq": 4, "hash": "h4", "recorded_at": 2},
                "count": 3,
                "digest": xor_digest(SHA_G1_D1, SHA_G2, sha(f"{g3}\nd3")),
            },
            "insurance": {"head": {"seq": 0, "hash": txlog.GENESIS, "recorded_at": 1}, "count": 0, "digest": "0" * 64},
        },
        "witnessed_by": {
            "government": {"count": 3, "digest": xor_digest(sha(f"{g1}\n"), sha(f"{g2}\n{owed_g2}"), sha(f"{g3}\n"))}
        },
    }
    assert acc.pair_json() == {
        "peer": "government",
        "recorded": [(g1, "d1", 1), (g3, "d3", 3), (g2, "", 2)],
        "owed": [(g1, "", 1), (g3, "", 3), (g2, owed_g2, 2)],
    }
    assert sorted(acc.owed) == ["government", "insurance"]
    assert acc.owed["insurance"].items is None  # only the pair's items are kept


@pytest.mark.unit
def test_a_witness_record_without_a_head_or_an_entry_digest_is_still_counted() -> None:
    acc = txlog.Accounting("bank", pair="government")
    acc.add(1, "bank.1.a", "bank", "origin", VIEWS, {"government": {"logged": True, "entry": "d1"}})
    acc.add(2, "bank.2.b", "bank", "origin", VIEWS, {"government": {"seq": 1, "hash": "h", "logged": True}})
    assert acc.to_json()["witnessed"]["government"]["head"] == {"seq": 1, "hash": "h", "recorded_at": 2}
    assert acc.pair_json()["recorded"] == [("bank.1.a", "d1", 1), ("bank.2.b", "", 2)]
    only_digest = txlog.Accounting("bank")
    only_digest.add(1, "bank.1.a", "bank", "origin", VIEWS, {"government": {"logged": True, "entry": "d1"}})
    assert only_digest.to_json()["witnessed"]["government"] == {"head": None, "count": 1, "digest": SHA_G1_D1}


def three_peer_chains() -> tuple[dict[str, list[Entry]], dict[str, dict[int, str]]]:
    """bank and government each originate one global transaction with insurance; bank and government never meet."""
    h0 = txlog.EMPTY
    gi1 = participant_entry("bank.1.a", "bank", h0)
    gb1 = origin_entry("bank.1.a", "bank", {"insurance": (h0, gi1)})
    gi2 = participant_entry("government.1.b", "government", h0)
    gg1 = origin_entry("government.1.b", "government", {"insurance": (txlog.Head(1, "h-ins-1"), gi2)})
    chains = {"bank": [gb1], "government": [gg1], "insurance": [gi1, gi2]}
    return chains, {"insurance": {1: "h-ins-1", 2: "h-ins-2"}, "bank": {1: "h-bank-1"}, "government": {1: "h-gov-1"}}


@pytest.mark.unit
def test_the_cross_check_asks_for_items_only_where_two_chains_disagree() -> None:
    chains, hashes = three_peer_chains()
    asked: list[tuple[str, str]] = []
    assert compare(chains, hashes, asked) == {}
    assert asked == []  # every pair's sets agree: no peer is asked for its items
    # insurance's newest entry (government's global transaction) gone: only that pair is asked (each of the two for
    # its items, from each side), never bank
    found = compare({**chains, "insurance": chains["insurance"][:1]}, hashes, asked)
    assert found == {
        "insurance": (2, "government recorded its entry for government.1.b, which its log no longer holds")
    }
    assert sorted(asked) == [("government", "insurance")] * 2 + [("insurance", "government")] * 2


@pytest.mark.unit
def test_the_cross_check_reads_a_pair_answer_without_items_as_none() -> None:
    """A peer that answers its items without `recorded` or `owed` (nothing kept for that partner) is read as having
    none: the entries the other side has are then the ones found missing."""
    report = txlog.ChainReport(True, 1, {"bank": {"count": 1, "digest": "1" * 64}}, {})
    partner = txlog.ChainReport(True, 0, {}, {"insurance": {"count": 0}})
    found = txlog.cross_check(
        {"insurance": report, "bank": partner},
        lambda peer, seqs: {},
        lambda peer, other: {"recorded": [("bank.1.a", "", 1)]} if peer == "insurance" else {},
    )
    assert found == {"bank": (1, "insurance recorded its entry for bank.1.a, which its log no longer holds")}
    found = txlog.cross_check({"insurance": report, "bank": partner}, lambda peer, seqs: {}, lambda peer, other: {})
    assert found == {}


@pytest.mark.unit
def test_the_cross_check_names_each_kind_of_damage_with_its_seq_and_why() -> None:
    chains, hashes = three_peer_chains()
    # every entry of insurance gone: government recorded its head at seq 1, so its log lost entry 1 on
    assert compare({**chains, "insurance": []}, hashes) == {
        "insurance": (1, "government recorded its log at seq 1; it holds 0 entries")
    }
    # insurance's entry 1 rewritten behind a recomputed chain: not the entry government recorded at seq 1
    assert compare(chains, {**hashes, "insurance": {1: "forged", 2: "h-ins-2"}}) == {
        "insurance": (1, "entry 1 is not the one government recorded (rewritten at or before it)")
    }
    # insurance's participant entry for bank's global transaction with other content: not what bank recorded
    first = chains["insurance"][0]
    changed: Entry = (*first[:3], {"dejima_bank": {**VIEWS["dejima_bank"], "digest": "b" * 64}}, first[4])
    assert compare({**chains, "insurance": [changed, chains["insurance"][1]]}, hashes) == {
        "insurance": (1, "its entry 1 for bank.1.a is not the one bank recorded")
    }
    # bank's origin entry gone (its chain empty and valid): insurance recorded it as bank's
    assert compare({**chains, "bank": []}, hashes) == {
        "bank": (1, "its entry for bank.1.a, which insurance's log records, is no longer in its log")
    }


# ---- cluster --------------------------------------------------------------------------------------------------
def db(net: LocalNetwork, peer: str) -> str:
    return net.server.url(net.specs[peer].database)


def entries(net: LocalNetwork, peer: str, seal: bool = True) -> list[tuple[int, str, str, str]]:
    """The chained entries, read from the database; with `seal`, after GET /api/v1/txlog chained what is staged (the
    sealer chains committed entries by itself too, a moment after each commit)."""
    if seal:
        net.get(peer, "/api/v1/txlog?limit=1")
    with psycopg.connect(db(net, peer)) as conn:
        rows = conn.execute("SELECT seq, gxid, origin, role FROM dejima.txlog ORDER BY seq").fetchall()
    return [(int(s), g, o, r) for s, g, o, r in rows]


def chain(net: LocalNetwork, peer: str) -> dict[str, Any]:
    body: dict[str, Any] = net.get(peer, "/api/v1/txlog?verify=1&limit=5")
    return body


def no_prepared(net: LocalNetwork) -> None:
    wait_until(lambda: not net.get("bank", "/api/v1/prepared")["prepared"], 20, "no prepared transaction left")


def insert(peer: str, first: str, last: str) -> str:
    table = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}[peer]
    return f"INSERT INTO {table} (first_name, last_name, address) VALUES ('{first}', '{last}', '1 Main St')"  # noqa: S608


def assert_logged(net: LocalNetwork, answers: list[dict[str, Any]], before: dict[str, int]) -> None:
    """Every committed answer has exactly one entry at its origin (role origin) and at each participant (role
    participant); nothing else was appended; every chain verifies."""
    expected: dict[str, dict[str, str]] = {p: {} for p in PEERS}
    for answer in answers:
        origin = answer["gxid"].split(".", 1)[0]
        expected[origin][answer["gxid"]] = "origin"
        for participant in answer["participants"]:
            expected[participant][answer["gxid"]] = "participant"
    for peer in PEERS:
        new = [e for e in entries(net, peer) if e[0] > before[peer]]
        assert {g: r for _, g, _, r in new} == expected[peer], peer
        assert len(new) == len(expected[peer]), f"{peer}: more than one entry for a gxid"
        verdict = chain(net, peer)["verify"]
        assert verdict == {**verdict, "ok": True, "broken_at": None}, (peer, verdict)


def lengths(net: LocalNetwork) -> dict[str, int]:
    return {p: (entries(net, p) or [(0, "", "", "")])[-1][0] for p in PEERS}


@pytest.mark.cluster
def test_every_committed_global_transaction_is_logged_at_its_origin_and_participants(network: LocalNetwork) -> None:
    before = lengths(network)
    answers = []
    for peer, statement in [
        ("bank", insert("bank", "Ann", "Lee")),
        ("government", "UPDATE government_users SET address = '2 Elm St' WHERE first_name = 'Ann'"),
        ("insurance", insert("insurance", "Bo", "Kim")),
        ("bank", "DELETE FROM bank_users WHERE first_name = 'Bo'"),
    ]:
        status, body = network.exec(peer, statement)
        assert status == 200, body
        assert body["participants"], body
        answers.append(body)
    # a write that changes no dejima view (nothing matches) changes no shared data: no entry anywhere
    status, body = network.exec("bank", "UPDATE bank_users SET phone = '1' WHERE first_name = 'Nobody'")
    assert status == 200, body
    assert_logged(network, answers, before)
    head = chain(network, "bank")
    assert head["head"]["gxid"] == answers[-1]["gxid"]
    assert head["length"] == len(entries(network, "bank"))
    code, report = run_check(network)
    assert code == 0, report
    chains: Any = report["chains"]
    assert set(chains) == set(PEERS)
    assert all(c["ok"] and c["broken_at"] is None for c in chains.values())


@pytest.mark.cluster
def test_an_aborted_global_transaction_leaves_no_entry_anywhere(network: LocalNetwork) -> None:
    before = lengths(network)
    # someone else locks insurance's staged entries: insurance cannot stage its entry, votes no at prepare, all
    # roll back (government may have prepared its entry already: it is rolled back with the data)
    with psycopg.connect(db(network, "insurance")) as holder:
        holder.execute("LOCK TABLE dejima.txlog_pending IN EXCLUSIVE MODE")
        status, body = network.exec("bank", insert("bank", "Cy", "Abe"))
        assert status == 409, body
        assert "insurance" in body["error"], body
        holder.rollback()
    no_prepared(network)
    assert lengths(network) == before
    assert network.query("government", "SELECT * FROM government_users WHERE first_name = 'Cy'") == []
    status, body = network.exec("bank", insert("bank", "Cy", "Abe"))
    assert status == 200, body
    assert_logged(network, [body], before)


@pytest.mark.cluster
def test_dejima_check_names_the_peer_and_seq_of_a_chain_tampered_with(network: LocalNetwork) -> None:
    for first in ("Di", "Ed", "Fay"):
        status, body = network.exec("bank", insert("bank", first, "Ng"))
        assert status == 200, body
    seq = entries(network, "government")[-2][0]  # not the head: the chain after it must break too
    with psycopg.connect(db(network, "government"), autocommit=True) as conn:
        original = conn.execute("SELECT views, hash FROM dejima.txlog WHERE seq = %s", (seq,)).fetchone()
        assert original is not None
        try:
            # an entry changed (the summary claims another row digest)
            conn.execute(
                "UPDATE dejima.txlog SET views = jsonb_set(views, '{dejima_bank,digest}', '\"0\"') WHERE seq = %s",
                (seq,),
            )
            code, report = run_check(network)
            assert code == 1
            chains: Any = report["chains"]
            assert chains["government"]["ok"] is False
            assert chains["government"]["broken_at"] == seq
            assert chains["bank"]["ok"] and chains["insurance"]["ok"]
            assert not report["ok"]
            # a hash changed (restoring the entry but forging its hash): broken at the same seq
            conn.execute(
                "UPDATE dejima.txlog SET views = %s, hash = repeat('f', 64) WHERE seq = %s",
                (Jsonb(original[0]), seq),
            )
            code, report = run_check(network)
            assert code == 1
            assert report["chains"]["government"]["broken_at"] == seq  # type: ignore[index]
        finally:
            conn.execute(
                "UPDATE dejima.txlog SET views = %s, hash = %s WHERE seq = %s",
                (Jsonb(original[0]), original[1], seq),
            )
    code, report = run_check(network)
    assert code == 0, report
    # an entry deleted: the chain breaks where it was
    with psycopg.connect(db(network, "insurance"), autocommit=True) as conn:
        seq = entries(network, "insurance")[-2][0]
        row = conn.execute("DELETE FROM dejima.txlog WHERE seq = %s RETURNING *", (seq,)).fetchone()
        assert row is not None
        try:
            code, report = run_check(network)
            assert code == 1
            assert report["chains"]["insurance"]["broken_at"] == seq  # type: ignore[index]
        finally:
            conn.execute(
                "INSERT INTO dejima.txlog VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (*row[:4], Jsonb(row[4]), *row[5:8], Jsonb(row[8])),
            )
    assert run_check(network)[0] == 0


@pytest.mark.cluster
def test_a_peer_restart_keeps_the_chain_valid(network: LocalNetwork) -> None:
    status, body = network.exec("bank", insert("bank", "Gus", "Oh"))
    assert status == 200, body
    head = chain(network, "insurance")["head"]
    network.stop("insurance")
    network.start("insurance")
    network.wait_ready(timeout=60)
    assert chain(network, "insurance")["verify"]["ok"]
    before = lengths(network)
    status, body = network.exec("bank", insert("bank", "Hal", "Oh"))
    assert status == 200, body
    assert_logged(network, [body], before)
    with psycopg.connect(db(network, "insurance")) as conn:
        row = conn.execute("SELECT seq, prev_hash FROM dejima.txlog ORDER BY seq DESC LIMIT 1").fetchone()
    assert row == (head["seq"] + 1, head["hash"])


@pytest.mark.cluster
def test_concurrent_writes_keep_every_chain_valid(network: LocalNetwork) -> None:
    before = lengths(network)
    committed: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def writer(peer: str, worker: int) -> None:
        for i in range(4):
            statement = insert(peer, f"W{worker}n{i}", peer)
            for _ in range(60):
                resp = requests.post(
                    network.specs[peer].url + "/api/v1/exec",
                    json={"sql": statement},
                    headers=network.auth_headers(peer),
                    timeout=60,
                ).json()
                if resp.get("status") == "committed":
                    with lock:
                        committed.append(resp)
                    break
                if resp.get("kind") not in ("conflict", "timeout"):
                    with lock:
                        failures.append(str(resp))
                    return
                time.sleep(0.05)
            else:
                with lock:
                    failures.append(f"{peer}: {statement} never committed")

    threads = [
        threading.Thread(target=writer, args=(peer, n * 10 + k)) for n, peer in enumerate(PEERS) for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(committed) == 24
    no_prepared(network)
    assert_logged(network, committed, before)
    code, report = run_check(network)
    assert code == 0, report


@pytest.mark.cluster
def test_the_sealer_chains_a_committed_entry_without_anyone_reading_the_log(network: LocalNetwork) -> None:
    before = {p: len(entries(network, p)) for p in PEERS}
    status, body = network.exec("bank", insert("bank", "Ivy", "Sealed"))
    assert status == 200, body
    # read straight from the databases (the API would seal first): the sealer threads chain it by themselves
    wait_until(
        lambda: all(len(entries(network, p, seal=False)) == before[p] + 1 for p in PEERS),
        10,
        "every peer chained its entry",
    )
    for peer in PEERS:
        with psycopg.connect(db(network, peer)) as conn:
            assert conn.execute("SELECT count(*) FROM dejima.txlog_pending").fetchone() == (0,), peer
            assert txlog.verify(conn).ok, peer
        assert entries(network, peer, seal=False)[-1][1] == body["gxid"], peer


# ---- truncation evidence: every chain compared with what its partners recorded of it ---------------------------
ROW = "seq, gxid, origin, role, views, committed_at, prev_hash, hash, witness"


def damaged_peers(report: dict[str, Any]) -> dict[str, int | None]:
    chains: dict[str, Any] = report["chains"]
    return {peer: chain["broken_at"] for peer, chain in chains.items() if not chain["ok"]}


def settled_green(net: LocalNetwork) -> None:
    """Nothing prepared anywhere and `dejima check` green (every participant's COMMIT PREPARED landed)."""
    wait_until(lambda: check(net)["ok"], 20, "dejima check to be green")


@contextlib.contextmanager
def deleted(net: LocalNetwork, peer: str, seqs: list[int]) -> Iterator[None]:
    """Entries `seqs` of the peer's log deleted behind its back, put back afterwards."""
    with psycopg.connect(db(net, peer), autocommit=True) as conn:
        rows = conn.execute(f"DELETE FROM dejima.txlog WHERE seq = ANY(%s) RETURNING {ROW}", (seqs,)).fetchall()  # noqa: S608
        assert len(rows) == len(seqs), (peer, seqs)
        try:
            yield
        finally:
            for row in rows:
                conn.execute(
                    f"INSERT INTO dejima.txlog ({ROW}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",  # noqa: S608
                    (*row[:4], Jsonb(row[4]), *row[5:8], Jsonb(row[8]) if row[8] is not None else None),
                )


@contextlib.contextmanager
def rewritten(net: LocalNetwork, peer: str, seq: int, rehash: bool = False) -> Iterator[None]:
    """Entry `seq` of the peer's log claims another change (its views' digest), its hash recomputed or not."""
    with psycopg.connect(db(net, peer), autocommit=True) as conn:
        row = conn.execute(f"SELECT {ROW} FROM dejima.txlog WHERE seq = %s", (seq,)).fetchone()  # noqa: S608
        assert row is not None
        views = {v: {**s, "digest": "0" * 64} for v, s in row[4].items()}
        new_hash = row[7]
        if rehash:
            entry = txlog.canonical(seq, row[1], row[2], row[3], views, txlog.timestamp(row[5]), row[8])
            new_hash = txlog.chain_hash(row[6], entry)
        conn.execute("UPDATE dejima.txlog SET views = %s, hash = %s WHERE seq = %s", (Jsonb(views), new_hash, seq))
        try:
            yield
        finally:
            conn.execute("UPDATE dejima.txlog SET views = %s, hash = %s WHERE seq = %s", (Jsonb(row[4]), row[7], seq))


def writes_everywhere(net: LocalNetwork, tag: str) -> None:
    """Global transactions started at each peer in turn: every log has entries as origin and as participant."""
    for peer, statement in [
        ("bank", insert("bank", "Tru", tag)),
        ("government", f"UPDATE government_users SET address = '9 Oak St' WHERE last_name = '{tag}'"),  # noqa: S608
        ("insurance", insert("insurance", "Cat", tag)),
        ("bank", f"UPDATE bank_users SET risk_factor = 3 WHERE last_name = '{tag}'"),  # noqa: S608
        ("government", f"UPDATE government_users SET phone = '7' WHERE last_name = '{tag}'"),  # noqa: S608
    ]:
        status, body = net.exec(peer, statement)
        assert status == 200, body
        assert body["participants"], body
    settled_green(net)


@pytest.mark.cluster
def test_deleting_or_rewriting_any_entry_of_any_log_is_reported_naming_the_peer_and_seq(network: LocalNetwork) -> None:
    """At each peer in turn: its newest entry deleted (its chain still verifies by itself: what its partners recorded
    shows it), its oldest and a middle one deleted, and one rewritten. `dejima check` names exactly that peer and
    seq, and is green again once the entry is back."""
    writes_everywhere(network, "Chk")
    for peer in PEERS:
        seqs = [e[0] for e in entries(network, peer)]
        assert len(seqs) >= 4, (peer, seqs)
        newest, oldest, middle = seqs[-1], seqs[0], seqs[len(seqs) // 2]
        for what, damage, at in [
            ("the newest entry deleted", deleted(network, peer, [newest]), newest),
            ("the two newest deleted", deleted(network, peer, seqs[-2:]), seqs[-2]),
            ("the oldest entry deleted", deleted(network, peer, [oldest]), oldest),
            ("a middle entry deleted", deleted(network, peer, [middle]), middle),
            ("a middle entry rewritten", rewritten(network, peer, middle), middle),
            ("the newest entry rewritten", rewritten(network, peer, newest), newest),
        ]:
            with damage:
                report = check(network)
                assert damaged_peers(report) == {peer: at}, (peer, what, report["chains"])
                assert not report["ok"]
            assert check(network)["ok"], (peer, what)


@pytest.mark.cluster
def test_a_whole_log_deleted_or_its_newest_participant_entry_rewritten_with_its_hash_is_reported(
    network: LocalNetwork,
) -> None:
    """Damage the chain cannot show by itself: every entry gone (an empty chain verifies), and a participant's
    newest entry rewritten with its hash recomputed (its origin recorded the digest of what it staged)."""
    writes_everywhere(network, "Whole")
    status, body = network.exec("bank", insert("bank", "Last", "Whole"))  # bank's partners' newest: participant ones
    assert status == 200, body
    settled_green(network)
    for peer in ("government", "insurance"):
        seqs = [e[0] for e in entries(network, peer)]
        assert entries(network, peer)[-1][1:] == (body["gxid"], "bank", "participant")
        with rewritten(network, peer, seqs[-1], rehash=True):
            assert chain(network, peer)["verify"]["ok"]  # the chain alone cannot tell
            assert damaged_peers(check(network)) == {peer: seqs[-1]}
        with deleted(network, peer, seqs):
            assert chain(network, peer)["verify"]["ok"]
            assert damaged_peers(check(network)) == {peer: 1}
        assert check(network)["ok"]
    # through the command, as a person runs it: exit 1, the peer and seq in its report
    seqs = [e[0] for e in entries(network, "bank")]
    with deleted(network, "bank", [seqs[-1]]):
        code, report = run_check(network)
        assert code == 1
        assert damaged_peers(report) == {"bank": seqs[-1]}
    assert run_check(network)[0] == 0
