"""The commit protocol, top to bottom (ARCHITECTURE.md "The write path").

Origin (`run`): allocate a gxid; open one database transaction, set the gxid, run the client's statements; read
the deltas the capture triggers recorded; send `propagate` for every changed view to every other member of its
group, in parallel, with a deadline; when every branch said yes, `prepare` every peer reached that did not
prepare on the way (a chain: `Propagate.prepare`, docs/decisions.md "A chain prepares on the way"); record the decision
(the origin's own COMMIT with a row in `dejima.decisions` is the commit point); `finish(commit)` everywhere.
Any no, error or timeout: roll back everywhere (`finish(abort)`); the client hears "committed" only after the
decision is durable.

Participant (`on_propagate`): apply the delta through its view (putback, with the order-independent merge of
`peer.dejima.apply`) inside the one transaction it keeps for that gxid; forward what this changed on its views to
their members (never echoing back to the sender what the sender already has); answer with its vote and every
peer its branch reached. A second arrival of the same gxid applies in the same transaction; when it changes
nothing, nothing is forwarded: that is how cycles and diamonds terminate.

Conflicts (wait-die): a participant's apply that meets a locked row waits only for a holder that is prepared here
(it waits for nothing but its decision) or younger (gxids carry their origin's start time); a holder older and
still open here makes it give up with a conflict, at once (it looks before it waits while an older one is open);
a holder it cannot name (`_older_holder`) counts as older when any older global transaction is open here. Waits go
from older to younger only: no cycle of waits can form, so exactly one of two conflicting writes commits and the
other gets a retryable 409.

Recovery (`recover_once`, at start and periodically): every prepared transaction of this peer whose origin is not
finishing it asks the origin for the decision; an origin without a decision row for a gxid it no longer runs
answers abort (presumed abort).

Tamper evidence (`peer.dejima.txlog`): the transaction that commits a change also stages its entry for this peer's
hash chain — the origin with its decision row, a participant just before PREPARE — without any lock, so global
transactions committing at the same time never wait for each other there. The sealer thread (`run_sealer`), woken
after every commit here, links the committed staged entries into the chain in batches. Each entry also records what
the partners said of their own logs: a propagate carries the origin's head (`Propagate.origin_head`), a prepared
participant's vote its own head, whether it staged an entry and that entry's digest (`Ack.head`,
`PropagateReply.heads`); `dejima check` compares every chain with what its partners recorded of it.

Replays and reopening (`_refusal`): a participant opens a global transaction once. A propagate for a gxid aborted
here (tombstones), prepared here by an earlier run (orphans), committed or aborted here before (`dejima.finished`,
checked by `dejima.begin_global` in the round trip that opens the transaction: a participant records its gxid in the
transaction it prepares, and an abort right after its rollback), or whose start time is older than the transaction
timeout plus the replay window (or that far in the future) is refused with a "no" vote of kind `refused`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerr
from psycopg import sql
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from peer.dejima import clientconn, jsonvalues, txlog
from peer.dejima.apply import (
    SAVEPOINT,
    ApplyConflict,
    ApplyError,
    ApplyUnseen,
    GxState,
    apply_and_take,
    locked_elsewhere,
    outgoing,
    without_echo,
)
from peer.dejima.config import PeerConfig
from peer.dejima.delta import Delta, RowChange, begin_sql, end_global, new_token, take_changes
from peer.dejima.directory import Directory
from peer.dejima.manifest import PeerType
from peer.dejima.messages import (
    WAS,
    Ack,
    DecisionQuery,
    DecisionReply,
    Finish,
    Prepare,
    Propagate,
    PropagateReply,
)
from peer.dejima.sqlguard import statement_heads
from peer.dejima.transport import CallResult, Transport
from peer.dejima.watchdog import Watchdog

log = logging.getLogger(__name__)

HTTP_STATUS = {
    "conflict": 409,
    "constraint": 422,
    "bad_request": 400,
    "bad_sql": 400,  # the client's own SQL failed (the answer carries PostgreSQL's message and SQLSTATE)
    "forbidden": 403,  # the client's SQL needs a privilege its database role does not have
    "refused": 403,
    "unreachable": 503,
    "busy": 503,
    "timeout": 504,
    "internal": 500,
}
APPLY_LOCK_WAIT_MS = 100  # a participant re-decides wait-or-die this often while a row is locked
TOMBSTONE_SECONDS = 600.0
ORIGIN_KEYS_LIMIT = 1000  # above this many changed keys the origin does not list them (forwarding stays correct)
# the sealer waits this long after a commit woke it: the commits of that time are chained in one transaction of its
# own, where at 0.05 s a peer taking part in one write at a time spent a fifth of its CPU sealing (a star's member)
SEAL_GATHER_S = 0.5
READ_SETTLE_S = 1.0  # a client statement waits at most this long for transactions prepared here to finish (settle)
REPLY_MEMORY = 10_000  # answers to propagate remembered by message id (a retry gets the first answer back)
BATCHABLE = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})  # the statements a batch may run (`batchable`)
RETRY_ALONE = frozenset(
    {"constraint", "bad_request", "bad_sql", "forbidden", "refused"}
)  # a batch's failures that one member may have caused
CLIENT_SAVEPOINT = sql.Identifier("dejima_client")
CLIENT_ROLLBACK_SQL = sql.SQL("ROLLBACK TO SAVEPOINT {}").format(CLIENT_SAVEPOINT).as_bytes(None)
CLIENT_SAVEPOINT_SQL = sql.SQL("SAVEPOINT {}").format(CLIENT_SAVEPOINT).as_bytes(None)  # in a pipeline: by itself
# after a client's statement, in the same query: a new line ends a trailing -- comment; an open quote or /* comment
# makes the whole query fail, as the statement alone would
NEXT_CLIENT_SAVEPOINT_SQL = b"\n;" + CLIENT_SAVEPOINT_SQL
BATCH_LOCK_WAIT_MS = 10  # in a batch, a member after the first waits this long for a row lock, then is put off
BATCH_TRIES = 3  # times a client transaction is put off or run again (Retry) before its error is final
# the same, setting the short lock wait first (once the batch holds rows; a savepoint taken later keeps it)
SHORT_WAIT_SET_SQL = (
    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{BATCH_LOCK_WAIT_MS}ms")).as_bytes(None)
)
SHORT_WAIT_SQL = b"\n;" + SHORT_WAIT_SET_SQL + b"; " + CLIENT_SAVEPOINT_SQL
# the origin's commit point (common.sql): its decision row, its txlog entry, the end of its registration
COMMIT_POINT_SQL = "SELECT dejima.commit_point(%s, %s, %s, %s, %s)"
# dejima.begin_global's refusal of a gxid that committed or aborted here already (common.sql)
FINISHED_HERE = "DJ001"
# a participant's rollback, and the gxid recorded as aborted here, in one round trip (a transaction of its own,
# not waiting for the disk: a record lost to a database crash only lets that gxid's origin try it once more)
RECORD_ABORTED_SQL = (
    "BEGIN; SET LOCAL synchronous_commit = off;"
    " INSERT INTO dejima.finished (gxid, outcome) VALUES ({}, 'aborted') ON CONFLICT (gxid) DO NOTHING; COMMIT"
)
ABORTED_SQL = "ROLLBACK; " + RECORD_ABORTED_SQL


class GlobalTxnError(Exception):
    """A global transaction did not commit; `kind` says why (see HTTP_STATUS), the message says where; `sqlstate`:
    PostgreSQL's code, when a client's statement failed."""

    def __init__(self, kind: str, message: str, sqlstate: str | None = None) -> None:
        self.kind = kind
        self.sqlstate = sqlstate
        super().__init__(message)

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.kind, 500)


class Retry(GlobalTxnError):
    """A batch of client transactions did not commit, perhaps because of another member: run this one again, by
    itself (`alone`: a constraint or a refusal that one of the members caused), or in the next batch (a conflict
    with a concurrent global transaction: it has likely finished by then)."""

    def __init__(self, kind: str, message: str, alone: bool) -> None:
        super().__init__(kind, message)
        self.alone = alone


def batchable(statements: list[str]) -> bool:
    """Whether a client transaction may share a global transaction with others: plain INSERT, UPDATE, DELETE and
    MERGE statements only (no SET, no function call in a SELECT, nothing else that could leave state behind)."""
    return shape(statements)[0]


def shape(statements: list[str]) -> tuple[bool, bool]:
    """(`batchable`, whether every string holds exactly one statement: a batch may then send it in a pipeline,
    where each string is parsed by itself — the extended protocol takes one statement per string)."""
    heads = [statement_heads(text) for text in statements]
    return (
        all(head.partition(" ")[0] in BATCHABLE for each in heads for head in each),
        all(len(each) == 1 for each in heads),
    )


@dataclass(eq=False)
class Request:
    """A client transaction at its origin, from its arrival to its result (`Coordinator.run`)."""

    statements: list[str]
    batchable: bool
    single: bool = False  # one statement per string (`shape`): it may run in a batch's pipeline
    started: float = field(default_factory=time.monotonic)
    turn: threading.Event = field(default_factory=threading.Event)  # set: it leads `batch`, or is in another's
    done: threading.Event = field(default_factory=threading.Event)  # set: `result` is there
    batch: list[Request] | None = None  # what it leads (itself first); None for a member of another's
    needs: frozenset[str] = frozenset()  # the gxids prepared here when it came: it must see them (`settle`)
    tries: int = 0  # how many times it ran before, in a batch that failed or put it off (Retry)
    result: dict[str, Any] | GlobalTxnError | None = None
    settle_ms: float = 0.0  # how long it (or its batch, it leading) waited for the transactions prepared here


def classify(exc: BaseException) -> str:
    """The error kind of a database error."""
    if isinstance(exc, pgerr.LockNotAvailable | pgerr.DeadlockDetected | pgerr.SerializationFailure):
        return "conflict"
    if isinstance(exc, pgerr.QueryCanceled):
        return "timeout"
    if isinstance(exc, psycopg.errors.IntegrityError):
        return "constraint"
    if isinstance(exc, psycopg.errors.ProgrammingError | psycopg.errors.DataError):
        return "bad_request"
    return "internal"


# SQLSTATE classes of failures that are not the client's statement's fault: the connection, the server's resources
# or state, an administrator's intervention, PostgreSQL itself
SERVER_FAULTS = frozenset({"08", "53", "57", "58", "XX", "F0", "HV"})


def classify_client(exc: psycopg.Error) -> str:
    """The error kind of a failure of a client's own statements: a conflict, a timeout or a constraint as for any
    database error (`classify`); a missing privilege is `forbidden` (the client's database role may change base
    tables and nothing else); anything else the statement itself caused (syntax, a transaction control inside a DO
    block, an exception it raised) is `bad_sql`; a failure of the server or the connection stays `internal`."""
    kind = classify(exc)
    state = exc.sqlstate or ""
    if kind in ("conflict", "timeout", "constraint"):
        return kind
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return "forbidden"
    if state and state[:2] not in SERVER_FAULTS:
        return "bad_sql"
    return kind


def client_error(name: str, exc: psycopg.Error) -> GlobalTxnError:
    """The GlobalTxnError of a client statement's failure at peer `name`."""
    return GlobalTxnError(classify_client(exc), f"{name}: {exc}".strip(), exc.sqlstate)


