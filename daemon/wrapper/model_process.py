"""Entry point of one model server process: `mlx_lm.server` that answers the relay alone,
serves the one model it was started with, dies with its parent and stops generating for
a client that has gone.

The wrapper starts this module with a pipe on stdin and keeps the write end. Its first
line is a secret made for this start: every request must carry it
(`Authorization: Bearer SECRET`), so no other local process can reach the model past the
relay's queue and token cap (a process of another user cannot read a pipe's contents,
unlike an environment variable or a command line). When the wrapper exits for any reason
(SIGKILL included) the kernel closes the pipe, the read below returns EOF, and this process
exits at once: no model server outlives the wrapper. Other arguments are passed to
`mlx_lm.server` unchanged.

`mlx_lm.server` loads whatever model a request names (and drops the one it has); here its
model provider refuses any model, adapter or draft model but the ones it was started with.

`mlx_lm.server` notices a closed connection only when a write fails, and it writes
only when it has text to send: while a model writes a tool call, or tokens that are not
yet text, or for a non-streamed request, it generates to `max_tokens` for nobody.
`stop_when_client_goes` closes that gap: every quarter second of generation the
request's own socket is checked, and a closed one stops that request's generation (the
others in the same batch go on).

`mlx_lm.server`'s generation loop looks for new requests only between half-second spells
of batch steps: a request that arrives while others generate waits up to 0.5 s before it
joins their batch, and a lone first request runs alone that long, so clients that arrive a
few milliseconds apart are not batched (8 clients × 256 tokens: ~1,950 tokens/s instead of
~2,750). `join_batch_sooner` makes it look every `JOIN_EVERY` seconds.
"""

import hmac
import json
import os
import signal
import sys
import threading
import time
from typing import Callable

from mlxgate.net import peer_closed

CHECK_EVERY = 0.25
JOIN_EVERY = 0.02  # seconds of batch steps between looks for new requests (mlx_lm.server: 0.5)
DEFAULT = "default_model"  # mlx_lm.server's name for the model given on its command line


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def read_secret() -> str:
    """The first line of stdin: the secret the wrapper gives each start (dies without one)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            _die()
        line += chunk
    return line.decode().strip()


def on_parent_exit(action: Callable[[], None]) -> None:
    """Run `action` in a thread of its own once stdin closes: the wrapper holds the other end,
    so it closes when the wrapper exits, however it exits."""
    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        action()
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def admit_only_the_relay(server, secret: str) -> None:
    """Refuse requests without the secret (403) and requests for any other model."""
    expected = f"Bearer {secret}".encode()
    handler = server.APIHandler

    def guard(original):
        def guarded(self):
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, expected):
                return original(self)
            body = json.dumps({"error": "this model server answers the mlxgate relay only; send requests "
                                        "to the gateway"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        return guarded

    for name in ("do_GET", "do_POST", "do_OPTIONS"):
        setattr(handler, name, guard(getattr(handler, name)))

    provider = server.ModelProvider
    original_load = provider.load

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if model_path != DEFAULT or adapter_path is not None or draft_model_path not in (None, DEFAULT):
            raise ValueError(f"this model server serves {self.cli_args.model} only; it loads no other "
                             f"model, adapter or draft model")
        return original_load(self, model_path, adapter_path, draft_model_path)

    provider.load = load


def stop_when_client_goes(server) -> None:
    """Wrap `server.APIHandler.do_POST` (to know the request's socket) and
    `server.ResponseGenerator.generate` (to watch it while tokens come)."""
    local = threading.local()
    handler, generator = server.APIHandler, server.ResponseGenerator
    original_post, original_generate = handler.do_POST, generator.generate

    def do_POST(self):
        local.sock = self.connection
        try:
            return original_post(self)
        finally:
            local.sock = None

    def generate(self, request, generation_args, progress_callback=None):
        ctx, response = original_generate(self, request, generation_args, progress_callback)
        sock = getattr(local, "sock", None)
        if sock is None:
            return ctx, response

        def watched():
            checked = time.monotonic()
            for item in response:
                if time.monotonic() - checked > CHECK_EVERY:
                    checked = time.monotonic()
                    if peer_closed(sock):
                        ctx.stop()
                        raise BrokenPipeError("the client closed the connection; generation stopped")
                yield item
        return ctx, watched()

    handler.do_POST, generator.generate = do_POST, generate


def join_batch_sooner(server) -> None:
    """New requests join the running batch within `JOIN_EVERY` seconds. One look costs a
    queue read (nothing measurable on one client); ranks of a distributed group keep
    mlx_lm's spell, since each look there is a collective across the machines."""
    budget = server.TimeBudget
    original = budget.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not getattr(self, "_is_distributed", True) and hasattr(self, "_budget"):
            self._budget = JOIN_EVERY

    budget.__init__ = __init__


def main() -> None:
    secret = read_secret()
    on_parent_exit(_die)
    import mlx_lm.server as server

    stop_when_client_goes(server)
    join_batch_sooner(server)
    admit_only_the_relay(server, secret)  # outermost: nothing runs for a request without the secret
    sys.argv = ["mlx_lm.server", *sys.argv[1:]]
    server.main()


if __name__ == "__main__":
    main()
