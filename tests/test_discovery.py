"""Cluster tier: discovery and groups (ARCHITECTURE.md "Discovery and groups"; docs/scenarios.md, the peer groups).

Every peer ends with the peer-group table of docs/scenarios.md (only the groups it belongs to) whatever the start order;
a peer that starts late, restarts or moves to another address is found again; groups are persisted in each peer's
database; a view with the same name but another definition is refused on both sides, with the reason in the API.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.dejima.auth import public_b64, sign_envelope
from peer.dejima.directory import catalog_of
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import load_peer_types
from peer.dejima.sqlgen import write_all
from peer.network import LocalNetwork, PeerSpec, example_specs, free_port
from peer.pgserver import PgServer

pytestmark = pytest.mark.cluster

PEERS = ("government", "bank", "insurance")
ALL = ["bank", "government", "insurance"]
# docs/scenarios.md "Peer groups of the example": (views the attributes occur in, attributes, peers)
PEER_GROUPS = [
    (["dejima_bank"], ["phone"], ["bank", "government"]),
    (["dejima_insurance"], ["birthdate"], ["government", "insurance"]),
    (["dejima_risk"], ["risk_factor"], ["bank", "insurance"]),
    (["dejima_bank", "dejima_insurance"], ["address"], ALL),
    (["dejima_bank", "dejima_insurance", "dejima_risk"], ["first_name", "last_name"], ALL),
]
GROUPS = {
    "government": {"dejima_bank": ["bank", "government"], "dejima_insurance": ["government", "insurance"]},
    "bank": {"dejima_bank": ["bank", "government"], "dejima_risk": ["bank", "insurance"]},
    "insurance": {"dejima_insurance": ["government", "insurance"], "dejima_risk": ["bank", "insurance"]},
}
TYPES = load_peer_types(SQL_ROOT)
FORM_TIMEOUT = 30.0  # seconds for groups to form (discovery backoff is capped at 15 s by default)


def expected_peer_groups(peer: str) -> list[dict[str, Any]]:
    """The rows of the table that `peer` belongs to (a peer stores only those)."""
    return [{"views": v, "attributes": a, "peers": p} for v, a, p in PEER_GROUPS if peer in p]


def canonical(groups: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(g, sort_keys=True) for g in groups)


# ---- helpers ----------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:  # a peer still starting
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what()}")
        time.sleep(0.05)


def status(net: LocalNetwork, peer: str) -> dict[str, Any]:
    st: dict[str, Any] = net.get(peer, "/api/v1/status")
    return st


def has_table(net: LocalNetwork, peer: str) -> bool:
    st = status(net, peer)
    return st["groups"] == GROUPS[peer] and canonical(st["peer_groups"]) == canonical(expected_peer_groups(peer))


def describe(net: LocalNetwork, peers: tuple[str, ...] = PEERS) -> Callable[[], str]:
    def text() -> str:
        out = []
        for peer in peers:
            try:
                st = status(net, peer)
                out.append(f"{peer}: groups {st['groups']} peer_groups {st['peer_groups']} peers {st['peers']}")
            except OSError as exc:
                out.append(f"{peer}: {exc}")
            out.append(f"--- log of {peer} ---\n{net.tail(peer, 20)}")
        return "the peer-group table\n" + "\n".join(out)

    return text


def wait_for_table(net: LocalNetwork, peers: tuple[str, ...] = PEERS) -> None:
    wait_until(lambda: all(has_table(net, p) for p in peers), FORM_TIMEOUT, describe(net, peers))


def assert_table(net: LocalNetwork) -> None:
    """Status and /api/v1/groups of every peer show exactly its rows of the table."""
    for peer in PEERS:
        st = status(net, peer)
        assert st["groups"] == GROUPS[peer], peer
        assert canonical(st["peer_groups"]) == canonical(expected_peer_groups(peer)), peer
        groups = net.get(peer, "/api/v1/groups")
        assert groups["groups"] == GROUPS[peer], peer
        assert canonical(groups["peer_groups"]) == canonical(expected_peer_groups(peer)), peer


def db(net: LocalNetwork, peer: str) -> psycopg.Connection[Any]:
    return psycopg.connect(net.server.url(net.specs[peer].database), autocommit=True)


def persisted_groups(net: LocalNetwork, peer: str) -> dict[str, list[str]]:
    with db(net, peer) as conn:
        rows = conn.execute("SELECT view_name, peer FROM dejima.groups ORDER BY view_name, peer").fetchall()
    out: dict[str, list[str]] = {}
    for view, member in rows:
        out.setdefault(view, []).append(member)
    return out


def persisted_peer_groups(net: LocalNetwork, peer: str) -> list[dict[str, Any]]:
    with db(net, peer) as conn:
        row = conn.execute("SELECT value FROM dejima.state WHERE key = 'peer_groups'").fetchone()
    assert row is not None, f"{peer} has no peer_groups in dejima.state"
    value: list[dict[str, Any]] = row[0]
    return value


NetworkFactory = Callable[..., LocalNetwork]


@pytest.fixture
def make_network(
    pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[NetworkFactory]:
    """make_network(specs=None) -> a new example network (not started); stopped and its databases dropped after."""
    made: list[LocalNetwork] = []

    def make(specs: list[PeerSpec] | None = None) -> LocalNetwork:
        prefix = f"d{uuid.uuid4().hex[:6]}_"
        net = LocalNetwork(
            pg_server, tmp_path_factory.mktemp("discovery"), specs or example_specs(base_port=0, prefix=prefix)
        )
        made.append(net)
        return net

    yield make
    for net in made:
        print_logs_on_failure(request, net)
        shut_down(net, pg_server)


def shut_down(net: LocalNetwork, pg_server: PgServer) -> None:
    """Kill every peer (fast: graceful stops are not under test here) and drop its database."""
    for name in net.specs:
        net.kill(name)
    for spec in net.specs.values():
        pg_server.drop_database(spec.database)


def print_logs_on_failure(request: pytest.FixtureRequest, net: LocalNetwork) -> None:
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for name in net.specs:
            print(f"\n----- log of peer {name} -----\n{net.tail(name, 60)}")


# ---- the table, whatever the start order ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [("government", "bank", "insurance"), ("insurance", "bank", "government"), ("bank", "insurance", "government")],
    ids="-".join,
)
def test_it_forms_the_peer_group_table_whatever_the_start_order(
    make_network: NetworkFactory, order: tuple[str, str, str]
) -> None:
    net = make_network()
    first, second, third = order
    net.start(first)
    net.wait_healthy(first)
    net.start(second)
    net.wait_healthy(second)
    # the first two find each other (every two example peers share a view) while the third is still missing
    wait_until(
        lambda: (
            any(second in m for m in status(net, first)["groups"].values())
            and any(first in m for m in status(net, second)["groups"].values())
        ),
        FORM_TIMEOUT,
        describe(net, (first, second)),
    )
    net.start(third)  # starts late: the others have been failing to greet it
    net.wait_healthy(third)

    wait_for_table(net)

    assert_table(net)
    # (what each peer persisted is checked below, without the race of test_it_persists_every_peer_…)


def test_a_peer_greets_the_peers_a_greeting_named_at_once_not_at_its_next_cycle(make_network: NetworkFactory) -> None:
    """A chain of seeds (government knows only bank, bank only insurance) and cycles 60 s apart: government hears
    of insurance in bank's answer and greets it at once, so both know each other within seconds (at the next
    cycle it would take a minute: bank tells insurance of government only when it greets it again, 10 cycles on)."""
    net = make_network()
    for spec in net.specs.values():
        spec.env["DEJIMA_DISCOVERY_INTERVAL"] = "60"
    net.specs["government"].env["DEJIMA_SEEDS"] = net.specs["bank"].message_url
    net.specs["bank"].env["DEJIMA_SEEDS"] = net.specs["insurance"].message_url
    net.specs["insurance"].env["DEJIMA_SEEDS"] = ""
    for name in ("insurance", "bank", "government"):  # each one's seed is up when it starts
        net.start(name)
        net.wait_healthy(name)

    def knows(observer: str, peer: str) -> bool:
        return any(p["name"] == peer and p["status"] == "up" for p in status(net, observer)["peers"])

    wait_until(
        lambda: knows("government", "insurance") and knows("insurance", "government"),
        15,
        describe(net),
    )
    wait_for_table(net)
    assert_table(net)


# ---- found again ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def formed(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """One example network for the restart tests (module-scoped); each test leaves it whole."""
    prefix = f"r{uuid.uuid4().hex[:6]}_"
    net = LocalNetwork(pg_server, tmp_path_factory.mktemp("formed"), example_specs(base_port=0, prefix=prefix))
    try:
        net.start_all()
        net.wait_ready(timeout=60)
        wait_for_table(net)
        yield net
    finally:
        shut_down(net, pg_server)


@pytest.fixture
def whole(formed: LocalNetwork, request: pytest.FixtureRequest) -> Iterator[LocalNetwork]:
    for name, spec in formed.specs.items():
        if not spec.pid:
            formed.start(name)
    formed.wait_ready(timeout=60)
    wait_for_table(formed)
    yield formed
    print_logs_on_failure(request, formed)


def seen_since(net: LocalNetwork, observer: str, peer: str, since: float, url: str | None = None) -> bool:
    for known in status(net, observer)["peers"]:
        if known["name"] == peer:
            return bool(
                known["status"] == "up" and known["last_seen"] >= since and (url is None or known["url"] == url)
            )
    return False


def test_it_finds_a_peer_again_after_it_was_killed_and_restarted(whole: LocalNetwork) -> None:
    net = whole
    net.kill("insurance")
    restarted = time.time()
    net.start("insurance")
    net.wait_healthy("insurance")

    wait_until(
        lambda: all(seen_since(net, o, "insurance", restarted) for o in ("government", "bank")),
        FORM_TIMEOUT,
        describe(net),
    )
    wait_for_table(net)
    assert_table(net)


def test_it_finds_a_peer_again_that_comes_back_at_another_address(whole: LocalNetwork) -> None:
    net = whole
    net.stop("bank")
    net.specs["bank"].port = free_port()
    net.specs["bank"].message_port = free_port()  # what it advertises (DEJIMA_URL): its listener for peer messages
    new_url = net.specs["bank"].message_url
    moved = time.time()
    net.start("bank")
    net.wait_healthy("bank")

    wait_until(
        lambda: all(seen_since(net, o, "bank", moved, new_url) for o in ("government", "insurance")),
        FORM_TIMEOUT,
        describe(net),
    )
    wait_for_table(net)
    assert_table(net)
    # and it is reached there: a government write goes to bank's new address
    status_code, body = net.exec(
        "government", "INSERT INTO government_users (first_name, last_name) VALUES ('Moved', 'Bank')"
    )
    assert (status_code, body.get("participants")) == (200, ["bank", "insurance"]), body
    assert net.query("bank", "SELECT first_name FROM bank_users WHERE last_name = 'Bank'") == [{"first_name": "Moved"}]


# ---- persistence ------------------------------------------------------------------------------------------------


# The peers the tests play (greeting a lone government): their keys, trusted by that government.
PLAYED = ["bank", "insurance", *(f"bank-{burst}-{i}" for burst in range(5) for i in range(16))]
PLAYED_TYPES = {name: name if name in ("bank", "insurance") else "bank" for name in PLAYED}
PLAYED_KEYS = {name: Ed25519PrivateKey.generate() for name in PLAYED}


def hello_from(peer_type: str, name: str, url: str) -> dict[str, Any]:
    """The greeting a peer of `peer_type` named `name` at `url` sends (its real catalog), signed with its key."""
    body = {"peer": name, "url": url, "peer_type": peer_type, "catalog": catalog_of(TYPES[peer_type]), "known": []}
    return sign_envelope({"protocol": "dejima/1", "kind": "hello", "body": body}, name, PLAYED_KEYS[name])


def greet(net: LocalNetwork, peer: str, message: dict[str, Any]) -> None:
    resp = requests.post(net.specs[peer].url + "/peer/v1/message", json=message, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["kind"] == "hello", resp.text


@pytest.fixture
def lone_government(make_network: NetworkFactory, tmp_path: Path) -> LocalNetwork:
    """Only the government peer runs (no seeds); the test plays the other peers by greeting it (it trusts their keys:
    DEJIMA_TRUSTED_KEYS_FILE, each bound to the type it plays)."""
    specs = [s for s in example_specs(base_port=0, prefix=f"g{uuid.uuid4().hex[:6]}_") if s.name == "government"]
    trusted = tmp_path / "trusted_keys"
    trusted.write_text("".join(f"{name} {public_b64(key)} {PLAYED_TYPES[name]}\n" for name, key in PLAYED_KEYS.items()))
    specs[0].env["DEJIMA_TRUSTED_KEYS_FILE"] = str(trusted)
    net = make_network(specs)
    net.start("government")
    net.wait_healthy("government")
    return net


def test_it_keeps_its_groups_in_its_database_and_reloads_them_at_restart(lone_government: LocalNetwork) -> None:
    net = lone_government
    for name in ("bank", "insurance"):  # greeted one after the other; these peers never run
        greet(net, "government", hello_from(name, name, f"http://127.0.0.1:{free_port()}"))
    assert has_table(net, "government")

    assert persisted_groups(net, "government") == GROUPS["government"]
    assert canonical(persisted_peer_groups(net, "government")) == canonical(expected_peer_groups("government"))

    net.kill("government")
    net.start("government")
    net.wait_healthy("government")

    # nobody else is up: what it shows comes from its database
    assert has_table(net, "government"), describe(net, ("government",))()
    assert persisted_groups(net, "government") == GROUPS["government"]


def test_it_persists_every_peer_it_learns_at_the_same_time(lone_government: LocalNetwork) -> None:
    net = lone_government
    for burst in range(5):
        names = [f"bank-{burst}-{i}" for i in range(16)]
        hellos = [hello_from("bank", name, f"http://127.0.0.1:{free_port()}") for name in names]
        with ThreadPoolExecutor(len(hellos)) as pool:
            list(pool.map(lambda m: greet(net, "government", m), hellos))
        live = status(net, "government")["groups"]["dejima_bank"]
        assert set(names) <= set(live)
        assert persisted_groups(net, "government")["dejima_bank"] == live, f"burst {burst}"


# ---- an incompatible definition of a shared view ----------------------------------------------------------------


def root_without_phone(root: Path) -> Path:
    """A copy of sql_triggers/ where dejima_bank lacks `phone` (same view name, other columns). A root must be
    consistent in itself, so both members' manifests change there; only the bank peer runs from this root."""
    shutil.copytree(SQL_ROOT, root)
    old = 'columns = ["first_name", "last_name", "phone", "address"]'
    for member in ("bank", "government"):
        manifest = root / member / "manifest.toml"
        text = manifest.read_text()
        assert text.count(old) == 1, f"the {member} manifest changed; update this test"
        manifest.write_text(text.replace(old, 'columns = ["first_name", "last_name", "address"]'))
    write_all(root)
    return root


