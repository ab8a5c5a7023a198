"""The prompt cache's disk tier on its own, with real MLX caches of a tiny model: what is written comes back
as the model would compute it, a bad chunk costs only the tokens after it, models never share entries,
the disk stays within its bound, a full disk fails no request, and `mlxgate cache` can list and clear.
Every test opens the caches a restarted model server would, on the same root."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import stat
import struct
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import KVCache, LRUPromptCache, QuantizedKVCache, make_prompt_cache

from mlxgate.prompt_disk import serve, store
from mlxgate.prompt_disk.cache import DiskPromptCache
from mlxgate.prompt_disk.fingerprint import model_fingerprint
from mlxgate.prompt_disk.store import DiskStore, chain_keys, root_key
from mlxgate.wrapper.mlx_lm_entry import bound_prompt_cache

MIN_TOKENS = 512
rng = random.Random(0)
PROMPT = [rng.randrange(10, 380) for _ in range(2000)]
OTHER = [rng.randrange(10, 380) for _ in range(2000)]


@pytest.fixture(scope="module")
def tiny(models_dir):
    path = models_dir / "tiny-a"
    return path, load(str(path))[0]


@pytest.fixture(scope="module")
def twin(tiny, tmp_path_factory):
    """tiny-a with other weights under the very same safetensors header."""
    path = tmp_path_factory.mktemp("twin") / "tiny-twin"
    shutil.copytree(tiny[0], path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (head_len,) = struct.unpack("<Q", data[:8])
    for name, tensor in json.loads(data[8:8 + head_len]).items():
        if name != "__metadata__" and "norm" not in name:
            start, stop = (8 + head_len + offset for offset in tensor["data_offsets"])
            data[start:stop] = (np.frombuffer(data[start:stop], np.float32) * 1.25).tobytes()
    weights.write_bytes(bytes(data))
    return path, load(str(path))[0]


@pytest.fixture
def open_cache(tmp_path, tiny):
    """Open a DiskPromptCache on the test's root, as a model server starting with tiny-a does."""
    opened = []

    def opening(*models, max_size=10, max_disk_bytes=20 << 30, **settings) -> DiskPromptCache:
        models = models or (("tiny-a", tiny[0]),)
        settings = {"min_tokens": MIN_TOKENS, "warm_entries": 0, **settings}
        cache = DiskPromptCache(max_size, store=DiskStore(tmp_path / "prompts", max_disk_bytes=max_disk_bytes),
                                **settings)
        for name, path in models:
            cache.register_model(name, str(path), nlayers=2, name=name, background=False)
        opened.append(cache)
        return cache

    yield opening
    for cache in opened:
        cache.close(10)


def prefill(model, tokens):
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([layer.state for layer in cache])
    return cache


def next_logits(model, cache, rest):
    logits = model(mx.array(rest)[None], cache=cache)
    mx.eval(logits)
    return np.array(logits[0, -1])


def assert_as_fresh_prefill(model, cache, prompt, rest):
    cached = len(prompt) - len(rest)
    assert np.allclose(next_logits(model, cache, rest), next_logits(model, prefill(model, prompt[:cached]), rest),
                       atol=1e-4)


def store_sequence(open_cache, tiny, tokens):
    cache = open_cache(persist_after=0.0)
    cache.insert_cache("tiny-a", tokens, prefill(tiny[1], tokens))
    assert cache.flush(30)
    cache.close(10)


def chunk_file(root: Path, fp: str, tokens, index: int) -> Path:
    key = chain_keys(root_key(fp, "kv"), tokens)[index].key
    return next(root.rglob(f"{key}.safetensors"))


# ---------------------------------------------------------------- round trips
def test_an_entry_evicted_from_memory_comes_back_after_a_restart_as_a_fresh_prefill_would_compute_it(tiny, open_cache):
    before = open_cache(max_size=1)
    before.insert_cache("tiny-a", PROMPT, prefill(tiny[1], PROMPT))
    before.insert_cache("tiny-a", OTHER[:400], prefill(tiny[1], OTHER[:400]))  # the first leaves memory
    assert before.flush(30)
    assert before.counters()["evicted_to_disk"] == 1 and before.counters()["sequences_written"] == 1
    before.close(10)

    after = open_cache()
    prompt = PROMPT + OTHER[:40]
    cache, rest = after.fetch_nearest_cache("tiny-a", prompt)
    assert len(rest) == 40
    assert (after.counts["hits_disk"], after.counts["tokens_disk"]) == (1, 2000)
    assert_as_fresh_prefill(tiny[1], cache, prompt, rest)


