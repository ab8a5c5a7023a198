"""What Ollama's API says of the local models, read from their folders' small files (config,
safetensors headers, tokenizer config) and the resident set's status: `/api/tags`, `/api/show`
and `/api/ps`. Every local model is listed as NAME:latest, Ollama's form (a request may name it
either way)."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

from ..catalog import context_length, safetensors_header, weight_files, weights_digest
from ..fim import fim_of
from ..model_kinds import CHAT, EMBEDDING, VISION

TAG = ":latest"
FOREVER = 9223372036  # seconds: Ollama's "never expires" (now + the largest Go duration, about 292 years)
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + TAG


def stamp_of(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _config(path: Path) -> dict:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def details(path: Path) -> dict:
    """Ollama's `details` of a model folder."""
    return _details(str(path), weights_digest(Path(path)))


@functools.lru_cache(maxsize=256)
def _details(path: str, _digest: str | None) -> dict:
    config = _config(Path(path))
    family = str(config.get("model_type") or "")
    bits = (config.get("quantization") or config.get("quantization_config") or {}).get("bits")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family] if family else [],
            "parameter_size": _human(parameters(Path(path))), "quantization_level":
                f"Q{bits}" if bits else DTYPES.get(dtype, dtype.upper())}


def parameters(path: Path) -> int:
    """The weights' parameter count, quantized tensors counted unpacked (MLX packs 32 / bits to a U32)."""
    bits = (_config(path).get("quantization") or {}).get("bits") or 0
    total = 0
    for weight in weight_files(path):
        try:
            header = json.loads(safetensors_header(weight, weight.stat().st_size))
        except (OSError, ValueError):
            continue
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            if bits and name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in header:
                continue  # a quantized tensor's own bookkeeping
            count = 1
            for size in tensor.get("shape") or ():
                count *= size
            if bits and tensor.get("dtype") == "U32":
                count = count * 32 // bits
            total += count
    return total


def _human(count: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}" if unit == "B" else f"{count / scale:.2f}{unit}"
    return str(count)


def _template(path: Path) -> str:
    folder = Path(path)
    try:
        return (folder / "chat_template.jinja").read_text()
    except OSError:
        pass
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    return template if isinstance(template, str) else ""


def capabilities(path: Path, kind: str) -> list[str]:
    """What Ollama clients look for: completion, tools, thinking, insert (fill-in-the-middle), embedding, vision."""
    if kind == EMBEDDING:
        return ["embedding"]
    if kind == VISION:
        return ["completion", "vision"]
    if kind != CHAT:
        return []
    template = _template(path)
    found = ["completion"]
    if "tools" in template:
        found.append("tools")
    if "enable_thinking" in template or "<think>" in template:
        found.append("thinking")
    if fim_of(path) is not None:
        found.append("insert")
    return found


def modified(path: Path) -> str:
    try:
        return stamp_of((Path(path) / "config.json").stat().st_mtime)
    except OSError:
        return stamp_of(time.time())


def show(name: str, path: Path, kind: str) -> dict:
    """`POST /api/show`."""
    config = _config(path)
    about = details(path)
    family = about["family"] or "unknown"
    info = {"general.architecture": family, "general.basename": name, "general.parameter_count": parameters(path)}
    window = context_length(path)
    if window:
        info[f"{family}.context_length"] = window
    for key, ours in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                      ("num_attention_heads", "attention.head_count"),
                      ("num_key_value_heads", "attention.head_count_kv"), ("vocab_size", "vocab_size")):
        if isinstance(config.get(key), int):
            info[f"{family}.{ours}"] = config[key]
    return {"license": "", "modelfile": f"# served by mlxgate from the local model {name}\nFROM {name}\n",
            "parameters": "", "template": _template(path), "details": about, "model_info": info,
            "capabilities": capabilities(path, kind), "modified_at": modified(path)}


def tags(rows: list[dict]) -> dict:
    """`GET /api/tags` from the wrapper's model rows."""
    return {"models": [{"name": tagged(row["name"]), "model": tagged(row["name"]), "modified_at": modified(row["path"]),
                        "size": row.get("size_bytes") or 0, "digest": row.get("weights") or "",
                        "details": details(row["path"])} for row in rows]}


def ps(servers: dict, clock=time.time) -> dict:
    """`GET /api/ps` from the resident set's servers: the loaded ones, each with when it unloads."""
    now, running = clock(), []
    for server in servers.values():
        if server.get("state") != "ready":
            continue
        idle = (server.get("queue") or {}).get("idle_s")
        keep = server.get("keep_alive", -1)
        left = FOREVER if server.get("pinned") or keep < 0 else keep - (idle or 0)
        path = Path(server["path"])
        size = server.get("cost_bytes") or 0
        running.append({"name": tagged(server["model"]), "model": tagged(server["model"]),
                        "size": size, "size_vram": size if sys.platform == "darwin" else 0,  # unified memory
                        "digest": weights_digest(path) or "", "details": details(path),
                        "expires_at": stamp_of(now + max(left, 0)), "context_length": context_length(path) or 0})
    return {"models": running}
