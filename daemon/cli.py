"""`mlxgate`: every command of the gateway. Errors become one clear line and exit code 1."""

from __future__ import annotations

import argparse
import json
import subprocess
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
    """The effective config; commands that talk to a running daemon see its start flags too."""
    if args.command != "start":
        from .config import runtime_home
        from .supervision.control import load_start_options

        saved = load_start_options(runtime_home())
        saved.pop("use_sudo", None)
        overrides = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    return load_config(overrides=overrides)


def _client(config: Config):
    from .client import WrapperClient
    return WrapperClient(config.wrapper_url, config.api_key)


# ------------------------------------------------------------------ wrapper
@command("wrapper")
def cmd_wrapper(args: argparse.Namespace) -> int:
    from .wrapper.serve import run

    from .supervision.parent_watch import watch_parent

    config = _config(args, default_model=args.default_model, autocomplete_model=args.autocomplete_model)
    watch_parent()
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

    spec = DemoModelSpec(layers=args.layers, hidden=args.hidden, seed=args.seed, scripted=args.scripted,
                         context=args.context)
    target = Path(args.dir).expanduser()
    started = time.monotonic()
    build_demo_model(target, spec)
    kind = ("scripted model (fixed answers, a tool call when tools are offered)" if spec.scripted
            else "random-weight model")
    what = "It answers from its script." if spec.scripted else "It answers nonsense, quickly."
    print(f"built a tiny {kind} in {target} ({spec.layers} layers, hidden {spec.hidden}, "
          f"seed {spec.seed}) in {time.monotonic() - started:.1f} s. {what}\n"
          f"Serve it: put it under a model directory (model_dirs) and `mlxgate load NAME`, NAME being "
          f"its folder path inside that directory.")
    return 0


# ------------------------------------------------------------------ the daemon
START_FLAGS = ("port", "https_port", "max_tokens", "default_model", "autocomplete_model", "enable_https",
               "ssl_domain", "fixed_model")


def _start_overrides(args: argparse.Namespace) -> dict:
    overrides = {key: getattr(args, key, None) for key in START_FLAGS}
    overrides["enable_https"] = True if (args.enable_https or args.ssl_domain) else None
    return {k: v for k, v in overrides.items() if v is not None}


@command("start")
def cmd_start(args: argparse.Namespace) -> int:
    from .config import runtime_home
    from .supervision import control

    if args.install_dependencies:
        from . import PROJECT_ROOT
        print("running ./install.sh --no-service", flush=True)
        if subprocess.call([str(PROJECT_ROOT / "install.sh"), "--no-service", "--quiet"]) != 0:
            raise MlxgateError("./install.sh failed; see its output above")
    control.ensure_api_key(runtime_home())
    overrides = _start_overrides(args)
    config = _config(args, **overrides)
    if args.download_model:
        from .download import download
        print(f"downloading {args.download_model}...", flush=True)
        download(args.download_model)
    started = time.monotonic()
    control.start(config, use_sudo=args.use_sudo, say=lambda line: print(line, flush=True))
    control.save_start_options(config, {**overrides, "use_sudo": args.use_sudo})
    print(f"\nmlxgate is running ({time.monotonic() - started:.1f} s):")
    print(f"  HTTP   {config.http_url}   (Anthropic /v1/messages, OpenAI /v1/chat/completions)")
    if config.enable_https:
        print(f"  HTTPS  {config.https_url}   (trust {config.ssl_path / 'ca.pem'})")
    print(f"  wrapper {config.wrapper_url}")
    print("Point clients at it: eval \"$(mlxgate env)\"   Stop it: mlxgate stop")
    return 0


@command("stop")
def cmd_stop(args: argparse.Namespace) -> int:
    from .supervision import control

    if control.stop(_config(args)):
        print("mlxgate stopped")
    else:
        print("mlxgate is not running")
    return 0


@command("restart")
def cmd_restart(args: argparse.Namespace) -> int:
    from .config import runtime_home
    from .supervision import control

    if args.program:
        supervisor = control.Supervisor(runtime_home())
        if not supervisor.running():
            raise MlxgateError("mlxgate is not running; start it with `mlxgate start`")
        for name in args.program:
            if name not in control.PROGRAMS:
                raise MlxgateError(f"unknown program {name!r}; expected one of {', '.join(control.PROGRAMS)}")
            for call in (supervisor.rpc.supervisor.stopProcess, supervisor.rpc.supervisor.startProcess):
                try:
                    call(name)
                except Exception as exc:  # xmlrpc Fault: NOT_RUNNING on stop is fine
                    if "NOT_RUNNING" not in str(exc):
                        raise MlxgateError(f"cannot restart {name}: {exc}") from None
            print(f"{name} restarted")
        return 0
    options = control.load_start_options(runtime_home())
    use_sudo = options.pop("use_sudo", False)
    config = _config(args, **options)
    control.stop(config)
    control.start(config, use_sudo=use_sudo, say=lambda line: print(line, flush=True))
    print("mlxgate restarted")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    from .supervision import control

    healthy, rows = control.status(_config(args))
    _table(("PART", "STATE", "DETAIL"), rows)
    return 0 if healthy else 1


