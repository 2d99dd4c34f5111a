"""Authenticated peers (peer.dejima.auth): every peer message is signed; receivers refuse unsigned, forged, replayed,
stale and impersonating messages (401/403), propagates from outside the view's group (403) and columns outside the
view (a "no" vote), and apply nothing; a greeting from an untrusted key teaches nothing.

Unit tier: signing and verification, keys and their settings. Cluster tier: the same against real peers.
"""

from __future__ import annotations

import base64
import decimal
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.dejima import jsonvalues
from peer.dejima.auth import (
    Authenticator,
    AuthError,
    KeyFormatError,
    ReceivedEnvelope,
    authorize,
    load_or_create_key,
    parse_private_key,
    private_pem,
    public_b64,
    read_envelope,
    sign_envelope,
    signature_id,
    signed_bytes,
    wire,
)
from peer.dejima.config import ConfigError, load_config
from peer.dejima.directory import catalog_of
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import load_peer_types
from peer.dejima.messages import Ack, Finish, Hello, Propagate, PropagateReply
from peer.dejima.peerserver import PeerServer, message_routes
from peer.dejima.transport import Transport
from peer.network import LocalNetwork, PeerSpec, free_port
from peer.pgserver import PgServer
from tests.helpers import sign_as, wait_until
from tests.test_api_input import EVE_AT_BANK

PEERS = ("government", "bank", "insurance")
TABLES = {"government": "government_users", "bank": "bank_users", "insurance": "insurance_users"}
MESSAGE = "/peer/v1/message"


# ---- unit: sign and verify --------------------------------------------------------------------------------------

BANK = Ed25519PrivateKey.generate()
GOV = Ed25519PrivateKey.generate()
MALLORY = Ed25519PrivateKey.generate()


def receiver(window: float = 60.0) -> Authenticator:
    """The government peer, trusting bank."""
    return Authenticator("government", GOV, {"bank": BANK.public_key()}, window)


def a_propagate(sender: str = "bank", **overrides: Any) -> dict[str, Any]:
    msg = Propagate(
        gxid=f"{sender}.{time.time_ns():x}.0",
        origin=sender,
        sender=sender,
        view="dejima_bank",
        insertions=[{"first_name": "Ann", "last_name": "Lee", "phone": "1", "address": "x"}],
        deletions=[],
        timeout_ms=5000,
    )
    envelope = msg.to_json()
    envelope["body"].update(overrides)
    return envelope


def refused(auth: Authenticator, envelope: dict[str, Any], status: int = 401, **kw: Any) -> str:
    with pytest.raises(AuthError) as err:
        auth.verify_request(envelope, **kw)
    assert err.value.status == status
    return str(err.value)


@pytest.mark.unit
def test_a_signed_message_verifies_and_names_its_signer() -> None:
    signed = sign_envelope(a_propagate(), "bank", BANK)
    assert set(signed["signature"]) == {"peer", "ts", "id", "reply_to", "sig"}
    assert len(base64.b64decode(signed["signature"]["sig"])) == 64
    assert receiver().verify_request(signed) == "bank"
    # it survives the wire (JSON text and back), whatever the key order
    wire = json.loads(json.dumps(signed, sort_keys=True))
    assert receiver().verify_request(wire) == "bank"


@pytest.mark.unit
def test_it_refuses_an_unsigned_or_malformed_signature() -> None:
    assert "unsigned" in refused(receiver(), a_propagate())
    signed = sign_envelope(a_propagate(), "bank", BANK)
    for bad in ({}, "sig", {**signed["signature"], "ts": "now"}, {**signed["signature"], "extra": 1}):
        assert "malformed signature" in refused(receiver(), {**signed, "signature": bad})


@pytest.mark.unit
def test_it_refuses_a_forged_signature() -> None:
    signed = sign_envelope(a_propagate(), "bank", BANK)
    sig = bytearray(base64.b64decode(signed["signature"]["sig"]))
    sig[0] ^= 1
    forged = {**signed, "signature": {**signed["signature"], "sig": base64.b64encode(bytes(sig)).decode()}}
    assert "bad signature" in refused(receiver(), forged)
    assert "bad signature" in refused(receiver(), {**signed, "signature": {**signed["signature"], "sig": "!!"}})


