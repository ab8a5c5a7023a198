"""Ollama's API on its own port, as apps written for Ollama meet it: the official `ollama` Python
client (streamed and not, a tool call and its result, generate with a suffix, a JSON schema,
embeddings, list, show, ps, keep_alive), the official JavaScript client under node, and
LangChain's ChatOllama. No key is sent (Ollama clients send none) and none is needed there;
errors come in Ollama's shape, `{"error": "..."}`, and what the gateway does not do (pulling,
Ollama's model store, mirostat) is refused naming what to do instead; `images` that are not
images are refused by name (images themselves: tests/test_vision.py).

One daemon for the module (HTTP only, Ollama's API on a free port): default model tiny-a
(pinned), the scripted model (fixed answers, a real get_weather tool call), `coder` (scripted,
with Qwen2.5-Coder's fill-in-the-middle tokens: its middle is `return a + b`) and a tiny BERT
embedding model `minilm`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import jsonschema
import ollama
import psutil
import pytest

from mlxgate.config import load_config
from mlxgate.errors import ConfigError, MlxgateError
from support import Gateway, free_port, gpt, mlxgate, wait_for

PLAIN = "Hello from mlxgate. How can I help?"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["admin", "user"]}}}


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("ollama-models")
    for name in ("tiny-a", "scripted"):
        shutil.copytree(models_dir / name, models / name)
    env = dict(os.environ)
    mlxgate("demo-model", str(models / "coder"), "--scripted", "--fim", env=env, check=True)
    mlxgate("demo-model", str(models / "minilm"), "--kind", "embedding", env=env, check=True)
    running = Gateway(tmp_path_factory.mktemp("ollama-home"), models, "--default-model", "tiny-a", https=False,
                      max_tokens=256)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(gw) -> ollama.Client:
    return ollama.Client(host=gw.ollama_url)


def loaded(client: ollama.Client) -> list[str]:
    return sorted(m.model for m in client.ps().models)


# ------------------------------------------------------------------ where Ollama is
def test_clients_find_it_where_ollama_is_on_loopback_and_without_a_key(gw):
    assert httpx.get(gw.ollama_url + "/").text == "Ollama is running"
    assert httpx.head(gw.ollama_url + "/").status_code == 200
    assert httpx.get(gw.ollama_url + "/api/version").json()["version"]
    listening = [c.laddr for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == gw.ollama_port]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)
    # the gateway's own port still wants its key
    assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "tiny-a", "messages": []}).status_code == 401
    status = mlxgate("status", env=gw.env).stdout
    assert any(line.split()[:3] == ["ollama", "endpoint", "OK"] and str(gw.ollama_port) in line
               for line in status.splitlines()), status


def test_the_ollama_port_serves_openais_routes_too_as_ollama_does(gw):
    """Ollama's own server answers OpenAI's routes under /v1 on its port, without a key; clients
    such as Continue's `ollama` provider call them there."""
    import openai

    local = openai.OpenAI(base_url=gw.ollama_url + "/v1", api_key="ollama", max_retries=0)
    answer = local.chat.completions.create(model="tiny-a", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert answer.usage.completion_tokens == 3
    assert "tiny-a" in {m.id for m in local.models.list().data}
    assert httpx.post(gw.ollama_url + "/v1/messages", json={}).status_code == 404, "only what Ollama serves"


def test_list_show_and_ps_describe_the_local_models(client):
    listed = {m.model: m for m in client.list().models}
    assert {"tiny-a:latest", "scripted:latest", "coder:latest", "minilm:latest"} <= set(listed)
    tiny = listed["tiny-a:latest"]
    assert len(tiny.digest) == 64 and tiny.size > 0 and tiny.details.family == "qwen2"
    assert tiny.details.parameter_size and tiny.modified_at is not None

    coder = client.show("coder")
    assert {"completion", "tools", "insert"} <= set(coder.capabilities)
    assert coder.modelinfo["qwen2.context_length"] == 2048
    assert client.show("minilm:latest").capabilities == ["embedding"]
    assert "insert" not in client.show("tiny-a").capabilities

    running = {m.model: m for m in client.ps().models}
    assert "tiny-a:latest" in running  # the default model, loaded at start and pinned: it never expires
    assert running["tiny-a:latest"].expires_at.year > 2100 and running["tiny-a:latest"].size > 0


# ------------------------------------------------------------------ chat
def test_chat_whole_and_streamed_ends_with_done_and_the_counts(gw, client):
    whole = client.chat(model="scripted", messages=[{"role": "user", "content": "hi"}], stream=False, think=False)
    assert whole.message.role == "assistant" and whole.message.content == PLAIN
    assert whole.done is True and whole.done_reason == "stop"
    assert whole.prompt_eval_count > 0 and whole.eval_count > 0
    assert whole.total_duration >= whole.eval_duration > 0 and whole.load_duration >= 0

    parts = list(client.chat(model="scripted", messages=[{"role": "user", "content": "hi"}], think=False,
                             stream=True))
    assert "".join(p.message.content for p in parts) == PLAIN
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == whole.eval_count

    # streaming is the default, one JSON object a line
    with httpx.stream("POST", gw.ollama_url + "/api/chat", timeout=60, json={
            "model": "scripted", "messages": [{"role": "user", "content": "hi"}], "think": False}) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and {"created_at", "model", "message"} <= set(lines[0])


def test_a_cut_answer_says_length(client):
    answer = client.chat(model="tiny-a", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5})
    assert answer.done_reason == "length" and answer.eval_count == 5


