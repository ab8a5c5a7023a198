"""Less work per generated token in `mlx_lm.server`'s batched loop (mlx-lm 0.32), applied by
`mlx_lm_entry` the way it applies `join_batch_sooner`: by replacing a few of its parts.
Profiled on the same model beside vllm-mlx (8 clients, streamed): `mlx_lm.server` spent
~760 µs of CPU per generated token, ~450 with these three; every answer is the same.

``logprobs``
    The generation thread called `r.logprobs[r.token].item()` for every token of every
    request. That builds a one-element MLX op queued *behind the next batch step* (which
    `_step` has just launched with `async_eval`), so the first `.item()` of each step waits
    for the whole next forward pass and the per-token Python work no longer overlaps
    compute. `GenerationBatch.Response` becomes a subclass whose `logprobs` is a proxy:
    `proxy[token].item()` is 0.0 for a request that asked for neither `logprobs` nor
    `top_logprobs` (the value is then never read), else it reads the evaluated row through
    the buffer protocol (float32, float16: the same value, no MLX op), else (bfloat16) the
    real `.item()`. Anything else goes to the real array. Which requests want logprobs is
    learnt from `ResponseGenerator._tokenize` and `BatchGenerator.insert_segments`; a uid it
    does not know is taken to want them.

``queue``
    One `Queue.put` by the generation thread and one blocking `Queue.get` (a thread wake-up
    and a GIL hand-off) by the HTTP handler per token. `mlx_lm.server.Queue` becomes
    `TokenQueue`, whose `put` keeps a request's tokens and hands them over every `INTERVAL`
    tokens, after `MAX_DELAY` seconds, or with the first token, the last one, or anything
    that is not a token (the context, progress, None, errors: those go at once, after what
    was kept). Each look for new requests (`_next_request`) hands over everything kept.
    `get` returns the items one by one, in order; a blocking `get` still times out (so the
    dead-thread check works).

``coalesce``
    For a streamed request the handler built a chunk, ran `json.dumps` and wrote and flushed
    the socket once per token. `APIHandler.stream` becomes a property that reads False while
    the handler's `TokenQueue` already holds more tokens of the request: `handle_completion`
    then accumulates the text as it does between chunks and writes one chunk for them all.

Kept: every token reaches the client in order (text is only joined into fewer chunks),
usage, stop sequences, tool-call and reasoning parsing, logprobs for requests that ask,
non-streamed answers byte for byte, the first token's latency, cancellation (a failed write
still raises; `mlx_lm_entry.stop_when_client_goes` still sees every item). Changed: a
streamed chunk carries up to `INTERVAL` tokens, at most `MAX_DELAY` seconds late.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from queue import Empty, Queue

FIXES = ("logprobs", "queue", "coalesce")
INTERVAL = 8       # tokens a streamed chunk may carry
MAX_DELAY = 0.05   # seconds a token may be kept before it is handed over

_local = threading.local()


# ----------------------------------------------------------------------------- logprobs
class _Value:
    __slots__ = ("_value",)

    def __init__(self, value: float):
        self._value = value

    def item(self) -> float:
        return self._value


class _Logprobs:
    """Stands for one row of log-probabilities (an evaluated mx.array)."""

    __slots__ = ("_array", "_wanted")

    def __init__(self, array, wanted: bool):
        self._array = array
        self._wanted = wanted

    def __getitem__(self, index):
        if isinstance(index, int):
            if not self._wanted:
                return _Value(0.0)
            value = _read(self._array, index)
            if value is not None:
                return _Value(value)
        return self._array[index]

    def __neg__(self):
        return -self._array

    def __getattr__(self, name):
        return getattr(self._array, name)


def _read(array, index: int):
    """array[index] as a Python float without an MLX op, or None if the dtype does not allow."""
    import mlx.core as mx

    try:
        if array.dtype == mx.float32:
            return memoryview(array)[index]
        if array.dtype == mx.float16:
            return struct.unpack_from("<e", memoryview(array).cast("B"), 2 * index)[0]
    except (TypeError, ValueError, NotImplementedError, IndexError):
        return None
    return None


def _fix_logprobs(server) -> None:
    import importlib

    generate = importlib.import_module("mlx_lm.generate")  # the attribute mlx_lm.generate is the function

    batch_cls = generate.GenerationBatch
    if getattr(batch_cls.Response, "_lighter", False):
        return
    wanted: dict[int, bool] = {}
    base = batch_cls.Response

    @dataclass
    class Response(base):
        _lighter = True

        def __post_init__(self):
            if self.finish_reason is None:
                want = wanted.get(self.uid, True)
            else:
                want = wanted.pop(self.uid, True)
            self.logprobs = _Logprobs(self.logprobs, want)

    batch_cls.Response = Response

    generator = server.ResponseGenerator
    original_tokenize = generator._tokenize

    def _tokenize(self, tokenizer, request, args):
        self._lighter_args = args
        return original_tokenize(self, tokenizer, request, args)

    generator._tokenize = _tokenize

    batch_gen = generate.BatchGenerator
    original_insert, original_remove = batch_gen.insert_segments, batch_gen.remove

    def insert_segments(self, *args, **kwargs):
        uids = original_insert(self, *args, **kwargs)
        # the server inserts one request at a time, right after _tokenize (same thread);
        # any other caller (or a changed server) leaves the uids unknown: logprobs computed
        owner = _current_generator()
        request_args = getattr(owner, "_lighter_args", None) if owner is not None else None
        if request_args is not None and len(uids) == 1:
            wanted[uids[0]] = bool(getattr(request_args, "logprobs", True)) or \
                (getattr(request_args, "top_logprobs", 1) or 0) > 0
            owner._lighter_args = None
        return uids

    def remove(self, uids, *args, **kwargs):
        for uid in uids:
            wanted.pop(uid, None)
        return original_remove(self, uids, *args, **kwargs)

    batch_gen.insert_segments, batch_gen.remove = insert_segments, remove

    original_generate = generator._generate

    def _generate(self):
        _local.generator = self
        return original_generate(self)

    generator._generate = _generate


def _current_generator():
    return getattr(_local, "generator", None)


# ----------------------------------------------------------------------------- queue
_kept = weakref.WeakSet()  # TokenQueues holding tokens not yet handed over (generation thread only)


class TokenQueue(Queue):
    """A Queue whose token Responses travel in lists (see module doc, ``queue``)."""

    response_type = None  # mlx_lm.server.Response, set by apply
    interval = INTERVAL
    max_delay = MAX_DELAY

    def __init__(self, maxsize: int = 0):
        super().__init__(maxsize)
        self._kept: list = []
        self._kept_since = 0.0
        self._started = False
        self._pending: deque = deque()
        self._pending_tokens = 0

    # producer (generation thread)
    def put(self, item, block=True, timeout=None):
        response_type = self.response_type
        if response_type is not None and isinstance(item, response_type):
            if item.finish_reason is None and self._started and self.interval > 1:
                if not self._kept:
                    self._kept_since = time.monotonic()
                    _kept.add(self)
                self._kept.append(item)
                if len(self._kept) >= self.interval or time.monotonic() - self._kept_since >= self.max_delay:
                    self.hand_over()
                return
            self._started = True
        batch, self._kept = self._kept + [item], []
        super().put(batch, block, timeout)

    def hand_over(self) -> None:
        if self._kept:
            batch, self._kept = self._kept, []
            super().put(batch)

    # consumer (HTTP handler thread)
    def get(self, block=True, timeout=None):
        _local.queue = self
        if not self._pending:
            batch = super().get(block, timeout)
            self._pending.extend(batch)
            response_type = self.response_type or ()
            self._pending_tokens = sum(1 for x in batch if isinstance(x, response_type))
        item = self._pending.popleft()
        if self._pending_tokens and isinstance(item, self.response_type or ()):
            self._pending_tokens -= 1
        return item

    def get_nowait(self):
        return self.get(block=False)

    def tokens_waiting(self) -> int:
        return self._pending_tokens


def hand_over_all() -> None:
    for q in list(_kept):
        q.hand_over()
    _kept.clear()


def _fix_queue(server, interval: int, max_delay: float) -> None:
    if getattr(server, "_lighter_queue", False):
        return
    TokenQueue.response_type = server.Response
    TokenQueue.interval = interval
    TokenQueue.max_delay = max_delay
    server.Queue = TokenQueue
    generator = server.ResponseGenerator
    original_next_request = generator._next_request

    def _next_request(self, timeout=None):
        hand_over_all()
        return original_next_request(self, timeout)

    generator._next_request = _next_request
    server._lighter_queue = True


# ----------------------------------------------------------------------------- coalesce
def _fix_coalesce(server) -> None:
    handler = server.APIHandler
    if isinstance(handler.__dict__.get("stream"), property):
        return

    def get_stream(self):
        value = self.__dict__.get("_lighter_stream", False)
        if value is True:
            q = getattr(_local, "queue", None)
            if q is not None and q.tokens_waiting() > 0:
                return False
        return value

    def set_stream(self, value):
        self.__dict__["_lighter_stream"] = value
        _local.queue = None  # a new request on this thread: no queue read yet

    handler.stream = property(get_stream, set_stream)


def _missing(server) -> dict[str, str]:
    """Why each fix cannot be applied to this mlx_lm.server (empty: all can)."""
    import dataclasses
    import importlib
    import queue

    generate = importlib.import_module("mlx_lm.generate")
    why = {}
    batch = getattr(generate, "GenerationBatch", None)
    response = getattr(batch, "Response", None)
    fields = {f.name for f in dataclasses.fields(response)} if dataclasses.is_dataclass(response) else set()
    if not {"uid", "token", "logprobs", "finish_reason"} <= fields or \
            not hasattr(server.ResponseGenerator, "_tokenize") or \
            not hasattr(generate.BatchGenerator, "insert_segments"):
        why["logprobs"] = "mlx_lm.generate.GenerationBatch.Response / _tokenize / insert_segments not as in 0.32"
    if getattr(server, "Queue", None) is not queue.Queue and not getattr(server, "_lighter_queue", False) or \
            not dataclasses.is_dataclass(getattr(server, "Response", None)) or \
            not hasattr(server.ResponseGenerator, "_next_request"):
        why["queue"] = "mlx_lm.server.Queue / Response / _next_request not as in 0.32"
    if "self.stream" not in _source(server.APIHandler.handle_completion):
        why["coalesce"] = "APIHandler.handle_completion does not read self.stream"
    return why


def _source(fn) -> str:
    import inspect

    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def apply(server, fixes=None, interval: int | None = None, max_delay: float | None = None) -> list[str]:
    """Apply `fixes` (default: all of FIXES) to the `mlx_lm.server` module `server`; returns
    the fixes applied. A fix whose target does not look like mlx-lm 0.32's is skipped with a
    warning (the server then runs as without it); `coalesce` is skipped without `queue`."""
    fixes = list(FIXES if fixes is None else fixes)
    unknown = set(fixes) - set(FIXES)
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; known: {FIXES}")
    why = _missing(server)
    if "coalesce" in fixes and "queue" not in fixes and not getattr(server, "_lighter_queue", False):
        why["coalesce"] = "needs the queue fix"
    applied = []
    for fix in fixes:
        if fix in why:
            logging.warning("batch_loop: %s not applied: %s", fix, why[fix])
            continue
        if fix == "logprobs":
            _fix_logprobs(server)
        elif fix == "queue":
            _fix_queue(server, INTERVAL if interval is None else interval,
                       MAX_DELAY if max_delay is None else max_delay)
        elif fix == "coalesce":
            _fix_coalesce(server)
        applied.append(fix)
    return applied
