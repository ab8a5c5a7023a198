"""mlxgate never wedges: abandoned requests stop their generation, a full queue says so at once,
an unload waits for running answers, a stopped backend is replaced, hostile input gets a 4xx.

One daemon for the module, with a high token cap, a small queue and short timeouts. Its default
model tiny-c (a 128K window) answers random tokens until max_tokens, so a long answer is easy to ask
for; tiny-a is another model, loaded beside it when asked for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time

import anthropic
import httpx
import openai
import psutil
import pytest

from support import Gateway, claude, gpt, mlxgate, pid_alive, wait_for

LONG = 30000  # tokens: a minute or more of generation for the tiny model
PROMPT = [{"role": "user", "content": "Write a long story"}]
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    running = Gateway(tmp_path_factory.mktemp("reliable-home"), models_dir, "--default-model", "tiny-c",
                      max_tokens=100000,
                      extra_env={"MLXGATE_MAX_QUEUE": str(MAX_QUEUE), "MLXGATE_STALL_TIMEOUT": "4",
                                 "MLXGATE_DRAIN_TIMEOUT": "4", "MLXGATE_MAX_BODY": "1M"})
    running.start()
    yield running
    running.stop()


def dynamic(gw) -> dict:
    """The default model's server."""
    return gw.server("tiny-c")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def busy(pid: int, window: float = 1.0) -> float:
    """Share of one core the process used over `window` seconds."""
    before = cpu_seconds(pid)
    time.sleep(window)
    return (cpu_seconds(pid) - before) / window


def assert_goes_idle(gw, within: float = 10.0) -> None:
    pid = dynamic(gw)["pid"]

    wait_for(lambda: busy(pid, 0.5) < 0.15, within, interval=0, what="the default model's server to go idle")
    wait_for(lambda: not dynamic(gw)["queue"]["active"], 5, what="the request slot to be freed")


def assert_next_request_is_answered(gw) -> None:
    message = claude(gw, timeout=30).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
    assert message.usage.output_tokens == 3


def open_anthropic_stream(gw, https: bool = False, max_tokens: int = LONG):
    """A streamed request read up to its first text delta; returns (client, response)."""
    verify = ssl.create_default_context(cafile=str(gw.ca)) if https else True
    client = httpx.Client(verify=verify, timeout=60)
    request = client.build_request("POST", (gw.https_url if https else gw.url) + "/v1/messages",
                                   headers={"x-api-key": gw.api_key},
                                   json={"model": "claude-opus-4-8", "max_tokens": max_tokens, "stream": True,
                                         "messages": PROMPT})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    return client, response


def read_until(response, marker: str) -> str:
    """What the stream says up to the first line holding `marker` (the rest stays unread)."""
    if not hasattr(response, "lines"):
        response.lines = response.iter_lines()
    seen = ""
    for line in response.lines:
        seen += line + "\n"
        if marker in line:
            return seen
    return seen


def read_error(response) -> str:
    """The stream up to and including its `error` event."""
    return read_until(response, "event: error") + read_until(response, "data:")


# ---------------------------------------------------------------- cancellation
@pytest.mark.parametrize("api, https", [("anthropic", False), ("anthropic", True), ("openai", False),
                                        ("openai", True), ("responses", False)])
def test_an_abandoned_stream_stops_its_generation(gw, api, https):
    if api == "anthropic":
        client, response = open_anthropic_stream(gw, https)
        read_until(response, "text_delta")
    elif api == "responses":
        client = httpx.Client(timeout=60)
        response = client.send(client.build_request(
            "POST", gw.url + "/v1/responses", headers={"Authorization": f"Bearer {gw.api_key}"},
            json={"model": "gpt-5.5", "max_output_tokens": LONG, "stream": True, "input": PROMPT}), stream=True)
        read_until(response, "response.output_text.delta")
    else:
        verify = ssl.create_default_context(cafile=str(gw.ca)) if https else True
        client = httpx.Client(verify=verify, timeout=60)
        response = client.send(client.build_request(
            "POST", (gw.https_url if https else gw.url) + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {gw.api_key}"},
            json={"model": "gpt-4o", "max_tokens": LONG, "stream": True, "messages": PROMPT}), stream=True)
        read_until(response, "content")
    pid = dynamic(gw)["pid"]
    assert busy(pid, 0.5) > 0.3, "the model server should be generating"
    response.close()
    client.close()
    assert_goes_idle(gw)
    assert_next_request_is_answered(gw)