def gxid_order(gxid: str) -> tuple[int, str]:
    """gxid = <origin>.<start time ns, hex>.<random>: older first, ties by name."""
    parts = gxid.split(".")
    try:
        return int(parts[1], 16), gxid
    except (IndexError, ValueError):
        return 2**63, gxid


def gxid_origin(gxid: str) -> str:
    return gxid.split(".", 1)[0]


@dataclass
class Gx:
    """One global transaction as this peer sees it."""

    gxid: str
    origin: str
    deadline: float  # time.monotonic()
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: psycopg.Connection[Any] | None = None
    pool: ConnectionPool[Any] | None = None  # where `conn` came from (the client pool at the origin)
    token: bytes = field(default_factory=new_token, repr=False)  # its database transaction's (delta.begin_global)
    state: GxState | None = None
    phase: str = "open"  # open | prepared | committed | aborted
    reached: set[str] = field(default_factory=set)
    created: float = field(default_factory=time.monotonic)
    origin_keys: dict[str, list[list[Any]]] = field(default_factory=dict)
    changes: dict[tuple[str, int], RowChange] = field(default_factory=dict)  # net change here, for the txlog entry
    handling: int = 0  # propagates of this gxid being handled here now (one is waiting on a branch that came back)
    origin_head: dict[str, Any] = field(default_factory=dict)  # the origin's log head, as its propagate carried it
    # at the origin: each participant's log head when it prepared (`Ack.head`), recorded in the origin's entry
    witness: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)  # at a participant: what it told when it prepared (`Ack.head`)

    @property
    def order(self) -> tuple[int, str]:
        return gxid_order(self.gxid)


@dataclass(frozen=True)
class Received:
    """The delta a participant received, from whom, and which members of that view's group the sender sent it to
    in the same fan-out: the sender and those members have its rows already, so none is forwarded to them."""

    sender: str
    delta: Delta
    recipients: frozenset[str]

    def has(self, member: str) -> bool:
        return member == self.sender or member in self.recipients


@dataclass
class FanOut:
    ok: bool
    reached: set[str]
    error: str = ""
    error_kind: str = ""
    prepared: set[str] = field(default_factory=set)  # peers that prepared on the way (Propagate.prepare)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each of those told (`Ack.head`)


