"""What the proxy's ASGI listeners share: a request as they read it, and their answers
(bytes, JSON, an error in an API's shape from the one table, `api_errors`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..api_errors import error_response

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


@dataclass
class Request:
    """One HTTP request: the path without its trailing slash, the headers' names in lower case."""

    scope: dict
    receive: Receive
    send: Send
    path: str
    method: str
    headers: dict[str, str]
    api: str = ""                   # whose error shape (`api_paths`), once a route table found its row
    route: Any = None               # the row's hook route (`routes.Route`) for an API request
    match: re.Match | None = None   # a pattern row's match

    @classmethod
    def of(cls, scope: dict, receive: Receive, send: Send) -> "Request":
        return cls(scope, receive, send, scope.get("path", "").rstrip("/") or "/", scope.get("method", ""),
                   {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])})

    @property
    def loopback(self) -> bool:
        return loopback(self.scope.get("client"))


def loopback(client) -> bool:
    """Whether an ASGI `client` (host, port) is this machine."""
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except (TypeError, IndexError, ValueError):
        return False


async def reply(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})


async def error(send: Send, api: str, kind: str, message: str) -> None:
    await reply(send, *error_response(api, kind, message))


async def json_reply(send: Send, status: int, payload: bytes) -> None:
    await reply(send, status, [("content-type", "application/json"), ("content-length", str(len(payload)))],
                payload)


async def page(send: Send, status: int, html: str) -> None:
    data = html.encode()
    await reply(send, status, [("content-type", "text/html; charset=utf-8"), ("content-length", str(len(data)))],
                data)


async def redirect(send: Send, location: str, *headers: tuple[str, str]) -> None:
    await reply(send, 303, [("location", location), *headers, ("content-length", "0")], b"")