@command("logs")
def cmd_logs(args: argparse.Namespace) -> int:
    config = _config(args)
    names = args.program or ["wrapper", "proxy", "proxy_https", "group_down", "supervisord"]
    paths = [config.log_dir / f"{name}.log" for name in names]
    paths = [p for p in paths if p.exists()]
    if not paths:
        raise MlxgateError(f"no logs in {config.log_dir}")
    command_line = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(p) for p in paths]
    return subprocess.call(command_line)


@command("env")
def cmd_env(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.api_key:
        raise MlxgateError("no API key yet: run `mlxgate start` (or ./install.sh) to make one")
    base = config.https_url if args.https else config.http_url
    print(f"export ANTHROPIC_BASE_URL={base}")
    print(f"export ANTHROPIC_API_KEY={config.api_key}")
    print(f"export OPENAI_BASE_URL={base}/v1")
    print(f"export OPENAI_API_KEY={config.api_key}")
    if args.https:
        print(f"export NODE_EXTRA_CA_CERTS={config.ssl_path / 'ca.pem'}")
    return 0


@command("cert")
def cmd_cert(args: argparse.Namespace) -> int:
    from .certs import ensure_ca, ensure_leaf

    config = _config(args)
    _, _, made_ca = ensure_ca(config.ssl_path)
    cert, key, made = ensure_leaf(config.ssl_path, args.domain)
    ca = config.ssl_path / "ca.pem"
    print(f"{'made' if made_ca else 'kept'} certificate authority {ca}")
    print(f"{'made' if made else 'kept'} certificate {cert} and key {key} for localhost, 127.0.0.1, ::1"
          + (f" and {args.domain}" if args.domain else ""))
    print(f"Trust the authority once: macOS `sudo security add-trusted-cert -d -r trustRoot -k "
          f"/Library/Keychains/System.keychain {ca}`; Node `NODE_EXTRA_CA_CERTS={ca}`; "
          f"Python `SSL_CERT_FILE` or an ssl context with cafile={ca}.")
    return 0


@command("check")
def cmd_check(args: argparse.Namespace) -> int:
    from .checks import run_checks

    config = _config(args)
    port = args.port or (config.https_port if args.https else config.port)
    return 0 if run_checks(config, port, args.api, args.prompt, args.max_tokens, https=args.https) else 1


@command("proxy")
def cmd_proxy(args: argparse.Namespace) -> int:
    from .proxy.server import run
    from .supervision.parent_watch import watch_parent

    watch_parent()
    run(_config(args), https=args.https)
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

    p = sub.add_parser("start", help="start the whole gateway under supervisord")
    p.add_argument("--port", type=int, help="HTTP proxy port (default 11432)")
    p.add_argument("--https-port", type=int, help="HTTPS proxy port (default 11433)")
    p.add_argument("--enable-https", action="store_true", help="also serve HTTPS with the local CA")
    p.add_argument("--ssl-domain", help="extra certificate domain, e.g. api.anthropic.com (implies HTTPS)")
    p.add_argument("--max-tokens", type=int, help="cap on tokens per answer (default 8192)")
    p.add_argument("--default-model", help="model for claude-*/gpt-* names, loaded at start")
    p.add_argument("--autocomplete-model", help="small model kept loaded for autocomplete")
    p.add_argument("--fixed-model", help="serve every requested name with this one model")
    p.add_argument("--use-sudo", action="store_true", help="start the listeners through sudo (ports < 1024)")
    p.add_argument("--download-model", metavar="MODEL", help="download MODEL before starting")
    p.add_argument("--install-dependencies", action="store_true", help="run ./install.sh first")

    sub.add_parser("stop", help="stop the gateway")
    p = sub.add_parser("restart", help="restart the gateway (or only the named programs)")
    p.add_argument("program", nargs="*", help="wrapper, proxy or proxy_https")
    sub.add_parser("status", help="show each program and endpoint; non-zero exit when anything is down")
    p = sub.add_parser("logs", help="show the programs' logs")
    p.add_argument("program", nargs="*")
    p.add_argument("-n", "--lines", type=int, default=40)
    p.add_argument("-f", "--follow", action="store_true")
    p = sub.add_parser("env", help="print export lines for Anthropic and OpenAI clients")
    p.add_argument("--https", action="store_true", help="use the HTTPS listener")
    p = sub.add_parser("cert", help="make the local certificate authority and a certificate")
    p.add_argument("--domain", help="also valid for this domain (e.g. api.anthropic.com)")
    p = sub.add_parser("check", help="send real requests with the official SDKs to a running gateway")
    p.add_argument("--api", choices=("anthropic", "openai", "all"), default="all")
    p.add_argument("--port", type=int)
    p.add_argument("--https", action="store_true")
    p.add_argument("--prompt", default="Say hello in five words.")
    p.add_argument("--max-tokens", type=int, default=32)
    p = sub.add_parser("proxy", help="run one LiteLLM proxy listener in the foreground (used by supervisord)")
    p.add_argument("--https", action="store_true")

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
    p.add_argument("--context", type=int, default=2048, help="context window it declares (tokens)")
    p.add_argument("--scripted", action="store_true",
                   help="deterministic answers: a greeting, a get_weather tool call when tools are offered, "
                        "an answer after the tool result, thinking when enabled")
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
