"""How many prompt tokens an image becomes for a vision model, from its width and height and
the model's processor config alone (no pixels, no mlx-vlm): what `count_tokens`, `input_tokens`,
the context check and the usage line count. The counts include the wrapper tokens around each
image, and were checked against mlx-vlm 0.7.10's processors (research: count_image_tokens.py).

| family                           | tokens for a w x h image                                         |
| -------------------------------- | ---------------------------------------------------------------- |
| Qwen2/2.5-VL (patch 14, merge 2) | each side rounded to 28 px, area into [min, max] pixels: (h/28)(w/28) + 2 |
| Qwen3-VL (patch 16, merge 2)     | the same with 32 px                                              |
| Gemma 3                          | 256 + 4, whatever the size                                       |
| Pixtral / Mistral 3              | fitted into the longest edge, rows x (cols + 1)                  |

Every family with a pixel range is capped at `MAX_IMAGE_TOKENS` (the model server sets the
same cap on its processor): an uncapped Qwen takes 12.8 MP, 16,384 tokens an image.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

MAX_IMAGE_TOKENS = 1280  # per image (Qwen's own recommended cap)
QWEN_TYPES = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}  # → patch size


@lru_cache(maxsize=32)
def _configs(folder: str) -> tuple[dict, dict]:
    def read(name: str) -> dict:
        try:
            found = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}
    return read("config.json"), read("preprocessor_config.json")


def _qwen(folder: Path) -> tuple[int, int, int] | None:
    """(factor, min_pixels, max_pixels) of a Qwen-VL folder, max capped; None for other families."""
    config, pre = _configs(str(folder))
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in QWEN_TYPES:
        return None
    vision = config.get("vision_config") or {}
    patch = int(pre.get("patch_size") or vision.get("patch_size") or QWEN_TYPES[model_type])
    merge = int(pre.get("merge_size") or vision.get("spatial_merge_size") or 2)
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    factor = patch * merge
    low = int(pre.get("min_pixels") or size.get("shortest_edge") or factor * factor * 4)
    high = int(pre.get("max_pixels") or size.get("longest_edge") or factor * factor * 16384)
    return factor, low, min(high, factor * factor * MAX_IMAGE_TOKENS)


def capped_max_pixels(folder: Path) -> int | None:
    """The max_pixels the model server gives its processor (None: the family has no pixel range)."""
    qwen = _qwen(Path(folder))
    return qwen[2] if qwen else None


def smart_resize(h: int, w: int, factor: int, low: int, high: int) -> tuple[int, int]:
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > high:
        beta = math.sqrt(h * w / high)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < low:
        beta = math.sqrt(low / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def image_tokens(folder: Path, width: int, height: int) -> int:
    """The prompt tokens one width x height image becomes for the model in `folder`."""
    qwen = _qwen(Path(folder))
    if qwen is not None:
        factor, low, high = qwen
        hb, wb = smart_resize(height, width, factor, low, high)
        return (hb // factor) * (wb // factor) + 2
    config, pre = _configs(str(folder))
    model_type = str(config.get("model_type", "")).lower()
    if model_type.startswith("gemma3"):
        return int(config.get("mm_tokens_per_image") or pre.get("image_seq_length") or 256) + 4
    if model_type in ("pixtral", "mistral3", "llava") and pre.get("patch_size"):
        patch = int(pre["patch_size"]) * int(config.get("spatial_merge_size") or 1)
        edge = int((pre.get("size") or {}).get("longest_edge") or 1024)
        ratio = max(height / edge, width / edge)
        if ratio > 1:
            height, width = int(height / ratio), int(width / ratio)
        rows, cols = (height - 1) // patch + 1, (width - 1) // patch + 1
        return rows * (cols + 1)
    return 256  # a family without a formula here: a fair guess, so the context check still counts it
