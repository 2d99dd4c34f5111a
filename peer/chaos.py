"""`dejima chaos`: randomized concurrent global transactions under injected faults, checked against their history.

Starts its own PostgreSQL (a temporary folder; or the server at DEJIMA_DATABASE_URL, then without the database
restart fault) and its own network of the shipped example (government, bank, insurance), every peer behind its own
test-kit proxy (peer/testkit/proxy.py). A few client threads run global transactions at every peer through
/api/v1/exec, with timeouts, while the controller injects one fault per trial:

- `kill:<step>`: the peer is restarted with DEJIMA_FAULT_POINT=<step>, one global transaction is run (the client
  threads are paused), the peer crashes at that step of the commit protocol (SIGKILL of itself), and is restarted
  without the fault point; <step> is each of FAULT_POINTS, the origin or a participant;
- `kill`: SIGKILL of a random peer at a random moment, restarted shortly after;
- `stop`: SIGSTOP of a peer, SIGCONT after a second or two;
- `cut`: the link between two peers is cut in both directions at their proxies, then restored;
- `db_restart`: the PostgreSQL server is restarted (PgServer.restart).

Every row a client writes has a unique, traceable identity key (first name `cx<client>`, last name `k<n>`), and one
client owns each key (it alone inserts, updates and deletes it), so the history of every key is sequential. Each
request is recorded: gxid (when answered), peer, statements, HTTP status, outcome — `committed` (200), `failed`
(an answer that is not "committed": 4xx, 503, 504; the write must have no effect), or `unknown` (timeout,
connection error, 500: it may have committed or not).

At the end every fault is undone, the client threads stop, every peer is restarted cleanly, and recovery gets 15 s
after the last restart (a global transaction still open or prepared then is stuck); once the network is quiet (at
most 60 s more) it checks: every dejima view identical across its group and every hash chain valid
(`check_network`); every key's state at every peer is one the history allows (an acknowledged write missing is a
lost ack, a failed write visible is a phantom write); nothing left stuck. `settle_seconds`: how long
the network took to become quiet after the clients stopped.

Output: a JSON report (`--json`) or a summary; exit 1 when any of divergent_views, lost_acks, phantom_writes,
stuck_prepared, broken_chains is non-zero, 2 when the run itself could not be done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import requests
from psycopg import sql

from peer.network import NetworkError
from peer.pgserver import PgServer, PgServerError
from peer.testkit.proxy import ProxiedCluster

FAULT_POINTS = (
    "participant_while_propagating",
    "origin_before_prepare",
    "origin_before_decision",
    "origin_after_decision",
    "participant_after_prepare",
    "participant_before_commit",
)
FAULT_KINDS = (*(f"kill:{p}" for p in FAULT_POINTS), "kill", "stop", "cut", "db_restart")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
PEERS = tuple(TABLES)
CLIENTS = 3
CLIENT_TIMEOUT = 8.0  # seconds per request; longer than a global transaction (DEJIMA_TXN_TIMEOUT)
PEER_ENV = {"DEJIMA_TXN_TIMEOUT": "3", "DEJIMA_PEER_TIMEOUT": "1.5", "DEJIMA_LOG_LEVEL": "info"}
RECOVERY_GRACE = 15.0  # seconds after the last restart by which no global transaction may be left open or prepared
SETTLE_LIMIT = 60.0  # seconds past the grace the verification still waits for a quiet network before it reads
FAILED_STATUSES = frozenset({400, 403, 404, 409, 422, 503, 504})
ABSENT = None  # the state of a key with no row

State = str | None  # a key's state: None (no row) or its address


class ChaosError(Exception):
    """The chaos run could not be carried out (not a finding about the system under test)."""


# ---- history ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One change of one key: insert (address), update (address) or delete."""

    kind: str
    key: tuple[str, str]
    address: str | None = None

    def sql(self, table: str) -> str:
        first, last = self.key
        where = sql.SQL("first_name = {} AND last_name = {}").format(sql.Literal(first), sql.Literal(last))
        if self.kind == "insert":
            statement = sql.SQL("INSERT INTO {} (first_name, last_name, address) VALUES ({}, {}, {})").format(
                sql.Identifier(table), sql.Literal(first), sql.Literal(last), sql.Literal(self.address)
            )
        elif self.kind == "update":
            statement = sql.SQL("UPDATE {} SET address = {} WHERE {}").format(
                sql.Identifier(table), sql.Literal(self.address), where
            )
        else:
            statement = sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), where)
        return statement.as_string(None)

    def apply(self, state: State) -> State:
        if self.kind == "insert":
            return self.address if state is ABSENT else state
        if self.kind == "update":
            return ABSENT if state is ABSENT else self.address
        return ABSENT


