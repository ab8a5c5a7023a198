"""Three grammar engines on JSON Schema: which features each holds, and how long a schema takes to compile.

Engines: llguidance 1.9.1 (what mlxgate uses), xgrammar 0.2.8, outlines-core (newest on PyPI). They live in a
scratch venv, not in mlxgate's (xgrammar pulls torch):

    python3 -m venv /work/grammar-venv
    /work/grammar-venv/bin/pip install llguidance==1.9.1 xgrammar==0.2.8 outlines-core \
        jsonschema transformers tokenizers    # xgrammar pulls torch from PyPI (the CUDA build; runs on CPU)
    nice -n 10 /work/grammar-venv/bin/python bench/grammar_engines.py

Prints two Markdown tables. **Coverage**, a row per JSON Schema feature: `held` (compiles; the valid instance
is accepted, every invalid one rejected, and every random answer the matcher lets through validates),
`refused` (compiling raises; the message follows the table), `IGNORED` (compiles, yet an invalid instance or a
random answer gets through), `REJECTS VALID` (the valid instance is refused), `NOT JSON` (a random answer the
matcher let through does not parse), `compiles` (a row with nothing to violate). Instances are fed one byte token at a time, compact (`,` `:`), keys in schema order; answers are
sampled from the engine's mask with structural tokens weighted up (5 per row; those not ended in 600 tokens are
dropped). **Compile time** of a typical schema: to the first token mask, median of 5, then the mean time of
one mask along a valid answer (llguidance builds its lexer lazily, so part of its compiling happens there), for a
1,024 and a 150,000 token byte-level BPE vocabulary generated here (no hub needed); ~5 minutes on 2 cores.
Each engine runs with its defaults, except xgrammar's threads set to the machine's 2 cores.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import random
import statistics
import time

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# the two compared engines (and transformers, which two of them read tokenizers from) come from the
# bench's own venv (see above), not from mlxgate's declared dependencies
PreTrainedTokenizerFast = importlib.import_module("transformers").PreTrainedTokenizerFast
xgrammar = importlib.import_module("xgrammar")
outlines_core = importlib.import_module("outlines_core")
importlib.import_module("outlines_core.json_schema")

EOS = "<|endoftext|>"
OBJ = {"type": "object"}

# name, schema, a valid instance, invalid instances
FEATURES = [
    ("type/properties/required", {**OBJ, "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                  "required": ["a", "b"]}, {"a": 1, "b": "x"}, [{"a": 1}, {"a": "1", "b": "x"}]),
    ("additional properties (schema default: allowed)", {**OBJ, "properties": {"a": {"type": "integer"}}},
     {"a": 1, "z": 2}, [{"a": "1"}]),
    ("additionalProperties false", {**OBJ, "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     {"a": 1}, [{"a": 1, "z": 2}]),
    ("enum", {"enum": ["red", "green", 3]}, "green", ["blue", 4]),
    ("const", {"const": "v1"}, "v1", ["v2"]),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", ["a", "abcde"]),
    ("raw control character in a string", {"type": "string"}, "a\tb", [b'"a\x01b"']),
    ("... in a string with maxLength", {"type": "string", "maxLength": 4}, "a\tb", [b'"a\x01b"']),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", ["ab-123", "AB-1234"]),
    ("pattern with look-around", {"type": "string", "pattern": "^(?!admin)[a-z]+$"}, "bob", ["admin"]),
    ("format date-time", {"type": "string", "format": "date-time"}, "2024-02-29T12:00:00Z",
     ["2024-13-01T00:00:00Z", "yesterday"]),
    ("format email", {"type": "string", "format": "email"}, "a.b@example.com", ["not-an-email"]),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000",
     ["123e4567-e89b-12d3-a456-42661417400", "xyz"]),
    ("unknown format", {"type": "string", "format": "x-color"}, "anything", []),
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 12}, 12, [0, 13]),
    ("exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 0}, 1, [0]),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, [7]),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     [1, 2], [[], [1, 2, 3]]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [[1, 1]]),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}}, [1, 7], [[1, 2]]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
     ["a", 1], [[1, "a"], ["a", 1, 2]]),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", ["abc", True]),
    ("oneOf (overlapping branches)", {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}, -3, [5]),
    ("allOf", {"allOf": [{**OBJ, "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "string"}}, "required": ["b"]}]}, {"a": 1, "b": "x"},
     [{"a": 1}]),
    ("not", {"type": "integer", "not": {"const": 3}}, 4, [3]),
    ("if/then/else", {**OBJ, "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                      "required": ["kind", "n"], "if": {"properties": {"kind": {"const": "a"}}},
                      "then": {"properties": {"n": {"minimum": 10}}}, "else": {"properties": {"n": {"maximum": 0}}}},
     {"kind": "a", "n": 12}, [{"kind": "a", "n": 5}, {"kind": "b", "n": 5}]),
    ("$ref local / $defs", {"$defs": {"code": {"type": "string", "maxLength": 2}}, **OBJ,
                            "properties": {"x": {"$ref": "#/$defs/code"}}, "required": ["x"]}, {"x": "ab"},
     [{"x": "abc"}, {"x": 1}]),
    ("recursive $ref", {**OBJ, "properties": {"v": {"type": "integer"},
                                              "kids": {"type": "array", "items": {"$ref": "#"}}},
                        "required": ["v"], "additionalProperties": False},
     {"v": 1, "kids": [{"v": 2, "kids": []}]}, [{"v": 1, "kids": [{"kids": []}]}, {"v": 1, "kids": [{"v": "2"}]}]),
    ("external $ref", {**OBJ, "properties": {"a": {"$ref": "https://example.com/schemas/a.json"}}}, {}, []),
    ("propertyNames", {**OBJ, "propertyNames": {"pattern": "^[a-z]+$"}, "additionalProperties": {"type": "integer"}},
     {"ab": 1}, [{"A1": 1}]),
    ("dependentRequired", {**OBJ, "properties": {"card": {"type": "string"}, "billing": {"type": "string"}},
                           "dependentRequired": {"card": ["billing"]}}, {"card": "x", "billing": "y"}, [{"card": "x"}]),
    ("patternProperties", {**OBJ, "patternProperties": {"^n_": {"type": "integer"}}, "additionalProperties": False},
     {"n_a": 1}, [{"n_a": "x"}, {"b": 1}]),
    ("unevaluatedProperties", {**OBJ, "allOf": [{"properties": {"a": {"type": "integer"}}}],
                               "unevaluatedProperties": False}, {"a": 1}, [{"a": 1, "b": 2}]),
]

TYPICAL = {**OBJ, "additionalProperties": False, "required": ["id", "name", "status", "tags", "items"], "properties": {
    "id": {"type": "string", "format": "uuid"}, "name": {"type": "string", "minLength": 1, "maxLength": 80},
    "status": {"enum": ["draft", "active", "archived"]}, "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    "score": {"type": "number"}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
    "owner": {**OBJ, "properties": {"email": {"type": "string"}, "role": {"enum": ["admin", "editor", "viewer"]}},
              "required": ["email"]},
    "items": {"type": "array", "minItems": 1, "items": {**OBJ, "required": ["sku", "qty"], "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
        "unit": {"enum": ["pc", "kg", "m"]}}}},
    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
TYPICAL_ANSWER = {"id": "123e4567-e89b-12d3-a456-426614174000", "name": "Widget", "status": "active", "priority": 2,
                  "score": 0.5, "active": True, "tags": ["a", "b"], "owner": {"email": "x@y.z", "role": "editor"},
                  "items": [{"sku": "ABC-1234", "qty": 3, "unit": "kg"}], "note": None}


def make_vocab(size: int, seed: int = 0) -> tuple[PreTrainedTokenizerFast, list[bytes]]:
    """A byte-level BPE of `size` tokens: the 256 bytes, then every prefix of generated words (ASCII mostly,
    some accented and CJK, so some tokens are partial UTF-8), JSON fragments and digit runs; EOS last."""
    rnd = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    merges: list[tuple[bytes, bytes]] = []
    known = set(tokens)
    cons, vows, other = "bcdfghjklmnprstvwz", "aeiou", "éüñßæø中文字的是了不"
    fragments = ['{"', '":', '",', '"}', '],', '":"', '":[', '":{', ' "', '[{', '}]', 'true', 'false', 'null']
    while len(tokens) < size - 1:
        if fragments:
            word = fragments.pop()
        elif rnd.random() < 0.08:
            word = str(rnd.randrange(10 ** rnd.randint(1, 4)))
        else:
            word = "".join(rnd.choice(cons) + rnd.choice(vows if rnd.random() < 0.9 else other)
                           for _ in range(rnd.randint(1, 5)))
            word = (" " if rnd.random() < 0.6 else "") + (word.title() if rnd.random() < 0.2 else word)
        raw = word.encode()
        for i in range(2, len(raw) + 1):
            if raw[:i] not in known and len(tokens) < size - 1:
                known.add(raw[:i])
                tokens.append(raw[:i])
                merges.append((raw[:i - 1], raw[i - 1:i]))
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte-to-character map
    rest = sorted(set(range(256)) - set(shown))
    to_chars = {b: chr(b) for b in shown} | {b: chr(256 + i) for i, b in enumerate(rest)}
    show = lambda bs: "".join(to_chars[b] for b in bs)  # noqa: E731
    bpe = models.BPE({show(t): i for i, t in enumerate(tokens)}, [(show(a), show(b)) for a, b in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    assert hf.decode(hf.encode(' {"a": "中文"}')) == ' {"a": "中文"}' and len(hf) == size
    return hf, tokens


class Engine:
    """One engine behind four calls: compile a schema to a matcher factory, the mask, consume a token."""

    def __init__(self, hf, tokens):
        self.n, self.eos, self.tokens = len(hf), len(tokens), tokens

    def allowed(self, m) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(bytes(self.mask(m)), dtype=np.uint8), bitorder="little")
        return np.flatnonzero(bits[:self.n])


class Llguidance(Engine):
    name = "llguidance 1.9.1"

    def __init__(self, hf, tokens):
        super().__init__(hf, tokens)
        self.tok = llguidance.hf.from_tokenizer(hf)

    def compile(self, schema):
        m = llguidance.LLMatcher(self.tok, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m.deep_copy

    def mask(self, m):
        return m.compute_bitmask()

    def consume(self, m, t):
        return m.consume_token(t) and not m.is_error()


class Xgrammar(Engine):
    name = "xgrammar 0.2.8"

    def __init__(self, hf, tokens):
        super().__init__(hf, tokens)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.n)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.buf = xgrammar.allocate_token_bitmask(1, self.n)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(schema)
        return lambda: xgrammar.GrammarMatcher(compiled)

    def mask(self, m):
        m.fill_next_token_bitmask(self.buf)
        return self.buf.numpy()

    def consume(self, m, t):
        return m.accept_token(t)


class OutlinesCore(Engine):
    name = "outlines-core " + importlib.metadata.version("outlines-core")

    def __init__(self, hf, tokens):
        super().__init__(hf, tokens)
        self.vocab = outlines_core.Vocabulary(self.eos, {t: [i] for i, t in enumerate(tokens)})
        self.buf = np.zeros((self.n + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        index = outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(json.dumps(schema)), self.vocab)
        return lambda: outlines_core.Guide(index)

    def mask(self, m):
        m.write_mask_into(self.buf.ctypes.data, self.buf.size, 4)
        return self.buf

    def consume(self, m, t):
        if t == self.eos:  # offered in a final state, but has no transition
            return m.is_finished()
        try:
            m.advance(t)
        except ValueError:
            return False
        return True


def compact(instance) -> bytes:
    return json.dumps(instance, separators=(",", ":"), ensure_ascii=False).encode()


def accepts(engine, start, instance) -> bool:
    """Whether the engine lets `instance` (or these raw bytes) through, fed byte by byte, then EOS."""
    m = start()
    data = instance if isinstance(instance, bytes) else compact(instance)
    return all(engine.consume(m, b) for b in data) and engine.consume(m, engine.eos)


def sample(engine, start, weights, rnd, steps=600) -> bytes | None:
    """A random answer the engine's mask allows (None when it does not end within `steps` tokens)."""
    m, out = start(), []
    for _ in range(steps):
        ids = engine.allowed(m)
        if len(ids) == 0:
            return None
        t = int(rnd.choices(ids, weights=weights[ids])[0])
        if t == engine.eos:
            return b"".join(out)
        if not engine.consume(m, t):
            return None
        out.append(engine.tokens[t])
    return None


