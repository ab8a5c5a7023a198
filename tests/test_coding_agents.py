"""Claude Code across sessions: a second session after `mlxgate restart` reads its first prompt
back from the prompt cache's disk tier. (Every agent's edit through the gateway is in
`test_agent_matrix.py`, whose rows pin the versions.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from mlxgate.demo_model import TOOL_ANSWER
from support import exported, ledger_rows, mlxgate, npm_agent
from test_agent_matrix import AGENTS

CLAUDE_CODE = AGENTS["claude-code"]
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
    return npm_agent("claude", CLAUDE_CODE.package, CLAUDE_CODE.version, tmp_path_factory.mktemp("claude-code"))


def test_a_second_claude_code_session_after_a_restart_reads_its_first_prompt_from_the_cache(
        agent_gateway, claude_code, tmp_path):
    """Claude Code's first request is the same from one session to the next (its system prompt,
    tools and the task); after `mlxgate restart` the model server has nothing in memory, so what
    the second session's first request reads from the cache came back from disk."""
    import time

    settings = exported(mlxgate("env", env=agent_gateway.env, check=True).stdout)
    assert settings["CLAUDE_CODE_ATTRIBUTION_HEADER"] == "0"
    env = {**agent_env(tmp_path, settings), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    system = "You answer questions about the weather. " + " ".join(f"Rule {i}: be brief and exact." for i in range(60))
    argv = [claude_code, "-p", ASK, "--output-format", "json", "--tools", "Bash", "--system-prompt", system]
    firsts = []
    for session in range(2):
        started = time.time()
        with agent_run(argv, env, tmp_path / "work") as printed:
            assert json.loads(printed)["result"] == TOOL_ANSWER
        first = [r for r in ledger_rows(agent_gateway, started, "scripted") if r["route"] == "anthropic_messages"][0]
        firsts.append(first)
        if session == 0:
            mlxgate("restart", env=agent_gateway.env, timeout=300, check=True)
    prompt = firsts[1]["input_tokens"] + firsts[1]["cached_tokens"]
    assert prompt > 1024, "long enough for the disk tier"
    assert firsts[1]["cached_tokens"] >= 0.95 * prompt, firsts[1]
    import httpx
    text = httpx.get(agent_gateway.url + "/metrics", headers={"Authorization": f"Bearer {agent_gateway.api_key}"},
                     timeout=30).text
    from_disk = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(
        'mlxgate_prompt_cache_tokens_total{model="scripted",tier="disk"}'))
    assert from_disk >= 0.95 * prompt, "since the restart, the prefix came back from disk"
