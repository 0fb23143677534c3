"""One subprocess test per CLI entry point, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
BNSERVE = [sys.executable, "-m", "bnserve.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BNSERVE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV
    )


def test_train_export_inspect(tmp_path: Path) -> None:
    ckpt = tmp_path / "mlp.pt"
    r = run(
        "train", "mlp", "--epochs", "3", "--tf-momentum", "0.9", "--out", str(ckpt), "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "mapped to PyTorch momentum 0.1" in r.stderr
    assert re.search(r"mlp: eval accuracy 0\.9\d+", r.stdout), r.stdout
    repo = tmp_path / "repo"
    for expected_version in ("1", "2"):
        r = run("export", str(ckpt), "--repo", str(repo))
        assert r.returncode == 0, r.stderr
        assert f"(version {expected_version})" in r.stdout
    config = json.loads((repo / "mlp" / "config.json").read_text())
    assert sorted(config["versions"]) == ["1", "2"]
    assert config["versions"]["2"]["accuracy"] == config["versions"]["2"]["torch_accuracy"]
    r = run("inspect", str(repo / "mlp" / "2" / "model.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["batch_invariant"] is True and report["batchnorm"] == [] and report["ok"]
    assert report["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


def test_export_refuses_stale_statistics(tmp_path: Path) -> None:
    import torch

    from bnserve.training import train as T
    from bnserve.training.models import build

    model = build("digits")  # never trained: running statistics never updated
    cfg = T.TrainConfig.for_model("digits")
    split = T.load_split("digits")
    T.save_checkpoint(
        tmp_path / "stale.pt", T.TrainResult(model=model.eval(), config=cfg, split=split)
    )
    r = run("export", str(tmp_path / "stale.pt"), "--repo", str(tmp_path / "repo"))
    assert r.returncode == 2
    assert "was never updated" in r.stderr and "--recalibrate" in r.stderr
    assert not (tmp_path / "repo" / "digits" / "1").exists()
    assert torch.__version__.startswith("2.13")


def test_inspect_reports_training_mode_bn(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    c = 2
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], [1.0] * c) for n in ("s", "b", "m", "v")]
    node = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 4])],
        inits,
    )
    path = tmp_path / "train_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    r = run("inspect", str(path))
    assert r.returncode == 1
    assert "TRAINING MODE" in r.stdout and "batch-invariant: NO" in r.stdout


def test_serving_does_not_import_torch() -> None:
    code = (
        "import sys, bnserve.cli, bnserve.server.app, bnserve.client;"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_health_and_sigterm_drain(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *BNSERVE,
            "serve",
            "--repo",
            str(ROOT / "model_repository"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--instances",
            "1",
            "--grace",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    lines: list[str] = []
    port_found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"serving .* on 127\.0\.0\.1:\d+", line):
                port_found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert port_found.wait(timeout=120), "".join(lines)
        port = int(re.search(r"on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))  # type: ignore[union-attr]
        target = f"127.0.0.1:{port}"
        h = run("health", "--target", target, timeout=30)
        assert h.returncode == 0 and "SERVING" in h.stdout, h.stderr
        h = run("health", "--target", target, "--service", "vol3d", timeout=30)
        assert h.returncode == 0, h.stderr

        x = np.random.default_rng(0).normal(size=(8, 1, 32, 32, 32)).astype(np.float32)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = pb.ModelInferRequest(model_name="vol3d", id="x")
            req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            futures = [stub.ModelInfer.future(req, timeout=60) for _ in range(24)]
            futures[0].result()  # the server is busy with the rest
            proc.send_signal(signal.SIGTERM)
            codes = []
            for f in futures:
                try:
                    resp = f.result()
                    assert resp.id == "x" and len(resp.raw_output_contents[0]) == 8 * 3 * 4
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
        assert proc.wait(timeout=60) == 0
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert codes.count("OK") >= 1
        log = "".join(lines)
        assert "draining: " in log and "stopped cleanly" in log, log  # either front end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
