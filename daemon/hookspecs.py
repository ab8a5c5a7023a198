"""The plugin contract: what a plugin may implement, and when each hook is called.

A plugin is a Python file (in ``plugins/`` or a folder of ``plugin_dirs``) or an
installed package with an ``mlxgate`` entry point, holding functions marked
``@mlxgate.hookimpl`` whose names and arguments match the specifications below::

    import mlxgate

    @mlxgate.hookimpl
    def mlxgate_pre_call(ctx):
        ctx.data.setdefault("temperature", 0.2)

The hooks run in the proxy program, once per request, before anything is sent to a
model, in this order: ``mlxgate_resolve_model`` → ``mlxgate_check_available`` →
``mlxgate_pre_call``; then the request goes on as ``ctx.data`` says, to the wrapper's
relay (a local model) or to LiteLLM (a deployment of the config's ``litellm:`` section).
They are plain functions called on the proxy's event loop: they must be quick and must
not wait (no model loads, no network calls that can hang). To refuse a request, raise
``mlxgate.RequestRejected``: the client gets that status and message in its own API's
error format.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Config

PROJECT = "mlxgate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

LOCAL = "local"
LITELLM = "litellm"
# What `Target`'s second argument named before the resident set (two fixed model servers).
# A plugin that still passes one gets a local target, and a warning naming its file and line.
OLD_SERVERS = ("dynamic", "autocomplete")

log = logging.getLogger("mlxgate.plugins")
_warned: set[str] = set()


class Target:
    """Who answers a request: a local model (`via` "local": this machine's resident set loads it
    when needed, or another mlxgate host that has it), or a deployment of the config's
    `litellm:` section (`via` "litellm", model = its `model_name`).

    Written before the resident set, ``Target(model, "dynamic")``, ``Target(model,
    "autocomplete")`` and ``Target(model, server=...)`` still work: the model alone decides
    where a local request goes now, so they mean ``Target(model)``; each such plugin is
    named once in the proxy's log.
    """

    __slots__ = ("model", "via")

    def __init__(self, model: str, via: str = LOCAL, *, server: str | None = None):
        if server is not None or via in OLD_SERVERS:
            old = server if server is not None else via
            _deprecated(f"Target(..., {'server=' if server is not None else ''}{old!r})",
                        "the model alone decides where a local request goes; return Target(model) "
                        "(or Target(model, \"litellm\") for a litellm: deployment)")
            via = LITELLM if old == LITELLM else LOCAL
        if via not in (LOCAL, LITELLM):
            raise ValueError(f"Target via must be {LOCAL!r} or {LITELLM!r}, got {via!r}")
        self.model, self.via = model, via

    @property
    def local(self) -> bool:
        return self.via == LOCAL

    @property
    def server(self) -> str:
        """Deprecated: "litellm" or "local" (there are no fixed model servers to name)."""
        _deprecated("Target.server", "read Target.via (\"local\" or \"litellm\") or Target.local")
        return self.via

    def __eq__(self, other) -> bool:
        return isinstance(other, Target) and (self.model, self.via) == (other.model, other.via)

    def __repr__(self) -> str:
        return f"Target({self.model!r}, {self.via!r})"


def _deprecated(what: str, instead: str) -> None:
    """Log once per calling place that a plugin uses `what` of the old contract."""
    frame = sys._getframe(2)
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    if where not in _warned:
        _warned.add(where)
        log.warning("plugin %s uses %s, which is deprecated: %s", where, what, instead)


@dataclass
class CallContext:
    """One request on its way to a model. Hooks read it and may change `data`."""

    route: str                 # "anthropic_messages", "count_tokens", "chat_completions", "completions",
                               # "responses", "responses_input_tokens", "embeddings", "rerank", and
                               # Ollama's "ollama_chat", "ollama_generate", "ollama_embed" (/api/embed
                               # and /api/embeddings), "ollama_show" (its body is Ollama's shape)
    requested_model: str       # the model name exactly as the client sent it ("" when it sent none)
    data: dict[str, Any]       # the request body as the client sent it; changes here reach the model
    config: "Config"
    target: Target | None = None  # set from mlxgate_resolve_model's answer
    notes: dict[str, Any] = field(default_factory=dict)  # free space for plugins


# ---------------------------------------------------------------- 1. routing
@hookspec(firstresult=True)
def mlxgate_resolve_model(ctx: CallContext) -> Target | None:
    """Decide which model answers `ctx.requested_model`: return a `Target`.

    Called first for every request. The first implementation that returns a `Target`
    wins (user plugins run before the built-in ``normalize`` plugin); return None to
    let the next one decide. When none decides, the client gets 404 not found. A local
    target names a model, not a server: the wrapper's resident set serves it (loading it
    in the request's queue when it is not loaded), so any number of models can be asked
    for.
    """


# ---------------------------------------------------------------- 2. availability
@hookspec(firstresult=True)
def mlxgate_check_available(ctx: CallContext) -> bool | None:
    """Check that `ctx.target` can answer, before anything is sent to the client.

    Called after routing, for every request (count_tokens included). It must not wait
    for a model to load: the relay loads `ctx.target` inside its queue when the
    request's turn comes, so a load holds nothing in the proxy and a full queue still
    answers 529/503 at once. The built-in ``ensure_loaded`` finds the model folder and
    checks its config and weight headers (remembered while the files stay the same): a
    missing model is a 404, a broken one a 503 that tells clients not to retry. The first
    implementation that returns True has handled it; raise `RequestRejected` to refuse.
    """


@hookspec(firstresult=True, warn_on_impl=DeprecationWarning(
    "mlxgate_ensure_loaded is now mlxgate_check_available (it never loaded anything); rename the function"))
def mlxgate_ensure_loaded(ctx: CallContext) -> bool | None:
    """Deprecated name of `mlxgate_check_available`, still called right after it (once per
    request) until plugins have moved; loading a plugin that implements it logs a warning."""


# ---------------------------------------------------------------- 3. request changes
@hookspec
def mlxgate_pre_call(ctx: CallContext) -> None:
    """Change `ctx.data` before it goes to the model (caps, defaults, rewrites).

    Called last, once per implementation, user plugins before the built-in
    ``token_cap`` (so the cap always holds). The body is the client's, in its API's
    shape (see the README for each route); it has not been validated yet, so read it
    defensively. Return values are ignored; raise `RequestRejected` to refuse the request.
    """
