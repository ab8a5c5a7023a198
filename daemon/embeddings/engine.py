"""One embedding or reranker model in MLX: loading its folder, tokenizing, batched forward passes,
pooling, and rerank scores.

Encoders (BERT, RoBERTa, XLM-R and CamemBERT) are the few lines of MLX below, with Hugging Face
parameter names and the two sequence-classification heads (BERT's pooler + classifier, RoBERTa's
classifier.dense + out_proj). Decoders (Qwen3-Embedding, gte-Qwen2) run through mlx-lm's model
classes, whose `model.model(ids)` gives the final hidden states; their folders may carry the
`model.` prefix or not, and may be quantized the way `mlx_lm.convert` writes it.

Batches are padded on the right. A decoder's causal mask keeps every real token from seeing the
pads, and last-token pooling reads each row at its own length; an encoder gets an additive mask
over the pad keys, and no mask when no row is padded (MLX's CPU attention is several times slower
with a boolean or a broadcast mask). Either way a row gets the vector it gets alone.

Tokenizing is safe in any thread (the tokenizer is not changed after loading); `run` belongs to
one thread, the batch worker.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ModelLoadFailed, RequestRejected
from ..model_kinds import DECODER, EMBEDDING, RERANKER, FolderKind, kind_of

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "xlm_roberta", "camembert")
ROBERTA_TYPES = ("roberta", "xlm-roberta", "xlm_roberta", "camembert")  # positions start after the pad id
POOLINGS = ("mean", "cls", "max", "lasttoken")
SERVED_MODULES = (".Transformer", ".Pooling", ".Normalize")  # sentence-transformers modules we run
TRUNCATIONS = ("none", "end", "start")  # keep everything (or refuse), cut the end, cut the start
DECODER_WINDOW = 32768  # when a decoder's config names no max_position_embeddings


class FolderError(ModelLoadFailed):
    """The folder cannot be served faithfully (raised at load)."""


class Refused(RequestRejected):
    """A request this model cannot serve; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, kind: str = "invalid_request",
                 status: int = 400):
        super().__init__(status, message, kind)
        self.param = param


@dataclass(slots=True)
class Sequence:
    """One row of a batch: token ids, specials included, and token type ids for a pair."""

    ids: list[int]
    type_ids: list[int] | None = None


