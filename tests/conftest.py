"""Shared fixtures: tiny generated models and one running wrapper for the wrapper tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mlxgate.config import SETTINGS
from support import Gateway, Wrapper, make_broken_models, mlxgate, wait_for

# Keep the developer's own configuration, models and installed plugins out of the test run.
for _name in ("MLXGATE_CONFIG", "MLXGATE_HOME", "MLXGATE_API_KEY", *(s.env for s in SETTINGS if s.env)):
    os.environ.pop(_name, None)
os.environ["MLXGATE_LOAD_ENTRY_POINTS"] = "0"
os.environ["MLXGATE_CHECKOUT_DROP_INS"] = "0"  # a plugin dropped into the checkout's plugins/ stays out too
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Runtime folders hold Unix sockets (supervisord's, the relay's door), whose paths must fit
    103 bytes; pytest's temporary folders on macOS (/private/var/folders/...) are too deep."""
    if sys.platform == "darwin" and config.option.basetemp is None:
        config.option.basetemp = f"/tmp/mlxgate-tests-{os.getuid()}"


# What makes a test slow: a whole daemon (`mlxgate start`), a wrapper with its model servers, a
# network namespace, an agent from npm or PyPI, a wheel built and installed. `pytest -m "not slow"` leaves
# these out.
SLOW_FIXTURES = {"wrapper", "gateway", "agent_gateway", "gw", "cluster", "watched", "prometheus", "postgres",
                 "sandbox", "verify", "claude_code", "codex", "upstream", "docked"}
SLOW_MODULES = {"test_daemon_lifecycle", "test_gateway", "test_service", "test_stand_in", "test_agent_matrix",
                "test_packaging"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """tiny-a (2 layers), org/tiny-b (3 layers), tiny-c (other seed, a 128K window: long answers),
    the deterministic `scripted` model (a 64K window), plus two broken folders."""
    models = tmp_path_factory.mktemp("models")
    env = dict(os.environ)
    mlxgate("demo-model", str(models / "tiny-a"), "--seed", "0", env=env, check=True)
    mlxgate("demo-model", str(models / "org" / "tiny-b"), "--seed", "1", "--layers", "3", env=env,
            check=True)
    mlxgate("demo-model", str(models / "tiny-c"), "--seed", "2", "--context", "131072", env=env, check=True)
    # a window for Codex CLI's first prompt: ~27,000 tokens for this tiny tokenizer (about 10,000 for a real one)
    mlxgate("demo-model", str(models / "scripted"), "--scripted", "--context", "65536", env=env, check=True)
    make_broken_models(models, models / "tiny-a")
    return models


@pytest.fixture(scope="session")
def wrapper(models_dir, tmp_path_factory):
    """One wrapper for the session, autocomplete model tiny-a kept loaded."""
    running = Wrapper(tmp_path_factory.mktemp("wrapper-home"), models_dir,
                      args=("--autocomplete-model", "tiny-a"))
    wait_for(lambda: running.server("tiny-a")["state"] == "ready", 120,
             what="the autocomplete model to load at wrapper start")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def gateway(models_dir, tmp_path_factory):
    """One running daemon (HTTP + HTTPS, certificate also for api.anthropic.com) for the session:
    default model tiny-a, autocomplete model org/tiny-b, token cap 64, DETAILED_DEBUG on."""
    running = Gateway(tmp_path_factory.mktemp("gateway-home"), models_dir, "--default-model", "tiny-a",
                      "--autocomplete-model", "org/tiny-b", "--ssl-domain", "api.anthropic.com",
                      extra_env={"DETAILED_DEBUG": "1"})
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def agent_gateway(models_dir, tmp_path_factory):
    """The daemon an agent meets: default model `scripted` (fixed answers, real tool calls),
    autocomplete model tiny-a (so `*haiku*` names go there), HTTP only, token cap 4096."""
    running = Gateway(tmp_path_factory.mktemp("agent-home"), models_dir, "--default-model", "scripted",
                      "--autocomplete-model", "tiny-a", https=False, max_tokens=4096)
    running.start()
    yield running
    running.stop()
