"""Every coding agent, unchanged, at the version pinned below (the newest its registry served when
this was last verified), doing a real edit through the gateway: the scripted model calls the
agent's own tools (read the file where the agent insists, then its edit tool) with fixed
arguments; the agent makes that exact edit to `hello.txt` in its work folder and exits 0; the
model's last turn answers from the tool's result. On every follow-up request of the agent's loop
at least 90 % of the prompt is read from the prompt cache, by the gateway's own records.

One row per agent (`AGENTS`): its package, its pinned version, the steps its model makes, and the
agent's own arguments; every agent runs through `mlxgate launch --model MODEL AGENT -- ARGS`,
which points it at the gateway. Each agent gets a model of its own, built for its work folder.
An agent that npm or pip cannot install here skips, saying why. `bench/agents.py` runs the same rows with the
newest version of each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from mlxgate.demo_model import TOOL_ANSWER
from support import Gateway, ledger_rows, mlxgate, npm_agent, pypi_venv

TASK = "In hello.txt replace the word world with mlxgate."
BEFORE, AFTER = "Hello world\n", "Hello mlxgate\n"
FOLLOW_UP_CACHED = 0.90
MLXGATE = [sys.executable, "-m", "mlxgate.cli"]


@dataclass(frozen=True)
class Run:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Agent:
    package: str                             # npm's name, or "pypi:NAME" (a venv of its own)
    version: str
    command: str
    steps: Callable[[Path], list[dict]]      # the model's tool calls (or texts), for a work folder
    run: Callable[["Session"], Run]
    done: Callable[[str], bool] = lambda printed: True  # what its output says at the end
    python: str | None = None                # PyPI: the Python its venv is made from (default: this one)


@dataclass
class Session:
    binary: str
    model: str
    gateway: Gateway
    work: Path
    home: Path

    @property
    def v1(self) -> str:
        return self.gateway.url + "/v1"

    @property
    def key(self) -> str:
        return self.gateway.api_key


def read_edit(read: str, edit: str, path_key: str, old: str, new: str, read_key: str | None = None):
    """The steps of an agent that must read a file before it edits it."""
    def steps(work: Path) -> list[dict]:
        target = str(work / "hello.txt")
        return [{"tool": read, "arguments": {read_key or path_key: target}},
                {"tool": edit, "arguments": {path_key: target, old: "world", new: "mlxgate"}}]
    return steps


def launched(s: Session, agent: str, *args: str, env: dict | None = None) -> Run:
    """`mlxgate launch --model MODEL AGENT -- ARGS`: the launcher sets the agent up (PATH has its binary)."""
    gateway = {k: v for k, v in s.gateway.env.items() if k not in ("HOME", "PWD", "OLDPWD")}  # the agent's own
    return Run([*MLXGATE, "launch", "--model", s.model, agent, "--", *args],
               {**gateway, "PATH": f"{Path(s.binary).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})})


def claude_run(s: Session) -> Run:
    return launched(s, "claude", "-p", TASK, "--output-format", "json", "--permission-mode", "acceptEdits",
                    "--tools", "Read,Edit", "--system-prompt", "Be brief.")


def codex_run(s: Session) -> Run:
    (s.home / ".codex").mkdir(exist_ok=True)
    return launched(s, "codex", "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", TASK,
                    env={"CODEX_HOME": str(s.home / ".codex")})


def qwen_run(s: Session) -> Run:
    return launched(s, "qwen", "--output-format", "json", "--yolo", "--system-prompt", "Be brief.", "--core-tools",
                    "read_file", "edit", "--exclude-tools", "agent", "tool_search", "skill", "-p", TASK)


def opencode_run(s: Session) -> Run:
    return launched(s, "opencode", "run", "--format", "json", TASK)


def kilo_run(s: Session) -> Run:
    return launched(s, "kilo", "run", "--auto", "--format", "json", TASK)


def pi_run(s: Session) -> Run:
    return launched(s, "pi", "--mode", "json", "-p", TASK)


def copilot_run(s: Session) -> Run:
    return launched(s, "copilot", "-p", TASK, "--allow-all-tools", "--no-ask-user",
                    env={"COPILOT_HOME": str(s.home / ".copilot")})


def cline_run(s: Session) -> Run:
    return launched(s, "cline", "--json", TASK)


def continue_run(s: Session) -> Run:
    return launched(s, "cn", "--auto", "-p", TASK, env={"CONTINUE_GLOBAL_DIR": str(s.home / ".continue")})


def aider_run(s: Session) -> Run:
    return launched(s, "aider", "--edit-format", "diff", "--yes-always", "--no-git", "--no-auto-commits", "--no-pretty",
                    "--message", TASK, "hello.txt")


def vibe_run(s: Session) -> Run:
    return launched(s, "vibe", "-p", TASK, "--auto-approve", "--trust", "--output", "json")


def openhands_run(s: Session) -> Run:
    return launched(s, "openhands", "--headless", "--json", "--exit-without-confirmation", "-t", TASK,
                    env={"OPENHANDS_SUPPRESS_BANNER": "1"})


AIDER_EDIT = "hello.txt\n```\n<<<<<<< SEARCH\nHello world\n=======\nHello mlxgate\n>>>>>>> REPLACE\n```\n"
PYTHON_312 = "/root/.pyenv/versions/3.12.1/bin/python"  # mistral-vibe and OpenHands need Python 3.12

CODEX_PATCH = ("apply_patch <<'EOF'\n*** Begin Patch\n*** Update File: hello.txt\n@@\n-Hello world\n+Hello mlxgate\n"
               "*** End Patch\nEOF\n")

AGENTS: dict[str, Agent] = {
    "claude-code": Agent("@anthropic-ai/claude-code", "2.1.332", "claude",
                         read_edit("Read", "Edit", "file_path", "old_string", "new_string"), claude_run,
                         lambda out: json.loads(out)["result"] == TOOL_ANSWER),
    "codex": Agent("@openai/codex", "0.171.0", "codex",
                   lambda work: [{"tool": "exec_command", "arguments": {"cmd": CODEX_PATCH}}], codex_run),
    "qwen-code": Agent("@qwen-code/qwen-code", "0.24.4", "qwen",
                       read_edit("read_file", "edit", "file_path", "old_string", "new_string"), qwen_run),
    "opencode": Agent("opencode-ai", "1.18.33", "opencode",
                      read_edit("read", "edit", "filePath", "oldString", "newString"), opencode_run),
    "pi": Agent("@mariozechner/pi-coding-agent", "0.73.1", "pi",
                lambda work: [{"tool": "edit", "arguments": {"path": "hello.txt", "edits": [
                    {"oldText": "world", "newText": "mlxgate"}]}}], pi_run),
    "copilot": Agent("@github/copilot", "1.0.102", "copilot",
                     lambda work: [{"tool": "edit", "arguments": {"path": str(work / "hello.txt"), "old_str": "world",
                                                                  "new_str": "mlxgate"}}], copilot_run),
    "cline": Agent("cline", "3.0.65", "cline",
                   lambda work: [{"tool": "editor", "arguments": {"path": str(work / "hello.txt"), "old_text": "world",
                                                                  "new_text": "mlxgate"}}], cline_run),
    "kilo": Agent("@kilocode/cli", "7.7.7", "kilo",
                  read_edit("read", "edit", "filePath", "oldString", "newString"), kilo_run),
    "continue": Agent("@continuedev/cli", "1.5.47", "cn",
                      read_edit("Read", "Edit", "file_path", "old_string", "new_string", read_key="filepath"),
                      continue_run),
    "aider": Agent("pypi:aider-chat", "0.86.2", "aider", lambda work: [{"text": AIDER_EDIT}], aider_run),
    "mistral-vibe": Agent("pypi:mistral-vibe", "3.0.2", "vibe",
                          lambda work: [{"tool": "edit", "arguments": {"file_path": str(work / "hello.txt"),
                                                                       "old_string": "world", "new_string": "mlxgate"}}],
                          vibe_run, python=PYTHON_312),
    "openhands": Agent("pypi:openhands", "1.16.0", "openhands",
                       lambda work: [{"tool": "file_editor", "arguments": {
                           "command": "str_replace", "path": str(work / "hello.txt"), "old_str": "world",
                           "new_str": "mlxgate", "security_risk": "LOW"}}], openhands_run, python=PYTHON_312),
}


def install(name: str, agent: Agent, folder: Path) -> str:
    """The agent's executable: from npm (see `npm_agent`), or from PyPI into a venv of its own."""
    if not agent.package.startswith("pypi:"):
        return npm_agent(agent.command, agent.package, agent.version, folder)
    if agent.python and not Path(agent.python).exists():
        pytest.skip(f"{name} needs {agent.python} (Python 3.12), which this machine does not have")
    try:
        python = pypi_venv([f"{agent.package[5:]}=={agent.version}"], agent.python)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"pip could not install {agent.package[5:]}=={agent.version}: {e.stderr[-500:]!r}")
    return str(python.parent / agent.command)


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("agent-models")
    running = Gateway(tmp_path_factory.mktemp("agent-matrix-home"), models, https=False, max_tokens=4096)
    running.models = models
    running.start()
    yield running
    running.stop()


