"""Soak: a bounded mixed load against a running daemon for N minutes, then a table.

Concurrent clients send, in random order: Anthropic streams, OpenAI chat requests,
streams abandoned after a few events, non-streamed requests abandoned by a short client
timeout, requests for another model (switches), count_tokens calls, and malformed
requests. Prints requests and outcomes per kind, p50/p99 latency of the answered ones,
the same short request through the idle gateway at the start and the end, and the RSS of
every process of the group at the start and the end (the group without its model servers,
whose size is the model's, as a total).

    mlxgate start ...                                     # a running daemon
    .venv/bin/python bench/soak.py --minutes 10 --switch-model tiny-c

Without a running daemon, `--start` builds two tiny models and starts one for the run
(with the HTTPS listener, so the whole group is measured).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from mlxgate.config import load_config
from mlxgate.supervision.programs import Supervisor

ROOT = Path(__file__).resolve().parent.parent

PROMPT = [{"role": "user", "content": "Tell me about the sea"}]
MALFORMED = [
    b'{"model": "claude-x", ', b"\xff\xfe", b"[1, 2]", b'{"model": "../../etc/passwd", "max_tokens": 5, "messages": []}',
    json.dumps({"model": "claude-x", "max_tokens": -3, "messages": PROMPT}).encode(),
    json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
    b"[" * 50000 + b"]" * 50000,
]
WEIGHTS = {"stream": 25, "chat": 25, "abandon_stream": 12, "abandon_wait": 5, "switch": 8, "count_tokens": 5,
           "malformed": 20}


class Soak:
    def __init__(self, url: str, key: str, main_model: str, switch_model: str | None):
        self.url, self.key = url, key
        self.main_model, self.switch_model = main_model, switch_model
        self.results: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def record(self, kind: str, outcome: str, started: float) -> None:
        with self.lock:
            self.results.append((kind, outcome, (time.perf_counter() - started) * 1000))

    def headers(self, openai: bool = False) -> dict:
        return ({"Authorization": f"Bearer {self.key}"} if openai else {"x-api-key": self.key}) | \
            {"content-type": "application/json"}

    def one(self, session: requests.Session, kind: str) -> None:
        started = time.perf_counter()
        try:
            outcome = getattr(self, kind)(session)
        except requests.Timeout:
            outcome = "client_timeout" if kind == "abandon_wait" else "timeout"
        except requests.RequestException as exc:
            outcome = f"exception:{type(exc).__name__}"
        self.record(kind, outcome, started)

    @staticmethod
    def _status(response: requests.Response) -> str:
        if response.status_code == 200:
            return "ok"
        if response.status_code in (529, 503):
            return "overloaded"
        return f"http_{response.status_code}"

    def stream(self, session) -> str:
        body = {"model": "claude-opus-4-8", "max_tokens": 32, "stream": True, "messages": PROMPT}
        with session.post(self.url + "/v1/messages", json=body, headers=self.headers(), stream=True,
                          timeout=300) as response:
            if response.status_code != 200:
                return self._status(response)
            text = b"".join(response.iter_content(chunk_size=None))
        return "error_event" if b"event: error" in text else ("ok" if b"message_stop" in text else "truncated")

    def chat(self, session) -> str:
        body = {"model": "gpt-4o", "max_tokens": 16, "messages": PROMPT}
        return self._status(session.post(self.url + "/v1/chat/completions", json=body,
                                         headers=self.headers(True), timeout=300))

    def abandon_stream(self, session) -> str:
        body = {"model": "claude-opus-4-8", "max_tokens": 4000, "stream": True, "messages": PROMPT}
        response = session.post(self.url + "/v1/messages", json=body, headers=self.headers(), stream=True,
                                timeout=300)
        if response.status_code != 200:
            return self._status(response)
        for i, _ in enumerate(response.iter_lines()):
            if i > 8:
                break
        response.close()
        return "abandoned"

    def abandon_wait(self, session) -> str:
        body = {"model": "claude-opus-4-8", "max_tokens": 4000, "messages": PROMPT}
        response = session.post(self.url + "/v1/messages", json=body, headers=self.headers(), timeout=0.5)
        return self._status(response)

    def switch(self, session) -> str:
        model = self.switch_model or self.main_model
        body = {"model": model, "max_tokens": 4, "messages": PROMPT}
        return self._status(session.post(self.url + "/v1/chat/completions", json=body,
                                         headers=self.headers(True), timeout=600))

    def count_tokens(self, session) -> str:
        body = {"model": "claude-opus-4-8", "messages": PROMPT}
        return self._status(session.post(self.url + "/v1/messages/count_tokens", json=body,
                                         headers=self.headers(), timeout=60))

    def malformed(self, session) -> str:
        response = session.post(self.url + random.choice(["/v1/messages", "/v1/chat/completions"]),
                                data=random.choice(MALFORMED), headers=self.headers(True) | self.headers(),
                                timeout=60)
        return "rejected_4xx" if 400 <= response.status_code < 500 else self._status(response)

    def client(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        kinds, weights = zip(*WEIGHTS.items())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind in ("abandon_stream", "abandon_wait"):
                with requests.Session() as fresh:  # an abandoned connection is not reused
                    self.one(fresh, kind)
            else:
                self.one(session, kind)


def group_rss(config) -> dict[str, float]:
    """RSS in MB of every process of the group (supervisord, each program and the processes
    it started); the model servers apart, since their size is the model's."""
    import psutil

    supervisor = Supervisor(config.home)
    rows: dict[str, float] = {}
    try:
        root = psutil.Process(supervisor.pid())
    except (psutil.Error, TypeError):
        return rows
    programs = {info["pid"]: name for name, info in supervisor.processes().items() if info["pid"]}
    rows["supervisord"] = root.memory_info().rss / 1e6
    for pid, name in programs.items():
        try:
            process = psutil.Process(pid)
            family = [process] + process.children(recursive=True)
            servers = [p for p in family if "mlx_lm_entry" in " ".join(p.cmdline())]
            rows[name] = sum(p.memory_info().rss for p in family if p not in servers) / 1e6
            for server in servers:
                rows[f"model server {server.pid}"] = server.memory_info().rss / 1e6
        except psutil.Error:
            pass
    return rows


