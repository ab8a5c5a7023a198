"""How each kind of model folder is served (`model_kinds` says which kind a folder holds): the
process its server runs, the request that proves it serves, and the relay routes it answers. A
new kind of model adds a row to `SERVING`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import relay_protocol as paths
from ..model_kinds import CHAT, EMBEDDING, RERANKER, VISION
from . import server_process

CHAT_PROBE = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0.0,
              "tools": [{"type": "function", "function": {"name": "ping", "description": "ping",
                                                           "parameters": {"type": "object", "properties": {}}}}]}
EMBEDDINGS_ENTRY = ("-m", "mlxgate.embeddings.entry")
VISION_ENTRY = ("-m", "mlxgate.vision.entry")
VISION_PROBE = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0.0}
RERANK_PROBE = {"query": "ping", "documents": ["ping"]}  # a forward pass, for embedding and reranker models alike


@dataclass(frozen=True)
class Serving:
    entry: tuple[str, ...]      # what python runs for its server
    probe: tuple[str, dict]     # (path, body) of a real request that answers 200 once the model serves
    routes: frozenset[str]      # the relay's API paths it answers
    prompt_cache: bool          # it keeps a prompt (KV) cache: an allowance in its cost, a disk tier
    what: str                   # how messages name it


SERVING: dict[str, Serving] = {
    CHAT: Serving(server_process.MLX_LM_ENTRY, (paths.CHAT, CHAT_PROBE),
                  frozenset({paths.MESSAGES, paths.COUNT_TOKENS, paths.CHAT, paths.COMPLETIONS, paths.RESPONSES,
                             paths.RESPONSE_INPUT_TOKENS, paths.OLLAMA_CHAT, paths.OLLAMA_GENERATE,
                             paths.OLLAMA_SHOW}), True, "a chat model"),
    EMBEDDING: Serving(EMBEDDINGS_ENTRY, (paths.RERANK, RERANK_PROBE),
                       frozenset({paths.EMBEDDINGS, paths.RERANK, paths.OLLAMA_EMBED, paths.OLLAMA_EMBEDDINGS,
                                  paths.OLLAMA_SHOW}), False, "an embedding model"),
    VISION: Serving(VISION_ENTRY, (paths.CHAT, VISION_PROBE),
                    frozenset({paths.MESSAGES, paths.COUNT_TOKENS, paths.CHAT, paths.RESPONSES,
                               paths.RESPONSE_INPUT_TOKENS, paths.OLLAMA_CHAT, paths.OLLAMA_GENERATE,
                               paths.OLLAMA_SHOW}), False, "a vision model"),
    RERANKER: Serving(EMBEDDINGS_ENTRY, (paths.RERANK, RERANK_PROBE), frozenset({paths.RERANK, paths.OLLAMA_SHOW}),
                      False, "a reranker"),
}


def serving(kind: str) -> Serving | None:
    return SERVING.get(kind)


def refusal(kind: str, name: str, api_path: str) -> str | None:
    """Why a model of `kind` does not answer `api_path` (None: it does): the routes that suit it."""
    how = SERVING.get(kind)
    if how is None:
        return f"model {name!r} cannot be served here: its folder is not a chat, vision, embedding or reranker model"
    if api_path in how.routes:
        return None
    where = {EMBEDDING: "POST /v1/embeddings (or /v1/rerank, Ollama's /api/embed)", RERANKER: "POST /v1/rerank",
             VISION: "the chat, messages and responses routes (with images; Ollama's /api/chat and /api/generate)"}.get(
        kind, "the chat, completions, messages or responses routes (Ollama's /api/chat and /api/generate)")
    return f"model {name!r} is {how.what}: it answers {where}, not {api_path}"
