"""The participant's putback (`peer.dejima.apply`) on real PostgreSQL, and an in-process simulation of the network.

The simulation: three databases (government, bank, insurance); a global transaction is one open psycopg
transaction per peer with `set_gxid`. The origin runs SQL, `take_changes` + `outgoing` give its deltas; a queue
holds (sender, receiver, view, delta) messages; delivering one = `apply_delta` at the receiver, then
`take_changes` + `outgoing` there, then the changed views' deltas go to their other members (`without_echo` for the
sender on the same view); until the queue is empty. Deltas cross a JSON round trip, as on the wire.

Delivery order: `explore` tries EVERY order (depth first, savepoints in all three databases between steps, so each
order costs only its own deliveries); Hypothesis draws random transactions (inserts, updates, deletes, renames at
a random origin) and each is explored in every order too. Every order must end in the same state at every peer,
with every dejima view identical across its members, terminate, never echo a row back on the view it came from,
and use each (sender, receiver, view) edge at most once.
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from peer.dejima.apply import (
    ApplyBadRequest,
    ApplyConflict,
    ApplyUnseen,
    GxState,
    ViewDelta,
    apply_delta,
    locked_elsewhere,
    outgoing,
    without_echo,
)
from peer.dejima.delta import Delta, RowChange, take_changes
from peer.dejima.install import SQL_ROOT
from peer.dejima.jsonvalues import canonical
from peer.dejima.manifest import load_peer_types
from peer.dejima.messages import UNKNOWN, WAS
from tests.helpers import SCHOOL_MANIFEST, base_rows, make_peer_type_root, register, taken, view_rows

PEERS = ("government", "bank", "insurance")
TYPES = load_peer_types(SQL_ROOT)
TABLE = {p: f"{p}_users" for p in PEERS}
MEMBERS = {v.name: v.members for t in TYPES.values() for v in t.views}
VIEWS = {p: tuple(v.name for v in TYPES[p].views) for p in PEERS}
KEY = ("first_name", "last_name")
MAX_DELIVERIES = 200


class ExploreLimit(AssertionError):
    """`Network.explore` found more delivery orders than its limit: it did not explore every one."""


Statement = tuple[str | sql.SQL | sql.Composed, Sequence[Any]]

JANE = ("Jane", "Roe")
JOHN = ("John", "Doe")


# ---------------------------------------------------------------------------------------------- the network


@dataclass
class Message:
    sender: str
    receiver: str
    view: str
    delta: Delta
    created: int  # delivery step that created it (0 = the origin's statements)
    delivered: int | None = None


@dataclass
class Outcome:
    state: dict[str, Any] | None  # peer -> base rows without id (sorted) and view contents; None on conflict
    ids: dict[str, dict[tuple[Any, ...], int]]
    messages: list[Message]
    conflict: str | None = None
    orders: int = 1  # how many delivery orders `all_orders` explored

    def edges(self) -> Counter[tuple[str, str, str]]:
        return Counter((m.sender, m.receiver, m.view) for m in self.messages)


@dataclass
class Network:
    conns: dict[str, psycopg.Connection[Any]]
    states: dict[str, GxState] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    step: int = 0
    after_origin: list[dict[str, Any]] = field(default_factory=list)  # the origin's table right after its SQL

    # ---- one global transaction
    def begin(self) -> str:
        gxid = f"sim-{uuid.uuid4().hex[:12]}"
        for peer, conn in self.conns.items():
            self.states[peer] = GxState(gxid=gxid, ptype=TYPES[peer], conn=conn, token=register(conn, gxid), peer=peer)
        self.messages, self.step = [], 0
        return gxid

    def end(self, commit: bool) -> None:
        for conn in self.conns.values():
            if commit:
                conn.commit()
            else:
                conn.rollback()

    def fan_out(self, peer: str, deltas: dict[str, Delta], received: Message | None) -> list[Message]:
        out = []
        for view, delta in deltas.items():
            for member in MEMBERS[view]:
                if member == peer:
                    continue
                send = delta
                if received is not None and received.sender == member and received.view == view:
                    send = without_echo(delta, received.delta)
                if send.is_empty():
                    continue
                wire = json.loads(json.dumps({"insertions": send.insertions, "deletions": send.deletions}))
                out.append(Message(peer, member, view, Delta(view, wire["insertions"], wire["deletions"]), self.step))
        self.messages.extend(out)
        return out

    def originate(self, origin: str, statements: Sequence[Statement]) -> list[Message]:
        state = self.states[origin]
        for text, params in statements:
            state.conn.execute(text.encode() if isinstance(text, str) else text, params)
        self.after_origin = base_rows(state.conn, TABLE[origin])
        return self.fan_out(origin, outgoing(state, take_changes(state.conn, state.token)), None)

    def deliver(self, msg: Message) -> list[Message]:
        self.step += 1
        msg.delivered = self.step
        state = self.states[msg.receiver]
        apply_delta(state, msg.view, msg.delta.insertions, msg.delta.deletions)
        return self.fan_out(msg.receiver, outgoing(state, take_changes(state.conn, state.token)), msg)

    def snapshot(self, messages: list[Message], conflict: str | None = None) -> Outcome:
        kept = [Message(m.sender, m.receiver, m.view, m.delta, m.created, m.delivered) for m in messages]
        if conflict is not None:
            return Outcome(None, {}, kept, conflict)
        state: dict[str, Any] = {}
        ids: dict[str, dict[tuple[Any, ...], int]] = {}
        for peer, conn in self.conns.items():
            rows = base_rows(conn, TABLE[peer])
            leftover = conn.execute("SELECT count(*) FROM dejima.delta").fetchone()
            assert leftover == (0,), f"{peer}: capture records left behind"
            ids[peer] = {(r["first_name"], r["last_name"]): r["id"] for r in rows}
            state[peer] = {
                "base": sorted(tuple(sorted((k, str(v)) for k, v in r.items() if k != "id")) for r in rows),
                "views": {v: view_rows(conn, v) for v in VIEWS[peer]},
            }
        for view, members in MEMBERS.items():
            contents = {m: state[m]["views"][view] for m in members}
            assert len({json.dumps(c, default=str) for c in contents.values()}) == 1, f"{view} differs: {contents}"
        return Outcome(state, ids, kept)

    # ---- delivery orders
    def run(
        self, origin: str, statements: Sequence[Statement], choose: Callable[[int], int] = lambda n: 0, *, commit: bool
    ) -> Outcome:
        """One global transaction, messages delivered in the order `choose` picks (default: FIFO)."""
        self.begin()
        conflict = None
        try:
            try:
                queue = self.originate(origin, statements)
                while queue:
                    assert self.step < MAX_DELIVERIES, "propagation did not terminate"
                    queue.extend(self.deliver(queue.pop(choose(len(queue)))))
            except ApplyConflict as exc:
                conflict = str(exc)
            outcome = self.snapshot(self.messages, conflict)
        except BaseException:
            self.end(False)
            raise
        self.end(commit and conflict is None)
        return outcome

    def explore(self, origin: str, statements: Sequence[Statement], limit: int = 5000) -> list[Outcome]:
        """Every delivery order, one outcome each; rolled back at the end. ExploreLimit when there are more than
        `limit` orders: a test never covers fewer than it says (every one) without knowing it."""
        self.begin()
        try:
            queue = self.originate(origin, statements)
        except BaseException:
            self.end(False)
            raise
        outcomes: list[Outcome] = []

        def dfs(queue: list[Message]) -> None:
            if not queue:
                outcomes.append(self.snapshot(self.messages))
                return
            for i, msg in enumerate(queue):
                if len(outcomes) >= limit:
                    raise ExploreLimit(f"more than {limit} delivery orders: explored {len(outcomes)}, not every one")
                saved = ({p: s.snapshot() for p, s in self.states.items()}, len(self.messages), self.step)
                for conn in self.conns.values():
                    conn.execute("SAVEPOINT sim")
                try:
                    new = self.deliver(msg)
                except ApplyConflict as exc:
                    outcomes.append(self.snapshot(self.messages, str(exc)))
                else:
                    assert self.step < MAX_DELIVERIES, "propagation did not terminate"
                    dfs(queue[:i] + queue[i + 1 :] + new)
                for conn in self.conns.values():
                    conn.execute("ROLLBACK TO SAVEPOINT sim")
                    conn.execute("RELEASE SAVEPOINT sim")
                for peer, snap in saved[0].items():
                    self.states[peer].restore(snap)
                del self.messages[saved[1] :]
                self.step = saved[2]
                msg.delivered = None

        try:
            dfs(queue)
        finally:
            self.end(False)
        return outcomes


@pytest.fixture
def net(peer_db: Callable[..., str]) -> Iterator[Network]:
    conns = {p: psycopg.connect(peer_db(p)) for p in PEERS}
    try:
        yield Network(conns)
    finally:
        for conn in conns.values():
            conn.close()


def all_orders(net: Network, origin: str, statements: Sequence[Statement], *, commit: bool = True) -> Outcome:
    """`check_every_order`, then run the transaction once more (FIFO) for real: committed unless told otherwise."""
    outcomes = check_every_order(net, origin, list(statements))
    final = net.run(origin, statements, commit=commit)
    assert final.state == outcomes[0].state
    final.orders = len(outcomes)
    return final


def assert_no_echo(messages: list[Message]) -> None:
    """No peer receives back, on the same view, a row it had already sent to that peer (delivered before)."""
    for m in messages:
        earlier = [
            r
            for back in messages
            if (back.sender, back.receiver, back.view) == (m.receiver, m.sender, m.view)
            and back.delivered is not None
            and back.delivered <= m.created
            for r in back.delta.insertions
        ]
        for row in m.delta.insertions:
            assert row not in earlier, f"{m.sender} echoed {row} back to {m.receiver} on {m.view}"


A1: tuple[str, list[Statement]] = ("government", [
    (
        "INSERT INTO government_users (first_name, last_name, phone, address, birthdate) VALUES (%s, %s, %s, %s, %s)",
        ["Jane", "Roe", "555-0199", "2 Elm St", "1980-05-17"],
    )
])  # fmt: skip
A2: tuple[str, list[Statement]] = ("bank", [
    (
        "INSERT INTO bank_users (first_name, last_name, iban, address, phone) VALUES (%s, %s, %s, %s, %s)",
        ["John", "Doe", "DE89", "1 Main St", "555-0100"],
    )
])  # fmt: skip


WHERE_KEY = sql.SQL("first_name = %s AND last_name = %s")


def update(peer: str, key: tuple[str, str], **values: Any) -> tuple[str, list[Statement]]:
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)
    text = sql.SQL("UPDATE {} SET {} WHERE {}").format(sql.Identifier(TABLE[peer]), sets, WHERE_KEY)
    return peer, [(text, [*values.values(), *key])]


def delete(peer: str, key: tuple[str, str]) -> tuple[str, list[Statement]]:
    return peer, [(sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(TABLE[peer]), WHERE_KEY), list(key))]


def row(outcome: Outcome, peer: str, key: tuple[str, str]) -> dict[str, Any] | None:
    assert outcome.state is not None
    rows = [
        dict(r)
        for r in outcome.state[peer]["base"]
        if dict(r)["first_name"] == key[0] and dict(r)["last_name"] == key[1]
    ]
    assert len(rows) <= 1, f"{peer} has {len(rows)} rows for {key}"
    return rows[0] if rows else None


# ---------------------------------------------------------------------------------------------- scenarios


@pytest.mark.integration
def test_a1_government_insert_reaches_bank_and_insurance_in_every_order(net: Network) -> None:
    out = all_orders(net, *A1)
    assert row(out, "government", JANE) == {
        "first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St", "birthdate": "1980-05-17"
    }  # fmt: skip
    assert row(out, "bank", JANE) == {
        "first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St", "iban": "None",
        "risk_factor": "None",
    }  # fmt: skip
    assert row(out, "insurance", JANE) == {
        "first_name": "Jane", "last_name": "Roe", "address": "2 Elm St", "birthdate": "1980-05-17",
        "insurance_number": "None", "risk_factor": "None",
    }  # fmt: skip
    assert out.ids["bank"][JANE] >= 1
    # the cycle closes on dejima_risk: bank and insurance may tell each other "risk unknown", once per direction
    assert max(out.edges().values()) == 1


@pytest.mark.integration
def test_a2_diamond_one_row_at_insurance_with_the_address_in_every_order(net: Network) -> None:
    out = all_orders(net, *A2)
    assert out.orders >= 5  # the diamond really has several interleavings
    gov = row(out, "government", JOHN)
    assert gov is not None
    assert (gov["phone"], gov["address"], gov["birthdate"]) == ("555-0100", "1 Main St", "None")
    ins = row(out, "insurance", JOHN)
    assert ins is not None
    assert (ins["address"], ins["birthdate"], ins["risk_factor"]) == ("1 Main St", "None", "None")
    bank = row(out, "bank", JOHN)
    assert bank is not None
    assert (bank["iban"], bank["address"], bank["phone"]) == ("DE89", "1 Main St", "555-0100")
    assert max(out.edges().values()) == 1


@pytest.mark.integration
def test_a4_phone_update_reaches_government_only(net: Network) -> None:
    net.run(*A2, commit=True)
    before = net.run("bank", [], commit=False)  # no statement: a snapshot, no message
    assert before.messages == []
    out = all_orders(net, *update("bank", JOHN, phone="555-0200"))
    assert [(m.sender, m.receiver, m.view) for m in out.messages] == [("bank", "government", "dejima_bank")]
    gov = row(out, "government", JOHN)
    assert gov is not None
    assert (gov["phone"], gov["birthdate"]) == ("555-0200", "None")
    assert out.ids["government"][JOHN] == before.ids["government"][JOHN]
    assert out.state is not None and before.state is not None
    assert out.state["insurance"] == before.state["insurance"]


@pytest.mark.integration
def test_a5_insurance_address_reaches_bank_in_two_hops_and_nothing_comes_back(net: Network) -> None:
    net.run(*A1, commit=True)
    out = all_orders(net, *update("insurance", JANE, address="3 Oak Ave"))
    assert sorted((m.sender, m.receiver, m.view) for m in out.messages) == [
        ("government", "bank", "dejima_bank"),
        ("insurance", "government", "dejima_insurance"),
    ]
    gov, bank = row(out, "government", JANE), row(out, "bank", JANE)
    assert gov is not None and bank is not None
    assert (gov["address"], gov["phone"], gov["birthdate"]) == ("3 Oak Ave", "555-0199", "1980-05-17")
    assert (bank["address"], bank["iban"]) == ("3 Oak Ave", "None")


@pytest.mark.integration
def test_a6_birthdate_reaches_insurance_and_bank_hears_nothing(net: Network) -> None:
    net.run(*A1, commit=True)
    out = all_orders(net, *update("government", JANE, birthdate="1980-05-18"))
    assert [(m.sender, m.receiver, m.view) for m in out.messages] == [("government", "insurance", "dejima_insurance")]
    ins = row(out, "insurance", JANE)
    assert ins is not None and ins["birthdate"] == "1980-05-18"


@pytest.mark.integration
def test_a7_private_columns_send_nothing(net: Network) -> None:
    net.run(*A1, commit=True)
    assert net.run(*update("bank", JANE, iban="DE00"), commit=True).messages == []
    assert net.run(*update("insurance", JANE, insurance_number="I-1"), commit=True).messages == []


@pytest.mark.integration
def test_a8_delete_reaches_every_peer_in_every_order(net: Network) -> None:
    net.run(*A1, commit=True)
    out = all_orders(net, *delete("government", JANE))
    for peer in PEERS:
        assert row(out, peer, JANE) is None
    assert {(m.sender, m.receiver) for m in out.messages} >= {("government", "bank"), ("government", "insurance")}


@pytest.mark.integration
def test_a9_rename_in_place_everywhere_in_every_order(net: Network) -> None:
    net.run(*A2, commit=True)
    net.run(*update("government", JOHN, birthdate="1970-01-02"), commit=True)
    before = net.run("bank", [], commit=False)
    out = all_orders(net, *update("bank", JOHN, first_name="Jon"))
    jon = ("Jon", "Doe")
    for peer in PEERS:
        assert row(out, peer, JOHN) is None
        assert row(out, peer, jon) is not None
        assert out.ids[peer][jon] == before.ids[peer][JOHN], f"{peer} did not rename in place"
    gov = row(out, "government", jon)
    assert gov is not None
    assert (gov["phone"], gov["birthdate"], gov["address"]) == ("555-0100", "1970-01-02", "1 Main St")
    bank_msgs = [m for m in out.messages if m.sender == "bank"]
    assert all(m.delta.insertions[0][WAS] == {"first_name": "John", "last_name": "Doe"} for m in bank_msgs)


@pytest.mark.integration
def test_a10_nulls_and_a11_quotes_survive_the_wire(net: Network) -> None:
    nul = ("Nul", "Person")
    out = all_orders(
        net,
        "bank",
        [("INSERT INTO bank_users (first_name, last_name, address, phone) VALUES (%s, %s, NULL, NULL)", list(nul))],
    )
    gov = row(out, "government", nul)
    assert gov is not None and (gov["phone"], gov["address"]) == ("None", "None")
    obrien = ("Liam", "O'Brien")
    address = '1 "Quote" St; DROP TABLE x'
    out = all_orders(
        net,
        "bank",
        [("INSERT INTO bank_users (first_name, last_name, address) VALUES (%s, %s, %s)", [*obrien, address])],
    )
    for peer in ("government", "insurance", "bank"):
        got = row(out, peer, obrien)
        assert got is not None and got["address"] == address
    assert row(out, "government", nul) is not None  # nothing else happened


@pytest.mark.integration
def test_a14_message_counts_over_a1_to_a6(net: Network) -> None:
    """Each delta crosses each group edge at most once per direction; nothing comes back; everything terminates."""
    counts = {}
    for name, (origin, statements) in {
        "A1": A1,
        "A2": A2,
        "A4": update("bank", JOHN, phone="555-0200"),
        "A5": update("insurance", JANE, address="3 Oak Ave"),
        "A6": update("government", JANE, birthdate="1980-05-18"),
    }.items():
        out = all_orders(net, origin, statements)
        assert max(out.edges().values(), default=0) <= 1, (name, out.edges())
        counts[name] = len(out.messages)
    assert counts["A4"] == 1
    assert counts["A5"] == 2
    assert counts["A6"] == 1
    assert counts["A1"] <= 4 and counts["A2"] <= 5


# ---------------------------------------------------------------------------------------------- random orders

BIG: dict[str, list[Statement]] = {
    "bank": [
        (
            "INSERT INTO bank_users (first_name, last_name, iban, address, phone, risk_factor)"
            " VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s)",
            ["Ann", "Lee", "DE1", "5 Lane", "555-1", 3, "Bob", "Kim", None, None, "555-2", None],
        ),
        ("UPDATE bank_users SET address = %s, risk_factor = %s WHERE first_name = %s", ["9 Side St", 7, "Jane"]),
        ("UPDATE bank_users SET first_name = %s WHERE first_name = %s", ["Jon", "John"]),
    ],
    "government": [
        (
            "INSERT INTO government_users (first_name, last_name, address, birthdate) VALUES (%s, %s, %s, %s)",
            ["Cid", "Ray", "7 Road", "1990-01-01"],
        ),
        ("DELETE FROM government_users WHERE first_name = %s", ["John"]),
        ("UPDATE government_users SET address = %s, phone = %s WHERE first_name = %s", ["8 Ave", "555-9", "Jane"]),
    ],
    "insurance": [
        (
            "INSERT INTO insurance_users (first_name, last_name, address, risk_factor) VALUES (%s, %s, %s, %s)",
            ["Dee", "Fox", "4 Way", 2],
        ),
        (
            "UPDATE insurance_users SET risk_factor = %s, birthdate = %s WHERE first_name = %s",
            [9, "1981-02-03", "Jane"],
        ),
        ("UPDATE insurance_users SET last_name = %s WHERE first_name = %s", ["Doe-Smith", "John"]),
    ],
}


@pytest.fixture
def populated(net: Network) -> Network:
    net.run(*A1, commit=True)
    net.run(*A2, commit=True)
    return net


@pytest.mark.integration
@pytest.mark.parametrize("origin", sorted(BIG))
def test_every_order_of_every_combination_of_multi_row_statements_agrees(populated: Network, origin: str) -> None:
    statements = BIG[origin]
    for n in range(1, len(statements) + 1):
        for combo in itertools.combinations(statements, n):
            check_every_order(populated, origin, list(combo))


def check_every_order(net: Network, origin: str, statements: list[Statement]) -> list[Outcome]:
    """Single origin, consistent start: no order conflicts, all agree, nothing echoes, each edge used once."""
    outcomes = net.explore(origin, statements)
    after_origin = net.after_origin
    for o in outcomes:
        assert o.conflict is None, o.conflict
        assert o.state == outcomes[0].state, "the delivery order changed the final state"
        assert_no_echo(o.messages)
        assert max(o.edges().values(), default=0) <= 1, o.edges()
    assert outcomes[0].state is not None
    # the origin's own rows end as its statements left them (nothing it knew was overwritten by an echo)
    assert outcomes[0].state[origin]["base"] == sorted(
        tuple(sorted((k, str(v)) for k, v in r.items() if k != "id")) for r in after_origin
    )
    return outcomes


A2_ORDERS = 9  # the delivery orders of A2 from empty tables: its diamond, and the cycle closing on dejima_risk


def test_explore_covers_every_delivery_order_or_says_it_did_not(net: Network) -> None:
    # A2's diamond: bank's insert reaches government and insurance, which forward to each other
    every = net.explore(*A2)
    assert len(every) == A2_ORDERS
    assert len({tuple((m.sender, m.receiver, m.view, m.delivered) for m in o.messages) for o in every}) == A2_ORDERS
    assert len(net.explore(*A2, limit=A2_ORDERS)) == A2_ORDERS
    with pytest.raises(ExploreLimit, match=f"more than {A2_ORDERS - 1} delivery orders"):
        net.explore(*A2, limit=A2_ORDERS - 1)


VALUES: dict[str, list[Any]] = {
    "phone": [None, "555-1", "555-2"],
    "address": [None, "A St", '1 "Quote" St; DROP TABLE x'],
    "birthdate": [None, "1980-01-01", "1990-12-31"],
    "risk_factor": [None, 0, 5],
    "iban": [None, "DE1"],
    "insurance_number": [None, "I-1"],
}
NAMES = [JANE, JOHN, ("Ann", "Lee"), ("Bob", "Kim"), ("Cy", "O'Neil")]


@st.composite
def transactions(draw: st.DrawFn) -> tuple[str, list[Statement]]:
    """A random origin and 1-4 valid statements there (insert, update, delete, rename), from the A1+A2 state."""
    origin = draw(st.sampled_from(PEERS))
    table = sql.Identifier(TABLE[origin])
    columns = [c.name for c in TYPES[origin].table(TABLE[origin]).columns if c.name not in KEY]
    present = {JANE, JOHN}
    statements: list[Statement] = []
    for _ in range(draw(st.integers(1, 4))):
        absent = [n for n in NAMES if n not in present]
        kind = draw(st.sampled_from(["insert", "update", "delete", "rename"]))
        if kind == "insert" and absent:
            name = draw(st.sampled_from(absent))
            cols = draw(st.lists(st.sampled_from(columns), unique=True))
            values = [draw(st.sampled_from(VALUES[c])) for c in cols]
            text = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                table,
                sql.SQL(", ").join(map(sql.Identifier, [*KEY, *cols])),
                sql.SQL(", ").join(sql.Placeholder() * (len(cols) + 2)),
            )
            statements.append((text, [*name, *values]))
            present.add(name)
        elif kind == "update" and present:
            name = draw(st.sampled_from(sorted(present)))
            cols = draw(st.lists(st.sampled_from(columns), min_size=1, unique=True))
            values = [draw(st.sampled_from(VALUES[c])) for c in cols]
            sets: sql.Composable = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols)
            statements.append((sql.SQL("UPDATE {} SET {} WHERE {}").format(table, sets, WHERE_KEY), [*values, *name]))
        elif kind == "delete" and present:
            name = draw(st.sampled_from(sorted(present)))
            statements.append((sql.SQL("DELETE FROM {} WHERE {}").format(table, WHERE_KEY), list(name)))
            present.discard(name)
        elif kind == "rename" and present and absent:
            old, new = draw(st.sampled_from(sorted(present))), draw(st.sampled_from(absent))
            sets = sql.SQL("first_name = %s, last_name = %s")
            statements.append((sql.SQL("UPDATE {} SET {} WHERE {}").format(table, sets, WHERE_KEY), [*new, *old]))
            present.discard(old)
            present.add(new)
    return origin, statements


@pytest.mark.integration
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tx=transactions())
def test_random_transactions_agree_in_every_delivery_order(populated: Network, tx: tuple[str, list[Statement]]) -> None:
    check_every_order(populated, *tx)


@pytest.mark.integration
def test_swapped_keys_are_renamed_in_place_everywhere_in_every_order(populated: Network) -> None:
    """John and Jane swap keys in one transaction (a rename cycle): every peer parks one row at a temporary key."""
    before = populated.run("bank", [], commit=False)
    steps = [
        update("bank", JOHN, first_name="Tmp"),
        update("bank", JANE, first_name="John", last_name="Doe"),
        update("bank", ("Tmp", "Doe"), first_name="Jane", last_name="Roe"),
    ]
    out = all_orders(populated, "bank", [statement for _, (statement,) in steps])
    for peer in PEERS:
        assert (out.ids[peer][JOHN], out.ids[peer][JANE]) == (before.ids[peer][JANE], before.ids[peer][JOHN])
    gov = row(out, "government", JANE)  # the former John Doe: phone and address went with his row
    assert gov is not None
    assert (gov["phone"], gov["address"], gov["birthdate"]) == ("555-0100", "1 Main St", "None")


@pytest.mark.integration
def test_pre_existing_divergence_is_repaired_in_every_order(net: Network) -> None:
    """Insurance holds Eve Ray (address X St) that nobody else has; bank inserts her with 1 Main St."""
    ins = net.conns["insurance"]
    ins.execute(
        "INSERT INTO insurance_users (first_name, last_name, address, risk_factor) VALUES ('Eve', 'Ray', 'X St', 4)"
    )
    ins.commit()  # outside a global transaction: not captured, not propagated
    eve = ("Eve", "Ray")
    insert = "INSERT INTO bank_users (first_name, last_name, address, phone) VALUES (%s, %s, %s, %s)"
    out = all_orders(net, "bank", [(insert, [*eve, "1 Main", "9"])])
    got = row(out, "insurance", eve)
    assert got is not None and (got["address"], got["risk_factor"]) == ("1 Main", "None")


# ---------------------------------------------------------------------------------------------- one peer


@pytest.fixture
def gov(peer_db: Callable[..., str]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(peer_db("government")) as conn:
        conn.execute(
            "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
            " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')"
        )
        conn.commit()
        yield conn


def gx(conn: psycopg.Connection[Any], ptype: str = "government") -> GxState:
    gxid = f"t-{uuid.uuid4().hex[:8]}"
    return GxState(gxid=gxid, ptype=TYPES[ptype], conn=conn, token=register(conn, gxid), peer=ptype)


def jane_ins(**values: Any) -> dict[str, Any]:
    return {"first_name": "Jane", "last_name": "Roe", "address": "2 Elm St", "birthdate": "1980-05-17", **values}


def jane_bank(**values: Any) -> dict[str, Any]:
    return {"first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St", **values}


@pytest.mark.integration
def test_two_known_values_for_one_column_conflict(gov: psycopg.Connection[Any]) -> None:
    state = gx(gov)
    apply_delta(state, "dejima_insurance", [jane_ins(address="A St")], [jane_ins()])
    with pytest.raises(ApplyConflict) as err:
        apply_delta(state, "dejima_bank", [jane_bank(address="B St")], [jane_bank()])
    assert (err.value.view, err.value.key, err.value.column) == ("dejima_bank", ("Jane", "Roe"), "address")
    assert (err.value.ours, err.value.theirs) == ("A St", "B St")
    assert "government" in str(err.value) and "A St" in str(err.value) and "B St" in str(err.value)
    # unknown yields to known; equal known values agree
    apply_delta(state, "dejima_bank", [jane_bank(address="Z St", **{UNKNOWN: ["address"]})], [])
    apply_delta(state, "dejima_bank", [jane_bank(address="A St")], [])
    assert view_rows(gov, "dejima_bank")[0]["address"] == "A St"


@pytest.mark.integration
def test_a_new_row_merges_unknown_columns_from_a_later_branch(gov: psycopg.Connection[Any]) -> None:
    state = gx(gov)
    ann = {"first_name": "Ann", "last_name": "Lee"}
    apply_delta(state, "dejima_insurance", [{**ann, "address": None, "birthdate": None, UNKNOWN: ["address"]}], [])
    out = outgoing(state, take_changes(gov, state.token))
    assert out["dejima_bank"].insertions == [{**ann, "phone": None, "address": None, UNKNOWN: ["address", "phone"]}]
    apply_delta(state, "dejima_bank", [{**ann, "phone": "1", "address": "X"}], [])
    assert next(r for r in view_rows(gov, "dejima_insurance") if r["first_name"] == "Ann")["address"] == "X"
    # now known: a different known value is a conflict
    with pytest.raises(ApplyConflict):
        apply_delta(state, "dejima_insurance", [{**ann, "address": "Y", "birthdate": None}], [])


@pytest.mark.integration
@pytest.mark.parametrize("update_first", [True, False], ids=["update-then-delete", "delete-then-update"])
def test_delete_vs_update_from_two_branches_conflicts_in_both_orders(
    gov: psycopg.Connection[Any], update_first: bool
) -> None:
    """Also when the update changed only columns the deleting view does not carry (phone vs dejima_insurance)."""
    state = gx(gov)
    steps = [
        lambda: apply_delta(state, "dejima_bank", [jane_bank(phone="555-0000")], [jane_bank()]),
        lambda: apply_delta(state, "dejima_insurance", [], [jane_ins()]),
    ]
    if not update_first:
        steps.reverse()
    steps[0]()
    outgoing(state, take_changes(gov, state.token))  # as after every delivery: records the keys deleted
    with pytest.raises(ApplyConflict, match="Jane"):
        steps[1]()


@pytest.mark.integration
def test_an_update_that_changes_nothing_forwards_nothing(gov: psycopg.Connection[Any]) -> None:
    state = gx(gov)
    apply_delta(state, "dejima_bank", [jane_bank()], [jane_bank()])
    assert outgoing(state, take_changes(gov, state.token)) == {}
    apply_delta(state, "dejima_bank", [jane_bank()], [jane_bank()])  # and again
    assert take_changes(gov, state.token) == []


@pytest.mark.integration
def test_a_delete_is_idempotent(gov: psycopg.Connection[Any]) -> None:
    state = gx(gov)
    apply_delta(state, "dejima_insurance", [], [jane_ins()])
    out = outgoing(state, take_changes(gov, state.token))
    assert out["dejima_bank"].deletions == [jane_bank()]
    apply_delta(state, "dejima_bank", [], [jane_bank()])  # the same deletion along the other view: nothing
    apply_delta(state, "dejima_insurance", [], [jane_ins()])  # a duplicate: nothing
    assert take_changes(gov, state.token) == []
    assert view_rows(gov, "dejima_bank") == []
    assert state.deleted == {("dejima_bank", JANE), ("dejima_insurance", JANE)}


@pytest.mark.integration
def test_a_deletion_that_finds_no_row_while_transactions_are_prepared_here_says_so(
    peer_db: Callable[..., str],
) -> None:
    """A row inserted by a prepared transaction is invisible and locks nothing a read waits on: while the
    coordinator says transactions are prepared here (`unseen_possible`), a deletion that finds no row raises
    ApplyUnseen, changing nothing; a deletion this gxid already made, or one with nothing prepared, is a no-op."""
    conninfo = peer_db("government")
    ann = {"first_name": "Ann", "last_name": "Lee", "phone": "1", "address": "X"}
    with psycopg.connect(conninfo, autocommit=True) as other:
        other.execute("BEGIN")
        register(other, "t-prepared")
        other.execute("INSERT INTO dejima_bank (first_name, last_name, phone, address) VALUES ('Ann', 'Lee', '1', 'X')")
        other.execute("PREPARE TRANSACTION 'dejima-test-unseen'")
    try:
        with psycopg.connect(conninfo) as conn:
            conn.execute(
                "INSERT INTO government_users (first_name, last_name, phone, address) VALUES ('Bob', 'Ray', '2', 'Y')"
            )
            conn.commit()
            bob = {"first_name": "Bob", "last_name": "Ray", "phone": "2", "address": "Y"}
            state = gx(conn)
            state.unseen_possible = True
            renamed = {**ann, "first_name": "Anna", WAS: {"first_name": "Ann", "last_name": "Lee"}}
            for insertions, deletions in (([], [ann]), ([], [bob, ann]), ([renamed], [ann])):
                saved = state.snapshot()
                with pytest.raises(ApplyUnseen) as err:
                    apply_delta(state, "dejima_bank", insertions, deletions)
                assert (err.value.view, err.value.key) == ("dejima_bank", ("Ann", "Lee"))
                assert state.snapshot() == saved
                assert [r["first_name"] for r in view_rows(conn, "dejima_bank")] == ["Bob"]
            apply_delta(state, "dejima_bank", [], [bob])
            apply_delta(state, "dejima_bank", [], [bob])  # deleted in this gxid already: a second arrival
            state.unseen_possible = False
            apply_delta(state, "dejima_bank", [], [ann])  # nothing prepared that could hold it: gone
            assert view_rows(conn, "dejima_bank") == []
            conn.rollback()
    finally:
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute("ROLLBACK PREPARED 'dejima-test-unseen'")


@pytest.mark.integration
def test_rename_keeps_id_and_private_columns(gov: psycopg.Connection[Any]) -> None:
    (jane_id,) = [r["id"] for r in base_rows(gov, "government_users")]
    state = gx(gov)
    renamed = jane_ins(first_name="Janet", **{WAS: {"first_name": "Jane", "last_name": "Roe"}})
    apply_delta(state, "dejima_insurance", [renamed], [jane_ins()])
    out = outgoing(state, take_changes(gov, state.token))
    assert out["dejima_bank"].insertions[0][WAS] == {"first_name": "Jane", "last_name": "Roe"}
    assert out["dejima_bank"].deletions == [jane_bank()]
    (after,) = base_rows(gov, "government_users")
    assert (after["id"], after["first_name"], after["phone"]) == (jane_id, "Janet", "555-0199")
    apply_delta(
        state, "dejima_bank", [jane_bank(first_name="Janet", **{WAS: dict(zip(KEY, JANE, strict=True))})], [jane_bank()]
    )
    assert take_changes(gov, state.token) == []  # the second branch's rename finds it done


BAD: dict[str, tuple[str, list[Any], list[Any], str]] = {
    "unknown column": ("dejima_bank", [jane_bank(iban="DE1")], [], "'iban' is not a column"),
    "missing key": ("dejima_bank", [{"first_name": "Jane", "phone": None, "address": None}], [], "key column"),
    "missing column": ("dejima_bank", [{"first_name": "Jane", "last_name": "Roe", "phone": None}], [], "'address'"),
    "wrong type": ("dejima_bank", [jane_bank(phone=5550199)], [], "'phone' must be text"),
    "bad date": ("dejima_insurance", [jane_ins(birthdate="17.05.1980")], [], "not an ISO date"),
    "null key": ("dejima_bank", [jane_bank(first_name=None)], [], "may not be null"),
    "unknown view": ("dejima_risk", [], [], "unknown view"),
    "unknown key column": ("dejima_bank", [jane_bank(**{UNKNOWN: ["last_name"]})], [], "key is always known"),
    "unknown marker": ("dejima_bank", [jane_bank(**{"$x": 1})], [], "unknown marker"),
    "was on a deletion": ("dejima_bank", [], [jane_bank(**{WAS: dict(zip(KEY, JANE, strict=True))})], "unknown marker"),
    "bad was": ("dejima_bank", [jane_bank(**{WAS: {"first_name": "X"}})], [], "key columns"),
    "twice": ("dejima_bank", [jane_bank(), jane_bank(phone="1")], [], "inserted twice"),
    "renamed twice": (
        "dejima_bank",
        [jane_bank(first_name=name, **{WAS: dict(zip(KEY, JANE, strict=True))}) for name in ("Jo", "Jay")],
        [],
        r"two insertions rename key \['Jane', 'Roe'\]",
    ),
    "not a row": ("dejima_bank", ["Jane"], [], "must be an object"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_refused_and_change_nothing(gov: psycopg.Connection[Any], case: str) -> None:
    view, insertions, deletions, message = BAD[case]
    state = gx(gov)
    ok = {"first_name": "Ann", "last_name": "Lee", "phone": "1", "address": "X"}
    before = {v: view_rows(gov, v) for v in VIEWS["government"]}
    with pytest.raises(ApplyBadRequest, match=message):
        apply_delta(state, view, [ok, *insertions] if view == "dejima_bank" else insertions, deletions)
    assert {v: view_rows(gov, v) for v in VIEWS["government"]} == before
    assert take_changes(gov, state.token) == []
    assert (state.touched, state.unknown, state.deleted, state.written) == (set(), {}, set(), {})


@pytest.mark.integration
def test_a_conflict_midway_rolls_back_the_whole_delta(gov: psycopg.Connection[Any]) -> None:
    state = gx(gov)
    apply_delta(state, "dejima_insurance", [jane_ins(address="A St")], [jane_ins()])
    take_changes(gov, state.token)
    saved = state.snapshot()
    ann = {"first_name": "Ann", "last_name": "Lee", "phone": "1", "address": "X"}
    with pytest.raises(ApplyConflict):
        apply_delta(state, "dejima_bank", [ann, jane_bank(address="B St")], [jane_bank()])
    assert [r["first_name"] for r in view_rows(gov, "dejima_bank")] == ["Jane"]
    assert take_changes(gov, state.token) == []
    assert state.snapshot() == saved
    apply_delta(state, "dejima_bank", [ann], [])  # the transaction is still usable


def _people(gov: psycopg.Connection[Any]) -> None:
    gov.execute(
        "INSERT INTO government_users (first_name, last_name, phone, address) VALUES"
        " ('Ann', 'Lee', '1', 'X'), ('Bob', 'Ray', '2', 'Y'), ('Cid', 'Fox', '3', 'Z')"
    )
    gov.commit()


def person(first: str, last: str, phone: str | None, address: str | None) -> dict[str, Any]:
    return {"first_name": first, "last_name": last, "phone": phone, "address": address}


@dataclass
class Putback:
    """What a delta (no renames) on a view does to rows no one touched before in the gxid, by the merge rule of
    peer/dejima/apply.py, computed here on plain dicts: the model the many-row path is checked against."""

    rows: dict[tuple[Any, ...], dict[str, Any]]  # key -> base row (without id)
    touched: set[tuple[Any, ...]]
    deleted: set[tuple[str, tuple[Any, ...]]]
    unknown: dict[tuple[Any, ...], set[str]]
    written: dict[tuple[Any, ...], set[str]]


def putback_model(
    table: list[dict[str, Any]],
    view: str,
    columns: Sequence[str],
    insertions: list[dict[str, Any]],
    deletions: list[dict[str, Any]],
) -> Putback:
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in KEY)

    base_columns = [c for c in table[0] if c != "id"]
    rows = {key(r): {c: r[c] for c in base_columns} for r in table}
    inserted = {key(i): i for i in insertions}
    paired = {key(d): d for d in deletions if key(d) in inserted}
    out = Putback(rows, set(), set(), {}, {})
    for d in deletions:  # a deletion without an insertion of its key: a delete (of nothing: nothing)
        if key(d) not in inserted:
            rows.pop(key(d), None)
            out.deleted.add((view, key(d)))
    for k, i in inserted.items():
        unknown = set(i.get(UNKNOWN, []))
        known = {c: i[c] for c in columns if c not in unknown}
        out.touched.add(k)
        if k in rows:  # an update: the columns it changed are asserted (and win: nothing written before)
            old = paired.get(k)
            asserted = {c: v for c, v in known.items() if c not in KEY and (old is None or old[c] != v)}
            rows[k].update(asserted)
            out.written[k] = {*KEY, *asserted}
        else:  # an insert: every column it knows; the others are invented (NULL: no default declared here)
            rows[k] = {c: known.get(c) for c in base_columns}
            out.written[k] = set(known)
            out.unknown[k] = unknown | {c for c in base_columns if c not in columns}
    return out


@pytest.mark.integration
def test_a_delta_of_many_rows_ends_where_the_merge_rule_says_and_as_its_rows_one_at_a_time(
    gov: psycopg.Connection[Any],
) -> None:
    """The reads-then-writes path of a delta of several rows (no renames) ends in the base table, the captured
    changes and the marks that the merge rule gives (`putback_model`, by hand on dicts), and where applying its rows
    one by one ends."""
    _people(gov)
    insertions = [
        jane_bank(phone="555-0000"),
        person("Bob", "Ray", "2", "Y"),  # an update that changes nothing
        person("Dee", "Kim", "4", None),
        {**person("Eve", "Orr", None, None), UNKNOWN: ["phone"]},
    ]
    deletions = [
        jane_bank(),
        person("Bob", "Ray", "2", "Y"),
        person("Ann", "Lee", "1", "X"),
        person("Zed", "No", None, None),
    ]
    pairs = [
        ([insertions[0]], [deletions[0]]),
        ([insertions[1]], [deletions[1]]),
        ([insertions[2]], []),
        ([insertions[3]], []),
        ([], [deletions[2]]),
        ([], [deletions[3]]),
    ]
    before = base_rows(gov, TABLE["government"])
    bank_columns = next(v.columns for v in TYPES["government"].views if v.name == "dejima_bank")
    model = putback_model(before, "dejima_bank", bank_columns, insertions, deletions)
    views = {v.name: v.columns for v in TYPES["government"].views}

    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in KEY)

    def outcome(steps: list[tuple[list[Any], list[Any]]]) -> tuple[Any, ...]:
        state = gx(gov)
        for ins, dels in steps:
            apply_delta(state, "dejima_bank", ins, dels)
        changes = take_changes(gov, state.token)
        after = base_rows(gov, TABLE["government"])
        by_id = {r["id"]: key_of(r) for r in [*before, *after]}
        # the base table: the model's rows, the rows kept under their ids, the new ones under new ids
        assert {key_of(r): {c: v for c, v in r.items() if c != "id"} for r in after} == model.rows
        kept = {key_of(r): r["id"] for r in before}
        assert all(r["id"] == kept[key_of(r)] for r in after if key_of(r) in kept)
        assert not {r["id"] for r in after if key_of(r) not in kept} & set(kept.values())
        # every view row that changed, and only those, captured once with its old and new image
        expected_changes = set()
        for view, cols in views.items():
            for k in {*map(key_of, before), *model.rows}:
                old = next(({c: r[c] for c in cols} for r in before if key_of(r) == k), None)
                new = {c: model.rows[k][c] for c in cols} if k in model.rows else None
                if old != new:
                    expected_changes.add((view, k, canonical(old), canonical(new)))
        assert {(c.view, by_id[c.row_id], canonical(c.old), canonical(c.new)) for c in changes} == expected_changes
        assert len(changes) == len(expected_changes)
        # the marks
        assert {by_id[row_id] for _, row_id in state.touched} == model.touched
        assert state.deleted == model.deleted
        assert {by_id[row_id]: cols for (_, row_id), cols in state.unknown.items()} == model.unknown
        assert {by_id[row_id]: cols for (_, row_id), cols in state.written.items()} == model.written
        result = (
            {v: view_rows(gov, v) for v in VIEWS["government"]},
            sorted((c.view, json.dumps(c.old, sort_keys=True), json.dumps(c.new, sort_keys=True)) for c in changes),
            len(state.touched),
            sorted(state.deleted),
            sorted(tuple(sorted(m)) for m in state.unknown.values()),
            len(state.written),
        )
        gov.rollback()
        return result

    together = outcome([(insertions, deletions)])
    assert together == outcome(pairs)
    # the model's own answer, as a reader would write it down
    assert set(model.rows) == {JANE, ("Bob", "Ray"), ("Cid", "Fox"), ("Dee", "Kim"), ("Eve", "Orr")}
    assert model.rows[JANE] == {**jane_bank(phone="555-0000"), "birthdate": datetime.date(1980, 5, 17)}
    assert model.unknown == {("Dee", "Kim"): {"birthdate"}, ("Eve", "Orr"): {"phone", "birthdate"}}


@pytest.mark.integration
def test_a_failed_write_in_a_delta_of_many_rows_changes_nothing(gov: psycopg.Connection[Any]) -> None:
    _people(gov)
    gov.execute("ALTER TABLE government_users ADD CONSTRAINT short_phone CHECK (length(phone) < 9)")
    gov.commit()
    state = gx(gov)
    before = {v: view_rows(gov, v) for v in VIEWS["government"]}
    rows = [person("Ann", "Lee", "9", "X"), person("Bob", "Ray", "2", "Q"), person("Dee", "Kim", "123456789", None)]
    with pytest.raises(psycopg.errors.CheckViolation):
        apply_delta(state, "dejima_bank", rows, [person("Ann", "Lee", "1", "X"), person("Bob", "Ray", "2", "Y")])
    assert {v: view_rows(gov, v) for v in VIEWS["government"]} == before
    assert take_changes(gov, state.token) == []
    assert (state.touched, state.unknown, state.deleted, state.written) == (set(), {}, set(), {})
    apply_delta(state, "dejima_bank", rows[:2], [])  # the transaction is still usable
    assert [r["phone"] for r in view_rows(gov, "dejima_bank")][:2] == ["9", "2"]


@pytest.mark.integration
@pytest.mark.parametrize("failure", ["constraint", "lock"])
def test_failed_deltas_of_many_rows_leave_the_connection_usable(gov: psycopg.Connection[Any], failure: str) -> None:
    """A delta of several rows that fails midway (its writes, or its reads) leaves the connection able to run
    every statement of the next ones, time after time (the reads and writes go in pipelines)."""
    _people(gov)
    gov.execute("ALTER TABLE government_users ADD CONSTRAINT short_phone CHECK (length(phone) < 9)")
    gov.commit()
    holder = psycopg.connect(gov.info.dsn)
    old = [person("Ann", "Lee", "1", "X"), person("Bob", "Ray", "2", "Y")]
    for i in range(8):
        state = gx(gov)
        bad = [
            person("Ann", "Lee", "123456789" if failure == "constraint" else "1", "X"),
            person("Bob", "Ray", "2", f"Q{i}"),
        ]
        if failure == "lock":
            gov.execute("SET LOCAL lock_timeout = '20ms'")
            holder.execute("SELECT 1 FROM government_users WHERE first_name = 'Bob' FOR UPDATE")
        with pytest.raises(
            psycopg.errors.CheckViolation if failure == "constraint" else psycopg.errors.LockNotAvailable
        ):
            apply_delta(state, "dejima_bank", bad, old)
        holder.rollback()
        good = [person("Ann", "Lee", "1", f"A{i}"), person("Bob", "Ray", "2", f"B{i}")]
        apply_delta(state, "dejima_bank", good, old)
        gov.commit()
        old = good
    holder.close()
    assert [r["address"] for r in view_rows(gov, "dejima_bank")][:2] == ["A7", "B7"]


@pytest.mark.integration
def test_a_lock_probe_names_the_rows_another_transaction_holds_and_keeps_no_lock(
    gov: psycopg.Connection[Any],
) -> None:
    """`locked_elsewhere`: of the base rows at a delta's keys (a rename's old key too), those another transaction
    holds locked, without waiting for any; no lock is kept and the transaction goes on as before."""
    _people(gov)
    ids = dict(gov.execute("SELECT first_name, id FROM government_users").fetchall())
    gov.commit()
    holder, other = psycopg.connect(gov.info.dsn), psycopg.connect(gov.info.dsn)
    try:
        holder.execute("SELECT 1 FROM government_users WHERE first_name IN ('Bob', 'Cid') FOR UPDATE")
        state = gx(gov)
        gov.execute("SET LOCAL lock_timeout = '30s'")  # a wait for a held row would take this long, then fail
        insertions = [
            person("Ann", "Lee", "7", "X"),
            {**person("Dee", "Kim", "3", "Z"), WAS: {"first_name": "Cid", "last_name": "Fox"}},  # Cid, renamed
            person("Zed", "Nobody", None, None),  # no row yet
        ]
        deletions = [person("Ann", "Lee", "1", "X"), person("Cid", "Fox", "3", "Z")]
        found = locked_elsewhere(state, "dejima_bank", insertions, deletions)
        assert found == ("government_users", {ids["Cid"]})
        assert locked_elsewhere(state, "dejima_bank", [], [person("Bob", "Ray", "2", "Y")])[1] == {ids["Bob"]}
        other.execute("SELECT 1 FROM government_users WHERE first_name = 'Ann' FOR UPDATE NOWAIT")  # not kept
        other.rollback()
        with pytest.raises(ApplyBadRequest):
            locked_elsewhere(state, "dejima_bank", [{"first_name": "Ann"}], [])
        apply_delta(state, "dejima_bank", [person("Ann", "Lee", "7", "X")], [person("Ann", "Lee", "1", "X")])
        assert take_changes(gov, state.token)[0].new == person("Ann", "Lee", "7", "X")
    finally:
        holder.close()
        other.close()


LAB_MANIFEST = """\
peer_type = "lab"
[tables.samples.columns]
label = "text not null"
n = "integer not null"
big = "bigint"
amount = "numeric"
ratio = "double precision"
ok = "boolean"
taken = "date"
at = "timestamptz"
note = "text"

