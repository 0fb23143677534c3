"""bnserve.server.process.ServerProcess: a real `bnserve serve` child (its graceful stop under
load is tests/reliability/test_faults.py's SIGTERM test; the soak uses it too)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.process import ServerProcess

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"


def test_starts_on_an_ephemeral_port_and_stops_cleanly() -> None:
    server = ServerProcess(BUNDLED, "--instances", "1")
    try:
        assert server.port > 0 and server.target == f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(server.target) as ch:
            ready = pb_grpc.GRPCInferenceServiceStub(ch).ModelReady(
                pb.ModelReadyRequest(name="digits"), timeout=10
            )
        assert ready.ready
    finally:
        rc = server.stop(60)
    assert rc == 0
    assert any("stopped cleanly" in line for line in server.log)


def test_a_server_that_cannot_start_is_reported_with_its_log() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)server did not start.*--no-such-flag"):
        ServerProcess(BUNDLED, "--no-such-flag", start_timeout=60)