class Coordinator:
    def __init__(
        self,
        config: PeerConfig,
        ptype: PeerType,
        pool: ConnectionPool[Any],
        directory: Directory,
        transport: Transport,
        client_pool: ConnectionPool[Any] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.ptype = ptype
        self.pool = pool  # the peer's own login: participants' transactions, recovery, the log
        # the client login (DEJIMA_CLIENT_DATABASE_URL): the origin's transactions, which run a client's statements
        self.client_pool = client_pool if client_pool is not None else pool
        self.watchdog = Watchdog(config.name)
        self._restore_sql = (
            sql.SQL("SELECT set_config('statement_timeout', {}, true), set_config('lock_timeout', {}, true)").format(
                sql.Literal(f"{config.statement_timeout_ms}ms"), sql.Literal(f"{config.lock_timeout_ms}ms")
            ),
            sql.SQL("SET LOCAL synchronous_commit TO DEFAULT"),
            sql.SQL("SET LOCAL search_path TO DEFAULT"),
        )
        self.directory = directory
        self.transport = transport
        self.gxs: dict[str, Gx] = {}
        self.tombstones: dict[str, float] = {}
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)  # notified whenever a global transaction is forgotten here
        self.pending_finish: dict[str, set[str]] = {}  # gxid -> participants still to be told "commit"
        # gxids prepared here by an earlier run of this peer (no Gx here): until recovery finishes them they count as
        # prepared here for `settle` and `ApplyUnseen` like any other (`adopt_prepared`)
        self.orphans: set[str] = set()
        self.replies: dict[str, PropagateReply] = {}  # message id -> first answer (insertion-ordered, bounded)
        self.seal_wanted = threading.Event()  # set after a commit here: the sealer chains its txlog entry
        # this peer's log head as its sealers last left it: what its messages tell its partners (truncation evidence)
        self.head = txlog.EMPTY
        # a gxid whose start time is further than this from now (seconds) is never opened here: its origin gave up
        # on it (the transaction timeout), allowing for the clocks' skew (the replay window)
        self.gxid_horizon = config.txn_timeout + config.replay_window
        self._pruned = 0.0  # when dejima.finished was last pruned (time.monotonic)
        # admission: global transactions started here beyond DEJIMA_MAX_ACTIVE wait (in arrival order) for a turn
        self.turns = threading.Lock()
        self.running = 0  # batches running (each one global transaction)
        self.running_batchable = 0  # of which led by a batchable request
        self.waiting: list[Request] = []  # client transactions waiting for a turn, oldest first
        self.stats = {
            "committed": 0,  # client transactions started here that committed (several may share one gxid: batch)
            "global_committed": 0,  # global transactions started here that committed
            "batched": 0,  # client transactions that committed with others in one global transaction
            "batch_retried": 0,  # client transactions run once more because their batch failed (Retry)
            "aborted": 0,
            "propagate_sent": 0,
            "propagate_received": 0,
            "prepare_sent": 0,  # origin: prepare messages (a participant prepared on the way gets none)
            "prepared_on_the_way": 0,  # participant: prepared at the end of its propagate (Propagate.prepare)
            "busy": 0,  # origin: transactions refused because DEJIMA_MAX_ACTIVE were running for the whole timeout
            "settle_timeouts": 0,  # client statements that ran before prepared transactions here finished (settle)
            "settle_asked": 0,  # prepared transactions here whose origin a settle asked for the decision (late finish)
            "unseen_waits": 0,  # deletions that found no row and waited for transactions prepared here (ApplyUnseen)
            "apply_lock_waits": 0,  # slices of lock wait (APPLY_LOCK_WAIT_MS) an apply ran out of, then decided
            # applies that gave up (wait-die): an older global transaction open here held, or may have held, a row
            "wait_die_conflicts": 0,
            "conflicts_before_waiting": 0,  # of those, found by looking before any lock wait (`_older_holder`)
        }
        with pool.connection(timeout=config.peer_timeout) as conn:
            self.head = txlog.head(conn)

    # ---- helpers --------------------------------------------------------------------------------------------
    def fault(self, step: str, site: str = "") -> None:
        """Test-only fault point: crash the whole peer right here (DEJIMA_FAULT_POINT=<step>). A step reached at
        more than one place names each `site`: `<step>` crashes at any of them, `<step>:<site>` at that one only.

        Under gunicorn the arbiter dies first, then this worker: a worker alone would be replaced by the arbiter
        at once, still with the fault point set, and any retried message (recovery's, an origin's unconfirmed
        finish) would crash each new worker again at the same step; a crashed peer stays down until restarted."""
        if self.config.fault_point not in (step, f"{step}:{site}" if site else step):
            return
        log.error(
            "fault point %s reached%s: killing the process", self.config.fault_point, f" at {site}" if site else ""
        )
        parent = os.getppid()
        with contextlib.suppress(OSError):
            if b"gunicorn" in Path(f"/proc/{parent}/cmdline").read_bytes():
                os.kill(parent, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def new_gxid(self) -> str:
        return f"{self.name}.{time.time_ns():x}.{secrets.token_hex(4)}"

    def gid(self, gxid: str, participant: str | None = None) -> str:
        """Prepared-transaction id: unique per PostgreSQL cluster (several peers may share one locally)."""
        return f"dejima:{gxid}:{participant or self.name}"

    def _open(self, gx: Gx, savepoint: sql.Identifier | None = None) -> None:
        """Start the gxid's database transaction (caller holds gx.lock); with `savepoint`, take that savepoint in the
        same round trip (apply's: `apply_and_take(..., savepoint_taken=True)`; a batch's first client: `_execute`)."""
        if gx.conn is not None:
            return
        remaining = max(0.1, gx.deadline - time.monotonic())
        # the origin's transaction runs a client's statements: on a connection of the client login, which can change
        # base tables and nothing else; a participant's applies only what peers sent, on the peer's own login
        pool = self.client_pool if gx.origin == self.name else self.pool
        try:
            conn = pool.getconn(timeout=remaining)
        except PoolTimeout as exc:
            stats = pool.get_stats()
            with self.lock:
                phases = [g.phase for g in self.gxs.values() if g.conn is not None]
            raise GlobalTxnError(
                "timeout",
                f"{self.name}: no database connection free ({exc}; pool size {stats.get('pool_size')}, "
                f"available {stats.get('pool_available')}, waiting {stats.get('requests_waiting', 0)}; "
                f"held by {len(phases)} open global transactions)",
            ) from None
        # A participant's only lock waits are its applies, which wait-die in short slices (_apply_wait_die): its
        # transaction gets that slice as lock_timeout here, once, instead of around every apply.
        lock_ms = self.config.lock_timeout_ms if gx.origin == self.name else APPLY_LOCK_WAIT_MS
        try:  # one round trip (simple query protocol: the values are composed as literals by psycopg)
            conn.execute(
                sql.SQL(
                    "BEGIN; {}; SELECT set_config('lock_timeout', {}, true),"
                    " set_config('statement_timeout', {}, true){}"
                ).format(
                    begin_sql(gx.gxid, gx.token),
                    sql.Literal(f"{lock_ms}ms"),
                    sql.Literal(f"{self.config.statement_timeout_ms}ms"),
                    sql.SQL("; SAVEPOINT {}").format(savepoint) if savepoint is not None else sql.SQL(""),
                )
            )
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            pool.putconn(conn)
            if exc.sqlstate == FINISHED_HERE:  # dejima.begin_global: it committed or aborted here already
                raise GlobalTxnError("refused", f"{self.name}: {exc.diag.message_primary or exc}") from None
            raise
        gx.conn, gx.pool = conn, pool
        gx.state = GxState(gxid=gx.gxid, ptype=self.ptype, conn=conn, token=gx.token, peer=self.name)

    def _release(self, gx: Gx, statement: str | sql.Composed | None) -> None:
        """End the gxid's database transaction with `statement` (ROLLBACK, COMMIT, …) and free the connection."""
        conn, gx.conn = gx.conn, None
        if conn is None:
            return
        try:
            if statement is not None and not conn.closed:
                conn.execute(statement)
        finally:
            (gx.pool or self.pool).putconn(conn)

    def _get_or_create(self, gxid: str, origin: str, timeout_s: float) -> Gx:
        with self.lock:
            gx = self.gxs.get(gxid)
            if gx is None:
                gx = Gx(gxid, origin, time.monotonic() + timeout_s)
                self.gxs[gxid] = gx
            return gx

    def _forget(self, gx: Gx, aborted: bool) -> None:
        with self.lock:
            self.gxs.pop(gx.gxid, None)
            if aborted:
                self.tombstones[gx.gxid] = time.monotonic() + TOMBSTONE_SECONDS
            self.finished.notify_all()

    def settle(self, timeout: float = READ_SETTLE_S, gxids: Iterable[str] | None = None) -> bool:
        """Wait until the global transactions prepared here before this call (or those of `gxids` still prepared)
        have finished, at most `timeout`; False when some still had not.

        With DEJIMA_COMMIT_WAIT=decision an origin answers its client once the decision is durable and sends
        COMMIT PREPARED afterwards: a client statement here right after that answer (a read through the REST API,
        or a global transaction started here) first waits for it, so it sees the write. A transaction prepared here
        was voted for before its origin decided, so every write a client has been told is committed is covered.
        Only transactions prepared before the call are waited for: a busy peer cannot keep a read waiting.

        Those still prepared when `timeout` ran out (their origin's COMMIT PREPARED is late: it failed, or the origin
        is slow) are finished as recovery would, at once: their origins are asked for the decision (`_resolve`)."""
        deadline = time.monotonic() + timeout
        with self.finished:
            waiting = self._unsettled(self.gxs.keys() | self.orphans if gxids is None else gxids)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.finished.wait(left)
                waiting = self._unsettled(waiting)
        if not waiting:
            return True
        self.stats["settle_asked"] += len(waiting)
        self._resolve(sorted(waiting))
        with self.lock:
            waiting = self._unsettled(waiting)
        if waiting:
            self.stats["settle_timeouts"] += 1
            return False
        return True

    def _unsettled(self, gxids: Iterable[str]) -> set[str]:
        """Those of `gxids` prepared here and not finished yet (caller holds `lock`)."""
        return {
            gxid
            for gxid in gxids
            if gxid in self.orphans or ((gx := self.gxs.get(gxid)) is not None and gx.phase == "prepared")
        }

    def prepared_here(self) -> frozenset[str]:
        """The global transactions prepared here now: what a client transaction arriving now must see (`settle`)."""
        with self.lock:
            return frozenset(self._unsettled(self.gxs.keys() | self.orphans))

    def adopt_prepared(self) -> int:
        """Count the transactions prepared here by an earlier run of this peer as prepared here (`orphans`), before
        this one serves anything: the first recovery pass, which finishes them, runs beside the serving. How many."""
        rows = self._prepared_rows()
        with self.lock:
            self.orphans.update(gxid for gxid, _ in rows if gxid not in self.gxs)
            return len(self.orphans)

    def _prepared_rows(self) -> list[tuple[str, float]]:
        """(gxid, seconds since PREPARE) of every transaction prepared here, by this peer's database."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT gid, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts"
                " WHERE database = current_database() AND gid LIKE %s",
                (f"dejima:%:{self.name}",),
            ).fetchall()
        return [(gid.split(":")[1], float(age)) for gid, age in rows]

    def _finished_here(self, gxid: str) -> None:
        """gxid, prepared here, is finished: an orphan no more; whoever waits for it (`settle`) wakes."""
        with self.lock:
            if gxid in self.orphans:
                self.orphans.discard(gxid)
                self.finished.notify_all()

    def _older_open(self, gx: Gx) -> bool:
        with self.lock:
            return any(o.phase == "open" and o.order < gx.order for o in self.gxs.values() if o is not gx)

    def _older_holder(self, gx: Gx, msg: Propagate) -> bool | None:
        """Wait-die (caller holds gx.lock): whether a global transaction older than gx and still open here holds a
        row that gx's apply of `msg` needs; None when a locked row's holder is unknown. gx may wait for a global
        transaction that is prepared (it waits for nothing but its decision) or younger than gx (it gives up itself
        when it needs what gx holds): waits go from older to younger, so no cycle of waits forms across peers. The
        holders are the global transactions open here that changed a locked row (`locked_elsewhere`, `_holders`);
        a row locked by another without a change (or a wait for an insert not yet committed) has no known holder."""
        assert gx.state is not None
        try:
            table, locked = locked_elsewhere(gx.state, msg.view, msg.insertions, msg.deletions)
        except (ApplyError, psycopg.Error):
            return None
        if not locked:
            return False
        holders = self._holders(gx, table, locked)
        if holders is None:
            return None
        return any(h.phase == "open" and h.order < gx.order for h in holders)

    def _wait_die_conflict(self, msg: Propagate, waited: bool) -> GlobalTxnError:
        with self.lock:
            self.stats["wait_die_conflicts"] += 1
            self.stats["conflicts_before_waiting"] += not waited
        return GlobalTxnError(
            "conflict", f"{self.name}: {msg.view} rows are locked and an older global transaction runs here"
        )

    def _holders(self, gx: Gx, table: str, row_ids: set[int]) -> list[Gx] | None:
        """The other global transactions here that changed each of these rows of `table` (their net changes by
        view and base row id, `Gx.changes`); None when a row has no such transaction."""
        views = [view.name for view in self.ptype.views_of(table)]
        with self.lock:
            others = [g for g in self.gxs.values() if g is not gx]
        holders: list[Gx] = []
        for row_id in row_ids:
            found = [g for g in others if any((view, row_id) in g.changes for view in views)]
            if not found:
                return None
            holders += found
        return holders

    # ---- origin ---------------------------------------------------------------------------------------------
    def run(self, statements: list[str]) -> dict[str, Any]:
        """Run statements here as one client transaction. Returns the outcome or raises GlobalTxnError.

        At most DEJIMA_MAX_ACTIVE global transactions started here run at once: beyond, a transaction waits for a
        turn (at most the transaction timeout, then "busy", 503 with Retry-After). Without that bound an overloaded
        network fills every peer's connection pool with transactions that all wait for each other until they time
        out (docs/performance.md). When a turn comes, the client transactions waiting for one (plain INSERT, UPDATE,
        DELETE and MERGE only, at most DEJIMA_BATCH_MAX) run together as one global transaction: one propagation,
        one prepare and one decision for all of them (`_run`). First it lets the transactions prepared here finish
        (`settle`), so it sees every write already committed: a batch does it once for all its members, before it
        starts (and takes in a write arriving while it runs only when that write has nothing to wait for)."""
        started = time.monotonic()
        can_batch, single = shape(statements)
        request = Request(statements, self.config.batch_max > 1 and can_batch, single)
        while True:
            if request.batchable:
                request.needs = self.prepared_here()  # its batch settles them (`_admit`), so it queues at once
            else:
                settling = time.monotonic()
                self.settle()
                request.settle_ms = _ms(settling)
            self._admit(request)
            if not isinstance(request.result, Retry):
                break
            # its batch failed, perhaps on something another member did, or it met a row lock in a batch
            self.stats["batch_retried"] += 1
            alone = request.result.alone
            request = Request(statements, request.batchable and not alone, single, tries=request.tries + 1)
        if isinstance(request.result, GlobalTxnError):
            raise request.result
        assert request.result is not None
        return {**request.result, "ms": _ms(started)}

    def _admit(self, request: Request) -> None:
        """Run `request` when it has a turn: as the leader of a batch (it runs the batch in this thread), or as a
        member of another's (it waits for that batch's outcome). Sets `request.result`."""
        limit = self.config.max_active
        if not limit:  # no bound: every transaction runs at once, so none waits and none is batched
            self.settle(gxids=request.needs)
            self._run_batch([request])
            return
        with self.turns:
            lead = self._may_run(request)  # else every turn it may take is taken: none waiting could run either
            if lead:
                self._start(request, [request])
            elif request.tries:
                self.waiting.insert(0, request)  # it waited its turn already
            else:
                self.waiting.append(request)
        if not lead:
            if not request.turn.wait(self.config.txn_timeout):
                with self.turns:
                    if request in self.waiting:  # no turn came: refused, nothing was done
                        self.waiting.remove(request)
                        self.stats["busy"] += 1
                        request.result = GlobalTxnError(
                            "busy",
                            f"{self.name}: {self.running} global transactions started here are running"
                            f" (DEJIMA_MAX_ACTIVE {limit}, DEJIMA_BATCH_RUNNING {self.config.batch_running} for"
                            f" writes that batch); none finished within {self.config.txn_timeout:g}s, try again",
                        )
                        return
                request.turn.wait()  # handed a turn just as the wait ran out: it is set already
            if request.batch is None:  # a member of another leader's batch
                if not request.done.wait(self._batch_bound()):
                    request.result = GlobalTxnError("timeout", f"{self.name}: the batch of this transaction hung")
                return
        assert request.batch is not None
        try:
            if request.batchable:
                settling = time.monotonic()
                self.settle(gxids=frozenset().union(*(r.needs for r in request.batch)))
                request.settle_ms = _ms(settling)
            self._run_batch(request.batch)
        finally:
            self._next_turn(request)

    def _batch_bound(self) -> float:
        """How long a batch can take at most: its deadline, then telling every participant it aborted."""
        return self.config.txn_timeout + 2 * self.config.peer_timeout + 5.0

    def _may_run(self, request: Request) -> bool:
        """Whether a turn is free for `request` (caller holds `turns`): fewer than DEJIMA_MAX_ACTIVE running, and for a
        batchable one fewer than DEJIMA_BATCH_RUNNING batchable ones (the writes arriving meanwhile gather)."""
        if self.running >= self.config.max_active:
            return False
        return not request.batchable or self.running_batchable < self.config.batch_running

    def _start(self, leader: Request, batch: list[Request]) -> None:
        """Give `leader` its turn to run `batch` (caller holds `turns`)."""
        self.running += 1
        self.running_batchable += leader.batchable
        leader.batch = batch
        for member in batch:
            member.turn.set()

    def _next_turn(self, ended: Request) -> None:
        """A batch ended: give the free turns to the oldest waiting requests, each with the batchable ones behind it."""
        with self.turns:
            self.running -= 1
            self.running_batchable -= ended.batchable
            for leader in list(self.waiting):
                if leader not in self.waiting or not self._may_run(leader):
                    continue
                self.waiting.remove(leader)
                batch = [leader]
                if leader.batchable:
                    batch += [r for r in self.waiting if r.batchable][: self.config.batch_max - 1]
                    self.waiting = [r for r in self.waiting if r not in batch]
                self._start(leader, batch)
                if self.running >= self.config.max_active:
                    return

    def _run_batch(self, batch: list[Request]) -> None:
        """Run the batch as one global transaction (it may grow while its statements run: `_join`); give every
        member its result and wake it."""
        results: list[dict[str, Any] | GlobalTxnError] = []
        try:
            results = self._run(batch)
        except Exception as exc:  # _run answers every failure as a value; this is a bug, still answered
            log.exception("a batch of %d failed", len(batch))
            results = [GlobalTxnError("internal", f"{self.name}: {type(exc).__name__}: {exc}")] * len(batch)
        finally:
            for i, request in enumerate(batch):  # whatever happened, no member is left waiting
                request.result = results[i] if i < len(results) else GlobalTxnError("internal", "the batch stopped")
                request.done.set()

    def _join(self, batch: list[Request]) -> None:
        """Add to a running batch of writes the batchable requests that came since it started, up to
        DEJIMA_BATCH_MAX: closed-loop clients answered by one batch come back a moment after it ended, so the next
        batch starts with the first of them and gathers the others here instead of leaving them for the one after."""
        if not batch[0].batchable or len(batch) >= self.config.batch_max:
            return
        with self.turns, self.lock:
            ready = [r for r in self.waiting if r.batchable and not self._unsettled(r.needs)]
            joining = ready[: self.config.batch_max - len(batch)]
            if not joining:
                return
            self.waiting = [r for r in self.waiting if r not in joining]
            for request in joining:
                batch.append(request)
                request.turn.set()

    def _execute(self, gx: Gx, batch: list[Request]) -> dict[int, GlobalTxnError]:
        """Run the batch's statements in the gxid's transaction (open); the members whose statements failed.

        A member alone: its first failure is the transaction's (raised). In a batch of writes each member runs
        after a savepoint of its own, a failure rolls back to it, so only that member's changes (and what its
        statements captured) are undone, and the next member goes on; before each member the batch takes in the
        writes that arrived meanwhile (`_join`). The first member's savepoint rode on BEGIN; the next one's is
        taken right after a member's last statement, and a failed member's savepoint, still there after the
        rollback to it, is the next member's. Members of one statement per string go in one round trip together
        (`_pipeline_members`: under load each round trip waited for the CPU, ≈ 2 ms per member at 64 clients);
        the others one statement per round trip (`_simple_member`)."""
        assert gx.conn is not None
        if not batch[0].batchable:
            for statement in batch[0].statements:
                try:
                    gx.conn.execute(statement.encode())
                except psycopg.Error as exc:
                    raise client_error(self.name, exc) from None
            return {}
        failed: dict[int, GlobalTxnError] = {}
        short = False  # whether the members' lock wait is BATCH_LOCK_WAIT_MS already
        i = 0
        while i < len(batch):
            run = 1
            if batch[i].single:  # it and the one-statement members after it, in one round trip
                while i + run < len(batch) and batch[i + run].single:
                    run += 1
                done, error, short = self._pipeline_members(gx, batch[i : i + run], short)
            else:
                done, error, short = self._simple_member(gx, batch[i], short)
            i += done
            if error is not None:  # member i failed: rolled back to its savepoint, the next one goes on from there
                if isinstance(error, pgerr.LockNotAvailable):
                    # a row another global transaction holds: waiting would hold up the whole batch (and the rows
                    # it has written), so it goes first in the next batch instead (the first member waits, as alone)
                    message = f"{self.name}: {error}".strip()
                    put_off = short and i > 0 and batch[i].tries < BATCH_TRIES
                    failed[i] = (
                        Retry("conflict", message, alone=False) if put_off else GlobalTxnError("conflict", message)
                    )
                else:
                    failed[i] = client_error(self.name, error)
                gx.conn.execute(CLIENT_ROLLBACK_SQL)  # the savepoint stays: the next member's too
                i += 1
            self._join(batch)
        if len(batch) == 1 and failed:
            raise failed[0]  # alone after all: its failure is the transaction's
        return failed

    def _simple_member(self, gx: Gx, member: Request, short: bool) -> tuple[int, psycopg.Error | None, bool]:
        """Run one member's statements, one round trip each; the next member's savepoint rides on its last one
        (simple protocol: it runs only when the statement did; a statement that fails, even one that does not
        parse, fails alone). (members done: 1 or 0, its error, whether the lock wait is short now)."""
        assert gx.conn is not None
        statements = member.statements
        try:
            for j, statement in enumerate(statements):
                if j == len(statements) - 1:
                    gx.conn.execute(statement.encode() + (NEXT_CLIENT_SAVEPOINT_SQL if short else SHORT_WAIT_SQL))
                else:
                    gx.conn.execute(statement.encode())
        except psycopg.Error as exc:
            return 0, exc, short
        return 1, None, True

    def _pipeline_members(self, gx: Gx, members: list[Request], short: bool) -> tuple[int, psycopg.Error | None, bool]:
        """Run members of one statement per string in one round trip (psycopg pipeline mode): each statement, then
        the next member's savepoint (the short lock wait set first, once). The first failure makes the server skip
        the rest: the members before it are done, it failed (the caller rolls back to its savepoint), those after
        it were not run. (members done, the failed one's error, whether the lock wait is short after them).

        Each string is parsed by itself (extended protocol), so no member's text can run into another's, and what
        a member sends is executed as it would be alone. Nothing is prepared server-side (see apply._apply_rows)."""
        conn = gx.conn
        assert conn is not None
        sent: list[tuple[int, psycopg.Cursor[Any]]] = []  # (member index, cursor), in the order sent
        short_before: list[bool] = []  # the lock wait in force at each member's savepoint
        error: psycopg.Error | None = None
        try:
            with conn.pipeline():
                for m, member in enumerate(members):
                    short_before.append(short)
                    for statement in member.statements:
                        sent.append((m, conn.execute(statement.encode(), prepare=False)))
                    if not short:
                        sent.append((m, conn.execute(SHORT_WAIT_SET_SQL, prepare=False)))
                        short = True
                    sent.append((m, conn.execute(CLIENT_SAVEPOINT_SQL, prepare=False)))
        except psycopg.Error as exc:
            error = exc
        if error is None:
            return len(members), None, short
        for m, cur in sent:
            result = cur.pgresult
            if result is None or result.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
                return m, error, short_before[m]
        raise error  # every command answered, yet the pipeline failed: not a member's failure

    def _run(self, batch: list[Request]) -> list[dict[str, Any] | GlobalTxnError]:
        """Run the batch's client transactions as one global transaction; each one's result.

        A member whose statements fail gets its own error; the others go on. When the global transaction fails,
        every member that ran gets its error, or, when there were several and the failure may come from what one
        of them changed (a constraint, a refusal) or a conflict, `Retry`: each then runs once more, by itself or in
        the next batch, so it hears its own outcome."""
        gxid = self.new_gxid()
        gx = self._get_or_create(gxid, self.name, self.config.txn_timeout)
        started = time.monotonic()
        participants: set[str] = set()
        failed: dict[int, GlobalTxnError] = {}
        ran = [0]
        try:
            with gx.lock:
                self._open(gx, savepoint=CLIENT_SAVEPOINT if batch[0].batchable else None)
                assert gx.conn is not None and gx.state is not None
                # the client's statements may switch PostgreSQL's own timeouts off (SET LOCAL): bounded all the same
                with self.watchdog.guard(gx.conn, gx.deadline):
                    failed = self._execute(gx, batch)
                ran = [i for i in range(len(batch)) if i not in failed]
                if not ran:
                    raise GlobalTxnError("bad_request", "every client transaction of the batch failed")
                changes = self._take_after_client(gx)
                txlog.fold_into(gx.changes, changes)
                deltas = outgoing(gx.state, changes)
            if not deltas:
                with gx.lock:
                    assert gx.conn is not None
                    try:
                        with gx.conn.pipeline():  # one round trip, the session cleared of the client's settings too
                            end_global(gx.conn, gx.token)
                            gx.conn.execute("COMMIT")
                            clientconn.clear_in_pipeline(gx.conn)
                    except psycopg.Error as exc:  # the client's statements may have made it fail (deferred checks)
                        raise client_error(self.name, exc) from None
                    clientconn.cleared(gx.conn)
                    self._release(gx, None)
                    gx.phase = "committed"
                self._count_committed(len(ran))
                outcome: dict[str, Any] = {"status": "committed", "gxid": gxid, "participants": [], "batch": len(ran)}
                return [failed.get(i, outcome) for i in range(len(batch))]
            phases = {"settle_ms": batch[0].settle_ms, "local_ms": _ms(started)}
            gx.origin_keys = origin_keys(self.ptype, deltas)
            with self.lock:
                gx.origin_head = self.head.to_json()  # what each participant records of this peer's log
            fan = self._fan_out(gx, deltas, received=None, alone=True)
            phases["propagate_ms"] = _ms(started) - phases["local_ms"]
            participants = fan.reached - {self.name}
            if not fan.ok:
                raise GlobalTxnError(fan.error_kind or "internal", fan.error)
            gx.witness.update(fan.heads)
            self.fault("origin_before_prepare")
            mark = _ms(started)
            self._prepare_all(gx, sorted(participants - fan.prepared))
            phases["prepare_ms"] = _ms(started) - mark
            self.fault("origin_before_decision")
            with gx.lock:
                conn = gx.conn
                assert conn is not None
                # with participants there is always an entry here, which records what each told of its log
                views = txlog.summary(gx.changes.values())
                witness = self._witness(gx, participants)
                try:
                    # one round trip: the decision row, the txlog entry and the commit point; then the session
                    # cleared of what the client's statements set for it (peer.dejima.clientconn)
                    with conn.pipeline():
                        conn.execute(
                            COMMIT_POINT_SQL,
                            (
                                gx.token,
                                sorted(participants),
                                self.name,
                                Jsonb(views) if views or witness else None,
                                Jsonb(witness) if witness else None,
                            ),
                        )
                        conn.execute("COMMIT")  # the commit point
                        clientconn.clear_in_pipeline(conn)
                except psycopg.Error as exc:  # a deferred constraint of the client's, a serialization failure, …
                    raise client_error(self.name, exc) from None
                clientconn.cleared(conn)
                self._release(gx, None)
                gx.phase = "committed"
            self.seal_wanted.set()
            self._count_committed(len(ran))
            self.fault("origin_after_decision")
            mark = _ms(started)
            if self.config.commit_wait == "all":
                self._finish_commit(gxid, participants)
            else:
                self.transport.pool.submit(self._finish_commit, gxid, participants)
            phases["finish_ms"] = _ms(started) - mark
            outcome = {
                "status": "committed",
                "gxid": gxid,
                "participants": sorted(participants),
                "batch": len(ran),
                "phases": {k: round(v, 3) for k, v in phases.items()},
            }
            return [failed.get(i, outcome) for i in range(len(batch))]
        except GlobalTxnError as exc:
            self._abort(gx, participants)
            error = exc
        except Exception as exc:
            log.exception("gxid %s failed", gxid)
            self._abort(gx, participants)
            error = GlobalTxnError("internal", f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            self._forget(gx, aborted=gx.phase != "committed")
        if len(ran) > 1 and (error.kind in RETRY_ALONE or error.kind == "conflict"):
            retry = Retry(error.kind, str(error), alone=error.kind != "conflict")
            return [failed.get(i, error if batch[i].tries >= BATCH_TRIES else retry) for i in range(len(batch))]
        return [failed.get(i, error) for i in range(len(batch))]

    def _witness(self, gx: Gx, participants: Iterable[str]) -> dict[str, Any]:
        """What the origin's entry records of each participant's log: its head when it prepared, whether it staged an
        entry for this gxid, and that entry's digest (`txlog.Accounting`). A participant that told nothing (prepared
        by an earlier run of it: `on_prepare`) is recorded without a head."""
        out: dict[str, Any] = {}
        for name in sorted(participants):
            told = gx.witness.get(name)
            mark = txlog.head_of(told)
            if told is None or mark is None:
                out[name] = {"logged": None}
            else:
                out[name] = txlog.witness_of(mark.seq, mark.hash, bool(told.get("logged")), str(told.get("entry", "")))
        return out

    def _take_after_client(self, gx: Gx) -> list[RowChange]:
        """What the client's statements changed, taken from the origin's transaction, in one round trip with the
        settings the protocol relies on for the rest of it put back (the client's statements may have changed them
        for the transaction: SET LOCAL, set_config): its timeouts, the durability of the commit point, the search
        path. A failure the client's statements caused (they made the transaction read only, …) is theirs."""
        conn = gx.conn
        assert conn is not None
        try:
            with conn.pipeline():
                for statement in self._restore_sql:
                    conn.execute(statement)
                return take_changes(conn, gx.token)
        except psycopg.Error as exc:
            raise client_error(self.name, exc) from None

    def _count_committed(self, clients: int) -> None:
        with self.lock:
            self.stats["committed"] += clients
            self.stats["global_committed"] += 1
            if clients > 1:
                self.stats["batched"] += clients

    def _prepare_all(self, gx: Gx, participants: list[str]) -> None:
        if not participants:
            return  # every one prepared on the way (a chain: Propagate.prepare)
        calls = []
        message = Prepare(gx.gxid, self.name)  # one for all: signed once (`Transport.call_many`)
        for name in participants:
            url = self.directory.url_of(name)
            if url is None:
                raise GlobalTxnError("unreachable", f"{self.name}: no address known for participant {name}")
            calls.append((url, message))
        self.stats["prepare_sent"] += len(calls)
        results = self.transport.call_many(calls, self._remaining(gx))
        for name, result in zip(participants, results, strict=True):
            if result.ok and isinstance(result.message, Ack) and result.message.ok:
                if result.message.head:
                    gx.witness[name] = result.message.head
                continue
            detail = result.message.error if isinstance(result.message, Ack) else result.error
            kind = (result.message.error_kind if isinstance(result.message, Ack) else result.error_kind) or "internal"
            raise GlobalTxnError(kind, f"prepare failed at {name}: {detail}")

    def _finish_commit(self, gxid: str, participants: Iterable[str]) -> None:
        left = self._send_finish(gxid, "commit", participants)
        if left:
            log.warning("gxid %s: commit not yet confirmed by %s; recovery will finish it", gxid, ", ".join(left))
            with self.lock:
                self.pending_finish[gxid] = set(left)

    def _send_finish(self, gxid: str, decision: str, participants: Iterable[str]) -> list[str]:
        """Tell participants the decision; returns those that did not confirm."""
        names = [p for p in sorted(participants) if p != self.name]
        calls, asked = [], []
        message = Finish(gxid, self.name, decision)  # one for all: signed once (`Transport.call_many`)
        for name in names:
            url = self.directory.url_of(name)
            if url is not None:
                calls.append((url, message))
                asked.append(name)
        results = self.transport.call_many(calls, self.config.peer_timeout) if calls else []
        left = [n for n in names if n not in asked]
        for name, result in zip(asked, results, strict=True):
            if not (result.ok and isinstance(result.message, Ack) and result.message.ok):
                left.append(name)
        return left

    def _abort(self, gx: Gx, participants: set[str]) -> None:
        with gx.lock:
            if gx.phase == "committed":
                return
            try:
                self._release(gx, "ROLLBACK")
            except psycopg.Error as exc:
                log.warning("gxid %s: rollback failed: %s", gx.gxid, exc)
            gx.phase = "aborted"
        self.stats["aborted"] += 1
        told = participants | gx.reached
        if told:
            self._send_finish(gx.gxid, "abort", told)

    def _remaining(self, gx: Gx) -> float:
        return max(0.05, min(self.config.peer_timeout, gx.deadline - time.monotonic()))

    # ---- propagation (origin and participants) --------------------------------------------------------------
    def _fan_out(self, gx: Gx, deltas: dict[str, Delta], received: Received | None, alone: bool) -> FanOut:
        """Send each changed view's delta to the other members of its group, in parallel; gather the votes.

        `alone`: the global transaction waits on this peer's branch alone. Then a single message (sent to any
        peer but the origin) inherits it as `prepare`: its receiver's branch is the only one left, and once it has
        answered nothing can reach that receiver again. Several messages (siblings may reach each other) inherit it
        only when every receiver is a leaf (`_all_leaves`): none of them can forward anything, so none is reached
        again."""
        sends: list[tuple[str, str, str, Delta]] = []  # (member, its address, view, the delta it gets)
        recipients: dict[str, list[str]] = {}  # view -> the members it goes to (each may get the delta or less)
        timeout = self._remaining(gx)
        if received is not None:
            # a forwarded call must give up before its caller does, so the caller hears who really timed out
            timeout = max(0.05, timeout * 0.8)
        for view, delta in deltas.items():
            self._check_members_known(view)
            members = recipients[view] = [m for m in self.directory.members(view) if m != self.name]
            echo_free: Delta | None = None  # the delta without what the sender sent: the same for all who had it
            for member in members:
                out = delta
                if received is not None and view == received.delta.view and received.has(member):
                    if echo_free is None:
                        echo_free = without_echo(delta, received.delta)
                    out = echo_free
                if member == gx.origin and view in gx.origin_keys:
                    out = _without_keys(out, self.ptype.view(view).key, gx.origin_keys[view])
                if out.is_empty():
                    continue
                url = self.directory.url_of(member)
                if url is None:
                    return FanOut(False, set(), f"{self.name}: no address known for {member}", "unreachable")
                sends.append((member, url, view, out))
        if not sends:
            return FanOut(True, {self.name})
        prepare = alone and all(s[0] != gx.origin for s in sends) and (len(sends) == 1 or self._all_leaves(deltas))
        # one message per delta: sent to several members, it is signed and encoded once (`Transport.call_many`)
        messages: dict[int, Propagate] = {}
        for _, _, view, out in sends:
            if id(out) not in messages:
                messages[id(out)] = Propagate(
                    gx.gxid,
                    gx.origin,
                    self.name,
                    view,
                    out.insertions,
                    out.deletions,
                    max(1, int(timeout * 1000)),
                    origin_keys=gx.origin_keys,
                    recipients=recipients[view],
                    prepare=prepare,
                    origin_head=gx.origin_head,
                )
        self.stats["propagate_sent"] += len(sends)
        results = self.transport.call_many([(url, messages[id(out)]) for _, url, _, out in sends], timeout)
        return self._gather(gx, [s[0] for s in sends], results)

    def _all_leaves(self, deltas: dict[str, Delta]) -> bool:
        """Whether every other member of every view sent on shares that view and nothing else (the catalogs
        discovery learned): a star of one view, or a tree node whose neighbours are all leaves. Such a member
        forwards nothing (its only view's other members had the delta from this peer), and only a member of its
        view could reach it again: this peer, whose branch is the only one left (`alone`), or a sibling that forwards
        nothing. A stale catalog (a member restarted with more views) can only make a second arrival find the
        receiver prepared; it votes no and the transaction aborts, never commits half."""
        members = {view: self.directory.members(view) for view in deltas}
        with self.directory.lock:
            for view, names in members.items():
                for member in names:
                    peer = self.directory.peers.get(member)
                    if member != self.name and (peer is None or set(peer.catalog) != {view}):
                        return False
        return True

    def _gather(self, gx: Gx, members: list[str], results: list[CallResult]) -> FanOut:
        reached = {self.name}
        prepared: set[str] = set()
        heads: dict[str, dict[str, Any]] = {}
        errors: list[tuple[str, str]] = []
        for member, result in zip(members, results, strict=True):
            reply = result.message if isinstance(result.message, PropagateReply) else None
            if reply is not None:
                reached.update(reply.reached)
            reached.add(member)  # it may hold an open transaction even when it failed
            if reply is not None and reply.vote == "yes" and result.ok:
                prepared.update(reply.prepared)
                heads.update(reply.heads)
                continue
            if reply is not None and reply.error:
                errors.append((reply.error_kind or "internal", reply.error))
            else:
                errors.append((result.error_kind or "internal", f"{member}: {result.error}"))
        gx.reached.update(reached)
        if not errors:
            prepared &= reached
            return FanOut(True, reached, prepared=prepared, heads={p: h for p, h in heads.items() if p in prepared})
        # the most telling reason first: a conflict is retryable, so it wins over its consequences
        rank = ["conflict", "constraint", "bad_request", "refused", "unreachable", "timeout", "internal"]
        errors.sort(key=lambda e: rank.index(e[0]) if e[0] in rank else len(rank))
        return FanOut(False, reached, "; ".join(e[1] for e in errors), errors[0][0])

    def _check_members_known(self, view: str) -> None:
        """Atomicity over availability: every member peer type of the view must be known before we write it."""
        spec = self.ptype.view(view)
        present = {self.ptype.name}
        refused: list[str] = []
        with self.directory.lock:
            for peer in self.directory.peers.values():
                if view in peer.incompatible:
                    refused.append(peer.incompatible[view])
                elif view in peer.catalog and self.directory.entitled(peer.name, view):
                    present.add(peer.peer_type)
        missing = sorted(set(spec.members) - present)
        if missing:
            why = f" (incompatible: {'; '.join(refused)})" if refused else ""
            raise GlobalTxnError(
                "unreachable", f"{self.name}: no compatible peer of type {', '.join(missing)} for {view}{why}"
            )

    def on_propagate(self, msg: Propagate) -> PropagateReply:
        """Apply a delta received from another peer, forward what it changed, vote."""
        self.stats["propagate_received"] += 1
        first = self.replies.get(msg.message_id)
        if first is not None:
            return first
        reply = self._propagate(msg)
        with self.lock:
            self.replies[msg.message_id] = reply
            while len(self.replies) > REPLY_MEMORY:
                self.replies.pop(next(iter(self.replies)))
        return reply

    def _propagate(self, msg: Propagate) -> PropagateReply:
        def no(kind: str, error: str, reached: Iterable[str] = ()) -> PropagateReply:
            return PropagateReply(msg.gxid, self.name, "no", sorted({self.name, *reached}), error, kind)

        if msg.gxid in self.tombstones:
            return no("refused", f"{self.name}: global transaction {msg.gxid} was aborted here already")
        if msg.view not in self.directory.my_views:
            return no("bad_request", f"{self.name}: unknown view {msg.view!r}")
        if msg.sender not in self.directory.members(msg.view):
            return no("refused", f"{self.name}: {msg.sender!r} is not a member of {msg.view}'s group")
        if gxid_origin(msg.gxid) != msg.origin:
            return no("bad_request", f"{self.name}: gxid {msg.gxid!r} does not belong to origin {msg.origin!r}")
        timeout_s = min(msg.timeout_ms / 1000, self.config.txn_timeout)  # a sender cannot hold our locks longer
        if msg.origin == self.name:
            # a delta of our own global transaction come back round a cycle: only while `run` still runs it (it
            # created the gx); after it ended, or when this peer restarted since, nothing would ever end a gx made
            # here, and its connection would be held for good
            with self.lock:
                gx_or_none = self.gxs.get(msg.gxid)
            if gx_or_none is None:
                return no("refused", f"{self.name}: global transaction {msg.gxid} is not running here (any more)")
            gx = gx_or_none
        else:
            with self.lock:
                known = msg.gxid in self.gxs
            refusal = None if known else self._refusal(msg.gxid)
            if refusal is not None:
                log.warning("gxid %s: refused a propagate from %s: %s", msg.gxid, msg.sender, refusal)
                return no("refused", f"{self.name}: {refusal}")
            gx = self._get_or_create(msg.gxid, msg.origin, timeout_s)
        if not gx.origin_keys and msg.origin_keys:
            gx.origin_keys = msg.origin_keys
        if not gx.origin_head and msg.origin_head:
            gx.origin_head = msg.origin_head
        received = Delta(msg.view, msg.insertions, msg.deletions)
        try:
            with gx.lock:
                if gx.phase != "open":
                    return no("refused", f"{self.name}: global transaction {msg.gxid} is {gx.phase} here")
                fresh = gx.conn is None  # the first arrival here: the savepoint rides along the BEGIN
                self._open(gx, savepoint=SAVEPOINT if fresh else None)
                changes = self._apply_wait_die(gx, msg, savepoint_taken=fresh)
                assert gx.state is not None
                txlog.fold_into(gx.changes, changes)
                deltas = outgoing(gx.state, changes)
        except (ApplyError, psycopg.Error, GlobalTxnError) as exc:
            if isinstance(exc, ApplyError):
                kind = "conflict" if isinstance(exc, ApplyConflict) else "bad_request"
            else:
                kind = exc.kind if isinstance(exc, GlobalTxnError) else classify(exc)
            (log.warning if kind == "refused" else log.info)("gxid %s: %s voting no: %s", msg.gxid, self.name, exc)
            self._local_abort(gx)
            text = str(exc).strip()
            return no(kind, text if text.startswith(f"{self.name}:") else f"{self.name}: {text}")
        self.fault("participant_while_propagating")
        alone = msg.prepare and msg.origin != self.name
        with self.lock:
            gx.handling += 1
        try:
            fan = self._fan_out(gx, deltas, Received(msg.sender, received, frozenset(msg.recipients)), alone)
        finally:
            with self.lock:
                gx.handling -= 1
                # a chain that came back here while an earlier propagate of it still waits on its branch: that
                # one prepares when its branch is done, not this one
                outer = gx.handling > 0
        reached = sorted(fan.reached | {self.name})
        if not fan.ok:
            return PropagateReply(msg.gxid, self.name, "no", reached, fan.error, fan.error_kind)
        if not alone or outer:
            return PropagateReply(msg.gxid, self.name, "yes", reached, prepared=sorted(fan.prepared), heads=fan.heads)
        with gx.lock:
            ack = self._prepare_locked(gx)
        if not ack.ok:
            return PropagateReply(msg.gxid, self.name, "no", reached, ack.error, ack.error_kind)
        self.stats["prepared_on_the_way"] += 1
        self.fault("participant_after_prepare", "on_the_way")
        return PropagateReply(
            msg.gxid,
            self.name,
            "yes",
            reached,
            prepared=sorted(fan.prepared | {self.name}),
            heads={**fan.heads, self.name: ack.head},
        )

    def _refusal(self, gxid: str) -> str | None:
        """Why a propagate must not open global transaction `gxid` here (None: it may). Checked before the first
        arrival of a gxid opens its transaction; a gxid that committed or aborted here before is refused by
        `dejima.begin_global` in the round trip that opens it (`_open`), so this costs no round trip."""
        with self.lock:
            if gxid in self.tombstones:
                return f"global transaction {gxid} was aborted here already"
            if gxid in self.orphans:
                return f"global transaction {gxid} is prepared here already (by an earlier run of this peer)"
        started, _ = gxid_order(gxid)
        if started >= 2**63:
            return f"gxid {gxid!r} carries no start time"
        age = time.time() - started / 1e9
        if age > self.gxid_horizon:
            return (
                f"global transaction {gxid} began {age:.0f}s ago, more than the transaction timeout plus the replay"
                f" window ({self.gxid_horizon:g}s): its origin has given up on it"
            )
        if age < -self.config.replay_window:
            return f"global transaction {gxid} begins {-age:.0f}s from now, beyond the replay window"
        return None

    def _apply_wait_die(self, gx: Gx, msg: Propagate, savepoint_taken: bool) -> list[RowChange]:
        """Apply the delta and take what it changed here; a locked row is waited for in slices unless an older
        global transaction open here holds it (wait-die: `_older_holder`), or, its holder unknown, any older one is
        open here; else the apply dies (conflict). While an older one is open here, the rows are looked at before
        the apply: one that holds a row gx needs makes gx die at once, instead of after a slice of waiting with its
        own rows locked everywhere it went (and the older one, itself waiting for those rows, held up as long)."""
        assert gx.conn is not None and gx.state is not None
        conn, state = gx.conn, gx.state
        at_origin = gx.origin == self.name  # a delta come back round a cycle: the origin's own lock_timeout is long
        # a write this one follows may still be prepared here (its origin answered its client once it decided, and
        # COMMIT PREPARED is on its way); a deletion that finds no row waits for those (ApplyUnseen)
        unseen = self.prepared_here()
        state.unseen_possible = bool(unseen)
        if at_origin:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{APPLY_LOCK_WAIT_MS}ms")))
        raced = False
        try:
            if self._older_open(gx) and self._older_holder(gx, msg):
                raise self._wait_die_conflict(msg, waited=False)
            while True:
                try:
                    # undoes itself when it fails, keeping its savepoint: a retry may count on it still
                    return apply_and_take(
                        state, msg.view, msg.insertions, msg.deletions, savepoint_taken=savepoint_taken
                    )
                except ApplyUnseen as exc:
                    self.stats["unseen_waits"] += 1
                    state.unseen_possible = False
                    if not self.settle(min(READ_SETTLE_S, max(0.0, gx.deadline - time.monotonic())), gxids=unseen):
                        raise GlobalTxnError(
                            "busy", f"{self.name}: {exc}, and a transaction prepared here that may hold it is not done"
                        ) from None
                except pgerr.UniqueViolation:
                    # A row this apply did not see, inserted by a transaction prepared here whose COMMIT PREPARED
                    # landed while this insert waited for it (with DEJIMA_COMMIT_WAIT=decision its origin may
                    # already have sent the next write): once more, now that the row is visible. A true duplicate
                    # fails again.
                    if raced:
                        raise
                    raced = True
                except pgerr.LockNotAvailable:
                    with self.lock:
                        self.stats["apply_lock_waits"] += 1
                    older = self._older_holder(gx, msg)
                    if older or (older is None and self._older_open(gx)):
                        raise self._wait_die_conflict(msg, waited=True) from None
                    if time.monotonic() > gx.deadline:
                        raise GlobalTxnError("timeout", f"{self.name}: {msg.view} rows stayed locked") from None
        finally:
            state.unseen_possible = False
            if at_origin:
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{self.config.lock_timeout_ms}ms"))
                )

    # ---- tamper evidence: the txlog entry is staged in the committing transaction (commit point, _prepare_locked)
    def run_sealer(self, stopped: threading.Event) -> None:
        """The sealer loop (a daemon thread): chain the committed staged txlog entries whenever a commit here wakes
        it, and at least every recovery interval (entries left staged by a crash, or committed by recovery)."""
        while not stopped.is_set():
            if self.seal_wanted.wait(self.config.recovery_interval):
                stopped.wait(SEAL_GATHER_S)  # the commits of the next moments join this batch
            self.seal_wanted.clear()
            try:
                with self.pool.connection(timeout=self.config.peer_timeout) as conn:
                    self.seal(conn)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything; the next wake retries
                log.warning("sealing the txlog failed: %s", exc)

    def seal(self, conn: psycopg.Connection[Any], lock_timeout_ms: int | None = None) -> txlog.Head:
        """Chain every committed staged txlog entry (`txlog.seal_all`, on an idle connection of the peer's login) and
        remember the head it leaves: what this peer tells its partners of its log from now on."""
        _, head = txlog.seal_all(conn, lock_timeout_ms)
        self.learn_head(head)
        return head

    def learn_head(self, head: txlog.Head) -> None:
        """This peer's chain has `head` now (the highest seq seen wins: a chain only grows)."""
        with self.lock:
            if head.seq >= self.head.seq:
                self.head = head

    def _local_abort(self, gx: Gx) -> None:
        with gx.lock:
            if gx.phase in ("open",):
                # a participant records the gxid as aborted here in the same round trip: never opened again
                # (`_refusal`); the origin's own transaction (a delta come back round a cycle) runs on the client login
                ending = "ROLLBACK" if gx.origin == self.name else sql.SQL(ABORTED_SQL).format(sql.Literal(gx.gxid))
                try:
                    self._release(gx, ending)
                except psycopg.Error as exc:
                    log.warning("gxid %s: rollback failed: %s", gx.gxid, exc)
                gx.phase = "aborted"
        if gx.origin != self.name:
            self._forget(gx, aborted=True)

    # ---- participant: prepare and finish --------------------------------------------------------------------
    def on_prepare(self, msg: Prepare) -> Ack:
        gx = self.gxs.get(msg.gxid)
        if gx is None:
            if self._prepared_here(msg.gxid):
                # prepared by an earlier run: what it staged is not known here (nothing to tell the origin)
                return Ack(msg.gxid, self.name, True)
            return Ack(msg.gxid, self.name, False, f"{self.name}: unknown global transaction {msg.gxid}", "refused")
        with gx.lock:
            if gx.phase == "prepared":
                return Ack(msg.gxid, self.name, True, head=gx.head)
            ack = self._prepare_locked(gx)
        if ack.ok:
            self.fault("participant_after_prepare", "on_prepare")
        return ack

    def _prepare_locked(self, gx: Gx) -> Ack:
        """Stage the txlog entry and PREPARE TRANSACTION gx here (caller holds gx.lock); a failure rolls back."""
        conn = gx.conn
        if gx.phase != "open" or conn is None:
            return Ack(gx.gxid, self.name, False, f"{self.name}: {gx.gxid} is {gx.phase}", "refused")
        prepare = sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(self.gid(gx.gxid)))
        views = txlog.summary(gx.changes.values()) or None
        # the origin's log head as its propagate told it, recorded in this peer's entry (truncation evidence)
        origin_head = txlog.head_of(gx.origin_head)
        witness = {gx.origin: origin_head.to_json()} if origin_head is not None else None
        entry = txlog.entry_digest(gx.gxid, gx.origin, "participant", views, witness) if views else ""
        with self.lock:
            mine = self.head
        try:
            with conn.pipeline():  # one round trip; a failed stage skips the PREPARE
                # the txlog entry, when it changed this peer's data (the sealer chains it once committed), the gxid
                # as finished here once committed, and the end of the transaction's registration
                end_global(conn, gx.token, gx.origin, "participant", views, witness)
                conn.execute(prepare)
        except (GlobalTxnError, psycopg.Error) as exc:
            kind = exc.kind if isinstance(exc, GlobalTxnError) else classify(exc)
            try:  # a failed PREPARE ended the transaction already; a failed stage left it aborted
                self._release(gx, "ROLLBACK" if conn.info.transaction_status != TransactionStatus.IDLE else None)
            except psycopg.Error as rollback_exc:
                log.warning("gxid %s: rollback failed: %s", gx.gxid, rollback_exc)
            gx.phase = "aborted"
            text = str(exc).strip()
            text = text if text.startswith(f"{self.name}:") else f"{self.name}: prepare failed: {text}"
            return Ack(gx.gxid, self.name, False, text, kind)
        self._release(gx, None)
        gx.phase = "prepared"
        # what the origin records of this peer's log: its head now, whether it staged an entry, and that entry
        gx.head = {"seq": mine.seq, "hash": mine.hash, "logged": views is not None, "entry": entry}
        return Ack(gx.gxid, self.name, True, head=gx.head)

    def on_finish(self, msg: Finish) -> Ack:
        gx = self.gxs.get(msg.gxid)
        if msg.decision == "abort":
            if gx is not None:
                self._local_abort(gx)
            with self.lock:
                self.tombstones[msg.gxid] = time.monotonic() + TOMBSTONE_SECONDS
            done = self._finish_prepared(msg.gxid, "ROLLBACK PREPARED")
        else:
            if gx is not None and gx.phase == "open":  # never prepared here: committing it would lose it
                return Ack(msg.gxid, self.name, False, f"{self.name}: {msg.gxid} was never prepared here", "refused")
            self.fault("participant_before_commit")
            done = self._finish_prepared(msg.gxid, "COMMIT PREPARED")
        if done == "absent":  # nothing prepared here: a repeated finish, unless it contradicts what happened here
            outcome = self._finished_as(msg.gxid)
            if outcome == ("aborted" if msg.decision == "commit" else "committed"):
                log.warning("gxid %s: refused %s from %s: it %s here", msg.gxid, msg.decision, msg.origin, outcome)
                return Ack(msg.gxid, self.name, False, f"{self.name}: {msg.gxid} {outcome} here already", "refused")
        ok = done != "failed"
        if ok:
            self._finished_here(msg.gxid)
        if gx is not None and ok:
            gx.phase = "committed" if msg.decision == "commit" else "aborted"
            self._forget(gx, aborted=msg.decision == "abort")
        if not ok:
            return Ack(msg.gxid, self.name, False, f"{self.name}: could not {msg.decision} {msg.gxid}", "internal")
        return Ack(msg.gxid, self.name, True)

    def _prepared_here(self, gxid: str) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (self.gid(gxid),)).fetchone()
        return row is not None

    def _finish_prepared(self, gxid: str, statement: str) -> str:
        """COMMIT/ROLLBACK PREPARED if it is still prepared here; idempotent. "done", "absent" (not prepared here
        (any more): finished already, or never prepared) or "failed". A rollback records the gxid as aborted here
        (never opened again: `_refusal`)."""
        gid = self.gid(gxid)
        try:
            with self.pool.connection() as conn:
                conn.execute(sql.SQL("{} {}").format(sql.SQL(statement), sql.Literal(gid)))
                if statement == "ROLLBACK PREPARED":
                    try:
                        conn.execute(sql.SQL(RECORD_ABORTED_SQL).format(sql.Literal(gxid)))
                    except psycopg.Error as exc:  # rolled back all the same; the in-memory tombstone remains
                        log.warning("gxid %s: could not record it as aborted: %s", gxid, exc)
        except psycopg.errors.UndefinedObject:
            return "absent"
        except psycopg.Error as exc:
            log.warning("gxid %s: %s failed: %s", gxid, statement, exc)
            return "failed"
        log.info("gxid %s: %s", gxid, statement.lower())
        if statement == "COMMIT PREPARED":
            self.seal_wanted.set()
        return "done"

    def _finished_as(self, gxid: str) -> str | None:
        """How gxid finished here as a participant ("committed", "aborted"), when it is recorded (dejima.finished)."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT outcome FROM dejima.finished WHERE gxid = %s", (gxid,)).fetchone()
        return str(row[0]) if row else None

    # ---- decisions and recovery -----------------------------------------------------------------------------
    def on_decision_query(self, msg: DecisionQuery) -> DecisionReply:
        gx = self.gxs.get(msg.gxid)
        if gx is not None and gx.phase == "open":
            return DecisionReply(msg.gxid, "pending")
        with self.pool.connection() as conn:
            row = conn.execute("SELECT 1 FROM dejima.decisions WHERE gxid = %s", (msg.gxid,)).fetchone()
        if row is not None:
            return DecisionReply(msg.gxid, "commit")
        gx = self.gxs.get(msg.gxid)
        if gx is not None and gx.phase == "open":
            return DecisionReply(msg.gxid, "pending")
        return DecisionReply(msg.gxid, "abort")  # presumed abort

    def recover_once(self, min_age_s: float | None = None) -> dict[str, int]:
        """Finish prepared transactions left without their decision; retry unconfirmed commits as origin."""
        counts = {"committed": 0, "aborted": 0, "waiting": 0}
        # First, and without a pool connection: open transactions whose origin went silent each hold one, so
        # when they fill the pool, rolling them back is what frees it (the chaos run found a pool that stayed full
        # while the janitor waited behind the query below)
        self._janitor()
        min_age = self.config.txn_timeout if min_age_s is None else min_age_s
        due = []
        for gxid, age in self._prepared_rows():
            with self.lock:
                gx = self.gxs.get(gxid)
                if gx is None:
                    self.orphans.add(gxid)
            if gx is None or age >= min_age:  # else its origin is finishing it right now
                due.append(gxid)
        for done in self._resolve(due).values():
            counts[done] += 1
        self._prune_finished()
        with self.lock:
            pending = dict(self.pending_finish)
        for gxid, names in pending.items():
            left = self._send_finish(gxid, "commit", names)
            with self.lock:
                if left:
                    self.pending_finish[gxid] = set(left)
                else:
                    self.pending_finish.pop(gxid, None)
        return counts

    def _resolve(self, gxids: Iterable[str]) -> dict[str, str]:
        """Finish each of `gxids`, prepared here, as its origin decided: "committed", "aborted", or "waiting" (no
        decision yet, or the origin did not answer). Safe at any moment: an origin answers abort only for a gxid it
        neither runs nor decided, and a COMMIT PREPARED its own finish sends too finds nothing left to do."""
        done: dict[str, str] = {}
        for gxid, outcome in self._ask_origins(gxids).items():
            if outcome == "commit" and self._finish_prepared(gxid, "COMMIT PREPARED") != "failed":
                done[gxid] = "committed"
            elif outcome == "abort" and self._finish_prepared(gxid, "ROLLBACK PREPARED") != "failed":
                done[gxid] = "aborted"
            else:
                done[gxid] = "waiting"
                continue
            self._finished_here(gxid)
            gx = self.gxs.get(gxid)
            if gx is not None:
                gx.phase = done[gxid]
                self._forget(gx, aborted=done[gxid] == "aborted")
        return done

    def _ask_origins(self, gxids: Iterable[str]) -> dict[str, str]:
        """The decision of each gxid's origin ("commit", "abort" or "pending": none yet, or no answer), asked in
        parallel: one unreachable origin costs one timeout, not one per transaction."""
        outcomes: dict[str, str] = {}
        calls, asked = [], []
        for gxid in gxids:
            origin = gxid_origin(gxid)
            url = None if origin == self.name else self.directory.url_of(origin)
            if origin == self.name:
                outcomes[gxid] = self.on_decision_query(DecisionQuery(gxid, self.name)).outcome
            elif url is None:
                outcomes[gxid] = "pending"
            else:
                calls.append((url, DecisionQuery(gxid, self.name)))
                asked.append(gxid)
        results = self.transport.call_many(calls, self.config.peer_timeout) if calls else []
        for gxid, result in zip(asked, results, strict=True):
            reply = result.message
            outcomes[gxid] = reply.outcome if result.ok and isinstance(reply, DecisionReply) else "pending"
        return outcomes

    def _prune_finished(self) -> None:
        """Forget the gxids finished here long enough ago that their start time alone refuses them (`_refusal`):
        they began before they finished here, so once that is longer ago than the transaction timeout plus twice the
        replay window (one for the skew of their origin's clock, one of this peer's), they are past the horizon.
        At most once a minute, one statement."""
        now = time.monotonic()
        if now - self._pruned < 60.0:
            return
        self._pruned = now
        keep = self.gxid_horizon + self.config.replay_window + 1.0
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM dejima.finished WHERE at < now() - make_interval(secs => %s)", (keep,))

    def _janitor(self) -> None:
        """Roll back open participant transactions whose deadline passed (their origin has given up)."""
        now = time.monotonic()
        with self.lock:
            # a branch's deadline may pass while its origin still waits for a slower branch: allow a whole
            # global transaction's time before deciding that the origin went silent
            grace = self.config.txn_timeout
            stale = [
                g for g in self.gxs.values() if g.phase == "open" and g.origin != self.name and g.deadline + grace < now
            ]
            self.tombstones = {k: t for k, t in self.tombstones.items() if t > now}
        for gx in stale:
            log.warning("gxid %s: origin %s went silent; rolling back", gx.gxid, gx.origin)
            self._local_abort(gx)

    def run_recovery(self, stopped: threading.Event) -> None:
        """The recovery loop (a daemon thread): once at start for everything, then periodically."""
        first = True
        while not stopped.is_set():
            try:
                counts = self.recover_once(min_age_s=0.0 if first else None)
                if any(counts.values()):
                    log.info("recovery: %s", counts)
                first = False
            except Exception:  # the loop must survive anything; the cause is logged
                log.exception("recovery cycle failed")
            stopped.wait(self.config.recovery_interval)

    def prepared_transactions(self) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT gid, prepared::text FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
        return [{"gid": gid, "prepared": at} for gid, at in rows]


def origin_keys(ptype: PeerType, deltas: dict[str, Delta]) -> dict[str, list[list[Any]]]:
    """Per view, the identity keys (old and new) of the rows the origin changed; {} when there are too many."""
    out: dict[str, list[list[Any]]] = {}
    total = 0
    for view, delta in deltas.items():
        key = ptype.view(view).key
        keys = {jsonvalues.dumps([row.get(k) for k in key]) for row in [*delta.insertions, *delta.deletions]}
        keys |= {
            jsonvalues.dumps([row[WAS].get(k) for k in key])
            for row in delta.insertions
            if isinstance(row.get(WAS), dict)
        }
        total += len(keys)
        out[view] = [jsonvalues.loads(k) for k in sorted(keys)]
    return out if total <= ORIGIN_KEYS_LIMIT else {}


def _without_keys(delta: Delta, key: tuple[str, ...], keys: list[list[Any]]) -> Delta:
    """The delta without rows whose identity key (or old key) is among `keys`."""
    drop = {jsonvalues.dumps(k) for k in keys}

    def kept(row: dict[str, Any]) -> bool:
        was = row.get(WAS)
        old = jsonvalues.dumps([was.get(k) for k in key]) if isinstance(was, dict) else None
        return jsonvalues.dumps([row.get(k) for k in key]) not in drop and old not in drop

    return Delta(delta.view, [r for r in delta.insertions if kept(r)], [r for r in delta.deletions if kept(r)])


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
