"""One exception tree for the server, each class carrying its status.

Everything below the servicer raises these; the servicer maps them to a gRPC status exactly once
(`status_code` is the name of a `grpc.StatusCode` member, so this module does not import grpc).
A client's mistake is never INTERNAL or UNKNOWN.
"""

from __future__ import annotations


class BnserveError(Exception):
    """Base of every error the server reports to a client."""

    status_code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(BnserveError):
    """The request is malformed: names, datatypes, shapes, byte counts, batch size."""

    status_code = "INVALID_ARGUMENT"


class ModelNotFoundError(BnserveError):
    """No such model, or no such version of it."""

    status_code = "NOT_FOUND"


class ModelNotReadyError(BnserveError):
    """The model exists but cannot take requests now (loading, refused, unloading)."""

    status_code = "UNAVAILABLE"


class OverloadedError(BnserveError):
    """The model's queue is full. Clients may retry with backoff."""

    status_code = "UNAVAILABLE"


class ShuttingDownError(BnserveError):
    """The server is draining after SIGTERM/SIGINT; no new requests are accepted."""

    status_code = "UNAVAILABLE"


class DeadlineExceededError(BnserveError):
    """The request's deadline passed before its batch was computed."""

    status_code = "DEADLINE_EXCEEDED"


class CancelledError(BnserveError):
    """The client cancelled the call before its batch was computed."""

    status_code = "CANCELLED"


class ModelLoadError(BnserveError):
    """A model file was refused at load: unreadable, not ONNX, BN in training mode, or not
    batch-invariant. Reported on load RPCs; at start-up it is logged and the model is not ready."""

    status_code = "FAILED_PRECONDITION"


class UnsupportedError(BnserveError):
    """A valid request for a feature this server does not offer."""

    status_code = "UNIMPLEMENTED"
