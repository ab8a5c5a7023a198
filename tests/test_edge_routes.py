"""The edge as a client meets it, in-process: each API's path answers in its own error shape,
the status page, its files and its login, the route table's rows, and LiteLLM's routes on an
open gateway. No daemon: the edge is called as the ASGI app it is, the wrapper's relay and
LiteLLM stand-ins that answer from memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from mlxgate.api_errors import ANTHROPIC, OLLAMA, OPENAI, RESPONSES, kind_for_status
from mlxgate.api_paths import api_of
from mlxgate.config import load_config
from mlxgate.errors import BackendError, Unavailable
from mlxgate.proxy import routes
from mlxgate.proxy.asgi import Request, json_reply
from mlxgate.proxy.edge import Edge
from mlxgate.proxy.ollama_edge import OllamaEdge
from mlxgate.proxy.relay_client import RelayClient
from mlxgate.relay_protocol import RELAY_PREFIX
from mlxgate.wrapper import apis

KEY = "gateway-key"
HERE = ("127.0.0.1", 50000)
ELSEWHERE = ("192.168.1.20", 50000)
STORED_ID = "resp_" + "0" * 48
CLOUD = {"model_list": [{"model_name": "claude-cloud", "litellm_params": {
    "model": "anthropic/claude-opus-4-8", "api_key": "os.environ/ANTHROPIC_API_KEY"}}]}


class FakeRelay:
    """The wrapper's relay as the edge uses it: the status, the models, stored responses, the metrics."""

    def __init__(self, up: bool = True):
        self.up = up
        self.stored: list[tuple[str, str]] = []

    async def get_json(self, path: str, timeout: float | None = None) -> dict:
        if not self.up:
            raise Unavailable("the wrapper at 127.0.0.1:9 did not answer (ClientConnectorError)")
        if path == "/status":
            return {"servers": {}, "memory": {}}
        return {"models": [{"name": "tiny-a"}], "servers": {}}

    async def get_bytes(self, path: str) -> bytes:
        return b"mlxgate_requests_total 0\n"

    async def post_bytes(self, path: str, data: bytes, timeout: float = 10.0) -> None:
        return None

    async def forward_stored(self, send, method: str, path: str) -> None:
        self.stored.append((method, path))
        await json_reply(send, 200, json.dumps({"id": STORED_ID, "object": "response"}).encode())

    async def close(self) -> None:
        return None


class FakeLiteLLM:
    """LiteLLM's own routes (`Cloud.forward_raw`): says which path reached it."""

    def __init__(self):
        self.paths: list[str] = []

    async def forward_raw(self, scope, receive, send) -> None:
        self.paths.append(scope["path"])
        await json_reply(send, 200, json.dumps({"litellm": scope["path"]}).encode())


def edge(tmp_path: Path, key: str | None = KEY, litellm: bool = False, relay: FakeRelay | None = None,
         **overrides) -> Edge:
    env = {"MLXGATE_HOME": str(tmp_path)} | ({"MLXGATE_API_KEY": key} if key else {})
    config = load_config(tmp_path / "none.yaml", env=env,
                         overrides={"default_model": "tiny-a", **({"litellm": CLOUD} if litellm else {}), **overrides})
    return Edge(config, relay=relay or FakeRelay(), cloud=FakeLiteLLM() if litellm else None)


class Client:
    """A client of one listener, from one address, keeping the cookies it is given."""

    def __init__(self, app, address=HERE, headers: dict | None = None):
        self.app, self.address, self.headers = app, address, headers or {}
        self.cookies = httpx.Cookies()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def call():
            transport = httpx.ASGITransport(app=self.app, client=self.address)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=self.headers,
                                         cookies=self.cookies) as http:
                response = await http.request(method, path, **kwargs)
                self.cookies.update(response.cookies)
                return response
        return asyncio.run(call())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)


def anthropic_error(response: httpx.Response) -> str:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]["type"]


def openai_error(response: httpx.Response) -> tuple[str, str | None]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["type"], body["error"]["code"]


def ollama_error(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body["error"], str), body
    return body["error"]


