"""An agent written for Claude, pointed at mlxgate: the Anthropic Messages API as agents use it.

The default model is the scripted tiny model: it greets, calls `get_weather` with
{"city": "Paris"} when tools are offered, answers "It is sunny in Paris!" after the tool
result and thinks first when thinking is on, so every answer here is exact.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from mlxgate.demo_model import PLAIN_ANSWER, THINKING, TOOL_ANSWER
from support import claude, gpt, sse_events

WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_turn(result_content, is_error: bool = False) -> list[dict]:
    """The conversation after the model called the tool and the agent ran it."""
    return ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": result_content, "is_error": is_error}]},
    ]


def raw_stream(gateway, body: dict, path: str = "/v1/messages?beta=true", **headers) -> list[tuple[str, dict]]:
    """(event, data) pairs exactly as they came over the wire."""
    return sse_events(gateway.url + path, body,
                      {"x-api-key": gateway.api_key, "anthropic-version": "2023-06-01", **headers})


def check_grammar(events: list[tuple[str, dict]]) -> list[str]:
    """Assert Anthropic's stream grammar; return the block types in order."""
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop" and names[-2] == "message_delta"
    assert isinstance(events[0][1]["message"]["usage"]["input_tokens"], int)
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    open_block, blocks = None, []
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_block is None and data["index"] == len(blocks)
            open_block = data["index"]
            blocks.append(data["content_block"]["type"])
        elif name == "content_block_delta":
            assert data["index"] == open_block, "a delta for a block that is not open"
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
        else:
            assert name == "ping", name
    assert open_block is None
    return blocks


# ---------------------------------------------------------------- tool use
def test_the_model_calls_a_tool_and_answers_from_its_result(agent_gateway):
    client = claude(agent_gateway)
    first = client.messages.create(model="claude-opus-4-8", max_tokens=200, tools=[WEATHER_TOOL], messages=ASK)
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_") and first.id.startswith("msg_")

    conversation = ASK + [{"role": "assistant", "content": [c.model_dump() for c in first.content]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                        "content": "sunny, 24 C"}]}]
    second = client.messages.create(model="claude-opus-4-8", max_tokens=200, tools=[WEATHER_TOOL],
                                    messages=conversation)
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"] and second.content[0].text == TOOL_ANSWER


@pytest.mark.parametrize("content, is_error", [
    ("sunny", False),
    ([{"type": "text", "text": "sunny"}, {"type": "text", "text": ", 24 C"}], False),
    ("the weather service timed out", True),
])
def test_tool_results_as_text_list_or_error_are_accepted(agent_gateway, content, is_error):
    message = claude(agent_gateway).messages.create(model="claude-sonnet-4-6", max_tokens=100,
                                                    tools=[WEATHER_TOOL], messages=tool_turn(content, is_error))
    assert message.content[0].text == TOOL_ANSWER and message.stop_reason == "end_turn"


def test_a_streamed_tool_call_comes_as_tool_use_and_input_json_delta(agent_gateway):
    body = {"model": "claude-opus-4-8", "max_tokens": 200, "tools": [WEATHER_TOOL], "messages": ASK}
    events = raw_stream(agent_gateway, body)
    assert check_grammar(events) == ["tool_use"]
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"input_json_delta"}
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    with claude(agent_gateway).messages.stream(**body) as stream:  # the SDK's own accumulator
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}


def test_tool_choice_none_means_no_tool_call(agent_gateway):
    message = claude(agent_gateway).messages.create(model="claude-opus-4-8", max_tokens=100, tools=[WEATHER_TOOL],
                                                    tool_choice={"type": "none"}, messages=ASK)
    assert message.content[0].text == PLAIN_ANSWER and message.stop_reason == "end_turn"


