"""Tamper evidence: a hash-chained log of the global transactions this peer committed (`dejima.txlog`).

One entry per committed global transaction that changed this peer's data (its dejima views): gxid, origin, this
peer's role (`origin` | `participant`), a summary of the net change per view (insertions, deletions and an
order-independent digest of the rows) and the commit time. Entries are numbered 1, 2, … (`seq`) and chained:

    hash = sha256(prev_hash || canonical entry)        prev_hash of seq 1 = GENESIS (64 zeros)

where the canonical entry is the JSON of {seq, gxid, origin, role, views, committed_at} with sorted keys and no
spaces (`canonical`). Changing, deleting or inserting a row breaks the chain at that seq (`verify`).

The entry is staged inside the transaction that commits the change — at the origin in the transaction holding
the decision row, at a participant in the transaction it then PREPAREs — as a row of `dejima.txlog_pending`
(`stage`), so it commits or rolls back with the data, and no lock is taken there: global transactions committing
at the same time do not wait for each other. The peer's sealer (`seal`, a background thread woken after every
commit, and every read of the log) links the committed staged entries into the chain, several per database
transaction, serialized by a transaction-level advisory lock (`CHAIN_LOCK`): the order of the chain is the order
of sealing. A staged entry that is not sealed yet (half a second, `SEAL_GATHER_S`, or until the peer restarts after a
crash) is not covered by the chain; `GET /api/v1/txlog` and `dejima check` seal first. Sealing never chains a gxid
twice: a staged entry for a gxid already in the chain (or twice in one batch) is dropped and logged.

Truncation evidence. A chain proves that no entry *inside* it changed; that its newest entries were deleted, or the
whole chain recomputed, only a copy elsewhere can show. So every entry carries, in `witness` (chained with the rest),
what the partners of that global transaction said of their own logs: the origin's entry the head (seq, hash) of each
participant when it prepared, whether it staged an entry for this gxid (`logged`) and the digest of that entry's
content (`entry_digest`: what it staged, without what sealing adds); a participant's entry the origin's head. Every
peer's chain so holds, for each partner, the highest head it recorded of it and the set of that partner's entries it
knows of; the partner's own chain says the same set from its side (`Accounting`). `dejima check` compares them
(`cross_check`): a head beyond a peer's length, a head whose hash differs, an entry a partner recorded and the peer no
longer has (or has with other content) names that peer and a seq. A head is taken before the entry of its own
global transaction is sealed, so the newest entries are covered by the entry sets, not by heads.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from peer.dejima import jsonvalues
from peer.dejima.delta import RowChange

log = logging.getLogger(__name__)

GENESIS = "0" * 64
CHAIN_LOCK = 0x64656A696D6174  # "dejimat": the advisory lock key that serializes sealing of this peer's chain
VERIFY_BATCH = 5000
SEAL_BATCH = 500  # staged entries linked per sealing transaction

HEAD_SQL = "SELECT seq, hash FROM dejima.txlog ORDER BY seq DESC LIMIT 1"
STAGE_SQL = "INSERT INTO dejima.txlog_pending (gxid, origin, role, views, witness) VALUES (%s, %s, %s, %s, %s)"
INSERT_SQL = (
    "INSERT INTO dejima.txlog (seq, gxid, origin, role, views, committed_at, prev_hash, hash, witness)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
# the committed staged entries, oldest first, each with whether its gxid is in the chain already (never twice)
STAGED_SQL = (
    "SELECT p.id, p.gxid, p.origin, p.role, p.views, p.committed_at, p.witness, t.seq IS NOT NULL"
    " FROM dejima.txlog_pending AS p LEFT JOIN dejima.txlog AS t ON t.gxid = p.gxid ORDER BY p.id LIMIT %s"
)
ENTRIES_SQL = (
    "SELECT seq, gxid, origin, role, views, committed_at, prev_hash, hash, witness FROM dejima.txlog"
    " WHERE seq >= %s ORDER BY seq LIMIT %s"
)


@dataclass(frozen=True)
class Head:
    """The newest entry of a chain: its seq and hash (seq 0 and GENESIS: an empty chain)."""

    seq: int
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash}


EMPTY = Head(0, GENESIS)


def fold_into(acc: dict[tuple[str, int], RowChange], changes: Iterable[RowChange]) -> None:
    """Accumulate a gxid's captured changes (several batches) into its net change per (view, base row)."""
    for change in changes:
        key = (change.view, change.row_id)
        first = acc.get(key)
        acc[key] = change if first is None else RowChange(change.view, change.row_id, first.old, change.new)


