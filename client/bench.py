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

Transport
---------
grpc.aio (on uvloop when it is installed). Every target gets one channel; requests go to the
targets in turn (round robin per request, one channel per target). The input is random data of
the model's input shape from ModelMetadata (batch axis = ``batch``, other variable dims = 1),
built and serialized ONCE; each request is that byte string plus a varying ``id`` field
appended (protobuf merges a trailing field into the message), sent through identity
serializers, responses not parsed in unary mode. ``mode="stream"``: requests ride on
``streams`` ModelStreamInfer streams (default: one per target), assigned in turn; responses
are matched to requests by id, an in-band ``error_message`` ("[CODE] detail") counts as an
error with that code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
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
    progress: bool = True  # a tqdm bar on stderr; off anyway when stderr is not a TTY

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
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")

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
    """The one serialized request every send reuses (with a varying id)."""

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


def build_workload(
    model: str,
    version: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    *,
    batch: int,
    seed: int = 0,
) -> Workload:
    """The request for `inputs` (name, datatype, metadata shape), random data, raw bytes."""
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    shapes: dict[str, list[int]] = {}
    rows = 1
    for name, datatype, dims in inputs:
        shape, rows = _input_shape(name, dims, batch)
        dtype = _DTYPES.get(datatype)
        if dtype is None:
            raise ValueError(f"input {name!r}: datatype {datatype} is not supported by bench")
        if np.issubdtype(dtype, np.floating):
            data = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            data = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            data = rng.integers(0, 10, size=shape).astype(dtype)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(np.ascontiguousarray(data).tobytes())
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

# One request whose deadline is t0 + timeout (t0: the actual send time in closed loop, the
# scheduled one in open loop); returns None for OK, else the status code name.
Send = Callable[[float], Awaitable[str | None]]


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    log.debug("client-side failure: %r", exc)
    return CLIENT_ERROR


class _Unary:
    def __init__(self, channels: Sequence[grpc.aio.Channel], ids: _Ids, timeout: float) -> None:
        # No serializers: bytes go out as they are, responses come back unparsed.
        self._calls = [ch.unary_unary(INFER_METHOD) for ch in channels]
        self._n = len(self._calls)
        self._i = 0
        self._ids = ids
        self._timeout = timeout

    async def send(self, t0: float) -> str | None:
        call = self._calls[self._i % self._n]
        self._i += 1
        payload, _ = self._ids.next()
        try:
            await call(payload, timeout=t0 + self._timeout - clock())
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _code(exc)
        return None

    async def close(self) -> None:
        return None


class _Stream:
    """One ModelStreamInfer call: a writer task (grpc.aio allows one write at a time, and a
    cancelled write would kill the call) and a reader task resolving futures by id."""

    def __init__(self, channel: grpc.aio.Channel, owner: _Streams) -> None:
        self.call = channel.stream_stream(
            STREAM_METHOD, response_deserializer=pb.ModelStreamInferResponse.FromString
        )()
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
            self._die(_code(exc) if isinstance(exc, grpc.aio.AioRpcError) else "UNAVAILABLE")

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
            self._die(_code(exc))
        else:
            self._die("UNAVAILABLE")  # the server ended the stream

    def _die(self, code: str) -> None:
        if self.dead is None:
            self.dead = code
        self.owner.fail_stream(self, code)


class _Streams:
    def __init__(
        self, channels: Sequence[grpc.aio.Channel], n: int, ids: _Ids, timeout: float
    ) -> None:
        self.pending: dict[str, tuple[float, asyncio.Future[str | None], _Stream]] = {}
        self.late = 0
        self._streams = [_Stream(channels[k % len(channels)], self) for k in range(n)]
        self._n = n
        self._i = 0
        self._ids = ids
        self._timeout = timeout
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

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

    async def send(self, t0: float) -> str | None:
        stream = self._streams[self._i % self._n]
        self._i += 1
        if stream.dead is not None:
            return stream.dead
        payload, sid = self._ids.next()
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.pending[sid] = (t0, fut, stream)
        stream.queue.put_nowait(payload)
        try:
            return await fut
        finally:
            self.pending.pop(sid, None)

    async def close(self) -> None:
        self._sweeper.cancel()
        for s in self._streams:
            s.queue.put_nowait(None)
        tasks = [t for s in self._streams for t in (s.writer, s.reader)]
        _, stuck = await asyncio.wait(tasks, timeout=STREAM_CLOSE_S)
        for s in self._streams:
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
    ids = _Ids(workload.payload)
    transport: _Unary | _Streams
    try:
        if config.mode == "stream":
            transport = _Streams(channels, config.n_streams, ids, config.timeout)
        else:
            transport = _Unary(channels, ids, config.timeout)
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
    late = transport.late if isinstance(transport, _Streams) else 0
    return _result(config, workload, rec, t_measure, late, clock() - wall)


def _result(
    config: BenchConfig,
    workload: Workload,
    rec: _Recorder,
    t_measure: float,
    late: int,
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
        late_responses=late,
        request_bytes=len(workload.payload),
        inputs=workload.inputs,
        wall_s=round(wall_s, 3),
        timeline=_timeline(done_ok, done_err, d),
        latencies_s=lat,
        done_ok_s=done_ok,
        done_err_s=done_err,
    )


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
        progress=not args.no_progress,
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
