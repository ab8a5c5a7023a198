"""The `mlxgate` command as a user types it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support import free_port, mlxgate


def test_models_load_ps_and_unload_from_the_command_line(wrapper):
    loaded = mlxgate("load", "org/tiny-b", env=wrapper.env)
    assert loaded.returncode == 0, loaded.stderr
    assert re.match(r"org/tiny-b is ready on port \d+ \(pid \d+, \d+ MiB\) after", loaded.stdout), loaded.stdout
    listing = mlxgate("models", env=wrapper.env)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "SOURCE", "WEIGHTS", "STATE", "PATH"]
    assert " ready " in next(line for line in lines if line.startswith("org/tiny-b "))
    assert " ready " in next(line for line in lines if line.startswith("tiny-a "))
    assert "memory budget" in listing.stdout
    ps = mlxgate("ps", env=wrapper.env)
    assert ps.returncode == 0, ps.stderr
    rows = {line.split()[0]: line for line in ps.stdout.splitlines()[1:] if not line.startswith("memory")}
    assert {"org/tiny-b", "tiny-a"} <= set(rows)
    assert "never (pinned)" in rows["tiny-a"] and re.search(r"in \d+ (s|min)", rows["org/tiny-b"])
    assert f" {wrapper.autocomplete_port} " in rows["tiny-a"], "the autocomplete model on its own port"
    shown = json.loads(mlxgate("ps", "--json", env=wrapper.env).stdout)
    assert {"org/tiny-b", "tiny-a"} <= {r["model"] for r in shown["models"]} and shown["memory"]["budget"] > 0
    assert mlxgate("unload", "org/tiny-b", env=wrapper.env).stdout.strip() == "org/tiny-b is stopped"
    assert "org/tiny-b" not in mlxgate("ps", env=wrapper.env).stdout


def test_load_of_an_unknown_model_fails_with_the_reason(wrapper):
    result = mlxgate("load", "nothing-here", env=wrapper.env)
    assert result.returncode == 1
    assert "mlxgate load: error: model 'nothing-here' not found" in result.stderr


def test_a_wrong_key_and_a_stopped_wrapper_are_explained(wrapper):
    wrong = mlxgate("models", env={**wrapper.env, "MLXGATE_API_KEY": "nope"})
    assert wrong.returncode == 1 and "API key" in wrong.stderr
    down = mlxgate("load", "tiny-a", env={**wrapper.env, "MLX_WRAPPER_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "the wrapper is not running at" in down.stderr


def test_models_lists_the_local_models_while_the_gateway_is_stopped(models_dir, tmp_path):
    env = {**os.environ, "MLXGATE_HOME": str(tmp_path), "MLXGATE_MODEL_DIRS": str(models_dir),
           "MLX_WRAPPER_URL": f"http://127.0.0.1:{free_port()}", "MLXGATE_CONFIG": str(tmp_path / "none.yaml")}
    listing = mlxgate("models", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert rows["tiny-a"][1] == "model_dir" and "stopped" in rows["tiny-a"] and rows["org/tiny-b"][1] == "model_dir"
    assert "the gateway is not running: nothing is loaded" in listing.stdout


def test_a_bad_config_stops_the_command_with_file_key_and_fix(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("dynamic_port: lots\n")
    result = mlxgate("models", env={**os.environ, "MLXGATE_CONFIG": str(config)})
    assert result.returncode == 1
    assert f"{config}: dynamic_port: expected an integer, got 'lots'. Fix:" in result.stderr


def test_download_fails_fast_and_clearly_when_the_hub_is_unreachable(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    result = mlxgate("download", "Qwen2.5-Coder-0.5B-8bit", env=env, timeout=60)
    assert result.returncode == 1
    assert "cannot download mlx-community/Qwen2.5-Coder-0.5B-8bit" in result.stderr
    assert "not reachable" in result.stderr
    assert time.monotonic() - started < 30
    offline = mlxgate("download", "x", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in offline.stderr


def test_demo_model_builds_a_model_the_catalog_finds(tmp_path):
    result = mlxgate("demo-model", str(tmp_path / "models" / "mine"), "--seed", "7", env=dict(os.environ))
    assert result.returncode == 0 and "built a tiny random-weight model" in result.stdout
    from mlxgate.catalog import Catalog, verify_model_folder

    model = Catalog([tmp_path / "models"], None).resolve("mine")
    verify_model_folder(model.path)


def test_flags_saved_by_start_yield_to_the_environment_and_to_flags(tmp_path):
    (tmp_path / "start.json").write_text(json.dumps({"port": 12100, "use_sudo": False}))
    env = {**os.environ, "MLXGATE_HOME": str(tmp_path), "MLXGATE_CONFIG": str(tmp_path / "gateway.yaml"),
           "MLXGATE_API_KEY": "k"}
    (tmp_path / "gateway.yaml").write_text("port: 12000\n")

    def base_url(**extra) -> str:
        result = mlxgate("env", env={**env, **extra}, check=True)
        return result.stdout.splitlines()[0]

    assert base_url() == "export ANTHROPIC_BASE_URL=http://127.0.0.1:12100"
    assert base_url(MLXGATE_PORT="12200") == "export ANTHROPIC_BASE_URL=http://127.0.0.1:12200"


def test_the_version_and_a_usage_error():
    from mlxgate import __version__

    assert mlxgate("--version", env=dict(os.environ)).stdout.strip() == f"mlxgate {__version__}"
    wrong = mlxgate("unload", env=dict(os.environ))
    assert wrong.returncode == 2 and "Missing argument 'MODEL'" in wrong.stderr


def test_env_for_an_agent_prints_what_launch_sets_and_writes_only_under_the_runtime_folder(tmp_path):
    mlxgate("demo-model", str(tmp_path / "models" / "coder"), "--context", "65536", env=dict(os.environ), check=True)
    env = {**os.environ, "MLXGATE_HOME": str(tmp_path / "home"), "MLXGATE_CONFIG": str(tmp_path / "gateway.yaml"),
           "MLXGATE_API_KEY": "k", "MLXGATE_MODEL_DIRS": str(tmp_path / "models"), "HOME": str(tmp_path / "user")}
    (tmp_path / "gateway.yaml").write_text("default_model: coder\nport: 12100\n")
    claude = dict(line[len("export "):].split("=", 1) for line in
                  mlxgate("env", "--for", "claude", env=env, check=True).stdout.splitlines()
                  if line.startswith("export "))
    assert claude["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:12100" and claude["ANTHROPIC_API_KEY"] == "k"
    assert {claude[f"ANTHROPIC_DEFAULT_{tier}_MODEL"] for tier in ("OPUS", "SONNET", "HAIKU")} == {"coder"}
    assert claude["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "65536"
    assert int(claude["API_TIMEOUT_MS"]) >= 655_360 and claude["CLAUDE_CODE_ATTRIBUTION_HEADER"] == "0"
    pi = mlxgate("env", "--for", "pi", "--model", "coder", env=env, check=True).stdout
    written = tmp_path / "home" / "launch" / "pi" / "models.json"
    assert f"# written: {written}" in pi and json.loads(written.read_text())["providers"]["mlxgate"]["models"][0][
        "contextWindow"] == 65536
    aider = mlxgate("env", "--for", "aider", env=env, check=True).stdout
    metadata = json.loads((tmp_path / "home" / "launch" / "aider" / "model-metadata.json").read_text())
    assert metadata["openai/coder"]["max_input_tokens"] == 65536 and "--timeout 656" in aider
    cline = mlxgate("env", "--for", "cline", env=env, check=True).stdout
    providers = tmp_path / "home" / "launch" / "cline" / "data" / "settings" / "providers.json"
    assert f"# written: {providers}" in cline and " -k " not in cline, "the key is in a file, not on a command line"
    assert json.loads(providers.read_text())["providers"]["openai-compatible"]["settings"] == {
        "provider": "openai-compatible", "apiKey": "k", "model": "coder", "baseUrl": "http://127.0.0.1:12100/v1"}
    assert providers.stat().st_mode & 0o777 == 0o600
    from mlxgate.launch import AGENTS

    for agent in AGENTS:  # every launcher points its agent at this gateway, with this key
        shown = mlxgate("env", "--for", agent, env=env, check=True).stdout
        told = shown + "".join(Path(line.removeprefix("# written: ")).read_text() for line in shown.splitlines()
                               if line.startswith("# written: "))
        assert "http://127.0.0.1:12100" in told, f"{agent}:\n{told}"
        assert re.search(r"""(=|-k |"apiKey": ")k(\s|"|$)""", told, re.M), f"{agent} gets the key:\n{told}"
    assert not (tmp_path / "user").exists(), "nothing in the user's own home"
    unknown = mlxgate("env", "--for", "emacs", env=env)
    assert unknown.returncode == 1 and "no launcher for 'emacs'" in unknown.stderr


def test_the_cline_provider_file_is_the_one_cline_auth_writes(tmp_path):
    """`mlxgate launch cline` writes Cline's provider file itself (no key on a command line): the
    installed Cline's own `cline auth` writes the same, but for the time it was written."""
    if shutil.which("cline") is None:
        pytest.skip("cline is not installed (.ci/run installs it: npm install -g cline@3.0.65)")
    from mlxgate.launch import Target, cline

    setup = cline(Target(url="http://127.0.0.1:12100", key="sk-local", model="coder", small="fast", window=65536,
                         folder=tmp_path / "ours"))
    ((path, text),) = setup.files.items()
    subprocess.run(["cline", "auth", "-p", "openai-compatible", "-k", "sk-local", "-m", "coder", "-b",
                    "http://127.0.0.1:12100/v1", "--config", str(tmp_path / "theirs")], check=True, timeout=120,
                   capture_output=True, env={**os.environ, "CLINE_SESSION_BACKEND_MODE": "local"})
    theirs = json.loads((tmp_path / "theirs" / path.relative_to(tmp_path / "ours")).read_text())
    ours = json.loads(text)
    for written in (theirs, ours):
        written["providers"]["openai-compatible"].pop("updatedAt")
    assert ours == theirs