def summary(changes: Iterable[RowChange]) -> dict[str, dict[str, Any]]:
    """Per view: how many view rows were inserted and deleted, and a digest of those rows (order-independent:
    the sha256 of the sorted canonical lines `+row` / `-row`). Views without a net change are absent."""
    lines: dict[str, list[str]] = {}
    counts: dict[str, list[int]] = {}
    for change in changes:
        if change.old == change.new:
            continue
        view_lines = lines.setdefault(change.view, [])
        count = counts.setdefault(change.view, [0, 0])
        if change.new is not None:
            view_lines.append("+" + _json(change.new))
            count[0] += 1
        if change.old is not None:
            view_lines.append("-" + _json(change.old))
            count[1] += 1
    out: dict[str, dict[str, Any]] = {}
    for view in sorted(lines):
        digest = hashlib.sha256()
        for line in sorted(lines[view]):
            digest.update(line.encode() + b"\n")
        out[view] = {"insertions": counts[view][0], "deletions": counts[view][1], "digest": digest.hexdigest()}
    return out


def _json(value: Any) -> str:
    return jsonvalues.canonical(value, anything_as_text=True)


def timestamp(at: datetime.datetime) -> str:
    """The canonical text of a commit time: UTC, microseconds (what timestamptz keeps)."""
    return at.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def canonical(
    seq: int,
    gxid: str,
    origin: str,
    role: str,
    views: dict[str, Any],
    committed_at: str,
    witness: dict[str, Any] | None = None,
) -> str:
    """The text an entry's hash covers: its fields, with `witness` only when it has one (entries from before there
    were witnesses hash as they always did)."""
    entry = {"seq": seq, "gxid": gxid, "origin": origin, "role": role, "views": views, "committed_at": committed_at}
    if witness is not None:
        entry["witness"] = witness
    return _json(entry)


def entry_digest(gxid: str, origin: str, role: str, views: dict[str, Any], witness: dict[str, Any] | None) -> str:
    """The digest of an entry as it is staged (what sealing adds, seq, commit time and prev_hash, left out): what a
    participant tells its origin with its vote, and what `dejima check` recomputes from the participant's chain."""
    content = {"gxid": gxid, "origin": origin, "role": role, "views": views, "witness": witness}
    return hashlib.sha256(_json(content).encode()).hexdigest()


def chain_hash(prev_hash: str, entry: str) -> str:
    return hashlib.sha256((prev_hash + entry).encode()).hexdigest()


def stage(
    conn: psycopg.Connection[Any],
    gxid: str,
    origin: str,
    role: str,
    views: dict[str, Any],
    witness: dict[str, Any] | None = None,
) -> None:
    """Stage this gxid's entry in the caller's transaction (it is chained by `seal` once committed)."""
    conn.execute(STAGE_SQL, (gxid, origin, role, Jsonb(views), Jsonb(witness) if witness is not None else None))


def head(conn: psycopg.Connection[Any]) -> Head:
    """The chain's newest entry (EMPTY for an empty chain)."""
    row = conn.execute(HEAD_SQL).fetchone()
    return Head(int(row[0]), str(row[1])) if row else EMPTY


