"""The LiteLLM → pluggy bridge: a `CustomLogger` whose pre-call hook runs our hooks.

LiteLLM imports `bridge` (named in the generated config's `callbacks`) once per
proxy process; the config and plugins are loaded then, so a broken plugin stops
the proxy at start.
"""

from __future__ import annotations

import asyncio
import json
import logging

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException

from ..config import Config, load_config
from ..errors import RequestRejected
from ..hookspecs import CallContext
from ..messages.openai_request import check_chat, check_completion
from ..client import MODEL_HEADER, THINKING_HEADER
from ..plugins import make_manager
from ..redaction import redact
from ..api_errors import KIND_PREFIX
from .litellm_config import AUTOCOMPLETE_DEPLOYMENT, DYNAMIC_DEPLOYMENT


log = logging.getLogger("mlxgate.proxy")

ROUTES = {
    "anthropic_messages": "anthropic_messages",
    "acompletion": "chat_completions",
    "completion": "chat_completions",
    "atext_completion": "completions",
    "text_completion": "completions",
}
CHECKS = {"chat_completions": check_chat, "completions": check_completion}


class MlxgateBridge(CustomLogger):
    def __init__(self, config: Config | None = None):
        super().__init__()
        self.config = config or load_config()
        self.pm = make_manager(self.config.plugin_dirs, trace=self.config.detailed_debug)

    def run_hooks(self, ctx: CallContext) -> None:
        if ctx.route in CHECKS:  # before LiteLLM's own checks, which answer some bad input with a 500
            CHECKS[ctx.route](ctx.data)
        target = self.pm.hook.mlxgate_resolve_model(ctx=ctx)
        if target is None:
            raise RequestRejected(404, f"no plugin knows model {ctx.requested_model!r}", "not_found")
        ctx.target = target
        self.pm.hook.mlxgate_ensure_loaded(ctx=ctx)
        self.pm.hook.mlxgate_pre_call(ctx=ctx)
        alias = self.config.autocomplete_alias
        routed_to_autocomplete = ctx.data.get("model") in (alias, AUTOCOMPLETE_DEPLOYMENT)
        if target.server == "autocomplete" and not routed_to_autocomplete:
            ctx.data["model"] = AUTOCOMPLETE_DEPLOYMENT
        elif target.server == "dynamic" and routed_to_autocomplete:
            ctx.data["model"] = DYNAMIC_DEPLOYMENT
        # the relay serves the request with this model, even if a switch comes in between
        headers = ctx.data.get("extra_headers")
        headers = {**(headers if isinstance(headers, dict) else {}), MODEL_HEADER: target.model}
        if ctx.route == "anthropic_messages" and isinstance(ctx.data.get("thinking"), dict):
            headers[THINKING_HEADER] = json.dumps(ctx.data["thinking"])
        ctx.data["extra_headers"] = headers

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        route = ROUTES.get(str(call_type))
        if route is None or not isinstance(data, dict):
            return data
        ctx = CallContext(route=route, requested_model=str(data.get("model") or ""), data=data,
                          config=self.config)
        try:
            await asyncio.to_thread(self.run_hooks, ctx)
        except RequestRejected as exc:
            log.warning("%s %r rejected: %s %s", route, ctx.requested_model, exc.status, exc)
            raise ProxyException(message=str(exc), type=KIND_PREFIX + exc.kind, param=None, code=exc.status)
        if self.config.detailed_debug:
            shown = {k: v for k, v in data.items() if k not in ("proxy_server_request", "secret_fields")}
            log.warning("%s %r -> %s: %s", route, ctx.requested_model, ctx.target,
                        json.dumps(redact(shown, (self.config.api_key or "",)), default=str)[:20000])
        return data


bridge = MlxgateBridge()
