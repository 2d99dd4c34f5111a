"""Cluster tier: the example network forms its groups and runs a global transaction end to end."""

from __future__ import annotations

import json
import socket

import pytest

from peer.network import LocalNetwork
from tests.helpers import check

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
    report = check(network)
    assert report["ok"], report


def _answer(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP answer read from `sock`: (status line, headers by lower-case name, body by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the peer closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert "transfer-encoding" not in headers, headers
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the peer closed the connection inside the body"
        body += chunk
    assert len(body) == length, (body, length)
    return status.encode(), headers, body


def test_its_answers_carry_their_length_on_a_kept_alive_connection(network: LocalNetwork) -> None:
    # a Content-Length instead of a chunked body: two writes to the socket per answer where three did
    spec = network.specs["bank"]
    token = network.token("bank")
    raw = socket.create_connection(("127.0.0.1", spec.port), timeout=10)
    with network.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        for body, path, expected in (
            (b'{"sql": "SELECT 1 AS one"}', "/api/v1/query", b"200"),
            (b"{not json", "/api/v1/exec", b"400"),
            (b'{"sql": "SELECT 2 AS two"}', "/api/v1/query", b"200"),
        ):
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {token}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, headers, answer = _answer(sock)
            assert status.split()[1] == expected, (status, answer)
            assert headers.get("connection", "keep-alive").lower() == "keep-alive"
            assert json.loads(answer)  # the whole JSON answer, and nothing of the next one