@pytest.mark.unit
def test_it_refuses_a_message_signed_with_another_key_than_the_trusted_one() -> None:
    assert "bad signature" in refused(receiver(), sign_envelope(a_propagate(), "bank", MALLORY))


@pytest.mark.unit
def test_it_refuses_a_signer_it_does_not_trust() -> None:
    message = refused(receiver(), sign_envelope(a_propagate("mallory"), "mallory", MALLORY))
    assert "'mallory'" in message
    assert "not a trusted peer" in message


@pytest.mark.unit
@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e["body"]["insertions"][0].update(phone="2"),
        lambda e: e["body"].update(view="dejima_insurance"),
        lambda e: e.update(kind="finish"),
        lambda e: e["signature"].update(peer="government"),
        lambda e: e["signature"].update(ts=e["signature"]["ts"] + 1),
        lambda e: e["signature"].update(id=uuid.uuid4().hex),
        lambda e: e["body"].update(message_id="x"),
    ],
    ids=["row-value", "view", "kind", "signer", "timestamp", "signature-id", "message-id"],
)
def test_it_refuses_a_tampered_message(tamper: Any) -> None:
    signed = json.loads(json.dumps(sign_envelope(a_propagate(), "bank", BANK)))
    tamper(signed)
    assert "bad signature" in refused(receiver(), signed) or "not a trusted peer" in refused(receiver(), signed)


@pytest.mark.unit
def test_the_signed_bytes_from_the_body_text_are_the_canonical_ones() -> None:
    """`signed_bytes` given the body's canonical text builds what it builds from the body itself."""
    body = {"z": [1, decimal.Decimal("12345678901234567890.123456")], "a": {"Zoë": "李", "b": None}, "m": True}
    envelope = {"protocol": 1, "kind": "propagate", "body": body}
    text = jsonvalues.canonical(body)
    for reply_to in ("", "abc"):
        assert signed_bytes(envelope, "bank", 5, "id1", reply_to, text) == signed_bytes(
            envelope, "bank", 5, "id1", reply_to
        )


@pytest.mark.unit
def test_a_signed_envelope_goes_on_the_wire_with_its_body_first_and_verifies_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signed = sign_envelope(a_propagate(), "bank", BANK)
    data = wire(signed)
    assert data.startswith(b'{"body":' + jsonvalues.canonical(signed["body"]).encode() + b",")
    assert json.loads(data) == signed
    received = read_envelope(data)
    assert isinstance(received, ReceivedEnvelope)
    assert received == signed
    assert received.body_text == jsonvalues.canonical(signed["body"])
    canonical = jsonvalues.canonical

    def not_the_body(value: Any, anything_as_text: bool = False) -> str:
        assert "insertions" not in str(value), "the body was encoded again"
        return canonical(value, anything_as_text)

    monkeypatch.setattr(jsonvalues, "canonical", not_the_body)
    assert receiver().verify_request(received) == "bank"
    # what is not a signed envelope goes as compact JSON
    assert wire({"b": 1, "body": 2}) == b'{"b":1,"body":2}'


@pytest.mark.unit
@pytest.mark.parametrize(
    ("before", "after"),
    [(b'"phone":"1"', b'"phone":"2"'), (b'"kind":"propagate"', b'"kind":"finish"'), (b'"id":"', b'"id":"0')],
    ids=["row-value", "kind", "signature-id"],
)
def test_it_refuses_tampered_wire_bytes(before: bytes, after: bytes) -> None:
    data = wire(sign_envelope(a_propagate(), "bank", BANK))
    assert data.count(before) == 1
    assert "bad signature" in refused(receiver(), read_envelope(data.replace(before, after)))


@pytest.mark.unit
def test_a_body_whose_text_is_not_canonical_verifies_over_its_canonical_json() -> None:
    """Another sender may write the body's members in any order, with blanks: the signature is over the canonical
    JSON, which the receiver falls back to."""
    signed = sign_envelope(a_propagate(), "bank", BANK)
    rest = {k: v for k, v in signed.items() if k != "body"}
    data = ('{"body":' + json.dumps(signed["body"], indent=1) + "," + json.dumps(rest)[1:]).encode()
    received = read_envelope(data)
    assert isinstance(received, ReceivedEnvelope)
    assert received.body_text != jsonvalues.canonical(signed["body"])
    assert receiver().verify_request(received) == "bank"


