"""A Responses API request → the OpenAI chat request for `mlx_lm.server`.

Checks what the Responses API checks (errors name the field: `input.2.content.0.type`)
and tolerates what agents send that a local model cannot use: `include`,
`prompt_cache_key`, `client_metadata`, `store`, `service_tier`, `text.verbosity`,
reasoning items of earlier turns (their encrypted content is OpenAI's), server tools.
What cannot be honored and would change the answer is refused with a 400: files and
audio, `background`, `conversation`, `prompt` templates,
`truncation: "auto"`, `top_logprobs`. Structured output (`text.format` `json_schema` /
`json_object`, `strict` function tools, `tool_choice` "required" or one tool) becomes the
chat body's `response_format`, `strict` and `tool_choice`, which the model server holds.
`input_image` parts (`image_url`: a data URL or http(s)) become OpenAI `image_url` parts
(`vision.images.part`); whether the model can read them is the factory's business.

Input items become chat messages: `instructions` and the system/developer messages
before the first other message one system message; later ones user messages (chat
templates refuse a system message after the first); assistant text and the calls that
follow it one assistant message; each call's output a tool message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import invalid
from ..messages.checks import check_number, check_token_limit, shown
from ..vision import images
from .tools import CALL_TYPES, CLIENT_TOOLS, OUTPUT_TYPES, Offered, ToolNames, chat_function, history_call, \
    history_output, new_id

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")
MEDIA_PARTS = ("input_file", "input_audio")
SKIPPED_ITEMS = ("reasoning", "web_search_call", "file_search_call", "code_interpreter_call",
                 "image_generation_call", "mcp_list_tools")  # what only OpenAI's servers made or can read
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
REFUSED = {  # field → why it gets a 400 when set
    "background": "background responses are not supported: send the request and read the answer (stream it "
                  "for long answers)",
    "conversation": "conversations are not supported: chain responses with previous_response_id",
    "prompt": "prompt templates are not supported: send the instructions and input themselves",
}


@dataclass
class ResponsesRequest:
    """What the model server gets, and what the answer's translation and storage need."""

    chat: dict                                     # the OpenAI chat request
    items: list[dict]                              # this request's input items, with ids
    response: dict                                 # the response object's fields that echo the request
    tools: ToolNames = field(default_factory=ToolNames)
    stream: bool = False
    store: bool = True
    max_calls: int | None = None                   # tool calls kept (1 when parallel_tool_calls is false)


def to_chat(body: dict, earlier: list[dict] = ()) -> ResponsesRequest:
    """Check a Responses body and translate it; `earlier` holds the items of the chain that
    `previous_response_id` names (earlier inputs and outputs). Raises `RequestRejected` (400)."""
    for key, why in REFUSED.items():
        if body.get(key):
            raise invalid(f"{key}: {why}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model: Input should be a string, got {shown(model)}")
    flags = {key: _flag(body, key, default) for key, default in
             (("stream", False), ("store", True), ("parallel_tool_calls", True))}
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions: Input should be a string")
    items = input_items(body.get("input"))
    tools = ToolNames()
    functions = _tools(body.get("tools"), tools)
    functions = _chosen(body.get("tool_choice"), functions, tools)
    messages = _messages(instructions, [*earlier, *items], tools)

    chat: dict = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    max_output = check_token_limit(body, "max_output_tokens")
    if max_output is not None:
        chat["max_tokens"] = max_output
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = check_number(body, key, low, high)
        if value is not None:
            chat[key] = value
    if functions:
        chat["tools"] = functions
        choice = _tool_choice(body.get("tool_choice"), functions)
        if choice is not None:
            chat["tool_choice"] = choice
        if not flags["parallel_tool_calls"]:
            chat["parallel_tool_calls"] = False
    reasoning = _reasoning(body.get("reasoning"))  # thinking when asked for, as on the Anthropic side
    chat["chat_template_kwargs"] = {"enable_thinking": reasoning["effort"] not in (None, "none", "minimal")}
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("truncation") not in (None, "disabled"):
        raise invalid("truncation: only \"disabled\" is supported: a prompt over the model's context window is "
                      "refused, never cut")
    if body.get("top_logprobs"):
        raise invalid("top_logprobs: log probabilities are not supported")
    max_calls = check_token_limit(body, "max_tool_calls")
    if not flags["parallel_tool_calls"]:
        max_calls = 1

    response = {
        "instructions": instructions, "max_output_tokens": max_output, "model": model or "",
        "parallel_tool_calls": flags["parallel_tool_calls"], "previous_response_id": body.get("previous_response_id"),
        "reasoning": reasoning, "store": flags["store"], "temperature": chat.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": chat.get("top_p", 1.0), "truncation": "disabled",
        "metadata": _metadata(body.get("metadata")), "prompt_cache_key": body.get("prompt_cache_key"),
        "max_tool_calls": body.get("max_tool_calls"), "user": body.get("user"),
    }
    return ResponsesRequest(chat=chat, items=items, response=response, tools=tools, stream=flags["stream"],
                            store=flags["store"], max_calls=max_calls)


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key}: Input should be a valid boolean, got {shown(value)}")
    return value


