"""A real server on 127.0.0.1, port 0, in-process (its own event loop in a thread)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.model import SessionPool

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    settings = Settings(
        repo=BUNDLED, host="127.0.0.1", port=0, metrics_port=0, instances=2, grace=5
    )
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def digits_pool() -> Iterator[SessionPool]:
    """In-process onnxruntime on the same file, frozen settings: the reference answers."""
    pool = SessionPool(str(BUNDLED / "digits" / "1" / "model.onnx"), instances=1)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    from bnserve.training.data import digits

    return digits().x_test  # (450, 1, 8, 8) float32
