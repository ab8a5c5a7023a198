"""The config's `hosts:` entries, and what `mlxgate hosts add` keeps beside them.

An entry names another mlxgate machine and where its relay listens over TLS
(`https://ADDRESS:PORT`, the address it was started with `--listen`), and pins the
fingerprint of the certificate authority that host's certificates come from. The host's
key and the authority's certificate itself are kept in the runtime folder
(`hosts/NAME.key`, mode 600, and `hosts/NAME-ca.pem`), so the config holds no secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOCAL = "local"  # this machine's own name among the places a request can go
HOSTS_DIR = "hosts"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HostEntry:
    name: str
    url: str        # https://ADDRESS:PORT of the host's relay listener
    ca_sha256: str  # the pinned authority: SHA-256 of its certificate (DER), 64 hex digits

    def key_path(self, home: Path) -> Path:
        return home / HOSTS_DIR / f"{self.name}.key"

    def ca_path(self, home: Path) -> Path:
        return home / HOSTS_DIR / f"{self.name}-ca.pem"

    def as_yaml(self) -> dict[str, str]:
        return {"name": self.name, "url": self.url, "ca_sha256": self.ca_sha256}


def normal_fingerprint(text: str) -> str:
    """A fingerprint as stored: lowercase hex without separators (`SHA256:` and colons dropped)."""
    value = text.strip().lower()
    value = value[7:] if value.startswith("sha256:") else value
    return value.replace(":", "").replace(" ", "")


def shown_fingerprint(value: str) -> str:
    """A fingerprint as people compare it: SHA256:AB:CD:..."""
    return "SHA256:" + ":".join(value[i:i + 2] for i in range(0, len(value), 2)).upper()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name == LOCAL:
        raise ValueError(f"expected a host name of lowercase letters, digits, '.', '-' or '_' "
                         f"(not `{LOCAL}`, which is this machine)")
    return name


def check_url(url: Any) -> str:
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme != "https" or not parsed.hostname or not parsed.port or \
            parsed.path.strip("/"):
        raise ValueError("expected the host's relay address such as https://192.168.1.20:11435 "
                         "(hosts are reached over TLS only)")
    return url.rstrip("/")


def parse_hosts(value: Any) -> tuple[HostEntry, ...]:
    """The `hosts:` setting: a list of {name, url, ca_sha256}; names unique."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("expected a list of hosts, each {name, url, ca_sha256} (`mlxgate hosts add` writes them)")
    entries: list[HostEntry] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"name", "url", "ca_sha256"}:
            raise ValueError(f"entry {index}: expected exactly the keys name, url and ca_sha256 "
                             f"(`mlxgate hosts add` writes them)")
        try:
            name, url = check_name(item["name"]), check_url(item["url"])
        except ValueError as exc:
            raise ValueError(f"entry {index}: {exc}") from None
        fingerprint = normal_fingerprint(str(item["ca_sha256"]))
        if not _HEX.match(fingerprint):
            raise ValueError(f"entry {index}: ca_sha256: expected the SHA-256 fingerprint of the host's "
                             f"certificate authority (64 hex digits)")
        if any(e.name == name for e in entries):
            raise ValueError(f"entry {index}: host name {name!r} is used twice")
        entries.append(HostEntry(name, url, fingerprint))
    return tuple(entries)


# ---------------------------------------------------------------- the config file
def _without_hosts_block(lines: list[str]) -> list[str]:
    """The file's lines without its top-level `hosts:` block (the rest, comments included, kept)."""
    kept, inside = [], False
    for line in lines:
        top = bool(line) and not line[0].isspace() and not line.startswith(("#", "-"))
        if top:
            inside = re.match(r"hosts\s*:", line) is not None
        if not inside:
            kept.append(line)
    return kept


def write_hosts(path: Path, entries: tuple[HostEntry, ...]) -> None:
    """Rewrite the `hosts:` block of the config file; every other line stays as it was."""
    import yaml

    lines = path.read_text().splitlines() if path.exists() else []
    lines = _without_hosts_block(lines)
    while lines and not lines[-1].strip():
        lines.pop()
    block = yaml.safe_dump({"hosts": [e.as_yaml() for e in entries]}, sort_keys=False).rstrip("\n")
    text = "\n".join([*lines, *([""] if lines else []), block]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
