"""What the gateway remembers of each request: one `Record`, made where the request ends.

A request for a local model ends in the wrapper's relay, which knows everything about it
(served model, tokens, time to first token, queue wait, cancellation). A request the proxy
answers itself (a refused key, a malformed body, a hook's refusal, the wrapper down) or
hands to LiteLLM ends in the proxy, which sends its records to the wrapper in batches, off
the request path. The wrapper is the one owner: it counts them (`/metrics`) and writes
them to the usage ledger. Every request is recorded exactly once.

Prompt text is never part of a record, unless `DETAILED_DEBUG` is on (`detail`).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields

# (pattern on the User-Agent or `originator` header, the client's name), first match wins
CLIENTS = (
    (re.compile(r"claude-cli|claude-code|claude_code", re.I), "Claude Code"),
    (re.compile(r"codex", re.I), "Codex"),
    (re.compile(r"qwen[-_ ]?code", re.I), "Qwen Code"),
    (re.compile(r"opencode", re.I), "opencode"),
    (re.compile(r"^Anthropic/Python", re.I), "anthropic SDK (Python)"),
    (re.compile(r"^Anthropic/JS", re.I), "anthropic SDK (JS)"),
    (re.compile(r"^OpenAI/Python", re.I), "openai SDK (Python)"),
    (re.compile(r"^OpenAI/JS", re.I), "openai SDK (JS)"),
    (re.compile(r"^curl/", re.I), "curl"),
    (re.compile(r"litellm", re.I), "LiteLLM"),
    (re.compile(r"python-requests|python-httpx|aiohttp", re.I), "Python HTTP client"),
    (re.compile(r"Mozilla/", re.I), "browser"),
)


def client_name(user_agent: str | None, originator: str | None = None) -> str:
    """Who sent a request, from its `originator` (Codex sends one) or `User-Agent` header."""
    for value in (originator, user_agent):
        if not value:
            continue
        for pattern, name in CLIENTS:
            if pattern.search(value):
                return name
    shown = (originator or user_agent or "").split("/")[0].strip()[:40]
    return shown or "unknown"


@dataclass
class Record:
    api: str                          # anthropic, openai
    route: str                        # the hooks' route: anthropic_messages, chat_completions, ...
    requested_model: str = ""
    served_model: str = ""            # the local model or LiteLLM deployment that answered
    server: str = ""                  # local, litellm, or "" (answered by the proxy)
    client: str = "unknown"
    status: int = 200                 # the HTTP status; a stream that ended with an error event: 200
    error: str = ""                   # our error kind, when it failed
    input_tokens: int = 0             # prompt tokens not read from the prompt cache
    cached_tokens: int = 0            # prompt tokens read from the prompt cache
    output_tokens: int = 0
    images: int = 0                   # images in the prompt
    ttft_ms: float | None = None      # to the first content the model sent
    total_ms: float = 0.0
    queue_ms: float | None = None     # waiting for its turn (and its model's load)
    cancelled: bool = False           # the client left before the answer was complete
    stream: bool = False
    at: float = field(default_factory=time.time)  # when the request came (unix time)
    detail: str = ""                  # the request as the hooks left it, with DETAILED_DEBUG only

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.status >= 400

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens per second of generation (after the first token)."""
        if not self.output_tokens or self.ttft_ms is None or self.total_ms <= self.ttft_ms:
            return None
        return self.output_tokens / ((self.total_ms - self.ttft_ms) / 1000)


COLUMNS = tuple(f.name for f in fields(Record))


def apply_openai_usage(record: Record, usage: dict) -> None:
    """An OpenAI `usage` (prompt_tokens with its cached part, completion_tokens) into `record`."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    record.input_tokens = max(0, (usage.get("prompt_tokens") or 0) - cached)
    record.cached_tokens = cached
    record.output_tokens = usage.get("completion_tokens") or 0