def test_a_tool_call_and_its_result_in_ollamas_shape(client):
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat(model="scripted", messages=asked, tools=[WEATHER_TOOL])
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    answered = asked + [first.message, {"role": "tool", "content": "sunny, 24 C", "tool_name": "get_weather"}]
    second = client.chat(model="scripted", messages=answered, tools=[WEATHER_TOOL])
    assert second.message.content == "It is sunny in Paris!"


def test_format_holds_the_answer_to_a_json_schema(client):
    answer = client.chat(model="tiny-a", messages=[{"role": "user", "content": "a person"}], format=PERSON)
    jsonschema.validate(json.loads(answer.message.content), PERSON)  # the random-weight model's, held by the grammar
    streamed = "".join(p.response for p in client.generate(model="tiny-a", prompt="a person", format=PERSON,
                                                           stream=True))
    jsonschema.validate(json.loads(streamed), PERSON)


# ------------------------------------------------------------------ generate
def test_generate_with_a_suffix_fills_in_the_middle(client):
    answer = client.generate(model="coder", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n")
    assert answer.response == "return a + b" and answer.done
    streamed = "".join(p.response for p in client.generate(model="coder", prompt="def add(a, b):\n    ",
                                                           suffix="\n", stream=True))
    assert streamed == "return a + b"
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="tiny-a", prompt="def f(", suffix=")")
    assert refused.value.status_code == 400 and "fill-in-the-middle" in refused.value.error


def test_generate_uses_the_chat_template_unless_raw(client):
    assert client.generate(model="scripted", prompt="hi", think=False).response == PLAIN
    raw = client.generate(model="tiny-a", prompt="<|im_start|>user\nhi<|im_end|>\n", raw=True,
                          options={"num_predict": 4, "temperature": 0})
    assert raw.done and raw.eval_count == 4


# ------------------------------------------------------------------ embeddings
def test_embed_gives_the_models_vectors(gw, client):
    texts = ["The cat sat on the mat.", "def add(a, b): return a + b"]
    embedded = client.embed(model="minilm", input=texts)
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 64
    direct = [d.embedding for d in gpt(gw).embeddings.create(model="minilm", input=texts, encoding_format="float").data]
    assert max(abs(a - b) for row, other in zip(embedded.embeddings, direct) for a, b in zip(row, other)) < 1e-6
    assert embedded.prompt_eval_count > 0
    old = client.embeddings(model="minilm", prompt=texts[0]).embedding
    assert max(abs(a - b) for a, b in zip(old, embedded.embeddings[0])) < 1e-6
    refused = _refused(lambda: client.embed(model="minilm", input="x", dimensions=100_000))
    assert refused.status_code == 400 and "dimensions" in refused.error  # the model server's, in Ollama's shape


