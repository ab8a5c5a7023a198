"""One request path, as a user meets it: the hooks run once per request whichever way it goes
(a local model through the relay, or a `litellm:` deployment through LiteLLM), a model that
cannot load is refused once with a 503 the SDKs do not retry, several requests run at once
on one model server (batched) and each can be cancelled alone, and a hung model server is
replaced within a minute with the default settings.

Two daemons: `upstream`, a plain mlxgate (it plays a cloud provider, or another mlxgate
host), and `gw`, with default settings, default model tiny-c (answers as long as asked),
a plugin that records every hook call, and a `litellm:` section whose deployments are
`upstream`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time

import anthropic
import httpx
import openai
import psutil
import pytest
import yaml

from support import Gateway, claude, gpt, pid_alive, wait_for

PROMPT = [{"role": "user", "content": "Write a story"}]

RECORDER = '''
import os

import mlxgate

LOG = os.path.join(os.environ["MLXGATE_HOME"], "hook-calls.log")


def _record(hook, ctx):
    with open(LOG, "a") as log:
        log.write(f"{hook} {ctx.route} {ctx.requested_model}\\n")


@mlxgate.hookimpl
def mlxgate_resolve_model(ctx):
    _record("resolve", ctx)


@mlxgate.hookimpl
def mlxgate_check_available(ctx):
    _record("check_available", ctx)


@mlxgate.hookimpl
def mlxgate_pre_call(ctx):
    _record("pre_call", ctx)
'''


@pytest.fixture(scope="module")
def upstream(models_dir, tmp_path_factory):
    running = Gateway(tmp_path_factory.mktemp("upstream-home"), models_dir, "--default-model", "tiny-a",
                      https=False)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory, upstream):
    running = Gateway(tmp_path_factory.mktemp("path-home"), models_dir, "--default-model", "tiny-c",
                      https=False, max_tokens=100000)
    (running.home / "gateway.yaml").write_text(yaml.safe_dump({"litellm": {"model_list": [
        {"model_name": "remote-claude", "litellm_params": {
            "model": "anthropic/claude-remote", "api_base": upstream.url, "api_key": upstream.api_key}},
        {"model_name": "remote-gpt", "litellm_params": {
            "model": "openai/gpt-remote", "api_base": upstream.url + "/v1", "api_key": upstream.api_key}},
    ]}}))
    (running.home / "plugins" / "recorder.py").write_text(RECORDER)
    running.start()
    yield running
    running.stop()


def hook_calls(gw, since: int = 0) -> list[str]:
    try:
        return (gw.home / "hook-calls.log").read_text().splitlines()[since:]
    except FileNotFoundError:
        return []


def dynamic(gw) -> dict:
    """The default model's server."""
    return gw.server("tiny-c")


def once(route: str, model: str) -> list[str]:
    return [f"{hook} {route} {model}" for hook in ("resolve", "check_available", "pre_call")]


# ---------------------------------------------------------------- hooks once, on either path
def test_a_local_request_runs_each_hook_once(gw):
    for route, model, ask in (
            ("anthropic_messages", "claude-opus-4-8",
             lambda: claude(gw).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)),
            ("chat_completions", "gpt-4o",
             lambda: gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=3, messages=PROMPT)),
            ("count_tokens", "claude-opus-4-8",
             lambda: claude(gw).messages.count_tokens(model="claude-opus-4-8", messages=PROMPT)),
            ("responses", "gpt-5.5",
             lambda: gpt(gw).responses.create(model="gpt-5.5", max_output_tokens=3, input=PROMPT)),
            ("responses_input_tokens", "gpt-5.5",
             lambda: gpt(gw).responses.input_tokens.count(model="gpt-5.5", input=PROMPT))):
        before = len(hook_calls(gw))
        ask()
        assert hook_calls(gw, before) == once(route, model)


