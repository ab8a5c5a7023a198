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


class PluginError(MlxgateError):
    """A plugin file could not be loaded or does not match the hook contract."""


class RequestRejected(MlxgateError):
    """A hook refuses a request: the client gets `status` and the message.

    `kind` is one of: invalid_request, authentication, permission, not_found,
    request_too_large, rate_limit, overloaded, unavailable, api_error.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind
