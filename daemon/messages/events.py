"""OpenAI chat chunks (from `mlx_lm.server`) → Anthropic Messages stream events.

The grammar is Anthropic's: `message_start` (usage.input_tokens always set), then per
block `content_block_start` / `content_block_delta`... / `content_block_stop` with
indexes 0, 1, ... (a delta only for a started block), then `message_delta` with
`stop_reason`, `stop_sequence` and usage, then `message_stop`. `ping` may come
anywhere after `message_start`.

Reasoning (`delta.reasoning`) becomes a `thinking` block, tool calls `tool_use`
blocks (`input_json_delta`), text a `text` block. Stop sequences are matched here,
not by the server, so the answer can say which one ended it: text that could be the
start of a stop sequence is held back until it is known not to be.

A non-streamed answer is built from the same events (`assemble`), so both shapes
always agree.
"""

from __future__ import annotations

import json
import secrets
import uuid

import orjson

from .chat import translate_chunk

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
SIGNATURE = "bWx4Z2F0ZS1sb2NhbA=="  # thinking blocks carry a signature; ours marks them as local


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def tool_use_id(upstream: str | None) -> str:
    raw = (upstream or uuid.uuid4().hex).replace("-", "")
    return raw if raw.startswith("toolu_") else "toolu_" + raw


def sse(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessageTranslator:
    """Feeds on chat chunks; each call returns the events to send, in order."""

    def __init__(self, model: str, input_tokens: int, stop_sequences: list[str] = ()):
        self.model = model
        self.id = message_id()
        self.input_tokens = input_tokens
        self.stops = list(stop_sequences)
        self.index = -1
        self.block: str | None = None      # type of the open block
        self.pending = ""                   # text held back: it may begin a stop sequence
        self.tool_blocks: dict[int, int] = {}
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage = {"input_tokens": input_tokens, "output_tokens": 0}
        self.saw_tool = False

    @property
    def stopped(self) -> bool:
        """True once a stop sequence matched: the caller should stop the generation."""
        return self.stop_sequence is not None

    def start(self) -> list[tuple[str, dict]]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}),
                ("ping", {"type": "ping"})]

    # ------------------------------------------------------------------ blocks
    def _open(self, block: dict) -> list[tuple[str, dict]]:
        events = self._close()
        self.index += 1
        self.block = block["type"]
        events.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block}))
        return events

    def _close(self) -> list[tuple[str, dict]]:
        if self.block is None:
            return []
        events = []
        if self.block == "text" and self.pending:
            events.append(self._delta({"type": "text_delta", "text": self.pending}))
            self.pending = ""
        if self.block == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": SIGNATURE}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.block = None
        return events

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    # ------------------------------------------------------------------ content
    def _thinking(self, text: str) -> list[tuple[str, dict]]:
        events = [] if self.block == "thinking" else self._open(
            {"type": "thinking", "thinking": "", "signature": ""})
        events.append(self._delta({"type": "thinking_delta", "thinking": text}))
        return events

    def _text(self, text: str) -> list[tuple[str, dict]]:
        events = [] if self.block == "text" else self._open({"type": "text", "text": ""})
        buffer = self.pending + text
        hits = [(buffer.find(s), s) for s in self.stops if s in buffer]
        if hits:
            at, stop = min(hits)
            self.stop_sequence = stop
            self.pending = ""
            if at:
                events.append(self._delta({"type": "text_delta", "text": buffer[:at]}))
            return events
        hold = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        ready = buffer[:len(buffer) - hold]
        if ready:
            events.append(self._delta({"type": "text_delta", "text": ready}))
        return events

    def _tool(self, call: dict) -> list[tuple[str, dict]]:
        position = call.get("index", len(self.tool_blocks))
        function = call.get("function") or {}
        events = []
        if position not in self.tool_blocks or call.get("id"):
            events += self._open({"type": "tool_use", "id": tool_use_id(call.get("id")),
                                  "name": function.get("name", ""), "input": {}})
            self.tool_blocks[position] = self.index
            self.saw_tool = True
        arguments = function.get("arguments")
        if arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        """Events for one chat chunk (nothing once a stop sequence has matched)."""
        if self.stopped:
            return []
        usage = chunk.get("usage")
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            self.usage = {"input_tokens": usage.get("prompt_tokens", self.input_tokens) - cached,
                          "output_tokens": usage.get("completion_tokens", 0),
                          "cache_read_input_tokens": cached}
        events, finish = translate_chunk(chunk, {"reasoning": self._thinking, "content": self._text,
                                                 "tool_call": self._tool}, lambda: self.stopped)
        self.finish_reason = finish or self.finish_reason
        return events

    def finish(self) -> list[tuple[str, dict]]:
        """Close the open block and end the message."""
        events = self._close()
        if self.stopped:
            reason = "stop_sequence"
        elif self.saw_tool:
            reason = "tool_use"
        else:
            reason = STOP_REASONS.get(self.finish_reason or "stop", "end_turn")
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": self.stop_sequence},
                                         "usage": dict(self.usage)}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events


def assemble(events: list[tuple[str, dict]]) -> dict:
    """The non-streamed message that a list of stream events describes."""
    message: dict = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = dict(data["message"], content=[])
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            elif kind == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = {**message["usage"], **data["usage"]}
    for index, text in partial_json.items():
        try:
            message["content"][index]["input"] = json.loads(text) if text.strip() else {}
        except ValueError:
            message["content"][index]["input"] = {}
    return message
