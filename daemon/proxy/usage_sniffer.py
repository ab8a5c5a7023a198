"""The token counts of an answer LiteLLM gave (the relay reports its own): read from the
`usage` of a JSON answer, or of the stream's events (Anthropic's `message_start` /
`message_delta`, OpenAI's last chunk), after the answer went to the client."""

from __future__ import annotations

import json

from ..usage import apply_openai_usage

LIMIT = 4 * 1024 * 1024  # an answer larger than this keeps the counts it had


class UsageSniffer:
    def __init__(self):
        self.watching = False
        self.chunks: list[bytes] = []
        self.size = 0

    def watch(self) -> None:
        self.watching = True

    def feed(self, chunk: bytes) -> None:
        if self.watching and chunk and self.size < LIMIT:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def fill(self, record) -> None:
        if not self.chunks:
            return
        raw = b"".join(self.chunks)
        payloads = [line[5:].strip() for line in raw.splitlines()
                    if line.startswith(b"data:") and b'"usage"' in line] or [raw]
        for payload in payloads:
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            usage = (data.get("message") or {}).get("usage") or data.get("usage") or \
                (data.get("response") or {}).get("usage")
            if isinstance(usage, dict):
                _apply(record, usage)


def _apply(record, usage: dict) -> None:
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # OpenAI
        return apply_openai_usage(record, usage)
    if usage.get("input_tokens") is not None:  # Anthropic (message_start, or the whole message)
        record.input_tokens = usage["input_tokens"]
        record.cached_tokens = usage.get("cache_read_input_tokens") or record.cached_tokens
    if usage.get("output_tokens") is not None:
        record.output_tokens = usage["output_tokens"]
