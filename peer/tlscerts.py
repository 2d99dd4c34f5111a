"""Certificates for TLS between peers: a small certificate authority and the certificates it issues (the `cryptography`
package). Used by the development kit (peer/network.py: `dejima up`, the tests, the benchmarks, chaos) and by the
deployment generator (peer/deploygen.py `secrets`); a production deployment may bring its own PKI instead, the peer
only reads PEM files (DEJIMA_TLS_CERT_FILE, DEJIMA_TLS_KEY_FILE, DEJIMA_TLS_CA_FILE: docs/settings.md).

Keys are ECDSA P-256: a handshake signs once with the server's key (and once with the client's under mutual TLS), a
P-256 signature costs a few tens of microseconds where RSA-2048 costs about a millisecond. Each certificate carries
the names a caller uses in the URL (`check_hostname`): DNS names and IP addresses as subject alternative names, both
usages (server and client, for mutual TLS), and key identifiers so that strict verifiers chain it.

`KitCa` is the development kit's CA: one folder (`ca.pem`, and `ca-key.pem` mode 0600), created once and kept (the
`DEJIMA_KIT_CA_DIR` of the process, by default `.dejima/ca` of the checkout: `kit_ca()`), every network of the kit
issuing its peers' certificates from it, so that one CA file lets the kit's clients (the CLI, the tests, the
benchmarks) verify every peer.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)  # the kit issues a certificate again this long before it expires
KIT_CA_ENV = "DEJIMA_KIT_CA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KIT_CA_DIR = REPO_ROOT / ".dejima" / "ca"
LOCAL_NAMES = ("127.0.0.1", "localhost")  # every kit certificate's names besides the peer's own

Pem = bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> Pem:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def make_ca(common_name: str, days: int = CA_DAYS) -> tuple[Pem, Pem]:
    """A self-signed CA: (certificate PEM, private key PEM). It signs certificates, nothing else (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(ca_cert: Pem, ca_key: Pem, common_name: str, names: Sequence[str], days: int = CERT_DAYS) -> tuple[Pem, Pem]:
    """A certificate of the CA for `names` (DNS names and IP addresses, its subject alternative names; the common
    name is `common_name`), usable by a server and by a client: (certificate PEM, private key PEM)."""
    if not names:
        raise ValueError("a certificate needs at least one name (a host of the URLs that reach it)")
    issuer = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA's key is not an EC key made by make_ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), issuer.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def cert_names(cert: Pem) -> list[str]:
    """The subject alternative names of a certificate (DNS names and IP addresses, as text)."""
    try:
        san = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.value.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.value.get_values_for_type(x509.IPAddress)
    ]


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` whole into `path` (a new file with `mode`, linked into place: a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)


def ensure_issued(
    ca_cert: Pem, ca_key: Pem, cert_file: Path, key_file: Path, common_name: str, names: Sequence[str]
) -> bool:
    """Make `cert_file` a certificate of the CA for `names` (its key in `key_file`, mode 0600; the certificate 0644),
    unless it is one already: issued by this CA, for exactly these names, valid for more than RENEW_BEFORE, with its
    key beside it. True when it issued a new one."""
    with contextlib.suppress(OSError, ValueError, TypeError, InvalidSignature):
        current = x509.load_pem_x509_certificate(cert_file.read_bytes())
        current.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert))  # raises when not
        if (
            key_file.exists()
            and set(cert_names(cert_file.read_bytes())) == set(names)
            and current.not_valid_after_utc - _now() > RENEW_BEFORE
        ):
            return False
    cert, key = issue(ca_cert, ca_key, common_name, names)
    write_file(key_file, key, 0o600)
    write_file(cert_file, cert, 0o644)
    return True


class KitCa:
    """The development kit's CA in a folder: `ca.pem` (the CA certificate: what clients verify against) and
    `ca-key.pem` (mode 0600), created at first use and kept. `issue_files` gives a peer its certificate."""

    _lock = threading.Lock()

    def __init__(self, directory: Path, common_name: str = "Dejima development kit CA") -> None:
        self.directory = directory
        self.cert_file = directory / "ca.pem"
        self.key_file = directory / "ca-key.pem"
        with self._lock:
            if not self.cert_file.exists():
                self._create(common_name)
        self._client_context: ssl.SSLContext | None = None

    def _create(self, common_name: str) -> None:
        """Made whole in a folder beside, then renamed into place (atomic; onto an empty folder too): a process that
        loses the race uses the winner's CA."""
        cert, key = make_ca(common_name)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        draft = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}-", dir=self.directory.parent))
        try:
            write_file(draft / self.key_file.name, key, 0o600)
            write_file(draft / self.cert_file.name, cert, 0o644)
            try:
                os.rename(draft, self.directory)
            except OSError:
                if not self.cert_file.exists():  # a folder with other files: the key first, the certificate last
                    self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.replace(draft / self.key_file.name, self.key_file)
                    os.replace(draft / self.cert_file.name, self.cert_file)
        finally:
            shutil.rmtree(draft, ignore_errors=True)

    @property
    def cert(self) -> Pem:
        return self.cert_file.read_bytes()

    def issue_files(self, cert_file: Path, key_file: Path, common_name: str, names: Sequence[str]) -> bool:
        """Make `cert_file` (and `key_file`, mode 0600) a certificate of this CA for `names` (`ensure_issued`). True
        when it issued a new one."""
        return ensure_issued(self.cert, self.key_file.read_bytes(), cert_file, key_file, common_name, names)

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies the kit's peers (this CA, and the URL's host)."""
        if self._client_context is None:
            self._client_context = ssl.create_default_context(cafile=str(self.cert_file))
        return self._client_context


_kit_cas: dict[Path, KitCa] = {}


def kit_ca() -> KitCa:
    """The development kit's CA of this process: the folder `DEJIMA_KIT_CA_DIR` names, else `.dejima/ca` of the
    checkout (created at first use)."""
    directory = Path(os.environ.get(KIT_CA_ENV, "").strip() or DEFAULT_KIT_CA_DIR).expanduser().resolve()
    with KitCa._lock:
        found = _kit_cas.get(directory)
    if found is None:
        found = KitCa(directory)
        with KitCa._lock:
            found = _kit_cas.setdefault(directory, found)
    return found
