"""Routes the front answers itself, because LiteLLM cannot answer them for local models.

- `POST /v1/messages/count_tokens`: routed by the same hooks as a message (without
  loading anything) and counted by the wrapper with the model's own tokenizer and
  chat template.
- `GET /v1/models`: what the gateway serves, in a shape both SDKs read (Anthropic's
  `type`/`display_name`/`created_at`/`has_more` and OpenAI's `object`/`created`/`owned_by`).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from ..client import MODEL_HEADER
from ..config import Config
from ..errors import RequestRejected
from ..hookspecs import CallContext

COUNT_TOKENS = "/v1/messages/count_tokens"
MODELS = ("/v1/models", "/models")


def _resolve(config: Config, body: dict):
    from .bridge import bridge

    ctx = CallContext(route="count_tokens", requested_model=str(body.get("model") or ""), data=body,
                      config=config)
    target = bridge.pm.hook.mlxgate_resolve_model(ctx=ctx)
    if target is None:
        raise RequestRejected(404, f"no plugin knows model {ctx.requested_model!r}", "not_found")
    return target


async def _wrapper(config: Config, method: str, path: str, timeout: float, headers: dict | None = None,
                   **options) -> httpx.Response:
    """A call to the wrapper with the key; a 503 the client can act on when it is not there."""
    headers = dict(headers or {})
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await client.request(method, config.wrapper_url + path, headers=headers, **options)
    except httpx.HTTPError:
        raise RequestRejected(503, f"the MLX wrapper is not running at {config.wrapper_url}. "
                              f"Check `mlxgate status`.", "unavailable") from None


async def count_tokens(config: Config, body: dict) -> tuple[int, bytes]:
    target = await asyncio.to_thread(_resolve, config, body)
    response = await _wrapper(config, "POST", f"/backends/{target.server}{COUNT_TOKENS}", 120,
                              {MODEL_HEADER: target.model}, json=body)
    return response.status_code, response.content


async def models(config: Config) -> dict:
    response = await _wrapper(config, "GET", "/models", 30)
    try:
        response.raise_for_status()
        rows = response.json()["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        raise RequestRejected(503, f"the MLX wrapper at {config.wrapper_url} did not list its models "
                              f"(HTTP {response.status_code}). Check `mlxgate status`.", "unavailable") from None
    names = [row["name"] for row in rows]
    if config.autocomplete_alias and config.autocomplete_model:
        names.append(config.autocomplete_alias)
    now = int(time.time())
    data = [{"id": name, "type": "model", "display_name": name,
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
             "object": "model", "created": now, "owned_by": "mlxgate"} for name in names]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
