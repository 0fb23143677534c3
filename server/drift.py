"""Drift monitoring from the frozen BN statistics (docs/drift.md). Off unless
`--drift-sample-rate` > 0.

A folded Conv / Gemm outputs what its BN output in training; config.json records, per such layer
and channel, the mean and variance of that output over the training data
(versions[v]["drift_reference"], written by training/drift_reference.py). A DriftMonitor runs a
sampled fraction of the served batches through its own one-session copy of the model that also
outputs those tensors, keeps a running per-channel mean and variance of each, and scores each
layer by the symmetric KL divergence between the reference and live per-channel Gaussians,
averaged over channels.

The request path only pays `want()` (a counter) per batch and, for a sampled batch, a
non-blocking put of references to the request arrays onto a bounded queue, after the batch's
results were delivered. Everything else runs on the monitor's single worker thread; a sample that
finds the queue full is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from .model import SHRINK_RUN, session_options

__all__ = [
    "DriftMonitor",
    "DriftSink",
    "LayerReference",
    "channel_moments",
    "parse_reference",
    "symmetric_kl",
    "with_outputs",
]

log = logging.getLogger(__name__)

QUEUE_SIZE = 4  # sampled batches waiting for the worker; more are dropped
WINDOW = 32  # running statistics: cumulative over the first WINDOW samples, then an EMA
VAR_EPS = 1e-5  # added to both variances (BN's usual eps): dead channels stay finite


class DriftSink(Protocol):
    """Where scores go (server/metrics.py Metrics). Called on the monitor's worker thread."""

    def drift_score(
        self, model: str, version: str, layer: str, score: float, channels: int
    ) -> None: ...

    def drift_sample(self, model: str, version: str, dropped: bool) -> None: ...

    def drift_remove(self, model: str, version: str, layers: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class LayerReference:
    tensor: str  # ONNX tensor name (output of the Conv / Gemm that absorbed the BN)
    layer: str  # BN layer name, or the tensor name when unknown
    mean: np.ndarray  # (C,) float64
    var: np.ndarray  # (C,) float64


def parse_reference(raw: Mapping[str, Any], version: str) -> list[LayerReference]:
    """The drift reference of one version from a config.json object; [] when there is none or
    it is malformed (logged: drift monitoring is optional, serving is not)."""
    try:
        ref = raw.get("versions", {}).get(version, {}).get("drift_reference")
        if not ref:
            return []
        out = []
        for item in ref["layers"]:
            mean = np.asarray(item["mean"], dtype=np.float64)
            var = np.asarray(item["var"], dtype=np.float64)
            if mean.ndim != 1 or mean.shape != var.shape or not len(mean):
                raise ValueError(f"layer {item.get('tensor')}: mean and var must be equal (C,)")
            tensor = str(item["tensor"])
            out.append(LayerReference(tensor, str(item.get("layer") or tensor), mean, var))
        return out
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("version %s: ignoring a malformed drift_reference: %s", version, exc)
        return []


def symmetric_kl(
    mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray
) -> np.ndarray:
    """KL(p||q) + KL(q||p) of 1-D Gaussians, elementwise:
    0.5 * (vp/vq + vq/vp - 2 + (mp - mq)^2 * (1/vp + 1/vq)); the log terms cancel."""
    vp, vq = var_p + VAR_EPS, var_q + VAR_EPS
    d2 = np.square(mean_p - mean_q)
    return 0.5 * (vp / vq + vq / vp - 2.0 + d2 * (1.0 / vp + 1.0 / vq))


class _Running:
    """Running per-channel first and second moments of one layer's output."""

    __slots__ = ("m1", "m2")

    def __init__(self) -> None:
        self.m1: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, m1: np.ndarray, m2: np.ndarray, weight: float) -> None:
        """Fold in one sample's per-channel E[x] and E[x^2]."""
        m1, m2 = m1.astype(np.float64), m2.astype(np.float64)
        if self.m1 is None or self.m2 is None:
            self.m1, self.m2 = m1, m2
        else:
            self.m1 += weight * (m1 - self.m1)
            self.m2 += weight * (m2 - self.m2)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.m1 is not None and self.m2 is not None
        return self.m1, np.maximum(self.m2 - np.square(self.m1), 0.0)