def test_an_answer_says_where_the_relay_spent_its_time(gw):
    """`Server-Timing` on a JSON answer, through the proxy: counting the prompt, waiting, the
    model server's call, and the relay's whole time (milliseconds), for both APIs."""
    for raw in (gpt(gw).chat.completions.with_raw_response.create(model="gpt-4o", max_tokens=3, messages=PROMPT),
                claude(gw).messages.with_raw_response.create(model="claude-opus-4-8", max_tokens=3,
                                                             messages=PROMPT)):
        timing = {name: float(duration.removeprefix("dur="))
                  for name, duration in (part.strip().split(";") for part in raw.headers["server-timing"].split(","))}
        assert set(timing) == {"count", "wait", "model", "relay"}
        assert timing["count"] > 0 and timing["model"] > 0 and all(ms >= 0 for ms in timing.values())
        assert timing["relay"] >= timing["count"] + timing["model"] - 0.05  # the parts fit in the whole


def test_the_proxy_hands_requests_to_the_relay_at_its_door_which_needs_the_key(gw):
    """The relay's local door: a Unix socket only this user may open, where the proxy keeps
    its connections; curl through it gets the relay's answers, streams included, and
    nothing without the key."""
    door = gw.home / "relay.sock"
    assert stat.S_IMODE(door.stat().st_mode) == 0o600
    assert gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=1, messages=PROMPT).usage.completion_tokens == 1
    wrapper = psutil.Process(gw.program_pids()["wrapper"])
    at_door = [c for p in (wrapper, *wrapper.children(recursive=True)) for c in p.net_connections(kind="unix")
               if c.laddr == str(door)]
    assert len(at_door) >= 2, "the door listens, and holds the proxy's connection"

    def curl(path: str, body: dict, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "-N", "--unix-socket", str(door), f"http://relay{path}",
                               "-H", "content-type: application/json", "-d", json.dumps(body), *extra],
                              capture_output=True, text=True, timeout=120)
    key = ("-H", f"Authorization: Bearer {gw.api_key}")
    chat = {"messages": PROMPT, "max_tokens": 2}
    key = (*key, "-H", "x-mlxgate-model: tiny-c")
    answer = json.loads(curl("/relay/v1/chat/completions", chat, *key).stdout)
    assert answer["usage"]["completion_tokens"] == 2
    streamed = curl("/relay/v1/messages", {**chat, "stream": True}, *key).stdout
    assert "event: content_block_delta" in streamed and streamed.endswith('data: {"type":"message_stop"}\n\n')
    delta = streamed.split("event: message_delta\ndata: ")[1].split("\n")[0]
    assert json.loads(delta)["usage"]["output_tokens"] == 2
    refused = json.loads(curl("/relay/v1/chat/completions", chat).stdout)
    assert refused["error"]["code"] == "invalid_api_key" and "API key" in refused["error"]["message"]
    refused = json.loads(curl("/relay/v1/messages", chat).stdout)
    assert refused["type"] == "error" and refused["error"]["type"] == "authentication_error"
    missing = json.loads(curl("/relay/v1/chat/completions", chat, *key[:2], "-H", "x-mlxgate-model: nowhere").stdout)
    assert "model 'nowhere' not found" in missing["error"]["message"]


def test_a_burst_of_callers_at_the_door_is_not_turned_away(gw):
    """Clients that arrive together (a coding agent's fan-out, a benchmark's barrier) each open a
    connection to the door at the same moment: none is refused for a full listen backlog (on a
    Unix socket a full backlog fails the connect at once, where TCP would retry)."""
    door = str(gw.home / "relay.sock")
    socks, refused = [], 0
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(door)
            except BlockingIOError:
                refused += 1
    finally:
        for sock in socks:
            sock.close()
    assert refused == 0, f"{refused} of 200 connections turned away"
    assert gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=1, messages=PROMPT).usage.completion_tokens == 1


