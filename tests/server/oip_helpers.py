"""Request builders shared by the server tests."""

from __future__ import annotations

import numpy as np

from bnserve.proto import inference_pb2 as pb


def infer_request(
    x: np.ndarray,
    *,
    model: str = "digits",
    name: str = "input",
    datatype: str = "FP32",
    request_id: str = "",
    shape: list[int] | None = None,
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return req


def logits_of(resp: pb.ModelInferResponse) -> np.ndarray:
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(list(out.shape))
