"""Dynamic batching that never changes a result.

Requests wait in a bounded FIFO queue. A scheduler task forms a batch whenever a session is
free: it takes the oldest request and every later queued request with the same non-batch shapes
and dtypes, up to max_combined_batch_size rows (max_batch_size unless configured lower),
concatenates each input once, and runs the batch on a worker thread (one executor hop per
batch). The outputs are split back into row views.

Merging is only sound because model.py refused every model whose rows depend on the batch
(frozen-BN and batch-invariance gates, single-threaded sessions): each request gets bitwise the
same answer it would get alone.

Latency policy: a request that finds a free session is computed at once (no timer on an idle
server). Batches form naturally while every session is busy. With max_queue_delay_us > 0 a free
session waits, but only while other batches are in flight, up to that delay after the oldest
queued request arrived, for the queue to reach the smallest preferred batch size.

Everything here runs on one event loop; only `SessionPool.run` runs on the worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from .errors import (
    BnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
)
from .model import SessionPool, validate_inputs

__all__ = ["BatchObserver", "BatchSampler", "Batcher", "BatchingConfig", "Outcome"]

log = logging.getLogger(__name__)

# How a submit() ended, as reported to the observer.
Outcome = Literal["ok", "error", "deadline", "cancelled", "overloaded", "shutdown"]


# A finished batch: (per-request outputs, compute seconds), or what it raised.
_Outcome = tuple[list[dict[str, np.ndarray]], float] | Exception

# Batches faster than this (moving average) run on the event-loop thread (see Batcher).
INLINE_COMPUTE_S = 200e-6


class BatchObserver(Protocol):
    """Callbacks for metrics; all are called on the event loop thread and must not block.

    An exception raised by a callback is logged and otherwise ignored.
    """

    def on_batch(self, rows: int, requests: int, compute_s: float) -> None:
        """A batch ran: its rows, how many requests it merged, seconds in onnxruntime (including
        concatenate/split). Called whether or not the run succeeded."""

    def on_request_done(self, queue_s: float, outcome: Outcome) -> None:
        """A submit() that passed input validation ended. queue_s: seconds from enqueue to the
        start of its batch's compute (or to when it was dropped / refused)."""

    def on_queue_depth(self, depth: int) -> None:
        """The number of queued (not yet batched) requests changed."""


