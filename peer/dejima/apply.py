"""A participant's putback of an incoming delta, with the order-independent merge (ARCHITECTURE.md, "Cycles, diamonds
and partial rows").

Public API
----------
- `GxState` — what a peer remembers about one open global transaction (one per gxid, until prepare): its
  database transaction, which base columns putback invented (`unknown`), which base rows the gxid wrote
  (`touched`) and which (view, key) it deleted (`deleted`). `GxState(gxid=…, ptype=…, conn=…, token=…)` is
  enough; the connection must be inside the gxid's open transaction, registered with `token`
  (`peer.dejima.delta.begin_global`).
- `apply_delta(state, view, insertions, deletions)` — applies wire rows (with the `$unknown`/`$was` markers of
  `peer.dejima.messages`) through the dejima view: INSERT/UPDATE/DELETE on the view, so the INSTEAD OF putback
  triggers do the base-table work and the capture triggers see every write. All or nothing: a failure leaves the
  database and `state` as they were (own savepoint).
- `outgoing(state, changes)` — turns captured changes (`take_changes`) into wire deltas (`ViewDelta`, a `Delta`
  that also knows the view's identity key): insertions carry `$unknown` (the row's invented columns the view
  carries) and, for a key change, `$was` (the old key); records touched rows and deleted keys. Called by the
  origin after the client's statements and by a participant after `apply_delta`.
- `without_echo(delta, received)` — the part of `delta` the sender of `received` (same view) does not already
  have.
- `ApplyConflict` (a real conflict inside one gxid; retryable) and `ApplyBadRequest` (a malformed delta; nothing
  was changed), both `ApplyError`.

The merge rule (commutative, associative, idempotent: every arrival order reaches the same state)
---------------------------------------------------------------------------------------------------
Rows are compared in their JSON form (the current row is read as `jsonb_build_object` of the view columns, like
the capture triggers; incoming dates are normalised to ISO form).

Pairing inside one delta: an insertion with `$was` = K0 and the deletion of K0 are a RENAME (an insertion with
`$was` and no such deletion is a rename too); otherwise an insertion and a deletion with the same key are an
UPDATE; other deletions are deletes, other insertions inserts. Order of work: deletes, then renames (a rename onto
a key another rename frees goes after it; a cycle, two rows swapping keys, parks one row at a temporary key first),
then updates and inserts. A delta of several rows without renames reads all its rows first (one statement for
all), then writes them (one statement for the deletes, one for the updates, two per insert, in one round trip;
`_apply_rows`); otherwise each row is read and written in turn.

- DELETE of K: no row at K → nothing (idempotent), except while transactions prepared here may hold a row no
  read sees yet (`GxState.unseen_possible`, set by the coordinator): then `ApplyUnseen`, and the coordinator
  applies again once they finished (a rename that finds neither its new nor its old key likewise). A row at K
  that this gxid already wrote (touched) → `ApplyConflict` (delete vs update from two branches), whatever its
  values in this view: an update that changed only columns of another view must conflict too, as it does in the
  other arrival order (the update finds the key deleted). Else the row is deleted. (view, K) is remembered as
  deleted; `outgoing` adds the keys the deleted base row had in the peer's other views, so call it after every
  `apply_delta`. One exception: when the same delta renames another row onto K ("delete Jane, rename John to
  Jane") and the row at K was written in this gxid, it is that renamed row (an earlier arrival applied the
  delta): the deletion is done already.
- INSERT/UPDATE/RENAME of row I (key K, unknown columns U): the current row R is the row at K; for a rename
  with no row at K, the row at `$was` = K0 (renamed in place: id and private columns kept). A rename that finds
  K already here (renamed by an earlier arrival) merges into it, and deletes a row still at K0 only when this
  gxid has not written it (a row this gxid wrote there took the freed key: "rename Jane to Ann, insert a new
  Jane" must not lose the new Jane, whichever arrives first).
  - R absent: an update or rename of a key this gxid deleted → `ApplyConflict`. Else INSERT with I's values; the
    new base row is touched, the columns I asserts (below) are written, and its unknown columns are U plus the
    base columns the view does not carry (they got the manifest defaults).
  - R present: column by column, c in U → R[c] (an unknown never replaces anything); c *carried* by I → I[c]
    only if c is unknown in R (it fills the gap), else R[c]; c *asserted* by I → I[c] if c is unknown in R or
    not yet written in this gxid (its value is from before the gxid), the same value if both are written and
    equal, and two different written values are a real conflict → `ApplyConflict`. I[c] is asserted when it is
    known and, for an update or rename, changed (differs from the paired deletion's value); it is carried when
    the sender's change left it as it was. Columns taken from I (and the key) count as written. A row not
    touched before thus takes every column I changes (divergence in those columns is repaired, not an abort).
  The view row is updated only when the merged row differs from R; either way R counts as touched.

Why per column, and why carried values never override (both found by the delivery-order simulation in
tests/test_apply.py, which explores every order): a row touched through one column (risk_factor, from bank) must
still take a new address from another branch (government) — a per-row "touched = known" rule conflicts in that
order only; and a peer that renamed a row before hearing of its new phone forwards the rename with the *old* phone
— carried, not asserted — which must not conflict with the new phone at a peer that already has it. `outgoing`
marks the columns the origin's statements changed as written; `without_echo` never splits an update or rename
pair, so a receiver always sees what a change left alone.

Unknown values are the sender's defaults: members of a view declare the same defaults for its columns, so an
unknown still open when propagation is quiet holds the same value at every member.

A rename cycle is applied by parking one row at a temporary key first (a text key column gets a unique marker
string, a number column max + 1); the capture folds the detour away.

Limits: a view must be the generated projection + selection of one base table (`View.table`).
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from peer.dejima.delta import TAKE_SQL, Delta, Row, RowChange, fold
from peer.dejima.manifest import ID_COLUMN, PeerType, View
from peer.dejima.messages import UNKNOWN, WAS
from peer.dejima.sqlgen import filter_sql

Key = tuple[Any, ...]
SCHEMA = "public"
SAVEPOINT = sql.Identifier("dejima_apply_delta")
SAVEPOINT_SQL = sql.SQL("SAVEPOINT {}").format(SAVEPOINT).as_bytes(None)
CHECK_AND_SAVEPOINT_SQL = sql.SQL("SELECT dejima.current_gxid(); SAVEPOINT {}").format(SAVEPOINT).as_bytes(None)
RELEASE_SQL = sql.SQL("RELEASE SAVEPOINT {}").format(SAVEPOINT).as_bytes(None)
ROLLBACK_TO_SQL = sql.SQL("ROLLBACK TO SAVEPOINT {}").format(SAVEPOINT).as_bytes(None)
PROBE = sql.Identifier("dejima_lock_probe")  # `locked_elsewhere` takes its row locks inside it, then undoes them
PROBE_SAVEPOINT_SQL = sql.SQL("SAVEPOINT {}").format(PROBE).as_bytes(None)
PROBE_UNDO = (
    sql.SQL("ROLLBACK TO SAVEPOINT {}").format(PROBE).as_bytes(None),
    sql.SQL("RELEASE SAVEPOINT {}").format(PROBE).as_bytes(None),
)
INT_RANGES = {"integer": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}


class ApplyError(Exception):
    """Base of the errors `apply_delta` raises on purpose."""


class ApplyConflict(ApplyError):
    """A real conflict inside one global transaction: two different known values, or delete vs update."""

    def __init__(
        self,
        peer: str,
        view: str,
        key: Key,
        column: str | None,
        ours: Any,
        theirs: Any,
        reason: str = "",
    ) -> None:
        self.peer = peer
        self.view = view
        self.key = key
        self.column = column
        self.ours = ours
        self.theirs = theirs
        where = f"{peer}: " if peer else ""
        what = reason or (
            f"column {column!r} has two different known values in one global transaction: "
            f"{ours!r} here, {theirs!r} incoming"
        )
        super().__init__(f"{where}conflict on {view} key {list(key)!r}: {what}")


class ApplyBadRequest(ApplyError):
    """The delta is malformed (unknown view, wrong columns, missing key, wrong type); nothing was changed."""


class ApplyUnseen(ApplyError):
    """A deletion (a delete, or a rename's old key) found no row at its key while `GxState.unseen_possible`: the row
    may be one that a transaction prepared here inserted and whose COMMIT PREPARED is still on its way, which no read
    sees and none waits for (an uncommitted insert locks no row a read could wait on). Nothing was changed: the
    caller lets those transactions finish and applies again with `unseen_possible` off."""

    def __init__(self, view: str, key: Key) -> None:
        self.view = view
        self.key = key
        super().__init__(f"{view}: no row at key {list(key)!r} yet")


@dataclass
class GxState:
    """Everything a peer remembers about one open global transaction (one per gxid, lives until prepare)."""

    gxid: str
    ptype: PeerType  # this peer's type (manifest)
    conn: psycopg.Connection[Any]  # the gxid's own database transaction (registered: delta.begin_global)
    token: bytes  # the transaction's token (delta.begin_global): what it captured is taken with it
    # (base table, row id) -> base columns whose value putback invented in this gxid
    unknown: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    touched: set[tuple[str, int]] = field(default_factory=set)  # base rows written in this gxid
    deleted: set[tuple[str, Key]] = field(default_factory=set)  # (view, key values) deleted in this gxid
    # (base table, row id) -> base columns given a known value in this gxid (the others hold their value from before
    # the gxid, or an invented one): the column-level refinement of `touched` that the merge uses
    written: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    peer: str = ""  # this peer's name, for messages
    # transactions prepared here may hold rows no read sees yet: a deletion that finds no row raises ApplyUnseen
    unseen_possible: bool = False

    def snapshot(self) -> Snapshot:
        """A copy of the bookkeeping, for `restore` (apply_delta restores it itself when it fails)."""
        return Snapshot(
            {k: set(v) for k, v in self.unknown.items()},
            set(self.touched),
            set(self.deleted),
            {k: set(v) for k, v in self.written.items()},
        )

    def restore(self, saved: Snapshot) -> None:
        self.unknown = {k: set(v) for k, v in saved.unknown.items()}
        self.touched = set(saved.touched)
        self.deleted = set(saved.deleted)
        self.written = {k: set(v) for k, v in saved.written.items()}


@dataclass(frozen=True)
class Snapshot:
    unknown: dict[tuple[str, int], set[str]]
    touched: set[tuple[str, int]]
    deleted: set[tuple[str, Key]]
    written: dict[tuple[str, int], set[str]]


@dataclass
class ViewDelta(Delta):
    """A `Delta` produced by `outgoing`: it also knows the view's identity key (used by `without_echo`)."""

    key: tuple[str, ...] = field(default=(), compare=False)


# ---------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _Incoming:
    values: Row  # view column -> value (normalised)
    unknown: frozenset[str]
    was: Key | None  # old key of a rename
    key: Key
    base: Row | None = None  # an update's or rename's paired deletion: the sender's row before this change
    parked: bool = False  # a rename of a cycle: its old key's row was moved to a temporary key first

    def carried(self, column: str) -> bool:
        """The sender's change left this column as it was: its value is no news (it may be stale)."""
        return self.base is not None and self.base[column] == self.values[column]

    def strong(self) -> set[str]:
        """The columns whose value this row asserts: known, and (for an update or rename) changed."""
        return {c for c in self.values if c not in self.unknown and not self.carried(c)}


def key_of(row: Row, key: Sequence[str]) -> Key:
    return tuple(row[k] for k in key)


class _ViewIO:
    """The SQL of one view (identifiers quoted, values always placeholders), composed once per peer type and view
    (`_view_io` keeps them) and rendered to bytes: composing took ≈ 0.2 ms, more than the apply's own SQL."""

    def __init__(self, ptype: PeerType, view: View) -> None:
        self.view = view
        self.table = ptype.table(view.table)
        self.types = {c.name: c.type for c in self.table.columns}
        self.not_null = {c.name for c in self.table.columns if c.not_null}
        self.private = frozenset(c.name for c in self.table.columns if c.name not in view.columns)
        rel = sql.Identifier(SCHEMA, view.name)
        base = sql.Identifier(SCHEMA, self.table.name)

        def cast(col: str) -> sql.Composable:
            return sql.SQL("CAST({} AS {})").format(sql.Placeholder(), sql.SQL(self.types[col]))

        def match(alias: str | None) -> sql.Composable:
            return sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(alias, k) if alias else sql.Identifier(k), cast(k))
                for k in view.key
            )

        json_row = sql.SQL("jsonb_build_object({})").format(
            sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier("t", c)) for c in view.columns)
        )
        in_filter = sql.SQL(" AND {}").format(filter_sql(view, self.table, "t")) if view.filter else sql.SQL("")
        self.select = (
            sql.SQL("SELECT {}, {} FROM {} AS t WHERE {}{} FOR UPDATE OF t")
            .format(sql.Identifier("t", ID_COLUMN), json_row, base, match("t"), in_filter)
            .as_bytes(None)
        )
        cols = sql.SQL(", ").join(map(sql.Identifier, view.columns))
        self.insert = (
            sql.SQL("INSERT INTO {} ({}) VALUES ({})")
            .format(rel, cols, sql.SQL(", ").join(cast(c) for c in view.columns))
            .as_bytes(None)
        )
        self.update = (
            sql.SQL("UPDATE {} SET {} WHERE {}")
            .format(
                rel,
                sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), cast(c)) for c in view.columns),
                match(None),
            )
            .as_bytes(None)
        )
        self.delete = sql.SQL("DELETE FROM {} WHERE {}").format(rel, match(None)).as_bytes(None)
        # the same for many rows in one statement: each column's values come as one text array (`texts`), cast
        # back to the column's type by its input function, row by row in the arrays' order
        key_names = [f"k{i}" for i in range(len(view.key))]
        col_names = [f"c{i}" for i in range(len(view.columns))]

        def unnest(names: list[str], ordinality: bool = False) -> sql.Composable:
            arrays = sql.SQL(", ").join(sql.SQL("CAST({} AS text[])").format(sql.Placeholder()) for _ in names)
            aliases = sql.SQL(", ").join(map(sql.Identifier, [*names, *(["ord"] if ordinality else [])]))
            with_ordinality = sql.SQL(" WITH ORDINALITY") if ordinality else sql.SQL("")
            return sql.SQL("unnest({}){} AS x({})").format(arrays, with_ordinality, aliases)

        def match_x(target: str) -> sql.Composable:
            return sql.SQL(" AND ").join(
                sql.SQL("{} = CAST({} AS {})").format(
                    sql.Identifier(target, k), sql.Identifier("x", name), sql.SQL(self.types[k])
                )
                for k, name in zip(view.key, key_names, strict=True)
            )

        # the lateral subquery locks the rows one by one in the order of the keys (a nested loop, whatever the
        # table's size), as the reads one statement each did: every batch takes its locks in the same order
        self.select_many = (
            sql.SQL(
                "SELECT x.ord, r.{id}, r.dejima_row FROM {keys} CROSS JOIN LATERAL (SELECT {tid}, {json_row} AS"
                " dejima_row FROM {base} AS t WHERE {match}{in_filter} FOR UPDATE OF t) AS r"
            )
            .format(
                id=sql.Identifier(ID_COLUMN),
                keys=unnest(key_names, ordinality=True),
                tid=sql.Identifier("t", ID_COLUMN),
                json_row=json_row,
                base=base,
                match=match_x("t"),
                in_filter=in_filter,
            )
            .as_bytes(None)
        )
        self.update_many = (
            sql.SQL("UPDATE {} AS v SET {} FROM {} WHERE {}")
            .format(
                rel,
                sql.SQL(", ").join(
                    sql.SQL("{} = CAST({} AS {})").format(
                        sql.Identifier(c), sql.Identifier("x", name), sql.SQL(self.types[c])
                    )
                    for c, name in zip(view.columns, col_names, strict=True)
                ),
                unnest(col_names + key_names),
                match_x("v"),
            )
            .as_bytes(None)
        )
        self.delete_many = (
            sql.SQL("DELETE FROM {} AS v USING {} WHERE {}").format(rel, unnest(key_names), match_x("v")).as_bytes(None)
        )
        # each base row at the keys, and whether another transaction holds it locked: a lock that `SKIP LOCKED`
        # cannot take at once (`locked_elsewhere`); the read of the rows itself waits for nothing
        self.select_locked = (
            sql.SQL(
                "SELECT r.{id}, l.{id} IS NULL FROM {keys} CROSS JOIN LATERAL (SELECT {tid} FROM {base} AS t WHERE"
                " {match}{in_filter}) AS r LEFT JOIN LATERAL (SELECT u.{id} FROM {base} AS u WHERE u.{id} = r.{id}"
                " FOR UPDATE SKIP LOCKED) AS l ON true"
            )
            .format(
                id=sql.Identifier(ID_COLUMN),
                keys=unnest(key_names),
                tid=sql.Identifier("t", ID_COLUMN),
                base=base,
                match=match_x("t"),
                in_filter=in_filter,
            )
            .as_bytes(None)
        )

    def key_texts(self, keys: Sequence[Key]) -> list[list[str | None]]:
        """The parameters of `select_many` and `delete_many` (and the end of `update_many`'s): one text array
        per key column."""
        return [[_text(key[i]) for key in keys] for i in range(len(self.view.key))]

    def row_texts(self, rows: Sequence[Row]) -> list[list[str | None]]:
        """The first parameters of `update_many`: one text array per view column."""
        return [[_text(row[c]) for row in rows] for c in self.view.columns]

    def read(self, conn: psycopg.Connection[Any], key: Key) -> tuple[int, Row] | None:
        return self.found(conn.execute(self.select, list(key)).fetchone())

    @staticmethod
    def found(selected: tuple[Any, ...] | None) -> tuple[int, Row] | None:
        """(base row id, view row) of a `select` result."""
        if selected is None:
            return None
        row_id, row = selected
        return int(row_id), dict(row)

    def write_insert(self, conn: psycopg.Connection[Any], values: Row) -> int:
        conn.execute(self.insert, [values[c] for c in self.view.columns])
        found = self.read(conn, key_of(values, self.view.key))
        if found is None:  # the putback trigger always creates the row inside the view (or raises)
            raise ApplyError(f"{self.view.name}: the inserted row {list(key_of(values, self.view.key))!r} is missing")
        return found[0]

    def write_update(self, conn: psycopg.Connection[Any], at: Key, values: Row) -> None:
        cur = conn.execute(self.update, [values[c] for c in self.view.columns] + list(at))
        if cur.rowcount != 1:
            raise ApplyError(f"{self.view.name}: UPDATE of key {list(at)!r} changed {cur.rowcount} rows, expected 1")

    def write_delete(self, conn: psycopg.Connection[Any], at: Key) -> None:
        cur = conn.execute(self.delete, list(at))
        if cur.rowcount != 1:
            raise ApplyError(f"{self.view.name}: DELETE of key {list(at)!r} changed {cur.rowcount} rows, expected 1")


