"""The whole daemon as a user meets it: `mlxgate start`, then the official SDKs and curl."""

from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import openai
import pytest
import requests

from support import ROOT, claude, gpt, mlxgate, wait_for

SUPERVISORCTL = [sys.executable, "-m", "supervisor.supervisorctl"]

PROMPT = [{"role": "user", "content": "Write a story"}]


def test_start_printed_the_urls_and_status_is_healthy(gateway):
    out = gateway.start_output.stdout
    assert f"HTTP   {gateway.url}" in out and f"HTTPS  https://api.anthropic.com:{gateway.https_port}" in out
    status = mlxgate("status", env=gateway.env)
    assert status.returncode == 0, status.stdout
    for part in ("proxy ", "proxy_https ", "wrapper ", "group_down "):
        assert any(line.startswith(part) and "RUNNING" in line for line in status.stdout.splitlines()), part
    rows = {line.split()[1]: line for line in status.stdout.splitlines() if line.startswith("model ")}
    assert "READY" in rows["tiny-a"] and f"port {gateway.dynamic_port}," in rows["tiny-a"]
    assert "READY" in rows["org/tiny-b"] and f"port {gateway.autocomplete_port}," in rows["org/tiny-b"]
    assert any(line.startswith("memory ") and "BUDGET" in line for line in status.stdout.splitlines())


def test_env_prints_export_lines_for_both_apis(gateway):
    lines = mlxgate("env", env=gateway.env).stdout.splitlines()
    assert f"export ANTHROPIC_BASE_URL={gateway.url}" in lines
    assert f"export ANTHROPIC_API_KEY={gateway.api_key}" in lines
    assert f"export OPENAI_BASE_URL={gateway.url}/v1" in lines
    assert f"export OPENAI_API_KEY={gateway.api_key}" in lines
    assert (gateway.home / "api_key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_anthropic_messages_create(gateway, https):
    message = claude(gateway, https).messages.create(model="claude-opus-4-8", max_tokens=7, messages=PROMPT)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 7
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 0


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_anthropic_stream_events_come_in_order(gateway, https):
    with claude(gateway, https).messages.stream(model="claude-opus-4-1", max_tokens=6, messages=PROMPT) as stream:
        kinds = [event.type for event in stream if event.type != "text"]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6


def test_https_answers_as_api_anthropic_com_with_the_local_authority(gateway):
    """What a client redirected to api.anthropic.com (hosts file, port forward) sees: a trusted certificate."""
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 2, "messages": PROMPT})
    result = subprocess.run(["curl", "-sS", "--cacert", str(gateway.ca), "--resolve",
                             f"api.anthropic.com:{gateway.https_port}:127.0.0.1",
                             f"https://api.anthropic.com:{gateway.https_port}/v1/messages",
                             "-H", f"x-api-key: {gateway.api_key}", "-H", "content-type: application/json",
                             "-d", body], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["usage"]["output_tokens"] == 2
    https_env = mlxgate("env", "--https", env=gateway.env).stdout
    assert f"export ANTHROPIC_BASE_URL=https://api.anthropic.com:{gateway.https_port}" in https_env
    assert f"export NODE_EXTRA_CA_CERTS={gateway.ca}" in https_env


def test_a_system_prompt_reaches_the_model(gateway):
    client = claude(gateway)
    def prompt_tokens(**system):
        usage = client.messages.create(model="claude-haiku-4-8", max_tokens=1, messages=PROMPT, **system).usage
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)
    bare = prompt_tokens()
    as_text = prompt_tokens(system="You are a terse assistant who answers in one line.")
    as_blocks = prompt_tokens(system=[{"type": "text", "text": "You are a terse assistant who answers in one line.",
                                       "cache_control": {"type": "ephemeral"}}])
    assert as_text > bare + 5 and as_blocks == as_text


