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


def chat(wrapper, text: str = "hello", max_tokens: int = 8, server: str = "dynamic", **extra) -> dict:
    """A chat completion through the wrapper's relay (the model servers answer it alone)."""
    response = wrapper.call("POST", f"/backends/{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_load_a_model_and_it_answers(wrapper):
    response = wrapper.load("tiny-a")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["state"] == "ready" and status["model"] == "tiny-a"
    assert status["port"] == wrapper.dynamic_port and pid_alive(status["pid"])
    answer = chat(wrapper, "Say hello", max_tokens=5)
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
        assert chat(wrapper, max_tokens=2)["usage"]["completion_tokens"] == 2
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
    assert chat(wrapper, max_tokens=1)["choices"]


def test_unload_stops_the_dynamic_server(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.call("POST", "/models/unload", json={"server": "dynamic"})
    assert response.status_code == 200 and response.json()["state"] == "stopped"
    wait_for(lambda: not pid_alive(pid), 10, what="the unloaded server to exit")
    assert not port_open(wrapper.dynamic_port)
    assert wrapper.servers()["autocomplete"]["state"] == "ready", "unload touches only its server"


def test_connections_to_the_model_server_are_opened_ahead_and_never_outlive_it(wrapper):
    """mlx_lm.server closes each connection after one answer: the relay opens the next ones
    while a request runs (at most two wait), and closes them when the server goes."""
    first = wrapper.load("tiny-a").json()
    for _ in range(3):
        chat(wrapper, max_tokens=1)

    def waiting(pid: int) -> list:
        return [c for c in psutil.Process(pid).net_connections("tcp")
                if c.laddr.port == wrapper.dynamic_port and c.status == psutil.CONN_ESTABLISHED]
    assert 1 <= len(wait_for(lambda: waiting(first["pid"]), 10, what="connections opened ahead")) <= 2
    second = wrapper.load("org/tiny-b").json()
    assert second["pid"] != first["pid"] and not pid_alive(first["pid"])
    assert chat(wrapper, max_tokens=2)["usage"]["completion_tokens"] == 2, "a new server, new connections"
    relay = [c for c in psutil.Process(second["pid"]).parent().net_connections("tcp")
             if c.raddr and c.raddr.port == wrapper.dynamic_port]
    assert relay and all(c.status == psutil.CONN_ESTABLISHED for c in relay), "none left from the old server"


def test_autocomplete_server_answers_completions(wrapper):
    wait_for(lambda: wrapper.servers()["autocomplete"]["state"] == "ready", 60, what="autocomplete")
    response = wrapper.call("POST", "/backends/autocomplete/v1/completions",
                            json={"prompt": "def add(a, b):", "max_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4


def test_unknown_model_is_a_clear_404_and_the_current_model_keeps_serving(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.load("no-such-model")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "no-such-model" in error["message"]
    assert wrapper.servers()["dynamic"]["pid"] == pid
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


def test_garbage_weights_fail_fast_and_the_previous_model_keeps_serving(wrapper):
    pid = wrapper.load("tiny-a").json()["pid"]
    response = wrapper.load("broken-garbage")
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    message = response.json()["error"]["message"]
    assert "broken-garbage" in message and "model.safetensors" in message
    assert "'tiny-a' is still serving" in message
    assert wrapper.servers()["dynamic"]["pid"] == pid, "never stopped"
    assert chat(wrapper, max_tokens=1)["choices"]


def test_weights_that_do_not_fit_fail_and_the_previous_model_serves_again(wrapper):
    wrapper.load("org/tiny-b")
    response = wrapper.load("broken-shapes")
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "broken-shapes" in error["message"] and "shape" in error["message"].lower()
    assert "'org/tiny-b' is serving again" in error["message"]
    dynamic = wrapper.servers()["dynamic"]
    assert dynamic["state"] == "ready" and dynamic["model"] == "org/tiny-b"
    assert chat(wrapper, max_tokens=1)["choices"]


def test_a_model_server_answers_the_relay_alone(wrapper):
    """Straight to the model server's port, past the queue and the cap: refused. Through the
    relay, a body naming another model is answered by the model the wrapper loaded."""
    status = wrapper.load("tiny-a").json()
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer guess"}):
        direct = requests.post(f"http://127.0.0.1:{wrapper.dynamic_port}/v1/chat/completions", json=request,
                               headers=headers, timeout=30)
        assert direct.status_code == 403 and "relay only" in direct.json()["error"]
    assert requests.get(f"http://127.0.0.1:{wrapper.dynamic_port}/v1/models", timeout=30).status_code == 403
    answer = chat(wrapper, max_tokens=2, model="org/tiny-b", adapters="x", draft_model="org/tiny-b")
    assert answer["usage"]["completion_tokens"] == 2
    after = wrapper.servers()["dynamic"]
    assert (after["model"], after["pid"], after["loads"]) == ("tiny-a", status["pid"], status["loads"])
    # nor does it hold the gateway's secrets: its key, a database URL
    assert wrapper.env["MLXGATE_API_KEY"]  # the wrapper has one
    environ = psutil.Process(status["pid"]).environ()
    assert "MLXGATE_API_KEY" not in environ and "MLXGATE_DATABASE_URL" not in environ
    assert environ["MLXGATE_HOME"] == wrapper.env["MLXGATE_HOME"]  # what tells the group's processes apart


def test_a_model_server_never_loads_another_model(models_dir, tmp_path):
    """The model server itself, given its secret, refuses a request naming another model folder
    (mlx_lm.server alone would drop its model and load that one)."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "mlxgate.wrapper.model_process", "--model",
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
    (b'{"server": "dynamic"}', "`model` is required"),
    (b'{"model": 42}', "`model` is required"),
    (b'{"model": "tiny-a", "server": "gpu"}', "server must be one of"),
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
