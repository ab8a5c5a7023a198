"""What every model server process of our own (`mlxgate.embeddings.entry`, `mlxgate.vision.entry`)
does first: the wrapper's contract of `wrapper.mlx_lm_entry` (the secret is the first stdin
line; the process dies when stdin closes, also while its model loads), its command line's
common part, and how a folder it cannot serve ends it (`FolderError: why` as the log's last
line, which the wrapper shows the client)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .wrapper.mlx_lm_entry import on_parent_exit, read_secret


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every model server takes: --model, --host, --port."""
    made = argparse.ArgumentParser(prog=prog, description=description)
    made.add_argument("--model", required=True, type=Path, help="the model folder")
    made.add_argument("--host", default="127.0.0.1")
    made.add_argument("--port", required=True, type=int)
    return made


def begin() -> str:
    """Read the secret, die with the parent, log as the wrapper reads it; the secret."""
    secret = read_secret()
    on_parent_exit(lambda: os.kill(os.getpid(), signal.SIGKILL))  # also while the model loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return secret


def refuse_folder(why: str) -> NoReturn:
    print(f"FolderError: {why}", file=sys.stderr, flush=True)
    sys.exit(2)
