"""Configuration: every key documented and loadable; bad values fail with file, key and fix."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mlxgate import PROJECT_ROOT
from mlxgate.config import SETTINGS, load_config
from mlxgate.errors import ConfigError

EXAMPLE = PROJECT_ROOT / "config" / "gateway.example.yaml"
README = PROJECT_ROOT / "README.md"
CONFIGURATION = PROJECT_ROOT / "docs" / "configuration.md"


def _example_keys() -> dict[str, str]:
    """Each top-level key of the example file, with the comment lines above it."""
    keys, comments = {}, []
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif match := re.match(r"(\w+):", line):
            keys[match[1]] = "\n".join(comments)
            comments = []
    return keys


def test_the_example_config_shows_every_key_with_its_default_and_variable():
    shown = yaml.safe_load(EXAMPLE.read_text())
    comments = _example_keys()
    assert list(shown) == list(comments), "a key appears twice in the example file"
    assert set(shown) == {s.key for s in SETTINGS}
    for setting in SETTINGS:
        assert setting.parse(shown[setting.key]) == setting.parse(setting.default), \
            f"{EXAMPLE.name} shows {setting.key}: {shown[setting.key]!r}, the default is {setting.default!r}"
        if setting.env:
            assert f"Env: {setting.env}" in comments[setting.key], \
                f"{setting.env} is not named above {setting.key} in {EXAMPLE.name}"
    config = load_config(EXAMPLE, env={})
    assert config.dynamic_port == 11402 and config.max_tokens == 8192


def test_the_example_litellm_section_loads_as_written():
    example = _example_keys()["litellm"].split("For example:\n", 1)[1]
    section = yaml.safe_load("\n".join(line[1:] for line in example.splitlines()))["litellm"]
    litellm = load_config(EXAMPLE, env={}, overrides={"litellm": section}).litellm
    assert litellm["model_list"][0]["litellm_params"] == {"model": "anthropic/claude-opus-4-8",
                                                          "api_key": "os.environ/ANTHROPIC_API_KEY"}
    assert litellm["router_settings"]["fallbacks"] == [{"claude-opus-4-8": ["claude-sonnet-4-6"]}]


def _readme_config_rows() -> dict[str, list[str]]:
    section = CONFIGURATION.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")]
    keys = [row[0].strip("`") for row in rows]
    assert len(keys) == len(set(keys)), "a key has two rows in docs/configuration.md's table"
    return dict(zip(keys, rows))


def test_the_configuration_page_has_one_row_per_key_with_its_variable_and_default():
    rows = _readme_config_rows()
    assert set(rows) == {s.key for s in SETTINGS}
    for setting in SETTINGS:
        _, env, default, _meaning = rows[setting.key]
        if setting.env:
            assert env.split()[0] == f"`{setting.env}`", f"docs/configuration.md: {setting.key} should name {setting.env}"
        else:
            assert env == "", f"docs/configuration.md: {setting.key} has no environment variable"
        shown = None if default == "none" else yaml.safe_load(default.strip("`"))
        assert setting.parse(shown) == setting.parse(setting.default), \
            f"docs/configuration.md shows {setting.key} default {default}, the default is {setting.default!r}"


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


def test_flags_saved_by_start_sit_between_the_environment_and_the_file(tmp_path):
    path = _write(tmp_path, "max_tokens: 100\nport: 12000\ndynamic_port: 12001\n")
    saved = {"max_tokens": 200, "port": 12100, "use_sudo": True}
    env = {"MAX_TOKENS": "300"}
    config = load_config(path, env=env, start_flags=saved)
    assert (config.max_tokens, config.port, config.dynamic_port) == (300, 12100, 12001)
    assert load_config(path, env=env, start_flags=saved, overrides={"max_tokens": 400}).max_tokens == 400
    assert load_config(path, env={}, start_flags=saved).max_tokens == 200
    with pytest.raises(ConfigError, match="option --port saved by the last `mlxgate start`: expected a TCP port"):
        load_config(path, env={}, start_flags={"port": 0})


@pytest.mark.parametrize("text, expected", [
    ("litellm: [a]\n", "litellm: expected a mapping with keys among model_list, litellm_settings, "
                        "router_settings, got a list. Fix: set it like `litellm: {model_list:"),
    ("litellm: {models: []}\n", "litellm.models: unknown key; expected one of model_list"),
    ("litellm: {model_list: {a: b}}\n", "litellm.model_list: expected a list of deployments, got a mapping"),
    ("litellm: {model_list: [x]}\n", "litellm.model_list.0: expected a mapping with a string `model_name`"),
    ("litellm: {model_list: [{litellm_params: {model: anthropic/x}}]}\n",
     "litellm.model_list.0.model_name: expected a string, the model name clients send, got nothing"),
    ("litellm: {model_list: [{model_name: a, litellm_params: {api_key: sk-secret}}]}\n",
     "litellm.model_list.0.litellm_params: expected a mapping with a string `model` "
     "(e.g. anthropic/claude-opus-4-8), got a mapping without `model`. Fix:"),
    ("litellm: {router_settings: [fallbacks]}\n", "litellm.router_settings: expected a mapping, got a list"),
])
def test_a_bad_litellm_section_names_the_path_and_shows_no_secret(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: litellm") and expected in str(caught.value)
    assert "sk-secret" not in str(caught.value)


def test_litellm_deployments_pass_through_untouched(tmp_path):
    path = _write(tmp_path, "litellm:\n  model_list:\n  - model_name: claude-opus-4-8\n    litellm_params:\n"
                            "      model: anthropic/claude-opus-4-8\n      api_key: os.environ/ANTHROPIC_API_KEY\n"
                            "      timeout: 30\n  litellm_settings: {drop_params: true}\n")
    litellm = load_config(path, env={}).litellm
    assert litellm == {"model_list": [{"model_name": "claude-opus-4-8", "litellm_params": {
        "model": "anthropic/claude-opus-4-8", "api_key": "os.environ/ANTHROPIC_API_KEY", "timeout": 30}}],
        "litellm_settings": {"drop_params": True}}
    assert load_config(tmp_path / "absent.yaml", env={}).litellm == {}


def test_config_has_one_field_per_setting_and_replace_works(tmp_path):
    config = load_config(tmp_path / "absent.yaml", env={"MLXGATE_HOME": str(tmp_path)})
    fields = [f.name for f in dataclasses.fields(config)]
    assert fields == [s.key for s in SETTINGS] + ["home", "source", "api_key", "hf_cache"]
    assert (config.max_parallel, config.stall_timeout) == (8, 30)
    changed = dataclasses.replace(config, port=12345)
    assert changed.http_url == "http://127.0.0.1:12345" and changed.home == tmp_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


def test_a_bad_environment_variable_is_named(tmp_path):
    with pytest.raises(ConfigError, match="environment variable MLX_DYNAMIC_PORT: expected an integer"):
        load_config(tmp_path / "absent.yaml", env={"MLX_DYNAMIC_PORT": "x"})


def test_the_api_key_comes_from_the_environment_or_the_key_file(tmp_path):
    assert load_config(tmp_path / "a.yaml", env={"MLXGATE_HOME": str(tmp_path)}).api_key is None
    (tmp_path / "api_key").write_text("from-file\n")
    assert load_config(tmp_path / "a.yaml", env={"MLXGATE_HOME": str(tmp_path)}).api_key == "from-file"
    env = {"MLXGATE_HOME": str(tmp_path), "MLXGATE_API_KEY": "from-env"}
    assert load_config(tmp_path / "a.yaml", env=env).api_key == "from-env"


def test_every_hook_is_documented():
    """(Every command is: docs/cli.md's reference is generated, tests/test_cli_reference.py.)"""
    from mlxgate import hookspecs

    plugins = (PROJECT_ROOT / "docs" / "plugins.md").read_text()
    for name in dir(hookspecs):
        if name.startswith("mlxgate_"):
            assert f"`{name}(ctx)" in plugins, f"hook {name} is not documented in docs/plugins.md"


def test_installed_plugins_load_unless_the_switch_is_off(tmp_path, monkeypatch):
    from mlxgate.plugins import make_manager

    (tmp_path / "counting_plugin.py").write_text("import mlxgate\n\n@mlxgate.hookimpl\n"
                                                 "def mlxgate_pre_call(ctx):\n    ctx.notes['seen'] = True\n")
    installed = tmp_path / "counting_plugin-1.0.dist-info"
    installed.mkdir()
    (installed / "METADATA").write_text("Metadata-Version: 2.1\nName: counting-plugin\nVersion: 1.0\n")
    (installed / "entry_points.txt").write_text("[mlxgate]\ncounting = counting_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def loaded() -> bool:
        return any(name == "counting_plugin" for name, _ in make_manager().list_name_plugin())

    assert os.environ["MLXGATE_LOAD_ENTRY_POINTS"] == "0" and not loaded()  # conftest's guard
    monkeypatch.setenv("MLXGATE_LOAD_ENTRY_POINTS", "1")
    assert loaded()


def test_a_plugin_dropped_into_the_checkouts_plugins_folder_stays_out_of_the_tests(tmp_path, monkeypatch):
    """The checkout's `plugins/` holds the built-ins and may hold a developer's drop-ins; the tests
    load only the built-ins from it (a stand-in for that folder here: the real one is shared)."""
    import shutil

    from mlxgate import plugins
    from mlxgate.project_files import project_file

    checkout = tmp_path / "plugins"
    shutil.copytree(project_file("plugins"), checkout)
    (checkout / "dropped_in.py").write_text("import mlxgate\n\n@mlxgate.hookimpl\n"
                                            "def mlxgate_pre_call(ctx):\n    ctx.notes['dropped'] = True\n")
    monkeypatch.setattr(plugins, "project_file", lambda name: checkout)

    def loaded() -> set[str]:
        return {Path(name).stem for name, _ in plugins.make_manager(entry_points=False).list_name_plugin()}

    assert os.environ["MLXGATE_CHECKOUT_DROP_INS"] == "0"  # conftest's guard
    assert loaded() >= set(plugins.BUILTIN_PLUGINS) and "dropped_in" not in loaded()
    monkeypatch.setenv("MLXGATE_CHECKOUT_DROP_INS", "1")  # as a user's gateway runs
    assert "dropped_in" in loaded()


# ---------------------------------------------------------------- declared dependencies
def _imported(folders: tuple[str, ...]) -> dict[str, str]:
    """Top-level modules the folders import from outside the standard library and the project,
    each with a file that imports it."""
    ours = {"mlxgate"} | {path.stem for folder in folders for path in (PROJECT_ROOT / folder).glob("*.py")}
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in (name.split(".")[0] for name in names):
                    if top not in sys.stdlib_module_names and top not in ours:
                        found.setdefault(top, str(path.relative_to(PROJECT_ROOT)))
    return found


def _distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


IMPORT_NAMES = {"PIL": "pillow"}  # import names of optional distributions that differ from theirs


@pytest.mark.parametrize("folders, extras", [(("daemon", "plugins"), ("vision",)),
                                             (("tests", "bench"), ("test", "vision"))])
def test_every_imported_library_is_declared_in_pyproject(folders, extras):
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    declared = {_distribution(re.match(r"[\w.-]+", requirement)[0]) for requirement in requirements}
    optional = {_distribution(re.match(r"[\w.-]+", r)[0]) for r in project["optional-dependencies"]["vision"]}
    providers = importlib.metadata.packages_distributions()  # import name -> distributions (yaml -> PyYAML)
    for module, where in _imported(folders).items():
        candidates = {_distribution(name) for name in providers.get(module, [])}
        if not candidates and _distribution(IMPORT_NAMES.get(module, module)) in optional:
            continue  # the vision extra, not installed here
        assert candidates, f"{where} imports {module}, which no installed distribution provides"
        assert candidates & declared, (f"{where} imports {module} (from {', '.join(sorted(candidates))}), "
                                       f"which pyproject.toml does not declare")


def test_every_folder_of_the_package_is_in_pyproject():
    """An installed (not editable) mlxgate holds only the packages pyproject lists."""
    import tomllib

    listed = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"mlxgate" + ("." + ".".join(f.relative_to(PROJECT_ROOT / "daemon").parts) if f != PROJECT_ROOT / "daemon"
               else "") for f in [PROJECT_ROOT / "daemon", *(PROJECT_ROOT / "daemon").rglob("*")]
               if f.is_dir() and any(f.glob("*.py"))}
    assert folders == listed, folders ^ listed