def _moments_graph(path: str, tensors: Sequence[str]) -> tuple[bytes, list[str]] | None:
    """A copy of the model that also outputs, per tensor, its per-channel E[x] and E[x^2]
    (ReduceMean over every axis but 1), so a sample is one onnxruntime call that releases the
    GIL. None when a tensor's rank is unknown or the opset predates ReduceMean's axes input."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(path))
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*proto.graph.value_info, *proto.graph.output)
        if v.type.tensor_type.HasField("shape")
    }
    if opset < 18 or any(ranks.get(t, 0) < 2 for t in tensors):
        return None
    outputs: list[str] = []
    h = onnx.helper
    for i, t in enumerate(tensors):
        axes = f"bnserve_drift_axes_{i}"
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array([0, *range(2, ranks[t])], np.int64), axes)
        )
        sq, m1, m2 = (f"bnserve_drift_{k}_{i}" for k in ("sq", "m1", "m2"))
        proto.graph.node.extend(
            [
                h.make_node("ReduceMean", [t, axes], [m1], keepdims=0),
                h.make_node("Mul", [t, t], [sq]),
                h.make_node("ReduceMean", [sq, axes], [m2], keepdims=0),
            ]
        )
        for name in (m1, m2):
            proto.graph.output.append(h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        outputs += [m1, m2]
    return proto.SerializeToString(), outputs


def with_outputs(proto: onnx.ModelProto, tensors: Sequence[str]) -> bytes:
    """A serialized copy of `proto` that also outputs `tensors` (float, shape left unknown).
    Used here (the monitor's fallback graph) and at export (training/drift_reference.py)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in present:
            copy.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return copy.SerializeToString()


def channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (axis 1) sum and sum of squares in float64 over every other axis, and the
    number of values per channel (their quotients are E[x] and E[x^2])."""
    axes = (0, *range(2, x.ndim))
    x64 = x.astype(np.float64, copy=False)
    return x64.sum(axis=axes), np.square(x64).sum(axis=axes), x.size // x.shape[1]


class DriftMonitor:
    """Per-layer drift scores of one served model version.

    `want()` and `offer()` are the batcher's sampler (server/batcher.py BatchSampler): called on
    the event loop, never blocking. `close()` stops the worker and removes the version's series.
    """

    def __init__(
        self,
        model: str,
        version: str,
        path: str,
        layers: Sequence[LayerReference],
        *,
        rate: float,
        sink: DriftSink | None = None,
    ) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"drift sample rate must be in (0, 1], got {rate}")
        if not layers:
            raise ValueError("no reference layers")
        self.model, self.version, self.rate = model, version, rate
        self.layers = list(layers)
        self._sink = sink
        tensors = [ref.tensor for ref in self.layers]
        graph = _moments_graph(path, tensors)
        # In-graph moments (two outputs per layer), else the raw tensors and numpy.
        self._in_graph = graph is not None
        built, self._names = (
            graph if graph is not None else (with_outputs(onnx.load(path), tensors), tensors)
        )
        self._session = ort.InferenceSession(
            built, session_options(), providers=["CPUExecutionProvider"]
        )
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._running = [_Running() for _ in self.layers]
        self._batches = 0  # deterministic sampling: every batch where floor(n * rate) steps
        self._lock = threading.Lock()  # scores/samples are read from other threads
        self._scores: dict[str, float] = {}
        self.samples = 0
        self.dropped = 0
        self._queue: queue.Queue[list[dict[str, np.ndarray]] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(
            target=self._work, name=f"bnserve-drift-{model}-{version}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------------------ request path

    def want(self) -> bool:
        """Whether this batch is sampled: a deterministic counter, rate R = 1 in every 1/R."""
        n = self._batches = self._batches + 1
        return math.floor(n * self.rate) != math.floor((n - 1) * self.rate)

    def offer(self, inputs: list[dict[str, np.ndarray]]) -> None:
        """Queue one batch's per-request input arrays (references, never mutated), or drop it."""
        try:
            self._queue.put_nowait(inputs)
        except queue.Full:
            self.dropped += 1
            if self._sink is not None:
                self._sink.drift_sample(self.model, self.version, True)

    # ------------------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._observe(item)
            except Exception:
                log.exception("drift monitor %s/%s: sample failed", self.model, self.version)

    def _observe(self, inputs: list[dict[str, np.ndarray]]) -> None:
        if len(inputs) == 1:
            feed = {name: inputs[0][name] for name in self._input_names}
        else:
            feed = {name: np.concatenate([a[name] for a in inputs]) for name in self._input_names}
        # sampled rarely: give the arena back after each run rather than hold its peak
        outs = self._session.run(self._names, feed, SHRINK_RUN)
        n = self.samples + 1
        weight = max(1.0 / n, 1.0 / WINDOW)
        scores: dict[str, float] = {}
        if self._in_graph:
            moments = [(outs[2 * j], outs[2 * j + 1]) for j in range(len(self.layers))]
        else:
            sums = [channel_moments(np.asarray(out)) for out in outs]
            moments = [(s1 / n, s2 / n) for s1, s2, n in sums]
        for ref, running, (m1, m2) in zip(self.layers, self._running, moments, strict=True):
            running.update(np.asarray(m1), np.asarray(m2), weight)
            mean, var = running.moments()
            scores[ref.layer] = float(symmetric_kl(ref.mean, ref.var, mean, var).mean())
        with self._lock:
            self._scores = scores
            self.samples = n
        if self._sink is not None:
            for ref in self.layers:
                self._sink.drift_score(
                    self.model, self.version, ref.layer, scores[ref.layer], len(ref.mean)
                )
            self._sink.drift_sample(self.model, self.version, False)

    # ------------------------------------------------------------------------------ reading

    def scores(self) -> dict[str, float]:
        """{layer: score} after the latest processed sample ({} before the first)."""
        with self._lock:
            return dict(self._scores)

    def report(self) -> tuple[int, list[tuple[str, int, float]]]:
        """(batches scored, [(layer, channels, score)] in layer order): one consistent reading
        for ModelStatistics; no rows before the first scored batch."""
        with self._lock:
            rows = [
                (ref.layer, len(ref.mean), self._scores[ref.layer])
                for ref in self.layers
                if ref.layer in self._scores
            ]
            return self.samples, rows

    def idle(self) -> bool:
        """Nothing queued (the sample being computed, if any, may still be running)."""
        return self._queue.empty()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (queued samples are discarded) and remove the exported series."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):  # emptied above; never block anyway
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        if self._sink is not None:
            self._sink.drift_remove(self.model, self.version, [ref.layer for ref in self.layers])
