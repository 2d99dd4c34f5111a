"""Cluster tier: the example network forms its groups and runs a global transaction end to end."""

from __future__ import annotations

import pytest

from peer.cli import check_network
from peer.network import LocalNetwork

pytestmark = pytest.mark.cluster


def test_it_propagates_an_insert_at_government_to_bank_and_insurance(network: LocalNetwork) -> None:
    status, body = network.exec(
        "government",
        "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
        " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St', '1980-05-17')",
    )
    assert (status, body["status"]) == (200, "committed"), body
    assert body["participants"] == ["bank", "insurance"]
    bank = network.query("bank", "SELECT first_name, last_name, phone, address, iban FROM bank_users")
    assert bank == [
        {"first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St", "iban": None}
    ]
    insurance = network.query("insurance", "SELECT first_name, address, birthdate::text AS b FROM insurance_users")
    assert insurance == [{"first_name": "Jane", "address": "2 Elm St", "b": "1980-05-17"}]
    report = check_network({n: s.url for n, s in network.specs.items()})
    assert report["ok"], report
