"""Ollama's request bodies → the OpenAI chat and text-completion bodies the model servers take.

`/api/chat` becomes a chat body; `/api/generate` too (its `prompt` the user's message, its
`system` the system message), unless it is `raw` or has a `suffix`: then a text completion
(with a suffix, fill-in-the-middle). `options` map onto the sampling fields (`SAMPLING`);
hardware hints that change no answer are taken and have no effect here, as on a Mac they have
none in Ollama either (`NO_EFFECT`); anything else a model server cannot honour is a 400 naming
it, never dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from ..messages.checks import invalid, message_role, shown
from ..vision import images as images_

# option -> the chat body's field
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "stop": "stop", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
NO_EFFECT = ("num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap",
             "use_mlock", "num_thread", "numa", "num_keep", "penalize_newline", "mirostat_eta", "mirostat_tau")
# option -> (the values that ask for nothing, why another cannot be honoured)
UNHONOURED = {"mirostat": ((0,), "mirostat sampling is not served (mlx_lm samples with temperature, top_p, "
                                  "top_k and min_p)"),
              "typical_p": ((1, 1.0), "locally typical sampling is not served"),
              "tfs_z": ((1, 1.0), "tail-free sampling is not served")}
# top-level fields -> (the values that ask for nothing, why another cannot be honoured)
FIELDS_UNHONOURED = {"template": ((None, ""), "a prompt template of the request's own is not served: the model's "
                                              "chat template is used (or send raw: true with the whole prompt)"),
                     "context": ((None, []), "the token context of an earlier /api/generate answer is not served: "
                                             "send the conversation to /api/chat instead"),
                     "logprobs": ((None, False), "log probabilities are not served (mlx_lm.server streams none)"),
                     "top_logprobs": ((None, 0), "log probabilities are not served (mlx_lm.server streams none)")}
# taken with no effect: they matter only past the model's window, where the gateway refuses the prompt
# (a 400) and stops the answer at the window instead of truncating or shifting
WINDOW_FIELDS = ("truncate", "shift")
CHAT_FIELDS = {"model", "messages", "tools", "format", "options", "stream", "think", "keep_alive", "images",
               *FIELDS_UNHONOURED, *WINDOW_FIELDS}
GENERATE_FIELDS = {"model", "prompt", "suffix", "system", "raw", "format", "options", "stream", "think",
                   "keep_alive", "images", *FIELDS_UNHONOURED, *WINDOW_FIELDS}
EMBED_FIELDS = {"model", "input", "truncate", "dimensions", "options", "keep_alive"}
EMBEDDINGS_FIELDS = {"model", "prompt", "options", "keep_alive"}
SHOW_FIELDS = {"model", "name", "verbose"}
ROLES = ("system", "user", "assistant", "tool")
THINK_LEVELS = ("low", "medium", "high")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


@dataclass
class Translated:
    body: dict                 # the OpenAI chat or completion body
    completion: bool = False   # a text completion (raw or fill-in-the-middle), not a chat
    stream: bool = True
    keep_alive: float | None = None  # seconds; -1 forever, None: the request does not say
    nothing: bool = False      # nothing to generate: a load (or, with keep_alive 0, an unload)


def check_fields(body: dict, known: set[str], route: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(f"{unknown[0]}: unknown field of {route}; it takes {', '.join(sorted(known))}")
    for key, (harmless, why) in FIELDS_UNHONOURED.items():
        if key in known and body.get(key) not in harmless:
            raise invalid(f"{key}: {shown(body.get(key))} cannot be honoured: {why}")


def keep_alive_of(body: dict) -> float | None:
    """The request's `keep_alive` in seconds (-1: forever), None when it does not say: a number of
    seconds, or a duration such as "5m", "1h30m", "300ms"; any negative value keeps the model loaded."""
    value = body.get("keep_alive")
    if value is None:
        return None
    problem = f"keep_alive: expected a duration such as \"5m\" or a number of seconds, got {shown(value)}"
    if isinstance(value, bool):
        raise invalid(problem)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        text = text.lstrip("+-")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION.sub("", text) == "":
            seconds = sum(float(n) * _UNIT[unit] for n, unit in _DURATION.findall(text))
        else:
            raise invalid(problem)
        seconds = -seconds if negative else seconds
    else:
        raise invalid(problem)
    return -1.0 if seconds < 0 else seconds


def sampling(options: Any, window: int | None) -> dict:
    """The chat body's sampling fields for `options`."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise invalid(f"options: Input should be an object, got {shown(options)}")
    out: dict = {}
    for key, value in options.items():
        if value is None or key in NO_EFFECT:
            continue
        if key in SAMPLING:
            out[SAMPLING[key]] = value
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise invalid(f"options.num_predict: Input should be an integer, got {shown(value)}")
            if value == 0:
                raise invalid("options.num_predict: 0 asks for no tokens; send a positive number, or -1 for "
                              "up to the gateway's cap")
            if value > 0:  # -1 (no limit) and -2 (fill the window): up to the gateway's cap
                out["max_tokens"] = value
        elif key == "repeat_last_n":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(f"options.repeat_last_n: {shown(value)} cannot be honoured: the penalties look "
                              f"back a number of tokens (1 or more)")
            out.update(repetition_context_size=value, presence_context_size=value, frequency_context_size=value)
        elif key == "num_ctx":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(f"options.num_ctx: Input should be a positive integer, got {shown(value)}")
            if window and value > window:
                raise invalid(f"options.num_ctx: {value} cannot be honoured: the model's window is {window} "
                              f"tokens (send num_ctx {window} or less, or leave it out)")
        elif key in UNHONOURED:
            harmless, why = UNHONOURED[key]
            if value not in harmless:
                raise invalid(f"options.{key}: {shown(value)} cannot be honoured: {why}")
        else:
            raise invalid(f"options.{key}: unknown option; the options served are "
                          f"{', '.join([*SAMPLING, 'num_predict', 'num_ctx', 'repeat_last_n'])}")
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


