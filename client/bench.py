"""`bnserve bench`: a load tester for any Open Inference Protocol (KServe V2) gRPC server.

Python API: ``run_bench(BenchConfig(targets=("127.0.0.1:8001",), model="digits")) ->
BenchResult`` (``bench(config)`` is the same as a coroutine, for callers already on a loop).

Load models
-----------
* closed loop (``concurrency=N``, the default with N=1): N workers, each with exactly one
  request in flight; a worker sends its next request as soon as the previous one completes.
  A request's latency runs from its actual send time.
* open loop (``rate=R``): send times are laid out in advance, ``i / R`` seconds after the start,
  independently of the responses. A request's latency runs from its *scheduled* send time, so
  time spent waiting in the client (a late event loop, the in-flight cap) is not hidden
  (no coordinated omission). At most ``max_inflight`` requests are in flight (generous: 10 000).

Window and accounting
---------------------
The run is ``[start, start + warmup)`` (warm-up, not counted) followed by the measured window
``[start + warmup, start + warmup + duration)``. A request *belongs to the window* when it was
sent (closed loop) or scheduled (open loop) inside it; it is counted exactly once, when it
completes, as a success or as an error with its status code -- also when it completes after the
window has ended. So ``requests == ok + errors`` and every request sent in the window is in
``requests``. Requests sent during the warm-up are tallied apart (``warmup_requests``,
``warmup_ok``): the server's own success counter grows by exactly ``ok + warmup_ok``.

Every request has a deadline ``timeout`` seconds after its start (actual send time in closed
loop, scheduled time in open loop): gRPC's deadline in unary mode, the client's own in stream
mode (an answer arriving later is DEADLINE_EXCEEDED; it is counted in ``late_responses``).
Closed loop: no request is sent at or after the end of the window. Open loop: nothing is
scheduled at or after the end of the window; a request scheduled inside it is sent even when
the client runs late, unless its deadline has passed before it could be sent (the client is
``timeout`` behind, or the in-flight cap stayed full): then it is counted as the error
``NOT_SENT``. After the last send, requests in flight get until their deadline plus a second of
slack; one still unanswered then is cancelled and counted as ``CANCELLED`` (a healthy run has
none). Client-side failures other than gRPC statuses are ``CLIENT_ERROR``. So a run ends at
most ``timeout + 1 s`` after its window (plus a bounded stream shutdown).

Figures: ``throughput_rps = requests / duration``, ``ok_rps = ok / duration``,
``samples_per_s = ok * rows / duration`` (rows = ``batch`` for a batched model); latency
percentiles over the successful requests of the window (``None`` when there are none). In a
steady state the requests sent before the window but finished inside it balance those sent
inside but finished after it. Open loop also reports the achieved send rate
(``send_rate_rps``: requests of the window sent, divided by the time from the window's start
to its last send, at least ``duration``) and the send lag (actual minus scheduled send time).

Retries (``retries=N``, ``--retries N``; default 0: none)
---------------------------------------------------------
Only UNAVAILABLE is retried (the server is unreachable, died, or is draining; inference is a
pure function of its input, so a re-send is safe); any other code is final. A request failed
with UNAVAILABLE is re-sent to the NEXT target (target k -> k+1 in the order given, wrapping) up
to N times, each re-send after a full-jitter pause of ``uniform(0, min(0.1 s, 0.01 s *
2**(n-1)))`` for the n-th retry, and never past the request's deadline (``timeout`` covers all
attempts; a pause that would end after it makes the UNAVAILABLE final). Unary: the RPC's status.
Stream: an in-band ``[UNAVAILABLE]`` answer, or the request being in flight on a stream that
breaks with UNAVAILABLE (its server died: gRPC's status for a lost connection, also when gRPC
words the lost connection as INTERNAL/UNKNOWN, e.g. a reset stream; or the server ended the
stream; a stream failing with another status fails its requests with that status, final) --
it is re-sent on a live stream of the next target, a new stream being opened there
when it has none (at most one opening per target per 0.1 s; meanwhile requests for that target
fail fast with UNAVAILABLE and go on to the next). Without retries a broken stream stays broken,
as do its requests. A stream request keeps its id through its retries (ids are unique per
logical request). A request is counted once by its final outcome, and its latency runs from its
first send (start) to its final answer, pauses included. ``retried`` counts the re-sends of the
whole run (warm-up included); ``ok_by_target`` the successful answers received from each target
(warm-up included): for a server that stayed up and served only this run, it equals the growth
of its success counter.

Transport
---------
grpc.aio (on uvloop when it is installed). Every target gets one channel; requests go to the
targets in turn (round robin per request, one channel per target; retries to the next
target). The input is random data of the model's input shape from ModelMetadata (batch axis =
``batch``, other variable dims = 1), built and serialized ONCE and sent through identity
serializers. Unary: every request is that byte string as it is, without an ``id`` (nothing
matches a unary answer by id, and appending one copied the whole request each time: 0.03 ms
of client CPU a 128 KiB vol3d request, measured); responses are not parsed.
``mode="stream"``: each request is that byte string plus a varying ``id`` field appended
(protobuf merges a trailing field into the message); requests ride on ``streams``
ModelStreamInfer streams (default: one per target; stream k on target k modulo the number of
targets), assigned in turn; responses are matched to requests by id, an in-band
``error_message`` ("[CODE] detail") counts as an error with that code.

JSON (``to_json``, ``--json``): the fields of BenchResult, among them ``requests``, ``ok``,
``errors``, ``errors_by_code``, ``throughput_rps``, ``latency_ms``, ``retries`` (the configured
maximum per request), ``retried`` (re-sends made) and ``ok_by_target``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np

from bnserve.client.client import status_name
from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc

log = logging.getLogger("bnserve.client.bench")

SERVICE = "inference.GRPCInferenceService"
INFER_METHOD = f"/{SERVICE}/ModelInfer"
STREAM_METHOD = f"/{SERVICE}/ModelStreamInfer"
DRAIN_SLACK_S = 1.0
STREAM_CLOSE_S = 2.0
DEFAULT_MAX_INFLIGHT = 10_000
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
# Codes made up by the client (never sent by a server).
NOT_SENT = "NOT_SENT"
CANCELLED = "CANCELLED"
CLIENT_ERROR = "CLIENT_ERROR"
UNAVAILABLE = "UNAVAILABLE"  # the only code retried (--retries)
RETRY_BACKOFF_S = 0.01  # full jitter: the n-th retry waits uniform(0, min(cap, base * 2**(n-1)))
RETRY_MAX_BACKOFF_S = 0.1
STREAM_REOPEN_S = 0.1  # with retries: a dead target gets a new stream at most this often

_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_STREAM_CODE = re.compile(r"\[([A-Z_]+)\]")
_ID_TAG = b"\x1a"  # ModelInferRequest.id: field 3, wire type 2 (length-delimited)

clock = time.perf_counter


# --- configuration and result ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark run. Exactly one of ``concurrency`` (closed loop) and ``rate`` (open loop)
    may be given; neither means a closed loop with one worker."""

    model: str
    targets: Sequence[str] = ("127.0.0.1:8001",)
    model_version: str = ""
    concurrency: int | None = None
    rate: float | None = None
    duration: float = 10.0
    warmup: float = 1.0
    batch: int = 1
    mode: Literal["unary", "stream"] = "unary"
    streams: int | None = None  # stream mode: number of ModelStreamInfer streams (per run)
    timeout: float = 10.0
    max_inflight: int = DEFAULT_MAX_INFLIGHT  # open loop only
    seed: int = 0
    retries: int = 0  # re-sends of a request that failed with UNAVAILABLE, to the next target
    progress: bool = True  # a tqdm bar on stderr; off anyway when stderr is not a TTY
    input_npy: str | None = None  # rows of the first input from this .npy (default: random)
    drift_input: DriftKind | None = None  # transform the input (docs/drift.md)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("at least one target is needed")
        if not self.model:
            raise ValueError("a model name is needed")
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("give either concurrency (closed loop) or rate (open loop), not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate}")
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0, got {self.duration}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.mode not in ("unary", "stream"):
            raise ValueError(f"mode must be 'unary' or 'stream', got {self.mode!r}")
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.drift_input is not None and self.drift_input not in DRIFT_KINDS:
            raise ValueError(f"drift_input must be one of {DRIFT_KINDS}, got {self.drift_input!r}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def workers(self) -> int:
        return self.concurrency or 1

    @property
    def n_streams(self) -> int:
        return self.streams or len(self.targets)


@dataclass
class BenchResult:
    """The figures of one run; ``to_json()`` writes them (``latencies_s``, ``done_ok_s`` and
    ``done_err_s`` -- per-request arrays for plots -- are left out)."""

    model: str
    model_version: str
    targets: list[str]
    mode: str
    loop: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    batch: int
    rows_per_request: int
    streams: int | None
    duration_s: float
    warmup_s: float
    requests: int
    ok: int
    errors: int
    errors_by_code: dict[str, int]
    throughput_rps: float
    ok_rps: float
    samples_per_s: float
    latency_ms: dict[str, float | None]
    latency_mean_ms: float | None
    send_rate_rps: float | None  # open loop: issued in the window / duration
    send_lag_ms: dict[str, float | None] | None  # open loop: actual - scheduled send time
    warmup_requests: int
    warmup_ok: int
    late_responses: int  # stream mode: answers that came after their request had expired
    retries: int  # the configured maximum per request
    retried: int  # retries made (re-sends after UNAVAILABLE), warm-up included
    ok_by_target: dict[str, int]  # successful answers received per target, warm-up included
    request_bytes: int
    inputs: dict[str, list[int]]
    wall_s: float
    timeline: dict[str, Any]
    latencies_s: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    done_ok_s: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    done_err_s: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    _ARRAYS = ("latencies_s", "done_ok_s", "done_err_s")

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self._ARRAYS
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --- the request -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The one serialized request every send reuses (a stream's with a varying id)."""

    payload: bytes
    rows: int
    inputs: dict[str, list[int]]


def _input_shape(name: str, dims: Sequence[int], batch: int) -> tuple[list[int], int]:
    dims = list(dims)
    if dims and dims[0] == -1:
        rows = batch
        shape = [batch] + [1 if d == -1 else d for d in dims[1:]]
    else:
        if batch != 1:
            raise ValueError(
                f"input {name!r} has no variable batch axis (shape {dims}): use batch 1"
            )
        rows = 1
        shape = [1 if d == -1 else d for d in dims]
    return shape, rows


DriftKind = Literal["noise", "shift", "contrast"]
DRIFT_KINDS: tuple[str, ...] = ("noise", "shift", "contrast")


def drift_transform(x: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
    """Drifted copy of a float batch (docs/drift.md): noise = + N(0, 0.5), shift = roll the last
    axis by 2 pixels, contrast = 1 - x (inverted)."""
    if kind == "noise":
        noise = np.random.default_rng(seed).normal(0.0, 0.5, size=x.shape)
        return (x + noise).astype(x.dtype)
    if kind == "shift":
        return np.roll(x, 2, axis=-1)
    if kind == "contrast":
        return (1 - x).astype(x.dtype)
    raise ValueError(f"unknown drift kind {kind!r}; expected one of {DRIFT_KINDS}")


def _rows_from(data: np.ndarray, shape: list[int], dtype: Any) -> np.ndarray:
    """shape[0] rows of `data` (cycled when it has fewer), checked against the input's shape."""
    if list(data.shape[1:]) != shape[1:]:
        raise ValueError(f"--input-npy rows have shape {list(data.shape[1:])}, need {shape[1:]}")
    idx = np.arange(shape[0]) % len(data)
    return np.asarray(data[idx], dtype=dtype)


def build_workload(
    model: str,
    version: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    *,
    batch: int,
    seed: int = 0,
    data: np.ndarray | None = None,
    drift: str | None = None,
) -> Workload:
    """The request for `inputs` (name, datatype, metadata shape), raw bytes. Random data, or for
    the first input rows of `data`; `drift` transforms float inputs (drift_transform)."""
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    shapes: dict[str, list[int]] = {}
    rows = 1
    for name, datatype, dims in inputs:
        shape, rows = _input_shape(name, dims, batch)
        dtype = _DTYPES.get(datatype)
        if dtype is None:
            raise ValueError(f"input {name!r}: datatype {datatype} is not supported by bench")
        if data is not None and not shapes:  # the first input
            values = _rows_from(data, shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            values = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            values = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            values = rng.integers(0, 10, size=shape).astype(dtype)
        if drift is not None and np.issubdtype(dtype, np.floating):
            values = drift_transform(values, drift, seed=seed)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(np.ascontiguousarray(values).tobytes())
        shapes[name] = shape
    return Workload(request.SerializeToString(), rows, shapes)


class _Ids:
    """Payloads with a fresh id each: the pre-serialized request plus one appended field."""

    def __init__(self, payload: bytes) -> None:
        self._prefix = [payload + _ID_TAG + bytes((n,)) for n in range(32)]
        self._n = 0

    def next(self) -> tuple[bytes, str]:
        self._n += 1
        sid = f"{self._n:x}"
        return self._prefix[len(sid)] + sid.encode(), sid


async def _fetch_workload(channel: grpc.aio.Channel, config: BenchConfig) -> Workload:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelMetadataRequest(name=config.model, version=config.model_version)
    try:
        meta = await stub.ModelMetadata(request, timeout=config.timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
            # Measure anyway: the server answers every request with its error, which is counted.
            log.warning(
                "ModelMetadata for %r: %s: %s; sending a placeholder input",
                config.model,
                exc.code().name,
                exc.details(),
            )
            return build_workload(
                config.model,
                config.model_version,
                [("input", "FP32", [-1, 1])],
                batch=config.batch,
                seed=config.seed,
            )
        raise RuntimeError(
            f"{config.targets[0]}: ModelMetadata for {config.model!r} failed: "
            f"{exc.code().name}: {exc.details()}"
        ) from exc
    if not meta.inputs:
        raise RuntimeError(f"model {config.model!r} has no inputs in its metadata")
    return build_workload(
        config.model,
        config.model_version,
        [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
        batch=config.batch,
        seed=config.seed,
        data=None if config.input_npy is None else np.load(config.input_npy),
        drift=config.drift_input,
    )


# --- accounting ------------------------------------------------------------------------------


class _Recorder:
    """Every completed request passes here exactly once."""

    __slots__ = (
        "completed",
        "done_err",
        "done_ok",
        "errors",
        "failed",
        "latencies",
        "ok",
        "send_lags",
        "send_span",
        "sent",
        "warm",
        "warm_ok",
    )

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, successes of the window
        self.done_ok: list[float] = []  # completion times (clock) of the window's successes
        self.done_err: list[float] = []
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.warm = 0
        self.warm_ok = 0
        self.completed = 0  # everything, for the progress bar
        self.failed = 0
        self.sent = 0  # open loop: requests of the window actually issued
        self.send_lags: list[float] = []
        self.send_span = 0.0  # open loop: from the window's start to its last send (>= duration)

    def record(self, measured: bool, start: float, done: float, code: str | None) -> None:
        self.completed += 1
        if not measured:
            self.warm += 1
            if code is None:
                self.warm_ok += 1
            else:
                self.failed += 1
            return
        if code is None:
            self.ok += 1
            self.latencies.append(done - start)
            self.done_ok.append(done)
        else:
            self.failed += 1
            self.errors[code] += 1
            self.done_err.append(done)


# --- transports ------------------------------------------------------------------------------

# One logical request whose deadline is t0 + timeout (t0: the actual send time in closed loop,
# the scheduled one in open loop), retries included; returns None for OK, else the status code
# name of its last attempt.
Send = Callable[[float], Awaitable[str | None]]


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    log.debug("client-side failure: %r", exc)
    return CLIENT_ERROR


def _transport_code(exc: grpc.aio.AioRpcError) -> str:
    """The status of a call or stream that failed (not an in-band answer: those keep their
    code); a lost connection counts as UNAVAILABLE however gRPC words it (status_name)."""
    return status_name(_code(exc), exc.details() or "")


class _Retry:
    """UNAVAILABLE-only retries: at most `retries` more attempts, each after a full-jitter pause
    (uniform over [0, min(RETRY_MAX_BACKOFF_S, RETRY_BACKOFF_S * 2**n)], n = retries made so
    far), never past the request's deadline."""

    __slots__ = ("_rng", "retried", "retries")

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.retried = 0  # re-sends made so far, over every request
        self._rng = random.Random()

    async def after(
        self,
        code: str,
        target: int,
        n_targets: int,
        deadline: float,
        attempt: Callable[[int, int], Awaitable[str | None]],
    ) -> tuple[str | None, int]:
        """After a first attempt to `target` failed with `code`: attempt(target, retries made)
        again while the code is retryable, each retry to the next target. Returns (None or the
        final code, the last target). The first attempt is the caller's own await, so a request
        that succeeds (or may not be retried) costs no retry frame or closure."""
        made = 0
        while True:
            pause = self.pause(code, made, deadline)
            if pause is None:
                return code, target
            await asyncio.sleep(pause)
            made += 1
            self.retried += 1
            target = (target + 1) % n_targets
            retried = await attempt(target, made)
            if retried is None:
                return None, target
            code = retried

    def pause(self, code: str | None, made: int, deadline: float) -> float | None:
        """Seconds to wait before retrying, or None: `code` is final."""
        if code != UNAVAILABLE or made >= self.retries:
            return None
        pause = self._rng.uniform(0.0, min(RETRY_MAX_BACKOFF_S, RETRY_BACKOFF_S * 2**made))
        if clock() + pause >= deadline:
            return None
        return pause


class _Unary:
    def __init__(
        self, channels: Sequence[grpc.aio.Channel], payload: bytes, timeout: float, retries: int
    ) -> None:
        # No serializers: bytes go out as they are, responses come back unparsed.
        self._calls = [ch.unary_unary(INFER_METHOD) for ch in channels]
        self._n = len(self._calls)
        self._i = 0
        self._payload = payload  # the same object every time: no id, so no copy a request
        self._timeout = timeout
        self._retry = _Retry(retries)
        self.ok_by_target = [0] * self._n

    @property
    def retried(self) -> int:
        return self._retry.retried

    async def send(self, t0: float) -> str | None:
        k = self._i % self._n
        self._i += 1
        payload = self._payload
        deadline = t0 + self._timeout
        code = await self._attempt(self._calls[k], payload, deadline)
        if code is not None:

            async def attempt(k: int, made: int) -> str | None:
                return await self._attempt(self._calls[k], payload, deadline)

            code, k = await self._retry.after(code, k, self._n, deadline, attempt)
        if code is None:
            self.ok_by_target[k] += 1
        return code

    @staticmethod
    async def _attempt(
        call: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, deadline: float
    ) -> str | None:
        try:
            await call(payload, timeout=deadline - clock())
        except grpc.aio.AioRpcError as exc:
            return _transport_code(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _code(exc)
        return None

    async def close(self) -> None:
        return None


class _Stream:
    """One ModelStreamInfer call to target number `target`: a writer task (grpc.aio allows one
    write at a time, and a cancelled write would kill the call) and a reader task resolving
    futures by id."""

    def __init__(self, channel: grpc.aio.Channel, target: int, owner: _Streams) -> None:
        self.call = channel.stream_stream(
            STREAM_METHOD, response_deserializer=pb.ModelStreamInferResponse.FromString
        )()
        self.target = target
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.owner = owner
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write())
        self.reader = loop.create_task(self._read())
        self.dead: str | None = None

    async def _write(self) -> None:
        call = self.call
        queue = self.queue
        try:
            while (payload := await queue.get()) is not None:
                await call.write(payload)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError):
                self._die(_transport_code(exc))
            else:  # InvalidStateError: the call ended under the write
                self._die(UNAVAILABLE)

    async def _read(self) -> None:
        pending = self.owner.pending
        try:
            async for msg in self.call:
                entry = pending.pop(msg.infer_response.id, None)
                if entry is None:
                    self.owner.late += 1
                    continue
                fut = entry[1]
                if fut.done():
                    continue
                if msg.error_message:
                    m = _STREAM_CODE.match(msg.error_message)
                    fut.set_result(m.group(1) if m else "UNKNOWN")
                else:
                    fut.set_result(None)
        except grpc.aio.AioRpcError as exc:
            self._die(_transport_code(exc))
        else:
            self._die(UNAVAILABLE)  # the server ended the stream

    def _die(self, code: str) -> None:
        if self.dead is None:
            self.dead = code
            self.queue.put_nowait(None)  # let the writer end
        self.owner.fail_stream(self, code)


class _Streams:
    """`n` streams; stream k goes to target k % len(targets). With retries, a request failed
    with UNAVAILABLE (in-band, or in flight on a stream that broke) is re-sent on a live
    stream of the next target; a target whose streams are all dead gets a new one (at most one
    opening per STREAM_REOPEN_S per target; meanwhile its requests fail fast, and are retried)."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        n: int,
        ids: _Ids,
        timeout: float,
        retries: int,
    ) -> None:
        self.pending: dict[str, tuple[float, asyncio.Future[str | None], _Stream]] = {}
        self.late = 0
        self._channels = list(channels)
        self._t = len(self._channels)
        self.ok_by_target = [0] * self._t
        self._reopen_at = [0.0] * self._t
        self._streams = [_Stream(self._channels[k % self._t], k % self._t, self) for k in range(n)]
        self._spare: dict[int, _Stream] = {}  # retries to a target none of the n streams serve
        self._opened = list(self._streams)  # everything to close
        self._n = n
        self._i = 0
        self._ids = ids
        self._timeout = timeout
        self._retry = _Retry(retries)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    @property
    def retried(self) -> int:
        return self._retry.retried

    def fail_stream(self, stream: _Stream, code: str) -> None:
        for sid, (_, fut, s) in list(self.pending.items()):
            if s is stream:
                del self.pending[sid]
                if not fut.done():
                    fut.set_result(code)

    async def _sweep(self) -> None:
        """The per-request deadline: an answer later than `timeout` is DEADLINE_EXCEEDED."""
        period = min(0.25, self._timeout / 4)
        while True:
            await asyncio.sleep(period)
            limit = clock() - self._timeout
            expired = [sid for sid, (t, _, _) in self.pending.items() if t < limit]
            for sid in expired:
                fut = self.pending.pop(sid)[1]
                if not fut.done():
                    fut.set_result("DEADLINE_EXCEEDED")

    def _reopen(self, target: int) -> _Stream | None:
        """A new stream to `target`, unless one was opened there less than STREAM_REOPEN_S ago
        (only with retries: without, a dead stream stays dead, its requests fail fast)."""
        now = clock()
        if not self._retry.retries or now < self._reopen_at[target]:
            return None
        self._reopen_at[target] = now + STREAM_REOPEN_S
        stream = _Stream(self._channels[target], target, self)
        self._opened.append(stream)
        return stream

    def _slot(self, k: int) -> _Stream:
        stream = self._streams[k]
        if stream.dead is not None and (fresh := self._reopen(stream.target)) is not None:
            self._streams[k] = stream = fresh
        return stream

    def _on_target(self, target: int) -> _Stream | None:
        """A live stream to `target` (its slots in turn, then the spare), else a new one, else
        None (reopening throttled)."""
        slots = range(target, self._n, self._t)
        if slots:
            start = self._i // self._t
            for j in range(len(slots)):
                k = slots[(start + j) % len(slots)]
                if self._streams[k].dead is None:
                    return self._streams[k]
            fresh = self._reopen(target)
            if fresh is not None:
                self._streams[slots[start % len(slots)]] = fresh
            return fresh
        spare = self._spare.get(target)
        if spare is not None and spare.dead is None:
            return spare
        fresh = self._reopen(target)
        if fresh is not None:
            self._spare[target] = fresh
        return fresh

    async def send(self, t0: float) -> str | None:
        first = self._slot(self._i % self._n)
        self._i += 1
        payload, sid = self._ids.next()  # one id per logical request: its retries carry it too
        target = first.target
        code = first.dead or await self._attempt(first, payload, sid, t0)
        if code is not None:

            async def attempt(target: int, made: int) -> str | None:
                stream = self._on_target(target)
                if stream is None:
                    return UNAVAILABLE  # no stream to that target for now: fail fast
                if stream.dead is not None:
                    return stream.dead
                return await self._attempt(stream, payload, sid, t0)

            deadline = t0 + self._timeout
            code, target = await self._retry.after(code, target, self._t, deadline, attempt)
        if code is None:
            self.ok_by_target[target] += 1
        return code

    async def _attempt(self, stream: _Stream, payload: bytes, sid: str, t0: float) -> str | None:
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.pending[sid] = (t0, fut, stream)
        stream.queue.put_nowait(payload)
        try:
            return await fut
        finally:
            if (entry := self.pending.get(sid)) is not None and entry[1] is fut:
                del self.pending[sid]

    async def close(self) -> None:
        self._sweeper.cancel()
        for s in self._opened:
            s.queue.put_nowait(None)
        tasks = [t for s in self._opened for t in (s.writer, s.reader)]
        _, stuck = await asyncio.wait(tasks, timeout=STREAM_CLOSE_S)
        for s in self._opened:
            if not s.call.done():
                s.call.cancel()
        for t in (*stuck, self._sweeper):
            t.cancel()
        await asyncio.gather(*tasks, self._sweeper, return_exceptions=True)


# --- the run ---------------------------------------------------------------------------------


def _channel(target: str, request_bytes: int) -> grpc.aio.Channel:
    limit = max(64 * 1024 * 1024, 2 * request_bytes)
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]
    return grpc.aio.insecure_channel(target, options=options)


async def _drain(tasks: set[asyncio.Task[None]], budget: float) -> None:
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=max(0.0, budget))
    for t in stuck:
        t.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)


async def _closed_loop(
    send: Send, rec: _Recorder, workers: int, t_measure: float, t_end: float, timeout: float
) -> None:
    async def worker() -> None:
        while (start := clock()) < t_end:
            try:
                code = await send(start)
            except asyncio.CancelledError:
                rec.record(start >= t_measure, start, clock(), CANCELLED)
                raise
            rec.record(start >= t_measure, start, clock(), code)

    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(worker()) for _ in range(workers)}
    await asyncio.wait(tasks, timeout=max(0.0, t_end - clock()))
    await _drain(tasks, t_end + timeout + DRAIN_SLACK_S - clock())


async def _open_loop(
    send: Send,
    rec: _Recorder,
    config: BenchConfig,
    t_start: float,
    t_end: float,
) -> None:
    rate = float(config.rate or 1.0)
    t_measure = t_start + config.warmup
    eps = 1e-9
    n_warm = math.ceil(config.warmup * rate - eps)
    n_total = math.ceil((config.warmup + config.duration) * rate - eps)
    slots = asyncio.Semaphore(config.max_inflight)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(measured: bool, scheduled: float) -> None:
        try:
            code = await send(scheduled)
        except asyncio.CancelledError:
            rec.record(measured, scheduled, clock(), CANCELLED)
            raise
        finally:
            slots.release()
        rec.record(measured, scheduled, clock(), code)

    timeout = config.timeout
    unsent = 0
    last_sent = t_start
    for i in range(n_total):
        scheduled = t_start + i / rate
        measured = i >= n_warm
        now = clock()
        if scheduled > now:
            await asyncio.sleep(scheduled - now)
        elif i % 8 == 0:
            await asyncio.sleep(0)  # behind schedule: still let the responses in
        if slots.locked():  # the in-flight cap: wait for a slot up to the request's deadline
            try:
                await asyncio.wait_for(slots.acquire(), timeout=scheduled + timeout - clock())
            except TimeoutError:
                now = clock()
                rec.record(measured, scheduled, now, NOT_SENT)
                unsent += measured
                continue
        else:
            await slots.acquire()  # immediate
        now = clock()
        if now >= scheduled + timeout:  # so late that its deadline has passed before sending
            slots.release()
            rec.record(measured, scheduled, now, NOT_SENT)
            unsent += measured
            continue
        if measured:
            rec.sent += 1
            rec.send_lags.append(now - scheduled)
            last_sent = now
        task = loop.create_task(one(measured, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if unsent:
        log.warning(
            "%d request(s) of the window could not be sent within %.3g s of their scheduled "
            "time (client too slow, or in-flight cap %d reached): counted as %s",
            unsent,
            timeout,
            config.max_inflight,
            NOT_SENT,
        )
    rec.send_span = max(last_sent - t_measure, config.duration)
    await _drain(tasks, t_end + config.timeout + DRAIN_SLACK_S - clock())


async def _progress(rec: _Recorder, t_start: float, total: float, enabled: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(
        total=round(total, 2),
        unit="s",
        disable=None if enabled else True,  # None: off when stderr is not a TTY
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s{postfix}",
        leave=False,
        file=sys.stderr,
    )
    last_t, last_n, shown = t_start, 0, 0.0
    try:
        while True:
            await asyncio.sleep(0.25)
            now = clock()
            elapsed = min(now - t_start, total)
            bar.update(round(elapsed - shown, 2))
            shown = round(elapsed, 2)
            rps = (rec.completed - last_n) / max(now - last_t, 1e-9)
            last_t, last_n = now, rec.completed
            bar.set_postfix_str(f"{rps:,.0f} req/s, {rec.failed} errors", refresh=False)
    finally:
        bar.close()


def _percentiles(values: np.ndarray, scale: float = 1000.0) -> dict[str, float | None]:
    if values.size == 0:
        empty: dict[str, float | None] = {name: None for name, _ in PERCENTILES}
        empty["max"] = None
        return empty
    qs = np.percentile(values, [q for _, q in PERCENTILES])
    out: dict[str, float | None] = {
        name: round(float(v) * scale, 4) for (name, _), v in zip(PERCENTILES, qs, strict=True)
    }
    out["max"] = round(float(values.max()) * scale, 4)
    return out


def _timeline(done_ok: np.ndarray, done_err: np.ndarray, duration: float) -> dict[str, Any]:
    interval = max(duration / 40.0, 0.05)
    last = max(duration, float(done_ok.max()) if done_ok.size else 0.0)
    last = max(last, float(done_err.max()) if done_err.size else 0.0)
    n = max(1, math.ceil(last / interval - 1e-9))
    edges = np.arange(n + 1) * interval
    ok, _ = np.histogram(done_ok, bins=edges)
    err, _ = np.histogram(done_err, bins=edges)
    return {
        "interval_s": round(interval, 6),
        "t_s": [round(float(t), 6) for t in edges[:-1]],
        "ok_rps": [round(float(c) / interval, 3) for c in ok],
        "error_rps": [round(float(c) / interval, 3) for c in err],
    }


async def bench(config: BenchConfig) -> BenchResult:
    """Run one benchmark on the running event loop (see the module docstring)."""
    wall = clock()
    probe = _channel(config.targets[0], 0)
    try:
        workload = await _fetch_workload(probe, config)
    finally:
        await probe.close()
    channels = [_channel(t, len(workload.payload)) for t in config.targets]
    rec = _Recorder()
    transport: _Unary | _Streams
    try:
        if config.mode == "stream":
            ids = _Ids(workload.payload)
            transport = _Streams(channels, config.n_streams, ids, config.timeout, config.retries)
        else:
            transport = _Unary(channels, workload.payload, config.timeout, config.retries)
        loop = asyncio.get_running_loop()
        t_start = clock()
        t_measure = t_start + config.warmup
        t_end = t_measure + config.duration
        ticker = loop.create_task(
            _progress(rec, t_start, config.warmup + config.duration, config.progress)
        )
        try:
            if config.open_loop:
                await _open_loop(transport.send, rec, config, t_start, t_end)
            else:
                await _closed_loop(
                    transport.send, rec, config.workers, t_measure, t_end, config.timeout
                )
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await transport.close()
    finally:
        for ch in channels:
            await ch.close()
    return _result(config, workload, rec, t_measure, transport, clock() - wall)


def _result(
    config: BenchConfig,
    workload: Workload,
    rec: _Recorder,
    t_measure: float,
    transport: _Unary | _Streams,
    wall_s: float,
) -> BenchResult:
    lat = np.asarray(rec.latencies, dtype=np.float64)
    done_ok = np.asarray(rec.done_ok, dtype=np.float64) - t_measure
    done_err = np.asarray(rec.done_err, dtype=np.float64) - t_measure
    errors = sum(rec.errors.values())
    requests = rec.ok + errors
    d = config.duration
    send_lag: dict[str, float | None] | None = None
    if config.open_loop:
        lags = np.asarray(rec.send_lags, dtype=np.float64)
        pl = _percentiles(lags)
        send_lag = {"p50": pl["p50"], "p99": pl["p99"], "max": pl["max"]}
    return BenchResult(
        model=config.model,
        model_version=config.model_version,
        targets=list(config.targets),
        mode=config.mode,
        loop="open" if config.open_loop else "closed",
        concurrency=None if config.open_loop else config.workers,
        rate=config.rate,
        batch=config.batch,
        rows_per_request=workload.rows,
        streams=config.n_streams if config.mode == "stream" else None,
        duration_s=d,
        warmup_s=config.warmup,
        requests=requests,
        ok=rec.ok,
        errors=errors,
        errors_by_code=dict(sorted(rec.errors.items())),
        throughput_rps=round(requests / d, 3),
        ok_rps=round(rec.ok / d, 3),
        samples_per_s=round(rec.ok * workload.rows / d, 3),
        latency_ms=_percentiles(lat),
        latency_mean_ms=round(float(lat.mean()) * 1000, 4) if lat.size else None,
        send_rate_rps=round(rec.sent / rec.send_span, 3) if config.open_loop else None,
        send_lag_ms=send_lag,
        warmup_requests=rec.warm,
        warmup_ok=rec.warm_ok,
        late_responses=transport.late if isinstance(transport, _Streams) else 0,
        retries=config.retries,
        retried=transport.retried,
        ok_by_target=_by_target(config.targets, transport.ok_by_target),
        request_bytes=len(workload.payload),
        inputs=workload.inputs,
        wall_s=round(wall_s, 3),
        timeline=_timeline(done_ok, done_err, d),
        latencies_s=lat,
        done_ok_s=done_ok,
        done_err_s=done_err,
    )


def _by_target(targets: Sequence[str], counts: Sequence[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, n in zip(targets, counts, strict=True):  # a target given twice: one entry, summed
        out[t] = out.get(t, 0) + n
    return out


def _runner() -> asyncio.Runner:
    try:
        import uvloop  # optional: not a dependency
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_bench(config: BenchConfig) -> BenchResult:
    """Run one benchmark on a fresh event loop (uvloop's when installed)."""
    with _runner() as runner:
        return runner.run(bench(config))


# --- reporting -------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render(result: BenchResult) -> str:
    """The summary table."""
    r = result
    load = f"rate {r.rate:g}/s (open loop)" if r.loop == "open" else f"concurrency {r.concurrency}"
    if r.mode == "stream":
        load += f", {r.streams} stream(s)"
    version = f" v{r.model_version}" if r.model_version else ""
    lines = [
        f"bnserve bench: {r.model}{version} on {', '.join(r.targets)}",
        f"  load         {r.mode}, {load}, batch {r.batch}, {r.request_bytes} B/request",
        f"  window       {r.duration_s:g} s measured after {r.warmup_s:g} s warm-up "
        f"({r.warmup_requests} warm-up requests), wall {r.wall_s:.1f} s",
        f"  requests     {r.requests}  (ok {r.ok}, errors {r.errors})",
        f"  throughput   {r.throughput_rps:,.1f} req/s   {r.samples_per_s:,.1f} samples/s",
    ]
    if r.send_rate_rps is not None and r.send_lag_ms is not None:
        lines.append(
            f"  sent         {r.send_rate_rps:,.1f} req/s achieved; send lag p50 "
            f"{_ms(r.send_lag_ms['p50'])} p99 {_ms(r.send_lag_ms['p99'])} "
            f"max {_ms(r.send_lag_ms['max'])} ms"
        )
    lat = r.latency_ms
    lines.append(
        "  latency ms   "
        + "  ".join(f"{k.replace('p999', 'p99.9')} {_ms(lat[k])}" for k in lat)
        + ("" if r.ok else "  (no successful request)")
    )
    if r.errors_by_code:
        lines.append("  errors       " + ", ".join(f"{c} {n}" for c, n in r.errors_by_code.items()))
    if r.late_responses:
        lines.append(f"  late         {r.late_responses} answers after their deadline")
    if r.retries:
        lines.append(
            f"  retried      {r.retried} re-sends after UNAVAILABLE (up to {r.retries} per "
            "request, to the next target)"
        )
    if len(r.ok_by_target) > 1:
        lines.append("  ok by target " + ", ".join(f"{t} {n}" for t, n in r.ok_by_target.items()))
    return "\n".join(lines)


def plot(result: BenchResult, path: str | Path) -> Path:
    """A PNG: the latency histogram (successes of the window) and throughput over time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    lat_ms = result.latencies_s * 1000.0
    if lat_ms.size:
        lo, hi = max(float(lat_ms.min()), 1e-3), max(float(lat_ms.max()), 1e-3)
        if hi / lo > 20:
            bins = np.geomspace(lo, hi * 1.0001, 60)
            ax1.set_xscale("log")
        else:
            bins = np.linspace(lo, hi * 1.0001, 60)
        ax1.hist(lat_ms, bins=bins, color="tab:blue", alpha=0.8)
        for (name, value), color in zip(
            result.latency_ms.items(),
            ("k", "tab:green", "tab:orange", "tab:red", "tab:purple"),
            strict=False,
        ):
            if value is not None:
                ax1.axvline(value, color=color, ls="--", lw=1, label=f"{name} {value:.2f} ms")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no successful request", ha="center", va="center")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("requests")
    ax1.set_title(f"latency, {result.ok} successful requests")
    tl = result.timeline
    t = np.asarray(tl["t_s"]) + tl["interval_s"] / 2
    ax2.plot(t, tl["ok_rps"], color="tab:blue", label="ok")
    if any(tl["error_rps"]):
        ax2.plot(t, tl["error_rps"], color="tab:red", label="errors")
    ax2.axvline(result.duration_s, color="grey", ls=":", lw=1, label="end of window")
    ax2.set_xlabel("time since the start of the window (s)")
    ax2.set_ylabel("completions per second")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    load = f"rate {result.rate:g}/s" if result.loop == "open" else f"c={result.concurrency}"
    ax2.set_title(f"throughput ({result.mode}, {load}): {result.throughput_rps:,.0f} req/s")
    fig.suptitle(f"bnserve bench: {result.model} on {', '.join(result.targets)}")
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out


# --- command line ----------------------------------------------------------------------------


def config_from_args(args: Any) -> BenchConfig:
    """The BenchConfig of `bnserve bench`'s parsed arguments."""
    return BenchConfig(
        targets=tuple(args.target or ["127.0.0.1:8001"]),
        model=args.model,
        model_version=args.model_version,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        batch=args.batch,
        mode=args.mode,
        streams=args.streams,
        timeout=args.timeout,
        max_inflight=args.max_inflight,
        seed=args.seed,
        retries=getattr(args, "retries", 0),
        progress=not args.no_progress,
        input_npy=None if getattr(args, "input_npy", None) is None else str(args.input_npy),
        drift_input=getattr(args, "drift_input", None),
    )


def main(args: Any) -> int:
    """`bnserve bench`: run, print the table, write --json/--plot. Exit 1 when any request
    failed, 0 otherwise."""
    result = run_bench(config_from_args(args))
    print(render(result))
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n")
    if args.plot:
        plot(result, args.plot)
    return 1 if result.errors else 0
