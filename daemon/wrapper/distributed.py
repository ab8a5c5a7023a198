"""One model across machines: the dynamic server as `mlx_lm.server` ranks under `mlx.launch`.

With `distributed: {hosts: [...]}` the wrapper starts the dynamic server as a group: this
module runs as the group's head (`python -m mlxgate.wrapper.distributed`), starts
`mlx.launch` with one rank per address (ring backend by default; addresses other than
127.0.0.1 are reached with ssh, as `mlx.launch` does), and each rank runs the same
`mlx_lm_entry` a single server runs. `mx.distributed` joins them; `mlx_lm.server` loads
the model with `sharded_load`, tensor parallel unless `pipeline` is set (whether a model
class can shard is its own business: see docs/scale.md). Rank 0 serves HTTP on this
machine's port; the others compute.

The wrapper treats the group as any model server: one process (the head) with the
secret on stdin, the same readiness probe, the same watchdog (CPU counted over the whole
tree), the same state machine. The head passes the secret on (`mlx.launch` hands its
stdin to every rank) and ties the group to the wrapper: when its stdin closes (the
wrapper is gone) or it is told to stop, it kills `mlx.launch`, whose ranks then see their
own stdin close and exit (see `mlx_lm_entry`).
"""

from __future__ import annotations

import argparse
import functools
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from . import server_process

HEAD = ("-m", "mlxgate.wrapper.distributed")


def launcher(settings: dict):
    """A `launch` function (see `server_process.launch`) that starts the group `settings` describes."""
    entry = [*HEAD, "--backend", settings["backend"], "--hosts", ",".join(settings["hosts"]),
             "--starting-port", str(settings["starting_port"]), "--"]
    extra = ["--pipeline"] if settings.get("pipeline") else []

    @functools.wraps(server_process.launch)
    def launch(model_path: Path, port: int, log_path: Path, extra_args: Sequence[str] = (),
               **_) -> server_process.ServerProcess:  # a chat model's group: its own entry
        return server_process.launch(model_path, port, log_path, [*extra, *extra_args], entry=entry)
    return launch


def mlx_launch_command(backend: str, hosts: str, starting_port: int, server_args: Sequence[str]) -> list[str]:
    launch = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"
    return [sys.executable, "-c", launch, "--backend", backend, "--hosts", hosts,
            "--starting-port", str(starting_port), "--",
            sys.executable, *server_process.MLX_LM_ENTRY, *server_args]


def main(argv: Sequence[str] | None = None) -> int:
    from .mlx_lm_entry import on_parent_exit, read_secret

    parser = argparse.ArgumentParser(prog="mlxgate.wrapper.distributed")
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--starting-port", type=int, default=32323)
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server_args = [a for a in args.server_args if a != "--"] if args.server_args[:1] == ["--"] else args.server_args
    secret = read_secret()
    group = subprocess.Popen(mlx_launch_command(args.backend, args.hosts, args.starting_port, server_args),
                             stdin=subprocess.PIPE)
    group.stdin.write((secret + "\n").encode())
    group.stdin.flush()

    def end(*_):
        if group.poll() is None:
            group.kill()  # its ranks see their stdin close and exit
    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    on_parent_exit(end)
    return group.wait()


if __name__ == "__main__":
    sys.exit(main())
