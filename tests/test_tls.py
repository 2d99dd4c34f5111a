"""Unit tier of TLS between peers (peer/dejima/tls.py, docs/security.md "A network observer"): the settings checked at
start naming the setting at fault; the policy on clear text (refused without TLS or an explicit permission, a warning
with it); the lean listener and the transport over TLS on loopback, with real certificates of test CAs: verification
(the CA, the host of the URL), mutual TLS, the handshake in the connection's thread, keep-alive and session
resumption counted on both sides, and a plain URL refused. Every wait has a deadline.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer import tlscerts
from peer.dejima.auth import Authenticator
from peer.dejima.config import ConfigError, check_transport, load_config
from peer.dejima.messages import Hello
from peer.dejima.peerserver import PeerServer
from peer.dejima.tls import TlsSettings, check_files, client_context, server_context
from peer.dejima.transport import Connections, PlainRefused, Transport
from tests.helpers import start_peer_process

pytestmark = pytest.mark.unit

DEADLINE = 20.0
BASE = {
    "PEER_TYPE": "bank",
    "DEJIMA_DATABASE_URL": "postgresql://bank_peer@127.0.0.1:5432/bank",
    "DEJIMA_CLIENT_DATABASE_URL": "postgresql://bank_client@127.0.0.1:5432/bank",
    "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Pki:
    """A test CA in a folder and the certificates it issued: `settings(name)` gives a holder's TLS files."""

    folder: Path
    ca_cert: bytes
    ca_key: bytes

    @classmethod
    def make(cls, folder: Path, name: str = "test CA") -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = tlscerts.make_ca(name)
        (folder / "ca.pem").write_bytes(cert)
        return cls(folder, cert, key)

    def settings(self, holder: str, names: tuple[str, ...] = ("127.0.0.1", "localhost"), **kw: Any) -> TlsSettings:
        cert, key = self.folder / f"{holder}.pem", self.folder / f"{holder}-key.pem"
        tlscerts.ensure_issued(self.ca_cert, self.ca_key, cert, key, holder, names)
        return TlsSettings(cert, key, self.folder / "ca.pem", **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: a stranger's."""
    return Pki.make(tmp_path_factory.mktemp("other-pki"), "a stranger's CA")


def tls_env(settings: TlsSettings) -> dict[str, str]:
    return {
        "DEJIMA_TLS_CERT_FILE": str(settings.cert_file),
        "DEJIMA_TLS_KEY_FILE": str(settings.key_file),
        "DEJIMA_TLS_CA_FILE": str(settings.ca_file),
        "DEJIMA_URL": "https://127.0.0.1:9001",
    }


# ---- settings ---------------------------------------------------------------------------------------------------
def test_tls_settings_are_read_and_the_policy_allows_tls(pki: Pki) -> None:
    settings = pki.settings("bank")
    config = load_config({**BASE, **tls_env(settings), "DEJIMA_SEEDS": "https://127.0.0.1:9002"})
    assert config.tls == settings
    assert not config.allow_plain
    assert check_transport(config) == []
    defaults = {k: v for k, v in tls_env(settings).items() if k != "DEJIMA_URL"}
    assert load_config({**BASE, **defaults}).url == "https://127.0.0.1:8000"  # the default URL follows TLS


def _expired(pki: Pki, folder: Path) -> tuple[Path, Path]:
    """A certificate of the CA that expired yesterday, and its key."""
    key = serialization.load_pem_private_key((pki.folder / "bank-key.pem").read_bytes(), None)
    ca_key = serialization.load_pem_private_key(pki.ca_key, None)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.load_pem_x509_certificate(pki.ca_cert).subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = folder / "expired.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, pki.folder / "bank-key.pem"


@pytest.mark.parametrize(
    ("case", "setting", "message"),
    [
        ("no key", "DEJIMA_TLS_KEY_FILE", "is required with"),
        ("no CA", "DEJIMA_TLS_CA_FILE", "is required with"),
        ("cert unreadable", "DEJIMA_TLS_CERT_FILE", "cannot read"),
        ("cert not PEM", "DEJIMA_TLS_CERT_FILE", "is not a PEM certificate"),
        ("cert expired", "DEJIMA_TLS_CERT_FILE", "expired on"),
        ("key of another", "DEJIMA_TLS_KEY_FILE", "is not the key of the certificate"),
        ("key readable by others", "DEJIMA_TLS_KEY_FILE", "may be read by others"),
        ("CA not a CA", "DEJIMA_TLS_CA_FILE", "is not a CA certificate"),
        ("client certs unknown", "DEJIMA_TLS_CLIENT_CERTS", "must be 'none' or 'require'"),
        ("client certs without TLS", "DEJIMA_TLS_CLIENT_CERTS", "needs TLS"),
        ("client certs without listener", "DEJIMA_TLS_CLIENT_CERTS", "needs the message listener"),
        ("plain and TLS", "DEJIMA_ALLOW_PLAIN_HTTP", "cannot be allowed as well"),
        ("plain URL", "DEJIMA_URL", "is plain http, but TLS is on"),
        ("plain seed", "DEJIMA_SEEDS", "is plain http, but TLS is on"),
        ("plain peer URL", "DEJIMA_PEER_URL", "is plain http, but TLS is on"),
    ],
)
def test_a_bad_tls_setting_is_refused_naming_it(
    pki: Pki, tmp_path: Path, case: str, setting: str, message: str
) -> None:
    good = pki.settings("bank")
    env = {**BASE, **tls_env(good)}
    if case == "no key":
        del env["DEJIMA_TLS_KEY_FILE"]
    elif case == "no CA":
        del env["DEJIMA_TLS_CA_FILE"]
    elif case == "cert unreadable":
        env["DEJIMA_TLS_CERT_FILE"] = str(tmp_path / "missing.pem")
    elif case == "cert not PEM":
        (tmp_path / "junk.pem").write_text("not a certificate")
        env["DEJIMA_TLS_CERT_FILE"] = str(tmp_path / "junk.pem")
    elif case == "cert expired":
        cert, key = _expired(pki, tmp_path)
        env["DEJIMA_TLS_CERT_FILE"], env["DEJIMA_TLS_KEY_FILE"] = str(cert), str(key)
    elif case == "key of another":
        env["DEJIMA_TLS_KEY_FILE"] = str(pki.settings("insurance").key_file)
    elif case == "key readable by others":
        loose = tmp_path / "loose-key.pem"
        loose.write_bytes(good.key_file.read_bytes())
        loose.chmod(0o644)
        env["DEJIMA_TLS_KEY_FILE"] = str(loose)
    elif case == "CA not a CA":
        env["DEJIMA_TLS_CA_FILE"] = str(good.cert_file)
    elif case == "client certs unknown":
        env["DEJIMA_TLS_CLIENT_CERTS"] = "sometimes"
    elif case == "client certs without TLS":
        env = {**BASE, "DEJIMA_TLS_CLIENT_CERTS": "require"}
    elif case == "client certs without listener":
        env["DEJIMA_TLS_CLIENT_CERTS"] = "require"
    elif case == "plain and TLS":
        env["DEJIMA_ALLOW_PLAIN_HTTP"] = "1"
    elif case == "plain URL":
        env["DEJIMA_URL"] = "http://127.0.0.1:9001"
    elif case == "plain seed":
        env["DEJIMA_SEEDS"] = "https://127.0.0.1:9002,http://127.0.0.1:9003"
    elif case == "plain peer URL":
        env.update({"PEER_MODE": "client", "DEJIMA_PEER_URL": "http://127.0.0.1:8001", "DEJIMA_DEBUG": "1"})
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert err.value.setting == setting, err.value
    assert message in str(err.value)


def test_clear_text_needs_an_explicit_permission_or_debug() -> None:
    with pytest.raises(ConfigError, match=r"^DEJIMA_TLS_CERT_FILE: no TLS: give .*DEJIMA_ALLOW_PLAIN_HTTP=1"):
        check_transport(load_config(BASE))
    allowed = check_transport(load_config({**BASE, "DEJIMA_ALLOW_PLAIN_HTTP": "1"}))
    assert len(allowed) == 1 and "clear text" in allowed[0] and "DEJIMA_ALLOW_PLAIN_HTTP=1" in allowed[0]
    debug = check_transport(load_config({**BASE, "DEJIMA_DEBUG": "1"}))
    assert len(debug) == 1 and "debug" in debug[0] and "clear text" in debug[0]
    with pytest.raises(ConfigError, match=r"^DEJIMA_ALLOW_PLAIN_HTTP: 'yes' must be 1"):
        load_config({**BASE, "DEJIMA_ALLOW_PLAIN_HTTP": "yes"})


def _process_env(extra: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    return {**env, **BASE, "DEJIMA_BIND": "127.0.0.1:0", **extra}


def test_a_peer_refuses_to_start_without_tls_or_the_permission_naming_the_settings() -> None:
    done = start_peer_process(_process_env({}))
    assert done.returncode != 0
    for setting in ("DEJIMA_TLS_CERT_FILE", "DEJIMA_TLS_KEY_FILE", "DEJIMA_TLS_CA_FILE", "DEJIMA_ALLOW_PLAIN_HTTP"):
        assert setting in done.stderr, done.stderr
    assert "bad setting DEJIMA_TLS_CERT_FILE: no TLS" in done.stderr, done.stderr


def test_a_peer_refuses_to_start_with_a_bad_tls_setting(pki: Pki, tmp_path: Path) -> None:
    env = _process_env(tls_env(pki.settings("bank")))
    env["DEJIMA_TLS_KEY_FILE"] = str(pki.settings("insurance").key_file)
    done = start_peer_process(env)
    assert done.returncode != 0
    assert "bad setting DEJIMA_TLS_KEY_FILE:" in done.stderr and "is not the key of the certificate" in done.stderr


def test_the_files_are_checked_like_openssl_takes_them(pki: Pki) -> None:
    check_files(pki.settings("bank"))  # no error
    for context in (server_context(pki.settings("bank")), client_context(pki.settings("bank"))):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(pki.settings("bank")).check_hostname
    assert server_context(pki.settings("bank"), client_certs=True).verify_mode == ssl.CERT_REQUIRED


# ---- the listener and the transport on loopback -----------------------------------------------------------------
def ok(body: Any, remote: str) -> tuple[int, bytes, dict[str, str]]:
    return 200, b'{"ok":true}', {}


@pytest.fixture
def listener(request: pytest.FixtureRequest, pki: Pki) -> Iterator[PeerServer]:
    """A lean listener over TLS (bank's certificate, for 127.0.0.1 and localhost); with the parameter True it
    requires client certificates of the CA."""
    require = bool(getattr(request, "param", False))
    server = PeerServer(
        {"/m": ok},
        "127.0.0.1",
        0,
        1024 * 1024,
        read_timeout=2.0,
        name="tls-test",
        tls=server_context(pki.settings("bank"), client_certs=require),
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def caller(settings: TlsSettings) -> Connections:
    return Connections({"X-Dejima-Peer": "government"}, tls=client_context(settings), plain=False)


def test_messages_go_over_one_connection_and_the_handshake_is_not_repeated(pki: Pki, listener: PeerServer) -> None:
    conns = caller(pki.settings("government"))
    url = f"https://127.0.0.1:{listener.port}"
    try:
        for _ in range(20):
            assert conns.post(url, "/m", b"{}", 5.0) == (200, b'{"ok":true}')
        assert conns.snapshot() == {
            "connections": 1,
            "requests": 20,
            "handshakes": {"full": 1, "resumed": 0, "failed": 0},
        }
        assert listener.stats() == {"connections": 1, "handshakes": {"full": 1, "resumed": 0, "failed": 0}}
        # the listener closes the connection (its keep-alive ran out, say): the next one resumes the TLS session
        with listener.lock:
            open_now = list(listener.conns)
        for sock in open_now:
            sock.shutdown(socket.SHUT_RDWR)
        wait_until(lambda: not listener.conns, "the listener to close its connection")
        for _ in range(5):
            assert conns.post(url, "/m", b"{}", 5.0)[0] == 200
        assert conns.snapshot()["handshakes"] == {"full": 1, "resumed": 1, "failed": 0}
        assert conns.snapshot()["connections"] == 2
        assert listener.stats()["handshakes"] == {"full": 1, "resumed": 1, "failed": 0}
    finally:
        conns.close()


def test_a_peer_of_another_ca_or_at_another_name_is_refused_at_the_handshake(
    pki: Pki, other_pki: Pki, listener: PeerServer
) -> None:
    stranger = caller(other_pki.settings("mallory"))  # trusts its own CA only: our certificate does not verify
    misnamed = caller(pki.settings("government"))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
            stranger.post(f"https://127.0.0.1:{listener.port}", "/m", b"{}", 5.0)
        assert stranger.snapshot()["handshakes"]["failed"] == 1
        wait_until(lambda: listener.stats()["handshakes"]["failed"] == 1, "the listener to count the refusal")
        # a listener whose certificate names another host than the URL the caller uses
        elsewhere = PeerServer(
            {"/m": ok}, "127.0.0.1", 0, 1024, tls=server_context(pki.settings("bank-only", ("bank",)))
        )
        elsewhere.start()
        try:
            with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
                misnamed.post(f"https://127.0.0.1:{elsewhere.port}", "/m", b"{}", 5.0)
            wait_until(lambda: elsewhere.stats()["handshakes"]["failed"] == 1, "the refusal to be counted")
        finally:
            elsewhere.close()
        assert misnamed.post(f"https://localhost:{listener.port}", "/m", b"{}", 5.0)[0] == 200  # a name it has
        assert listener.stats()["handshakes"] == {"full": 1, "resumed": 0, "failed": 1}
    finally:
        stranger.close()
        misnamed.close()


@pytest.mark.parametrize("listener", [True], indirect=True)
def test_with_client_certificates_required_only_the_cas_certificates_get_in(
    pki: Pki, other_pki: Pki, listener: PeerServer
) -> None:
    url = f"https://127.0.0.1:{listener.port}"
    member = caller(pki.settings("government"))
    # a stranger that trusts our CA (it got our CA certificate) but holds a certificate of its own CA
    mixed = TlsSettings(
        other_pki.settings("mallory").cert_file, other_pki.settings("mallory").key_file, pki.folder / "ca.pem"
    )
    stranger = caller(mixed)
    anonymous_context = ssl.create_default_context(cafile=str(pki.folder / "ca.pem"))  # no certificate at all
    anonymous = Connections({}, tls=anonymous_context, plain=False)
    try:
        assert member.post(url, "/m", b"{}", 5.0)[0] == 200
        for refused in (stranger, anonymous):
            with pytest.raises(OSError):  # TLS 1.3: the refusal arrives as an alert on the first read
                refused.post(url, "/m", b"{}", 5.0)
        wait_until(lambda: listener.stats()["handshakes"]["failed"] == 2, "the listener to refuse both")
        assert listener.stats()["handshakes"]["full"] == 1
    finally:
        for conns in (member, stranger, anonymous):
            conns.close()


def test_the_handshake_runs_in_the_connections_thread_within_the_read_timeout(pki: Pki, listener: PeerServer) -> None:
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=DEADLINE)  # connects, never says hello
    conns = caller(pki.settings("government"))
    try:
        started = time.monotonic()
        assert conns.post(f"https://127.0.0.1:{listener.port}", "/m", b"{}", 5.0)[0] == 200  # served meanwhile
        assert time.monotonic() - started < listener.read_timeout
        silent.settimeout(DEADLINE)
        assert silent.recv(1) == b""  # closed after the read timeout (2 s)
        wait_until(lambda: listener.stats()["handshakes"]["failed"] == 1, "the silent handshake to be counted")
    finally:
        silent.close()
        conns.close()


def test_a_plain_caller_is_refused_by_a_tls_listener_and_a_tls_peer_never_calls_plain(
    pki: Pki, listener: PeerServer
) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=DEADLINE) as plain:
        plain.sendall(b"POST /m HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        plain.settimeout(DEADLINE)
        try:
            answer = plain.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert b"ok" not in answer and b"HTTP/1.1 200" not in answer  # nothing served in clear text
    wait_until(lambda: listener.stats()["handshakes"]["failed"] == 1, "the plain caller to be refused")
    conns = caller(pki.settings("government"))
    try:
        with pytest.raises(PlainRefused, match="plain http: this peer speaks TLS only"):
            conns.post(f"http://127.0.0.1:{listener.port}", "/m", b"{}", 5.0)
    finally:
        conns.close()


def test_a_call_refused_for_tls_says_why(pki: Pki, other_pki: Pki, listener: PeerServer) -> None:
    """What the protocol sees (a CallResult, never an exception): a plain URL refused, a certificate not verified."""
    key = Ed25519PrivateKey.generate()
    hello = Hello("government", "https://127.0.0.1:1", "government", [], [])
    for settings, url, reason in (
        (pki.settings("government"), "http://127.0.0.1:1", "plain http: this peer speaks TLS only"),
        (other_pki.settings("mallory"), f"https://127.0.0.1:{listener.port}", "TLS: unable to get local issuer"),
    ):
        transport = Transport("government", Authenticator("government", key, {}), max_parallel=2, tls=settings)
        try:
            result = transport.call(url, hello, 5.0)
        finally:
            transport.close()
        assert (result.ok, result.error_kind) == (False, "unreachable"), result
        assert reason in result.error, result
