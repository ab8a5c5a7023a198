"""Fetch a model from the Hugging Face hub with a progress bar."""

from __future__ import annotations

import os
from pathlib import Path

from . import names
from .errors import MlxgateError

# What mlx_lm itself fetches for a model: weights, configs, tokenizer files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt",
                  "*.jinja"]


def hub_id(requested: str) -> str:
    """The repository id for a requested name (``Qwen2.5-Coder-3B-8bit`` → ``mlx-community/...``)."""
    return names.candidates(requested)[-1]


def download(requested: str, local_dir: Path | None = None) -> Path:
    """Download into the Hugging Face cache (or `local_dir`); return the model folder."""
    repo_id = hub_id(requested)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise MlxgateError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set. Unset it, or copy the "
                           f"model folder into a model directory instead.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        path = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, etag_timeout=10,
                                 local_dir=str(local_dir) if local_dir else None)
    except RepositoryNotFoundError:
        raise MlxgateError(f"{repo_id} does not exist on the Hugging Face hub (or is private). "
                           f"Check the name; MLX models are usually under mlx-community/.") from None
    except GatedRepoError:
        raise MlxgateError(f"{repo_id} is gated: accept its terms on the hub and log in with "
                           f"`hf auth login`, then retry.") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise MlxgateError(f"cannot download {repo_id}: the hub at {endpoint} is not reachable "
                           f"({type(exc).__name__}). Check the network, or copy the model folder "
                           f"into a model directory.") from None
    return Path(path)