@pytest.mark.unit
@pytest.mark.parametrize(
    "data",
    [b'{"kind":"x","body":{"a":1}}', b'{"body":1,"body":{"a":2}}', b'{"body": {"a":1}}', b'{"body":{"a":1}}', b"[1]"],
    ids=["body-not-first", "two-bodies", "blank-before-body", "body-alone", "not-an-object"],
)
def test_read_envelope_reads_any_json_as_loads_does(data: bytes) -> None:
    assert read_envelope(data) == jsonvalues.loads(data)


@pytest.mark.unit
@pytest.mark.parametrize("data", [b'{"body":{"a":1}', b'{"body":{"a":1},', b'{"body":{"a":1},"k":1}x', b'{"body":'])
def test_read_envelope_refuses_malformed_json(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_envelope(data)


@pytest.mark.unit
def test_it_refuses_a_replay_within_the_window_and_a_stale_one_after() -> None:
    auth = receiver(window=60)
    signed = sign_envelope(a_propagate(), "bank", BANK)
    now = signed["signature"]["ts"] / 1000
    assert auth.verify_request(signed, now=now) == "bank"
    assert "replayed" in refused(auth, signed, now=now + 1)
    assert "replayed" in refused(auth, signed, now=now + 59)
    # once its timestamp left the window it is forgotten, and refused as stale
    assert "stale" in refused(auth, signed, now=now + 62)
    # a retry is a new signature of the same body: accepted (the coordinator answers it idempotently)
    retry = sign_envelope(signed, "bank", BANK, ts=signed["signature"]["ts"] + 62_000)
    assert auth.verify_request(retry, now=now + 62) == "bank"
    assert list(auth._seen) == [("bank", signature_id(retry))]  # the first one was forgotten


@pytest.mark.unit
@pytest.mark.parametrize("offset", [-61.0, 61.0, -3600.0])
def test_it_refuses_a_timestamp_outside_the_window(offset: float) -> None:
    ts = int((time.time() + offset) * 1000)
    assert "stale" in refused(receiver(window=60), sign_envelope(a_propagate(), "bank", BANK, ts=ts))


@pytest.mark.unit
def test_an_answer_is_bound_to_its_request() -> None:
    bank = Authenticator("bank", BANK, {"government": GOV.public_key()})
    request = bank.sign(a_propagate())
    reply = PropagateReply("g", "government", "yes", ["government"]).to_json()
    answer = receiver().sign(reply, reply_to=signature_id(request))
    assert bank.verify_reply(answer, signature_id(request)) == "government"
    with pytest.raises(AuthError, match="not bound"):
        bank.verify_reply(answer, uuid.uuid4().hex)
    with pytest.raises(AuthError, match="not a request"):
        Authenticator("insurance", MALLORY, {"government": GOV.public_key()}).verify_request(answer)
    with pytest.raises(AuthError, match="unsigned"):
        bank.verify_reply(reply, signature_id(request))


@pytest.mark.unit
def test_a_message_sent_to_several_peers_is_signed_once_and_each_accepts_it() -> None:
    """`Transport.call_many`: the same message to two peers goes with one signature, which each receiver verifies
    (and remembers against replays for itself); each signed answer is bound to it; distinct messages are signed
    apart."""
    insurance = Ed25519PrivateKey.generate()
    receivers = {
        "government": receiver(),
        "insurance": Authenticator("insurance", insurance, {"bank": BANK.public_key()}),
    }
    seen: dict[str, list[str]] = {name: [] for name in receivers}

    def handler(name: str) -> Any:
        def handle(envelope: Any, remote: str) -> tuple[int, dict[str, Any]]:
            try:
                receivers[name].verify_request(envelope)
            except AuthError as exc:
                return exc.status, {"status": "error", "kind": "unauthenticated", "error": str(exc)}
            seen[name].append(signature_id(envelope))
            return 200, receivers[name].sign(
                Ack(envelope["body"]["gxid"], name, True).to_json(), signature_id(envelope)
            )

        return handle

    servers = {name: PeerServer(message_routes(handler(name)), "127.0.0.1", 0, 1 << 20) for name in receivers}
    transport = Transport(
        "bank",
        Authenticator("bank", BANK, {"government": GOV.public_key(), "insurance": insurance.public_key()}),
    )
    try:
        for server in servers.values():
            server.start()
        urls = {name: f"http://127.0.0.1:{server.port}" for name, server in servers.items()}
        shared = Finish("bank.1.0", "bank", "commit")
        results = transport.call_many([(urls["government"], shared), (urls["insurance"], shared)], 5.0)
        assert [r.ok for r in results] == [True, True], results
        assert seen["government"] == seen["insurance"], "one signature for both"
        apart = transport.call_many(
            [
                (urls["government"], Finish("bank.2.0", "bank", "commit")),
                (urls["insurance"], Finish("bank.2.0", "bank", "commit")),
            ],
            5.0,
        )
        assert [r.ok for r in apart] == [True, True], apart
        assert seen["government"][-1] != seen["insurance"][-1]
    finally:
        transport.close()
        for server in servers.values():
            server.close()


@pytest.mark.unit
def test_a_message_must_come_from_its_signer() -> None:
    authorize("bank", Propagate.from_body(a_propagate()["body"]))
    with pytest.raises(AuthError) as err:
        authorize("insurance", Propagate.from_body(a_propagate()["body"]))
    assert err.value.status == 403
    assert "claims to come from 'bank'" in str(err.value)
    hello = Hello("bank", "http://x", "bank", [], [])
    with pytest.raises(AuthError, match="claims"):
        authorize("mallory", hello)


@pytest.mark.unit
def test_it_refuses_to_trust_another_key_under_its_own_name() -> None:
    with pytest.raises(ValueError, match="this peer"):
        Authenticator("government", GOV, {"government": MALLORY.public_key()})


# ---- unit: keys and settings ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_it_creates_a_key_file_only_its_owner_may_read_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "peer.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_b64(load_or_create_key(path)) == public_b64(key)
    path.chmod(0o644)
    with pytest.raises(KeyFormatError, match="chmod 600"):
        load_or_create_key(path)


@pytest.mark.unit
def test_it_reads_a_private_key_as_pem_or_base64() -> None:
    raw = BANK.private_bytes_raw()
    assert public_b64(parse_private_key(base64.b64encode(raw).decode())) == public_b64(BANK)
    assert public_b64(parse_private_key(private_pem(BANK))) == public_b64(BANK)
    for bad in (
        "nope",
        base64.b64encode(b"short").decode(),
        "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----",
    ):
        with pytest.raises(KeyFormatError):
            parse_private_key(bad)


GOOD = {
    "PEER_TYPE": "bank",
    "DEJIMA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/bank",
    "DEJIMA_CLIENT_DATABASE_URL": "postgresql://bank_client@127.0.0.1:5432/bank",
    "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
}


@pytest.mark.unit
def test_it_reads_the_key_settings(tmp_path: Path) -> None:
    trusted_file = tmp_path / "trusted"
    trusted_file.write_text(f"# peers\ninsurance {public_b64(MALLORY)} insurance\n\n")
    private_file = tmp_path / "secret"
    private_file.write_bytes(private_pem(BANK))
    config = load_config(
        {
            **GOOD,
            "DEJIMA_PRIVATE_KEY_FILE": str(private_file),
            "DEJIMA_TRUSTED_KEYS": f"government={public_b64(GOV)}@government",
            "DEJIMA_TRUSTED_KEYS_FILE": str(trusted_file),
            "DEJIMA_REPLAY_WINDOW": "30",
        }
    )
    assert config.trusted_keys == {"government": public_b64(GOV), "insurance": public_b64(MALLORY)}
    assert public_b64(parse_private_key(config.private_key)) == public_b64(BANK)
    assert config.replay_window == 30.0
    assert "BEGIN" not in repr(config)  # the private key is never shown
    assert load_config({**GOOD, "DEJIMA_KEY_FILE": str(tmp_path / "k")}).key_file == tmp_path / "k"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("DEJIMA_PRIVATE_KEY", "not a key"),
        ("DEJIMA_PRIVATE_KEY", base64.b64encode(b"x" * 31).decode()),
        ("DEJIMA_PRIVATE_KEY_FILE", "/nonexistent/secret"),
        ("DEJIMA_TRUSTED_KEYS", "government"),
        ("DEJIMA_TRUSTED_KEYS", "Government=" + public_b64(GOV) + "@government"),
        ("DEJIMA_TRUSTED_KEYS", "government=abc@government"),
        ("DEJIMA_TRUSTED_KEYS", f"bank={public_b64(GOV)}@bank,bank={public_b64(BANK)}@bank"),
        ("DEJIMA_TRUSTED_KEYS_FILE", "/nonexistent/trusted"),
        ("DEJIMA_REPLAY_WINDOW", "0"),
        ("DEJIMA_REPLAY_WINDOW", "soon"),
    ],
)
def test_it_rejects_a_bad_key_setting_naming_it(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**GOOD, setting: value})
    assert err.value.setting == setting


