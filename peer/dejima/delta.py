"""Read what the capture triggers recorded for a gxid, folded to the net change of each dejima view.

The triggers append one record per changed base row and statement (`dejima.delta`): the row's view image before
and after. Several statements of one transaction are folded per (view, base row): the first image before, the last
image after; a row that ends where it started is no change at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from peer.dejima import jsonvalues  # noqa: F401  (json/jsonb numbers load exactly: see the module)

Row = dict[str, Any]

TAKE_SQL = """
WITH taken AS (DELETE FROM dejima.delta WHERE gxid = %s RETURNING seq, view_name, row_id, old_row, new_row)
SELECT view_name, row_id, old_row, new_row FROM taken ORDER BY seq
"""


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


def take_changes(conn: psycopg.Connection[Any], gxid: str) -> list[RowChange]:
    """Remove and return this gxid's captured records, folded. Runs inside the caller's transaction."""
    rows = conn.execute(TAKE_SQL, (gxid,)).fetchall()
    return fold([RowChange(view, row_id, old, new) for view, row_id, old, new in rows])


def set_gxid(conn: psycopg.Connection[Any], gxid: str) -> None:
    """Mark the current transaction as part of global transaction `gxid` (transaction-local)."""
    if not gxid:
        raise ValueError("gxid must be non-empty")
    conn.execute("SELECT set_config('dejima.gxid', %s, true)", (gxid,))
