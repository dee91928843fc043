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


class StoreError(EngineError):
    """The session store cannot serve a request; the message names the session and why."""


class StoreDirectoryError(StoreError):
    """The store's directory cannot be used: not ours, open to other users, or not creatable."""


class StoreWriteError(StoreError):
    """A session could not be written (disk full, unwritable, over the store's size cap).

    Nothing was changed in the store; the session is wherever it was before (in memory).
    """

    code = "resource_exhausted"


class CorruptSessionError(StoreError):
    """A stored session's file is truncated, corrupted or inconsistent; it is not loaded."""


class FingerprintMismatchError(StoreError):
    """A stored session was made with another model, dtype or cache shape; `differences` says which."""

    code = "invalid_argument"

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences
