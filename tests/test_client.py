"""Cluster tier: the client app (PEER_MODE=client) as a real gunicorn process in front of the government peer of
the example network, driven over HTTP like a browser (HTML forms with the CSRF token) and like a program (REST)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from peer.dejima.config import ConfigError, load_config
from peer.network import LocalNetwork, PeerSpec, free_port

pytestmark = pytest.mark.cluster

TABLE = "government_users"
JANE = {
    "first_name": "Jane",
    "last_name": "Roe",
    "phone": "555-0199",
    "address": "2 Elm St",
    "birthdate": "1980-05-17",
}
TIMEOUT = 30


def start_client(net: LocalNetwork, state_dir: Path, name: str, peer_url: str) -> LocalNetwork:
    """A one-process LocalNetwork running the government client (PEER_MODE=client) against `peer_url`."""
    spec = PeerSpec(
        name=name,
        peer_type="government",
        port=free_port(),
        database="",
        mode="client",
        env={"DEJIMA_PEER_URL": peer_url, "DEJIMA_PEER_TIMEOUT": "20"},
    )
    client = LocalNetwork(net.server, state_dir, [spec])
    client.start(name)
    try:
        client.wait_healthy(name, timeout=30)
    except Exception:
        client.stop_all()
        raise
    return client


@pytest.fixture(scope="module")
def client_url(example_network: LocalNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gov = example_network.specs["government"].url
    client = start_client(example_network, tmp_path_factory.mktemp("client"), "government-client", gov)
    try:
        yield client.specs["government-client"].url
    finally:
        client.stop_all()


@pytest.fixture
def client(network: LocalNetwork, client_url: str) -> str:
    """The client's URL, in front of a network with empty base tables."""
    return client_url


