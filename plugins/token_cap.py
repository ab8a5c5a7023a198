"""Built-in plugin: cap the tokens one answer may generate (`max_tokens`, `MAX_TOKENS`).

Each route names its limit fields: `max_tokens` (Anthropic Messages, text completions),
`max_tokens` and `max_completion_tokens` (OpenAI chat), `max_output_tokens` (the
Responses API), `options.num_predict` (Ollama's chat and generate, whose -1 "no limit" and
-2 "fill the window" mean the cap here). A request asking for more than the cap is lowered to it; an OpenAI
request that does not say is given the cap (mlx_lm.server's own default would be 512).
Whether the value is valid at all (an integer from 1 to 2**31 - 1; required by the
Messages API) is checked once, by the request checks next to the translation, with the
API's own wording: an invalid value is left for them to refuse. Token counting routes
generate nothing and are left alone.
"""

from mlxgate.hookspecs import hookimpl
from mlxgate.messages.checks import MAX_TOKENS_LIMIT

LIMIT_KEYS = {
    "anthropic_messages": ("max_tokens",),
    "chat_completions": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
REQUIRED = ("anthropic_messages",)  # the client must say; the API's check refuses it otherwise
OPTION_KEYS = {"ollama_chat": "num_predict", "ollama_generate": "num_predict"}  # in the body's `options`


@hookimpl(trylast=True)
def mlxgate_pre_call(ctx):
    cap = ctx.config.max_tokens
    if ctx.route in OPTION_KEYS:
        return _cap_option(ctx.data, OPTION_KEYS[ctx.route], cap)
    keys = LIMIT_KEYS.get(ctx.route)
    if keys is None:
        return
    present = [key for key in keys if ctx.data.get(key) is not None]
    if not present and ctx.route not in REQUIRED:
        ctx.data[keys[0]] = cap
    for key in present:
        value = ctx.data[key]
        if isinstance(value, int) and not isinstance(value, bool) and cap < value < MAX_TOKENS_LIMIT:
            ctx.data[key] = cap


def _cap_option(data: dict, key: str, cap: int) -> None:
    options = data.setdefault("options", {}) if data.get("options") is None else data["options"]
    if not isinstance(options, dict):
        return  # the request checks refuse it
    value = options.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and (value < 0 or value > cap)):
        options[key] = cap
