"""`mlxgate`: every command of the gateway. Errors become one clear line and exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import Config, load_config, runtime_home
from .errors import MlxgateError

class Commands(click.Group):
    """Runs one command; its return value is the exit code, an `MlxgateError` one line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            code = super().invoke(ctx)
        except MlxgateError as exc:
            click.echo(f"mlxgate {ctx.invoked_subcommand}: error: {exc}", err=True)
            code = 1
        except KeyboardInterrupt:
            code = 130
        ctx.exit(code or 0)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlxgate", message="%(prog)s %(version)s")
def cli():
    """mlxgate: a local LLM gateway serving MLX models behind the Anthropic and OpenAI APIs."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="mlxgate")


def _config(saved: bool = True, **flags) -> Config:
    """The effective config: flags given now > environment > flags saved by the last start > file."""
    from .runtime_files import load_start_options

    return load_config(overrides=flags, start_flags=load_start_options(runtime_home()) if saved else None)


def _client(config: Config):
    from .client import WrapperClient
    return WrapperClient(config.wrapper_url, config.api_key)


# ------------------------------------------------------------------ the daemon
def start_options(command):
    """The options of `mlxgate start`, which `mlxgate service install` takes too (the
    service starts with them)."""
    options = [
        click.option("--port", type=int, help="HTTP proxy port (default 11432)"),
        click.option("--https-port", type=int, help="HTTPS proxy port (default 11433)"),
        click.option("--enable-https", is_flag=True, help="also serve HTTPS with the local CA"),
        click.option("--ssl-domain", help="extra certificate domain, e.g. api.anthropic.com (implies HTTPS)"),
        click.option("--stand-in-any-key", is_flag=True,
                     help="while standing in for --ssl-domain, let loopback clients in with any key"),
        click.option("--max-tokens", type=int, help="cap on tokens per answer (default 8192)"),
        click.option("--default-model", help="model for claude-*/gpt-* names, loaded at start"),
        click.option("--autocomplete-model", help="small model kept loaded for autocomplete"),
        click.option("--fixed-model", help="serve every requested name with this one model"),
        click.option("--use-sudo", is_flag=True, help="start the listeners through sudo (ports < 1024)"),
        click.option("--listen", metavar="ADDRESS",
                     help="also serve the relay to other gateways at ADDRESS (TLS, key required)"),
        click.option("--listen-port", type=int, help="port of that TLS listener (default 11435)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _start_flags(flags: dict) -> dict:
    """The settings given as options, by key (flags not given are left out)."""
    if flags.get("ssl_domain"):
        flags["enable_https"] = True
    return {key: value for key, value in flags.items() if value is not None and value is not False}


def _as_arguments(flags: dict, use_sudo: bool) -> list[str]:
    """Settings back into `mlxgate start` options (what the boot service runs with)."""
    from .config import SETTINGS

    args = []
    for key, value in sorted(flags.items(), key=lambda item: [s.key for s in SETTINGS].index(item[0])):
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args + (["--use-sudo"] if use_sudo else [])


def _fetch(model: str, config_flags: dict) -> None:
    """`--download-model`: fetch MODEL unless it is here; it becomes the default model
    when no other is named."""
    from .download import download

    config_flags.setdefault("default_model", model)
    if not dict(_missing(_config(saved=False, default_model=model))):
        print(f"{model} is on this machine; not downloading", flush=True)
        return
    print(f"downloading {model}...", flush=True)
    download(model)


def _missing(config: Config) -> list:
    from .supervision.preflight import missing_models
    return missing_models(config)


def _service_manager(config: Config):
    """The service manager, when the boot service is installed for this runtime folder and
    the manager runs (else the gateway is started and stopped directly)."""
    from .system import install, service

    if not install.load_record(config.home).get("service"):
        return None
    manager = service.manager()
    return manager if manager.path.exists() and manager.manager_running() else None


@cli.command()
@start_options
@click.option("--download-model", metavar="MODEL",
              help="download MODEL first (unless it is here); it is the default model unless --default-model names another")
@click.option("--run-install", is_flag=True, help="run the checkout's ./install.sh --no-service first")
@click.option("--install-dependencies", "old_run_install", is_flag=True, hidden=True)  # its name until 0.x: warns
@click.option("--foreground", is_flag=True,
              help="run supervisord in the foreground until it stops (what the boot service runs); exit status "
                   "0 stopped on request, 75 the group went down, 78 a restart would not help")
@click.option("--blocked-exit-code", type=int, default=78, show_default=True,
              help="with --foreground: the exit status when a restart would not help (launchd's plist says 0)")
def start(use_sudo: bool, download_model: str | None, run_install: bool, old_run_install: bool, foreground: bool,
          blocked_exit_code: int, **flags) -> int:
    """start the whole gateway under supervisord; returns when it is healthy

    Prints the URLs. Through the boot service when it is installed (which starts with the flags ./install.sh was
    given). The flags of a start are saved: `restart` and the other commands use them.
    """
    # `flags` holds the options that are config settings, by their keys.
    from .supervision import control
    from .runtime_files import ensure_api_key

    if old_run_install:
        print("mlxgate start --install-dependencies is now --run-install (./install.sh's own "
              "--install-dependencies installs system packages)", file=sys.stderr, flush=True)
    if run_install or old_run_install:
        from . import PROJECT_ROOT
        from .project_files import IN_CHECKOUT
        if not IN_CHECKOUT:
            raise MlxgateError("--run-install runs the checkout's ./install.sh, and this mlxgate is not "
                               "run from a checkout. Fix: start without it (pip installed the dependencies).")
        print("running ./install.sh --no-service", flush=True)
        if subprocess.call([str(PROJECT_ROOT / "install.sh"), "--no-service", "--quiet"]) != 0:
            raise MlxgateError("./install.sh failed; see its output above")
    flags = _start_flags(flags)
    ensure_api_key(runtime_home())
    if download_model:
        _fetch(download_model, flags)
    config = _config(saved=False, **flags)  # this start's flags replace the saved ones
    say = lambda line: print(line, flush=True)  # noqa: E731
    if foreground:
        return control.run_foreground(config, use_sudo=use_sudo, say=say, flags=flags,
                                      blocked_exit=blocked_exit_code)
    started = time.monotonic()
    manager = _service_manager(config)
    if manager is not None:
        if flags or use_sudo:
            raise MlxgateError("the boot service is installed: it starts with the flags ./install.sh was given. "
                               "Change them with ./install.sh and the new flags, or run `mlxgate start` alone.")
        say(f"starting the boot service ({manager.kind})")
        control.start_through(manager.start, _config(), say)
    else:
        control.start(config, use_sudo=use_sudo, say=say, flags=flags)
    config = _config()
    print(f"\nmlxgate is running ({time.monotonic() - started:.1f} s):")
    print(f"  HTTP   {config.http_url}   (Anthropic /v1/messages, OpenAI /v1/chat/completions)")
    if config.ollama_port:
        print(f"  Ollama http://127.0.0.1:{config.ollama_port}   (Ollama's API, this machine only, no key)")
    if config.enable_https:
        print(f"  HTTPS  {config.https_url}   (trust {config.ssl_path / 'ca.pem'})")
    print(f"  wrapper {config.wrapper_url}")
    print("Point clients at it: eval \"$(mlxgate env)\"   Stop it: mlxgate stop")
    return 0


@cli.command()
def stop() -> int:
    """stop the gateway: every process of ours, model servers included

    Through the service manager when the boot service is installed (the service stays
    installed; `mlxgate start` starts it again).
    """
    from .supervision import control
    from .supervision.programs import Supervisor

    config = _config()
    manager = _service_manager(config)
    if manager is not None:
        was = Supervisor(config.home).running()
        manager.stop()  # through the manager, or it would start the gateway again
        control.stop(config, say=lambda _: None)
        print("mlxgate stopped (the boot service stays installed; `mlxgate start` starts it)" if was
              else "mlxgate is not running")
        return 0
    print("mlxgate stopped" if control.stop(config) else "mlxgate is not running")
    return 0


@cli.command()
@click.argument("program", nargs=-1)
def restart(program: tuple[str, ...]) -> int:
    """restart the gateway, or only the named programs; returns when what restarted answers

    The gateway restarts with the flags of the last start. PROGRAM is wrapper, proxy or
    proxy_https; a restarted wrapper answers once its models are loaded.
    """
    from .supervision import control
    from .runtime_files import load_start_options

    config = _config()
    say = lambda line: print(line, flush=True)  # noqa: E731
    if program:
        for name in program:
            control.restart_program(config, name, say)
            print(f"{name} restarted and answers")
        return 0
    manager = _service_manager(config)
    if manager is not None:
        control.start_through(manager.restart, config, say)
    else:
        use_sudo = load_start_options(config.home).get("use_sudo", False)
        control.stop(config)
        control.start(config, use_sudo=use_sudo, say=say)
    print("mlxgate restarted")
    return 0


@cli.command()
def status() -> int:
    """show each program and endpoint; exit 1 when anything is down

    Then the boot service (installed, enabled, running), the hosts this gateway sends requests
    to, and why the last start gave up, if it did (`mlxgate doctor` shows the fix).
    """
    from .supervision import control
    from .supervision import health

    config = _config()
    healthy, rows = health.status(config)
    rows.append(_service_row(config))
    rows += _host_rows(config)
    cause = control.blocked_cause(config.home)
    if cause:
        healthy = False
        rows.append(("last start", "BLOCKED", f"{cause['at']}: {cause['error'].splitlines()[0]} "
                                               f"(`mlxgate doctor` shows the fix)"))
    _table(("PART", "STATE", "DETAIL"), rows)
    return 0 if healthy else 1


def _host_rows(config: Config) -> list[tuple[str, str, str]]:
    """This machine's listener (what other gateways pin) and each host it sends requests to."""
    from .hosts.admit import listen_row, rows

    listen = listen_row(config)
    return ([listen] if listen else []) + rows(config)


