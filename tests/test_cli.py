"""The `mlxgate` command as a user types it."""

from __future__ import annotations

import json
import os
import time

from support import free_port, mlxgate


def test_models_load_and_unload_from_the_command_line(wrapper):
    loaded = mlxgate("load", "org/tiny-b", env=wrapper.env)
    assert loaded.returncode == 0, loaded.stderr
    assert "org/tiny-b is ready on the dynamic server" in loaded.stdout
    listing = mlxgate("models", env=wrapper.env)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "SOURCE", "LOADED", "PATH"]
    row = next(line for line in lines if line.startswith("org/tiny-b "))
    assert "dynamic:ready" in row
    assert any(line.startswith("tiny-a ") and "autocomplete:ready" in line for line in lines)
    assert mlxgate("unload", env=wrapper.env).stdout.strip() == "the dynamic server is stopped"


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
    assert rows["tiny-a"][1:3] == ["model_dir", "-"] and rows["org/tiny-b"][1] == "model_dir"
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
    wrong = mlxgate("unload", "--server", "elsewhere", env=dict(os.environ))
    assert wrong.returncode == 2 and "'elsewhere' is not one of 'dynamic', 'autocomplete'" in wrong.stderr
