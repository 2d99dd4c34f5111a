"""The client process: its settings, its peer type's manifest and its peer service, built once (`get_context()`),
and the operations the web app and the REST API share (read rows; create, update, delete a row through one
global transaction at the peer).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from peer.client.peer_api import Outcome, PeerService, PeerUnavailable, QueryFailed
from peer.client.tables import (
    TableInfo,
    count_rows_sql,
    delete_sql,
    describe,
    find_row_sql,
    insert_sql,
    select_row_sql,
    select_rows_sql,
    update_sql,
)
from peer.dejima.config import PeerConfig, load_config
from peer.dejima.manifest import PeerType, load_manifest

MAX_ID = 2**63 - 1
PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class RowMissing(Exception):
    """The row does not exist (any more)."""


@dataclass(frozen=True)
class Snapshot:
    """What the client knows about its peer for one request: the peer's status (None when it cannot be asked,
    `problem` says why) and the base tables with their sharing."""

    config: PeerConfig
    ptype: PeerType
    status: dict[str, Any] | None
    problem: str
    tables: list[TableInfo]

    @property
    def peer_name(self) -> str:
        return str(self.status.get("peer", self.config.name)) if self.status else self.config.name

    @property
    def warning(self) -> str:
        """Set when the peer at DEJIMA_PEER_URL is of another peer type than this client's."""
        if self.status and self.status.get("peer_type") not in (None, self.ptype.name):
            return (
                f"the peer at {self.config.peer_url_for_client} is a {self.status.get('peer_type')} peer, "
                f"but this client shows the {self.ptype.name} peer type; check DEJIMA_PEER_URL and PEER_TYPE"
            )
        return ""

    @property
    def peer_names(self) -> dict[str, str]:
        """URL -> name of every peer the peer knows, itself included."""
        names: dict[str, str] = {}
        if self.status:
            names[str(self.status.get("url", "")).rstrip("/")] = self.peer_name
            for peer in self.status.get("peers") or []:
                if isinstance(peer, dict) and peer.get("url") and peer.get("name"):
                    names[str(peer["url"]).rstrip("/")] = str(peer["name"])
        return names

    @property
    def views(self) -> list[dict[str, Any]]:
        """Every dejima view of the peer type: its table, columns and group."""
        shares = {s.view: s for t in self.tables for s in t.shares}
        return [
            {"view": v.name, "table": v.table, "columns": list(v.columns), "key": list(v.key), "share": shares[v.name]}
            for v in self.ptype.views
        ]

    def table(self, name: str) -> TableInfo | None:
        return next((t for t in self.tables if t.name == name), None)


@dataclass
class ClientContext:
    config: PeerConfig
    ptype: PeerType
    service: PeerService = field(init=False)

    def __post_init__(self) -> None:
        tls = self.config.tls
        self.service = PeerService(
            self.config.peer_url_for_client,
            self.config.peer_timeout,
            self.config.peer_token,
            ca_file=tls.ca_file if tls is not None else None,
        )

    def snapshot(self) -> Snapshot:
        try:
            status: dict[str, Any] | None = self.service.status()
            problem = ""
        except PeerUnavailable as exc:
            status, problem = None, str(exc)
        return Snapshot(self.config, self.ptype, status, problem, describe(self.ptype, status))

    # ---- reads (raise PeerUnavailable or QueryFailed) -----------------------------------------------------------
    def count(self, table: TableInfo) -> int:
        return int(self.service.query(count_rows_sql(table)).rows[0][0])

    def rows(self, table: TableInfo, limit: int = PAGE_SIZE, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """One page of rows (ordered by id) and the total number of rows."""
        total = self.count(table)
        return self.service.query(select_rows_sql(table, limit, offset)).dicts(), total

    def row(self, table: TableInfo, row_id: int) -> dict[str, Any]:
        """One row; raises RowMissing."""
        if not 0 < row_id <= MAX_ID:
            raise RowMissing
        found = self.service.query(select_row_sql(table, row_id)).dicts()
        if not found:
            raise RowMissing
        return found[0]

    # ---- writes: one global transaction each, answered by an Outcome ----------------------------------------------
    def _exec(self, snap: Snapshot, statement: str) -> Outcome:
        return self.service.exec([statement], snap.peer_names, snap.peer_name)

    def create(self, snap: Snapshot, table: TableInfo, values: Mapping[str, Any]) -> Outcome:
        outcome = self._exec(snap, insert_sql(table, values))
        if outcome.ok:
            try:  # best effort: the row just inserted (the peer's exec does not return rows)
                found = self.service.query(find_row_sql(table, values)).dicts()
            except (PeerUnavailable, QueryFailed):
                found = []
            if found:
                outcome = replace(outcome, extra={"row": found[0]})
        return outcome

    def update(self, snap: Snapshot, table: TableInfo, row_id: int, values: Mapping[str, Any]) -> Outcome:
        """Raises RowMissing (checked first; a row deleted in between makes the update change nothing)."""
        self.row(table, row_id)
        outcome = self._exec(snap, update_sql(table, row_id, values))
        if outcome.ok:
            with contextlib.suppress(PeerUnavailable, QueryFailed, RowMissing):
                outcome = replace(outcome, extra={"row": self.row(table, row_id)})
        return outcome

    def delete(self, snap: Snapshot, table: TableInfo, row_id: int) -> Outcome:
        """Raises RowMissing."""
        self.row(table, row_id)
        return self._exec(snap, delete_sql(table, row_id))


_lock = threading.Lock()
_context: ClientContext | None = None


def get_context() -> ClientContext:
    """The client of this process, built once from the environment (settings are validated: ConfigError)."""
    global _context
    with _lock:
        if _context is None:
            config = load_config()
            _context = ClientContext(config, load_manifest(config.sql_root / config.peer_type))
        return _context
