"""What `mlxgate start` keeps in the runtime folder beside the config for later commands: the
gateway's API key and the start's own options (`start.json`)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from .config import API_KEY_FILE, Config, read_api_key
from .private_files import write_private


def ensure_api_key(home: Path) -> str:
    """The key from the environment or the key file; a new random one (mode 600) if neither."""
    key = read_api_key(home)
    if key:
        return key
    home.mkdir(parents=True, exist_ok=True)
    key = "sk-mlxgate-" + secrets.token_urlsafe(24)
    write_private(home / API_KEY_FILE, (key + "\n").encode())
    return key


def save_start_options(config: Config, options: dict) -> None:
    config.home.mkdir(parents=True, exist_ok=True)
    (config.home / "start.json").write_text(json.dumps(options))


def load_start_options(home: Path) -> dict:
    try:
        return json.loads((home / "start.json").read_text())
    except (OSError, ValueError):
        return {}
