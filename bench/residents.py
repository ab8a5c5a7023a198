"""An agent mix on three models, on the gateway as it was before the resident set and as it is:
how many requests find their model loaded (no switch, no load on their way), their time to
first token, and the memory the model servers held against the budget.

The mix, all at once for `--seconds`:
- a coding agent (Anthropic Messages, streamed) on the default model, its conversation growing
  turn by turn, with a fast-class side request (`claude-3-5-haiku-latest`) every third turn;
- a second agent (OpenAI chat, streamed) on a third model, by its own name;
- an autocomplete stream (`/v1/completions`, model `autocomplete`, 16 tokens) every 0.3 s.

The default model is tiny-a, the autocomplete model (and so the haiku class) org/tiny-b, the
second agent's model tiny-c. "Before" is the commit given with `--before` (default: the last one
before the resident set), run from a git worktree with the same virtualenv; its wrapper had two
model servers, so the second agent's model switched the default model's server out.

    .venv/bin/python bench/residents.py --seconds 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, Gateway, demo_model, first_delta, headers, median, percentile  # noqa: E402

BEFORE = "32f0563"  # main before the resident set: two fixed model servers


class Watch:
    """The resident models and the model servers' memory, every 50 ms."""

    def __init__(self, gateway: Gateway):
        self.gateway, self.seen, self.peak, self.stop = gateway, [], 0, threading.Event()
        self.budget = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self.stop.is_set():
            try:
                answer = requests.get(self.gateway.env["MLX_WRAPPER_URL"] + "/models", timeout=5,
                                      headers={"Authorization": f"Bearer {self.gateway.key}"}).json()
            except (requests.RequestException, ValueError):
                time.sleep(0.05)
                continue
            servers = answer["servers"].values()
            ready = {s["model"] for s in servers if s["state"] == "ready"}
            self.seen.append((time.monotonic(), ready))
            self.budget = (answer.get("memory") or {}).get("budget")
            rss = 0
            for server in servers:
                try:
                    if server.get("pid"):
                        rss += psutil.Process(server["pid"]).memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def resident(self, model: str, start: float, end: float) -> bool:
        """Whether `model` was loaded from `start` to `end` (no switch or load on the request's way)."""
        last, during = set(), []
        for at, ready in self.seen:
            if at > end:
                break
            if at <= start:
                last = ready
            else:
                during.append(ready)
        return model in last and all(model in ready for ready in during)


