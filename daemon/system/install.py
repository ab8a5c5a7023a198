"""Install and uninstall what mlxgate sets up on this machine (`mlxgate service install`,
run by ./install.sh): certificates, the steps that need root (hosts entry, forwarding,
trust, lingering; one sudo), then the boot service with the chosen start flags.

What was done is recorded in the runtime folder (`install.json`): running the install
again updates in place (a step no longer asked for is undone) and `uninstall` removes
every trace, also of steps a lost record no longer names."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import SETTINGS, Config
from . import etc_hosts, forwarding, privileged, service, trust

RECORD = "install.json"
# What the runtime folder holds that mlxgate made (uninstall removes these; anything else,
# e.g. plugins of yours, stays).
RUNTIME_FILES = ("api_key", "logs", "supervisord.d", "start.json", RECORD, "blocked.json", "litellm.yaml",
                 "supervisor.sock", "supervisord.pid", "ca-bundle.pem")
PASSED_ENV = ("MLXGATE_CONFIG", "MLXGATE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
              *(s.env for s in SETTINGS if s.env))


@dataclass
class Choices:
    flags: list[str] = field(default_factory=list)  # `mlxgate start` flags the service runs with
    service: bool = True
    port_forward: bool = False
    forward_http: bool = False
    trust_ca: bool = False
    linger: bool = False


def load_record(home: Path) -> dict:
    try:
        return json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _save_record(home: Path, record: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / RECORD).write_text(json.dumps(record, indent=2))


def service_env(config: Config, environ=os.environ) -> dict[str, str]:
    """The environment the service runs with: the runtime folder, a PATH, and the
    settings' variables as they are now (so the service serves what a start here would)."""
    env = {name: environ[name] for name in PASSED_ENV if environ.get(name)}
    env["MLXGATE_HOME"] = str(config.home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin",
                                   "/usr/sbin", "/sbin"])
    return env


def wanted_steps(config: Config, choices: Choices, platform: str = sys.platform) -> list[privileged.Step]:
    steps: list[privileged.Step] = []
    if config.ssl_domain:
        steps.append(privileged.EtcHostsLine(domain=config.ssl_domain, file=str(etc_hosts.HOSTS)))
    if choices.port_forward:
        rules = forwarding.forwards(config.https_port, config.port if choices.forward_http else None)
        kind = privileged.PfForward if platform == "darwin" else privileged.NftForward
        steps.append(kind(forwards=[list(r) for r in rules]))
    if choices.trust_ca:
        ca = config.ssl_path / "ca.pem"
        steps.append(privileged.TrustCA(ca=str(ca), sha1=trust.fingerprint(ca)))
    if choices.linger and platform != "darwin":
        steps.append(privileged.Linger(user=getpass.getuser()))
    return steps


def install(config: Config, choices: Choices, say: Callable[[str], None] = print,
            manager: service.Systemd | service.Launchd | None = None,
            as_root: Callable = privileged.run_as_root) -> None:
    from ..certs import ensure_leaf

    manager = manager or service.manager()
    record = load_record(config.home)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    if config.enable_https or choices.trust_ca:
        cert, _, made = ensure_leaf(config.ssl_path, config.ssl_domain)
        say(f"{'made' if made else 'kept'} TLS certificate {cert} (authority {config.ssl_path / 'ca.pem'})")
    wanted = wanted_steps(config, choices)
    specs = [step.spec for step in wanted]
    dropped = [privileged.from_spec(s) for s in record.get("privileged", []) if s not in specs]
    if wanted or dropped:
        say("These steps need root:")
        for step in dropped:
            say(f"  - undo: {step.describe()}")
        for step in wanted:
            say(f"  - {step.describe()}")
        as_root(wanted, dropped, say)
    record["privileged"] = specs
    _save_record(config.home, record)
    if choices.service:
        manager.install(choices.flags, service_env(config), config.log_dir / service.LOG_NAME, say)
        record["service"] = {"kind": manager.kind, "path": str(manager.path), "flags": choices.flags}
        _save_record(config.home, record)


def leftovers(config: Config, platform: str = sys.platform) -> list[privileged.Step]:
    """Every root step with a trace on this machine: those recorded, and the ones any
    install may have left (found by their files and marks, in case the record is gone)."""
    record = load_record(config.home)
    candidates = [privileged.from_spec(s) for s in record.get("privileged", [])]
    candidates += [privileged.EtcHostsLine(domain="", file=str(etc_hosts.HOSTS)),
                   privileged.PfForward(forwards=[]) if platform == "darwin" else privileged.NftForward(forwards=[])]
    if platform != "darwin":
        candidates.append(privileged.TrustCA(ca=str(config.ssl_path / "ca.pem")))
    found, kinds = [], set()
    for step in candidates:
        if step.kind not in kinds and step.present():
            found.append(step)
            kinds.add(step.kind)
    return found


def uninstall(config: Config, say: Callable[[str], None] = print,
              manager: service.Systemd | service.Launchd | None = None,
              as_root: Callable = privileged.run_as_root) -> None:
    from ..supervision import control

    manager = manager or service.manager()
    if manager.path.exists():
        manager.uninstall(say)
    if control.stop(config, say=say):
        say("stopped the gateway")
    steps = leftovers(config)
    if steps:
        say("These steps need root:")
        for step in steps:
            say(f"  - undo: {step.describe()}")
        as_root([], steps, say)
    for name in RUNTIME_FILES:
        path = config.home / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    try:
        config.home.rmdir()
        say(f"removed the runtime folder {config.home}")
    except FileNotFoundError:
        pass
    except OSError:
        say(f"kept {config.home}: it holds files mlxgate did not make ({', '.join(sorted(p.name for p in config.home.iterdir()))})")
