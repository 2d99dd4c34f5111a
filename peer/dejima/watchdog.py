"""A deadline for database work whose timeouts a client controls.

The origin's transaction runs a client's statements, and a client may `SET LOCAL statement_timeout = 0` (or
`lock_timeout`) there: PostgreSQL's own timeouts are settings the client can change, so they cannot bound it. The
watchdog can: `guard(conn, deadline)` around the work, and when the deadline passes with the work still running, the
statement in flight on `conn` is cancelled (PostgreSQL answers it with `query_canceled`, which the caller sees as a
timeout). One daemon thread serves every guard; a guard costs a heap push, and a wake-up only when its deadline is the
earliest.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 2.0  # how long a cancel request itself may take


class Watchdog:
    def __init__(self, name: str = "peer") -> None:
        self.name = name
        self._heap: list[tuple[float, int]] = []  # (deadline, guard id)
        self._guards: dict[int, psycopg.Connection[Any]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._cancelling: int | None = None  # the guard whose statement is being cancelled now
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # statements cancelled so far

    @contextlib.contextmanager
    def guard(self, conn: psycopg.Connection[Any], deadline: float) -> Iterator[None]:
        """Cancel what runs on `conn` when `deadline` (time.monotonic()) passes before the block ends."""
        guard_id = next(self._ids)
        with self._cond:
            self._start()
            self._guards[guard_id] = conn
            heapq.heappush(self._heap, (deadline, guard_id))
            if self._heap[0][1] == guard_id:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._guards.pop(guard_id, None)  # its heap entry is dropped when it comes up
                while self._cancelling == guard_id:  # the connection is not handed on while a cancel is on its way
                    self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start(self) -> None:
        """Start the thread on first use (caller holds `_cond`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    if self._heap and self._heap[0][1] not in self._guards:
                        heapq.heappop(self._heap)  # ended before its deadline
                        continue
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, guard_id = heapq.heappop(self._heap)
                conn = self._guards.pop(guard_id, None)
                self._cancelling = guard_id if conn is not None else None
            if conn is not None:
                try:
                    self._cancel(conn)
                finally:
                    with self._cond:
                        self._cancelling = None
                        self._cond.notify_all()

    def _cancel(self, conn: psycopg.Connection[Any]) -> None:
        self.cancelled += 1
        log.warning("peer %s: cancelling a database statement that ran past its deadline", self.name)
        try:
            conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)
        except (psycopg.Error, OSError) as exc:
            log.warning("peer %s: the cancel failed: %s", self.name, exc)