def idle_p50(url: str, key: str, n: int = 20) -> float:
    """A short request through the gateway while nothing else runs, median ms."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        requests.post(url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "gpt-4o", "messages": PROMPT, "max_tokens": 16}).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_own(work: Path) -> dict:
    python = sys.executable
    models = work / "models"
    for name, seed in (("soak-a", "0"), ("soak-b", "1")):
        subprocess.run([python, "-m", "mlxgate.cli", "demo-model", str(models / name), "--seed", seed,
                        "--context", "32768"], cwd=ROOT, check=True, capture_output=True)
    ports = {}
    for name in ("MLX_WRAPPER_URL", "MLX_DYNAMIC_PORT", "MLX_AUTOCOMPLETE_PORT", "MLXGATE_PORT", "MLXGATE_HTTPS_PORT"):
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    env = dict(os.environ, MLXGATE_HOME=str(work / "home"), MLXGATE_CONFIG=str(work / "none.yaml"),
               MLXGATE_MODEL_DIRS=str(models), MLX_WRAPPER_URL=f"http://127.0.0.1:{ports['MLX_WRAPPER_URL']}",
               MLX_DYNAMIC_PORT=str(ports["MLX_DYNAMIC_PORT"]), MLX_AUTOCOMPLETE_PORT=str(ports["MLX_AUTOCOMPLETE_PORT"]),
               MLXGATE_PORT=str(ports["MLXGATE_PORT"]), MLXGATE_SSL_DIR=str(work / "ssl"), HF_HUB_OFFLINE="1",
               LITELLM_LOCAL_MODEL_COST_MAP="True", MLXGATE_DRAIN_TIMEOUT="10")
    env.pop("DETAILED_DEBUG", None)
    print("starting a gateway for the soak...", file=sys.stderr, flush=True)
    result = subprocess.run([python, "-m", "mlxgate.cli", "start", "--default-model", "soak-a", "--enable-https",
                             "--https-port", str(ports["MLXGATE_HTTPS_PORT"]), "--max-tokens", "4096"], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mlxgate start failed:\n{result.stdout}\n{result.stderr}")
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--switch-model", help="a second local model: switch requests go there")
    parser.add_argument("--start", action="store_true", help="start a gateway with two tiny models for the run")
    parser.add_argument("--warmup", type=float, default=2, help="minutes of the same load before the measured "
                        "run (tokenizers loaded, threads and caches grown), not counted")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.start:
        env = start_own(Path(tempfile.mkdtemp(prefix="mlxgate-soak-")))
        args.switch_model = args.switch_model or "soak-b"
    config = load_config(env=env)
    if not config.api_key:
        raise SystemExit("no API key: start the daemon first (`mlxgate start`) or pass --start")
    try:
        if args.warmup:
            print(f"warming up for {args.warmup:g} min...", file=sys.stderr, flush=True)
            run(Soak(config.http_url, config.api_key, config.default_model or "", args.switch_model), args.warmup,
                args.clients)
        soak = Soak(config.http_url, config.api_key, config.default_model or "", args.switch_model)
        before = group_rss(config)
        base = idle_p50(config.http_url, config.api_key)
        print(f"soaking for {args.minutes:g} min with {args.clients} clients...", file=sys.stderr, flush=True)
        run(soak, args.minutes, args.clients)
        if args.switch_model:  # the comparison runs on the main model
            requests.post(config.wrapper_url + "/models/load", json={"model": config.default_model},
                          headers={"Authorization": f"Bearer {config.api_key}"}, timeout=600)
        end_base = idle_p50(config.http_url, config.api_key)
        after = group_rss(config)
        report(soak.results, args, before, after, base, end_base)
    finally:
        if args.start:
            subprocess.run([sys.executable, "-m", "mlxgate.cli", "stop"], cwd=ROOT, env=env, capture_output=True)
    return 0


def run(soak: Soak, minutes: float, clients: int) -> None:
    deadline = time.monotonic() + minutes * 60
    threads = [threading.Thread(target=soak.client, args=(deadline, i)) for i in range(clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(30)
        print(f"  {len(soak.results)} requests so far", file=sys.stderr, flush=True)


def report(results, args, before, after, base, end_base) -> None:
    by_kind: dict[str, list] = collections.defaultdict(list)
    for kind, outcome, ms in results:
        by_kind[kind].append((outcome, ms))
    print(f"\n{len(results)} requests in {args.minutes:g} min, {args.clients} concurrent clients (after "
          f"{args.warmup:g} min of warm-up)\n")
    print("| kind | requests | outcomes | p50 ms | p99 ms |")
    print("|---|---:|---|---:|---:|")
    for kind in WEIGHTS:
        rows = by_kind.get(kind, [])
        outcomes = collections.Counter(o for o, _ in rows)
        answered = [ms for o, ms in rows if o in ("ok", "rejected_4xx", "abandoned", "client_timeout")]
        p50 = f"{statistics.median(answered):.0f}" if answered else "-"
        p99 = f"{percentile(answered, 0.99):.0f}" if answered else "-"
        shown = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        print(f"| {kind} | {len(rows)} | {shown} | {p50} | {p99} |")
    unexpected = collections.Counter(o for _, o, _ in results
                                     if o not in ("ok", "rejected_4xx", "abandoned", "client_timeout", "overloaded"))
    print(f"\nunexpected outcomes: {dict(unexpected) or 'none'}")
    chat_ok = [ms for k, o, ms in results if k == "chat" and o == "ok"]
    if chat_ok:
        print(f"openai chat (16 tokens) under load p50 {statistics.median(chat_ok):.0f} ms; the same through the "
              f"idle gateway: {base:.0f} ms at start, {end_base:.0f} ms at end")
    print("\n| process | RSS start MB | RSS end MB | change |")
    print("|---|---:|---:|---:|")
    for name in sorted(set(before) | set(after)):
        start, end = before.get(name), after.get(name)
        change = f"{(end - start) / start:+.0%}" if start and end else "-"
        print(f"| {name} | {start or 0:.0f} | {end or 0:.0f} | {change} |")
    group = [name for name in set(before) & set(after) if not name.startswith("model server")]
    start, end = sum(before[n] for n in group), sum(after[n] for n in group)
    print(f"| **group without model servers** | {start:.0f} | {end:.0f} | {(end - start) / start:+.1%} |")


if __name__ == "__main__":
    sys.exit(main())