[views.dejima_samples]
table = "samples"
columns = ["label", "n", "big", "amount", "ratio", "ok", "taken", "at"]
key = ["label", "n"]
members = ["lab"]
"""
LAB_KEY = ("label", "n")
LAB_COLUMNS = ("label", "n", "big", "amount", "ratio", "ok", "taken", "at")


def _lab_value(column: str) -> st.SearchStrategy[Any]:
    """A value of the column in the form it has on the wire (`jsonvalues`: a fraction is a Decimal)."""
    values: dict[str, st.SearchStrategy[Any]] = {
        "big": st.integers(-(2**63), 2**63 - 1),
        "amount": st.one_of(
            st.integers(-(10**20), 10**20),
            st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=-(10**12), max_value=10**12),
        ),
        "ratio": st.floats(allow_nan=False, allow_infinity=False).map(lambda f: decimal.Decimal(repr(f))),
        "ok": st.booleans(),
        "taken": st.dates().map(lambda d: d.isoformat()),
        "at": st.datetimes(
            min_value=datetime.datetime(1900, 1, 1),
            max_value=datetime.datetime(2200, 1, 1),
            timezones=st.just(datetime.UTC),
        ).map(lambda d: d.isoformat()),
    }
    return st.one_of(st.none(), values[column])


LAB_ROW = st.fixed_dictionaries(
    {
        "label": st.sampled_from(["a", "b", "O'Brien", "Zoë", "", '1 "x"; --']),
        "n": st.integers(-(2**31), 2**31 - 1),
        **{c: _lab_value(c) for c in ("big", "amount", "ratio", "ok", "taken", "at")},
    }
)


@st.composite
def lab_cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[list[Any], list[Any]]]]:
    """Rows already there, and a delta of several rows as (insertions, deletions) pairs: updates of some rows
    (any column but the key), deletions of others, new rows; no renames."""
    rows = draw(st.lists(LAB_ROW, min_size=1, max_size=6, unique_by=lambda r: (r["label"], r["n"])))
    pairs: list[tuple[list[Any], list[Any]]] = []
    for row in rows:
        what = draw(st.sampled_from(["keep", "update", "delete"]))
        if what == "update":
            pairs.append(([{**draw(LAB_ROW), "label": row["label"], "n": row["n"]}], [row]))
        elif what == "delete":
            pairs.append(([], [row]))
    keys = {(r["label"], r["n"]) for r in rows}
    for new in draw(st.lists(LAB_ROW, max_size=4, unique_by=lambda r: (r["label"], r["n"]))):
        if (new["label"], new["n"]) not in keys:
            pairs.append(([new], []))
    return rows, pairs


def _wire(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the lab view, as read or as sent, in one form to compare: numbers exact, times parsed."""

    def one(column: str, value: Any) -> Any:
        if value is None or column in ("label", "ok"):
            return value
        if column == "ratio":
            return float(value)
        if column == "taken":
            return value if isinstance(value, datetime.date) else datetime.date.fromisoformat(value)
        if column == "at":
            return value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)
        return decimal.Decimal(value)

    return {c: one(c, v) for c, v in row.items()}


