"""`bnserve bench` against a real server (in-process, 127.0.0.1, port 0, the bundled models).

The client's figures are checked against the server's own Prometheus counters: every request
the load tester sent is accounted for exactly once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from bnserve.client.bench import (
    BenchConfig,
    BenchResult,
    _Ids,
    _transport_code,
    build_workload,
    render,
    run_bench,
)
from bnserve.proto import inference_pb2 as pb
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
JSON_KEYS = {
    "requests",
    "errors",
    "throughput_rps",
    "samples_per_s",
    "latency_ms",
    "retries",
    "retried",
    "ok_by_target",
}
LATENCY_KEYS = ["p50", "p90", "p99", "p999", "max"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    settings = Settings(
        repo=BUNDLED,
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        instances=2,
        grace=5,
        log_level="WARNING",
    )
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


def _successes(app: App, model: str = "digits") -> float:
    return app.metrics.snapshot("bnserve_request_success_total", model=model, version="1")


def _check_json(result: BenchResult) -> dict:
    doc = json.loads(result.to_json())
    assert doc.keys() >= JSON_KEYS
    assert list(doc["latency_ms"]) == LATENCY_KEYS
    assert doc["requests"] == result.requests
    assert doc["errors"] == sum(doc["errors_by_code"].values())
    return doc


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_closed_loop_counts_match_the_server(app: App, target: str, mode: str) -> None:
    before = _successes(app)
    result = run_bench(
        BenchConfig(
            targets=(target,),
            model="digits",
            concurrency=4,
            duration=2.0,
            warmup=0.0,
            mode=mode,  # type: ignore[arg-type]
            progress=False,
        )
    )
    delta = _successes(app) - before
    assert result.errors == 0, result.errors_by_code
    assert result.requests == result.ok > 0
    assert result.ok == delta  # every request counted exactly once, on both sides
    assert result.warmup_requests == 0
    assert result.throughput_rps == pytest.approx(result.requests / 2.0, rel=1e-3)
    assert result.samples_per_s == pytest.approx(result.ok / 2.0, rel=1e-3)
    lat = [v for k in LATENCY_KEYS if (v := result.latency_ms[k]) is not None]
    assert len(lat) == len(LATENCY_KEYS) and min(lat) > 0
    assert lat == sorted(lat)  # p50 <= p90 <= p99 <= p99.9 <= max
    assert result.latencies_s.size == result.ok
    assert result.mode == mode and result.concurrency == 4
    doc = _check_json(result)
    assert doc["errors_by_code"] == {}
    assert sum(doc["timeline"]["ok_rps"]) * doc["timeline"]["interval_s"] == pytest.approx(
        result.ok
    )


def test_open_loop_keeps_the_rate(app: App, target: str) -> None:
    before = _successes(app)
    result = run_bench(
        BenchConfig(
            targets=(target,), model="digits", rate=200.0, duration=2.0, warmup=0.5, progress=False
        )
    )
    delta = _successes(app) - before
    assert result.loop == "open" and result.concurrency is None
    assert result.send_rate_rps is not None
    assert abs(result.send_rate_rps - 200.0) <= 0.05 * 200.0
    assert abs(result.requests - 200 * 2) <= 0.05 * 400
    assert result.errors == 0, result.errors_by_code
    # Warm-up requests are tallied apart, and the server saw exactly both.
    assert result.warmup_requests == 100
    assert result.ok + result.warmup_ok == delta
    assert result.send_lag_ms is not None and result.send_lag_ms["max"] is not None
    _check_json(result)


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_unknown_model_errors_are_counted_by_code(app: App, target: str, mode: str) -> None:
    def failures() -> float:
        return app.metrics.snapshot(
            "bnserve_request_failure_total", model="<unknown>", version="", code="NOT_FOUND"
        )

    before = failures()
    result = run_bench(
        BenchConfig(
            targets=(target,),
            model="no-such-model",
            concurrency=2,
            duration=1.0,
            warmup=0.0,
            mode=mode,  # type: ignore[arg-type]
            progress=False,
        )
    )
    assert result.requests > 0
    assert result.ok == 0
    assert result.errors == result.requests
    assert result.errors_by_code == {"NOT_FOUND": result.requests}
    assert failures() - before == result.errors
    assert result.latency_ms["p50"] is None
    assert result.samples_per_s == 0
    doc = _check_json(result)
    assert doc["errors_by_code"] == {"NOT_FOUND": result.requests}


def test_cli_writes_table_json_and_plot(target: str, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [
        sys.executable,
        "-m",
        "bnserve.cli",
        "bench",
        "--target",
        target,
        "--model",
        "digits",
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--batch",
        "4",
        "--mode",
        "stream",
        "--retries",
        "2",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    for word in ("req/s", "samples/s", "p50", "p99.9", "max", "errors 0"):
        assert word in proc.stdout
    doc = json.loads(out_json.read_text())
    assert doc.keys() >= JSON_KEYS
    assert doc["errors"] == 0 and doc["requests"] > 0
    assert doc["batch"] == 4 and doc["inputs"] == {"input": [4, 1, 8, 8]}
    assert doc["retries"] == 2 and doc["retried"] == 0  # one healthy target: nothing to retry
    assert doc["ok_by_target"] == {target: doc["ok"] + doc["warmup_ok"]}
    assert doc["samples_per_s"] == pytest.approx(4 * doc["throughput_rps"], rel=1e-3)
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_request_ids_ride_on_the_one_serialized_request() -> None:
    work = build_workload("digits", "", [("input", "FP32", [-1, 1, 8, 8])], batch=3)
    assert work.rows == 3 and work.inputs == {"input": [3, 1, 8, 8]}
    ids = _Ids(work.payload)
    seen = set()
    for _ in range(300):
        payload, sid = ids.next()
        request = pb.ModelInferRequest.FromString(payload)
        assert request.id == sid
        assert request.model_name == "digits"
        assert list(request.inputs[0].shape) == [3, 1, 8, 8]
        assert len(request.raw_input_contents[0]) == 3 * 64 * 4
        seen.add(sid)
    assert len(seen) == 300


def test_unary_requests_are_the_serialized_request_as_it_is() -> None:
    """Unary requests carry no id (nothing matches a unary answer by id): each is the one
    serialized request, byte for byte, so no send copies it. A real gRPC server records them."""
    seen: list[bytes] = []
    meta = pb.ModelMetadataResponse(
        name="m",
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name="x", datatype="FP32", shape=[-1, 4])],
    )

    def infer(raw: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(raw)
        return pb.ModelInferResponse(model_name="m").SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                lambda request, context: meta,
                request_deserializer=pb.ModelMetadataRequest.FromString,
                response_serializer=pb.ModelMetadataResponse.SerializeToString,
            ),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_bench(
            BenchConfig(
                targets=[f"127.0.0.1:{port}"], model="m", concurrency=2, duration=0.3, warmup=0.1
            )
        )
    finally:
        server.stop(grace=1).wait()
    expected = build_workload("m", "", [("x", "FP32", [-1, 4])], batch=1).payload
    assert result.ok == result.requests > 0 and result.errors == 0
    assert len(seen) == result.requests + result.warmup_requests
    assert set(seen) == {expected}
    assert pb.ModelInferRequest.FromString(expected).id == ""


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(model="digits", concurrency=2, rate=10.0)
    with pytest.raises(ValueError, match="duration"):
        BenchConfig(model="digits", duration=0)
    with pytest.raises(ValueError, match="batch axis"):
        build_workload("m", "", [("x", "FP32", [3, 4])], batch=2)
    with pytest.raises(ValueError, match="retries"):
        BenchConfig(model="digits", retries=-1)
    assert BenchConfig(model="m", targets="h:1").targets == ("h:1",)
    assert BenchConfig(model="m").retries == 0


# --- retries: UNAVAILABLE only, to the next target --------------------------------------------


@pytest.fixture(scope="module")
def dead() -> str:
    """A loopback address nobody listens on: every call to it fails fast with UNAVAILABLE."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_retries_move_unavailable_requests_to_the_next_target(
    app: App, target: str, dead: str, mode: str
) -> None:
    before = _successes(app)
    result = run_bench(
        BenchConfig(
            targets=(target, dead),
            model="digits",
            concurrency=4,
            duration=1.5,
            warmup=0.2,
            mode=mode,  # type: ignore[arg-type]
            retries=3,
            progress=False,
        )
    )
    delta = _successes(app) - before
    assert result.errors == 0, result.errors_by_code
    assert result.requests == result.ok > 0
    assert result.retries == 3
    # Half the requests go to the dead target first: each is retried once, on the live one.
    assert result.retried > 0.3 * (result.requests + result.warmup_requests)
    assert result.ok_by_target == {target: result.ok + result.warmup_ok, dead: 0}
    assert result.ok + result.warmup_ok == delta  # a retried request is answered once
    doc = _check_json(result)
    assert doc["retried"] == result.retried and doc["retries"] == 3
    assert "retried" in render(result)


