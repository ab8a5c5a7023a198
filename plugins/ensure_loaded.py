"""Built-in plugin: make sure the routed model is loaded, by asking the wrapper.

The wrapper's load call returns at once when the model is already serving, and
otherwise blocks until the model answers (or fails to load).
"""

from mlxgate.client import WrapperClient, WrapperError
from mlxgate.errors import RequestRejected
from mlxgate.hookspecs import hookimpl

_clients: dict[tuple, WrapperClient] = {}


def _client(config) -> WrapperClient:
    key = (config.wrapper_url, config.api_key)
    if key not in _clients:
        _clients[key] = WrapperClient(config.wrapper_url, config.api_key,
                                      timeout=config.load_timeout + 30)
    return _clients[key]


@hookimpl(trylast=True)
def mlxgate_ensure_loaded(ctx):
    try:
        _client(ctx.config).load(ctx.target.model, ctx.target.server)
    except WrapperError as exc:
        if exc.kind == "wrapper_down":
            raise RequestRejected(503, f"the MLX wrapper is not running at {ctx.config.wrapper_url}, so "
                                  f"no model can answer. Check `mlxgate status`.", "unavailable") from None
        if exc.status in (400, 404):
            kind = "not_found" if exc.status == 404 else "invalid_request"
            raise RequestRejected(exc.status, str(exc), kind) from None
        if exc.status == 504 or exc.kind == "timeout":
            raise RequestRejected(503, str(exc), "unavailable") from None
        raise RequestRejected(500, str(exc), "api_error") from None
    return True
