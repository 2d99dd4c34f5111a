"""The client app (PEER_MODE=client). Cluster tier: a real gunicorn process in front of the government peer of
the example network, driven over HTTP like a browser (login, HTML forms with the CSRF token) and like a program
(REST with the session and its CSRF token, or HTTP Basic). Unit tier: its settings, and a client that must refuse to
start without them."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from peer.dejima.config import ConfigError, client_password, load_config
from peer.network import CLIENT_USER, LocalNetwork, free_port
from tests.helpers import browser_session, start_client, start_peer_process

TABLE = "government_users"
JANE = {
    "first_name": "Jane",
    "last_name": "Roe",
    "phone": "555-0199",
    "address": "2 Elm St",
    "birthdate": "1980-05-17",
}
TIMEOUT = 30


@dataclass(frozen=True)
class ClientApp:
    url: str
    password: str
    user: str = CLIENT_USER


def login(app: ClientApp, password: str | None = None, csrf_header: bool = True) -> requests.Session:
    """A requests.Session logged in to the client through its login form. With `csrf_header` it sends the CSRF
    token (of its cookie) as X-CSRFToken on every request, as a script using the session with the REST API must."""
    session = browser_session(app.url)
    token = csrf_form(session, f"{app.url}/login")
    resp = session.post(
        f"{app.url}/login",
        data={"username": app.user, "password": password or app.password, "csrfmiddlewaretoken": token, "next": "/"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 302, resp.text
    assert resp.headers["Location"] == "/"
    if csrf_header:  # login rotates the CSRF token: take the new one
        session.headers["X-CSRFToken"] = csrf_cookie(session)
    return session


def csrf_cookie(session: requests.Session) -> str:
    return next(str(c.value) for c in session.cookies if c.name.endswith("_csrftoken"))


def session_cookie(session: requests.Session) -> str | None:
    return next((str(c.value) for c in session.cookies if c.name.endswith("_session")), None)


def start_app(net: LocalNetwork, state_dir: Path, name: str, peer_url: str) -> tuple[LocalNetwork, ClientApp]:
    client = start_client(net, state_dir, name, peer_url)
    return client, ClientApp(client.specs[name].url, client.password(name))


@pytest.fixture(scope="module")
def client_app(example_network: LocalNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientApp]:
    gov = example_network.specs["government"].url
    client, app = start_app(example_network, tmp_path_factory.mktemp("client"), "government-client", gov)
    try:
        yield app
    finally:
        client.stop_all()


@pytest.fixture
def client(network: LocalNetwork, client_app: ClientApp) -> str:
    """The client's URL, in front of a network with empty base tables."""
    return client_app.url


@pytest.fixture
def browser(client: str, client_app: ClientApp) -> Iterator[requests.Session]:
    """A session logged in to the client (sends its CSRF token as X-CSRFToken, for the REST API)."""
    with login(client_app) as session:
        yield session


