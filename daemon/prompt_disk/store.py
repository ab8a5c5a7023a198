"""The files and the SQLite index under one root: everything the disk tier keeps, and all it takes to find,
check, bound, list and clear it. Plain files, numpy and sqlite3 only, because `mlxgate cache` lists and
clears a root from a process that has no model and no MLX loaded.

A `DiskStore` may be used from several threads (one SQLite connection each) and several processes (WAL;
files are renamed into place, so a reader sees a whole chunk or none)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

log = logging.getLogger("mlxgate.prompt_disk")

FORMAT = "mlxgate-prompt-cache/1"
BLOCK = 256
INDEX = "index.sqlite"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
IN_BATCH = 500  # keys per `IN (...)` query
ORPHAN_AGE = 60.0  # a file without an index row is left this long: its writer may be between rename and commit
STALE_TMP_AGE = 3600.0
# safetensors dtype codes of the numpy dtypes a snapshot holds (bfloat16 travels as uint16, tagged BF16)
CODE_OF = {"float32": "F32", "float16": "F16", "uint32": "U32", "int32": "I32", "uint16": "U16", "int8": "I8",
           "uint8": "U8", "int64": "I64"}
_NUMPY_OF = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
             "U16": np.uint16, "I8": np.int8, "U8": np.uint8, "I64": np.int64}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS models(fp TEXT PRIMARY KEY, info TEXT, created REAL, last_used REAL);
CREATE TABLE IF NOT EXISTS chunks(key TEXT PRIMARY KEY, fp TEXT, root TEXT, parent TEXT, start INT,
  ntok INT, tokens BLOB, file TEXT, nbytes INT, crc INT, created REAL, last_used REAL, hits INT DEFAULT 0,
  first INT);
CREATE INDEX IF NOT EXISTS chunks_parent ON chunks(parent, first);
CREATE INDEX IF NOT EXISTS chunks_lru ON chunks(last_used);
CREATE TABLE IF NOT EXISTS entries(root TEXT, tail TEXT, fp TEXT, ntok INT, cache_type TEXT, created REAL,
  last_used REAL, PRIMARY KEY(root, tail));
CREATE TABLE IF NOT EXISTS uses(root TEXT, key TEXT, fp TEXT, ntok INT, extra BLOB, count INT, last_used REAL,
  PRIMARY KEY(root, key, ntok));
"""


class CorruptChunk(Exception):
    """A chunk that cannot be trusted; `key` names it when the index knows it."""

    def __init__(self, reason: str, key: str = ""):
        super().__init__(reason)
        self.reason, self.key = reason, key


# ---------------------------------------------------------------- keys

class Link(NamedTuple):
    key: str
    parent: str
    start: int
    ntok: int


def root_key(fp: str, layout: str) -> str:
    """The parent of a sequence's first chunk: one per model fingerprint and cache layout."""
    return hashlib.sha256(f"{FORMAT}|{fp}|{layout}".encode()).hexdigest()[:32]


def token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def chain_keys(root: str, tokens: Sequence[int], block: int = BLOCK, partial: bool = True) -> list[Link]:
    """A link for every full block of `tokens`, and for the partial tail if `partial`."""
    data, links, parent = token_bytes(tokens), [], root
    for start in range(0, len(tokens), block):
        ntok = min(block, len(tokens) - start)
        if ntok < block and not partial:
            break
        key = hashlib.sha256(bytes.fromhex(parent) + data[4 * start: 4 * (start + ntok)]).hexdigest()[:32]
        links.append(Link(key, parent, start, ntok))
        parent = key
    return links


def _batches(keys: Sequence[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), IN_BATCH):
        yield list(keys[i:i + IN_BATCH])


def _marks(keys: Sequence[str]) -> str:
    return ",".join("?" * len(keys))


# ---------------------------------------------------------------- files

