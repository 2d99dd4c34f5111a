"""Discovery and groups: which peers exist, what they share, and who is in each dejima group.

Each peer greets its seeds and every peer it knows (`Hello`: name, URL, type, catalog, the peers it knows) and
answers greetings the same way. A peer that does not answer is greeted again with exponential backoff (jitter,
capped), so start order never matters and a restarted or unreachable peer is found again. A view with the same
name but a different definition (schema hash) is refused on both sides: logged as an error, shown in the API, and
that peer is kept out of the view's group. Known peers and groups are persisted in `dejima.peers`/`dejima.groups`.

Greetings are signed like every peer message (`peer.dejima.auth`): a greeting, or an answer to ours, from a key this
peer does not trust is refused (401) and teaches nothing; peers named in a greeting are added only when trusted.

Identity is not entitlement: which of this peer's views a trusted peer may hold is this peer's configuration
(`PeerConfig.entitlements`, from DEJIMA_TRUSTED_KEYS[_FILE]: its peer type, or the views named), never what its
greeting claims. A claim to a view of this peer it is not entitled to is refused: it is not put into that view's
group (its other views are not affected), the refusal is logged as a warning naming the peer and the view, and
`refusals` shows it (`refused_claims` in /api/v1/status). A greeting announcing another peer type than the one the
peer is trusted as is refused as a whole (`GreetingRefused`: 403 at the message endpoint) and teaches nothing. A
view's group (`members`) holds only entitled peers, whatever was persisted or announced, so the rows of a view go to
no one else (the coordinator's fan-out sends to `members` only).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from peer.dejima import jsonvalues
from peer.dejima.config import PeerConfig
from peer.dejima.manifest import PeerType
from peer.dejima.messages import Hello
from peer.dejima.transport import Transport

log = logging.getLogger(__name__)
PEER_TYPE_CLAIM = "peer_type"  # the key of a refused peer type in `Directory.refusals` (views are keyed by name)
REFRESH_FACTOR = 10  # a peer that answered is greeted again after this many discovery intervals
WAKE_GATHER_S = 0.02  # after a greeting named new peers, the next cycle waits this long for more such greetings


def catalog_of(ptype: PeerType) -> list[dict[str, Any]]:
    """What this peer shares, as exchanged with others."""
    out = []
    for view in ptype.views:
        table = ptype.table(view.table)
        out.append({**view.signature(table), "schema_hash": view.schema_hash(table)})
    return out


class GreetingRefused(Exception):
    """A greeting refused as a whole: its sender announces another peer type than the one it is trusted as here."""


@dataclass
class KnownPeer:
    name: str
    url: str
    peer_type: str = ""
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)  # view -> signature with schema_hash
    status: str = "unknown"  # up | unreachable | unknown
    last_seen: float = 0.0
    failures: int = 0
    next_try: float = 0.0
    incompatible: dict[str, str] = field(default_factory=dict)  # view -> reason
    refused: dict[str, str] = field(default_factory=dict)  # view -> why its last greeting's claim was refused

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "peer_type": self.peer_type,
            "status": self.status,
            "views": sorted(self.catalog),
            "incompatible": self.incompatible,
            "last_seen": self.last_seen,
        }


class Directory:
    def __init__(self, config: PeerConfig, ptype: PeerType, pool: ConnectionPool[Any], transport: Transport) -> None:
        self.config = config
        self.ptype = ptype
        self.pool = pool
        self.transport = transport
        self.catalog = catalog_of(ptype)
        self.my_views = {c["view"]: c for c in self.catalog}
        self.peers: dict[str, KnownPeer] = {}
        # every claim refused since start: peer -> view (or PEER_TYPE_CLAIM) -> {reason, count, first, last}
        self.refusals: dict[str, dict[str, dict[str, Any]]] = {}
        self.lock = threading.RLock()
        self.save_lock = threading.Lock()  # one snapshot written at a time, the latest last
        self.stopped = threading.Event()
        self.wake = threading.Event()  # set: a greeting named peers not known before; greet them now (`run`)
        self.greetings = 0  # messages sent, for the discovery benchmark
        self.seed_urls = sorted({u for urls in config.seeds.values() for u in urls if u != config.url})
        self.seed_state: dict[str, tuple[int, float]] = dict.fromkeys(self.seed_urls, (0, 0.0))  # failures, next try
        self._load()

    # ---- entitlement: this peer's configuration, never a greeting -------------------------------------------
    def entitled(self, name: str, view: str) -> bool:
        """Whether peer `name` may hold this peer's `view` (its entitlement in DEJIMA_TRUSTED_KEYS[_FILE]); this peer
        holds its own views. False for a view this peer does not have."""
        if view not in self.my_views:
            return False
        if name == self.config.name:
            return True
        entitlement = self.config.entitlements.get(name)
        return entitlement is not None and view in entitlement.views

    def describe_entitlement(self, name: str) -> str:
        entitlement = self.config.entitlements.get(name)
        return entitlement.describe() if entitlement is not None else "no entitlement"

    def entitlements(self) -> dict[str, dict[str, Any]]:
        """What the configuration lets each trusted peer hold here (for /api/v1/status)."""
        return {
            name: {"peer_type": e.peer_type, "views": sorted(e.views)}
            for name, e in sorted(self.config.entitlements.items())
            if name != self.config.name
        }

    def refused_claims(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self.lock:
            return {peer: {claim: dict(v) for claim, v in claims.items()} for peer, claims in self.refusals.items()}

    def _refuse(self, peer: str, claim: str, reason: str, known: bool) -> None:
        """Record a refused claim (under the lock); logged as a warning when the peer's previous greeting did not make
        it (`known`), so a partner repeating it every refresh does not fill the log."""
        now = time.time()
        entry = self.refusals.setdefault(peer, {}).setdefault(claim, {"reason": reason, "count": 0, "first": now})
        entry.update(reason=reason, last=now, count=entry["count"] + 1)
        if not known:
            log.warning("refusing %s's claim to %s: %s", peer, claim, reason)

    # ---- the group table ------------------------------------------------------------------------------------
    def members(self, view: str) -> list[str]:
        """The dejima group of `view`: this peer and every compatible peer that shares it and is entitled to it
        (sorted names)."""
        with self.lock:
            others = [
                p.name
                for p in self.peers.values()
                if view in p.catalog and view not in p.incompatible and self.entitled(p.name, view)
            ]
        return sorted({self.config.name, *others}) if view in self.my_views else []

    def url_of(self, name: str) -> str | None:
        with self.lock:
            peer = self.peers.get(name)
            return peer.url if peer else None

    def groups(self) -> dict[str, list[str]]:
        return {view: self.members(view) for view in self.my_views}

    def peer_groups(self) -> list[dict[str, Any]]:
        """Herr's attribute-level peer groups: attributes keyed by the set of dejima views they occur in, with the
        peers of those views; only the groups this peer belongs to."""
        with self.lock:
            view_cols: dict[str, set[str]] = {v: {c for c, _ in sig["columns"]} for v, sig in self.my_views.items()}
            view_peers: dict[str, set[str]] = {v: {self.config.name} for v in self.my_views}
            for peer in self.peers.values():
                for view, sig in peer.catalog.items():
                    if view in peer.incompatible or (view in self.my_views and not self.entitled(peer.name, view)):
                        continue
                    view_cols.setdefault(view, {c for c, _ in sig["columns"]})
                    view_peers.setdefault(view, set()).add(peer.name)
        attr_views: dict[str, set[str]] = {}
        for view, cols in view_cols.items():
            for col in cols:
                attr_views.setdefault(col, set()).add(view)
        grouped: dict[frozenset[str], set[str]] = {}
        for attr, views in attr_views.items():
            grouped.setdefault(frozenset(views), set()).add(attr)
        out = []
        for view_set, attrs in grouped.items():
            peers: set[str] = set().union(*(view_peers[v] for v in view_set))
            if self.config.name in peers:
                out.append({"views": sorted(view_set), "attributes": sorted(attrs), "peers": sorted(peers)})
        return sorted(out, key=lambda g: (len(g["views"]), g["views"]))

    # ---- greeting -------------------------------------------------------------------------------------------
    def hello(self) -> Hello:
        with self.lock:
            known = [{"name": p.name, "url": p.url, "peer_type": p.peer_type} for p in self.peers.values()]
        return Hello(self.config.name, self.config.url, self.config.peer_type, self.catalog, known)

    def learn(self, hello: Hello) -> list[str]:
        """Record what a greeting tells (from either side). Returns the errors found (incompatible views). A claim
        to a view of this peer the sender is not entitled to is refused (not recorded as a member; logged; shown in
        `refusals`); a greeting announcing another peer type than the one the sender is trusted as raises
        GreetingRefused and teaches nothing."""
        errors: list[str] = []
        if hello.peer == self.config.name:
            return errors
        entitlement = self.config.entitlements.get(hello.peer)
        if entitlement is not None and entitlement.peer_type and hello.peer_type != entitlement.peer_type:
            reason = (
                f"{hello.peer} announces peer type {hello.peer_type!r}, but is trusted here as a peer of type"
                f" {entitlement.peer_type!r} (DEJIMA_TRUSTED_KEYS); its greeting is refused"
            )
            with self.lock:
                known = PEER_TYPE_CLAIM in (self.refusals.get(hello.peer) or {})
                self._refuse(hello.peer, PEER_TYPE_CLAIM, reason, known)
            raise GreetingRefused(reason)
        catalog = {c["view"]: c for c in hello.catalog if isinstance(c, dict) and isinstance(c.get("view"), str)}
        incompatible: dict[str, str] = {}
        refused: dict[str, str] = {}
        for view, theirs in catalog.items():
            mine = self.my_views.get(view)
            if mine is None:
                continue  # a view of theirs only: nothing of ours to give or refuse
            if not self.entitled(hello.peer, view):
                refused[view] = (
                    f"{hello.peer} claims view {view}, which it is not entitled to hold here (its entitlement:"
                    f" {self.describe_entitlement(hello.peer)}; DEJIMA_TRUSTED_KEYS); it is kept out of {view}'s group"
                )
                continue
            if theirs.get("schema_hash") != mine["schema_hash"]:
                reason = (
                    f"view {view}: {hello.peer}'s definition differs from ours "
                    f"(schema hash {theirs.get('schema_hash')} != {mine['schema_hash']}; "
                    f"theirs {theirs.get('columns')} key {theirs.get('key')}, ours {mine['columns']} key {mine['key']})"
                )
                incompatible[view] = reason
                errors.append(reason)
                log.error("refusing %s", reason)
        with self.lock:
            peer = self.peers.get(hello.peer) or KnownPeer(hello.peer, hello.url)
            for view, reason in refused.items():
                self._refuse(hello.peer, view, reason, known=view in peer.refused)
            changed = (peer.url, peer.catalog, peer.incompatible, peer.status) != (
                hello.url,
                catalog,
                incompatible,
                "up",
            )
            peer.url, peer.peer_type, peer.catalog, peer.incompatible, peer.refused = (
                hello.url,
                hello.peer_type,
                catalog,
                incompatible,
                refused,
            )
            peer.status, peer.last_seen, peer.failures = "up", time.time(), 0
            peer.next_try = time.monotonic() + self.config.discovery_interval * REFRESH_FACTOR
            self.peers[hello.peer] = peer
            learned = False
            for entry in hello.known:
                name, url = entry.get("name", ""), entry.get("url", "")
                if name and url and name != self.config.name and name not in self.peers and self._trusted(name):
                    configured = self.config.entitlements.get(name)
                    peer_type = configured.peer_type if configured and configured.peer_type else ""
                    self.peers[name] = KnownPeer(name, url, peer_type or entry.get("peer_type", ""))
                    changed = learned = True
            if hello.url in self.seed_state:
                self.seed_state.pop(hello.url)
        if changed:
            self._save()
        if learned:
            self.wake.set()
        return errors

    def _trusted(self, name: str) -> bool:
        """Only peers whose key this peer trusts are greeted (the greeting of any other would be refused)."""
        return name in self.config.trusted_keys

    def _due(self) -> list[tuple[str, str | None]]:
        now = time.monotonic()
        with self.lock:
            named = {p.url for p in self.peers.values()}
            due: list[tuple[str, str | None]] = [(p.url, p.name) for p in self.peers.values() if p.next_try <= now]
            due += [(u, None) for u, (_, t) in self.seed_state.items() if t <= now and u not in named]
        return due

    def greet_once(self) -> None:
        due = self._due()
        if not due:
            return
        hello = self.hello()
        self.greetings += len(due)
        results = self.transport.call_many([(url, hello) for url, _ in due], self.config.peer_timeout)
        for (url, name), result in zip(due, results, strict=True):
            if result.ok and isinstance(result.message, Hello):
                try:
                    self.learn(result.message)
                except GreetingRefused as exc:  # logged by learn; backs off like a peer that did not answer
                    self._failed(url, name, str(exc))
                    continue
                with self.lock:
                    self.seed_state.pop(url, None)  # a seed that answered is known by name from now on
                continue
            self._failed(url, name, result.error)

    def _failed(self, url: str, name: str | None, error: str) -> None:
        with self.lock:
            if name is not None and name in self.peers:
                peer = self.peers[name]
                peer.failures += 1
                if peer.status != "unreachable":
                    log.warning("peer %s at %s is unreachable: %s", name, url, error)
                peer.status = "unreachable"
                peer.next_try = time.monotonic() + self._backoff(peer.failures)
            elif url in self.seed_state:
                failures = self.seed_state[url][0] + 1
                self.seed_state[url] = (failures, time.monotonic() + self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        base = min(self.config.discovery_max_backoff, self.config.discovery_interval * (2 ** min(failures, 16)))
        return float(base * random.uniform(0.5, 1.0))  # noqa: S311  (jitter, not security)

    def run(self) -> None:
        """The discovery loop (a daemon thread): a cycle every discovery interval, and one as soon as a greeting
        named peers this peer did not know (each hop of who-knows-whom no longer waits up to an interval; the
        greetings of a moment are gathered for `WAKE_GATHER_S` first)."""
        while not self.stopped.is_set():
            try:
                self.greet_once()
            except Exception:  # the loop must survive anything; the cause is logged
                log.exception("discovery cycle failed")
            if self.wake.wait(self.config.discovery_interval) and not self.stopped.is_set():
                self.stopped.wait(WAKE_GATHER_S)
            self.wake.clear()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    # ---- persistence ----------------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute("SELECT name, url, peer_type, catalog FROM dejima.peers").fetchall()
        except psycopg.Error as exc:
            log.warning("could not load known peers: %s", exc)
            return
        for name, url, peer_type, catalog in rows:
            if name != self.config.name:
                self.peers[name] = KnownPeer(name, url, peer_type, dict(catalog or {}))

    def _save(self) -> None:
        with self.save_lock:
            self._save_snapshot()

    def _save_snapshot(self) -> None:
        with self.lock:
            peers = [
                (p.name, p.url, p.peer_type, jsonvalues.dumps(p.catalog), p.status, json.dumps(p.incompatible))
                for p in self.peers.values()
            ]
            groups = [(view, member) for view, members in self.groups().items() for member in members]
            pgroups = json.dumps(self.peer_groups())
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("DELETE FROM dejima.peers")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO dejima.peers (name, url, peer_type, catalog, status, incompatible)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        peers,
                    )
                    conn.execute("DELETE FROM dejima.groups")
                    cur.executemany("INSERT INTO dejima.groups (view_name, peer) VALUES (%s, %s)", groups)
                conn.execute(
                    "INSERT INTO dejima.state (key, value) VALUES ('peer_groups', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (pgroups,),
                )
        except psycopg.Error as exc:
            log.warning("could not persist known peers: %s", exc)
