"""Anthropic Messages request → OpenAI chat request for `mlx_lm.server`.

Checks what the Anthropic API checks (with its wording, so agents recognize the
errors) and tolerates what agents send that a local model cannot use: unknown
top-level fields (`output_config`, `context_management`, `metadata`), cache hints,
server tools, thinking blocks of earlier turns. What cannot be honored and would
change the answer (an image to a text-only model, an unknown block type) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import RequestRejected
from .checks import check_number, check_token_limit, invalid

ROLES = ("user", "assistant", "system")
IGNORED_BLOCKS = ("thinking", "redacted_thinking")
MEDIA_BLOCKS = ("image", "document")


@dataclass
class ChatRequest:
    """What the model server gets, plus what the answer's translation needs."""

    body: dict                                   # OpenAI chat request
    stream: bool = False
    stop_sequences: list[str] = field(default_factory=list)
    max_tokens: int = 0


def _text_of(content, where: str) -> str:
    """The text of a `system` or `tool_result` content: a string or a list of text blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}: Input should be a string or a list of content blocks")
    parts = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in MEDIA_BLOCKS:
            raise _media(f"{where}.{i}", kind)
        else:
            raise invalid(f"{where}.{i}: expected a text block, got {json.dumps(block)[:80]}")
    return "\n".join(parts) if where.endswith("system") else "".join(parts)


def _media(where: str, kind: str) -> RequestRejected:
    return invalid(f"{where}: {kind} content is not supported: the local model reads text only. "
                   f"Send the content as text, or use a vision model.")


def _convert_message(i: int, message, out: list[dict]) -> None:
    where = f"messages.{i}"
    if not isinstance(message, dict):
        raise invalid(f"{where}: Input should be an object with `role` and `content`")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role: Input should be 'user' or 'assistant', got {json.dumps(role)[:40]}")
    content = message.get("content")
    if role == "system":  # Claude Code sends reminders mid-conversation; templates want them as user text
        out.append({"role": "user" if out else "system", "content": _text_of(content, f"{where}.content")})
        return
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise invalid(f"{where}.content: Input should be a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(f"{at}.text: Field required (a string)")
            texts.append(block["text"])
        elif kind in MEDIA_BLOCKS:
            raise _media(at, kind)
        elif kind in IGNORED_BLOCKS:
            continue
        elif kind == "tool_use" and role == "assistant":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise invalid(f"{at}: a tool_use block needs `id` and `name` strings")
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise invalid(f"{at}.input: Input should be an object")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments)}})
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise invalid(f"{at}.tool_use_id: Field required")
            text = _text_of(block.get("content"), f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            allowed = ("text, tool_use" if role == "assistant" else "text, tool_result")
            raise invalid(f"{at}.type: unsupported block type {json.dumps(kind)[:40]} in a {role} "
                          f"message (supported: {allowed}, thinking)")
    out.extend(results)
    if texts or calls or not results:
        message_out: dict = {"role": role, "content": "".join(texts)}
        if calls:
            message_out["tool_calls"] = calls
        out.append(message_out)


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("tools: Input should be a list")
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools.{i}: a tool needs a `name`")
        if "input_schema" not in tool:  # a server tool (web search, ...) that only Anthropic runs
            continue
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "none":
            return None
        if choice.get("type") == "tool":  # the model can only pick the one named
            converted = [t for t in converted if t["function"]["name"] == choice.get("name")]
            if not converted:
                raise invalid(f"tool_choice: no tool named {json.dumps(choice.get('name'))} in `tools`")
    return converted or None


def to_chat(body: dict) -> ChatRequest:
    """Check an Anthropic Messages body and translate it. Raises `RequestRejected` (400)."""
    max_tokens = check_token_limit(body, "max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens: Field required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model: Input should be a string, got {json.dumps(model)[:40]}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required (a non-empty list of messages)")

    out: list[dict] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, message in enumerate(messages):
        _convert_message(i, message, out)

    chat: dict = {"messages": out, "max_tokens": max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}}
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("top_k", 0, None)):
        value = check_number(body, key, low, high)
        if value is not None:
            chat[key] = value
    tools = _tools(body)
    if tools:
        chat["tools"] = tools
    thinking = body.get("thinking")
    wants_thinking = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    chat["chat_template_kwargs"] = {"enable_thinking": wants_thinking}

    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop_sequences: Input should be a list of non-empty strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream: Input should be a valid boolean")
    return ChatRequest(body=chat, stream=stream, stop_sequences=stops, max_tokens=max_tokens)
