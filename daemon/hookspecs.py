"""The plugin contract: what a plugin may implement, and when each hook is called.

A plugin is a Python file (in ``plugins/`` or a folder of ``plugin_dirs``) or an
installed package with an ``mlxgate`` entry point, holding functions marked
``@hookimpl`` whose names and arguments match the specifications below::

    from mlxgate.hookspecs import hookimpl

    @hookimpl
    def mlxgate_pre_call(ctx):
        ctx.data.setdefault("temperature", 0.2)

Hooks run inside the proxy, before each request goes to a model, in this order:
``mlxgate_resolve_model`` → ``mlxgate_ensure_loaded`` → ``mlxgate_pre_call``. They
are plain (synchronous) functions; the proxy runs them off its event loop. To refuse
a request, raise ``mlxgate.RequestRejected``: the client gets that status and
message in its own API's error format.
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


@dataclass
class Target:
    """Which local model answers a request, and on which model server."""

    model: str
    server: str = "dynamic"  # "dynamic" or "autocomplete"


@dataclass
class CallContext:
    """One request on its way to a model. Hooks read it and may change `data`."""

    route: str                 # "anthropic_messages", "chat_completions", "completions", "count_tokens"
    requested_model: str       # the model name exactly as the client sent it
    data: dict[str, Any]       # the request body; changes here reach the model
    config: "Config"
    target: Target | None = None  # set from mlxgate_resolve_model's answer
    notes: dict[str, Any] = field(default_factory=dict)  # free space for plugins


# ---------------------------------------------------------------- 1. routing
@hookspec(firstresult=True)
def mlxgate_resolve_model(ctx: CallContext) -> Target | None:
    """Decide which local model (and server) answers `ctx.requested_model`.

    Called first for every request. The first implementation that returns a `Target`
    wins (user plugins run before the built-in ``normalize`` plugin); return None to
    let the next one decide. When none decides, the client gets 404 not found.
    """


# ---------------------------------------------------------------- 2. loading
@hookspec(firstresult=True)
def mlxgate_ensure_loaded(ctx: CallContext) -> bool | None:
    """Make `ctx.target` ready to answer; block until it is.

    Called after routing. The first implementation that returns True has handled it
    (the built-in ``ensure_loaded`` asks the wrapper). Raise `RequestRejected` when the
    model cannot be served (503 when the wrapper is down, 404 for an unknown model).
    """


# ---------------------------------------------------------------- 3. request changes
@hookspec
def mlxgate_pre_call(ctx: CallContext) -> None:
    """Change `ctx.data` before it goes to the model (caps, defaults, rewrites).

    Called last, once per implementation, user plugins before the built-in
    ``token_cap`` (so the cap always holds). Return values are ignored; raise
    `RequestRejected` to refuse the request.
    """
