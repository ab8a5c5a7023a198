"""Ports 443 (and 80) on loopback forwarded to the gateway's HTTPS (and HTTP) listener,
so clients reach it at https://DOMAIN with no port.

macOS: a pf anchor in com.apple/mlxgate (the stock /etc/pf.conf evaluates
`rdr-anchor "com.apple/*"`, so pf.conf is never edited), loaded at boot by a
LaunchDaemon. Linux: an nftables table `ip mlxgate` (nat, output hook, `oifname "lo"`),
loaded at boot by a system unit where systemd runs."""

from __future__ import annotations

import re
from pathlib import Path

from . import templates

ANCHOR = "com.apple/mlxgate"
ANCHOR_FILE = Path("/etc/pf.anchors/com.mlxgate")
PF_LABEL = "com.mlxgate.pf"
PF_PLIST = Path("/Library/LaunchDaemons/com.mlxgate.pf.plist")
PF_LOG = Path("/var/log/com.mlxgate.pf.log")
PF_CONF = Path("/etc/pf.conf")

NFT_TABLE = ("ip", "mlxgate")
NFT_FILE = Path("/etc/mlxgate/forward.nft")
NFT_UNIT = Path("/etc/systemd/system/mlxgate-forward.service")

Forward = tuple[int, int]  # (port clients use, port the gateway listens on)


def forwards(https_port: int, http_port: int | None = None) -> list[Forward]:
    return [(443, https_port)] + ([(80, http_port)] if http_port else [])


def pf_rule(forward: Forward) -> str:
    return f"rdr pass on lo0 inet proto tcp from any to 127.0.0.1 port {forward[0]} -> 127.0.0.1 port {forward[1]}"


def pf_anchor(rules: list[Forward]) -> str:
    return templates.text("launchd/mlxgate.pf.conf",
                          {"@RULES@": "\n".join(pf_rule(f) for f in rules)})


def pf_daemon(anchor_file: Path = ANCHOR_FILE, log: Path = PF_LOG) -> bytes:
    return templates.plist("launchd/com.mlxgate.pf.plist", {"@ANCHOR@": str(anchor_file), "@LOG@": str(log)})


def nft_rule(forward: Forward) -> str:
    return f'oifname "lo" ip daddr 127.0.0.1 tcp dport {forward[0]} redirect to :{forward[1]}'


def nft_ruleset(rules: list[Forward]) -> str:
    return templates.text("systemd/mlxgate.nft",
                          {"@RULES@": "\n".join(f"\t\t{nft_rule(f)}" for f in rules)})


def nft_unit(nft: str, rules_file: Path = NFT_FILE) -> str:
    return templates.text("systemd/mlxgate-forward.service",
                          {"@NFT@": nft, "@RULES_FILE@": str(rules_file)})


def loaded_nft(listing: str) -> list[Forward]:
    """The forwards an `nft list table ip mlxgate` shows."""
    return [(int(a), int(b)) for a, b in re.findall(r"tcp dport (\d+) redirect to :(\d+)", listing)]


def loaded_pf(listing: str) -> list[Forward]:
    """The forwards a `pfctl -a com.apple/mlxgate -s nat` shows."""
    return [(int(a), int(b)) for a, b in re.findall(r"port = (\d+) -> 127\.0\.0\.1 port (\d+)", listing)]


def pf_skips_loopback(pf_conf: Path = PF_CONF) -> str | None:
    """The `set skip on lo0` line of pf.conf, which turns every loopback rdr off."""
    try:
        lines = pf_conf.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:3] == ["set", "skip", "on"] and any(w.strip("{}") in ("lo0", "lo") for w in words[3:]):
            return line.strip()
    return None
