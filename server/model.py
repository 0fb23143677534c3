"""Loading a frozen Batch-Normalization network into a pool of onnxruntime sessions.

Two gates run before a model can serve:

* `check_frozen`: every BatchNormalization node is in inference mode (running statistics, one
  output). A BN in training mode normalizes with the statistics of the batch, so a sample's
  output would depend on whichever requests it was batched with.
* `check_batch_invariance`: the end-to-end proof of the same property. Each sample run alone
  must give bitwise the same output rows as the whole batch run at once; this also catches
  batch-dependent graphs that contain no BN at all (e.g. x - ReduceMean(x, axes=[0])).

Only then does the dynamic batcher (server/batcher.py) merge requests: it relies on the
property that merging never changes a result.

Numerics: sessions use ONE intra-op thread. Measured with onnxruntime 1.32 on the reference
Conv+BN+Gemm model: with one thread a sample's output is bitwise identical alone or in a batch of
5/16/64; with two threads it differs by up to 3.8e-6, because the work split (and therefore the
float summation order) depends on the batch size. Parallelism comes from several sessions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BnserveError, InvalidInputError, ModelLoadError, ShuttingDownError
from .types import ORT_TO_V2, TensorSpec

__all__ = [
    "ARENA_KEEP_INPUT_BYTES",
    "SHRINK_RUN",
    "LoadedModel",
    "ModelSpec",
    "SessionPool",
    "check_batch_invariance",
    "check_frozen",
    "load_model",
    "session_options",
    "validate_inputs",
]

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
_PROVIDERS = ["CPUExecutionProvider"]


def session_options() -> ort.SessionOptions:
    """Options for every session: single-threaded, sequential, fully optimized.

    One intra-op thread is what makes a row's result independent of the batch it is computed
    in (see the module docstring); throughput comes from running several sessions at once.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The memory arena stays on (measured: ~10% on vol3d at batch 1, ~4 us a digits request),
    # but a run with large inputs shrinks it afterwards (SHRINK_RUN): without that every session
    # would keep the largest batch's activations for good (vol3d at batch 64: a session from
    # 85 to 253 MB; with the shrink it is back at 93 MB).
    so.enable_cpu_mem_arena = True
    return so


# Runs whose inputs take more bytes than this give their arena memory back when they end
# (vol3d: above 4 rows; digits never). Below it the arena keeps its blocks for the next run.
ARENA_KEEP_INPUT_BYTES = 512 * 1024


def _shrink_run_options() -> ort.RunOptions:
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


SHRINK_RUN = _shrink_run_options()


# --------------------------------------------------------------------------------------------
# Gate 1: frozen BatchNormalization


def _load_onnx(model: str | os.PathLike[str] | bytes) -> onnx.ModelProto:
    """Parse an ONNX model (protobuf only: no pickle, no code) or raise ModelLoadError."""
    try:
        if isinstance(model, bytes | bytearray):
            proto = onnx.load_model_from_string(bytes(model))
        else:
            # From a path so that external-data tensors next to the file resolve.
            proto = onnx.load(os.fspath(model))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file not found: {_describe(model)}") from exc
    except Exception as exc:  # DecodeError, OSError, ValueError...: all mean "not loadable"
        raise ModelLoadError(
            f"not a readable ONNX model ({type(exc).__name__}: {exc}): {_describe(model)}"
        ) from exc
    if not proto.graph.node and not proto.graph.output:
        # protobuf happily parses many byte strings (an empty file, some truncations) into an
        # empty message; an ONNX model without a graph is not something we can serve.
        raise ModelLoadError(f"not an ONNX model (no graph): {_describe(model)}")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"invalid ONNX model ({exc}): {_describe(model)}") from exc
    return proto


def _describe(model: str | os.PathLike[str] | bytes) -> str:
    if isinstance(model, bytes | bytearray):
        return f"<{len(model)} bytes>"
    return os.fspath(model)


def _node_label(node: onnx.NodeProto, where: str) -> str:
    name = node.name or f"<unnamed, outputs {list(node.output)}>"
    return f"{node.op_type} node {name!r} in {where}"


