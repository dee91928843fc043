"""Typed engine errors. Each carries a stable code that the wire protocol reuses."""


class EngineError(Exception):
    """Base class; `code` is one of the protocol's stable error codes."""

    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFoundError(EngineError):
    code = "not_found"


class InvalidArgumentError(EngineError):
    code = "invalid_argument"


class BusyError(EngineError):
    code = "busy"


class ResourceExhaustedError(EngineError):
    code = "resource_exhausted"


class ModelLoadError(EngineError):
    """The model could not be found, read or served; the message names why."""

    code = "invalid_argument"


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or RoPE kind is one the sink+window cache cannot serve."""
