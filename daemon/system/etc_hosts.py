"""The hosts entry that sends a domain to this machine while mlxgate stands in for it.

Our line carries a mark, so only it is ever added, found or removed; the rest of the
file is left byte for byte. The file is rewritten in place (it may be a bind mount, as
under `ip netns exec`, where it cannot be replaced)."""

from __future__ import annotations

from pathlib import Path

HOSTS = Path("/etc/hosts")
MARK = "# added by mlxgate (./install.sh --uninstall removes it)"


def entry(domain: str) -> str:
    return f"127.0.0.1\t{domain}\t{MARK}"


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _write(path: Path, lines: list[str]) -> None:
    with path.open("w") as handle:
        handle.write("".join(line + "\n" for line in lines))


def has(domain: str, path: Path = HOSTS) -> bool:
    return entry(domain) in lines(path)


def add(domain: str, path: Path = HOSTS) -> bool:
    """Make our line the one for `domain`; False when it was already there."""
    current = lines(path)
    wanted = [line for line in current if MARK not in line] + [entry(domain)]
    if current == wanted:
        return False
    _write(path, wanted)
    return True


def remove(path: Path = HOSTS) -> bool:
    current = lines(path)
    kept = [line for line in current if MARK not in line]
    if kept == current:
        return False
    _write(path, kept)
    return True


def resolves_elsewhere(domain: str, path: Path = HOSTS) -> str | None:
    """Another (unmarked) line of the file that names `domain`, if any."""
    for line in lines(path):
        fields = line.split("#", 1)[0].split()
        if MARK not in line and domain in fields[1:]:
            return line
    return None
