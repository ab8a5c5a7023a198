"""`mlxgate hosts add|remove|list` and the status rows: pin a host's authority, check its
key and that its model names mean the same models as here, write or remove the entry; read
each host's state as `mlxgate status` shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..catalog import for_config, weights_digest
from ..config import Config, config_path
from ..private_files import write_private
from ..host_entries import HostEntry, check_name, check_url, normal_fingerprint, shown_fingerprint, write_hosts
from .pinning import HostDown, HostRefused, fetch_authority, fingerprint, get_json, pinned_context, read_key, \
    verifying_context
from .view import weights_by_name


def known_models(config: Config) -> dict[str, dict[str, str]]:
    """Weights digests by model name, by place: this machine and every configured host that answers."""
    places = {"this machine": {m.name: weights_digest(m.path) for m in for_config(config).list()}}
    for entry in config.hosts:
        try:
            answer = get_json(entry.url, "/models", read_key(entry, config.home), pinned_context(entry, config.home))
        except HostRefused:
            continue  # a host that is away now is checked against the new one when it is added again
        places[f"host {entry.name}"] = weights_by_name(answer)
    return places


def conflicts(theirs: dict[str, str | None], places: dict[str, dict[str, str]]) -> list[str]:
    """Names both sides know whose weights headers differ."""
    found = []
    for place, ours in places.items():
        for name, digest in sorted(theirs.items()):
            if name in ours and digest and ours[name] and digest != ours[name]:
                found.append(f"{name} (differs from {place})")
    return found


def add(config: Config, name: str, url: str, key: str, confirm: Callable[[str], bool],
        expected: str | None = None, path: Path | None = None) -> tuple[HostEntry, dict]:
    """Pin and check the host; write its entry, key and authority. Returns the entry and its `/models`."""
    check_name(name)
    url = check_url(url)
    if any(e.name == name for e in config.hosts):
        raise HostRefused(f"there is already a host named {name!r}. Fix: `mlxgate hosts remove {name}` first.")
    pem = fetch_authority(url)
    found = fingerprint(pem)
    if expected is not None:
        if normal_fingerprint(expected) != found:
            raise HostRefused(f"{url}: the authority's fingerprint is {shown_fingerprint(found)}, not the "
                              f"{expected} you gave. Nothing was added. Fix: compare with what `mlxgate status` "
                              f"prints on that machine; a mismatch means another machine answers at this address.")
    elif not confirm(f"The authenticity of host {name} ({url}) can't be established.\n"
                     f"Its certificate authority's fingerprint is {shown_fingerprint(found)}\n"
                     f"(`mlxgate status` on that machine prints it). Trust it"):
        raise HostRefused("not added: the fingerprint was not confirmed")
    answer = get_json(url, "/models", key, verifying_context(pem))
    theirs = weights_by_name(answer)
    clashes = conflicts(theirs, known_models(config))
    if clashes:
        raise HostRefused(f"host {name} has models whose names mean other models here: {', '.join(clashes)}. "
                          f"A name must mean the same weights on every machine. Fix: rename one side's folder, "
                          f"or put the same model there.")
    entry = HostEntry(name, url, found)
    entry.ca_path(config.home).parent.mkdir(parents=True, exist_ok=True)
    write_private(entry.key_path(config.home), (key + "\n").encode())
    entry.ca_path(config.home).write_bytes(pem)
    write_hosts(path or config.source or config_path(), (*config.hosts, entry))
    return entry, answer


def remove(config: Config, name: str, path: Path | None = None) -> HostEntry:
    entry = next((e for e in config.hosts if e.name == name), None)
    if entry is None:
        known = ", ".join(e.name for e in config.hosts) or "none"
        raise HostRefused(f"no host named {name!r} (hosts: {known})")
    write_hosts(path or config.source or config_path(), tuple(e for e in config.hosts if e.name != name))
    entry.key_path(config.home).unlink(missing_ok=True)
    entry.ca_path(config.home).unlink(missing_ok=True)
    return entry


def rows(config: Config) -> list[tuple[str, str, str]]:
    """(part, state, detail) of each host, for `mlxgate status` and `mlxgate hosts list`."""
    found = []
    for entry in config.hosts:
        try:
            answer = get_json(entry.url, "/models", read_key(entry, config.home), pinned_context(entry, config.home),
                              timeout=5)
        except HostRefused as exc:
            state = "DOWN" if isinstance(exc, HostDown) else "REFUSED"
            found.append((f"host {entry.name}", state, str(exc)))
            continue
        servers = []
        for model, server in (answer.get("servers") or {}).items():
            if server.get("state") not in ("ready", "starting"):
                continue
            queue = server.get("queue") or {}
            servers.append(f"{model} {server['state']} (queue {queue.get('queued', 0)}, "
                           f"running {len(queue.get('active') or ())})")
        found.append((f"host {entry.name}", "UP", f"{entry.url}: {'; '.join(servers) or 'nothing loaded'}; "
                                                  f"{len(answer.get('models') or ())} models"))
    return found


def listen_row(config: Config) -> tuple[str, str, str] | None:
    """What another gateway's `hosts add` needs: the address and the authority's fingerprint."""
    if not config.listen:
        return None
    ca = config.ssl_path / "ca.pem"
    shown = shown_fingerprint(fingerprint(ca.read_bytes())) if ca.exists() else "no authority yet"
    return ("listen", "TLS", f"https://{config.listen}:{config.listen_port} (authority {shown})")
