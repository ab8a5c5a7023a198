"""Run one proxy listener (HTTP, or HTTPS with `--https`): uvicorn serving the edge.

Started by supervisord as `python -m mlxgate.cli proxy [--https]`; reads the gateway
config from the environment like every other program.
"""

from __future__ import annotations

from ..config import Config


def run(config: Config, https: bool = False) -> None:
    import uvicorn

    from .edge import build

    options = {"host": config.host, "port": config.https_port if https else config.port,
               "log_level": "info" if config.detailed_debug else "warning", "server_header": False,
               "timeout_keep_alive": 75, "loop": "uvloop", "http": "httptools"}
    if https:
        from ..certs import leaf_paths
        cert, key = leaf_paths(config.ssl_path, config.ssl_domain)
        options.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
    uvicorn.run(build(config, https=https), **options)
