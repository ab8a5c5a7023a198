"""Routing quality with several hosts: 3 hosts (full mlxgate instances serving their relay
over TLS at 127.0.0.2-4), 2 models, a gateway in front; N concurrent clients each hold a
conversation of 3 turns (half on each model, a system prompt of their own so the prompt
cache matters).

The same workload runs twice in one run, each time from the same starting placement
(host a: model 1, host b: model 2, host c: model 1):
- mlxgate: every client talks to the front gateway;
- round-robin: each request goes to the next host's own gateway in turn (a naive balancer).

It reports, per way: requests served without a model switch (the host had the model
loaded when the request arrived: every host's state is read every 50 ms), follow-up turns
served on the host of the conversation's previous turn and turns that read the prompt
cache (`cache_read_input_tokens` > 0); and the extra hop: p50 of a one-token request
through the front (hooks, routing, TLS hop) against the same request to the host's own
gateway, interleaved.

    .venv/bin/python bench/hosts.py --clients 24
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import PYTHON, ROOT, Gateway, demo_model, free_port, headers, median  # noqa: E402

ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
PLACEMENT = {"a": "m1", "b": "m2", "c": "m1"}


class Watch:
    """Every host's resident models every 50 ms, to say whether a request met a load."""

    def __init__(self, hosts: dict[str, Gateway]):
        self.hosts, self.seen, self.stop = hosts, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            now = time.monotonic()
            for name, host in self.hosts.items():
                try:
                    ready = sorted(m for m, s in host.servers().items() if s["state"] == "ready")
                    self.seen.append((now, name, tuple(ready)))
                except requests.RequestException:
                    pass
            time.sleep(0.05)

    def models_at(self, host: str, when: float) -> tuple:
        """The models resident on `host` when a request started."""
        last = ()
        for at, name, model in self.seen:
            if at > when:
                break
            if name == host:
                last = model
        return last


def conversation(model: str, n: int, pick, results: list) -> None:
    """Three turns; `pick()` says where each goes: (url, key, host name or None: the header says)."""
    system = f"You are assistant number {n}. " + " ".join(f"Rule {i}: answer briefly." for i in range(60))
    messages, previous = [], None
    session = requests.Session()
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn} from client {n}"})
        url, key, name = pick()
        started = time.monotonic()
        response = session.post(url + "/v1/messages", headers=headers(key), timeout=300, json={
            "model": model, "max_tokens": 8, "system": system, "messages": messages})
        if response.status_code != 200:
            results.append({"error": f"{response.status_code} {response.text[:200]}"})
            return
        body = response.json()
        host = name or response.headers.get("x-mlxgate-host")
        results.append({"model": model, "host": host, "turn": turn, "started": started, "previous": previous,
                        "cached": body["usage"].get("cache_read_input_tokens", 0)})
        previous = host
        messages.append({"role": "assistant", "content": body["content"][0]["text"] if body["content"] else "ok"})


def run(clients: int, pick) -> list[dict]:
    results: list[dict] = []
    threads = [threading.Thread(target=conversation, args=(("m1", "m2")[n % 2], n, pick, results))
               for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def place(hosts: dict[str, Gateway]) -> None:
    for name, host in hosts.items():
        requests.post(host.env["MLX_WRAPPER_URL"] + "/models/load", json={"model": PLACEMENT[name]}, timeout=300,
                      headers={"Authorization": f"Bearer {host.key}"}).raise_for_status()


def score(results: list[dict], watch: Watch) -> dict:
    ok = [r for r in results if "error" not in r]
    for failed in [r for r in results if "error" in r][:3]:
        print("failed:", failed["error"], flush=True)
    no_switch = [r for r in ok if r["model"] in watch.models_at(r["host"], r["started"])]
    follow = [r for r in ok if r["turn"] > 0]
    return {"requests": len(results), "failed": len(results) - len(ok),
            "no_switch": len(no_switch) / max(1, len(ok)),
            "same_host": sum(r["host"] == r["previous"] for r in follow) / max(1, len(follow)),
            "cache_read": sum(r["cached"] > 0 for r in follow) / max(1, len(follow))}


def hop(front: Gateway, host: Gateway, requests_n: int) -> tuple[float, float]:
    body = {"model": "m2", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    samples = {"front": [], "host": []}
    sessions = {"front": requests.Session(), "host": requests.Session()}
    for i in range(requests_n * 2 + 4):
        way = ("front", "host")[i % 2]
        target = front.url if way == "front" else host.url
        started = time.perf_counter()
        response = sessions[way].post(target + "/v1/chat/completions", json=body, headers=headers(front.key
                                      if way == "front" else host.key), timeout=60)
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, response.text
        if i >= 4:
            samples[way].append(elapsed)
    return median(samples["front"]), median(samples["host"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--hop-requests", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-hosts-"))
    models = work / "models"
    demo_model(models / "m1")
    demo_model(models / "m2", "--seed", "1", "--layers", "3")
    hosts: dict[str, Gateway] = {}
    front = None
    try:
        for name, address in ADDRESSES.items():
            listen_port = free_port()
            hosts[name] = Gateway(work / name, [models], "--default-model", PLACEMENT[name], "--listen", address,
                                  "--listen-port", str(listen_port))
            hosts[name].relay = f"https://{address}:{listen_port}"

        def add_hosts(env):
            import subprocess
            for name, host in hosts.items():
                subprocess.run([PYTHON, "-m", "mlxgate.cli", "hosts", "add", name, host.relay, "--key", host.key,
                                "--yes"], cwd=ROOT, env=env, check=True, capture_output=True)
        front = Gateway(work / "front", [models], prepare=add_hosts)
        watch = Watch(hosts)
        print(f"{args.clients} clients x 3 turns, 2 models, 3 hosts (placement {PLACEMENT})", flush=True)
        place(hosts)
        ours = score(run(args.clients, lambda: (front.url, front.key, None)), watch)
        place(hosts)
        time.sleep(1)
        rotation, lock = itertools.cycle(hosts), threading.Lock()

        def round_robin():
            with lock:
                name = next(rotation)
            return hosts[name].url, hosts[name].key, name
        naive = score(run(args.clients, round_robin), watch)
        watch.stop.set()
        print(f"{'':22}{'mlxgate':>10}{'round-robin':>14}")
        for key, label in (("no_switch", "served without switch"), ("same_host", "follow-up on its host"),
                           ("cache_read", "follow-up cache read")):
            print(f"{label:22}{ours[key]:>10.0%}{naive[key]:>14.0%}")
        print(f"{'failed requests':22}{ours['failed']:>10}{naive['failed']:>14}")
        place(hosts)
        via_front, direct = hop(front, hosts["b"], args.hop_requests)
        print(f"extra hop (p50, one-token chat, front -> host b over TLS vs host b's own gateway): "
              f"{via_front - direct:+.1f} ms ({via_front:.1f} vs {direct:.1f} ms)")
    finally:
        for running in [front, *hosts.values()]:
            if running is not None:
                running.stop()


if __name__ == "__main__":
    main()
