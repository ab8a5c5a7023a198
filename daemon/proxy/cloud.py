"""LiteLLM's proxy app, inside the proxy program, for the deployments of the config's
`litellm:` section (cloud providers, other mlxgate hosts) with its router, fallbacks and
retries, and for LiteLLM's own routes.

It is imported only when the section lists deployments: importing LiteLLM takes seconds
and some 300 MB per listener. A request reaches it after the edge checked the key and ran
the hooks; LiteLLM gets the body as the hooks left it and its own master key.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets

from ..api_errors import ANTHROPIC, error_body, kind_for_status
from ..config import Config
from ..json_body import dump
from . import litellm_config

DROPPED_HEADERS = {b"authorization", b"x-api-key", b"content-length", b"content-type", b"api-key"}


class Cloud:
    def __init__(self, config: Config):
        self.key = config.api_key or secrets.token_urlsafe(24)
        os.environ[litellm_config.MASTER_KEY_ENV] = self.key
        os.environ["CONFIG_FILE_PATH"] = str(litellm_config.path(config))
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        from litellm.proxy.proxy_server import app

        self.app = app

    def _scope(self, scope: dict, body: bytes | None) -> dict:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED_HEADERS]
        headers.append((b"authorization", f"Bearer {self.key}".encode()))
        if body is not None:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        else:
            headers += [(k, v) for k, v in scope["headers"] if k.lower() in (b"content-type", b"content-length")]
        return dict(scope, headers=headers)

    async def forward(self, scope: dict, data: dict, send, api: str) -> None:
        """A request the hooks sent to a deployment: LiteLLM answers with the hooked body."""
        body = dump(data)
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the edge cancels this call when the client leaves
        await self.app(self._scope(scope, body), receive, _ErrorShaper(send, api))

    async def forward_raw(self, scope: dict, receive, send) -> None:
        """Any other route (LiteLLM's own), as the client sent it, with LiteLLM's key."""
        await self.app(self._scope(scope, None), receive, send)


class _ErrorShaper:
    """LiteLLM's error answers in the shape the client's API uses (its own are OpenAI's
    on most routes)."""

    def __init__(self, send, api: str):
        self.send, self.api = send, api
        self.start: dict | None = None
        self.buffer: list[bytes] = []

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.buffer.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        raw = b"".join(self.buffer)
        status = self.start["status"]
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if self.api == ANTHROPIC and not (isinstance(data, dict) and data.get("type") == "error"):
            error = (data or {}).get("error") if isinstance(data, dict) else None
            text = error.get("message") if isinstance(error, dict) else raw.decode("utf-8", "replace")
            raw = error_body(ANTHROPIC, kind_for_status(status), str(text))
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({"type": "http.response.start", "status": status,
                         "headers": headers + [(b"content-length", str(len(raw)).encode())]})
        await self.send({"type": "http.response.body", "body": raw})