# ---------------------------------------------------------------- tokenizing
class Template:
    """Where the tokenizer's post-processor puts its special tokens, found once by encoding probes,
    so that truncation cuts the content and keeps [CLS]/[SEP] or a final <|endoftext|> (the
    tokenizer's own truncation is a setting of the shared tokenizer, not of one call)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hello = self.content(["hello"])[0]
        world = self.content(["world"])[0]
        single = tokenizer.encode("hello").ids
        at = _find(single, hello)
        self.single = (single[:at], single[at + len(hello):])
        pair = tokenizer.encode("hello", "world")
        ids, types = pair.ids, pair.type_ids
        a = _find(ids, hello)
        b = _find(ids, world, a + len(hello))
        self.pair = (ids[:a], ids[a + len(hello):b], ids[b + len(world):])
        self.pair_types = (types[:a], types[a], types[a + len(hello):b], types[b], types[b + len(world):])

    def content(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _find(full: list[int], part: list[int], start: int = 0) -> int:
    for at in range(start, len(full) - len(part) + 1):
        if full[at:at + len(part)] == part:
            return at
    raise FolderError("the tokenizer's template hides its content tokens (probe 'hello' not found in its output)")


# ---------------------------------------------------------------- BERT-family encoders
_ACTIVATIONS = {"gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
                "gelu_fast": nn.gelu_fast_approx, "relu": nn.relu, "silu": nn.silu, "swish": nn.silu}


class _Dense(nn.Module):
    def __init__(self, inputs: int, outputs: int, norm_eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(inputs, outputs)
        if norm_eps is not None:
            self.LayerNorm = nn.LayerNorm(outputs, eps=norm_eps)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))


class _Attention(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _Dense(hidden, hidden, eps)


class _Layer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, eps)
        self.intermediate = _Dense(hidden, intermediate)
        self.output = _Dense(intermediate, hidden, eps)


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        if c.get("type_vocab_size", 2) > 0:
            self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))


class _Stack(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        eps = c.get("layer_norm_eps", 1e-12)
        self.layer = [_Layer(c["hidden_size"], c["intermediate_size"], eps) for _ in range(c["num_hidden_layers"])]


class Encoder(nn.Module):
    """A BERT-family encoder; `head` "bert" or "roberta" adds that family's one-label classifier."""

    def __init__(self, c: dict, head: str | None = None):
        super().__init__()
        self.heads = c["num_attention_heads"]
        self.activation = _ACTIVATIONS[c.get("hidden_act", "gelu")]
        self.roberta = c["model_type"] in ROBERTA_TYPES
        self.pad_id = c.get("pad_token_id", 1 if self.roberta else 0) or 0
        self.embeddings = _Embeddings(c)
        self.encoder = _Stack(c)
        self.head = head
        hidden = c["hidden_size"]
        if head == "bert":
            self.pooler = _Dense(hidden, hidden)
            self.classifier = nn.Linear(hidden, 1)
        elif head == "roberta":
            self.classifier = {"dense": nn.Linear(hidden, hidden), "out_proj": nn.Linear(hidden, 1)}

    @property
    def positions(self) -> int:
        """How many tokens fit (RoBERTa's positions start after the pad id)."""
        count = self.embeddings.position_embeddings.weight.shape[0]
        return count - (self.pad_id + 1 if self.roberta else 0)

    def __call__(self, ids: mx.array, lengths: np.ndarray, type_ids: mx.array) -> mx.array:
        batch, length = ids.shape
        positions = mx.arange(length)[None, :] + (self.pad_id + 1 if self.roberta else 0)
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(positions)
        if "token_type_embeddings" in e:
            x = x + e.token_type_embeddings(type_ids)
        x = e.LayerNorm(x)
        mask = _pad_mask(lengths, length, x.dtype)
        width = x.shape[-1] // self.heads
        for layer in self.encoder.layer:
            a = layer.attention.self
            q, k, v = (proj(x).reshape(batch, length, self.heads, width).transpose(0, 2, 1, 3)
                       for proj in (a.query, a.key, a.value))
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(width), mask=mask)
            o = o.transpose(0, 2, 1, 3).reshape(batch, length, -1)
            out = layer.attention.output
            x = out.LayerNorm(out.dense(o) + x)
            y = layer.output.dense(self.activation(layer.intermediate.dense(x)))
            x = layer.output.LayerNorm(y + x)
        return x

    def classify(self, hidden: mx.array) -> mx.array:
        first = hidden[:, 0]
        if self.head == "bert":
            return self.classifier(mx.tanh(self.pooler.dense(first)))
        return self.classifier["out_proj"](mx.tanh(self.classifier["dense"](first)))


def _pad_mask(lengths: np.ndarray, length: int, dtype) -> mx.array | None:
    """None when no row is padded; else an additive mask materialised to [B, 1, L, L]."""
    if bool((lengths == length).all()):
        return None
    keep = np.arange(length)[None, :] < lengths[:, None]
    add = np.where(keep, 0.0, -1e9).astype(np.float32)[:, None, None, :]
    return mx.array(np.broadcast_to(add, (len(lengths), 1, length, length)).copy()).astype(dtype)


def _encoder_weights(raw: dict, head: str | None) -> dict:
    """Hugging Face checkpoint names -> ours: prefixes off, old LayerNorm names, unused heads dropped."""
    out = {}
    for name, value in raw.items():
        for prefix in ("bert.", "roberta.", "model."):
            name = name.removeprefix(prefix)
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.endswith("position_ids") or name.startswith(("cls.", "lm_head.")):
            continue
        if name.startswith("pooler.") and head != "bert":
            continue
        out[name] = value
    return out


# ---------------------------------------------------------------- loading
def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _weights(folder: Path) -> dict:
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise FolderError(f"{folder} has no safetensors weights (pytorch_model.bin is not read; convert the "
                          f"folder to safetensors)")
    weights = {}
    for file in files:
        weights.update(mx.load(str(file)))
    return weights


def _load_strictly(model: nn.Module, weights: dict, folder: Path) -> None:
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise FolderError(f"{folder}: the weights do not fit the model its config.json describes: {exc}") from None


