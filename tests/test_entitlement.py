"""Identity is not entitlement: which of a peer's views a partner may hold comes from the peer's own configuration
(DEJIMA_TRUSTED_KEYS[_FILE]: each key bound to a peer type, or to views), never from what the partner announces.

Unit: the formats of both settings, and which views follow from a peer type (the manifests' `members`). Cluster: the
attack found on the example (insurance, signing with its real key, claims government's `dejima_bank`): the claim is
refused and logged, insurance gets no `dejima_bank` row, government's writes keep working; a propagate for a view
its sender is not entitled to is refused with 403 and applies nothing anywhere; a greeting announcing another peer
type is refused as a whole; and a network configured with explicit lists of views.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.dejima.auth import public_b64
from peer.dejima.config import (
    ConfigError,
    Entitlement,
    Trust,
    load_config,
    parse_trusted_keys,
    resolve_entitlements,
    views_for_type,
)
from peer.dejima.directory import catalog_of
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import load_peer_types
from peer.network import LocalNetwork
from tests.helpers import AGENCY, SCHOOL_MANIFEST, UNIVERSITY, check, make_peer_type_root, sign_as, wait_until

TYPES = load_peer_types(SQL_ROOT)
KEYS = {name: public_b64(Ed25519PrivateKey.generate()) for name in ("government", "bank", "insurance", "acme")}
PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
MESSAGE = "/peer/v1/message"


def env(peer_type: str = "government", **settings: str) -> dict[str, str]:
    return {
        "PEER_TYPE": peer_type,
        "DEJIMA_DATABASE_URL": "postgresql://peer@127.0.0.1:5432/x",
        "DEJIMA_CLIENT_DATABASE_URL": "postgresql://client@127.0.0.1:5432/x",
        "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
        **settings,
    }


# ---- unit: the formats and what follows from them ------------------------------------------------------------------


@pytest.mark.unit
def test_a_peer_type_entitles_to_the_views_whose_members_include_it() -> None:
    assert views_for_type(TYPES["government"], "bank") == {"dejima_bank"}
    assert views_for_type(TYPES["government"], "insurance") == {"dejima_insurance"}
    assert views_for_type(TYPES["government"], "government") == {"dejima_bank", "dejima_insurance"}
    assert views_for_type(TYPES["bank"], "insurance") == {"dejima_risk"}
    assert views_for_type(TYPES["insurance"], "bank") == {"dejima_risk"}
    assert views_for_type(TYPES["bank"], "government") == {"dejima_bank"}


@pytest.mark.unit
def test_it_reads_both_forms_of_each_setting(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted_keys"
    trusted.write_text(
        "# name key type | name key views=…\n"
        f"insurance {KEYS['insurance']} insurance  # a comment\n"
        f"\nacme {KEYS['acme']} views=dejima_insurance,dejima_bank\n"
    )
    config = load_config(
        env(
            DEJIMA_TRUSTED_KEYS=f"bank={KEYS['bank']}@bank,government={KEYS['government']}@government",
            DEJIMA_TRUSTED_KEYS_FILE=str(trusted),
        )
    )
    assert config.trusted_keys == {name: KEYS[name] for name in ("bank", "government", "insurance", "acme")}
    assert config.entitlements == {
        "bank": Entitlement("bank", frozenset({"dejima_bank"})),
        "government": Entitlement("government", frozenset({"dejima_bank", "dejima_insurance"})),
        "insurance": Entitlement("insurance", frozenset({"dejima_insurance"})),
        "acme": Entitlement("", frozenset({"dejima_bank", "dejima_insurance"})),
    }
    assert config.entitlements["acme"].describe() == "views=dejima_bank, dejima_insurance"
    assert config.entitlements["insurance"].describe() == "insurance: dejima_insurance"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("grant", "views"),
    [
        ("dejima_bank+dejima_insurance", {"dejima_bank", "dejima_insurance"}),
        ("views=dejima_insurance", {"dejima_insurance"}),
        ("views=dejima_bank+dejima_bank", {"dejima_bank"}),
        ("dejima_bank", {"dejima_bank"}),  # a single name that is no peer type: a view
    ],
)
def test_views_may_be_named_instead_of_a_peer_type(grant: str, views: set[str]) -> None:
    config = load_config(env(DEJIMA_TRUSTED_KEYS=f"acme={KEYS['acme']}@{grant}"))
    assert config.entitlements == {"acme": Entitlement("", frozenset(views))}


@pytest.mark.unit
def test_parsing_keeps_the_binding_as_written() -> None:
    assert parse_trusted_keys("S", f"a={KEYS['bank']}@bank") == {"a": Trust(KEYS["bank"], "bank")}
    assert parse_trusted_keys("S", f"a {KEYS['bank']} views=v2,v1", lines=True) == {
        "a": Trust(KEYS["bank"], "", ("v1", "v2"))
    }
    assert parse_trusted_keys("S", f"a={KEYS['bank']}@v1+v2") == {"a": Trust(KEYS["bank"], "", ("v1", "v2"))}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "setting", "says"),
    [
        ({"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}"}, "DEJIMA_TRUSTED_KEYS", "without an entitlement"),
        ({"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@"}, "DEJIMA_TRUSTED_KEYS", "without an entitlement"),
        ({"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@bakery"}, "DEJIMA_TRUSTED_KEYS", "'bakery' is neither a peer"),
        ({"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@Bank"}, "DEJIMA_TRUSTED_KEYS", "not a peer type or a list"),
        (
            {"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@dejima_bank+dejima_risk"},
            "DEJIMA_TRUSTED_KEYS",
            "'dejima_risk' is not a view of this peer",
        ),
        (
            {"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@views=bank"},
            "DEJIMA_TRUSTED_KEYS",
            "'bank' is not a view of this peer",
        ),
        (
            {"DEJIMA_TRUSTED_KEYS": f"government={KEYS['government']}@bank"},
            "DEJIMA_TRUSTED_KEYS",
            "is this peer, of type 'government'",
        ),
        (
            {"DEJIMA_TRUSTED_KEYS": f"bank={KEYS['bank']}@bank,bank={KEYS['bank']}@insurance"},
            "DEJIMA_TRUSTED_KEYS",
            "given twice",
        ),
    ],
)
def test_a_key_without_a_valid_entitlement_stops_the_peer_naming_the_setting(
    settings: dict[str, str], setting: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env(**settings))
    assert err.value.setting == setting
    assert says in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("line", "says"),
    [
        (f"bank {KEYS['bank']}\n", "without an entitlement"),
        (f"bank {KEYS['bank']} insurance extra\n", "is not a line 'name base64key peer_type'"),
        (f"bank {KEYS['bank']} bakery\n", "'bakery' is neither a peer type"),
        (f"bank {KEYS['bank']} views=dejima_bank,dejima_nope\n", "'dejima_nope' is not a view of this peer"),
        (f"bank {KEYS['bank']} views=\n", "not a peer type or a list of views"),
    ],
)
def test_a_bad_line_of_the_file_stops_the_peer_naming_the_setting(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "trusted_keys"
    path.write_text(line)
    with pytest.raises(ConfigError) as err:
        load_config(env(DEJIMA_TRUSTED_KEYS_FILE=str(path)))
    assert err.value.setting == "DEJIMA_TRUSTED_KEYS_FILE"
    assert says in str(err.value)


@pytest.mark.unit
def test_the_setting_and_the_file_must_agree_on_a_peer(tmp_path: Path) -> None:
    path = tmp_path / "trusted_keys"
    path.write_text(f"bank {KEYS['bank']} views=dejima_bank\n")
    with pytest.raises(ConfigError, match=r"^DEJIMA_TRUSTED_KEYS_FILE: 'bank' has another key or entitlement"):
        load_config(env(DEJIMA_TRUSTED_KEYS=f"bank={KEYS['bank']}@bank", DEJIMA_TRUSTED_KEYS_FILE=str(path)))
    path.write_text(f"bank {KEYS['bank']} bank\n")  # the same binding twice is fine
    assert load_config(env(DEJIMA_TRUSTED_KEYS=f"bank={KEYS['bank']}@bank", DEJIMA_TRUSTED_KEYS_FILE=str(path)))


@pytest.mark.unit
def test_a_known_type_that_shares_nothing_here_is_entitled_to_nothing(tmp_path: Path) -> None:
    root = make_peer_type_root(
        tmp_path / "types", {"school": SCHOOL_MANIFEST, "university": UNIVERSITY, "agency": AGENCY}
    )
    types = load_peer_types(root)
    trusts = {"uni": ("DEJIMA_TRUSTED_KEYS", Trust(KEYS["bank"], "university"))}
    assert resolve_entitlements(trusts, "school", "school", types) == {"uni": Entitlement("university", frozenset())}
    trusts = {"agency": ("DEJIMA_TRUSTED_KEYS", Trust(KEYS["bank"], "agency"))}
    assert resolve_entitlements(trusts, "uni", "university", types) == {
        "agency": Entitlement("agency", frozenset({"dejima_students"}))
    }


# ---- cluster: the attack, on the example network -----------------------------------------------------------------


def hello(net: LocalNetwork, sender: str, peer_type: str, views: dict[str, str]) -> dict[str, Any]:
    """A greeting from `sender` (signed with its real key, at its real address) announcing `peer_type` and, for each
    view -> the peer type whose definition it copies, that view's catalog entry."""
    catalog = [
        entry
        for owner in dict.fromkeys(views.values())
        for entry in catalog_of(TYPES[owner])
        if views.get(entry["view"]) == owner
    ]
    body = {"peer": sender, "url": net.specs[sender].message_url, "peer_type": peer_type, "catalog": catalog}
    return sign_as(net, sender, {"protocol": "dejima/1", "kind": "hello", "body": {**body, "known": []}})