def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (path.stat().st_mode & 0o777) != 0o700:
        os.chmod(path, 0o700)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: Path, parts: Iterable[bytes], fsync: bool = True) -> None:
    """Write a file readers see whole or not at all (temp file 0600, then rename)."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _syncfs(path: Path) -> None:
    """Flush the file system holding `path` once (Linux syncfs(2)); elsewhere a plain sync."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        os.sync()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _writer_pid(name: str) -> int | None:
    """The pid in a temp file's name (`.tmp-NAME-PID-THREAD`)."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# ---------------------------------------------------------------- chunks

def encode_chunk(arrays: list[tuple[str, np.ndarray, str]], meta: dict[str, str]) -> tuple[list[bytes], int, int]:
    """A safetensors file as parts to write, its size, and the crc32 of its data section."""
    header: dict = {}
    datas, offset, crc = [], 0, 0
    for name, array, code in arrays:
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        crc = zlib.crc32(data, crc)
        datas.append(data)
    header["__metadata__"] = dict(meta, crc32=str(crc))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)), head, *datas], 8 + len(head) + offset, crc


def decode_chunk(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(arrays, dtype codes, metadata) of a chunk file; CorruptChunk on any inconsistency."""
    if len(data) < 16:
        raise CorruptChunk(f"file too short ({len(data)} bytes)")
    (head_len,) = struct.unpack("<Q", data[:8])
    if head_len <= 0 or 8 + head_len > len(data):
        raise CorruptChunk(f"bad header length {head_len} for {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + head_len])
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptChunk("missing or foreign metadata")
        base = 8 + head_len
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if base + end != len(data):
            raise CorruptChunk(f"size {len(data)} != header + data {base + end} (truncated?)")
        crc = zlib.crc32(memoryview(data)[base:])
        if str(crc) != meta.get("crc32"):
            raise CorruptChunk(f"crc32 mismatch ({crc} != {meta.get('crc32')})")
        arrays, codes = {}, {}
        for name, v in header.items():
            start, stop = v["data_offsets"]
            dtype = np.dtype(_NUMPY_OF[v["dtype"]])
            arrays[name] = np.frombuffer(data, dtype=dtype, count=(stop - start) // dtype.itemsize,
                                         offset=base + start).reshape(v["shape"])
            codes[name] = v["dtype"]
    except CorruptChunk:
        raise
    except Exception as e:  # the crc covers the data only: a damaged header fails here
        raise CorruptChunk(f"unreadable header: {e!r}") from None
    return arrays, codes, meta


# ---------------------------------------------------------------- what goes in and comes out

@dataclass(eq=False)
class Snapshot:
    """One prompt cache entry as the writer writes it: per layer, numpy views of its evaluated state
    arrays cut to its tokens (token axis 2)."""

    fp: str
    layout: str
    tokens: list[int]
    layers: list[list[np.ndarray]]
    codes: list[list[str]]
    classes: list[str]
    cache_type: str
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.root = root_key(self.fp, self.layout)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for row in self.layers for a in row)


class Row(NamedTuple):
    key: str
    file: str
    start: int
    ntok: int
    crc: int


@dataclass
class Match:
    """The stored chunks that give the longest usable prefix of a prompt."""

    root: str
    layout: str
    rows: list[Row]
    n: int  # usable tokens (<= the chunks' tokens; always < the prompt's length)


@dataclass
class Chain:
    """A match read and checked: per chunk, its tensors (layer by layer, cut to the usable tokens)."""

    tensors: list[list[np.ndarray]]
    codes: list[str]
    classes: list[str]
    n: int


class Written(NamedTuple):
    chunks: int
    bytes: int
    evicted_chunks: int
    evicted_bytes: int


@dataclass
class StoredEntry:
    tokens: int
    bytes: int  # its whole chain, shared prefix chunks included
    cache_type: str
    created: float
    last_used: float


@dataclass
class StoredModel:
    fp: str
    name: str | None
    path: str | None
    kv_bits: int | None
    chunks: int
    bytes: int  # each chunk once
    last_used: float
    entries: list[StoredEntry]


@dataclass
class Cleared:
    models: list[str]  # name (or folder, or fingerprint) of each model whose chunks went
    chunks: int
    bytes: int


@dataclass
class Verified:
    ok: int
    discarded: int


# ---------------------------------------------------------------- the store

