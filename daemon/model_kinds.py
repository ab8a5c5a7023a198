"""What kind of model a Hugging Face or MLX folder holds, read from its small files alone (no weights).

    kind_of(folder) -> FolderKind(kind, backbone, pooling, reason, model_type, architectures)

The rules are tried in order and the first that holds decides (`RULES`; a new kind is a new row):

| rule | the folder                                                                   | kind        |
| ---- | ---------------------------------------------------------------------------- | ----------- |
| 0    | the gateway's model entry names a kind (`override`)                          | that kind   |
| 1    | has no readable config.json                                                  | unsupported |
| 2    | config_sentence_transformers.json says `"model_type": "CrossEncoder"`        | reranker    |
| 3    | an architecture `*ForSequenceClassification` with one label                 | reranker    |
| 4    | `*ForSequenceClassification` with more labels (a classifier)                 | unsupported |
| 5    | a sentence-transformers Pooling module (modules.json or 1_Pooling/)          | embedding   |
| 6    | a bare encoder (`BertModel`, `XLMRobertaModel`, ... or no architecture)      | embedding   |
| 7    | an encoder with another head (masked LM, token classification)               | unsupported |
| 8    | a `vision_config` and a vision-language model_type mlx-vlm serves (`VISION_TYPES`) | vision |
| 9    | `*ForCausalLM`, `*ForConditionalGeneration`, `*LMHeadModel`, or a model_type mlx-lm builds | chat |
| 10   | anything else                                                                | unsupported |

`backbone` says how an embedding or reranker model runs: `decoder` when its model_type is causal
(rule 8's test), else `encoder`; None for the other kinds. `pooling`, for embedding models only, is
the sentence-transformers Pooling mode ("mean", "cls", "max", "lasttoken"; several joined by "+"),
else the sentence-transformers default for the backbone (mean for an encoder, last token for a decoder).

Folder names are never read ("embedding" in a name proves nothing). Qwen3-Embedding's config.json
says Qwen3ForCausalLM like a chat model: only its sentence-transformers files tell it apart (rule 5).
Qwen3-Reranker as published has none of them: it is chat unless the model entry says otherwise.
A vision-language folder (Qwen2.5-VL, Gemma 3, Pixtral...) is vision (served by mlx-vlm, the
`vision` extra); `kind: chat` in its model entry serves its language model alone, as mlx-lm does.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

CHAT, EMBEDDING, RERANKER, VISION, UNSUPPORTED = "chat", "embedding", "reranker", "vision", "unsupported"
KINDS = (CHAT, EMBEDDING, RERANKER, VISION, UNSUPPORTED)
ENCODER, DECODER = "encoder", "decoder"

ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm_roberta", "camembert", "distilbert", "electra", "mpnet", "modernbert",
    "nomic_bert", "new", "deberta", "deberta-v2", "jina_bert", "ernie", "mobilebert",
})
VISION_TYPES = frozenset({  # mlx-vlm 0.7.10's image-reading model types (its models/ folders)
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "gemma3n", "gemma4", "mistral3", "pixtral",
    "llava", "llava_next", "llava_bunny", "idefics2", "idefics3", "smolvlm", "mllama", "paligemma", "phi3_v",
    "internvl_chat", "kimi_vl", "deepseek_vl_v2", "molmo", "florence2", "aya_vision", "lfm2_vl", "glm4v",
    "glm4v_moe", "mistral4",
})
CAUSAL_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class FolderKind:
    kind: str
    reason: str
    backbone: str | None = None  # ENCODER or DECODER for embedding and reranker models
    pooling: str | None = None  # embedding models only
    model_type: str = ""
    architectures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Facts:
    """What the rules read from a folder."""

    config: dict | None
    model_type: str = ""
    architectures: tuple[str, ...] = ()
    labels: int = 1
    cross_encoder: bool = False  # config_sentence_transformers.json says CrossEncoder
    st_pooling: str | None = None  # the sentence-transformers Pooling mode, when there is such a module

    @property
    def head(self) -> str:
        return self.architectures[0] if self.architectures else "no architecture"

    @property
    def encoder(self) -> bool:
        return self.model_type in ENCODER_TYPES

    @property
    def bare(self) -> bool:
        return not self.architectures or any(a.endswith("Model") and not a.endswith("LMHeadModel")
                                             for a in self.architectures)

    @property
    def classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    @property
    def vision(self) -> bool:
        return (isinstance((self.config or {}).get("vision_config"), dict)
                and self.model_type.replace("-", "_") in VISION_TYPES)

    @property
    def causal(self) -> bool:
        return not self.encoder and (any(a.endswith(CAUSAL_SUFFIXES) for a in self.architectures)
                                     or self.model_type.replace("-", "_") in mlx_lm_types())


@dataclass(frozen=True)
class Rule:
    holds: Callable[[Facts], bool]
    kind: str
    reason: str  # formatted with the facts as `f`


RULES = (
    Rule(lambda f: f.config is None, UNSUPPORTED, "no readable config.json"),
    Rule(lambda f: f.cross_encoder, RERANKER, "config_sentence_transformers.json: CrossEncoder ({f.head})"),
    Rule(lambda f: f.classifier and f.labels == 1, RERANKER, "{f.head} with one label"),
    Rule(lambda f: f.classifier, UNSUPPORTED, "{f.head} with {f.labels} labels: a classifier, not a reranker"),
    Rule(lambda f: f.st_pooling is not None, EMBEDDING, "sentence-transformers pooling ({f.st_pooling}) over {f.head}"),
    Rule(lambda f: f.encoder and f.bare, EMBEDDING, "a bare {f.model_type} encoder without pooling files"),
    Rule(lambda f: f.encoder, UNSUPPORTED, "a {f.model_type} encoder with a {f.head} head"),
    Rule(lambda f: f.vision, VISION, "a vision-language model ({f.model_type}, {f.head})"),
    Rule(lambda f: f.causal, CHAT, "a causal language model ({f.head})"),
    Rule(lambda f: True, UNSUPPORTED, "model_type {f.model_type!r} ({f.head}) is neither an mlx-lm model nor a "
                                      "known encoder"),
)


def kind_of(folder: Path, override: str | None = None) -> FolderKind:
    """The kind of model in `folder`; `override` (a kind from the model entry) wins over the rules."""
    facts = read_facts(Path(folder))
    if override is not None:
        if override not in KINDS:
            raise ValueError(f"kind {override!r} is not one of {', '.join(KINDS)}")
        return _verdict(facts, override, f"the model entry says kind: {override}")
    rule = next(rule for rule in RULES if rule.holds(facts))
    return _verdict(facts, rule.kind, rule.reason.format(f=facts))


def _verdict(facts: Facts, kind: str, reason: str) -> FolderKind:
    backbone = (DECODER if facts.causal else ENCODER) if kind in (EMBEDDING, RERANKER) else None
    pooling = None
    if kind == EMBEDDING:
        pooling = facts.st_pooling or ("lasttoken" if backbone == DECODER else "mean")
    return FolderKind(kind, reason, backbone, pooling, facts.model_type, facts.architectures)


def read_facts(folder: Path) -> Facts:
    config = _json(folder / "config.json")
    if not isinstance(config, dict):
        return Facts(None)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = str(config.get("model_type") or text_config.get("model_type") or "").lower()
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    st_config = _json(folder / "config_sentence_transformers.json")
    return Facts(config, model_type, tuple(str(a) for a in architectures), _labels(config),
                 isinstance(st_config, dict) and st_config.get("model_type") == "CrossEncoder",
                 pooling_mode(folder))


def pooling_mode(folder: Path) -> str | None:
    """The sentence-transformers Pooling module's mode, or None when the folder has no such module."""
    modules = _json(folder / "modules.json")
    listed = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")),
                  None) if isinstance(modules, list) else None
    config = _json(folder / ((listed or {}).get("path") or "1_Pooling") / "config.json")
    if not isinstance(config, dict):
        return "mean" if listed else None  # the module's own default
    if "pooling_mode" in config:
        return str(config["pooling_mode"])
    return "+".join(name for key, name in POOLING_KEYS.items() if config.get(key)) or "mean"


def _labels(config: dict) -> int:
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"]
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return 1


@cache
def mlx_lm_types() -> frozenset[str]:
    """The model_types mlx-lm builds (its model modules), found without importing mlx-lm."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    return frozenset(p.stem for p in models.glob("*.py") if not p.stem.startswith("_"))


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
