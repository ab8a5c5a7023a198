"""Whose API a request path is, and so whose error shape its clients read: the table that the
proxy's listeners, the wrapper's doors and its Flask app ask, and the relay's route rows
(`wrapper.apis.ROWS`) take theirs from.

A path is taken without its trailing slash and query. The relay's paths (``/relay/...``) read
as the client's path they carry, so ``/relay/v1/messages`` is Anthropic's as ``/v1/messages`` is.
"""

from __future__ import annotations

from .api_errors import ANTHROPIC, OLLAMA, OPENAI, RESPONSES
from .relay_protocol import RELAY_PREFIX

# Paths no prefix tells apart. The Responses API has OpenAI's error shape, but a stream's error
# is its own event; its input_tokens and stored responses are plain OpenAI.
EXACT: dict[str, str] = {
    "/v1/responses": RESPONSES,
    "/responses": RESPONSES,
    "/api/chat": OLLAMA,
    "/api/generate": OLLAMA,
    "/api/embed": OLLAMA,
    "/api/embeddings": OLLAMA,
    "/api/show": OLLAMA,
}
PREFIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("/v1/messages", "/messages", "/anthropic"), ANTHROPIC),
    (("/v1/ollama/",), OLLAMA),  # the relay's routes for Ollama's API
)
DEFAULT = OPENAI


def api_of(path: str) -> str:
    """The API of `path` (`api_errors`' ANTHROPIC, OPENAI, RESPONSES or OLLAMA)."""
    if path.startswith(RELAY_PREFIX + "/"):
        path = path[len(RELAY_PREFIX):]
    api = EXACT.get(path)
    if api is not None:
        return api
    for prefixes, api in PREFIXES:
        if path.startswith(prefixes):
            return api
    return DEFAULT


def family_of(api: str) -> str:
    """The API a usage record names: the Responses API is OpenAI's."""
    return OPENAI if api == RESPONSES else api
