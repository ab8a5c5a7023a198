"""Error types shared by every layer; each carries a message a user can act on.

Every error a client can meet has a `kind`; `api_errors` is the one table that turns a
kind into an HTTP status and each API's error shape. Inner code raises; the edge (the
proxy, the relay for a stream it has started, the CLI) shapes.
"""


class MlxgateError(Exception):
    """Base class: the message is printed as-is at the edge (CLI, HTTP)."""

    kind = "api_error"


class ConfigError(MlxgateError):
    """A configuration file, key or environment variable is invalid."""


class PluginError(MlxgateError):
    """A plugin file could not be loaded or does not match the hook contract."""


class UnknownModel(MlxgateError):
    """No local model folder matches the requested name."""

    kind = "not_found"


class UnsafeModelName(MlxgateError):
    """A requested name is malformed or tries to leave the model directories."""

    kind = "invalid_request"


class ModelLoadFailed(MlxgateError):
    """A model server could not load or serve the model; retrying will not help."""

    kind = "model_load_failed"


class ModelLoadTimeout(ModelLoadFailed):
    """A model server did not become ready within the load timeout."""


class ModelTooLarge(MlxgateError):
    """A model cannot fit in the memory budget whatever is unloaded; retrying will not help."""

    kind = "model_too_large"


class InsufficientMemory(MlxgateError):
    """The machine lacks the free memory a load needs now (other programs hold it)."""

    kind = "insufficient_memory"


class Overloaded(MlxgateError):
    """The queue is full; `retry_after` is a hint in seconds."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(MlxgateError):
    """A part of the gateway is not there right now (wrapper down, no model serving)."""

    kind = "unavailable"


class BackendError(MlxgateError):
    """The model server failed while answering (closed, crashed, or answered an error)."""

    kind = "backend_error"


class RequestRejected(MlxgateError):
    """A hook (or a request check) refuses a request: the client gets `status` and the message.

    `kind` is one of the kinds in `mlxgate.api_errors.KINDS`: invalid_request,
    context_length_exceeded, authentication, permission, not_found, response_not_found,
    request_too_large, rate_limit, overloaded, unavailable, model_load_failed, api_error.
    """

    param: str | None = None  # the field at fault, where the API's error shape has a place for it
    code: str | None = None   # a code more precise than the kind's own (OpenAI shapes)

    def __init__(self, status: int, message: str, kind: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def invalid(message: str) -> RequestRejected:
    """A 400 for a request that breaks the API's contract; the message names the field."""
    return RequestRejected(400, message, "invalid_request")


class StartBlocked(MlxgateError):
    """What stopped a start needs a person: starting again would meet it again."""
