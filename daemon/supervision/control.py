"""Start and stop the daemon: supervisord with the gateway's programs (`programs`).

`start` prepares everything a program needs (the checks of `preflight`, certificates, the
generated LiteLLM config), runs supervisord, and returns once every program is healthy
(`health`), or fails printing the failing program's last log lines. `run_foreground` is the
boot service's start.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import MlxgateError, StartBlocked
from ..project_files import project_file
from ..runtime_files import save_start_options
from . import preflight
from .health import _wait_models, endpoints, log_tail, probe, wait_healthy
from .programs import PROGRAMS, Supervisor, process_alive, program_env, runs

EXIT_GROUP_DOWN = 75  # EX_TEMPFAIL: the group went down; the service manager starts it again
EXIT_BLOCKED = 78     # EX_CONFIG: a cause no restart cures (systemd: RestartPreventExitStatus=78)
BLOCKED_FILE = "blocked.json"


def prepare(config: Config, use_sudo: bool = False, say: Callable[[str], None] = print,
            flags: dict | None = None, port_wait: float = 0.0) -> dict[str, str]:
    """Everything before supervisord runs; returns the environment it runs with. Whatever
    fails here fails the same way next time (`StartBlocked`)."""
    from ..proxy import litellm_config

    supervisor = Supervisor(config.home)
    if supervisor.running():
        raise StartBlocked(f"mlxgate is already running (runtime folder {config.home}). "
                           f"Use `mlxgate restart` or `mlxgate stop` first.")
    try:
        if flags is not None:
            save_start_options(config, {**flags, "use_sudo": use_sudo})
        preflight.check(config, port_wait)
        config.log_dir.mkdir(parents=True, exist_ok=True)
        (config.home / "supervisord.d" / "proxy_https.conf").unlink(missing_ok=True)  # where earlier versions put it
        if config.enable_https:
            from ..certs import ensure_leaf
            cert, _, made = ensure_leaf(config.ssl_path, config.ssl_domain)
            say(f"{'made' if made else 'using'} TLS certificate {cert} (authority {config.ssl_path / 'ca.pem'})")
        if config.listen:  # the relay's TLS listener for other gateways (see `wrapper.doors`)
            from ..hosts.admit import listen_row
            from ..certs import listener_context
            listener_context(config.ssl_path, config.listen)
            say("serving other gateways at " + listen_row(config)[2])
        litellm_config.write(config)
    except StartBlocked:
        raise
    except MlxgateError as exc:
        raise StartBlocked(str(exc)) from None
    (config.home / BLOCKED_FILE).unlink(missing_ok=True)  # whatever stopped the last start is gone
    return program_env(config, use_sudo)


def _supervisord(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisord", *args, "-c", str(project_file("supervisord.conf"))]


def start(config: Config, use_sudo: bool = False, say: Callable[[str], None] = print,
          timeout: float = 180.0, flags: dict | None = None) -> None:
    """Start the daemon; `flags` (given to `mlxgate start`) are saved for its programs and later commands."""
    env = prepare(config, use_sudo, say, flags)
    say(f"starting supervisord (runtime folder {config.home})")
    result = subprocess.run(_supervisord(), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise MlxgateError(f"supervisord did not start: {(result.stderr or result.stdout).strip()}")
    try:
        wait_healthy(config, Supervisor(config.home), say, timeout)
    except MlxgateError:
        stop(config, say=lambda _: None)
        raise


def run_foreground(config: Config, use_sudo: bool = False, say: Callable[[str], None] = print,
                   timeout: float = 180.0, flags: dict | None = None,
                   blocked_exit: int = EXIT_BLOCKED, launch: Callable = subprocess.Popen) -> int:
    """The start the boot service runs: the same preparation, then supervisord in the
    foreground until it exits. The exit status tells the service manager what to do:
    0 stopped on request (SIGTERM, SIGINT or SIGHUP), `EXIT_GROUP_DOWN` start again,
    `blocked_exit` do not (the cause is kept in `blocked.json` for `status` and `doctor`)."""
    blocked = config.home / BLOCKED_FILE
    try:
        env = prepare(config, use_sudo, say, flags, port_wait=15.0)
    except StartBlocked as exc:
        say(f"mlxgate cannot start: {exc}")
        _record_blocked(blocked, exc)
        return blocked_exit
    say(f"starting supervisord in the foreground (runtime folder {config.home})")
    child = launch(_supervisord("-n"), env=env)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    supervisor = Supervisor(config.home)
    try:
        deadline = time.monotonic() + 30
        while not supervisor.running():  # its socket first: `wait_healthy` reads a missing one as an exit
            if child.poll() is not None or time.monotonic() > deadline:
                raise MlxgateError(f"supervisord did not start; see {config.log_dir / 'supervisord.log'}")
            time.sleep(0.1)
        wait_healthy(config, supervisor, say, timeout)
        say("mlxgate is running")
    except MlxgateError as exc:
        if not stopping:
            say(f"mlxgate did not come up: {exc}")
            child.send_signal(signal.SIGTERM)
            child.wait()
            if isinstance(exc, StartBlocked):
                _record_blocked(blocked, exc)
                return blocked_exit
            return EXIT_GROUP_DOWN
    code = child.wait()
    if stopping:
        say("mlxgate stopped")
        return 0
    say(f"the group went down (supervisord exited with {code}); see `mlxgate logs`")
    return EXIT_GROUP_DOWN


def start_through(action: Callable[[], None], config: Config, say: Callable[[str], None] = print,
                  timeout: float = 180.0) -> None:
    """Start (or restart) through the boot service's manager, then wait as `start` does;
    a start the service gave up on fails with its cause."""
    (config.home / BLOCKED_FILE).unlink(missing_ok=True)
    action()
    supervisor = Supervisor(config.home)
    deadline = time.monotonic() + timeout
    while not supervisor.running():
        cause = blocked_cause(config.home)
        if cause:
            raise StartBlocked(cause["error"])
        if time.monotonic() > deadline:
            raise MlxgateError(f"the boot service did not start supervisord within {timeout:g} s; "
                               f"see `mlxgate logs service`")
        time.sleep(0.25)
    wait_healthy(config, supervisor, say, max(1.0, deadline - time.monotonic()))


def restart_program(config: Config, name: str, say: Callable[[str], None] = print, timeout: float = 120.0) -> None:
    """Restart one program and wait until it answers (the wrapper: and its models are loaded)."""
    if name not in PROGRAMS:
        raise MlxgateError(f"unknown program {name!r}; expected one of {', '.join(PROGRAMS)}")
    if not runs(config, name):
        raise MlxgateError(f"{name} is off with these settings: set enable_https: true in the config "
                           f"(or `mlxgate stop` and `mlxgate start --enable-https`), then `mlxgate restart`")
    supervisor = Supervisor(config.home)
    if not supervisor.running():
        raise MlxgateError("mlxgate is not running; start it with `mlxgate start`")
    for call in (supervisor.rpc.supervisor.stopProcess, supervisor.rpc.supervisor.startProcess):
        try:
            call(name)
        except Exception as exc:  # xmlrpc Fault: NOT_RUNNING on stop is fine
            if "NOT_RUNNING" not in str(exc):
                raise MlxgateError(f"cannot restart {name}: {exc}") from None
    endpoint = {e.name: e for e in endpoints(config)}.get(name)
    deadline = time.monotonic() + timeout
    while endpoint and probe(endpoint) is not None:
        if time.monotonic() > deadline:
            raise MlxgateError(f"{name} restarted but does not answer at {endpoint.url} after {timeout:g} s. "
                               f"Its last log lines:\n{log_tail(config, name)}")
        time.sleep(0.1)
    if name == "wrapper":
        _wait_models(config, say, deadline)


def _record_blocked(path: Path, exc: Exception) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"error": str(exc), "at": time.strftime("%Y-%m-%d %H:%M:%S")}))


def blocked_cause(home: Path) -> dict | None:
    """Why the last service start gave up, when it did (see `run_foreground`)."""
    try:
        return json.loads((home / BLOCKED_FILE).read_text())
    except (OSError, ValueError):
        return None


def stop(config: Config, say: Callable[[str], None] = print, timeout: float = 60.0) -> bool:
    """Shut supervisord down and wait for it to exit. False when it was not running."""
    supervisor = Supervisor(config.home)
    pid = supervisor.pid()
    if not supervisor.running():
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGTERM)
        else:
            return False
    else:
        say("stopping mlxgate...")
        try:
            supervisor.rpc.supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            pass
    deadline = time.monotonic() + timeout
    while pid and process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and process_alive(pid):
        raise MlxgateError(f"supervisord (pid {pid}) did not exit within {timeout:g} s")
    return True
