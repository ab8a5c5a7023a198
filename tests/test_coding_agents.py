"""Coding agents from npm, unchanged, pointed at the gateway the way the README says: the
variables `mlxgate env` prints. Each runs one task against the scripted model, which calls
`get_weather` (a tool none of these agents has, so each answers the call with an error) and
then answers from that result: a real two-request agent loop. Codex CLI's run is with the
Responses API's tests."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mlxgate.demo_model import TOOL_ANSWER
from support import exported, mlxgate, npm_agent

CLAUDE_CODE_VERSION = "2.1.197"
ASK = "What is the weather in Paris?"


def served(gateway) -> int:
    """Requests the dynamic model server has answered so far."""
    return gateway.wrapper_call("GET", "/models").json()["servers"]["dynamic"]["queue"]["served"]


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
    before = served(agent_gateway)
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    result = subprocess.run(
        [claude_code, "-p", ASK, "--output-format", "json", "--tools", "Bash", "--system-prompt", "Be brief."],
        cwd=tmp_path / "work", capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, **settings, "HOME": str(tmp_path / "home"), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
             "DISABLE_AUTOUPDATER": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    assert outcome["is_error"] is False and outcome["result"] == TOOL_ANSWER, outcome
    assert outcome["num_turns"] == 2  # the tool call, then the answer from its (failed) result
    assert served(agent_gateway) - before == 2
    # its follow-up read the first request's prompt from the model server's cache
    assert outcome["usage"]["cache_read_input_tokens"] > 0, outcome["usage"]
