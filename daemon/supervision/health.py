"""Whether the daemon's programs answer: their endpoints, the wait for a start to come up (the
programs, then the models it loads), and the rows of `mlxgate status`."""

from __future__ import annotations

import http.client
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Callable

import requests

from ..config import Config
from ..errors import MlxgateError, StartBlocked
from .programs import SWITCHED, Supervisor, runs


@dataclass
class Endpoint:
    name: str
    url: str
    verify: object = True


def endpoints(config: Config) -> list[Endpoint]:
    found = [Endpoint("wrapper", config.wrapper_url + "/health"),
             Endpoint("proxy", config.http_url + "/health/liveliness")]
    if config.enable_https:
        ca = str(config.ssl_path / "ca.pem")
        found.append(Endpoint("proxy_https", f"https://localhost:{config.https_port}/health/liveliness", ca))
    return found


def _served_beside(config: Config) -> list[Endpoint]:
    """What a program serves beside its own endpoint: the HTTP proxy, Ollama's API (`ollama_port`)."""
    return [Endpoint("ollama", f"http://127.0.0.1:{config.ollama_port}/")] if config.ollama_port else []


def probe(endpoint: Endpoint) -> str | None:
    """None when healthy, else what went wrong."""
    try:
        response = requests.get(endpoint.url, timeout=3, verify=endpoint.verify)
    except requests.RequestException as exc:
        return type(exc).__name__
    return None if response.ok else f"HTTP {response.status_code}"


def log_tail(config: Config, program: str, lines: int = 25) -> str:
    path = config.log_dir / f"{program}.log"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def wait_healthy(config: Config, supervisor: Supervisor, say: Callable[[str], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {e.name: e for e in endpoints(config)}
    programs = list(pending)
    slow = " (LiteLLM, for the litellm: section, takes about 10 s to load)" if config.litellm.get("model_list") else ""
    say("waiting for " + ", ".join(programs) + slow)
    while pending:
        if time.monotonic() > deadline:
            name = sorted(pending)[0]
            raise MlxgateError(f"{name} did not become healthy within {timeout:g} s. Its last log lines:\n"
                               f"{log_tail(config, name)}")
        try:
            states = {name: info["statename"] for name, info in supervisor.processes().items()}
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            states = {}
        for name in programs:  # one that was up may die while the others start
            state = states.get(name)
            if state in ("FATAL", "EXITED", "BACKOFF") or (not states and not supervisor.socket.exists()):
                raise MlxgateError(f"{name} failed to start ({state or 'supervisord exited'}). "
                                   f"Its last log lines:\n{log_tail(config, name)}")
        for name, endpoint in list(pending.items()):
            if states.get(name) == "RUNNING" and probe(endpoint) is None:
                del pending[name]
                say(f"  {name} is up")
        time.sleep(0.25)
    _wait_models(config, say, deadline)


def _wait_models(config: Config, say: Callable[[str], None], deadline: float) -> None:
    from ..client import WrapperClient

    from .. import seats

    client = WrapperClient(config.wrapper_url, config.api_key, timeout=10)
    wanted = {name: seat for seat, name in seats.configured(config)}
    wanted.update({name: None for name, settings in config.models.items() if settings.get("pinned")})
    if wanted:
        say("loading " + ", ".join(f"{name} ({seat.what}, port {seats.port_of(config, seat)})" if seat
                                   else f"{name} (pinned)" for name, seat in wanted.items()))
    while wanted:
        servers = client.models()["servers"]
        for name in list(wanted):
            server = _server_of(servers, config, name, wanted[name]) or {}
            if server.get("state") == "ready":
                wanted.pop(name)
                say(f"  {name} is ready on port {server['port']} ({server['load_seconds']} s)")
            elif server.get("state") == "failed":
                raise StartBlocked(f"{name} failed to load: {server['error']}")
        if time.monotonic() > deadline:
            raise MlxgateError(f"{', '.join(wanted.values())} not loaded in time; see `mlxgate logs wrapper`")
        time.sleep(0.25)


def _server_of(servers: dict, config: Config, name: str, seat) -> dict | None:
    """The status of the server that serves `name` (a seat's by its seat's name)."""
    if seat is not None:
        return next((s for s in servers.values() if s.get("name") == seat.name), None)
    from ..catalog import for_config
    try:
        return servers.get(for_config(config).resolve(name).name)
    except MlxgateError:
        return None


def status(config: Config) -> tuple[bool, list[tuple[str, str, str]]]:
    """(everything healthy, rows of (what, state, detail))."""
    supervisor = Supervisor(config.home)
    rows: list[tuple[str, str, str]] = []
    if not supervisor.running():
        return False, [("supervisord", "STOPPED", f"not running (runtime folder {config.home})")]
    healthy = True
    rows.append(("supervisord", "RUNNING", f"pid {supervisor.pid()}"))
    for name, info in sorted(supervisor.processes().items()):
        if not runs(config, name) and info["statename"] == "STOPPED":
            rows.append((name, "OFF", f"{SWITCHED[name]} is off"))
            continue
        healthy &= info["statename"] == "RUNNING"
        rows.append((name, info["statename"], info["description"]))
    for endpoint in endpoints(config) + _served_beside(config):
        problem = probe(endpoint)
        healthy &= problem is None
        rows.append((f"{endpoint.name} endpoint", "OK" if problem is None else "DOWN",
                     endpoint.url.rsplit("/health", 1)[0] + (f" ({problem})" if problem else "")))
    try:
        from ..client import WrapperClient
        from ..resident_view import budget_line, rows as resident_rows

        answer = WrapperClient(config.wrapper_url, config.api_key, timeout=5).models()
        for row in resident_rows(answer["servers"]):
            bad = row["state"] == "failed"
            healthy &= not bad
            rows.append((f"model {row['model']}", row["state"].upper(),
                         f"port {row['port']}, {row['memory']}, {row['in_flight']} running, {row['queued']} waiting, "
                         f"idle {row['idle']}, unloads {row['unloads']}" + (f" - {row['detail']}" if row["detail"] else "")))
        rows.append(("memory", "BUDGET", budget_line(answer.get("memory") or {})))
    except MlxgateError as exc:
        healthy = False
        rows.append(("model servers", "UNKNOWN", str(exc)))
    return healthy, rows
