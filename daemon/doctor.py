"""`mlxgate doctor`: what stands between this machine and a working gateway, each
finding with its fix. Checks ports, the API key file, the models the start loads,
certificates (expiry, names, trust), the hosts entry, the forwarding rules, the boot
service and the cause of a start that gave up."""

from __future__ import annotations

import datetime as dt
import os
import stat
import sys
from dataclasses import dataclass
from typing import Callable

from .config import API_KEY_FILE, Config
from .system import etc_hosts, forwarding, run, service, trust
from .system.install import load_record


@dataclass
class Finding:
    ok: bool
    what: str
    detail: str
    fix: str = ""


def diagnose(config: Config, platform: str = sys.platform, run: Callable = run,
             manager: service.Systemd | service.Launchd | None = None) -> list[Finding]:
    from .supervision import control
    from .supervision.programs import Supervisor

    record = load_record(config.home)
    steps = {spec["kind"]: spec for spec in record.get("privileged", [])}
    running = Supervisor(config.home).running()
    found = [_key_file(config), *_models(config), *_ports(config, running), *_certificates(config, steps)]
    if "hosts" in steps:
        found.append(_hosts(steps["hosts"]))
    if "nft" in steps or "pf" in steps:
        found.append(_forwarding(config, steps.get("nft") or steps["pf"], platform, run))
    if platform == "darwin":
        skip = forwarding.pf_skips_loopback()
        if skip:
            found.append(Finding(False, "pf.conf", f"{forwarding.PF_CONF} has `{skip}`: pf ignores loopback, so "
                                 f"the 443 forwarding does nothing",
                                 f"remove that line from {forwarding.PF_CONF}, then `sudo pfctl -f /etc/pf.conf`"))
    found.append(_service(config, record, manager or service.manager(platform)))
    cause = control.blocked_cause(config.home)
    if cause:
        first, _, rest = cause["error"].partition("\n")
        found.append(Finding(False, "last start", f"gave up at {cause['at']}: {first}",
                             (rest.strip() + "\n      then " if rest.strip() else "fix that, then ") +
                             "`mlxgate start` (through the boot service when it is installed)"))
    return found


def _key_file(config: Config) -> Finding:
    path = config.home / API_KEY_FILE
    if os.environ.get("MLXGATE_API_KEY"):
        return Finding(True, "API key", "from MLXGATE_API_KEY")
    if not path.exists():
        return Finding(False, "API key", f"no key file {path}", "`mlxgate start` or ./install.sh makes one")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Finding(False, "API key", f"{path} is mode {mode:o}: other users can read the key",
                       f"chmod 600 {path}")
    return Finding(True, "API key", f"{path} (mode {mode:o})")


def _models(config: Config) -> list[Finding]:
    from .supervision.preflight import MODEL_FIXES, missing_model, missing_models

    from . import seats

    missing = dict(missing_models(config))
    found = []
    for seat, name in seats.configured(config):
        key = seat.model_key
        if key in missing:
            what, fixes = missing_model(config, name, key).split(MODEL_FIXES, 1)
            found.append(Finding(False, key, what.strip(), "one of:" + fixes))
        else:
            found.append(Finding(True, key, f"{name} is on this machine"))
    return found


def _ports(config: Config, running: bool) -> list[Finding]:
    from . import seats
    from .net import port_in_use

    wanted = {"port": config.port, "wrapper_url": config.wrapper_port, **seats.ports(config)}
    if config.enable_https:
        wanted["https_port"] = config.https_port
    if running:
        return [Finding(True, "ports", "held by the running gateway: " +
                        ", ".join(f"{key} {port}" for key, port in wanted.items()))]
    taken = [(key, port) for key, port in wanted.items() if port_in_use(port, config.local_host)]
    if not taken:
        return [Finding(True, "ports", "free: " + ", ".join(f"{key} {port}" for key, port in wanted.items()))]
    return [Finding(False, "ports", f"port {port} ({key}) is taken by {_holder(port)} while the gateway is stopped",
                    f"stop that program, or choose another port (--{key.replace('_', '-')} or {key} in the config)")
            for key, port in taken]