def seal(
    conn: psycopg.Connection[Any], limit: int = SEAL_BATCH, lock_timeout_ms: int | None = None
) -> tuple[int, Head]:
    """Link up to `limit` committed staged entries into the chain, in staging order, in one transaction of its own
    (the caller's connection must be idle). A staged entry whose gxid the chain holds already (or that came twice)
    is dropped, and logged: a gxid is chained once. `lock_timeout_ms`: wait at most this long for another sealer.
    Returns how many staged entries it took (sealed or dropped) and the chain's head after."""
    dropped: list[str] = []
    with conn.transaction():
        if lock_timeout_ms is not None:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        staged = conn.execute(STAGED_SQL, (limit,)).fetchall()
        last = head(conn)  # a statement after the lock: sees the previous sealer's commit
        if not staged:
            return 0, last
        seq, prev = last.seq, last.hash
        rows = []
        chained: set[str] = set()
        for _, gxid, origin, role, views, at, witness, in_chain in staged:
            if in_chain or gxid in chained:
                dropped.append(gxid)
                continue
            chained.add(gxid)
            seq += 1
            entry_hash = chain_hash(prev, canonical(seq, gxid, origin, role, views, timestamp(at), witness))
            rows.append(
                (seq, gxid, origin, role, Jsonb(views), at, prev, entry_hash, Jsonb(witness) if witness else None)
            )
            prev = entry_hash
        if rows:
            with conn.cursor() as cur:
                cur.executemany(INSERT_SQL, rows)
        conn.execute("DELETE FROM dejima.txlog_pending WHERE id = ANY(%s)", ([row[0] for row in staged],))
    for gxid in dropped:
        log.error("txlog: dropped a staged entry for %s, which the chain holds already (a gxid is chained once)", gxid)
    return len(staged), Head(seq, prev)


def seal_all(conn: psycopg.Connection[Any], lock_timeout_ms: int | None = None) -> tuple[int, Head]:
    """Seal every committed staged entry. Returns how many staged entries it took, and the chain's head after."""
    total = 0
    while True:
        n, last = seal(conn, lock_timeout_ms=lock_timeout_ms)
        total += n
        if n < SEAL_BATCH:  # the last batch was not full: nothing was left (no empty transaction to tell so)
            return total, last


@dataclass
class Verdict:
    ok: bool
    length: int
    broken_at: int | None = None
    reason: str = ""
    head: str = GENESIS

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "length": self.length,
            "broken_at": self.broken_at,
            "reason": self.reason,
            "head_hash": self.head,
        }


def verify(conn: psycopg.Connection[Any], account: Accounting | None = None) -> Verdict:
    """Recompute every hash of the chain in the database; the first seq where it breaks, and why. `account`, when
    given, is told every entry that verified (in seq order)."""
    expected_seq, prev, last = 1, GENESIS, 0
    while True:
        rows = conn.execute(ENTRIES_SQL, (expected_seq, VERIFY_BATCH)).fetchall()
        for seq, gxid, origin, role, views, committed_at, prev_hash, stored, witness in rows:
            if seq != expected_seq:
                return Verdict(False, last, expected_seq, f"entry {expected_seq} is missing", prev)
            if prev_hash != prev:
                return Verdict(False, last, seq, "prev_hash does not match the hash of the entry before", prev)
            recomputed = chain_hash(prev, canonical(seq, gxid, origin, role, views, timestamp(committed_at), witness))
            if recomputed != stored:
                return Verdict(False, last, seq, "hash does not match the entry", prev)
            if account is not None:
                account.add(seq, gxid, origin, role, views, witness)
            expected_seq, prev, last = seq + 1, stored, seq
        if len(rows) < VERIFY_BATCH:
            break
    below = conn.execute("SELECT min(seq) FROM dejima.txlog WHERE seq < 1").fetchone()
    if below is not None and below[0] is not None:
        return Verdict(False, last, int(below[0]), "entry numbered below 1", prev)
    return Verdict(True, last, None, "", prev)


def recent(conn: psycopg.Connection[Any], limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT seq, gxid, origin, role, views, committed_at, prev_hash, hash, witness FROM dejima.txlog"
        " ORDER BY seq DESC LIMIT %s",
        (limit,),
    ).fetchall()
    names = ("seq", "gxid", "origin", "role", "views", "committed_at", "prev_hash", "hash", "witness")
    return [{**dict(zip(names, row, strict=True)), "committed_at": timestamp(row[5])} for row in rows]


def hashes_at(conn: psycopg.Connection[Any], seqs: Iterable[int]) -> dict[int, str | None]:
    """The hash of the entry at each of `seqs` (None where there is none)."""
    wanted = sorted(set(seqs))
    rows = conn.execute("SELECT seq, hash FROM dejima.txlog WHERE seq = ANY(%s)", (wanted,)).fetchall()
    found = {int(seq): str(h) for seq, h in rows}
    return {seq: found.get(seq) for seq in wanted}