# ------------------------------------------------------------------ each API's error shape
def test_a_client_without_the_key_is_refused_in_its_own_apis_shape_and_recorded(tmp_path):
    gateway = edge(tmp_path)
    stranger = Client(gateway, ELSEWHERE)
    refused = stranger.post("/v1/messages", json={"model": "tiny-a"})
    assert refused.status_code == 401 and anthropic_error(refused) == "authentication_error"
    assert "x-api-key" in refused.json()["error"]["message"]
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v2/rerank"):
        refused = stranger.post(path, json={"model": "tiny-a"})
        assert refused.status_code == 401 and openai_error(refused) == ("authentication_error", "invalid_api_key")
    for path in ("/v1/models", "/metrics", f"/v1/responses/{STORED_ID}", "/anthropic/v1/nowhere"):
        refused = stranger.get(path)
        assert refused.status_code == 401, path
    assert anthropic_error(refused) == "authentication_error"  # /anthropic/...: Anthropic's
    recorded = [(r.api, r.route, r.status, r.error) for r in gateway.records.pending]
    assert recorded == [("anthropic", "anthropic_messages", 401, "authentication"),
                        ("openai", "chat_completions", 401, "authentication"),
                        ("openai", "responses", 401, "authentication"),
                        ("openai", "embeddings", 401, "authentication"),
                        ("openai", "rerank", 401, "authentication")], "only API requests are recorded"
    wrong = Client(gateway, HERE, {"x-api-key": "not-it"}).post("/v1/chat/completions", json={})
    assert wrong.status_code == 401, "this machine needs the key too"


def test_a_path_the_gateway_does_not_serve_is_a_404_in_its_apis_shape(tmp_path):
    client = Client(edge(tmp_path), ELSEWHERE, {"authorization": f"Bearer {KEY}"})
    missing = client.get("/v1/messages")  # GET: only POST is served there
    assert missing.status_code == 404 and anthropic_error(missing) == "not_found_error"
    missing = client.get("/v1/nowhere")
    assert missing.status_code == 404 and openai_error(missing) == ("invalid_request_error", "model_not_found")
    assert missing.json()["error"]["message"].startswith("no route GET /v1/nowhere here: mlxgate serves POST ")
    assert client.post("/").status_code == 404, "the status page is GET only"
    assert ollama_error(client.post("/api/chat", json={})).startswith("no route POST /api/chat here")


def test_a_body_over_the_limit_is_a_413_in_its_apis_shape_on_both_listeners(tmp_path):
    gateway = edge(tmp_path, max_body="1K")
    body = json.dumps({"model": "tiny-a", "prompt": "x" * 2000})
    client = Client(gateway, HERE, {"x-api-key": KEY})
    too_large = client.post("/v1/messages", content=body)
    assert too_large.status_code == 413 and anthropic_error(too_large) == "request_too_large"
    assert "over the limit of 1024" in too_large.json()["error"]["message"]
    too_large = client.post("/v1/completions", content=body)
    assert too_large.status_code == 413 and openai_error(too_large) == ("invalid_request_error", "request_too_large")
    ollama = Client(OllamaEdge(gateway), HERE)  # no key there: loopback only
    too_large = ollama.post("/api/chat", content=body)
    assert too_large.status_code == 413 and "over the limit" in ollama_error(too_large)
    too_large = ollama.post("/v1/chat/completions", content=body)
    assert too_large.status_code == 413 and openai_error(too_large)[1] == "request_too_large"
    refused = Client(OllamaEdge(gateway), ELSEWHERE).get("/api/tags")
    assert refused.status_code == 403 and "this machine only" in ollama_error(refused)