@pytest.fixture
def lab(peer_db: Callable[..., str], tmp_path: Path) -> Iterator[tuple[psycopg.Connection[Any], GxState]]:
    root = make_peer_type_root(tmp_path / "types", {"lab": LAB_MANIFEST})
    ptype = load_peer_types(root)["lab"]
    with psycopg.connect(peer_db("lab", root)) as conn:
        yield conn, GxState(gxid="-", ptype=ptype, conn=conn, token=b"", peer="lab")


@pytest.mark.integration
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=lab_cases())
def test_a_delta_of_many_rows_of_every_column_type_applies_as_its_rows_one_at_a_time(
    lab: tuple[psycopg.Connection[Any], GxState],
    case: tuple[list[dict[str, Any]], list[tuple[list[Any], list[Any]]]],
) -> None:
    """The set-based statements (values sent as text and cast back by each column's type) write what the one-row
    statements write (values sent by the driver), for every column type: the same view, the same captured
    changes; and the view reads the values sent."""
    conn, template = lab
    rows, pairs = case

    def outcome(steps: list[tuple[list[Any], list[Any]]]) -> tuple[Any, ...]:
        try:
            gxid = f"t-{uuid.uuid4().hex[:8]}"
            insert_lab = sql.SQL("INSERT INTO samples ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, LAB_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder() * len(LAB_COLUMNS)),
            )
            for row in rows:
                conn.execute(insert_lab, [row[c] for c in LAB_COLUMNS])
            state = GxState(gxid=gxid, ptype=template.ptype, conn=conn, token=register(conn, gxid), peer="lab")
            for ins, dels in steps:
                apply_delta(state, "dejima_samples", ins, dels)
            changes = taken(conn, gxid)
            result = (
                view_rows(conn, "dejima_samples", LAB_KEY),
                sorted((c.view, canonical(c.old), canonical(c.new)) for c in changes),
            )
            return result
        finally:
            conn.rollback()

    together = outcome([([i for ins, _ in pairs for i in ins], [d for _, dels in pairs for d in dels])])
    assert together == outcome(pairs)
    deleted = {(d["label"], d["n"]) for ins, dels in pairs if not ins for d in dels}
    expected = {(r["label"], r["n"]): r for r in rows if (r["label"], r["n"]) not in deleted}
    expected.update({(i["label"], i["n"]): i for ins, _ in pairs for i in ins})
    assert {(r["label"], r["n"]): _wire(r) for r in together[0]} == {k: _wire(v) for k, v in expected.items()}


