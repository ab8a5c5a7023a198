"""The proxy's side of the relay: a request for a local model goes to the wrapper on a
pooled keep-alive connection, and the relay's answer (status, headers, bytes) comes
back to the client untouched, streamed as it arrives.

The relay shapes its own errors (it knows the API); only a failure of the hop itself is
shaped here: the wrapper not there (503 before anything was sent), or gone mid-answer
(the API's error event ends the stream). Cancelling `forward` closes the connection,
which the relay notices and stops the generation.
"""

from __future__ import annotations

import logging

import aiohttp

from ..api_errors import RESPONSES, error_event
from ..config import Config
from ..errors import Unavailable
from ..json_body import dump
from ..relay_protocol import MODEL_HEADER, relay_path

log = logging.getLogger("mlxgate.proxy")

PASSED_HEADERS = ("content-type", "content-length", "cache-control", "retry-after", "x-should-retry")


class RelayClient:
    def __init__(self, config: Config):
        self.base = config.wrapper_url
        self.headers = {"content-type": "application/json"}
        if config.api_key:
            self.headers["authorization"] = f"Bearer {config.api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        return self._session

    async def get_json(self, path: str) -> dict:
        """A management call (e.g. GET /models); `Unavailable` when the wrapper does not answer."""
        try:
            async with self._client().get(self.base + path, headers=self.headers) as response:
                response.raise_for_status()
                return await response.json()
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise Unavailable(f"the MLX wrapper at {self.base} did not answer ({type(exc).__name__}). "
                              f"Check `mlxgate status`.") from None

    async def get_bytes(self, path: str) -> bytes:
        try:
            async with self._client().get(self.base + path, headers=self.headers) as response:
                response.raise_for_status()
                return await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"the MLX wrapper at {self.base} did not answer ({type(exc).__name__}). "
                              f"Check `mlxgate status`.") from None

    async def post_bytes(self, path: str, data: bytes) -> None:
        async with self._client().post(self.base + path, data=data, headers=self.headers) as response:
            response.raise_for_status()

    async def forward(self, send, api: str, server: str, api_path: str, model: str, data: dict,
                      client_headers: dict | None = None) -> None:
        """POST `data` to the relay and send its answer to the client (ASGI `send`)."""
        headers = {**(client_headers or {}), MODEL_HEADER: model}
        await self._relay(send, api, "POST", relay_path(server, api_path), dump(data), headers)

    async def forward_stored(self, send, method: str, path: str) -> None:
        """A stored response's GET or DELETE (no model, no hooks): the wrapper keeps them."""
        await self._relay(send, RESPONSES, method, path, None, {})

    async def _relay(self, send, api: str, method: str, path: str, body: bytes | None, headers: dict) -> None:
        try:
            response = await self._client().request(method, self.base + path, data=body,
                                                    headers={**self.headers, **headers})
        except (aiohttp.ClientError, OSError):
            raise Unavailable(f"the MLX wrapper is not running at {self.base}, so no local model can "
                              f"answer. Check `mlxgate status`.") from None
        async with response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()
                                    if k.lower() in PASSED_HEADERS]})
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("the relay connection failed mid-answer: %s", exc)
                if response.content_type == "text/event-stream":
                    await send({"type": "http.response.body", "more_body": True, "body": error_event(
                        api, "backend_error", "the MLX wrapper closed the stream before the answer was "
                                              "complete (it may have been restarted)")})
            await send({"type": "http.response.body", "body": b""})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
