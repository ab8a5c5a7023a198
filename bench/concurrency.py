"""Throughput with concurrent clients: N clients each asking for a long answer at once, through
mlxgate (both APIs), straight to mlx_lm.server, and to vllm-mlx (`--continuous-batching`, the
strongest MLX engine peer), same model, same run. mlx_lm.server batches concurrent requests;
the gateway must let it (several requests in flight per model server). The sustained table
also gives the gateway's own CPU (proxy and wrapper, not the model server) per generated token.

Two ways, each path in turn, same run:
- **all at once**: generated tokens per second over the wall time of each round (all
  clients released by one barrier; the round ends when the last answer is complete),
  median of the rounds. Straight to `mlx_lm.server` the requests arrive within
  microseconds of each other and start as one batch; through any gateway they arrive
  a few milliseconds apart (each is read, checked and counted first), so the first ones
  start before the others join.
- **sustained**: each client asks again as soon as it has its answer, for `--seconds`;
  generated tokens per second over that time. Arrivals spread out as they do in use.

    .venv/bin/python bench/concurrency.py --clients 1 8 --tokens 256 --rounds 5
    VLLM_MLX_VENV=/path/to/venv ...   # a vllm-mlx venv you have; else bench/vllm-mlx/setup.sh makes one
    ... --no-vllm-mlx                 # without that column
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from stack import Direct, Gateway, VllmMlx, demo_model, headers, median

PROMPT = [{"role": "user", "content": "Write a long story about the sea"}]


def one_round(url: str, body: dict, key: str | None, clients: int, usage_key: str) -> float:
    """Tokens per second for `clients` concurrent non-streamed requests."""
    counts: list[int] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        session = requests.Session()
        barrier.wait()
        response = session.post(url, json=body, headers=headers(key), timeout=600)
        if response.status_code != 200:
            errors.append(response.text[:200])
            return
        counts.append(response.json()["usage"][usage_key])
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{url}: {errors[0]}")
    return sum(counts) / elapsed


def sustained(url: str, body: dict, key: str | None, clients: int, usage_key: str, seconds: float) -> float:
    """Tokens per second while `clients` clients each ask again as soon as they are answered."""
    counts: list[int] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            response = session.post(url, json=body, headers=headers(key), timeout=600)
            if response.status_code != 200:
                errors.append(response.text[:200])
                return
            counts.append(response.json()["usage"][usage_key])
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{url}: {errors[0]}")
    return sum(counts) / (time.perf_counter() - started)


def table(title: str, rows: list[tuple[int, dict]], cpu: dict | None = None) -> None:
    """One row per client count: each path's tokens/s and its ratio to direct `mlx_lm.server`."""
    names = [name for name in rows[0][1] if name != "direct"]
    print(f"\n{title}\n")
    print("| clients | direct tok/s | " + " | ".join(f"{n} tok/s | ratio" for n in names) + " |"
          + (" mlxgate CPU µs/token |" if cpu else ""))
    print("|---:|---:|" + "---:|---:|" * len(names) + ("---:|" if cpu else ""))
    for clients, rate in rows:
        d = rate["direct"]
        cells = " | ".join(f"{rate[n]:.0f} | {rate[n] / d:.2f}x" for n in names)
        print(f"| {clients} | {d:.0f} | {cells} |" + (f" {cpu[clients]:.0f} |" if cpu else ""))


def gateway_cpu(gateway: Gateway) -> float:
    """CPU seconds the gateway's own programs (proxy, wrapper; no model server) have used."""
    import psutil

    total = 0.0
    for name, pid in gateway.program_pids().items():
        if name in ("proxy", "wrapper"):
            try:
                family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                continue
            for member in family:
                try:
                    if "mlx_lm_entry" not in " ".join(member.cmdline()):
                        times = member.cpu_times()
                        total += times.user + times.system
                except psutil.Error:
                    pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients per round")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each answer generates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15, help="length of each sustained run (0: none)")
    parser.add_argument("--no-vllm-mlx", action="store_true", help="leave out the vllm-mlx column")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlxgate-concurrency-"))
    model = demo_model(work / "models" / "bench-model", "--context", "32768")
    print("starting mlx_lm.server and mlxgate...", file=sys.stderr, flush=True)
    direct = Direct(model)
    gateway = Gateway(work, [model.parent], "--default-model", model.name, "--max-tokens", str(args.tokens))
    peer = None if args.no_vllm_mlx else VllmMlx(model, work, "--max-tokens", str(args.tokens))
    chat = {"messages": PROMPT, "max_tokens": args.tokens, "temperature": 0}
    paths = {
        "direct": (direct.url + "/v1/chat/completions", chat, None, "completion_tokens"),
        "mlxgate openai": (gateway.url + "/v1/chat/completions", {"model": "gpt-4o", **chat}, gateway.key,
                           "completion_tokens"),
        "mlxgate anthropic": (gateway.url + "/v1/messages", {"model": "claude-opus-4-8", **chat}, gateway.key,
                              "output_tokens"),
    }
    if peer is not None:
        paths["vllm-mlx"] = (peer.url + "/v1/chat/completions", {"model": peer.NAME, **chat}, None,
                             "completion_tokens")
    try:
        for url, body, key, usage in paths.values():  # warm up
            one_round(url, body, key, 2, usage)
        rows, steady, cpu = [], [], {}
        for clients in args.clients:
            rates = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (url, body, key, usage) in paths.items():
                    rates[name].append(one_round(url, body, key, clients, usage))
            rows.append((clients, {name: median(r) for name, r in rates.items()}))
            if args.seconds > 0 and clients > 1:
                rates, spent = {}, 0.0
                for name, (url, body, key, usage) in paths.items():
                    before = gateway_cpu(gateway)
                    rates[name] = sustained(url, body, key, clients, usage, args.seconds)
                    if name.startswith("mlxgate"):
                        spent += (gateway_cpu(gateway) - before) / (rates[name] * args.seconds) * 1e6 / 2
                steady.append((clients, rates))
                cpu[clients] = spent
        parallel = next(iter(gateway.servers().values()))["queue"]["max_parallel"]
        table(f"{args.tokens}-token answers, all clients at once, tokens/s over the round's wall time, median of "
              f"{args.rounds} rounds (max_parallel {parallel})", rows)
        if steady:
            table(f"{args.tokens}-token answers, sustained: each client asks again when answered, tokens/s over "
                  f"{args.seconds:g} s; mlxgate CPU: its proxy and wrapper per generated token (both APIs' mean)",
                  steady, cpu)
    finally:
        gateway.stop()
        direct.stop()
        if peer is not None:
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