def _iter_nodes(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.NodeProto, str]]:
    """All nodes of a graph including nested subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node, where
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g, f"{where}/{node.name or node.op_type}.{attr.name}")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, sub in enumerate(attr.graphs):
                    yield from _iter_nodes(
                        sub, f"{where}/{node.name or node.op_type}.{attr.name}[{i}]"
                    )


def _all_nodes(proto: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node: the main graph, its subgraphs, and model-local functions."""
    yield from _iter_nodes(proto.graph, "main graph")
    for f in proto.functions:
        # Wrapped in a graph to walk it the same way.
        yield from _iter_nodes(onnx.helper.make_graph(f.node, f.name, [], []), f"function {f.name}")


# Ops whose answer for one sample is computed from the whole tensor, the batch included: what
# the batch-invariance gate's message names as the cause when the graph has one.
BATCH_WIDE_OPS: dict[str, str] = {
    "DynamicQuantizeLinear": (
        "takes its scale and zero point from the whole input, batch included (dynamic "
        "quantization); quantize statically instead, with scales calibrated once "
        "(onnxruntime.quantization.quantize_static)"
    ),
}


def batch_wide_nodes(proto: onnx.ModelProto) -> list[str]:
    """Each node of a BATCH_WIDE_OPS op, with why it makes answers depend on the batch."""
    return [
        f"{_node_label(node, where)} {BATCH_WIDE_OPS[node.op_type]}"
        for node, where in _all_nodes(proto)
        if node.op_type in BATCH_WIDE_OPS and node.domain in ("", "ai.onnx")
    ]


