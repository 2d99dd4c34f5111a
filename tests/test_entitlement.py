"""Identity is not entitlement: which of a peer's views a partner may hold comes from the peer's own configuration
(DEJIMA_TRUSTED_KEYS[_FILE]: each key bound to a peer type, or to views), never from what the partner announces.

Unit: the formats of both settings, and which views follow from a peer type (the manifests' `members`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
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
from peer.dejima.install import SQL_ROOT
from peer.dejima.manifest import load_peer_types
from tests.helpers import AGENCY, SCHOOL_MANIFEST, UNIVERSITY, make_peer_type_root

TYPES = load_peer_types(SQL_ROOT)
KEYS = {name: public_b64(Ed25519PrivateKey.generate()) for name in ("government", "bank", "insurance", "acme")}


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