# ---------------------------------------------------------------- input items
def input_items(given) -> list[dict]:
    """The input as a list of items, each with an id; a string is one user message."""
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    if not isinstance(given, list):
        raise invalid("input: Field required (a string or a list of input items)")
    items = []
    for i, item in enumerate(given):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise invalid(f"{where}: Input should be an object (an input item)")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            items.append(_message_item(item, where))
        elif kind in CALL_TYPES or kind in OUTPUT_TYPES or kind in SKIPPED_ITEMS:
            items.append({**item, "type": kind, "id": item.get("id") or new_id("item")})
        else:
            raise invalid(f"{where}.type: unsupported input item type {shown(kind)} (supported: message, "
                          f"{', '.join(CALL_TYPES)}, their outputs, and reasoning)")
    return items


def _message_item(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role: Input should be 'user', 'assistant', 'system' or 'developer', got "
                      f"{shown(role)}")
    text_type = "output_text" if role == "assistant" else "input_text"
    content = item.get("content")
    if isinstance(content, str):
        parts = [{"type": text_type, "text": content}]
    elif isinstance(content, list):
        parts = [_text_part(part, f"{where}.content.{j}") for j, part in enumerate(content)]
    else:
        raise invalid(f"{where}.content: Field required (a string or a list of content parts)")
    out = {"type": "message", "id": item.get("id") or new_id("msg"), "role": role, "content": parts}
    if role == "assistant":
        out["status"] = item.get("status") or "completed"
    return out


