"""The Anthropic translation fed with chunk sequences the tiny models cannot produce: tool-call
arguments in pieces, two tool calls, reasoning then text, a stop sequence split across chunks,
usage with a cached prefix. Pure functions, so every case is exact."""

from __future__ import annotations

import json

import pytest

from mlxgate.errors import RequestRejected
from mlxgate.messages.chat import assemble_chat
from mlxgate.messages.events import MessageTranslator, assemble
from mlxgate.messages.request import to_chat


def chunk(content=None, reasoning=None, calls=None, finish=None, usage=None) -> dict:
    delta = {k: v for k, v in (("content", content), ("reasoning", reasoning), ("tool_calls", calls)) if v}
    out = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out = {"choices": [], "usage": usage}
    return out


def run(chunks, stops=()) -> tuple[list, dict]:
    translator = MessageTranslator("claude-x", 12, list(stops))
    events = translator.start()
    for c in chunks:
        events += translator.feed(c)
        if translator.stopped:
            break
    events += translator.finish()
    return events, assemble(events)


def test_tool_call_arguments_in_pieces_and_two_calls_become_two_tool_use_blocks():
    events, message = run([
        chunk(calls=[{"index": 0, "id": "a1", "function": {"name": "read", "arguments": '{"pa'}}]),
        chunk(calls=[{"index": 0, "function": {"arguments": 'th": "x.py"}'}}]),
        chunk(calls=[{"index": 1, "id": "b2", "function": {"name": "ls", "arguments": "{}"}}]),
        chunk(finish="tool_calls"),
    ])
    assert [(b["type"], b["name"], b["input"]) for b in message["content"]] == [
        ("tool_use", "read", {"path": "x.py"}), ("tool_use", "ls", {})]
    assert message["stop_reason"] == "tool_use"
    starts = [d["index"] for n, d in events if n == "content_block_start"]
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert starts == stops == [0, 1]


def test_reasoning_then_text_gives_a_thinking_block_then_a_text_block():
    _, message = run([chunk(reasoning="Let me"), chunk(reasoning=" see."), chunk(content="Yes."),
                      chunk(finish="stop")])
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][0]["thinking"] == "Let me see." and message["content"][0]["signature"]
    assert message["content"][1]["text"] == "Yes." and message["stop_reason"] == "end_turn"


def test_a_stop_sequence_split_across_chunks_is_found_and_never_shown():
    events, message = run([chunk(content="Hello wo"), chunk(content="rld, and "), chunk(content="more")],
                          stops=["world"])
    shown = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert shown == "Hello " and message["stop_reason"] == "stop_sequence"
    assert message["stop_sequence"] == "world"


def test_text_held_back_for_a_stop_sequence_that_never_comes_is_sent_at_the_end():
    _, message = run([chunk(content="ab"), chunk(content="c wor"), chunk(finish="length")], stops=["world"])
    assert message["content"][0]["text"] == "abc wor" and message["stop_reason"] == "max_tokens"


def test_usage_counts_the_cached_prefix_apart():
    _, message = run([chunk(content="x"), chunk(finish="stop"),
                      chunk(usage={"prompt_tokens": 100, "completion_tokens": 3,
                                   "prompt_tokens_details": {"cached_tokens": 90}})])
    assert message["usage"]["input_tokens"] == 10 and message["usage"]["cache_read_input_tokens"] == 90
    assert message["usage"]["output_tokens"] == 3 and message["id"].startswith("msg_")


def test_openai_chunks_assemble_into_one_answer():
    answer = assemble_chat([chunk(content="Hel"), chunk(content="lo"),
                            chunk(calls=[{"index": 0, "id": "c", "type": "function",
                                          "function": {"name": "f", "arguments": "{}"}}], finish="tool_calls"),
                            chunk(usage={"prompt_tokens": 5, "completion_tokens": 2})])
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "Hello" and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "f"
    assert answer["usage"]["completion_tokens"] == 2 and answer["object"] == "chat.completion"


def test_a_conversation_with_tools_translates_to_openai_messages():
    chat = to_chat({"max_tokens": 10, "system": [{"type": "text", "text": "S"}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "text", "text": "calling"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "boom",
                                      "is_error": True}, {"type": "text", "text": "and?"}]},
    ], "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"}})
    messages = chat.body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert json.loads(messages[2]["tool_calls"][0]["function"]["arguments"]) == {"a": 1}
    assert messages[3] == {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}
    assert chat.body["tools"][0]["function"]["name"] == "f"
    assert chat.body["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("body, expected", [
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.type: unsupported block type"),
    ({"max_tokens": 5, "messages": ["hi"]}, "messages.0: Input should be an object"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool", "name": "g"},
      "tools": [{"name": "f", "input_schema": {}}]}, "tool_choice: no tool named"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature: Input should"),
])
def test_bad_anthropic_requests_are_refused_with_the_field_named(body, expected):
    with pytest.raises(RequestRejected) as caught:
        to_chat(body)
    assert str(caught.value).startswith(expected) and caught.value.status == 400
