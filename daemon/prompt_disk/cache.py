"""`DiskPromptCache`: mlx_lm's in-memory prompt cache with the disk below it, so a long prefix outlives its
eviction from memory and the restart of its model server.

Every MLX call here runs on the server's generation thread, where the server uses its prompt cache and
where the arrays live: the snapshot of an entry (evaluated views, handed to the writer as numpy), loading
chunks into caches, and `warm`. Anything that goes wrong on the disk side falls back to the answer the
in-memory cache alone gives; a request never fails because of the disk."""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import (KVCache, LRUPromptCache, PromptTrie, QuantizedKVCache, can_trim_prompt_cache,
                                 trim_prompt_cache)

from .fingerprint import DigestMemo, model_fingerprint, unhashed_bytes
from .store import CODE_OF, Chain, CorruptChunk, DiskStore, Match, Snapshot, chain_keys, log, root_key, token_bytes
from .writer import Job, Writer

DIGESTS = "digests.json"


# ---------------------------------------------------------------- between MLX caches and chunks

def layout_of(cache: list[Any]) -> str | None:
    """"kv" (KVCache layers) or "q<bits>g<group>" (QuantizedKVCache layers); None for a cache that cannot be
    cut by tokens (rotating, recurrent, mixed)."""
    kinds = set()
    for layer in cache:
        if type(layer) is KVCache:
            kinds.add("kv")
        elif type(layer) is QuantizedKVCache:
            kinds.add(f"q{layer.bits}g{layer.group_size}")
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def take_snapshot(fp: str, tokens: list[int], cache: list[Any], cache_type: str) -> Snapshot | None:
    """The entry's state cut to its tokens, evaluated, as numpy views (generation thread only); None if the
    cache cannot be stored."""
    layout = layout_of(cache)
    if layout is None or not cache or len({layer.offset for layer in cache}) != 1 or cache[0].keys is None:
        return None
    n = min(len(tokens), cache[0].offset)
    if n <= 0:
        return None
    arrays, codes = [], []
    for layer in cache:
        state = [layer.keys, layer.values] if layout == "kv" else [*layer.keys, *layer.values]
        row, code_row = [], []
        for array in state:
            name = str(array.dtype).split(".")[-1]
            if name == "bfloat16":
                array, code = array[..., :n, :].view(mx.uint16), "BF16"
            elif name in CODE_OF:
                array, code = array[..., :n, :], CODE_OF[name]
            else:
                return None
            row.append(array)
            code_row.append(code)
        arrays.append(row)
        codes.append(code_row)
    mx.eval([a for row in arrays for a in row])
    layers = [[np.asarray(memoryview(a)) for a in row] for row in arrays]  # views: no copy, keep the arrays alive
    return Snapshot(fp, layout, list(tokens[:n]), layers, codes, [type(layer).__name__ for layer in cache],
                    cache_type)


def build_cache(chain: Chain, layout: str) -> list[Any]:
    """The model's cache layers from the chunks of a chain."""
    count = len(chain.tensors[0])
    joined = [np.concatenate([chunk[i] for chunk in chain.tensors], axis=2) if len(chain.tensors) > 1
              else chain.tensors[0][i] for i in range(count)]
    arrays = []
    for array, code in zip(joined, chain.codes):
        array = mx.array(np.ascontiguousarray(array))
        arrays.append(array.view(mx.bfloat16) if code == "BF16" else array)
    per_layer = count // max(1, len(chain.classes))
    caches = []
    for index, name in enumerate(chain.classes):
        row = arrays[index * per_layer:(index + 1) * per_layer]
        if name == "KVCache" and per_layer == 2 and layout == "kv":
            layer = KVCache()
            layer.keys, layer.values = row
        elif name == "QuantizedKVCache" and per_layer == 6 and layout.startswith("q"):
            bits, group = layout[1:].split("g")
            layer = QuantizedKVCache(group_size=int(group), bits=int(bits))
            layer.keys, layer.values = tuple(row[:3]), tuple(row[3:])
        else:
            raise CorruptChunk(f"a {name} layer with {per_layer} tensors in a {layout} chain")
        layer.offset = row[0].shape[2]
        caches.append(layer)
    mx.eval(arrays)
    return caches


# ---------------------------------------------------------------- the prompt cache

