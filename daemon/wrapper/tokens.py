"""Count prompt tokens exactly as `mlx_lm.server` will: the model's own tokenizer and
chat template, with the same message preparation. Tokenizers are loaded once per
model folder (a few, most recently used, are kept).

Counting is cheap on an agent's follow-up turns: the rendered prompt is cut at the
special tokens its chat template writes (`<|im_start|>`, `<|im_end|>`, ...), which the
tokenizer never merges with their neighbours, and each piece's count is remembered. A new turn
repeats every earlier message byte for byte, so only what it added is tokenized.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import invalid

_KEEP = 4
_lock = threading.Lock()
_loaded: OrderedDict[str, "Counter"] = OrderedDict()

REMEMBERED_PIECES = 50_000  # counts of prompt pieces kept (a few MB)


class Counter:
    """One model's tokenizer, and the counts of prompt pieces it has seen."""

    def __init__(self, wrapped):
        self.wrapped = wrapped  # mlx_lm's TokenizerWrapper
        self._pieces: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._lock = threading.Lock()
        # the structural tokens: those the chat template writes (cutting at a subset of the
        # tokenizer's added tokens is as exact as cutting at all of them)
        template = str(getattr(wrapped, "chat_template", None) or "")
        specials = sorted((t for t in (getattr(wrapped, "added_tokens_encoder", None) or {}) if t in template),
                          key=len, reverse=True)
        self._split = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        if self._split is not None and not self._splitting_is_exact():
            self._split = None

    def encode_len(self, text: str) -> int:
        return len(self.wrapped.encode(text, add_special_tokens=False))

    def _splitting_is_exact(self) -> bool:
        """Whether counting piece by piece gives the tokenizer's own count (it does for the
        byte-level BPE tokenizers MLX models use; checked once, on a rendered sample)."""
        sample = [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": " Hi there!"},
                  {"role": "assistant", "content": "Hello.  "}, {"role": "user", "content": "x\n\n y"}]
        try:
            text = self.render(sample)
        except Exception:
            return False
        return self._count_split(text, remember=False) == self.encode_len(text)

    def render(self, messages: list, tools=None, **template_args) -> str:
        return self.wrapped.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                tokenize=False, **template_args)

    def count(self, text: str) -> int:
        if self._split is None:
            return self.encode_len(text)
        return self._count_split(text, remember=True)

    def _count_split(self, text: str, remember: bool) -> int:
        total, start = 0, 0
        for match in self._split.finditer(text):
            total += self._piece(text[start:match.start()], remember) + 1
            start = match.end()
        return total + self._piece(text[start:], remember)

    def _piece(self, piece: str, remember: bool) -> int:
        if not piece:
            return 0
        if not remember:
            return self.encode_len(piece)
        key = (len(piece), hash(piece))
        with self._lock:
            count = self._pieces.get(key)
            if count is not None:
                self._pieces.move_to_end(key)
                return count
        count = self.encode_len(piece)
        with self._lock:
            self._pieces[key] = count
            while len(self._pieces) > REMEMBERED_PIECES:
                self._pieces.popitem(last=False)
        return count


def counter(path: Path) -> Counter:
    key = str(path)
    with _lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
    from mlx_lm.tokenizer_utils import load

    made = Counter(load(Path(path)))
    with _lock:
        made = _loaded.setdefault(key, made)
        while len(_loaded) > _KEEP:
            _loaded.popitem(last=False)
    return made


def _prepared(messages: list) -> list:
    """The messages as `mlx_lm.server` hands them to the template (its
    `process_message_content`), copied only where it would change them."""
    out = []
    for message in messages:
        content = message.get("content")
        calls = message.get("tool_calls")
        if isinstance(content, str) and not calls:
            out.append(message)
            continue
        message = dict(message)
        if isinstance(content, list):
            message["content"] = "".join(part["text"] for part in content if part.get("type") == "text")
        elif content is None:
            message["content"] = ""
        if calls:
            message["tool_calls"] = [_parsed_call(call) for call in calls]
        out.append(message)
    return out


def _parsed_call(call: dict) -> dict:
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str) or not arguments:
        return call
    try:
        return {**call, "function": {**function, "arguments": json.loads(arguments)}}
    except ValueError:
        return call


def count_chat(path: Path, chat: dict) -> int:
    """Prompt tokens of an OpenAI chat request (messages, tools, template arguments)."""
    model = counter(path)
    if not model.wrapped.has_chat_template:
        from mlx_lm.server import convert_chat
        return len(model.wrapped.encode(convert_chat(_prepared(chat.get("messages") or []),
                                                     chat.get("role_mapping"))))
    kwargs = chat.get("chat_template_kwargs") or {}
    try:
        text = model.render(_prepared(chat.get("messages") or []), tools=chat.get("tools") or None,
                            **(kwargs if isinstance(kwargs, dict) else {}))
    except Exception as exc:  # the template refuses this conversation (jinja raises on purpose)
        raise invalid(f"the model's chat template cannot render this conversation: {exc}") from None
    return model.count(text)


def count_text(path: Path, prompt: str) -> int:
    return len(counter(path).wrapped.encode(prompt))