@pytest.fixture(scope="module")
def incompatible(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """The example network with bank running a dejima_bank without `phone`, once the refusal is visible at both."""
    root = root_without_phone(tmp_path_factory.mktemp("root") / "sql_triggers")
    specs = example_specs(base_port=0, prefix=f"i{uuid.uuid4().hex[:6]}_")
    for spec in specs:
        if spec.name == "bank":
            spec.env["DEJIMA_SQL_ROOT"] = str(root)
    net = LocalNetwork(pg_server, tmp_path_factory.mktemp("incompatible"), specs)

    def refused() -> bool:
        gov = {p["name"]: p for p in status(net, "government")["peers"]}
        bank = {p["name"]: p for p in status(net, "bank")["peers"]}
        return (
            "dejima_bank" in gov.get("bank", {}).get("incompatible", {})
            and "dejima_bank" in bank.get("government", {}).get("incompatible", {})
            and status(net, "bank")["groups"].get("dejima_risk") == ["bank", "insurance"]
            and status(net, "government")["groups"].get("dejima_insurance") == ["government", "insurance"]
        )

    try:
        net.start_all()
        for peer in PEERS:
            net.wait_healthy(peer)
        wait_until(refused, FORM_TIMEOUT, describe(net))
        yield net
    finally:
        shut_down(net, pg_server)


def test_it_refuses_an_incompatible_view_definition_on_both_sides(incompatible: LocalNetwork) -> None:
    net = incompatible
    gov, bank = status(net, "government"), status(net, "bank")

    # the view's group excludes the other peer, at both
    assert gov["groups"]["dejima_bank"] == ["government"]
    assert bank["groups"]["dejima_bank"] == ["bank"]
    assert net.get("government", "/api/v1/groups")["groups"]["dejima_bank"] == ["government"]
    assert net.get("bank", "/api/v1/groups")["groups"]["dejima_bank"] == ["bank"]
    assert persisted_groups(net, "government")["dejima_bank"] == ["government"]
    assert persisted_groups(net, "bank")["dejima_bank"] == ["bank"]
    # the other views are not affected
    assert bank["groups"]["dejima_risk"] == ["bank", "insurance"]
    assert gov["groups"]["dejima_insurance"] == ["government", "insurance"]
    # the reason is shown, naming the view and both definitions
    reason_at_gov = next(p for p in gov["peers"] if p["name"] == "bank")["incompatible"]["dejima_bank"]
    reason_at_bank = next(p for p in bank["peers"] if p["name"] == "government")["incompatible"]["dejima_bank"]
    for reason in (reason_at_gov, reason_at_bank):
        assert "dejima_bank" in reason
        assert "differs" in reason
        assert "phone" in reason
    # and logged loudly at both
    assert "refusing view dejima_bank" in net.log_path("government").read_text()
    assert "refusing view dejima_bank" in net.log_path("bank").read_text()


def test_it_refuses_a_write_to_a_view_whose_member_is_incompatible(incompatible: LocalNetwork) -> None:
    net = incompatible
    code, body = net.exec(
        "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('In', 'Compatible', '1')"
    )
    assert code >= 400, body
    assert "bank" in body["error"], body
    assert net.query("government", "SELECT * FROM government_users") == []
    assert net.query("bank", "SELECT * FROM bank_users") == []


def test_it_says_why_a_write_to_a_view_with_an_incompatible_member_is_refused(incompatible: LocalNetwork) -> None:
    code, body = incompatible.exec(
        "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('In', 'Compatible', '2')"
    )
    assert code >= 400, body
    assert "incompatible" in body["error"], body
