"""An agent written for OpenAI's Responses API, pointed at mlxgate: the official `openai` SDK
and Codex CLI, unchanged.

The default model is the scripted tiny model: it greets, calls `get_weather` with
{"city": "Paris"} when tools are offered, answers "It is sunny in Paris!" after the tool
output and thinks first when reasoning is on, so every answer here is exact.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import httpx
import openai
import pytest

from mlxgate.demo_model import PLAIN_ANSWER, THINKING, TOOL_ANSWER
from support import gpt, npm_agent, sse_events, wait_for

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = "What is the weather in Paris?"
CODEX_VERSION = "0.171.0"


def raw_events(gateway, body: dict) -> list[dict]:
    """The stream's events exactly as they came over the wire."""
    return [data for _, data in sse_events(gateway.url + "/v1/responses", body,
                                           {"Authorization": f"Bearer {gateway.api_key}"})]


def check_grammar(events: list[dict]) -> list[str]:
    """Assert the Responses stream grammar; return the output item types in order."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    response_id = events[0]["response"]["id"]
    assert response_id.startswith("resp_") and events[-1]["response"]["id"] == response_id
    items, open_item = [], None
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_item is None and event["output_index"] == len(items)
            open_item = event["item"]["id"]
            items.append(event["item"]["type"])
        elif kind == "response.output_item.done":
            assert event["item"]["id"] == open_item and event["output_index"] == len(items) - 1
            open_item = None
        else:
            assert event["item_id"] == open_item, f"{kind} for an item that is not open"
    assert open_item is None
    assert [i["type"] for i in events[-1]["response"]["output"]] == items
    return items


# ---------------------------------------------------------------- answers, streamed and not
def test_a_response_with_the_openai_sdk(agent_gateway):
    response = gpt(agent_gateway).responses.create(model="gpt-5-codex", input=ASK, instructions="Be brief.",
                                                   metadata={"session": "1"})
    assert response.output_text == PLAIN_ANSWER and response.status == "completed"
    assert response.id.startswith("resp_") and response.object == "response"
    (message,) = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert response.model == "gpt-5-codex" and response.instructions == "Be brief."
    assert response.metadata == {"session": "1"}
    usage = response.usage
    assert usage.output_tokens == 10 and usage.input_tokens > 0  # nine words and the end-of-turn token
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens

    def counted() -> bool:  # recorded like every request, under its own route
        metrics = httpx.get(agent_gateway.url + "/metrics", timeout=30,
                            headers={"Authorization": f"Bearer {agent_gateway.api_key}"}).text
        return any(line.startswith("mlxgate_requests_total{") and 'route="responses"' in line
                   for line in metrics.splitlines())
    wait_for(counted, 10, what="the response in the metrics")


def test_a_stream_has_the_responses_event_grammar(agent_gateway):
    events = raw_events(agent_gateway, {"model": "gpt-5-codex", "input": ASK})
    assert check_grammar(events) == ["message"]
    kinds = [e["type"] for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == PLAIN_ANSWER
    assert events[-1]["response"]["status"] == "completed" and events[-1]["response"]["usage"]["output_tokens"] == 10


def test_the_sdks_stream_helper_accumulates_the_final_response(agent_gateway):
    with gpt(agent_gateway).responses.stream(model="gpt-5-codex", input=ASK) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == PLAIN_ANSWER == final.output_text
    assert final.status == "completed" and final.usage.output_tokens == 10


def test_max_output_tokens_cuts_the_answer_as_incomplete(agent_gateway):
    client = gpt(agent_gateway)
    response = client.responses.create(model="gpt-5-codex", input=ASK, max_output_tokens=3)
    assert response.output_text == "Hello from mlxgate"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3

    # streamed, the last event is response.incomplete; the SDK's helper hands it over as it is
    # (its get_final_response() wants a response.completed, as with OpenAI's own API)
    with client.responses.stream(model="gpt-5-codex", input=ASK, max_output_tokens=3) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == "Hello from mlxgate"


def test_reasoning_effort_turns_thinking_on_and_comes_back_as_a_summary(agent_gateway):
    client = gpt(agent_gateway)
    response = client.responses.create(model="gpt-5-codex", input=ASK, reasoning={"effort": "high",
                                                                                  "summary": "auto"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert [s.text for s in reasoning.summary] == [THINKING] and message.content[0].text == PLAIN_ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == 3

    events = raw_events(agent_gateway, {"model": "gpt-5-codex", "input": ASK, "reasoning": {"effort": "low"}})
    assert check_grammar(events) == ["reasoning", "message"]
    summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert summary == THINKING
    assert {"response.reasoning_summary_part.added", "response.reasoning_summary_part.done",
            "response.reasoning_summary_text.done"} <= {e["type"] for e in events}

    plain = client.responses.create(model="gpt-5-codex", input=ASK, reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]


def test_sampling_parameters_and_what_agents_send_are_accepted(agent_gateway):
    response = gpt(agent_gateway).responses.create(
        model="gpt-5-codex", input=[{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "input_text", "text": ASK}]}],
        temperature=0.7, top_p=0.9, prompt_cache_key="session-1", store=False, text={"format": {"type": "text"}},
        include=["reasoning.encrypted_content"], service_tier="auto", truncation="disabled",
        extra_body={"client_metadata": {"thread_id": "t1"}})
    assert response.output_text == PLAIN_ANSWER


# ---------------------------------------------------------------- tools
def test_the_model_calls_a_function_and_answers_from_its_output(agent_gateway):
    client = gpt(agent_gateway)
    first = client.responses.create(model="gpt-5-codex", input=ASK, tools=[WEATHER], store=False)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "Paris"}
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and first.status == "completed"

    history = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}]
    second = client.responses.create(model="gpt-5-codex", input=history, tools=[WEATHER], store=False)
    assert second.output_text == TOOL_ANSWER and [i.type for i in second.output] == ["message"]


def test_a_streamed_function_call_has_its_argument_events(agent_gateway):
    events = raw_events(agent_gateway, {"model": "gpt-5-codex", "input": ASK, "tools": [WEATHER]})
    assert check_grammar(events) == ["function_call"]
    added = events[2]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress" and added["name"] == "get_weather"
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert json.loads(arguments) == {"city": "Paris"} and done["arguments"] == arguments

    with gpt(agent_gateway).responses.stream(model="gpt-5-codex", input=ASK, tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    assert json.loads(final.output[0].arguments) == {"city": "Paris"}


def test_tools_the_client_runs_come_back_as_their_own_items(agent_gateway):
    """A `custom` (freeform) tool's call is a custom_tool_call, its output goes back as
    custom_tool_call_output; a namespace's function comes back with its namespace."""
    client = gpt(agent_gateway)
    custom = {"type": "custom", "name": "get_weather", "description": "Weather, as free text"}
    first = client.responses.create(model="gpt-5-codex", input=ASK, tools=[custom], store=False)
    (call,) = first.output
    assert call.type == "custom_tool_call" and call.name == "get_weather" and call.id.startswith("ctc_")
    assert json.loads(call.input) == {"city": "Paris"}
    second = client.responses.create(model="gpt-5-codex", store=False, tools=[custom], input=[
        {"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.output_text == TOOL_ANSWER

    namespace = {"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [WEATHER]}
    answer = client.responses.create(model="gpt-5-codex", store=False, tools=[namespace, {"type": "web_search"}],
                                     input=[{"role": "user", "content": ASK},
                                            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                             "namespace": "weather", "arguments": "{\"city\": \"Paris\"}"},
                                            {"type": "function_call_output", "call_id": "call_1",
                                             "output": [{"type": "input_text", "text": "sunny"}]},
                                            {"type": "reasoning", "id": "rs_1", "summary": [],
                                             "encrypted_content": "opaque"}])
    assert answer.output_text == TOOL_ANSWER


def test_tool_choice_none_and_parallel_tool_calls_are_honored(agent_gateway):
    client = gpt(agent_gateway)
    response = client.responses.create(model="gpt-5-codex", input=ASK, tools=[WEATHER], tool_choice="none")
    assert response.output_text == PLAIN_ANSWER
    chosen = client.responses.create(model="gpt-5-codex", input=ASK, tools=[WEATHER], parallel_tool_calls=False,
                                     tool_choice={"type": "function", "name": "get_weather"})
    assert [i.type for i in chosen.output] == ["function_call"] and chosen.parallel_tool_calls is False


# ---------------------------------------------------------------- state
def test_previous_response_id_chains_stored_responses(agent_gateway):
    client = gpt(agent_gateway)
    first = client.responses.create(model="gpt-5-codex", input=ASK, tools=[WEATHER])  # store: the default
    call = first.output[0]
    second = client.responses.create(model="gpt-5-codex", previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}])
    assert second.output_text == TOOL_ANSWER and second.previous_response_id == first.id

    stored = client.responses.retrieve(first.id)
    assert stored.id == first.id and stored.output[0].call_id == call.call_id and stored.status == "completed"
    (given,) = client.responses.input_items.list(second.id).data
    assert given.type == "function_call_output" and given.call_id == call.call_id
    items = client.responses.input_items.list(first.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", "user")] and items[0].content[0].text == ASK

    counted = client.responses.input_tokens.count(model="gpt-5-codex", previous_response_id=first.id,
                                                  tools=[WEATHER], input=[{"type": "function_call_output",
                                                                           "call_id": call.call_id,
                                                                           "output": "sunny"}])
    assert counted.input_tokens == second.usage.input_tokens

    folder = agent_gateway.home / "responses"
    assert stat.S_IMODE((folder / f"{first.id}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="gpt-5-codex", previous_response_id=first.id, input="again")
    assert first.id in caught.value.body["message"]


def test_store_false_keeps_nothing(agent_gateway):
    client = gpt(agent_gateway)
    response = client.responses.create(model="gpt-5-codex", input=ASK, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    assert not (agent_gateway.home / "responses" / f"{response.id}.json").exists()


# ---------------------------------------------------------------- errors
def test_a_prompt_over_the_context_window_is_context_length_exceeded(agent_gateway):
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(agent_gateway).responses.create(model="tiny-a", input="alpha beta gamma delta " * 800)  # 2048 tokens
    error = caught.value.body
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "maximum context length is 2048 tokens" in error["message"]


def test_an_unknown_model_is_not_found(agent_gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        gpt(agent_gateway).responses.create(model="no-such-model", input=ASK)
    assert caught.value.body["code"] == "model_not_found" and "no-such-model" in caught.value.body["message"]


@pytest.mark.parametrize("body, expected", [
    ({"input": [{"type": "hologram"}]}, "input.0.type: unsupported input item type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role: Input should be"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input.0.content.0: input_file content is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input.0.content.0: model "),
    ({"input": [{"type": "function_call", "name": "get_weather", "arguments": "{}"}]},
     "input.0.call_id: Field required"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input.0.output: Field required"),
    ({"input": 42}, "input: Field required"),
    ({"input": ASK, "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}},
     "text.format.schema.properties.xs: uniqueItems cannot be enforced"),
    ({"input": ASK, "tools": {"type": "function"}}, "tools: Input should be a list"),
    ({"input": ASK, "max_output_tokens": 0}, "max_output_tokens: Input should be greater than or equal to 1"),
    ({"input": ASK, "background": True}, "background: background responses are not supported"),
])
def test_malformed_requests_get_the_responses_error_shape(agent_gateway, body, expected):
    response = httpx.post(agent_gateway.url + "/v1/responses", json={"model": "gpt-5-codex", **body}, timeout=60,
                          headers={"Authorization": f"Bearer {agent_gateway.api_key}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"].startswith(expected), error


def test_compaction_is_not_offered_so_codex_compacts_with_a_normal_request(agent_gateway):
    """Codex 0.169 compacts a custom provider's conversation with a plain /v1/responses request;
    the remote compaction route answers 404, which makes a client fall back to that."""
    response = httpx.post(agent_gateway.url + "/v1/responses/compact", json={"model": "gpt-5-codex", "input": []},
                          headers={"Authorization": f"Bearer {agent_gateway.api_key}"}, timeout=30)
    assert response.status_code == 404 and "/v1/responses" in response.json()["error"]["message"]


# ---------------------------------------------------------------- Codex CLI
@pytest.fixture(scope="session")
def codex(tmp_path_factory) -> str:
    return npm_agent("codex", "@openai/codex", CODEX_VERSION, tmp_path_factory.mktemp("codex-cli"))


def test_codex_cli_runs_a_task_against_the_gateway(agent_gateway, codex, tmp_path):
    """`codex exec` with the provider config `mlxgate env --codex` prints: the scripted model calls
    get_weather (a tool Codex does not have, so Codex answers that it failed), then answers."""
    from support import mlxgate

    printed = mlxgate("env", "--codex", env=agent_gateway.env, check=True).stdout
    settings = [line.split("  #")[0] for line in printed.splitlines() if line and not line.startswith("#")]
    table = settings.index("[model_providers.mlxgate]")
    provider = "{" + ", ".join(settings[table + 1:]) + "}"
    overrides = [*settings[:table], f"model_providers.mlxgate={provider}"]
    served = agent_gateway.served("scripted")

    for folder in ("work", "codex-home"):
        (tmp_path / folder).mkdir()
    result = subprocess.run(
        [codex, "exec", "--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
         *[arg for setting in overrides for arg in ("-c", setting)], ASK],
        cwd=tmp_path / "work", capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "CODEX_HOME": str(tmp_path / "codex-home"), "MLXGATE_API_KEY": agent_gateway.api_key})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    messages = [e["item"]["text"] for e in events
                if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"]
    assert messages[-1] == TOOL_ANSWER
    assert [e["type"] for e in events].count("turn.completed") == 1
    requests = agent_gateway.served("scripted") - served
    assert requests == 2, "the tool call, then the answer from its output"