def _text_part(part, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise invalid(f"{where}.image_url: Field required (a data URL or an http(s) URL; file_id is not "
                          f"supported here)")
        if part.get("detail") not in (None, "auto", "low", "high"):
            raise invalid(f"{where}.detail: Input should be 'auto', 'low' or 'high', got {shown(part.get('detail'))}")
        return part
    if kind in MEDIA_PARTS:
        raise invalid(f"{where}: {kind} content is not supported: the local models read text and images. Send "
                      f"the content as text.")
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part
    if kind not in TEXT_PARTS:
        raise invalid(f"{where}.type: unsupported content part {shown(kind)} (supported: input_text, "
                      f"output_text, refusal)")
    if not isinstance(part.get("text"), str):
        raise invalid(f"{where}.text: Field required (a string)")
    return part


def _content(parts: list[dict], where: str):
    """A message's text, or its text and image parts when it holds an image."""
    if not any(p.get("type") == "input_image" for p in parts):
        return "".join(p.get("text", p.get("refusal", "")) for p in parts)
    return [images.part(p["image_url"], f"{where}.content.{j}", p.get("detail"))
            if p.get("type") == "input_image" else {"type": "text", "text": p.get("text", p.get("refusal", ""))}
            for j, p in enumerate(parts)]


def _messages(instructions: str | None, items: list[dict], tools: ToolNames) -> list[dict]:
    out: list[dict] = []
    system = [instructions] if instructions else []
    for i, item in enumerate(items):
        kind = item["type"]
        where = f"input.{i}"
        if kind == "message":
            text = _content(item["content"], where)
            role = item["role"]
            if not isinstance(text, str) and role != "user":
                raise invalid(f"{where}.content: input_image goes in a user message")
            if role in ("system", "developer"):
                if not out:  # still at the start: part of the system message
                    system.append(text)
                    continue
                role = "user"
            if role == "assistant" and out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
                out[-1]["content"] += text
            else:
                out.append({"role": role, "content": text})
        elif kind in CALL_TYPES:
            tool, call_id, arguments = history_call(item, where)
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": tools.flat(tool), "arguments": arguments}})
        elif kind in OUTPUT_TYPES:
            call_id, text = history_output(item, where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not any(m["role"] != "system" for m in out):
        raise invalid("input: Field required (at least one message or tool output for the model to answer)")
    return out


# ---------------------------------------------------------------- tools
def _tools(given, names: ToolNames) -> list[dict]:
    if given is None:
        return []
    if not isinstance(given, list):
        raise invalid("tools: Input should be a list")
    functions = []
    for i, tool in enumerate(given):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            inner = tool.get("tools")
            if not isinstance(tool.get("name"), str) or not isinstance(inner, list):
                raise invalid(f"tools.{i}: a namespace tool needs a `name` and a list of `tools`")
            for j, member in enumerate(inner):
                functions.append(_function(member, f"tools.{i}.tools.{j}", names, tool["name"]))
        elif kind in ("function", "custom"):
            functions.append(_function(tool, f"tools.{i}", names))
        elif kind in CLIENT_TOOLS:
            offered = Offered(kind, kind)
            functions.append(chat_function(names.add(offered), offered, tool))
        elif not isinstance(kind, str):
            raise invalid(f"tools.{i}.type: Field required")
        # any other type (web_search, file_search, mcp, ...) is a tool OpenAI's servers run: skipped
    return functions


def _function(tool, where: str, names: ToolNames, namespace: str | None = None) -> dict:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind not in ("function", "custom"):
        raise invalid(f"{where}.type: Input should be 'function' or 'custom', got {shown(kind)}")
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise invalid(f"{where}.name: Field required (a string)")
    if kind == "function" and tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
        raise invalid(f"{where}.parameters: Input should be an object (a JSON schema)")
    offered = Offered(kind, tool["name"], namespace)
    return chat_function(names.add(offered), offered, tool)


def _chosen(choice, functions: list[dict], names: ToolNames) -> list[dict]:
    """The functions `tool_choice` leaves the model (all of them for "required": `_tool_choice` holds it)."""
    if choice is None or choice in ("auto", "required"):
        return functions
    if choice == "none":
        return []
    if not isinstance(choice, dict):
        raise invalid(f"tool_choice: Input should be 'none', 'auto', 'required' or an object, got {shown(choice)}")
    if choice.get("type") == "allowed_tools":
        wanted = choice.get("tools")
        if not isinstance(wanted, list):
            raise invalid("tool_choice.tools: Field required (a list of tools)")
    elif choice.get("type") in ("function", "custom", *CLIENT_TOOLS):
        wanted = [choice]
    else:
        return functions  # a server tool: the model's own tools stay
    allowed = {(w.get("type"), w.get("name", w.get("type"))) for w in wanted if isinstance(w, dict)}
    kept = [f for f in functions
            if (names.called(f["function"]["name"]).kind, names.called(f["function"]["name"]).name) in allowed]
    if not kept:
        raise invalid(f"tool_choice: no tool in `tools` matches {shown(choice)}")
    return kept


# ---------------------------------------------------------------- other parameters
def _reasoning(given) -> dict:
    if given is None:
        return {"effort": None, "summary": None}
    if not isinstance(given, dict):
        raise invalid("reasoning: Input should be an object")
    effort = given.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise invalid(f"reasoning.effort: Input should be one of {', '.join(EFFORTS)}, got {shown(effort)}")
    return {"effort": effort, "summary": given.get("summary", given.get("generate_summary"))}


def _response_format(text) -> dict | None:
    """`text.format` as the chat body's `response_format` (held by the model server)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("text: Input should be an object")
    given = text.get("format")
    kind = "text" if given is None else given.get("type") if isinstance(given, dict) else given
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(given.get("schema"), dict):
            raise invalid("text.format.schema: Field required (the JSON Schema the answer follows)")
        return {"type": "json_schema", "json_schema": {"name": given.get("name") or "output",
                                                       "schema": given["schema"], "strict": True}}
    raise invalid(f"text.format.type: Input should be 'text', 'json_object' or 'json_schema', got {shown(kind)}")


def _tool_choice(choice, functions: list[dict]) -> str | dict | None:
    """The chat body's `tool_choice`: "required", or the one function a named choice leaves."""
    if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "allowed_tools"
                                and choice.get("mode") == "required"):
        return "required"
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom", *CLIENT_TOOLS) and len(functions) == 1:
        return {"type": "function", "function": {"name": functions[0]["function"]["name"]}}
    return None


def _metadata(given) -> dict:
    if given is None:
        return {}
    if not isinstance(given, dict) or len(given) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in given.items()):
        raise invalid("metadata: Input should be an object of at most 16 string values (keys up to 64 "
                      "characters, values up to 512)")
    return given


def response_object(request: ResponsesRequest, response_id: str | None = None) -> dict:
    """A new response, in progress, with no output yet."""
    return {"id": response_id or new_id("resp"), "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
            "output": [], "usage": None, **request.response}

