"""What makes a stored KV cache valid for a model process: a cache computed by other weights, another
configuration, other KV quantization or other MLX numerics must never be served, and two models whose
safetensors headers are the same may still differ in every weight. So the fingerprint hashes every weight
file whole; the digest is memoised in the root by (path, size, mtime, inode) so a restart does not read
the weights again."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import threading
from pathlib import Path

from .store import FORMAT, log, write_atomic

# small files that decide how a model reads its input, hashed whole (*.py: custom model code)
SMALL_FILES = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")
READ_AT_ONCE = 8 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_AT_ONCE):
            digest.update(block)
    return digest.hexdigest()


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


class DigestMemo:
    """Full-content digests of weight files, kept in a JSON file (none: in memory only)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._digests: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                self._digests = json.loads(path.read_text())
            except (OSError, ValueError):
                self._digests = {}

    def known(self, path: Path) -> bool:
        with self._lock:
            return _memo_key(path) in self._digests

    def digest(self, path: Path) -> str:
        key = _memo_key(path)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        digest = _sha256(path)
        with self._lock:
            self._digests[key] = digest
            if self.path is not None:
                try:
                    write_atomic(self.path, [json.dumps(self._digests, indent=0).encode()], fsync=False)
                except OSError as e:
                    log.warning("prompt cache on disk: cannot save the digests of weight files: %s", e)
        return digest


def _resolve(folder: str) -> Path | None:
    """A local folder, or a Hugging Face id resolved the way mlx_lm does, without downloading."""
    path = Path(folder)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(folder, local_files_only=True))
    except Exception:
        return None


def _folder(folder: str | None, memo: DigestMemo) -> dict | None:
    if not folder:
        return None
    path = _resolve(folder)
    if path is None:
        return {"unresolved": folder}
    return {
        "path": str(path.resolve()),
        "weights": {w.name: {"size": w.stat().st_size, "sha256": memo.digest(w)}
                    for w in sorted(path.glob("*.safetensors"))},
        "files": {f.name: _sha256(f) for f in sorted({f for pattern in SMALL_FILES for f in path.glob(pattern)})},
    }


def model_fingerprint(model_path: str, adapter_path: str | None = None, draft_model_path: str | None = None, *,
                      kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 5000,
                      chat_template: str = "", memo: DigestMemo | None = None) -> tuple[str, dict]:
    """(fp, info): fp is the sha256 of info, which says what the fingerprint is made of (stored beside the
    chunks as model.json)."""
    memo = memo or DigestMemo()
    info = {
        "format": FORMAT, "mlx": importlib.metadata.version("mlx"), "mlx_lm": importlib.metadata.version("mlx-lm"),
        "kv_bits": kv_bits, "kv_group_size": kv_group_size if kv_bits else None,
        "quantized_kv_start": quantized_kv_start if kv_bits else None,
        "chat_template_arg": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "model": _folder(model_path, memo), "adapter": _folder(adapter_path, memo),
        "draft": _folder(draft_model_path, memo),
    }
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest(), info


def unhashed_bytes(folders: list[str | None], memo: DigestMemo) -> int:
    """Bytes of weights in `folders` whose digest is not memoised yet: the cost of a fingerprint."""
    return sum(w.stat().st_size for folder in folders if folder and Path(folder).is_dir()
               for w in Path(folder).glob("*.safetensors") if not memo.known(w))