@pytest.mark.unit
def test_it_rejects_a_bad_trusted_keys_file_a_key_given_twice_and_a_key_file_others_may_read(tmp_path: Path) -> None:
    bad = tmp_path / "trusted"
    bad.write_text("government\n")
    with pytest.raises(ConfigError, match=r"^DEJIMA_TRUSTED_KEYS_FILE: "):
        load_config({**GOOD, "DEJIMA_TRUSTED_KEYS_FILE": str(bad)})
    b64 = base64.b64encode(BANK.private_bytes_raw()).decode()
    secret = tmp_path / "secret"
    secret.write_text(b64)
    with pytest.raises(ConfigError, match=r"^DEJIMA_PRIVATE_KEY_FILE: .*once"):
        load_config({**GOOD, "DEJIMA_PRIVATE_KEY": b64, "DEJIMA_PRIVATE_KEY_FILE": str(secret)})
    key_file = tmp_path / "peer.key"
    load_or_create_key(key_file)
    os.chmod(key_file, 0o640)
    with pytest.raises(ConfigError, match=r"^DEJIMA_KEY_FILE: .*mode 0640"):
        load_config({**GOOD, "DEJIMA_KEY_FILE": str(key_file)})


# ---- cluster: real peers ----------------------------------------------------------------------------------------

