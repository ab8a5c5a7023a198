"""Helpers the tests share: free ports, model folders, running `mlxgate` programs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import openai
import psutil
import requests

from mlxgate.supervision.programs import process_alive as pid_alive

ROOT = Path(__file__).resolve().parent.parent
MLXGATE = [sys.executable, "-m", "mlxgate.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int, start: int = 35000, stop: int = 45000) -> int:
    """The first of `count` consecutive ports that are free now (on any address)."""
    for first in range(start, stop, count):
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports in {start}-{stop}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def mlxgate(*args: str, env: dict, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `mlxgate` CLI as a user would and capture what it prints."""
    result = subprocess.run([*MLXGATE, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"mlxgate {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def make_broken_models(models: Path, good: Path) -> None:
    """Two broken model folders: garbage weights, and weights whose shapes do not fit."""
    garbage = models / "broken-garbage"
    garbage.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (garbage / name).write_bytes((good / name).read_bytes())
    (garbage / "model.safetensors").write_bytes(b"this is not a safetensors file at all")

    shapes = models / "broken-shapes"
    shapes.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (shapes / name).write_bytes((good / name).read_bytes())
    config = json.loads((good / "config.json").read_text())
    config["hidden_size"] = config["hidden_size"] * 2  # the weights no longer fit
    (shapes / "config.json").write_text(json.dumps(config))
    (shapes / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())


def isolated_env(home: Path, models: Path, wrapper_port: int, dynamic_port: int, autocomplete_port: int,
                 **extra: str) -> dict:
    """An environment that keeps a test's gateway apart: own runtime folder, models and ports (Ollama's
    API on a free port too, never Ollama's own 11434)."""
    return dict(
        os.environ,
        MLXGATE_OLLAMA_PORT=str(free_port()),
        MLXGATE_HOME=str(home),
        MLXGATE_CONFIG=str(home / "gateway.yaml"),
        MLXGATE_MODEL_DIRS=str(models),
        HF_HUB_CACHE=str(home / "hf-cache"),
        MLX_WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}",
        MLX_DYNAMIC_PORT=str(dynamic_port),
        MLX_AUTOCOMPLETE_PORT=str(autocomplete_port),
    ) | extra


class Wrapper:
    """A real `mlxgate wrapper` (gunicorn + Flask) on free ports, with its own runtime folder."""

    def __init__(self, home: Path, models: Path, api_key: str = "test-key", extra_env: dict | None = None,
                 args: tuple[str, ...] = ()):
        self.home = home
        self.api_key = api_key
        self.port, self.dynamic_port, self.autocomplete_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = isolated_env(home, models, self.port, self.dynamic_port, self.autocomplete_port,
                                MLXGATE_API_KEY=api_key, **(extra_env or {}))
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "wrapper.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([*MLXGATE, "wrapper", *args], env=self.env, cwd=ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, 30, what=f"the wrapper on {self.url}")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the wrapper exited:\n{self.log_path.read_text()}")
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    def call(self, method: str, path: str, key: str | None = "default", **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        key = self.api_key if key == "default" else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def load(self, model: str) -> requests.Response:
        return self.call("POST", "/models/load", json={"model": model})

    def unload(self, model: str) -> requests.Response:
        return self.call("POST", "/models/unload", json={"model": model})

    def servers(self) -> dict:
        """The resident set's servers by model name."""
        return self.call("GET", "/models").json()["servers"]

    def server(self, model: str) -> dict:
        return self.servers().get(model) or {"state": "stopped", "pid": None, "loads": 0, "queue": {}}

    def loaded(self) -> list[str]:
        return sorted(name for name, s in self.servers().items() if s["state"] == "ready")

    def model_pids(self) -> list[int]:
        return [s["pid"] for s in self.servers().values() if s["pid"]]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def ledger_rows(gateway, since: float, model: str, at_least: int = 1) -> list[dict]:
    """The gateway's own records of `model`'s requests since `since` (its usage ledger), once the
    ledger holds every request that model's server has answered (the wrapper writes in batches)
    and at least `at_least` of them are since `since` (the server's count starts again at zero
    after `mlxgate restart`, while the ledger keeps the earlier rows)."""
    import sqlite3

    def read(where: str, *args) -> list[dict]:
        with sqlite3.connect(gateway.home / "usage.sqlite") as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(f"SELECT * FROM requests WHERE served_model LIKE ? {where} ORDER BY at",
                                                (f"%{model}", *args))]
    served = gateway.served(model)
    wait_for(lambda: len(read("")) >= served and len(read("AND at >= ?", since)) >= at_least, 10,
             what=f"the ledger to hold {served} requests of {model}, {at_least} since {since}")
    return read("AND at >= ?", since)


