"""bnserve.client against real servers (serve_in_thread on 127.0.0.1, port 0): every datatype
round trip, ordered windowed streaming with per-batch errors, retries on UNAVAILABLE only,
round_robin over two servers, bearer token and TLS. No mocks."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnserve.client import (
    DATATYPES,
    AsyncInferenceClient,
    InferenceClient,
    InferenceError,
    StreamResult,
    TLSConfig,
)
from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}


def _identity_model(datatype: str, path: Path) -> None:
    """y = Identity(x) on (N, 3) of one datatype, N dynamic."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", t, ["N", 3])],
        [helper.make_tensor_value_info("y", t, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _identity_repo(root: Path, datatypes: list[str]) -> Path:
    for dt in datatypes:
        _identity_model(dt, root / f"id_{dt.lower()}" / "1" / "model.onnx")
        (root / f"id_{dt.lower()}" / "config.json").write_text('{"max_batch_size": 8}')
    return root


def _settings(repo: Path, port: int = 0) -> Settings:
    return Settings(repo=repo, host="127.0.0.1", port=port, metrics_port=-1, instances=1, grace=5)


def _wait_for(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    settings = Settings(
        repo=BUNDLED, host="127.0.0.1", port=0, metrics_port=-1, instances=2, grace=5
    )
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[InferenceClient]:
    with InferenceClient(target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def id_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    repo = _identity_repo(tmp_path_factory.mktemp("id_repo"), list(DATATYPES))
    with serve_in_thread(_settings(repo)) as running:
        yield running


@pytest.fixture(scope="module")
def id_client(id_app: App) -> Iterator[InferenceClient]:
    with InferenceClient(f"127.0.0.1:{id_app.port}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _identity_repo(tmp_path_factory.mktemp("small_repo"), ["FP32"])


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((200, 1, 8, 8), dtype=np.float32)


def _sample(datatype: str, rng: np.random.Generator, rows: int = 5) -> np.ndarray:
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.random((rows, 3)) > 0.5
    if dtype.kind == "f":
        return (rng.standard_normal((rows, 3)) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(rows, 3), dtype=dtype, endpoint=True)


# --------------------------------------------------------------------------------------------
# Unary


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_round_trip_every_datatype(id_client: InferenceClient, datatype: str) -> None:
    rng = np.random.default_rng(1)
    model = f"id_{datatype.lower()}"
    x = _sample(datatype, rng)
    assert id_client.metadata(model)["inputs"] == [
        {"name": "x", "datatype": datatype, "shape": [-1, 3]}
    ]
    y = id_client.infer(model, x)
    assert isinstance(y, np.ndarray)
    assert y.dtype == DATATYPES[datatype] and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    # Named input, named outputs: a name gives the array, a list gives a dict.
    y2 = id_client.infer(model, {"x": x}, "1", outputs="y", request_id="r1")
    np.testing.assert_array_equal(y2, x)
    d = id_client.infer(model, {"x": x}, outputs=["y"])
    assert isinstance(d, dict) and list(d) == ["y"]
    np.testing.assert_array_equal(d["y"], x)
    # A big-endian array goes out little-endian, as the protocol says.
    if DATATYPES[datatype].itemsize > 1:
        big = x.astype(x.dtype.newbyteorder(">"))
        np.testing.assert_array_equal(id_client.infer(model, big), x)


def test_round_trip_async(id_app: App) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(f"127.0.0.1:{id_app.port}", timeout=30) as c:
            assert await c.live() and await c.ready() and await c.ready("id_int16")
            rng = np.random.default_rng(2)
            for datatype in DATATYPES:
                x = _sample(datatype, rng)
                y = await c.infer(f"id_{datatype.lower()}", x)
                assert isinstance(y, np.ndarray) and y.dtype == DATATYPES[datatype]
                np.testing.assert_array_equal(y, x)
            cfg = await c.config("id_fp16")
            assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3]

    asyncio.run(main())


def test_metadata_config_health(client: InferenceClient) -> None:
    assert client.live() and client.ready() and client.ready("digits")
    assert client.ready("no_such_model") is False
    meta = client.metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    cfg = client.config("digits")
    assert cfg["max_batch_size"] == 64
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["input"][0]["dims"] == [1, 8, 8]
    with pytest.raises(InferenceError) as e:
        client.metadata("no_such_model")
    assert e.value.code == "NOT_FOUND" and e.value.attempts == 1


def test_errors_carry_code_and_message(client: InferenceClient) -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(InferenceError) as e:
        client.infer("digits", x.astype(np.float64))
    assert e.value.code == "INVALID_ARGUMENT" and "FP64" in e.value.message
    with pytest.raises(InferenceError) as e:
        client.infer("digits", np.zeros((2, 1, 8, 8), np.complex64))
    assert e.value.code == "INVALID_ARGUMENT" and "complex64" in e.value.message
    with pytest.raises(InferenceError) as e:
        client.infer("nope", {"input": x})
    assert e.value.code == "NOT_FOUND"


# --------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.timeout(180)
def test_stream_keeps_order_over_10000_batches(id_client: InferenceClient) -> None:
    n = 10_000
    batches = (np.full((1, 3), i, np.int64) for i in range(n))
    started = time.perf_counter()
    stream = id_client.stream("id_int64", batches, window=64)
    _wait_filled(stream, 64)
    seen = 0
    for i, y in enumerate(stream):
        assert isinstance(y, np.ndarray)
        assert y.shape == (1, 3) and int(y[0, 0]) == i, (i, y)
        seen += 1
    elapsed = time.perf_counter() - started
    assert seen == n
    assert stream.max_in_flight == 64
    print(
        f"\n10,000 batches in {elapsed:.2f} s ({n / elapsed:.0f}/s), window 64; "
        f"{stream.out_of_order} responses arrived out of order and were reordered"
    )


@pytest.mark.timeout(180)
def test_stream_reorders_out_of_order_responses(client: InferenceClient) -> None:
    """Mixed batch sizes on a model with two sessions: big batches finish after small ones sent
    later, so responses really do arrive out of order; the caller still sees them in order."""
    rng = np.random.default_rng(3)
    sizes = [64, 1, 1, 1, 33, 1]
    batches = [rng.random((sizes[i % len(sizes)], 1, 8, 8), dtype=np.float32) for i in range(600)]
    reference = [np.asarray(client.infer("digits", b)) for b in batches]
    stream = client.stream("digits", batches, window=32)
    n = 0
    for i, y in enumerate(stream):
        np.testing.assert_allclose(np.asarray(y), reference[i], rtol=1e-5, atol=1e-5)
        n += 1
    assert n == len(batches)
    print(f"\ndigits, 600 mixed-size batches: {stream.out_of_order} arrived out of order")
    assert stream.out_of_order > 0, "no response arrived out of order: reordering not exercised"


def _wait_filled(stream: object, window: int, timeout: float = 30.0) -> None:
    """The stream sends as soon as it exists and a batch keeps its slot until the caller asks
    for the next result: before the caller reads anything, the sender must fill the window
    exactly (and never pass it), however fast the server answers. Polled, bounded."""
    deadline = time.monotonic() + timeout
    while stream.max_in_flight < window:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"window {window} never filled"
        time.sleep(0.005)


def _outstanding(client: InferenceClient, window: int, n: int = 300) -> tuple[int, int]:
    """Stream n batches; return the most batches outstanding (taken from the iterable, not yet
    handed to the caller) as the caller measures it, and the stream's own figure."""
    counts = {"pulled": 0, "received": 0}
    outstanding: list[int] = []

    def batches() -> Iterator[np.ndarray]:
        for i in range(n):
            counts["pulled"] += 1
            outstanding.append(counts["pulled"] - counts["received"])
            yield np.full((2, 3), i, np.float32)

    stream = client.stream("id_fp32", batches(), window=window)
    _wait_filled(stream, window)
    for i, y in enumerate(stream):
        assert float(np.asarray(y)[0, 0]) == i
        counts["received"] += 1
    assert counts["received"] == n
    return max(outstanding), stream.max_in_flight


def test_stream_window_bound(id_client: InferenceClient) -> None:
    for window in (1, 4, 16):
        measured, reported = _outstanding(id_client, window)
        print(f"\nwindow {window}: max outstanding measured by the caller {measured}")
        assert measured <= window
        assert reported == window  # the window was actually filled


def test_stream_bad_batch_raises_for_that_batch_only(
    client: InferenceClient, digits_x: np.ndarray
) -> None:
    reference = np.asarray(client.infer("digits", digits_x[:64]))
    reference = np.concatenate([reference, np.asarray(client.infer("digits", digits_x[64:100]))])
    bad = {
        37: np.zeros((1, 1, 7, 7), np.float32),  # wrong shape: refused by the server
        58: digits_x[58:59].astype(np.float64),  # wrong datatype: refused by the server
        80: np.zeros((1, 1, 8, 8), np.complex64),  # not encodable: refused by the client
    }
    batches = [bad.get(i, digits_x[i : i + 1]) for i in range(100)]

    # Style 1: iterate; a failed batch raises at its position and the stream goes on.
    stream = client.stream("digits", batches, window=8)
    got: dict[int, np.ndarray] = {}
    errors: dict[int, InferenceError] = {}
    i = 0
    while True:
        try:
            y = next(stream)
        except StopIteration:
            break
        except InferenceError as err:
            errors[i] = err
        else:
            got[i] = np.asarray(y)
        i += 1
    assert sorted(errors) == [37, 58, 80]
    assert all(e.code == "INVALID_ARGUMENT" and e.index == k for k, e in errors.items())
    assert "FP64" in errors[58].message
    assert len(got) == 97
    for k, y in got.items():
        np.testing.assert_allclose(y[0], reference[k], rtol=1e-5, atol=1e-5)

    # Style 2: StreamResult objects, never raising for one batch.
    results: list[StreamResult] = list(client.stream("digits", batches, window=3).results())
    assert [r.index for r in results] == list(range(100))
    assert [r.index for r in results if not r.ok] == [37, 58, 80]
    with pytest.raises(InferenceError):
        results[37].result()
    np.testing.assert_allclose(np.asarray(results[99].result())[0], reference[99], rtol=1e-5)


def test_stream_source_error_and_close(id_client: InferenceClient) -> None:
    def failing() -> Iterator[np.ndarray]:
        for i in range(5):
            yield np.full((1, 3), i, np.float32)
        raise KeyError("source broke")

    stream = id_client.stream("id_fp32", failing(), window=2)
    got = []
    with pytest.raises(KeyError):
        for y in stream:
            got.append(float(np.asarray(y)[0, 0]))
    assert got == [0, 1, 2, 3, 4]

    # Closing early cancels the call; iteration stops.
    endless = (np.zeros((1, 3), np.float32) for _ in iter(int, 1))
    with id_client.stream("id_fp32", endless, window=4) as s:
        for k, _ in enumerate(s):
            if k == 10:
                break
    assert list(s) == []


def test_stream_async(id_app: App, digits_x: np.ndarray) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(f"127.0.0.1:{id_app.port}", timeout=30) as c:

            async def batches() -> Any:
                for i in range(2000):
                    if i == 500:
                        yield np.zeros((1, 4), np.int32)  # wrong shape
                    else:
                        yield np.full((1, 3), i, np.int32)

            stream = c.stream("id_int32", batches(), window=8)
            values: list[int] = []
            failed: list[int] = []
            async for r in stream.results():
                if r.ok:
                    values.append(int(np.asarray(r.result())[0, 0]))
                else:
                    assert r.error is not None and r.error.code == "INVALID_ARGUMENT"
                    failed.append(r.index)
            assert failed == [500]
            assert values == [i for i in range(2000) if i != 500]
            assert stream.max_in_flight <= 8

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# Retries


def _failures(app: App, code: str, model: str = "digits", version: str = "") -> float:
    return app.metrics.snapshot(
        "bnserve_request_failure_total", model=model, version=version, code=code
    )


def test_unavailable_is_retried_bounded_and_nothing_else(app: App, target: str) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    with InferenceClient(target, timeout=30, retries=3, backoff=0.01) as c:
        c.infer("digits", x)  # metadata cached, channel connected
        before = _failures(app, "UNAVAILABLE")
        app.state.accepting = False  # the server drains: every request is UNAVAILABLE
        try:
            with pytest.raises(InferenceError) as e:
                c.infer("digits", x)
        finally:
            app.state.accepting = True
        assert e.value.code == "UNAVAILABLE" and e.value.attempts == 4
        assert _failures(app, "UNAVAILABLE") - before == 4  # 1 + 3 retries reached the server

        before = _failures(app, "INVALID_ARGUMENT", version="1")
        with pytest.raises(InferenceError) as e:
            c.infer("digits", x.astype(np.float64))
        assert e.value.code == "INVALID_ARGUMENT" and e.value.attempts == 1
        assert _failures(app, "INVALID_ARGUMENT", version="1") - before == 1  # not retried


def test_retries_respect_the_deadline(app: App, target: str) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    with InferenceClient(target, timeout=0.5, retries=1000, backoff=0.05, max_backoff=0.1) as c:
        c.infer("digits", x)
        app.state.accepting = False
        try:
            started = time.monotonic()
            with pytest.raises(InferenceError) as e:
                c.infer("digits", x)
            elapsed = time.monotonic() - started
        finally:
            app.state.accepting = True
    assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert 1 < e.value.attempts < 1000
    assert elapsed < 1.5, elapsed


def test_retry_succeeds_once_the_server_accepts_again(app: App, target: str) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    with InferenceClient(target, timeout=30, retries=200, backoff=0.01, max_backoff=0.05) as c:
        c.infer("digits", x)
        before = _failures(app, "UNAVAILABLE")
        app.state.accepting = False
        box: dict[str, Any] = {}
        try:
            thread = threading.Thread(
                target=lambda: box.setdefault("y", c.infer("digits", x)), daemon=True
            )
            thread.start()
            _wait_for(lambda: _failures(app, "UNAVAILABLE") - before >= 3, what="3 refusals")
        finally:
            app.state.accepting = True
        thread.join(timeout=30)
    assert np.asarray(box["y"]).shape == (1, 10)


def test_retry_reaches_a_server_that_starts_late(small_repo: Path) -> None:
    port = _free_port()
    x = np.zeros((1, 3), np.float32)
    # Nothing listening: UNAVAILABLE, retried exactly `retries` times.
    with InferenceClient(f"127.0.0.1:{port}", timeout=10, retries=2, backoff=0.01) as c:
        with pytest.raises(InferenceError) as e:
            c.infer("id_fp32", {"x": x})
        assert e.value.code == "UNAVAILABLE" and e.value.attempts == 3
        assert c.live() is False and c.ready() is False
    # A call that is retrying when the server comes up gets through.
    with InferenceClient(
        f"127.0.0.1:{port}", timeout=60, retries=500, backoff=0.02, max_backoff=0.1
    ) as c:
        box: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: box.setdefault("y", c.infer("id_fp32", {"x": x})), daemon=True
        )
        thread.start()
        time.sleep(0.3)  # let a few attempts fail against the closed port first
        assert thread.is_alive()
        with serve_in_thread(_settings(small_repo, port)):
            thread.join(timeout=60)
            assert not thread.is_alive()
    np.testing.assert_array_equal(box["y"], x)


# --------------------------------------------------------------------------------------------
# Load balancing, token, TLS


def _successes(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name="id_fp32"), timeout=10
        )
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_round_robin_spreads_requests(small_repo: Path) -> None:
    x = np.ones((1, 3), np.float32)
    with serve_in_thread(_settings(small_repo)) as a, serve_in_thread(_settings(small_repo)) as b:
        with InferenceClient([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], timeout=30) as c:
            assert c.target == f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
            for _ in range(100):
                np.testing.assert_array_equal(c.infer("id_fp32", {"x": x}), x)
        counts = (_successes(a.port), _successes(b.port))
    print(f"\nround_robin over 2 servers, 100 requests: {counts[0]} / {counts[1]}")
    assert sum(counts) == 100
    assert min(counts) >= 30, counts


class _Recorder:
    """A plain gRPC server answering ServerLive, recording each call's metadata."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.metadata: list[dict[str, str]] = []

        def live(request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> Any:
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
            return pb.ServerLiveResponse(live=True)

        handler = grpc.unary_unary_rpc_method_handler(
            live,
            request_deserializer=pb.ServerLiveRequest.FromString,
            response_serializer=pb.ServerLiveResponse.SerializeToString,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "inference.GRPCInferenceService", {"ServerLive": handler}
                ),
            )
        )
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


def test_bearer_token_is_sent() -> None:
    rec = _Recorder()
    try:
        with InferenceClient(f"127.0.0.1:{rec.port}", token="s3cret", timeout=10) as c:
            assert c.live()
        assert rec.metadata[-1]["authorization"] == "Bearer s3cret"
    finally:
        rec.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path: Path) -> None:
    d = tmp_path
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=bnserve test CA", cwd=d,
    )  # fmt: skip
    for name, san in (("server", "DNS:bnserve.test,IP:127.0.0.1"), ("client", "DNS:client")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
            cwd=d,
        )  # fmt: skip
    creds = grpc.ssl_server_credentials(
        [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
        root_certificates=(d / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    rec = _Recorder(creds)
    try:
        tls = TLSConfig(
            ca=d / "ca.pem", cert=d / "client.pem", key=d / "client.key", server_name="bnserve.test"
        )
        with InferenceClient(f"127.0.0.1:{rec.port}", tls=tls, token="t", timeout=10) as c:
            assert c.live()
        assert rec.metadata[-1]["authorization"] == "Bearer t"
        # Without a client certificate the handshake fails: the probe says not live.
        no_cert = TLSConfig(ca=d / "ca.pem", server_name="bnserve.test")
        with InferenceClient(f"127.0.0.1:{rec.port}", tls=no_cert, timeout=5, retries=0) as c:
            assert c.live() is False
        with pytest.raises(ValueError):
            TLSConfig(cert=d / "client.pem").credentials()
    finally:
        rec.stop()


def test_stream_to_a_dead_server_fails_each_sent_batch() -> None:
    port = _free_port()
    batches = [np.zeros((1, 3), np.float32) for _ in range(5)]
    with InferenceClient(f"127.0.0.1:{port}", timeout=10) as c:
        results = list(c.stream("id_fp32", batches, window=2).results())
    assert 1 <= len(results) <= 5
    assert [r.index for r in results] == list(range(len(results)))
    assert all(r.error is not None and r.error.code == "UNAVAILABLE" for r in results)

    async def main() -> list[StreamResult]:
        async with AsyncInferenceClient(f"127.0.0.1:{port}", timeout=10) as ac:
            return [r async for r in ac.stream("id_fp32", batches, window=2).results()]

    aresults = asyncio.run(main())
    assert 1 <= len(aresults) <= 5
    assert all(r.error is not None and r.error.code == "UNAVAILABLE" for r in aresults)


def test_stream_batch_that_cannot_be_encoded(id_client: InferenceClient) -> None:
    batches: list[Any] = [np.zeros((1, 3), np.float32), {"x": object()}, np.ones((1, 3), "f4")]
    results = list(id_client.stream("id_fp32", batches).results())
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and results[1].error.code == "INVALID_ARGUMENT"


@pytest.mark.timeout(60)
def test_stream_deadline_ends_an_endless_stream(id_client: InferenceClient) -> None:
    endless = (np.full((1, 3), i, np.float32) for i in itertools.count())
    results = list(id_client.stream("id_fp32", endless, window=8, timeout=0.5).results())
    assert [r.index for r in results] == list(range(len(results)))
    ok = [r for r in results if r.ok]
    assert ok and all(float(np.asarray(r.result())[0, 0]) == r.index for r in ok)
    # Batches the server could not finish in time fail in-band, the rest when the RPC ends;
    # the stream's last outcome is the deadline.
    failed = [r for r in results if not r.ok]
    assert failed and all(r.error and r.error.code == "DEADLINE_EXCEEDED" for r in failed)
    assert not results[-1].ok
