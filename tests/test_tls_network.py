"""Cluster tier of TLS between peers (docs/security.md "A network observer"): real peer processes on loopback.

- What crosses the wire: the example network with every peer behind the test kit's TCP proxy (TLS passes through it
  untouched); the bytes between government and bank, captured at bank's proxy, carry a distinctive value of a written
  row in clear when TLS is off, and nowhere when it is on (while the row arrives all the same).
- The handshake is not paid per message: many writes, their messages counted by the transport, and no new full
  handshake (a new connection, when one is needed, resumes its session).
- A peer whose certificate is of another CA cannot talk to the network: refused at the handshake both ways, it joins
  no group, and a write that needs it fails as unreachable. With mutual TLS, a peer that trusts the network's CA but
  presents a certificate of another one is refused at the handshake too (without it, its signed greeting gets in).
- Plain HTTP, allowed explicitly, starts with a warning.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from peer import tlscerts
from peer.network import LocalNetwork, example_specs
from peer.pgserver import PgServer
from peer.testkit.proxy import ProxiedCluster, proxied_cluster
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster

SECRET = "Zq7-Larkspur-Lane-4711"  # a distinctive row value, looked for in the captured bytes
INSERT = (
    "INSERT INTO government_users (first_name, last_name, phone, address, birthdate)"
    " VALUES ('Tess', 'Wire', '555-0142', '{address}', '1980-05-17')"
)


def tls_stats(net: LocalNetwork, name: str) -> dict[str, Any]:
    stats: dict[str, Any] = net.get(name, "/api/v1/status")["tls"]
    return stats


def addresses_at_bank(cluster: ProxiedCluster) -> list[str | None]:
    return [row["address"] for row in cluster.rows("bank", "bank_users")]


# ---- what an observer of the network sees -------------------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_row_crosses_the_network_in_clear_only_without_tls(pg_server: PgServer, tmp_path: Path, tls: bool) -> None:
    with proxied_cluster(pg_server, tmp_path / "net", tls=tls) as cluster:
        proxy = cluster.proxies["bank"]  # government -> bank passes here, and bank's answers back
        seen = proxy.requests_seen.get("government", 0)
        proxy.record()
        status, answer = cluster.exec("government", INSERT.format(address=SECRET))
        assert (status, answer.get("status")) == (200, "committed"), answer
        assert addresses_at_bank(cluster) == [SECRET]  # it arrived, through the proxy
        captured = proxy.recorded()
        assert proxy.requests_seen.get("government", 0) > seen, "no message of government passed bank's proxy"
        assert len(captured) > 1000, len(captured)
        if tls:
            assert SECRET.encode() not in captured
            assert b"POST /peer/v1/message" not in captured and b"government" not in captured
            assert tls_stats(cluster.net, "government")["enabled"]
        else:
            assert SECRET.encode() in captured  # the observer reads the row
            assert b"POST /peer/v1/message" in captured
            for name in cluster.net.specs:
                log = cluster.net.tail(name, 400)
                assert "plain HTTP (DEJIMA_ALLOW_PLAIN_HTTP=1)" in log and "clear text" in log, log


def test_the_handshake_is_not_repeated_per_message(pg_server: PgServer, tmp_path: Path) -> None:
    with proxied_cluster(pg_server, tmp_path / "net") as cluster:
        net = cluster.net
        status, answer = cluster.exec("government", INSERT.format(address="first contact"))  # connections made
        assert (status, answer.get("status")) == (200, "committed"), answer
        before = {name: tls_stats(net, name) for name in ("government", "bank")}
        writes = 15
        for n in range(writes):
            status, answer = cluster.exec("government", INSERT.replace("'Tess'", f"'T{n}'").format(address=f"{n} Elm"))
            assert (status, answer.get("status")) == (200, "committed"), answer
        after = {name: tls_stats(net, name) for name in ("government", "bank")}
        sent = after["government"]["transport"]
        sent_before = before["government"]["transport"]
        messages = sent["requests"] - sent_before["requests"]
        assert messages >= 2 * writes, (sent_before, sent)  # a propagate and a finish to each of two peers, at least
        full = sent["handshakes"]["full"] - sent_before["handshakes"]["full"]
        resumed = sent["handshakes"]["resumed"] - sent_before["handshakes"]["resumed"]
        assert full == 0, (sent_before, sent)  # every session to bank and insurance was made by the first write
        assert resumed * 5 <= messages, (sent_before, sent)  # new connections are rare, and resume their session
        served = after["bank"]["listeners"]["message"]["handshakes"]
        served_before = before["bank"]["listeners"]["message"]["handshakes"]
        assert served["full"] == served_before["full"], (served_before, served)  # no new full handshake at bank
        assert served["failed"] == served_before["failed"] == 0


# ---- a peer outside the network's CA ------------------------------------------------------------------------------
def insurance_status(net: LocalNetwork, ca: Path) -> dict[str, Any]:
    """insurance's /api/v1/status, its certificate verified against `ca` (the kit's CA does not verify it)."""
    resp = requests.get(
        net.specs["insurance"].url + "/api/v1/status", headers=net.auth_headers("insurance"), timeout=5, verify=str(ca)
    )
    resp.raise_for_status()
    status: dict[str, Any] = resp.json()
    return status


@contextlib.contextmanager
def network_with_a_stranger(
    pg_server: PgServer,
    state_dir: Path,
    stranger_env: dict[str, str],
    stranger_ca: Path,
    env: dict[str, str] | None = None,
) -> Iterator[LocalNetwork]:
    """The example network (TLS), insurance with `stranger_env` (its own TLS files; `stranger_ca` verifies its
    certificate), every peer with `env`; started, each healthy; stopped and dropped at the end. Its groups are not
    awaited: insurance may never join."""
    specs = example_specs(base_port=0, prefix=f"s{uuid.uuid4().hex[:6]}_")
    for spec in specs:
        spec.env.update({"DEJIMA_DISCOVERY_INTERVAL": "0.2", "DEJIMA_DISCOVERY_MAX_BACKOFF": "1", **(env or {})})
    net = LocalNetwork(pg_server, state_dir, specs)
    net.specs["insurance"].env.update(stranger_env)
    try:
        net.start_all()
        for name in ("government", "bank"):
            net.wait_healthy(name, timeout=60)
        health = net.specs["insurance"].url + "/health"

        def insurance_up() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(health, timeout=1, verify=str(stranger_ca)).status_code == 200
            return False

        wait_until(insurance_up, 60, f"insurance to answer its health\n{net.tail('insurance')}")
        yield net
    finally:
        net.stop_all()
        for spec in net.specs.values():
            pg_server.drop_database(spec.database)


def stranger_files(folder: Path) -> tuple[Path, Path, Path]:
    """A certificate for insurance (127.0.0.1, localhost, insurance) of a CA of its own: (cert, key, that CA)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = tlscerts.make_ca("a stranger's CA")
    (folder / "ca.pem").write_bytes(ca_cert)
    cert, key = folder / "insurance.pem", folder / "insurance-key.pem"
    tlscerts.ensure_issued(ca_cert, ca_key, cert, key, "insurance", [*tlscerts.LOCAL_NAMES, "insurance"])
    return cert, key, folder / "ca.pem"