@pytest.mark.integration
def test_a_filtered_view_with_defaults(peer_db: Callable[..., str], tmp_path: Path) -> None:
    """Putback defaults are unknown, a known value replaces them; a row outside the filter is refused intact."""
    root = make_peer_type_root(tmp_path / "types", {"school": SCHOOL_MANIFEST})
    ptype = load_peer_types(root)["school"]
    with psycopg.connect(peer_db("school", root)) as conn:
        state = GxState(gxid="g-school", ptype=ptype, conn=conn, token=register(conn, "g-school"), peer="school")
        ann = {"first_name": "Ann", "last_name": "Lee"}
        apply_delta(state, "dejima_grades", [{**ann, "grade": 3}], [])
        (created,) = base_rows(conn, "students")
        assert (created["university"], created["note"], created["credits"]) == ("Keio", "none", 0)
        assert state.unknown[("students", created["id"])] == {"university", "note", "enrolled", "credits"}
        out = outgoing(state, taken(conn, "g-school"))
        assert out["dejima_students"].insertions == [{**ann, "university": "Keio", "grade": 3, UNKNOWN: ["university"]}]
        apply_delta(state, "dejima_students", [{**ann, "university": "Todai", "grade": 3}], [])
        assert base_rows(conn, "students")[0]["university"] == "Todai"
        assert "university" not in state.unknown[("students", created["id"])]
        taken(conn, "g-school")
        saved = state.snapshot()
        bob = {"first_name": "Bob", "last_name": "Kim", "university": "Hosei", "grade": 1}
        cid = {"first_name": "Cid", "last_name": "Ray", "university": "Todai", "grade": 2}
        with pytest.raises(psycopg.errors.CheckViolation):
            apply_delta(state, "dejima_students", [cid, bob], [])
        assert state.snapshot() == saved
        assert [r["grade"] for r in base_rows(conn, "students")] == [3]  # the first row was rolled back too
        assert taken(conn, "g-school") == []


