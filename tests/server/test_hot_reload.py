"""Hot reload through a running server: a new version takes traffic, a broken one is refused and
the old keeps serving; metrics count the refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
from oip import infer_request, logits_of, wait_for

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import serve_in_thread
from bnserve.server.config import Settings

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"


def test_new_version_takes_traffic_and_broken_one_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    shutil.copy(BUNDLED / "digits" / "config.json", repo / "digits" / "config.json")
    shutil.copytree(BUNDLED / "digits" / "1", repo / "digits" / "1")
    settings = Settings(repo=repo, host="127.0.0.1", port=0, metrics_port=-1, instances=1, poll=0.1)
    x = np.zeros((2, 1, 8, 8), np.float32)
    with serve_in_thread(settings) as app, grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(infer_request(x), timeout=10).model_version == "1"

        shutil.copytree(BUNDLED / "digits" / "1", repo / "digits" / "2")
        wait_for(lambda: stub.ModelInfer(infer_request(x), timeout=10).model_version == "2")
        assert logits_of(stub.ModelInfer(infer_request(x), timeout=10)).shape == (2, 10)

        (repo / "digits" / "3").mkdir()
        good = (BUNDLED / "digits" / "1" / "model.onnx").read_bytes()
        (repo / "digits" / "3" / "model.onnx").write_bytes(good[: len(good) // 2])  # truncated

        def refused() -> bool:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
            return any(m.version == "3" and m.state == "UNAVAILABLE" and m.reason for m in index)

        wait_for(refused)
        assert stub.ModelInfer(infer_request(x), timeout=10).model_version == "2"
        assert app.metrics.snapshot("bnserve_model_load_failures_total", model="digits") >= 1
        ready_v3 = stub.ModelReady(pb.ModelReadyRequest(name="digits", version="3"), timeout=5)
        assert not ready_v3.ready
