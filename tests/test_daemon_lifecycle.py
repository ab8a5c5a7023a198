"""Daemon lifecycle with real supervisord: a dead member takes the group down, plugins load at start."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from support import Gateway, mlxgate, pid_alive, wait_for

PROMPT = [{"role": "user", "content": "Write a story"}]


@pytest.mark.parametrize("victim", ["wrapper", "proxy", "proxy_https", "supervisord"])
def test_kill_9_of_any_program_brings_the_whole_group_down(models_dir, tmp_path, victim):
    gateway = Gateway(tmp_path / "home", models_dir, "--default-model", "tiny-a",
                      "--autocomplete-model", "org/tiny-b")
    gateway.start()
    try:
        models = gateway.wrapper_call("GET", "/models").json()["servers"]
        model_pids = [s["pid"] for s in models.values()]
        assert all(model_pids)
        ours = gateway.our_pids()
        assert len(ours) >= 7, ours  # supervisord, listener, 2 proxies, gunicorn x2, 2 model servers
        pid = gateway.supervisord_pid() if victim == "supervisord" else gateway.program_pids()[victim]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in ours + model_pids), 30,
                 what=f"every process of the group to exit after {victim} was killed")
        assert mlxgate("status", env=gateway.env).returncode == 1
        if victim != "supervisord":  # the programs notice their parent is gone and stop themselves
            log = (gateway.home / "logs" / "group_down.log").read_text()
            assert f"{victim} exited on its own" in log
        gateway.start()  # what the boot service does next: a clean start over the leftovers
        assert mlxgate("status", env=gateway.env).returncode == 0
    finally:
        gateway.stop()


PLUGIN = '''
from mlxgate.hookspecs import hookimpl

@hookimpl
def mlxgate_pre_call(ctx):
    ctx.data["max_tokens"] = 2   # every answer is two tokens long
'''


def test_a_dropped_in_plugin_changes_behaviour_after_restart(models_dir, tmp_path):
    gateway = Gateway(tmp_path / "home", models_dir, "--default-model", "tiny-a", https=False)
    gateway.start()
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)
        ask = lambda: client.chat.completions.create(model="gpt-4o", max_tokens=6, messages=PROMPT)
        assert ask().usage.completion_tokens == 6
        (gateway.home / "plugins" / "two_tokens.py").write_text(PLUGIN)
        assert ask().usage.completion_tokens == 6, "plugins load at start, not while running"
        restarted = mlxgate("restart", env=gateway.env, timeout=300)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert ask().usage.completion_tokens == 2
    finally:
        gateway.stop()


@pytest.mark.parametrize("source, expected", [
    ("import nothing_like_this\n", "two_broken.py:1 failed to load: ModuleNotFoundError"),
    ("x = 1\ndef broken(:\n", "two_broken.py:2 failed to load: SyntaxError"),
    ("from mlxgate.hookspecs import hookimpl\n\n@hookimpl\ndef mlxgate_pre_cal(ctx):\n    pass\n",
     "unknown hook 'mlxgate_pre_cal'"),
])
def test_a_broken_plugin_stops_the_start_with_file_and_line(models_dir, tmp_path, source, expected):
    gateway = Gateway(tmp_path / "home", models_dir, https=False)
    (gateway.home / "plugins" / "two_broken.py").write_text(source)
    result = gateway.start(check=False)
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert gateway.supervisord_pid() is None, "nothing was started"


def test_start_refuses_a_port_in_use_and_a_second_start(models_dir, tmp_path):
    import socket

    gateway = Gateway(tmp_path / "home", models_dir, https=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", gateway.port))
        busy.listen()
        result = gateway.start(check=False)
    assert result.returncode == 1 and f"port {gateway.port} (port) is already in use" in result.stderr
    gateway.start()
    try:
        again = gateway.start(check=False)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        gateway.stop()
    assert mlxgate("stop", env=gateway.env).stdout.strip() == "mlxgate is not running"


def test_start_with_a_download_fails_fast_offline_before_starting_anything(models_dir, tmp_path):
    gateway = Gateway(tmp_path / "home", models_dir, "--download-model", "Qwen2.5-Coder-0.5B-8bit",
                      https=False, extra_env={"HF_HUB_OFFLINE": "1"})
    result = gateway.start(check=False)
    assert result.returncode == 1 and "cannot download mlx-community/Qwen2.5-Coder-0.5B-8bit" in result.stderr
    assert gateway.supervisord_pid() is None
