"""The API routes the edge answers itself: which hook route each is, which error shape
its clients read, and where the relay takes it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import relay_protocol as relay
from ..api_errors import ANTHROPIC, OLLAMA, OPENAI, RESPONSES as RESPONSES_API


@dataclass(frozen=True)
class Route:
    name: str        # the hooks' `ctx.route`
    api: str         # whose error shape its clients read
    relay_path: str  # the relay's route, after /relay
    cloud: bool = True  # a `litellm:` deployment can answer it (LiteLLM serves this API)


MESSAGES = Route("anthropic_messages", ANTHROPIC, relay.MESSAGES)
COUNT_TOKENS = Route("count_tokens", ANTHROPIC, relay.COUNT_TOKENS)
CHAT = Route("chat_completions", OPENAI, relay.CHAT)
COMPLETIONS = Route("completions", OPENAI, relay.COMPLETIONS)
RESPONSES = Route("responses", RESPONSES_API, relay.RESPONSES)
RESPONSE_INPUT_TOKENS = Route("responses_input_tokens", OPENAI, relay.RESPONSE_INPUT_TOKENS)
EMBEDDINGS = Route("embeddings", OPENAI, relay.EMBEDDINGS)
RERANK = Route("rerank", OPENAI, relay.RERANK)  # the Cohere / Jina / vLLM shape

# POST paths (without a trailing slash; a query string such as ?beta=true is ignored)
POST_ROUTES = {
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": COUNT_TOKENS,
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
    "/responses": RESPONSES,
    "/v1/responses/input_tokens": RESPONSE_INPUT_TOKENS,
    "/responses/input_tokens": RESPONSE_INPUT_TOKENS,
    "/v1/embeddings": EMBEDDINGS,
    "/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK,
    "/rerank": RERANK,
    "/v2/rerank": RERANK,
}
# GET / DELETE of a response the relay stored: no model, no hooks; the wrapper keeps them.
# (LiteLLM's ids for cloud responses look otherwise, and go to LiteLLM.)
STORED_RESPONSE = re.compile(r"^(?:/v1)?(/responses/resp_[0-9a-f]{48}(?:/input_items)?)$")
MODEL_LIST_PATHS = ("/v1/models", "/models")
METRICS_PATH = "/metrics"  # key required; the wrapper's counts, whichever listener is scraped
OPEN_PATHS = ("/health/liveliness", "/health/liveness", "/health/readiness")  # no key needed

# Ollama's API, on its own listener (`ollama_port`, loopback, no key; see `ollama_edge`)
OLLAMA_CHAT = Route("ollama_chat", OLLAMA, relay.OLLAMA_CHAT, cloud=False)
OLLAMA_GENERATE = Route("ollama_generate", OLLAMA, relay.OLLAMA_GENERATE, cloud=False)
OLLAMA_EMBED = Route("ollama_embed", OLLAMA, relay.OLLAMA_EMBED, cloud=False)
OLLAMA_SHOW = Route("ollama_show", OLLAMA, relay.OLLAMA_SHOW, cloud=False)
OLLAMA_POST_ROUTES = {
    "/api/chat": OLLAMA_CHAT,
    "/api/generate": OLLAMA_GENERATE,
    "/api/embed": OLLAMA_EMBED,
    "/api/embeddings": Route("ollama_embed", OLLAMA, relay.OLLAMA_EMBEDDINGS, cloud=False),  # the older form
    "/api/show": OLLAMA_SHOW,
}
# Ollama's model store: the gateway's models are folders on this machine, not Ollama's
OLLAMA_WRITES = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")