def check_frozen(model: str | os.PathLike[str] | bytes) -> onnx.ModelProto:
    """Refuse a model that is not ONNX or has a BatchNormalization node in training mode.

    Training mode is: `training_mode=1` (opset >= 14), `is_test=0` (opset <= 6), or any output
    beyond the first in use (running/saved mean and variance only exist in training).
    Returns the parsed model. Raises ModelLoadError naming the offending node.
    """
    proto = _load_onnx(model)
    for node, where in _all_nodes(proto):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = _node_label(node, where)
        if attrs.get("training_mode", 0) != 0:
            raise ModelLoadError(
                f"{label} is in training mode (training_mode={attrs['training_mode']}); "
                "export the network in eval mode so BN uses its running statistics"
            )
        if "is_test" in attrs and attrs["is_test"] == 0:
            raise ModelLoadError(f"{label} is in training mode (is_test=0)")
        extra = [o for o in node.output[1:] if o]
        if extra:
            raise ModelLoadError(
                f"{label} is in training mode: it outputs batch statistics {extra}"
            )
    return proto


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a served model looks like from outside (the metadata RPC, the codec).

    With max_batch_size > 0 every input and output has the batch axis first, as -1.
    With max_batch_size == 0 the model does not batch and shapes are reported as they are.
    """

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    platform: str = PLATFORM

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidInputError(f"model {self.name!r} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidInputError(f"model {self.name!r} has no output {name!r}")


def _dim(d: Any) -> int:
    # onnxruntime gives ints for fixed dims and str/None for symbolic or unknown ones.
    return d if isinstance(d, int) and d >= 0 else -1


def _tensor_specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        if arg.type not in ORT_TO_V2:
            raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
        specs.append(TensorSpec(arg.name, ORT_TO_V2[arg.type], tuple(_dim(d) for d in arg.shape)))
    return tuple(specs)


def validate_inputs(
    inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray], *, batched: bool
) -> int:
    """Light checks before a request reaches a session (the codec validates fully).

    Names, dtypes, ranks and fixed dims must match; with `batched`, every input must have the
    same number of rows (>= 1). Returns that number of rows (1 when not batched).
    """
    names = {s.name for s in inputs}
    if set(arrays) != names:
        missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
        raise InvalidInputError(
            f"inputs must be exactly {sorted(names)}: missing {missing}, unexpected {extra}"
        )
    rows: int | None = None
    for spec in inputs:
        arr = arrays[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InvalidInputError(f"input {spec.name!r} is not an array")
        if arr.dtype != spec.dtype:
            raise InvalidInputError(
                f"input {spec.name!r} has dtype {arr.dtype}, expected {spec.datatype}"
            )
        if arr.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, arr.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input {spec.name!r} has shape {list(arr.shape)}, expected {list(spec.shape)}"
            )
        if batched:
            if rows is None:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise InvalidInputError(
                    f"inputs disagree on the batch size: {spec.name!r} has {arr.shape[0]} rows, "
                    f"others {rows}"
                )
    if batched and (rows is None or rows < 1):
        raise InvalidInputError("a request needs at least one row")
    return rows if batched and rows is not None else 1


# --------------------------------------------------------------------------------------------
# Session pool


class SessionPool:
    """N onnxruntime sessions of one model; `run` borrows a free one (blocking).

    Safe to call from any number of threads: at most N runs proceed at once, the rest wait for
    a session. A free list under a Condition (rather than a bare queue) so that close() can wake
    waiters. LIFO, so the most recently used (cache-warm) session is reused first.
    """

    def __init__(self, model_path: str | os.PathLike[str], instances: int | None = None) -> None:
        n = instances if instances is not None else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"instances must be >= 1, got {n}")
        self._path = os.fspath(model_path)
        try:
            sessions = [
                ort.InferenceSession(self._path, session_options(), providers=_PROVIDERS)
                for _ in range(n)
            ]
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {self._path}: {exc}") from exc
        self._all: tuple[ort.InferenceSession, ...] = tuple(sessions)
        self._free: list[ort.InferenceSession] = list(sessions)
        self._cond = threading.Condition()
        self._closed = False
        self.inputs: tuple[TensorSpec, ...] = _tensor_specs(sessions[0].get_inputs())
        self.outputs: tuple[TensorSpec, ...] = _tensor_specs(sessions[0].get_outputs())
        self._output_names = [o.name for o in self.outputs]

    @property
    def size(self) -> int:
        return len(self._all)

    @property
    def sessions(self) -> tuple[ort.InferenceSession, ...]:
        """All sessions (for inspection, e.g. of their options; not for running)."""
        return self._all

    @property
    def closed(self) -> bool:
        return self._closed

    def _acquire(self) -> ort.InferenceSession:
        with self._cond:
            while not self._free:
                if self._closed:
                    raise ShuttingDownError("model is unloading")
                self._cond.wait()
            if self._closed:
                raise ShuttingDownError("model is unloading")
            return self._free.pop()

    def _release(self, session: ort.InferenceSession) -> None:
        with self._cond:
            if not self._closed:
                self._free.append(session)
                self._cond.notify()

    def run(
        self, arrays: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch on a free session (blocks until one is free).

        Raises ShuttingDownError after close(); any onnxruntime failure becomes a BnserveError
        (INTERNAL): inputs are expected to be validated by then.
        """
        names = list(output_names) if output_names is not None else self._output_names
        feed = dict(arrays)
        big = sum(a.nbytes for a in feed.values()) > ARENA_KEEP_INPUT_BYTES
        session = self._acquire()
        try:
            results = session.run(names, feed, SHRINK_RUN if big else None)
        except Exception as exc:
            raise BnserveError(f"onnxruntime failed: {exc}") from exc
        finally:
            self._release(session)
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        """Refuse further runs and drop the sessions once their current runs end."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# Gate 2: batch invariance


def _sample_inputs(
    inputs: Sequence[TensorSpec], rows: int, free_dim_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic random inputs: batch axis = rows, other free dims = free_dim_size.

    Integers and booleans are drawn from {0, 1} so that index-like inputs (Gather) stay valid.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = (rows, *(d if d >= 0 else free_dim_size for d in spec.shape[1:]))
        if spec.dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return out


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(diff)) if not np.all(np.isnan(diff)) else float("nan")


def check_batch_invariance(
    pool: SessionPool,
    *,
    batch_sizes: Sequence[int] = (5,),
    free_dim_size: int = 8,
    seed: int = 0,
    proto: onnx.ModelProto | None = None,
) -> None:
    """Refuse (ModelLoadError) a model whose output rows depend on the rest of the batch.

    For deterministic random inputs, runs every sample alone and then the first `b` samples as
    one batch for each b in batch_sizes; every output row must be bitwise equal. With the
    model's graph (`proto`), the message names the nodes that explain it (batch_wide_nodes).
    """
    sizes = sorted({b for b in batch_sizes if b >= 2})
    if not sizes:
        return
    rows = sizes[-1]
    batch = _sample_inputs(pool.inputs, rows, free_dim_size, seed)
    try:
        singles = [pool.run({k: v[i : i + 1] for k, v in batch.items()}) for i in range(rows)]
        batched = {b: pool.run({k: v[:b] for k, v in batch.items()}) for b in sizes}
    except BnserveError as exc:
        raise ModelLoadError(
            f"batch-invariance check could not run the model on inputs "
            f"{ {k: list(v.shape) for k, v in batch.items()} }: {exc.message}"
        ) from exc
    for b, outputs in batched.items():
        for out in pool.outputs:
            got = outputs[out.name]
            if got.ndim == 0 or got.shape[0] != b:
                raise ModelLoadError(
                    f"output {out.name!r} has shape {list(got.shape)} for a batch of {b}: "
                    "its first axis is not the batch axis"
                )
            alone = np.concatenate([s[out.name] for s in singles[:b]])
            if alone.shape != got.shape or alone.tobytes() != got.tobytes():
                causes = batch_wide_nodes(proto) if proto is not None else []
                because = f"; the cause: {'; '.join(causes)}" if causes else ""
                raise ModelLoadError(
                    f"model is not batch-invariant: output {out.name!r} differs between samples "
                    f"run alone and in a batch of {b} (max abs difference "
                    f"{_max_abs_diff(alone, got):.3g}); it would change results under dynamic "
                    f"batching{because}"
                )


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve: its spec, its sessions, and when it was loaded."""

    spec: ModelSpec
    pool: SessionPool
    path: str
    loaded_at: float = field(default_factory=time.monotonic)  # time.monotonic()

    def close(self) -> None:
        self.pool.close()


