"""Read what the capture triggers recorded for a global transaction, folded to the net change of each dejima view.

A database transaction takes part in a global transaction once the peer registered it (`begin_global`, which
returns the transaction's token: 32 random bytes only the peer service knows). The triggers append one record per
changed base row and statement (`dejima.delta`): the row's view image before and after, under the registered gxid.
`take_changes` removes and returns them (the token proves it is the peer asking, not a client's SQL running in the
same transaction); several statements of one transaction are folded per (view, base row): the first image before,
the last image after; a row that ends where it started is no change at all. `end_global` ends the registration
before the transaction commits or is prepared.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from peer.dejima import jsonvalues  # noqa: F401  (json/jsonb numbers load exactly: see the module)

Row = dict[str, Any]

TAKE_SQL = "SELECT view_name, row_id, old_row, new_row FROM dejima.take_delta(%s)"
END_SQL = "SELECT dejima.end_global(%s, %s, %s, %s, %s)"


@dataclass(frozen=True)
class RowChange:
    """One base row's change as seen through one view: None = not in the view."""

    view: str
    row_id: int
    old: Row | None
    new: Row | None


@dataclass
class Delta:
    """The wire shape of a view's change: deletions and insertions of view rows.

    An update is a deletion and an insertion with the same identity key.
    """

    view: str
    insertions: list[Row] = field(default_factory=list)
    deletions: list[Row] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.insertions and not self.deletions


def fold(records: list[RowChange]) -> list[RowChange]:
    """Net change per (view, row_id), in first-seen order; records must be in capture order."""
    net: dict[tuple[str, int], RowChange] = {}
    for rec in records:
        k = (rec.view, rec.row_id)
        first = net.get(k)
        net[k] = rec if first is None else RowChange(rec.view, rec.row_id, first.old, rec.new)
    return [c for c in net.values() if c.old != c.new]


def to_deltas(changes: list[RowChange]) -> dict[str, Delta]:
    """Group net changes per view into deltas (views without a change are absent)."""
    out: dict[str, Delta] = {}
    for change in changes:
        delta = out.setdefault(change.view, Delta(change.view))
        if change.old is not None:
            delta.deletions.append(change.old)
        if change.new is not None:
            delta.insertions.append(change.new)
    return out


def take_changes(conn: psycopg.Connection[Any], token: bytes) -> list[RowChange]:
    """Remove and return the records captured so far in the caller's transaction (registered with `token`),
    folded."""
    rows = conn.execute(TAKE_SQL, (token,)).fetchall()
    return fold([RowChange(view, row_id, old, new) for view, row_id, old, new in rows])


def new_token() -> bytes:
    """A fresh transaction token (`begin_global`)."""
    return secrets.token_bytes(32)


def begin_sql(gxid: str, token: bytes) -> sql.Composed:
    """The statement that registers the current transaction as part of `gxid` (only the token's sha256 is sent, so
    nothing a client could read in the server's activity view or logs gives the token away)."""
    if not gxid:
        raise ValueError("gxid must be non-empty")
    return sql.SQL("SELECT dejima.begin_global({}, {})").format(
        sql.Literal(gxid), sql.Literal(hashlib.sha256(token).digest())
    )


def begin_global(conn: psycopg.Connection[Any], gxid: str) -> bytes:
    """Register the caller's open transaction as part of global transaction `gxid`; its token."""
    token = new_token()
    conn.execute(begin_sql(gxid, token))
    return token


def end_global(
    conn: psycopg.Connection[Any],
    token: bytes,
    origin: str | None = None,
    role: str | None = None,
    views: dict[str, Any] | None = None,
    witness: dict[str, Any] | None = None,
) -> None:
    """End the registration of the caller's transaction (before COMMIT or PREPARE), staging its txlog entry when
    `views` is given, with the partners' log heads `witness` (peer.dejima.txlog); with role "participant" the gxid is
    recorded as finished here once the transaction commits (dejima.finished)."""
    conn.execute(
        END_SQL,
        (token, origin, role, Jsonb(views) if views is not None else None, Jsonb(witness) if witness else None),
    )