def response_format(value: Any) -> dict | None:
    """`format`: "json" → any JSON object; a JSON schema → an answer held to it."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value, "strict": True}}
    raise invalid(f"format: expected \"json\" or a JSON schema object, got {shown(value)}")


def thinking(body: dict, upstream: dict) -> None:
    """`think` (true, false, or "low" / "medium" / "high") as the chat template's thinking switch."""
    think = body.get("think")
    if think is None:
        return
    if not isinstance(think, bool) and think not in THINK_LEVELS:
        raise invalid(f"think: expected true, false or one of {', '.join(THINK_LEVELS)}, got {shown(think)}")
    upstream["chat_template_kwargs"] = {"enable_thinking": think is not False}


def _common(body: dict, window: int | None) -> dict:
    upstream = sampling(body.get("options"), window)
    held = response_format(body.get("format"))
    if held is not None:
        upstream["response_format"] = held
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid(f"stream: Input should be a valid boolean, got {shown(stream)}")
    upstream["stream"] = stream
    return upstream


def with_images(text: str, images: Any, where: str) -> str | list[dict]:
    """A message's text with Ollama's `images` (base64 strings of the files' bytes) as the chat
    body's image parts after it; their type is read from the bytes, and the relay checks them as
    it checks every image."""
    if images is None or images == []:
        return text
    at = f"{where}.images" if where else "images"
    if not isinstance(images, list):
        raise invalid(f"{at}: Input should be a list of base64 strings")
    parts: list[dict] = [{"type": "text", "text": text}] if text else []
    for j, data in enumerate(images):
        if not isinstance(data, str) or not data:
            raise invalid(f"{at}.{j}: Input should be a base64 string of an image's bytes")
        try:
            head = base64.b64decode(data[:4096], validate=True)  # the type is in the first bytes
        except (binascii.Error, ValueError):
            raise invalid(f"{at}.{j}: not base64") from None
        media_type = images_.media_type_of(head, f"{at}.{j}")
        parts.append(images_.part(f"data:{media_type};base64,{data}", f"{at}.{j}"))
    return parts