class DiskStore:
    """The files and index under one root."""

    def __init__(self, root: str | Path, *, max_disk_bytes: int = 20 << 30, block: int = BLOCK,
                 fsync: str = "end"):
        """fsync: "always" (each chunk file and its folder before its index row), "end" (one syncfs after a
        sequence's chunks), "never". A killed process loses nothing complete in any mode (rename is atomic,
        the page cache survives it); fsync is about power loss, after which the size and crc32 checks
        discard what did not reach the disk."""
        if fsync not in ("always", "end", "never"):
            raise ValueError(f"fsync must be always, end or never, not {fsync!r}")
        self.root = Path(root)
        self.max_disk_bytes, self.block, self.fsync = max_disk_bytes, block, fsync
        self.db_path = self.root / INDEX
        self._local = threading.local()
        make_private_dir(self.root)
        try:
            self._open_index()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            self._set_aside(str(e))
            self._open_index()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.db_path, timeout=10)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def _open_index(self) -> None:
        if not self.db_path.exists():
            os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))
        con = self._con()
        con.executescript(_SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta VALUES('format', ?)", (FORMAT,))
        con.execute("INSERT OR IGNORE INTO meta VALUES('block', ?)", (str(self.block),))
        con.commit()
        found = dict(con.execute("SELECT k, v FROM meta").fetchall())
        if found["format"] != FORMAT:
            raise sqlite3.DatabaseError(f"index of format {found['format']}, not {FORMAT}")
        if int(found["block"]) != self.block:
            raise ValueError(f"{self.root} keeps blocks of {found['block']} tokens, not {self.block}")

    def _set_aside(self, reason: str) -> None:
        """Move an unreadable index away and start empty; its chunk files become orphans, deleted at the
        next open (`cleanup`)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
        self._local = threading.local()
        aside = self.db_path.with_name(f"{INDEX}.corrupt-{int(time.time())}")
        log.warning("prompt cache on disk: index %s unreadable (%s); moved to %s, starting empty",
                    self.db_path, reason, aside)
        os.rename(self.db_path, aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)

    def model_dir(self, fp: str) -> Path:
        return self.root / fp[:16]

    def register_model(self, fp: str, info: dict) -> None:
        """Record what a fingerprint is made of (model.json and the models table)."""
        folder = self.model_dir(fp)
        make_private_dir(folder)
        described = folder / "model.json"
        if not described.exists():
            write_atomic(described, [json.dumps(dict(info, fp=fp), indent=1).encode()], fsync=self.fsync != "never")
        now = time.time()
        con = self._con()
        con.execute("INSERT INTO models VALUES(?,?,?,?) ON CONFLICT(fp) DO UPDATE SET info=excluded.info, "
                    "last_used=excluded.last_used", (fp, json.dumps(info), now, now))
        con.commit()

    def cleanup(self) -> dict[str, int]:
        """Delete temp files of writers that are gone and chunk files without an index row (both are what a
        killed writer leaves; neither is ever read)."""
        known = {r[0] for r in self._con().execute("SELECT file FROM chunks")}
        removed = {"tmp_removed": 0, "orphans_removed": 0}
        now = time.time()
        for folder in self.root.iterdir():
            if not folder.is_dir() or len(folder.name) != 16:
                continue
            for path in folder.rglob("*"):
                if not path.is_file():
                    continue
                if path.name.startswith(".tmp-"):
                    pid = _writer_pid(path.name)
                    # this process's own pid here is a dead process's: our writer has not started yet
                    writing = pid is not None and pid != os.getpid() and _pid_alive(pid)
                    if not writing or now - path.stat().st_mtime > STALE_TMP_AGE:
                        path.unlink(missing_ok=True)
                        removed["tmp_removed"] += 1
                elif path.suffix == ".safetensors" and str(path.relative_to(self.root)) not in known:
                    if now - path.stat().st_mtime > ORPHAN_AGE:
                        path.unlink(missing_ok=True)
                        removed["orphans_removed"] += 1
        for path in self.root.glob(".tmp-*"):
            pid = _writer_pid(path.name)
            if pid is None or not _pid_alive(pid):
                path.unlink(missing_ok=True)
                removed["tmp_removed"] += 1
        return removed

    # ------------------------------------------------------------ reads (generation thread)

    def lookup(self, roots: list[tuple[str, str]], tokens: Sequence[int]) -> Match | None:
        """The longest usable stored prefix of `tokens` under any of `roots` ((root, layout) pairs): the run
        of full-block chunks present from the first, then the child of its last node (a full or partial
        chunk) sharing most tokens with the prompt. Always leaves one token to process."""
        if len(tokens) < 2:
            return None
        con, best = self._con(), None
        for root, layout in roots:
            keys = [link.key for link in chain_keys(root, tokens, self.block, partial=False)]
            present = {}
            for part in _batches(keys):
                query = f"SELECT key, file, start, ntok, crc FROM chunks WHERE key IN ({_marks(part)})"
                present.update((r[0], Row(*r)) for r in con.execute(query, part))
            rows = []
            for key in keys:
                if key not in present:
                    break
                rows.append(present[key])
            depth = len(rows) * self.block
            extra, child = self._best_child(con, rows[-1].key if rows else root, tokens[depth:depth + self.block])
            if child is not None:
                rows.append(child)
            n = min(depth + extra, len(tokens) - 1)
            if n <= 0:
                continue
            while rows and rows[-1].start >= n:  # chunks past the cap are not needed
                rows.pop()
            if best is None or n > best.n:
                best = Match(root, layout, rows, n)
        return best

    @staticmethod
    def _best_child(con, parent: str, following: Sequence[int]) -> tuple[int, Row | None]:
        """The child chunk of `parent` sharing the longest prefix with `following`, and that length."""
        if not len(following):
            return 0, None
        wanted = np.asarray(following, dtype=np.int32)
        kids = con.execute("SELECT key, file, start, ntok, crc, tokens FROM chunks WHERE parent=? AND first=?",
                           (parent, int(wanted[0]))).fetchall()
        if not kids:
            return 0, None
        # every child's common prefix with the prompt in one numpy operation
        table = np.full((len(kids), len(wanted) + 1), -1, dtype=np.int32)
        for i, kid in enumerate(kids):
            stored = np.frombuffer(kid[5], dtype="<i4")[:len(wanted)]
            table[i, :len(stored)] = stored
        common = np.argmax(table != np.append(wanted, -2), axis=1)
        i = int(np.argmax(common))
        return (int(common[i]), Row(*kids[i][:5])) if common[i] > 0 else (0, None)

    def read_chain(self, match: Match, tokens: Sequence[int], fp: str) -> Chain:
        """Read and check the chunks of `match`; CorruptChunk (with its key) for the first bad one."""
        tensors: list[list[np.ndarray]] = []
        codes = classes = None
        for key, file, start, ntok, crc in match.rows:
            use = min(ntok, match.n - start)
            path = self.root / file
            try:
                data = path.read_bytes()
            except OSError as e:
                raise CorruptChunk(f"cannot read {path}: {e}", key) from None
            try:
                arrays, found_codes, meta = decode_chunk(data)
            except CorruptChunk as e:
                raise CorruptChunk(f"{path}: {e.reason}", key) from None
            expected = {"key": key, "root": match.root, "fp": fp, "ntok": str(ntok), "start": str(start),
                        "crc32": str(crc)}
            if any(meta.get(k) != v for k, v in expected.items()):
                raise CorruptChunk(f"{path}: metadata does not match the index", key)
            stored = arrays.pop("tokens", None)
            if stored is None or stored.shape != (ntok,) or \
                    not np.array_equal(stored[:use], np.asarray(tokens[start:start + use], np.int32)):
                raise CorruptChunk(f"{path}: stored tokens differ from the prompt", key)
            if any(a.ndim != 4 or a.shape[2] != ntok for a in arrays.values()):
                raise CorruptChunk(f"{path}: a tensor does not hold {ntok} tokens on axis 2", key)
            found_classes = json.loads(meta.get("layers", "[]"))
            names = sorted(arrays, key=lambda s: tuple(int(x) for x in s[1:].split(".")))
            if classes is None:
                classes, codes = found_classes, [found_codes[name] for name in names]
            elif found_classes != classes or len(names) != len(codes):
                raise CorruptChunk(f"{path}: layers differ within a chain", key)
            tensors.append([arrays[name][:, :, :use] for name in names])
        return Chain(tensors, codes or [], classes or [], match.n)

    # ------------------------------------------------------------ writes (writer thread)

    def write(self, snapshot: Snapshot) -> Written:
        """Write the chunks of `snapshot` not stored yet, in prefix order (an interrupted write still leaves
        a usable prefix), record the sequence, and keep the root within its byte bound."""
        con = self._con()
        links = chain_keys(snapshot.root, snapshot.tokens, self.block, partial=True)
        keys = [link.key for link in links]
        existing: set[str] = set()
        for part in _batches(keys):
            existing |= {r[0] for r in con.execute(f"SELECT key FROM chunks WHERE key IN ({_marks(part)})", part)}
        folder, now = self.model_dir(snapshot.fp), time.time()
        chunks = written = 0
        for key, parent, start, ntok in links:
            if key in existing:
                continue
            tokens = np.asarray(snapshot.tokens[start:start + ntok], dtype="<i4")
            arrays = [(f"l{layer}.{j}", array[:, :, start:start + ntok], snapshot.codes[layer][j])
                      for layer, row in enumerate(snapshot.layers) for j, array in enumerate(row)]
            arrays.append(("tokens", tokens, "I32"))
            meta = {"format": FORMAT, "fp": snapshot.fp, "root": snapshot.root, "key": key, "parent": parent,
                    "start": str(start), "ntok": str(ntok), "layout": snapshot.layout,
                    "layers": json.dumps(snapshot.classes)}
            parts, size, crc = encode_chunk(arrays, meta)
            sub = folder / key[:2]
            make_private_dir(sub)
            path = sub / f"{key}.safetensors"
            write_atomic(path, parts, fsync=self.fsync == "always")
            con.execute("INSERT OR REPLACE INTO chunks(key, fp, root, parent, start, ntok, tokens, file, nbytes, crc,"
                        " created, last_used, hits, first) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,0,?)",
                        (key, snapshot.fp, snapshot.root, parent, start, ntok, tokens.tobytes(),
                         str(path.relative_to(self.root)), size, crc, now, now, int(tokens[0])))
            con.commit()
            chunks, written = chunks + 1, written + size
            if ntok == self.block:
                self._drop_covered_partials(con, parent, key, tokens)
        if written and self.fsync == "end":
            _syncfs(self.root)
        self._touch(con, keys, now)  # the whole path: ancestors stay at least as fresh as their descendants
        con.execute("INSERT INTO entries VALUES(?,?,?,?,?,?,?) ON CONFLICT(root, tail) DO UPDATE SET "
                    "last_used=excluded.last_used",
                    (snapshot.root, keys[-1], snapshot.fp, len(snapshot.tokens), snapshot.cache_type, now, now))
        for part in _batches(keys[:-1]):  # sequences this one extends are covered by it
            con.execute(f"DELETE FROM entries WHERE root=? AND tail IN ({_marks(part)})", (snapshot.root, *part))
        con.commit()
        return Written(chunks, written, *self.enforce_bound())

    def _drop_covered_partials(self, con, parent: str, key: str, tokens: np.ndarray) -> None:
        """A partial chunk without children that a new full sibling starts with is covered by it: its
        entries move to the full one and it goes."""
        for other, stored in con.execute("SELECT key, tokens FROM chunks WHERE parent=? AND first=? AND key<>? "
                                         "AND ntok<?", (parent, int(tokens[0]), key, self.block)).fetchall():
            prefix = np.frombuffer(stored, dtype="<i4")
            if not np.array_equal(tokens[:len(prefix)], prefix):
                continue
            if con.execute("SELECT 1 FROM chunks WHERE parent=? LIMIT 1", (other,)).fetchone():
                continue
            con.execute("UPDATE OR IGNORE entries SET tail=? WHERE tail=?", (key, other))
            self._delete_subtree(con, other)
        con.commit()

    def _touch(self, con, keys: Sequence[str], now: float, hit: bool = False) -> None:
        hits = ", hits=hits+1" if hit else ""
        for part in _batches(keys):
            con.execute(f"UPDATE chunks SET last_used=?{hits} WHERE key IN ({_marks(part)})", (now, *part))
        con.commit()

    def touch(self, keys: Sequence[str]) -> None:
        """Mark chunks as just served (the byte bound evicts the least recently used)."""
        self._touch(self._con(), keys, time.time(), hit=True)

    def record_uses(self, uses: dict[tuple[str, str, int], tuple[str, bytes, int, float]]) -> None:
        """Count served prefixes ((root, key, ntok) -> (fp, tokens after key, count, last)); `warm` reads them."""
        con = self._con()
        for (root, key, ntok), (fp, extra, count, last) in uses.items():
            con.execute("INSERT INTO uses VALUES(?,?,?,?,?,?,?) ON CONFLICT(root, key, ntok) DO UPDATE SET "
                        "count=count+excluded.count, last_used=excluded.last_used",
                        (root, key, fp, ntok, extra, count, last))
        con.commit()

    def _delete_rows(self, con, rows: Iterable[tuple[str, str, int]]) -> tuple[int, int]:
        """Delete chunks ((key, file, nbytes) rows): files first, then their rows and the entries ending there."""
        n = nbytes = 0
        for key, file, size in rows:
            try:
                (self.root / file).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("prompt cache on disk: cannot delete %s: %s", file, e)
            con.execute("DELETE FROM chunks WHERE key=?", (key,))
            con.execute("DELETE FROM entries WHERE tail=?", (key,))
            n, nbytes = n + 1, nbytes + size
        con.commit()
        return n, nbytes

    def _delete_subtree(self, con, key: str) -> tuple[int, int]:
        rows = con.execute("WITH RECURSIVE sub(k) AS (SELECT ? UNION SELECT c.key FROM chunks c JOIN sub ON "
                           "c.parent=sub.k) SELECT key, file, nbytes FROM chunks WHERE key IN sub", (key,)).fetchall()
        return self._delete_rows(con, rows)

    def discard(self, key: str, reason: str) -> tuple[int, int]:
        """Delete a bad chunk and everything stored after it, with a log line."""
        n, nbytes = self._delete_subtree(self._con(), key)
        log.warning("prompt cache on disk: discarded chunk %s and %d chunk(s) after it, %d bytes: %s", key,
                    max(0, n - 1), nbytes, reason)
        return n, nbytes

    def total_bytes(self) -> int:
        return self._con().execute("SELECT COALESCE(SUM(nbytes), 0) FROM chunks").fetchone()[0]

    def enforce_bound(self) -> tuple[int, int]:
        """Evict the least recently used chunks (deeper first on ties) with their descendants until the root
        is within `max_disk_bytes`; (chunks, bytes) evicted."""
        con, total = self._con(), self.total_bytes()
        n = nbytes = 0
        while total > self.max_disk_bytes:
            row = con.execute("SELECT key FROM chunks ORDER BY last_used ASC, start DESC LIMIT 1").fetchone()
            if row is None:
                break
            gone, size = self._delete_subtree(con, row[0])
            total, n, nbytes = total - size, n + gone, nbytes + size
        return n, nbytes

    # ------------------------------------------------------------ warm

    def best_uses(self, roots: list[str], limit: int) -> list[tuple[str, str, int, bytes, int]]:
        """The most served prefixes under `roots`: (root, key, ntok, tokens after key, count)."""
        if not roots:
            return []
        query = (f"SELECT root, key, ntok, extra, count FROM uses WHERE root IN ({_marks(roots)}) "
                 f"ORDER BY count DESC, ntok DESC LIMIT ?")
        return self._con().execute(query, (*roots, limit)).fetchall()

    def tokens_of(self, key: str, root: str) -> list[int] | None:
        """The tokens of the chain ending at chunk `key` (the root itself: []), from the index alone."""
        if key == root:
            return []
        con, parts = self._con(), []
        while True:
            row = con.execute("SELECT parent, tokens, root FROM chunks WHERE key=?", (key,)).fetchone()
            if row is None or row[2] != root:
                return None
            parts.append(np.frombuffer(row[1], dtype="<i4"))
            if row[0] == root:
                return np.concatenate(parts[::-1]).tolist()
            key = row[0]

    # ------------------------------------------------------------ what `mlxgate cache` shows and does

    def totals(self) -> dict[str, dict[str, int]]:
        """Per fingerprint: chunks, bytes and entries on disk."""
        con = self._con()
        out = {fp: {"chunks": n, "bytes": b, "entries": 0}
               for fp, n, b in con.execute("SELECT fp, COUNT(*), SUM(nbytes) FROM chunks GROUP BY fp")}
        for fp, n in con.execute("SELECT fp, COUNT(*) FROM entries GROUP BY fp"):
            out.setdefault(fp, {"chunks": 0, "bytes": 0, "entries": 0})["entries"] = n
        return out

    def _described(self) -> dict[str, dict]:
        return {fp: json.loads(info) for fp, info in self._con().execute("SELECT fp, info FROM models")}

    def models(self) -> list[StoredModel]:
        """The models with chunks on disk, most recently used first, each with its stored sequences."""
        con, described = self._con(), self._described()
        found = []
        for fp, chunks, nbytes, last in con.execute("SELECT fp, COUNT(*), SUM(nbytes), MAX(last_used) FROM chunks "
                                                    "GROUP BY fp").fetchall():
            info = described.get(fp, {})
            entries = []
            for tail, ntok, cache_type, created, used in con.execute(
                    "SELECT tail, ntok, cache_type, created, last_used FROM entries WHERE fp=? ORDER BY last_used DESC",
                    (fp,)).fetchall():
                size, chain_used = con.execute(
                    "WITH RECURSIVE up(k) AS (SELECT ? UNION SELECT c.parent FROM chunks c JOIN up ON c.key=up.k) "
                    "SELECT COALESCE(SUM(nbytes), 0), MAX(last_used) FROM chunks WHERE key IN up", (tail,)).fetchone()
                entries.append(StoredEntry(ntok, size, cache_type, created, max(used, chain_used or 0)))
            found.append(StoredModel(fp, info.get("name"), (info.get("model") or {}).get("path"), info.get("kv_bits"),
                                     chunks, nbytes, last, sorted(entries, key=lambda e: -e.last_used)))
        return sorted(found, key=lambda m: -m.last_used)

    def clear(self, model: str | None = None) -> Cleared:
        """Delete every chunk, or those of one model: `model` is its name, its folder, or a fingerprint prefix
        (8 hex digits at least)."""
        con, described = self._con(), self._described()
        fps = {r[0] for r in con.execute("SELECT DISTINCT fp FROM chunks")} | set(described)
        chosen = [fp for fp in sorted(fps) if model is None or _names(model, fp, described.get(fp, {}))]
        cleared = Cleared([], 0, 0)
        for fp in chosen:
            gone, size = self._delete_rows(con, con.execute("SELECT key, file, nbytes FROM chunks WHERE fp=?",
                                                            (fp,)).fetchall())
            con.execute("DELETE FROM entries WHERE fp=?", (fp,))
            con.execute("DELETE FROM uses WHERE fp=?", (fp,))
            con.commit()
            for sub in self.model_dir(fp).glob("??"):
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if gone:
                info = described.get(fp, {})
                cleared.models.append(info.get("name") or (info.get("model") or {}).get("path") or fp)
                cleared.chunks, cleared.bytes = cleared.chunks + gone, cleared.bytes + size
        return cleared

    def verify(self) -> Verified:
        """Read every chunk; discard those that fail their checks."""
        ok = bad = 0
        con = self._con()
        for key, file, crc in con.execute("SELECT key, file, crc FROM chunks").fetchall():
            if con.execute("SELECT 1 FROM chunks WHERE key=?", (key,)).fetchone() is None:
                continue  # gone with a bad chunk before it
            try:
                _, _, meta = decode_chunk((self.root / file).read_bytes())
                if meta.get("key") != key or meta.get("crc32") != str(crc):
                    raise CorruptChunk("metadata does not match the index")
                ok += 1
            except OSError as e:
                bad += 1
                self.discard(key, f"verify: {e}")
            except CorruptChunk as e:
                bad += 1
                self.discard(key, f"verify: {e.reason}")
        return Verified(ok, bad)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def _names(model: str, fp: str, info: dict) -> bool:
    """Whether `model` names this fingerprint: its name, its folder, or a prefix of it."""
    path = (info.get("model") or {}).get("path")
    if model == info.get("name") or (path and os.path.realpath(os.path.expanduser(model)) == path):
        return True
    return len(model) >= 8 and fp.startswith(model.lower())


# ---------------------------------------------------------------- one function per `mlxgate cache` action

def _existing(root: str | Path) -> DiskStore | None:
    """The store at `root` if there is one (these actions never create a root)."""
    return DiskStore(root) if (Path(root) / INDEX).is_file() else None


def list_models(root: str | Path) -> list[StoredModel]:
    """What `mlxgate cache` lists: per model, its stored sequences (tokens, bytes, last use)."""
    store = _existing(root)
    if store is None:
        return []
    try:
        return store.models()
    finally:
        store.close()


def clear(root: str | Path, model: str | None = None) -> Cleared:
    """`mlxgate cache clear [MODEL]`: delete all stored sequences, or one model's."""
    store = _existing(root)
    if store is None:
        return Cleared([], 0, 0)
    try:
        return store.clear(model)
    finally:
        store.close()


def verify(root: str | Path) -> Verified:
    """`mlxgate cache verify`: read every chunk, discard the bad ones."""
    store = _existing(root)
    if store is None:
        return Verified(0, 0)
    try:
        return store.verify()
    finally:
        store.close()
