"""Built-in plugin: make sure the routed local model can be loaded, before anything is sent.

It finds the model folder and checks it as a load would (config, weight headers; the
verdict is remembered while the files stay the same): an unknown model is a 404, a broken
one a 503 that tells clients not to retry. It does not load: the relay loads the model
inside its queue when the request's turn comes.
"""

from mlxgate.catalog import for_config
from mlxgate.hookspecs import hookimpl


@hookimpl(trylast=True)
def mlxgate_check_available(ctx):
    if ctx.target.local:
        for_config(ctx.config).servable(ctx.target.model)
    return True
