"""A local certificate authority and the leaf certificates the HTTPS proxy serves.

The authority is made once (`ca.pem`, `ca-key.pem`); clients trust it once
(`SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS`, the system keychain). Leaves carry proper
subjectAltNames: localhost, 127.0.0.1, ::1 and an optional domain; they are named
`cert.pem`/`key.pem`, or `cert_<domain>.pem`/`key_<domain>.pem` (dots and colons
removed) for a domain. Private keys are written mode 600.

A certificate you put there under those names, issued by anyone but this authority, is
yours: it is served as it is and never replaced (`mlxgate doctor` checks its dates and
names). Ours are made again when they expire or their names no longer match.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from .errors import MlxgateError
from .private_files import write_private

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
LEAF_DAYS = 825          # the longest validity macOS accepts for a TLS server certificate
CA_DAYS = 3650
RENEW_BEFORE = dt.timedelta(days=30)
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def leaf_paths(ssl_dir: Path, domain: str | None = None) -> tuple[Path, Path]:
    if not domain:
        return ssl_dir / "cert.pem", ssl_dir / "key.pem"
    tag = domain.replace(".", "").replace(":", "")
    return ssl_dir / f"cert_{tag}.pem", ssl_dir / f"key_{tag}.pem"


CA_NAME = "mlxgate local CA"


def is_ours(cert) -> bool:
    """Whether a leaf was issued by an mlxgate authority (this one or an earlier one)."""
    from cryptography.x509.oid import NameOID

    names = [a.value for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names == [CA_NAME]


def san_names(cert) -> list[str]:
    """The names and addresses a certificate is valid for."""
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(entry.value) for entry in sans]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_ca(ssl_dir: Path):
    """Load the authority, making it first if absent. Returns (certificate, key, made)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    ssl_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = ssl_dir / CA_CERT, ssl_dir / CA_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except ValueError as exc:
            raise MlxgateError(f"{cert_path} or {key_path} is unreadable ({exc}). Fix: delete both and "
                               f"run `mlxgate cert` to make a new authority (clients must trust it again).")
        return cert, key, False
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlxgate")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def _san_entries(domain: str | None):
    from cryptography import x509
    entries = []
    for name in (*LOCAL_NAMES, *([domain] if domain else [])):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _leaf_is_current(cert_path: Path, ca_cert, domain: str | None) -> bool:
    from cryptography import x509
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:
        return False
    return (set(sans) == set(_san_entries(domain))
            and cert.not_valid_after_utc - _now() > RENEW_BEFORE)


def ensure_leaf(ssl_dir: Path, domain: str | None = None) -> tuple[Path, Path, bool]:
    """The leaf for `domain` (or localhost only): yours when you put one there, else ours,
    signed by the authority and made when missing, expiring, or not matching. Returns
    (certificate path, key path, made)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path, key_path = leaf_paths(ssl_dir, domain)
    if cert_path.exists():
        try:
            yours = not is_ours(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        except ValueError:
            yours = False  # unreadable: made again
        if yours:
            if not key_path.exists():
                raise MlxgateError(f"{cert_path} is your certificate, but its key {key_path} is missing. Fix: put "
                                   f"the key there, or delete {cert_path} to have mlxgate make one.")
            return cert_path, key_path, False
    ca_cert, ca_key, _ = ensure_ca(ssl_dir)
    if key_path.exists() and _leaf_is_current(cert_path, ca_cert, domain):
        return cert_path, key_path, False
    key = _key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain or "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(_san_entries(domain)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True


def listener_context(ssl_dir: Path, address: str):
    """The server TLS context of a host's relay listener at `address` (the leaf made for it).
    TLS 1.2 exactly: a client that leaves is seen by the record header of its close_notify,
    which TLS 1.3 hides (see `net.peer_closed`)."""
    import ssl

    cert, key, _ = ensure_leaf(ssl_dir, address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def write_bundle(ca: Path, target: Path) -> Path:
    """certifi's roots plus the authority, for clients whose CA variable replaces their
    roots (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`): they still reach the real internet."""
    import certifi

    data = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + ca.read_bytes()
    if not target.exists() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target
