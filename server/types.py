"""Plain data shared by the server's modules: tensor specs and the datatype table.

No protobuf here: the Open Inference Protocol names datatypes by strings ("FP32", ...), and this
table maps them to numpy dtypes and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnserve.proto.datatypes import DATATYPES

# Open Inference Protocol datatype -> numpy dtype (little-endian, as on the wire).
V2_TO_NUMPY: dict[str, np.dtype] = DATATYPES
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}

# onnxruntime's type strings ("tensor(float)") -> Open Inference Protocol datatype.
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model. `shape` includes the batch axis as -1 when the model
    batches; other -1 entries are free dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]