def _service_row(config: Config) -> tuple[str, str, str]:
    from .system import install, service

    if not install.load_record(config.home).get("service"):
        return ("boot service", "NONE", "not installed (./install.sh installs it)")
    state = service.manager().state()
    if not state.installed:
        return ("boot service", "MISSING", f"{state.path} is gone; run ./install.sh again")
    enabled = "enabled" if state.enabled else "not enabled"
    running = {True: "running", False: f"not running ({state.detail})", None: state.detail}[state.active]
    return ("boot service", "ENABLED" if state.enabled else "INSTALLED", f"{state.kind} {state.path}: "
                                                                          f"{enabled}, {running}")


@cli.command()
@click.argument("program", nargs=-1)
@click.option("-n", "--lines", type=int, default=40, show_default=True, help="the last lines of each log")
@click.option("-f", "--follow", is_flag=True, help="keep printing what is written")
def logs(program: tuple[str, ...], lines: int, follow: bool) -> int:
    """show the programs' logs

    PROGRAM is wrapper, proxy, proxy_https, group_down, supervisord or service (the boot
    service's log); every one of them when none is named.
    """
    config = _config()
    names = program or ("wrapper", "proxy", "proxy_https", "group_down", "supervisord", "service")
    paths = [config.log_dir / f"{name}.log" for name in names]
    paths = [p for p in paths if p.exists()]
    if not paths:
        raise MlxgateError(f"no logs in {config.log_dir}")
    return subprocess.call(["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(p) for p in paths])


def _launch_target(config: Config, agent: str, https: bool, model: str | None):
    from .launch import Target

    if not config.api_key:
        raise MlxgateError("no API key yet: run `mlxgate start` (or ./install.sh) to make one")
    main = model or config.default_model
    if not main:
        raise MlxgateError("no model to launch with: pass --model NAME or set default_model")
    ca, bundle = _authority(config, https)
    return Target(config.https_url if https else config.http_url, config.api_key, main,
                  model or config.autocomplete_model or main, _context_window(config, main),
                  config.home / "launch" / agent, ca, bundle)


def _authority(config: Config, wanted: bool) -> tuple[Path | None, Path | None]:
    """The local authority and certifi's roots with it (for CA variables that replace the roots),
    when `wanted` and the authority exists; else (None, None)."""
    ca = config.ssl_path / "ca.pem"
    if not (wanted and ca.exists()):
        return None, None
    from .certs import write_bundle
    return ca, write_bundle(ca, config.home / "ca-bundle.pem")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("agent")
@click.option("--model", help="the model of every tier (default: default_model, and autocomplete_model for the "
                              "small tier)")
@click.option("--https", is_flag=True, help="use the HTTPS listener")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(agent: str, model: str | None, https: bool, args: tuple[str, ...]) -> int:
    """run a coding agent set up for the gateway: mlxgate launch claude -- -p TASK

    AGENT is claude, codex, qwen, opencode, pi, copilot, cline, kilo, cn (Continue), aider,
    vibe (mistral-vibe) or openhands; the ARGS after -- go to the agent (see docs/agents.md).
    """
    import os

    from .launch import executable, prepare

    setup = prepare(agent, _launch_target(_config(), agent, https, model))
    binary = executable(agent)
    if args[:1] == ("--",):  # click keeps the separator of `mlxgate launch AGENT -- ARGS`
        args = args[1:]
    os.execvpe(binary, [binary, *setup.args, *args], {**os.environ, **setup.env})
    return 0  # not reached


@cli.command()
@click.option("--https", is_flag=True, help="use the HTTPS listener")
@click.option("--codex", is_flag=True, help="print Codex CLI's provider config (TOML) instead")
@click.option("--for", "agent", metavar="AGENT", help="print what `mlxgate launch AGENT` sets (the agents of `mlxgate launch --help`)")
@click.option("--model", help="with --for: the model of every tier")
def env(https: bool, codex: bool, agent: str | None, model: str | None) -> int:
    """print export lines for Anthropic, OpenAI and Ollama clients: eval "$(mlxgate env)"

    With the CA variables when HTTPS is on, and Claude Code's context window. With --codex,
    Codex CLI's provider config (TOML) instead; with --for AGENT, what `mlxgate launch AGENT`
    sets.
    """
    config = _config()
    if agent:
        from .launch import prepare, shell_lines

        print("\n".join(shell_lines(agent, prepare(agent, _launch_target(config, agent, https, model)))))
        return 0
    if not config.api_key:
        raise MlxgateError("no API key yet: run `mlxgate start` (or ./install.sh) to make one")
    base = config.https_url if https else config.http_url
    if codex:
        print(_codex_config(config, base))
        return 0
    print(f"export ANTHROPIC_BASE_URL={base}")
    print(f"export ANTHROPIC_API_KEY={config.api_key}")
    print(f"export OPENAI_BASE_URL={base}/v1")
    print(f"export OPENAI_API_KEY={config.api_key}")
    if config.ollama_port:
        print(f"export OLLAMA_HOST=127.0.0.1:{config.ollama_port}")  # Ollama's clients; no key there
    ca, bundle = _authority(config, https or config.enable_https)
    if ca:
        print(f"export NODE_EXTRA_CA_CERTS={ca}")  # Node adds these to its own roots
        print(f"export SSL_CERT_FILE={bundle}")  # these replace the roots: certifi's plus ours
        print(f"export REQUESTS_CA_BUNDLE={bundle}")
    print("export CLAUDE_CODE_ATTRIBUTION_HEADER=0")  # a per-session line atop its system prompt: no cache
    window = _context_window(config)
    if window:
        print(f"export CLAUDE_CODE_AUTO_COMPACT_WINDOW={window}")
        if window < CLAUDE_CODE_MIN_WINDOW:
            print(f"# Claude Code raises CLAUDE_CODE_AUTO_COMPACT_WINDOW to at least {CLAUDE_CODE_MIN_WINDOW} and "
                  f"takes claude-* models to have 200K; for this {window}-token model it compacts in time when "
                  f"it asks for the model by its own name, with its window:")
            print(f"export ANTHROPIC_MODEL={config.default_model}")
            print(f"export CLAUDE_CODE_MAX_CONTEXT_TOKENS={window}")
    return 0


# Claude Code 2.1.197: the window it compacts for is min(the model's window,
# max(100000, CLAUDE_CODE_AUTO_COMPACT_WINDOW)); a model's window is 200K for claude-*
# names and CLAUDE_CODE_MAX_CONTEXT_TOKENS for others.
CLAUDE_CODE_MIN_WINDOW = 100_000


def _context_window(config: Config, model: str | None = None) -> int | None:
    """The context window of `model` (default: the default model), from its config.json."""
    from .catalog import context_length, for_config

    model = model or config.default_model
    if not model:
        return None
    try:
        return context_length(for_config(config).resolve(model).path)
    except MlxgateError:
        return None


def _codex_config(config: Config, base: str) -> str:
    """Codex CLI's provider config for this gateway; the window is the default model's, when known,
    so Codex compacts its conversation before the gateway would refuse it."""
    window = _context_window(config)
    lines = ["# Codex CLI: add to ~/.codex/config.toml (or pass each setting with -c), and run codex with",
             f"# MLXGATE_API_KEY={config.api_key} in its environment"
             + (f" and CODEX_CA_CERTIFICATE={config.ssl_path / 'ca.pem'} (the local authority)."
                if base.startswith("https:") else "."),
             'model = "gpt-5.5"  # gpt-* names are answered by the default model; or name a local model',
             'model_provider = "mlxgate"']
    if window:
        lines.append(f"model_context_window = {window}")
    lines += ["", "[model_providers.mlxgate]", 'name = "mlxgate"', f'base_url = "{base}/v1"',
              'env_key = "MLXGATE_API_KEY"', 'wire_api = "responses"']
    return "\n".join(lines)


@cli.command()
@click.option("--domain", help="also valid for this domain (e.g. api.anthropic.com)")
def cert(domain: str | None) -> int:
    """make the local certificate authority and a certificate (both kept when they exist)

    Prints how to trust the authority.
    """
    from .certs import ensure_ca, ensure_leaf

    config = _config()
    _, _, made_ca = ensure_ca(config.ssl_path)
    cert_path, key, made = ensure_leaf(config.ssl_path, domain)
    ca = config.ssl_path / "ca.pem"
    print(f"{'made' if made_ca else 'kept'} certificate authority {ca}")
    print(f"{'made' if made else 'kept'} certificate {cert_path} and key {key} for localhost, 127.0.0.1, ::1"
          + (f" and {domain}" if domain else ""))
    print(f"Trust the authority once: macOS `sudo security add-trusted-cert -d -r trustRoot -k "
          f"/Library/Keychains/System.keychain {ca}`; Node `NODE_EXTRA_CA_CERTS={ca}`; "
          f"Python `SSL_CERT_FILE` or an ssl context with cafile={ca}.")
    return 0


@cli.command()
@click.option("--api", type=click.Choice(("anthropic", "openai", "all")), default="all", show_default=True,
              help="whose SDK sends the requests")
@click.option("--port", type=int, help="the gateway's port (default: the HTTP port, the HTTPS one with --https)")
@click.option("--https", is_flag=True, help="through the HTTPS listener")
@click.option("--prompt", default="Say hello in five words.", show_default=True, help="what each request asks")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="cap on each answer")
def check(api: str, port: int | None, https: bool, prompt: str, max_tokens: int) -> int:
    """send real requests with the official SDKs to a running gateway

    Anthropic's Messages, OpenAI's chat completions and Responses, streamed and not, with
    timings; exit 1 if any API fails.
    """
    from .checks import run_checks

    config = _config()
    port = port or (config.https_port if https else config.port)
    return 0 if run_checks(config, port, api, prompt, max_tokens, https=https) else 1


# ------------------------------------------------------------------ the programs supervisord runs
@cli.command()
@click.option("--https", is_flag=True, help="the HTTPS listener")
def proxy(https: bool) -> int:
    """run one proxy listener in the foreground, HTTP or (--https) HTTPS (supervisord runs them)"""
    from .proxy.server import run
    from .supervision.parent_watch import watch_parent

    watch_parent()
    run(_config(), https=https)
    return 0


@cli.command()
@click.option("--default-model", help="the default model, loaded and pinned at start")
@click.option("--autocomplete-model", help="the autocomplete model, loaded and pinned at start")
def wrapper(default_model: str | None, autocomplete_model: str | None) -> int:
    """run the MLX wrapper in the foreground (used by supervisord)

    The management API and the resident set of model servers.
    """
    from . import seats
    from .supervision.parent_watch import watch_parent
    from .wrapper.serve import run

    config = _config(default_model=default_model, autocomplete_model=autocomplete_model)
    watch_parent()
    places = ", ".join(f"{seat.what} on port {seats.port_of(config, seat)}" for seat in seats.SEATS)
    print(f"mlxgate wrapper: management API on {config.wrapper_url}; {places}; other models on ports "
          f"chosen when they load", file=sys.stderr, flush=True)
    run(config)
    return 0


# ------------------------------------------------------------------ models
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the wrapper's JSON answer")
def models(as_json: bool) -> int:
    """list local models: their weights' size, their state and the memory budget

    The local models are listed also while the gateway is stopped.
    """
    from .client import WrapperError
    from .resident_view import budget_line, size

    config = _config()
    try:
        data = _client(config).models()
    except WrapperError as exc:
        if exc.kind != "wrapper_down":
            raise
        from .catalog import for_config
        from .wrapper.memory import weights_bytes
        data = {"models": [{"name": m.name, "source": m.source, "path": str(m.path), "state": "stopped",
                            "size_bytes": weights_bytes(m.path), "loaded": False}
                           for m in for_config(config).list()], "servers": {}}
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [(m["name"], m["source"], size(m.get("size_bytes")), m.get("state") or "-", m["path"])
            for m in data["models"]]
    _table(("MODEL", "SOURCE", "WEIGHTS", "STATE", "PATH"), rows)
    print()
    if not data["servers"]:
        print("the gateway is not running: nothing is loaded (`mlxgate start`)")
    else:
        print(budget_line(data.get("memory") or {}))
    if not data["models"]:
        print("\nNo models found. Put model folders under a model directory (model_dirs), run "
              "`mlxgate download MODEL`, or make a tiny one with `mlxgate demo-model DIR`.")
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def ps(as_json: bool) -> int:
    """list the loaded models, like `ollama ps`

    Each one's state, port, memory, requests running and waiting, idle time and when it
    unloads; then the memory budget and the unloads so far.
    """
    from .resident_view import budget_line, rows

    data = _client(_config()).models()
    shown = rows(data["servers"])
    if as_json:
        print(json.dumps({"models": shown, "memory": data.get("memory")}, indent=2))
        return 0
    if shown:
        _table(("MODEL", "STATE", "PORT", "MEMORY", "RUNNING", "WAITING", "IDLE", "UNLOADS", "DETAIL"),
               [(r["model"], r["state"], r["port"] or "-", r["memory"], r["in_flight"], r["queued"], r["idle"],
                 r["unloads"], r["detail"]) for r in shown])
    else:
        print("no model is loaded")
    print(budget_line(data.get("memory") or {}))
    return 0


@cli.command()
@click.argument("model")
def load(model: str) -> int:
    """load a model into the resident set; waits until it answers

    Idle models are unloaded when it needs their room.
    """
    print(f"loading {model}...", file=sys.stderr, flush=True)
    started = time.monotonic()
    status = _client(_config()).load(model)
    from .resident_view import size
    print(f"{status['model']} is ready on port {status['port']} (pid {status['pid']}, {size(status['cost_bytes'])}) "
          f"after {time.monotonic() - started:.1f} s")
    return 0


@cli.command()
@click.argument("model")
def unload(model: str) -> int:
    """unload a model (after its running requests, up to drain_timeout)"""
    status = _client(_config()).unload(model)
    print(f"{status['model']} is {status['state']}"
          + (" (pinned: a request for it loads it again)" if status.get("pinned") else ""))
    return 0


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the listing as JSON")
@click.pass_context
def cache(ctx: click.Context, as_json: bool) -> int:
    """list the prompt caches kept on disk; `clear` and `verify` them

    Per model, each stored prefix's tokens, size, kind and last use, in the runtime folder's
    kv/ (see "The prompt cache on disk" in docs/architecture.md).
    """
    if ctx.invoked_subcommand is not None:
        return 0
    from dataclasses import asdict

    from .prompt_disk.store import list_models
    from .resident_view import size

    config = _config()
    root = _prompt_disk(config)
    stored = list_models(root)
    if as_json:
        print(json.dumps({"root": str(root), "limit": config.prompt_cache_disk,
                          "models": [asdict(m) for m in stored]}, indent=2))
        return 0
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"  # noqa: E731
    rows = [(m.name or m.path or m.fp[:16], f"{e.tokens:,}", size(e.bytes), e.cache_type, when(e.last_used))
            for m in stored for e in m.entries]
    if rows:
        _table(("MODEL", "TOKENS", "SIZE", "KIND", "LAST USE"), rows)
    total = sum(m.bytes for m in stored)
    limit = f"limit {size(config.prompt_cache_disk)}" if config.prompt_cache_disk else "off (prompt_cache_disk 0)"
    print(f"{len(rows)} prefixes of {len(stored)} models, {size(total)} on disk in {root} ({limit})")
    return 0


@cache.command("clear")
@click.argument("model", required=False)
def cache_clear(model: str | None) -> int:
    """delete every stored prefix, or MODEL's (its name, folder or fingerprint)

    A model still loaded writes what it has pending afterwards, so unload it first to leave
    nothing of it.
    """
    from .prompt_disk.store import clear
    from .resident_view import size

    cleared = clear(_prompt_disk(_config()), model)
    if model and not cleared.models:
        raise MlxgateError(f"no prompt cache on disk for {model!r}; `mlxgate cache` lists what is stored")
    print(f"cleared {cleared.chunks} chunks, {size(cleared.bytes)}"
          + (f" of {', '.join(cleared.models)}" if cleared.models else ""))
    return 0


@cache.command("verify")
def cache_verify() -> int:
    """read every stored chunk and discard those that fail their checks"""
    from .prompt_disk.store import verify

    checked = verify(_prompt_disk(_config()))
    print(f"{checked.ok} chunks read back whole; {checked.discarded} discarded")
    return 0


def _prompt_disk(config: Config) -> Path:
    from .wrapper.fleet import PROMPT_DISK_FOLDER
    return config.home / PROMPT_DISK_FOLDER


@cli.command()
@click.argument("model")
@click.option("--dir", "folder", help="download into this folder instead of the Hugging Face cache")
def download(model: str, folder: str | None) -> int:
    """download a model from the Hugging Face hub

    MODEL is a hub id, or a bare name resolved to mlx-community/NAME. Offline (HF_HUB_OFFLINE
    set) it fails at once and says so.
    """
    from .download import download as fetch, hub_id

    print(f"downloading {hub_id(model)}...", file=sys.stderr, flush=True)
    path = fetch(model, Path(folder) if folder else None)
    print(f"downloaded to {path}")
    return 0


@cli.command("demo-model")
@click.argument("folder", metavar="DIR")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights")
@click.option("--layers", type=int, default=2, show_default=True, help="transformer layers")
@click.option("--hidden", type=int, default=64, show_default=True, help="hidden size")
@click.option("--context", type=int, default=2048, show_default=True, help="context window it declares (tokens)")
@click.option("--scripted", is_flag=True,
              help="deterministic answers: a greeting, a get_weather tool call when tools are offered, "
                   "an answer after the tool result, thinking when enabled (with --vision: one fixed answer)")
@click.option("--fim", is_flag=True, help="fill-in-the-middle tokens (Qwen2.5-Coder's); with --scripted the middle "
                                         "is always `return a + b`")
@click.option("--kind", type=click.Choice(["chat", "embedding", "reranker", "decoder-embedding"]), default="chat",
              help="chat (default); embedding: a BERT sentence-transformers folder; reranker: a BERT cross-encoder; "
                   "decoder-embedding: Qwen3-Embedding's layout (last-token pooling, Matryoshka dimensions)")
@click.option("--vision", is_flag=True, help="a vision-language model (Qwen2.5-VL's layout, random weights) that "
                                            "reads images; served by mlx-vlm, the vision extra")
@click.option("--steps", "steps_file", type=click.Path(exists=True, dir_okay=False),
              help="with --scripted: a JSON list of steps, each {\"tool\": NAME, \"arguments\": {...}} or "
                   "{\"text\": TEXT}; step N answers after N tool results while tools are offered")
def demo_model(folder: str, seed: int, layers: int, hidden: int, context: int, scripted: bool, fim: bool,
               kind: str, vision: bool, steps_file: str | None) -> int:
    """build a tiny model offline, for trying the stack

    Random weights (it answers nonsense, fast), or fixed answers with --scripted; --kind and
    --vision build the other kinds of model.
    """
    from .demo_model import DemoModelSpec, build_demo_model, step_text

    if vision:
        from .demo_vision import TinyVLMSpec, build_tiny_vlm

        started = time.monotonic()
        if steps_file or fim:
            raise click.UsageError("--vision takes --scripted (a fixed answer), not --steps or --fim")
        build_tiny_vlm(Path(folder).expanduser(), TinyVLMSpec(text_layers=layers, text_hidden=hidden, seed=seed,
                                                              scripted=scripted))
        print(f"built a tiny {'scripted' if scripted else 'random-weight'} vision model (Qwen2.5-VL) in {folder} in "
              f"{time.monotonic() - started:.1f} s. "
              f"Serve it (needs the vision extra: ./install.sh --vision): put it under a model directory "
              f"(model_dirs) and send it an image by its folder path inside that directory.")
        return 0

    if kind != "chat":
        from .demo_embedding import build

        given = click.get_current_context().get_parameter_source
        refused = [f"--{name.removesuffix('_file')}" for name in ("scripted", "fim", "steps_file", "context")
                   if given(name) != click.core.ParameterSource.DEFAULT]
        if refused:
            raise click.UsageError(f"--kind {kind} takes --seed, --hidden and --layers, not {', '.join(refused)}")
        started = time.monotonic()
        try:
            build(Path(folder).expanduser(), kind, seed, hidden, layers)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        print(f"built a random-weight {kind} model ({layers} layers, hidden {hidden}) in {folder} in "
              f"{time.monotonic() - started:.1f} s. "
              f"Serve it: put it under a model directory (model_dirs) and ask /v1/"
              f"{'rerank' if kind == 'reranker' else 'embeddings'} for it by its folder path inside that directory.")
        return 0
    steps: tuple[str, ...] = ()
    if steps_file:
        if not scripted:
            raise click.UsageError("--steps needs --scripted")
        try:
            listed = json.loads(Path(steps_file).read_text())
            steps = tuple(step_text(step) for step in listed)
        except (ValueError, TypeError, AttributeError) as e:
            raise click.UsageError(f"{steps_file}: {e}") from None
    spec = DemoModelSpec(layers=layers, hidden=hidden, seed=seed, scripted=scripted, context=context, fim=fim,
                         steps=steps)
    target = Path(folder).expanduser()
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


# ------------------------------------------------------------------ other machines
@cli.group()
def hosts():
    """other mlxgate machines this gateway sends requests to"""


@hosts.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--key", required=True, help="that host's API key (its `mlxgate env` prints it)")
@click.option("--fingerprint", help="its authority's fingerprint, when you have it (else you are asked)")
@click.option("--yes", is_flag=True, help="trust the fingerprint shown without asking")
def hosts_add(name: str, url: str, key: str, fingerprint: str | None, yes: bool) -> int:
    """add another gateway this one sends requests to (URL: https://ADDRESS:PORT)

    Its authority's fingerprint is shown and confirmed (or given with --fingerprint), then
    pinned; its key is checked, and that its model names mean the same models as here (see
    docs/hosts.md).
    """
    from .hosts.admit import add

    entry, answer = add(_config(), name, url, key, confirm=lambda text: yes or click.confirm(text),
                        expected=fingerprint)
    print(f"added host {entry.name} at {entry.url} ({len(answer.get('models') or ())} models); "
          f"restart the proxy to use it: `mlxgate restart proxy`")
    return 0


@hosts.command("remove")
@click.argument("name")
def hosts_remove(name: str) -> int:
    """forget a host (its entry, key and pinned authority)"""
    from .hosts.admit import remove

    entry = remove(_config(), name)
    print(f"removed host {entry.name}; restart the proxy to stop using it: `mlxgate restart proxy`")
    return 0


@hosts.command("list")
def hosts_list() -> int:
    """show each host: reachable or refused, loaded models, queues

    `mlxgate status` shows the same rows.
    """
    config = _config()
    rows = _host_rows(config)
    if not rows:
        print("no hosts: `mlxgate hosts add NAME https://ADDRESS:PORT --key KEY` adds one")
        return 0
    _table(("PART", "STATE", "DETAIL"), rows)
    return 0


# ------------------------------------------------------------------ this machine
@cli.group()
def service():
    """the boot service and what it needs on this machine (./install.sh runs these)"""


@service.command("install")
@start_options
@click.option("--enable-port-forward", is_flag=True, help="forward 443 on loopback to the HTTPS port (implies HTTPS)")
@click.option("--forward-http", is_flag=True, help="with --enable-port-forward: also forward 80 to the HTTP port")
@click.option("--trust-ca", is_flag=True, help="add the local certificate authority to the system trust store")
@click.option("--enable-linger", is_flag=True, help="Linux: run the service without a login (loginctl enable-linger)")
@click.option("--no-service", is_flag=True, help="set up the rest, register no boot service")
def service_install(use_sudo: bool, enable_port_forward: bool, forward_http: bool, trust_ca: bool,
                    enable_linger: bool, no_service: bool, **flags) -> int:
    """install the boot service (started with these start flags) and the steps asked for"""
    from .runtime_files import ensure_api_key, save_start_options
    """install the boot service (started with these start flags) and the steps asked for

    What ./install.sh runs after the Python install: certificates, the steps that need root
    (one sudo), the boot service.
    """
    from .supervision import control
    from .system import install

    if enable_port_forward:
        flags["enable_https"] = True
    flags = _start_flags(flags)
    ensure_api_key(runtime_home())
    config = _config(saved=False, **flags)  # checks the flags as `start` will
    save_start_options(config, {**flags, "use_sudo": use_sudo})  # later commands see them
    choices = install.Choices(flags=_as_arguments(flags, use_sudo), service=not no_service,
                              port_forward=enable_port_forward, forward_http=forward_http, trust_ca=trust_ca,
                              linger=enable_linger)
    install.install(config, choices, say=lambda line: print(line, flush=True))
    return 0


@service.command("uninstall")
def service_uninstall() -> int:
    """remove the boot service and every trace of the install

    What ./install.sh --uninstall runs: the service, the hosts line, the forwarding rules, the
    trust entry and the runtime folder.
    """
    from .system import install

    install.uninstall(_config(saved=False), say=lambda line: print(line, flush=True))
    return 0


@cli.command()
def doctor() -> int:
    """check what the gateway needs; each finding comes with its fix

    Ports, the API key file's mode, the models the start loads, certificates (expiry, names,
    trust), the hosts line, forwarding rules, `set skip on lo0` in pf.conf, the boot service.
    Exit 1 when anything is wrong.
    """
    from .doctor import diagnose, report

    return 0 if report(diagnose(_config())) else 1


@cli.command()
@click.option("--since", default="1d", show_default=True, help="how far back: 30m, 12h, 1d, 2w, or all")
@click.option("--by", "by", type=click.Choice(("model", "day", "api", "client", "route")), default="model",
              show_default=True, help="one row per")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def usage(since: str, by: str, as_json: bool) -> int:
    """requests, tokens and speed from the usage ledger

    One row per model, day, API, client or route (--by): requests, errors, cancellations, input, cached and output tokens, time to first
    token and tokens per second.
    """
    from .ledger import Ledger, parse_since

    config = _config()
    ledger = Ledger.for_config(config)
    try:
        rows = ledger.summary(parse_since(since), by)
    finally:
        ledger.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no requests in the usage ledger ({ledger.where}) since {since}")
        return 0

    def number(value, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"
    _table((by.upper(), "REQUESTS", "ERRORS", "CANCELLED", "INPUT", "CACHED", "OUTPUT", "FIRST TOKEN MS", "TOKENS/S"),
           [(r["key"], r["requests"], r["errors"], r["cancelled"], number(r["input_tokens"]),
             number(r["cached_tokens"]), number(r["output_tokens"]), number(r["ttft_ms"]),
             number(r["tokens_per_second"], 1)) for r in rows])
    return 0


@cli.group()
def docker() -> None:
    """the Docker stack in docker/ in front of mlxgate

    LiteLLM's admin UI, PostgreSQL, Prometheus and Grafana. mlxgate itself does not need Docker;
    these commands say so when it is missing.
    """


@docker.command("up")
@click.option("--max-tokens", type=int, help="cap LiteLLM applies to each answer it asks mlxgate for")
@click.option("--build", is_flag=True, help="build images that have a build section first")
def docker_up(max_tokens: int | None, build: bool) -> int:
    """start the stack (mlxgate itself stays on this machine)"""
    from .system import docker_stack

    return docker_stack.up(_config(), max_tokens=max_tokens, build=build, say=print)


@docker.command("down")
def docker_down() -> int:
    """stop the stack and remove its containers (its volumes stay)"""
    from .system import docker_stack

    return docker_stack.run(_config(), ["down"])


@docker.command("logs")
@click.argument("service", required=False)
@click.option("-f", "--follow", is_flag=True, help="keep printing what is written")
def docker_logs(service: str | None, follow: bool) -> int:
    """the stack's logs (one service: litellm_proxy, postgres, prometheus, grafana)"""
    from .system import docker_stack

    return docker_stack.run(_config(), ["logs", *(["-f"] if follow else [])], service)


@docker.command("restart")
@click.argument("service", required=False)
def docker_restart(service: str | None) -> int:
    """restart the stack's containers (one service: litellm_proxy, postgres, prometheus, grafana)"""
    from .system import docker_stack

    return docker_stack.run(_config(), ["restart"], service)


def _table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
