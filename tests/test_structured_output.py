"""Structured output and fill-in-the-middle through the gateway, as a user meets them: the official
SDKs' parse helpers (OpenAI chat and Responses, Anthropic `messages.parse`), Instructor and
pydantic-ai (each in a venv of its own), strict tools in all three APIs, a schema that cannot be
held refused before anything is queued, and `/v1/completions` with a `suffix`.

The random-weight tiny-a never writes JSON by itself: every answer that parses below is the
grammar's doing. The scripted model writes `get_weather({"city": "Paris"})` when tools are
offered, so the strict tools' other required arguments come from the grammar. `coder` is a
scripted model with Qwen2.5-Coder's FIM tokens (its middle is always `return a + b`), served as
the autocomplete model.

One daemon for the module (HTTP only): default model tiny-a, autocomplete model coder.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anthropic
import httpx
import jsonschema
import openai
import pydantic
import pytest

from support import Gateway, claude, gpt, mlxgate, pypi_venv
from test_constraints_units import BOUNDED

RECORD = BOUNDED  # every string and array bounded: a random walk through the grammar ends within max_tokens
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
UNHOLDABLE = {"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}


class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=12)
    priority: Literal["low", "medium", "high"]
    estimate: int = pydantic.Field(ge=0, le=100)
    urgent: bool


class Verdict(pydantic.BaseModel):  # what survives the Anthropic SDK's schema transform (it drops bounds)
    priority: Literal["low", "medium", "high"]
    urgent: bool
    area: Literal["api", "ui", "docs"]


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("structured-models")
    for name in ("tiny-a", "scripted"):
        shutil.copytree(models_dir / name, models / name)
    mlxgate("demo-model", str(models / "coder"), "--scripted", "--fim", env=dict(os.environ), check=True)
    running = Gateway(tmp_path_factory.mktemp("structured-home"), models, "--default-model", "tiny-a",
                      "--autocomplete-model", "coder", https=False, max_tokens=512)
    running.start()
    yield running
    running.stop()


def answers_in(gw) -> int:
    return sum(server.get("served", 0) for server in gw.servers().values())


# ---------------------------------------------------------------- OpenAI chat
def test_fifty_answers_of_a_random_model_all_validate_against_the_schema(gw):
    client = gpt(gw, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}}

    def one(i: int) -> dict:
        try:
            answer = client.chat.completions.create(model="gpt-4o", max_tokens=400, temperature=1.0,
                                                    response_format=fmt,
                                                    messages=[{"role": "user", "content": f"Record {i}"}])
        except openai.APIStatusError as e:  # what the gateway said, and what its wrapper logged
            raise AssertionError(f"request {i}: {e.status_code} {e.response.text}\n{gw.log_tail()}") from e
        assert answer.choices[0].finish_reason == "stop", answer
        return json.loads(answer.choices[0].message.content)
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(one, range(50)))
    for record in records:
        jsonschema.validate(record, RECORD, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert len({json.dumps(r, sort_keys=True) for r in records}) > 40, "fifty answers, not one answer fifty times"


def test_chat_completions_parse_gives_a_pydantic_object_and_json_object_gives_an_object(gw):
    parsed = gpt(gw).chat.completions.parse(model="gpt-4o", max_tokens=200, response_format=Ticket,
                                            messages=[{"role": "user", "content": "File a ticket"}])
    ticket = parsed.choices[0].message.parsed
    assert isinstance(ticket, Ticket) and ticket.priority in ("low", "medium", "high")
    loose = gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=300, response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Any JSON"}])
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)
    else:  # an unbounded object may reach max_tokens: what there is is a JSON object's beginning
        assert loose.choices[0].message.content.startswith("{")


def test_a_strict_tool_is_called_with_arguments_its_schema_accepts_in_every_api(gw):
    chat = gpt(gw).chat.completions.create(model="scripted", max_tokens=200, tool_choice="required", tools=[
        {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER}}],
        messages=[{"role": "user", "content": "Weather?"}])
    [call] = chat.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    response = gpt(gw).responses.create(model="scripted", max_output_tokens=200, input="Weather?", tools=[
        {"type": "function", "name": "get_weather", "strict": True, "parameters": WEATHER}], tool_choice="required")
    [item] = [i for i in response.output if i.type == "function_call"]
    jsonschema.validate(json.loads(item.arguments), WEATHER)
    message = claude(gw).messages.create(model="scripted", max_tokens=200, tool_choice={"type": "any"}, tools=[
        {"name": "get_weather", "strict": True, "input_schema": WEATHER}],
        messages=[{"role": "user", "content": "Weather?"}])
    [use] = [b for b in message.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER)


# ---------------------------------------------------------------- Responses and Anthropic
def test_responses_parse_gives_a_pydantic_object(gw):
    parsed = gpt(gw).responses.parse(model="gpt-5.5", max_output_tokens=200, input="File a ticket", text_format=Ticket)
    assert isinstance(parsed.output_parsed, Ticket)


def test_anthropic_messages_parse_gives_a_pydantic_object(gw):
    parsed = claude(gw).messages.parse(model="claude-sonnet-4-6", max_tokens=200, output_format=Verdict,
                                       messages=[{"role": "user", "content": "Judge it"}])
    assert isinstance(parsed.parsed_output, Verdict)


# ---------------------------------------------------------------- refusals
def test_a_schema_that_cannot_be_held_is_a_400_naming_the_feature_in_every_api_before_any_queue(gw):
    before = answers_in(gw)
    with pytest.raises(openai.BadRequestError) as chat:
        gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                                        response_format={"type": "json_schema", "json_schema": {
                                            "name": "x", "schema": UNHOLDABLE}})
    assert chat.value.body["code"] == "unsupported_schema_feature"
    assert chat.value.body["param"] == "response_format.json_schema.schema.properties.xs"
    assert "uniqueItems" in chat.value.body["message"]
    with pytest.raises(openai.BadRequestError) as responses:
        gpt(gw).responses.create(model="gpt-5.5", input="x", text={"format": {
            "type": "json_schema", "name": "x", "schema": UNHOLDABLE}})
    assert responses.value.body["param"] == "text.format.schema.properties.xs"
    with pytest.raises(anthropic.BadRequestError) as messages:
        claude(gw).messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                                   output_config={"format": {"type": "json_schema", "schema": UNHOLDABLE}})
    assert "uniqueItems" in str(messages.value)
    with pytest.raises(anthropic.BadRequestError) as tool:
        claude(gw).messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                                   tools=[{"name": "f", "strict": True, "input_schema": UNHOLDABLE}])
    assert "tools.0.input_schema.properties.xs: uniqueItems" in str(tool.value)
    assert answers_in(gw) == before, "nothing reached a model"


# ---------------------------------------------------------------- libraries in venvs of their own
INSTRUCTOR = """
import instructor, openai, pydantic, sys
from typing import Literal
class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=12)
    priority: Literal["low", "medium", "high"]
