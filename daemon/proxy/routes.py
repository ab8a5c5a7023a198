"""The API routes the edge answers itself: which hook route each is and where the relay
takes it (whose error shape its clients read is the path's, `api_paths`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import relay_protocol as relay


@dataclass(frozen=True)
class Route:
    name: str        # the hooks' `ctx.route`
    relay_path: str  # the relay's route, after /relay
    cloud: bool = True  # a `litellm:` deployment can answer it (LiteLLM serves this API)


MESSAGES = Route("anthropic_messages", relay.MESSAGES)
COUNT_TOKENS = Route("count_tokens", relay.COUNT_TOKENS)
CHAT = Route("chat_completions", relay.CHAT)
COMPLETIONS = Route("completions", relay.COMPLETIONS)
RESPONSES = Route("responses", relay.RESPONSES)
RESPONSE_INPUT_TOKENS = Route("responses_input_tokens", relay.RESPONSE_INPUT_TOKENS)
EMBEDDINGS = Route("embeddings", relay.EMBEDDINGS)
RERANK = Route("rerank", relay.RERANK)  # the Cohere / Jina / vLLM shape

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
OLLAMA_CHAT = Route("ollama_chat", relay.OLLAMA_CHAT, cloud=False)
OLLAMA_GENERATE = Route("ollama_generate", relay.OLLAMA_GENERATE, cloud=False)
OLLAMA_EMBED = Route("ollama_embed", relay.OLLAMA_EMBED, cloud=False)
OLLAMA_SHOW = Route("ollama_show", relay.OLLAMA_SHOW, cloud=False)
OLLAMA_POST_ROUTES = {
    "/api/chat": OLLAMA_CHAT,
    "/api/generate": OLLAMA_GENERATE,
    "/api/embed": OLLAMA_EMBED,
    "/api/embeddings": Route("ollama_embed", relay.OLLAMA_EMBEDDINGS, cloud=False),  # the older form
    "/api/show": OLLAMA_SHOW,
}
OLLAMA_LISTS = ("/api/tags", "/api/ps")  # the local models; the loaded ones
# As Ollama does, its port serves OpenAI's API too (without a key there: loopback only)
OLLAMA_OPENAI_COMPATIBLE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# Ollama's model store: the gateway's models are folders on this machine, not Ollama's
OLLAMA_WRITES = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")