def test_the_longest_stored_prefix_is_used_down_to_part_of_a_partial_tail_chunk(tiny, open_cache):
    stored = PROMPT[:1100]  # four full chunks of 256 tokens and a tail of 76
    store_sequence(open_cache, tiny, stored)
    cache = open_cache()
    for prompt, cached in ((stored[:1050] + OTHER[:30], 1050),  # 26 tokens of the tail chunk
                           (stored[:900] + OTHER[:30], 900),  # inside the fourth full chunk
                           (stored, 1099)):  # the whole sequence: one token is left to process
        found, rest = cache.fetch_nearest_cache("tiny-a", prompt)
        assert len(prompt) - len(rest) == cached
        assert_as_fresh_prefill(tiny[1], found, prompt, rest)
    assert cache.counts["hits_disk"] == 3


def test_an_exact_memory_hit_leaves_one_token_to_process(tiny, open_cache):
    cache = open_cache()
    tokens = PROMPT[:600]
    cache.insert_cache("tiny-a", tokens, prefill(tiny[1], tokens))
    found, rest = cache.fetch_nearest_cache("tiny-a", tokens)
    assert rest == tokens[-1:] and found[0].offset == 599
    assert (cache.counts["hits_memory"], cache.counts["tokens_memory"]) == (1, 599)
    assert_as_fresh_prefill(tiny[1], found, tokens, rest)


def test_a_quantized_cache_comes_back_bit_for_bit(tiny, open_cache):
    mx.random.seed(0)
    quantized = []
    for _ in range(2):
        layer = KVCache()
        layer.update_and_fetch(mx.random.normal((1, 2, 600, 64)), mx.random.normal((1, 2, 600, 64)))
        quantized.append(layer.to_quantized(group_size=64, bits=8))
    mx.eval([layer.state for layer in quantized])
    before = open_cache(persist_after=0.0)
    before.register_model("tiny-a-q8", str(tiny[0]), nlayers=2, kv_bits=8, background=False)
    before.insert_cache("tiny-a-q8", PROMPT[:600], quantized)
    assert before.flush(30)
    before.close(10)

    after = open_cache()
    after.register_model("tiny-a-q8", str(tiny[0]), nlayers=2, kv_bits=8, background=False)
    found, rest = after.fetch_nearest_cache("tiny-a-q8", PROMPT[:600] + [1, 2])
    assert len(rest) == 2 and after.counts["hits_disk"] == 1
    assert all(isinstance(layer, QuantizedKVCache) and (layer.bits, layer.group_size) == (8, 64) for layer in found)
    for back, sent in zip(found, quantized):
        for a, b in zip((*back.keys, *back.values), (*sent.keys, *sent.values)):
            assert np.array_equal(np.array(a[..., :600, :]), np.array(b[..., :600, :]))


