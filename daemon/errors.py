"""Error types shared by every layer; each carries a message a user can act on."""


class MlxgateError(Exception):
    """Base class: the message is printed as-is at the edge (CLI, HTTP)."""


class ConfigError(MlxgateError):
    """A configuration file, key or environment variable is invalid."""


class UnknownModel(MlxgateError):
    """No local model folder matches the requested name."""


class UnsafeModelName(MlxgateError):
    """A requested name tries to leave the model directories."""


class ModelLoadFailed(MlxgateError):
    """A model server could not load or serve the model."""


class ModelLoadTimeout(ModelLoadFailed):
    """A model server did not become ready within the load timeout."""