def bank_and_government_grouped(net: LocalNetwork) -> bool:
    return bool(net.get("bank", "/api/v1/status")["groups"]["dejima_bank"] == ["bank", "government"])


def test_a_peer_with_a_certificate_of_another_ca_cannot_talk_to_the_network(
    pg_server: PgServer, tmp_path: Path
) -> None:
    cert, key, ca = stranger_files(tmp_path / "stranger")
    stranger = {"DEJIMA_TLS_CERT_FILE": str(cert), "DEJIMA_TLS_KEY_FILE": str(key), "DEJIMA_TLS_CA_FILE": str(ca)}
    with network_with_a_stranger(pg_server, tmp_path / "net", stranger, ca) as net:
        wait_until(lambda: bank_and_government_grouped(net), 30, "bank and government to form their group")

        def refused_both_ways() -> bool:
            bank = tls_stats(net, "bank")
            return bool(
                bank["transport"]["handshakes"]["failed"] > 0  # bank refused insurance's certificate
                and bank["listeners"]["message"]["handshakes"]["failed"] > 0  # insurance refused bank's
            )

        wait_until(refused_both_ways, 30, "the handshakes between bank and insurance to fail")
        for name in ("government", "bank"):
            status = net.get(name, "/api/v1/status")
            assert all("insurance" not in members for members in status["groups"].values()), status["groups"]
            assert "insurance" not in {p["name"] for p in status["peers"]}, status["peers"]
        assert insurance_status(net, ca)["groups"] == {
            "dejima_insurance": ["insurance"],
            "dejima_risk": ["insurance"],
        }
        status, answer = net.exec(
            "bank", "INSERT INTO bank_users (first_name, last_name, phone) VALUES ('A', 'B', '1')"
        )
        assert (status, answer.get("kind")) == (503, "unreachable"), answer
        assert "insurance" in answer["error"], answer
        assert "refused a TLS handshake from 127.0.0.1: TLSV1_ALERT_UNKNOWN_CA" in net.tail("bank", 400)


@pytest.mark.parametrize("require", [False, True], ids=["server-only", "mutual"])
def test_with_mutual_tls_a_client_certificate_of_another_ca_is_refused(
    pg_server: PgServer, tmp_path: Path, require: bool
) -> None:
    """insurance trusts the network's CA (so it can verify bank) and holds a trusted signing key, but its certificate
    is of another CA: without client certificates its signed greeting gets through to bank; with them (every peer
    DEJIMA_TLS_CLIENT_CERTS=require) it is refused at the handshake and bank never hears of it."""
    cert, key, own_ca = stranger_files(tmp_path / "stranger")
    kit_ca = str(tlscerts.kit_ca().cert_file)
    stranger = {"DEJIMA_TLS_CERT_FILE": str(cert), "DEJIMA_TLS_KEY_FILE": str(key), "DEJIMA_TLS_CA_FILE": kit_ca}
    env = {"DEJIMA_TLS_CLIENT_CERTS": "require"} if require else {}
    with network_with_a_stranger(pg_server, tmp_path / "net", stranger, own_ca, env) as net:
        wait_until(lambda: bank_and_government_grouped(net), 30, "bank and government to form their group")
        assert tls_stats(net, "bank")["client_certs"] == ("require" if require else "none")

        def insurance_greeted_bank() -> bool:
            received = tls_stats(net, "bank")["listeners"]["message"]
            known = {p["name"] for p in net.get("bank", "/api/v1/status")["peers"]}
            return bool(received["handshakes"]["failed"] > 0 if require else "insurance" in known)

        wait_until(insurance_greeted_bank, 30, "insurance's greeting to reach bank (or its handshake to be refused)")
        known = {p["name"] for p in net.get("bank", "/api/v1/status")["peers"]}
        if require:
            assert "insurance" not in known, known
            assert "refused a TLS handshake from 127.0.0.1" in net.tail("bank", 400)
        else:
            assert "insurance" in known  # the signature is trusted: only the certificate keeps it out
