"""The model server's OpenAI chunks → Ollama's answer: NDJSON lines for a stream (one object a
line, `done: false`, then a last line with `done: true`, `done_reason` and the counts and
durations), or the one object they add up to. Chat answers carry `message` (`content`,
`thinking`, `tool_calls` with their arguments as objects), generate answers `response`.

Durations are nanoseconds, from the relay's own clock (`Tally`): `load_duration` is the time
before generation started (the queue and a load, when the model was not loaded),
`prompt_eval_duration` from then to the first token, `eval_duration` the rest.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

from ..json_body import dump

MEDIA_TYPE = "application/x-ndjson"
DONE_REASONS = {"length": "length"}  # any other finish ("stop", "tool_calls") is Ollama's "stop"


def now() -> str:
    """Ollama's `created_at`: RFC 3339, UTC, with the fraction."""
    seconds = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


def _arguments(text) -> dict:
    if isinstance(text, dict):
        return text
    try:
        parsed = json.loads(text or "{}")
    except ValueError:
        return {"arguments": text}  # not JSON: kept, under a name, rather than dropped
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}


class Answer:
    """One answer, chat (`message`) or generate (`response`), built from the chunks as they come."""

    def __init__(self, model: str, tally, chat: bool):
        self.model, self.tally, self.chat = model, tally, chat
        self.finish_reason: str | None = None
        self.usage: dict = {}
        self.calls = 0

    def _head(self) -> dict:
        return {"model": self.model, "created_at": now()}

    def _part(self, content: str = "", thinking: str = "", calls: list | None = None) -> dict:
        if not self.chat:
            part = {"response": content}
            if thinking:
                part["thinking"] = thinking
            return part
        message: dict = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return {"message": message}

    def _pieces(self, chunk: dict) -> tuple[str, str, list]:
        """(content, thinking, tool calls) one chunk carries; its usage and finish are kept."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        content, thinking, calls = "", "", []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content += (delta.get("content") or "") + (choice.get("text") or "")  # chat or text chunks
            thinking += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                calls.append({"id": call.get("id") or f"call_{self.calls}", "function": {
                    "index": self.calls, "name": function.get("name"),
                    "arguments": _arguments(function.get("arguments"))}})
                self.calls += 1
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return content, thinking, calls

    def _stats(self) -> dict:
        tally, end = self.tally, time.perf_counter()
        generating = tally.generating if tally.generating is not None else end
        first = tally.first if tally.first is not None else end
        ns = lambda seconds: max(int(seconds * 1e9), 0)  # noqa: E731
        return {"done": True, "done_reason": DONE_REASONS.get(self.finish_reason, "stop"),
                "total_duration": ns(end - tally.started), "load_duration": ns(generating - tally.started),
                "prompt_eval_count": int(self.usage.get("prompt_tokens") or 0),
                "prompt_eval_duration": ns(first - generating),
                "eval_count": int(self.usage.get("completion_tokens") or 0), "eval_duration": ns(end - first)}

    # ---- a stream
    def keepalive(self) -> bytes:
        """An empty line of the answer, while it waits: NDJSON has no comments, and every
        client parses every line."""
        return dump({**self._head(), **self._part(), "done": False}) + b"\n"

    def feed(self, chunk: dict) -> bytes:
        content, thinking, calls = self._pieces(chunk)
        if not (content or thinking or calls):
            return b""
        return dump({**self._head(), **self._part(content, thinking, calls), "done": False}) + b"\n"

    def finish(self) -> bytes:
        return dump(self.last()) + b"\n"

    def last(self) -> dict:
        return {**self._head(), **self._part(), **self._stats()}

    # ---- one object
    def build(self, chunks: Iterable[dict]) -> dict:
        content, thinking, calls = "", "", []
        for chunk in chunks:
            more = self._pieces(chunk)
            content, thinking, calls = content + more[0], thinking + more[1], calls + more[2]
        return {**self._head(), **self._part(content, thinking, calls), **self._stats()}

    def nothing(self, reason: str) -> dict:
        """The answer to a load or an unload: nothing generated, `done_reason` says which."""
        return {**self._head(), **self._part(), "done": True, "done_reason": reason}


def embedded(model: str, answer: dict, tally, old: bool = False) -> dict:
    """An OpenAI embeddings answer as `/api/embed`'s (or the older `/api/embeddings`')."""
    vectors = [row["embedding"] for row in sorted(answer.get("data") or (), key=lambda row: row.get("index", 0))]
    if old:
        return {"embedding": vectors[0] if vectors else []}
    end = time.perf_counter()
    generating = tally.generating if tally.generating is not None else end
    return {"model": model, "embeddings": vectors, "total_duration": int((end - tally.started) * 1e9),
            "load_duration": int((generating - tally.started) * 1e9),
            "prompt_eval_count": int((answer.get("usage") or {}).get("prompt_tokens") or 0)}