# ---------------------------------------------------------------- damage
@pytest.mark.parametrize("damage, index, cached, said", [
    ("a flipped byte", 3, 768, "crc32 mismatch"),
    ("a cut file", 2, 512, "truncated"),
])
def test_a_damaged_chunk_is_discarded_with_a_log_line_and_the_good_chunks_before_it_still_serve(
        tiny, open_cache, tmp_path, caplog, damage, index, cached, said):
    stored = PROMPT[:1100]
    store_sequence(open_cache, tiny, stored)
    cache = open_cache()
    bad = chunk_file(tmp_path / "prompts", model_fingerprint(str(tiny[0]))[0], stored, index)
    if damage == "a flipped byte":
        data = bytearray(bad.read_bytes())
        data[-10] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:
        os.truncate(bad, bad.stat().st_size // 2)

    prompt = stored + OTHER[:20]
    with caplog.at_level(logging.WARNING, logger="mlxgate.prompt_disk"):
        found, rest = cache.fetch_nearest_cache("tiny-a", prompt)
        assert cache.flush(10)
    assert len(prompt) - len(rest) == cached
    assert_as_fresh_prefill(tiny[1], found, prompt, rest)
    assert any("prompt cache on disk" in r.message and said in r.message for r in caplog.records), caplog.text
    assert cache.counts["corrupt_discarded"] == 1 and not bad.exists()
    again, rest = cache.fetch_nearest_cache("tiny-a", prompt)
    assert len(prompt) - len(rest) == cached and cache.counts["corrupt_discarded"] == 1, "gone, not met again"


def test_two_models_with_the_same_safetensors_header_but_other_weights_never_share_entries(tiny, twin, open_cache):
    def header(path):
        data = (path / "model.safetensors").read_bytes()
        return data[:8 + struct.unpack("<Q", data[:8])[0]]

    assert header(tiny[0]) == header(twin[0])
    assert model_fingerprint(str(tiny[0]))[0] != model_fingerprint(str(twin[0]))[0]
    both = (("tiny-a", tiny[0]), ("twin", twin[0]))
    cache = open_cache(*both, persist_after=0.0)
    cache.insert_cache("tiny-a", PROMPT[:1000], prefill(tiny[1], PROMPT[:1000]))
    assert cache.flush(30)
    cache.close(10)

    restarted = open_cache(*both)
    found, rest = restarted.fetch_nearest_cache("twin", PROMPT[:1000] + OTHER[:10])
    assert found is None and restarted.counts["misses"] == 1
    found, rest = restarted.fetch_nearest_cache("tiny-a", PROMPT[:1000] + OTHER[:10])
    assert len(rest) == 10


# ---------------------------------------------------------------- bounds and a full disk
def test_the_byte_bound_evicts_the_least_recently_used_sequence(tiny, open_cache, tmp_path):
    sequences = [[rng.randrange(10, 380) for _ in range(768)] for _ in range(4)]  # three chunks each
    per_sequence = 3 * (2 * 2 * 2 * 256 * 16 * 4)  # chunks x (layers x keys/values x heads x tokens x dims x 4)
    bound = int(3.2 * per_sequence)  # three sequences and their headers fit, four do not
    cache = open_cache(persist_after=0.0, max_disk_bytes=bound)
    for tokens in sequences[:3]:
        cache.insert_cache("tiny-a", tokens, prefill(tiny[1], tokens))
        assert cache.flush(30)
    cache.close(10)

    restarted = open_cache(persist_after=0.0, max_disk_bytes=bound)
    restarted.fetch_nearest_cache("tiny-a", sequences[0] + [7])  # the oldest is used again: the second is now LRU
    assert restarted.counts["hits_disk"] == 1 and restarted.flush(10)
    restarted.insert_cache("tiny-a", sequences[3], prefill(tiny[1], sequences[3]))
    assert restarted.flush(30)

    fp = model_fingerprint(str(tiny[0]))[0]
    present = [sum((tmp_path / "prompts" / fp[:16] / link.key[:2] / f"{link.key}.safetensors").exists()
                   for link in chain_keys(root_key(fp, "kv"), tokens)) for tokens in sequences]
    assert present == [3, 0, 3, 3]
    assert restarted.store.total_bytes() <= bound
    assert restarted.counters()["chunks_evicted"] == 3


def test_a_full_disk_pauses_writing_and_fails_no_request(tiny, open_cache, tmp_path, monkeypatch, caplog):
    cache = open_cache()

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger="mlxgate.prompt_disk"):
        cache.insert_cache("tiny-a", PROMPT[:600], prefill(tiny[1], PROMPT[:600]), cache_type="system")
        assert cache.flush(10)
    assert "prompt cache on disk: disk full while writing" in caplog.text
    cache.insert_cache("tiny-a", PROMPT[:700], prefill(tiny[1], PROMPT[:700]), cache_type="system")
    found, rest = cache.fetch_nearest_cache("tiny-a", PROMPT[:700] + [5])
    assert len(rest) == 1, "the memory tier serves on"
    counts = cache.counters()
    assert (counts["enospc"], counts["skipped_paused"], counts["sequences_written"]) == (1, 1, 0)
    assert cache.store.total_bytes() == 0 and not list((tmp_path / "prompts").rglob(".tmp-*"))


def test_folders_are_0700_and_files_0600(tiny, open_cache, tmp_path):
    store_sequence(open_cache, tiny, PROMPT[:1100])
    root = tmp_path / "prompts"
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert {name: oct(mode) for name, mode in modes.items()
            if mode != (0o700 if (tmp_path / name).is_dir() else 0o600)} == {}
    assert {"prompts/index.sqlite", "prompts/digests.json"} <= set(modes)
    assert sum(name.endswith(".safetensors") for name in modes) == 5


# ---------------------------------------------------------------- warm, listing, clearing
def test_the_most_used_prefix_is_back_in_memory_before_the_first_request_after_a_restart(tiny, open_cache):
    store_sequence(open_cache, tiny, PROMPT)
    served = open_cache()
    for _ in range(3):
        served.fetch_nearest_cache("tiny-a", PROMPT + [1, 2])
    served.close(10)

    restarted = open_cache(warm_entries=1)
    restarted.on_idle()
    assert (len(restarted), restarted.counts["warmed_tokens"]) == (1, 2000)
    found, rest = restarted.fetch_nearest_cache("tiny-a", PROMPT + [9, 9])
    # a hit on what came back from disk counts for the disk tier: it saved a prefill thanks to it
    assert len(rest) == 2 and (restarted.counts["hits_memory"], restarted.counts["hits_disk"]) == (0, 1)