def _holder(port: int) -> str:
    import psutil

    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def _certificates(config: Config, steps: dict) -> list[Finding]:
    from cryptography import x509

    from .certs import is_ours, leaf_paths, san_names

    if not config.enable_https:
        return []
    cert_path, key_path = leaf_paths(config.ssl_path, config.ssl_domain)
    make = f"mlxgate cert{f' --domain {config.ssl_domain}' if config.ssl_domain else ''}"
    if not cert_path.exists() or not key_path.exists():
        return [Finding(False, "certificate", f"{cert_path} or {key_path} is missing",
                        f"`{make}` (or `mlxgate start`, which makes it)")]
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ours = is_ours(cert)
    fix = (f"`{make}` makes a new one" if ours else
           f"replace {cert_path} and {key_path} (yours: mlxgate never overwrites them), or delete both "
           f"and `{make}`")
    found = []
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    if left.total_seconds() <= 0:
        found.append(Finding(False, "certificate", f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}", fix))
    names = san_names(cert)
    wanted = ["localhost", *([config.ssl_domain] if config.ssl_domain else [])]
    missing = [name for name in wanted if name not in names]
    if missing:
        found.append(Finding(False, "certificate", f"{cert_path} is not valid for {', '.join(missing)} "
                             f"(it names {', '.join(names) or 'nothing'})", fix))
    if not found:
        found.append(Finding(True, "certificate", f"{cert_path} ({'made by mlxgate' if ours else 'yours'}), valid "
                             f"for {', '.join(names)} until {cert.not_valid_after_utc:%Y-%m-%d}"))
    ca = config.ssl_path / "ca.pem"
    if "trust" in steps:
        if ca.exists() and trust.trusted(ca):
            found.append(Finding(True, "trust", f"the system trust store trusts {ca}"))
        else:
            found.append(Finding(False, "trust", f"the system trust store does not trust {ca}",
                                 "run ./install.sh again with --trust-ca"))
    elif ours:
        found.append(Finding(True, "trust", f"{ca} is not in the system trust store (not asked for): clients "
                             f"trust it through `mlxgate env` (NODE_EXTRA_CA_CERTS, SSL_CERT_FILE)"))
    return found


def _hosts(spec: dict) -> Finding:
    domain, path = spec["domain"], etc_hosts.HOSTS
    other = etc_hosts.resolves_elsewhere(domain, path)
    if not etc_hosts.has(domain, path):
        return Finding(False, "hosts entry", f"{path} has no `127.0.0.1 {domain}` line of mlxgate's",
                       f"run ./install.sh again with --ssl-domain {domain}")
    if other:
        return Finding(False, "hosts entry", f"{path} also names {domain} in `{other}`, which may win",
                       f"remove that line from {path}")
    return Finding(True, "hosts entry", f"{domain} -> 127.0.0.1 in {path}")


def _forwarding(config: Config, spec: dict, platform: str, run: Callable) -> Finding:
    wanted = [tuple(f) for f in spec["forwards"]]
    fix = "run ./install.sh again with --enable-port-forward"
    if os.geteuid() != 0:
        return Finding(True, "forwarding", f"{', '.join(f'{a} -> {b}' for a, b in wanted)} set up by the install "
                       f"(only root can list the rules: `sudo mlxgate doctor` checks them)")
    if platform == "darwin":
        listing = run(["pfctl", "-a", forwarding.ANCHOR, "-s", "nat"], check=False).stdout
        loaded = forwarding.loaded_pf(listing)
    else:
        listing = run(["nft", "list", "table", *forwarding.NFT_TABLE], check=False).stdout
        loaded = forwarding.loaded_nft(listing)
    missing = [f for f in wanted if f not in loaded]
    if missing:
        return Finding(False, "forwarding", "no rule forwards " + ", ".join(f"{a} -> {b}" for a, b in missing), fix)
    return Finding(True, "forwarding", ", ".join(f"{a} -> {b}" for a, b in wanted) + " on loopback")


def _service(config: Config, record: dict, manager) -> Finding:
    if not record.get("service"):
        return Finding(True, "boot service", "not installed (./install.sh installs it)")
    state = manager.state()
    if not state.installed:
        return Finding(False, "boot service", f"{state.path} is missing", "run ./install.sh again")
    if not state.enabled:
        return Finding(False, "boot service", f"{state.path} is installed but not enabled", "run ./install.sh again")
    if state.active is None:
        return Finding(True, "boot service", f"{state.path} installed and enabled; {state.detail}, so it does not run "
                       f"here (run `mlxgate start --foreground` or `mlxgate start`)")
    if not state.active:
        return Finding(False, "boot service", f"{state.path}: {state.detail}", "`mlxgate start`; `mlxgate logs service`")
    return Finding(True, "boot service", f"{state.path}: running")


def report(findings: list[Finding], say: Callable[[str], None] = print) -> bool:
    """Print the findings; True when nothing is wrong."""
    for finding in findings:
        say(f"{'ok  ' if finding.ok else 'FAIL'}  {finding.what}: {finding.detail}")
        if not finding.ok and finding.fix:
            say(f"      fix: {finding.fix}")
    return all(f.ok for f in findings)