def test_without_retries_unavailable_is_an_error(target: str, dead: str) -> None:
    result = run_bench(
        BenchConfig(
            targets=(target, dead),
            model="digits",
            concurrency=1,
            duration=1.0,
            warmup=0.0,
            progress=False,
        )
    )
    assert result.retried == 0 and result.retries == 0
    assert result.errors_by_code == {"UNAVAILABLE": result.requests // 2}
    assert result.ok == result.requests - result.requests // 2
    assert "retried" not in render(result)


def test_retries_are_bounded(target: str, dead: str) -> None:
    """retries=1 over (live, dead, dead), one worker: request i goes to target i % 3 first; from
    target 1 its one retry reaches target 2, dead too (final UNAVAILABLE); from target 2 it
    reaches the live target 0."""
    result = run_bench(
        BenchConfig(
            targets=(target, dead, dead),
            model="digits",
            concurrency=1,
            duration=1.0,
            warmup=0.0,
            retries=1,
            progress=False,
        )
    )
    n = result.requests
    assert result.errors_by_code == {"UNAVAILABLE": (n + 1) // 3}
    assert result.ok == n - (n + 1) // 3
    assert result.retried == (n + 1) // 3 + n // 3


def test_only_unavailable_is_retried(target: str, dead: str) -> None:
    """An unknown model over (live, dead), one worker: NOT_FOUND from the live target is final;
    a request sent to the dead target first is retried once, and gets NOT_FOUND."""
    result = run_bench(
        BenchConfig(
            targets=(target, dead),
            model="no-such-model",
            concurrency=1,
            duration=1.0,
            warmup=0.0,
            retries=3,
            progress=False,
        )
    )
    n = result.requests
    assert n > 0
    assert result.errors_by_code == {"NOT_FOUND": n}
    assert result.retried == n // 2  # requests 1, 3, 5, ... start on the dead target


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.INTERNAL, "Internal error from Core", "UNAVAILABLE"),
        (grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM)", "UNAVAILABLE"),
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)", "UNAVAILABLE"),
        (grpc.StatusCode.INTERNAL, "internal server error (see server log)", "INTERNAL"),
        (grpc.StatusCode.UNKNOWN, "Exception iterating responses: boom", "UNKNOWN"),
    ],
)
def test_a_call_lost_with_its_connection_counts_as_unavailable(
    code: grpc.StatusCode, details: str, expected: str
) -> None:
    """What grpcio says when a server dies under a stream (measured by SIGKILLing one: the
    first three) is retried like UNAVAILABLE; a status the server sent keeps its code."""
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
    assert _transport_code(exc) == expected
