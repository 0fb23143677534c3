"""Open Inference Protocol helpers shared by every test folder (tests/ is on sys.path: pytest
puts the directory of tests/conftest.py there): request builders, output decoding, the
in-process reference sessions answers must match, and bounded polling."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.proto import inference_pb2 as pb
from bnserve.server.model import SessionPool

BUNDLED = Path(__file__).resolve().parents[1] / "model_repository"


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll (bounded) until predicate() is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what or predicate}"
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def infer_request(
    x: np.ndarray,
    *,
    model: str = "digits",
    name: str = "input",
    datatype: str = "FP32",
    request_id: str = "",
    version: str = "",
    shape: list[int] | None = None,
) -> pb.ModelInferRequest:
    """One input as raw_input_contents (FP32 data is sent as float32 whatever x's dtype)."""
    req = pb.ModelInferRequest(model_name=model, id=request_id, model_version=version)
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    data = np.ascontiguousarray(x, dtype=np.float32 if datatype == "FP32" else None)
    req.raw_input_contents.append(data.tobytes())
    return req


def logits_of(resp: pb.ModelInferResponse) -> np.ndarray:
    """The first output, FP32, in its shape."""
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(list(out.shape))


def reference_pool(model: str) -> Iterator[SessionPool]:
    """A one-session pool of a bundled model, for the answers requests must match (a fixture
    body: `yield from reference_pool("digits")`)."""
    pool = SessionPool(str(BUNDLED / model / "1" / "model.onnx"), instances=1)
    try:
        yield pool
    finally:
        pool.close()


def tritonclient_stream(client: Any, model: str, batches: Sequence[np.ndarray]) -> dict[str, Any]:
    """Send each batch over one tritonclient stream (request id = its index), wait for every
    answer (stop_stream), and return the answers by id; any error fails the test."""
    import tritonclient.grpc as tc

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i, x in enumerate(batches):
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer(model, [inp], request_id=str(i))
    client.stop_stream()
    seen = {}
    while not answers.empty():
        result, error = answers.get_nowait()
        assert error is None, error
        seen[result.get_response().id] = result
    return seen