@dataclass
class Request:
    client: str
    peer: str
    ops: list[Op]
    statements: list[str]
    status: int | None = None
    gxid: str | None = None
    outcome: str = "unknown"  # committed | failed | unknown
    error: str = ""

    def record(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "gxid": self.gxid,
            "peer": self.peer,
            "statements": self.statements,
            "acknowledged": self.outcome == "committed",
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
        }


@dataclass
class History:
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def counts(self) -> dict[str, int]:
        with self.lock:
            outcomes = [r.outcome for r in self.requests]
        return {k: outcomes.count(k) for k in ("committed", "failed", "unknown")}


def possible_states(ops: list[tuple[Op, str]], lost: bool = False, phantom: bool = False) -> set[State]:
    """The states a key may end in after its ops (in the order they were issued, with their outcomes).

    A committed op applies at its place; a failed op never applies. An op with an unknown outcome may never apply,
    or apply at its place *or later*: a global transaction in doubt (prepared at a participant whose origin
    crashed after its decision) commits there only when recovery runs, after writes the client issued later.
    `lost`: an acknowledged op may be missing; `phantom`: a failed op may have taken effect (to tell which rule a
    wrong state breaks)."""
    states: set[tuple[State, frozenset[int]]] = {(ABSENT, frozenset())}
    for n, (op, outcome) in enumerate(ops):
        states = _apply_pending(states, ops)
        if outcome == "committed" and not lost:
            states = {(op.apply(s), pending) for s, pending in states}
        elif outcome == "committed" or (outcome == "failed" and phantom):
            states |= {(op.apply(s), pending) for s, pending in states}
        elif outcome == "unknown":
            states |= {(s, pending | {n}) for s, pending in states}
    return {s for s, _ in _apply_pending(states, ops)}


def _apply_pending(
    states: set[tuple[State, frozenset[int]]], ops: list[tuple[Op, str]]
) -> set[tuple[State, frozenset[int]]]:
    """Close `states` under "one pending (unknown) op takes effect now"."""
    todo = list(states)
    seen = set(states)
    while todo:
        state, pending = todo.pop()
        for n in pending:
            nxt = (ops[n][0].apply(state), pending - {n})
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ---- clients ------------------------------------------------------------------------------------------------------
class Client(threading.Thread):
    """Runs random global transactions (1-2 changes of keys it owns) at random peers until stopped."""

    def __init__(
        self,
        name: str,
        urls: dict[str, str],
        history: History,
        rng: random.Random,
        gate: Gate,
        auth: dict[str, dict[str, str]],
        verify: str | bool = True,
    ) -> None:
        """`verify`: what the peers' certificates are verified against (the kit's CA: LocalNetwork.verify)."""
        super().__init__(name=f"chaos-{name}", daemon=True)
        self.verify = verify
        self.client = name
        self.urls = urls
        self.auth = auth  # peer -> the headers with its API token
        self.history = history
        self.rng = rng
        self.gate = gate
        self.stopped = threading.Event()
        self.keys: list[tuple[str, str]] = []  # keys this client created (may exist or not)
        self.serial = 0
        self.session = self._session()

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.verify = self.verify
        return session

    def new_key(self) -> tuple[str, str]:
        self.serial += 1
        return (f"cx{self.client}", f"k{self.serial}")

    def value(self) -> str:
        self.serial += 1
        return f"a{self.client}.{self.serial}"

    def pick_ops(self) -> list[Op]:
        ops: list[Op] = []
        used: set[tuple[str, str]] = set()
        for _ in range(self.rng.choice((1, 1, 2))):
            choice = self.rng.random()
            candidates = [k for k in self.keys if k not in used]
            if choice < 0.45 or not candidates:
                key = self.new_key()
                self.keys.append(key)
                ops.append(Op("insert", key, self.value()))
            elif choice < 0.8:
                key = self.rng.choice(candidates)
                ops.append(Op("update", key, self.value()))
            else:
                key = self.rng.choice(candidates)
                ops.append(Op("delete", key))
            used.add(key)
        return ops

    def run_once(self, peer: str | None = None) -> Request:
        peer = peer or self.rng.choice(PEERS)
        ops = self.pick_ops()
        statements = [op.sql(TABLES[peer]) for op in ops]
        req = Request(self.client, peer, ops, statements)
        try:
            resp = self.session.post(
                self.urls[peer] + "/api/v1/exec",
                json={"sql": statements},
                headers=self.auth[peer],
                timeout=CLIENT_TIMEOUT,
            )
            req.status = resp.status_code
            try:
                body = resp.json()
            except ValueError:
                body = {"error": resp.text[:200]}
            req.gxid = body.get("gxid")
            req.error = str(body.get("error", ""))[:300]
            if resp.status_code == 200 and body.get("status") == "committed":
                req.outcome = "committed"
            elif resp.status_code in FAILED_STATUSES:
                req.outcome = "failed"
        except requests.RequestException as exc:
            req.error = f"{type(exc).__name__}: {exc}"[:300]
            self.session.close()
            self.session = self._session()
        self.history.add(req)
        return req

    def run(self) -> None:
        while not self.stopped.is_set():
            with self.gate.entered() as ok:
                if not ok:
                    continue
                self.run_once()
            self.stopped.wait(self.rng.uniform(0.0, 0.05))


