"""Run one proxy listener (HTTP, or HTTPS with `--https`): uvicorn serving the edge.

Started by supervisord as `python -m mlxgate.cli proxy [--https]`; reads the gateway
config from the environment like every other program. The HTTP listener's program also
serves Ollama's API on `ollama_port` (127.0.0.1 only, see `ollama_edge`): one uvicorn server
on both sockets, one edge (one relay connection pool, one batch of records), each request
answered by the app of the socket it came in on.
"""

from __future__ import annotations

from ..config import Config


class ByPort:
    """The ASGI app of each listening port; the main one for the rest (and the lifespan)."""

    def __init__(self, main, apps: dict[int, object]):
        self.main, self.apps = main, apps

    async def __call__(self, scope, receive, send):
        server = scope.get("server")
        app = self.apps.get(server[1]) if server else None
        return await (app or self.main)(scope, receive, send)


def run(config: Config, https: bool = False) -> None:
    import uvicorn

    from .edge import build
    from .ollama_edge import HOST, OllamaEdge

    options = {"host": config.host, "port": config.https_port if https else config.port,
               "log_level": "info" if config.detailed_debug else "warning", "server_header": False,
               "timeout_keep_alive": 75, "loop": "uvloop", "http": "httptools"}
    if https:
        from ..certs import leaf_paths
        cert, key = leaf_paths(config.ssl_path, config.ssl_domain)
        options.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
    edge = build(config, https=https)
    if https or not config.ollama_port:
        uvicorn.run(edge, **options)
        return
    main = uvicorn.Config(ByPort(edge, {config.ollama_port: OllamaEdge(edge)}), **options)
    ollama = uvicorn.Config(main.app, **{**options, "host": HOST, "port": config.ollama_port})
    uvicorn.Server(main).run(sockets=[main.bind_socket(), ollama.bind_socket()])
