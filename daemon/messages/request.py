"""Anthropic Messages request → OpenAI chat request for `mlx_lm.server`.

Checks what the Anthropic API checks (with its wording, so agents recognize the
errors) and tolerates what agents send that a local model cannot use: unknown
top-level fields (`context_management`, `metadata`, `output_config.effort`), cache hints,
server tools, thinking blocks of earlier turns. What cannot be honored and would
change the answer (a document, an unknown block type) is refused. `image` blocks (base64 or
url sources, in user messages and in `tool_result` content) become OpenAI `image_url` parts
(`vision.images.part`); whether the model can read them is the factory's business.
Structured output (`output_config.format`, `strict` tools, `tool_choice` any/tool) becomes
the chat body's `response_format`, `strict` and `tool_choice`, which the model server holds
(`mlxgate.constraints`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import RequestRejected
from ..vision import images
from .checks import check_number, check_token_limit, invalid

ROLES = ("user", "assistant", "system")
UNHONOURED = {  # top-level fields only Anthropic's servers can act on: refused when they ask for something
    "mcp_servers": "MCP servers are run by Anthropic's API, not here: run the MCP server in your client",
    "container": "code execution containers are Anthropic's: there is none here",
}
IGNORED_BLOCKS = ("thinking", "redacted_thinking")
MEDIA_BLOCKS = ("document",)


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
        elif kind == "image":
            raise invalid(f"{where}.{i}: an image goes in a user message or in a tool_result's content")
        else:
            raise invalid(f"{where}.{i}: expected a text block, got {json.dumps(block)[:80]}")
    return "\n".join(parts) if where.endswith("system") else "".join(parts)


def _image(block: dict, where: str) -> dict:
    """An Anthropic image block as the chat body's image part."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        return images.part(images.data_url(source.get("media_type"), source.get("data"), f"{where}.source"), where)
    if kind == "url" and isinstance(source.get("url"), str):
        return images.part(source["url"], where)
    raise invalid(f"{where}.source: Input should be {{\"type\": \"base64\", \"media_type\": ..., \"data\": ...}} or "
                  f"{{\"type\": \"url\", \"url\": ...}}, got {json.dumps(source)[:60]}")


def _tool_content(content, where: str):
    """A `tool_result`'s content: its text, or text and image parts when it holds images (Claude
    Code's Read tool returns an image file that way)."""
    if not isinstance(content, list) or not any(isinstance(b, dict) and b.get("type") == "image" for b in content):
        return _text_of(content, where)
    parts = []
    for i, block in enumerate(content):
        if block.get("type") == "image":
            parts.append(_image(block, f"{where}.{i}"))
        else:
            parts.append({"type": "text", "text": _text_of([block], where)})
    return parts


def _media(where: str, kind: str) -> RequestRejected:
    return invalid(f"{where}: {kind} content is not supported: the local models read text and images. "
                   f"Send the document's text (or its pages as images).")


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
    pictures: list[tuple[int, dict]] = []  # (how many texts came before, image part)
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(f"{at}.text: Field required (a string)")
            texts.append(block["text"])
        elif kind == "image" and role == "user":
            pictures.append((len(texts), _image(block, at)))
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
            text = _tool_content(block.get("content"), f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}" if isinstance(text, str) else [{"type": "text", "text": "Error: "}, *text]
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            allowed = ("text, tool_use" if role == "assistant" else "text, image, tool_result")
            raise invalid(f"{at}.type: unsupported block type {json.dumps(kind)[:40]} in a {role} "
                          f"message (supported: {allowed}, thinking)")
    out.extend(results)
    if texts or calls or pictures or not results:
        message_out: dict = {"role": role, "content": _parts(texts, pictures) if pictures else "".join(texts)}
        if calls:
            message_out["tool_calls"] = calls
        out.append(message_out)


def _parts(texts: list[str], pictures: list[tuple[int, dict]]) -> list[dict]:
    """A message's text and image parts in the order the client sent them."""
    parts, done = [], 0
    for before, picture in pictures:
        if before > done:
            parts.append({"type": "text", "text": "".join(texts[done:before])})
            done = before
        parts.append(picture)
    if done < len(texts):
        parts.append({"type": "text", "text": "".join(texts[done:])})
    return parts


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
        if tool.get("strict") is True:  # its calls are held to input_schema
            function["strict"] = True
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


TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "required"}  # Anthropic's → OpenAI chat's


def _held(body: dict, chat: dict) -> None:
    """What the answer is held to: `output_config.format` (or the beta's top-level `output_format`),
    `tool_choice` any/tool (a call is required) and `disable_parallel_tool_use`, in the chat body's terms."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise invalid("output_config: Input should be an object")
    given = (config or {}).get("format", body.get("output_format"))
    if given is not None:
        where = "output_config.format" if "format" in (config or {}) else "output_format"
        if not isinstance(given, dict) or given.get("type") != "json_schema" or not isinstance(
                given.get("schema"), dict):
            raise invalid(f"{where}: Input should be {{\"type\": \"json_schema\", \"schema\": {{...}}}}")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": given["schema"]}}
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and chat.get("tools"):
        kind = choice.get("type")
        if kind not in (*TOOL_CHOICES, "none"):
            raise invalid(f"tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none', got {json.dumps(kind)}")
        if kind in TOOL_CHOICES:
            chat["tool_choice"] = TOOL_CHOICES[kind]
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False


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
    for key, why in UNHONOURED.items():
        if body.get(key):
            raise invalid(f"{key}: cannot be honoured: {why}")

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
    _held(body, chat)
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