def real_views(peer_type: str) -> dict[str, str]:
    return {v.name: peer_type for v in TYPES[peer_type].views}


def send(net: LocalNetwork, peer: str, envelope: dict[str, Any], front: str = "lean") -> tuple[int, Any]:
    """A peer message to `peer`'s lean listener (where partners send them) or to gunicorn."""
    base = net.specs[peer].url if front == "gunicorn" else net.specs[peer].message_url
    resp = requests.post(base + MESSAGE, data=json.dumps(envelope), timeout=30)
    return resp.status_code, resp.json()


def status(net: LocalNetwork, peer: str) -> dict[str, Any]:
    return dict(net.get(peer, "/api/v1/status"))


def rows_of(net: LocalNetwork, peer: str) -> list[dict[str, Any]]:
    return net.query(peer, f"SELECT * FROM {TABLES[peer]} ORDER BY last_name")  # noqa: S608


def dejima_bank_rows_received(net: LocalNetwork, peer: str) -> int:
    return int(status(net, peer)["propagates_received"].get("dejima_bank", 0))


def write(net: LocalNetwork, peer: str, sql: str) -> dict[str, Any]:
    code, body = net.exec(peer, sql)
    assert (code, body.get("status")) == (200, "committed"), body
    return dict(body)


@pytest.mark.cluster
def test_a_partner_claiming_a_view_it_is_not_entitled_to_is_refused_and_gets_no_row_of_it(
    network: LocalNetwork,
) -> None:
    net = network
    received_before = dejima_bank_rows_received(net, "insurance")
    # insurance, with its real key, announces its own views and government's dejima_bank (the right definition)
    claim = hello(net, "insurance", "insurance", {**real_views("insurance"), "dejima_bank": "government"})
    code, answer = send(net, "government", claim)
    assert code == 200, answer  # its other views are not affected: the greeting is answered
    assert answer["kind"] == "hello", answer

    gov = status(net, "government")
    refused = gov["refused_claims"]["insurance"]["dejima_bank"]
    assert "not entitled" in refused["reason"] and "insurance: dejima_insurance" in refused["reason"], refused
    assert refused["count"] >= 1
    assert gov["groups"]["dejima_bank"] == ["bank", "government"]
    assert gov["groups"]["dejima_insurance"] == ["government", "insurance"]
    assert gov["entitlements"]["insurance"] == {"peer_type": "insurance", "views": ["dejima_insurance"]}
    wait_until(
        lambda: "refusing insurance's claim to dejima_bank" in net.tail("government", 400),
        5,
        "government to log the refused claim as a warning",
    )
    assert "WARNING" in next(
        line for line in net.tail("government", 400).splitlines() if "refusing insurance's claim" in line
    )

    # government's own writes to dejima_bank keep working, right after the claim, and reach bank only
    write(
        net,
        "government",
        "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
        " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-04-01')",
    )
    write(net, "government", "UPDATE government_users SET phone = '555-0100' WHERE last_name = 'Roe'")
    assert [(r["last_name"], r["phone"]) for r in rows_of(net, "bank")] == [("Roe", "555-0100")]
    # insurance's entitled view still works: it has Jane through dejima_insurance, without her phone
    insurance = rows_of(net, "insurance")
    assert [(r["last_name"], r["address"], str(r["birthdate"])) for r in insurance] == [
        ("Roe", "2 Elm St", "1980-04-01")
    ]
    # and no dejima_bank row ever reached it
    assert dejima_bank_rows_received(net, "insurance") == received_before == 0
    report = check(net)
    assert report["ok"], report