class _NotifyingTrie(PromptTrie):
    """The in-memory cache's trie, telling which entries leave it and why."""

    def __init__(self, on_leave):
        super().__init__()
        self._on_leave = on_leave

    def add(self, model, tokens, value):
        previous = super().add(model, tokens, value)
        if previous is not None:
            self._on_leave(model, tokens, previous, "superseded")
        return previous

    def pop(self, model, tokens):
        value = super().pop(model, tokens)
        self._on_leave(model, tokens, value, "evicted")
        return value

    def pop_prefixes(self, model, tokens):
        values = super().pop_prefixes(model, tokens)
        for length, value in values:
            self._on_leave(model, tokens[:length], value, "superseded")
        return values


@dataclass
class Registration:
    """What the cache knows of a loaded model: its fingerprint once computed (None: disk tier off for it)."""

    nlayers: int
    layouts: list[str]
    fp: str | None = None
    error: str | None = None
    warm_pending: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


class DiskPromptCache(LRUPromptCache):
    """An `LRUPromptCache` (built like one: `max_size`, `max_bytes`) whose entries of `min_tokens` or more are
    also kept on disk, and whose lookups take a stored prefix when it gives `min_gain` tokens more than memory.

    System segments are written at once, other entries `persist_after` seconds after their insert (an entry
    that supersedes another inherits its deadline), entries that leave memory at once, and everything
    pending at `flush`/`close`. `warm_entries` of the most used prefixes come back into memory when the
    generation thread is idle after a load."""

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63, *, store: DiskStore, writer: Writer | None = None,
                 min_tokens: int = 1024, min_gain: int = 64, persist_after: float = 5.0, warm_entries: int = 1,
                 warm_max_tokens: int = 1 << 20, fix_exact: bool = True, eager_tokens: int = 4096,
                 fp_wait: float = 30.0, fp_sync_bytes: int = 2 << 30):
        super().__init__(max_size, max_bytes)
        self._trie = _NotifyingTrie(self._on_leave)
        self.store = store
        self.min_tokens, self.min_gain, self.persist_after = min_tokens, min_gain, persist_after
        self.warm_entries, self.warm_max_tokens = warm_entries, warm_max_tokens
        self.fix_exact, self.eager_tokens = fix_exact, eager_tokens
        self.fp_wait, self.fp_sync_bytes = fp_wait, fp_sync_bytes
        self.counts = dict(requests=0, hits_memory=0, hits_disk=0, misses=0, tokens_memory=0, tokens_disk=0,
                           disk_read_failures=0, corrupt_discarded=0, snapshots=0, evicted_to_disk=0,
                           warmed_sequences=0, warmed_tokens=0, disk_load_s=0.0, on_path_write_s=0.0)
        self._memo = DigestMemo(store.root / DIGESTS)
        self._models: dict[Any, Registration] = {}
        self._left: list[tuple[Any, list[int], Any, str]] = []
        self._closed = False
        self._writer = writer or Writer(store)
        try:
            removed = store.cleanup()
            if any(removed.values()):
                log.info("prompt cache on disk: cleaned up at open: %s", removed)
        except Exception as e:
            log.warning("prompt cache on disk: cleanup at open failed: %s", e)
        self._writer.start()

    # ------------------------------------------------------------ models (generation thread, after a load)

    def register_model(self, model_key: Any, model_path: str, adapter_path: str | None = None,
                       draft_model_path: str | None = None, *, nlayers: int, kv_bits: int | None = None,
                       kv_group_size: int = 64, quantized_kv_start: int = 5000, chat_template: str = "",
                       name: str | None = None, background: bool = True) -> Registration:
        """Compute the fingerprint of a loaded model: at once when cheap (digests memoised, small weights), else
        on a thread of its own while requests go on (a long prompt waits up to `fp_wait` seconds for it)."""
        known = self._models.get(model_key)
        if known is not None:
            known.warm_pending = known.ready.is_set() and known.fp is not None and self.warm_entries > 0
            return known
        registration = Registration(nlayers, ["kv"] + ([f"q{kv_bits}g{kv_group_size}"] if kv_bits else []))
        self._models[model_key] = registration

        def compute() -> None:
            started = time.perf_counter()
            try:
                fp, info = model_fingerprint(model_path, adapter_path, draft_model_path, kv_bits=kv_bits,
                                             kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                                             chat_template=chat_template, memo=self._memo)
                try:
                    self.store.register_model(fp, dict(info, name=name))
                except (OSError, sqlite3.Error) as e:  # a full disk, say: what is stored can still be read
                    log.warning("prompt cache on disk: cannot record model %s (%s); reading only", fp[:16], e)
                registration.fp = fp
                registration.warm_pending = self.warm_entries > 0
                log.info("prompt cache on disk: model %s has fingerprint %s (%.2f s)", model_path, fp[:16],
                         time.perf_counter() - started)
            except Exception as e:
                registration.error = str(e)
                log.warning("prompt cache on disk: no fingerprint for %s (%s); off for this model", model_path, e)
            finally:
                registration.ready.set()

        folders = [model_path, adapter_path, draft_model_path]
        if background and unhashed_bytes(folders, self._memo) > self.fp_sync_bytes:
            threading.Thread(target=compute, name="prompt-disk-fingerprint", daemon=True).start()
        else:
            compute()
        return registration

    def _registration(self, model: Any, wait: float = 0.0) -> Registration | None:
        registration = self._models.get(model)
        if registration is None:
            return None
        if not registration.ready.is_set() and wait > 0:
            started = time.perf_counter()
            registration.ready.wait(wait)
            log.info("prompt cache on disk: waited %.2f s for the model's fingerprint", time.perf_counter() - started)
        return registration if registration.ready.is_set() and registration.fp is not None else None

    # ------------------------------------------------------------ entries that leave memory

    def _on_leave(self, model, tokens, entry, reason: str) -> None:
        self._left.append((model, tokens, entry, reason))

    def _inherited_deadline(self) -> float:
        """The earliest pending deadline among the entries a new one has just superseded."""
        jobs = [getattr(entry, "disk_job", None) for _, _, entry, reason in self._left if reason == "superseded"]
        return min((job.deadline for job in jobs if job is not None and not job.settled), default=float("inf"))

    def _settle_left(self, covered: bool = False) -> None:
        """Evicted entries are written now; superseded ones are dropped from the queue when the new entry that
        covers them is queued (`covered`), else written now too."""
        left, self._left = self._left, []
        for _, _, entry, reason in left:
            job: Job | None = getattr(entry, "disk_job", None)
            if job is None:
                continue
            if reason == "superseded" and covered:
                self._writer.cancel(job)
                continue
            if reason == "evicted":
                self.counts["evicted_to_disk"] += 1
            self._writer.reschedule(job, time.time())

    # ------------------------------------------------------------ the LRUPromptCache interface

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type: str = "assistant"):
        super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        covered, started = False, time.perf_counter()
        try:
            registration = self._registration(model)
            if registration is not None and len(tokens) >= self.min_tokens and not self._closed:
                covered = self._queue(model, registration, tokens, prompt_cache, cache_type)
            self._settle_left(covered)
        except Exception as e:
            log.exception("prompt cache on disk: an entry stays in memory only (%s)", e)
        finally:  # what the disk tier's writes cost the generation thread (the snapshot; the writing is not here)
            self.counts["on_path_write_s"] += time.perf_counter() - started

    def _queue(self, model, registration: Registration, tokens, prompt_cache, cache_type: str) -> bool:
        """Snapshot a new entry and queue it; whether it was queued."""
        now = time.time()
        deadline = min(now if cache_type == "system" else now + self.persist_after, self._inherited_deadline())
        snapshot = take_snapshot(registration.fp, list(tokens), prompt_cache, cache_type)
        self.counts["snapshots"] += 1
        if snapshot is None:
            return False
        try:
            entry = self._trie.get(model, tokens)
        except KeyError:  # evicted at once (larger than the memory bounds): write it now
            entry, deadline = None, now
        job = self._writer.submit(snapshot, deadline)
        if job is None:
            return False
        if entry is not None:
            entry.disk_job = job
        if deadline > now and len(tokens) >= self.eager_tokens:
            self._writer.write_soon_if_new(job, self.eager_tokens)
        return True

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        super().trim_to(n_sequences=n_sequences, n_bytes=n_bytes)
        try:
            self._settle_left()
        except Exception as e:
            log.exception("prompt cache on disk: trimming the memory cache: %s", e)

    def fetch_nearest_cache(self, model, tokens):
        self.counts["requests"] += 1
        registration = found = None
        try:
            long_prompt = len(tokens) > self.min_tokens
            registration = self._registration(model, wait=self.fp_wait if long_prompt else 0.0)
            self._warm(model, registration)
            if registration is not None and long_prompt:
                found = self._trie.search(model, tokens)
                loaded = self._from_disk(registration, tokens, self._memory_choice(model, tokens, found)[1])
                if loaded is not None:
                    return loaded
        except Exception as e:
            log.exception("prompt cache on disk: lookup failed (%s); using the memory cache", e)
        return self._from_memory(model, tokens, registration, found)

    def _memory_choice(self, model, tokens, found=None) -> tuple[list[int] | None, int]:
        """The entry mlx_lm's own lookup would copy (its tokens) and how many prompt tokens it gives (the same
        rules, without the copy; an exact hit gives one token less under `fix_exact`)."""
        found = found if found is not None else self._trie.search(model, tokens)
        if found.exact is not None:
            exact = self.fix_exact and can_trim_prompt_cache(self._trie.get(found.model, found.exact).prompt_cache)
            return found.exact, len(tokens) - 1 if exact else len(tokens)
        shorter = len(found.shorter) if found.shorter is not None else 0
        if found.longer is not None and found.common_prefix > shorter:
            if can_trim_prompt_cache(self._trie.get(found.model, found.longer).prompt_cache):
                return found.longer, min(len(tokens) - 1, found.common_prefix)
        return (found.shorter, shorter) if shorter > 0 else (None, 0)

    def _from_memory(self, model, tokens, registration: Registration | None, found=None):
        """mlx_lm's answer, except that an exact hit leaves one token to process: its batched path cannot take
        an empty rest (`insert_segments` raises "empty prompt" on the generation thread)."""
        stored, n = self._memory_choice(model, tokens, found)
        if stored is None or n <= 0:
            self.counts["misses"] += 1
            return None, tokens
        entry = self._trie.get(model, stored)
        cache = copy.deepcopy(entry.prompt_cache)
        if len(stored) > n:
            trim_prompt_cache(cache, len(stored) - n)
        tier = "disk" if getattr(entry, "warmed", False) else "memory"  # read back from disk at load, for this
        self.counts[f"hits_{tier}"] += 1
        self.counts[f"tokens_{tier}"] += n
        if registration is not None and n >= self.min_tokens:
            self._record_use(registration, root_key(registration.fp, layout_of(cache) or "kv"), tokens, n)
        return cache, tokens[n:]

    def _from_disk(self, registration: Registration, tokens, memory: int):
        """A stored prefix that beats memory by `min_gain` tokens, as (cache, rest); None otherwise."""
        roots = [(root_key(registration.fp, layout), layout) for layout in registration.layouts]
        match = self.store.lookup(roots, tokens)
        least = max(self.min_tokens, memory + self.min_gain)
        if match is None or match.n < least:
            return None
        cache = self._load(registration, match, tokens, least)
        if cache is None:
            return None
        self.counts["hits_disk"] += 1
        self.counts["tokens_disk"] += match.n
        self._record_use(registration, match.root, tokens, match.n)
        return cache, tokens[match.n:]

    def _record_use(self, registration: Registration, root: str, tokens, n: int) -> None:
        """Count a served prefix of n tokens as the key of its last full block and the tokens after it."""
        full = n // self.store.block * self.store.block
        links = chain_keys(root, tokens[:full], self.store.block, partial=False)
        self._writer.use(root, links[-1].key if links else root, registration.fp, n, token_bytes(tokens[full:n]))

    # ------------------------------------------------------------ loading (generation thread)

    def _load(self, registration: Registration, match: Match, tokens, least: int) -> list[Any] | None:
        """The caches of `match`; after a bad chunk, of the good chunks before it if they give `least` tokens."""
        try:
            return self._read(registration, match, tokens)
        except CorruptChunk as e:
            self._discard(e)
            index = next((i for i, row in enumerate(match.rows) if row.key == e.key), 0)
            if index == 0 or match.rows[index].start < least:
                return None
            match.rows, match.n = match.rows[:index], match.rows[index].start
        try:
            return self._read(registration, match, tokens)
        except CorruptChunk as e:
            self._discard(e)
            return None

    def _read(self, registration: Registration, match: Match, tokens) -> list[Any] | None:
        """CorruptChunk for a chunk that fails its checks; None (logged) for any other failure."""
        started = time.perf_counter()
        try:
            chain = self.store.read_chain(match, tokens, registration.fp)
            if len(chain.classes) != registration.nlayers:
                raise CorruptChunk(f"{len(chain.classes)} layers on disk, the model has {registration.nlayers}",
                                   match.rows[0].key)
            cache = build_cache(chain, match.layout)
        except CorruptChunk:
            raise
        except Exception as e:
            self.counts["disk_read_failures"] += 1
            log.exception("prompt cache on disk: loading failed (%s); prefilling instead", e)
            return None
        finally:
            self.counts["disk_load_s"] += time.perf_counter() - started
        self._writer.task(self.store.touch, [row.key for row in match.rows])
        log.info("prompt cache on disk: restored %d tokens in %.3f s (%d chunks)", chain.n,
                 time.perf_counter() - started, len(match.rows))
        return cache

    def _discard(self, error: CorruptChunk) -> None:
        self.counts["disk_read_failures"] += 1
        self.counts["corrupt_discarded"] += 1
        log.warning("prompt cache on disk: unusable chunk, prefilling instead: %s", error.reason)
        if error.key:
            self._writer.task(self.store.discard, error.key, error.reason)

    # ------------------------------------------------------------ warm (generation thread, idle)

    def on_idle(self) -> None:
        """Warm the models loaded since the last look (call it from the generation thread when it waits)."""
        for model, registration in list(self._models.items()):
            if registration.warm_pending and registration.ready.is_set():
                self._warm(model, registration)

    def _warm(self, model, registration: Registration | None) -> None:
        """Bring the most served stored prefixes of a model back into memory."""
        if registration is None or not registration.warm_pending:
            return
        registration.warm_pending = False
        layouts = {root_key(registration.fp, layout): layout for layout in registration.layouts}
        warmed = 0
        try:
            for root, key, ntok, extra, count in self.store.best_uses(list(layouts), self.warm_entries * 4):
                if warmed >= self.warm_entries:
                    break
                if not self.min_tokens <= ntok <= self.warm_max_tokens:
                    continue
                head = self.store.tokens_of(key, root)
                if head is None:
                    continue
                tokens = head + np.frombuffer(extra, dtype="<i4").tolist()
                if len(tokens) != ntok or self._memory_choice(model, [*tokens, 0])[1] >= ntok:
                    continue  # changed on disk, or already in memory
                match = self.store.lookup([(root, layouts[root])], [*tokens, 0])
                if match is None or match.n != ntok:
                    continue
                cache = self._load(registration, match, tokens, ntok)
                if cache is None:
                    continue
                LRUPromptCache.insert_cache(self, model, tokens, cache, cache_type="system")  # on disk already
                self._trie.get(model, tokens).warmed = True  # a hit on it saves a prefill thanks to the disk
                self._settle_left()
                warmed += 1
                self.counts["warmed_sequences"] += 1
                self.counts["warmed_tokens"] += ntok
                log.info("prompt cache on disk: warmed %d tokens into memory (served %d times)", ntok, count)
        except Exception as e:
            log.exception("prompt cache on disk: warming failed: %s", e)

    # ------------------------------------------------------------ counters, flush, close

    def counters(self) -> dict[str, Any]:
        """This cache's counters, its writer's, and what its models keep on disk (any thread)."""
        fps = {r.fp for r in self._models.values() if r.fp}
        on_disk = [self._writer.totals.get(fp, {}) for fp in fps]
        return {**self.counts, **self._writer.counts, "pending_bytes": self._writer.pending_bytes,
                "memory_entries": len(self), "memory_bytes": self.nbytes,
                "disk_bytes": sum(t.get("bytes", 0) for t in on_disk),
                "disk_entries": sum(t.get("entries", 0) for t in on_disk),
                "models": {str(key): r.fp[:16] if r.fp else r.error for key, r in self._models.items()}}

    def flush(self, timeout: float = 60.0) -> bool:
        """Write everything pending now; True once written within `timeout` seconds (any thread)."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 120.0) -> bool:
        """Write what is pending and stop the writer; True if all was written in time."""
        if self._closed:
            return True
        self._closed = True
        done = self._writer.close(timeout)
        log.info("prompt cache on disk: closed (%s); %d memory hits, %d disk hits (%d tokens), %d sequences "
                 "written", "all written" if done else "writer still busy", self.counts["hits_memory"],
                 self.counts["hits_disk"], self.counts["tokens_disk"], self._writer.counts["sequences_written"])
        return done
