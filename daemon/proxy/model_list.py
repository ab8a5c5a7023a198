"""`GET /v1/models`: what the gateway serves, in a shape both SDKs read (Anthropic's
`type`/`display_name`/`created_at`/`has_more` and OpenAI's `object`/`created`/`owned_by`):
the local models, the hosts' models, the autocomplete alias and the `litellm:` section's
deployments."""

from __future__ import annotations

import time

from ..config import Config
from .relay_client import RelayClient


async def models(config: Config, relay: RelayClient, hosted: tuple[str, ...] = ()) -> dict:
    rows = (await relay.get_json("/models")).get("models") or []
    names = [row["name"] for row in rows] + list(hosted)
    if config.autocomplete_alias and config.autocomplete_model:
        names.append(config.autocomplete_alias)
    names += [entry["model_name"] for entry in (config.litellm or {}).get("model_list") or ()
              if "*" not in entry["model_name"]]
    now = int(time.time())
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    data = [{"id": name, "type": "model", "display_name": name, "created_at": created,
             "object": "model", "created": now, "owned_by": "mlxgate"} for name in dict.fromkeys(names)]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