def test_a_caller_gone_before_its_stream_starts_gives_its_place_in_the_queue_back(gw):
    """A proxy that cancels while the relay still counts a long prompt: the door cannot even
    send the answer's headers, and the request's place in the queue is given back anyway
    (a place kept would hold a slot for ever and look like a stalled server to the watchdog)."""
    words = " ".join(f"word{i}" for i in range(5000))  # ~37,000 new tokens: counting them takes a while
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": words}]}).encode()
    served = dynamic(gw)["queue"]["served"]
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(gw.home / "relay.sock"))
            sock.sendall(f"POST /relay/v1/messages HTTP/1.1\r\nHost: relay\r\nx-mlxgate-model: tiny-c\r\n"
                         f"Authorization: Bearer {gw.api_key}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    queue = wait_for(lambda: (lambda q: q if q["served"] >= served + 3 and not q["active"] else None)(
        dynamic(gw)["queue"]), 30, what="the three places to be given back")
    assert queue["queued"] == 0
    answer = claude(gw).messages.create(model="claude-opus-4-8", max_tokens=2, messages=PROMPT)
    assert answer.usage.output_tokens == 2


def test_a_litellm_deployment_answers_through_litellm_and_the_hooks_run_once(gw, upstream):
    """The deployments are another mlxgate: what a cloud provider or another host would be."""
    before, answered = len(hook_calls(gw)), upstream.served("tiny-a")
    message = claude(gw).messages.create(model="remote-claude", max_tokens=4, messages=PROMPT)
    assert message.usage.output_tokens == 4 and message.content[0].text
    assert hook_calls(gw, before) == once("anthropic_messages", "remote-claude")
    assert upstream.served("tiny-a") == answered + 1, "the other mlxgate answered it"

    before = len(hook_calls(gw))
    answer = gpt(gw).chat.completions.create(model="remote-gpt", max_tokens=3, messages=PROMPT)
    assert answer.usage.completion_tokens == 3
    assert hook_calls(gw, before) == once("chat_completions", "remote-gpt")
    assert upstream.served("tiny-a") == answered + 2

    before = len(hook_calls(gw))
    response = gpt(gw).responses.create(model="remote-gpt", max_output_tokens=16, input=PROMPT)  # OpenAI's least
    assert response.usage.output_tokens == 16 and response.output_text
    assert hook_calls(gw, before) == once("responses", "remote-gpt")
    assert upstream.served("tiny-a") == answered + 3, "LiteLLM spoke the Responses API to the other mlxgate"

    chunks = list(gpt(gw).chat.completions.create(model="remote-gpt", max_tokens=3, messages=PROMPT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    listed = {m.id for m in gpt(gw).models.list()}
    assert {"remote-claude", "remote-gpt", "tiny-c"} <= listed
    info = httpx.get(gw.url + "/model/info", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=30)
    assert info.status_code == 200, "LiteLLM's own routes, with the gateway's key"
    assert {m["model_name"] for m in info.json()["data"]} == {"remote-claude", "remote-gpt"}
    assert httpx.get(gw.url + "/model/info", timeout=30).status_code == 401


def test_litellm_errors_reach_anthropic_clients_in_anthropics_shape(gw):
    response = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.api_key}, timeout=60,
                          json={"model": "remote-claude", "max_tokens": 5, "messages": "not a list"})
    assert 400 <= response.status_code < 500
    assert response.json()["type"] == "error" and response.json()["error"]["type"]