def test_stop_sequences_end_the_answer(gateway):
    client = claude(gateway)
    full = client.messages.create(model="claude-opus-4-8", max_tokens=24, messages=PROMPT).content[0].text
    cut = next(i for i, ch in enumerate(full) if ch != full[0])  # the first change of character
    stop = full[cut:cut + 2]
    message = client.messages.create(model="claude-opus-4-8", max_tokens=24, messages=PROMPT,
                                     stop_sequences=[stop])
    assert message.content[0].text == full[:cut]
    assert message.stop_reason != "max_tokens" and message.usage.output_tokens < 24


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_chat_completions(gateway, stream):
    client = gpt(gateway)
    if stream:
        chunks = list(client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=PROMPT, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text and reasons == ["length"]
        assert chunks[-1].usage.completion_tokens == 5
    else:
        answer = client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=PROMPT)
        assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 5


def test_openai_completions_on_the_autocomplete_alias(gateway):
    answer = gpt(gateway).completions.create(model="autocomplete", prompt="def add(a, b):", max_tokens=4)
    assert answer.choices[0].text and answer.usage.completion_tokens == 4
    server = gateway.server("org/tiny-b")
    assert server["name"] == "autocomplete" and server["port"] == gateway.autocomplete_port and server["loads"] == 1


def test_a_request_for_another_model_loads_it_beside_the_default_and_both_stay(gateway):
    client = gpt(gateway)
    client.chat.completions.create(model="gpt-4o", max_tokens=1, messages=PROMPT)
    default = gateway.server("tiny-a")
    answer = client.chat.completions.create(model="openai/tiny-c", max_tokens=3, messages=PROMPT)
    assert answer.usage.completion_tokens == 3
    assert gateway.server("tiny-c")["state"] == "ready"
    message = claude(gateway).messages.create(model="claude-opus-4-8", max_tokens=2, messages=PROMPT)
    assert message.usage.output_tokens == 2
    after = gateway.server("tiny-a")
    assert (after["pid"], after["loads"]) == (default["pid"], default["loads"]), "no switch: tiny-a stayed"
    assert after["port"] == gateway.dynamic_port and gateway.server("tiny-c")["port"] not in (
        gateway.dynamic_port, gateway.autocomplete_port)


def test_the_token_cap_lowers_and_sets_max_tokens(gateway):
    """The daemon runs with --max-tokens 64: asking for more (or nothing) gets at most 64."""
    message = claude(gateway).messages.create(model="claude-opus-4-8", max_tokens=5000, messages=PROMPT)
    assert message.usage.output_tokens == 64 and message.stop_reason == "max_tokens"
    answer = gpt(gateway).chat.completions.create(model="gpt-4o", messages=PROMPT)
    assert answer.usage.completion_tokens == 64


def test_detailed_debug_logs_requests_without_keys(gateway):
    gpt(gateway).chat.completions.create(model="gpt-4o", max_tokens=3, messages=[{"role": "user", "content": "debug-marker"}])
    log_path = gateway.home / "logs" / "proxy.log"
    wait_for(lambda: "debug-marker" in log_path.read_text(), 10, what="the request in the proxy log")
    log = log_path.read_text()
    assert "chat_completions 'gpt-4o'" in log
    assert gateway.api_key not in log


# ---------------------------------------------------------------- errors, in each API's shape
def _post(gateway, path: str, body: bytes, key: str | None = "good", header: str = "x-api-key") -> requests.Response:
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    if key:
        value = gateway.api_key if key == "good" else key
        headers[header] = value if header == "x-api-key" else f"Bearer {value}"
    return requests.post(gateway.url + path, data=body, headers=headers, timeout=60)


