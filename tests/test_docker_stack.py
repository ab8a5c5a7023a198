"""The Docker stack in docker/, as a user runs it: `mlxgate docker up` writes the stack's .env, then
the plain commands (`docker-compose logs -f litellm_proxy`, `docker-compose restart
litellm_proxy`, `docker-compose down`) work in that folder, and so does `mlxgate docker restart`.

Where a Docker engine answers, the stack runs for real: LiteLLM answers Anthropic and OpenAI
requests through mlxgate, the plain commands reach its containers, both restarts restart them,
`down` removes them. Where none does, `docker-compose config` (Debian's v1 needs no engine) shows
that the .env and the compose file agree, with this gateway's exact port, keys and files; that
check runs in both worlds. The stack is a copy of docker/ (`MLXGATE_DOCKER_DIR`) with its own
project name and ports, so a user's own stack and docker/.env are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml

from mlxgate.errors import MlxgateError
from mlxgate.private_files import replace_private
from mlxgate.system.docker_stack import compose_command
from services import docker_engine, need
from support import ROOT, Gateway, free_port, mlxgate, wait_for

ENGINE = docker_engine()
needs_engine = pytest.mark.skipif(not ENGINE, reason="no Docker engine answers here (`docker info` fails)")
PROMPT = [{"role": "user", "content": "Tell me about the sea"}]
SERVICES = ("postgres", "litellm_proxy", "prometheus", "grafana")


def compose_program() -> list[str]:
    """What a user types for docker-compose here: the compose plugin or v1 (Debian's, installed if missing)."""
    try:
        return compose_command()
    except MlxgateError:
        return [need("docker-compose")]


def dotenv(path: Path) -> dict[str, str]:
    """The NAME='value' lines of an .env."""
    return dict(re.findall(r"(?m)^(\w+)='([^']*)'$", path.read_text()))


def copy_of_docker(parent: Path) -> Path:
    folder = parent / "docker"
    shutil.copytree(ROOT / "docker", folder, ignore=shutil.ignore_patterns(".env"))
    return folder


class Stack:
    """A copy of docker/ and what a user's shell holds for `mlxgate docker` (its folder, a project name
    and ports of its own); `plain` runs docker-compose in the folder as the docs show."""

    def __init__(self, gateway: Gateway, folder: Path):
        self.gateway, self.folder = gateway, folder
        self.chosen = {"COMPOSE_PROJECT_NAME": f"mlxgate-test-{os.getpid()}", "LITELLM_PORT": str(free_port()),
                       "PROMETHEUS_PORT": str(free_port()), "GRAFANA_PORT": str(free_port())}
        self.env = dict(gateway.env, MLXGATE_DOCKER_DIR=str(folder), **self.chosen)
        self.compose = compose_program()
        self.started: subprocess.CompletedProcess | None = None

    @property
    def dotenv(self) -> Path:
        return self.folder / ".env"

    @property
    def expected(self) -> dict[str, str]:
        """The .env `mlxgate docker up --max-tokens 48` writes for this gateway, exactly."""
        home = self.gateway.home
        return {**self.chosen, "LITELLM_DB_PASSWORD": "litellm",
                "MLXGATE_PORT": str(self.gateway.port), "MLXGATE_API_KEY": self.gateway.api_key,
                "MLXGATE_KEY_FILE": str(home / "api_key"),
                "MLXGATE_PROMETHEUS_CONFIG": str(home / "docker" / "prometheus.yml"),
                "LITELLM_MASTER_KEY": self.master_key,
                "LITELLM_SALT_KEY": (home / "litellm_salt_key").read_text().strip(),
                "MAX_TOKENS": "48"}

    def plain(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`docker-compose ARGS` typed in the folder, from a shell that holds none of the stack's variables."""
        held = set(self.chosen) | (set(dotenv(self.dotenv)) if self.dotenv.exists() else set())
        shell = {name: value for name, value in os.environ.items() if name not in held}
        return subprocess.run([*self.compose, *args], cwd=self.folder, env=shell, capture_output=True, text=True,
                              timeout=timeout)

    def container(self, service: str) -> str:
        return self.plain("ps", "-q", service).stdout.strip()

    @property
    def litellm(self) -> str:
        return f"http://127.0.0.1:{self.chosen['LITELLM_PORT']}"

    @property
    def master_key(self) -> str:
        return (self.gateway.home / "litellm_master_key").read_text().strip()

    def answers(self) -> None:
        """LiteLLM alive, then one Anthropic and one OpenAI request answered by mlxgate through it."""
        wait_for(lambda: _status(self.litellm + "/health/liveliness") == 200, 600, interval=2,
                 what="LiteLLM in its container")
        message = anthropic.Anthropic(base_url=self.litellm, api_key=self.master_key, max_retries=5).messages.create(
            model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
        assert message.content[0].type == "text" and message.usage.output_tokens > 0
        chat = openai.OpenAI(base_url=self.litellm + "/v1", api_key=self.master_key, max_retries=5)\
            .chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=PROMPT)
        assert chat.choices[0].message.content and chat.usage.completion_tokens > 0


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def docked(models_dir, tmp_path_factory):
    """A gateway the containers can reach: on Linux they come from the docker0 bridge, not loopback."""
    running = Gateway(tmp_path_factory.mktemp("docked-home"), models_dir, "--default-model", "tiny-a", https=False,
                      extra_env={} if sys.platform == "darwin" else {"MLXGATE_HOST": "0.0.0.0"})
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stack(docked, tmp_path_factory):
    """`mlxgate docker up --max-tokens 48` run once, over an .env someone made by hand (mode 644)."""
    running = Stack(docked, copy_of_docker(tmp_path_factory.mktemp("stack")))
    running.dotenv.write_text("COMPOSE_PROJECT_NAME='made-by-hand'\n")
    running.dotenv.chmod(0o644)
    running.started = mlxgate("docker", "up", "--max-tokens", "48", env=running.env, timeout=1800)
    yield running
    if ENGINE:
        running.plain("down", "-v")


def test_the_docker_commands_before_up_say_to_run_it_and_name_the_services(docked, tmp_path):
    env = dict(docked.env, MLXGATE_DOCKER_DIR=str(copy_of_docker(tmp_path)))
    for command in (["logs"], ["restart"], ["down"]):
        result = mlxgate("docker", *command, env=env)
        assert result.returncode == 1 and ".env yet" in result.stderr and "`mlxgate docker up`" in result.stderr, \
            result.stderr
    unknown = mlxgate("docker", "restart", "litellm", env=env)
    assert unknown.returncode == 1 and "no service 'litellm'" in unknown.stderr, unknown.stderr
    assert all(name in unknown.stderr for name in SERVICES), unknown.stderr
    elsewhere = mlxgate("docker", "logs", env=dict(docked.env, MLXGATE_DOCKER_DIR=str(tmp_path / "nothing")))
    assert elsewhere.returncode == 1 and "no docker-compose.yml in" in elsewhere.stderr, elsewhere.stderr


def test_up_starts_the_stack_or_says_why_not(stack):
    up = stack.started
    if ENGINE:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://localhost:{stack.chosen['LITELLM_PORT']}/ui" in up.stdout
    else:
        assert up.returncode == 1
        if shutil.which("docker"):
            assert "the Docker engine is not running" in up.stderr, up.stderr
    assert f"wrote {stack.dotenv}" in up.stdout, up.stdout + up.stderr


def test_up_writes_the_env_the_compose_file_needs_with_this_gateways_values(stack):
    home = stack.gateway.home
    assert oct(stack.dotenv.stat().st_mode & 0o777) == "0o600", "the hand-made .env was 644"
    assert oct((home / "litellm_salt_key").stat().st_mode & 0o777) == "0o600"
    assert dotenv(stack.dotenv) == stack.expected
    assert not list(stack.folder.glob(".env.*")), "the temporary file of the atomic write is left"
    prometheus = yaml.safe_load((home / "docker" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"host.docker.internal:{stack.gateway.port}"]


def test_plain_docker_compose_config_in_the_folder_reads_the_env(stack):
    checked = stack.plain("config", timeout=120)
    assert checked.returncode == 0, checked.stderr
    services = yaml.safe_load(checked.stdout)["services"]
    assert set(services) == set(SERVICES)
    litellm, home, expected = services["litellm_proxy"], stack.gateway.home, stack.expected
    gateway = f"http://host.docker.internal:{stack.gateway.port}"
    assert {name: str(value) for name, value in litellm["environment"].items()} == {
        "DATABASE_URL": "postgresql://litellm:litellm@postgres:5432/litellm", "STORE_MODEL_IN_DB": "True",
        "LITELLM_MASTER_KEY": expected["LITELLM_MASTER_KEY"], "LITELLM_SALT_KEY": expected["LITELLM_SALT_KEY"],
        "MLXGATE_API_BASE": gateway, "MLXGATE_OPENAI_BASE": gateway + "/v1",
        "MLXGATE_API_KEY": expected["MLXGATE_API_KEY"], "MAX_TOKENS": "48"}
    assert published(litellm) == {"4000": stack.chosen["LITELLM_PORT"]}
    assert published(services["prometheus"]) == {"9090": stack.chosen["PROMETHEUS_PORT"]}
    assert published(services["grafana"]) == {"3000": stack.chosen["GRAFANA_PORT"]}
    assert bind_mounts(services["prometheus"]) == {
        "/etc/prometheus/prometheus.yml": str(home / "docker" / "prometheus.yml"),
        "/etc/prometheus/mlxgate_key": str(home / "api_key")}

    written = stack.dotenv.read_bytes()
    stack.dotenv.unlink()
    try:
        without = stack.plain("config", timeout=120)
    finally:
        replace_private(stack.dotenv, written)
    assert without.returncode != 0, "docker-compose config passed without the .env"
    assert "run `mlxgate docker up`, which writes docker/.env" in without.stderr, without.stderr


def published(service: dict) -> dict[str, str]:
    """Container port → the port published on this machine (v1 and v2 write both as a mapping)."""
    return {str(port["target"]): str(port["published"]) for port in service["ports"]}


def bind_mounts(service: dict) -> dict[str, str]:
    """Container path → host file of the service's bind mounts (v1 writes SOURCE:TARGET:MODE, v2 a mapping)."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source.startswith("/"):
            mounts[target] = source
    return mounts


@needs_engine
def test_the_stack_answers_anthropic_and_openai_clients_through_mlxgate(stack):
    stack.answers()
    assert all(stack.container(service) for service in SERVICES), stack.plain("ps").stdout


@needs_engine
def test_the_plain_commands_and_mlxgate_docker_restart_reach_the_stack(stack):
    logs = stack.plain("logs", "litellm_proxy")
    assert logs.returncode == 0 and "litellm_proxy" in logs.stdout, logs.stderr
    started = lambda: subprocess.run(  # noqa: E731
        ["docker", "inspect", "-f", "{{.State.StartedAt}}", stack.container("litellm_proxy")],
        capture_output=True, text=True, check=True).stdout.strip()
    for restart in (lambda: stack.plain("restart", "litellm_proxy"),
                    lambda: mlxgate("docker", "restart", "litellm_proxy", env=stack.env, timeout=300)):
        before = started()
        result = restart()
        assert result.returncode == 0, result.stderr
        assert started() != before, "litellm_proxy was not restarted"
        stack.answers()
    assert mlxgate("docker", "restart", env=stack.env, timeout=300).returncode == 0
    stack.answers()
    assert mlxgate("docker", "logs", "prometheus", env=stack.env, timeout=120).returncode == 0


@needs_engine
def test_plain_down_removes_the_containers_and_mlxgate_docker_down_agrees(stack):
    down = stack.plain("down")
    assert down.returncode == 0, down.stderr
    assert not any(stack.container(service) for service in SERVICES)
    assert mlxgate("docker", "down", env=stack.env, timeout=300).returncode == 0


def test_replace_private_leaves_the_old_file_whole_to_a_reader_that_holds_it(tmp_path):
    path = tmp_path / ".env"
    path.write_text("old\n")
    path.chmod(0o644)
    with path.open() as reader:
        replace_private(path, b"new\n")
        assert reader.read() == "old\n"
    assert path.read_text() == "new\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == [".env"]