# ---------------------------------------------------------------------------------------------- pure functions


@pytest.mark.unit
def test_outgoing_marks_unknown_columns_and_key_changes() -> None:
    state = GxState(gxid="g", ptype=TYPES["insurance"], conn=None, token=b"")  # type: ignore[arg-type]  # outgoing never queries
    state.unknown[("insurance_users", 7)] = {"address", "birthdate", "insurance_number"}
    old = {"first_name": "A", "last_name": "B", "address": None, "birthdate": None}
    new = {**old, "first_name": "C"}
    out = outgoing(state, [RowChange("dejima_insurance", 7, old, new), RowChange("dejima_risk", 8, None, {**old})])
    (ins,) = out["dejima_insurance"].insertions
    assert ins[UNKNOWN] == ["address", "birthdate"]
    assert ins[WAS] == {"first_name": "A", "last_name": "B"}
    assert UNKNOWN not in out["dejima_risk"].insertions[0]
    assert state.touched == {("insurance_users", 7), ("insurance_users", 8)}
    assert state.deleted == {("dejima_insurance", ("A", "B"))}


@pytest.mark.unit
def test_outgoing_gives_each_views_delta_and_marks_what_the_origins_statements_wrote() -> None:
    """The origin's statements at government changed four rows: an update of a phone (row 1), a new row whose
    address and birthdate putback invented (row 2, never touched before: its columns count as written but those),
    a delete (row 3) and a rename (row 4); row 5 was written by apply_delta before (its marks are kept)."""
    state = GxState(gxid="g", ptype=TYPES["government"], conn=None, token=b"")  # type: ignore[arg-type]  # no query
    state.unknown[("government_users", 2)] = {"address", "birthdate"}
    state.touched.add(("government_users", 5))
    state.written[("government_users", 5)] = {"first_name", "last_name"}
    jane = {"first_name": "Jane", "last_name": "Roe", "phone": "1", "address": "A"}
    new = {"first_name": "Ann", "last_name": "Lee", "phone": "2", "address": None}
    gone = {"first_name": "Bob", "last_name": "Ray", "phone": "3", "address": "B"}
    old_cid = {"first_name": "Cid", "last_name": "Fox", "phone": "4", "address": "C"}
    dee = {"first_name": "Dee", "last_name": "Kim", "phone": "5", "address": "D"}
    changes = [
        RowChange("dejima_bank", 1, jane, {**jane, "phone": "9"}),
        RowChange("dejima_bank", 2, None, new),
        RowChange("dejima_bank", 3, gone, None),
        RowChange("dejima_bank", 4, old_cid, {**old_cid, "first_name": "Cy"}),
        RowChange("dejima_bank", 5, dee, {**dee, "phone": "6"}),
        RowChange(
            "dejima_insurance", 4, {"first_name": "Cid", "last_name": "Fox", "address": "C", "birthdate": None}, None
        ),
    ]
    out = outgoing(state, changes)
    assert set(out) == {"dejima_bank", "dejima_insurance"}
    bank, insurance = out["dejima_bank"], out["dejima_insurance"]
    assert isinstance(bank, ViewDelta) and isinstance(insurance, ViewDelta)
    assert (bank.view, bank.key, insurance.view, insurance.key) == ("dejima_bank", KEY, "dejima_insurance", KEY)
    assert bank.insertions == [
        {**jane, "phone": "9"},
        {**new, UNKNOWN: ["address"]},  # birthdate is not a column of this view
        {**old_cid, "first_name": "Cy", WAS: {"first_name": "Cid", "last_name": "Fox"}},
        {**dee, "phone": "6"},
    ]
    assert bank.deletions == [jane, gone, old_cid, dee]
    assert insurance.insertions == []
    assert insurance.deletions == [{"first_name": "Cid", "last_name": "Fox", "address": "C", "birthdate": None}]
    assert state.touched == {("government_users", n) for n in (1, 2, 3, 4, 5)}
    assert state.deleted == {
        ("dejima_bank", ("Bob", "Ray")),
        ("dejima_bank", ("Cid", "Fox")),
        ("dejima_insurance", ("Cid", "Fox")),
    }
    assert state.written == {
        ("government_users", 1): {"phone"},
        ("government_users", 2): {"first_name", "last_name", "phone"},
        ("government_users", 4): {"first_name"},
        ("government_users", 5): {"first_name", "last_name"},  # apply_delta's marks, kept
    }


