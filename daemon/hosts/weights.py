"""What makes two machines' models the same model: the same weights header.

A safetensors file starts with a JSON header naming every tensor, its dtype, shape and
byte range. Two folders whose headers are equal hold the same architecture at the same
precision and sizes; the digest of them is what `hosts add`
compares, name by name, so a name means one model on every host. Reading a header
costs a few kilobytes per file; the digest is remembered while the files stay the same.
"""

from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from pathlib import Path


def _header(path: Path) -> bytes:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(min(length, 100 * 1024 * 1024))


@lru_cache(maxsize=512)
def _digest(folder: str, stamp: tuple) -> str | None:
    root = Path(folder)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        digest.update(_header(file))
    return digest.hexdigest()


def weights_digest(folder: Path) -> str | None:
    """SHA-256 over every safetensors header of a model folder (names in order); None when
    it has no weights or they cannot be read."""
    try:
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                      for p in sorted(Path(folder).glob("*.safetensors")))
        return _digest(str(folder), stamp)
    except (OSError, struct.error, ValueError):
        return None
