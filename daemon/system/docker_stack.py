"""`mlxgate docker up|down|logs`: the Docker stack in docker/ (LiteLLM's admin UI with its
PostgreSQL, Prometheus, Grafana) in front of mlxgate, which stays on this machine.

It runs `docker compose` (or `docker-compose` v1) with the variables the compose file
needs: the gateway's port and key, a LiteLLM master key and salt kept in the runtime
folder (the salt must never change once LiteLLM stored credentials with it), and a
Prometheus configuration written for the gateway's port.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from .. import PROJECT_ROOT
from ..config import Config
from ..errors import MlxgateError
from ..private_files import write_private

COMPOSE_FILE = PROJECT_ROOT / "docker" / "docker-compose.yml"
PROJECT = "mlxgate"


def compose_command() -> list[str]:
    """`docker compose` when the plugin is there, else `docker-compose` v1."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise MlxgateError("Docker Compose is not installed: install Docker Desktop (macOS) or Docker Engine with the "
                       "compose plugin (Linux, https://docs.docker.com/engine/install/), then run this again. "
                       "mlxgate itself does not need Docker.")


def _secret(config: Config, name: str) -> str:
    path = config.home / name
    if path.is_file():
        return path.read_text().strip()
    value = "sk-" + secrets.token_urlsafe(32)
    config.home.mkdir(parents=True, exist_ok=True)
    write_private(path, (value + "\n").encode())
    return value


def prometheus_config(config: Config) -> Path:
    """Prometheus' scrape configuration for this gateway's port (and LiteLLM's)."""
    path = config.home / "docker" / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `mlxgate docker up`.\n" + yaml.safe_dump({
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            {"job_name": "mlxgate", "metrics_path": "/metrics",
             "authorization": {"type": "Bearer", "credentials_file": "/etc/prometheus/mlxgate_key"},
             "static_configs": [{"targets": [f"host.docker.internal:{config.port}"]}]},
            {"job_name": "litellm", "metrics_path": "/metrics/",
             "static_configs": [{"targets": ["litellm_proxy:4000"]}]},
        ]}, sort_keys=False))
    return path


def environment(config: Config, max_tokens: int | None = None) -> dict[str, str]:
    if not config.api_key:
        raise MlxgateError("no API key yet: run `mlxgate start` once (it makes one)")
    return dict(os.environ, MLXGATE_PORT=str(config.port), MLXGATE_API_KEY=config.api_key,
                MLXGATE_KEY_FILE=str(_key_file(config)),
                MLXGATE_PROMETHEUS_CONFIG=str(prometheus_config(config)),
                LITELLM_MASTER_KEY=_secret(config, "litellm_master_key"),
                LITELLM_SALT_KEY=_secret(config, "litellm_salt_key"),
                MAX_TOKENS=str(max_tokens or config.max_tokens))


def _key_file(config: Config) -> Path:
    path = config.home / "api_key"
    if not path.is_file():  # the key came from MLXGATE_API_KEY: Prometheus reads it from a file
        path = config.home / "docker" / "mlxgate_key"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, config.api_key.encode())
    return path


def reachable_from_containers(config: Config) -> str | None:
    """None when containers can reach the gateway's listener, else what to change."""
    if sys.platform == "darwin":
        return None  # Docker Desktop forwards host.docker.internal to the Mac's own addresses
    try:
        address = ipaddress.ip_address(config.host)
    except ValueError:
        return None
    if address.is_loopback:
        return (f"the gateway listens on {config.host} only, which containers cannot reach. Set `host: 0.0.0.0` "
                f"in config/gateway.yaml (or MLXGATE_HOST; every request still needs the key) or the docker0 "
                f"bridge address (usually 172.17.0.1), restart mlxgate, then run this again.")
    return None


def compose(config: Config, args: list[str], env: dict | None = None) -> int:
    command = [*compose_command(), "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
    return subprocess.call(command, env=env or environment(config))


def up(config: Config, max_tokens: int | None = None, build: bool = False,
       say: Callable[[str], None] = print) -> int:
    command = compose_command()
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise MlxgateError("the Docker engine is not running (`docker info` fails): start Docker Desktop, or "
                           "`sudo systemctl start docker` on Linux, then run this again")
    problem = reachable_from_containers(config)
    if problem:
        raise MlxgateError(problem)
    env = environment(config, max_tokens)
    say(f"starting the stack with {' '.join(command)} (mlxgate stays on this machine, port {config.port})")
    code = compose(config, ["up", "-d", *(["--build"] if build else [])], env)
    if code == 0:
        say("LiteLLM admin UI  http://localhost:4000/ui  (log in with the master key in "
            f"{config.home / 'litellm_master_key'})")
        say("Grafana           http://localhost:3000   (dashboard: mlxgate)")
        say("Prometheus        http://localhost:9090")
        say("Clients of the stack use http://localhost:4000 with the LiteLLM master key (or keys made in its UI).")
    return code
