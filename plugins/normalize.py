"""Built-in plugin: model-name normalization.

Rules, in order: a name the config's `litellm:` section lists goes to that LiteLLM
deployment; `fixed_model` answers everything else; the autocomplete alias goes to the
autocomplete model; `aliases` from the config; `model_routes` patterns (default:
`*haiku*` → the autocomplete model); other Anthropic-style (`claude-*`) and OpenAI-style
(`gpt-*`) names go to `default_model`, OpenAI's embedding names (`text-embedding-*`) to
`embedding_model`; any other name is a local model name (provider
prefixes, `mlx-community/` forms and Ollama's `:latest` tag are resolved with the catalog). Hosted names are
matched without their suffixes: `claude-opus-4-8[1m]`, dated ids and `-latest` all work.
The answer names a model; the wrapper's resident set serves it (the default and
autocomplete models on their own ports, any other on a port of its own, loaded when
asked for). Names are checked (length, characters) before anything else looks at them.
"""

import fnmatch
import re

from mlxgate import names
from mlxgate.errors import RequestRejected, UnsafeModelName
from mlxgate.hookspecs import LITELLM, Target, hookimpl

HOSTED_PREFIXES = ("claude-", "gpt-")
EMBEDDING_PREFIXES = ("text-embedding-",)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return bool(set(names.candidates(a)) & set(names.candidates(b)))
    except UnsafeModelName:
        return False


def _route(config, name: str) -> str | None:
    """The `model_routes` destination of a name, matched without `[...]` suffixes."""
    key = re.sub(r"\[[^\]]*\]$", "", names.strip_provider(name).lower())
    for pattern, destination in config.model_routes.items():
        if fnmatch.fnmatchcase(key, pattern):
            return destination
    return None


def _deployment(config, name: str) -> str | None:
    """The `litellm:` deployment (its model_name, shell-style patterns allowed) for a name."""
    for entry in (config.litellm or {}).get("model_list") or ():
        pattern = entry["model_name"]
        if name == pattern or ("*" in pattern and fnmatch.fnmatchcase(name, pattern)):
            return name
    return None


@hookimpl(trylast=True)
def mlxgate_resolve_model(ctx):
    config = ctx.config
    requested = ctx.requested_model.strip()
    if requested and _deployment(config, requested):
        return Target(requested, LITELLM)
    if config.fixed_model:
        return Target(config.fixed_model)
    if not requested:
        raise RequestRejected(400, "model: Field required (a model name; `mlxgate models` lists them)")
    if config.autocomplete_alias and names.strip_tag(requested) == config.autocomplete_alias:
        if not config.autocomplete_model:
            raise RequestRejected(404, f"model {requested!r} is the autocomplete alias, but no "
                                  f"autocomplete_model is configured. Set autocomplete_model in "
                                  f"config/gateway.yaml or pass --autocomplete-model.", "not_found")
        return Target(config.autocomplete_model)
    bare = names.strip_tag(names.strip_provider(requested))
    name = (config.aliases.get(requested) or config.aliases.get(names.strip_provider(requested))
            or config.aliases.get(bare) or requested)
    if names.strip_provider(name).lower().startswith(EMBEDDING_PREFIXES):
        if not config.embedding_model:
            raise RequestRejected(404, f"model {requested!r} would be answered by the embedding model, but none "
                                  f"is configured. Set embedding_model in config/gateway.yaml, or name a local "
                                  f"embedding model (`mlxgate models` lists them).", "not_found")
        return Target(config.embedding_model)
    routed = _route(config, name)
    if routed == "autocomplete" and config.autocomplete_model:
        return Target(config.autocomplete_model)
    if routed in ("default", "autocomplete"):
        name = "claude-default"  # served like any hosted name: by the default model
    elif routed:
        name = routed
    if names.strip_provider(name).lower().startswith(HOSTED_PREFIXES):
        if not config.default_model:
            raise RequestRejected(404, f"model {requested!r} would be answered by the default model, "
                                  f"but none is configured. Set default_model in config/gateway.yaml "
                                  f"or pass --default-model.", "not_found")
        name = config.default_model
    for configured in (config.default_model, config.autocomplete_model):
        if configured and _same_model(name, configured):
            return Target(configured)  # the configured name: the relay finds that model's server by it
    return Target(name)