def test_the_ollama_listener_answers_from_its_table_and_records_as_the_main_port_does(tmp_path):
    gateway = edge(tmp_path, max_body="1K")
    ollama = Client(OllamaEdge(gateway), HERE)
    assert ollama.get("/").text == "Ollama is running" and ollama.request("HEAD", "/").content == b""
    assert ollama.get("/api/version").json() == {"version": "0.12.0"}
    assert ollama.get("/api/ps").json() == {"models": []}
    assert ollama.get("/v1/models").status_code == 200
    pull = ollama.post("/api/pull", json={"model": "qwen3"})
    assert pull.status_code == 400 and "mlxgate download qwen3" in ollama_error(pull)
    assert ollama.post("/api/blobs/sha256:00", content=b"").status_code == 400
    missing = ollama.get("/api/chat")  # POST only
    assert missing.status_code == 404 and ollama_error(missing) == (
        "no route GET /api/chat here: mlxgate serves Ollama's POST /api/chat, /api/generate, /api/embed, "
        "/api/embeddings, /api/show, /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses; "
        "GET /api/tags, /api/ps, /api/version, /v1/models; GET and HEAD /")
    too_large = json.dumps({"model": "tiny-a", "input": "x" * 2000})
    for path in ("/api/chat", "/v1/responses"):
        assert ollama.post(path, content=too_large).status_code == 413
    main = Client(gateway, HERE, {"x-api-key": KEY})
    assert main.post("/v1/responses", content=too_large).status_code == 413
    assert [(r.api, r.route, r.status) for r in gateway.records.pending] == [
        ("ollama", "ollama_chat", 413), ("openai", "responses", 413), ("openai", "responses", 413)], \
        "the Responses API is recorded as OpenAI's on either port"


# ------------------------------------------------------------------ the status page, its files, its login
def test_the_status_page_is_seen_here_and_asks_others_to_log_in_once(tmp_path):
    gateway = edge(tmp_path)
    here = Client(gateway, HERE).get("/")
    assert here.status_code == 200 and here.headers["content-type"] == "text/html; charset=utf-8"
    assert "href='/metrics'" in here.text and "LiteLLM UI" not in here.text
    browser = Client(gateway, ELSEWHERE)
    sent_away = browser.get("/")
    assert sent_away.status_code == 303 and sent_away.headers["location"] == "/login"
    form = browser.get("/login")
    assert form.status_code == 200 and 'name="key"' in form.text
    wrong = browser.post("/login", data={"key": "nope"})
    assert wrong.status_code == 401 and "That is not the gateway&#x27;s key." in wrong.text
    assert not browser.cookies
    logged_in = browser.post("/login", data={"key": KEY})
    assert logged_in.status_code == 303 and logged_in.headers["location"] == "/"
    assert "HttpOnly; SameSite=Strict; Path=/" in logged_in.headers["set-cookie"]
    assert "Secure" not in logged_in.headers["set-cookie"], "plain HTTP: the cookie could not come back"
    assert browser.get("/").status_code == 200, "the cookie holds the key"
    assert Client(gateway, ELSEWHERE, {"x-api-key": KEY}).get("/").status_code == 200, "or the key header"


def test_without_a_key_the_page_and_its_login_are_open_even_with_the_wrapper_down(tmp_path):
    gateway = edge(tmp_path, key=None, litellm=True, relay=FakeRelay(up=False))
    page = Client(gateway, ELSEWHERE).get("/")
    assert page.status_code == 200 and "href='/ui'>LiteLLM UI</a>" in page.text
    logged_in = Client(gateway, ELSEWHERE).post("/login", data={"key": "anything"})
    assert logged_in.status_code == 303 and logged_in.headers["location"] == "/"


def test_the_pages_files_are_served_without_a_key_and_cached(tmp_path):
    browser = Client(edge(tmp_path), ELSEWHERE)
    css = browser.get("/static/uPlot.min.css")
    assert css.status_code == 200 and css.headers["content-type"] == "text/css"
    assert css.headers["cache-control"] == "max-age=86400" and css.content
    assert browser.get("/static/uPlot.iife.min.js").headers["content-type"] == "application/javascript"
    missing = browser.get("/static/secret.txt")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no file 'secret.txt'"
    assert browser.post("/static/uPlot.min.css").status_code == 401, "GET only: else the key is asked for"


# ------------------------------------------------------------------ the route table
def found(gateway: Edge, method: str, path: str):
    request = Request({}, None, None, path, method, {})
    return gateway.table.find(request), request