def run_mix(gateway: Gateway, seconds: float) -> list[dict]:
    url, key = gateway.url, gateway.key
    done = time.monotonic() + seconds
    results: list[dict] = []

    def record(model: str, kind: str, path: str, body: dict) -> str:
        started = time.monotonic()
        text = ""
        try:
            response = requests.post(url + path, json=body, headers=headers(key), stream=True, timeout=300)
            first = None
            for line in response.iter_lines(chunk_size=None):
                if first is None and (first_delta(line) or b'"text"' in line and b"choices" in line):
                    first = time.monotonic()
                text += line.decode("utf-8", "replace")[:200] if len(text) < 400 else ""
            ok = response.status_code == 200 and first is not None
            results.append({"model": model, "kind": kind, "started": started, "ok": ok, "first": first,
                            "ttft": (first - started) * 1000 if first else None,
                            **({} if ok else {"error": f"HTTP {response.status_code}: {text[:300]}"})})
        except requests.RequestException as exc:
            results.append({"model": model, "kind": kind, "started": started, "ok": False, "ttft": None,
                            "error": repr(exc)})
        return text

    def coding_agent():
        messages = [{"role": "user", "content": "Refactor the parser. " * 40}]
        turn = 0
        while time.monotonic() < done:
            record("tiny-a", "agent", "/v1/messages", {"model": "claude-opus-4-8", "max_tokens": 24, "stream": True,
                                                       "system": "You are a coding agent. " * 60,
                                                       "messages": messages})
            messages += [{"role": "assistant", "content": "Done with step."},
                         {"role": "user", "content": f"Now step {turn}."}]
            if turn % 3 == 0:
                record("org/tiny-b", "haiku", "/v1/messages", {
                    "model": "claude-3-5-haiku-latest", "max_tokens": 8, "stream": True,
                    "messages": [{"role": "user", "content": f"Title for turn {turn}"}]})
            turn += 1

    def second_agent():
        messages = [{"role": "system", "content": "You review code. " * 60},
                    {"role": "user", "content": "Review this diff. " * 40}]
        turn = 0
        while time.monotonic() < done:
            record("tiny-c", "second agent", "/v1/chat/completions", {
                "model": "tiny-c", "max_tokens": 24, "stream": True, "messages": messages})
            messages += [{"role": "assistant", "content": "Looks fine."}, {"role": "user", "content": f"And {turn}?"}]
            turn += 1

    def autocomplete():
        n = 0
        while time.monotonic() < done:
            record("org/tiny-b", "autocomplete", "/v1/completions", {
                "model": "autocomplete", "prompt": f"def function_{n}(a, b):\n    return", "max_tokens": 16,
                "stream": True})
            n += 1
            time.sleep(0.3)

    threads = [threading.Thread(target=f) for f in (coding_agent, second_agent, autocomplete)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def worktree(commit: str, work: Path) -> Path:
    """The code at `commit`, importable as `mlxgate` ahead of the installed checkout."""
    tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    shim = work / "shim"
    shim.mkdir()
    (shim / "mlxgate").symlink_to(tree / "daemon")
    return shim


def measure(label: str, work: Path, models: Path, seconds: float, budget: str | None, pythonpath: str | None):
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    if budget:
        env["MLXGATE_MEMORY_BUDGET"] = budget
    gateway = Gateway(work, [models], "--default-model", "tiny-a", "--autocomplete-model", "org/tiny-b",
                      "--max-tokens", "64", **env)
    watch = Watch(gateway)
    try:
        results = run_mix(gateway, seconds)
    finally:
        watch.stop.set()
        watch.thread.join()
        gateway.stop()
    ok = [r for r in results if r["ok"]]
    for failed in [r for r in results if not r["ok"]][:3]:
        print(f"{label}: a {failed['kind']} request failed: {failed.get('error')}", flush=True)
    resident = [r for r in ok if watch.resident(r["model"], r["started"], r["first"])]
    rows = {}
    for kind in ("agent", "haiku", "second agent", "autocomplete"):
        mine = [r for r in ok if r["kind"] == kind]
        rows[kind] = (len(mine), sum(watch.resident(r["model"], r["started"], r["first"]) for r in mine)
                      / max(1, len(mine)),
                      median([r["ttft"] for r in mine]) if mine else float("nan"),
                      percentile([r["ttft"] for r in mine], 0.95) if mine else float("nan"))
    return {"label": label, "requests": len(results), "failed": len(results) - len(ok),
            "resident": len(resident) / max(1, len(ok)), "rows": rows, "peak": watch.peak, "budget": watch.budget}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with (git worktree)")
    parser.add_argument("--budget", default=None, help="memory_budget for this change's run (default auto)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxgate-residents-") as tmp:
        work = Path(tmp)
        models = work / "models"
        demo_model(models / "tiny-a", "--context", "32768")
        demo_model(models / "org" / "tiny-b", "--seed", "1", "--layers", "3", "--context", "32768")
        demo_model(models / "tiny-c", "--seed", "2", "--context", "32768")
        print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
        shim = worktree(args.before, work)
        try:
            runs = [measure(f"main before ({args.before})", work / "old", models, args.seconds, None, str(shim)),
                    measure("this change", work / "new", models, args.seconds, args.budget, None)]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "before")],
                           capture_output=True)
        print(f"load after: {os.getloadavg()[0]:.2f}\n", flush=True)
    print(f"Agent mix on three models, {args.seconds:g} s, all clients at once\n")
    print("| gateway | client | requests | model loaded from request to first token | p50 first token ms | p95 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for run in runs:
        for kind, (n, share, p50, p95) in run["rows"].items():
            print(f"| {run['label']} | {kind} | {n} | {share:.0%} | {p50:.0f} | {p95:.0f} |")
    print()
    print("| gateway | requests | failed | served without a switch or load | model servers' memory high-water | budget |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in runs:
        budget = f"{run['budget'] / 2 ** 20:.0f} MiB" if run["budget"] else "none"
        print(f"| {run['label']} | {run['requests']} | {run['failed']} | {run['resident']:.1%} | "
              f"{run['peak'] / 2 ** 20:.0f} MiB | {budget} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
