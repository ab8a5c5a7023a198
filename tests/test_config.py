"""Configuration: every key documented and loadable; bad values fail with file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlxgate import PROJECT_ROOT
from mlxgate.config import SETTINGS, load_config
from mlxgate.errors import ConfigError

EXAMPLE = PROJECT_ROOT / "config" / "gateway.example.yaml"


def test_the_example_config_loads_and_documents_every_key():
    config = load_config(EXAMPLE, env={})
    assert config.dynamic_port == 11402 and config.max_tokens == 8192
    assert set(yaml.safe_load(EXAMPLE.read_text())) == {s.key for s in SETTINGS}
    text = EXAMPLE.read_text()
    for setting in SETTINGS:
        if setting.env:
            assert setting.env in text, f"{setting.env} is not documented in {EXAMPLE.name}"


def test_every_key_is_in_the_readme():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.key}`" in readme, f"config key {setting.key} is not in README.md"


def test_a_missing_file_means_defaults(tmp_path):
    config = load_config(tmp_path / "absent.yaml", env={})
    assert config.wrapper_url == "http://127.0.0.1:11401" and config.source is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("dynamic_prot: 1\n", "dynamic_prot: unknown key. Fix: remove it or use one of"),
    ("dynamic_port: abc\n", "dynamic_port: expected an integer, got 'abc'. Fix: set it like `dynamic_port: 11402`"),
    ("dynamic_port: 70000\n", "expected a TCP port between 1 and 65535"),
    ("max_tokens: 0\n", "max_tokens: expected a positive integer"),
    ("detailed_debug: maybe\n", "detailed_debug: expected true or false"),
    ("model_dirs: {a: 1}\n", "model_dirs: expected a list of folder paths"),
    ("wrapper_url: localhost\n", "wrapper_url: expected a URL such as http://127.0.0.1:11401"),
    ("dynamic_port: 11403\n", "must all differ"),
    ("- a\n- b\n", "expected a mapping of keys to values"),
    ("dynamic_port: [\n", "invalid YAML at line"),
])
def test_bad_files_name_the_file_the_key_and_the_fix(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value)


def test_environment_overrides_the_file_and_flags_override_both(tmp_path):
    path = _write(tmp_path, "max_tokens: 100\ndynamic_port: 12000\n")
    env = {"MAX_TOKENS": "200", "MLXGATE_MODEL_DIRS": "/a:/b", "DETAILED_DEBUG": "yes",
           "MLXGATE_HOME": str(tmp_path / "home")}
    config = load_config(path, env=env)
    assert config.max_tokens == 200 and config.dynamic_port == 12000
    assert config.model_dirs == (Path("/a"), Path("/b")) and config.detailed_debug is True
    assert config.home == tmp_path / "home"
    assert load_config(path, env=env, overrides={"max_tokens": 300}).max_tokens == 300


def test_a_bad_environment_variable_is_named(tmp_path):
    with pytest.raises(ConfigError, match="environment variable MLX_DYNAMIC_PORT: expected an integer"):
        load_config(tmp_path / "absent.yaml", env={"MLX_DYNAMIC_PORT": "x"})


def test_the_api_key_comes_from_the_environment_or_the_key_file(tmp_path):
    assert load_config(tmp_path / "a.yaml", env={"MLXGATE_HOME": str(tmp_path)}).api_key is None
    (tmp_path / "api_key").write_text("from-file\n")
    assert load_config(tmp_path / "a.yaml", env={"MLXGATE_HOME": str(tmp_path)}).api_key == "from-file"
    env = {"MLXGATE_HOME": str(tmp_path), "MLXGATE_API_KEY": "from-env"}
    assert load_config(tmp_path / "a.yaml", env=env).api_key == "from-env"


def test_every_hook_and_command_is_in_the_readme():
    from mlxgate import hookspecs
    from mlxgate.cli import COMMANDS

    readme = (PROJECT_ROOT / "README.md").read_text()
    for name in dir(hookspecs):
        if name.startswith("mlxgate_"):
            assert f"`{name}(ctx)" in readme, f"hook {name} is not documented in README.md"
    for command in COMMANDS:
        assert f"`mlxgate {command}" in readme, f"command {command} is not documented in README.md"
