"""Entry point of one model server process: `mlx_lm.server` that dies with its parent.

The wrapper starts this module with a pipe on stdin and keeps the write end. When the
wrapper exits for any reason (SIGKILL included) the kernel closes that pipe, the read
below returns EOF, and this process exits at once: no model server outlives the
wrapper. Arguments are passed to `mlx_lm.server` unchanged.
"""

import os
import signal
import sys
import threading


def _exit_when_parent_goes() -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    threading.Thread(target=_exit_when_parent_goes, name="parent-watch", daemon=True).start()
    from mlx_lm.server import main as serve

    sys.argv = ["mlx_lm.server", *sys.argv[1:]]
    serve()


if __name__ == "__main__":
    main()