def _text(value: Any) -> str | None:
    """A checked value (`_check_value`) in the text form its column's input function reads: what a set-based
    statement casts back, the same value the one-row statements get from the driver."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)  # int, Decimal


def _bad(view: str, where: str, message: str) -> ApplyBadRequest:
    return ApplyBadRequest(f"{view}: {where}: {message}")


def _check_value(io: _ViewIO, where: str, column: str, value: Any) -> Any:
    """The value, validated against the column's type and normalised to its JSON form (dates as ISO)."""
    name = io.view.name
    if value is None:
        if column in io.not_null or column in io.view.key:
            raise _bad(name, where, f"column {column!r} may not be null")
        return None
    pg_type = io.types[column]
    wrong = _bad(name, where, f"column {column!r} must be {pg_type}, got {type(value).__name__} {value!r}")
    if pg_type == "text":
        if not isinstance(value, str):
            raise wrong
        if "\x00" in value:
            raise _bad(name, where, f"column {column!r} may not contain NUL characters")
        return value
    if pg_type in INT_RANGES:
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong
        low, high = INT_RANGES[pg_type]
        if not low <= value <= high:
            raise _bad(name, where, f"column {column!r}: {value} is out of range for {pg_type}")
        return value
    if pg_type in ("numeric", "double precision"):
        if not isinstance(value, int | float | decimal.Decimal) or isinstance(value, bool):
            raise wrong
        if not (value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)):
            raise _bad(name, where, f"column {column!r}: {value!r} is not a finite number")
        return value
    if pg_type == "boolean":
        if not isinstance(value, bool):
            raise wrong
        return value
    if pg_type == "date":
        if not isinstance(value, str):
            raise wrong
        try:
            return datetime.date.fromisoformat(value).isoformat()
        except ValueError:
            raise _bad(name, where, f"column {column!r}: {value!r} is not an ISO date (YYYY-MM-DD)") from None
    if pg_type == "timestamptz":
        if not isinstance(value, str):
            raise wrong
        try:
            datetime.datetime.fromisoformat(value)
        except ValueError:
            raise _bad(name, where, f"column {column!r}: {value!r} is not an ISO timestamp") from None
        return value
    raise _bad(name, where, f"column {column!r} has type {pg_type}, which apply does not support")


