"""The Responses translation fed with what the tiny models cannot produce or a user cannot
easily send: the client-run tools (namespace, custom, local_shell, shell, apply_patch) both
ways, arguments in pieces, two calls with parallel_tool_calls off, a cut answer, a failure;
and the store's bounds. Pure functions and a folder, so every case is exact."""

from __future__ import annotations

import json
import os

import pytest

from mlxgate.errors import RequestRejected
from mlxgate.responses.events import ResponseTranslator
from mlxgate.responses.request import response_object, to_chat
from mlxgate.responses.store import ResponseStore
from mlxgate.responses.tools import new_id

CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": [
        {"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}]},
    {"type": "custom", "name": "apply_patch", "description": "Edit files",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: \"*** Begin Patch\""}},
    {"type": "local_shell"}, {"type": "shell"}, {"type": "apply_patch"},
    {"type": "web_search", "external_web_access": True}, {"type": "tool_search"},
]


def chunk(content=None, reasoning=None, calls=None, finish=None) -> dict:
    delta = {k: v for k, v in (("content", content), ("reasoning", reasoning), ("tool_calls", calls)) if v}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def call(name: str, arguments: dict | str, index: int = 0, call_id: str | None = "abc-1") -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def run(body: dict, chunks: list[dict]) -> tuple[list[dict], dict]:
    request = to_chat({"model": "gpt-5.5", "input": "hi", **body})
    translator = ResponseTranslator(response_object(request), request.tools, request.max_calls)
    events = translator.start()
    for c in chunks:
        events += translator.feed(c)
    events += translator.finish()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, translator.response


def test_codex_tools_are_offered_as_functions_and_server_tools_skipped():
    chat = to_chat({"input": "hi", "tools": CODEX_TOOLS}).chat
    functions = {t["function"]["name"]: t["function"] for t in chat["tools"]}
    assert list(functions) == ["exec_command", "multi_agent_v1__spawn_agent", "apply_patch", "local_shell", "shell",
                               "apply_patch_2"]  # the freeform apply_patch and the apply_patch tool, apart
    assert functions["apply_patch"]["parameters"]["required"] == ["input"]
    assert "lark grammar" in functions["apply_patch"]["description"]
    assert functions["local_shell"]["parameters"]["required"] == ["command"]


