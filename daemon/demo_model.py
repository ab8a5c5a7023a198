"""Build a tiny MLX model (Qwen2-style) entirely offline.

The random-weight model is useless as a language model but real in every other
way: `mlx_lm` loads it, applies its chat template and generates from it in
milliseconds on a CPU; its head gives end tokens a zero logit, so with greedy decoding
an answer runs to `max_tokens`. The *scripted* model answers deterministically: its layers
are silenced (every `o_proj` and `down_proj` is zero) so each position sees only its
own token, and its embeddings and head make each token of a few fixed chains
predict the next one. The chat template picks the chain by ending the generation
prompt with a marker token:

- plain turn: "Hello from mlxgate. How can I help?"
- tools offered: a real `<tool_call>` for `get_weather` with `{"city": "Paris"}`
- after a tool result: "It is sunny in Paris!"
- thinking enabled (and no tools): `<think>Checking the question</think>` then the plain answer

`mlx_lm.server` parses the tool call and the thinking like a real Qwen model's, so
the scripted model drives an agent loop end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A small, fixed corpus so the tokenizer is the same on every machine.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello! How can I help you today?",
    "import os\nimport sys\nprint('hello world')\n",
    "Local models answer questions about code, text and data.",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Once upon a time there was a small model that ran on a laptop.",
    "user assistant system tool function arguments result error",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # @ $ % ^ & | ~ `",
]


TOOL_CALL_JSON = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
# marker token that ends the generation prompt -> the tokens that follow it
SCRIPT = {
    "<|plain|>": ["Hello", " from", " mlxgate", ".", " How", " can", " I", " help", "?"],
    "<|tools|>": ["<tool_call>", TOOL_CALL_JSON, "</tool_call>"],
    "<|answer|>": ["It", " is", " sunny", " in", " Paris", "!"],
    "<|reason|>": ["<think>", "Checking", " the", " question", "</think>", "Hello"],
}
PLAIN_ANSWER = "".join(SCRIPT["<|plain|>"])
TOOL_ANSWER = "".join(SCRIPT["<|answer|>"])
THINKING = "".join(SCRIPT["<|reason|>"][1:-2])

SCRIPTED_TEMPLATE = (
    "{#- tool calls are written as <tool_call>{\"name\": tool_call.name, \"arguments\": ...}</tool_call> #}"
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- elif message['content'] %}{%- set text = message['content'] | map(attribute='text') | join('') %}"
    "{%- else %}{%- set text = '' %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if messages[-1]['role'] == 'tool' %}{{- '<|answer|>' }}"
    "{%- elif tools %}{{- '<|tools|>' }}"
    "{%- elif enable_thinking %}{{- '<|reason|>' }}"
    "{%- else %}{{- '<|plain|>' }}{%- endif %}{%- endif %}"
)


@dataclass(frozen=True)
class DemoModelSpec:
    """Shape of the generated model; the defaults load in well under a second."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384
    context: int = 2048
    seed: int = 0
    scripted: bool = False


def _train_tokenizer(vocab_size: int, scripted: bool = False):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    if scripted:
        tokenizer.add_special_tokens(list(SCRIPT))
        words = [word for chain in SCRIPT.values() for word in chain]
        tokenizer.add_tokens([AddedToken(word, normalized=False) for word in dict.fromkeys(words)])
    return tokenizer


def _script_weights(weights: dict, tokenizer, hidden: int) -> dict:
    """Silence the layers and wire each chain token to predict its successor."""
    import mlx.core as mx
    import numpy as np

    successor: dict[int, int] = {}
    for marker, chain in SCRIPT.items():
        ids = [tokenizer.token_to_id(t) for t in [marker, *chain]]
        if ids[-1] not in successor:  # a chain may end by joining another one ("Hello")
            ids.append(tokenizer.token_to_id("<|im_end|>"))
        for a, b in zip(ids, ids[1:]):
            if successor.get(a, b) != b:
                raise ValueError(f"token {tokenizer.id_to_token(a)!r} has two successors in the script")
            successor[a] = b
    if len(successor) > hidden:
        raise ValueError(f"the script needs hidden >= {len(successor)}")
    rng = np.random.default_rng(0)
    vocab = tokenizer.get_vocab_size()
    embed = rng.standard_normal((vocab, hidden)).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    head = np.zeros((vocab, hidden), dtype=np.float32)
    for row, (source, target) in enumerate(sorted(successor.items())):
        direction = basis[:, row].astype(np.float32)
        embed[source] = direction * np.sqrt(hidden)  # RMS 1: the final norm keeps it as is
        head[target] += direction * 4.0
    out = {}
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            value = mx.zeros_like(value)
        out[name] = value
    out["model.embed_tokens.weight"] = mx.array(embed)
    out["lm_head.weight"] = mx.array(head)
    return out


def build_demo_model(target: Path, spec: DemoModelSpec = DemoModelSpec()) -> Path:
    """Write config, tokenizer and random weights for a tiny model into `target`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab, spec.scripted)
    tokenizer.save(str(target / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    im_end = tokenizer.token_to_id("<|im_end|>")
    eot = tokenizer.token_to_id("<|endoftext|>")

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": eot,
        "eos_token_id": im_end,
    }
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = SPECIAL_TOKENS + (list(SCRIPT) if spec.scripted else [])
    words = [w for chain in SCRIPT.values() for w in chain] if spec.scripted else []
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": tok in specials,
        }
        for tok in dict.fromkeys(specials + words)
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": spec.context,
        "clean_up_tokenization_spaces": False,
        "chat_template": SCRIPTED_TEMPLATE if spec.scripted else CHAT_TEMPLATE,
    }
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    mx.random.seed(spec.seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if spec.scripted:
        weights = _script_weights(weights, tokenizer, spec.hidden)
    else:  # the head never favours an end token: answers run to max_tokens, as long as asked
        head = mx.array(weights["model.embed_tokens.weight"])
        ends = mx.array([im_end, eot])
        head[ends] = 0
        weights["lm_head.weight"] = head
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "mlx"})
    return target
