"""Checks of OpenAI chat and text-completion requests before they reach `mlx_lm.server`,
which answers some bad values with a closed socket or a 404, and accepts others
(unknown roles) silently. Each problem is a 400 with the field's path."""

from __future__ import annotations

from .checks import check_number, check_token_limit, invalid, shown

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def check_common(body: dict) -> None:
    """Fields both routes share: token limits, sampling numbers, stream flag. (The model
    name is the hooks' business: the proxy checks it before routing.)"""
    for key in ("max_tokens", "max_completion_tokens"):
        check_token_limit(body, key)
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("top_k", -1, None), ("min_p", 0, 1),
                           ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                           ("repetition_penalty", 0, None)):
        check_number(body, key, low, high)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise invalid(f"stream: Input should be a valid boolean, got {shown(body['stream'])}")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop: Input should be a string or a list of strings")


def check_chat(body: dict) -> None:
    check_common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required (a non-empty list of messages)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: Input should be an object with `role` and `content`")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"messages.{i}.role: Input should be one of {', '.join(CHAT_ROLES)}, got {shown(role)}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise invalid(f"messages.{i}.content: Input should be a string or a list of content parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_audio", "file", "image"):
                raise invalid(f"messages.{i}.content.{j}: {kind} content is not supported: the local model "
                              f"reads text only")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages.{i}.content.{j}: expected a text part "
                              f"({{\"type\": \"text\", \"text\": ...}}), got {shown(part)}")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools: Input should be a list")


def check_completion(body: dict) -> None:
    check_common(body)
    if not isinstance(body.get("prompt"), str):
        raise invalid("prompt: Field required (a string)")
