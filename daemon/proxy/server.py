"""Run one LiteLLM proxy listener (HTTP, or HTTPS with `--https`) with our front.

Started by supervisord as `python -m mlxgate.cli proxy [--https]`; reads the gateway
config from the environment like every other program, and the generated LiteLLM
config from the runtime folder.
"""

from __future__ import annotations

import os

from ..config import Config
from . import litellm_config


def run(config: Config, https: bool = False) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ["CONFIG_FILE_PATH"] = str(config.home / litellm_config.FILE_NAME)
    if config.api_key:
        os.environ["MLXGATE_API_KEY"] = config.api_key
    import uvicorn
    from litellm.proxy.proxy_server import app

    from .front import GatewayFront

    options = {"host": config.host, "port": config.https_port if https else config.port,
               "log_level": "info" if config.detailed_debug else "warning", "server_header": False,
               "timeout_keep_alive": 75, "loop": "uvloop"}
    if https:
        from ..certs import leaf_paths
        cert, key = leaf_paths(config.ssl_path, config.ssl_domain)
        options.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
    uvicorn.run(GatewayFront(app, config.api_key, config.max_body, config), **options)
