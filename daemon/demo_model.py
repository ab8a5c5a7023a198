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
- with `steps` (`demo-model --steps FILE`): while tools are offered, step N of a fixed list (a
  tool call, or a text) after N tool results, then the answer after a tool result above; so an
  agent's own tools (read the file, then edit it) run with the arguments the list gives. A list
  of texts only is answered with or without tools (an agent that edits through its replies)

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


# the tool call in pieces that end where a grammar's parts end (the call's frame, its arguments), so a
# model server that holds tool calls to a grammar (tool_choice required) lets the script through
TOOL_CALL_PIECES = ['\n{"name": "get_weather", "arguments": ', '{"city": "Paris"}', '}\n']
TOOL_CALL_JSON = "".join(TOOL_CALL_PIECES)
# marker token that ends the generation prompt -> the tokens that follow it
SCRIPT = {
    "<|plain|>": ["Hello", " from", " mlxgate", ".", " How", " can", " I", " help", "?"],
    "<|tools|>": ["<tool_call>", *TOOL_CALL_PIECES, "</tool_call>"],
    "<|answer|>": ["It", " is", " sunny", " in", " Paris", "!"],
    "<|reason|>": ["<think>", "Checking", " the", " question", "</think>", "Hello"],
}
# fill-in-the-middle (`--fim`): Qwen2.5-Coder's tokens; scripted, the middle is a fixed line
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"]
FIM_SCRIPT = {"<|fim_middle|>": ["return", " a", " +", " b"]}
FIM_ANSWER = "".join(FIM_SCRIPT["<|fim_middle|>"])
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
    "{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- if m['role'] == 'tool' %}"
    "{%- set ns.n = ns.n + 1 %}{%- endif %}{%- endfor %}"
    "{%- if (tools or TEXT_ONLY) and ns.n < STEPS %}{{- '<|step_' ~ ns.n ~ '|>' }}"
    "{%- elif messages[-1]['role'] == 'tool' %}{{- '<|answer|>' }}"
    "{%- elif tools %}{{- '<|tools|>' }}"
    "{%- elif enable_thinking %}{{- '<|reason|>' }}"
    "{%- else %}{{- '<|plain|>' }}{%- endif %}{%- endif %}"
)


def step_marker(index: int) -> str:
    return f"<|step_{index}|>"


def step_text(step: dict) -> str:
    """What the scripted model writes for one step: {"tool": NAME, "arguments": {...}} (a tool call
    in the Qwen / Hermes form mlx_lm parses) or {"text": "..."}."""
    if "tool" in step:
        call = {"name": step["tool"], "arguments": step.get("arguments") or {}}
        return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
    if isinstance(step.get("text"), str) and step["text"]:
        return step["text"]
    raise ValueError(f"a step is {{\"tool\": NAME, \"arguments\": {{...}}}} or {{\"text\": TEXT}}, not {step!r}")


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
    fim: bool = False  # Qwen2.5-Coder's fill-in-the-middle tokens (scripted: a fixed middle after them)
    steps: tuple[str, ...] = ()  # scripted: the text of each step (`step_text`), while tools are offered

    def chains(self) -> list[tuple[str, list[str], str]]:
        """(marker, the tokens it leads to, the token that ends them) of a scripted model."""
        if not self.scripted:
            return []
        chains = [(marker, words, "<|im_end|>") for marker, words in SCRIPT.items()]
        chains += [(step_marker(i), [text], "<|im_end|>") for i, text in enumerate(self.steps)]
        if self.fim:
            chains += [(marker, words, "<|endoftext|>") for marker, words in FIM_SCRIPT.items()]
        return chains


def bpe_tokenizer(vocab_size: int, specials: list[str], corpus: list[str]):
    """A byte-level BPE tokenizer trained on a fixed corpus: the same on every machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus * 4, trainer)
    return tokenizer


def tokenizer_config_of(added: dict, context: int, chat_template: str, **extra) -> dict:
    """tokenizer_config.json of a demo model: a fast tokenizer, Qwen's end and pad tokens."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": context,
            "clean_up_tokenization_spaces": False, **extra, "chat_template": chat_template}


def _train_tokenizer(vocab_size: int, spec: "DemoModelSpec"):
    from tokenizers import AddedToken

    tokenizer = bpe_tokenizer(vocab_size, SPECIAL_TOKENS, CORPUS)
    if spec.fim:
        tokenizer.add_special_tokens(FIM_TOKENS)
    if spec.scripted:
        tokenizer.add_special_tokens([*SCRIPT, *(step_marker(i) for i in range(len(spec.steps)))])
        words = [word for _, chain, _ in spec.chains() for word in chain]
        tokenizer.add_tokens([AddedToken(word, normalized=False) for word in dict.fromkeys(words)])
    return tokenizer


def script_weights(weights: dict, tokenizer, hidden: int, chains: list) -> dict:
    """Silence the layers and wire each chain token to predict its successor."""
    import mlx.core as mx
    import numpy as np

    successor: dict[int, int] = {}
    for marker, chain, end in chains:
        ids = [tokenizer.token_to_id(t) for t in [marker, *chain]]
        if ids[-1] not in successor:  # a chain may end by joining another one ("Hello")
            ids.append(tokenizer.token_to_id(end))
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
    tokenizer = _train_tokenizer(spec.vocab, spec)
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
    specials = SPECIAL_TOKENS + (FIM_TOKENS if spec.fim else []) + (
        [*SCRIPT, *(step_marker(i) for i in range(len(spec.steps)))] if spec.scripted else [])
    words = [w for _, chain, _ in spec.chains() for w in chain]
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": tok in specials,
        }
        for tok in dict.fromkeys(specials + words)
    }
    template = (SCRIPTED_TEMPLATE.replace("STEPS", str(len(spec.steps))).replace(
        "TEXT_ONLY", "true" if spec.steps and not any(t.startswith("<tool_call>") for t in spec.steps) else "false")
        if spec.scripted else CHAT_TEMPLATE)
    tokenizer_config = tokenizer_config_of(added, spec.context, template)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    mx.random.seed(spec.seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if spec.scripted:
        weights = script_weights(weights, tokenizer, spec.hidden, spec.chains())
    else:  # the head never favours an end token: answers run to max_tokens, as long as asked
        head = mx.array(weights["model.embed_tokens.weight"])
        ends = mx.array([im_end, eot])
        head[ends] = 0
        weights["lm_head.weight"] = head
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "mlx"})
    return target
