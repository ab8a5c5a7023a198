"""Trust between a gateway and its hosts: the host's certificate authority, pinned.

A host serves its relay beyond loopback over TLS only, with a certificate from its own
local authority that carries the address it listens on. `hosts add` fetches that
authority's certificate (`GET /ca.pem`, the one thing the listener answers without the
key), shows its fingerprint to be compared with what the host prints (as SSH shows a
host key), and keeps it. From then on the gateway trusts that authority alone for that
host, the address checked against the certificate: a host whose certificate does not
come from its pinned authority is refused before any key or request is sent.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
from pathlib import Path
from urllib.parse import urlparse

from ..errors import MlxgateError
from ..relay_protocol import CA_PATH
from ..host_entries import HostEntry, shown_fingerprint


class HostRefused(MlxgateError):
    """A host cannot be trusted or used as configured."""

    kind = "unavailable"


class HostDown(HostRefused):
    """A host does not answer."""


def fingerprint(pem: bytes) -> str:
    """SHA-256 of a certificate (DER), lowercase hex."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))).hexdigest()


def fetch_authority(url: str, timeout: float = 10.0) -> bytes:
    """The authority certificate a host presents at `GET /ca.pem`. Fetched without
    verification: what makes it trusted is the person comparing its fingerprint."""
    parsed = urlparse(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=context, timeout=timeout)
    try:
        connection.request("GET", CA_PATH)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise HostRefused(f"{url} did not answer over TLS ({type(exc).__name__}: {exc}). Fix: start mlxgate "
                          f"there with `--listen ADDRESS` and check the address and port.") from None
    finally:
        connection.close()
    if response.status != 200 or b"BEGIN CERTIFICATE" not in body:
        raise HostRefused(f"{url} is not an mlxgate host listener (GET {CA_PATH} answered {response.status}). "
                          f"Fix: give the address and port it printed at `mlxgate start --listen`.")
    return body


def verifying_context(ca_pem: bytes) -> ssl.SSLContext:
    """TLS that trusts `ca_pem` alone and checks the address against the certificate."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def pinned_context(entry: HostEntry, home: Path) -> ssl.SSLContext:
    """The TLS context for one configured host; `HostRefused` when its pinned authority is
    missing or is not the one the config's fingerprint names."""
    path = entry.ca_path(home)
    try:
        pem = path.read_bytes()
    except OSError:
        raise HostRefused(f"host {entry.name}: its pinned authority {path} is missing. Fix: "
                          f"`mlxgate hosts add {entry.name} {entry.url} --key KEY` again.") from None
    if fingerprint(pem) != entry.ca_sha256:
        raise HostRefused(f"host {entry.name}: {path} is not the authority the config pins "
                          f"({shown_fingerprint(entry.ca_sha256)}). Fix: `mlxgate hosts add` it again.")
    return verifying_context(pem)


def read_key(entry: HostEntry, home: Path) -> str:
    path = entry.key_path(home)
    try:
        return path.read_text().strip()
    except OSError:
        raise HostRefused(f"host {entry.name}: its key file {path} is missing. Fix: "
                          f"`mlxgate hosts add {entry.name} {entry.url} --key KEY` again.") from None


def get_json(url: str, path: str, key: str, context: ssl.SSLContext, timeout: float = 10.0) -> dict:
    """A GET to a host with its key, over TLS verified by `context` (`HostRefused` when the
    certificate, the key or the host itself fails)."""
    import json

    parsed = urlparse(url)
    connection = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=context, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        body = response.read()
    except ssl.SSLCertVerificationError as exc:
        raise HostRefused(f"{url}: refused, its certificate does not come from the pinned authority or does not "
                          f"carry this address ({exc.verify_message}). Fix: if the host made a new authority, "
                          f"check its fingerprint there and `mlxgate hosts add` it again.") from None
    except (OSError, http.client.HTTPException) as exc:
        raise HostDown(f"{url} did not answer ({type(exc).__name__}: {exc})") from None
    finally:
        connection.close()
    if response.status == 401:
        raise HostRefused(f"{url} refused the key (401). Fix: give the key that host's `mlxgate env` prints.")
    if response.status != 200:
        raise HostRefused(f"{url} answered {response.status} to GET {path}")
    return json.loads(body)
