"""Build tiny embedding and reranker model folders offline, laid out as their real counterparts are.

- `build_embedding`: a BertModel (hidden 64, 2 layers, a 128-token window) with a WordPiece
  tokenizer and sentence-transformers files (modules.json, 1_Pooling with mean pooling), as
  all-MiniLM or bge folders are.
- `build_reranker`: a BertForSequenceClassification with one label (weights under `bert.` and
  `classifier.`), as cross-encoder/ms-marco-MiniLM-L6-v2 is; no sentence-transformers modules.
- `build_decoder_embedding`: Qwen3-Embedding's layout: Qwen3ForCausalLM in config.json, weights saved
  as Qwen3Model saves them (no `model.` prefix, no head), a byte-level BPE tokenizer that appends
  `<|endoftext|>`, last-token pooling, a query prompt, and `is_matryoshka` / `matryoshka_dimensions`
  (16, 32, 64) in config.json so that `dimensions` may be asked for.

The weights are random from `seed`: the same seed writes the same folder. Each folder is a few
hundred KB and loads in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 2, 4, 128
BERT_WINDOW, BERT_VOCAB = 128, 150
DECODER_WINDOW, DECODER_VOCAB = 512, 300
MATRYOSHKA = [16, 32, 64]
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [  # fixed, so the tokenizers are the same on every machine
    "The quick brown fox jumps over the lazy dog.",
    "Local models answer questions about code, text and data.",
    "Embeddings map sentences to vectors; similar sentences get similar vectors.",
    "A reranker scores how well a document answers a query.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b): return a + b",
    "Search engines retrieve relevant passages for a question.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # @ $ % & |",
]
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def build_embedding(folder: Path, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """A sentence-transformers BERT bi-encoder: BertModel, mean pooling, normalised."""
    folder = Path(folder)
    vocab = _bert_tokenizer(folder)
    _write(folder / "config.json", _bert_config(vocab, ["BertModel"], hidden, layers))
    _save(folder / "model.safetensors", _bert_weights(vocab, seed, hidden, layers))
    _sentence_transformers(folder, "mean_tokens", BERT_WINDOW, prompts={}, dimension=hidden)
    return folder


def build_reranker(folder: Path, seed: int = 1, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """A cross-encoder: BertForSequenceClassification with one label, sigmoid scores."""
    folder = Path(folder)
    vocab = _bert_tokenizer(folder)
    _write(folder / "config.json", _bert_config(
        vocab, ["BertForSequenceClassification"], hidden, layers, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
        sentence_transformers={"activation_fn": "torch.nn.modules.activation.Sigmoid", "version": "5.1.0"}))
    weights = _bert_weights(vocab, seed, hidden, layers, prefix="bert.")
    rng = np.random.default_rng(seed + 100)
    weights["classifier.weight"] = (rng.standard_normal((1, hidden)) * 0.5).astype(np.float32)
    weights["classifier.bias"] = np.zeros(1, np.float32)
    _save(folder / "model.safetensors", weights)
    return folder


def build_decoder_embedding(folder: Path, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """A Qwen3-Embedding-shaped decoder: last-token pooling, Matryoshka dimensions (always
    hidden 64 and 2 layers: its Matryoshka sizes and head layout are fixed)."""
    if (hidden, layers) != (HIDDEN, LAYERS):
        raise ValueError(f"the tiny decoder embedding model is always hidden {HIDDEN}, {LAYERS} layers")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DECODER_VOCAB, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((CORPUS + [QUERY_PROMPT]) * 4, trainer)
    end = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", end)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": DECODER_WINDOW, "rope_theta": 1000000,
        "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": end,
        "eos_token_id": end, "pad_token_id": end, "torch_dtype": "float32",
        "is_matryoshka": True, "matryoshka_dimensions": MATRYOSHKA,
    }
    _write(folder / "config.json", config)
    _write(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": DECODER_WINDOW, "padding_side": "left",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None})
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = {name.removeprefix("model."): np.array(value) for name, value in tree_flatten(model.parameters())
               if not name.startswith("lm_head.")}
    _save(folder / "model.safetensors", weights)
    _sentence_transformers(folder, "lasttoken", DECODER_WINDOW, prompts={"query": QUERY_PROMPT, "document": ""})
    return folder


BUILDERS = {"embedding": build_embedding, "reranker": build_reranker, "decoder-embedding": build_decoder_embedding}


def build(folder: Path, kind: str, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """Build the model of `kind` (one of `BUILDERS`) into `folder`: tiny by default; a BERT of a
    real one's shape with e.g. hidden 384 and 12 layers (bge-small's), for benchmarks."""
    if kind not in BUILDERS:
        raise ValueError(f"no tiny {kind!r} model; there are {', '.join(BUILDERS)}")
    if hidden < 16 or hidden % (16 if hidden <= HIDDEN else 32) or layers < 1:
        raise ValueError(f"hidden must be a multiple of 16 up to {HIDDEN} or of 32 above it, and layers at least 1 "
                         f"(got hidden {hidden}, {layers} layers)")
    return BUILDERS[kind](folder, seed, hidden, layers)


# ---------------------------------------------------------------- BERT
def _bert_tokenizer(folder: Path) -> int:
    """Train the WordPiece tokenizer, write its files into `folder`; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=BERT_VOCAB, special_tokens=BERT_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
    _write(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": BERT_WINDOW,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "mask_token": "[MASK]", "padding_side": "right"})
    return tokenizer.get_vocab_size()


def _bert_heads(hidden: int) -> int:
    return hidden // 16 if hidden <= HIDDEN else hidden // 32  # 4 of 16 for the tiny one; 12 of 32 for 384


def _bert_inner(hidden: int) -> int:
    return INTERMEDIATE if hidden == HIDDEN else 4 * hidden  # the tiny one's; else BERT's own 4x


def _bert_config(vocab: int, architectures: list[str], hidden: int, layers: int, **extra) -> dict:
    return {"architectures": architectures, "model_type": "bert", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": _bert_heads(hidden),
            "intermediate_size": _bert_inner(hidden),
            "hidden_act": "gelu", "vocab_size": vocab, "max_position_embeddings": BERT_WINDOW,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "torch_dtype": "float32", **extra}


def _bert_weights(vocab: int, seed: int, hidden: int, layers: int, prefix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"embeddings.word_embeddings.weight": normal(vocab, hidden, scale=0.5),
               "embeddings.position_embeddings.weight": normal(BERT_WINDOW, hidden, scale=0.1),
               "embeddings.token_type_embeddings.weight": normal(2, hidden, scale=0.1),
               "pooler.dense.weight": normal(hidden, hidden), "pooler.dense.bias": np.zeros(hidden, np.float32)}
    norms = ["embeddings.LayerNorm"]
    for layer in range(layers):
        base = f"encoder.layer.{layer}."
        shapes = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
                  "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
                  "intermediate.dense": (_bert_inner(hidden), hidden),
                  "output.dense": (hidden, _bert_inner(hidden))}
        for name, shape in shapes.items():
            weights[base + name + ".weight"] = normal(*shape)
            weights[base + name + ".bias"] = np.zeros(shape[0], np.float32)
        norms += [base + "attention.output.LayerNorm", base + "output.LayerNorm"]
    for norm in norms:
        weights[norm + ".weight"] = np.ones(hidden, np.float32)
        weights[norm + ".bias"] = np.zeros(hidden, np.float32)
    return {prefix + name: value for name, value in weights.items()}


# ---------------------------------------------------------------- shared
def _sentence_transformers(folder: Path, pooling: str, window: int, prompts: dict,
                           dimension: int = HIDDEN) -> None:
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    _write(folder / "modules.json", ST_MODULES)
    _write(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": dimension, "include_prompt": True,
                                                  **{f"pooling_mode_{mode}": mode == pooling for mode in modes}})
    _write(folder / "sentence_bert_config.json", {"max_seq_length": window, "do_lower_case": False})
    _write(folder / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer"})


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(path: Path, weights: dict[str, np.ndarray]) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), {name: mx.array(value) for name, value in weights.items()},
                        metadata={"format": "pt"})