@pytest.mark.cluster
@pytest.mark.parametrize("front", ["lean", "gunicorn"])
@pytest.mark.parametrize("claimed_first", [False, True], ids=["unclaimed", "after-a-claim"])
def test_a_propagate_for_a_view_the_sender_is_not_entitled_to_is_refused_with_403(
    network: LocalNetwork, front: str, claimed_first: bool
) -> None:
    net = network
    if claimed_first:  # what the claim alone could not do, it cannot help a propagate do either
        claim = hello(net, "insurance", "insurance", {**real_views("insurance"), "dejima_bank": "government"})
        code, answer = send(net, "government", claim)
        assert code == 200, answer
    gxid = f"insurance.{uuid.uuid4().int:x}.{uuid.uuid4().hex[:8]}"
    row = {"first_name": "Eve", "last_name": "Spy", "phone": "555-0666", "address": "6 Dark Rd"}
    body = {
        "gxid": gxid,
        "origin": "insurance",
        "sender": "insurance",
        "view": "dejima_bank",
        "insertions": [row],
        "deletions": [],
        "timeout_ms": 5000,
        "message_id": uuid.uuid4().hex,
    }
    forged = sign_as(net, "insurance", {"protocol": "dejima/1", "kind": "propagate", "body": body})
    code, answer = send(net, "government", forged, front)
    assert code == 403, answer
    assert answer["kind"] == "refused", answer
    assert answer["error"].startswith("government: 'insurance' is not entitled to dejima_bank here"), answer
    wait_until(
        lambda: "refused a propagate (signed by 'insurance')" in net.tail("government", 400),
        5,
        "government to log the refusal",
    )

    # nothing applied anywhere, nothing left open or prepared, the copies agree
    wait_until(lambda: all(status(net, p)["open_transactions"] == 0 for p in PEERS), 15, "no global transaction open")
    assert {p: rows_of(net, p) for p in PEERS} == {p: [] for p in PEERS}
    assert all(net.get(p, "/api/v1/prepared")["prepared"] == [] for p in PEERS)
    report = check(net)
    assert report["ok"], report
    # the peer keeps serving: a write of its own reaches its real partners
    write(net, "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('Ada', 'Lo', '1')")
    assert [r["phone"] for r in rows_of(net, "bank")] == ["1"]
    assert [r["last_name"] for r in rows_of(net, "insurance")] == ["Lo"]