def _parse_key(io: _ViewIO, where: str, raw: object) -> Key:
    name, key = io.view.name, io.view.key
    if not isinstance(raw, dict) or set(raw) != set(key):
        raise _bad(name, where, f"must be an object of exactly the key columns {list(key)}")
    return tuple(_check_value(io, where, k, raw[k]) for k in key)


def _parse_row(io: _ViewIO, where: str, raw: object, insertion: bool) -> _Incoming:
    view = io.view
    if not isinstance(raw, dict):
        raise _bad(view.name, where, "a row must be an object")
    markers = {k for k in raw if isinstance(k, str) and k.startswith("$")}
    allowed = {UNKNOWN, WAS} if insertion else {UNKNOWN}
    if markers - allowed:
        raise _bad(view.name, where, f"unknown marker {sorted(markers - allowed)[0]!r}")
    columns = set(raw) - markers
    missing = [c for c in view.columns if c not in columns]
    extra = sorted(str(c) for c in columns - set(view.columns))
    if extra:
        raise _bad(view.name, where, f"{extra[0]!r} is not a column of {view.name} (columns: {list(view.columns)})")
    if missing:
        kind = "key column" if missing[0] in view.key else "column"
        raise _bad(view.name, where, f"{kind} {missing[0]!r} is missing")
    values = {c: _check_value(io, where, c, raw[c]) for c in view.columns}
    unknown_raw = raw.get(UNKNOWN, [])
    if not isinstance(unknown_raw, list) or not all(isinstance(c, str) for c in unknown_raw):
        raise _bad(view.name, where, f"{UNKNOWN} must be a list of column names")
    unknown = frozenset(unknown_raw)
    for col in sorted(unknown):
        if col not in view.columns:
            raise _bad(view.name, where, f"{UNKNOWN} names {col!r}, which is not a column of {view.name}")
        if col in view.key:
            raise _bad(view.name, where, f"{UNKNOWN} names key column {col!r}; a key is always known")
    was: Key | None = None
    if WAS in raw:
        was = _parse_key(io, f"{where}.{WAS}", raw[WAS])
        if was == key_of(values, view.key):
            was = None
    return _Incoming(values, unknown, was, key_of(values, view.key))


