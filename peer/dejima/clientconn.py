"""What a client's statements may leave on a pooled connection of the client login, and how it is cleared.

A client's statements run on connections of the client login (peer/dejima/install.py), pooled: what they change
for the session outlives their transaction — settings made with `set_config(…, false)`, session advisory locks, open
WITH HOLD cursors (the client login can create no temporary object and no prepared statement). Every such connection
is cleared before another request gets it: in the round trip that ends the transaction when the peer ends it itself
(`end_and_clear`, `END_AND_CLEAR`), otherwise when it goes back to the pool (`returned`, the pool's reset callback:
one round trip more).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

CLEAR = (b"RESET ALL", b"SELECT pg_advisory_unlock_all()", b"CLOSE ALL")
CLEAR_SQL = b"; ".join(CLEAR)
# a read's end (simple query protocol: one round trip): nothing it did is kept, and the session is as it was
ROLLBACK_AND_CLEAR_SQL = b"ROLLBACK; " + CLEAR_SQL
_cleared: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()  # cleared since their last transaction


def clear_in_pipeline(conn: psycopg.Connection[Any]) -> None:
    """Queue the clearing statements in the caller's pipeline, after the statement that ends the transaction;
    call `cleared(conn)` once the pipeline succeeded."""
    for statement in CLEAR:
        conn.execute(statement)


def cleared(conn: psycopg.Connection[Any]) -> None:
    """`conn` was cleared after its transaction ended: the pool need not clear it again."""
    _cleared.add(conn)


def rollback_and_clear(conn: psycopg.Connection[Any]) -> None:
    """End a read's transaction (nothing kept) and clear the session, in one round trip."""
    conn.execute(ROLLBACK_AND_CLEAR_SQL)
    cleared(conn)


def returned(then: Callable[[psycopg.Connection[Any]], None]) -> Callable[[psycopg.Connection[Any]], None]:
    """The client pool's reset callback: clear the connection unless that was done when its transaction ended (a
    connection whose clearing fails is discarded by the pool), then `then(conn)`."""

    def reset(conn: psycopg.Connection[Any]) -> None:
        if conn in _cleared:
            _cleared.discard(conn)
        elif conn.info.transaction_status == TransactionStatus.IDLE:
            conn.execute(CLEAR_SQL)
        then(conn)

    return reset
