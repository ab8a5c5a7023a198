"""Time to first token for an agent's long prefix (~20,000 tokens: a system prompt and tools) in
every case that used to cost the whole prefill again, through mlxgate and vllm-mlx, same model,
same run:

- (a) the first request ever;
- (b) a warm follow-up (the same prefix, a new question);
- (c) a new session after a restart (`mlxgate restart`; vllm-mlx stopped and started, with
  `--ssd-cache-dir`);
- (d) after a request for another model and back, with a memory budget that holds one model
  (mlxgate only);
- (e) after an idle unload (`keep_alive`, mlxgate only).

Also the disk bytes per 1,000 cached tokens, and what writing costs on the request's way (the
model server's own counter of the time its generation thread spent for the disk tier).

    .venv/bin/python bench/coldstart.py --tokens 20000
    VLLM_MLX_VENV=/path/to/venv ...   # a vllm-mlx venv you have; else bench/vllm-mlx/setup.sh makes one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import PYTHON, ROOT, Gateway, VllmMlx, demo_model, headers  # noqa: E402

TOOLS = 20


def agent_prefix(tokens: int, model: Path) -> tuple[str, list[dict]]:
    """A system prompt and `TOOLS` tool definitions of about `tokens` tokens for `model`'s tokenizer."""
    from mlxgate.wrapper.tokens import count_chat

    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool {i}: " + "reads and edits files carefully. " * 20,
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "a path"},
                                                        "text": {"type": "string"}}, "required": ["path"]}}}
        for i in range(TOOLS)]

    def made(rules: int) -> tuple[str, int]:
        system = "You are a coding agent. " + " ".join(f"Rule {i}: read the file before you edit it."
                                                       for i in range(rules))
        return system, count_chat(model, {"messages": [{"role": "system", "content": system},
                                                       {"role": "user", "content": "Question one."}],
                                          "tools": tools})
    low, high = 1, 4000
    while low < high:  # the fewest rules that reach `tokens`
        middle = (low + high) // 2
        low, high = (middle + 1, high) if made(middle)[1] < tokens else (low, middle)
    return made(low)[0], tools


def first_token_ms(url: str, key: str | None, model: str, system: str, tools: list, question: str) -> tuple[float, dict]:
    """(milliseconds to the first streamed token, the usage) of one request with the prefix."""
    body = {"model": model, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "tools": tools,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    started = time.perf_counter()
    first, usage = None, {}
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers(key), stream=True,
                       timeout=1800) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            deltas = [c.get("delta") or {} for c in chunk.get("choices") or ()]
            if first is None and any(d.get("content") or d.get("tool_calls") or d.get("reasoning") for d in deltas):
                first = time.perf_counter()  # the first generated token (not a role-only chunk)
            usage = chunk.get("usage") or usage
    return ((first or time.perf_counter()) - started) * 1000, usage


def cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def load(gateway: Gateway, model: str) -> float:
    """`mlxgate load MODEL`: milliseconds until it answers."""
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "mlxgate.cli", "load", model], cwd=ROOT, env=gateway.env, check=True,
                   capture_output=True)
    return (time.perf_counter() - started) * 1000


def mlxgate_cases(work: Path, models: Path, system: str, tools: list) -> tuple[dict, dict, dict]:
    """(a)-(e) through mlxgate, the loads (d) and (e) needed first, and the disk tier's figures."""
    rows, loads = {}, {}
    gateway = Gateway(work / "gw", [models], "--default-model", "bench-a", "--max-tokens", "16")
    try:
        url, key = gateway.url, gateway.key
        rows["a"] = first_token_ms(url, key, "bench-a", system, tools, "Question one.")
        rows["b"] = first_token_ms(url, key, "bench-a", system, tools, "Question two.")
        started = time.perf_counter()
        subprocess.run([PYTHON, "-m", "mlxgate.cli", "restart"], cwd=ROOT, env=gateway.env, check=True,
                       capture_output=True)  # returns once the default model answers again
        loads["c"] = (time.perf_counter() - started) * 1000
        rows["c"] = first_token_ms(url, key, "bench-a", system, tools, "A new session.")
        budget = 1.5 * gateway.servers()["bench-a"]["cost_bytes"]  # one model, not two
    finally:
        gateway.stop()
    config = work / "gw2.yaml"
    config.write_text(f"memory_budget: {int(budget)}\nmodels: {{bench-b: {{keep_alive: 5}}}}\n")
    gateway = Gateway(work / "gw2", [models], "--max-tokens", "16", MLXGATE_CONFIG=str(config))
    try:
        url, key = gateway.url, gateway.key
        first_token_ms(url, key, "bench-a", system, tools, "Load it.")
        first_token_ms(url, key, "bench-b", "Another model.", [], "Switch.")  # bench-a makes room for it
        assert gateway.servers()["bench-a"]["state"] == "stopped", "the budget holds one model"
        loads["d"] = load(gateway, "bench-a")  # bench-b makes room for it in turn
        rows["d"] = first_token_ms(url, key, "bench-a", system, tools, "Back again.")
        first_token_ms(url, key, "bench-b", system, tools, "The idle one.")
        deadline = time.monotonic() + 60
        while gateway.servers()["bench-b"]["state"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.5)
        loads["e"] = load(gateway, "bench-b")
        rows["e"] = first_token_ms(url, key, "bench-b", system, tools, "After its idle unload.")
        time.sleep(6)  # the watchdog's next look brings the model servers' counters
        shown = json.loads(subprocess.run([PYTHON, "-m", "mlxgate.cli", "cache", "--json"], cwd=ROOT,
                                          env=gateway.env, capture_output=True, text=True, check=True).stdout)
        snapshots, on_path = 0, 0.0
        for server in requests.get(gateway.env["MLX_WRAPPER_URL"] + "/models", headers=headers(key),
                                   timeout=30).json()["servers"].values():
            report = server.get("prompt_cache") or {}  # the model server's own counters (its last look)
            snapshots += report.get("prompt_disk_snapshots", 0)
            on_path += report.get("prompt_disk_on_path_write_s", 0.0)
        disk = {"models": shown["models"], "snapshots": snapshots, "on_path_ms": on_path * 1000 / max(1, snapshots)}
    finally:
        gateway.stop()
    return rows, loads, disk


