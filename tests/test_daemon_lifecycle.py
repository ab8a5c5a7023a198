"""Daemon lifecycle with real supervisord: a dead member takes the group down, plugins load at start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import openai
import pytest

from support import MLXGATE, ROOT, Gateway, mlxgate, pid_alive, wait_for

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
        for program in ("proxy", "wrapper"):  # it returns once the program answers: no refused request after
            again = mlxgate("restart", program, env=gateway.env, timeout=300)
            assert again.stdout.splitlines()[-1] == f"{program} restarted and answers", again.stderr
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


def test_a_missing_model_fails_the_start_within_seconds_with_the_three_fixes(models_dir, tmp_path):
    gateway = Gateway(tmp_path / "home", models_dir, "--default-model", "Qwen2.5-Coder-3B-8bit", https=False)
    started = time.monotonic()
    result = gateway.start(check=False)
    took = time.monotonic() - started
    assert result.returncode == 1 and took < 10, (took, result.stderr)
    assert "model 'Qwen2.5-Coder-3B-8bit' (default_model) is not on this machine" in result.stderr
    for fix in ("mlxgate download Qwen2.5-Coder-3B-8bit", "mlxgate start --download-model Qwen2.5-Coder-3B-8bit",
                "mlxgate demo-model"):
        assert fix in result.stderr
    assert gateway.supervisord_pid() is None

    # the boot service runs the same start in the foreground: it stops with 78, which its unit does not restart
    service = subprocess.run([*MLXGATE, "start", "--foreground", *gateway.flags], env=gateway.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert service.returncode == 78, service.stdout + service.stderr
    status = mlxgate("status", env=gateway.env)
    assert status.returncode == 1 and re.search(r"last start\s+BLOCKED\s+.*Qwen2.5-Coder-3B-8bit", status.stdout)
    doctor = mlxgate("doctor", env=gateway.env)
    assert doctor.returncode == 1 and "fix: one of:" in doctor.stdout


def test_the_foreground_start_exits_so_the_service_manager_knows_what_to_do(models_dir, tmp_path):
    gateway = Gateway(tmp_path / "home", models_dir, "--default-model", "tiny-a", https=False)
    for ending, expected in (("stop", 0), ("a program dies", 75)):
        log = (tmp_path / f"{expected}.log").open("w")
        run = subprocess.Popen([*MLXGATE, "start", "--foreground", *gateway.flags], env=gateway.env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "mlxgate is running" in (tmp_path / f"{expected}.log").read_text(), 120,
                     what="the foreground start to be up")
            status = mlxgate("status", env=gateway.env)
            assert status.returncode == 0, status.stdout
            assert re.search(r"^proxy_https\s+OFF\s+enable_https is off", status.stdout, re.M), status.stdout
            if ending == "stop":
                run.send_signal(signal.SIGTERM)  # what systemctl stop / launchctl kill TERM send
            else:
                os.kill(gateway.program_pids()["wrapper"], signal.SIGKILL)
            assert run.wait(60) == expected, (tmp_path / f"{expected}.log").read_text()
        finally:
            if run.poll() is None:
                run.kill()
            log.close()
        wait_for(lambda: not any(pid_alive(p) for p in gateway.our_pids()), 30, what="every process to exit")


def test_start_through_the_service_manager_waits_for_the_gateway_or_names_why_it_gave_up(models_dir, tmp_path):
    """`mlxgate start` with the service installed asks the manager to start it; here the
    manager is stood in for by what it runs, `start --foreground`, in the background."""
    from mlxgate.config import load_config
    from mlxgate.supervision import control

    runs = []

    def manager_start(flags):
        return lambda: runs.append(subprocess.Popen([*MLXGATE, "start", "--foreground", *flags], env=gateway.env,
                                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

    gateway = Gateway(tmp_path / "home", models_dir, https=False)
    # what `mlxgate start` reads: the flags `mlxgate service install` saved for the service
    config = lambda model: load_config(env=gateway.env, overrides={"port": gateway.port,  # noqa: E731
                                                                   "default_model": model})
    with pytest.raises(control.StartBlocked, match="model 'not-here' \\(default_model\\) is not on this machine"):
        control.start_through(manager_start([*gateway.flags, "--default-model", "not-here"]), config("not-here"),
                              say=lambda _: None, timeout=30)
    assert runs[-1].wait(10) == 78
    said = []
    control.start_through(manager_start([*gateway.flags, "--default-model", "tiny-a"]), config("tiny-a"),
                          say=said.append)
    try:
        assert f"  tiny-a is ready on port {gateway.dynamic_port}" in " ".join(said)
        assert control.blocked_cause(gateway.home) is None, "a start that got through forgets the last cause"
    finally:
        runs[-1].send_signal(signal.SIGTERM)
        assert runs[-1].wait(60) == 0
