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
import shutil
from dataclasses import dataclass, field
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


def claude(t: Target) -> Setup:
    env = {"ANTHROPIC_BASE_URL": t.url, "ANTHROPIC_API_KEY": t.key,
           "ANTHROPIC_MODEL": t.model, "ANTHROPIC_DEFAULT_OPUS_MODEL": t.model,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": t.model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": t.small,
           "ANTHROPIC_SMALL_FAST_MODEL": t.small, "CLAUDE_CODE_SUBAGENT_MODEL": t.model,
           "API_TIMEOUT_MS": str(t.timeout_s * 1000),
           "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",  # a per-task line atop its system prompt: no cache reuse
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1", "DISABLE_TELEMETRY": "1"}
    if t.window:
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(t.window)  # min(its window for the model, this)
    if t.ca:
        env["NODE_EXTRA_CA_CERTS"] = str(t.ca)
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
    env = {"OPENAI_BASE_URL": t.v1, "OPENAI_API_KEY": t.key, "OPENAI_MODEL": t.model}
    if t.ca:
        env["NODE_EXTRA_CA_CERTS"] = str(t.ca)
    return Setup(env, ["--auth-type", "openai", "--model", t.model])


def opencode(t: Target) -> Setup:
    model = {"name": t.model, **({"limit": {"context": t.window, "output": min(32000, t.window // 4)}}
                                  if t.window else {})}
    config = {"$schema": "https://opencode.ai/config.json", "model": f"mlxgate/{t.model}",
              "small_model": f"mlxgate/{t.small}", "autoupdate": False, "share": "disabled",
              "provider": {"mlxgate": {"npm": "@ai-sdk/openai-compatible", "name": "mlxgate",
                                       "options": {"baseURL": t.v1, "apiKey": "{env:MLXGATE_API_KEY}",
                                                   "timeout": t.timeout_s * 1000},
                                       "models": {t.model: model, t.small: {"name": t.small}}}}}
    env = {"OPENCODE_CONFIG_CONTENT": json.dumps(config), "MLXGATE_API_KEY": t.key,
           "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1"}
    if t.ca:
        env["NODE_EXTRA_CA_CERTS"] = str(t.ca)
    return Setup(env)


def pi(t: Target) -> Setup:
    models = [{"id": t.model, "input": ["text"], "contextWindow": t.window or 32768,
               "maxTokens": min(32000, (t.window or 32768) // 4)}]
    config = {"providers": {"mlxgate": {"baseUrl": t.v1, "api": "openai-completions", "apiKey": "MLXGATE_API_KEY",
                                        "models": models}}}
    env = {"PI_CODING_AGENT_DIR": str(t.folder), "MLXGATE_API_KEY": t.key, "PI_OFFLINE": "1"}
    if t.ca:
        env["NODE_EXTRA_CA_CERTS"] = str(t.ca)
    return Setup(env, ["--provider", "mlxgate", "--model", t.model],
                 {t.folder / "models.json": json.dumps(config, indent=1)},
                 [f"pi keeps its sessions in {t.folder} (PI_CODING_AGENT_DIR), away from ~/.pi"])


@dataclass(frozen=True)
class Row:
    command: str                       # the agent's executable
    package: str                       # where it comes from (npm)
    settings: Callable[[Target], Setup]


AGENTS: dict[str, Row] = {
    "claude": Row("claude", "@anthropic-ai/claude-code", claude),
    "codex": Row("codex", "@openai/codex", codex),
    "qwen": Row("qwen", "@qwen-code/qwen-code", qwen),
    "opencode": Row("opencode", "opencode-ai", opencode),
    "pi": Row("pi", "@mariozechner/pi-coding-agent", pi),
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
        raise MlxgateError(f"{row.command} is not on PATH: install it with `npm install -g {row.package}`")
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
