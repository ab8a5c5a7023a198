"""The plugin contract: what a plugin may implement, and when each hook is called.

A plugin is a Python file (in ``plugins/`` or a folder of ``plugin_dirs``) or an
installed package with an ``mlxgate`` entry point, holding functions marked
``@mlxgate.hookimpl`` whose names and arguments match the specifications below::

    import mlxgate

    @mlxgate.hookimpl
    def mlxgate_pre_call(ctx):
        ctx.data.setdefault("temperature", 0.2)

The hooks run in the proxy program, once per request, before anything is sent to a
model, in this order: ``mlxgate_resolve_model`` → ``mlxgate_ensure_loaded`` →
``mlxgate_pre_call``; then the request goes on as ``ctx.data`` says, to the wrapper's
relay (a local model) or to LiteLLM (a deployment of the config's ``litellm:`` section).
They are plain functions called on the proxy's event loop: they must be quick and must
not wait (no model loads, no network calls that can hang). To refuse a request, raise
``mlxgate.RequestRejected``: the client gets that status and message in its own API's
error format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Config

PROJECT = "mlxgate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

LOCAL_SERVERS = ("dynamic", "autocomplete")
LITELLM = "litellm"


@dataclass
class Target:
    """Who answers a request: a local model on one of the model servers (`dynamic`, which
    switches model on demand, or `autocomplete`, which keeps one loaded), or a deployment
    of the config's `litellm:` section (server `litellm`, model = its `model_name`)."""

    model: str
    server: str = "dynamic"  # "dynamic", "autocomplete" or "litellm"

    @property
    def local(self) -> bool:
        return self.server in LOCAL_SERVERS


@dataclass
class CallContext:
    """One request on its way to a model. Hooks read it and may change `data`."""

    route: str                 # "anthropic_messages", "count_tokens", "chat_completions", "completions",
                               # "responses", "responses_input_tokens"
    requested_model: str       # the model name exactly as the client sent it ("" when it sent none)
    data: dict[str, Any]       # the request body as the client sent it; changes here reach the model
    config: "Config"
    target: Target | None = None  # set from mlxgate_resolve_model's answer
    notes: dict[str, Any] = field(default_factory=dict)  # free space for plugins


# ---------------------------------------------------------------- 1. routing
@hookspec(firstresult=True)
def mlxgate_resolve_model(ctx: CallContext) -> Target | None:
    """Decide which model (and server) answers `ctx.requested_model`.

    Called first for every request. The first implementation that returns a `Target`
    wins (user plugins run before the built-in ``normalize`` plugin); return None to
    let the next one decide. When none decides, the client gets 404 not found.
    """


# ---------------------------------------------------------------- 2. availability
@hookspec(firstresult=True)
def mlxgate_ensure_loaded(ctx: CallContext) -> bool | None:
    """Check that `ctx.target` can answer, before anything is sent to the client.

    Called after routing, for every request (count_tokens included). It must not wait
    for a model to load: the relay loads `ctx.target` inside its queue when the
    request's turn comes, so a model switch holds nothing in the proxy and a full
    queue still answers 529/503 at once. The built-in ``ensure_loaded`` finds the model
    folder and checks its config and weight headers (remembered while the files stay
    the same): a missing model is a 404, a broken one a 503 that tells clients not to
    retry. The first implementation that returns True has handled it; raise
    `RequestRejected` to refuse.
    """


# ---------------------------------------------------------------- 3. request changes
@hookspec
def mlxgate_pre_call(ctx: CallContext) -> None:
    """Change `ctx.data` before it goes to the model (caps, defaults, rewrites).

    Called last, once per implementation, user plugins before the built-in
    ``token_cap`` (so the cap always holds). The body is the client's, in its API's
    shape (see the README for each route); it has not been validated yet, so read it
    defensively. Return values are ignored; raise `RequestRejected` to refuse the request.
    """
