"""SIGTERM under load, default settings (no lame duck): every call ends OK (answered right) or
UNAVAILABLE, none CANCELLED; nothing is lost or answered twice; the process exits 0."""

from __future__ import annotations

import queue
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import tritonclient.grpc as tc
from oip import BUNDLED, infer_request, logits_of

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.model import SessionPool
from bnserve.server.process import ServerProcess

CALLERS = 64
STREAMS, WINDOW = 8, 4  # open streams, requests in flight on each
MAX_SENDS = 5_000  # a bound on each caller's loop; the signal ends it much sooner
ANSWERS_BEFORE_SIGNAL = 200


class Ledger:
    """Every request sent, and how each ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        self.ended: list[tuple[str, str]] = []  # (request id, "OK" | "WRONG" | status name)
        self.details: dict[str, str] = {}
        self.answered = threading.Semaphore(0)

    def send(self, rid: str) -> None:
        with self.lock:
            self.sent.add(rid)

    def end(self, rid: str, code: str, detail: str = "") -> None:
        with self.lock:
            self.ended.append((rid, code))
            if detail:
                self.details[code] = detail
        self.answered.release()

    def check(self) -> Counter[str]:
        ids = [rid for rid, _ in self.ended]
        assert len(ids) == len(set(ids)), "a request ended twice"
        assert set(ids) == self.sent, f"lost: {sorted(self.sent - set(ids))[:10]}"
        codes = Counter(code for _, code in self.ended)
        assert set(codes) <= {"OK", "UNAVAILABLE"}, (codes, self.details)
        return codes


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(n)]


def _wants(xs: list[np.ndarray]) -> list[bytes]:
    pool = SessionPool(str(BUNDLED / "digits" / "1" / "model.onnx"), instances=1)
    try:
        return [pool.run({"input": x})["logits"].tobytes() for x in xs]
    finally:
        pool.close()


def _drain(server: ServerProcess, ledger: Ledger, threads: list[threading.Thread]) -> int:
    """Start the load, SIGTERM once it runs, wait for every caller and the exit code."""
    try:
        for t in threads:
            t.start()
        for _ in range(ANSWERS_BEFORE_SIGNAL):
            assert ledger.answered.acquire(timeout=60), "no load"
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
            assert not t.is_alive(), "a caller never ended"
        return server.proc.wait(60)
    finally:
        server.kill()


def test_sigterm_with_unary_calls_in_flight(frontend: str) -> None:
    """64 tritonclient callers, each sending again as soon as answered, until its first error."""
    server = ServerProcess(BUNDLED, "--frontend", frontend)
    xs = _inputs(16)
    wants = _wants(xs)
    ledger = Ledger()

    def caller(c: int) -> None:
        client = tc.InferenceServerClient(server.target)
        try:
            for i in range(MAX_SENDS):
                k = (c + i) % len(xs)
                rid = f"u{c}-{i}"
                inp = tc.InferInput("input", [1, 1, 8, 8], "FP32")
                inp.set_data_from_numpy(xs[k])
                ledger.send(rid)
                try:
                    result = client.infer("digits", [inp], request_id=rid, client_timeout=60)
                except tc.InferenceServerException as exc:
                    ledger.end(rid, (exc.status() or "").removeprefix("StatusCode."), str(exc))
                    return
                got = result.as_numpy("logits")
                right = result.get_response().id == rid and got.tobytes() == wants[k]
                ledger.end(rid, "OK" if right else "WRONG")
        finally:
            client.close()

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(CALLERS)]
    rc = _drain(server, ledger, threads)
    log = "".join(server.log)
    codes = ledger.check()
    assert codes["UNAVAILABLE"] == CALLERS, codes  # each caller ends at its refusal
    assert rc == 0 and "stopped cleanly" in log, log[-3000:]


def test_sigterm_with_open_streams(frontend: str) -> None:
    """8 streams with 4 requests in flight each, sending again as each answer comes; at the
    first error a stream half-closes. An answer's error or the stream's own status ends each
    request that was sent: OK, or UNAVAILABLE."""
    server = ServerProcess(BUNDLED, "--frontend", frontend)
    xs = _inputs(16)
    wants = _wants(xs)
    ledger = Ledger()

    def stream(c: int) -> None:
        todo: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        pending: dict[str, int] = {}

        def gen() -> Iterator[pb.ModelInferRequest]:
            while (req := todo.get(timeout=60)) is not None:
                yield req

        def send(i: int) -> None:
            rid = f"s{c}-{i}"
            pending[rid] = i % len(xs)
            ledger.send(rid)
            todo.put(infer_request(xs[i % len(xs)], request_id=rid))

        for i in range(WINDOW):
            send(i)
        nxt, closing = WINDOW, False
        with grpc.insecure_channel(server.target) as ch:
            try:
                for msg in pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(gen()):
                    rid = msg.infer_response.id
                    k = pending.pop(rid)
                    if msg.error_message:
                        code = msg.error_message.split("]")[0].strip("[")
                        ledger.end(rid, code, msg.error_message)
                        if not closing:
                            closing = True
                            todo.put(None)  # half-close: the server answers what it has
                        continue
                    right = logits_of(msg.infer_response).tobytes() == wants[k]
                    ledger.end(rid, "OK" if right else "WRONG")
                    if not closing and nxt < MAX_SENDS:
                        send(nxt)
                        nxt += 1
            except grpc.RpcError as exc:  # the stream's status ends what it had not answered
                for rid in list(pending):
                    ledger.end(rid, exc.code().name, exc.details() or "")
                pending.clear()
            finally:
                todo.put(None)
        assert not pending, "the stream ended OK with requests unanswered"

    threads = [threading.Thread(target=stream, args=(c,)) for c in range(STREAMS)]
    rc = _drain(server, ledger, threads)
    log = "".join(server.log)
    codes = ledger.check()
    assert codes["OK"] >= ANSWERS_BEFORE_SIGNAL, codes
    assert rc == 0 and "stopped cleanly" in log, log[-3000:]