# ------------------------------------------------------------------ errors and refusals
def _refused(call) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as refused:
        call()
    return refused.value


def test_errors_come_in_ollamas_shape_with_the_right_status(gw, client):
    missing = _refused(lambda: client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}]))
    assert missing.status_code == 404 and "no-such-model" in missing.error
    streamed = _refused(lambda: list(client.chat(model="no-such-model:latest", stream=True,
                                                 messages=[{"role": "user", "content": "x"}])))
    assert streamed.status_code == 404
    raw = httpx.post(gw.ollama_url + "/api/chat", content=b"{not json")
    assert raw.status_code == 400 and set(raw.json()) == {"error"}

    def chat(**extra):
        return client.chat(model="tiny-a", messages=[{"role": "user", "content": "x"}], **extra)
    for refusal, named in ((lambda: chat(options={"mirostat": 2}), "options.mirostat"),
                           (lambda: chat(options={"num_ctx": 10 ** 6}), "options.num_ctx"),
                           (lambda: chat(options={"no_such_option": 1}), "options.no_such_option"),
                           (lambda: client.chat(model="tiny-a", messages=[
                               {"role": "user", "content": "x", "images": ["aGk="]}]), "images"),
                           (lambda: client.chat(model="minilm", messages=[{"role": "user", "content": "x"}]),
                            "embedding model"),
                           (lambda: client.embed(model="tiny-a", input="x"), "chat model")):
        error = _refused(refusal)
        assert error.status_code == 400 and named in error.error, error.error


def test_pull_and_ollamas_store_are_refused_saying_what_to_do(gw, client):
    pulled = _refused(lambda: client.pull("qwen2.5-coder:7b"))
    assert pulled.status_code == 400 and "`mlxgate download qwen2.5-coder:7b`" in pulled.error
    for call in (lambda: client.delete("tiny-a"), lambda: client.copy("tiny-a", "tiny-b"),
                 lambda: client.push("tiny-a"), lambda: client.create("mine", from_="tiny-a")):
        error = _refused(call)
        assert error.status_code == 400 and "not served here" in error.error
    assert "tiny-a:latest" in loaded(client)  # and nothing happened to it


def test_keep_alive_zero_unloads_the_model_and_an_empty_prompt_loads_it(gw, client):
    client.chat(model="scripted", messages=[{"role": "user", "content": "hi"}], keep_alive=0)
    wait_for(lambda: "scripted:latest" not in loaded(client), 30, what="scripted to unload after keep_alive 0")

    load = client.generate(model="scripted")  # Ollama's way to load a model
    assert load.done_reason == "load" and "scripted:latest" in loaded(client)
    (entry,) = [m for m in client.ps().models if m.model == "scripted:latest"]
    left = entry.expires_at.timestamp() - time.time()
    assert 25 * 60 < left <= 30 * 60 + 5, "a request without keep_alive has the configured one (30m)"

    client.generate(model="scripted", keep_alive="1h")
    (entry,) = [m for m in client.ps().models if m.model == "scripted:latest"]
    assert entry.expires_at.timestamp() - time.time() > 55 * 60

    unload = client.generate(model="scripted", keep_alive=0)  # and Ollama's way to unload it
    assert unload.done_reason == "unload"
    wait_for(lambda: "scripted:latest" not in loaded(client), 30, what="scripted to unload")

    pinned = _refused(lambda: client.generate(model="tiny-a", keep_alive=0))
    assert pinned.status_code == 400 and "pinned" in pinned.error
    assert "tiny-a:latest" in loaded(client)


