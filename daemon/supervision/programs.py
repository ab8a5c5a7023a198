"""The daemon's programs as supervisord runs them: their names, which settings switch one on, the
environment they run with, and XML-RPC to the supervisord of one runtime folder."""

from __future__ import annotations

import http.client
import os
import sys
import xmlrpc.client
from pathlib import Path

import psutil

from ..config import SETTINGS, Config

PROGRAMS = ("wrapper", "proxy", "proxy_https")
SWITCHED = {  # a program declared in supervisord.conf that runs only when a setting turns it on
    "proxy_https": "enable_https",
}


def runs(config: Config, program: str) -> bool:
    """Whether `program` runs with these settings (supervisord.conf's autostart reads the same setting)."""
    setting = SWITCHED.get(program)
    return setting is None or bool(getattr(config, setting))


def program_env(config: Config, use_sudo: bool = False) -> dict[str, str]:
    """The environment supervisord and its programs run with: the effective settings."""
    env = dict(os.environ)
    for setting in SETTINGS:
        if not setting.env:
            continue
        value = getattr(config, setting.key)
        if value is None:
            env.pop(setting.env, None)
        elif isinstance(value, bool):
            env[setting.env] = "true" if value else "false"
        elif isinstance(value, tuple):
            env[setting.env] = os.pathsep.join(str(v) for v in value)
        else:
            env[setting.env] = str(value)
    env.update(MLXGATE_HOME=str(config.home), MLXGATE_PYTHON=sys.executable,
               MLXGATE_API_KEY=config.api_key or "", LITELLM_LOCAL_MODEL_COST_MAP="True",
               MLXGATE_PROXY_PREFIX="sudo -n -E " if use_sudo else "", PYTHONUNBUFFERED="1")
    if config.source:
        env["MLXGATE_CONFIG"] = str(config.source.resolve())
    return env


class Supervisor:
    """XML-RPC to the running supervisord of one runtime folder."""

    def __init__(self, home: Path):
        self.home = home
        self.socket = home / "supervisor.sock"

    @property
    def rpc(self) -> xmlrpc.client.ServerProxy:
        """A fresh proxy per use: a failed call leaves supervisor's transport unusable."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self.rpc.supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            return False

    def processes(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.rpc.supervisor.getAllProcessInfo()}

    def pid(self) -> int | None:
        try:
            return int((self.home / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def process_alive(pid: int) -> bool:
    """Whether the process runs; a zombie (exited, not yet reaped) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # someone else's: it exists
        return True
