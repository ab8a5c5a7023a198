"""Structured output: schema refusals (no model), then real `mlx_lm.server` processes started the way
`mlx_lm_entry.main` starts them, with the constraints patch applied right after `batch_loop`.

The models are `mlxgate demo-model` ones: the random-weight one never writes JSON by itself, and
the scripted one writes its one tool call (`{"city": "Paris"}`) unless a grammar says otherwise,
so every valid answer below is the grammar's doing.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import requests

from mlxgate.constraints import schemas
from mlxgate.constraints.schemas import ConstraintError, InvalidSchema, UnsupportedSchema
from mlxgate.errors import RequestRejected
from support import ROOT, mlxgate, wait_for

SECRET = "constraints-test-secret"
PORTS = range(12900, 13000)
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER

# Every string and array bounded, so a random walk through the grammar ends within max_tokens.
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "status": {"enum": ["active", "suspended", "deleted"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "day": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["name", "status", "age", "ok", "day", "tags", "address", "note"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}  # not strict: any JSON object


def schema_format(schema: dict = BOUNDED) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}


# ---------------------------------------------------------------- refusals, no model
REFUSED = [
    ("uniqueItems", {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
     ".properties.tags"),
    ("contains", {"type": "array", "contains": {"type": "string"}}, ""),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, ""),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, ""),
    ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, ""),
    ("not", {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, ".properties.x"),
    ("if, then, else", {"if": {"type": "integer"}, "then": {"minimum": 1}, "else": {"type": "string"}}, ""),
    ("oneOf", {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
     ".properties.n"),
    ("format: phone", {"type": "string", "format": "phone"}, ""),
    ("$ref: https://example.com/s.json", {"$ref": "https://example.com/s.json"}, ""),
    ("pattern (look-around)", {"type": "string", "pattern": "^(?=a)a+$"}, ""),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}, ""),
]


@pytest.mark.parametrize("feature, schema, inside", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_schema_that_cannot_be_held_is_refused_naming_the_feature_and_where(feature, schema, inside):
    with pytest.raises(UnsupportedSchema) as refused:
        schemas.check(schema, schemas.RESPONSE_SCHEMA)
    assert refused.value.feature == feature
    assert refused.value.where == schemas.RESPONSE_SCHEMA + inside
    assert str(refused.value).startswith(f"{schemas.RESPONSE_SCHEMA + inside}: {feature} cannot be enforced")
    assert "Fix: " in str(refused.value)
    assert refused.value.code == "unsupported_schema_feature"


@pytest.mark.parametrize("schema, where, says", [
    ({"type": 5}, ".type", "not a valid JSON Schema"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, ".properties.a", "which the schema does not have"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "", "no value can match it"),
    (False, "", "matches no value"),
    ([1, 2], "", "a JSON Schema is an object or a boolean"),
])
def test_what_is_not_a_schema_is_invalid(schema, where, says):
    with pytest.raises(InvalidSchema) as refused:
        schemas.check(schema, "tools[0].function.parameters")
    assert refused.value.where == "tools[0].function.parameters" + where
    assert says in str(refused.value)
    assert refused.value.code == "invalid_schema"


def test_refusals_are_value_errors_the_gateway_answers_with_400():
    with pytest.raises(ValueError) as refused:
        schemas.check({"type": "array", "uniqueItems": True}, "x")
    assert isinstance(refused.value, RequestRejected) and refused.value.status == 400


def test_a_pydantic_schema_with_defs_refs_and_any_of_passes():
    pydantic = pytest.importorskip("pydantic")
    from typing import List, Literal, Optional, Union

    class User(pydantic.BaseModel):
        login: str
        email: Optional[str] = None

    class Comment(pydantic.BaseModel):
        author: User
        body: str
        reactions: int = pydantic.Field(ge=0)

    class Issue(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=80)
        priority: Literal["low", "medium", "high"] = "medium"
        assignee: Optional[User] = None
        comments: List[Comment]
        estimate: Union[int, float, None] = None
        due: Optional[datetime.date] = None
        opened: datetime.datetime

    schema = Issue.model_json_schema()
    assert "$defs" in schema and "anyOf" in json.dumps(schema) and "$ref" in json.dumps(schema)
    schemas.check(schema, schemas.RESPONSE_SCHEMA)
    schemas.check_request({"response_format": schema_format(schema),
                           "tools": [{"type": "function", "function": {"name": "file_issue", "strict": True,
                                                                       "parameters": schema}}]})


def test_check_request_checks_what_the_answer_is_held_to_and_says_where():
    bad = {"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}
    tools = [WEATHER, CLOCK, {"type": "function", "function": {"name": "f", "strict": True, "parameters": bad}}]
    with pytest.raises(UnsupportedSchema) as refused:
        schemas.check_request({"tools": tools, "tool_choice": "auto"})
    assert refused.value.param == "tools[2].function.parameters.properties.xs"
    loose = [{"type": "function", "function": {"name": "f", "parameters": bad}}]  # not strict: not held
    schemas.check_request({"tools": loose, "tool_choice": "required"})
    schemas.check_request({"tools": tools, "tool_choice": "none", "response_format": {"type": "json_object"}})
    with pytest.raises(InvalidSchema, match="response_format.json_schema.schema: Field required"):
        schemas.check_request({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    with pytest.raises(ConstraintError, match="tool_choice: names \"nope\""):
        schemas.check_request({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert schemas.requested({"tools": loose}) is None  # auto without a strict tool: nothing held, nothing paid


def test_date_formats_are_held_to_dates_python_accepts():
    """llguidance's own `date` lets Feb 29 of every year and year 0000 through; our pattern allows
    exactly the dates `datetime.date` accepts."""
    import re

    date = re.compile(schemas.DATE_PATTERNS["date"])
    years = [*range(0, 12), *range(396, 404), *range(1896, 1905), *range(1996, 2005), *range(2096, 2104), 9999]
    for year in years:
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    datetime.date.fromisoformat(text)
                    valid = True
                except ValueError:
                    valid = False
                assert bool(date.fullmatch(text)) == valid, text
    moment = re.compile(schemas.DATE_PATTERNS["date-time"])
    assert moment.fullmatch("2024-02-29T23:59:59.5+01:00") and not moment.fullmatch("2023-02-29T00:00:00Z")
    assert not moment.fullmatch("2024-01-01T23:59:60Z") and not moment.fullmatch("2024-01-01t00:00:00z")


# ---------------------------------------------------------------- real model servers
def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {PORTS}")


# mlx_lm_entry.main, with the constraints patch applied right after batch_loop.apply (where main is to call it)
LAUNCHER = """
from mlxgate.constraints import serve
from mlxgate.wrapper import batch_loop, mlx_lm_entry