# ------------------------------------------------------------------ other clients
JS_SESSION = """
import { Ollama } from 'ollama'
const client = new Ollama({ host: process.env.OLLAMA_HOST })
const whole = await client.chat({ model: 'scripted', messages: [{ role: 'user', content: 'hi' }], think: false })
let streamed = '', last = null
for await (const part of await client.chat({ model: 'scripted', messages: [{ role: 'user', content: 'hi' }],
                                             think: false, stream: true })) {
  streamed += part.message.content
  last = part
}
const tools = await client.chat({ model: 'scripted', messages: [{ role: 'user', content: 'weather?' }],
                                  tools: [%s] })
const fim = await client.generate({ model: 'coder', prompt: 'def add(a, b):\\n    ', suffix: '\\n' })
const listed = await client.list()
let missing = null
try { await client.chat({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }) }
catch (error) { missing = { status: error.status_code, error: error.error } }
console.log(JSON.stringify({ whole: whole.message.content, streamed, done: last.done, reason: last.done_reason,
  call: tools.message.tool_calls[0].function, fim: fim.response, names: listed.models.map(m => m.name), missing }))
""" % json.dumps(WEATHER_TOOL)


def test_the_official_javascript_client(gw, tmp_path_factory):
    npm = shutil.which("npm")
    node = shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are needed for the Ollama JavaScript client (npm install ollama)")
    folder = tmp_path_factory.mktemp("ollama-js")
    result = subprocess.run([npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "ollama@0.6"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"npm could not install the ollama package: {result.stderr[-500:]}")
    (folder / "session.mjs").write_text(JS_SESSION)
    ran = subprocess.run([node, "session.mjs"], cwd=folder, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OLLAMA_HOST=gw.ollama_url))
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["whole"] == seen["streamed"] == PLAIN and seen["done"] is True and seen["reason"] == "stop"
    assert seen["call"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
    assert seen["fim"] == "return a + b" and "coder:latest" in seen["names"]
    assert seen["missing"]["status"] == 404 and "no-such-model" in seen["missing"]["error"]


def test_langchain_chat_ollama(gw):
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model="scripted", base_url=gw.ollama_url, reasoning=False)
    assert chat.invoke("hi").content == PLAIN
    assert "".join(chunk.content for chunk in chat.stream("hi")) == PLAIN
    with_tools = chat.bind_tools([WEATHER_TOOL])
    asked = with_tools.invoke("What is the weather in Paris?")
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    answer = with_tools.invoke(["What is the weather in Paris?", asked,
                                {"role": "tool", "content": "sunny", "tool_call_id": call["id"]}])
    assert answer.content == "It is sunny in Paris!"


# ------------------------------------------------------------------ the setting
def test_the_ollama_port_is_a_setting_that_can_be_turned_off(tmp_path):
    config_file = tmp_path / "gateway.yaml"
    assert load_config(config_file, env={}).ollama_port == 11434
    assert load_config(config_file, env={}).listen_port != 11434, "the hosts' listener moved off Ollama's port"
    assert load_config(config_file, env={"MLXGATE_OLLAMA_PORT": "0"}).ollama_port == 0
    config_file.write_text("ollama_port: eleven\n")
    with pytest.raises(ConfigError) as bad:
        load_config(config_file, env={})
    assert str(bad.value).startswith(f"{config_file}: ollama_port:") and "Fix: set it like `ollama_port:" in str(bad.value)
    config_file.write_text("ollama_port: 11432\n")  # the HTTP proxy's port
    with pytest.raises(ConfigError, match="must all differ"):
        load_config(config_file, env={})


def test_a_port_held_by_ollama_itself_fails_the_start_saying_how_to_turn_it_off(tmp_path):
    from mlxgate.supervision.preflight import check_ports as _check_ports

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = load_config(tmp_path / "gateway.yaml", env={
            "MLXGATE_OLLAMA_PORT": str(port), "MLXGATE_PORT": str(free_port()),
            "MLX_WRAPPER_URL": f"http://127.0.0.1:{free_port()}", "MLX_DYNAMIC_PORT": str(free_port()),
            "MLX_AUTOCOMPLETE_PORT": str(free_port())})
        with pytest.raises(MlxgateError) as taken:
            _check_ports(config)
    assert f"port {port} (ollama_port)" in str(taken.value) and "ollama_port: 0" in str(taken.value)
