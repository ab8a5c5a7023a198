"""`mlxgate`: every command of the gateway. Errors become one clear line and exit code 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .config import Config, load_config
from .errors import MlxgateError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(func):
        COMMANDS[name] = func
        return func
    return register


def _config(args: argparse.Namespace, **overrides) -> Config:
    return load_config(overrides=overrides)


def _client(config: Config):
    from .client import WrapperClient
    return WrapperClient(config.wrapper_url, config.api_key)


# ------------------------------------------------------------------ wrapper
@command("wrapper")
def cmd_wrapper(args: argparse.Namespace) -> int:
    from .wrapper.serve import run

    config = _config(args, default_model=args.default_model, autocomplete_model=args.autocomplete_model)
    print(f"mlxgate wrapper: management API on {config.wrapper_url}, dynamic server on port "
          f"{config.dynamic_port}, autocomplete server on port {config.autocomplete_port}",
          file=sys.stderr, flush=True)
    run(config)
    return 0


@command("models")
def cmd_models(args: argparse.Namespace) -> int:
    data = _client(_config(args)).models()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [(m["name"], m["source"], ", ".join(f"{s['role']}:{s['state']}" for s in m["servers"]) or "-",
             m["path"]) for m in data["models"]]
    _table(("MODEL", "SOURCE", "LOADED", "PATH"), rows)
    print()
    for role, server in data["servers"].items():
        line = f"{role} server (port {server['port']}): {server['state']}"
        if server["model"]:
            line += f", {server['model']}"
        if server["error"]:
            line += f" - {server['error']}"
        print(line)
    if not data["models"]:
        print("\nNo models found. Put model folders under a model directory (model_dirs), run "
              "`mlxgate download MODEL`, or make a tiny one with `mlxgate demo-model DIR`.")
    return 0


@command("load")
def cmd_load(args: argparse.Namespace) -> int:
    print(f"loading {args.model} on the {args.server} server...", file=sys.stderr, flush=True)
    started = time.monotonic()
    status = _client(_config(args)).load(args.model, args.server)
    print(f"{status['model']} is ready on the {status['role']} server (port {status['port']}, "
          f"pid {status['pid']}) after {time.monotonic() - started:.1f} s")
    return 0


@command("unload")
def cmd_unload(args: argparse.Namespace) -> int:
    status = _client(_config(args)).unload(args.server)
    print(f"the {status['role']} server is {status['state']}")
    return 0


# ------------------------------------------------------------------ models on disk
@command("download")
def cmd_download(args: argparse.Namespace) -> int:
    from .download import download, hub_id

    print(f"downloading {hub_id(args.model)}...", file=sys.stderr, flush=True)
    path = download(args.model, Path(args.dir) if args.dir else None)
    print(f"downloaded to {path}")
    return 0


@command("demo-model")
def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo_model import DemoModelSpec, build_demo_model

    spec = DemoModelSpec(layers=args.layers, hidden=args.hidden, seed=args.seed)
    target = Path(args.dir).expanduser()
    started = time.monotonic()
    build_demo_model(target, spec)
    print(f"built a tiny random-weight model in {target} ({spec.layers} layers, hidden {spec.hidden}, "
          f"seed {spec.seed}) in {time.monotonic() - started:.1f} s. It answers nonsense, quickly.\n"
          f"Serve it: put it under a model directory (model_dirs) and `mlxgate load NAME`, NAME being "
          f"its folder path inside that directory.")
    return 0


def _table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxgate", description="mlxgate: a local LLM gateway serving MLX models behind the "
        "Anthropic and OpenAI APIs.")
    parser.add_argument("--version", action="version", version=f"mlxgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("wrapper", help="run the MLX wrapper (management API) in the foreground")
    p.add_argument("--default-model", help="model to load on the dynamic server at start")
    p.add_argument("--autocomplete-model", help="model to keep loaded on the autocomplete server")

    p = sub.add_parser("models", help="list local models and what is loaded")
    p.add_argument("--json", action="store_true", help="print the wrapper's JSON answer")

    p = sub.add_parser("load", help="load a model (waits until it answers)")
    p.add_argument("model")
    p.add_argument("--server", default="dynamic", choices=("dynamic", "autocomplete"))

    p = sub.add_parser("unload", help="stop a model server")
    p.add_argument("--server", default="dynamic", choices=("dynamic", "autocomplete"))

    p = sub.add_parser("download", help="download a model from the Hugging Face hub")
    p.add_argument("model", help="a hub id, or a bare name resolved to mlx-community/NAME")
    p.add_argument("--dir", help="download into this folder instead of the Hugging Face cache")

    p = sub.add_parser("demo-model", help="build a tiny random-weight model offline (for trying the stack)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MlxgateError as exc:
        print(f"mlxgate {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
