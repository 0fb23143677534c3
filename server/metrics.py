"""Prometheus metrics for the inference server, on prometheus-client (no hand-written exposition).

Every `Metrics` owns its own `CollectorRegistry`, never the process-global one, so several servers
(or tests) in one process do not collide. The hot path (one call per request or batch) is a dict
lookup of pre-bound label children plus an inc/observe: `observer()` binds a model version's
children once, `request_done()` caches them per (model, version) and per (model, version, code).

Who reports what:
- the servicer: `request_done` once per RPC request (a unary call or one stream message), with
  the gRPC status name ("OK" = success) and its total duration; `inflight_inc/dec` (or
  `inflight()`) around each request; for an unknown model the name as given and version "".
- the batcher, through `observer(model, version)`: rows, runs, batch sizes, queue and compute
  times, queue depth.
- the model repository: `load_failure`, `set_ready`, `remove` on unload.

Sample names (what `/metrics` shows and `snapshot` reads):
    bnserve_request_success_total{model,version}
    bnserve_request_failure_total{model,version,code}
    bnserve_inference_count_total{model,version}          rows inferred
    bnserve_execution_count_total{model,version}          onnxruntime runs (batches)
    bnserve_batch_size{model,version}                     histogram: rows per run
    bnserve_batch_requests{model,version}                 histogram: requests merged per run
    bnserve_queue_duration_seconds{model,version}         histogram, per request
    bnserve_compute_duration_seconds{model,version}       histogram, per run
    bnserve_request_duration_seconds{model,version}       histogram, per request (servicer)
    bnserve_inflight_requests                             gauge
    bnserve_queue_depth{model,version}                    gauge
    bnserve_model_load_failures_total{model}
    bnserve_model_ready{model,version}                    gauge, 1/0
    bnserve_bn_drift{model,version,layer}                 gauge, drift score (docs/drift.md)
    bnserve_bn_drift_channels{model,version,layer}        gauge, channels of that layer
    bnserve_drift_samples_total{model,version}            batches scored by the drift monitor
    bnserve_drift_dropped_total{model,version}            sampled batches dropped (queue full)
The drift series exist only with --drift-sample-rate > 0, for versions with a drift reference.
Counters and histograms also get prometheus-client's `_created` series.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

if TYPE_CHECKING:
    from .batcher import BatchObserver, Outcome

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "Metrics",
]

# Rows (or requests) per run: 1, 2, 4, ..., 256 (+Inf is added by prometheus-client).
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = tuple(float(2**i) for i in range(9))

# Seconds, 50 us .. 10 s: a small model runs in tens of microseconds.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)

_MV = ("model", "version")
# The samples prometheus-client exposes per metric type.
_SAMPLE_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


class _BatchChildren:
    """The batcher-side label children of one (model, version), bound once."""

    __slots__ = (
        "batch_requests",
        "batch_size",
        "compute",
        "execution",
        "inference",
        "queue",
        "queue_depth",
    )

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self.inference = m.inference_count.labels(model, version)
        self.execution = m.execution_count.labels(model, version)
        self.batch_size = m.batch_size.labels(model, version)
        self.batch_requests = m.batch_requests.labels(model, version)
        self.queue = m.queue_duration.labels(model, version)
        self.compute = m.compute_duration.labels(model, version)
        self.queue_depth = m.queue_depth.labels(model, version)


class _RequestChildren:
    """The servicer-side label children of one (model, version), bound on first use (so an
    unknown model name gets request series only, not batch series)."""

    __slots__ = ("duration", "success")

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self.success = m.request_success.labels(model, version)
        self.duration = m.request_duration.labels(model, version)


class _ModelObserver:
    """A `BatchObserver` updating one model version's collectors (called on the event loop)."""

    __slots__ = ("_c",)

    def __init__(self, children: _BatchChildren) -> None:
        self._c = children

    def on_batch(self, rows: int, requests: int, compute_s: float) -> None:
        c = self._c
        c.inference.inc(rows)
        c.execution.inc()
        c.batch_size.observe(rows)
        c.batch_requests.observe(requests)
        c.compute.observe(compute_s)

    def on_request_done(self, queue_s: float, outcome: Outcome) -> None:
        # An overloaded request was refused at the door: it never waited in the queue.
        if outcome != "overloaded":
            self._c.queue.observe(queue_s)

    def on_queue_depth(self, depth: int) -> None:
        self._c.queue_depth.set(depth)


