"""An agent's follow-up turns: a conversation whose ~11,000-token prefix the model server has
cached, one new user message per turn, one generated token. mlxgate against mlx_lm.server
directly, same model, same run, interleaved.

What an agent's turn costs beyond the model is what the gateway does with the whole
conversation each time: parse it, translate it, count its tokens exactly (the context
check, `message_start.usage.input_tokens`). The model server reuses its prompt cache on
both paths, so the turn itself takes a few milliseconds and the gateway's share shows.

    .venv/bin/python bench/agent.py --turns 30
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import requests

from stack import Direct, Gateway, demo_model, median, percentile, timed

WORDS = ("the function returns a value when the file is read and the tool writes code for each test "
         "case while the agent keeps context about every change it made so far").split()


def conversation(words: int, seed: int = 0) -> tuple[str, list[dict]]:
    """(system prompt, earlier turns) of `words` words of plain text."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    system = text(words // 3)
    turns = []
    for _ in range(10):
        turns += [{"role": "user", "content": text(words // 30)}, {"role": "assistant", "content": text(words // 30)}]
    return system, turns


def sized_conversation(model: Path, tokens: int) -> tuple[str, list[dict]]:
    """A conversation of about `tokens` tokens for this model's tokenizer."""
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(model)
    words = tokens
    for _ in range(3):
        system, turns = conversation(words)
        counted = len(tokenizer.apply_chat_template([{"role": "system", "content": system}] + turns))
        words = int(words * tokens / counted)
    return conversation(words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30, help="follow-up turns measured per path")
    parser.add_argument("--prefix", type=int, default=11000, help="about how many tokens the cached prefix has")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlxgate-agent-"))
    model = demo_model(work / "models" / "agent-model", "--context", "65536")
    print("starting mlx_lm.server and mlxgate...", file=sys.stderr, flush=True)
    direct = Direct(model)
    gateway = Gateway(work, [model.parent], "--default-model", model.name)
    system, turns = sized_conversation(model, args.prefix)
    chat_history = [{"role": "system", "content": system}] + turns
    session = requests.Session()
    timings: list[dict] = []
    try:
        def ask(i: int, path: str = "") -> list[dict]:
            # each path its own question: no request repeats another's prompt (an exact cache hit)
            return [{"role": "user", "content": f"Follow-up question number {i} {path}: what should change next?"}]

        paths = {
            "direct chat": lambda i: timed(session, direct.url + "/v1/chat/completions", {
                "messages": chat_history + ask(i, "a"), "max_tokens": 1}, None, False),
            "mlxgate chat": lambda i: timed(session, gateway.url + "/v1/chat/completions", {
                "model": "gpt-4o", "messages": chat_history + ask(i, "a"), "max_tokens": 1}, gateway.key, False,
                timings if i > 0 else None),
            "direct stream": lambda i: timed(session, direct.url + "/v1/chat/completions", {
                "messages": chat_history + ask(i, "b"), "max_tokens": 1, "stream": True}, None, True),
            "mlxgate messages stream": lambda i: timed(session, gateway.url + "/v1/messages", {
                "model": "claude-opus-4-8", "system": system, "messages": turns + ask(i, "b"), "max_tokens": 1,
                "stream": True}, gateway.key, True),
        }
        print("prefilling the conversation on both paths...", file=sys.stderr, flush=True)
        for name, call in paths.items():
            call(-1)
        usage = session.post(gateway.url + "/v1/messages", headers={"x-api-key": gateway.key}, timeout=300, json={
            "model": "claude-opus-4-8", "system": system, "messages": turns + ask(0), "max_tokens": 1}).json()["usage"]
        counted = session.post(gateway.url + "/v1/messages/count_tokens", headers={"x-api-key": gateway.key},
                               timeout=300, json={"model": "claude-opus-4-8", "system": system,
                                                  "messages": turns + ask(0)}).json()["input_tokens"]
        names = list(paths)
        ms = {name: [] for name in names}
        for i in range(1, args.turns + 1):
            for name in names[i % len(names):] + names[:i % len(names)]:
                ms[name].append(paths[name](i))
        prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        print(f"\n{args.turns} follow-up turns per path on a {prompt}-token conversation "
              f"(cache_read_input_tokens {usage.get('cache_read_input_tokens', 0)}, count_tokens said {counted}); "
              f"1 generated token; streams timed to the first content delta\n")
        print("| case | direct p50 ms | mlxgate p50 ms | mlxgate p95 ms | added p50 ms | ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for case, d, g in (("openai chat", "direct chat", "mlxgate chat"),
                           ("anthropic messages stream", "direct stream", "mlxgate messages stream")):
            d50, g50 = median(ms[d]), median(ms[g])
            print(f"| {case} | {d50:.1f} | {g50:.1f} | {percentile(ms[g], 0.95):.1f} | {g50 - d50:+.1f} | "
                  f"{g50 / d50:.2f}x |")
        if timings:  # the relay's Server-Timing on the chat turns: where the added time goes
            part = {name: median([t[name] for t in timings]) for name in timings[0]}
            print(f"\nmlxgate chat turns, medians: relay {part['relay']:.2f} ms = counting {part['count']:.2f} + "
                  f"waiting {part['wait']:.2f} + model server {part['model']:.2f}; the client saw "
                  f"{part['client']:.2f} (proxy and the hops: {part['client'] - part['relay']:.2f})")
    finally:
        gateway.stop()
        direct.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