TYPES = load_peer_types(SQL_ROOT)


def post(net: LocalNetwork, peer: str, envelope: Any, front: str = "lean") -> tuple[int, Any]:
    """To the peer's lean listener for peer messages (where other peers send them), or with `front="gunicorn"` to
    the same endpoint under gunicorn."""
    base = net.specs[peer].url if front == "gunicorn" else net.specs[peer].message_url
    resp = requests.post(base + MESSAGE, data=json.dumps(envelope), timeout=30)
    return resp.status_code, resp.json()


def base_rows(net: LocalNetwork) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for peer in PEERS:
        with psycopg.connect(net.server.url(net.specs[peer].database)) as conn:
            out[peer] = conn.execute(f"SELECT * FROM {TABLES[peer]} ORDER BY id").fetchall()  # noqa: S608
    return out


def assert_nothing_applied(net: LocalNetwork) -> None:
    wait_until(
        lambda: all(net.get(p, "/api/v1/status")["open_transactions"] == 0 for p in PEERS),
        15,
        "every global transaction to end",
    )
    assert base_rows(net) == {peer: [] for peer in PEERS}
    assert all(net.get(p, "/api/v1/prepared")["prepared"] == [] for p in PEERS)


def cluster_propagate(
    sender: str = "bank",
    view: str = "dejima_bank",
    origin_keys: dict[str, list[list[Any]]] | None = None,
    **row: Any,
) -> dict[str, Any]:
    values = {"first_name": "Eve", "last_name": "Spy", "phone": "555-0666", "address": "6 Dark Rd", **row}
    if view == "dejima_insurance":
        values = {"first_name": "Eve", "last_name": "Spy", "address": None, "birthdate": None, **row}
    return Propagate(
        gxid=f"{sender}.{time.time_ns():x}.{uuid.uuid4().hex[:8]}",
        origin=sender,
        sender=sender,
        view=view,
        insertions=[values],
        deletions=[],
        timeout_ms=5000,
        origin_keys=origin_keys or {},
    ).to_json()