def load_model(
    path: str | os.PathLike[str],
    *,
    name: str,
    version: str | int,
    max_batch_size: int,
    instances: int | None = None,
    check_invariance: bool = True,
    invariance_batch_sizes: Sequence[int] = (5,),
    free_dim_size: int = 8,
) -> LoadedModel:
    """Gate a model file and build its session pool; raises ModelLoadError when refused.

    max_batch_size > 0: every input and output must have a dynamic first (batch) axis, and the
    batch-invariance gate runs with batches of min(b, max_batch_size) rows.
    max_batch_size == 0: the model does not batch; shapes are served as the model declares.
    `instances` defaults to os.cpu_count().
    """
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    path = os.fspath(path)
    if not Path(path).is_file():
        raise ModelLoadError(f"model file not found: {path}")
    t0 = time.perf_counter()
    proto = check_frozen(path)
    pool = SessionPool(path, instances)
    try:
        inputs, outputs = pool.inputs, pool.outputs
        if max_batch_size > 0:
            for tensor in (*inputs, *outputs):
                if not tensor.shape or tensor.shape[0] != -1:
                    raise ModelLoadError(
                        f"{tensor.name!r} has shape {list(tensor.shape)}: a batching model "
                        "(max_batch_size > 0) needs a dynamic first axis on every input and "
                        "output; use max_batch_size 0 for a fixed-shape model"
                    )
            if check_invariance:
                check_batch_invariance(
                    pool,
                    batch_sizes=[min(b, max_batch_size) for b in invariance_batch_sizes],
                    free_dim_size=free_dim_size,
                    proto=proto,
                )
    except BaseException:
        pool.close()
        raise
    spec = ModelSpec(
        name=name,
        version=str(version),
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
    )
    log.info(
        "loaded model %s version %s from %s: %d sessions, max_batch_size %d, %.3f s",
        name,
        spec.version,
        path,
        pool.size,
        max_batch_size,
        time.perf_counter() - t0,
    )
    return LoadedModel(spec=spec, pool=pool, path=path)
