"""The boot service: the gateway started at login (or boot) by the system's service
manager, and brought back when it goes down. systemd (a user unit) on Linux, launchd
(a LaunchAgent) on macOS. Both run `mlxgate start --foreground` with the flags the
install was given; see the templates in systemd/ and launchd/ for the restart rules.

While the service is installed, `mlxgate start`, `stop` and `restart` go through the
manager (or it would bring back what the user stopped). Where the manager is not
running (a container, a machine whose PID 1 is not systemd) the files are still
installed and the gateway runs in the foreground or with plain `mlxgate start`."""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import PROJECT_ROOT
from . import run, templates

UNIT = "mlxgate.service"
LABEL = "com.mlxgate.gateway"
LOG_NAME = "service.log"


@dataclass
class State:
    kind: str              # "systemd" or "launchd"
    path: Path             # the unit or plist
    installed: bool
    enabled: bool
    active: bool | None    # None: the manager is not running, so nothing is known
    detail: str


def mlxgate_command() -> str:
    """The `mlxgate` of this install (the virtualenv's)."""
    return str(Path(sys.executable).parent / "mlxgate")


class Systemd:
    kind = "systemd"

    def __init__(self, home: Path | None = None, run: Callable = run, version: int | None = None):
        self.home = home or Path.home()
        self.run = run
        self._version = version

    @property
    def path(self) -> Path:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or self.home / ".config")
        return config / "systemd" / "user" / UNIT

    def version(self) -> int:
        if self._version is None:
            said = self.run(["systemctl", "--version"], check=False).stdout
            match = re.search(r"systemd (\d+)", said or "")
            self._version = int(match[1]) if match else 0
        return self._version

    def render(self, flags: list[str], env: dict[str, str], log: Path) -> str:
        argv = [mlxgate_command(), "start", "--foreground", *flags]
        backoff = ("RestartSteps=5\nRestartMaxDelaySec=120" if self.version() >= 254 else
                   "# (RestartSteps/RestartMaxDelaySec need systemd 254: a fixed RestartSec here)")
        environment = "\n".join(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(env.items()))
        return templates.text(f"systemd/{UNIT}", {
            "@EXEC_START@": " ".join(_systemd_quote(a) for a in argv), "@ROOT@": str(PROJECT_ROOT),
            "@ENVIRONMENT@": environment, "@BACKOFF@": backoff, "@LOG@": str(log)})

    def manager_running(self) -> bool:
        said = self.run(["systemctl", "--user", "is-system-running"], check=False).stdout.strip()
        return bool(said) and said not in ("offline", "unknown")

    def install(self, flags: list[str], env: dict[str, str], log: Path, say: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.render(flags, env, log))
        say(f"wrote the user unit {self.path}")
        self.run(["systemctl", "--user", "enable", UNIT])
        if self.manager_running():
            self.run(["systemctl", "--user", "daemon-reload"])
            self.run(["systemctl", "--user", "restart", UNIT])
            say(f"enabled and started {UNIT} (systemctl --user status {UNIT})")
        else:
            say(f"enabled {UNIT}, but systemd's user manager is not running here (systemd is not PID 1, as "
                f"in a container), so nothing starts it. Run the gateway in the foreground instead: "
                f"{shlex.join([mlxgate_command(), 'start', '--foreground', *flags])}  (or `mlxgate start` "
                f"to run it in the background)")

    def uninstall(self, say: Callable[[str], None]) -> None:
        if self.manager_running():
            self.run(["systemctl", "--user", "disable", "--now", UNIT], check=False)
        else:
            self.run(["systemctl", "--user", "disable", UNIT], check=False)
        if self.path.exists():
            self.path.unlink()
            say(f"removed {self.path}")
        for folder in (self.path.parent, self.path.parent.parent, self.path.parent.parent.parent):
            if folder != self.home and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # the folders the install made, when nothing else is in them
        if self.manager_running():
            self.run(["systemctl", "--user", "daemon-reload"], check=False)
            self.run(["systemctl", "--user", "reset-failed", UNIT], check=False)

    def state(self) -> State:
        installed = self.path.exists()
        enabled = installed and self.run(["systemctl", "--user", "is-enabled", UNIT],
                                         check=False).stdout.strip() == "enabled"
        if not self.manager_running():
            return State(self.kind, self.path, installed, enabled, None, "systemd's user manager is not running")
        said = self.run(["systemctl", "--user", "is-active", UNIT], check=False).stdout.strip()
        return State(self.kind, self.path, installed, enabled, said == "active", said)

    def start(self) -> None:
        self.run(["systemctl", "--user", "start", UNIT])

    def stop(self) -> None:
        self.run(["systemctl", "--user", "stop", UNIT])

    def restart(self) -> None:
        self.run(["systemctl", "--user", "restart", UNIT])


def _systemd_quote(word: str) -> str:
    """One word of a unit's command line or Environment=: quoted when needed, `%` and `$`
    kept literal."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r'[\s"\'\\;]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Launchd:
    kind = "launchd"

    def __init__(self, home: Path | None = None, run: Callable = run, uid: int | None = None):
        self.home = home or Path.home()
        self.run = run
        self.uid = os.getuid() if uid is None else uid

    @property
    def path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def target(self) -> str:
        return f"gui/{self.uid}/{LABEL}"

    def render(self, flags: list[str], env: dict[str, str], log: Path) -> bytes:
        return templates.plist(f"launchd/{LABEL}.plist", {"@MLXGATE@": mlxgate_command(), "@START_FLAGS@": flags,
                                                  "@ENVIRONMENT@": env, "@ROOT@": str(PROJECT_ROOT),
                                                  "@LOG@": str(log)})

    def manager_running(self) -> bool:
        return sys.platform == "darwin"

    def install(self, flags: list[str], env: dict[str, str], log: Path, say: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run(["launchctl", "bootout", self.target], check=False)  # an older one, with older flags
        self.path.write_bytes(self.render(flags, env, log))
        self.run(["plutil", "-lint", str(self.path)])
        self.run(["launchctl", "enable", self.target])
        self.run(["launchctl", "bootstrap", f"gui/{self.uid}", str(self.path)])
        say(f"loaded the LaunchAgent {self.path} (launchctl print {self.target})")

    def uninstall(self, say: Callable[[str], None]) -> None:
        self.run(["launchctl", "bootout", self.target], check=False)
        if self.path.exists():
            self.path.unlink()
            say(f"removed {self.path}")

    def state(self) -> State:
        installed = self.path.exists()
        printed = self.run(["launchctl", "print", self.target], check=False)
        disabled = self.run(["launchctl", "print-disabled", f"gui/{self.uid}"], check=False).stdout
        enabled = installed and f'"{LABEL}" => disabled' not in disabled and f'"{LABEL}" => true' not in disabled
        match = re.search(r"state = (\w+)", printed.stdout or "")
        state = match[1] if match else ("not loaded" if printed.returncode else "unknown")
        return State(self.kind, self.path, installed, enabled, state == "running", state)

    def start(self) -> None:
        self.run(["launchctl", "kickstart", self.target])

    def stop(self) -> None:
        # SIGTERM: `start --foreground` stops everything and exits 0, which KeepAlive
        # (SuccessfulExit false) does not restart; kickstart starts it again.
        self.run(["launchctl", "kill", "TERM", self.target])

    def restart(self) -> None:
        self.run(["launchctl", "kickstart", "-k", self.target])


def manager(platform: str = sys.platform, home: Path | None = None, run: Callable = run) -> Systemd | Launchd:
    return Launchd(home, run) if platform == "darwin" else Systemd(home, run)
