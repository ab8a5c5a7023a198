"""What the benchmarks start side by side, on free ports, in a temporary folder:

- `Direct`: a plain `mlx_lm.server` for the model (the path without any gateway);
- `StockLiteLLM`: a stock LiteLLM proxy (default settings) in front of a `Direct` server;
- `Gateway`: mlxgate itself (`mlxgate start`), with its own runtime folder;
- `VllmMlx`: vllm-mlx 0.6.0 (`--continuous-batching`), the strongest MLX engine peer, from a
  virtualenv of the benchmarks' own (`bench/vllm-mlx/setup.sh` makes it once, ~2 GB).

and the small measuring helpers they share. Medians are what the tables quote: these
machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def demo_model(path: Path, *flags: str) -> Path:
    if not (path / "config.json").exists():
        subprocess.run([PYTHON, "-m", "mlxgate.cli", "demo-model", str(path), *flags], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def model_folders(work: Path, name: str, given: Path | None, *demo_flags: str) -> tuple[Path, Path]:
    """(the model directory, the folder of the model measured): `given` copied in, else a demo model
    built with `demo_flags`; beside it the tiny chat model `chat` a gateway starts with."""
    import shutil

    models = work / "models"
    folder = models / name
    if given:
        shutil.copytree(given, folder)
    else:
        demo_model(folder, *demo_flags)
    demo_model(models / "chat")
    return models, folder


def _wait(url: str, what: str, process: subprocess.Popen, timeout: float = 120, **kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode}")
        try:
            response = requests.post(url, timeout=30, **kwargs)
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer within {timeout:g} s")


class Direct:
    """`mlx_lm.server` on its own."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([PYTHON, "-m", "mlx_lm", "server", "--model", str(model), "--port",
                                         str(self.port), *args], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait(self.url + "/v1/chat/completions", "mlx_lm.server", self.process,
              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class VllmMlx:
    """vllm-mlx serving the same model folder, batched; requests must name it `bench`."""

    NAME = "bench"

    def __init__(self, model: Path, work: Path, *args: str):
        venv = os.environ.get("VLLM_MLX_VENV")  # an existing one, else the cache's (made if missing)
        setup = subprocess.run(["bash", str(ROOT / "bench" / "vllm-mlx" / "setup.sh"), *([venv] if venv else [])],
                               capture_output=True, text=True)
        if setup.returncode != 0:
            raise SystemExit(f"vllm-mlx could not be set up:\n{setup.stderr[-2000:]}")
        binary = setup.stdout.strip().splitlines()[-1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home = work / "vllm-home"  # it keeps its prefix cache under ~/.cache
        home.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([binary, "serve", str(model), "--continuous-batching", "--host", "127.0.0.1",
                                         "--port", str(self.port), "--served-model-name", self.NAME, *args],
                                        env=dict(os.environ, HOME=str(home)), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait(self.url + "/v1/chat/completions", "vllm-mlx", self.process, timeout=300,
              json={"model": self.NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class StockLiteLLM:
    """A stock LiteLLM proxy with default settings in front of a `Direct` server (the one
    setting it needs for Anthropic clients of an OpenAI-style backend)."""

    KEY = "sk-bench-stock"

    def __init__(self, work: Path, backend: Direct):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "stock-litellm.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": "*", "litellm_params": {
                "model": "openai/default_model", "api_base": backend.url + "/v1", "api_key": "none"}}],
            "litellm_settings": {"use_chat_completions_url_for_anthropic_messages": True},
            "general_settings": {"master_key": self.KEY}}))
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
        self.process = subprocess.Popen([str(Path(PYTHON).parent / "litellm"), "--config", str(config),
                                         "--port", str(self.port), "--host", "127.0.0.1"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.url + "/v1/chat/completions", "the stock LiteLLM proxy", self.process,
              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
              headers={"Authorization": f"Bearer {self.KEY}"})

    @property
    def key(self) -> str:
        return self.KEY

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class Gateway:
    """mlxgate, started with `mlxgate start` in a runtime folder of its own."""

    def __init__(self, work: Path, model_dirs: list[Path], *flags: str, prepare=None, **env_extra: str):
        """`prepare(env)` runs before the start (e.g. `mlxgate hosts add` into its config)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = work / "home"
        self.env = {**os.environ, "MLXGATE_HOME": str(self.home), "MLXGATE_CONFIG": str(work / "none.yaml"),
                    "MLXGATE_MODEL_DIRS": os.pathsep.join(map(str, model_dirs)),
                    "MLX_WRAPPER_URL": f"http://127.0.0.1:{free_port()}", "MLX_DYNAMIC_PORT": str(free_port()),
                    "MLX_AUTOCOMPLETE_PORT": str(free_port()), "MLXGATE_SSL_DIR": str(work / "ssl"),
                    "MLXGATE_OLLAMA_PORT": str(free_port()),
                    "HF_HUB_OFFLINE": "1", **env_extra}
        self.env.pop("DETAILED_DEBUG", None)
        if prepare is not None:
            prepare(self.env)
        started = time.monotonic()
        result = subprocess.run([PYTHON, "-m", "mlxgate.cli", "start", "--port", str(self.port), *flags],
                                cwd=ROOT, env=self.env, capture_output=True, text=True)
        self.start_seconds = time.monotonic() - started
        if result.returncode != 0:
            raise SystemExit(f"mlxgate start failed:\n{result.stdout}\n{result.stderr}")
        self.key = (self.home / "api_key").read_text().strip()
        self.ollama_url = f"http://127.0.0.1:{self.env['MLXGATE_OLLAMA_PORT']}"

    def program_pids(self) -> dict[str, int]:
        from mlxgate.supervision.programs import Supervisor

        return {name: info["pid"] for name, info in Supervisor(self.home).processes().items() if info["pid"]}

    def servers(self) -> dict:
        return requests.get(self.env["MLX_WRAPPER_URL"] + "/models", timeout=30,
                            headers={"Authorization": f"Bearer {self.key}"}).json()["servers"]

    def stop(self) -> None:
        subprocess.run([PYTHON, "-m", "mlxgate.cli", "stop"], cwd=ROOT, env=self.env, capture_output=True)


def headers(key: str | None) -> dict:
    out = {"content-type": "application/json"}
    if key:
        out.update({"x-api-key": key, "Authorization": f"Bearer {key}"})
    return out


def first_delta(line: bytes) -> bool:
    """Whether a stream line carries content (OpenAI `delta.content`, Anthropic `content_block_delta`,
    Responses `response.output_text.delta`)."""
    if line.startswith(b"data:") and (b'"content_block_delta"' in line or b'"response.output_text.delta"' in line):
        return True
    if line.startswith(b"data:") and b'"delta"' in line and b'"choices"' in line:
        try:
            choices = json.loads(line[5:]).get("choices") or []
        except ValueError:
            return False
        return any((c.get("delta") or {}).get("content") for c in choices)
    return False


def timed(session: requests.Session, url: str, body: dict, key: str | None, stream: bool,
          timings: list | None = None) -> float:
    """Milliseconds to the whole answer, or for a stream to its first content delta (the
    rest is read too, so the connection and the server are ready for the next request).
    `timings` gets the relay's `Server-Timing` of a JSON answer, as {name: ms}."""
    started = time.perf_counter()
    response = session.post(url, json=body, headers=headers(key), stream=stream, timeout=300)
    if response.status_code != 200:
        raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    if not stream:
        response.content
        elapsed = (time.perf_counter() - started) * 1000
        if timings is not None and "server-timing" in response.headers:
            timings.append({name.strip(): float(value.removeprefix("dur=")) for name, value in
                            (part.split(";") for part in response.headers["server-timing"].split(","))} |
                           {"client": elapsed})
        return elapsed
    first = None
    for line in response.iter_lines(chunk_size=None):
        if first is None and first_delta(line):
            first = time.perf_counter()
    if first is None:
        raise SystemExit(f"{url}: the stream had no content delta")
    return (first - started) * 1000


def rss_mb(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.Error:
        return 0.0
