"""Puts the disk tier into an imported `mlx_lm.server` (0.32.2), the way `wrapper/mlx_lm_entry` patches
the rest of it; and what the model process reports and does at exit.

Patch points:
- `server.LRUPromptCache` (`run()` builds the server's prompt cache through this name) becomes a
  `DiskPromptCache` built like an `LRUPromptCache` (`max_size`, `max_bytes`), so `bound_prompt_cache`,
  applied before or after, gives it its byte bound;
- `server.ModelProvider._load`: after a load, the model is registered (its fingerprint computed);
- `server.ResponseGenerator._next_request` (the generation thread calls it between requests, every
  0.1 s when idle): `on_idle()`, which warms a model loaded since.

Not in a distributed group: its ranks would have to agree on every lookup, and each holds part of the
cache."""

from __future__ import annotations

from pathlib import Path

from .store import DiskStore, log

STORE_SETTINGS = ("max_disk_bytes", "block", "fsync")
WRITER_SETTINGS = ("max_pending_bytes", "enospc_pause")
FLUSH_SECONDS = 3.0  # within the 5 s the wrapper gives a model server between SIGTERM and SIGKILL

_built: list = []  # the DiskPromptCache the server built (one per process)


def install(server, root: str | Path, *, max_bytes: int | None = None, model_name: str | None = None,
            **settings) -> bool:
    """Give `server` (the imported `mlx_lm.server` module) a prompt cache with a disk tier under `root`.

    `max_bytes` bounds the memory tier (as `--prompt-cache-bytes`; None: no byte bound unless
    `bound_prompt_cache` gives one); `model_name` is what `mlxgate cache` lists the model's entries under;
    `settings` are those of `DiskStore` (max_disk_bytes, block, fsync), `Writer` (max_pending_bytes,
    enospc_pause) and `DiskPromptCache` (min_tokens, min_gain, persist_after, warm_entries, ...). False
    (nothing patched) in a distributed group."""
    if server.mx.distributed.init().size() > 1:
        log.warning("prompt cache on disk: off in a distributed group")
        return False
    from .cache import DiskPromptCache
    from .writer import Writer

    store_settings = {k: settings.pop(k) for k in STORE_SETTINGS if k in settings}
    writer_settings = {k: settings.pop(k) for k in WRITER_SETTINGS if k in settings}
    memory_bound = max_bytes

    class ServerPromptCache(DiskPromptCache):
        def __init__(self, max_size: int = 10, max_bytes: int | None = None):
            store = DiskStore(root, **store_settings)
            bound = max_bytes if max_bytes is not None else memory_bound
            super().__init__(max_size, bound if bound is not None else 1 << 63, store=store,
                             writer=Writer(store, **writer_settings), **settings)
            _built.append(self)

    server.LRUPromptCache = ServerPromptCache
    _register_after_load(server, model_name)
    _warm_when_idle(server)
    return True


def _register_after_load(server, model_name: str | None) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    provider = server.ModelProvider
    original = provider._load

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        loaded = original(self, model_path, adapter_path, draft_model_path)
        if _built and self.model is not None:
            try:
                layers = len(make_prompt_cache(self.model))
                if self.draft_model is not None:
                    layers += len(make_prompt_cache(self.draft_model))
                args = self.cli_args
                _built[-1].register_model(self.model_key, model_path, adapter_path, draft_model_path, nlayers=layers,
                                          kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                                          quantized_kv_start=args.quantized_kv_start,
                                          chat_template=args.chat_template or "", name=model_name)
            except Exception as e:
                log.warning("prompt cache on disk: could not register model %s: %s", model_path, e)
        return loaded

    provider._load = _load


def _warm_when_idle(server) -> None:
    generator = server.ResponseGenerator
    original = generator._next_request

    def _next_request(self, timeout=None):
        if _built:
            try:
                _built[-1].on_idle()
            except Exception as e:
                log.warning("prompt cache on disk: idle work failed: %s", e)
        return original(self, timeout)

    generator._next_request = _next_request


def disk_stats() -> dict:
    """The counters the gateway's metrics read, to merge into the `/mlxgate/alive` report ({} without a
    disk tier)."""
    if not _built:
        return {}
    c = _built[-1].counters()
    return {
        "prompt_cache_hits": {"memory": c["hits_memory"], "disk": c["hits_disk"]},
        "prompt_cache_tokens": {"memory": c["tokens_memory"], "disk": c["tokens_disk"]},
        "prompt_disk_bytes": c["disk_bytes"], "prompt_disk_entries": c["disk_entries"],
        "prompt_disk_writes": c["sequences_written"], "prompt_disk_write_failures": c["write_errors"] + c["enospc"],
        "prompt_disk_corrupt_discarded": c["corrupt_discarded"], "prompt_disk_on_path_write_s": c["on_path_write_s"],
        "prompt_disk_snapshots": c["snapshots"],
    }


def flush(timeout: float = FLUSH_SECONDS) -> bool:
    """Write what is pending within `timeout` seconds (the parent-exit and SIGTERM paths, before the process
    dies); True if all was written."""
    return all(cache.flush(timeout) for cache in _built)


def close(timeout: float = FLUSH_SECONDS) -> bool:
    """Write what is pending and stop the writer (after `server.main()` returns)."""
    done = all([cache.close(timeout) for cache in _built])
    _built.clear()
    return done
