"""The MLX wrapper as a user meets it: real gunicorn, real mlx_lm.server, tiny real models."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import time

import pytest
import requests

from support import Wrapper, chat, pid_alive, port_open, wait_for


def test_load_a_model_and_it_answers(wrapper):
    response = wrapper.load("tiny-a")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["state"] == "ready" and status["model"] == "tiny-a"
    assert status["port"] == wrapper.dynamic_port and pid_alive(status["pid"])
    answer = chat(wrapper.dynamic_port, "Say hello", max_tokens=5)
    assert answer["usage"]["completion_tokens"] == 5
    print(f"\nload tiny-a: {status['load_seconds']} s")


def test_switch_a_to_b_to_a(wrapper):
    seen = []
    for name in ("tiny-a", "org/tiny-b", "tiny-a"):
        response = wrapper.load(name)
        assert response.status_code == 200, response.text
        status = response.json()
        assert status["model"] == name
        seen.append((name, status["pid"], status["load_seconds"]))
        # the dynamic server really serves that model now (tiny-b has 3 layers, tiny-a 2)
        assert chat(wrapper.dynamic_port, max_tokens=2)["usage"]["completion_tokens"] == 2
        models = {m["name"]: m for m in wrapper.call("GET", "/models").json()["models"]}
        assert [s["role"] for s in models[name]["servers"] if s["state"] == "ready"][:1] == ["dynamic"] \
            or name == "tiny-a"
    assert seen[0][1] != seen[1][1] != seen[2][1], "each switch starts a fresh server process"
    print("\nswitch timings (model, pid, load s):", seen)


def test_provider_prefix_and_org_forms_name_the_same_model(wrapper):
    assert wrapper.load("tiny-a").status_code == 200
    loads_before = wrapper.servers()["dynamic"]["loads"]
    for name in ("openai/tiny-a", "mlx/tiny-a"):
        response = wrapper.load(name)
        assert response.status_code == 200 and response.json()["model"] == "tiny-a"
    assert wrapper.servers()["dynamic"]["loads"] == loads_before, "already loaded: no reload"


def test_concurrent_loads_of_one_model_share_one_load(wrapper):
    assert wrapper.load("tiny-a").status_code == 200
    loads_before = wrapper.servers()["dynamic"]["loads"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: wrapper.load("org/tiny-b"), range(6)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len({r.json()["pid"] for r in results}) == 1
    assert wrapper.servers()["dynamic"]["loads"] == loads_before + 1


def test_a_load_of_another_model_waits_its_turn(wrapper):
    assert wrapper.load("tiny-a").status_code == 200
    finished = {}

    def load(name):
        response = wrapper.load(name)
        finished[name] = time.monotonic()
        return response
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(load, ["org/tiny-b", "tiny-a"]))
    assert [r.status_code for r in results] == [200, 200]
    last = max(finished, key=finished.get)
    final = wrapper.servers()["dynamic"]
    assert final["state"] == "ready" and final["model"] == last, "the later load won, none was lost"
    assert chat(wrapper.dynamic_port, max_tokens=1)["choices"]


def test_unload_stops_the_dynamic_server(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.call("POST", "/models/unload", json={"server": "dynamic"})
    assert response.status_code == 200 and response.json()["state"] == "stopped"
    wait_for(lambda: not pid_alive(pid), 10, what="the unloaded server to exit")
    assert not port_open(wrapper.dynamic_port)
    assert wrapper.servers()["autocomplete"]["state"] == "ready", "unload touches only its server"


def test_autocomplete_server_answers_completions(wrapper):
    wait_for(lambda: wrapper.servers()["autocomplete"]["state"] == "ready", 60, what="autocomplete")
    response = requests.post(f"http://127.0.0.1:{wrapper.autocomplete_port}/v1/completions", timeout=60,
                             json={"prompt": "def add(a, b):", "max_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4


def test_unknown_model_is_a_clear_404_and_the_current_model_keeps_serving(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.load("no-such-model")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "model_not_found" and "no-such-model" in error["message"]
    assert wrapper.servers()["dynamic"]["pid"] == pid
    assert chat(wrapper.dynamic_port, max_tokens=1)["choices"]


@pytest.mark.parametrize("name", ["../tiny-a", "/etc/passwd", "org/../../x", "~/models/tiny-a",
                                  "tiny-a/..", "..\\tiny-a", "outside-link"])
def test_names_that_escape_the_model_directories_are_refused(wrapper, models_dir, tmp_path_factory, name):
    if name == "outside-link" and not (models_dir / name).exists():
        outside = tmp_path_factory.mktemp("outside")
        shutil.copytree(models_dir / "tiny-a", outside / "tiny-c")  # a real model, outside
        (models_dir / name).symlink_to(outside / "tiny-c")
    response = wrapper.load(name)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_model_name"


def test_garbage_weights_fail_fast_and_the_previous_model_keeps_serving(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.load("broken-garbage")
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "broken-garbage" in message and "model.safetensors" in message
    assert "'tiny-a' is still serving" in message
    assert wrapper.servers()["dynamic"]["pid"] == pid, "never stopped"
    assert chat(wrapper.dynamic_port, max_tokens=1)["choices"]


def test_weights_that_do_not_fit_fail_and_the_previous_model_serves_again(wrapper):
    wrapper.load("org/tiny-b")
    response = wrapper.load("broken-shapes")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "model_load_failed"
    assert "broken-shapes" in error["message"] and "shape" in error["message"].lower()
    assert "'org/tiny-b' is serving again" in error["message"]
    dynamic = wrapper.servers()["dynamic"]
    assert dynamic["state"] == "ready" and dynamic["model"] == "org/tiny-b"
    assert chat(wrapper.dynamic_port, max_tokens=1)["choices"]


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "JSON object"),
    (b"[1, 2]", "JSON object"),
    (b'{"server": "dynamic"}', "`model` is required"),
    (b'{"model": 42}', "`model` is required"),
    (b'{"model": "tiny-a", "server": "gpu"}', "server must be one of"),
])
def test_bad_requests_to_the_management_api_get_json_errors(wrapper, body, problem):
    response = wrapper.call("POST", "/models/load", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert problem in response.json()["error"]["message"]


def test_unknown_route_and_oversize_body_are_json_errors(wrapper):
    assert wrapper.call("GET", "/nope").json()["error"]["type"] == "not_found"
    response = wrapper.call("POST", "/models/load", data=b"{" + b" " * 100_000 + b"}",
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_the_management_api_requires_the_key(wrapper, key):
    for method, path in (("GET", "/models"), ("POST", "/models/load"), ("POST", "/models/unload")):
        response = wrapper.call(method, path, key=key, json={"model": "tiny-a"})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert wrapper.call("GET", "/health", key=None).status_code == 200


@pytest.mark.parametrize("victim", ["wrapper", "worker"])
def test_sigkill_of_the_wrapper_leaves_no_model_server_behind(models_dir, tmp_path, victim):
    wrapper = Wrapper(tmp_path / "home", models_dir, args=("--autocomplete-model", "tiny-a"))
    try:
        assert wrapper.load("org/tiny-b").status_code == 200
        wait_for(lambda: len(wrapper.model_pids()) == 2, 60, what="both model servers")
        pids = wrapper.model_pids()
        target = wrapper.process.pid
        if victim == "worker":  # the gunicorn worker, where the model state lives
            target = int(os.popen(f"pgrep -P {wrapper.process.pid}").read().split()[0])
        os.kill(target, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 15, what=f"model servers {pids} to exit")
    finally:
        wrapper.stop(signal.SIGKILL)