@pytest.mark.parametrize("api", ["anthropic", "openai", "responses"])
def test_a_request_abandoned_by_client_timeout_stops_its_generation(gw, api):
    with pytest.raises((anthropic.APITimeoutError, openai.APITimeoutError)):
        if api == "anthropic":
            claude(gw, timeout=2).messages.create(model="claude-opus-4-8", max_tokens=LONG, messages=PROMPT)
        elif api == "responses":
            gpt(gw, timeout=2).responses.create(model="gpt-5.5", max_output_tokens=LONG, input=PROMPT)
        else:
            gpt(gw, timeout=2).chat.completions.create(model="gpt-4o", max_tokens=LONG, messages=PROMPT)
    assert_goes_idle(gw)
    assert_next_request_is_answered(gw)


# ---------------------------------------------------------------- concurrency and queueing
def test_eight_concurrent_clients_are_all_answered(gw):
    results: list = []

    def ask(i: int):
        try:
            if i % 2:
                answer = gpt(gw, timeout=120).chat.completions.create(model="gpt-4o", max_tokens=20 + i,
                                                                        messages=PROMPT)
                results.append((i, answer.usage.completion_tokens))
            else:
                message = claude(gw, timeout=120).messages.create(model="claude-opus-4-8", max_tokens=20 + i,
                                                                  messages=PROMPT)
                results.append((i, message.usage.output_tokens))
        except Exception as exc:  # the assertion below shows it
            results.append((i, repr(exc)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert sorted(results) == [(i, 20 + i) for i in range(8)]


def test_a_full_queue_answers_529_and_503_at_once_and_status_shows_it(gw):
    running = dynamic(gw)["queue"]["max_parallel"]
    streams = [open_anthropic_stream(gw) for _ in range(running + MAX_QUEUE)]  # batched, then waiting
    try:
        wait_for(lambda: dynamic(gw)["queue"]["queued"] == MAX_QUEUE, 30, what="the queue to fill")
        started = time.monotonic()
        with pytest.raises(anthropic.APIStatusError) as caught:
            claude(gw).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"
        response = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"},
                              json={"model": "gpt-4o", "max_tokens": 3, "messages": PROMPT}, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert time.monotonic() - started < 10
        status = mlxgate("status", env=gw.env, timeout=60).stdout
        row = next(line for line in status.splitlines() if line.startswith("model tiny-c "))
        assert f"{running} running, {MAX_QUEUE} waiting, idle busy" in row, row
    finally:
        for client, response in streams:
            response.close()
            client.close()
    assert_goes_idle(gw, within=20)
    assert_next_request_is_answered(gw)


def test_a_request_for_another_model_is_answered_beside_a_running_answer(gw):
    """No switch: tiny-a loads beside tiny-c (the budget holds both) while tiny-c streams on."""
    client, response = open_anthropic_stream(gw, max_tokens=400)
    read_until(response, "text_delta")
    other = gpt(gw, timeout=120).chat.completions.create(model="tiny-a", max_tokens=2, messages=PROMPT)
    answered = time.monotonic()
    rest = read_until(response, "message_stop")
    client.close()
    assert other.usage.completion_tokens == 2
    assert '"stop_reason":"max_tokens"' in rest and "event: error" not in rest, "the stream was never cut"
    assert time.monotonic() >= answered and dynamic(gw)["state"] == gw.server("tiny-a")["state"] == "ready"


def test_requests_that_arrive_during_a_slow_unload_wait_in_the_queue_and_beyond_it_get_529(gw):
    """An unload waits (drain_timeout) for the running answer, then ends it; requests arriving
    meanwhile wait in the relay's queue, bounded by max_queue, never in the proxy: one more is
    refused at once. After the unload they load the model again and are answered."""
    client, response = open_anthropic_stream(gw)
    read_until(response, "text_delta")
    answers: list = []

    def ask() -> None:
        try:
            answers.append(gpt(gw, timeout=120).chat.completions.create(model="gpt-4o", max_tokens=2,
                                                                        messages=PROMPT).usage.completion_tokens)
        except Exception as exc:  # the assertions below show it
            answers.append(repr(exc))
    unload = threading.Thread(target=mlxgate, args=("unload", "tiny-c"), kwargs={"env": gw.env})
    unload.start()
    wait_for(lambda: dynamic(gw)["queue"]["draining"], 30, interval=0.05, what="the unload to start draining")
    waiting = [threading.Thread(target=ask) for _ in range(MAX_QUEUE)]
    for thread in waiting:
        thread.start()
    wait_for(lambda: dynamic(gw)["queue"]["queued"] == MAX_QUEUE, 10, interval=0.05, what="the queue to fill")
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude(gw).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
    assert caught.value.status_code == 529 and time.monotonic() - started < 2
    assert "busy" in caught.value.message and "waiting (max_queue 8)" in caught.value.message
    rest = read_error(response)
    client.close()
    assert "drain_timeout" in rest and "was unloaded" in rest
    for thread in [unload, *waiting]:
        thread.join(180)
    assert answers == [2] * MAX_QUEUE, answers
    assert dynamic(gw)["state"] == "ready"
    assert_next_request_is_answered(gw)


def test_an_unload_waits_for_the_running_answer(gw):
    client, response = open_anthropic_stream(gw, max_tokens=400)
    read_until(response, "text_delta")
    unloaded = {}

    def unload():
        unloaded["done"] = mlxgate("unload", "tiny-c", env=gw.env)
        unloaded["at"] = time.monotonic()
    thread = threading.Thread(target=unload)
    thread.start()
    rest = read_until(response, "message_stop")
    finished = time.monotonic()
    client.close()
    thread.join(120)
    assert '"stop_reason":"max_tokens"' in rest and "event: error" not in rest
    assert unloaded["done"].stdout.strip().startswith("tiny-c is stopped") and unloaded["at"] >= finished
    assert_next_request_is_answered(gw)  # loads it again


# ---------------------------------------------------------------- watchdog and crashes
def test_a_stopped_backend_is_replaced_by_the_watchdog(gw):
    assert_next_request_is_answered(gw)
    old = dynamic(gw)["pid"]
    client, response = open_anthropic_stream(gw)
    read_until(response, "text_delta")
    os.kill(old, signal.SIGSTOP)
    try:
        rest = read_error(response)
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
        client.close()
    assert "stall_timeout" in rest
    wait_for(lambda: dynamic(gw)["state"] == "ready" and dynamic(gw)["pid"] not in (None, old), 60,
             what="the replacement model server")
    assert not pid_alive(old)
    assert_next_request_is_answered(gw)


def test_a_backend_that_dies_mid_stream_gives_an_error_event_then_serves_again(gw):
    old = dynamic(gw)["pid"]
    client, response = open_anthropic_stream(gw)
    read_until(response, "text_delta")
    os.kill(old, signal.SIGKILL)
    rest = read_error(response)
    client.close()
    assert "api_error" in rest and "message_stop" not in rest
    assert_next_request_is_answered(gw)
    assert dynamic(gw)["pid"] != old


# ---------------------------------------------------------------- hostile input
def _battery() -> list[tuple[str, bytes, dict]]:
    """(name, body, extra headers) of malformed requests."""
    deep = b"[" * 100000 + b"]" * 100000
    cases = [
        ("invalid json", b'{"model": "claude-x", ', {}),
        ("invalid utf-8", b'{"model": "\xff\xfe", "max_tokens": 5, "messages": []}', {}),
        ("not an object", b'[1, 2, 3]', {}),
        ("empty", b"", {}),
        ("deeply nested", deep, {}),
        ("deeply nested value", b'{"model": "claude-x", "x": ' + deep + b"}", {}),
        ("messages wrong type", json.dumps({"model": "claude-x", "max_tokens": 5, "messages": "hi"}).encode(), {}),
        ("max_tokens negative", json.dumps({"model": "claude-x", "max_tokens": -1, "messages": PROMPT}).encode(), {}),
        ("max_tokens absurd", json.dumps({"model": "claude-x", "max_tokens": 10 ** 30, "messages": PROMPT}).encode(),
         {}),
        ("max_tokens string", json.dumps({"model": "claude-x", "max_tokens": "1e9", "messages": PROMPT}).encode(),
         {}),
        ("unknown role", json.dumps({"model": "claude-x", "max_tokens": 5,
                                     "messages": [{"role": "wizard", "content": "hi"}]}).encode(), {}),
        ("unknown block", json.dumps({"model": "claude-x", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": [{"type": "x"}]}]}).encode(), {}),
        ("model escapes", json.dumps({"model": "../../etc/passwd", "max_tokens": 5, "messages": PROMPT}).encode(),
         {}),
        ("model absolute", json.dumps({"model": "/etc/passwd", "max_tokens": 5, "messages": PROMPT}).encode(), {}),
        ("model not a string", json.dumps({"model": 42, "max_tokens": 5, "messages": PROMPT}).encode(), {}),
        ("over the size limit", b'{"model": "claude-x", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', {}),
        ("temperature string", json.dumps({"model": "claude-x", "max_tokens": 5, "messages": PROMPT,
                                           "temperature": "hot"}).encode(), {}),
    ]
    return cases


def _rss_kb(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss // 1024


def test_a_battery_of_malformed_requests_gets_4xx_everywhere_and_nothing_dies(gw):
    programs = gw.program_pids()
    rss_before = {name: _rss_kb(pid) for name, pid in programs.items()}
    https_client = httpx.Client(verify=ssl.create_default_context(cafile=str(gw.ca)), timeout=20)
    http_client = httpx.Client(timeout=20)
    failures = []
    for _ in range(2):
        for name, body, headers in _battery():
            for base, client in ((gw.url, http_client), (gw.https_url, https_client)):
                for path, key_header in (("/v1/messages", "x-api-key"), ("/v1/chat/completions", "authorization")):
                    key = gw.api_key if key_header == "x-api-key" else f"Bearer {gw.api_key}"
                    try:
                        r = client.post(base + path, content=body,
                                        headers={key_header: key, "content-type": "application/json", **headers})
                    except httpx.HTTPError as exc:
                        failures.append((name, base, path, repr(exc)))
                        continue
                    shape_ok = ("type" in r.json() and r.json()["type"] == "error") if path == "/v1/messages" \
                        else "error" in r.json()
                    if not (400 <= r.status_code < 500 and shape_ok):
                        failures.append((name, base, path, r.status_code, r.text[:200]))
            relay_headers = {"authorization": f"Bearer {gw.api_key}"}
            if name.startswith("model "):  # the relay answers with the model the proxy names in a header
                model = json.loads(body)["model"]
                relay_headers["x-mlxgate-model"] = model if isinstance(model, str) else str(model)
            for path in ("/relay/v1/messages", "/relay/v1/chat/completions", "/models/load"):
                try:
                    r = http_client.post(f"http://127.0.0.1:{gw.wrapper_port}{path}", content=body,
                                         headers=relay_headers)
                except httpx.HTTPError as exc:
                    failures.append((name, "wrapper", path, repr(exc)))
                    continue
                if not (400 <= r.status_code < 500 and "error" in r.json()):
                    failures.append((name, "wrapper", path, r.status_code, r.text[:200]))
    if failures:  # the assertion message is cut short; the file has them all
        (gw.home / "battery-failures.json").write_text(json.dumps(failures, indent=1))
    assert not failures, failures
    assert gw.program_pids() == programs  # nobody died or restarted
    for name, pid in programs.items():
        assert _rss_kb(pid) < rss_before[name] + 100 * 1024, f"{name} grew by more than 100 MB"
    assert_next_request_is_answered(gw)


def test_slow_partial_requests_do_not_block_anyone(gw):
    sockets = []
    for port in (gw.port, gw.wrapper_port):
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mod")
            sockets.append(sock)
    try:
        assert gw.wrapper_call("GET", "/health").status_code == 200
        assert_next_request_is_answered(gw)
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------- security
def test_the_wrapper_and_its_relay_need_the_key(gw):
    base = f"http://127.0.0.1:{gw.wrapper_port}"
    for method, path in (("GET", "/models"), ("POST", "/models/load"), ("POST", "/relay/v1/messages"),
                         ("POST", "/relay/v1/chat/completions")):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            r = httpx.request(method, base + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"


def test_everything_listens_on_loopback_and_secrets_are_private(gw):
    ports = {gw.port, gw.https_port, gw.wrapper_port, gw.dynamic_port}
    listening = set()
    for pid in gw.our_pids():  # per process: the system-wide table needs root on macOS
        for connection in psutil.Process(pid).net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port in ports:
                listening.add(connection.laddr.port)
                assert connection.laddr.ip in ("127.0.0.1", "::1"), connection.laddr
    assert ports <= listening
    for path in [gw.home / "api_key", *(gw.home / "ssl").glob("*key*.pem")]:
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


def test_logs_hold_neither_keys_nor_prompts_without_detailed_debug(gw):
    marker = "secret-prompt-marker-7f3a"
    claude(gw).messages.create(model="claude-opus-4-8", max_tokens=2,
                               messages=[{"role": "user", "content": marker}])
    gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=2, messages=[{"role": "user", "content": marker}])
    for log in (gw.home / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert gw.api_key not in text, log
        assert marker not in text, log
