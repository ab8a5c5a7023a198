"""What the proxy and the wrapper's relay agree on: where a request for a local model
goes and what it carries besides the client's own body."""

from __future__ import annotations

from pathlib import Path

# Names the local model that must answer (the hooks decided it); required.
MODEL_HEADER = "x-mlxgate-model"
# The model name the client asked for, for the usage record.
REQUESTED_HEADER = "x-mlxgate-requested-model"
# The client's own headers the relay reads, for the usage record (who sent it).
CLIENT_HEADERS = ("user-agent", "originator")

# The relay's routes, after RELAY_PREFIX; the model is the header's.
RELAY_PREFIX = "/relay"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
RESPONSE_INPUT_TOKENS = "/v1/responses/input_tokens"
EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
# Ollama's API (its listener is the proxy's, `proxy.ollama_edge`): POST /api/chat, /api/generate,
# /api/embed, /api/embeddings and /api/show reach the relay here.
OLLAMA_CHAT = "/v1/ollama/chat"
OLLAMA_GENERATE = "/v1/ollama/generate"
OLLAMA_EMBED = "/v1/ollama/embed"
OLLAMA_EMBEDDINGS = "/v1/ollama/embeddings"
OLLAMA_SHOW = "/v1/ollama/show"

# A host's relay listener serves its certificate authority here, unauthenticated: what
# `mlxgate hosts add` fetches and shows by fingerprint before pinning it.
CA_PATH = "/ca.pem"

# Stored responses (GET, DELETE) are the wrapper's, whichever server answered them.
STORED_RESPONSES = "/responses"


def relay_path(api_path: str) -> str:
    return RELAY_PREFIX + api_path


# The relay's local door: a Unix socket in the runtime folder (see `wrapper.doors`). Its
# path must fit a socket address: 104 bytes with the terminating NUL on macOS (108 on Linux).
DOOR_NAME = "relay.sock"
MAX_SOCKET_PATH = 103


def door_path(home: Path) -> Path | None:
    """Where the proxies reach the relay on this machine; None when the runtime folder's path
    is too long for a socket (then they use the management port, `wrapper_url`)."""
    path = Path(home) / DOOR_NAME
    return path if len(str(path).encode()) <= MAX_SOCKET_PATH else None
