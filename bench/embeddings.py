"""Embeddings per second through mlxgate against the same engine called directly in one process,
at 1 and 8 clients, same models, same run.

- in-process: `mlxgate.embeddings.engine.Engine` in this process; "1 client" embeds one input per
  call, "8 clients" eight inputs per call (what the server's batcher could at best make of eight
  concurrent one-input requests);
- mlxgate: `POST /v1/embeddings` through the proxy, the relay and the embedding model's server,
  one input per request, from 1 and from 8 client threads (the server batches them). Each client
  is a keep-alive `http.client` connection: the client library's own cost (requests adds ~0.5 ms
  a call here) is the same in front of any server and is left out.

Two random-weight BERTs from `mlxgate demo-model --kind embedding` (or --model, a folder): the
tiny one the tests use (hidden 64, 2 layers: ~8 ms a call on this CPU, so the gateway's fixed cost
per request shows at its largest) and hidden 128, 2 layers (~30 ms a call, what a small real
embedding model takes on a Mac's GPU). MLX's CPU backend multiplies matrices ~25x slower than
numpy's BLAS on these Linux machines, so bge-small's own shape (384 x 12) takes 1.3 s a call
here and says nothing of the gateway. Each input is a ~110-token paragraph (the tiny
tokenizer's vocabulary is small).

    .venv/bin/python bench/embeddings.py --seconds 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Gateway, headers, median, model_folders  # noqa: E402

TEXT = ("The gateway answers every request once, in the model's own queue, and the embedding model's "
        "server packs the inputs of concurrent requests into shared forward passes. Paragraph {i}.")


def in_process(folder: Path, batch: int, seconds: float) -> float:
    from mlxgate.embeddings.engine import Engine

    engine = Engine.load(folder)
    engine.run(engine.encode_texts([TEXT.format(i=-1)] * batch))  # warmed up, as the gateway's model is
    done, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.run(engine.encode_texts([TEXT.format(i=i + k) for k in range(batch)]))
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - started)


def through(gateway: Gateway, model: str, clients: int, seconds: float) -> tuple[float, float]:
    """(embeddings per second, median ms per request)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    times, lock = [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        connection, i = http.client.HTTPConnection(host, int(port), timeout=120), 0
        while time.perf_counter() < stop:
            began = time.perf_counter()
            connection.request("POST", "/v1/embeddings", json.dumps({"model": model, "input": TEXT.format(
                i=c * 100000 + i)}), headers(gateway.key))
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise SystemExit(f"HTTP {answer.status}: {body[:300]!r}")
            with lock:
                times.append((time.perf_counter() - began) * 1000)
            i += 1
        connection.close()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(times) / (time.perf_counter() - started), median(times)


MODELS = {"tiny BERT (64 x 2)": ("embedder", ()),
          "BERT 128 x 2": ("embedder-128", ("--hidden", "128", "--layers", "2"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--model", type=Path, help="an embedding model folder (instead of the two built ones)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-embeddings-"))
    models = {"--model": ("embedder", model_folders(work, "embedder", args.model)[1])} if args.model else {
        title: (name, model_folders(work, name, None, "--kind", "embedding", *flags)[1])
        for title, (name, flags) in MODELS.items()}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []  # (model, clients, path, rate, ms)
    for title, (name, folder) in models.items():
        for clients in (1, 8):
            rows.append((title, clients, "in-process", in_process(folder, clients, args.seconds), None))
    gateway = Gateway(work, [work / "models"], "--default-model", "chat")
    try:
        for title, (name, folder) in models.items():
            through(gateway, name, 1, 2)  # loads the model
            for clients in (1, 8):
                rate, ms = through(gateway, name, clients, args.seconds)
                rows.append((title, clients, "mlxgate", rate, ms))
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    base = {(title, clients): rate for title, clients, path, rate, _ in rows if path == "in-process"}
    print(f"{'model':28} {'clients':>7} {'path':12} {'embeddings/s':>13} {'p50 ms':>8} {'vs in-process':>14}")
    for title, clients, path, rate, ms in sorted(rows, key=lambda r: (list(models).index(r[0]), r[1])):
        print(f"{title:28} {clients:7} {path:12} {rate:13.1f} {'' if ms is None else f'{ms:8.1f}':>8} "
              f"{rate / base[title, clients]:13.2f}x")


if __name__ == "__main__":
    main()
