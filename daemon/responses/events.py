"""OpenAI chat chunks (from `mlx_lm.server`) → Responses API stream events.

The grammar is OpenAI's, every event with a `sequence_number` counting from 0:
`response.created`, `response.in_progress`, then per output item
`response.output_item.added` ... `response.output_item.done`, and last
`response.completed`, or `response.incomplete` when `max_output_tokens` cut the answer
(`incomplete_details.reason: "max_output_tokens"`), or `response.failed` when the model
server failed. Inside the items:

- reasoning (`delta.reasoning`): a `reasoning` item whose summary is what the model
  thought: `response.reasoning_summary_part.added`, `.reasoning_summary_text.delta`...,
  `.reasoning_summary_text.done`, `.reasoning_summary_part.done`;
- text: a `message` item: `response.content_part.added` (`output_text`),
  `response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`;
- a tool call: its own item type (`tools`): a `function_call` streams
  `response.function_call_arguments.delta` / `.done`, a `custom_tool_call`
  `response.custom_tool_call_input.delta` / `.done`; the others are whole when added.

The response object is completed in place; a non-streamed answer is the last event's.
"""

from __future__ import annotations

import copy
from typing import Callable

from ..api_errors import KINDS
from ..messages.chat import translate_chunk
from ..messages.events import sse
from .tools import ID_PREFIXES, ToolNames, call_item, new_id

KEEPALIVE = b": keepalive\n\n"


def call_id_of(upstream: str | None) -> str:
    if not upstream:
        return new_id("call")
    return upstream if upstream.startswith("call_") else "call_" + upstream.replace("-", "")


def encode(events: list[dict]) -> bytes:
    return b"".join(sse(event["type"], event) for event in events)


