"""A disk tier under `mlx_lm.server`'s in-memory prompt cache: a long prompt prefix (a coding agent's
system prompt and tools, a long document) is computed once and comes back from disk in a fraction of a
second after it has left memory or its model server has restarted, with honest `cached_tokens`.

Entries of `min_tokens` or more are written to disk when they leave memory, and while serving (a system
segment at once, others `persist_after` seconds after their insert, all that is pending at flush). A
lookup takes the longest stored prefix when it gives `min_gain` tokens more than memory would, always
leaving one token to process. The most used prefixes are brought back into memory after a load (`warm`).
Any disk problem falls back to what memory alone gives; no request fails because of the disk.

Modules, each importing only those named before it: `store` (files and index), `fingerprint` (what makes a cache
valid), `writer` (the writer thread), `cache` (`DiskPromptCache`), `serve` (`install` into mlx_lm.server).

On-disk format "mlxgate-prompt-cache/1": the files and the index are enough to list, clear and verify
----------------------------------------------------------------------------------------------------------
ROOT/                                0700
  index.sqlite                       0600 (WAL; -wal and -shm inherit 0600)
  digests.json                       0600 memo of weight-file digests keyed by (path, size, mtime_ns, inode)
  <fp[:16]>/model.json               0600 what the fingerprint is made of (paths, digests, KV settings, name)
  <fp[:16]>/<kk>/<key>.safetensors   0600 one chunk

* The fingerprint `fp` (sha256 hex) covers: the format, the mlx and mlx-lm versions, every *.safetensors
  file's full content digest, the tokenizer, configuration and template files (*.json, *.jinja, *.model,
  *.txt, *.tiktoken, *.py), the adapter folder and the draft model (the same way), `--chat-template`,
  kv_bits, kv_group_size and quantized_kv_start. Entries under another fingerprint are never read.
* A prompt is cut in blocks of `block` (256) tokens. `root = sha256(FORMAT|fp|layout)[:32]`, where
  `layout` is "kv" (KVCache layers) or "q<bits>g<group>" (QuantizedKVCache layers). Chunk key
  k_i = sha256(bytes.fromhex(k_{i-1}) + int32-LE tokens of block i)[:32], k_0 = root. A sequence whose
  length is not a multiple of `block` also gets a partial tail chunk (same rule, fewer tokens). Chunks are
  content addressed: sequences that share a prefix share its files.
* A chunk file is a standard safetensors file (`mx.load` reads it): tensors "l<layer>.<i>" are the layer's
  state arrays cut to the chunk's tokens on axis 2 (KVCache: keys, values; QuantizedKVCache: keys
  w/scales/biases, values w/scales/biases; bfloat16 stored as BF16), and "tokens" (I32). Header
  `__metadata__`: format, fp, root, key, parent, start, ntok, layout, layers (JSON list of class names),
  crc32 (zlib crc32 of the data section, decimal). The file's size is 8 + header + data.
* index.sqlite: meta(k, v) (format, block); models(fp, info, created, last_used); chunks(key, fp, root,
  parent, start, ntok, tokens BLOB int32-LE, file, nbytes, crc, created, last_used, hits, first);
  entries(root, tail, fp, ntok, cache_type, created, last_used): the stored sequences, by tail chunk;
  uses(root, key, fp, ntok, extra, count, last_used): how often a prefix was served (from memory or
  disk; `extra` holds its tokens after the last full block), which drives `warm`.
* Lookup: the keys k_1..k_m of the prompt's full blocks, the longest run present from k_1, then the
  child of its last node (full or partial chunk) with the longest common token prefix.
* Writes: a temp file (O_EXCL, 0600) renamed into place, then its index row; chunks in prefix order, so an
  interrupted sequence still leaves a usable prefix. fsync "end" (default): one syncfs after a sequence's
  chunks; "always": each file and its folder before its index row. A crash leaves at worst a ".tmp-*" file
  or a file without an index row; both are deleted at the next open and never read. Reads check the size,
  the header, the crc32 against header and index, each tensor's token count and the stored tokens against
  the prompt; a bad chunk is logged and deleted with its descendants, and the request goes on with the
  good chunks before it, or with the memory cache's answer.
* Byte bound: after each write, chunks are evicted by last_used (deeper first on ties) with their
  descendants until the root is within `max_disk_bytes` (one bound for the whole root).
* A full disk (ENOSPC, EDQUOT, SQLite "disk is full") pauses writing for `enospc_pause` seconds and drops
  the pending snapshots; no request is affected.
"""
