"""mlxgate: a local LLM gateway that serves MLX models behind the Anthropic and OpenAI APIs.

The package lives in the folder `daemon/` and is imported as `mlxgate` (pyproject's
package-dir), so there is one name and one of each class::

    import mlxgate

    @mlxgate.hookimpl
    def mlxgate_pre_call(ctx):
        if "forbidden" in str(ctx.data.get("messages")):
            raise mlxgate.RequestRejected(400, "this gateway does not answer that")
"""

from pathlib import Path

if __name__ != "mlxgate":  # e.g. `import daemon` from the checkout: a second copy of every class
    raise ImportError(f"mlxgate's package is imported as `mlxgate`, not `{__name__}`; "
                      f"install it with ./install.sh (pip install -e .)")

__version__ = "0.1.0"

# The top of the checkout (site-packages when installed). supervisord.conf, plugins/, launchd/ and systemd/
# are found through `project_files.project_file`, which also knows an installed package's copies of them.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

from .errors import RequestRejected  # noqa: E402
from .hookspecs import CallContext, Target, hookimpl  # noqa: E402

__all__ = ["CallContext", "PROJECT_ROOT", "RequestRejected", "Target", "hookimpl", "__version__"]
