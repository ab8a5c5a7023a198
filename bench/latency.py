"""Added latency of the gateway over calling mlx_lm.server directly, same model, same run.

Starts a direct `mlx_lm.server` and a full gateway (`mlxgate start`) on free ports with the same
model (a tiny generated one unless --model is given), then sends N sequential one-token requests
of each kind, alternating direct and gateway requests so machine noise hits both alike. Prints
median and p95 per request and the ratio. The Anthropic rows compare against the direct OpenAI
chat call: the same generation, without the translation.

    .venv/bin/python bench/latency.py --requests 50
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Say hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(session: requests.Session, url: str, body: dict, headers: dict, stream: bool) -> float:
    started = time.perf_counter()
    response = session.post(url, json=body, headers=headers, stream=stream, timeout=120)
    if stream:
        for _ in response.iter_content(chunk_size=None):
            pass
    else:
        response.content
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    return elapsed * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="requests per case and path")
    parser.add_argument("--model", help="model folder (default: a tiny generated model)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-"))
    python = sys.executable
    model = Path(args.model) if args.model else work / "models" / "bench-model"
    if not args.model:
        subprocess.run([python, "-m", "mlxgate.cli", "demo-model", str(model)], cwd=ROOT, check=True,
                       capture_output=True)
    direct_port, port = free_port(), free_port()
    env = dict(os.environ, MLXGATE_HOME=str(work / "home"), MLXGATE_CONFIG=str(work / "none.yaml"),
               MLXGATE_MODEL_DIRS=str(model.parent), MLX_WRAPPER_URL=f"http://127.0.0.1:{free_port()}",
               MLX_DYNAMIC_PORT=str(free_port()), MLX_AUTOCOMPLETE_PORT=str(free_port()),
               MLXGATE_SSL_DIR=str(work / "ssl"), HF_HUB_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.pop("DETAILED_DEBUG", None)
    direct = subprocess.Popen([python, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(direct_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("starting the gateway...", file=sys.stderr, flush=True)
    started = subprocess.run([python, "-m", "mlxgate.cli", "start", "--port", str(port), "--default-model",
                              str(model)], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        if started.returncode != 0:
            raise SystemExit(f"mlxgate start failed:\n{started.stdout}\n{started.stderr}")
        key = (work / "home" / "api_key").read_text().strip()
        gw = f"http://127.0.0.1:{port}"
        dr = f"http://127.0.0.1:{direct_port}"
        chat = {"messages": PROMPT, "max_tokens": 1}
        cases = [
            ("openai chat", f"{dr}/v1/chat/completions", chat,
             f"{gw}/v1/chat/completions", {"model": "gpt-4o", **chat}, False),
            ("openai chat stream", f"{dr}/v1/chat/completions", {**chat, "stream": True},
             f"{gw}/v1/chat/completions", {"model": "gpt-4o", **chat, "stream": True}, True),
            ("anthropic messages", f"{dr}/v1/chat/completions", chat,
             f"{gw}/v1/messages", {"model": "claude-opus-4-8", **chat}, False),
            ("anthropic messages stream", f"{dr}/v1/chat/completions", {**chat, "stream": True},
             f"{gw}/v1/messages", {"model": "claude-opus-4-8", **chat, "stream": True}, True),
        ]
        headers = {"x-api-key": key, "Authorization": f"Bearer {key}", "content-type": "application/json"}
        session = requests.Session()
        for _ in range(3):  # warm both paths: model loaded, prompt cache, connections
            for _, d_url, d_body, g_url, g_body, stream in cases:
                timed(session, d_url, d_body, {}, stream)
                timed(session, g_url, g_body, headers, stream)
        rows = []
        for name, d_url, d_body, g_url, g_body, stream in cases:
            direct_ms, gateway_ms = [], []
            for _ in range(args.requests):
                direct_ms.append(timed(session, d_url, d_body, {}, stream))
                gateway_ms.append(timed(session, g_url, g_body, headers, stream))
            d50, g50 = statistics.median(direct_ms), statistics.median(gateway_ms)
            rows.append((name, d50, percentile(direct_ms, 0.95), g50, percentile(gateway_ms, 0.95),
                         g50 - d50, g50 / d50))
        print(f"\n{args.requests} sequential requests per path, max_tokens 1, model {model.name}\n")
        print(f"| case | direct p50 ms | direct p95 ms | gateway p50 ms | gateway p95 ms | added p50 ms | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, d50, d95, g50, g95, added, ratio in rows:
            print(f"| {name} | {d50:.1f} | {d95:.1f} | {g50:.1f} | {g95:.1f} | {added:+.1f} | {ratio:.2f}x |")
    finally:
        subprocess.run([python, "-m", "mlxgate.cli", "stop"], cwd=ROOT, env=env, capture_output=True)
        direct.terminate()
        direct.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
