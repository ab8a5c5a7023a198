"""Model-name rules: pure functions from what a client sends to candidate folder names.

- Provider prefixes are stripped: ``openai/x``, ``mlx/x``, ``anthropic/x`` → ``x``.
- A bare name also tries the ``mlx-community`` organisation:
  ``Qwen2.5-Coder-3B-8bit`` → ``Qwen2.5-Coder-3B-8bit``, ``mlx-community/Qwen2.5-Coder-3B-8bit``.
- ``org/name`` forms are kept as they are.
- Ollama's default tag is dropped: ``qwen2.5-coder:latest`` → ``qwen2.5-coder`` (other tags
  such as ``:7b`` are part of the name, which an alias can give a model).
- A name is at most 256 characters of letters, digits and ``. _ - / : @ + [ ]``
  (checked before anything looks at the disk), and never escapes the model directories:
  ``..``, absolute paths, home-relative and empty components are refused.
"""

from __future__ import annotations

import re

from .errors import UnsafeModelName

MAX_LENGTH = 256
_NAME = re.compile(r"[A-Za-z0-9._\-/:@+\[\]~]+")

DEFAULT_ORG = "mlx-community"

PROVIDER_PREFIXES = frozenset({
    "openai", "anthropic", "mlx", "mlx_lm", "mlx-lm", "local", "litellm_proxy", "hosted_vllm",
    "ollama", "ollama_chat", "lm_studio", "text-completion-openai", "custom_openai", "mlxgate",
})


def strip_provider(name: str) -> str:
    """Remove leading provider prefixes (``openai/mlx/x`` → ``x``)."""
    name = name.strip()
    while "/" in name:
        head, rest = name.split("/", 1)
        if head.lower() not in PROVIDER_PREFIXES or not rest:
            break
        name = rest
    return name


LATEST_TAG = ":latest"


def strip_tag(name: str) -> str:
    """Remove Ollama's default tag (``NAME:latest`` → ``NAME``)."""
    return name[:-len(LATEST_TAG)] if name.endswith(LATEST_TAG) and len(name) > len(LATEST_TAG) else name


def check_requested(name) -> str:
    """Return `name` if it has the form of a model name, else raise `UnsafeModelName`."""
    if not isinstance(name, str):
        raise UnsafeModelName(f"model: Input should be a string, got {type(name).__name__}")
    if len(name) > MAX_LENGTH:
        raise UnsafeModelName(f"model: the name is {len(name)} characters long; a model name has at most "
                              f"{MAX_LENGTH}. Use a name from `mlxgate models`.")
    if name and not _NAME.fullmatch(name):
        raise UnsafeModelName(f"model name {name!r} is not allowed: a model name has letters, digits and "
                              f". _ - / : @ + [ ] only. Use a name from `mlxgate models`.")
    return name


def check_safe(name: str) -> str:
    """Return `name` if it stays inside a model directory, else raise `UnsafeModelName`."""
    check_requested(name)
    reason = None
    if not name:
        reason = "the name is empty"
    elif name.startswith(("/", "~")) or (len(name) > 1 and name[1] == ":"):
        reason = "absolute and home-relative paths are not accepted in requests"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        reason = "'.', '..' and empty path components are not accepted"
    if reason:
        raise UnsafeModelName(f"model name {name!r} is not allowed: {reason}. "
                              f"Use a name from `mlxgate models`.")
    return name


def candidates(requested: str) -> list[str]:
    """Folder names to try, in order, for a name a client sent."""
    name = check_safe(strip_tag(strip_provider(requested)))
    if "/" in name:
        return [name]
    return [name, f"{DEFAULT_ORG}/{name}"]
