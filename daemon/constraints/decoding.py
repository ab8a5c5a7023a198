"""Generation held to a grammar in mlx_lm: the model's tokenizer as llguidance sees it, the grammar
a request asks for (`spec_for`), and the logits processor that masks every token the grammar does
not allow (`ConstrainedLogits`), in mlx_lm's sequential path (`generate_step`) and its batched one
(`GenerationBatch._step`, one processor per row) alike.

Tool calls are held in the form mlx_lm's `json_tools` parser reads (Qwen2.5, Hermes):
`<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, with both tags single tokens.
A model whose calls take another form gets no held calls (logged); its other constraints stay.

MLX arrays belong to the thread that made them: mlx_lm.server builds a request's processor in the
HTTP thread and calls it in the generation thread, and an array made in the former kills the latter
("There is no Stream(cpu, 0) in current thread"). So nothing here makes an array before its first
call, and the processor never raises: in mlx_lm's batched loop an exception ends the generation
thread, and the server with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

from .schemas import JSON_LAYOUT, RESPONSE_SCHEMA, ConstraintError, Requested, Tool, prepare, requested

log = logging.getLogger("mlxgate.constraints")
JSON_TOOLS = "mlx_lm.tool_parsers.json_tools"
ANY_OBJECT = json.dumps({"type": "object", "x-guidance": JSON_LAYOUT})


class GrammarError(ConstraintError):
    """A grammar llguidance cannot build for this tokenizer (a schema check passed: rare)."""

    code = "invalid_schema"


# ---------------------------------------------------------------- the tokenizer
@dataclass(frozen=True)
class GrammarTokenizer:
    """llguidance's view of one model's tokenizer and the tokens the grammars name."""

    ll: Any                                  # llguidance.LLTokenizer
    eos: tuple[int, ...]                     # the tokens that end an answer
    tool_call: Optional[tuple[int, int]]     # <tool_call>, </tool_call> when calls are json_tools calls
    think_end: Optional[tuple[int, ...]]     # the tokens that close a reasoning block


_tokenizers: "weakref.WeakKeyDictionary[Any, GrammarTokenizer]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer) -> GrammarTokenizer:
    """The GrammarTokenizer of an mlx_lm TokenizerWrapper, built once (0.2-20 s for a 100-200k
    vocabulary, so `serve` builds it when the model loads); concurrent callers wait for one build."""
    with _tokenizers_lock:
        built = _tokenizers.get(tokenizer)
        if built is None:
            built = _tokenizers[tokenizer] = _build(tokenizer)
        return built


def has_grammar_tokenizer(tokenizer) -> bool:
    return tokenizer in _tokenizers


def _build(tokenizer) -> GrammarTokenizer:
    hf = tokenizer._tokenizer  # the Hugging Face tokenizer inside mlx_lm's TokenizerWrapper
    eos = tuple(sorted(set(tokenizer.eos_token_ids)))
    ll = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=list(eos))
    tool_call = None
    parser = getattr(tokenizer, "tool_parser", None)
    starts, ends = getattr(tokenizer, "tool_call_start_tokens", None), getattr(tokenizer, "tool_call_end_tokens", None)
    if getattr(parser, "__module__", None) == JSON_TOOLS and len(starts or ()) == 1 and len(ends or ()) == 1:
        tool_call = (starts[0], ends[0])
    think_end = tuple(tokenizer.think_end_tokens) if tokenizer.has_thinking else None
    return GrammarTokenizer(ll, eos, tool_call, think_end)


# ---------------------------------------------------------------- the grammar
@dataclass(frozen=True)
class Spec:
    """An llguidance grammar (Lark) and how it applies: from the first token, or (`trigger` set)
    to the text after each `trigger` token, the text before it free, and after it free again if
    `repeat` (else the answer ends). `where` is the request field the grammar comes from."""

    grammar: str
    kind: str
    where: str
    trigger: Optional[int] = None
    repeat: bool = False


def spec_for(wanted: Requested, gt: GrammarTokenizer) -> Optional[Spec]:
    """The grammar for what a request asks; None when nothing can be held. Raises ConstraintError."""
    answer = _answer_rule(wanted)
    if wanted.calls is None:
        return Spec(f"start: answer\n{answer}", wanted.answer, "response_format")
    if gt.tool_call is None:
        log.warning("structured output: this model's tool calls are not json_tools calls in single-token "
                    "<tool_call> tags; the answer is not held (tool_choice %s)", wanted.calls)
        return None
    start, end = gt.tool_call
    calls = f"call: <[{start}]> tool_call\n{_call_rules(wanted.tools, end)}"
    several = 'call ("\\n"? call)*' if wanted.parallel else "call"
    if wanted.calls == "required":
        return Spec(f"start: {several}\n{calls}", "tool_calls", "tools")
    if answer:
        return Spec(f"start: answer | {several}\n{answer}{calls}", f"tool_calls or {wanted.answer}", "tools")
    return Spec(f"start: tool_call\n{_call_rules(wanted.tools, end)}", "tool_calls_auto", "tools",
                trigger=start, repeat=wanted.parallel)


def _answer_rule(wanted: Requested) -> str:
    if wanted.answer == "json_schema":
        return f"answer: %json {prepare(wanted.schema, RESPONSE_SCHEMA)}\n"
    if wanted.answer == "json_object":
        return f"answer: %json {ANY_OBJECT}\n"
    return ""


def _call_rules(tools: tuple[Tool, ...], end: int) -> str:
    """`tool_call`: the text after <tool_call>, up to and with </tool_call>."""
    names = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = [f'tool_call: "\\n" ({names}) "\\n" <[{end}]>']
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "arguments": '
        arguments = ANY_OBJECT if tool.parameters is None else prepare(tool.parameters, tool.where)
        rules += [f'call_{i}: {json.dumps(head, ensure_ascii=False)} arguments_{i} "}}"',
                  f"arguments_{i}: %json {arguments}"]
    return "\n".join(rules) + "\n"


def processor_for(body: dict, tokenizer, *, overlap: bool = False) -> Optional["ConstrainedLogits"]:
    """The processor for an OpenAI chat body, None when it asks for nothing (or nothing can be held).
    Raises ConstraintError: answer 400."""
    wanted = requested(body)
    if wanted is None:
        return None
    for schema, where in wanted.schemas():  # a schema's refusal comes before the tokenizer's first build
        prepare(schema, where)
    gt = grammar_tokenizer(tokenizer)
    spec = spec_for(wanted, gt)
    return None if spec is None else ConstrainedLogits(spec, gt, overlap=overlap)


# ---------------------------------------------------------------- the processor
_per_thread = threading.local()


def _bits() -> mx.array:
    bits = getattr(_per_thread, "bits", None)
    if bits is None:
        bits = _per_thread.bits = mx.arange(32, dtype=mx.uint32)
    return bits


@mx.compile
def _apply_bitmask(logits: mx.array, words: mx.array, bits: mx.array) -> mx.array:
    v, w = logits.shape[-1], words.shape[0]
    allow = ((words[:, None] >> bits[None, :]) & 1).reshape(1, w * 32)[:, :v]
    return mx.where(allow.astype(mx.bool_), logits, -mx.inf)


def apply_bitmask(logits: mx.array, words: mx.array) -> mx.array:
    """logits (1, V); words (W,) uint32, bit t & 31 of word t >> 5 set: token t allowed. Shifts
    broadcast, no gather: ~0.2 ms for V = 200k on a CPU (a gather of V indices, or numpy's
    unpackbits and a bool array, cost 1-8 ms), fused by mx.compile."""
    return _apply_bitmask(logits, words, _bits())


class ConstrainedLogits:
    """mlx_lm logits processor `(tokens, logits) -> logits`, one per request (per batch row).

    Its first call takes `tokens` as the prompt; at each later call the tokens added since are
    what was sampled, and go to the grammar. Once the grammar is complete only the end tokens are
    allowed, so the answer ends there (finish_reason "stop"). `begin` (called where mlx_lm.server
    tokenizes the request) says whether the prompt leaves the model inside a reasoning block: the
    text is then free until the block closes.

    `overlap`: start the forward pass (mx.async_eval) before the mask is computed on the CPU: free
    on a GPU; on the CPU backend it pays in a batch and costs alone.
    `error` is set (and the answer ended) if anything fails; `masked_steps`, `mask_seconds` and
    `cpu_seconds` are for the log line."""

    def __init__(self, spec: Spec, gt: GrammarTokenizer, *, overlap: bool = False):
        self.spec, self.gt, self.overlap = spec, gt, overlap
        self._start = llguidance.LLMatcher(gt.ll, spec.grammar, log_level=0)
        if self._start.is_error():
            raise GrammarError(spec.where, f"the grammar cannot be built: {self._start.get_error()}")
        self.matcher = None if spec.trigger is not None else self._start.deep_copy()
        self.thinking = False
        self.done = False
        self.error: Optional[str] = None
        self._prompt: Optional[int] = None  # prompt tokens seen on the first call
        self._sampled: list[int] = []
        self._words = np.zeros((1, (gt.ll.vocab_size + 31) // 32), dtype=np.int32)
        self._eos_only: Optional[mx.array] = None  # made on first use, in the generation thread
        self.masked_steps = 0
        self.mask_seconds = 0.0
        self.cpu_seconds = 0.0

    def begin(self, initial_state: str) -> None:
        """mlx_lm.server's initial text state for the request ("normal" or "reasoning")."""
        self.thinking = initial_state == "reasoning" and self.gt.think_end is not None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        started = time.thread_time()
        try:
            self._advance(self._new_tokens(tokens))
            return self._mask(logits)
        except Exception as e:  # noqa: BLE001 - the generation thread must live: end this answer instead
            if self.error is None:
                self.error = f"{type(e).__name__}: {e}"
                log.exception("structured output failed; the answer ends here")
            self.done = True
            try:
                return self._force_eos(logits)
            except Exception:  # noqa: BLE001
                return logits
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _new_tokens(self, tokens: mx.array) -> list[int]:
        n = tokens.size
        if self._prompt is None:
            self._prompt = n
            return []
        seen = self._prompt + len(self._sampled)
        if n == seen + 1:
            return [tokens[-1].item()]  # the usual step; waits for the previous step's sample
        if n < seen:
            raise RuntimeError(f"{seen - n} tokens were taken back (speculative decoding is not supported)")
        return tokens[seen:].tolist()

    def _advance(self, new: list[int]) -> None:
        for token in new:
            self._sampled.append(token)
            if self.done:
                continue
            if self.thinking:
                end = self.gt.think_end
                self.thinking = tuple(self._sampled[-len(end):]) != end
                continue
            if self.matcher is None:  # free text, waiting for the trigger
                if token == self.spec.trigger:
                    self.matcher = self._start.deep_copy()
                continue
            if not self.matcher.consume_token(token):
                raise RuntimeError(self.matcher.get_error() or f"the grammar rejected token {token}")
            if self.matcher.is_stopped():  # nothing can follow: the grammar is complete
                if self.spec.repeat:
                    self.matcher = None  # free text again after a tool call
                else:
                    self.done = True

    def _mask(self, logits: mx.array) -> mx.array:
        if self.done:
            return self._force_eos(logits)
        if self.thinking or self.matcher is None:
            return logits
        if self.overlap:
            mx.async_eval(logits)
        started = time.perf_counter()
        fill_next_token_bitmask(self.matcher, self._words, 0)  # drops the GIL
        self.mask_seconds += time.perf_counter() - started
        self.masked_steps += 1
        if self.matcher.is_error():
            raise RuntimeError(self.matcher.get_error())
        words = self._words[0].view(np.uint32)
        width = (logits.shape[-1] + 31) // 32
        if words.size < width:  # logits wider than the tokenizer (Qwen2.5: 151,936 > 151,665): extra ids banned
            words = np.pad(words, (0, width - words.size))
        return apply_bitmask(logits, mx.array(words))

    def _force_eos(self, logits: mx.array) -> mx.array:
        if self._eos_only is None or self._eos_only.shape[-1] != logits.shape[-1]:
            allow = np.zeros(logits.shape[-1], dtype=bool)
            allow[[e for e in self.gt.eos if e < logits.shape[-1]]] = True
            self._eos_only = mx.array(allow)
        return mx.where(self._eos_only, logits, -mx.inf)