@dataclass
class _Plan:
    deletes: list[tuple[_Incoming, bool]] = field(default_factory=list)  # (row, a rename of this delta takes K)
    renames: list[_Incoming] = field(default_factory=list)
    upserts: list[tuple[_Incoming, bool]] = field(default_factory=list)  # (row, is an update)
    parked: list[Key] = field(default_factory=list)  # old keys of renames that form a cycle (a swap of two keys)


def _plan(io: _ViewIO, insertions: list[_Incoming], deletions: list[_Incoming]) -> _Plan:
    name = io.view.name
    by_key: dict[Key, _Incoming] = {}
    for row in deletions:
        if row.key in by_key:
            raise _bad(name, "deletions", f"key {list(row.key)!r} is deleted twice")
        by_key[row.key] = row
    seen: set[Key] = set()
    seen_was: set[Key] = set()
    for row in insertions:
        if row.key in seen:
            raise _bad(name, "insertions", f"key {list(row.key)!r} is inserted twice")
        seen.add(row.key)
        if row.was is not None:
            if row.was in seen_was:
                raise _bad(name, "insertions", f"two insertions rename key {list(row.was)!r}")
            seen_was.add(row.was)
    plan = _Plan()
    paired: set[Key] = set()
    renames: list[_Incoming] = []
    for row in insertions:
        if row.was is not None:
            base = by_key.get(row.was)
            renames.append(replace(row, base=base.values) if base is not None else row)
            paired.add(row.was)
    for row in insertions:
        if row.was is None:
            is_update = row.key in by_key and row.key not in paired
            if is_update:
                paired.add(row.key)
            plan.upserts.append((replace(row, base=by_key[row.key].values) if is_update else row, is_update))
    targets = {r.key for r in renames}
    plan.deletes = [(row, key in targets) for key, row in by_key.items() if key not in paired]
    # a rename onto a key that another rename frees must wait for it
    pending = list(renames)
    sources = {r.was for r in pending}
    while pending:
        ready = [r for r in pending if r.key not in sources]
        if not ready:  # a cycle (A→B, B→A): park A's row at a temporary key, which frees A
            first = pending[0]
            assert first.was is not None
            plan.parked.append(first.was)
            sources.discard(first.was)
            pending[0] = replace(first, parked=True)
            continue
        for r in ready:
            plan.renames.append(r)
            pending.remove(r)
            sources.discard(r.was)
    return plan