# ---- truncation evidence: what each chain recorded of its partners' logs -----------------------------------------
def witness_of(seq: int, hash_: str, logged: bool | None = None, entry: str = "") -> dict[str, Any]:
    """A partner's log head as an entry's `witness` records it: with `logged` (and the digest of the entry it
    staged, `entry`) for a participant, without for the origin."""
    out: dict[str, Any] = {"seq": seq, "hash": hash_}
    if logged is not None:
        out["logged"] = logged
        out["entry"] = entry
    return out


def head_of(seen: object) -> Head | None:
    """The head a witness record holds, when it holds a well-formed one."""
    if not isinstance(seen, dict):
        return None
    seq, hash_ = seen.get("seq"), seen.get("hash")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(hash_, str):
        return Head(seq, hash_)
    return None


@dataclass
class EntrySet:
    """A set of (gxid, entry digest) pairs kept as its size and the XOR of their sha256 (order-independent), and,
    when asked for (`items`), the pairs themselves with the seq of the entry that holds each here."""

    count: int = 0
    xor: int = 0
    items: list[tuple[str, str, int]] | None = None

    def add(self, gxid: str, digest: str, seq: int) -> None:
        self.count += 1
        self.xor ^= int.from_bytes(hashlib.sha256(f"{gxid}\n{digest}".encode()).digest(), "big")
        if self.items is not None:
            self.items.append((gxid, digest, seq))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "digest": f"{self.xor:064x}"}


@dataclass
class Recorded:
    """What one chain recorded of a partner's log: the highest head, and the partner's entries it knows of."""

    head: Head | None = None
    at: int = 0  # the seq of the entry here that recorded `head`
    entries: EntrySet = field(default_factory=EntrySet)

    def to_json(self) -> dict[str, Any]:
        head = None if self.head is None else {**self.head.to_json(), "recorded_at": self.at}
        return {"head": head, **self.entries.to_json()}


class Accounting:
    """Fed every verified entry of a chain (`verify`): per partner, what this chain recorded of the partner's log
    (`recorded`: the highest head, and the partner's entries it knows of) and which of this peer's own entries the
    partner's chain must know of (`owed`). Between two peers X and Y, the entries X's chain knows of Y's and those
    Y's chain says X must know of are the same set: the global transactions where one was the origin, the other a
    participant, and both staged an entry (the origin's entry says the participant `logged`, with its entry's digest;
    the participant's entry names the origin, recorded by its witness). `pair`: keep the items for that partner."""

    def __init__(self, me: str, pair: str | None = None) -> None:
        self.me = me
        self.pair = pair
        self.recorded: dict[str, Recorded] = {}
        self.owed: dict[str, EntrySet] = {}

    def _set(self, peer: str) -> EntrySet:
        return EntrySet(items=[] if peer == self.pair else None)

    def add(self, seq: int, gxid: str, origin: str, role: str, views: Any, witness: Any) -> None:
        if not isinstance(witness, dict):
            return  # an entry from before witnesses, or one whose global transaction had no partner to tell
        for peer, seen in witness.items():
            if not isinstance(peer, str) or peer == self.me or not isinstance(seen, dict):
                continue
            if role == "participant" and peer != origin:
                continue  # a participant records its origin only
            recorded = self.recorded.get(peer)
            if recorded is None:
                recorded = self.recorded[peer] = Recorded(entries=self._set(peer))
            mark = head_of(seen)
            if mark is not None and (recorded.head is None or mark.seq > recorded.head.seq):
                recorded.head, recorded.at = mark, seq
            owed = self.owed.get(peer)
            if owed is None:
                owed = self.owed[peer] = self._set(peer)
            if role == "origin":
                if seen.get("logged") is True:  # the participant staged an entry: its chain owes it, ours knows it
                    recorded.entries.add(gxid, str(seen.get("entry") or ""), seq)
                    owed.add(gxid, "", seq)
            else:  # our entry as a participant, which the origin recorded with its digest; we know the origin's
                owed.add(gxid, entry_digest(gxid, origin, role, views, witness), seq)
                recorded.entries.add(gxid, "", seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "witnessed": {peer: r.to_json() for peer, r in sorted(self.recorded.items())},
            "witnessed_by": {peer: e.to_json() for peer, e in sorted(self.owed.items()) if e.count},
        }

    def pair_json(self) -> dict[str, Any]:
        """The items kept for partner `pair`: [gxid, digest, seq here] of what this chain knows of its entries
        (`recorded`) and of this peer's entries it must know of (`owed`)."""
        assert self.pair is not None
        recorded = self.recorded.get(self.pair)
        owed = self.owed.get(self.pair)
        return {
            "peer": self.pair,
            "recorded": sorted(recorded.entries.items or []) if recorded else [],
            "owed": sorted(owed.items or []) if owed else [],
        }