class Gate:
    """Lets client requests through while open; `close()` waits until no request is in flight."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._inside = 0

    @contextlib.contextmanager
    def entered(self) -> Iterator[bool]:
        with self._cond:
            if not self._open:
                self._cond.wait(0.1)
                ok = False
            else:
                self._inside += 1
                ok = True
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._inside -= 1
                    self._cond.notify_all()

    def close(self, timeout: float = CLIENT_TIMEOUT + 5) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._open = False
            while self._inside and time.monotonic() < deadline:
                self._cond.wait(0.1)

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


# ---- the run ------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def own_server(state_dir: Path) -> Iterator[PgServer]:
    """The server at DEJIMA_DATABASE_URL, or our own one in `state_dir` on a free port (always stopped)."""
    if os.environ.get("DEJIMA_DATABASE_URL", "").strip():
        server = PgServer.from_env(state_dir)
        server.start()
        yield server
        return
    server = dataclasses.replace(PgServer.from_env(state_dir / "pg"), port=None)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Chaos:
    def __init__(self, server: PgServer, state_dir: Path, rng: random.Random) -> None:
        self.server = server
        self.rng = rng
        self.cluster = ProxiedCluster(server, state_dir / "net", env=PEER_ENV)
        self.history = History()
        self.gate = Gate()
        self.clients: list[Client] = []
        self.faults: dict[str, int] = dict.fromkeys(self.kinds(), 0)
        self.missed: dict[str, int] = {}  # step faults whose fault point was not reached
        self.stopped_peers: set[str] = set()
        self.last_restart = time.monotonic()
        self.controller: Client | None = None
        self.settle_seconds = 0.0  # from the end of the clients to a quiet network (or to the limit)
        self.left_open: list[str] = []  # what was still open or prepared at the end of the grace

    def kinds(self) -> tuple[str, ...]:
        if self.server.kind == "external":
            return tuple(k for k in FAULT_KINDS if k != "db_restart")
        return FAULT_KINDS

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.cluster.start(timeout=60)
        urls = self.cluster.urls
        auth = {name: self.cluster.net.auth_headers(name) for name in urls}
        ca = self.cluster.net.verify
        for n in range(CLIENTS):
            rng = random.Random(self.rng.random())  # noqa: S311
            self.clients.append(Client(str(n), urls, self.history, rng, self.gate, auth, ca))
        rng = random.Random(self.rng.random())  # noqa: S311
        self.controller = Client("c", urls, self.history, rng, self.gate, auth, ca)
        for client in self.clients:
            client.start()

    def close(self) -> None:
        for client in self.clients:
            client.stopped.set()
        self.gate.open()
        for name in list(self.stopped_peers):
            self._cont(name)
        for client in self.clients:
            client.join(timeout=CLIENT_TIMEOUT + 2)
        self.cluster.close()

    # ---- faults ---------------------------------------------------------------------------------------------
    def restart(self, name: str, fault_point: str | None = None) -> None:
        if fault_point:
            self.cluster.restart(name, env={"DEJIMA_FAULT_POINT": fault_point}, timeout=30)
        else:
            self.cluster.restart(name, drop=("DEJIMA_FAULT_POINT",), timeout=30)
        self.last_restart = time.monotonic()
        self.wait_groups()

    def wait_groups(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, NetworkError, KeyError):
                if self.cluster.net.groups_complete():
                    return
            time.sleep(0.1)
        raise ChaosError(f"dejima groups did not form again within {timeout}s\n{self.cluster.logs(40)}")

    def _signal(self, name: str, sig: int) -> None:
        pid = self.cluster.net.specs[name].pid
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def _cont(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)
        self.stopped_peers.discard(name)

    def fault_reached(self, name: str, step: str, before: int, timeout: float = 12.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._reached_count(name, step) > before:
                return True
            time.sleep(0.05)
        return False

    def _reached_count(self, name: str, step: str) -> int:
        path = self.cluster.net.log_path(name)
        if not path.exists():
            return 0
        return path.read_text(errors="replace").count(f"fault point {step} reached")

    def step_fault(self, step: str) -> bool:
        """Crash one peer at `step` of the commit protocol during exactly one global transaction."""
        victim = self.rng.choice(PEERS)
        origin = victim if step.startswith("origin") else self.rng.choice([p for p in PEERS if p != victim])
        self.gate.close()
        try:
            before = self._reached_count(victim, step)
            reached = False
            try:
                self.restart(victim, fault_point=step)
            except (NetworkError, ChaosError):
                # a message left over from earlier faults (an origin's unconfirmed finish, recovery's question)
                # may reach the step first: the peer crashed there all the same
                if self._reached_count(victim, step) <= before:
                    raise
                reached = True
                self.last_restart = time.monotonic()
            assert self.controller is not None
            for _ in range(0 if reached else 5):  # a transaction may fail before the step (a conflict): again
                self.controller.run_once(peer=origin)
                if self.fault_reached(victim, step, before, timeout=CLIENT_TIMEOUT + 4):
                    reached = True
                    break
            if not reached:
                self.missed[step] = self.missed.get(step, 0) + 1
            self.restart(victim)
        finally:
            self.gate.open()
        return reached

    def inject(self, kind: str) -> None:
        if kind.startswith("kill:"):
            if not self.step_fault(kind.split(":", 1)[1]):
                return  # not counted: the peer did not crash at that step (the miss is in the details)
        elif kind == "kill":
            victim = self.rng.choice(PEERS)
            time.sleep(self.rng.uniform(0.1, 0.6))
            self.cluster.net.kill(victim)
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.restart(victim)
        elif kind == "stop":
            victim = self.rng.choice(PEERS)
            self.stopped_peers.add(victim)
            self._signal(victim, signal.SIGSTOP)
            time.sleep(self.rng.uniform(0.5, 2.0))
            self._cont(victim)
        elif kind == "cut":
            a, b = self.rng.sample(PEERS, 2)
            self.cluster.proxies[b].cut_from(a)
            self.cluster.proxies[a].cut_from(b)
            try:
                time.sleep(self.rng.uniform(0.5, 2.0))
            finally:
                self.cluster.proxies[a].restore()
                self.cluster.proxies[b].restore()
        elif kind == "db_restart":
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.server.restart()
            self.last_restart = time.monotonic()
            for name in PEERS:
                self.cluster.net.wait_healthy(name, timeout=30)
        else:
            raise ChaosError(f"unknown fault kind {kind!r}")
        self.faults[kind] += 1

    def schedule(self, trials: int | None) -> Iterator[str]:
        """Every kind once (in a random order) per round, so each occurs when trials allow."""
        n = 0
        while trials is None or n < trials:
            kinds = list(self.kinds())
            self.rng.shuffle(kinds)
            for kind in kinds:
                if trials is not None and n >= trials:
                    return
                n += 1
                yield kind

    # ---- the end --------------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Stop the clients, undo every fault, restart every peer cleanly; wait until recovery had its chance."""
        for client in self.clients:
            client.stopped.set()
        self.gate.open()
        for name in list(self.stopped_peers):
            self._cont(name)
        for proxy in self.cluster.proxies.values():
            proxy.clear()
        for client in self.clients:
            client.join(timeout=CLIENT_TIMEOUT + 5)
        for name in PEERS:
            spec = self.cluster.net.specs[name]
            if "DEJIMA_FAULT_POINT" in spec.env or not spec.pid:
                self.restart(name)
        for name in PEERS:
            self.cluster.net.wait_healthy(name, timeout=30)
        self.wait_groups()
        # Recovery gets RECOVERY_GRACE seconds after the last restart (or after the clients stopped); what is still
        # open then is a finding (stuck_prepared). The views are compared only once the network is quiet (or
        # SETTLE_LIMIT later): a transaction still committing would show as a divergence that is not one.
        start = time.monotonic()
        deadline = max(self.last_restart, start) + RECOVERY_GRACE
        while time.monotonic() < deadline and not self.cluster.quiet():
            time.sleep(0.1)
        if not self.cluster.quiet():
            self.left_open = self.still_open()
            limit = time.monotonic() + SETTLE_LIMIT
            while time.monotonic() < limit and not self.cluster.quiet():
                time.sleep(0.2)
        self.settle_seconds = round(time.monotonic() - start, 3)

    def still_open(self) -> list[str]:
        """The prepared transactions (gid) and the peers with open global transactions ('peer: N open')."""
        try:
            opened = [f"{name}: {n} open" for name, n in self.cluster.open_transactions().items() if n]
        except (requests.RequestException, NetworkError) as exc:
            opened = [f"status unreadable: {exc}"]
        return [*self.cluster.prepared(), *opened]

    def read_states(self) -> dict[str, dict[tuple[str, str], list[State]]]:
        """peer -> key -> the addresses of its rows (more than one: a duplicate), read from the databases."""
        out: dict[str, dict[tuple[str, str], list[State]]] = {}
        for peer, table in TABLES.items():
            rows: dict[tuple[str, str], list[State]] = {}
            url = self.server.url(self.cluster.net.specs[peer].database)
            with psycopg.connect(url, autocommit=True) as conn:
                query = sql.SQL("SELECT first_name, last_name, address FROM {} WHERE first_name LIKE 'cx%'")
                for first, last, address in conn.execute(query.format(sql.Identifier(table))):
                    rows.setdefault((first, last), []).append(address)
            out[peer] = rows
        return out

    def key_ops(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        """The requests that changed `key`, in the order they were issued: peer, gxid, outcome, the key's op."""
        with self.history.lock:
            return [
                {
                    "peer": r.peer,
                    "gxid": r.gxid,
                    "outcome": r.outcome,
                    "status": r.status,
                    "op": op.kind,
                    "address": op.address,
                }
                for r in self.history.requests
                for op in r.ops
                if op.key == key
            ]

    def verify(self) -> dict[str, Any]:
        report = self.cluster.check()
        stuck = sorted({*self.left_open, *self.cluster.prepared()})
        states = self.read_states()
        per_key: dict[tuple[str, str], list[tuple[Op, str]]] = {}
        with self.history.lock:
            for req in self.history.requests:
                for op in req.ops:
                    per_key.setdefault(op.key, []).append((op, req.outcome))
        lost: list[dict[str, Any]] = []
        phantom: list[dict[str, Any]] = []
        split: list[dict[str, Any]] = []  # keys whose rows differ between peers: what a divergent view is made of
        for key in sorted(set(per_key) | {k for rows in states.values() for k in rows}):
            ops = per_key.get(key, [])
            found_at = {peer: states[peer].get(key, []) for peer in PEERS}
            if len({tuple(rows) for rows in found_at.values()}) > 1:
                split.append({"key": list(key), "found": found_at, "ops": self.key_ops(key)})
            allowed = possible_states(ops)
            for peer in PEERS:
                found = states[peer].get(key, [])
                state: State = found[0] if len(found) == 1 else ABSENT
                if len(found) <= 1 and state in allowed:
                    continue
                item = {"peer": peer, "key": list(key), "found": found, "allowed": sorted(map(str, allowed))}
                if len(found) > 1 or state in possible_states(ops, phantom=True):
                    phantom.append(item)
                else:
                    lost.append(item)
        counts = self.history.counts()
        return {
            "committed": counts["committed"],
            "aborted": counts["failed"],
            "unknown": counts["unknown"],
            "divergent_views": len(report["divergent_views"]),
            "lost_acks": len(lost),
            "phantom_writes": len(phantom),
            "stuck_prepared": len(stuck),
            "broken_chains": len(report["broken_chains"]),
            "settle_seconds": self.settle_seconds,
            "details": {
                "divergent_views": report["divergent_views"],
                "broken_chains": report["broken_chains"],
                "stuck_prepared": stuck,
                "lost_acks": lost[:20],
                "phantom_writes": phantom[:20],
                "split_keys": split[:20],
                "check_errors": report["errors"],
                "fault_points_missed": self.missed,
            },
        }


FINDINGS = ("divergent_views", "lost_acks", "phantom_writes", "stuck_prepared", "broken_chains")


def run(trials: int | None, seconds: float | None, seed: int, history_path: Path | None) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible schedule, not security
    state_dir = Path(tempfile.mkdtemp(prefix="dejima-chaos-"))
    keep_logs = True
    try:
        with own_server(state_dir) as server:
            chaos = Chaos(server, state_dir, rng)
            try:
                _log(f"starting the network (PostgreSQL {server.kind}, seed {seed})")
                chaos.start()
                started = time.monotonic()
                done = 0
                for kind in chaos.schedule(trials):
                    if seconds is not None and time.monotonic() - started >= seconds:
                        break
                    chaos.inject(kind)
                    done += 1
                    time.sleep(rng.uniform(0.1, 0.4))  # traffic between faults
                    if done % 10 == 0:
                        _log(f"{done} trials, {chaos.history.counts()}")
                _log(f"{done} trials done; settling")
                chaos.settle()
                result = {"trials": done, **chaos.verify(), "faults": chaos.faults}
                result["seed"] = seed
                if history_path is not None:
                    with history_path.open("w") as fh:
                        for req in chaos.history.requests:
                            fh.write(json.dumps(req.record()) + "\n")
                keep_logs = any(result[k] for k in FINDINGS)
                return result
            finally:
                try:
                    chaos.close()
                finally:
                    if keep_logs:
                        _keep_logs(state_dir / "net")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _keep_logs(net_dir: Path) -> None:
    logs = list(net_dir.glob("*.log"))
    if not logs:
        return
    target = Path(tempfile.mkdtemp(prefix="dejima-chaos-logs-"))
    for path in logs:
        shutil.copy(path, target / path.name)
    _log(f"peer logs kept in {target}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: everything started is stopped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dejima chaos", description="randomized global transactions under injected faults, history-checked"
    )
    parser.add_argument("--trials", type=int, help="number of faults to inject (default 30 unless --seconds)")
    parser.add_argument("--seconds", type=float, help="stop injecting after this many seconds (a soak)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed in the report)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--history", type=Path, help="write the request history here (JSON lines)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trials = args.trials if args.trials is not None or args.seconds is not None else 30
    if trials is not None and trials < 0:
        print("dejima chaos: --trials must be >= 0", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run(trials, args.seconds, seed, args.history)
    except (ChaosError, NetworkError, PgServerError) as exc:
        print(f"dejima chaos: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failed = any(result[k] for k in FINDINGS)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(
            f"{result['trials']} trials (seed {seed}): {result['committed']} committed, {result['aborted']} aborted, "
            f"{result['unknown']} unknown; faults {result['faults']}; quiet {result['settle_seconds']} s after the end"
        )
        print(", ".join(f"{k} {result[k]}" for k in FINDINGS) + (" - NOT OK" if failed else " - ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