# ---------------------------------------------------------------------------------------------------- apply


_VIEW_IO: dict[tuple[int, str], tuple[PeerType, _ViewIO]] = {}  # (id(peer type), view) -> (that type, its SQL)


def _view_io(ptype: PeerType, view: str) -> _ViewIO:
    kept = _VIEW_IO.get((id(ptype), view))
    if kept is not None and kept[0] is ptype:
        return kept[1]
    spec = next((v for v in ptype.views if v.name == view), None)
    if spec is None:
        known = ", ".join(v.name for v in ptype.views) or "(none)"
        raise ApplyBadRequest(f"unknown view {view!r}: peer type {ptype.name} has {known}")
    io = _ViewIO(ptype, spec)
    _VIEW_IO[(id(ptype), view)] = (ptype, io)  # a race composes it twice, harmlessly
    return io


def _delete(state: GxState, io: _ViewIO, row: _Incoming, displaced: bool) -> None:
    view = io.view
    found = io.read(state.conn, row.key)
    if found is not None:
        row_id, current = found
        if (io.table.name, row_id) in state.touched:
            if displaced:
                # "delete K, rename K0 to K" arrives again: the row at K is the renamed one (this gxid wrote it)
                state.deleted.add((view.name, row.key))
                return
            raise _delete_conflict(state, io, row, current)
        io.write_delete(state.conn, row.key)
    else:
        _absent(state, io, row.key)
    state.deleted.add((view.name, row.key))


def _absent(state: GxState, io: _ViewIO, key: Key) -> None:
    """A deletion found no row at `key`: done already in this gxid (a second arrival), or gone before it; or, while
    transactions prepared here may hold it, perhaps not visible yet (ApplyUnseen)."""
    if state.unseen_possible and (io.view.name, key) not in state.deleted:
        raise ApplyUnseen(io.view.name, key)


def _delete_conflict(state: GxState, io: _ViewIO, row: _Incoming, current: Row) -> ApplyConflict:
    """The deletion `row` meets `current`, a row this gxid wrote."""
    changed = [c for c in io.view.columns if c not in row.unknown and current[c] != row.values[c]]
    detail = (
        f"{changed[0]!r} is {current[changed[0]]!r} here, the deletion saw {row.values[changed[0]]!r}"
        if changed
        else "it was written through another view or by another branch"
    )
    return ApplyConflict(
        state.peer,
        io.view.name,
        row.key,
        changed[0] if changed else None,
        current[changed[0]] if changed else None,
        row.values[changed[0]] if changed else None,
        f"deleted by one branch while this global transaction wrote it ({detail})",
    )