def test_stored_sequences_are_listed_per_model_and_cleared_for_one_model_or_all(tiny, twin, open_cache, tmp_path):
    root = tmp_path / "prompts"
    cache = open_cache(("tiny-a", tiny[0]), ("twin", twin[0]), persist_after=0.0)
    for model, tokens, weights in (("tiny-a", PROMPT[:1100], tiny[1]), ("tiny-a", OTHER[:700], tiny[1]),
                                   ("twin", PROMPT[:600], twin[1])):
        cache.insert_cache(model, tokens, prefill(weights, tokens))
    assert cache.flush(30)

    listed = {m.name: m for m in store.list_models(root)}
    assert set(listed) == {"tiny-a", "twin"}
    assert listed["tiny-a"].path == str(tiny[0].resolve())
    assert sorted(e.tokens for e in listed["tiny-a"].entries) == [700, 1100]
    assert [e.tokens for e in listed["twin"].entries] == [600]
    assert listed["tiny-a"].bytes == sum(e.bytes for e in listed["tiny-a"].entries) > 0
    assert all(e.last_used > 0 for m in listed.values() for e in m.entries)

    cleared = store.clear(root, "twin")
    assert cleared.models == ["twin"] and cleared.bytes == listed["twin"].bytes
    assert [m.name for m in store.list_models(root)] == ["tiny-a"]
    assert store.clear(root, "no-such-model").models == []
    cleared = store.clear(root)
    assert cleared.models == ["tiny-a"] and store.list_models(root) == []
    assert not list(root.rglob("*.safetensors"))
    assert store.list_models(tmp_path / "nowhere") == [] and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- into mlx_lm.server
def fake_server():
    """The parts of `mlx_lm.server` that `install` and `bound_prompt_cache` patch."""
    provider = type("ModelProvider", (), {"_load": lambda self, *args: None})
    generator = type("ResponseGenerator", (), {"_next_request": lambda self, timeout=None: None})
    return types.SimpleNamespace(LRUPromptCache=LRUPromptCache, ModelProvider=provider, ResponseGenerator=generator,
                                 mx=mx)


@pytest.mark.parametrize("order", ["install first", "bound first"])
def test_install_gives_the_server_a_disk_cache_with_the_byte_bound_in_either_order(tiny, tmp_path, monkeypatch,
                                                                                   order):
    monkeypatch.setattr(mx, "set_cache_limit", lambda limit: 0)
    server = fake_server()
    if order == "bound first":
        bound_prompt_cache(server, 1 << 20)
    assert serve.install(server, tmp_path / "prompts", max_bytes=1 << 20, model_name="tiny-a", min_tokens=MIN_TOKENS)
    if order == "install first":
        bound_prompt_cache(server, 1 << 20)
    try:
        built = server.LRUPromptCache(10)  # as `mlx_lm.server.run()` builds it
        assert isinstance(built, DiskPromptCache) and (built.max_size, built.max_bytes) == (10, 1 << 20)

        provider = server.ModelProvider()
        provider.model, provider.draft_model, provider.model_key = tiny[1], None, ("default_model", None, None)
        provider.cli_args = types.SimpleNamespace(kv_bits=None, kv_group_size=64, quantized_kv_start=5000,
                                                  chat_template=None)
        provider._load(str(tiny[0]))
        built.insert_cache(provider.model_key, PROMPT[:600], prefill(tiny[1], PROMPT[:600]), cache_type="system")
        built.fetch_nearest_cache(provider.model_key, PROMPT[:600] + [3])
        assert serve.flush(10)
        server.ResponseGenerator()._next_request()
        stats = serve.disk_stats()
        assert stats["prompt_cache_hits"] == {"memory": 1, "disk": 0}
        assert stats["prompt_cache_tokens"] == {"memory": 600, "disk": 0}
        assert (stats["prompt_disk_writes"], stats["prompt_disk_entries"], stats["prompt_disk_write_failures"],
                stats["prompt_disk_corrupt_discarded"]) == (1, 1, 0, 0)
        assert stats["prompt_disk_bytes"] > 0
        assert [m.name for m in store.list_models(tmp_path / "prompts")] == ["tiny-a"]
    finally:
        assert serve.close(10)