def chat(port: int, text: str = "hello", max_tokens: int = 8, **extra) -> dict:
    """A chat completion straight to a model server."""
    response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra})
    response.raise_for_status()
    return response.json()


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


class Gateway:
    """A real daemon started with `mlxgate start`: supervisord, the proxies, the wrapper."""

    def __init__(self, home: Path, models: Path, *flags: str, https: bool = True,
                 extra_env: dict | None = None, max_tokens: int = 64):
        self.home = home
        self.port, self.https_port = free_port(), free_port()
        self.wrapper_port, self.dynamic_port, self.autocomplete_port = free_port(), free_port(), free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.env = isolated_env(home, models, self.wrapper_port, self.dynamic_port, self.autocomplete_port,
                                MLXGATE_SSL_DIR=str(home / "ssl"), MLXGATE_PLUGIN_DIRS=str(home / "plugins"),
                                **(extra_env or {}))
        (home / "plugins").mkdir(exist_ok=True)
        self.ollama_port = int(self.env["MLXGATE_OLLAMA_PORT"])  # Ollama's API (`ollama_port`)
        self.flags = ["--port", str(self.port), "--max-tokens", str(max_tokens), *flags]
        if https:
            self.flags += ["--enable-https", "--https-port", str(self.https_port)]
        self.https = https
        self.start_output = None

    def start(self, check: bool = True) -> subprocess.CompletedProcess:
        result = mlxgate("start", *self.flags, env=self.env, timeout=300)
        self.start_output = result
        if check and result.returncode != 0:
            raise AssertionError(f"mlxgate start failed:\n{result.stdout}\n{result.stderr}")
        return result

    def stop(self) -> None:
        mlxgate("stop", env=self.env, timeout=120)

    @property
    def api_key(self) -> str:
        return (self.home / "api_key").read_text().strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def ollama_url(self) -> str:
        return f"http://127.0.0.1:{self.ollama_port}"

    @property
    def ca(self) -> Path:
        return self.home / "ssl" / "ca.pem"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of each of the daemon's logs, for a failure's message."""
        shown = []
        for path in sorted((self.home / "logs").glob("*.log")):
            shown.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(shown)

    def supervisord_pid(self) -> int | None:
        try:
            return int((self.home / "supervisord.pid").read_text())
        except (OSError, ValueError):
            return None

    def our_pids(self) -> list[int]:
        """Every live process whose command line names this daemon's runtime folder or ports."""
        pids = []
        root = self.supervisord_pid()
        for proc in psutil.process_iter(["environ"]):  # environ is None where we may not read it
            if (proc.info["environ"] or {}).get("MLXGATE_HOME") == str(self.home) and pid_alive(proc.pid):
                pids.append(proc.pid)
        if root and pid_alive(root) and root not in pids:
            pids.append(root)
        return pids

    def servers(self) -> dict:
        """The resident set's servers by model name."""
        return self.wrapper_call("GET", "/models").json()["servers"]

    def server(self, model: str) -> dict:
        """One model's server (a stopped one's shape when it was never asked for)."""
        return self.servers().get(model) or {"state": "stopped", "pid": None, "loads": 0, "queue": {"served": 0}}

    def loaded(self) -> list[str]:
        return sorted(name for name, s in self.servers().items() if s["state"] == "ready")

    def served(self, model: str) -> int:
        """Requests `model`'s server has answered so far."""
        return self.server(model)["queue"].get("served", 0)

    def wrapper_call(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"http://127.0.0.1:{self.wrapper_port}{path}", timeout=120,
                                headers={"Authorization": f"Bearer {self.api_key}"}, **kwargs)

    def program_pids(self) -> dict[str, int]:
        from mlxgate.supervision.programs import Supervisor

        return {name: info["pid"] for name, info in Supervisor(self.home).processes().items()
                if info["pid"]}


def sse_events(url: str, body: dict, headers: dict) -> list[tuple[str, dict]]:
    """(event, data) pairs of a streamed answer exactly as they came over the wire; each data's
    `type` must name its event."""
    import httpx

    events = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60, headers=headers) as response:
        assert response.status_code == 200, response.read()
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                events.append((name, data))
    return events