# ---------------------------------------------------------------- errors shaped once
def test_a_model_that_fails_to_load_is_a_503_the_sdks_do_not_retry(gw):
    """broken-shapes passes every check that reads files (its weights do not fit its config):
    the load itself fails, in the relay's queue. Both SDKs, with their default retries, try once."""
    for api in ("anthropic", "openai"):
        before = len(hook_calls(gw))
        with pytest.raises((anthropic.APIStatusError, openai.APIStatusError)) as caught:
            if api == "anthropic":
                anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key).messages.create(
                    model="broken-shapes", max_tokens=3, messages=PROMPT)
            else:
                openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key).chat.completions.create(
                    model="broken-shapes", max_tokens=3, messages=PROMPT)
        error = caught.value
        assert error.status_code == 503 and error.response.headers["x-should-retry"] == "false"
        assert "broken-shapes" in error.message and "failed to load" in error.message
        assert [line for line in hook_calls(gw, before) if line.startswith("resolve")] == \
            [f"resolve {'anthropic_messages' if api == 'anthropic' else 'chat_completions'} broken-shapes"]
        body = error.response.json()
        assert (body["error"]["type"] == "api_error") if api == "anthropic" else \
            (body["error"]["code"] == "model_load_failed")
    assert dynamic(gw)["state"] == "ready", "the loaded model never stopped"


def test_a_model_whose_files_are_broken_is_refused_before_a_stream_starts(gw, models_dir):
    for path, body, key in (("/v1/messages", {"model": "broken-garbage", "max_tokens": 3, "messages": PROMPT,
                                              "stream": True}, "x-api-key"),
                            ("/v1/chat/completions", {"model": "broken-garbage", "max_tokens": 3,
                                                      "messages": PROMPT, "stream": True}, "authorization")):
        value = gw.api_key if key == "x-api-key" else f"Bearer {gw.api_key}"
        response = httpx.post(gw.url + path, json=body, headers={key: value}, timeout=60)
        assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
        message = json.dumps(response.json())
        assert "model.safetensors" in message and str(models_dir) not in message


def test_a_5000_character_model_name_is_a_400_without_touching_the_disk(gw):
    name = "x" * 5000
    with pytest.raises(anthropic.BadRequestError, match="5000 characters long"):
        claude(gw).messages.create(model=name, max_tokens=3, messages=PROMPT)
    with pytest.raises(openai.BadRequestError, match="5000 characters long"):
        gpt(gw).chat.completions.create(model=name, max_tokens=3, messages=PROMPT)
    for odd in ("tiny c", "tiny\\c", "tiny\nc"):
        with pytest.raises(anthropic.BadRequestError, match="not allowed"):
            claude(gw).messages.create(model=odd, max_tokens=3, messages=PROMPT)


# ---------------------------------------------------------------- batched model servers
def open_stream(gw, max_tokens: int, messages=PROMPT):
    client = httpx.Client(timeout=120)
    response = client.send(client.build_request(
        "POST", gw.url + "/v1/messages", headers={"x-api-key": gw.api_key},
        json={"model": "claude-opus-4-8", "max_tokens": max_tokens, "stream": True, "messages": messages}),
        stream=True)
    assert response.status_code == 200
    return client, response, response.iter_lines()


def read_to_end(lines) -> dict:
    """The message_delta of a stream read to its end (None if it ended otherwise)."""
    final, name = None, None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name == "message_delta":
            final = json.loads(line[6:])
        elif name == "error":
            raise AssertionError(line)
    return final


def test_eight_streams_are_in_flight_at_once_on_one_model_server_and_all_complete(gw):
    streams = [open_stream(gw, 1500) for _ in range(8)]
    try:
        busiest = wait_for(lambda: len(dynamic(gw)["queue"]["active"]) == 8 and dynamic(gw)["queue"], 30,
                           interval=0.05, what="eight requests running at once")
        assert busiest["queued"] == 0
        finals = [read_to_end(lines) for _, _, lines in streams]
    finally:
        for client, response, _ in streams:
            response.close()
            client.close()
    assert [f["delta"]["stop_reason"] for f in finals] == ["max_tokens"] * 8
    assert [f["usage"]["output_tokens"] for f in finals] == [1500] * 8


