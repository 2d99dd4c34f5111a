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
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
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
STAGE_SQL = "INSERT INTO dejima.txlog_pending (gxid, origin, role, views) VALUES (%s, %s, %s, %s)"
INSERT_SQL = (
    "INSERT INTO dejima.txlog (seq, gxid, origin, role, views, committed_at, prev_hash, hash)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
# the committed staged entries, oldest first, each with whether its gxid is in the chain already (never twice)
STAGED_SQL = (
    "SELECT p.id, p.gxid, p.origin, p.role, p.views, p.committed_at, t.seq IS NOT NULL"
    " FROM dejima.txlog_pending AS p LEFT JOIN dejima.txlog AS t ON t.gxid = p.gxid ORDER BY p.id LIMIT %s"
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


def canonical(seq: int, gxid: str, origin: str, role: str, views: dict[str, Any], committed_at: str) -> str:
    entry = {"seq": seq, "gxid": gxid, "origin": origin, "role": role, "views": views, "committed_at": committed_at}
    return _json(entry)


def chain_hash(prev_hash: str, entry: str) -> str:
    return hashlib.sha256((prev_hash + entry).encode()).hexdigest()


def stage(conn: psycopg.Connection[Any], gxid: str, origin: str, role: str, views: dict[str, Any]) -> None:
    """Stage this gxid's entry in the caller's transaction (it is chained by `seal` once committed)."""
    conn.execute(STAGE_SQL, (gxid, origin, role, Jsonb(views)))


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
        for _, gxid, origin, role, views, at, in_chain in staged:
            if in_chain or gxid in chained:
                dropped.append(gxid)
                continue
            chained.add(gxid)
            seq += 1
            entry_hash = chain_hash(prev, canonical(seq, gxid, origin, role, views, timestamp(at)))
            rows.append((seq, gxid, origin, role, Jsonb(views), at, prev, entry_hash))
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


def verify(conn: psycopg.Connection[Any]) -> Verdict:
    """Recompute every hash of the chain in the database; the first seq where it breaks, and why."""
    expected_seq, prev, last = 1, GENESIS, 0
    while True:
        rows = conn.execute(
            "SELECT seq, gxid, origin, role, views, committed_at, prev_hash, hash FROM dejima.txlog"
            " WHERE seq >= %s ORDER BY seq LIMIT %s",
            (expected_seq, VERIFY_BATCH),
        ).fetchall()
        for seq, gxid, origin, role, views, committed_at, prev_hash, stored in rows:
            if seq != expected_seq:
                return Verdict(False, last, expected_seq, f"entry {expected_seq} is missing", prev)
            if prev_hash != prev:
                return Verdict(False, last, seq, "prev_hash does not match the hash of the entry before", prev)
            recomputed = chain_hash(prev, canonical(seq, gxid, origin, role, views, timestamp(committed_at)))
            if recomputed != stored:
                return Verdict(False, last, seq, "hash does not match the entry", prev)
            expected_seq, prev, last = seq + 1, stored, seq
        if len(rows) < VERIFY_BATCH:
            break
    below = conn.execute("SELECT min(seq) FROM dejima.txlog WHERE seq < 1").fetchone()
    if below is not None and below[0] is not None:
        return Verdict(False, last, int(below[0]), "entry numbered below 1", prev)
    return Verdict(True, last, None, "", prev)


def recent(conn: psycopg.Connection[Any], limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT seq, gxid, origin, role, views, committed_at, prev_hash, hash FROM dejima.txlog"
        " ORDER BY seq DESC LIMIT %s",
        (limit,),
    ).fetchall()
    names = ("seq", "gxid", "origin", "role", "views", "committed_at", "prev_hash", "hash")
    return [{**dict(zip(names, row, strict=True)), "committed_at": timestamp(row[5])} for row in rows]
