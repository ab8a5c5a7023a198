"""Which local models exist: model directories, the Hugging Face cache, operator paths.

No serving here. A model in a model directory is named by its folder path relative to
that directory (``tiny-a``, ``mlx-community/Qwen2.5-Coder-3B-8bit``); a model in the
Hugging Face cache by its repository id. Paths given by the operator (config, command
line) are trusted and named by the exact string given; names from requests resolve
only inside the directories and the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import names
from .errors import ModelLoadFailed, UnknownModel, UnsafeModelName

WEIGHT_PREFIX, WEIGHT_SUFFIX = "model", ".safetensors"  # mlx_lm loads model*.safetensors, nothing else
MAX_HEADER = 100_000_000  # bytes: a safetensors header longer than this is not one
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    source: str  # "model_dir", "hf_cache" or "config"


def is_weight_file(name: str) -> bool:
    """Whether mlx_lm loads a file of this name as the model's weights (so not an adapter,
    and not the `._` companion files macOS writes on volumes without extended attributes)."""
    return name.startswith(WEIGHT_PREFIX) and name.endswith(WEIGHT_SUFFIX)


def weight_files(path: Path) -> list[Path]:
    return sorted(path / entry.name for entry in os.scandir(path) if is_weight_file(entry.name))


def is_model_folder(path: Path) -> bool:
    """A folder holds a model when it has a config.json and safetensors weights."""
    try:
        return (path / "config.json").is_file() and any(is_weight_file(e.name) for e in os.scandir(path))
    except OSError:
        return False


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _hf_snapshot(cache: Path, repo_id: str) -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir() and _inside(snapshot, cache):
            return snapshot
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class Catalog:
    """Find local models; `resolve` turns a requested name into one, safely."""

    def __init__(self, model_dirs: Iterable[Path], hf_cache: Path | None,
                 operator_models: Iterable[str] = ()):
        self.model_dirs = tuple(Path(d).expanduser() for d in model_dirs)
        self.hf_cache = hf_cache
        self._lock = threading.Lock()
        self._checked: dict[Path, tuple[tuple, str | None]] = {}
        self._recent: dict[str, tuple[float, LocalModel]] = {}  # servable names, when last checked
        self._operator: dict[str, LocalModel] = {}
        for given in operator_models:
            path = Path(given).expanduser()
            if given and (path.is_absolute() or given.startswith(("./", "../", "~"))):
                self._operator[given] = LocalModel(given, path.resolve(), "config")

    def list(self) -> list[LocalModel]:
        """Every model found, operator paths first, then directories, then the cache."""
        found: dict[str, LocalModel] = dict(self._operator)
        for root in self.model_dirs:
            for path in self._scan_dir(root):
                name = path.relative_to(root).as_posix()
                found.setdefault(name, LocalModel(name, path, "model_dir"))
        if self.hf_cache and self.hf_cache.is_dir():
            for repo in sorted(self.hf_cache.glob("models--*")):
                repo_id = repo.name[len("models--"):].replace("--", "/")
                snapshot = _hf_snapshot(self.hf_cache, repo_id)
                if snapshot and is_model_folder(snapshot):
                    found.setdefault(repo_id, LocalModel(repo_id, snapshot, "hf_cache"))
        return sorted(found.values(), key=lambda m: m.name.lower())

    def _scan_dir(self, root: Path) -> list[Path]:
        if not root.is_dir():
            return []
        models = []
        for first in sorted(root.iterdir()):
            if not first.is_dir() or not _inside(first, root):
                continue
            if is_model_folder(first):
                models.append(first)
                continue
            for second in sorted(first.iterdir()):  # org/name layout
                if second.is_dir() and _inside(second, root) and is_model_folder(second):
                    models.append(second)
        return models

    def resolve(self, requested: str) -> LocalModel:
        """The model a request names; raises `UnsafeModelName` or `UnknownModel`."""
        if requested in self._operator:
            return self._operator[requested]
        for name in names.candidates(requested):
            for root in self.model_dirs:
                path = root / name
                if not is_model_folder(path):
                    continue
                if not _inside(path, root):
                    raise UnsafeModelName(f"model name {requested!r} is not allowed: it leads outside the "
                                          f"model directories through a symbolic link")
                return LocalModel(name, path, "model_dir")
            if self.hf_cache:
                snapshot = _hf_snapshot(self.hf_cache, name)
                if snapshot and is_model_folder(snapshot):
                    return LocalModel(name, snapshot, "hf_cache")
        raise UnknownModel(
            f"model {requested!r} not found among the local models (the model directories and the Hugging "
            f"Face cache). Run `mlxgate models` to see what is available, or "
            f"`mlxgate download {names.strip_provider(requested)}`.")

    def servable(self, requested: str) -> LocalModel:
        """`resolve`, then the folder checked as a load would check it (config, weight
        headers), so a broken model is refused before anything is sent; the verdict is
        remembered while the folder's files stay the same, and for a second without looking
        at the disk at all: the proxy asks it for every request, on its event loop."""
        now = time.monotonic()
        with self._lock:
            hit = self._recent.get(requested)
        if hit is not None and now - hit[0] < RECHECK_SECONDS:
            return hit[1]
        model = self.resolve(requested)
        stamp = _stamp(model.path)
        with self._lock:
            seen = self._checked.get(model.path)
        if seen is None or seen[0] != stamp:
            try:
                verify_model_folder(model.path)
                seen = (stamp, None)
            except (ValueError, OSError) as exc:
                seen = (stamp, str(exc))
            with self._lock:
                self._checked[model.path] = seen
        if seen[1]:
            raise ModelLoadFailed(f"model {model.name!r} cannot be loaded: {seen[1]}")
        with self._lock:
            if len(self._recent) > 1000:
                self._recent.clear()
            self._recent[requested] = (now, model)
        return model


def _stamp(path: Path) -> tuple:
    """What changes when a model folder's files do: names, sizes and times."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
                            if e.name == "config.json" or is_weight_file(e.name)))
    except OSError:
        return ()


