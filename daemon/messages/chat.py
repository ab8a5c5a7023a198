"""OpenAI streamed chunks → the non-streamed answer they add up to.

The relay always asks the model server for a stream, even when the client wants
one JSON answer, because a stream is the only thing `mlx_lm.server` stops
generating when its reader goes away (see `wrapper/relay.py`).
"""

from __future__ import annotations

from typing import Callable


def translate_chunk(chunk: dict, handlers: dict[str, Callable[[object], list]],
                    stopped: Callable[[], bool] = lambda: False) -> tuple[list, str | None]:
    """What the `handlers` ("reasoning", "content", "tool_call") make of what one chat chunk
    carries, in order, and its finish_reason; the rest is dropped once `stopped()`."""
    events: list = []
    finish = None
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or choice.get("message") or {}
        parts = [("reasoning", delta.get("reasoning")), ("content", delta.get("content")),
                 *(("tool_call", call) for call in delta.get("tool_calls") or [])]
        for kind, value in parts:
            if value:
                events += handlers[kind](value)
                if stopped():
                    return events, finish
        finish = choice.get("finish_reason") or finish
    return events, finish


def assemble_chat(chunks: list[dict], chat: bool = True) -> dict:
    """Join chat (`chat.completion.chunk`) or text (`text_completion`) chunks into one answer."""
    answer: dict = {}
    choices: dict[int, dict] = {}
    for chunk in chunks:
        if not answer:
            answer = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if chunk.get("usage"):
            answer["usage"] = chunk["usage"]
        for part in chunk.get("choices") or []:
            choice = choices.setdefault(part.get("index", 0), {"text": "", "reasoning": "", "calls": [],
                                                               "finish_reason": None})
            if chat:
                delta = part.get("delta") or {}
                choice["text"] += delta.get("content") or ""
                choice["reasoning"] += delta.get("reasoning") or ""
                for call in delta.get("tool_calls") or []:
                    call = {k: v for k, v in call.items() if k != "index"}
                    choice["calls"].append(call)
            else:
                choice["text"] += part.get("text") or ""
            choice["finish_reason"] = part.get("finish_reason") or choice["finish_reason"]
    answer["object"] = "chat.completion" if chat else "text_completion"
    answer["choices"] = [_choice(i, c, chat) for i, c in sorted(choices.items())]
    return answer


def _choice(index: int, choice: dict, chat: bool) -> dict:
    if not chat:
        return {"index": index, "text": choice["text"], "finish_reason": choice["finish_reason"] or "stop",
                "logprobs": None}
    message: dict = {"role": "assistant", "content": choice["text"] or (None if choice["calls"] else "")}
    if choice["reasoning"]:
        message["reasoning"] = choice["reasoning"]
    if choice["calls"]:
        message["tool_calls"] = choice["calls"]
    return {"index": index, "message": message, "finish_reason": choice["finish_reason"] or "stop"}