def verdict(engine, schema, valid, invalid, weights, notes, tally) -> str:
    try:
        start = engine.compile(schema)
    except Exception as e:  # each engine raises its own type
        notes.append(f"{engine.name}: {' '.join(str(e).split())[:200]}")
        return f"refused [{len(notes)}]"
    found = [] if accepts(engine, start, valid) else ["REJECTS VALID"]
    if any(accepts(engine, start, bad) for bad in invalid):
        found.append("IGNORED")
    if invalid and not found:
        check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        rnd = random.Random(1)
        answers = [a for a in (sample(engine, start, weights, rnd) for _ in range(5)) if a is not None]
        parsed, broken = [], []
        for a in answers:
            try:
                parsed.append(json.loads(a))
            except ValueError:
                broken.append(a)
        if broken:
            notes.append(f"{engine.name}: not JSON: {broken[0][:100]!r}")
            found.append(f"NOT JSON ({len(broken)}/{len(answers)} samples) [{len(notes)}]")
        tally[engine.name] = tally.get(engine.name, 0) + len(answers)
        if bad := sum(not check.is_valid(x) for x in parsed):
            found.append(f"IGNORED ({bad}/{len(answers)} samples)")
    return "; ".join(found) or ("held" if invalid else "compiles")


def timings(engine, schema, instance, runs=5) -> tuple[str, str]:
    """Schema to first mask (ms, median of `runs`); then the mean mask time (µs) along `instance`."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.mask(engine.compile(schema)())
        times.append(time.perf_counter() - t0)
        if times[0] > 60:
            break
    m, steps = engine.compile(schema)(), []
    for b in compact(instance):
        t0 = time.perf_counter()
        engine.mask(m)
        steps.append(time.perf_counter() - t0)
        assert engine.consume(m, b)
    first = f"{statistics.median(times) * 1000:.1f}" + ("" if len(times) == runs else f" ({len(times)} run)")
    return first, f"{statistics.mean(steps) * 1e6:.0f}"


def main() -> None:
    hf, tokens = make_vocab(1024)
    weights = np.ones(len(hf))
    weights[[i for i, t in enumerate(tokens) if set(t) <= set(b'"}],')] + [len(tokens)]] = 30  # and EOS
    engines = [cls(hf, tokens) for cls in (Llguidance, Xgrammar, OutlinesCore)]
    names = " | ".join(e.name for e in engines)
    notes: list[str] = []
    tally: dict[str, int] = {}
    print(f"## Coverage (1,024-token byte-level BPE)\n\n| feature | {names} |\n|---|---|---|---|")
    for name, schema, valid, invalid in FEATURES:
        print(f"| {name} | " + " | ".join(verdict(e, schema, valid, invalid, weights, notes, tally) for e in engines)
              + " |")
    print("\nRandom answers checked: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    print("\n" + "\n".join(f"{i}. {n}" for i, n in enumerate(notes, 1)))

    print(f"\n## Typical schema ({len(TYPICAL['properties'])} properties, nested arrays and enums): "
          "compile to first mask, ms (median of 5) / then µs per mask along a valid answer of "
          f"{len(compact(TYPICAL_ANSWER))} tokens\n")
    print(f"| vocabulary | tokenizer setup, s | {names} |\n|---|---|---|---|---|")
    rows = [(1024, hf, tokens, engines), (150_000, *make_vocab(150_000), None)]
    for size, hf, tokens, built in rows:
        setups, cells = [], []
        for i, cls in enumerate((Llguidance, Xgrammar, OutlinesCore)):
            t0 = time.perf_counter()
            engine = built[i] if built else cls(hf, tokens)
            setups.append("" if built else f"{time.perf_counter() - t0:.1f}")
            cells.append(" / ".join(timings(engine, TYPICAL, TYPICAL_ANSWER)))
        print(f"| {size:,} | {' / '.join(setups) if not built else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
