"""The MLX wrapper as a user meets it: real gunicorn, real mlx_lm.server, tiny real models."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from support import Wrapper, free_port, pid_alive, port_open, wait_for


def chat(wrapper, text: str = "hello", max_tokens: int = 8, to: str = "tiny-a", **extra) -> dict:
    """A chat completion through the wrapper's relay for the model `to` (the model servers answer it alone)."""
    response = wrapper.call("POST", "/relay/v1/chat/completions", headers={"x-mlxgate-model": to}, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_load_a_model_and_it_answers_on_a_port_of_its_own(wrapper):
    response = wrapper.load("org/tiny-b")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["state"] == "ready" and status["model"] == "org/tiny-b" and pid_alive(status["pid"])
    assert status["port"] not in (wrapper.dynamic_port, wrapper.autocomplete_port, wrapper.port)
    assert status["pinned"] is False and status["cost_bytes"] > status["prompt_cache_bytes"] > 0
    answer = chat(wrapper, "Say hello", max_tokens=5, to="org/tiny-b")
    assert answer["usage"]["completion_tokens"] == 5
    print(f"\nload org/tiny-b: {status['load_seconds']} s")


def test_several_models_stay_loaded_side_by_side(wrapper):
    """No switching: each model has its own server, and one that is loaded is never loaded again."""
    pids = {name: wrapper.load(name).json()["pid"] for name in ("org/tiny-b", "tiny-c")}
    loads = {name: wrapper.server(name)["loads"] for name in pids}
    for name in ("org/tiny-b", "tiny-c", "tiny-a", "org/tiny-b"):
        assert chat(wrapper, max_tokens=2, to=name)["usage"]["completion_tokens"] == 2
    assert {name: wrapper.server(name)["pid"] for name in pids} == pids
    assert {name: wrapper.server(name)["loads"] for name in pids} == loads
    assert {"org/tiny-b", "tiny-a", "tiny-c"} <= set(wrapper.loaded())


def test_provider_prefix_and_org_forms_name_the_same_model(wrapper):
    assert wrapper.load("tiny-c").status_code == 200
    loads_before = wrapper.server("tiny-c")["loads"]
    for name in ("openai/tiny-c", "mlx/tiny-c"):
        response = wrapper.load(name)
        assert response.status_code == 200 and response.json()["model"] == "tiny-c"
    assert wrapper.server("tiny-c")["loads"] == loads_before, "already loaded: no reload"


def test_concurrent_loads_of_one_model_share_one_load(wrapper):
    wrapper.unload("tiny-c")
    loads_before = wrapper.server("tiny-c")["loads"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: wrapper.load("tiny-c"), range(6)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len({r.json()["pid"] for r in results}) == 1
    assert wrapper.server("tiny-c")["loads"] == loads_before + 1


def test_unload_stops_that_model_only(wrapper):
    pid = wrapper.load("tiny-c").json()["pid"]
    port = wrapper.server("tiny-c")["port"]
    response = wrapper.unload("tiny-c")
    assert response.status_code == 200 and response.json()["state"] == "stopped"
    wait_for(lambda: not pid_alive(pid), 10, what="the unloaded server to exit")
    assert not port_open(port)
    assert wrapper.server("tiny-a")["state"] == "ready", "unload touches only its model"


def test_connections_to_the_model_server_are_opened_ahead_and_never_outlive_it(wrapper):
    """mlx_lm.server closes each connection after one answer: the relay opens the next ones
    while a request runs (at most two wait), and closes them when the server goes."""
    first = wrapper.load("tiny-c").json()
    for _ in range(3):
        chat(wrapper, max_tokens=1, to="tiny-c")

    def waiting(pid: int, port: int) -> list:
        return [c for c in psutil.Process(pid).net_connections("tcp")
                if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED]
    assert 1 <= len(wait_for(lambda: waiting(first["pid"], first["port"]), 10, what="connections opened ahead")) <= 2
    wrapper.unload("tiny-c")
    second = wrapper.load("tiny-c").json()
    assert second["pid"] != first["pid"] and not pid_alive(first["pid"])
    assert chat(wrapper, max_tokens=2, to="tiny-c")["usage"]["completion_tokens"] == 2, "new connections"
    relay = [c for c in psutil.Process(second["pid"]).parent().net_connections("tcp")
             if c.raddr and c.raddr.port in (first["port"], second["port"])]
    assert relay and all(c.raddr.port == second["port"] and c.status == psutil.CONN_ESTABLISHED for c in relay), \
        "none left from the old server"


def test_the_autocomplete_model_answers_completions_on_its_own_port(wrapper):
    wait_for(lambda: wrapper.server("tiny-a")["state"] == "ready", 60, what="autocomplete")
    assert wrapper.server("tiny-a")["port"] == wrapper.autocomplete_port
    assert wrapper.server("tiny-a")["name"] == "autocomplete"
    response = wrapper.call("POST", "/relay/v1/completions", headers={"x-mlxgate-model": "tiny-a"},
                            json={"prompt": "def add(a, b):", "max_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4


def test_unknown_model_is_a_clear_404_and_the_loaded_ones_keep_serving(wrapper):
    pid = wrapper.server("tiny-a")["pid"]
    response = wrapper.load("no-such-model")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "no-such-model" in error["message"]
    assert wrapper.server("tiny-a")["pid"] == pid
    assert chat(wrapper, max_tokens=1)["choices"]


@pytest.mark.parametrize("name", ["../tiny-a", "/etc/passwd", "org/../../x", "~/models/tiny-a",
                                  "tiny-a/..", "..\\tiny-a", "outside-link"])
def test_names_that_escape_the_model_directories_are_refused(wrapper, models_dir, tmp_path_factory, name):
    if name == "outside-link" and not (models_dir / name).exists():
        outside = tmp_path_factory.mktemp("outside")
        shutil.copytree(models_dir / "tiny-a", outside / "tiny-c")  # a real model, outside
        (models_dir / name).symlink_to(outside / "tiny-c")
    response = wrapper.load(name)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "not allowed" in error["message"]
    assert str(models_dir) not in error["message"], "no path of this machine in an answer"


def test_garbage_weights_fail_fast_and_the_loaded_models_keep_serving(wrapper):
    pid = wrapper.server("tiny-a")["pid"]
    response = wrapper.load("broken-garbage")
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    message = response.json()["error"]["message"]
    assert "broken-garbage" in message and "model.safetensors" in message
    assert wrapper.server("tiny-a")["pid"] == pid, "never stopped"
    assert chat(wrapper, max_tokens=1)["choices"]


def test_weights_that_do_not_fit_their_config_fail_and_hold_no_memory(wrapper):
    response = wrapper.load("broken-shapes")
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "broken-shapes" in error["message"] and "shape" in error["message"].lower()
    broken = wrapper.server("broken-shapes")
    assert broken["state"] == "failed" and broken["cost_bytes"] == 0
    assert chat(wrapper, max_tokens=1)["choices"]


def test_a_model_server_answers_the_relay_alone(wrapper):
    """Straight to the model server's port, past the queue and the cap: refused. Through the
    relay, a body naming another model is answered by the model the header names."""
    status = wrapper.server("tiny-a")
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer guess"}):
        direct = requests.post(f"http://127.0.0.1:{status['port']}/v1/chat/completions", json=request,
                               headers=headers, timeout=30)
        assert direct.status_code == 403 and "relay only" in direct.json()["error"]
    assert requests.get(f"http://127.0.0.1:{status['port']}/v1/models", timeout=30).status_code == 403
    answer = chat(wrapper, max_tokens=2, model="org/tiny-b", adapters="x", draft_model="org/tiny-b")
    assert answer["usage"]["completion_tokens"] == 2
    after = wrapper.server("tiny-a")
    assert (after["pid"], after["loads"]) == (status["pid"], status["loads"])
    # nor does it hold the gateway's secrets: its key, a database URL
    assert wrapper.env["MLXGATE_API_KEY"]  # the wrapper has one
    environ = psutil.Process(status["pid"]).environ()
    assert "MLXGATE_API_KEY" not in environ and "MLXGATE_DATABASE_URL" not in environ
    assert environ["MLXGATE_HOME"] == wrapper.env["MLXGATE_HOME"]  # what tells the group's processes apart
    missing = wrapper.call("POST", "/relay/v1/chat/completions", json=request)
    assert missing.status_code == 400 and "x-mlxgate-model" in missing.json()["error"]["message"]


def test_a_model_server_never_loads_another_model(models_dir, tmp_path):
    """The model server itself, given its secret, refuses a request naming another model folder
    (mlx_lm.server alone would drop its model and load that one)."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "mlxgate.wrapper.mlx_lm_entry", "--model",
                               str(models_dir / "tiny-a"), "--port", str(port)], stdin=subprocess.PIPE,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        server.stdin.write(b"s3cret\n")
        server.stdin.flush()
        auth = {"Authorization": "Bearer s3cret"}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        wait_for(lambda: port_open(port), 60, what="the model server to listen")
        before = wait_for(lambda: requests.post(url, json=ask, headers=auth, timeout=60).json(), 60,
                          what="a first answer")["choices"][0]["message"]["content"]
        for other in ({"model": str(models_dir / "org" / "tiny-b")}, {"adapters": str(models_dir / "tiny-c")},
                      {"draft_model": str(models_dir / "org" / "tiny-b")}):
            refused = requests.post(url, json={**ask, **other}, headers=auth, timeout=60)
            assert refused.status_code >= 400, refused.text
            assert f"serves {models_dir / 'tiny-a'} only" in refused.json()["error"]
        same = requests.post(url, json=ask, headers=auth, timeout=60).json()  # temperature 0: same model, same text
        assert same["choices"][0]["message"]["content"] == before
    finally:
        server.kill()
        server.wait()
        log.close()


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{}', "`model` is required"),
    (b'{"model": 42}', "`model` is required"),
    (b'{"model": "tiny-a", "server": "dynamic"}', "server: unknown field; send only `model`"),
])
def test_bad_requests_to_the_management_api_get_json_errors(wrapper, body, problem):
    response = wrapper.call("POST", "/models/load", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert problem in response.json()["error"]["message"]


def test_unknown_route_and_oversize_body_are_json_errors(wrapper):
    nope = wrapper.call("GET", "/nope")
    assert nope.status_code == 404 and "Not Found" in nope.json()["error"]["message"]
    response = wrapper.call("POST", "/models/load", data=b"{" + b" " * 100_000 + b"}",
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


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
