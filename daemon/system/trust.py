"""The local certificate authority in the system trust store (on request).

Linux (Debian family): a copy in /usr/local/share/ca-certificates, then
`update-ca-certificates`. macOS: the System keychain with `security add-trusted-cert`.
Many clients read neither (Python SDKs use certifi's bundle, Node its own): `mlxgate env`
prints the variables that make them trust the authority too."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from . import run

LINUX_ANCHORS = Path("/usr/local/share/ca-certificates")
LINUX_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LINUX_NAME = "mlxgate-local-ca.crt"
KEYCHAIN = "/Library/Keychains/System.keychain"


def _pem_body(pem: str) -> str:
    return "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))


def fingerprint(ca: Path) -> str:
    """SHA-1 of the certificate (what `security delete-certificate -Z` takes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def trusted(ca: Path, platform: str = sys.platform, bundle: Path = LINUX_BUNDLE, run=run) -> bool:
    """Whether the system store trusts the authority."""
    if platform == "darwin":
        return run(["security", "verify-cert", "-c", str(ca)], check=False).returncode == 0
    try:
        return _pem_body(ca.read_text()) in _pem_body(bundle.read_text())
    except OSError:
        return False


def add(ca: Path, platform: str = sys.platform, anchors: Path = LINUX_ANCHORS, run=run) -> None:
    if platform == "darwin":
        run(["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", KEYCHAIN, str(ca)])
        return
    anchors.mkdir(parents=True, exist_ok=True)
    (anchors / LINUX_NAME).write_bytes(ca.read_bytes())
    run(["update-ca-certificates"])


def remove(ca: Path | None, platform: str = sys.platform, anchors: Path = LINUX_ANCHORS, run=run,
           sha1: str | None = None) -> None:
    if platform == "darwin":
        if ca is not None and ca.exists():
            run(["security", "remove-trusted-cert", "-d", str(ca)], check=False)
        if sha1:
            run(["security", "delete-certificate", "-Z", sha1, KEYCHAIN], check=False)
        return
    target = anchors / LINUX_NAME
    if target.exists():
        target.unlink()
        # update-ca-certificates rebuilds the bundle but leaves our links behind, dangling
        linked = LINUX_BUNDLE.parent / LINUX_NAME.replace(".crt", ".pem")
        for link in LINUX_BUNDLE.parent.iterdir():
            if link.is_symlink() and (link == linked or os.readlink(link) == linked.name):
                link.unlink()
        run(["update-ca-certificates"])
