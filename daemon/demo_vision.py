"""A tiny random-weight Qwen2.5-VL, built offline (`mlxgate demo-model --vision DIR`).

    build_tiny_vlm(folder, TinyVLMSpec()) -> Path

It writes the files of an `mlx-community/Qwen2.5-VL-*` folder: config.json (model_type qwen2_5_vl,
a vision_config, the token ids of the tiny vocab), model.safetensors (the parameters of mlx-vlm
0.7.10's `qwen2_5_vl.Model`, names and shapes from a table, so only mlx and tokenizers are
needed to build it), tokenizer.json (a byte-level BPE with Qwen's special tokens),
tokenizer_config.json, chat_template.json (Qwen2-VL's template: an image part becomes
<|vision_start|><|image_pad|><|vision_end|>), preprocessor_config.json (patch 14, merge 2),
processor_config.json and generation_config.json. mlx-vlm loads it strictly and generates.

The head gives the end tokens a zero row, so greedy answers run to max_tokens. The *scripted*
model (`--vision --scripted`) answers `VISION_ANSWER` to every request instead, as the scripted text
model does (`demo_model`: silenced layers, a head that makes the generation prompt's marker predict
the answer and the answer the end), so an agent's turn with an image ends as a real model's would;
the image still goes through the processor and the vision tower. Token ids are
small (vocab ~400), so config.json names image_token_id and the others: Qwen's defaults
(151655...) would not exist in this vocab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-VL's special tokens, in Qwen's order (ids differ: they follow the tiny BPE vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (Qwen2.5-VL ships the same one).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the scripted model's answer (one added token) and the marker its generation prompt ends with
VISION_ANSWER = "I see the image."
ANSWER_MARKER = "<|answer|>"
ANSWER_TOKEN = VISION_ANSWER.replace(" ", "\u0120")  # in the byte-level alphabet, as mlx-vlm's detokenizer reads it

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image. What is in this picture? A red square on a white background.",
    "Hello! How can I help you today?",
    "def add(a, b):\n    return a + b\n",
    "The chart shows sales by month; the screenshot shows a terminal with an error.",
    "user assistant system tool function arguments result error image video",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # @ $ % ^ & | ~ `",
]


@dataclass(frozen=True)
class TinyVLMSpec:
    """Shape of the tiny model. The defaults load in well under a second on a CPU."""

    text_layers: int = 2
    text_hidden: int = 64
    text_heads: int = 4          # head_dim 16
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple = (2, 3, 3)  # sums to head_dim / 2, like Qwen's (16, 24, 24) for 128
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    fullatt_block_indexes: tuple = (1,)
    patch_size: int = 14         # Qwen2.5-VL's real values: one image token = 28x28 pixels
    merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    min_pixels: int = 56 * 56            # Qwen2.5-VL's preprocessor_config.json: 3136
    max_pixels: int = 28 * 28 * 1280     # Qwen2.5-VL's: 12845056; 1280 tokens is a common cap
    vocab: int = 400
    context: int = 32768
    seed: int = 0
    scripted: bool = False       # every answer is VISION_ANSWER

    @property
    def template(self) -> str:
        return CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                     "<|im_start|>assistant\n" + ANSWER_MARKER + "{% endif %}") if self.scripted \
            else CHAT_TEMPLATE

    @property
    def specials(self) -> list[str]:
        return SPECIAL_TOKENS + [ANSWER_MARKER] if self.scripted else SPECIAL_TOKENS


def _train_tokenizer(spec: TinyVLMSpec):
    from tokenizers import AddedToken

    from .demo_model import bpe_tokenizer

    tokenizer = bpe_tokenizer(spec.vocab, spec.specials, CORPUS)
    if spec.scripted:
        tokenizer.add_tokens([AddedToken(ANSWER_TOKEN, normalized=False)])
    return tokenizer


def _config(spec: TinyVLMSpec, ids: dict, vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "intermediate_size": spec.text_intermediate,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.context,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden,
            "in_chans": 3,
            "in_channels": 3,
            "patch_size": spec.patch_size,
            "spatial_patch_size": spec.patch_size,
            "spatial_merge_size": spec.merge_size,
            "temporal_patch_size": spec.temporal_patch_size,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": 2,
        },
    }


def _parameter_shapes(spec: TinyVLMSpec, vocab: int) -> dict:
    """Names and shapes of mlx_vlm.models.qwen2_5_vl.Model's parameters (mlx-vlm 0.7.10)."""
    s = spec
    v, t = s.vision_hidden, s.text_hidden
    merged = v * s.merge_size ** 2
    hd = t // s.text_heads
    shapes = {"vision_tower.patch_embed.proj.weight":
              (v, s.temporal_patch_size, s.patch_size, s.patch_size, 3)}
    for i in range(s.vision_depth):
        p = f"vision_tower.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (v,), p + "norm2.weight": (v,),
            p + "attn.qkv.weight": (3 * v, v), p + "attn.qkv.bias": (3 * v,),
            p + "attn.proj.weight": (v, v), p + "attn.proj.bias": (v,),
            p + "mlp.gate_proj.weight": (s.vision_intermediate, v),
            p + "mlp.gate_proj.bias": (s.vision_intermediate,),
            p + "mlp.up_proj.weight": (s.vision_intermediate, v),
            p + "mlp.up_proj.bias": (s.vision_intermediate,),
            p + "mlp.down_proj.weight": (v, s.vision_intermediate),
            p + "mlp.down_proj.bias": (v,),
        })
    shapes.update({
        "vision_tower.merger.ln_q.weight": (v,),
        "vision_tower.merger.mlp.0.weight": (merged, merged), "vision_tower.merger.mlp.0.bias": (merged,),
        "vision_tower.merger.mlp.2.weight": (t, merged), "vision_tower.merger.mlp.2.bias": (t,),
        "language_model.model.embed_tokens.weight": (vocab, t),
        "language_model.model.norm.weight": (t,),
        "language_model.lm_head.weight": (vocab, t),
    })
    for i in range(s.text_layers):
        p = f"language_model.model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (t,), p + "post_attention_layernorm.weight": (t,),
            p + "self_attn.q_proj.weight": (s.text_heads * hd, t), p + "self_attn.q_proj.bias": (s.text_heads * hd,),
            p + "self_attn.k_proj.weight": (s.text_kv_heads * hd, t), p + "self_attn.k_proj.bias": (s.text_kv_heads * hd,),
            p + "self_attn.v_proj.weight": (s.text_kv_heads * hd, t), p + "self_attn.v_proj.bias": (s.text_kv_heads * hd,),
            p + "self_attn.o_proj.weight": (t, s.text_heads * hd),
            p + "mlp.gate_proj.weight": (s.text_intermediate, t),
            p + "mlp.up_proj.weight": (s.text_intermediate, t),
            p + "mlp.down_proj.weight": (t, s.text_intermediate),
        })
    return shapes