def test_a_request_joins_a_running_generation_within_a_few_of_its_tokens(gw):
    """A request that arrives while another generates joins that generation's batch at once;
    it does not wait for a spell of the other's steps to end (mlx_lm.server's own loop: half a
    second, some 350 of the other's tokens on these machines). Measured in the other stream's
    tokens, which a busy machine slows as much as the request itself."""
    client, response, lines = open_stream(gw, 20000)
    seen = {"deltas": 0}

    def count() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the stream is closed at the end
            for line in lines:
                if "text_delta" in line:
                    seen["deltas"] += 1
    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    try:
        wait_for(lambda: seen["deltas"] > 20, 30, interval=0.01, what="the first stream to generate")
        tally, short = [], gpt(gw)
        for _ in range(3):
            before = seen["deltas"]
            answer = short.chat.completions.create(model="gpt-4o", max_tokens=1, messages=PROMPT)
            tally.append(seen["deltas"] - before)
            assert answer.usage.completion_tokens == 1
        assert reader.is_alive(), "the long stream was still generating"
    finally:
        response.close()
        client.close()
    assert sorted(tally)[1] < 160, f"the other stream's tokens while each short request was answered: {tally}"


def test_cancelling_one_of_several_running_requests_leaves_the_others_going(gw):
    streams = [open_stream(gw, 600) for _ in range(3)]
    for _, _, lines in streams:
        next(line for line in lines if "text_delta" in line)
    client, response, _ = streams.pop(1)
    response.close()
    client.close()
    wait_for(lambda: len(dynamic(gw)["queue"]["active"]) == 2, 10, what="the cancelled request's place to free")
    finals = [read_to_end(lines) for _, _, lines in streams]
    for client, response, _ in streams:
        client.close()
    assert [f["usage"]["output_tokens"] for f in finals] == [600, 600]
    wait_for(lambda: not dynamic(gw)["queue"]["active"], 10, what="the model server to be idle")


def test_a_follow_up_turn_reads_the_prompt_cache_while_other_requests_run(gw):
    system = "You review code. " + " ".join(f"Rule {i}: keep functions short and names clear." for i in range(120))
    first = claude(gw).messages.create(model="claude-opus-4-8", max_tokens=5, system=system, messages=PROMPT)
    others = [open_stream(gw, 2000) for _ in range(3)]
    try:
        for _, _, lines in others:
            next(line for line in lines if "text_delta" in line)
        turn = PROMPT + [{"role": "assistant", "content": first.content[0].text},
                         {"role": "user", "content": "Shorter, please."}]
        second = claude(gw).messages.create(model="claude-opus-4-8", max_tokens=5, system=system, messages=turn)
        assert len(dynamic(gw)["queue"]["active"]) == 3, "the other requests were still running"
    finally:
        for client, response, _ in others:
            response.close()
            client.close()
    first_prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= first_prompt - 5 > 1000, second.usage


# ---------------------------------------------------------------- watchdog with the default settings
def test_a_stopped_model_server_is_replaced_within_a_minute_by_default(gw):
    assert dynamic(gw)["queue"]["max_parallel"] == 8  # the defaults: this daemon sets none
    old = dynamic(gw)["pid"]
    client, response, lines = open_stream(gw, 50000)
    next(line for line in lines if "text_delta" in line)
    stopped = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        rest = ""
        for line in lines:
            rest += line + "\n"
            if line.startswith("data:") and '"error"' in line:
                break
        error_after = time.monotonic() - stopped
        wait_for(lambda: dynamic(gw)["state"] == "ready" and dynamic(gw)["pid"] not in (None, old), 60,
                 what="the replacement model server")
        replaced_after = time.monotonic() - stopped
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
        client.close()
    assert "stall_timeout" in rest and "30 s" in rest
    assert replaced_after < 60, f"replaced after {replaced_after:.0f} s"
    print(f"\nSIGSTOP: error event after {error_after:.1f} s, new model server ready after {replaced_after:.1f} s")
    message = claude(gw).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
    assert message.usage.output_tokens == 3