@pytest.mark.cluster
def test_a_greeting_announcing_another_peer_type_is_refused_as_a_whole(network: LocalNetwork) -> None:
    net = network
    # insurance poses as a bank, with the bank's catalog: dejima_bank and dejima_risk
    code, answer = send(net, "government", hello(net, "insurance", "bank", real_views("bank")))
    assert code == 403, answer
    assert answer["kind"] == "refused", answer
    assert "announces peer type 'bank'" in answer["error"] and "type 'insurance'" in answer["error"], answer
    gov = status(net, "government")
    assert "announces peer type 'bank'" in gov["refused_claims"]["insurance"]["peer_type"]["reason"]
    # it taught nothing: insurance keeps the place its real greetings gave it, and no other
    assert gov["groups"] == {"dejima_bank": ["bank", "government"], "dejima_insurance": ["government", "insurance"]}
    assert next(p for p in gov["peers"] if p["name"] == "insurance")["peer_type"] == "insurance"
    write(net, "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('Bo', 'Ng', '2')")
    assert [r["phone"] for r in rows_of(net, "bank")] == ["2"]
    assert dejima_bank_rows_received(net, "insurance") == 0


# ---- cluster: entitlements given as lists of views ---------------------------------------------------------------


@pytest.fixture
def government_with_listed_views(network: LocalNetwork, tmp_path: Path) -> Iterator[LocalNetwork]:
    """The example network with government restarted trusting its partners by lists of views: bank by
    DEJIMA_TRUSTED_KEYS (`bank=key@dejima_bank`), insurance by DEJIMA_TRUSTED_KEYS_FILE (`views=dejima_insurance`).
    Government is stopped afterwards (the next test's fixture starts it again with the kit's settings)."""
    spec = network.specs["government"]
    saved = dict(spec.env)
    keys = network.public_keys()
    trusted = tmp_path / "trusted_keys"
    trusted.write_text(f"insurance {keys['insurance']} views=dejima_insurance\n")
    spec.env["DEJIMA_TRUSTED_KEYS"] = f"bank={keys['bank']}@dejima_bank"
    spec.env["DEJIMA_TRUSTED_KEYS_FILE"] = str(trusted)
    try:
        network.stop("government")
        network.start("government")
        network.wait_ready(timeout=60)
        yield network
    finally:
        spec.env.clear()
        spec.env.update(saved)
        network.stop("government")


