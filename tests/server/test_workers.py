"""`bnserve serve --workers N` (server/workers.py): N real server processes on one port."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from oip import infer_request
from prometheus_client.parser import text_string_to_metric_families

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.config import Settings
from bnserve.server.model import SessionPool
from bnserve.server.process import ServerProcess
from bnserve.server.workers import worker_env

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"
CONNECTIONS = 32  # all on one worker by chance: 2**-31


def test_worker_env_rebuilds_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        repo=Path("/srv/models"), port=9000, metrics_port=9100, grace=3.5, lame_duck=1, workers=4
    )
    monkeypatch.setenv("BNSERVE_POLL", "2")  # the parent's env must not leak through
    env = worker_env(settings, port=9000, index=2)
    for k, v in env.items():
        if k.startswith("BNSERVE_"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("BNSERVE_POLL", raising=False)
    got = Settings()
    assert (got.port, got.metrics_port, got.workers, got.reuse_port) == (9000, 9102, 1, True)
    assert (got.repo, got.grace, got.lame_duck, got.poll) == (Path("/srv/models"), 3.5, 1.0, None)
    assert "BNSERVE_POLL" not in env


def _serving_lines(server: ServerProcess, n: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in server.log if " serving " in line]
        if len(lines) >= n:
            return lines
        assert server.proc.poll() is None, "".join(server.log[-30:])
        time.sleep(0.05)
    raise AssertionError("workers not serving:\n" + "".join(server.log[-30:]))


def _successes(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "bnserve_request_success_total" and s.labels.get("model") == "digits"
    )


def test_two_workers_share_the_port_and_stop_together() -> None:
    ref = SessionPool(str(BUNDLED / "digits" / "1" / "model.onnx"), instances=1)
    server = ServerProcess(
        BUNDLED, "--workers", "2", "--instances", "1", "--metrics-port", "0", "--grace", "5"
    )
    try:
        lines = _serving_lines(server, 2)
        assert {int(m) for line in lines for m in re.findall(r" on 127\.0\.0\.1:(\d+) ", line)} == {
            server.port
        }
        metrics = [
            int(re.findall(r"metrics 127\.0\.0\.1:(\d+)/metrics", line)[0]) for line in lines
        ]
        rng = np.random.default_rng(0)
        sent = 0
        for c in range(CONNECTIONS):  # separate connections: the kernel spreads those
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(server.target, options=options) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                for i in range(3):
                    x = rng.random((2, 1, 8, 8), dtype=np.float32)
                    resp = stub.ModelInfer(infer_request(x, request_id=f"{c}-{i}"), timeout=10)
                    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 10)
                    assert got.tobytes() == ref.run({"input": x})["logits"].tobytes()
                    sent += 1
        per_worker = [_successes(p) for p in metrics]
        assert sum(per_worker) == sent and min(per_worker) > 0, per_worker
    finally:
        rc = server.stop(60)
        ref.close()
    assert rc == 0, "".join(server.log[-30:])
    log = "".join(server.log)
    assert log.count("stopped cleanly: every accepted request was answered") == 2
    assert "all 2 workers stopped cleanly" in log


def test_a_worker_that_dies_takes_the_set_down() -> None:
    server = ServerProcess(BUNDLED, "--workers", "2", "--instances", "1", "--grace", "5")
    try:
        _serving_lines(server, 2)
        pids = [int(p) for p in re.findall(r"worker \d/2 pid (\d+)", "".join(server.log))]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        rc = server.proc.wait(60)
    finally:
        server.kill()
    log = "".join(server.log)
    assert rc == 1, log[-3000:]
    assert f"worker 1 (pid {pids[0]}) exited with -9; stopping the others" in log
    assert log.count("stopped cleanly: every accepted request was answered") == 1  # the other
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=2)


def test_lame_duck_must_leave_room_for_the_drain() -> None:
    with pytest.raises(ValueError, match=r"lame_duck \(10 s\) must be shorter than grace \(10 s\)"):
        Settings(lame_duck=10, grace=10)
    assert Settings(lame_duck=2, grace=10).lame_duck == 2.0
    assert Settings(lame_duck=0, grace=0).lame_duck == 0.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    """SIGKILL of the supervisor: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG), so no
    orphan keeps serving old models on the shared port."""
    server = ServerProcess(BUNDLED, "--workers", "2", "--instances", "1", "--grace", "5")
    try:
        _serving_lines(server, 2)
        pids = [int(p) for p in re.findall(r"worker \d/2 pid (\d+)", "".join(server.log))]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        server.kill()  # SIGKILL: no chance to forward anything
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), "a worker outlived its supervisor"
    finally:
        server.kill()