@pytest.mark.unit
def test_without_echo_drops_what_the_sender_has_and_keeps_pairs_together() -> None:
    a0 = {"first_name": "A", "last_name": "B", "x": 0}
    a1 = {**a0, "x": 1}
    c = {"first_name": "C", "last_name": "D", "x": 2}
    mine = ViewDelta("v", [a1, c], [a0], key=KEY)
    # the sender sent the same new row for A: the whole update pair is dropped, C stays
    echo = without_echo(mine, Delta("v", [dict(a1)], []))
    assert (echo.insertions, echo.deletions) == ([c], [])
    # same values but the sender's row had x unknown: not the same row, it is sent; and the other way round
    assert without_echo(mine, Delta("v", [{**a1, UNKNOWN: ["x"]}], [])).insertions == [a1, c]
    unsure = {**a1, UNKNOWN: ["x"]}
    assert without_echo(ViewDelta("v", [unsure], [a0], key=KEY), Delta("v", [dict(a1)], [])).insertions == [unsure]
    # the sender deleted A itself: a lone deletion goes; one paired with a kept insertion stays with it
    assert without_echo(ViewDelta("v", [c], [a0], key=KEY), Delta("v", [], [a0])).deletions == []
    assert without_echo(mine, Delta("v", [], [a0])).deletions == [a0]
    renamed = {**a1, "first_name": "Z", WAS: {"first_name": "A", "last_name": "B"}}
    assert without_echo(ViewDelta("v", [renamed], [a0], key=KEY), Delta("v", [dict(renamed)], [])).is_empty()


