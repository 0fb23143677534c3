"""Per-model statistics for the ModelStatistics RPC (what Triton reports and perf_analyzer reads).

Plain counters updated on the event-loop thread (the batcher calls observers there), so no
locks are needed. Durations are kept in integer nanoseconds, as on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .batcher import BatchObserver, Outcome


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """One model version's counters since it was loaded."""

    name: str
    version: str
    last_inference_ms: int = 0  # wall-clock ms since the epoch of the last completed request
    inference_count: int = 0  # samples (rows)
    execution_count: int = 0  # onnxruntime runs (batches)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # rows -> compute time

    # BatchObserver ---------------------------------------------------------------------------
    def on_batch(self, rows: int, requests: int, compute_s: float) -> None:
        self.execution_count += 1
        self.inference_count += rows
        # Per-request phases, as Triton counts them: each request of the batch once, with the
        # whole batch's duration (perf_analyzer divides by request counts).
        self.compute_infer.count += requests
        self.compute_infer.ns += requests * int(compute_s * 1e9)
        self.batches.setdefault(rows, Duration()).add(compute_s)

    def on_request_done(self, queue_s: float, outcome: Outcome) -> None:
        if outcome == "ok":
            self.queue.add(queue_s)

    def on_queue_depth(self, depth: int) -> None:
        pass

    # servicer --------------------------------------------------------------------------------
    def request_done(self, ok: bool, duration_s: float) -> None:
        (self.success if ok else self.fail).add(duration_s)
        if ok:
            self.last_inference_ms = int(time.time() * 1000)


class Tee:
    """Fan one batcher's callbacks out to several observers (metrics and statistics)."""

    def __init__(self, observers: Iterable[BatchObserver]) -> None:
        self._observers = tuple(observers)

    def on_batch(self, rows: int, requests: int, compute_s: float) -> None:
        for o in self._observers:
            o.on_batch(rows, requests, compute_s)

    def on_request_done(self, queue_s: float, outcome: Outcome) -> None:
        for o in self._observers:
            o.on_request_done(queue_s, outcome)

    def on_queue_depth(self, depth: int) -> None:
        for o in self._observers:
            o.on_queue_depth(depth)


class StatsBook:
    """Statistics of every model version the server has served, by (name, version)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}

    def get(self, name: str, version: str) -> ModelStats:
        key = (name, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(name, version)
        return stats

    def select(self, name: str = "", version: str = "") -> list[ModelStats]:
        return [
            s
            for (n, v), s in sorted(self._stats.items())
            if (not name or n == name) and (not version or v == version)
        ]