def test_the_route_table_finds_exact_paths_then_patterns_then_its_last_row(tmp_path):
    gateway = edge(tmp_path)
    row, request = found(gateway, "POST", "/v1/messages/count_tokens")
    assert row.route is routes.COUNT_TOKENS and request.api == ANTHROPIC and row.keyed
    row, request = found(gateway, "POST", "/responses")
    assert row.route is routes.RESPONSES and request.api == RESPONSES
    row, request = found(gateway, "PUT", "/health/readiness")
    assert row.handler == gateway.healthy and not row.keyed, "any method"
    row, request = found(gateway, "DELETE", f"/v1/responses/{STORED_ID}/input_items")
    assert row.handler == gateway.stored and request.match.group(1) == f"/responses/{STORED_ID}/input_items"
    row, request = found(gateway, "GET", "/static/uPlot.min.css")
    assert row.handler == gateway.browser.static and not row.keyed and request.match.group(1) == "uPlot.min.css"
    for method, path in (("GET", "/v1/messages"), ("POST", f"/v1/responses/{STORED_ID}"), ("GET", "/static"),
                         ("GET", "/v1/responses/resp_short"), ("GET", "/key/generate")):
        row, request = found(gateway, method, path)
        assert row is gateway.table.last and request.route is None and request.match is None, (method, path)
    assert found(gateway, "GET", "/v1/messages")[1].api == ANTHROPIC, "the last row's API is the path's"


def test_the_gateway_answers_its_models_metrics_stored_responses_and_health_itself(tmp_path):
    relay = FakeRelay()
    client = Client(edge(tmp_path, relay=relay), ELSEWHERE, {"x-api-key": KEY})
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-a"]
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert metrics.text == "mlxgate_requests_total 0\n"
    assert client.get(f"/v1/responses/{STORED_ID}", params={"include": "x"}).json()["id"] == STORED_ID
    assert client.request("DELETE", f"/responses/{STORED_ID}").status_code == 200
    assert relay.stored == [("GET", f"/responses/{STORED_ID}?include=x"), ("DELETE", f"/responses/{STORED_ID}")]
    health = Client(edge(tmp_path, relay=relay), ELSEWHERE).get("/health/liveliness/")
    assert health.status_code == 200 and health.json() == {"status": "ok"}, "no key, trailing slash"
    down = Client(edge(tmp_path, relay=FakeRelay(up=False)), HERE, {"x-api-key": KEY}).get("/v1/models")
    assert down.status_code == 503 and openai_error(down)[1] == "service_unavailable"


# ------------------------------------------------------------------ LiteLLM's own routes
def test_an_open_gateway_hands_litellms_routes_to_it_without_asking_for_a_key(tmp_path):
    """No key configured: a path outside the table goes to LiteLLM (it used to crash comparing to no key)."""
    gateway = edge(tmp_path, key=None, litellm=True)
    answer = Client(gateway, ELSEWHERE).get("/key/generate")
    assert answer.status_code == 200 and answer.json() == {"litellm": "/key/generate"}
    assert Client(gateway, ELSEWHERE, {"x-api-key": "whatever"}).get("/ui").json() == {"litellm": "/ui"}


def test_litellms_routes_need_the_gateways_own_key_when_there_is_one(tmp_path):
    gateway = edge(tmp_path, litellm=True)
    refused = Client(gateway, ELSEWHERE).get("/key/generate")
    assert refused.status_code == 401 and openai_error(refused)[0] == "authentication_error"
    assert Client(gateway, ELSEWHERE, {"x-api-key": KEY}).get("/key/generate").status_code == 200
    assert gateway.cloud.paths == ["/key/generate"]


# ------------------------------------------------------------------ the one table from a path to its API
@pytest.mark.parametrize("path, api", [
    ("/v1/messages", ANTHROPIC), ("/v1/messages/count_tokens", ANTHROPIC), ("/messages", ANTHROPIC),
    ("/anthropic/v1/messages", ANTHROPIC), ("/v1/chat/completions", OPENAI), ("/v1/responses", RESPONSES),
    ("/v1/responses/input_tokens", OPENAI), (f"/v1/responses/{STORED_ID}", OPENAI), ("/api/chat", OLLAMA),
    ("/relay/v1/messages", ANTHROPIC), ("/relay/v1/ollama/chat", OLLAMA), ("/relay/v1/chat/completions", OPENAI),
    ("/models/load", OPENAI), ("/", OPENAI),
])
def test_each_path_has_one_api(path, api):
    assert api_of(path) == api


