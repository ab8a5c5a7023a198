"""Coding agents from npm, unchanged, pointed at the gateway the way the README says: the
variables `mlxgate env` prints. Each runs one task against the scripted model, which calls
`get_weather` (a tool none of these agents has, so each answers the call with an error) and
then answers from that result: a real two-request agent loop. Codex CLI's run is with the
Responses API's tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from mlxgate.demo_model import TOOL_ANSWER
from support import exported, mlxgate, npm_agent

CLAUDE_CODE_VERSION = "2.1.197"
QWEN_CODE_VERSION = "0.15.10"  # the newest npm installs for Node 20
OPENCODE_VERSION = "1.18.33"
ASK = "What is the weather in Paris?"


def agent_env(tmp_path, settings: dict[str, str]) -> dict[str, str]:
    """The agent's environment: the gateway's variables, a home and a working folder of its own
    (PWD too: some agents take their folder from it, not from the process)."""
    for folder in ("home", "work"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return {**os.environ, **settings, "HOME": str(tmp_path / "home"), "PWD": str(tmp_path / "work")}


@contextlib.contextmanager
def agent_run(argv: list[str], env: dict[str, str], cwd):
    """Run an agent to its end; what it printed (stdout), with any failure in the block below
    reported together with the agent's own output."""
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    shown = f"\n--- {argv[0]} exited {result.returncode}; stdout:\n{result.stdout[-3000:]}\n--- stderr:\n" \
            f"{result.stderr[-3000:]}"
    try:
        assert result.returncode == 0
        yield result.stdout
    except (AssertionError, LookupError, ValueError, TypeError) as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}{shown}") from exc


@pytest.fixture(scope="session")
def claude_code(tmp_path_factory) -> str:
    return npm_agent("claude", "@anthropic-ai/claude-code", CLAUDE_CODE_VERSION,
                     tmp_path_factory.mktemp("claude-code"))


def test_claude_code_runs_a_task_against_the_gateway(agent_gateway, claude_code, tmp_path):
    """`claude -p` with what `mlxgate env` prints. Its own system prompt and tool list make a
    first prompt of ~58,000 tokens (4 minutes of prefill for the tiny model on 2 CPU cores), so
    the run keeps one built-in tool and a short system prompt; the requests keep Claude Code's
    own shape (streamed, `?beta=true`, its beta headers, metadata, thinking settings)."""
    settings = exported(mlxgate("env", env=agent_gateway.env, check=True).stdout)
    assert settings["ANTHROPIC_MODEL"] == "scripted"  # its window is under Claude Code's 100K floor
    before = agent_gateway.served()
    env = {**agent_env(tmp_path, settings), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    with agent_run([claude_code, "-p", ASK, "--output-format", "json", "--tools", "Bash", "--system-prompt",
                    "Be brief."], env, tmp_path / "work") as printed:
        outcome = json.loads(printed)
        assert outcome["is_error"] is False and outcome["result"] == TOOL_ANSWER
        assert outcome["num_turns"] == 2  # the tool call, then the answer from its (failed) result
        assert agent_gateway.served() - before == 2
        # its follow-up read the first request's prompt from the model server's cache
        assert outcome["usage"]["cache_read_input_tokens"] > 0


@pytest.fixture(scope="session")
def qwen_code(tmp_path_factory) -> str:
    return npm_agent("qwen", "@qwen-code/qwen-code", QWEN_CODE_VERSION, tmp_path_factory.mktemp("qwen-code"))


@pytest.fixture(scope="session")
def opencode(tmp_path_factory) -> str:
    return npm_agent("opencode", "opencode-ai", OPENCODE_VERSION, tmp_path_factory.mktemp("opencode"))


def test_qwen_code_runs_a_task_against_the_gateway(agent_gateway, qwen_code, tmp_path):
    """Qwen Code over the OpenAI chat API with the variables `mlxgate env` prints (one tool
    kept: its full tool list makes a prompt of ~23,000 tokens)."""
    settings = exported(mlxgate("env", env=agent_gateway.env, check=True).stdout)
    before = agent_gateway.served()
    env = agent_env(tmp_path, settings)
    with agent_run([qwen_code, "--auth-type", "openai", "--model", "scripted", "--output-format", "json",
                    "--system-prompt", "Be brief.", "--core-tools", "run_shell_command", "--exclude-tools", "agent",
                    "tool_search", "task_stop", "send_message", "skill", "ask_user_question", "exit_plan_mode",
                    "-p", ASK], env, tmp_path / "work") as printed:
        events = json.loads(printed)
        outcome = events[-1]
        assert outcome["type"] == "result" and outcome["is_error"] is False and outcome["result"] == TOOL_ANSWER
        calls = [block for e in events if e["type"] == "assistant" for block in e["message"]["content"]
                 if block["type"] == "tool_use"]
        assert [(c["name"], c["input"]) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert outcome["num_turns"] == 2 and agent_gateway.served() - before == 2
        assert outcome["usage"]["cache_read_input_tokens"] > 0


def test_opencode_runs_a_task_against_the_gateway(agent_gateway, opencode, tmp_path):
    """opencode with the gateway as an OpenAI-compatible provider in its `opencode.json`
    (the README's example), the key from the environment; bash its one tool."""
    settings = exported(mlxgate("env", env=agent_gateway.env, check=True).stdout)
    env = agent_env(tmp_path, settings)
    config = {"$schema": "https://opencode.ai/config.json", "model": "mlxgate/scripted",
              "provider": {"mlxgate": {"npm": "@ai-sdk/openai-compatible", "name": "mlxgate",
                                       "options": {"baseURL": settings["OPENAI_BASE_URL"],
                                                   "apiKey": "{env:OPENAI_API_KEY}"},
                                       "models": {"scripted": {"name": "scripted"}}}},
              "tools": {tool: False for tool in ("edit", "glob", "grep", "read", "skill", "task", "todowrite",
                                                 "webfetch", "write")},
              "agent": {"build": {"prompt": "Be brief."}}}
    (tmp_path / "work" / "opencode.json").write_text(json.dumps(config))
    before = agent_gateway.served()
    with agent_run([opencode, "run", "--format", "json", ASK], env, tmp_path / "work") as printed:
        events = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
        assert not [e for e in events if e["type"] == "error"]
        texts = [e["part"]["text"] for e in events if e["type"] == "text"]
        assert texts[-1] == TOOL_ANSWER
        tools = [e["part"]["state"]["input"] for e in events if e["type"] == "tool_use"]
        assert tools[0]["tool"] == "get_weather"  # opencode's answer to a tool it does not have
        steps = [e["part"]["tokens"] for e in events if e["type"] == "step_finish"]
        assert len(steps) == 2 and steps[1]["cache"]["read"] > 0
        assert agent_gateway.served() - before >= 2  # and the title it asks for, on the same model
