"""Count prompt tokens exactly as `mlx_lm.server` will: the model's own tokenizer and
chat template, with the same message preparation. Tokenizers are loaded once per
model folder (a few, most recently used, are kept)."""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from pathlib import Path

_KEEP = 4
_lock = threading.Lock()
_tokenizers: OrderedDict[str, object] = OrderedDict()


def tokenizer(path: Path):
    key = str(path)
    with _lock:
        if key in _tokenizers:
            _tokenizers.move_to_end(key)
            return _tokenizers[key]
    from mlx_lm.tokenizer_utils import load

    loaded = load(Path(path))
    with _lock:
        _tokenizers[key] = loaded
        while len(_tokenizers) > _KEEP:
            _tokenizers.popitem(last=False)
    return loaded


def context_length(path: Path) -> int | None:
    """The model's context window from its config, when it says."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


def count_chat(path: Path, chat: dict) -> int:
    """Prompt tokens of an OpenAI chat request (messages, tools, template arguments)."""
    from mlx_lm.server import process_message_content

    wrapped = tokenizer(path)
    messages = copy.deepcopy(chat.get("messages") or [])
    process_message_content(messages)
    if not wrapped.has_chat_template:
        from mlx_lm.server import convert_chat
        return len(wrapped.encode(convert_chat(messages, chat.get("role_mapping"))))
    prompt = wrapped.apply_chat_template(messages, tools=chat.get("tools"), add_generation_prompt=True,
                                         tokenize=True, **(chat.get("chat_template_kwargs") or {}))
    return len(prompt)


def count_text(path: Path, prompt: str) -> int:
    return len(tokenizer(path).encode(prompt))
