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

`mlx_lm.server` builds its prompt cache with an entry count only (10 prompts of any size)
and applies `--prompt-cache-bytes` only on its batched path; `bound_prompt_cache` builds
it with the byte bound, which every insert enforces on both paths, and bounds MLX's pool
of freed buffers too, so the server's memory stays within what the resident set counts
for it.

`batch_loop` takes work off each generated token of the batched loop (a logprob read that
waited for the next step, a thread hand-off per token, a socket write per token).

`constraints` holds answers to a JSON Schema, any JSON object, or valid tool calls
(`response_format`, strict tools, `tool_choice`), masking what a grammar does not allow.

With `--prompt-disk ROOT` (the wrapper passes it unless `prompt_cache_disk` is 0) the prompt
cache gets a disk tier (`mlxgate.prompt_disk`): long prefixes that leave memory, and long-lived
ones while serving, are written under ROOT off the request's way and read back instead of
prefilled, also after a restart; what is pending is written at SIGTERM and when the wrapper
goes.

`report_liveness` answers `GET /mlxgate/alive` (secret required) with how long ago the
generation loop last went round, whether its thread lives, and the memory MLX and the
prompt cache hold: the watchdog asks it every few seconds, busy or idle, so a wedged
server is found without a request waiting on it.
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
ALIVE_PATH = "/mlxgate/alive"
BUFFER_POOL_SHARE = 0.25  # MLX's pool of freed buffers may hold this share of the prompt cache bound
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


def bound_prompt_cache(server, max_bytes: int | None) -> None:
    """Build the server's prompt cache with `max_bytes` as well as its entry count, and keep
    MLX's pool of freed buffers to a share of it (evicted caches return there, not to the
    system)."""
    if max_bytes is None:
        return
    import mlx.core as mx

    base = server.LRUPromptCache

    class BoundedPromptCache(base):
        def __init__(self, max_size: int = 10, *_, **__):
            super().__init__(max_size, max_bytes)

    server.LRUPromptCache = BoundedPromptCache
    mx.set_cache_limit(int(max_bytes * BUFFER_POOL_SHARE))


def report_liveness(server, more: Callable[[], dict] = dict) -> None:
    """The generation loop's heartbeat (each look for a request, each token of the
    sequential path) and `GET /mlxgate/alive`, which reports it (with what `more` adds)."""
    import mlx.core as mx

    beat = [time.monotonic()]
    generator = server.ResponseGenerator
    next_request, stream = generator._next_request, server.stream_generate

    def _next_request(self, timeout=None):
        beat[0] = time.monotonic()
        return next_request(self, timeout)

    def stream_generate(*args, **kwargs):
        for item in stream(*args, **kwargs):
            beat[0] = time.monotonic()
            yield item

    generator._next_request, server.stream_generate = _next_request, stream_generate
    handler = server.APIHandler
    original_get = handler.do_GET

    def do_GET(self):
        if self.path != ALIVE_PATH:
            return original_get(self)
        responses = self.response_generator
        cache = getattr(responses, "prompt_cache", None)
        body = json.dumps({
            "generation": responses.generation_available(), "idle_s": round(time.monotonic() - beat[0], 3),
            "mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
            "mlx_peak": mx.get_peak_memory(),
            "prompt_cache_bytes": getattr(cache, "nbytes", 0), "prompt_cache_entries": len(cache) if cache else 0,
            **more(),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    handler.do_GET = do_GET


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `argv`."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _take_option(argv: list[str], name: str) -> str | None:
    """`_option`, and the option taken out of `argv` (one of ours, which mlx_lm.server does not know)."""
    value = _option(argv, name)
    for index, arg in enumerate(list(argv)):
        if arg == name:
            del argv[index:index + 2]
            break
        if arg.startswith(name + "="):
            del argv[index]
            break
    return value


def main() -> None:
    secret = read_secret()
    argv = sys.argv[1:]
    disk_root = _take_option(argv, "--prompt-disk")
    disk_bytes = _take_option(argv, "--prompt-disk-bytes")
    disk_name = _take_option(argv, "--prompt-disk-name")
    from mlxgate.prompt_disk import serve as prompt_disk

    def leave(*_) -> None:
        prompt_disk.flush()  # what is pending reaches the disk before the process goes
        _die()
    on_parent_exit(leave)
    import mlx_lm.server as server

    stop_when_client_goes(server)
    join_batch_sooner(server)
    if server.mx.distributed.init().size() == 1:  # a group's ranks share each step: keep mlx_lm's own loop
        from mlxgate.wrapper import batch_loop
        batch_loop.apply(server)
    from mlxgate.constraints import serve as constraints
    constraints.install(server)
    cache_bytes = _option(argv, "--prompt-cache-bytes")
    max_bytes = server._parse_size(cache_bytes) if cache_bytes else None
    if disk_root:
        prompt_disk.install(server, disk_root, max_bytes=max_bytes, model_name=disk_name,
                            **({"max_disk_bytes": int(disk_bytes)} if disk_bytes else {}))
    bound_prompt_cache(server, max_bytes)
    signal.signal(signal.SIGTERM, leave)
    report_liveness(server, prompt_disk.disk_stats)
    admit_only_the_relay(server, secret)  # outermost: nothing runs for a request without the secret
    sys.argv = ["mlx_lm.server", *argv]
    try:
        server.main()
    finally:
        prompt_disk.close()


if __name__ == "__main__":
    main()