@pytest.mark.unit
def test_without_echo_keeps_what_the_sender_lacks_and_answers_a_delta_of_the_view_with_its_key() -> None:
    a0 = {"first_name": "A", "last_name": "B", "x": 0}
    c = {"first_name": "C", "last_name": "D", "x": 2}
    renamed = {**a0, "first_name": "Z", WAS: {"first_name": "A", "last_name": "B"}}
    # a lone deletion the sender did not send stays; so does a rename it did not send, with its deletion
    kept = without_echo(ViewDelta("v", [renamed], [a0, c], key=KEY), Delta("v", [{**c, "x": 3}], []))
    assert isinstance(kept, ViewDelta)
    assert (kept.view, kept.key, kept.insertions, kept.deletions) == ("v", KEY, [renamed], [a0, c])
    # the key comes from whichever delta knows it: a plain delta answered against the sender's view delta
    plain = without_echo(Delta("v", [c], [a0]), ViewDelta("v", [], [a0], key=KEY))
    assert isinstance(plain, ViewDelta)
    assert (plain.view, plain.key, plain.insertions, plain.deletions) == ("v", KEY, [c], [])
    # neither knows the key: rows are told apart by all their values
    unkeyed = without_echo(Delta("v", [c, a0], [a0, c]), Delta("v", [dict(c)], [dict(a0)]))
    assert (unkeyed.key, unkeyed.insertions, unkeyed.deletions) == ((), [a0], [c])  # type: ignore[attr-defined]
