"""The API routes the edge answers itself: which hook route each is, which error shape
its clients read, and where the relay takes it."""

from __future__ import annotations

from dataclasses import dataclass

from .. import relay_protocol as relay
from ..api_errors import ANTHROPIC, OPENAI


@dataclass(frozen=True)
class Route:
    name: str        # the hooks' `ctx.route`
    api: str         # whose error shape its clients read
    relay_path: str  # the relay's route, after /backends/<server>


MESSAGES = Route("anthropic_messages", ANTHROPIC, relay.MESSAGES)
COUNT_TOKENS = Route("count_tokens", ANTHROPIC, relay.COUNT_TOKENS)
CHAT = Route("chat_completions", OPENAI, relay.CHAT)
COMPLETIONS = Route("completions", OPENAI, relay.COMPLETIONS)

# POST paths (without a trailing slash; a query string such as ?beta=true is ignored)
POST_ROUTES = {
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": COUNT_TOKENS,
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/completions": COMPLETIONS,
}
MODEL_LIST_PATHS = ("/v1/models", "/models")
METRICS_PATH = "/metrics"  # key required; the wrapper's counts, whichever listener is scraped
OPEN_PATHS = ("/health/liveliness", "/health/liveness", "/health/readiness")  # no key needed
