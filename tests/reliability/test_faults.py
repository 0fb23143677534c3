"""Faults: clients vanishing mid-stream, cancelled calls, deadlines expiring in the queue, broken
model files (at start and at hot reload), SIGTERM under load (a real `bnserve serve` process).

Every wait is bounded (polling with a deadline); nothing sleeps for a fixed time to let the
server "settle".
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_helpers import (
    BROKEN_KINDS,
    BUNDLED,
    broken_model_bytes,
    copy_model,
    infer_request,
    logits_of,
    reference_pool,
    wait_for,
    write_atomically,
)

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.model import SessionPool
from bnserve.server.process import ServerProcess

pytestmark = pytest.mark.timeout(180)

VOL = (1, 32, 32, 32)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """digits and vol3d, one session each (vol3d is slow: requests really queue)."""
    repo = tmp_path_factory.mktemp("faults")
    copy_model(repo, "digits")
    copy_model(repo, "vol3d")
    s = Settings(repo=repo, host="127.0.0.1", port=0, metrics_port=-1, instances=1, grace=5)
    with serve_in_thread(s) as running:
        yield running


@pytest.fixture(scope="module")
def digits_ref() -> Iterator[SessionPool]:
    yield from reference_pool("digits")


def _inflight_zero(app: App) -> None:
    wait_for(lambda: app.state.inflight == 0, 30, "server in-flight count back to 0")
    wait_for(
        lambda: app.metrics.snapshot("bnserve_inflight_requests") == 0,
        30,
        "bnserve_inflight_requests gauge back to 0",
    )
    for model in ("digits", "vol3d"):
        batcher = app.repository.get(model).batcher
        wait_for(lambda b=batcher: b.queue_depth == 0, 30, f"{model} queue empty")
        # A batch whose requests were all cancelled still runs to its end (onnxruntime cannot
        # be interrupted): the session is busy although nothing is in flight any more.
        wait_for(lambda b=batcher: b.in_flight == 0, 30, f"{model} sessions idle")


def _serves_correctly(port: int, ref: SessionPool, rid: str = "check") -> None:
    x = np.random.default_rng(11).random((3, 1, 8, 8), dtype=np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            infer_request(x, request_id=rid), timeout=30
        )
    assert resp.id == rid
    assert logits_of(resp).tobytes() == ref.run({"input": x})["logits"].tobytes()


# ---------------------------------------------------------------------------------- clients


def test_100_clients_disconnect_mid_stream(app: App, digits_ref: SessionPool) -> None:
    n_clients, per_client = 100, 3
    hold = threading.Event()  # keeps every request stream open until the channels are gone
    x = np.zeros((2, *VOL), np.float32)

    def requests(c: int) -> Iterator[pb.ModelInferRequest]:
        for i in range(per_client):
            yield infer_request(x, model="vol3d", request_id=f"c{c}-{i}")
        hold.wait(60)

    channels = [grpc.insecure_channel(f"127.0.0.1:{app.port}") for _ in range(n_clients)]
    calls = []
    accepted0 = app.state.accepted
    try:
        for c, ch in enumerate(channels):
            calls.append(pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(c)))
        # Mid-stream for real: the server has taken a good share of the requests (a monotonic
        # count: "in flight >= n" may never hold when the server answers as fast as they come).
        wait_for(
            lambda: app.state.accepted - accepted0 >= n_clients, 60, "stream requests accepted"
        )
        inflight_at_close = app.state.inflight
        for ch in channels:
            ch.close()  # abrupt: no half-close, responses unread
    finally:
        hold.set()
        for ch in channels:
            ch.close()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
    _inflight_zero(app)
    _serves_correctly(app.port, digits_ref, "after-disconnects")
    print(f"\ndisconnect: {n_clients} streams closed with {inflight_at_close} requests in flight")


def test_cancelled_unary_calls(app: App, digits_ref: SessionPool) -> None:
    x = np.zeros((8, *VOL), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        futures = [
            stub.ModelInfer.future(infer_request(x, model="vol3d", request_id=str(i)), 60)
            for i in range(20)
        ]
        wait_for(lambda: app.state.inflight >= 10, 30, "calls reached the server")
        for f in futures:
            f.cancel()
        for f in futures:
            assert f.cancelled() or f.exception(timeout=30) is None
    _inflight_zero(app)
    assert _outcomes(app, "vol3d", "CANCELLED") >= 1
    _serves_correctly(app.port, digits_ref, "after-cancel")


def _outcomes(app: App, model: str, code: str, versions: tuple[str, ...] = ("", "1")) -> float:
    """Requests of `model` that ended with `code` ("OK" = success), summed over versions."""
    total = 0.0
    for v in versions:
        if code == "OK":
            total += app.metrics.snapshot("bnserve_request_success_total", model=model, version=v)
        else:
            total += app.metrics.snapshot(
                "bnserve_request_failure_total", model=model, version=v, code=code
            )
    return total


def test_cancelled_unary_call_is_counted_for_the_served_version(app: App) -> None:
    """ModelInfer's CancelledError branch accounts with model=None (the await of _infer never
    returned), so the CANCELLED failure lands on version "" and ModelStatistics misses it."""
    before = _outcomes(app, "vol3d", "CANCELLED", versions=("1",))
    _inflight_zero(app)
    x = np.zeros((32, *VOL), np.float32)  # ~60 ms each on the one session: they pile up
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        futures = [stub.ModelInfer.future(infer_request(x, model="vol3d"), 60) for _ in range(4)]
        wait_for(lambda: app.state.inflight >= 3, 30, "calls reached the server")
        for f in futures:
            f.cancel()
    _inflight_zero(app)
    assert _outcomes(app, "vol3d", "CANCELLED", versions=("1",)) - before >= 1


def test_stream_requests_cancelled_by_disconnect_are_counted(app: App) -> None:
    """Every request a stream got accepted ends in exactly one outcome in the metrics; when
    the client disconnects, the cancelled ones must be counted CANCELLED (today: nothing)."""
    _inflight_zero(app)
    codes = ("OK", "CANCELLED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
    before = sum(_outcomes(app, "vol3d", c) for c in codes)
    hold = threading.Event()
    x = np.zeros((32, *VOL), np.float32)  # ~60 ms each on the one session: they pile up
    accepted0 = app.state.accepted

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(4):
            yield infer_request(x, model="vol3d", request_id=str(i))
        hold.wait(60)

    ch = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests())
        # all four accepted (a 32-row batch may finish before the 4th is read, so "in flight
        # >= 4" need not ever hold; the accepted counter is monotonic)
        wait_for(
            lambda: app.state.accepted - accepted0 >= 4, 30, "all four stream requests accepted"
        )
        ch.close()
    finally:
        hold.set()
        ch.close()
    with pytest.raises(grpc.RpcError):
        for _ in call:
            pass
    _inflight_zero(app)
    assert sum(_outcomes(app, "vol3d", c) for c in codes) - before == 4


def test_deadline_expires_in_queue_and_is_not_computed(app: App) -> None:
    """One 64-row vol3d batch holds the only session; requests queued behind it with a short
    deadline get DEADLINE_EXCEEDED and never run (rows and executions counted by the server)."""
    _inflight_zero(app)  # quiet: no batch left over from the tests before
    labels = {"model": "vol3d", "version": "1"}
    rows0 = app.metrics.snapshot("bnserve_inference_count_total", **labels)
    runs0 = app.metrics.snapshot("bnserve_execution_count_total", **labels)
    batcher = app.repository.get("vol3d").batcher
    blocker_x = np.zeros((64, *VOL), np.float32)
    small = np.ones((1, *VOL), np.float32)  # a different shape key: cannot join the blocker
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        blocker = stub.ModelInfer.future(infer_request(blocker_x, model="vol3d"), 60)
        wait_for(lambda: batcher.in_flight == 1, 30, "blocker computing")
        late = [
            stub.ModelInfer.future(infer_request(small, model="vol3d", request_id=str(i)), 0.03)
            for i in range(5)
        ]
        codes = [f.exception(timeout=30).code() for f in late]
        assert batcher.in_flight == 1, "the blocker must still be running: make it bigger"
        assert blocker.result(timeout=60).outputs[0].shape[0] == 64
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5
    wait_for(lambda: batcher.queue_depth == 0, 10)
    assert app.metrics.snapshot("bnserve_inference_count_total", **labels) - rows0 == 64
    assert app.metrics.snapshot("bnserve_execution_count_total", **labels) - runs0 == 1
    _inflight_zero(app)


# ---------------------------------------------------------------------------------- model files


def _index(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex]:
    resp = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): m for m in resp.models}


EXPECTED_REASON = {
    "truncated": "not a readable ONNX model",
    "corrupt": "not a readable ONNX model",
    "not_onnx": "not a readable ONNX model",
    "empty": "no graph",
    "bn_training": "training mode",
}


def test_broken_models_at_start_are_not_ready_and_others_serve(
    tmp_path: Path, digits_ref: SessionPool
) -> None:
    repo = tmp_path / "repo"
    copy_model(repo, "digits")
    for kind in BROKEN_KINDS:
        write_atomically(repo / kind / "1" / "model.onnx", broken_model_bytes(kind))
    s = Settings(repo=repo, host="127.0.0.1", port=0, metrics_port=-1, instances=1, grace=2)
    with serve_in_thread(s) as app, grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        index = _index(stub)
        assert index[("digits", "1")].state == "READY"
        for kind in BROKEN_KINDS:
            entry = index[(kind, "1")]
            assert entry.state == "UNAVAILABLE", (kind, entry)
            assert EXPECTED_REASON[kind] in entry.reason, (kind, entry.reason)
            assert not stub.ModelReady(pb.ModelReadyRequest(name=kind), timeout=10).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(infer_request(np.zeros((1, 4), np.float32), model=kind), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, kind
            assert err.value.details()
            status = health.Check(health_pb2.HealthCheckRequest(service=kind), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING, kind
            assert app.metrics.snapshot("bnserve_model_load_failures_total", model=kind) >= 1
        _serves_correctly(app.port, digits_ref, "beside-broken")


def test_broken_files_at_hot_reload_old_version_keeps_serving(
    tmp_path: Path, digits_ref: SessionPool
) -> None:
    repo = tmp_path / "repo"
    copy_model(repo, "digits")
    s = Settings(
        repo=repo, host="127.0.0.1", port=0, metrics_port=-1, instances=1, grace=2, poll=0.05
    )
    x = np.random.default_rng(5).random((4, 1, 8, 8), dtype=np.float32)
    want = digits_ref.run({"input": x})["logits"].tobytes()
    stop = threading.Event()
    served: Counter[str] = Counter()
    problems: list[str] = []

    with serve_in_thread(s) as app, grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        def traffic() -> None:  # keeps asking during every reload; must never fail
            end = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < end:
                try:
                    resp = stub.ModelInfer(infer_request(x), timeout=10)
                except grpc.RpcError as exc:
                    problems.append(f"{exc.code().name}: {exc.details()}")
                    continue
                served[resp.model_version] += 1
                if logits_of(resp).tobytes() != want:
                    problems.append(f"wrong answer from version {resp.model_version}")

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        try:
            failures0 = app.metrics.snapshot("bnserve_model_load_failures_total", model="digits")
            # A broken new version of each kind: refused, version 1 keeps serving.
            for i, kind in enumerate(BROKEN_KINDS, start=2):
                staging = tmp_path / f"staging{i}"
                write_atomically(staging / "model.onnx", broken_model_bytes(kind))
                staging.rename(repo / "digits" / str(i))  # the whole version dir at once

                def refused(v: str = str(i)) -> bool:
                    e = _index(stub).get(("digits", v))
                    return e is not None and e.state == "UNAVAILABLE" and bool(e.reason)

                wait_for(refused, 30, f"version {i} ({kind}) refused")
                assert EXPECTED_REASON[kind] in _index(stub)[("digits", str(i))].reason
                assert stub.ModelInfer(infer_request(x), timeout=10).model_version == "1"
            # The served file itself replaced by a broken one: the loaded sessions keep serving.
            write_atomically(repo / "digits" / "1" / "model.onnx", broken_model_bytes("truncated"))
            wait_for(
                lambda: (
                    app.metrics.snapshot("bnserve_model_load_failures_total", model="digits")
                    >= failures0 + len(BROKEN_KINDS) + 1
                ),
                30,
                "in-place replacement refused",
            )
            assert _index(stub)[("digits", "1")].state == "READY"
            n_before = sum(served.values())
            wait_for(lambda: sum(served.values()) >= n_before + 20, 30, "still serving")
        finally:
            stop.set()
            t.join(30)
    assert not problems, problems[:5]
    assert set(served) == {"1"} and sum(served.values()) > 0
    print(f"\nhot reload: {sum(served.values())} requests answered by version 1 during reloads")


# ---------------------------------------------------------------------------------- SIGTERM


def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy_model(repo, "digits")
    copy_model(repo, "vol3d")
    # --lame-duck 2: after the drain the port stays open 2 s more, refusing new calls with
    # UNAVAILABLE, so every client has had its refusal before grpc closes the port (a call
    # arriving during grpc's own stop would be CANCELLED by grpc, before bnserve sees it).
    server = ServerProcess(repo, "--instances", "1", "--grace", "20", "--lame-duck", "2")
    ref = SessionPool(str(BUNDLED / "vol3d" / "1" / "model.onnx"), instances=1)
    results: list[tuple[str, str, bool]] = []  # (id, code, answer right)
    details: dict[str, str] = {}
    lock = threading.Lock()
    answered = threading.Semaphore(0)
    rng = np.random.default_rng(9)
    xs = [rng.random((2, *VOL), dtype=np.float32) for _ in range(8)]
    wants = [ref.run({"input": x})["logits"].tobytes() for x in xs]
    target = f"127.0.0.1:{server.port}"

    def record(rid: str, code: str, ok: bool) -> None:
        with lock:
            results.append((rid, code, ok))
        answered.release()

    def unary_client(c: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for i in range(10_000):  # bounded; ends at the first refusal
                k = (c + i) % len(xs)
                rid = f"u{c}-{i}"
                try:
                    resp = stub.ModelInfer(
                        infer_request(xs[k], model="vol3d", request_id=rid), timeout=30
                    )
                except grpc.RpcError as exc:
                    record(rid, f"{exc.code().name}", False)
                    details[rid] = exc.details() or ""
                    return
                record(rid, "OK", resp.id == rid and logits_of(resp).tobytes() == wants[k])

    def stream_client(c: int) -> None:
        todo: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        sent: dict[str, int] = {}

        def gen() -> Iterator[pb.ModelInferRequest]:
            while (req := todo.get(timeout=60)) is not None:
                yield req

        def send(i: int) -> None:
            rid = f"s{c}-{i}"
            sent[rid] = i % len(xs)
            todo.put(infer_request(xs[i % len(xs)], model="vol3d", request_id=rid))

        for i in range(4):
            send(i)
        nxt, stopping = 4, False
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                for msg in stub.ModelStreamInfer(gen(), timeout=60):
                    rid = msg.infer_response.id
                    if msg.error_message:
                        code = msg.error_message.split("]")[0].strip("[")
                        record(rid, code, False)
                        if not stopping:
                            stopping = True
                            todo.put(None)  # half-close: the server answers what it has
                        continue
                    k = sent[rid]
                    record(rid, "OK", logits_of(msg.infer_response).tobytes() == wants[k])
                    if not stopping and nxt < 10_000:
                        send(nxt)
                        nxt += 1
            except grpc.RpcError as exc:
                record(f"s{c}-stream", exc.code().name, False)
                details[f"s{c}-stream"] = exc.details() or ""
            finally:
                todo.put(None)

    threads = [threading.Thread(target=unary_client, args=(c,)) for c in range(6)]
    threads += [threading.Thread(target=stream_client, args=(c,)) for c in range(2)]
    try:
        for t in threads:
            t.start()
        for _ in range(30):  # under load: 30 answers before the signal
            assert answered.acquire(timeout=60), "no load"
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(60)  # every client ends at its first refusal
        # a call made after the drain, during the lame duck: refused, not cancelled
        with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as late:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                infer_request(xs[0], model="vol3d", request_id="late"), timeout=10
            )
        assert time.monotonic() - signalled < 2, "the lame duck ended before the late call"
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE, late.value
        assert "shutting down" in (late.value.details() or "")
        rc = server.proc.wait(60)
        stop_s = time.monotonic() - signalled
        for t in threads:
            t.join(60)
            assert not t.is_alive()
    finally:
        server.kill()
        ref.close()
    log = "".join(server.log)
    assert rc == 0, log[-3000:]
    assert "stopped cleanly" in log, log[-3000:]
    codes = Counter(code for _, code, _ in results)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, (codes, details, log[-3000:])
    assert all(ok for _, code, ok in results if code == "OK"), "a wrong answer"
    ids = [rid for rid, code, _ in results if code == "OK"]
    assert len(ids) == len(set(ids)), "an id answered twice"
    assert stop_s >= 2, f"exited {stop_s:.2f} s after the signal, before the lame duck ended"
    print(f"\nsigterm: {dict(codes)}; exit {rc} {stop_s:.2f} s after the signal")
