"""Checks of OpenAI chat and text-completion requests before they reach `mlx_lm.server`,
which answers some bad values with a closed socket or a 404, and accepts others
(unknown roles) silently. Each problem is a 400 with the field's path, and so is a field
no model server can honour (`UNHONOURED`): it is never dropped silently."""

from __future__ import annotations

from ..vision import images
from .checks import check_number, check_token_limit, invalid, message_role, shown

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# Fields of OpenAI's chat and completions APIs the model servers cannot honour: refused with a
# 400 naming them unless they hold a value that asks for nothing (the first item), never dropped.
UNHONOURED: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "one choice per request: send n requests (with different seeds) instead"),
    "functions": ((), "the deprecated functions API is not supported: send `tools`"),
    "function_call": ((), "the deprecated functions API is not supported: send `tool_choice`"),
    "audio": ((), "the local models write text only"),
    "modalities": ((["text"],), "the local models write text only"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "there is no web search here"),
    # mlx_lm.server 0.32 streams no log probabilities, and the relay always reads a stream
    "logprobs": ((False, 0), "log probabilities are not served (mlx_lm.server streams none)"),
    "top_logprobs": ((0,), "log probabilities are not served (mlx_lm.server streams none)"),
}
COMPLETION_ONLY: dict[str, tuple[tuple, str]] = {
    "best_of": ((1,), "one candidate per request: send best_of requests instead"),
    "echo": ((False,), "the prompt is not echoed: prepend it yourself"),
}
EFFORT_THINKS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True, "xhigh": True}


def check_honoured(body: dict, table: dict[str, tuple[tuple, str]]) -> None:
    for key, (harmless, why) in table.items():
        value = body.get(key)
        if value is not None and value not in harmless:
            raise invalid(f"{key}: {shown(value)} cannot be honoured: {why}")


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
    check_honoured(body, UNHONOURED)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORT_THINKS:
        raise invalid(f"reasoning_effort: Input should be one of {', '.join(EFFORT_THINKS)}, got {shown(effort)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required (a non-empty list of messages)")
    for i, message in enumerate(messages):
        role = message_role(i, message, CHAT_ROLES)
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise invalid(f"messages.{i}.content: Input should be a string or a list of content parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url" and role in ("user", "tool"):
                _image_part(part, f"messages.{i}.content.{j}")
                continue
            if kind in ("image_url", "input_audio", "file", "image"):
                raise invalid(f"messages.{i}.content.{j}: {kind} content is not supported"
                              + (f" in a {role} message" if kind == "image_url" else
                                 ": the local models read text and images"))
            if kind != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages.{i}.content.{j}: expected a text part "
                              f"({{\"type\": \"text\", \"text\": ...}}), got {shown(part)}")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools: Input should be a list")


DETAILS = ("auto", "low", "high")


def _image_part(part: dict, where: str) -> None:
    """An `image_url` part: a data URL or an http(s) URL, and `detail`; marked with its place for
    the image checks (`vision.images.resolve`), which fetch and check the image itself."""
    image_url = part.get("image_url")
    if isinstance(image_url, str):  # some clients send the URL itself
        image_url = part["image_url"] = {"url": image_url}
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise invalid(f"{where}.image_url.url: Field required (a data URL or an http(s) URL)")
    if image_url.get("detail") not in (None, *DETAILS):
        raise invalid(f"{where}.image_url.detail: Input should be {', '.join(DETAILS)}, got "
                      f"{shown(image_url.get('detail'))}")
    part[images.AT] = where


def thinking_of(body: dict) -> None:
    """`reasoning_effort` as the chat template's thinking switch (unless the client set it itself)."""
    effort = body.pop("reasoning_effort", None)
    if effort is not None and "enable_thinking" not in (body.get("chat_template_kwargs") or {}):
        body["chat_template_kwargs"] = {**(body.get("chat_template_kwargs") or {}),
                                        "enable_thinking": EFFORT_THINKS[effort]}


def check_completion(body: dict) -> None:
    check_common(body)
    check_honoured(body, {**UNHONOURED, **COMPLETION_ONLY})
    if not isinstance(body.get("prompt"), str):
        raise invalid("prompt: Field required (a string)")
