"""Write files only their owner may read (API key, private keys)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 600, also when the file existed with wider rights."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def replace_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 600 so that readers see the old file or the new one, never a
    part, also after a crash: a temporary file beside it, synced, then renamed over it. A reader that
    holds the old file (a container's bind mount) keeps the old one; use `write_private` for those."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
