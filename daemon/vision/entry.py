"""Entry point of one vision model server process:

    python -m mlxgate.vision.entry --model DIR --host 127.0.0.1 --port P [--kind vision]

Its contract with the wrapper is `mlxgate.wrapper.mlx_lm_entry`'s: the first stdin line is the
secret every request must carry (`Authorization: Bearer SECRET`, else 403), and the process
exits at once when stdin closes (the wrapper is gone, however it went). `GET /mlxgate/alive`
reports the generation worker for the watchdog. The port is bound only once the model has
loaded; a folder mlx-vlm cannot load ends the process with `FolderError: why` as its log's
last line. mlx-vlm is the `vision` extra (`pip install 'mlxgate[vision]'`).
"""

from __future__ import annotations

import argparse
import logging

from ..model_entry import begin, parser as entry_parser, refuse_folder

log = logging.getLogger("mlxgate.vision")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = entry_parser("python -m mlxgate.vision.entry", "Serve one vision-language model to the mlxgate relay.")
    parser.add_argument("--kind", choices=("vision",), help="the model entry's kind (there is one)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="answer length when a request names none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    secret = begin()
    args = parse(argv)
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        refuse_folder("vision models need mlx-vlm, the vision extra: pip install 'mlxgate[vision]' "
                      "(or ./install.sh --vision)")
    from .server import App, Engine, Worker, make_server

    try:
        engine = Engine(args.model)
    except Exception as exc:  # mlx-vlm raises whatever its loaders raise
        refuse_folder(f"mlx-vlm cannot load {args.model}: {type(exc).__name__}: {exc}")
    server = make_server(App(engine, Worker(engine), args.model.name, secret, args.max_tokens), args.host, args.port)
    log.info("serving %s (vision, mlx-vlm) on %s:%d", args.model, args.host, args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
