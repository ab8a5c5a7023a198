"""Fill-in-the-middle: the prompt a code model was trained on for "the code between PREFIX and
SUFFIX", built from the FIM tokens its tokenizer declares, and the tokens that end the middle.

An autocomplete plugin sends `/v1/completions` with `prompt` (the code before the cursor) and
`suffix` (the code after it). A model of one family below gets that family's FIM prompt; its
answer is the middle, and generation stops at the family's end-of-middle tokens (those its
tokenizer has). A model whose tokenizer has none of these forms has no FIM: a 400 says so.

Each form is a row of `FORMS`, tried in order; the first whose tokens are all in the tokenizer
(its added tokens or its vocabulary) wins.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Form:
    family: str
    prefix: str
    suffix: str
    middle: str | None        # None: the form has no middle token (the prompt ends with the prefix)
    suffix_first: bool         # SPM (suffix, then prefix) instead of PSM
    stops: tuple[str, ...]     # what ends the middle, where the tokenizer has them

    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.prefix, self.suffix, self.middle) if t)

    def prompt(self, prefix: str, suffix: str) -> str:
        if self.suffix_first:
            return f"{self.suffix}{suffix}{self.prefix}{prefix}{self.middle or ''}"
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle or ''}"


FORMS: tuple[Form, ...] = (
    # Qwen2.5-Coder, Qwen3-Coder (and CodeGemma, which uses the same names)
    Form("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", False,
         ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>", "<|file_separator|>",
          "<eos>")),
    # StarCoder, StarCoder2, SantaCoder
    Form("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", False,
         ("<|endoftext|>", "<fim_pad>", "<file_sep>")),
    # DeepSeek-Coder (v1, V2)
    Form("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", False,
         ("<|EOT|>", "<｜end▁of▁sentence｜>")),
    # Codestral: [SUFFIX] suffix [PREFIX] prefix, the middle follows
    Form("codestral", "[PREFIX]", "[SUFFIX]", None, True, ("</s>",)),
    # CodeLlama: <PRE> prefix <SUF>suffix <MID>
    Form("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", False, ("▁<EOT>", "<EOT>", "</s>")),
)


@dataclass(frozen=True)
class Fim:
    form: Form
    stops: tuple[str, ...]     # the form's stop tokens this tokenizer has

    def prompt(self, prefix: str, suffix: str) -> str:
        if self.form.family == "codellama":  # its tokens are written without the word-start mark
            return f"<PRE> {prefix} <SUF>{suffix} <MID>"
        return self.form.prompt(prefix, suffix)


def tokenizer_tokens(folder: Path) -> set[str]:
    """Every token string the folder's tokenizer declares: added tokens and its vocabulary."""
    found: set[str] = set()
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text())
        found |= {t.get("content") for t in data.get("added_tokens") or () if isinstance(t, dict)}
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            found |= set(vocab)
        elif isinstance(vocab, list):  # unigram: [token, score] pairs
            found |= {entry[0] for entry in vocab if isinstance(entry, list) and entry}
    except (OSError, ValueError):
        pass
    try:
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        found |= {t.get("content") for t in (config.get("added_tokens_decoder") or {}).values() if isinstance(t, dict)}
    except (OSError, ValueError):
        pass
    found.discard(None)
    return found


def fim_of(folder: Path) -> Fim | None:
    """The FIM form of the model in `folder` (None: it has none), remembered while its tokenizer files
    stay the same."""
    stamps = tuple((name, _stamp(Path(folder) / name)) for name in ("tokenizer.json", "tokenizer_config.json"))
    return _fim_of(str(folder), stamps)


@functools.lru_cache(maxsize=256)
def _fim_of(folder: str, stamps: tuple) -> Fim | None:
    tokens = tokenizer_tokens(Path(folder))
    for form in FORMS:
        if all(t in tokens for t in form.tokens()):
            return Fim(form, tuple(s for s in form.stops if s in tokens))
    return None


def _stamp(path: Path) -> tuple:
    try:
        info = path.stat()
        return info.st_size, info.st_mtime_ns
    except OSError:
        return ()