def vllm_cases(work: Path, model: Path, system: str, tools: list) -> dict:
    rows = {}
    ssd = work / "vllm-ssd"
    peer = VllmMlx(model, work, "--ssd-cache-dir", str(ssd))
    try:
        rows["a"] = first_token_ms(peer.url, None, peer.NAME, system, tools, "Question one.")
        rows["b"] = first_token_ms(peer.url, None, peer.NAME, system, tools, "Question two.")
    finally:
        peer.stop()
    peer = VllmMlx(model, work, "--ssd-cache-dir", str(ssd))
    try:
        rows["c"] = first_token_ms(peer.url, None, peer.NAME, system, tools, "A new session.")
    finally:
        peer.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000, help="size of the agent prefix")
    parser.add_argument("--no-vllm-mlx", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxgate-coldstart-") as tmp:
        work = Path(tmp)
        models = work / "models"
        demo_model(models / "bench-a", "--context", "65536")
        demo_model(models / "bench-b", "--seed", "1", "--context", "65536")
        system, tools = agent_prefix(args.tokens, models / "bench-a")
        print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
        ours, loads, disk = mlxgate_cases(work, models, system, tools)
        peer = {} if args.no_vllm_mlx else vllm_cases(work, models / "bench-a", system, tools)
        print(f"load after: {os.getloadavg()[0]:.2f}\n", flush=True)
    prompt = ours["a"][1].get("prompt_tokens", 0)
    names = {"a": "(a) first request ever", "b": "(b) warm follow-up", "c": "(c) new session after a restart",
             "d": "(d) after another model and back (budget: one model)", "e": "(e) after an idle unload"}
    print(f"Time to first token, an agent prefix of {prompt:,} tokens ({TOOLS} tools), the tiny model; the "
          f"model's load (when the case needs one) apart\n")
    print("| case | mlxgate ms | cached tokens | ratio to (b) | its load first, ms | vllm-mlx ms | ratio to its (b) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, name in names.items():
        ms, usage = ours[case]
        them = peer.get(case)
        theirs = f"{them[0]:.0f} | {them[0] / peer['b'][0]:.1f}x" if them else "- | -"
        loaded = f"{loads[case]:.0f}" if case in loads else "-"
        print(f"| {name} | {ms:.0f} | {cached(usage):,} | {ms / ours['b'][0]:.1f}x | {loaded} | {theirs} |")
    print("\n(c) is timed once `mlxgate restart` returned (the default model loaded again, its load column is the "
          "whole restart); (d) and (e) once `mlxgate load` returned; vllm-mlx (c) once it answers after its "
          "restart. vllm-mlx reports no cached tokens.")
    stored = [(e["tokens"], e["bytes"]) for m in disk["models"] for e in m["entries"]]
    longest = max(stored) if stored else (0, 0)
    print(f"\ndisk: {longest[1] / max(1, longest[0]) * 1000 / 1024:.0f} KiB per 1,000 cached tokens "
          f"(the longest stored prefix: {longest[0]:,} tokens, {longest[1] / 2 ** 20:.1f} MiB); "
          f"{sum(m['bytes'] for m in disk['models']) / 2 ** 20:.1f} MiB for all")
    print(f"writes on the request's way: {disk['on_path_ms']:.1f} ms per snapshot taken by the generation thread "
          f"({disk['snapshots']} snapshots); the writing itself is on a thread of its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
