"""What structured output and fill-in-the-middle cost, through mlxgate, same model, same run:

- tokens per second of answers held to a JSON Schema against free answers of the same length
  (a random-weight model: it runs to max_tokens either way), 1 client and 4 clients;
- the schema's compile time (the processor a request gets: first time, then cached), in-process;
- time to first token of a fill-in-the-middle completion (`suffix`) on the autocomplete model
  against a plain completion of the same prompt.

    .venv/bin/python bench/structured.py --rounds 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import PYTHON, Gateway, headers, median  # noqa: E402

TOKENS = 200
LIST = {"type": "object", "properties": {"items": {"type": "array", "minItems": 200, "maxItems": 200,
                                                   "items": {"type": "string", "maxLength": 3}}},
        "required": ["items"], "additionalProperties": False}  # longer than TOKENS: it never ends early
TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string",
                                                                                       "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"]}, "status": {"enum": ["active", "inactive"]}},
    "required": ["name", "age", "status"]}


def rate(gateway: Gateway, held: bool, clients: int, rounds: int) -> float:
    """Generated tokens per second over `rounds` requests per client."""
    body = {"model": "gpt-4o", "max_tokens": TOKENS, "temperature": 1.0,
            "messages": [{"role": "user", "content": "List them."}]}
    if held:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "list", "schema": LIST}}
    counts = []

    def client() -> None:
        session = requests.Session()
        for _ in range(rounds):
            answer = session.post(gateway.url + "/v1/chat/completions", json=body, headers=headers(gateway.key),
                                  timeout=300).json()
            counts.append(answer["usage"]["completion_tokens"])
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def first_text_ms(session: requests.Session, url: str, body: dict, key: str) -> float:
    """Milliseconds to the first text of a streamed completion (the rest is read too)."""
    import json

    started, first = time.perf_counter(), None
    with session.post(url, json=body, headers=headers(key), stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):
            if first is None and line.startswith(b"data: {") and any(
                    c.get("text") for c in json.loads(line[6:]).get("choices") or []):
                first = time.perf_counter()
    if first is None:
        raise SystemExit(f"{url}: the stream had no text")
    return (first - started) * 1000


def compile_ms(model: Path) -> tuple[float, float]:
    from mlx_lm.utils import load_tokenizer

    from mlxgate.constraints import decoding

    tokenizer = load_tokenizer(model)
    decoding.grammar_tokenizer(tokenizer)
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": TYPICAL}}}
    began = time.perf_counter()
    decoding.processor_for(body, tokenizer)
    first = (time.perf_counter() - began) * 1000
    again = []
    for _ in range(20):
        began = time.perf_counter()
        decoding.processor_for(body, tokenizer)
        again.append((time.perf_counter() - began) * 1000)
    return first, median(again)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-structured-"))
    models = work / "models"
    for name, flags in (("chat", ["--hidden", "256", "--layers", "4"]), ("coder", ["--fim"])):
        subprocess.run([PYTHON, "-m", "mlxgate.cli", "demo-model", str(models / name), *flags], check=True,
                       capture_output=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    first, cached = compile_ms(models / "chat")
    gateway = Gateway(work, [models], "--default-model", "chat", "--autocomplete-model", "coder",
                      "--max-tokens", "4096")
    rows, fim = [], {}
    try:
        rate(gateway, True, 1, 1)  # the grammar view of the tokenizer, the first compile
        for clients in (1, 4):
            free = median([rate(gateway, False, clients, args.rounds) for _ in range(3)])
            held = median([rate(gateway, True, clients, args.rounds) for _ in range(3)])
            rows.append((clients, free, held))
        session = requests.Session()
        prompt = "def add(a, b):\n    " + "# add two numbers\n" * 30
        for name, extra in (("plain completion", {}), ("fill-in-the-middle", {"suffix": "\n\nprint(add(1, 2))\n"})):
            body = {"model": "autocomplete", "prompt": prompt, "max_tokens": 16, "stream": True, **extra}
            first_text_ms(session, gateway.url + "/v1/completions", body, gateway.key)
            fim[name] = median([first_text_ms(session, gateway.url + "/v1/completions", body, gateway.key)
                                for _ in range(args.rounds * 2)])
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"schema compile (a typical 6-property schema): first {first:.1f} ms, cached {cached:.2f} ms\n")
    print(f"{'clients':>7} {'free tok/s':>11} {'held tok/s':>11} {'held/free':>10}")
    for clients, free, held in rows:
        print(f"{clients:7d} {free:11.1f} {held:11.1f} {held / free:9.2f}x")
    print(f"\n{'autocomplete model':22} {'TTFT p50 ms':>12}")
    for name, ms in fim.items():
        print(f"{name:22} {ms:12.1f}")
    print(f"{'ratio':22} {fim['fill-in-the-middle'] / fim['plain completion']:11.2f}x")


if __name__ == "__main__":
    main()
