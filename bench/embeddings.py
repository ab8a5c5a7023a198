"""Embeddings per second through mlxgate against the same engine called directly in one process,
at 1 and 8 clients, same model, same run.

- in-process: `mlxgate.embeddings.engine.Engine` in this process; "1 client" embeds one input per
  call, "8 clients" eight inputs per call (what the server's batcher could at best make of eight
  concurrent one-input requests);
- mlxgate: `POST /v1/embeddings` through the proxy, the relay and the embedding model's server,
  one input per request, from 1 and from 8 client threads (the server batches them).

The model is a tiny BERT from `mlxgate demo-model --kind embedding` (hidden 64) unless --model
names a folder; each input is a ~60-token paragraph.

    .venv/bin/python bench/embeddings.py --seconds 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Gateway, headers, median, model_folders  # noqa: E402

TEXT = ("The gateway answers every request once, in the model's own queue, and the embedding model's "
        "server packs the inputs of concurrent requests into shared forward passes. Paragraph {i}.")


def in_process(folder: Path, batch: int, seconds: float) -> float:
    from mlxgate.embeddings.engine import Engine

    engine = Engine.load(folder)
    done, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.run(engine.encode_texts([TEXT.format(i=i + k) for k in range(batch)]))
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - started)


def through(gateway: Gateway, model: str, clients: int, seconds: float) -> tuple[float, float]:
    """(embeddings per second, median ms per request)."""
    url, times, lock = gateway.url + "/v1/embeddings", [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        session, i = requests.Session(), 0
        while time.perf_counter() < stop:
            began = time.perf_counter()
            answer = session.post(url, json={"model": model, "input": TEXT.format(i=c * 100000 + i)},
                                  headers=headers(gateway.key), timeout=120)
            answer.raise_for_status()
            with lock:
                times.append((time.perf_counter() - began) * 1000)
            i += 1
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(times) / (time.perf_counter() - started), median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--model", type=Path, help="an embedding model folder (default: a tiny BERT)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-embeddings-"))
    models, folder = model_folders(work, "embedder", args.model, "--kind", "embedding")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for clients, batch in ((1, 1), (8, 8)):
        rows.append((f"in-process, {clients} client(s)", in_process(folder, batch, args.seconds), None))
    gateway = Gateway(work, [models], "--default-model", "chat")
    try:
        through(gateway, "embedder", 1, 2)  # loads the model
        for clients in (1, 8):
            rate, ms = through(gateway, "embedder", clients, args.seconds)
            rows.append((f"mlxgate, {clients} client(s)", rate, ms))
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"{'path':28} {'embeddings/s':>13} {'p50 ms':>8} {'vs in-process':>14}")
    for name, rate, ms in rows:
        base = rows[0][1] if "1 client" in name else rows[1][1]
        print(f"{name:28} {rate:13.1f} {'' if ms is None else f'{ms:8.1f}':>8} {rate / base:13.2f}x")


if __name__ == "__main__":
    main()