class ResponseTranslator:
    """Feeds on chat chunks; each call returns the events to send, in order."""

    def __init__(self, response: dict, tools: ToolNames | None = None, max_calls: int | None = None,
                 input_tokens: int = 0, count_tokens: Callable[[str], int] | None = None):
        self.response = response
        self.tools = tools or ToolNames()
        self.max_calls = max_calls
        self.sequence = 0
        self.item: dict | None = None     # the output item being written
        self.text = ""                      # its text, reasoning or arguments so far
        self.calls = 0
        self.call_keys: dict[int, int] = {}  # chat call index → output index
        self.finish_reason: str | None = None
        self.usage: dict = {"prompt_tokens": input_tokens}  # until the model server reports its own
        self.reasoning = ""                  # all the reasoning text, counted with the model's tokenizer
        self.count_tokens = count_tokens      # (a chunk may carry several tokens)

    def reasoning_tokens(self) -> int:
        if not self.reasoning:
            return 0
        return self.count_tokens(self.reasoning) if self.count_tokens else len(self.reasoning.split())

    @property
    def index(self) -> int:
        return len(self.response["output"])

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _lifecycle(self, kind: str) -> dict:
        return self._event(kind, response=copy.deepcopy(self.response))

    def start(self) -> list[dict]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    # ------------------------------------------------------------------ items
    def _open(self, item: dict, shown: dict | None) -> list[dict]:
        """Start writing `item`; `shown` is how `response.output_item.added` shows it (None: later)."""
        events = self._close()
        self.item, self.text = item, ""
        if shown is not None:
            events.append(self._event("response.output_item.added", output_index=self.index, item=shown))
        return events

    def _part(self, **fields) -> dict:
        return {"item_id": self.item["id"], "output_index": self.index, **fields}

    def _close(self, status: str = "completed") -> list[dict]:
        item, text = self.item, self.text
        if item is None:
            return []
        events = []
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            events += [self._event("response.reasoning_summary_text.done", **self._part(summary_index=0, text=text)),
                       self._event("response.reasoning_summary_part.done", **self._part(summary_index=0, part=part))]
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item.update(content=[part], status=status)
            events += [self._event("response.output_text.done", **self._part(content_index=0, text=text, logprobs=[])),
                       self._event("response.content_part.done", **self._part(content_index=0, part=part))]
        else:
            tool = self.tools.called(item.pop("model_name"))
            item = call_item(tool, item["id"], item["call_id"], text)
            if item["type"] == "function_call":
                events.append(self._event("response.function_call_arguments.done",
                                          **self._part(arguments=text, name=item["name"])))
            elif item["type"] == "custom_tool_call":
                events += [self._event("response.custom_tool_call_input.delta", **self._part(delta=item["input"])),
                           self._event("response.custom_tool_call_input.done", **self._part(input=item["input"]))]
            else:  # whole only now: its action or operation is the call's arguments
                events.append(self._event("response.output_item.added", output_index=self.index,
                                          item=dict(item, status="in_progress")))
        events.append(self._event("response.output_item.done", output_index=self.index, item=item))
        self.response["output"].append(item)
        self.item, self.text = None, ""
        return events

    # ------------------------------------------------------------------ content
    def _reasoning(self, text: str) -> list[dict]:
        events = []
        if self.item is None or self.item["type"] != "reasoning":
            item = {"type": "reasoning", "id": new_id("rs"), "summary": []}
            events += self._open(item, copy.deepcopy(item))
            events.append(self._event("response.reasoning_summary_part.added",
                                      **self._part(summary_index=0, part={"type": "summary_text", "text": ""})))
        self.text += text
        self.reasoning += text
        return events + [self._event("response.reasoning_summary_text.delta", **self._part(summary_index=0,
                                                                                            delta=text))]

    def _output_text(self, text: str) -> list[dict]:
        events = []
        if self.item is None or self.item["type"] != "message":
            item = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                    "content": []}
            events += self._open(item, copy.deepcopy(item))
            events.append(self._event("response.content_part.added", **self._part(
                content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})))
        self.text += text
        return events + [self._event("response.output_text.delta", **self._part(content_index=0, delta=text,
                                                                                logprobs=[]))]

    def _call(self, call: dict) -> list[dict]:
        position = call.get("index", len(self.call_keys))
        function = call.get("function") or {}
        events = []
        if position not in self.call_keys or call.get("id"):
            if self.max_calls is not None and self.calls >= self.max_calls:
                return []  # parallel_tool_calls false / max_tool_calls: later calls are dropped
            self.calls += 1
            name = function.get("name") or ""
            tool = self.tools.called(name)
            item_id, call_id = new_id(ID_PREFIXES[tool.kind]), call_id_of(call.get("id"))
            shown = call_item(tool, item_id, call_id, None)
            item = {**shown, "model_name": name}
            # the others' output_item.added goes out when their arguments are whole
            events += self._open(item, shown if tool.kind in ("function", "custom") else None)
            self.call_keys[position] = self.index
        elif self.item is None or self.call_keys[position] != self.index:
            return []  # a piece of a call already closed
        arguments = function.get("arguments") or ""
        if arguments:
            self.text += arguments
            if self.item["type"] == "function_call":
                events.append(self._event("response.function_call_arguments.delta", **self._part(delta=arguments)))
        return events

    def feed(self, chunk: dict) -> list[dict]:
        """Events for one chat chunk."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events, finish = translate_chunk(chunk, {"reasoning": self._reasoning, "content": self._output_text,
                                                 "tool_call": self._call})
        self.finish_reason = finish or self.finish_reason
        return events

    # ------------------------------------------------------------------ the end
    def _usage(self) -> dict:
        usage = self.usage
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens(), completion)},
                "total_tokens": prompt + completion}

    def finish(self) -> list[dict]:
        """Close the open item and end the response: completed, or incomplete when cut."""
        cut = self.finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        self.response.update(status="incomplete" if cut else "completed", usage=self._usage(),
                             incomplete_details={"reason": "max_output_tokens"} if cut else None)
        return events + [self._lifecycle("response.incomplete" if cut else "response.completed")]

    def failed(self, kind: str, message: str) -> list[dict]:
        """The response, failed: the last event of a stream whose model server failed."""
        spec = KINDS.get(kind, KINDS["api_error"])
        self.item = None  # what was being written is not part of a failed response
        self.response.update(status="failed", usage=self._usage(),
                             error={"code": spec.openai_code or "server_error", "message": message})
        return [self._lifecycle("response.failed")]

    @property
    def done(self) -> bool:
        return self.response["status"] in ("completed", "incomplete")