@pytest.mark.cluster
def test_views_named_for_a_partner_decide_what_it_may_hold(government_with_listed_views: LocalNetwork) -> None:
    net = government_with_listed_views
    gov = status(net, "government")
    assert gov["entitlements"] == {
        "bank": {"peer_type": "", "views": ["dejima_bank"]},
        "insurance": {"peer_type": "", "views": ["dejima_insurance"]},
    }
    assert gov["groups"] == {"dejima_bank": ["bank", "government"], "dejima_insurance": ["government", "insurance"]}
    write(
        net,
        "government",
        "INSERT INTO government_users (first_name, last_name, phone, address) VALUES ('Kim', 'Ito', '3', '4 Oak')",
    )
    assert [r["phone"] for r in rows_of(net, "bank")] == ["3"]
    assert [r["address"] for r in rows_of(net, "insurance")] == ["4 Oak"]
    # a view not in insurance's list is refused, whatever type it announces (no type is configured for it)
    claim = hello(net, "insurance", "insurance", {**real_views("insurance"), "dejima_bank": "government"})
    code, answer = send(net, "government", claim)
    assert code == 200, answer
    refused = status(net, "government")["refused_claims"]["insurance"]["dejima_bank"]["reason"]
    assert "views=dejima_insurance" in refused, refused
    write(net, "government", "UPDATE government_users SET phone = '5' WHERE last_name = 'Ito'")
    assert [r["phone"] for r in rows_of(net, "bank")] == ["5"]
    assert dejima_bank_rows_received(net, "insurance") == 0
    report = check(net)
    assert report["ok"], report