@pytest.mark.parametrize("name, arguments, item", [
    ("multi_agent_v1__spawn_agent", {"task": "x"},
     {"type": "function_call", "name": "spawn_agent", "namespace": "multi_agent_v1", "arguments": '{"task": "x"}'}),
    ("apply_patch", {"input": "*** Begin Patch"}, {"type": "custom_tool_call", "name": "apply_patch",
                                                   "input": "*** Begin Patch"}),
    ("local_shell", {"command": ["ls", "-l"], "working_directory": "/w"},
     {"type": "local_shell_call", "action": {"type": "exec", "command": ["ls", "-l"], "env": {}, "timeout_ms": None,
                                             "working_directory": "/w", "user": None}}),
    ("shell", {"commands": ["ls"], "timeout_ms": 1000},
     {"type": "shell_call", "action": {"commands": ["ls"], "timeout_ms": 1000, "max_output_length": None}}),
    ("apply_patch_2", {"type": "create_file", "path": "a.txt", "diff": "hello"},
     {"type": "apply_patch_call", "operation": {"type": "create_file", "path": "a.txt", "diff": "hello"}}),
    ("unknown_tool", {"a": 1}, {"type": "function_call", "name": "unknown_tool", "arguments": '{"a": 1}'}),
])
def test_a_call_comes_back_as_the_item_of_the_tool_offered_and_goes_back_as_history(name, arguments, item):
    events, response = run({"tools": CODEX_TOOLS}, [chunk(calls=[call(name, arguments)], finish="tool_calls")])
    (out,) = response["output"]
    assert {k: out[k] for k in item} == item and out["call_id"] == "call_abc1"
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [a["id"] for a in added] == [out["id"]]

    # the item and its output sent back: the model sees the call under its own name again
    output = {"shell_call": {"type": "shell_call_output", "call_id": "call_abc1", "output": [
        {"stdout": "a.txt\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]},
              "local_shell_call": {"type": "local_shell_call_output", "id": "call_abc1", "output": "a.txt"},
              "apply_patch_call": {"type": "apply_patch_call_output", "call_id": "call_abc1", "status": "completed",
                                   "output": "done"},
              "custom_tool_call": {"type": "custom_tool_call_output", "call_id": "call_abc1", "output": "done"},
              }.get(out["type"], {"type": "function_call_output", "call_id": "call_abc1", "output": "done"})
    chat = to_chat({"input": [{"role": "user", "content": "hi"}, out, output], "tools": CODEX_TOOLS}).chat
    assistant, tool = chat["messages"][-2:]
    (sent,) = assistant["tool_calls"]
    assert sent["id"] == "call_abc1" and sent["function"]["name"] == name
    assert {k: v for k, v in json.loads(sent["function"]["arguments"]).items() if v is not None} == {
        k: v for k, v in arguments.items() if k != "type" or name != "apply_patch_2"} | (
        {"type": "create_file"} if name == "apply_patch_2" else {})
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_abc1"
    assert tool["content"] in ("done", "a.txt", "a.txt\n\n(exit code 0)")


def test_arguments_in_pieces_stream_as_deltas_and_parallel_tool_calls_false_keeps_one_call():
    events, response = run({"tools": CODEX_TOOLS, "parallel_tool_calls": False}, [
        chunk(calls=[call("exec_command", '{"cmd"', call_id="a")]),
        chunk(calls=[{"index": 0, "function": {"arguments": ': "ls"}'}}]),
        chunk(calls=[call("exec_command", {"cmd": "pwd"}, index=1, call_id="b")], finish="tool_calls")])
    (only,) = response["output"]
    assert only["arguments"] == '{"cmd": "ls"}' and only["call_id"] == "call_a"
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"cmd"', ': "ls"}']


def test_text_then_a_call_are_two_items_and_a_cut_answer_is_incomplete():
    events, response = run({"tools": CODEX_TOOLS}, [chunk(reasoning="hmm"), chunk(content="Let me look."),
                                                    chunk(calls=[call("exec_command", {"cmd": "ls"})])])
    assert [i["type"] for i in response["output"]] == ["reasoning", "message", "function_call"]
    assert response["status"] == "completed"
    events, response = run({}, [chunk(content="Hello"), chunk(content=" there", finish="length")])
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete" and events[-1]["type"] == "response.incomplete"


def test_a_failure_mid_answer_is_response_failed():
    request = to_chat({"input": "hi"})
    translator = ResponseTranslator(response_object(request))
    translator.start()
    translator.feed(chunk(content="Hel"))
    (event,) = translator.failed("backend_error", "the model server crashed")
    assert event["type"] == "response.failed" and event["sequence_number"] == 5  # created, in_progress, 3 for "Hel"
    assert event["response"]["status"] == "failed"
    assert event["response"]["error"] == {"code": "backend_error", "message": "the model server crashed"}


def test_instructions_and_leading_developer_messages_are_one_system_message():
    chat = to_chat({"instructions": "Be brief.", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
        {"role": "user", "content": "hi"}, {"role": "system", "content": "Later note."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}]}).chat
    assert chat["messages"] == [{"role": "system", "content": "Be brief.\n\nRules."},
                                {"role": "user", "content": "hi"}, {"role": "user", "content": "Later note."},
                                {"role": "assistant", "content": "Hello"}]
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("body, expected", [
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": CODEX_TOOLS}, "tool_choice"),
    ({"metadata": {"k": 5}}, "metadata"),
    ({"input": [{"type": "compaction", "encrypted_content": "x"}]}, "input.0.type"),
])
def test_what_cannot_be_honored_is_refused(body, expected):
    with pytest.raises(RequestRejected) as caught:
        to_chat({"input": "hi", **body})
    assert caught.value.status == 400 and str(caught.value).startswith(expected)


# ---------------------------------------------------------------- the store
def response(output_text: str = "hi") -> dict:
    return {"id": new_id("resp"), "output": [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": output_text}]}]}


def test_a_chain_reads_one_file_and_pages_its_input_items(tmp_path):
    store = ResponseStore(tmp_path / "responses")
    first = response("one")
    store.save(first, [{"id": "m1", "type": "message"}], [])
    second = response("two")
    earlier = store.history(first["id"])
    store.save(second, [{"id": "m2", "type": "message"}, {"id": "m3", "type": "message"}], earlier)
    assert store.history(second["id"]) == [{"id": "m1", "type": "message"}, *first["output"],
                                           {"id": "m2", "type": "message"}, {"id": "m3", "type": "message"},
                                           *second["output"]]
    page = store.input_items(second["id"], limit=1)
    assert [i["id"] for i in page["data"]] == ["m3"] and page["has_more"]
    assert [i["id"] for i in store.input_items(second["id"], "asc", after="m2")["data"]] == ["m3"]
    assert oct((tmp_path / "responses").stat().st_mode & 0o777) == "0o700"
    assert store.delete(first["id"])["deleted"] and store.history(second["id"])  # a chain outlives its start
    with pytest.raises(RequestRejected) as caught:
        store.record(first["id"])
    assert caught.value.status == 404
    with pytest.raises(RequestRejected):
        store.record("../../etc/passwd")  # never a path


def test_the_store_is_bounded_in_age_and_size(tmp_path):
    now = [1_000_000.0]
    store = ResponseStore(tmp_path, max_bytes=3000, max_age=100, clock=lambda: now[0])
    saved = []
    for i in range(5):
        item = response("x" * 500)
        store.save(item, [], [])
        os.utime(tmp_path / f"{item['id']}.json", (now[0] + i, now[0] + i))
        saved.append(item["id"])
        now[0] += 61  # the folder is checked at most once a minute
    kept = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert saved[-1] in kept and saved[0] not in kept  # too old
    assert sum(p.stat().st_size for p in tmp_path.glob("*.json")) <= 3000 + 1000
    now[0] += 1000
    with pytest.raises(RequestRejected):
        store.record(saved[-1])  # older than max_age, even before the next check