def verify_model_folder(path: Path) -> None:
    """Cheap integrity check before a load: config parses, every weight file is whole.

    Raises `ValueError` naming the bad file (by its name in the folder: messages reach
    clients, paths on this machine do not). It reads only file headers, so it takes
    milliseconds even for large models, and lets the wrapper refuse a broken folder
    without stopping the model that is serving.
    """
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise ValueError(f"config.json is not valid JSON ({reason})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError("config.json has no model_type")
    weights = weight_files(path)
    if not weights:
        raise ValueError("the folder has no model*.safetensors weights")
    for weight in weights:
        size = weight.stat().st_size
        raw = safetensors_header(weight, size)
        try:
            header = json.loads(raw)
        except ValueError:
            raise ValueError(f"{weight.name} is not a safetensors file (unreadable header)") from None
        ends = [t["data_offsets"][1] for k, t in header.items()
                if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
        if max(ends, default=0) > size - 8 - len(raw):
            raise ValueError(f"{weight.name} is truncated ({size} bytes on disk)")


def safetensors_header(weight: Path, size: int) -> bytes:
    """The JSON header a safetensors file starts with (8 bytes of length, then the JSON),
    unparsed; `ValueError` when the file cannot be one."""
    with weight.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{weight.name} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER):
            raise ValueError(f"{weight.name} is not a safetensors file (bad header length)")
        return handle.read(header_len)


def weights_digest(folder: Path) -> str | None:
    """What makes two machines' models the same model: SHA-256 over every safetensors
    header of the folder (names in order). A header names every tensor, its dtype, shape
    and byte range, so equal headers mean the same architecture at the same precision and
    sizes; `hosts add` compares these name by name. None when the folder has no readable
    weights. Remembered while the folder's files stay the same."""
    return _digest(str(folder), _stamp(Path(folder)))


@functools.lru_cache(maxsize=512)
def _digest(folder: str, stamp: tuple) -> str | None:
    try:
        digest = hashlib.sha256()
        weights = weight_files(Path(folder))
        for weight in weights:
            digest.update(weight.name.encode() + b"\0")
            digest.update(safetensors_header(weight, weight.stat().st_size))
        return digest.hexdigest() if weights else None
    except (OSError, ValueError):
        return None


def context_length(path: Path) -> int | None:
    """The model's context window from its config, when it says."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


_by_config: dict[tuple, Catalog] = {}


def for_config(config) -> Catalog:
    """The catalog a gateway config describes: its model directories, the Hugging Face
    cache, and the models it names by path (trusted: the operator wrote them)."""
    from .seats import configured

    operator = tuple(dict.fromkeys([*(name for _, name in configured(config)), *config.models]))
    key = (config.model_dirs, config.hf_cache, operator)
    if key not in _by_config:
        _by_config[key] = Catalog(config.model_dirs, config.hf_cache, operator_models=operator)
    return _by_config[key]
