"""The Ollama listener: Ollama's API for apps written for it (`OLLAMA_HOST=127.0.0.1:11434`), on
`ollama_port`, bound to 127.0.0.1 and without a key, as Ollama itself serves it. The HTTP proxy
program serves it beside its own port (`server`), with the same edge.

- POST /api/chat, /api/generate, /api/embed, /api/embeddings and /api/show are API requests
  like any other (`Edge.answer`): the body read once, the hooks run once (routes
  `ollama_chat`, `ollama_generate`, `ollama_embed`, `ollama_show`), the relay's queue and
  records, errors from the one table in Ollama's shape ``{"error": "..."}``.
- GET /api/tags and /api/ps are the local models and the loaded ones, in Ollama's shape;
  GET /api/version a version; GET and HEAD / answer "Ollama is running" (clients probe it).
- As Ollama does, the same port serves the OpenAI-compatible routes under /v1 (chat completions,
  completions, embeddings, Responses, GET /v1/models), without a key too: clients such as
  Continue's `ollama` provider call them there.
- Ollama's model store is not the gateway's: pulls, pushes, creates, copies and deletes are
  refused with a 400 that says what to do instead (a pull: `mlxgate download NAME`).
"""

from __future__ import annotations

import json

from ..api_errors import OLLAMA
from ..api_paths import family_of
from ..errors import MlxgateError
from ..json_body import parse_object
from ..ollama import models as ollama_models
from . import route_table
from .asgi import Request, error, json_reply, reply
from .edge import Edge

HOST = "127.0.0.1"  # loopback only: there is no key to ask for
VERSION = "0.12.0"  # the Ollama API version whose routes and shapes are served here
RUNNING = b"Ollama is running"


class OllamaEdge:
    def __init__(self, edge: Edge):
        self.edge = edge
        self.table = route_table.ollama_table(self, edge)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # the lifespan is the main edge's (`server`)
            return None
        request = Request.of(scope, receive, send)
        if not request.loopback:
            return await error(send, OLLAMA, "permission", "Ollama's API is served to this machine only "
                               "(127.0.0.1, no key); from elsewhere use the gateway's own port with its key")
        return await self.table.find(request).handler(request)

    # ------------------------------------------------------------------ the route table's handlers
    async def ollama_request(self, request: Request) -> None:
        await self.edge.answer(request, OLLAMA)

    async def openai_request(self, request: Request) -> None:
        await self.edge.answer(request, family_of(request.api))

    async def models(self, request: Request) -> None:
        """GET /api/tags (the local models) and /api/ps (the loaded ones), in Ollama's shape."""
        try:
            listed = await self.edge.relay.get_json("/models")
        except MlxgateError as exc:
            return await error(request.send, OLLAMA, "unavailable", str(exc))
        answer = (ollama_models.tags(listed.get("models") or []) if request.path == "/api/tags"
                  else ollama_models.ps(listed.get("servers") or {}))
        await json_reply(request.send, 200, json.dumps(answer).encode())

    async def version(self, request: Request) -> None:
        await json_reply(request.send, 200, json.dumps({"version": VERSION}).encode())

    async def running(self, request: Request) -> None:
        await reply(request.send, 200, [("content-type", "text/plain; charset=utf-8"),
                                        ("content-length", str(len(RUNNING)))],
                    b"" if request.method == "HEAD" else RUNNING)

    async def not_found(self, request: Request) -> None:
        await error(request.send, OLLAMA, "not_found", f"no route {request.method} {request.path} here: "
                    f"mlxgate serves Ollama's {self.table.served()}")

    async def refuse_write(self, request: Request) -> None:
        path, send = request.path, request.send
        body = await self.edge._body(request.headers, request.receive, send, OLLAMA)
        if body is None:
            return None
        try:
            data = parse_object(body) if body else {}
        except ValueError:
            data = {}
        name = str(data.get("model") or data.get("name") or "NAME")[:256]
        if path == "/api/pull":
            message = (f"pulling is not served here: mlxgate serves MLX models from its model folders and the "
                       f"Hugging Face cache, not Ollama's store. Run `mlxgate download {name}` (a Hugging Face "
                       f"name, e.g. mlx-community/Qwen2.5-Coder-7B-Instruct-4bit); GET /api/tags lists what is "
                       f"here")
        else:
            message = (f"{path} is not served here: mlxgate's models are folders on this machine (`mlxgate "
                       f"models` lists them, `mlxgate download NAME` adds one), not Ollama's store, so they are "
                       f"not created, copied, pushed or deleted through Ollama's API")
        await error(send, OLLAMA, "invalid_request", message)