class Metrics:
    """The server's collectors on a private registry, plus an optional /metrics HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_success = Counter(
            "bnserve_request_success",
            "RPC requests (unary calls or stream messages) that succeeded.",
            _MV,
            registry=r,
        )
        self.request_failure = Counter(
            "bnserve_request_failure",
            "RPC requests that failed, by gRPC status name.",
            (*_MV, "code"),
            registry=r,
        )
        self.inference_count = Counter(
            "bnserve_inference_count",
            "Samples (batch rows) inferred.",
            _MV,
            registry=r,
        )
        self.execution_count = Counter(
            "bnserve_execution_count",
            "Model executions (onnxruntime runs, i.e. batches).",
            _MV,
            registry=r,
        )
        self.batch_size = Histogram(
            "bnserve_batch_size",
            "Rows per model execution.",
            _MV,
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.batch_requests = Histogram(
            "bnserve_batch_requests",
            "Requests merged into one model execution.",
            _MV,
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.queue_duration = Histogram(
            "bnserve_queue_duration_seconds",
            "Seconds a request waited in the batcher queue before its batch started.",
            _MV,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.compute_duration = Histogram(
            "bnserve_compute_duration_seconds",
            "Seconds per model execution (including concatenate and split).",
            _MV,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.request_duration = Histogram(
            "bnserve_request_duration_seconds",
            "Total seconds per RPC request, as seen by the servicer.",
            _MV,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.inflight_requests = Gauge(
            "bnserve_inflight_requests",
            "RPC requests being handled right now.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "bnserve_queue_depth",
            "Requests waiting in the batcher queue.",
            _MV,
            registry=r,
        )
        self.model_load_failures = Counter(
            "bnserve_model_load_failures",
            "Model loads that were refused or failed.",
            ("model",),
            registry=r,
        )
        self.model_ready = Gauge(
            "bnserve_model_ready",
            "1 when the model version takes requests, else 0.",
            _MV,
            registry=r,
        )
        self.bn_drift = Gauge(
            "bnserve_bn_drift",
            "Symmetric KL divergence between the training and the live per-channel Gaussians of "
            "a folded BN layer's output, averaged over channels.",
            (*_MV, "layer"),
            registry=r,
        )
        self.bn_drift_channels = Gauge(
            "bnserve_bn_drift_channels",
            "Channels of a drift-monitored layer (the score is their mean).",
            (*_MV, "layer"),
            registry=r,
        )
        self.drift_samples = Counter(
            "bnserve_drift_samples",
            "Sampled batches the drift monitor scored.",
            _MV,
            registry=r,
        )
        self.drift_dropped = Counter(
            "bnserve_drift_dropped",
            "Sampled batches the drift monitor dropped because its queue was full.",
            _MV,
            registry=r,
        )
        self._mv_collectors: tuple[Counter | Gauge | Histogram, ...] = (
            self.request_success,
            self.inference_count,
            self.execution_count,
            self.batch_size,
            self.batch_requests,
            self.queue_duration,
            self.compute_duration,
            self.request_duration,
            self.queue_depth,
            self.model_ready,
        )
        self._samples = frozenset(
            fam.name + suffix
            for collector in (
                *self._mv_collectors,
                self.request_failure,
                self.model_load_failures,
                self.bn_drift,
                self.bn_drift_channels,
                self.drift_samples,
                self.drift_dropped,
            )
            for fam in collector.describe()
            for suffix in _SAMPLE_SUFFIXES[fam.type]
        ) | {"bnserve_inflight_requests"}
        self._batch: dict[tuple[str, str], _BatchChildren] = {}
        self._requests: dict[tuple[str, str], _RequestChildren] = {}
        self._failures: dict[tuple[str, str, str], Counter] = {}
        self._lock = threading.Lock()  # binding and removing only; never taken once bound
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # ------------------------------------------------------------------------------ hot path

    def observer(self, model: str, version: str) -> BatchObserver:
        """A BatchObserver for one model version's batcher (label children bound now, once per
        model version: observers of the same version share them)."""
        key = (model, version)
        with self._lock:
            children = self._batch.get(key)
            if children is None:
                children = self._batch[key] = _BatchChildren(self, model, version)
        return _ModelObserver(children)

    def request_done(self, model: str, version: str, code: str, duration_s: float) -> None:
        """One RPC request ended with gRPC status `code` ("OK" = success) after duration_s
        seconds. For an unknown model pass the name as given and version ""."""
        children = self._requests.get((model, version))
        if children is None:
            with self._lock:
                children = self._requests.setdefault(
                    (model, version), _RequestChildren(self, model, version)
                )
        children.duration.observe(duration_s)
        if code == "OK":
            children.success.inc()
            return
        failure = self._failures.get((model, version, code))
        if failure is None:
            with self._lock:
                failure = self._failures.setdefault(
                    (model, version, code), self.request_failure.labels(model, version, code)
                )
        failure.inc()

    def inflight_inc(self) -> None:
        self.inflight_requests.inc()

    def inflight_dec(self) -> None:
        self.inflight_requests.dec()

    @contextmanager
    def inflight(self) -> Iterator[None]:
        """Count one in-flight request for the duration of the block."""
        self.inflight_requests.inc()
        try:
            yield
        finally:
            self.inflight_requests.dec()

    # ------------------------------------------------------------------------------ model life

    def load_failure(self, model: str) -> None:
        self.model_load_failures.labels(model).inc()

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        self.model_ready.labels(model, version).set(1 if ready else 0)

    def remove(self, model: str, version: str) -> None:
        """Drop every series of one model version (on unload). Observers handed out earlier
        keep updating children that are no longer exported: make a new one on reload."""
        with self._lock:
            self._batch.pop((model, version), None)
            self._requests.pop((model, version), None)
            for collector in self._mv_collectors:
                collector.remove(model, version)
            for key in [k for k in self._failures if k[:2] == (model, version)]:
                del self._failures[key]
                self.request_failure.remove(*key)

    # ------------------------------------------------------------------------------ drift

    def drift_score(
        self, model: str, version: str, layer: str, score: float, channels: int
    ) -> None:
        self.bn_drift.labels(model, version, layer).set(score)
        self.bn_drift_channels.labels(model, version, layer).set(channels)

    def drift_sample(self, model: str, version: str, dropped: bool) -> None:
        (self.drift_dropped if dropped else self.drift_samples).labels(model, version).inc()

    def drift_remove(self, model: str, version: str, layers: Sequence[str]) -> None:
        """Drop a monitor's series (its version was unloaded)."""
        with self._lock:
            for layer in layers:
                for gauge in (self.bn_drift, self.bn_drift_channels):
                    with contextlib.suppress(KeyError):
                        gauge.remove(model, version, layer)
            for counter in (self.drift_samples, self.drift_dropped):
                with contextlib.suppress(KeyError):
                    counter.remove(model, version)

    # ------------------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def snapshot(self, name: str, **labels: str) -> float:
        """The value of one sample, e.g. snapshot("bnserve_inference_count_total", model="m",
        version="1"); histogram buckets need le="4.0". 0.0 for a series not created yet;
        KeyError for a name that is no sample of these collectors."""
        value = self.registry.get_sample_value(name, labels)
        if value is not None:
            return value
        if name not in self._samples:
            raise KeyError(f"no metric sample named {name!r}")
        return 0.0

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a daemon thread; returns the bound port (port 0 = an
        ephemeral port chosen by the OS). Raises OSError when the port is taken."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP endpoint already started")
        server, thread = start_http_server(port, host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def stop_http(self, timeout: float = 5.0) -> None:
        """Stop the /metrics endpoint and free its port. Idempotent."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout)

    @property
    def http_port(self) -> int | None:
        """The bound port of the /metrics endpoint, or None when it is not running."""
        return None if self._http is None else int(self._http[0].server_address[1])
