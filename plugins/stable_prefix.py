"""Built-in plugin: keep what an agent sends ahead of the conversation the same from session to
session, so the prompt cache (in memory and on disk) serves it.

Claude Code begins its system prompt with a block such as
`x-anthropic-billing-header: cc_version=2.1.332.16f; cc_entrypoint=sdk-cli;` whose last part is
a digest of the session's first prompt: two sessions with different tasks differ from the
first tokens, and nothing of the system prompt and tools (tens of thousands of tokens) is read
from the cache. The block is Anthropic's billing attribution, not an instruction; for a local
model it is dropped. (`mlxgate env` and `mlxgate launch claude` also turn it off at the source:
`CLAUDE_CODE_ATTRIBUTION_HEADER=0`.) Requests for a `litellm:` deployment keep it.
"""

from mlxgate.hookspecs import hookimpl

BILLING_HEADER = "x-anthropic-billing-header:"


def _attribution(block) -> bool:
    return (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
            and block["text"].lstrip().startswith(BILLING_HEADER))


@hookimpl(trylast=True)
def mlxgate_pre_call(ctx):
    if ctx.route not in ("anthropic_messages", "count_tokens") or ctx.target is None or not ctx.target.local:
        return
    system = ctx.data.get("system")
    if isinstance(system, list) and any(_attribution(b) for b in system):
        ctx.data["system"] = [b for b in system if not _attribution(b)]
    elif isinstance(system, str) and system.lstrip().startswith(BILLING_HEADER):
        ctx.data["system"] = system.lstrip().split("\n", 1)[1] if "\n" in system.lstrip() else ""
