"""`mlxgate launch AGENT` and `mlxgate env --for AGENT`: what each coding agent needs to use the
gateway, set only in that agent's environment, its command line, or a config folder of its own
under the runtime folder; never in the user's own config files.

One row per agent (`AGENTS`). A row's `settings` takes a `Target` (the gateway's URLs, key, the
models of each tier, the window, the first-prefill timeout) and returns a `Setup`: environment
variables, arguments that go before the user's, and files to write first. What every row sets,
where the agent can take it: base URL and key; the model of each tier; the context window (so
the agent compacts before the model's limit); a time-to-first-byte timeout long enough for a
first prefill of the whole window; the attribution header off; nonessential traffic off.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .errors import MlxgateError

PREFILL_TOKENS_PER_SECOND = 100  # a slow machine's prefill rate: the timeout covers a whole window at it
MIN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Target:
    url: str             # the HTTP (or HTTPS) listener, without /v1
    key: str
    model: str           # the main tier's model
    small: str           # the small / fast tier's model
    window: int | None   # the main model's context window, when known
    folder: Path         # a config folder for this agent, under the runtime folder
    ca: Path | None = None  # the local authority, for an HTTPS url
    bundle: Path | None = None  # certifi's roots plus that authority (for variables that replace the roots)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def timeout_s(self) -> int:
        return max(MIN_TIMEOUT_S, math.ceil((self.window or 0) / PREFILL_TOKENS_PER_SECOND))


@dataclass
class Setup:
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    files: dict[Path, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what `env --for` prints as comments


def node_ca(t: Target) -> dict[str, str]:
    """A Node agent trusts the local authority of an HTTPS listener."""
    return {"NODE_EXTRA_CA_CERTS": str(t.ca)} if t.ca else {}


def python_ca(t: Target) -> dict[str, str]:
    """A Python agent (httpx, requests) trusts the local authority of an HTTPS listener."""
    # these variables replace the roots: the bundle keeps the internet's
    return {"SSL_CERT_FILE": str(t.bundle), "REQUESTS_CA_BUNDLE": str(t.bundle)} if t.bundle else {}


def claude(t: Target) -> Setup:
    env = {"ANTHROPIC_BASE_URL": t.url, "ANTHROPIC_API_KEY": t.key,
           "ANTHROPIC_MODEL": t.model, "ANTHROPIC_DEFAULT_OPUS_MODEL": t.model,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": t.model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": t.small,
           "ANTHROPIC_SMALL_FAST_MODEL": t.small, "CLAUDE_CODE_SUBAGENT_MODEL": t.model,
           "API_TIMEOUT_MS": str(t.timeout_s * 1000),
           "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",  # a per-task line atop its system prompt: no cache reuse
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1", "DISABLE_TELEMETRY": "1", **node_ca(t)}
    if t.window:
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(t.window)  # min(its window for the model, this)
    return Setup(env)


def codex(t: Target) -> Setup:
    provider = (f'{{name="mlxgate", base_url="{t.v1}", env_key="MLXGATE_API_KEY", wire_api="responses", '
                f'stream_idle_timeout_ms={t.timeout_s * 1000}}}')
    args = ["-c", "model_provider=mlxgate", "-c", f"model_providers.mlxgate={provider}", "-m", t.model]
    if t.window:
        args += ["-c", f"model_context_window={t.window}",
                 "-c", f"model_auto_compact_token_limit={int(t.window * 0.9)}"]
    env = {"MLXGATE_API_KEY": t.key}
    if t.ca:
        env["CODEX_CA_CERTIFICATE"] = str(t.ca)
    return Setup(env, args)


def qwen(t: Target) -> Setup:
    timeout_ms = str(t.timeout_s * 1000)
    env = {"OPENAI_BASE_URL": t.v1, "OPENAI_API_KEY": t.key, "OPENAI_MODEL": t.model,
           "QWEN_CODE_API_TIMEOUT_MS": timeout_ms, "QWEN_STREAM_IDLE_TIMEOUT_MS": timeout_ms,
           "QWEN_USAGE_STATISTICS_ENABLED": "0", "QWEN_TELEMETRY_ENABLED": "0", **node_ca(t)}
    files = {}
    if t.window:  # the window only a settings file gives: the lowest layer, under the user's own settings
        defaults = t.folder / "system-defaults.json"
        env["QWEN_CODE_SYSTEM_DEFAULTS_PATH"] = str(defaults)
        files[defaults] = json.dumps({"model": {"generationConfig": {"contextWindowSize": t.window}}}, indent=1)
    return Setup(env, ["--auth-type", "openai", "--model", t.model], files,
                 ["Qwen Code uses a fast model only from its own modelProviders list: side requests go to MODEL"])


def opencode_config(t: Target, schema: str) -> str:
    """The gateway as an OpenAI-compatible provider, in opencode's config (and its fork Kilo's)."""
    model = {"name": t.model, **({"limit": {"context": t.window, "output": min(32000, t.window // 4)}}
                                  if t.window else {})}
    return json.dumps({"$schema": schema, "model": f"mlxgate/{t.model}",
                       "small_model": f"mlxgate/{t.small}", "autoupdate": False, "share": "disabled",
                       "provider": {"mlxgate": {"npm": "@ai-sdk/openai-compatible", "name": "mlxgate",
                                                "options": {"baseURL": t.v1, "apiKey": "{env:MLXGATE_API_KEY}",
                                                            "timeout": t.timeout_s * 1000},
                                                "models": {t.model: model, t.small: {"name": t.small}}}}})


def opencode(t: Target) -> Setup:
    return Setup({"OPENCODE_CONFIG_CONTENT": opencode_config(t, "https://opencode.ai/config.json"),
                  "MLXGATE_API_KEY": t.key, "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
                  **node_ca(t)})


def kilo(t: Target) -> Setup:
    return Setup({"KILO_CONFIG_CONTENT": opencode_config(t, "https://app.kilo.ai/config.json"),
                  "MLXGATE_API_KEY": t.key, "KILO_DISABLE_MODELS_FETCH": "1", "KILO_DISABLE_SESSION_INGEST": "1",
                  "KILO_DISABLE_SHARE": "1", "KILO_DISABLE_AUTOUPDATE": "1", **node_ca(t)})


def copilot(t: Target) -> Setup:
    return Setup({"COPILOT_PROVIDER_BASE_URL": t.v1, "COPILOT_PROVIDER_TYPE": "openai",
                  "COPILOT_PROVIDER_API_KEY": t.key, "COPILOT_PROVIDER_WIRE_API": "completions",
                  "COPILOT_MODEL": t.model, "COPILOT_OFFLINE": "true", "COPILOT_AUTO_UPDATE": "false", **node_ca(t)},
                 notes=["Copilot CLI takes no context window or first-byte timeout from its environment"])


def cline(t: Target) -> Setup:
    """Cline's provider written as `cline auth -p openai-compatible` writes it (format 1, Cline 3.0),
    so the key never stands on a command line."""
    folder = t.folder
    provider = {"settings": {"provider": "openai-compatible", "apiKey": t.key, "model": t.model, "baseUrl": t.v1},
                "updatedAt": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "tokenSource": "manual"}
    providers = {"version": 1, "lastUsedProvider": "openai-compatible", "modes": {},
                 "providers": {"openai-compatible": provider}}
    return Setup({"CLINE_SESSION_BACKEND_MODE": "local", **node_ca(t)},  # no hub daemon outliving the run
                 ["--config", str(folder)],
                 {folder / "data" / "settings" / "providers.json": json.dumps(providers, indent=2) + "\n"},
                 notes=[f"Cline keeps this provider in {folder}; do not pass -P or -m to a run (it rewrites the "
                        f"provider without the base URL and key)"])


def continue_cli(t: Target) -> Setup:
    config = {"name": "mlxgate", "version": "1.0.0", "schema": "v1", "models": [
        {"name": t.model, "provider": "openai", "model": t.model, "apiBase": t.v1, "apiKey": t.key,
         "roles": ["chat", "edit", "apply"], "capabilities": ["tool_use"],
         **({"defaultCompletionOptions": {"contextLength": t.window}} if t.window else {}),
         # milliseconds: cn hands it to the OpenAI SDK (ms); its own fetch reads seconds, so it is only longer there
         "requestOptions": {"timeout": t.timeout_s * 1000, **({"caBundlePath": str(t.ca)} if t.ca else {})}},
        {"name": t.small, "provider": "openai", "model": t.small, "apiBase": t.v1, "apiKey": t.key,
         "roles": ["autocomplete"]}]}
    path = t.folder / "config.yaml"  # YAML is a superset of JSON
    return Setup(node_ca(t), ["--config", str(path)], {path: json.dumps(config, indent=1)})


def aider(t: Target) -> Setup:
    metadata = {f"openai/{t.model}": {"max_input_tokens": t.window or 32768, "max_output_tokens": 8192,
                                      "litellm_provider": "openai", "mode": "chat"}}
    path = t.folder / "model-metadata.json"
    return Setup({"OPENAI_API_BASE": t.v1, "OPENAI_API_KEY": t.key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                  **python_ca(t)},
                 ["--model", f"openai/{t.model}", "--weak-model", f"openai/{t.small}",
                  "--model-metadata-file", str(path), "--timeout", str(t.timeout_s), "--no-check-update",
                  "--analytics-disable", "--no-show-model-warnings"],
                 {path: json.dumps(metadata, indent=1)})


def vibe(t: Target) -> Setup:
    config = (f'active_model = "{t.model}"\n\n[[providers]]\nname = "mlxgate"\napi_base = "{t.v1}"\n'
              f'api_key_env_var = "MLXGATE_API_KEY"\napi_style = "openai"\nbackend = "generic"\n\n'
              f'[[models]]\nname = "{t.model}"\nprovider = "mlxgate"\nalias = "{t.model}"\n')
    return Setup({"VIBE_HOME": str(t.folder), "MLXGATE_API_KEY": t.key, **python_ca(t)}, [],
                 {t.folder / "config.toml": config},
                 [f"mistral-vibe keeps its sessions in {t.folder} (VIBE_HOME), away from ~/.vibe"])


def openhands(t: Target) -> Setup:
    return Setup({"LLM_MODEL": f"openai/{t.model}", "LLM_BASE_URL": t.v1, "LLM_API_KEY": t.key,
                  "LITELLM_LOCAL_MODEL_COST_MAP": "True", **python_ca(t)}, ["--override-with-envs"],
                 notes=["OpenHands takes no context window or first-byte timeout from its environment"])


def pi(t: Target) -> Setup:
    models = [{"id": t.model, "input": ["text"], "contextWindow": t.window or 32768,
               "maxTokens": min(32000, (t.window or 32768) // 4)}]
    config = {"providers": {"mlxgate": {"baseUrl": t.v1, "api": "openai-completions", "apiKey": "MLXGATE_API_KEY",
                                        "models": models}}}
    env = {"PI_CODING_AGENT_DIR": str(t.folder), "MLXGATE_API_KEY": t.key, "PI_OFFLINE": "1", **node_ca(t)}
    return Setup(env, ["--provider", "mlxgate", "--model", t.model],
                 {t.folder / "models.json": json.dumps(config, indent=1)},
                 [f"pi keeps its sessions in {t.folder} (PI_CODING_AGENT_DIR), away from ~/.pi"])


@dataclass(frozen=True)
class Row:
    command: str                       # the agent's executable
    package: str                       # where it comes from: npm's name, or "pypi:NAME"
    settings: Callable[[Target], Setup]

    @property
    def install(self) -> str:
        if self.package.startswith("pypi:"):
            return f"pipx install {self.package[5:]}"
        return f"npm install -g {self.package}"


AGENTS: dict[str, Row] = {
    "claude": Row("claude", "@anthropic-ai/claude-code", claude),
    "codex": Row("codex", "@openai/codex", codex),
    "qwen": Row("qwen", "@qwen-code/qwen-code", qwen),
    "opencode": Row("opencode", "opencode-ai", opencode),
    "pi": Row("pi", "@mariozechner/pi-coding-agent", pi),
    "copilot": Row("copilot", "@github/copilot", copilot),
    "cline": Row("cline", "cline", cline),
    "kilo": Row("kilo", "@kilocode/cli", kilo),
    "cn": Row("cn", "@continuedev/cli", continue_cli),
    "aider": Row("aider", "pypi:aider-chat", aider),
    "vibe": Row("vibe", "pypi:mistral-vibe", vibe),
    "openhands": Row("openhands", "pypi:openhands", openhands),
}


def row_of(agent: str) -> Row:
    if agent not in AGENTS:
        raise MlxgateError(f"no launcher for {agent!r}: there are {', '.join(AGENTS)} (the README's client "
                           f"sections have the settings of the others)")
    return AGENTS[agent]


def prepare(agent: str, target: Target) -> Setup:
    """The agent's setup, its files written (mode 600, in a folder of its own)."""
    setup = row_of(agent).settings(target)
    for path, text in setup.files.items():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(text)
        path.chmod(0o600)
    return setup


def executable(agent: str) -> str:
    row = row_of(agent)
    found = shutil.which(row.command)
    if found is None:
        raise MlxgateError(f"{row.command} is not on PATH: install it with `{row.install}`")
    return found


def shell_lines(agent: str, setup: Setup) -> list[str]:
    """What `mlxgate env --for AGENT` prints: exports, then the command line to run."""
    import shlex

    lines = [f"# {note}" for note in setup.notes]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in setup.env.items()]
    if setup.files:
        lines += [f"# written: {path}" for path in setup.files]
    lines.append(f"# then: {shlex.join([row_of(agent).command, *setup.args])} ...")
    return lines