@dataclass
class ChainReport:
    """What one peer's `GET /api/v1/txlog?verify=1` said, as `cross_check` reads it."""

    ok: bool
    length: int
    witnessed: dict[str, Any]
    witnessed_by: dict[str, Any]


Damage = dict[str, tuple[int, str]]  # peer -> (the first seq found damaged, why)


def _note(found: Damage, peer: str, seq: int, why: str) -> None:
    if peer not in found or seq < found[peer][0]:
        found[peer] = (seq, why)


def cross_check(
    reports: Mapping[str, ChainReport],
    hashes: Callable[[str, list[int]], Mapping[int, str | None]],
    pair: Callable[[str, str], Mapping[str, Any]],
) -> Damage:
    """Compare every peer's chain with what its partners' chains recorded of it. Only chains that verified by
    themselves take part (a broken one is reported by its own verdict). `hashes(peer, seqs)`: the hash of `peer`'s
    entry at each seq; `pair(peer, partner)`: `peer`'s items for `partner` (`Accounting.pair_json`), asked only when
    the two disagree. Returns each peer found damaged with the first seq found and why:

    - a partner recorded a head beyond the peer's length: the entries from length + 1 on are gone;
    - a partner recorded a head whose hash differs from the peer's entry at that seq: rewritten at or before it;
    - a partner recorded an entry of the peer that its chain no longer has: gone (from length + 1 on, the entries
      after the last one left being the ones a deletion that keeps the chain valid can remove);
    - the peer's entry for a gxid is not the one its origin recorded (its digest): that entry was rewritten."""
    found: Damage = {}
    sound = {name: r for name, r in reports.items() if r.ok}
    for subject, report in sound.items():
        marks: list[tuple[str, Head]] = []
        for witness, other in sound.items():
            recorded = other.witnessed.get(subject) if witness != subject else None
            mark = head_of((recorded or {}).get("head"))
            if mark is None or mark.seq == 0:
                continue
            if mark.seq > report.length:
                _note(
                    found,
                    subject,
                    report.length + 1,
                    f"{witness} recorded its log at seq {mark.seq}; it holds {report.length} entries",
                )
            else:
                marks.append((witness, mark))
        if marks:
            stored = hashes(subject, [m.seq for _, m in marks])
            for witness, mark in marks:
                if stored.get(mark.seq) != mark.hash:
                    _note(
                        found,
                        subject,
                        mark.seq,
                        f"entry {mark.seq} is not the one {witness} recorded (rewritten at or before it)",
                    )
    for witness, other in sound.items():
        for subject, report in sound.items():
            if witness == subject:
                continue
            knows = other.witnessed.get(subject) or {}
            owes = report.witnessed_by.get(witness) or {}
            if (knows.get("count", 0), knows.get("digest")) == (owes.get("count", 0), owes.get("digest")) or (
                not knows.get("count") and not owes.get("count")
            ):
                continue
            known = {g: (d, s) for g, d, s in pair(witness, subject).get("recorded", [])}
            owed = {g: (d, s) for g, d, s in pair(subject, witness).get("owed", [])}
            for gxid, (digest, _) in sorted(known.items()):
                if gxid not in owed:
                    _note(
                        found,
                        subject,
                        report.length + 1,
                        f"{witness} recorded its entry for {gxid}, which its log no longer holds",
                    )
                elif owed[gxid][0] != digest:
                    _note(
                        found,
                        subject,
                        owed[gxid][1],
                        f"its entry {owed[gxid][1]} for {gxid} is not the one {witness} recorded",
                    )
            for gxid in sorted(owed.keys() - known.keys()):
                _note(
                    found,
                    witness,
                    other.length + 1,
                    f"its entry for {gxid}, which {subject}'s log records, is no longer in its log",
                )
    return found
