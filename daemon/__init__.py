"""mlxgate: a local LLM gateway that serves MLX models behind the Anthropic and OpenAI APIs."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout (or install) folder: supervisord.conf, plugins/, config/ and ssl/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