def csrf_form(session: requests.Session, url: str) -> str:
    """GET a form page; the CSRF token of its form (the session keeps the CSRF cookie)."""
    resp = session.get(url, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', resp.text)
    assert match, "no CSRF token in the form"
    return match.group(1)


def api_rows(client: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{client}/client/api/v1/tables/{TABLE}/rows", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    rows: list[dict[str, Any]] = resp.json()["rows"]
    return rows


def everywhere(network: LocalNetwork) -> dict[str, list[dict[str, Any]]]:
    return {
        "government": network.query("government", "SELECT first_name, last_name, phone, address FROM government_users"),
        "bank": network.query("bank", "SELECT first_name, last_name, phone, address FROM bank_users"),
        "insurance": network.query(
            "insurance", "SELECT first_name, last_name, address, birthdate::text AS birthdate FROM insurance_users"
        ),
    }


def empty_everywhere(network: LocalNetwork) -> None:
    assert everywhere(network) == {"government": [], "bank": [], "insurance": []}


# ---- settings -------------------------------------------------------------------------------------------------
def test_client_mode_needs_the_peer_url_and_no_database() -> None:
    env = {"PEER_TYPE": "government", "PEER_MODE": "client", "DEJIMA_DEBUG": "1"}
    with pytest.raises(ConfigError, match="DEJIMA_PEER_URL: is required in client mode"):
        load_config(env)
    config = load_config({**env, "DEJIMA_PEER_URL": "http://127.0.0.1:8001/"})
    assert (config.peer_url_for_client, config.database_url, config.peer_timeout) == ("http://127.0.0.1:8001", "", 30)
    with pytest.raises(ConfigError, match="DEJIMA_PEER_URL"):
        load_config({**env, "DEJIMA_PEER_URL": "not a url"})
    with pytest.raises(ConfigError, match="DEJIMA_DATABASE_URL"):
        load_config({"PEER_TYPE": "government"})


# ---- web app --------------------------------------------------------------------------------------------------
def test_home_page_lists_the_base_tables_and_what_is_shared_with_whom(client: str) -> None:
    resp = requests.get(client + "/", timeout=TIMEOUT)
    assert resp.status_code == 200
    page = html.unescape(resp.text)
    assert TABLE in page
    assert "dejima_bank → bank, government" in page
    assert "dejima_insurance → government, insurance" in page
    table = requests.get(f"{client}/tables/{TABLE}/", timeout=TIMEOUT)
    assert table.status_code == 200
    header = html.unescape(table.text.split("<tbody>")[0])
    phone = header.split(">phone <")[1].split("</th>")[0]
    assert "dejima_bank → bank, government" in phone
    assert "dejima_insurance" not in phone  # insurance never sees a phone
    # the same through REST
    api = requests.get(client + "/client/api/v1/tables", timeout=TIMEOUT).json()
    assert api["peer"] == "government"
    columns = {c["name"]: c for c in api["tables"][0]["columns"]}
    assert [(s["view"], s["peers"]) for s in columns["phone"]["shared"]] == [("dejima_bank", ["bank", "government"])]
    assert [s["view"] for s in columns["address"]["shared"]] == ["dejima_bank", "dejima_insurance"]
    assert columns["id"] == {"name": "id", "type": "bigint", "not_null": True, "read_only": True, "shared": []}
    # client mode serves the client only: the peer's endpoints are not there
    assert requests.post(client + "/api/v1/exec", json={"sql": "SELECT 1"}, timeout=TIMEOUT).status_code == 404
    assert requests.get(client + "/api/v1/status", timeout=TIMEOUT).status_code == 404


def test_adding_a_row_through_the_form_commits_and_reaches_bank_and_insurance(
    client: str, network: LocalNetwork
) -> None:
    with requests.Session() as browser:
        token = csrf_form(browser, f"{client}/tables/{TABLE}/add")
        resp = browser.post(
            f"{client}/tables/{TABLE}/add",
            data={**JANE, "csrfmiddlewaretoken": token},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
        assert resp.status_code == 303, resp.text
        page = browser.get(client + resp.headers["Location"], timeout=TIMEOUT)
    assert "committed (reached bank, insurance)" in page.text
    assert "Jane" in page.text and "555-0199" in page.text
    assert everywhere(network) == {
        "government": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St"}],
        "bank": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0199", "address": "2 Elm St"}],
        "insurance": [{"first_name": "Jane", "last_name": "Roe", "address": "2 Elm St", "birthdate": "1980-05-17"}],
    }


def test_editing_and_deleting_through_the_forms_propagate(client: str, network: LocalNetwork) -> None:
    created = requests.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    row_id = created.json()["row"]["id"]
    with requests.Session() as browser:
        edit_url = f"{client}/tables/{TABLE}/rows/{row_id}/edit"
        form = browser.get(edit_url, timeout=TIMEOUT).text
        assert 'value="555-0199"' in form
        token = csrf_form(browser, edit_url)
        originals = {f"orig_{k}": v for k, v in JANE.items()}
        resp = browser.post(
            edit_url,
            data={**JANE, **originals, "address": "3 Oak Ave", "csrfmiddlewaretoken": token},
            timeout=TIMEOUT,
        )
        assert resp.status_code == 200, resp.text
        assert "committed (reached bank, insurance)" in resp.text
        assert network.query("bank", "SELECT address FROM bank_users") == [{"address": "3 Oak Ave"}]
        assert network.query("insurance", "SELECT address FROM insurance_users") == [{"address": "3 Oak Ave"}]

        delete_url = f"{client}/tables/{TABLE}/rows/{row_id}/delete"
        confirm = browser.get(delete_url, timeout=TIMEOUT)
        assert confirm.status_code == 200 and "Delete this row" in confirm.text
        assert network.query("government", "SELECT count(*) AS n FROM government_users") == [{"n": 1}]  # GET: no-op
        token = csrf_form(browser, delete_url)
        resp = browser.post(delete_url, data={"csrfmiddlewaretoken": token}, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        assert "committed (reached bank, insurance)" in resp.text
    empty_everywhere(network)


def test_a_form_post_without_csrf_token_is_refused(client: str, network: LocalNetwork) -> None:
    add = f"{client}/tables/{TABLE}/add"
    # no cookie, no token (another site's form)
    resp = requests.post(add, data=JANE, allow_redirects=False, timeout=TIMEOUT)
    assert resp.status_code == 403
    assert "nothing was changed" in resp.text
    # the cookie of a real visit, but no token in the form
    with requests.Session() as browser:
        csrf_form(browser, add)
        resp = browser.post(add, data=JANE, allow_redirects=False, timeout=TIMEOUT)
        assert resp.status_code == 403
        resp = browser.post(add, data={**JANE, "csrfmiddlewaretoken": "x" * 64}, timeout=TIMEOUT)
        assert resp.status_code == 403
    empty_everywhere(network)


def test_a_bad_value_is_a_clear_error_and_changes_nothing_anywhere(client: str, network: LocalNetwork) -> None:
    with requests.Session() as browser:
        token = csrf_form(browser, f"{client}/tables/{TABLE}/add")
        resp = browser.post(
            f"{client}/tables/{TABLE}/add",
            data={**JANE, "birthdate": "not a date", "csrfmiddlewaretoken": token},
            timeout=TIMEOUT,
        )
    assert resp.status_code == 400
    page = html.unescape(resp.text)
    assert "Nothing was changed: birthdate: 'not a date' is not a date (write YYYY-MM-DD)" in page
    assert 'value="555-0199"' in resp.text  # the form keeps what was typed

    api = requests.post(
        f"{client}/client/api/v1/tables/{TABLE}/rows", json={**JANE, "birthdate": "not a date"}, timeout=TIMEOUT
    )
    assert api.status_code == 400
    body = api.json()
    assert body["kind"] == "invalid"
    assert body["fields"] == {"birthdate": ["birthdate: 'not a date' is not a date (write YYYY-MM-DD)"]}
    empty_everywhere(network)


# ---- REST -----------------------------------------------------------------------------------------------------
def test_editing_and_deleting_through_rest_propagate(client: str, network: LocalNetwork) -> None:
    rows_url = f"{client}/client/api/v1/tables/{TABLE}/rows"
    created = requests.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["status"], body["participants"]) == ("committed", ["bank", "insurance"])
    assert body["message"] == "committed (reached bank, insurance)"
    row_id = body["row"]["id"]
    assert created.headers["Location"].endswith(f"/rows/{row_id}")
    assert api_rows(client) == [{"id": row_id, **JANE}]

    # the phone is shared with bank only
    resp = requests.patch(f"{rows_url}/{row_id}", json={"phone": "555-0200"}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank"]
    assert resp.json()["row"]["phone"] == "555-0200"
    # the address with both; a NULL survives
    resp = requests.patch(f"{rows_url}/{row_id}", json={"address": None, "birthdate": "1980-05-18"}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank", "insurance"]
    assert everywhere(network) == {
        "government": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0200", "address": None}],
        "bank": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0200", "address": None}],
        "insurance": [{"first_name": "Jane", "last_name": "Roe", "address": None, "birthdate": "1980-05-18"}],
    }

    resp = requests.delete(f"{rows_url}/{row_id}", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank", "insurance"]
    empty_everywhere(network)
    assert requests.delete(f"{rows_url}/{row_id}", timeout=TIMEOUT).status_code == 404


def test_rest_checks_tables_columns_and_types_against_the_manifest(client: str, network: LocalNetwork) -> None:
    api = f"{client}/client/api/v1/tables"
    resp = requests.get(f"{api}/bank_users/rows", timeout=TIMEOUT)
    assert resp.status_code == 404
    assert resp.json()["error"] == "unknown table 'bank_users'; this peer's base tables: government_users"

    cases = {
        "unknown column": ({**JANE, "iban": "DE89"}, "iban", "unknown column 'iban' of table government_users"),
        "surrogate id": ({**JANE, "id": 7}, "id", "id is assigned by the peer and cannot be set"),
        "number for text": ({**JANE, "phone": 5550199}, "phone", "phone: 5550199 is not text"),
        "text for a date": ({**JANE, "birthdate": 1980}, "birthdate", "birthdate: 1980 is not a date"),
        "missing required": ({"last_name": "Roe"}, "first_name", "first_name is required"),
        "null for required": ({**JANE, "last_name": None}, "last_name", "last_name is required"),
    }
    for case, (row, column, message) in cases.items():
        resp = requests.post(f"{api}/{TABLE}/rows", json=row, timeout=TIMEOUT)
        assert resp.status_code == 400, case
        assert resp.json()["kind"] == "invalid", case
        assert message in resp.json()["fields"][column][0], (case, resp.json())
    bad_json = requests.post(
        f"{api}/{TABLE}/rows", data="{", headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert (bad_json.status_code, bad_json.json()["kind"]) == (400, "invalid")
    form = requests.post(f"{api}/{TABLE}/rows", data=JANE, timeout=TIMEOUT)  # JSON only: no cross-site forms
    assert form.status_code == 415
    assert requests.patch(f"{api}/{TABLE}/rows/999", json={"phone": "1"}, timeout=TIMEOUT).status_code == 404
    assert requests.patch(f"{api}/{TABLE}/rows/999", json={}, timeout=TIMEOUT).status_code == 400
    empty_everywhere(network)


def test_a_duplicate_and_a_conflict_are_said_plainly_with_the_peers_status(client: str, network: LocalNetwork) -> None:
    rows_url = f"{client}/client/api/v1/tables/{TABLE}/rows"
    created = requests.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    row_id = created.json()["row"]["id"]
    again = requests.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert again.status_code == 422
    assert again.json()["error"] == "a row with first_name, last_name = Jane, Roe already exists; nothing was changed"

    # Someone holds the row (a transaction at government's database): the write waits lock_timeout, then 409.
    with psycopg.connect(network.server.url(network.specs["government"].database)) as other:
        other.execute("SELECT * FROM government_users WHERE id = %s FOR UPDATE", (row_id,))
        resp = requests.patch(f"{rows_url}/{row_id}", json={"phone": "555-0300"}, timeout=TIMEOUT)
        assert resp.status_code == 409, resp.text
        assert resp.headers["Retry-After"] == "1"
        assert resp.json()["error"] == "someone else changed this row at the same time; try again"
        other.rollback()
    assert network.query("bank", "SELECT phone FROM bank_users") == [{"phone": "555-0199"}]


def test_values_are_escaped_and_quoted_not_interpreted(client: str, network: LocalNetwork) -> None:
    odd = {
        "first_name": "<script>alert(1)</script>",
        "last_name": "O'Brien",
        "address": '1 "Quote" St; DROP TABLE x',
        "phone": "\\x00 $$ %s {}",
    }
    resp = requests.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=odd, timeout=TIMEOUT)
    assert resp.status_code == 201, resp.text
    page = requests.get(f"{client}/tables/{TABLE}/", timeout=TIMEOUT).text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert network.query("bank", "SELECT first_name, last_name, address, phone FROM bank_users") == [odd]


def test_an_unreachable_peer_is_said_plainly_and_nothing_changes(client: str, network: LocalNetwork) -> None:
    network.stop("insurance")  # the `network` fixture restarts it for the next test
    resp = requests.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["kind"] == "unreachable"
    assert body["error"] == "peer insurance is unreachable; nothing was changed"
    with requests.Session() as browser:
        token = csrf_form(browser, f"{client}/tables/{TABLE}/add")
        page = browser.post(
            f"{client}/tables/{TABLE}/add", data={**JANE, "csrfmiddlewaretoken": token}, timeout=TIMEOUT
        )
    assert page.status_code == 503
    assert "peer insurance is unreachable; nothing was changed" in page.text
    assert network.query("government", "SELECT * FROM government_users") == []
    assert network.query("bank", "SELECT * FROM bank_users") == []


def test_a_client_whose_peer_service_is_down_explains_it_and_never_fails_with_500(
    network: LocalNetwork, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    lonely = start_client(network, tmp_path, "lonely-client", dead)
    url = lonely.specs["lonely-client"].url
    try:
        home = requests.get(url + "/", timeout=TIMEOUT)
        assert home.status_code == 200
        assert f"the peer service at {dead} is unreachable" in home.text
        assert "dejima_bank → bank, government" in html.unescape(home.text)  # from the manifest
        table = requests.get(f"{url}/tables/{TABLE}/", timeout=TIMEOUT)
        assert table.status_code == 503
        write = requests.post(f"{url}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
        assert write.status_code == 503
        assert (
            write.json()["error"] == f"the peer service at {dead} is unreachable (ConnectionError); nothing was changed"
        )
        assert requests.get(url + "/health", timeout=TIMEOUT).json()["peer"] == "unreachable"
    finally:
        lonely.stop_all()