def _messages(messages: Any) -> list[dict]:
    """Ollama's messages as OpenAI's: tool calls get ids (their arguments JSON text) and each tool
    result the id of the call it answers (by `tool_call_id`, `tool_name`, or else in order)."""
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a list of messages")
    out, pending = [], []
    for i, message in enumerate(messages):
        role = message_role(i, message, ROLES)
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages.{i}.content: Input should be a string, got {shown(content)}")
        converted: dict = {"role": role, "content": with_images(content, message.get("images"), f"messages.{i}")}
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise invalid(f"messages.{i}.tool_calls: only an assistant message has tool calls (a list)")
            converted["tool_calls"], pending = [], []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise invalid(f"messages.{i}.tool_calls.{j}: expected {{\"function\": {{\"name\", \"arguments\"}}}}")
                arguments = function.get("arguments") or {}
                call_id = call.get("id") or f"call_{i}_{j}"
                converted["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": function["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
                pending.append((call_id, function["name"]))
        if role == "tool":
            wanted = message.get("tool_call_id")
            name = message.get("tool_name")
            match = next((p for p in pending if p[0] == wanted or (not wanted and p[1] == name)), None)
            match = match or (pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
                converted["tool_call_id"] = match[0]
            elif wanted:
                converted["tool_call_id"] = wanted
        out.append(converted)
    return out


def chat(body: dict, window: int | None) -> Translated:
    """`POST /api/chat`; an empty `messages` asks for nothing but a load (or an unload)."""
    check_fields(body, CHAT_FIELDS, "/api/chat")
    if body.get("images"):
        raise invalid("images: /api/chat takes a message's images (messages[].images), not the request's")
    upstream = _common(body, window)
    messages = _messages(body.get("messages") if body.get("messages") is not None else [])
    keep_alive = keep_alive_of(body)
    if not messages:
        return Translated(upstream, stream=False, keep_alive=keep_alive, nothing=True)
    upstream["messages"] = messages
    tools = body.get("tools")
    if tools:
        upstream["tools"] = tools
    thinking(body, upstream)
    return Translated(upstream, stream=upstream["stream"], keep_alive=keep_alive)


def generate(body: dict, window: int | None) -> Translated:
    """`POST /api/generate`; an empty prompt asks for nothing but a load (or an unload)."""
    check_fields(body, GENERATE_FIELDS, "/api/generate")
    upstream = _common(body, window)
    keep_alive = keep_alive_of(body)
    prompt, suffix, system = body.get("prompt") or "", body.get("suffix"), body.get("system")
    for key, value in (("prompt", prompt), ("suffix", suffix), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise invalid(f"{key}: Input should be a string, got {shown(value)}")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise invalid(f"raw: Input should be a valid boolean, got {shown(raw)}")
    if not prompt and not suffix and not body.get("images"):
        return Translated(upstream, stream=False, keep_alive=keep_alive, nothing=True)
    if suffix or raw:
        if system:
            raise invalid("system: cannot be combined with " + ("suffix (fill-in-the-middle has no place for a "
                          "system prompt)" if suffix else "raw (a raw prompt is sent as it is, with no template)"))
        if body.get("think") is not None:
            raise invalid("think: a raw or fill-in-the-middle prompt has no chat template to switch thinking in")
        if body.get("images"):
            raise invalid("images: a raw or fill-in-the-middle prompt has no chat template to place images in")
        upstream["prompt"] = prompt
        if suffix:
            upstream["suffix"] = suffix
        return Translated(upstream, completion=True, stream=upstream["stream"], keep_alive=keep_alive)
    upstream["messages"] = [*([{"role": "system", "content": system}] if system else []),
                            {"role": "user", "content": with_images(prompt, body.get("images"), "")}]
    thinking(body, upstream)
    return Translated(upstream, stream=upstream["stream"], keep_alive=keep_alive)


def embed(body: dict, old: bool = False) -> tuple[dict, float | None]:
    """`POST /api/embed` (`input`: a string or a list of them) or the older `/api/embeddings`
    (`prompt`: one string) → the OpenAI embeddings body."""
    check_fields(body, EMBEDDINGS_FIELDS if old else EMBED_FIELDS, "/api/embeddings" if old else "/api/embed")
    sampling(body.get("options"), None)  # only options that change nothing here pass
    if old:
        if not isinstance(body.get("prompt"), str):
            raise invalid("prompt: Field required (a string)")
        upstream = {"input": body["prompt"]}
    else:
        given = body.get("input")
        if not (isinstance(given, str) or (isinstance(given, list) and given
                                           and all(isinstance(item, str) for item in given))):
            raise invalid("input: Field required (a string or a non-empty list of strings)")
        upstream = {"input": given, "truncate": body.get("truncate", True)}
        if body.get("dimensions") is not None:
            upstream["dimensions"] = body["dimensions"]
    return upstream, keep_alive_of(body)
