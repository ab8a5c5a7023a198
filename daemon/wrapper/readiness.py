"""Readiness of a model server: a real one-token request, never `/health` or a sleep.

`mlx_lm.server` answers `/health` before its model is loaded and even after its
generation thread has died; only a completed generation proves the model serves. A chat
model's probe is a chat with a tool, as agents send (see `kinds`): what a first request of
that shape costs once (the chat template and its tools rendered for the first time, the
tool parser) is paid here, not by the first client.
"""

from __future__ import annotations

import time
from typing import Callable

import requests

from ..errors import ModelLoadFailed, ModelLoadTimeout
from .server_process import ServerProcess

RETRY_INTERVAL = 0.05  # between connection attempts while the process starts listening


def _error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or body)[:300]


def wait_until_ready(process: ServerProcess, port: int, timeout: float,
                     clock: Callable[[], float] = time.monotonic,
                     session: requests.Session | None = None,
                     request: tuple[str, dict] = ("/v1/chat/completions", {})) -> None:
    """Block until the server at `port` answers `request` (path, body: its kind's probe, see
    `kinds`) with a 200: for a chat model a one-token generation.

    Raises `ModelLoadFailed` when the process exits or the generation fails, and
    `ModelLoadTimeout` when `timeout` seconds pass first.
    """
    http = session or requests.Session()
    path, probe = request
    url = f"http://127.0.0.1:{port}{path}"
    deadline = clock() + timeout
    while True:
        if not process.alive():
            raise ModelLoadFailed(f"the server exited with code {process.popen.returncode}: "
                                  f"{process.failure_reason()}")
        remaining = deadline - clock()
        if remaining <= 0:
            raise ModelLoadTimeout(f"not ready after {timeout:g} s (load_timeout)")
        try:
            response = http.post(url, json=probe, timeout=(1.0, max(remaining, 0.1)),
                                 headers={"Authorization": process.auth_header})
        except requests.ConnectionError:
            time.sleep(RETRY_INTERVAL)
            continue
        except requests.Timeout:
            continue
        if response.status_code == 200:
            return
        raise ModelLoadFailed(f"{_error_text(response)} ({process.failure_reason()})")
