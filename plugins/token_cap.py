"""Built-in plugin: cap the tokens one answer may generate (`max_tokens`, `MAX_TOKENS`).

A request asking for more than the cap is lowered to it; an OpenAI request that does
not say is given the cap (mlx_lm.server's own default would be 512). Whether the value
is valid at all (an integer from 1 to 2**31 - 1; required by the Messages API) is checked
once, by the request checks next to the translation, with the API's own wording: an
invalid value is left for them to refuse.
"""

from mlxgate.hookspecs import hookimpl
from mlxgate.messages.checks import MAX_TOKENS_LIMIT

LIMIT_KEYS = ("max_tokens", "max_completion_tokens")


@hookimpl(trylast=True)
def mlxgate_pre_call(ctx):
    if ctx.route == "count_tokens":
        return
    cap = ctx.config.max_tokens
    present = [key for key in LIMIT_KEYS if ctx.data.get(key) is not None]
    if not present and ctx.route != "anthropic_messages":
        ctx.data["max_tokens"] = cap
    for key in present:
        value = ctx.data[key]
        if isinstance(value, int) and not isinstance(value, bool) and cap < value < MAX_TOKENS_LIMIT:
            ctx.data[key] = cap