def abort_everywhere(net: LocalNetwork, envelope: dict[str, Any]) -> None:
    """What the origin would do: abort the global transaction at every peer (signed by the origin)."""
    body = envelope["body"]
    finish = Finish(body["gxid"], body["origin"], "abort").to_json()
    for peer in PEERS:
        status, answer = post(net, peer, sign_as(net, body["origin"], finish))
        assert status == 200, answer


def refused_and_logged(net: LocalNetwork, peer: str, answer: dict[str, Any], says: str) -> None:
    assert answer["status"] == "error", answer
    assert says in answer["error"], answer
    assert answer["error"].startswith(f"{peer}:"), answer
    wait_until(lambda: "refused a " in net.tail(peer, 200) and says in net.tail(peer, 200), 5, f"{peer} to log it")


@pytest.mark.cluster
def test_the_normal_flow_still_works_with_signed_messages(network: LocalNetwork) -> None:
    status, body = network.exec(
        "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('Signed', 'Write', '1')"
    )
    assert (status, body.get("status")) == (200, "committed"), body
    assert network.query("bank", "SELECT phone FROM bank_users WHERE last_name = 'Write'") == [{"phone": "1"}]
    assert network.query("insurance", "SELECT first_name FROM insurance_users WHERE last_name = 'Write'") == [
        {"first_name": "Signed"}
    ]


@pytest.mark.cluster
@pytest.mark.parametrize("front", ["lean", "gunicorn"])
def test_it_refuses_an_unsigned_message_with_401_and_applies_nothing(network: LocalNetwork, front: str) -> None:
    status, answer = post(network, "government", cluster_propagate(), front)
    assert status == 401, answer
    refused_and_logged(network, "government", answer, "unsigned")
    assert_nothing_applied(network)


@pytest.mark.cluster
@pytest.mark.parametrize("front", ["lean", "gunicorn"])
def test_it_refuses_a_forged_message_with_401_and_applies_nothing(network: LocalNetwork, front: str) -> None:
    forged = sign_envelope(cluster_propagate(), "bank", Ed25519PrivateKey.generate())  # not bank's key
    status, answer = post(network, "government", forged, front)
    assert status == 401, answer
    refused_and_logged(network, "government", answer, "bad signature")
    tampered = sign_as(network, "bank", cluster_propagate())
    tampered["body"]["insertions"][0]["phone"] = "555-9999"
    status, answer = post(network, "government", tampered, front)
    assert status == 401, answer
    assert "bad signature" in answer["error"], answer
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_refuses_a_replayed_message_with_401_and_applies_it_once(network: LocalNetwork) -> None:
    message = sign_as(network, "bank", cluster_propagate(origin_keys=EVE_AT_BANK))
    try:
        status, first = post(network, "government", message)
        assert status == 200, first
        assert first["body"]["vote"] == "yes", first
        status, again = post(network, "government", message)
        assert status == 401, again
        refused_and_logged(network, "government", again, "replayed")
    finally:
        abort_everywhere(network, message)
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_refuses_a_stale_message_with_401(network: LocalNetwork) -> None:
    stale = sign_envelope(cluster_propagate(), "bank", network.key("bank"), ts=int((time.time() - 600) * 1000))
    status, answer = post(network, "government", stale)
    assert status == 401, answer
    assert "stale" in answer["error"], answer
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_refuses_a_non_member_with_403_and_applies_nothing(network: LocalNetwork) -> None:
    # insurance is trusted, but not entitled to dejima_bank at government (its type is no member of that view)
    status, answer = post(network, "government", sign_as(network, "insurance", cluster_propagate("insurance")))
    assert status == 403, answer
    refused_and_logged(network, "government", answer, "'insurance' is not entitled to dejima_bank here")
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_refuses_a_peer_that_signs_as_itself_but_claims_another_with_403(network: LocalNetwork) -> None:
    impersonation = sign_as(network, "insurance", cluster_propagate("bank"))
    status, answer = post(network, "government", impersonation)
    assert status == 403, answer
    refused_and_logged(network, "government", answer, "signed by 'insurance' but the propagate claims")
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_refuses_columns_outside_the_view_and_applies_nothing(network: LocalNetwork) -> None:
    message = sign_as(network, "bank", cluster_propagate(iban="DE89", risk_factor=9))
    status, answer = post(network, "government", message)
    assert status == 403, answer
    refused_and_logged(network, "government", answer, "'iban' is not a column of dejima_bank")
    assert_nothing_applied(network)


