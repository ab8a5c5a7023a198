"""Added latency of mlxgate and of a stock LiteLLM proxy over calling mlx_lm.server directly.

Starts, in one run and on the same tiny model (unless --model is given): a direct
`mlx_lm.server`, a stock LiteLLM proxy (default settings) in front of it, and mlxgate
(`mlxgate start`). Then sends N sequential one-token requests of each kind to each, the
three paths interleaved (in rotating order) so machine noise hits them alike. Non-streamed
requests are timed to the whole answer; streamed ones to the first content delta (not to
`message_start` or `response.created`, which go out before the model answers). The Anthropic
and Responses rows compare against the direct OpenAI chat call: the same generation, without
the translation. Responses are stored (`store` is true by default), as a client that does not
say gets them. The stock LiteLLM proxy has no Responses row: it forwards `/v1/responses` to
the backend's own, which `mlx_lm.server` does not have.

    .venv/bin/python bench/latency.py --requests 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import requests

from stack import Direct, Gateway, StockLiteLLM, demo_model, median, percentile, timed

PROMPT = [{"role": "user", "content": "Say hello"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="requests per case and path")
    parser.add_argument("--model", help="model folder (default: a tiny generated model)")
    parser.add_argument("--no-litellm", action="store_true", help="leave the stock LiteLLM column out")
    parser.add_argument("--without-recording", action="store_true",
                        help="add a second mlxgate with record_usage off: what metrics and the ledger cost")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-"))
    model = Path(args.model) if args.model else demo_model(work / "models" / "bench-model")
    print("starting mlx_lm.server, a stock LiteLLM proxy and mlxgate...", file=sys.stderr, flush=True)
    direct = Direct(model)
    stock = None if args.no_litellm else StockLiteLLM(work, direct)
    gateway = Gateway(work, [model.parent], "--default-model", model.name)
    bare = Gateway(work / "bare", [model.parent], "--default-model", model.name,
                   MLXGATE_RECORD_USAGE="false") if args.without_recording else None
    try:
        chat = {"messages": PROMPT, "max_tokens": 1}
        responses = {"model": "gpt-5.5", "input": PROMPT, "max_output_tokens": 1}
        cases = [  # name, direct (path, body), gateway (path, body), stream
            ("openai chat", ("/v1/chat/completions", chat), ("/v1/chat/completions", {"model": "gpt-4o", **chat}),
             False),
            ("openai chat stream", ("/v1/chat/completions", {**chat, "stream": True}),
             ("/v1/chat/completions", {"model": "gpt-4o", **chat, "stream": True}), True),
            ("anthropic messages", ("/v1/chat/completions", chat),
             ("/v1/messages", {"model": "claude-opus-4-8", **chat}), False),
            ("anthropic messages stream", ("/v1/chat/completions", {**chat, "stream": True}),
             ("/v1/messages", {"model": "claude-opus-4-8", **chat, "stream": True}), True),
            ("openai responses", ("/v1/chat/completions", chat), ("/v1/responses", responses), False),
            ("openai responses stream", ("/v1/chat/completions", {**chat, "stream": True}),
             ("/v1/responses", {**responses, "stream": True}), True),
        ]
        paths = [("direct", direct.url, None, 0), ("mlxgate", gateway.url, gateway.key, 1)]
        if stock:
            paths.insert(1, ("litellm", stock.url, stock.key, 1))
        if bare:
            paths.append(("unrecorded", bare.url, bare.key, 1))
        session = requests.Session()

        def one(path, case) -> float:
            _, url, key, through = path
            api_path, body = case[1 + through]
            return timed(session, url + api_path, body, key, case[3])

        def paths_for(case) -> list:
            return [p for p in paths if p[0] != "litellm" or case[2][0] != "/v1/responses"]

        for _ in range(3):  # warm every path: model loaded, prompt cache, connections
            for case in cases:
                for path in paths_for(case):
                    one(path, case)
        rows = []
        for case in cases:
            ms = {name: [] for name, *_ in paths_for(case)}
            for i in range(args.requests):
                those = paths_for(case)
                for path in those[i % len(those):] + those[:i % len(those)]:
                    ms[path[0]].append(one(path, case))
            rows.append((case[0], ms))
        print(f"\n{args.requests} sequential requests per path, max_tokens 1, model {model.name}; streams timed "
              f"to the first content delta; medians (p95 for mlxgate)\n")
        litellm = " | stock LiteLLM p50 ms | LiteLLM added" if stock else ""
        unrecorded = " | mlxgate unrecorded p50 ms | recording costs" if bare else ""
        print(f"| case | direct p50 ms{litellm} | mlxgate p50 ms | mlxgate p95 ms | mlxgate added | ratio{unrecorded} |")
        print("|---|---:|" + ("---:|---:|" if stock else "") + "---:|---:|---:|---:|" + ("---:|---:|" if bare else ""))
        for name, ms in rows:
            d50, g50 = median(ms["direct"]), median(ms["mlxgate"])
            lite = ""
            if stock:
                lite = (f" | {median(ms['litellm']):.1f} | {median(ms['litellm']) - d50:+.1f}" if ms.get("litellm")
                        else " | n/a | n/a")
            plain = f" | {median(ms['unrecorded']):.1f} | {g50 - median(ms['unrecorded']):+.2f}" if bare else ""
            print(f"| {name} | {d50:.1f}{lite} | {g50:.1f} | {percentile(ms['mlxgate'], 0.95):.1f} | "
                  f"{g50 - d50:+.1f} | {g50 / d50:.2f}x{plain} |")
        print(f"\nmlxgate start to all-healthy: {gateway.start_seconds:.1f} s")
    finally:
        gateway.stop()
        if bare:
            bare.stop()
        if stock:
            stock.stop()
        direct.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
