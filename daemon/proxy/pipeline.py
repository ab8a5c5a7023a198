"""The hooks, run once per request in the proxy: resolve → check_available → pre_call."""

from __future__ import annotations

import json
import logging

import pluggy

from ..config import Config
from ..errors import RequestRejected
from ..hookspecs import CallContext
from ..names import check_requested
from ..plugins import make_manager
from ..redaction import redact

log = logging.getLogger("mlxgate.proxy")


class Hooks:
    def __init__(self, config: Config, pm: pluggy.PluginManager | None = None):
        self.config = config
        self.pm = pm or make_manager(config.plugin_dirs, trace=config.detailed_debug)

    def run(self, route: str, data: dict) -> CallContext:
        """The request's context after every hook; `ctx.target` says who answers and
        `ctx.data` what they get. Raises what a hook raised (`RequestRejected`, ...)."""
        ctx = CallContext(route=route, requested_model=check_requested(data.get("model") or ""), data=data,
                          config=self.config)
        try:
            target = self.pm.hook.mlxgate_resolve_model(ctx=ctx)
            if target is None:
                raise RequestRejected(404, f"no plugin knows model {ctx.requested_model!r}", "not_found")
            ctx.target = target
            self.pm.hook.mlxgate_check_available(ctx=ctx)
            self.pm.hook.mlxgate_ensure_loaded(ctx=ctx)  # the deprecated name, for plugins not yet renamed
            self.pm.hook.mlxgate_pre_call(ctx=ctx)
        except Exception as exc:
            log.warning("%s %r refused: %s", route, ctx.requested_model[:80], exc)
            raise
        if self.config.detailed_debug:
            log.warning("%s %r -> %s: %s", route, ctx.requested_model, ctx.target,
                        json.dumps(redact(data, (self.config.api_key or "",)), default=str)[:20000])
        return ctx
