"""`mlxgate docker up|down|logs|restart`: the Docker stack in docker/ (LiteLLM's admin UI with its
PostgreSQL, Prometheus, Grafana) in front of mlxgate, which stays on this machine.

`up` writes the variables the compose file needs to the .env beside it (mode 600: it holds keys):
the gateway's port and key, a LiteLLM master key and salt kept in the runtime folder (the salt must
never change once LiteLLM stored credentials with it), a Prometheus configuration written for the
gateway's port, and the compose project's name and published ports. docker-compose reads that file
from its folder, so the plain commands there (`docker-compose logs -f litellm_proxy`, `restart`,
`down`) reach the stack `up` started; mlxgate's own commands run exactly those, with that .env.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

import yaml

from ..config import Config
from ..errors import MlxgateError
from ..private_files import replace_private, write_private

STACK_FILE = "docker-compose.yml"
ENV_FILE = ".env"

# What a user may choose for `up` in its environment, with mlxgate's defaults: the compose project's
# name (the folder's name, compose's own default, would be "docker") and the ports the stack publishes.
CHOSEN_AT_UP = {"COMPOSE_PROJECT_NAME": "mlxgate", "LITELLM_PORT": "4000", "PROMETHEUS_PORT": "9090",
                "GRAFANA_PORT": "3000", "LITELLM_DB_PASSWORD": "litellm"}

ENV_HEADER = """\
# Written by `mlxgate docker up`, anew each time; mode 600, it holds keys.
# docker-compose reads it from this folder, so here `docker-compose logs -f litellm_proxy`,
# `docker-compose restart litellm_proxy` and `docker-compose down` reach the stack it started.
"""


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


def _require_engine() -> None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise MlxgateError("the Docker engine is not running (`docker info` fails): start Docker Desktop, or "
                           "`sudo systemctl start docker` on Linux, then run this again")


def stack_folder(config: Config) -> Path:
    folder = config.docker_path
    if not (folder / STACK_FILE).is_file():
        raise MlxgateError(f"no {STACK_FILE} in {folder}: docker_dir (MLXGATE_DOCKER_DIR) names the Docker "
                           f"stack's folder. Fix: copy docker/ of the checkout there, or unset docker_dir.")
    return folder


def service_args(folder: Path, service: str | None) -> list[str]:
    """[] for every service of the stack, [service] for one of them."""
    if service is None:
        return []
    known = list(yaml.safe_load((folder / STACK_FILE).read_text())["services"])
    if service not in known:
        raise MlxgateError(f"{folder / STACK_FILE} has no service {service!r}; its services are "
                           f"{', '.join(known)}. Fix: name one of them, or none for all.")
    return [service]


def _secret(config: Config, name: str) -> str:
    path = config.home / name
    if path.is_file():
        return path.read_text().strip()
    value = "sk-" + secrets.token_urlsafe(32)
    config.home.mkdir(parents=True, exist_ok=True)
    replace_private(path, (value + "\n").encode())
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


def _key_file(config: Config) -> Path:
    path = config.home / "api_key"
    if not path.is_file():  # the key came from MLXGATE_API_KEY: Prometheus reads it from a file
        path = config.home / "docker" / "mlxgate_key"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, config.api_key.encode())  # in place: Prometheus' bind mount holds this file
    return path


def variables(config: Config, max_tokens: int | None = None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What the .env holds: the variables the compose file needs, as this gateway has them."""
    if not config.api_key:
        raise MlxgateError("no API key yet: run `mlxgate start` once (it makes one)")
    return {**{name: env.get(name, default) for name, default in CHOSEN_AT_UP.items()},
            "MLXGATE_PORT": str(config.port), "MLXGATE_API_KEY": config.api_key,
            "MLXGATE_KEY_FILE": str(_key_file(config)),
            "MLXGATE_PROMETHEUS_CONFIG": str(prometheus_config(config)),
            "LITELLM_MASTER_KEY": _secret(config, "litellm_master_key"),
            "LITELLM_SALT_KEY": _secret(config, "litellm_salt_key"),
            "MAX_TOKENS": str(max_tokens or config.max_tokens)}


def write_env(folder: Path, values: Mapping[str, str]) -> Path:
    """The .env docker-compose reads in `folder`: single-quoted values, which it takes literally."""
    path = folder / ENV_FILE
    for name, value in values.items():
        if any(c in value for c in "'\\\n"):
            raise MlxgateError(f"cannot write {path}: {name} holds a quote, backslash or line break, which "
                               f"docker-compose's .env cannot carry. Fix: give {name} a value without one.")
    replace_private(path, (ENV_HEADER + "".join(f"{name}='{value}'\n" for name, value in values.items())).encode())
    return path


def written_names(folder: Path) -> set[str]:
    """The variables the .env in `folder` holds."""
    path = folder / ENV_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MlxgateError(f"no {path} yet, so docker-compose lacks the variables {STACK_FILE} needs. "
                           f"Fix: run `mlxgate docker up` (it writes them).") from None
    return {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line and not line.startswith("#")}


def compose(folder: Path, args: list[str], env: Mapping[str, str] = os.environ,
            call: Callable[..., int] = subprocess.call) -> int:
    """`docker-compose ARGS` in the stack's folder as a user runs it there, with its .env; the variables
    the .env holds are taken out of `env`, since docker-compose would let the shell's values win."""
    held = written_names(folder)
    command = compose_command()
    _require_engine()
    return call([*command, "-f", STACK_FILE, *args], cwd=folder,
                env={name: value for name, value in env.items() if name not in held})


def run(config: Config, args: list[str], service: str | None = None) -> int:
    """`docker-compose ARGS [SERVICE]` for the stack `up` started (down, logs, restart)."""
    folder = stack_folder(config)
    return compose(folder, [*args, *service_args(folder, service)])


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


def up(config: Config, max_tokens: int | None = None, build: bool = False,
       say: Callable[[str], None] = print, env: Mapping[str, str] = os.environ) -> int:
    """Write the .env, then `docker-compose up -d`; the .env stays when Docker is not running."""
    folder = stack_folder(config)
    problem = reachable_from_containers(config)
    if problem:
        raise MlxgateError(problem)
    values = variables(config, max_tokens, env)
    say(f"wrote {write_env(folder, values)}: in {folder}, plain `docker-compose logs -f litellm_proxy`, "
        f"`restart` and `down` reach this stack too")
    say(f"starting the stack (mlxgate stays on this machine, port {config.port})")
    code = compose(folder, ["up", "-d", *(["--build"] if build else [])], env)
    if code == 0:
        say(f"LiteLLM admin UI  http://localhost:{values['LITELLM_PORT']}/ui  (log in with the master key in "
            f"{config.home / 'litellm_master_key'})")
        say(f"Grafana           http://localhost:{values['GRAFANA_PORT']}   (dashboard: mlxgate)")
        say(f"Prometheus        http://localhost:{values['PROMETHEUS_PORT']}")
        say(f"Clients of the stack use http://localhost:{values['LITELLM_PORT']} with the LiteLLM master key "
            f"(or keys made in its UI).")
    return code