def loop_requests(rows: list[dict]) -> list[dict]:
    """The agent loop's requests: those whose prompt is at least half the longest (side requests,
    such as a title, are short and have a prefix of their own)."""
    longest = max(r["input_tokens"] + r["cached_tokens"] for r in rows)
    return [r for r in rows if r["input_tokens"] + r["cached_tokens"] >= longest / 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(AGENTS))
def test_an_agent_makes_the_models_edit_with_its_own_tool(gw, name, tmp_path_factory):
    agent = AGENTS[name]
    binary = install(name, agent, tmp_path_factory.mktemp(f"{name}-pkg"))
    work, home = tmp_path_factory.mktemp(f"{name}-work"), tmp_path_factory.mktemp(f"{name}-home")
    (work / "hello.txt").write_text(BEFORE)
    model = f"edit-{name}"
    steps = tmp_path_factory.mktemp(f"{name}-steps") / "steps.json"
    steps.write_text(json.dumps(agent.steps(work)))
    mlxgate("demo-model", str(gw.models / model), "--scripted", "--context", "131072", "--steps", str(steps),
            env=dict(os.environ), check=True)
    session = Session(binary, model, gw, work, home)
    run = agent.run(session)
    env = {**os.environ, "HOME": str(home), "PWD": str(work), **run.env}
    started = time.time()
    result = subprocess.run(run.argv, env=env, cwd=work, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    shown = f"\n--- {name} exited {result.returncode}\n{result.stdout[-2500:]}\n--- stderr\n{result.stderr[-2500:]}"
    assert result.returncode == 0, shown
    assert (work / "hello.txt").read_text() == AFTER, shown
    assert agent.done(result.stdout), shown
    loop = loop_requests(ledger_rows(gw, started, model))
    calls = [step for step in agent.steps(work) if "tool" in step]
    assert len(loop) >= len(calls) + 1, f"one request per tool call and the answer: {loop}{shown}"
    for row in loop[1:]:
        prompt = row["input_tokens"] + row["cached_tokens"]
        assert row["cached_tokens"] >= FOLLOW_UP_CACHED * prompt, f"{row['cached_tokens']} of {prompt}: {loop}"
