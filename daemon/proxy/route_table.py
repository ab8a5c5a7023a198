"""Where the edge sends a request: a table, looked up in three steps.

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

from ..api_paths import api_of
from . import routes
from .asgi import Request

Handler = Callable[[Request], Awaitable[None]]
STATIC = re.compile(r"/static/(.+)", re.S)


@dataclass(frozen=True)
class Row:
    handler: Handler
    api: str | None                        # None: the request path's (the last row)
    methods: tuple[str, ...] | None = None  # None: any
    keyed: bool = True                     # the gateway's key first (else the handler decides)
    route: routes.Route | None = None      # an API request's hook route


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


def row(path: str, handler: Handler, methods: tuple[str, ...] | None = None, keyed: bool = True,
        route: routes.Route | None = None) -> Row:
    """A row for `path` (for a pattern: the part every path it matches begins with)."""
    return Row(handler, api_of(path), methods, keyed, route)


def edge_table(edge, browser) -> RouteTable:
    """The main listeners' table: `edge`'s API handlers (`proxy.edge`), `browser`'s pages (`proxy.browser`)."""
    exact = {path: row(path, edge.healthy, keyed=False) for path in routes.OPEN_PATHS}
    exact["/"] = row("/", browser.status, ("GET",), keyed=False)
    exact["/login"] = row("/login", browser.login, keyed=False)
    exact.update({path: row(path, edge.api_request, ("POST",), route=route)
                  for path, route in routes.POST_ROUTES.items()})
    exact.update({path: row(path, edge.model_list, ("GET",)) for path in routes.MODEL_LIST_PATHS})
    exact[routes.METRICS_PATH] = row(routes.METRICS_PATH, edge.metrics, ("GET",))
    patterns = [(STATIC, row("/static/", browser.static, ("GET",), keyed=False)),
                (routes.STORED_RESPONSE, row("/responses/", edge.stored, ("GET", "DELETE")))]
    return RouteTable(exact, patterns, Row(edge.elsewhere, None))