# ---------------------------------------------------------------- streaming and request shapes
def test_a_text_stream_has_anthropics_event_grammar(agent_gateway):
    events = raw_stream(agent_gateway, {"model": "claude-opus-4-8", "max_tokens": 100, "messages": ASK},
                        **{"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert check_grammar(events) == ["text"]
    assert "ping" in [n for n, _ in events]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == PLAIN_ANSWER
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == 10  # nine words and the end-of-turn token


def test_what_claude_code_sends_is_accepted(agent_gateway):
    """The shape of Claude Code 2.1's first request: list system with cache_control, a system
    message mid-conversation, adaptive thinking, output_config, context_management, metadata,
    many tools, a huge max_tokens, beta headers and ?beta=true."""
    tools = [WEATHER_TOOL] + [{"name": f"Tool{i}", "description": "d", "input_schema": {"type": "object"}}
                              for i in range(23)] + [{"type": "web_search_20250305", "name": "web_search"}]
    body = {
        "model": "claude-opus-4-8[1m]", "max_tokens": 64000,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                   "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
                     {"role": "system", "content": "The user's date is 2026-11-25."},
                     {"role": "user", "content": "Say hello"}],
        "tools": tools, "metadata": {"user_id": "user_abc"},
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }
    beta = "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14"
    events = raw_stream(agent_gateway, body, **{"anthropic-beta": beta})
    assert check_grammar(events) == ["tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    side_task = dict(body, tools=[])  # adaptive thinking reaches the model (LiteLLM alone drops it)
    events = raw_stream(agent_gateway, side_task, **{"anthropic-beta": beta})
    assert check_grammar(events) == ["thinking", "text"]
    thinking = "".join(d["delta"].get("thinking", "") for n, d in events if n == "content_block_delta")
    assert thinking == THINKING

    body["thinking"] = {"type": "disabled"}  # sub-agent calls: no thinking, still tools
    response = httpx.post(agent_gateway.url + "/v1/messages?beta=true", json=body, timeout=60,
                          headers={"x-api-key": agent_gateway.api_key, "anthropic-beta": beta})
    message = response.json()
    assert message["stop_reason"] == "tool_use" and message["content"][0]["name"] == "get_weather"


def test_thinking_comes_back_as_a_thinking_block(agent_gateway):
    client = claude(agent_gateway)
    message = client.messages.create(model="claude-opus-4-8", max_tokens=2000, messages=ASK,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING and message.content[1].text == PLAIN_ANSWER
    with client.messages.stream(model="claude-opus-4-8", max_tokens=2000, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == THINKING and final.content[0].signature
    plain = client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=ASK)
    assert [b.type for b in plain.content] == ["text"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_answer_and_is_named(agent_gateway, stream):
    client = claude(agent_gateway)
    options = dict(model="claude-opus-4-8", max_tokens=100, messages=ASK, stop_sequences=["never", " How"])
    if stream:
        with client.messages.stream(**options) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**options)
    assert message.content[0].text == "Hello from mlxgate."
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " How"


def test_sampling_parameters_and_a_system_prompt_are_accepted(agent_gateway):
    message = claude(agent_gateway).messages.create(
        model="claude-opus-4-8", max_tokens=100, messages=ASK, system="Be brief.",
        extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 40})  # this SDK has no such arguments
    assert message.content[0].text == PLAIN_ANSWER


def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens(agent_gateway):
    message = claude(agent_gateway).messages.create(model="claude-opus-4-8", max_tokens=3, messages=ASK)
    assert message.content[0].text == "Hello from mlxgate"
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


# ---------------------------------------------------------------- model names and listing
@pytest.mark.parametrize("name", ["claude-opus-4-8[1m]", "claude-sonnet-4-5-20250929", "claude-3-7-sonnet-latest",
                                  "anthropic/claude-opus-4-1"])
def test_claude_model_names_reach_the_default_model(agent_gateway, name):
    message = claude(agent_gateway).messages.create(model=name, max_tokens=100, messages=ASK)
    assert message.content[0].text == PLAIN_ANSWER and message.model == name


@pytest.mark.parametrize("name", ["claude-haiku-4-5-20251001", "claude-3-5-haiku-latest", "claude-haiku-4-5[1m]"])
def test_haiku_class_names_go_to_the_autocomplete_model_without_a_swap(agent_gateway, name):
    before = agent_gateway.servers()
    message = claude(agent_gateway).messages.create(model=name, max_tokens=5, messages=ASK)
    assert message.content[0].text != PLAIN_ANSWER  # tiny-a answered, not the scripted model
    after = agent_gateway.servers()
    assert after["scripted"]["loads"] == before["scripted"]["loads"] and after["tiny-a"]["loads"] == 1
    assert after["tiny-a"]["queue"]["served"] == before["tiny-a"]["queue"]["served"] + 1
    assert after["scripted"]["queue"]["served"] == before["scripted"]["queue"]["served"]


def test_models_are_listed_in_both_apis_shapes(agent_gateway):
    anthropic_ids = [m.id for m in claude(agent_gateway).models.list()]
    openai_ids = [m.id for m in gpt(agent_gateway).models.list()]
    assert {"scripted", "tiny-a", "autocomplete"} <= set(anthropic_ids)
    assert anthropic_ids == openai_ids
    assert "mlxgate-dynamic" not in anthropic_ids and "*" not in anthropic_ids


# ---------------------------------------------------------------- tokens, context, usage
def test_count_tokens_matches_the_input_tokens_the_model_reports(agent_gateway):
    client = claude(agent_gateway)
    conversation = [{"role": "user", "content": "count these words exactly, please: alpha beta gamma delta"}]
    options = dict(model="claude-opus-4-8", messages=conversation, tools=[WEATHER_TOOL], system="Be exact.")
    counted = client.messages.count_tokens(**options).input_tokens
    message = client.messages.create(max_tokens=100, **options)
    usage = message.usage
    assert counted > 100  # the tool definition is counted too
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted


def test_a_prompt_over_the_context_window_gets_anthropics_error(agent_gateway):
    long_text = "alpha beta gamma delta " * 800
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(agent_gateway).messages.create(model="tiny-a", max_tokens=100,  # a 2048-token window
                                              messages=[{"role": "user", "content": long_text}])
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: ") and error["message"].endswith(" > 2048 maximum")
    assert int(error["message"].split()[4]) > 2048


def test_an_image_to_a_text_only_model_is_an_invalid_request(agent_gateway):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(agent_gateway).messages.create(model="claude-opus-4-8", max_tokens=10, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "what is this?"}]}])
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error" and "reads text only" in error["message"]


@pytest.mark.parametrize("body, expected", [
    ({"messages": ASK}, "max_tokens: Field required"),
    ({"max_tokens": -5, "messages": ASK}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": "many", "messages": ASK}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": 5, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role: Input should be"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
     "messages.0.content.0.type: unsupported block type"),
    ({"max_tokens": 5, "messages": []}, "messages: Field required"),
])
def test_invalid_requests_get_anthropics_error_shape(agent_gateway, body, expected):
    response = httpx.post(agent_gateway.url + "/v1/messages", json={"model": "claude-opus-4-8", **body},
                          headers={"x-api-key": agent_gateway.api_key}, timeout=60)
    assert response.status_code == 400
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["message"].startswith(expected), data
