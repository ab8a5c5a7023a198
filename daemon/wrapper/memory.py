"""What memory the resident set may use, and what one model costs in it.

- **The budget** (`memory_budget`): what the resident models may use together. `auto`: on
  macOS the Metal recommended working set (`mx.device_info()`'s
  `max_recommended_working_set_size`, what MLX itself keeps under to avoid paging GPU memory)
  less 10 % (at least 1 GiB) for the gateway's own programs; elsewhere 70 % of physical memory.
- **A model's cost**: its weights (the sizes of the safetensors files it loads), plus its
  prompt cache allowance (`prompt_cache`: the bytes of KV cache its server may keep, which
  `mlx_lm_entry` enforces), plus the process. Before its first load the process is what the
  other models' servers measured beyond their weights (`PROCESS_ESTIMATE` before any was
  measured); once loaded, the model server's measured memory (the larger of its resident set
  and MLX's own count of what it allocated, which is what Metal memory shows as on macOS)
  replaces weights and process, and that figure is remembered for later loads.
- **The machine**: a load also needs that much memory free on the machine (programs
  other than the gateway count too), so a load never pushes the machine into swap.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..catalog import context_length, weight_files

log = logging.getLogger("mlxgate.wrapper")

GIB = 1024 ** 3
PROCESS_ESTIMATE = 320 * 1024 ** 2  # a model server before it is measured: Python, MLX, mlx_lm (about 100 MB here)
LINUX_SHARE = 0.70
MACOS_HEADROOM = (0.10, GIB)
ALLOWANCE_TOKENS = 65536            # `prompt_cache: auto` holds the KV cache of this many tokens...
ALLOWANCE_MIN = 256 * 1024 ** 2     # ...no less than this...
ALLOWANCE_SHARE = 0.25              # ...and no more than this share of the budget
ALLOWANCE_UNKNOWN = 2 * GIB         # when the config does not say how big a token's KV is


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # how it was found, for `mlxgate status` and `ps`


def metal_working_set() -> int | None:
    """macOS: the Metal recommended working set, asked of MLX in a process of its own (the
    wrapper does not load MLX); None elsewhere or when MLX cannot say."""
    if sys.platform != "darwin":
        return None
    probe = "import json, mlx.core as mx; print(json.dumps(mx.device_info()))"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        return int(json.loads(done.stdout)["max_recommended_working_set_size"])
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
        return None


def budget(setting: int | None, working_set=metal_working_set, total: int | None = None) -> Budget:
    """The budget a `memory_budget` setting means (None: auto)."""
    if setting is not None:
        return Budget(setting, f"memory_budget {_gib(setting)}")
    metal = working_set()
    if metal:
        headroom = max(int(metal * MACOS_HEADROOM[0]), MACOS_HEADROOM[1])
        return Budget(metal - headroom, f"auto: the Metal recommended working set {_gib(metal)} less "
                                        f"{_gib(headroom)}")
    total = total or psutil.virtual_memory().total
    return Budget(int(total * LINUX_SHARE), f"auto: {LINUX_SHARE:.0%} of {_gib(total)} physical memory")


def weights_bytes(path: Path) -> int:
    """What the model's weights take: the safetensors files mlx_lm loads."""
    try:
        return sum(f.stat().st_size for f in weight_files(Path(path)))
    except OSError:
        return 0


def kv_bytes_per_token(path: Path, kv_bits: int | None = None) -> int | None:
    """A token's KV cache in every layer, from the model's config (None when it does not say)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = {**config, **(config.get("text_config") or {})}
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    width = kv_bits / 8 * 1.25 if kv_bits else activation_bytes(Path(path), config)  # quantized: + scales
    return int(layers * kv_heads * head_dim * 2 * width)


FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def activation_bytes(path: Path, config: dict) -> int:
    """Bytes of one value of the model's activations (its KV cache): the config's dtype, else
    the most common float type of its weights (a quantized model's scales), else 2."""
    named = str(config.get("torch_dtype") or config.get("dtype") or "")
    if named:
        return 4 if named.endswith("32") else 2
    from ..catalog import safetensors_header

    for weights in weight_files(path)[:1]:
        try:
            header = json.loads(safetensors_header(weights, weights.stat().st_size))
        except (OSError, ValueError):
            break
        kinds = [t.get("dtype") for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
        floats = [FLOAT_BYTES[k] for k in kinds if k in FLOAT_BYTES]
        if floats:
            return max(set(floats), key=floats.count)
    return 2


def prompt_cache_allowance(path: Path, setting: int | None, budget_bytes: int, kv_bits: int | None = None) -> int:
    """The bytes of prompt cache a model's server may keep (`prompt_cache`; None: auto)."""
    if setting is not None:
        return setting
    per_token = kv_bytes_per_token(path, kv_bits)
    window = context_length(path) or ALLOWANCE_TOKENS
    wanted = per_token * min(window, ALLOWANCE_TOKENS) if per_token else ALLOWANCE_UNKNOWN
    return int(max(ALLOWANCE_MIN, min(wanted, budget_bytes * ALLOWANCE_SHARE)))


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and its children (a group's ranks on this machine)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in tree:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def available() -> int:
    """Memory the machine can give a new process without swapping."""
    return psutil.virtual_memory().available


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def describe(size: int | None) -> str:
    if size is None:
        return "-"
    return _gib(size) if size >= GIB else f"{size / 1024 ** 2:.0f} MiB"
