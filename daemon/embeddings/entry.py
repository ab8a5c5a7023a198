"""Entry point of one embedding or reranker model server process:

    python -m mlxgate.embeddings.entry --model DIR --host 127.0.0.1 --port P [--max-batch-tokens N]
        [--max-batch-size N] [--kind embedding|reranker]

Its contract with the wrapper is `mlxgate.wrapper.mlx_lm_entry`'s: the first stdin line is the
secret every request must carry (`Authorization: Bearer SECRET`, else 403), and the process
exits at once when stdin closes (the wrapper is gone, however it went). `GET /mlxgate/alive`
reports the batch worker for the watchdog.

The port is bound only once the model has loaded: until then a connection is refused, and a
folder that cannot be served ends the process with `FolderError: why` as its log's last line.
`READINESS_PROBE` is the request that proves the model serves, whichever kind it is.
"""

from __future__ import annotations

import argparse
import logging

from ..model_entry import begin, parser as entry_parser, refuse_folder

READINESS_PROBE = ("/v1/rerank", {"query": "ping", "documents": ["ping"]})  # a forward pass for every kind

log = logging.getLogger("mlxgate.embeddings")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from .batcher import MAX_BATCH_ROWS, MAX_BATCH_TOKENS

    parser = entry_parser("python -m mlxgate.embeddings.entry",
                          "Serve one embedding or reranker model to the mlxgate relay.")
    parser.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS,
                        help="rows x longest row of one forward pass (default %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_ROWS,
                        help="rows of one forward pass (default %(default)s)")
    parser.add_argument("--kind", choices=("embedding", "reranker"),
                        help="the model entry's kind, over what the folder's files say")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    secret = begin()
    args = parse(argv)
    from ..model_kinds import kind_of
    from .batcher import Batcher
    from .engine import Engine, FolderError
    from .server import App, make_server

    try:
        engine = Engine.load(args.model, kind_of(args.model, args.kind))
    except FolderError as exc:
        refuse_folder(str(exc))
    batcher = Batcher(engine.run, args.max_batch_tokens, args.max_batch_size)
    server = make_server(App(engine, batcher, args.model.name, secret), args.host, args.port)
    log.info("serving %s (%s, %s) on %s:%d", args.model, engine.kind.kind, engine.kind.reason, args.host, args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