@pytest.mark.cluster
def test_it_signs_its_answers_bound_to_the_request(network: LocalNetwork) -> None:
    bank = Authenticator("bank", network.key("bank"), {"government": network.key("government").public_key()})
    hello = Hello("bank", network.specs["bank"].message_url, "bank", catalog_of(TYPES["bank"]), []).to_json()
    request = bank.sign(hello)
    status, answer = post(network, "government", request)
    assert status == 200, answer
    assert bank.verify_reply(answer, signature_id(request)) == "government"
    assert answer["body"]["peer"] == "government"


def mallory_hello(name: str = "mallory") -> dict[str, Any]:
    body = {
        "peer": name,
        "url": f"http://127.0.0.1:{free_port()}",
        "peer_type": "bank",
        "catalog": catalog_of(TYPES["bank"]),
        "known": [],
    }
    return {"protocol": "dejima/1", "kind": "hello", "body": body}


def known_peers(net: LocalNetwork, peer: str) -> set[str]:
    return {p["name"] for p in net.get(peer, "/api/v1/status")["peers"]}


@pytest.mark.cluster
def test_it_refuses_the_greeting_of_an_untrusted_key_and_learns_nothing(network: LocalNetwork) -> None:
    status, answer = post(network, "government", sign_envelope(mallory_hello(), "mallory", MALLORY))
    assert status == 401, answer
    refused_and_logged(network, "government", answer, "'mallory', which is not a trusted peer")
    # claiming to be bank with another key: forged
    status, answer = post(network, "government", sign_envelope(mallory_hello("bank"), "bank", MALLORY))
    assert status == 401, answer
    assert "bad signature" in answer["error"], answer
    assert "mallory" not in known_peers(network, "government")
    assert network.get("government", "/api/v1/groups")["groups"]["dejima_bank"] == ["bank", "government"]


@pytest.mark.cluster
def test_it_does_not_add_an_untrusted_peer_named_by_a_trusted_one(network: LocalNetwork) -> None:
    mallory_url = f"http://127.0.0.1:{free_port()}"
    hello = Hello(
        "bank",
        network.specs["bank"].url,
        "bank",
        catalog_of(TYPES["bank"]),
        [{"name": "mallory", "url": mallory_url, "peer_type": "bank"}],
    ).to_json()
    status, answer = post(network, "government", sign_as(network, "bank", hello))
    assert status == 200, answer
    assert "mallory" not in known_peers(network, "government")


@pytest.fixture
def mallory(network: LocalNetwork, tmp_path: Path, pg_server: PgServer) -> Iterator[LocalNetwork]:
    """A real bank-type peer `mallory` with its own key, seeded with government, which does not trust it."""
    spec = PeerSpec("mallory", "bank", free_port(), f"m{uuid.uuid4().hex[:6]}_mallory")
    spec.env["DEJIMA_SEEDS"] = network.specs["government"].url
    spec.env["DEJIMA_DISCOVERY_INTERVAL"] = "0.2"
    net = LocalNetwork(pg_server, tmp_path / "mallory", [spec])
    try:
        net.start("mallory")
        net.wait_healthy("mallory")
        yield net
    finally:
        net.kill("mallory")
        pg_server.drop_database(spec.database)


@pytest.mark.cluster
def test_discovery_does_not_add_a_running_peer_with_an_untrusted_key(
    network: LocalNetwork, mallory: LocalNetwork
) -> None:
    wait_until(lambda: "refused a hello" in network.tail("government", 200), 10, "government to refuse mallory")
    time.sleep(1.0)  # several discovery cycles of mallory
    assert "mallory" not in known_peers(network, "government")
    assert network.get("government", "/api/v1/groups")["groups"]["dejima_bank"] == ["bank", "government"]
    # and government's answers do not count at mallory either: it learnt nobody
    assert known_peers(mallory, "mallory") == set()
    status, body = network.exec(
        "government", "INSERT INTO government_users (first_name, last_name, phone) VALUES ('Only', 'Trusted', '1')"
    )
    assert (status, body.get("participants")) == (200, ["bank", "insurance"]), body
    assert mallory.query("mallory", "SELECT * FROM bank_users") == []
