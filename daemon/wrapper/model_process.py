"""Entry point of one model server process: `mlx_lm.server` that dies with its parent
and stops generating for a client that has gone.

The wrapper starts this module with a pipe on stdin and keeps the write end. When the
wrapper exits for any reason (SIGKILL included) the kernel closes that pipe, the read
below returns EOF, and this process exits at once: no model server outlives the
wrapper. Arguments are passed to `mlx_lm.server` unchanged.

`mlx_lm.server` notices a closed connection only when a write fails, and it writes
only when it has text to send: while a model writes a tool call, or tokens that are not
yet text, or for a non-streamed request, it generates to `max_tokens` for nobody.
`stop_when_client_goes` closes that gap: every quarter second of generation the
request's own socket is checked, and a closed one stops the generation.
"""

import os
import signal
import sys
import threading
import time

from mlxgate.net import peer_closed

CHECK_EVERY = 0.25


def _exit_when_parent_goes() -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


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


def main() -> None:
    threading.Thread(target=_exit_when_parent_goes, name="parent-watch", daemon=True).start()
    import mlx_lm.server as server

    stop_when_client_goes(server)
    sys.argv = ["mlx_lm.server", *sys.argv[1:]]
    server.main()


if __name__ == "__main__":
    main()