def _update_conflict(state: GxState, io: _ViewIO, key: Key) -> ApplyConflict:
    """An update or rename of `key`, which this gxid deleted."""
    return ApplyConflict(
        state.peer,
        io.view.name,
        key,
        None,
        None,
        None,
        "updated by one branch while this global transaction deleted it",
    )


def _inserted(state: GxState, io: _ViewIO, row: _Incoming, row_id: int) -> None:
    """Record the base row `row_id` that the insertion `row` created: touched, its asserted columns written, its
    unknown columns (and those the view does not carry) marked."""
    ref = (io.table.name, row_id)
    marks = set(row.unknown) | io.private
    if marks:
        state.unknown[ref] = marks
    state.written[ref] = row.strong()
    state.touched.add(ref)


def _merge(state: GxState, io: _ViewIO, ref: tuple[str, int], current: Row, row: _Incoming) -> Row:
    """The merged view row of current row R and incoming row I; updates the unknown and written marks."""
    marks = state.unknown.get(ref, set())
    written = state.written.setdefault(ref, set())
    merged: Row = {}
    for c in io.view.columns:
        if c in io.view.key:
            merged[c] = row.values[c]
            written.add(c)
        elif c in row.unknown:
            merged[c] = current[c]
        elif row.carried(c):  # no news: it fills an unknown, never overrides a value
            merged[c] = row.values[c] if c in marks else current[c]
            marks.discard(c)
        elif c in marks or c not in written:
            merged[c] = row.values[c]
            marks.discard(c)
            written.add(c)
        elif current[c] == row.values[c]:
            merged[c] = current[c]
        else:
            raise ApplyConflict(state.peer, io.view.name, row.key, c, current[c], row.values[c])
    if ref in state.unknown and not marks:
        del state.unknown[ref]
    return merged


def _upsert(state: GxState, io: _ViewIO, row: _Incoming, is_update: bool) -> None:
    conn, view = state.conn, io.view
    found, at = io.read(conn, row.key), row.key
    if row.was is not None:
        old = io.read(conn, row.was)
        if found is None:
            found, at = old, row.was  # rename in place (or nothing there: insert below)
            if old is None:
                _absent(state, io, row.was)
        elif old is not None and (io.table.name, old[0]) not in state.touched:
            # the new key is here already (this gxid renamed it, or another branch brought it): the old key's row
            # from before the gxid goes, as the rename says; a row this gxid wrote there (a new row that took the
            # freed key) stays
            io.write_delete(conn, row.was)
            state.deleted.add((view.name, row.was))
    if found is None:
        old_key = row.was if row.was is not None else row.key
        if (row.was is not None or is_update) and (view.name, old_key) in state.deleted:
            raise _update_conflict(state, io, old_key)
        _inserted(state, io, row, io.write_insert(conn, row.values))
        return
    row_id, current = found
    ref = (io.table.name, row_id)
    merged = _merge(state, io, ref, current, row)
    if merged != current:
        io.write_update(conn, at, merged)
    state.touched.add(ref)


def _park(state: GxState, io: _ViewIO, key: Key) -> Key | None:
    """Move the row at `key` (a rename cycle's source, not yet written in this gxid) to a temporary key."""
    found = io.read(state.conn, key)
    if found is None or (io.table.name, found[0]) in state.touched:
        return None  # gone, or the cycle was applied by an earlier arrival: the renames merge in place
    view = io.view
    for i, column in enumerate(view.key):
        pg_type = io.types[column]
        temp: Any
        if pg_type == "text":
            temp = f"~dejima-parked-{uuid.uuid4().hex}"
        elif pg_type in ("integer", "bigint", "numeric"):
            top = state.conn.execute(
                sql.SQL("SELECT coalesce(max({}), 0) + 1 FROM {}").format(
                    sql.Identifier(column), sql.Identifier(SCHEMA, io.table.name)
                )
            ).fetchone()
            temp = top[0] if top is not None else 1
        else:
            continue
        temp_key = (*key[:i], temp, *key[i + 1 :])
        io.write_update(state.conn, key, {**found[1], column: temp})
        return temp_key
    raise ApplyBadRequest(f"{view.name}: renames form a cycle and no key column is text or a number to park one on")


