"""TLS between peers (docs/security.md "A network observer", docs/decisions.md "TLS between peers").

A peer with DEJIMA_TLS_CERT_FILE, DEJIMA_TLS_KEY_FILE and DEJIMA_TLS_CA_FILE speaks HTTPS on every listener (gunicorn,
the lean message listener, the lean client listener) and calls other peers over HTTPS only, verifying their
certificate against the CA file and the host of their URL (`client_context`). With DEJIMA_TLS_CLIENT_CERTS=require the
message listener also asks every caller for a certificate of that CA (`server_context(…, client_certs=True)`): a
partner then proves its identity at the handshake, before a byte of a message is read. The peer presents its own
certificate on every call, so a partner requiring client certificates accepts it.

This module checks the files (`check_files`, raising `TlsSettingError` naming the setting: `config.load_config` turns
it into a ConfigError), builds the contexts, and holds the counters of handshakes (`HandshakeStats`) the listeners and
the transport report in `/api/v1/status`. A context is built once per listener and once per transport and kept:
OpenSSL's session tickets are keyed per server context, so a client coming back with a ticket is resumed only by the
context that issued it, and a client context keeps the sessions of its connections to hand them to the next ones.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

CERT_SETTING = "DEJIMA_TLS_CERT_FILE"
KEY_SETTING = "DEJIMA_TLS_KEY_FILE"
CA_SETTING = "DEJIMA_TLS_CA_FILE"
CLIENT_CERTS_SETTING = "DEJIMA_TLS_CLIENT_CERTS"
PLAIN_SETTING = "DEJIMA_ALLOW_PLAIN_HTTP"
FILE_SETTINGS = (CERT_SETTING, KEY_SETTING, CA_SETTING)
CLIENT_CERTS = ("none", "require")


class TlsSettingError(ValueError):
    """A TLS file that cannot serve; `setting` names the setting that gave it."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(message)


@dataclass(frozen=True)
class TlsSettings:
    """The peer's TLS files (all three given, checked by `check_files`) and whether its message listener requires a
    client certificate of the CA."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_certs: str = "none"  # "none" | "require"

    @property
    def require_client_certs(self) -> bool:
        return self.client_certs == "require"


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsSettingError(setting, f"cannot read {path}: {exc.strerror or exc}") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_files(settings: TlsSettings) -> None:
    """The certificate, its key and the CA can serve: PEM, readable, the key unencrypted, belonging to the certificate
    and readable by nobody else, the certificate valid now, the CA file holding CA certificates, and OpenSSL taking
    them. Raises TlsSettingError naming the setting at fault."""
    cert_pem = _read(CERT_SETTING, settings.cert_file)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise TlsSettingError(CERT_SETTING, f"{settings.cert_file} is not a PEM certificate: {exc}") from None
    cert = chain[0]
    now = _now()
    if now < cert.not_valid_before_utc:
        raise TlsSettingError(CERT_SETTING, f"{settings.cert_file} is not valid before {cert.not_valid_before_utc}")
    if now > cert.not_valid_after_utc:
        raise TlsSettingError(CERT_SETTING, f"{settings.cert_file} expired on {cert.not_valid_after_utc}")
    key_pem = _read(KEY_SETTING, settings.key_file)
    mode = settings.key_file.stat().st_mode & 0o777
    if mode & 0o077:
        raise TlsSettingError(
            KEY_SETTING,
            f"{settings.key_file} may be read by others (mode {mode:04o}); run chmod 600 {settings.key_file}",
        )
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsSettingError(
            KEY_SETTING, f"{settings.key_file} is not an unencrypted PEM private key: {exc}"
        ) from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, raw) != cert.public_key().public_bytes(der, raw):
        raise TlsSettingError(
            KEY_SETTING,
            f"{settings.key_file} is not the key of the certificate in {CERT_SETTING} ({settings.cert_file})",
        )
    ca_pem = _read(CA_SETTING, settings.ca_file)
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise TlsSettingError(CA_SETTING, f"{settings.ca_file} is not a PEM certificate: {exc}") from None
    for ca in cas:
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TlsSettingError(
                CA_SETTING, f"{settings.ca_file}: {ca.subject.rfc4514_string()} is not a CA certificate"
            )
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise TlsSettingError(CERT_SETTING, f"{settings.cert_file} is not a server certificate (extended key usage)")
    try:
        server_context(settings, client_certs=settings.require_client_certs)
    except ssl.SSLError as exc:
        raise TlsSettingError(CERT_SETTING, f"OpenSSL refuses {settings.cert_file}: {exc}") from None
    try:
        client_context(settings)
    except ssl.SSLError as exc:
        raise TlsSettingError(CA_SETTING, f"OpenSSL refuses {settings.ca_file}: {exc}") from None


def server_context(settings: TlsSettings, client_certs: bool = False) -> ssl.SSLContext:
    """A listener's context: this peer's certificate; with `client_certs`, every caller must present a certificate
    the CA issued (mutual TLS). TLS 1.2 at least; session tickets on (a caller coming back is resumed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    if client_certs:
        context.load_verify_locations(cafile=str(settings.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context of calls to other peers (and of a client app to its peer): the server's certificate verified
    against the CA and the host of the URL called (check_hostname); this peer's certificate presented when a
    listener asks for one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(settings.ca_file))
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context


class HandshakeStats:
    """Counters of one side's TLS handshakes: `full` (a new session), `resumed` (a session of an earlier connection,
    without the certificate exchange), `failed` (refused: a certificate not verified, a plain-text caller, a timeout).
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.full = 0
        self.resumed = 0
        self.failed = 0

    def done(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            if sock.session_reused:
                self.resumed += 1
            else:
                self.full += 1

    def refused(self) -> None:
        with self._lock:
            self.failed += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"full": self.full, "resumed": self.resumed, "failed": self.failed}
