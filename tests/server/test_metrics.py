"""server/metrics.py: real prometheus-client collectors, read back over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from bnserve.server.batcher import Batcher
from bnserve.server.metrics import LATENCY_BUCKETS, Metrics
from bnserve.server.model import SessionPool

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _fetch(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return _parse(resp.read().decode())


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.stop_http()


MV = {"model": "digits", "version": "1"}


def test_batches_over_http(metrics: Metrics) -> None:
    port = metrics.start_http("127.0.0.1", 0)
    assert port > 0 and metrics.http_port == port
    obs = metrics.observer("digits", "1")
    for _ in range(3):
        obs.on_batch(4, 2, 0.0003)
    for _ in range(6):
        obs.on_request_done(0.0002, "ok")
    obs.on_queue_depth(5)
    obs.on_queue_depth(2)

    s = _fetch(port)
    assert _get(s, "bnserve_inference_count_total", **MV) == 12
    assert _get(s, "bnserve_execution_count_total", **MV) == 3
    assert _get(s, "bnserve_batch_size_count", **MV) == 3
    assert _get(s, "bnserve_batch_size_sum", **MV) == 12
    assert _get(s, "bnserve_batch_size_bucket", **MV, le="2.0") == 0
    assert _get(s, "bnserve_batch_size_bucket", **MV, le="4.0") == 3
    assert _get(s, "bnserve_batch_size_bucket", **MV, le="256.0") == 3
    assert _get(s, "bnserve_batch_size_bucket", **MV, le="+Inf") == 3
    assert _get(s, "bnserve_batch_requests_count", **MV) == 3
    assert _get(s, "bnserve_batch_requests_sum", **MV) == 6
    assert _get(s, "bnserve_compute_duration_seconds_count", **MV) == 3
    assert _get(s, "bnserve_compute_duration_seconds_sum", **MV) == pytest.approx(0.0009)
    # 300 us: above the 250 us bucket, inside the 500 us one.
    assert _get(s, "bnserve_compute_duration_seconds_bucket", **MV, le="0.00025") == 0
    assert _get(s, "bnserve_compute_duration_seconds_bucket", **MV, le="0.0005") == 3
    assert _get(s, "bnserve_queue_duration_seconds_count", **MV) == 6
    assert _get(s, "bnserve_queue_depth", **MV) == 2
    # Batch-size buckets are 1, 2, 4, ..., 256.
    les = sorted(
        float(dict(labels)["le"])
        for (name, labels) in s
        if name == "bnserve_batch_size_bucket" and dict(labels)["model"] == "digits"
    )
    assert les == [1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")]

    # A second scrape sees the increments since the first, exactly.
    obs.on_batch(1, 1, 0.0001)
    s = _fetch(port)
    assert _get(s, "bnserve_inference_count_total", **MV) == 13
    assert _get(s, "bnserve_execution_count_total", **MV) == 4
    assert _get(s, "bnserve_batch_size_bucket", **MV, le="1.0") == 1


def test_overloaded_requests_are_not_queue_time(metrics: Metrics) -> None:
    obs = metrics.observer("digits", "1")
    obs.on_request_done(0.0, "overloaded")
    for outcome in ("ok", "error", "deadline", "cancelled", "shutdown"):
        obs.on_request_done(0.001, outcome)
    assert metrics.snapshot("bnserve_queue_duration_seconds_count", **MV) == 5


def test_request_done_success_and_failure(metrics: Metrics) -> None:
    port = metrics.start_http("127.0.0.1", 0)
    for _ in range(5):
        metrics.request_done("digits", "1", "OK", 0.002)
    metrics.request_done("digits", "1", "INVALID_ARGUMENT", 0.0001)
    metrics.request_done("digits", "1", "INVALID_ARGUMENT", 0.0001)
    metrics.request_done("digits", "1", "DEADLINE_EXCEEDED", 0.5)
    metrics.request_done("nope", "", "NOT_FOUND", 0.00005)

    s = _fetch(port)
    assert _get(s, "bnserve_request_success_total", **MV) == 5
    assert _get(s, "bnserve_request_failure_total", **MV, code="INVALID_ARGUMENT") == 2
    assert _get(s, "bnserve_request_failure_total", **MV, code="DEADLINE_EXCEEDED") == 1
    assert ("bnserve_request_failure_total", frozenset({*MV.items(), ("code", "OK")})) not in s
    assert _get(s, "bnserve_request_failure_total", model="nope", version="", code="NOT_FOUND") == 1
    assert _get(s, "bnserve_request_duration_seconds_count", **MV) == 8
    assert _get(s, "bnserve_request_duration_seconds_sum", **MV) == pytest.approx(0.5102)
    assert _get(s, "bnserve_request_duration_seconds_count", model="nope", version="") == 1
    # An unknown model gets request series only: no batch or readiness series.
    nope = {(name, labels) for (name, labels) in s if ("model", "nope") in labels}
    assert {name for name, _ in nope} <= {
        "bnserve_request_success_total",
        "bnserve_request_success_created",
        "bnserve_request_failure_total",
        "bnserve_request_failure_created",
        "bnserve_request_duration_seconds_bucket",
        "bnserve_request_duration_seconds_count",
        "bnserve_request_duration_seconds_sum",
        "bnserve_request_duration_seconds_created",
    }
    # The same counts through snapshot().
    assert metrics.snapshot("bnserve_request_success_total", **MV) == 5
    assert metrics.snapshot("bnserve_request_failure_total", **MV, code="INVALID_ARGUMENT") == 2


def test_latency_buckets() -> None:
    assert LATENCY_BUCKETS[0] == pytest.approx(50e-6)
    assert LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    m = Metrics()
    m.request_done("digits", "1", "OK", 40e-6)
    m.request_done("digits", "1", "OK", 20.0)
    b = "bnserve_request_duration_seconds_bucket"
    assert m.snapshot(b, **MV, le="5e-05") == 1
    assert m.snapshot(b, **MV, le="10.0") == 1
    assert m.snapshot(b, **MV, le="+Inf") == 2


def test_inflight_ready_and_load_failures(metrics: Metrics) -> None:
    port = metrics.start_http("127.0.0.1", 0)
    metrics.inflight_inc()
    metrics.inflight_inc()
    with metrics.inflight():
        assert metrics.snapshot("bnserve_inflight_requests") == 3
    metrics.inflight_dec()
    with pytest.raises(RuntimeError), metrics.inflight():
        raise RuntimeError("the block failed")
    metrics.set_ready("digits", "1", True)
    metrics.set_ready("digits", "2", True)
    metrics.set_ready("digits", "2", False)
    metrics.load_failure("broken")
    metrics.load_failure("broken")

    s = _fetch(port)
    assert _get(s, "bnserve_inflight_requests") == 1
    assert _get(s, "bnserve_model_ready", **MV) == 1
    assert _get(s, "bnserve_model_ready", model="digits", version="2") == 0
    assert _get(s, "bnserve_model_load_failures_total", model="broken") == 2


def test_remove_drops_a_version(metrics: Metrics) -> None:
    obs = metrics.observer("digits", "1")
    obs.on_batch(2, 1, 0.001)
    metrics.request_done("digits", "1", "OK", 0.001)
    metrics.request_done("digits", "1", "INTERNAL", 0.001)
    metrics.set_ready("digits", "1", True)
    metrics.observer("digits", "2").on_batch(3, 1, 0.001)

    metrics.remove("digits", "1")
    text = metrics.render().decode()
    assert 'version="1"' not in text
    assert metrics.snapshot("bnserve_execution_count_total", model="digits", version="2") == 1
    # A reloaded version starts again from zero.
    metrics.observer("digits", "1").on_batch(1, 1, 0.001)
    metrics.request_done("digits", "1", "INTERNAL", 0.001)
    assert metrics.snapshot("bnserve_inference_count_total", **MV) == 1
    assert metrics.snapshot("bnserve_request_failure_total", **MV, code="INTERNAL") == 1
    assert metrics.snapshot("bnserve_request_success_total", **MV) == 0


def test_snapshot_unknown_series_and_names() -> None:
    m = Metrics()
    assert m.snapshot("bnserve_inference_count_total", model="x", version="1") == 0.0
    assert m.snapshot("bnserve_inflight_requests") == 0.0
    with pytest.raises(KeyError):
        m.snapshot("bnserve_no_such_metric")
    with pytest.raises(KeyError):
        m.snapshot("bnserve_queue_depth_total", model="x", version="1")  # gauges have no _total


def test_two_instances_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    try:
        pa, pb = a.start_http("127.0.0.1", 0), b.start_http("127.0.0.1", 0)
        assert pa != pb
        a.observer("digits", "1").on_batch(4, 1, 0.001)
        a.request_done("digits", "1", "OK", 0.001)
        b.observer("digits", "1").on_batch(8, 2, 0.001)
        sa, sb = _fetch(pa), _fetch(pb)
        assert _get(sa, "bnserve_inference_count_total", **MV) == 4
        assert _get(sb, "bnserve_inference_count_total", **MV) == 8
        assert _get(sa, "bnserve_request_success_total", **MV) == 1
        assert ("bnserve_request_success_total", frozenset(MV.items())) not in sb
    finally:
        a.stop_http()
        b.stop_http()


def test_render_is_prometheus_text() -> None:
    m = Metrics()
    m.observer("digits", "1").on_batch(4, 1, 0.001)
    s = _parse(m.render().decode())
    assert _get(s, "bnserve_execution_count_total", **MV) == 1
    names = {f.name for f in text_string_to_metric_families(m.render().decode())}
    assert {
        "bnserve_request_success",
        "bnserve_request_failure",
        "bnserve_inference_count",
        "bnserve_execution_count",
        "bnserve_batch_size",
        "bnserve_batch_requests",
        "bnserve_queue_duration_seconds",
        "bnserve_compute_duration_seconds",
        "bnserve_request_duration_seconds",
        "bnserve_inflight_requests",
        "bnserve_queue_depth",
        "bnserve_model_load_failures",
        "bnserve_model_ready",
    } <= names


def _bind_listener(port: int) -> None:
    """Listen on 127.0.0.1:port and close. SO_REUSEADDR as the HTTP server itself uses: the
    scrape's TIME_WAIT connection does not count, a live listener does (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_stop_http_frees_the_port() -> None:
    m = Metrics()
    port = m.start_http("127.0.0.1", 0)
    assert _get(_fetch(port), "bnserve_inflight_requests") == 0
    with pytest.raises(RuntimeError):
        m.start_http("127.0.0.1", 0)
    with pytest.raises(OSError):
        _bind_listener(port)  # still serving
    m.stop_http()
    assert m.http_port is None
    m.stop_http()  # idempotent
    with pytest.raises(OSError):
        _fetch(port)
    _bind_listener(port)  # free again
    assert m.start_http("127.0.0.1", port) == port
    try:
        assert _get(_fetch(port), "bnserve_inflight_requests") == 0
    finally:
        m.stop_http()