def _apply_rows(state: GxState, io: _ViewIO, plan: _Plan) -> None:
    """The plan of a delta without renames in two round trips whatever its size, where `_delete` and `_upsert` take
    two per row: one statement reads (and locks) every row (`select_many`), then one deletes, one updates
    (`delete_many`, `update_many`) and each insert is written and read back, all sent together (psycopg pipeline
    mode). One statement for many rows costs the driver and the server far less than one per row (a probe, 13 rows
    read and updated through a view: 1.2 → 0.5 ms of the peer's CPU, 1.5 to 1.8 → 0.9 ms of PostgreSQL's).

    The rows are locked in the order of the plan, as when each had its own statement; the one difference is that
    all reads come before the writes. That reads the same, as no two rows of the plan share a key (a key is
    deleted, inserted or updated once; the pairs are updates) and a write through the view changes only its own
    base row; nor does any row's decision depend on another row's: `state` is per base row, and `deleted` per
    key. A conflict is found before anything is written.

    Nothing is prepared server-side (`prepare=False`): under load (a throughput run, 32 clients, with rollbacks to
    savepoints around) auto-prepared statements sent in pipelines were later missing on the server ("prepared
    statement _pg3_… does not exist"). Not reproduced in a small test; psycopg forgets its prepared statements at
    every ROLLBACK (ROLLBACK TO SAVEPOINT included) and deallocates them all, which is the likely way for one
    prepared in a pipeline to go missing."""
    conn, view = state.conn, io.view
    rows = [row for row, _ in plan.deletes] + [row for row, _ in plan.upserts]
    read = conn.execute(io.select_many, io.key_texts([row.key for row in rows]), prepare=False).fetchall()
    by_position = {int(n): (int(row_id), dict(current)) for n, row_id, current in read}
    found = [by_position.get(n) for n in range(1, len(rows) + 1)]
    deletes: list[Key] = []
    updates: list[tuple[Key, Row]] = []
    inserts: list[_Incoming] = []
    touched: list[tuple[str, int]] = []
    for (row, _), current in zip(plan.deletes, found[: len(plan.deletes)], strict=True):
        if current is None:
            _absent(state, io, row.key)
        else:
            if (io.table.name, current[0]) in state.touched:
                raise _delete_conflict(state, io, row, current[1])
            deletes.append(row.key)
    for (row, is_update), current in zip(plan.upserts, found[len(plan.deletes) :], strict=True):
        if current is None:
            if is_update and (view.name, row.key) in state.deleted:
                raise _update_conflict(state, io, row.key)
            inserts.append(row)
            continue
        ref = (io.table.name, current[0])
        merged = _merge(state, io, ref, current[1], row)
        if merged != current[1]:
            updates.append((row.key, merged))
        touched.append(ref)
    written: list[tuple[str, list[Key], psycopg.Cursor[Any]]] = []
    added = []
    with conn.pipeline():
        if deletes:
            written.append(("DELETE", deletes, conn.execute(io.delete_many, io.key_texts(deletes), prepare=False)))
        if updates:
            at = [key for key, _ in updates]
            params = io.row_texts([merged for _, merged in updates]) + io.key_texts(at)
            written.append(("UPDATE", at, conn.execute(io.update_many, params, prepare=False)))
        for row in inserts:
            conn.execute(io.insert, [row.values[c] for c in view.columns], prepare=False)
            added.append(conn.execute(io.select, list(row.key), prepare=False))
    for what, keys, cur in written:
        if cur.rowcount != len(keys):
            raise ApplyError(
                f"{view.name}: {what} of keys {[list(k) for k in keys]!r} changed {cur.rowcount} rows,"
                f" expected {len(keys)}"
            )
    state.deleted.update((view.name, row.key) for row, _ in plan.deletes)
    state.touched.update(touched)
    for row, cur in zip(inserts, added, strict=True):
        new = io.found(cur.fetchone())
        if new is None:
            raise ApplyError(f"{view.name}: the inserted row {list(row.key)!r} is missing")
        _inserted(state, io, row, new[0])


def apply_delta(state: GxState, view: str, insertions: list[Row], deletions: list[Row]) -> None:
    """Apply one incoming delta of `view` through the view, with the merge rule (module docstring).

    Raises ApplyBadRequest (nothing changed), ApplyConflict, or a psycopg error (a constraint, a lock timeout);
    on any error the database and `state` are as before the call.
    """
    _apply(state, view, insertions, deletions, savepoint_taken=False)
    state.conn.execute(RELEASE_SQL)


def apply_and_take(
    state: GxState, view: str, insertions: list[Row], deletions: list[Row], *, savepoint_taken: bool = False
) -> list[RowChange]:
    """`apply_delta`, then `take_changes` (what the capture triggers recorded for the gxid, folded), with the
    savepoint's release and the take in one round trip. `savepoint_taken`: the caller has just opened the gxid's
    transaction (registered for the gxid) and taken the `SAVEPOINT_SQL` savepoint in the same round trip (a
    participant's first arrival), so neither the check nor the savepoint cost one more."""
    _apply(state, view, insertions, deletions, savepoint_taken=savepoint_taken)
    conn = state.conn
    with conn.pipeline():
        conn.execute(RELEASE_SQL)
        rows = conn.execute(TAKE_SQL, (state.token,)).fetchall()
    return fold([RowChange(v, row_id, old, new) for v, row_id, old, new in rows])


def _apply(state: GxState, view: str, insertions: list[Row], deletions: list[Row], savepoint_taken: bool) -> None:
    """apply_delta without the final release of its savepoint (which stays taken on success and on failure)."""
    io = _view_io(state.ptype, view)
    if not isinstance(insertions, list) or not isinstance(deletions, list):
        raise ApplyBadRequest(f"{view}: insertions and deletions must be lists of rows")
    ins = [_parse_row(io, f"insertions[{i}]", r, insertion=True) for i, r in enumerate(insertions)]
    dels = [_parse_row(io, f"deletions[{i}]", r, insertion=False) for i, r in enumerate(deletions)]
    plan = _plan(io, ins, dels)
    conn = state.conn
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise ApplyError(f"gxid {state.gxid}: apply_delta needs the gxid's open database transaction")
    if not savepoint_taken:
        # one round trip: the check, then the savepoint (simple query protocol; the first result is the check's)
        current_gxid = conn.execute(CHECK_AND_SAVEPOINT_SQL).fetchone()
        if current_gxid is None or current_gxid[0] != state.gxid:
            conn.execute(RELEASE_SQL)
            raise ApplyError(
                f"gxid {state.gxid}: the connection's transaction belongs to {current_gxid and current_gxid[0]!r}"
            )
    saved = state.snapshot()
    try:
        if plan.renames or len(plan.deletes) + len(plan.upserts) < 2:
            for row, displaced in plan.deletes:
                _delete(state, io, row, displaced)
            parked = {key: _park(state, io, key) for key in plan.parked}
            for row in plan.renames:
                temp = parked.get(row.was) if row.parked and row.was is not None else None
                _upsert(state, io, replace(row, was=temp) if temp is not None else row, is_update=True)
            for row, is_update in plan.upserts:
                _upsert(state, io, row, is_update)
        else:
            _apply_rows(state, io, plan)
    except BaseException:
        state.restore(saved)
        if not conn.broken:
            conn.execute(ROLLBACK_TO_SQL)
        raise


