"""What a browser gets from the proxy listeners: the status page at `/` (`status_page`), its
vendored files under `/static/`, and `/login`.

Who may see the page: a browser cannot send the key header, so clients on this machine, or
anyone when no key is configured, see it as they are; anyone else logs in once with the key,
which sets an HttpOnly cookie holding it (or sends the key as an API client would).
"""

from __future__ import annotations

import http.cookies
import urllib.parse

from ..api_errors import OPENAI
from ..credentials import credential, is_key
from ..errors import MlxgateError
from . import routes, status_page
from .asgi import Request, error, page, redirect, reply

LOGIN_BODY = 4096  # a form with the key; more is not read


class Browser:
    def __init__(self, api_key: bytes | None, relay, litellm_ui: bool = False):
        self.api_key = api_key
        self.relay = relay  # `RelayClient`: the page shows what the wrapper's /status says
        self.links = {"metrics": routes.METRICS_PATH, "models": "/v1/models"}
        if litellm_ui:
            self.links["LiteLLM UI"] = "/ui"

    def may_see_page(self, request: Request) -> bool:
        if request.loopback or not self.api_key:
            return True
        cookie = http.cookies.SimpleCookie(request.headers.get("cookie", ""))
        given = cookie[status_page.COOKIE].value if status_page.COOKIE in cookie else credential(request.headers)
        return is_key(given, self.api_key)

    async def static(self, request: Request) -> None:
        name = request.match.group(1)
        kind = status_page.STATIC_FILES.get(name)
        if kind is None:
            return await error(request.send, OPENAI, "not_found", f"no file {name!r}")
        data = status_page.static_file(name)
        await reply(request.send, 200, [("content-type", kind), ("content-length", str(len(data))),
                                        ("cache-control", "max-age=86400")], data)

    async def status(self, request: Request) -> None:
        if not self.may_see_page(request):
            return await redirect(request.send, "/login")
        try:
            data = await self.relay.get_json("/status")
        except MlxgateError as exc:
            data = {"servers": {}, "error": str(exc)}
        await page(request.send, 200, status_page.render(data, self.links))

    async def login(self, request: Request) -> None:
        problem = ""
        if request.method == "POST":
            body = b""
            more = True
            while more:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False) and len(body) < LOGIN_BODY
            given = (urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
            if self.api_key is None or is_key(given, self.api_key):
                cookie = f"{status_page.COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
                if request.scope.get("scheme") == "https":
                    cookie += "; Secure"
                return await redirect(request.send, "/", ("set-cookie", cookie))
            problem = "That is not the gateway's key."
        await page(request.send, 401 if problem else 200, status_page.login_page(problem))