def csrf_form(session: requests.Session, url: str) -> str:
    """GET a form page; the CSRF token of its form (the session keeps the CSRF cookie)."""
    resp = session.get(url, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', resp.text)
    assert match, "no CSRF token in the form"
    return match.group(1)


def api_rows(browser: requests.Session, client: str) -> list[dict[str, Any]]:
    resp = browser.get(f"{client}/client/api/v1/tables/{TABLE}/rows", timeout=TIMEOUT)
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
@pytest.mark.unit
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
@pytest.mark.cluster
def test_home_page_lists_the_base_tables_and_what_is_shared_with_whom(client: str, browser: requests.Session) -> None:
    resp = browser.get(client + "/", timeout=TIMEOUT)
    assert resp.status_code == 200
    page = html.unescape(resp.text)
    assert TABLE in page
    assert "dejima_bank → bank, government" in page
    assert "dejima_insurance → government, insurance" in page
    table = browser.get(f"{client}/tables/{TABLE}/", timeout=TIMEOUT)
    assert table.status_code == 200
    header = html.unescape(table.text.split("<tbody>")[0])
    phone = header.split(">phone <")[1].split("</th>")[0]
    assert "dejima_bank → bank, government" in phone
    assert "dejima_insurance" not in phone  # insurance never sees a phone
    # the same through REST
    api = browser.get(client + "/client/api/v1/tables", timeout=TIMEOUT).json()
    assert api["peer"] == "government"
    columns = {c["name"]: c for c in api["tables"][0]["columns"]}
    assert [(s["view"], s["peers"]) for s in columns["phone"]["shared"]] == [("dejima_bank", ["bank", "government"])]
    assert [s["view"] for s in columns["address"]["shared"]] == ["dejima_bank", "dejima_insurance"]
    assert columns["id"] == {"name": "id", "type": "bigint", "not_null": True, "read_only": True, "shared": []}
    # client mode serves the client only: the peer's endpoints are not there
    assert browser.post(client + "/api/v1/exec", json={"sql": "SELECT 1"}, timeout=TIMEOUT).status_code == 404
    assert browser.get(client + "/api/v1/status", timeout=TIMEOUT).status_code == 404


@pytest.mark.cluster
def test_adding_a_row_through_the_form_commits_and_reaches_bank_and_insurance(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
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


@pytest.mark.cluster
def test_editing_and_deleting_through_the_forms_propagate(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    created = browser.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    row_id = created.json()["row"]["id"]
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


@pytest.mark.cluster
def test_a_form_post_without_csrf_token_is_refused(client: str, client_app: ClientApp, network: LocalNetwork) -> None:
    add = f"{client}/tables/{TABLE}/add"
    # no cookie, no token (another site's form)
    resp = requests.post(add, data=JANE, allow_redirects=False, timeout=TIMEOUT)
    assert resp.status_code == 403
    assert "nothing was changed" in resp.text
    # logged in (the session cookie of a real visit, which a cross-site form would carry), but no token in the form
    with login(client_app, csrf_header=False) as browser:
        csrf_form(browser, add)
        resp = browser.post(add, data=JANE, allow_redirects=False, timeout=TIMEOUT)
        assert resp.status_code == 403
        resp = browser.post(add, data={**JANE, "csrfmiddlewaretoken": "x" * 64}, timeout=TIMEOUT)
        assert resp.status_code == 403
        # the REST API with the session cookie: a write needs the X-CSRFToken header too (DRF SessionAuthentication)
        api = browser.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
        assert api.status_code == 403, api.text
        assert (api.json()["kind"], api.json()["error"].startswith("CSRF Failed")) == ("permission_denied", True)
        assert browser.get(f"{client}/client/api/v1/tables/{TABLE}/rows", timeout=TIMEOUT).status_code == 200
    empty_everywhere(network)


@pytest.mark.cluster
def test_a_bad_value_is_a_clear_error_and_changes_nothing_anywhere(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
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

    api = browser.post(
        f"{client}/client/api/v1/tables/{TABLE}/rows", json={**JANE, "birthdate": "not a date"}, timeout=TIMEOUT
    )
    assert api.status_code == 400
    body = api.json()
    assert body["kind"] == "invalid"
    assert body["fields"] == {"birthdate": ["birthdate: 'not a date' is not a date (write YYYY-MM-DD)"]}
    empty_everywhere(network)


# ---- REST -----------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_editing_and_deleting_through_rest_propagate(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    rows_url = f"{client}/client/api/v1/tables/{TABLE}/rows"
    created = browser.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["status"], body["participants"]) == ("committed", ["bank", "insurance"])
    assert body["message"] == "committed (reached bank, insurance)"
    row_id = body["row"]["id"]
    assert created.headers["Location"].endswith(f"/rows/{row_id}")
    assert api_rows(browser, client) == [{"id": row_id, **JANE}]

    # the phone is shared with bank only
    resp = browser.patch(f"{rows_url}/{row_id}", json={"phone": "555-0200"}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank"]
    assert resp.json()["row"]["phone"] == "555-0200"
    # the address with both; a NULL survives
    resp = browser.patch(f"{rows_url}/{row_id}", json={"address": None, "birthdate": "1980-05-18"}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank", "insurance"]
    assert everywhere(network) == {
        "government": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0200", "address": None}],
        "bank": [{"first_name": "Jane", "last_name": "Roe", "phone": "555-0200", "address": None}],
        "insurance": [{"first_name": "Jane", "last_name": "Roe", "address": None, "birthdate": "1980-05-18"}],
    }

    resp = browser.delete(f"{rows_url}/{row_id}", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["participants"] == ["bank", "insurance"]
    empty_everywhere(network)
    assert browser.delete(f"{rows_url}/{row_id}", timeout=TIMEOUT).status_code == 404


@pytest.mark.cluster
def test_rest_checks_tables_columns_and_types_against_the_manifest(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    api = f"{client}/client/api/v1/tables"
    resp = browser.get(f"{api}/bank_users/rows", timeout=TIMEOUT)
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
        resp = browser.post(f"{api}/{TABLE}/rows", json=row, timeout=TIMEOUT)
        assert resp.status_code == 400, case
        assert resp.json()["kind"] == "invalid", case
        assert message in resp.json()["fields"][column][0], (case, resp.json())
    bad_json = browser.post(
        f"{api}/{TABLE}/rows", data="{", headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert (bad_json.status_code, bad_json.json()["kind"]) == (400, "invalid")
    form = browser.post(f"{api}/{TABLE}/rows", data=JANE, timeout=TIMEOUT)  # JSON only: no cross-site forms
    assert form.status_code == 415
    assert browser.patch(f"{api}/{TABLE}/rows/999", json={"phone": "1"}, timeout=TIMEOUT).status_code == 404
    assert browser.patch(f"{api}/{TABLE}/rows/999", json={}, timeout=TIMEOUT).status_code == 400
    empty_everywhere(network)


@pytest.mark.cluster
def test_a_duplicate_and_a_conflict_are_said_plainly_with_the_peers_status(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    rows_url = f"{client}/client/api/v1/tables/{TABLE}/rows"
    created = browser.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    row_id = created.json()["row"]["id"]
    again = browser.post(rows_url, json=JANE, timeout=TIMEOUT)
    assert again.status_code == 422
    assert again.json()["error"] == "a row with first_name, last_name = Jane, Roe already exists; nothing was changed"

    # Someone holds the row (a transaction at government's database): the write waits lock_timeout, then 409.
    with psycopg.connect(network.server.url(network.specs["government"].database)) as other:
        other.execute("SELECT * FROM government_users WHERE id = %s FOR UPDATE", (row_id,))
        resp = browser.patch(f"{rows_url}/{row_id}", json={"phone": "555-0300"}, timeout=TIMEOUT)
        assert resp.status_code == 409, resp.text
        assert resp.headers["Retry-After"] == "1"
        assert resp.json()["error"] == "someone else changed this row at the same time; try again"
        other.rollback()
    assert network.query("bank", "SELECT phone FROM bank_users") == [{"phone": "555-0199"}]


@pytest.mark.cluster
def test_values_are_escaped_and_quoted_not_interpreted(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    odd = {
        "first_name": "<script>alert(1)</script>",
        "last_name": "O'Brien",
        "address": '1 "Quote" St; DROP TABLE x',
        "phone": "\\x00 $$ %s {}",
    }
    resp = browser.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=odd, timeout=TIMEOUT)
    assert resp.status_code == 201, resp.text
    page = browser.get(f"{client}/tables/{TABLE}/", timeout=TIMEOUT).text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert network.query("bank", "SELECT first_name, last_name, address, phone FROM bank_users") == [odd]


@pytest.mark.cluster
def test_an_unreachable_peer_is_said_plainly_and_nothing_changes(
    client: str, network: LocalNetwork, browser: requests.Session
) -> None:
    network.stop("insurance")  # the `network` fixture restarts it for the next test
    resp = browser.post(f"{client}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["kind"] == "unreachable"
    assert body["error"] == "peer insurance is unreachable; nothing was changed"
    token = csrf_form(browser, f"{client}/tables/{TABLE}/add")
    page = browser.post(f"{client}/tables/{TABLE}/add", data={**JANE, "csrfmiddlewaretoken": token}, timeout=TIMEOUT)
    assert page.status_code == 503
    assert "peer insurance is unreachable; nothing was changed" in page.text
    assert network.query("government", "SELECT * FROM government_users") == []
    assert network.query("bank", "SELECT * FROM bank_users") == []


@pytest.mark.cluster
def test_a_client_whose_peer_service_is_down_explains_it_and_never_fails_with_500(
    network: LocalNetwork, tmp_path: Path
) -> None:
    dead = f"https://127.0.0.1:{free_port()}"
    lonely, app = start_app(network, tmp_path, "lonely-client", dead)
    url = app.url
    try:
        with login(app) as browser:  # logging in needs no peer
            home = browser.get(url + "/", timeout=TIMEOUT)
            assert home.status_code == 200
            assert f"the peer service at {dead} is unreachable" in home.text
            assert "dejima_bank → bank, government" in html.unescape(home.text)  # from the manifest
            table = browser.get(f"{url}/tables/{TABLE}/", timeout=TIMEOUT)
            assert table.status_code == 503
            write = browser.post(f"{url}/client/api/v1/tables/{TABLE}/rows", json=JANE, timeout=TIMEOUT)
            assert write.status_code == 503
            assert (
                write.json()["error"]
                == f"the peer service at {dead} is unreachable (ConnectionError); nothing was changed"
            )
        assert requests.get(url + "/health", timeout=TIMEOUT).json()["peer"] == "unreachable"
    finally:
        lonely.stop_all()


# ---- login ----------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_an_anonymous_visitor_is_sent_to_the_login_page_and_sees_no_data(client: str) -> None:
    for path in ("/", f"/tables/{TABLE}/", f"/tables/{TABLE}/add", f"/tables/{TABLE}/rows/1/edit"):
        resp = requests.get(client + path, allow_redirects=False, timeout=TIMEOUT)
        assert resp.status_code == 302, path
        assert resp.headers["Location"] == f"/login?next={path}", path
    page = requests.get(client + "/", timeout=TIMEOUT)  # following the redirect
    assert page.url.startswith(f"{client}/login")
    assert "Log in" in page.text and 'name="csrfmiddlewaretoken"' in page.text
    assert "government_users" not in page.text  # no table names, no peer details before login
    health = requests.get(client + "/health", timeout=TIMEOUT)  # stays public (for probes)
    assert (health.status_code, health.json()["status"]) == (200, "ok")


@pytest.mark.cluster
def test_the_anonymous_rest_api_answers_401_with_a_clear_message(client: str, network: LocalNetwork) -> None:
    api = f"{client}/client/api/v1/tables"
    for method, url, body in (
        ("GET", api, None),
        ("GET", f"{api}/{TABLE}/rows", None),
        ("POST", f"{api}/{TABLE}/rows", JANE),
        ("PATCH", f"{api}/{TABLE}/rows/1", {"phone": "1"}),
        ("DELETE", f"{api}/{TABLE}/rows/1", None),
    ):
        resp = requests.request(method, url, json=body, allow_redirects=False, timeout=TIMEOUT)
        assert resp.status_code == 401, (method, url, resp.text)
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert resp.json() == {
            "status": "error",
            "kind": "not_authenticated",
            "error": "log in first: send HTTP Basic credentials of a client user, or the session cookie of /login"
            " (with an X-CSRFToken header for POST, PATCH and DELETE)",
        }
    empty_everywhere(network)


@pytest.mark.cluster
def test_a_wrong_password_is_refused_and_opens_no_session(client: str, client_app: ClientApp) -> None:
    with browser_session(client) as browser:
        token = csrf_form(browser, f"{client}/login")
        resp = browser.post(
            f"{client}/login",
            data={"username": client_app.user, "password": "not-the-password", "csrfmiddlewaretoken": token},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
        assert resp.status_code == 200
        assert "Wrong user name or password; you are not logged in" in resp.text
        assert session_cookie(browser) is None
        assert browser.get(client + "/", allow_redirects=False, timeout=TIMEOUT).status_code == 302
        # a login form without its CSRF token is refused as well
        resp = browser.post(
            f"{client}/login", data={"username": client_app.user, "password": client_app.password}, timeout=TIMEOUT
        )
        assert resp.status_code == 403
        assert session_cookie(browser) is None
    wrong_basic = requests.get(
        f"{client}/client/api/v1/tables", auth=(client_app.user, "not-the-password"), timeout=TIMEOUT
    )
    assert (wrong_basic.status_code, wrong_basic.json()["kind"]) == (401, "authentication_failed")


@pytest.mark.cluster
def test_login_cookies_are_httponly_and_samesite_lax(client: str, client_app: ClientApp) -> None:
    with browser_session(client) as browser:
        token = csrf_form(browser, f"{client}/login")
        resp = browser.post(
            f"{client}/login",
            data={"username": client_app.user, "password": client_app.password, "csrfmiddlewaretoken": token},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
    assert resp.status_code == 302
    cookies = resp.headers["Set-Cookie"]
    session = next(c for c in cookies.split(", dejima_") if "_session=" in c)
    assert "HttpOnly" in session and "SameSite=Lax" in session
    csrf = next(c for c in cookies.split(", dejima_") if "_csrftoken=" in c)
    assert "SameSite=Lax" in csrf


@pytest.mark.cluster
def test_after_login_a_row_added_through_the_form_commits_and_propagates_then_logout_ends_the_session(
    client: str, client_app: ClientApp, network: LocalNetwork
) -> None:
    with login(client_app, csrf_header=False) as browser:
        home = browser.get(client + "/", timeout=TIMEOUT)
        assert home.status_code == 200 and "Log out" in home.text and client_app.user in home.text
        token = csrf_form(browser, f"{client}/tables/{TABLE}/add")
        resp = browser.post(
            f"{client}/tables/{TABLE}/add",
            data={**JANE, "csrfmiddlewaretoken": token},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
        assert resp.status_code == 303, resp.text
        assert network.query("bank", "SELECT first_name, phone FROM bank_users") == [
            {"first_name": "Jane", "phone": "555-0199"}
        ]
        assert network.query("insurance", "SELECT first_name, birthdate::text AS b FROM insurance_users") == [
            {"first_name": "Jane", "b": "1980-05-17"}
        ]
        old_session = session_cookie(browser)
        assert old_session
        # logout is a POST with the CSRF token (a GET does not log out)
        assert browser.get(f"{client}/logout", allow_redirects=False, timeout=TIMEOUT).status_code == 405
        token = csrf_form(browser, f"{client}/")
        resp = browser.post(
            f"{client}/logout", data={"csrfmiddlewaretoken": token}, allow_redirects=False, timeout=TIMEOUT
        )
        assert (resp.status_code, resp.headers["Location"]) == (302, "/login")
        after = browser.get(f"{client}/tables/{TABLE}/", allow_redirects=False, timeout=TIMEOUT)
        assert (after.status_code, after.headers["Location"]) == (302, f"/login?next=/tables/{TABLE}/")
    # the old session cookie is dead on the server side too (a copy of it gets nowhere)
    with requests.Session() as thief:
        thief.cookies.set("dejima_government-client_session", old_session)
        assert thief.get(client + "/", allow_redirects=False, timeout=TIMEOUT).status_code == 302
        assert thief.get(f"{client}/client/api/v1/tables", timeout=TIMEOUT).status_code == 401


@pytest.mark.cluster
def test_http_basic_works_for_the_rest_api(client: str, client_app: ClientApp, network: LocalNetwork) -> None:
    auth = (client_app.user, client_app.password)
    rows_url = f"{client}/client/api/v1/tables/{TABLE}/rows"
    created = requests.post(rows_url, json=JANE, auth=auth, timeout=TIMEOUT)  # no CSRF token needed: no cookie
    assert created.status_code == 201, created.text
    assert created.json()["participants"] == ["bank", "insurance"]
    row_id = created.json()["row"]["id"]
    got = requests.get(f"{rows_url}/{row_id}", auth=auth, timeout=TIMEOUT)
    assert (got.status_code, got.json()["phone"]) == (200, "555-0199")
    assert requests.delete(f"{rows_url}/{row_id}", auth=auth, timeout=TIMEOUT).status_code == 200
    empty_everywhere(network)
    # Basic is for the API only: the pages still ask for the login form
    assert requests.get(client + "/", auth=auth, allow_redirects=False, timeout=TIMEOUT).status_code == 302


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    env.update(
        {
            "PEER_TYPE": "government",
            "PEER_MODE": "client",
            "DEJIMA_PEER_URL": "http://127.0.0.1:8001",
            "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
            "DEJIMA_PEER_TOKEN": "dj_" + "t" * 43,  # the API token it would send its peer (required outside debug)
            **extra,
        }
    )
    return env


@pytest.mark.unit
@pytest.mark.parametrize("password", [None, "", "  ", "admin", "changeme", "short"])
def test_outside_debug_a_client_without_a_real_password_is_refused_naming_the_setting(password: str | None) -> None:
    env = {k: v for k, v in client_env().items() if k.startswith(("DEJIMA_", "PEER_"))}
    if password is not None:
        env["DEJIMA_CLIENT_PASSWORD"] = password
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert err.value.setting == "DEJIMA_CLIENT_PASSWORD"
    assert "DEJIMA_DEBUG=1" in str(err.value) and "'admin'" in str(err.value)
    # debug: a development password is accepted (the user can then log in with it)
    assert load_config({**env, "DEJIMA_DEBUG": "1"}).client_password
    # a peer (not a client) needs none
    assert (
        load_config(
            {
                **env,
                "PEER_MODE": "peer",
                "DEJIMA_DATABASE_URL": "postgresql://x@h/db",
                "DEJIMA_CLIENT_DATABASE_URL": "postgresql://c@h/db",
            }
        ).client_password
        == ""
    )


@pytest.mark.unit
def test_the_client_password_may_come_from_a_file(tmp_path: Path) -> None:
    env = {k: v for k, v in client_env().items() if k.startswith(("DEJIMA_", "PEER_"))}
    path = tmp_path / "password"
    path.write_text("a-long-generated-password\n")
    config = load_config({**env, "DEJIMA_CLIENT_PASSWORD_FILE": str(path), "DEJIMA_CLIENT_USER": "clerk"})
    assert (config.client_user, config.client_password) == ("clerk", "a-long-generated-password")
    assert "a-long-generated-password" not in repr(config)
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"^DEJIMA_CLIENT_PASSWORD_FILE: is empty"):
        client_password({**env, "DEJIMA_CLIENT_PASSWORD_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"^DEJIMA_CLIENT_PASSWORD_FILE: cannot read"):
        client_password({**env, "DEJIMA_CLIENT_PASSWORD_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"^DEJIMA_CLIENT_PASSWORD_FILE: give the password once"):
        client_password({**env, "DEJIMA_CLIENT_PASSWORD": "x" * 20, "DEJIMA_CLIENT_PASSWORD_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"^DEJIMA_CLIENT_USER: "):
        load_config({**env, "DEJIMA_CLIENT_PASSWORD": "x" * 20, "DEJIMA_CLIENT_USER": "no spaces"})


@pytest.mark.unit  # no database: one gunicorn process, which must refuse to start
def test_a_client_without_a_password_outside_debug_refuses_to_start(tmp_path: Path) -> None:
    env = client_env(DEJIMA_BIND=f"127.0.0.1:{free_port()}", DEJIMA_CLIENT_DB=str(tmp_path / "users.sqlite3"))
    done = start_peer_process(env)
    assert done.returncode != 0
    assert "bad setting DEJIMA_CLIENT_PASSWORD: is missing; outside debug" in done.stderr, done.stderr
    assert not (tmp_path / "users.sqlite3").exists()
