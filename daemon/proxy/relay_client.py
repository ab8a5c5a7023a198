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
from ..errors import BackendError, Unavailable
from ..json_body import dump
from ..relay_protocol import MODEL_HEADER, door_path, relay_path

log = logging.getLogger("mlxgate.proxy")

PASSED_HEADERS = ("content-type", "content-length", "cache-control", "retry-after", "x-should-retry",
                  "server-timing")
STREAMS = ("text/event-stream", "application/x-ndjson")  # SSE, and Ollama's one object a line


class RelayClient:
    def __init__(self, config: Config | None = None, *, base: str | None = None, key: str | None = None,
                 ssl=None, what: str | None = None):
        """This machine's relay (`config`: at its local door, the Unix socket, when the
        runtime folder has one), or another host's (`base`, its `key`, the TLS context that
        trusts its pinned authority, `what` it is called in messages)."""
        self.door = None if base else door_path(config.home)
        self.base = "http://relay" if self.door else base or config.wrapper_url
        self.where = str(self.door) if self.door else self.base  # for messages
        key = key if base else config.api_key
        self.what = what or "the MLX wrapper"
        self.ssl = ssl
        self.headers = {"content-type": "application/json"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self.door is not None:
                connector = aiohttp.UnixConnector(str(self.door), limit=0, keepalive_timeout=30)
            else:
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30,
                                                 **({"ssl": self.ssl} if self.ssl is not None else {}))
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def get_json(self, path: str, timeout: float | None = None) -> dict:
        """A management call (e.g. GET /models); `Unavailable` when the wrapper does not answer."""
        return await self._get(path, timeout, json=True)

    async def get_bytes(self, path: str) -> bytes:
        return await self._get(path, None, json=False)

    async def _get(self, path: str, timeout: float | None, json: bool):
        try:
            async with self._client().get(self.base + path, headers=self.headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                response.raise_for_status()
                return await (response.json() if json else response.read())
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            raise Unavailable(f"{self.what} at {self.where} did not answer ({type(exc).__name__}). "
                              f"Check `mlxgate status`.") from None

    async def post_bytes(self, path: str, data: bytes, timeout: float = 10.0) -> None:
        async with self._client().post(self.base + path, data=data, headers=self.headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            response.raise_for_status()

    async def forward(self, send, api: str, api_path: str, model: str, data: dict,
                      client_headers: dict | None = None) -> bool:
        """POST `data` to the relay and send its answer to the client (ASGI `send`); False
        when the answer broke off before its end (see `pipe`)."""
        return await self.pipe(await self.open(api_path, model, data, client_headers), send, api)

    async def forward_stored(self, send, method: str, path: str) -> None:
        """A stored response's GET or DELETE (no model, no hooks): the wrapper keeps them."""
        await self.pipe(await self._open(method, path, None, {}), send, RESPONSES)

    async def open(self, api_path: str, model: str, data: dict,
                   client_headers: dict | None = None) -> aiohttp.ClientResponse:
        """POST `data` to the relay for `model`; its answer, nothing sent to the client yet."""
        headers = {**(client_headers or {}), MODEL_HEADER: model}
        return await self._open("POST", relay_path(api_path), dump(data), headers)

    async def _open(self, method: str, path: str, body: bytes | None, headers: dict) -> aiohttp.ClientResponse:
        try:
            return await self._client().request(method, self.base + path, data=body,
                                                headers={**self.headers, **headers})
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{self.what} is not running at {self.where} ({type(exc).__name__}), so no "
                              f"local model can answer. Check `mlxgate status`.") from None

    async def pipe(self, response: aiohttp.ClientResponse, send, api: str) -> bool:
        """Send the relay's answer to the client: a stream as it comes, False when the relay went
        away before its end (the stream then ends with the API's error event); a JSON answer whole,
        `BackendError` when it was cut short (nothing was sent: the edge answers the error)."""
        complete = True
        start = {"type": "http.response.start", "status": response.status,
                 "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()
                             if k.lower() in PASSED_HEADERS]}
        async with response:
            if response.content_type not in STREAMS:  # one JSON answer: read whole, sent in one write
                try:
                    body = await response.read()
                except (aiohttp.ClientError, OSError) as exc:
                    raise BackendError(f"{self.what} closed the connection before its answer was complete "
                                       f"({type(exc).__name__}; it may have been restarted)") from None
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return True
            await send(start)
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("the relay connection to %s failed mid-answer: %s", self.where, exc)
                complete = False
                await send({"type": "http.response.body", "more_body": True, "body": error_event(
                    api, "backend_error", f"{self.what} closed the stream before the answer was "
                                          f"complete (it may have been restarted)")})
            await send({"type": "http.response.body", "body": b""})
        return complete

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