def _anthropic_error(response: requests.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


def _openai_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


MESSAGE = {"max_tokens": 5, "messages": PROMPT}


def test_unknown_model_is_not_found_in_both_shapes(gateway):
    body = json.dumps({"model": "no-such-model", **MESSAGE}).encode()
    assert "no-such-model" in _anthropic_error(_post(gateway, "/v1/messages", body), 404, "not_found_error")
    completion = json.dumps({"model": "no-such-model", "prompt": "def", "max_tokens": 5}).encode()
    for path, request in (("/v1/chat/completions", body), ("/v1/completions", completion)):
        error = _openai_error(_post(gateway, path, request, header="authorization"), 404)
        assert error["code"] == "model_not_found"
        assert error["message"].startswith("model 'no-such-model' not found among the local models"), \
            error["message"]
        assert str(gateway.home) not in error["message"] and "/" not in error["message"].split("`")[0]
    with pytest.raises(anthropic.NotFoundError):
        claude(gateway).messages.create(model="no-such-model", **MESSAGE)
    with pytest.raises(openai.NotFoundError):
        gpt(gateway).chat.completions.create(model="no-such-model", **MESSAGE)


def test_malformed_json_is_a_400_in_both_shapes(gateway):
    _anthropic_error(_post(gateway, "/v1/messages", b'{"model": "claude-x", '), 400, "invalid_request_error")
    error = _openai_error(_post(gateway, "/v1/chat/completions", b"[1, 2", header="authorization"), 400)
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize("key", [None, "sk-wrong"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_key_is_a_401_in_both_shapes(gateway, key):
    body = json.dumps({"model": "claude-x", **MESSAGE}).encode()
    _anthropic_error(_post(gateway, "/v1/messages", body, key=key), 401, "authentication_error")
    error = _openai_error(_post(gateway, "/v1/chat/completions", body, key=key, header="authorization"), 401)
    assert error["type"] == "authentication_error"
    if key:
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0).messages.create(
                model="claude-x", **MESSAGE)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
                model="gpt-4o", **MESSAGE)


def test_curl_without_a_content_type_header_still_works(gateway):
    result = subprocess.run(["curl", "-s", gateway.url + "/v1/chat/completions", "-H",
                             f"Authorization: Bearer {gateway.api_key}", "-d",
                             json.dumps({"model": "gpt-4o", "max_tokens": 3, "messages": PROMPT})],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["usage"]["completion_tokens"] == 3


def test_an_escaping_model_name_is_refused(gateway):
    body = json.dumps({"model": "../tiny-a", **MESSAGE}).encode()
    assert "not allowed" in _anthropic_error(_post(gateway, "/v1/messages", body), 400, "invalid_request_error")


def test_wrapper_down_is_a_503_and_an_expected_stop_keeps_the_group_up(gateway):
    ctl = [*SUPERVISORCTL, "-c", "supervisord.conf"]
    subprocess.run([*ctl, "stop", "wrapper"], env=gateway.env, cwd=ROOT, check=True, capture_output=True)
    try:
        body = json.dumps({"model": "claude-x", **MESSAGE}).encode()
        message = _anthropic_error(_post(gateway, "/v1/messages", body), 503, "api_error")
        assert "wrapper is not running" in message
        assert _openai_error(_post(gateway, "/v1/chat/completions", body, header="authorization"), 503)
        status = subprocess.run([*ctl, "status"], env=gateway.env, cwd=ROOT, capture_output=True, text=True)
        assert "proxy " in status.stdout and "RUNNING" in status.stdout.split("proxy ")[1].splitlines()[0]
    finally:
        subprocess.run([*ctl, "start", "wrapper"], env=gateway.env, cwd=ROOT, check=True, capture_output=True)
    assert mlxgate("status", env=gateway.env).returncode in (0, 1)
    message = claude(gateway).messages.create(model="claude-x", max_tokens=2, messages=PROMPT)
    assert message.usage.output_tokens == 2


def test_check_command_passes_against_the_running_gateway(gateway):
    for extra in ((), ("--https",)):
        result = mlxgate("check", "--max-tokens", "4", *extra, env=gateway.env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("  ok   ") == 6 and "FAIL" not in result.stdout
    assert f"https://localhost:{gateway.https_port}" in result.stdout


def test_logs_show_each_program(gateway):
    result = mlxgate("logs", "proxy", "wrapper", "-n", "50", env=gateway.env)
    assert result.returncode == 0
    assert "==> " in result.stdout and "proxy.log" in result.stdout and "wrapper.log" in result.stdout
    assert "Booting worker" in result.stdout


def test_restart_of_one_program_keeps_the_group_and_serves_again(gateway):
    before = gateway.program_pids()
    result = mlxgate("restart", "wrapper", env=gateway.env)
    assert result.returncode == 0 and "wrapper restarted" in result.stdout
    after = gateway.program_pids()
    assert after["wrapper"] != before["wrapper"] and after["proxy"] == before["proxy"]
    message = claude(gateway).messages.create(model="claude-opus-4-8", max_tokens=2, messages=PROMPT)
    assert message.usage.output_tokens == 2
    assert mlxgate("restart", "nonsense", env=gateway.env).returncode == 1