def claude(gateway, https: bool = False, **options) -> anthropic.Anthropic:
    """The official Anthropic SDK pointed at a gateway (HTTPS trusts only the local authority)."""
    if https:
        context = ssl.create_default_context(cafile=str(gateway.ca))  # verifies, no verify=False
        options["http_client"] = anthropic.DefaultHttpxClient(verify=context)
    return anthropic.Anthropic(base_url=gateway.https_url if https else gateway.url, api_key=gateway.api_key,
                               max_retries=0, **options)


def gpt(gateway, **options) -> openai.OpenAI:
    """The official OpenAI SDK pointed at a gateway."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0, **options)


VENVS = Path(os.environ.get("MLXGATE_TEST_VENVS", Path.home() / ".cache" / "mlxgate-test-venvs"))


def pypi_venv(packages: list[str], base: str | None = None) -> Path:
    """The Python of a venv of its own holding `packages` from PyPI (made once, kept for later runs),
    made from the Python `base` (default: this one)."""
    import hashlib

    folder = VENVS / hashlib.sha256(" ".join([*sorted(packages), base or ""]).encode()).hexdigest()[:16]
    python = folder / "bin" / "python"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([base or sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                       check=True, capture_output=True, timeout=1200)
        (folder / ".complete").write_text(" ".join(packages))
    return python


def ensure_tool(command: str, package: str) -> str | None:
    """The path of `command`, installing its Debian package first when it is missing and we
    are root; None when it cannot be had (the test then says so and skips)."""
    import shutil

    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin:/usr/bin")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, capture_output=True, timeout=600)
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin:/usr/bin")


def npm_agent(command: str, package: str, version: str, folder: Path) -> str:
    """A coding agent from npm: `command` on PATH when it is `version` (CI installs it), else
    installed into `folder` here; the test skips, saying why, when npm cannot get it."""
    import shutil

    import pytest

    found = shutil.which(command)
    if found:
        try:
            shown = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            shown = ""
        if re.search(rf"(?<![\w.]){re.escape(version)}(?![\w.])", shown):
            return found
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"{package} is not installed and npm is not here to install it "
                    f"(npm install -g {package}@{version})")
    result = subprocess.run([npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund",
                             f"{package}@{version}"], capture_output=True, text=True, timeout=600)
    binary = folder / "node_modules" / ".bin" / command
    if result.returncode != 0 or not binary.exists():
        pytest.skip(f"npm could not install {package}@{version}: {result.stderr[-500:]}")
    return str(binary)


def exported(printed: str) -> dict[str, str]:
    """The variables `export NAME=VALUE` lines set (what `mlxgate env` prints)."""
    return dict(line[len("export "):].split("=", 1) for line in printed.splitlines() if line.startswith("export "))


class Sandbox:
    """A network namespace of its own (`ip netns add`) whose processes see a copy of /etc
    and an empty /usr/local/share/ca-certificates: install, forwarding rules, hosts lines,
    trust-store entries and boot units are real there, and gone with it. Root on Linux."""

    def __init__(self, tmp: Path):
        import shutil
        import uuid

        self.name = f"mlxgate-{uuid.uuid4().hex[:8]}"
        self.etc = tmp / "etc"
        shutil.copytree("/etc", self.etc, symlinks=True)
        self.anchors = tmp / "ca-anchors"
        shutil.copytree("/usr/local/share/ca-certificates", self.anchors, symlinks=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"], env=dict(os.environ), check=True)
        if shutil.which("update-ca-certificates"):  # the store as the system's tool leaves it, to compare with
            self.run(["update-ca-certificates"], env=dict(os.environ), check=True)
        self.etc_before = tmp / "etc-before"
        shutil.copytree(self.etc, self.etc_before, symlinks=True)

    def run(self, argv: list[str], env: dict, check: bool = False, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        script = (f'mount --bind {self.etc} /etc && mount --bind {self.anchors} '
                  f'/usr/local/share/ca-certificates && exec "$@"')
        result = subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c", script, "sh", *argv], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def nft_ruleset(self) -> str:
        return self.run(["nft", "list", "ruleset"], env=dict(os.environ), check=True).stdout

    def changed_in_etc(self) -> list[str]:
        """Files of /etc that differ from before (content, or present on one side only). Java's
        keystore is left out: update-ca-certificates writes it anew, with new dates, every time."""
        result = subprocess.run(["diff", "-rq", "--no-dereference", "--exclude=cacerts", str(self.etc_before),
                                 str(self.etc)], capture_output=True, text=True)
        return result.stdout.splitlines()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def tree(path: Path) -> list[str]:
    """Every file and folder under `path`, relative to it."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