apply = batch_loop.apply


def apply_then_constraints(server, *args, **kwargs):
    applied = apply(server, *args, **kwargs)
    serve.install(server)
    return applied


batch_loop.apply = apply_then_constraints
mlx_lm_entry.main()
"""


class ModelServer:
    """One model server process, answering requests that carry the secret."""

    def __init__(self, model: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER, "--model", str(model), "--host",
                                         "127.0.0.1", "--port", str(self.port)],
                                        stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.process.stdin.write(f"{SECRET}\n".encode())
        self.process.stdin.flush()
        wait_for(self._answers, 60, interval=0.3, what=f"the model server on port {self.port}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the model server exited:\n{self.log_path.read_text()}")
        try:
            return self.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
        except requests.ConnectionError:
            return False

    def post(self, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url, json=body, headers={"Authorization": f"Bearer {SECRET}"}, timeout=120,
                             **kwargs)

    def chat(self, body: dict) -> tuple[dict, str | None]:
        """(the message as one object, finish_reason); a streamed answer is put together from its deltas."""
        body = {"messages": [{"role": "user", "content": "Answer in JSON"}], "max_tokens": 400,
                "temperature": 1.0, **body}
        response = self.post(body, stream=bool(body.get("stream")))
        assert response.status_code == 200, response.text
        if not body.get("stream"):
            choice = response.json()["choices"][0]
            return choice["message"], choice["finish_reason"]
        message, finish, calls = {"content": ""}, None, []
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                message["content"] += choice["delta"].get("content") or ""
                calls += choice["delta"].get("tool_calls") or []
                finish = choice.get("finish_reason") or finish
        if calls:
            message["tool_calls"] = calls
        return message, finish

    def stop(self) -> None:
        self.process.stdin.close()  # the parent's pipe closes: the server exits at once
        self.process.wait(20)
        self._log.close()


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("constraint-models")
    mlxgate("demo-model", str(models / "tiny"), env=dict(os.environ), check=True)
    mlxgate("demo-model", str(models / "scripted"), "--scripted", env=dict(os.environ), check=True)
    return models


@pytest.fixture(scope="module")
def tiny(demo_models):
    server = ModelServer(demo_models / "tiny", demo_models / "tiny.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scripted(demo_models):
    server = ModelServer(demo_models / "scripted", demo_models / "scripted.log")
    yield server
    server.stop()


def assert_valid(text: str, schema: dict = BOUNDED) -> dict:
    answer = json.loads(text)
    jsonschema.validate(answer, schema, format_checker=FORMATS)
    return answer


def test_schema_answers_in_a_batch_streamed_or_not_are_all_valid(tiny):
    bodies = [{"response_format": schema_format(), "stream": i % 2 == 1} for i in range(20)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(tiny.chat, bodies))
    for message, finish in answers:
        assert finish == "stop"
        assert_valid(message["content"])
    assert len({m["content"] for m, _ in answers}) > 10  # sampled, not one answer repeated


def test_schema_answers_served_one_at_a_time_are_all_valid(tiny):
    """A `seed` makes mlx_lm.server serve a request alone, on its sequential path."""
    answers = [tiny.chat({"response_format": schema_format(), "seed": i}) for i in range(20)]
    for message, finish in answers:
        assert finish == "stop"
        assert_valid(message["content"])
    assert tiny.chat({"response_format": schema_format(), "seed": 0}) == answers[0]


def test_json_object_answers_are_json_objects(tiny):
    for i in range(4):
        message, finish = tiny.chat({"response_format": {"type": "json_object"}, "max_tokens": 300,
                                     "stream": i % 2 == 1})
        assert finish == "stop"
        assert isinstance(json.loads(message["content"]), dict)


def test_an_unsupported_schema_is_refused_with_400_before_anything_is_queued(tiny):
    # a seeded request keeps the generation thread busy on the sequential path: a refusal that
    # had been queued could only be answered after it
    long = tiny.post({"messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "seed": 1,
                      "stream": True}, stream=True)
    lines = long.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    finished = []
    reader = threading.Thread(target=lambda: finished.append(([x for x in lines if x][-1], time.monotonic())))
    reader.start()
    refused = tiny.post({"messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
                         "response_format": schema_format({"type": "array", "uniqueItems": True})})
    refused_at = time.monotonic()
    reader.join()
    assert finished[0][0] == b"data: [DONE]" and refused_at < finished[0][1]
    assert refused.status_code == 400
    assert refused.json() == {"error": {
        "message": "response_format.json_schema.schema: uniqueItems cannot be enforced while the model writes "
                   "(Unimplemented keys: [\"uniqueItems\"]). Fix: remove it, and drop duplicates from the answer.",
        "type": "invalid_request_error", "code": "unsupported_schema_feature",
        "param": "response_format.json_schema.schema"}}
    invalid = tiny.post({"messages": [{"role": "user", "content": "x"}], "response_format": schema_format({"type": 5})})
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "invalid_schema"
    message, _ = tiny.chat({"response_format": schema_format()})  # the server goes on
    assert_valid(message["content"])


def test_an_unconstrained_request_beside_constrained_ones_gets_the_answer_it_gets_alone(tiny):
    plain = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 60, "temperature": 0}
    alone = tiny.post(plain).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(5) as pool:
        held = [pool.submit(tiny.chat, {"response_format": schema_format()}) for _ in range(4)]
        time.sleep(0.05)  # the constrained rows are generating when the plain one joins the batch
        beside = pool.submit(tiny.post, plain)
        for future in held:
            assert_valid(future.result()[0]["content"])
        assert beside.result().json()["choices"][0]["message"]["content"] == alone


def tool_calls(message: dict) -> list[tuple[str, dict]]:
    calls = message.get("tool_calls") or []
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("choice, stream", [("required", False), ("required", True), ("auto", False)])
def test_a_strict_tool_is_called_with_arguments_its_schema_accepts(scripted, choice, stream):
    for i in range(3):
        message, finish = scripted.chat({"tools": [WEATHER], "tool_choice": choice, "stream": stream,
                                         "messages": [{"role": "user", "content": f"Weather {i}?"}]})
        calls = tool_calls(message)
        assert finish == "tool_calls" and calls, message
        for name, arguments in calls:
            assert name == "get_weather"
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])


def test_a_named_tool_choice_calls_that_tool_and_loose_tools_are_left_alone(scripted):
    message, finish = scripted.chat({"tools": [WEATHER, CLOCK], "parallel_tool_calls": False,
                                     "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    [(name, arguments)] = tool_calls(message)
    assert finish == "tool_calls" and name == "get_time" and isinstance(arguments, dict)
    # no strict tool, tool_choice auto: nothing is held, and the scripted model writes its own call
    loose = {"type": "function", "function": CLOCK["function"] | {"name": "get_weather"}}
    message, _ = scripted.chat({"tools": [loose]})
    assert tool_calls(message) == [("get_weather", {"city": "Paris"})]


def test_a_strict_tool_whose_schema_cannot_be_held_is_refused(scripted):
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}
    refused = scripted.post({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools[0].function.parameters.properties.xs"
