"""Python client for the Open Inference Protocol: unary and streaming, numpy in and out."""

from .client import (
    DATATYPES,
    AsyncInferenceClient,
    AsyncInferStream,
    InferenceClient,
    InferenceError,
    InferResult,
    InferStream,
    StreamResult,
    TLSConfig,
)

__all__ = [
    "DATATYPES",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "InferResult",
    "InferStream",
    "InferenceClient",
    "InferenceError",
    "StreamResult",
    "TLSConfig",
]