def _weights(spec: TinyVLMSpec, config: dict) -> dict:
    import mlx.core as mx

    mx.random.seed(spec.seed)
    weights = {}
    for name, shape in _parameter_shapes(spec, config["vocab_size"]).items():
        if name.endswith("norm.weight") or name.endswith(("layernorm.weight", "norm1.weight",
                                                          "norm2.weight", "ln_q.weight")):
            weights[name] = mx.ones(shape)
        elif name.endswith(".bias"):
            weights[name] = mx.zeros(shape)
        else:
            weights[name] = mx.random.normal(shape) * 0.02 if "embed_tokens" not in name \
                else mx.random.normal(shape)
    return weights


def build_tiny_vlm(folder, spec: TinyVLMSpec = TinyVLMSpec()) -> Path:
    """Write a tiny random-weight Qwen2.5-VL into `folder` (created if needed); return its path."""
    import mlx.core as mx

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec)
    tokenizer.save(str(target / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in spec.specials + ([ANSWER_TOKEN] if spec.scripted else [])}
    vocab_size = tokenizer.get_vocab_size()

    config = _config(spec, ids, vocab_size)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    added = {
        str(ids[tok]): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": tok != ANSWER_TOKEN}
        for tok in ids
    }
    from .demo_model import tokenizer_config_of

    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_of(
        added, spec.context, spec.template, additional_special_tokens=spec.specials[1:], split_special_tokens=False),
        indent=2) + "\n")
    (target / "chat_template.json").write_text(json.dumps({"chat_template": spec.template}, indent=2) + "\n")
    (target / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size,
    }, indent=2) + "\n")
    (target / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    (target / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }, indent=2) + "\n")

    weights = _weights(spec, config)
    if spec.scripted:  # the language model's layers silenced, its marker wired to the answer, the answer to the end
        from .demo_model import script_weights

        text = {name.removeprefix("language_model."): value for name, value in weights.items()
                if name.startswith("language_model.")}
        text = script_weights(text, tokenizer, spec.text_hidden, [(ANSWER_MARKER, [ANSWER_TOKEN], "<|im_end|>")])
        weights.update({"language_model." + name: value for name, value in text.items()})
    else:  # the head never favours an end token: greedy answers run to max_tokens
        head = mx.array(weights["language_model.lm_head.weight"])
        head[mx.array([ids["<|im_end|>"], ids["<|endoftext|>"]])] = 0
        weights["language_model.lm_head.weight"] = head
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "mlx"})
    return target