def _encoder(folder: Path, config: dict, kind: FolderKind) -> Encoder:
    if config.get("model_type") not in ENCODER_TYPES:
        raise FolderError(f"{folder}: encoder type {config.get('model_type')!r} is not implemented "
                          f"(these are: {', '.join(ENCODER_TYPES)})")
    head = None
    if kind.kind == RERANKER:
        head = "bert" if config["model_type"] == "bert" else "roberta"
    model = Encoder(config, head)
    _load_strictly(model, _encoder_weights(_weights(folder), head), folder)
    return model


def _decoder(folder: Path, config: dict, kind: FolderKind) -> nn.Module:
    if kind.kind == RERANKER:
        raise FolderError(f"{folder}: decoder rerankers (scored by the logits of 'yes' and 'no', as "
                          f"Qwen3-Reranker is) are not served; cross-encoders and embedding models are")
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"]).replace("-", "_")
    try:
        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise FolderError(f"{folder}: mlx-lm has no model for model_type {config['model_type']!r}") from None
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if "model" not in model:
        raise FolderError(f"{folder}: mlx-lm's {model_type} model has no `model` backbone to take hidden states from")
    if "lm_head" in model:
        del model["lm_head"]  # embeddings come from the hidden states: the head never runs
    weights = {k: v for k, v in _weights(folder).items() if not k.startswith("lm_head.")}
    if not any(k.startswith("model.") for k in weights):
        weights = {f"model.{k}": v for k, v in weights.items()}  # saved by the base model class (Qwen3Model)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization")
    if config.get("quantization_config") and not quantization:
        raise FolderError(f"{folder}: quantization_config checkpoints (GPTQ, AWQ, ...) are not served; convert "
                          f"the model with mlx_lm.convert")
    if quantization:
        def quantized(path: str, module: nn.Module):
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=quantized)
    _load_strictly(model, weights, folder)
    return model


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").exists():
        raise FolderError(f"{folder} has no tokenizer.json (a vocab.txt or sentencepiece model alone is not "
                          f"read; save the tokenizer with a fast tokenizer)")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _window(folder: Path, positions: int) -> int:
    """The tokens one input may take: the model's positions, or less where the folder says so."""
    window = positions
    for limit in ((_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length"),
                  (_json(folder / "tokenizer_config.json") or {}).get("model_max_length")):
        if isinstance(limit, int) and 0 < limit < window:
            window = limit
    return window


def _check_modules(folder: Path, kind: FolderKind) -> None:
    modules = _json(folder / "modules.json") or []
    others = [m.get("type") for m in modules if isinstance(m, dict) and not str(m.get("type", "")).endswith(
        SERVED_MODULES)]
    if others:
        raise FolderError(f"{folder}: modules.json lists modules this server does not run: {others}")
    if kind.kind == EMBEDDING and kind.pooling not in POOLINGS:
        raise FolderError(f"{folder}: pooling {kind.pooling!r} is not served (these are: {', '.join(POOLINGS)})")
    pooling = _json(folder / "1_Pooling" / "config.json") or {}
    if pooling.get("include_prompt") is False:
        raise FolderError(f"{folder}: pooling that leaves the prompt out (include_prompt: false) is not served")


def _matryoshka(config: dict) -> list[int] | bool:
    """The sizes `dimensions` may ask for (vLLM's config keys): a list, True for any, False for none."""
    if config.get("matryoshka_dimensions"):
        return [int(d) for d in config["matryoshka_dimensions"]]
    return bool(config.get("is_matryoshka"))


def _sigmoid_scores(config: dict, st: dict) -> bool:
    """Whether a cross-encoder's logit goes through a sigmoid (sentence-transformers' default for one label)."""
    name = ((config.get("sentence_transformers") or {}).get("activation_fn")
            or config.get("sbert_ce_default_activation_function") or st.get("activation_fn") or "Sigmoid")
    return not name.endswith("Identity")


# ---------------------------------------------------------------- the engine
class Engine:
    """A loaded model: `encode_*` and `rerank_inputs` make sequences, `run` computes a batch of them."""

    def __init__(self, folder: Path, kind: FolderKind, tokenizer, model: nn.Module, config: dict, window: int):
        self.folder, self.kind, self.tokenizer, self.model, self.config = folder, kind, tokenizer, model, config
        self.template = Template(tokenizer)
        self.window = window
        self.dimensions = config["hidden_size"]
        self.matryoshka = _matryoshka(config)
        st = _json(folder / "config_sentence_transformers.json") or {}
        self.prompts = {k: v for k, v in (st.get("prompts") or {}).items() if isinstance(v, str)}
        self.sigmoid = kind.kind == RERANKER and _sigmoid_scores(config, st)
        self.vocab = config.get("vocab_size") or tokenizer.get_vocab_size()
        self.pad_id = config.get("pad_token_id") or 0

    @classmethod
    def load(cls, folder: Path, kind: FolderKind | None = None) -> "Engine":
        """Load `folder` (its kind read from its files unless given); raises `FolderError`."""
        folder = Path(folder)
        kind = kind or kind_of(folder)
        if kind.kind not in (EMBEDDING, RERANKER):
            raise FolderError(f"{folder} holds a {kind.kind} model ({kind.reason}); this server serves embedding "
                              f"models and cross-encoder rerankers")
        config = _json(folder / "config.json")
        _check_modules(folder, kind)
        tokenizer = _tokenizer(folder)
        if kind.backbone == DECODER:
            model = _decoder(folder, config, kind)
            positions = config.get("max_position_embeddings") or DECODER_WINDOW
        else:
            model = _encoder(folder, config, kind)
            positions = model.positions
        mx.eval(model.parameters())
        model.eval()
        return cls(folder, kind, tokenizer, model, config, _window(folder, positions))

    @property
    def is_reranker(self) -> bool:
        return self.kind.kind == RERANKER

    # ---- tokenizing (any thread)
    def prompt(self, name: str | None) -> str:
        """The sentence-transformers prompt called `name` ("query", "document"); none for a model without it."""
        if name is None or (name not in self.prompts and name in ("query", "document")):
            return ""
        if name not in self.prompts:
            raise Refused(f"this model has no prompt {name!r}; it has {sorted(self.prompts) or 'none'}",
                          param="input_type")
        return self.prompts[name]

    def encode_texts(self, texts: list[str], prompt: str = "", truncate: str = "none", limit: int | None = None,
                     param: str = "input") -> list[Sequence]:
        before, after = self.template.single
        room = max(min(limit or self.window, self.window) - len(before) - len(after), 1)
        contents = self.template.content([prompt + text for text in texts])
        return [Sequence(before + self._fit(ids, room, truncate, param, i) + after) for i, ids in enumerate(contents)]

    def encode_ids(self, rows: list[list[int]], truncate: str = "none", limit: int | None = None) -> list[Sequence]:
        out = []
        for i, ids in enumerate(rows):
            if not ids:
                raise Refused(f"input[{i}] is an empty list of token ids", param="input")
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab),
                       None)
            if bad is not None:
                raise Refused(f"input[{i}] holds token id {bad!r}, outside this model's vocabulary "
                              f"(0..{self.vocab - 1}); token ids must come from this model's tokenizer (an OpenAI "
                              f"client's tiktoken ids do not)", param="input")
            out.append(Sequence(self._fit(list(ids), min(limit or self.window, self.window), truncate, "input", i)))
        return out

    def rerank_inputs(self, query: str, documents: list[str], truncate: str = "end",
                      document_tokens: int | None = None) -> list[Sequence]:
        """A cross-encoder's (query, document) pairs; for an embedding model the query, then each document.
        `document_tokens` caps each document (Cohere's max_tokens_per_doc)."""
        if not self.is_reranker:
            return (self.encode_texts([query], self.prompt("query"), truncate, None, "query")
                    + self.encode_texts(documents, self.prompt("document"), truncate, document_tokens, "documents"))
        before, between, after = self.template.pair
        type_before, type_a, type_between, type_b, type_after = self.template.pair_types
        q = self.template.content([query])[0]
        room = self.window - len(before) - len(between) - len(after) - len(q)
        if room < 1:
            raise Refused(f"the query is {len(q)} tokens long, which leaves no room for a document in this model's "
                          f"{self.window}-token window", param="query", kind="context_length_exceeded")
        out = []
        for i, d in enumerate(self.template.content(documents)):
            d = self._fit(d[:document_tokens] if document_tokens else d, room, truncate, "documents", i)
            out.append(Sequence(before + q + between + d + after,
                                type_before + [type_a] * len(q) + type_between + [type_b] * len(d) + type_after))
        return out

    def rerank_scores(self, outputs: np.ndarray) -> np.ndarray:
        """Scores of the documents from `run`'s answer to `rerank_inputs`: a cross-encoder's own,
        else the cosine of each document's vector with the query's."""
        if self.is_reranker:
            return np.asarray(outputs, dtype=np.float64)
        vectors = _normalised(np.asarray(outputs, dtype=np.float64))
        return vectors[1:] @ vectors[0]

    def _fit(self, ids: list[int], room: int, truncate: str, param: str, index: int) -> list[int]:
        if len(ids) <= room:
            return ids
        if truncate == "end":
            return ids[:room]
        if truncate == "start":
            return ids[len(ids) - room:]
        raise Refused(f"{param}[{index}] is {len(ids) + self.window - room} tokens long; this model's window is "
                      f"{self.window} tokens. Shorten it, or ask for truncation (\"truncate\": true, or "
                      f"\"truncate_prompt_tokens\": N)", param=param, kind="context_length_exceeded")

    # ---- dimensions
    def check_dimensions(self, dimensions: int | None) -> int | None:
        """The size to shorten vectors to (None: keep them whole); refuses one the model does not offer."""
        if dimensions is None:
            return None
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise Refused("dimensions must be a positive integer", param="dimensions")
        if dimensions == self.dimensions:
            return None
        if not self.matryoshka:
            raise Refused(f"this model's embeddings have {self.dimensions} dimensions and it was not trained for "
                          f"shorter ones (Matryoshka); omit dimensions", param="dimensions")
        sizes = self.matryoshka if isinstance(self.matryoshka, list) else range(1, self.dimensions + 1)
        if dimensions not in sizes:
            offered = self.matryoshka if isinstance(self.matryoshka, list) else f"1 to {self.dimensions}"
            raise Refused(f"dimensions={dimensions} is not offered; this model offers {offered}", param="dimensions")
        return dimensions

    @staticmethod
    def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """The first `dimensions` of each vector, normalised again."""
        return vectors if dimensions is None else _normalised(vectors[:, :dimensions])

    # ---- compute (the batch worker only)
    def run(self, seqs: list[Sequence]) -> np.ndarray:
        """Scores [B] for a cross-encoder, else L2-normalised vectors [B, D] (float32)."""
        length = max(len(s.ids) for s in seqs)
        ids = np.full((len(seqs), length), self.pad_id, dtype=np.int32)
        types = np.zeros((len(seqs), length), dtype=np.int32)
        for row, s in enumerate(seqs):
            ids[row, :len(s.ids)] = s.ids
            if s.type_ids:
                types[row, :len(s.type_ids)] = s.type_ids
        lengths = np.array([len(s.ids) for s in seqs], dtype=np.int32)
        if self.kind.backbone == DECODER:
            hidden = self.model.model(mx.array(ids))  # the causal mask hides the right pads from real tokens
        else:
            hidden = self.model(mx.array(ids), lengths, mx.array(types))
        out = self._score(hidden) if self.is_reranker else self._pool(hidden.astype(mx.float32), mx.array(lengths))
        mx.eval(out)
        return np.array(out)

    def _score(self, hidden: mx.array) -> mx.array:
        logits = self.model.classify(hidden).astype(mx.float32)[:, 0]
        return mx.sigmoid(logits) if self.sigmoid else logits

    def _pool(self, hidden: mx.array, lengths: mx.array) -> mx.array:
        pooling = self.kind.pooling
        if pooling == "lasttoken":
            v = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        elif pooling == "cls":
            v = hidden[:, 0]
        else:
            keep = (mx.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]
            if pooling == "max":
                v = mx.where(keep, hidden, -mx.inf).max(axis=1)
            else:
                v = (hidden * keep).sum(axis=1) / lengths[:, None].astype(mx.float32)
        return v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    def describe(self) -> dict:
        return {"kind": self.kind.kind, "backbone": self.kind.backbone, "reason": self.kind.reason,
                "model_type": self.kind.model_type, "pooling": self.kind.pooling, "dimensions": self.dimensions,
                "window": self.window, "matryoshka": self.matryoshka, "prompts": sorted(self.prompts)}


def _normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