def test_port_in_use_raises() -> None:
    a, b = Metrics(), Metrics()
    port = a.start_http("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            b.start_http("127.0.0.1", port)
        assert b.http_port is None
    finally:
        a.stop_http()


def test_real_batcher_drives_the_observer(tmp_path: Path) -> None:
    """The observer fits Batcher's protocol: three sequential 4-row requests = 3 runs."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)

    m = Metrics()
    pool = SessionPool(path, 1)

    async def main() -> None:
        batcher = Batcher(pool, max_batch_size=8, observer=m.observer("relu", "1"))
        try:
            for _ in range(3):
                out = await batcher.submit({"x": np.ones((4, 3), np.float32)})
                assert out["y"].shape == (4, 3)
        finally:
            await batcher.close(grace=5.0)

    try:
        asyncio.run(main())
    finally:
        pool.close()
    mv = {"model": "relu", "version": "1"}
    assert m.snapshot("bnserve_inference_count_total", **mv) == 12
    assert m.snapshot("bnserve_execution_count_total", **mv) == 3
    assert m.snapshot("bnserve_batch_size_count", **mv) == 3
    assert m.snapshot("bnserve_batch_size_sum", **mv) == 12
    assert m.snapshot("bnserve_batch_requests_sum", **mv) == 3
    assert m.snapshot("bnserve_queue_duration_seconds_count", **mv) == 3
    assert m.snapshot("bnserve_compute_duration_seconds_count", **mv) == 3
    assert m.snapshot("bnserve_queue_depth", **mv) == 0