class BatchSampler(Protocol):
    """Receives a fraction of the batches' inputs (drift monitoring, server/drift.py); called on
    the event loop thread after the batch's results were delivered, and must not block."""

    def want(self) -> bool:
        """Whether the batch that just ran is sampled (called once per successful batch)."""

    def offer(self, inputs: list[dict[str, np.ndarray]]) -> None:
        """A sampled batch's per-request input arrays, by reference: read them, never mutate."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchingConfig:
    """Dynamic batching settings (Triton's names and meanings).

    max_queue_delay_us: 0 = greedy. > 0 = a free session may wait this long (measured from the
    oldest queued request's arrival) for more rows, but only while other batches are in flight.
    preferred_batch_sizes: the wait ends early once the queue holds min(preferred) rows
    (max_batch_size when empty).
    max_queue_size: queued requests (not rows) beyond which submit() raises OverloadedError.
    max_combined_batch_size: requests are combined up to this many rows (None: max_batch_size).
    A single request may still carry max_batch_size rows; it then runs alone. Lower it for a
    model whose cost a row grows with the batch (vol3d: its activations leave the cache, 3.7 ms
    a row at batch 1, 5.1 at 32 on one core), where combining only costs CPU.
    """

    max_batch_size: int
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_combined_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        combined = self.max_combined_batch_size
        if combined is not None and not 1 <= combined <= self.max_batch_size:
            raise ValueError(
                f"max_combined_batch_size must be in [1, {self.max_batch_size}], got {combined}"
            )
        limit = self.combine_limit
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= limit]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} not in [1, {limit}]")

    @property
    def combine_limit(self) -> int:
        """Rows a combined batch may hold."""
        c = self.max_combined_batch_size
        return self.max_batch_size if c is None else c

    @property
    def target_rows(self) -> int:
        return min(self.preferred_batch_sizes, default=self.combine_limit)


# The non-batch part of a request's inputs: only requests with equal keys are concatenated.
_Key = tuple[tuple[str, str, tuple[int, ...]], ...]


class _Request:
    __slots__ = ("arrays", "deadline", "enqueued", "future", "key", "queue_s", "queued", "rows")

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        rows: int,
        deadline: float | None,
        future: asyncio.Future[dict[str, np.ndarray]],
    ) -> None:
        self.arrays = arrays
        self.rows = rows
        self.deadline = deadline
        self.future = future
        self.key: _Key = tuple(
            (name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(arrays.items())
        )
        self.enqueued = time.monotonic()
        self.queue_s: float | None = None  # set when its batch starts
        self.queued = True  # still in Batcher._queue


class Batcher:
    """Dynamic batcher for one model in front of its SessionPool.

    Create it anywhere; it binds to the running event loop on the first submit().
    """

    def __init__(
        self,
        pool: SessionPool,
        *,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        max_combined_batch_size: int | None = None,
        observer: BatchObserver | None = None,
        sampler: BatchSampler | None = None,
    ) -> None:
        self.config = BatchingConfig(
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=tuple(sorted(set(preferred_batch_sizes))),
            max_queue_size=max_queue_size,
            max_combined_batch_size=max_combined_batch_size,
        )
        self._pool = pool
        self._observer = observer
        self._sampler = sampler
        self._slots = pool.size  # one batch in flight per session
        # One worker per session: a batch never waits for a thread, only for a session.
        self._executor = ThreadPoolExecutor(max_workers=self._slots, thread_name_prefix="bnserve")
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._closing = False
        self._sem: asyncio.Semaphore | None = None
        self._wakeup: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        # Moving average of a batch's compute time. A model whose batches take less than
        # INLINE_COMPUTE_S runs on the event loop itself: the thread hop (~80 us measured) would
        # cost more than the work, and batches still form from what queues meanwhile.
        self._compute_ewma_s: float | None = None

    @classmethod
    def from_config(
        cls,
        pool: SessionPool,
        config: BatchingConfig,
        observer: BatchObserver | None = None,
        sampler: BatchSampler | None = None,
    ) -> Batcher:
        return cls(
            pool,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            preferred_batch_sizes=config.preferred_batch_sizes,
            max_queue_size=config.max_queue_size,
            max_combined_batch_size=config.max_combined_batch_size,
            observer=observer,
            sampler=sampler,
        )

    # ------------------------------------------------------------------------------ properties

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        """Batches being computed right now (at most the pool's size)."""
        return self._inflight

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------------------ submit

    async def submit(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        deadline: float | None = None,
        rows: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Compute one request (all outputs), batched with others; returns row views.

        deadline is on time.monotonic(). `rows`: the request's row count when the caller has
        already validated the arrays against the model's inputs (the servicer's codec does, in
        full), so the hot path does not check them twice; None: checked here.
        Raises InvalidInputError, OverloadedError (queue full, at once), DeadlineExceededError,
        ShuttingDownError, or BnserveError (INTERNAL) when onnxruntime fails. Cancelling the
        caller removes a queued request from the queue.
        """
        if self._closing:
            raise ShuttingDownError("server is shutting down")
        if rows is None:
            rows = validate_inputs(self._pool.inputs, arrays, batched=True)
        if rows > self.config.max_batch_size:
            raise InvalidInputError(
                f"batch of {rows} rows exceeds max_batch_size {self.config.max_batch_size}"
            )
        if deadline is not None and deadline <= time.monotonic():
            self._notify_done(0.0, "deadline")
            raise DeadlineExceededError("deadline exceeded before the request was queued")
        if len(self._queue) >= self.config.max_queue_size:
            self._notify_done(0.0, "overloaded")
            raise OverloadedError(
                f"queue full ({self.config.max_queue_size} requests); retry with backoff"
            )
        self._ensure_started()
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        req = _Request(dict(arrays), rows, deadline, loop.create_future())
        self._queue.append(req)
        self._queued_rows += rows
        self._notify_depth()
        self._wakeup.set()

        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # wait_for cancels the future on timeout or when we are cancelled; the scheduler
            # skips cancelled futures and never sets a result twice.
            return await asyncio.wait_for(req.future, timeout)
        except TimeoutError:
            self._unqueue(req)
            self._notify_done(self._queue_time(req), "deadline")
            raise DeadlineExceededError("deadline exceeded while queued or computing") from None
        except asyncio.CancelledError:
            if req.future.cancelled():  # our caller was cancelled, not a ShuttingDown outcome
                self._unqueue(req)
                self._notify_done(self._queue_time(req), "cancelled")
            raise

    def _ensure_started(self) -> None:
        if self._scheduler is None:
            self._sem = asyncio.Semaphore(self._slots)
            self._wakeup = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(
                self._schedule(), name="bnserve-batcher"
            )
            self._scheduler.add_done_callback(self._scheduler_ended)

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        """A scheduler that died of a bug must not leave requests waiting forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher scheduler failed", exc_info=task.exception())
        self._closing = True
        self._fail(list(self._queue), BnserveError("batcher failed; see server log"))
        self._queue.clear()
        self._queued_rows = 0
        self._notify_depth()

    def _unqueue(self, req: _Request) -> None:
        """Free a queued request's place (it will not be computed)."""
        if req.queued:
            req.queued = False
            self._queue.remove(req)
            self._queued_rows -= req.rows
            self._notify_depth()

    @staticmethod
    def _queue_time(req: _Request) -> float:
        return req.queue_s if req.queue_s is not None else time.monotonic() - req.enqueued

    # ------------------------------------------------------------------------------ scheduler

    async def _schedule(self) -> None:
        assert self._sem is not None and self._wakeup is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._sem.acquire()  # a session is free
            try:
                if self.config.max_queue_delay_us > 0:
                    await self._wait_for_more()
                batch = self._form_batch()
            except BaseException:
                self._sem.release()
                raise
            if not batch:  # everything queued was cancelled or expired meanwhile
                self._sem.release()
                continue
            self._inflight += 1
            if self._compute_ewma_s is not None and self._compute_ewma_s < INLINE_COMPUTE_S:
                self._run_inline(batch)
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _wait_for_more(self) -> None:
        """Hold a free session while more rows are likely to come (see module docstring)."""
        assert self._wakeup is not None
        delay = self.config.max_queue_delay_us / 1e6
        target = self.config.target_rows
        # Bounded: each pass either returns or waits on the wakeup event with a timeout that
        # ends at the oldest request's arrival + delay.
        while self._queue and not self._closing:
            if self._queued_rows >= target or self._inflight == 0:
                return  # enough rows, or an idle server: never delay a lone request
            remaining = self._queue[0].enqueued + delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _form_batch(self) -> list[_Request]:
        """Take the oldest live request and compatible followers, up to combine_limit rows (a
        first request with more rows than that runs alone).

        Cancelled requests are skipped; expired ones fail with DeadlineExceededError here,
        before compute.
        """
        now = time.monotonic()
        limit = self.config.combine_limit
        batch: list[_Request] = []
        rows = 0
        keep: deque[_Request] = deque()
        while self._queue:
            req = self._queue.popleft()
            if rows >= limit:
                keep.append(req)
                keep.extend(self._queue)
                self._queue.clear()
                break
            if req.future.done():  # cancelled by its caller: wait_for already reported it
                req.queued = False
                self._queued_rows -= req.rows
                continue
            if req.deadline is not None and req.deadline <= now:
                req.queued = False
                self._queued_rows -= req.rows
                req.queue_s = now - req.enqueued
                req.future.set_exception(DeadlineExceededError("deadline exceeded in queue"))
                self._notify_done(req.queue_s, "deadline")
                continue
            if not batch or (req.key == batch[0].key and rows + req.rows <= limit):
                req.queued = False
                self._queued_rows -= req.rows
                req.queue_s = now - req.enqueued
                batch.append(req)
                rows += req.rows
            else:
                keep.append(req)
        self._queue = keep
        self._notify_depth()
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcome: _Outcome = await loop.run_in_executor(
                self._executor, self._compute, [r.arrays for r in batch], [r.rows for r in batch]
            )
        except asyncio.CancelledError:
            # close() gave up at its grace deadline; the thread finishes on its own.
            self._fail(batch, ShuttingDownError("server shut down before the batch finished"))
            self._batch_done()
            raise
        except Exception as exc:
            outcome = exc
        self._settle(batch, outcome)

    def _run_inline(self, batch: list[_Request]) -> None:
        """_run_batch without the thread hop, for models whose batches take microseconds."""
        try:
            outcome: _Outcome = self._compute([r.arrays for r in batch], [r.rows for r in batch])
        except Exception as exc:
            outcome = exc
        self._settle(batch, outcome)

    def _settle(self, batch: list[_Request], outcome: _Outcome) -> None:
        """Answer every request of a finished batch, then free its session."""
        try:
            if isinstance(outcome, BnserveError):
                self._fail(batch, outcome)
            elif isinstance(outcome, Exception):  # a bug in concatenate/split: still answer
                rows = sum(r.rows for r in batch)
                log.error("batch of %d rows failed", rows, exc_info=outcome)
                self._fail(batch, BnserveError(f"inference failed: {outcome}"))
            else:
                self._deliver(batch, *outcome)
        finally:
            self._batch_done()

    def _deliver(
        self, batch: list[_Request], results: list[dict[str, np.ndarray]], compute_s: float
    ) -> None:
        rows = sum(r.rows for r in batch)
        ewma = self._compute_ewma_s
        self._compute_ewma_s = compute_s if ewma is None else 0.9 * ewma + 0.1 * compute_s
        self._notify(lambda o: o.on_batch(rows, len(batch), compute_s))
        for req, out in zip(batch, results, strict=True):
            if not req.future.done():
                req.future.set_result(out)
                self._notify_done(self._queue_time(req), "ok")
        if self._sampler is not None:
            try:
                if self._sampler.want():
                    self._sampler.offer([r.arrays for r in batch])
            except Exception:
                log.exception("batch sampler failed")

    def _batch_done(self) -> None:
        assert self._sem is not None and self._wakeup is not None
        self._inflight -= 1
        self._sem.release()
        self._wakeup.set()  # _wait_for_more re-checks the in-flight count

    def _compute(
        self, inputs: list[dict[str, np.ndarray]], rows: list[int]
    ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Worker thread: concatenate once per input, run, split into per-request row views."""
        t0 = time.perf_counter()
        if len(inputs) == 1:
            merged = inputs[0]  # nothing to merge: no copy
        else:
            merged = {name: np.concatenate([a[name] for a in inputs]) for name in inputs[0]}
        outputs = self._pool.run(merged)
        results: list[dict[str, np.ndarray]] = []
        start = 0
        for n in rows:
            results.append({name: arr[start : start + n] for name, arr in outputs.items()})
            start += n
        return results, time.perf_counter() - t0

    def _fail(self, batch: list[_Request], exc: BnserveError) -> None:
        for req in batch:
            req.queued = False
            if not req.future.done():
                req.future.set_exception(exc)
                self._notify_done(self._queue_time(req), _outcome(exc))

    # ------------------------------------------------------------------------------ close

    async def close(self, grace: float) -> None:
        """Stop accepting, finish what was accepted within `grace` seconds, then stop.

        Requests still queued or computing at the grace deadline fail with ShuttingDownError.
        Idempotent. Does not close the pool (the model owns it).
        """
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        pending: set[asyncio.Task[None]] = set(self._batches)
        if self._scheduler is not None:
            pending.add(self._scheduler)
        end = time.monotonic() + max(0.0, grace)
        # Bounded by `end`: the scheduler exits once the queue is empty, and each batch task
        # ends when its compute does.
        while pending:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=remaining)
            pending |= self._batches - done  # batches started while we waited
        if pending:
            log.warning("batcher: grace of %.3f s over, failing what is left", grace)
            self._fail(list(self._queue), ShuttingDownError("server shut down before compute"))
            self._queue.clear()
            self._queued_rows = 0
            self._notify_depth()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ observer

    def _notify(self, call: _ObserverCall) -> None:
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            log.exception("batch observer failed")

    def _notify_done(self, queue_s: float, outcome: Outcome) -> None:
        self._notify(lambda o: o.on_request_done(queue_s, outcome))

    def _notify_depth(self) -> None:
        depth = len(self._queue)
        self._notify(lambda o: o.on_queue_depth(depth))


class _ObserverCall(Protocol):
    def __call__(self, observer: BatchObserver, /) -> None: ...


def _outcome(exc: BnserveError) -> Outcome:
    if isinstance(exc, ShuttingDownError):
        return "shutdown"
    if isinstance(exc, DeadlineExceededError):
        return "deadline"
    return "error"
