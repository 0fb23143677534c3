"""Every client mistake gets a precise status and message; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from oip import infer_request, logits_of

from bnserve.proto import inference_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def call_error(stub, req: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=10)
    return err.value


def _x(n: int = 1) -> np.ndarray:
    return np.zeros((n, 1, 8, 8), np.float32)


def _both_raw_and_typed() -> pb.ModelInferRequest:
    req = infer_request(_x())
    req.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return req


def _two_inputs() -> pb.ModelInferRequest:
    req = infer_request(_x())
    req.inputs.add(name="extra", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0" * 4)
    return req


def _no_inputs() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="digits")


def _unknown_output() -> pb.ModelInferRequest:
    req = infer_request(_x())
    req.outputs.add(name="probabilities")
    return req


CASES = {
    "unknown model": (infer_request(_x(), model="nope"), grpc.StatusCode.NOT_FOUND, ["nope"]),
    "unknown version": (
        pb.ModelInferRequest(model_name="digits", model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        ["7"],
    ),
    "wrong input name": (infer_request(_x(), name="image"), INVALID, ["'image'", "input"]),
    "wrong datatype": (
        infer_request(_x().astype(np.float64), datatype="FP64"),
        INVALID,
        ["FP64", "FP32"],
    ),
    "wrong rank": (infer_request(np.zeros((1, 64), np.float32)), INVALID, ["input"]),
    "wrong inner dims": (
        infer_request(np.zeros((1, 1, 8, 9), np.float32)),
        INVALID,
        ["input", "8"],
    ),
    "byte count": (infer_request(_x(), shape=[2, 1, 8, 8]), INVALID, ["512", "256"]),
    "missing input": (_no_inputs(), INVALID, ["input"]),
    "extra input": (_two_inputs(), INVALID, ["extra"]),
    "raw and typed": (_both_raw_and_typed(), INVALID, ["input"]),
    "zero dim": (infer_request(np.zeros((0, 1, 8, 8), np.float32)), INVALID, ["input"]),
    "negative dim": (infer_request(_x(), shape=[-1, 1, 8, 8]), INVALID, ["input"]),
    "absurd dim": (infer_request(_x(), shape=[2**62, 1, 8, 8]), INVALID, ["input"]),
    "batch over limit": (infer_request(_x(65)), INVALID, ["65", "64"]),
    "undecodable bytes": (
        infer_request(_x(), datatype="FP32", shape=[1, 1, 8, 7]),
        INVALID,
        ["input"],
    ),
    "unknown output": (_unknown_output(), INVALID, ["probabilities"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_precise_status(stub, case: str) -> None:
    req, code, words = CASES[case]
    err = call_error(stub, req)
    assert err.code() == code, (case, err.code(), err.details())
    for w in words:
        assert w in err.details(), (case, err.details())
    # ... and the server keeps serving
    ok = stub.ModelInfer(infer_request(_x(2)), timeout=10)
    assert logits_of(ok).shape == (2, 10)


def test_garbage_bytes_on_the_wire_are_invalid_argument(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in err.value.details()


def test_metadata_errors(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelConfig(pb.ModelConfigRequest(name="digits", version="9"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../etc"), timeout=5)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
