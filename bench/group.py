"""One model across ranks: the same tiny model served by one `mlx_lm.server`, by two ranks
under `mlx.launch` (ring backend over loopback) sharded tensor parallel, and by two ranks
pipeline parallel; each behind its own mlxgate. It reports the load time (to the first
answered one-token probe), tokens/s of one stream and of 4 concurrent ones, and the CPU the
group uses while idle.

On one machine both ranks share the same cores, so this shows that the group works and
what it costs, not a speed-up: that needs a second machine (see docs/scale.md).

    .venv/bin/python bench/group.py --tokens 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Gateway, demo_model, headers, median  # noqa: E402

WAYS = {"one process": {}, "2 ranks, tensor": {"hosts": ["127.0.0.1", "127.0.0.1"], "starting_port": 36100},
        "2 ranks, pipeline": {"hosts": ["127.0.0.1", "127.0.0.1"], "pipeline": True, "starting_port": 36200}}


def with_index(model: Path) -> None:
    """Pipeline loading reads `model.safetensors.index.json` to fetch each rank's layers."""
    import mlx.core as mx

    names = list(mx.load(str(model / "model.safetensors")))
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}))


def rate(gateway: Gateway, tokens: int, clients: int) -> float:
    counts = []

    def one(i):
        response = requests.post(gateway.url + "/v1/chat/completions", headers=headers(gateway.key), timeout=600,
                                 json={"model": "tiny", "max_tokens": tokens, "temperature": 0.8,
                                       "messages": [{"role": "user", "content": f"Tell story {i}"}]})
        response.raise_for_status()
        counts.append(response.json()["usage"]["completion_tokens"])
    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def idle_cpu(pid: int, seconds: float = 5.0) -> float:
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for member in tree:
        member.cpu_percent()
    time.sleep(seconds)
    return sum(member.cpu_percent() for member in tree) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-group-"))
    model = demo_model(work / "models" / "tiny")
    with_index(model)
    print(f"{'':20}{'load s':>8}{'tok/s 1':>9}{'tok/s 4':>9}{'idle cores':>12}")
    for way, settings in WAYS.items():
        folder = work / way.replace(" ", "").replace(",", "-")
        folder.mkdir()

        def prepare(env, settings=settings):
            Path(env["MLXGATE_CONFIG"]).write_text(json.dumps({"distributed": settings} if settings else {}))
        gateway = Gateway(folder, [model.parent], "--default-model", "tiny", prepare=prepare)
        try:
            server = gateway.servers()["tiny"]
            one = median([rate(gateway, args.tokens, 1) for _ in range(3)])
            four = rate(gateway, args.tokens, 4)
            print(f"{way:20}{server['load_seconds']:>8.1f}{one:>9.0f}{four:>9.0f}{idle_cpu(server['pid']):>12.2f}",
                  flush=True)
        except Exception as exc:  # a way that cannot run says why
            print(f"{way:20} failed: {exc}", flush=True)
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