client = instructor.from_openai(openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2]), mode=instructor.Mode.JSON_SCHEMA)
ticket = client.chat.completions.create(model="gpt-4o", max_tokens=200, response_model=Ticket, max_retries=0,
                                        messages=[{"role": "user", "content": "File a ticket"}])
print(type(ticket).__name__, ticket.model_dump_json())
"""
PYDANTIC_AI = """
import sys
from typing import Literal
import pydantic
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=12)
    priority: Literal["low", "medium", "high"]
model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=sys.argv[1], api_key=sys.argv[2]))
agent = Agent(model, output_type=NativeOutput(Ticket), retries=0)  # response_format json_schema
result = agent.run_sync("File a ticket", model_settings={"max_tokens": 300})
print(type(result.output).__name__, result.output.model_dump_json())
"""


@pytest.mark.parametrize("packages, script", [(["instructor>=1.7"], INSTRUCTOR),
                                              (["pydantic-ai-slim[openai]>=1.0"], PYDANTIC_AI)],
                         ids=["instructor", "pydantic-ai"])
def test_a_structured_output_library_gets_a_validated_object(gw, packages, script):
    python = pypi_venv(packages)
    import subprocess

    ran = subprocess.run([str(python), "-c", textwrap.dedent(script), gw.url + "/v1", gw.api_key],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    name, dumped = ran.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "Ticket" and json.loads(dumped)["priority"] in ("low", "medium", "high")


# ---------------------------------------------------------------- fill-in-the-middle
def test_a_completion_with_a_suffix_fills_the_middle_on_the_autocomplete_model(gw):
    answer = gpt(gw).completions.create(model="autocomplete", prompt="def add(a, b):\n    ",
                                        suffix="\n\nprint(add(1, 2))\n", max_tokens=32)
    assert answer.choices[0].text == "return a + b"
    assert answer.choices[0].finish_reason == "stop"
    streamed = gpt(gw).completions.create(model="claude-haiku-4-5", prompt="def add(a, b):\n    ",
                                          suffix="\n", max_tokens=32, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == "return a + b"


def test_a_model_without_fim_tokens_is_a_400_naming_one_that_has_them(gw):
    with pytest.raises(openai.BadRequestError) as refused:
        gpt(gw).completions.create(model="tiny-a", prompt="def f():", suffix="\n", max_tokens=8)
    assert "fill-in-the-middle" in str(refused.value) and "coder" in str(refused.value)
    plain = httpx.post(gw.url + "/v1/completions", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60,
                       json={"model": "tiny-a", "prompt": "def f():", "max_tokens": 4})
    assert plain.status_code == 200, "without a suffix it is a plain completion"


# ---------------------------------------------------------------- one contract
@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"reasoning_effort": "extreme"}, "reasoning_effort"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/messages", {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
])
def test_a_field_that_cannot_be_honoured_is_a_400_that_names_it(gw, route, body, field):
    base = ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} if route != "/v1/completions"
            else {"prompt": "hi", "max_tokens": 4})
    answer = httpx.post(gw.url + route, json={"model": "tiny-a", **base, **body}, timeout=60,
                        headers={"Authorization": f"Bearer {gw.api_key}"})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith(f"{field}: "), message


def test_reasoning_effort_is_honoured(gw):
    thinking = gpt(gw).chat.completions.create(model="scripted", max_tokens=64, reasoning_effort="high",
                                               messages=[{"role": "user", "content": "hi"}])
    plain = gpt(gw).chat.completions.create(model="scripted", max_tokens=64, reasoning_effort="none",
                                            messages=[{"role": "user", "content": "hi"}])
    assert getattr(thinking.choices[0].message, "reasoning", None) and not getattr(plain.choices[0].message,
                                                                                 "reasoning", None)
