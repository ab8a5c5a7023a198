"""Where the edge sends a request: a table, looked up in three steps.

The main listeners' (`edge_table`) and the Ollama listener's (`ollama_table`).

1. the exact paths, by one dict lookup;
2. else the patterns, in order (the vendored static files, the stored responses);
3. else, or when the row does not serve the method, the last row (LiteLLM's routes or the 404).

A row says which methods it serves, whether the gateway's key is asked for first, and its hook
route for an API request. Its API (whose error shape its clients read, `api_paths`) is worked
out once, when the table is built; the last row's, for each path it meets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..api_errors import OLLAMA
from ..api_paths import api_of
from . import routes
from .asgi import Request

Handler = Callable[[Request], Awaitable[None]]
STATIC = re.compile(r"/static/(.+)", re.S)
BLOBS = re.compile(r"/api/blobs/")


@dataclass(frozen=True)
class Row:
    handler: Handler
    api: str | None                        # None: the request path's (the last row)
    methods: tuple[str, ...] | None = None  # None: any
    keyed: bool = True                     # the gateway's key first (else the handler decides)
    route: routes.Route | None = None      # an API request's hook route
    shown: str | None = None               # how a 404's list of what is served names it (None: not listed)


class RouteTable:
    def __init__(self, exact: dict[str, Row], patterns: list[tuple[re.Pattern, Row]], last: Row):
        self.exact, self.patterns, self.last = exact, patterns, last

    def find(self, request: Request) -> Row:
        """The row for `request`, its API, route and pattern match noted on it."""
        row, match = self.exact.get(request.path), None
        if row is None:
            for pattern, candidate in self.patterns:
                match = pattern.match(request.path)
                if match is not None:
                    row = candidate
                    break
        if row is None or (row.methods is not None and request.method not in row.methods):
            row, match = self.last, None
        request.api = row.api or api_of(request.path)
        request.route, request.match = row.route, match
        return row

    def served(self) -> str:
        """What the table serves, for a 404's message: the shown rows, grouped by their methods."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for listed in [*self.exact.values(), *(candidate for _, candidate in self.patterns)]:
            if listed.shown:
                groups.setdefault(listed.methods or ("any method",), []).append(listed.shown)
        return "; ".join(f"{' and '.join(methods)} {', '.join(dict.fromkeys(paths))}"
                         for methods, paths in groups.items())


def row(path: str, handler: Handler, methods: tuple[str, ...] | None = None, keyed: bool = True,
        route: routes.Route | None = None, shown: str | bool = False) -> Row:
    """A row for `path` (for a pattern: the part every path it matches begins with); `shown`: listed
    in a 404's message (True: as `path`)."""
    return Row(handler, api_of(path), methods, keyed, route, path if shown is True else shown or None)


def edge_table(edge, browser) -> RouteTable:
    """The main listeners' table: `edge`'s API handlers (`proxy.edge`), `browser`'s pages (`proxy.browser`)."""
    exact = {path: row(path, edge.healthy, keyed=False) for path in routes.OPEN_PATHS}
    exact.update({path: row(path, edge.api_request, ("POST",), route=route, shown=path.startswith("/v1/"))
                  for path, route in routes.POST_ROUTES.items()})
    exact.update({path: row(path, edge.model_list, ("GET",), shown=path.startswith("/v1/"))
                  for path in routes.MODEL_LIST_PATHS})
    exact[routes.METRICS_PATH] = row(routes.METRICS_PATH, edge.metrics, ("GET",), shown=True)
    exact["/"] = row("/", browser.status, ("GET",), keyed=False, shown=True)
    exact["/login"] = row("/login", browser.login, keyed=False)
    patterns = [(STATIC, row("/static/", browser.static, ("GET",), keyed=False)),
                (routes.STORED_RESPONSE, row("/responses/", edge.stored, ("GET", "DELETE"),
                                             shown="/v1/responses/ID"))]
    return RouteTable(exact, patterns, Row(edge.elsewhere, None))


def ollama_table(listener, edge) -> RouteTable:
    """The Ollama listener's table (no key on any row: loopback only): `listener`'s handlers
    (`proxy.ollama_edge`) and the API requests `edge` answers."""
    exact = {path: row(path, listener.ollama_request, ("POST",), False, route, shown=True)
             for path, route in routes.OLLAMA_POST_ROUTES.items()}
    exact.update({path: row(path, listener.models, ("GET",), False, shown=True)
                  for path in routes.OLLAMA_LISTS})
    exact["/api/version"] = row("/api/version", listener.version, ("GET",), False, shown=True)
    exact.update({path: row(path, listener.openai_request, ("POST",), False, routes.POST_ROUTES[path], shown=True)
                  for path in routes.OLLAMA_OPENAI_COMPATIBLE})
    exact.update({path: row(path, edge.model_list, ("GET",), False, shown=path.startswith("/v1/"))
                  for path in routes.MODEL_LIST_PATHS})
    exact["/"] = row("/", listener.running, ("GET", "HEAD"), False, shown=True)
    exact.update({path: row(path, listener.refuse_write, keyed=False) for path in routes.OLLAMA_WRITES})
    patterns = [(BLOBS, row("/api/blobs/", listener.refuse_write, keyed=False))]
    return RouteTable(exact, patterns, Row(listener.not_found, OLLAMA, keyed=False))