def test_the_relays_routes_take_the_api_their_factories_answer_in_from_the_path_table():
    assert {path: row.api for path, row in apis.ROWS.items()} == {
        "/v1/messages": ANTHROPIC, "/v1/messages/count_tokens": ANTHROPIC, "/v1/chat/completions": OPENAI,
        "/v1/completions": OPENAI, "/v1/responses": RESPONSES, "/v1/responses/input_tokens": OPENAI,
        "/v1/embeddings": OPENAI, "/v1/rerank": OPENAI, "/v1/ollama/chat": OLLAMA, "/v1/ollama/generate": OLLAMA,
        "/v1/ollama/embed": OLLAMA, "/v1/ollama/embeddings": OLLAMA, "/v1/ollama/show": OLLAMA}


def test_a_status_from_elsewhere_is_the_first_kind_of_that_status():
    assert [kind_for_status(s) for s in (400, 401, 404, 405, 413, 418, 500, 502, 503, 529, 599)] == [
        "invalid_request", "authentication", "not_found", "invalid_request", "request_too_large",
        "invalid_request", "api_error", "backend_error", "overloaded", "overloaded", "api_error"]


# ------------------------------------------------------------------ the relay's answer, passed on
def cut_short(head: bytes, sent: bytes):
    """A relay stand-in on a TCP port that answers `head` and `sent`, then closes mid-body."""
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + sent)
        await writer.drain()
        writer.close()
    return asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_an_answer_the_relay_cuts_short_is_never_passed_on_as_if_whole(content_type):
    async def call():
        server = await cut_short(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: 500\r\n"
                                 f"\r\n".encode(), b'{"id": "chatcmpl-1", "choi')
        client = RelayClient(base=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", key=None)
        sent: list[dict] = []

        async def send(message):
            sent.append(message)
        try:
            response = await client.open("/v1/chat/completions", "tiny-a", {"model": "tiny-a"})
            try:
                return await client.pipe(response, send, OPENAI), sent
            except BackendError as exc:
                return exc, sent
        finally:
            await client.close()
            server.close()
    outcome, sent = asyncio.run(call())
    if content_type == "application/json":  # nothing sent: the edge answers the error in the API's shape
        assert isinstance(outcome, BackendError) and "before its answer was complete" in str(outcome) and sent == []
    else:  # the stream already began: it ends with the API's error event
        assert outcome is False and sent[0]["status"] == 200
        assert b"closed the stream before the answer was complete" in b"".join(m.get("body", b"") for m in sent)


def test_a_place_that_cuts_its_json_answer_short_hands_the_request_to_the_next(tmp_path):
    from types import SimpleNamespace

    from mlxgate.hosts.view import HostView
    from mlxgate.proxy.hosts import HostRouting

    whole = json.dumps({"id": "chatcmpl-2", "choices": []}).encode()

    class Chooser:
        failed_at: list[str] = []

        async def choose(self, model, conversation):
            return ["local", "second"]

        async def served(self, name, model, conversation):
            return None

        def failed(self, name, exc):
            self.failed_at.append(name)

    async def call():
        broken = await cut_short(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
                                 b'{"id": "chatcmpl-1"')
        good = await cut_short(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                               + str(len(whole)).encode() + b"\r\n\r\n", whole)
        port = lambda server: server.sockets[0].getsockname()[1]  # noqa: E731
        config = load_config(tmp_path / "none.yaml", env={"MLXGATE_HOME": str(tmp_path)},
                             overrides={"default_model": "tiny-a"})
        routing = HostRouting(config, RelayClient(base=f"http://127.0.0.1:{port(broken)}", key=None), Chooser())
        routing.views["second"] = HostView("second", f"http://127.0.0.1:{port(good)}")
        routing.clients["second"] = RelayClient(base=f"http://127.0.0.1:{port(good)}", key=None, what="host second")
        routing._first_poll = asyncio.get_running_loop().create_future()
        routing._first_poll.set_result(None)  # no polling: the places are as set here
        sent: list[dict] = []

        async def send(message):
            sent.append(message)
        try:
            done = await routing.forward(send, OPENAI, SimpleNamespace(model="tiny-a"), "chat_completions",
                                         "/v1/chat/completions", {"model": "tiny-a", "messages": []})
        finally:
            for client in routing.clients.values():
                await client.close()
            broken.close()
            good.close()
        return done, sent, routing
    done, sent, routing = asyncio.run(call())
    assert done is True and b"".join(m.get("body", b"") for m in sent) == whole
    assert Chooser.failed_at == ["local"] and not routing.views["local"].reachable