def locked_elsewhere(state: GxState, view: str, insertions: list[Row], deletions: list[Row]) -> tuple[str, set[int]]:
    """The base table of `view`, and the ids of its rows at the delta's keys (a rename's old key too) that another
    transaction holds locked now: after an apply ran out of lock wait, whom it waited for (the coordinator's
    wait-die). Waits for nothing and keeps no lock (it takes the free rows' locks inside a savepoint of its own and
    undoes them); a row that another transaction inserted and has not committed is not seen. On the gxid's open
    transaction; raises ApplyBadRequest for a malformed delta, or the psycopg error (the transaction is usable
    again, as it was before the call)."""
    io = _view_io(state.ptype, view)
    rows = [_parse_row(io, f"insertions[{i}]", r, insertion=True) for i, r in enumerate(insertions)]
    rows += [_parse_row(io, f"deletions[{i}]", r, insertion=False) for i, r in enumerate(deletions)]
    keys = list(dict.fromkeys([*(row.key for row in rows), *(row.was for row in rows if row.was is not None)]))
    conn = state.conn
    try:
        with conn.pipeline():
            conn.execute(PROBE_SAVEPOINT_SQL, prepare=False)
            cur = conn.execute(io.select_locked, io.key_texts(keys), prepare=False)
            for undo in PROBE_UNDO:  # a pipeline takes one statement per string
                conn.execute(undo, prepare=False)
        return io.table.name, {int(row_id) for row_id, locked in cur.fetchall() if locked}
    except psycopg.Error:
        if not conn.broken and conn.info.transaction_status == TransactionStatus.INERROR:
            conn.execute(b"; ".join(PROBE_UNDO))
        raise


# ---------------------------------------------------------------------------------------------------- out


def outgoing(state: GxState, changes: Iterable[RowChange]) -> dict[str, Delta]:
    """Wire deltas of captured changes, per view (`ViewDelta`s), annotated with `$unknown` and `$was`.

    Records every changed base row as touched, every key that left a view as deleted, and for rows not touched
    before (the origin's statements: apply_delta keeps the marks of the rows it writes) the changed columns as
    written.
    """
    out: dict[str, Delta] = {}
    touched_before = set(state.touched)
    for change in changes:
        view = state.ptype.view(change.view)
        ref = (view.table, change.row_id)
        if change.new is not None and ref not in touched_before:
            # a row the origin's statements changed (apply_delta keeps the marks of the rows it writes itself)
            marks = state.unknown.get(ref, set())
            state.written.setdefault(ref, set()).update(
                c for c in view.columns if c not in marks and (change.old is None or change.old[c] != change.new[c])
            )
        state.touched.add(ref)
        delta = out.setdefault(change.view, ViewDelta(change.view, key=view.key))
        old_key = key_of(change.old, view.key) if change.old is not None else None
        if change.old is not None:
            delta.deletions.append(dict(change.old))
        if change.new is not None:
            row = dict(change.new)
            marks = state.unknown.get(ref, set()) & set(view.columns)
            if marks:
                row[UNKNOWN] = sorted(marks)
            if old_key is not None and old_key != key_of(change.new, view.key):
                row[WAS] = dict(zip(view.key, old_key, strict=True))
            delta.insertions.append(row)
        if old_key is not None and (change.new is None or old_key != key_of(change.new, view.key)):
            state.deleted.add((change.view, old_key))
    return out


def _key_columns(delta: Delta, received: Delta) -> tuple[str, ...] | None:
    for d in (delta, received):
        if isinstance(d, ViewDelta) and d.key:
            return d.key
    return None


def _ident(row: Row, key: tuple[str, ...] | None) -> Key:
    """A row's identity: its key, or (key unknown) all its column values."""
    if key is not None:
        return key_of(row, key)
    return tuple(sorted((k, repr(v)) for k, v in row.items() if not k.startswith("$")))


def _same(a: Row, b: Row) -> bool:
    values_a = {k: v for k, v in a.items() if not k.startswith("$")}
    values_b = {k: v for k, v in b.items() if not k.startswith("$")}
    return values_a == values_b and frozenset(a.get(UNKNOWN, ())) == frozenset(b.get(UNKNOWN, ()))


def without_echo(delta: Delta, received: Delta) -> Delta:
    """What of `delta` the sender of `received` (a delta of the same view) does not already have.

    Drops insertions identical (values and unknown columns) to one it sent, and deletions of keys it sent as
    deletions. An update or rename pair stays whole: its deletion goes (or stays) with its insertion, since a
    lone deletion would read as a delete and a lone insertion loses which columns the change left alone.
    """
    key = _key_columns(delta, received)
    sent_deleted = {_ident(row, key) for row in received.deletions}
    kept: list[Row] = []
    renames: dict[Key, bool] = {}  # deletion identity -> its paired insertion is kept (as apply_delta pairs them:
    updates: dict[Key, bool] = {}  # a rename's `$was` first, then the same key)
    for row in delta.insertions:
        keep = not any(_same(row, sent) for sent in received.insertions)
        if keep:
            kept.append(row)
        if key is not None:
            was = row.get(WAS)
            if isinstance(was, dict) and set(was) == set(key):
                renames[key_of(was, key)] = keep
            else:
                updates[key_of(row, key)] = keep
    pair_of = {**updates, **renames}
    deletions = []
    for row in delta.deletions:
        ident = _ident(row, key)
        if pair_of.get(ident, ident not in sent_deleted):
            deletions.append(row)
    return ViewDelta(delta.view, kept, deletions, key=key or ())
