"""Built-in plugin: cap the tokens one answer may generate (`max_tokens`, `MAX_TOKENS`).

A request asking for more than the cap is lowered to it; an OpenAI request that does
not say is given the cap (mlx_lm.server's own default would be 512). An Anthropic
request must say (the Messages API requires `max_tokens`), or it is refused with
Anthropic's own wording.
"""

from mlxgate.errors import RequestRejected
from mlxgate.hookspecs import hookimpl

LIMIT_KEYS = ("max_tokens", "max_completion_tokens")


def _problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "a valid integer"
    if value < 1:
        return "greater than or equal to 1"
    if value >= 2 ** 31:
        return f"less than {2 ** 31}"
    return None


@hookimpl(trylast=True)
def mlxgate_pre_call(ctx):
    cap = ctx.config.max_tokens
    present = [key for key in LIMIT_KEYS if ctx.data.get(key) is not None]
    if not present and ctx.route == "anthropic_messages":
        raise RequestRejected(400, "max_tokens: Field required", "invalid_request")
    if not present:
        ctx.data["max_tokens"] = cap
    for key in present:
        value = ctx.data[key]
        problem = _problem(value)
        if problem:
            raise RequestRejected(400, f"{key}: Input should be {problem}, got {str(value)[:40]}",
                                  "invalid_request")
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            ctx.data[key] = cap
