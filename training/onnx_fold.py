"""Fold BatchNormalization at the ONNX level, for networks trained elsewhere (Keras via tf2onnx, a
PyTorch export that kept BN, ...), verify the result and write a model repository entry.

An inference-mode BatchNormalization is a per-channel affine map on axis 1,

    y = (x - mean) * scale / sqrt(var + epsilon) + bias = x * s + t,

and Conv, ConvTranspose, Gemm and MatMul (+ Add) with constant weights are affine per output
channel, so the pair collapses into the producer: its weights are scaled by s along the output
channel axis and its bias becomes b * s + t. Folded here:

* Conv: W (M, C/group, k...) scaled on dim 0; bias added when absent.
* ConvTranspose: W (C_in, M/group, k...): output channel g * M/group + j lives on dim 1, index j,
  of the rows of group g, so W is scaled per group on dim 1.
* Gemm: Y = alpha * A' B' + beta * C. B' columns scaled (B is (K, N), or (N, K) with transB=1);
  the new C is beta * C * s + t broadcast (beta becomes 1), so alpha stays as it was.
* MatMul with a constant 2D weight (K, N) and a rank-2 output (N, C): columns scaled; the BN
  becomes an Add of t. MatMul + Add(constant bias): the same with the bias replaced by b * s + t.
  The rank must be known (shape inference): on a rank-3 output BN normalizes axis 1, not the
  MatMul's columns, and is kept.

A BN is folded only when it is in inference mode (training_mode 0, only its first output used),
its input is produced by one of the above whose output feeds nothing else (no other node, no
subgraph, not a graph output), and the weights, bias and BN parameters are initializers or
Constant nodes (an initializer that is also a graph input can be overridden at run time: not a
constant). Every other inference-mode BN is kept as it is. A BN in training mode is refused
(OnnxFoldError naming the node): it would normalize with the statistics of each batch.
`momentum` is ignored (it only matters when training); `epsilon` is used as given (Keras: 1e-3).

Only onnx, numpy and onnxruntime here (no torch): the bnserve.server gates are reused as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bnserve.server.errors import BnserveError
from bnserve.server.model import check_frozen, load_model, session_options
from bnserve.server.repository import BatchingSettings, validate_model_name

__all__ = [
    "FoldReport",
    "FoldedBN",
    "KeptBN",
    "OnnxExportError",
    "OnnxFoldError",
    "export_onnx_file",
    "fold_onnx_batchnorm",
    "make_batch_dynamic",
    "parity",
]

log = logging.getLogger("bnserve.training")

PARITY_TOLERANCE = 1e-5  # max abs error relative to the output's scale (as training/export.py)
MAX_BATCH_SIZE = 64
PARITY_BATCHES = (1, 16)
DEFAULT_EPSILON = 1e-5  # the ONNX default when the attribute is absent
_DOMAINS = ("", "ai.onnx")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


class OnnxFoldError(ValueError):
    """The ONNX model cannot be folded as it is (a BN in training mode); names the node."""


class OnnxExportError(RuntimeError):
    """The folded model failed a check (parity, the server's gates); the message has the numbers."""


@dataclass(frozen=True)
class FoldedBN:
    """One BatchNormalization folded away, with the parameters it had."""

    name: str
    producer: str  # the node it was folded into
    producer_op: str  # Conv, ConvTranspose, Gemm, MatMul, MatMul+Add
    epsilon: float
    momentum: float | None  # as recorded in the file (ONNX/TF convention); unused
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    mean: tuple[float, ...]
    var: tuple[float, ...]


@dataclass(frozen=True)
class KeptBN:
    """One inference-mode BatchNormalization left in the graph, and why."""

    name: str
    reason: str
    epsilon: float
    momentum: float | None
    params: dict[str, tuple[float, ...]] | None  # scale/bias/mean/var when constant


@dataclass
class FoldReport:
    folded: list[FoldedBN] = field(default_factory=list)
    kept: list[KeptBN] = field(default_factory=list)
    removed_initializers: list[str] = field(default_factory=list)
    op_counts_before: dict[str, int] = field(default_factory=dict)
    op_counts_after: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Graph helpers


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed {node.op_type} -> {list(node.output)}>"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in graph.node:
        yield node, where
        for sub in _subgraphs(node):
            yield from _walk(sub, f"{where}/{node.name or node.op_type}.{sub.name}")


def _names_read_by_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Every name a node's subgraphs read (outer-scope references included, conservatively)."""
    out: set[str] = set()
    for sub in _subgraphs(node):
        for inner, _ in _walk(sub, ""):
            out.update(i for i in inner.input if i)
        out.update(o.name for o in sub.output)
    return out


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in _DOMAINS


def _training_mode_reason(node: onnx.NodeProto, used: set[str]) -> str | None:
    """Why this BN computes batch statistics, or None when it is in inference mode."""
    attrs = _attrs(node)
    if attrs.get("training_mode", 0) != 0:
        return f"training_mode={attrs['training_mode']}"
    if attrs.get("is_test", 1) == 0:
        return "is_test=0"
    extra = [o for o in node.output[1:] if o and o in used]
    if extra:
        return f"it outputs batch statistics {extra} that are used"
    return None


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n, _ in _walk(graph, "")).items()))


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def _floats(a: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1))


class _Graph:
    """The main graph as a mutable list of nodes, its constants, consumers and tensor ranks."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        inputs = {i.name for i in g.input}
        # An initializer that is also a graph input is a default the caller may override.
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in g.initializer if t.name not in inputs
        }
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in _DOMAINS:
                attrs = _attrs(node)
                if "value" in attrs and isinstance(attrs["value"], onnx.TensorProto):
                    self.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
        self.taken: set[str] = (
            {t.name for t in g.initializer}
            | {v.name for v in (*g.input, *g.output, *g.value_info)}
            | {o for n in self.nodes for o in n.output}
            | {n.name for n in self.nodes}
        )
        self.new_initializers: list[onnx.TensorProto] = []
        self.ranks = self._ranks()
        self.reindex()

    def _ranks(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model).graph
        except Exception:  # custom ops, invalid shapes: no ranks, no MatMul folding
            return {}
        out: dict[str, int] = {}
        for v in (*inferred.input, *inferred.output, *inferred.value_info):
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.HasField("shape"):
                out[v.name] = len(t.shape.dim)
        return out

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: Counter[str] = Counter()
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            self.uses.update(i for i in node.input if i)
            self.uses.update(_names_read_by_subgraphs(node))
        self.uses.update(o.name for o in self.model.graph.output)

    def only_feeds(self, name: str) -> bool:
        """`name` is read exactly once (by the node we are about to fold) and nowhere else."""
        return self.uses[name] == 1

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = _unique(base, self.taken)
        self.new_initializers.append(numpy_helper.from_array(value, name))
        self.consts[name] = value
        return name


# --------------------------------------------------------------------------------------------
# Folding


@dataclass(frozen=True)
class _BN:
    node: onnx.NodeProto
    epsilon: float
    momentum: float | None
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, t), float64: y = x * s + t."""
        s = self.scale.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.epsilon)
        return s, self.bias.astype(np.float64) - self.mean.astype(np.float64) * s


def _read_bn(g: _Graph, node: onnx.NodeProto) -> tuple[_BN | None, str]:
    attrs = _attrs(node)
    eps = float(attrs.get("epsilon", DEFAULT_EPSILON))
    mom = attrs.get("momentum")
    momentum = None if mom is None else float(mom)
    params = [g.const(n) for n in node.input[1:5]]
    if len(node.input) < 5 or any(p is None for p in params):
        return None, "its scale/bias/mean/var are not all constants"
    scale, bias, mean, var = (np.asarray(p) for p in params)
    if attrs.get("spatial", 1) != 1:
        return None, "spatial=0 (per-element statistics, opset < 9)"
    if any(p.ndim != 1 or p.shape != scale.shape for p in (scale, bias, mean, var)):
        return None, "its parameters are not vectors of one length"
    return _BN(node, eps, momentum, scale, bias, mean, var), ""


def _bias_of(g: _Graph, node: onnx.NodeProto, index: int, channels: int, dtype: Any) -> Any:
    """A producer's bias input as a constant vector (zeros when absent); None if not constant."""
    if len(node.input) <= index or not node.input[index]:
        return np.zeros(channels, dtype=dtype)
    return g.const(node.input[index])


def _fold_conv(g: _Graph, bn: _BN, conv: onnx.NodeProto) -> str:
    w = g.const(conv.input[1]) if len(conv.input) > 1 else None
    if w is None:
        return f"{conv.op_type} {_label(conv)!r} has a non-constant weight"
    group = int(_attrs(conv).get("group", 1))
    s, t = bn.affine()
    if conv.op_type == "Conv":
        if w.ndim < 3 or w.shape[0] != bn.channels:
            return f"Conv weight {list(w.shape)} does not have {bn.channels} output channels"
        w_new = w.astype(np.float64) * s.reshape(-1, *[1] * (w.ndim - 1))
    else:  # ConvTranspose: (C_in, M/group, k...), output channel g * M/group + j
        if w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != bn.channels:
            return (
                f"ConvTranspose weight {list(w.shape)} with group {group} does not have "
                f"{bn.channels} output channels"
            )
        per_group = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        s_g = s.reshape(group, 1, w.shape[1], *[1] * (w.ndim - 2))
        w_new = (per_group.astype(np.float64) * s_g).reshape(w.shape)
    b = _bias_of(g, conv, 2, bn.channels, w.dtype)
    if b is None:
        return f"{conv.op_type} {_label(conv)!r} has a non-constant bias"
    if b.shape != (bn.channels,):
        return f"{conv.op_type} bias shape {list(b.shape)} is not ({bn.channels},)"
    b_new = b.astype(np.float64) * s + t
    base = conv.name or bn.node.name or conv.op_type
    inputs = [
        conv.input[0],
        g.add_const(f"{base}_bn_folded_W", w_new.astype(w.dtype)),
        g.add_const(f"{base}_bn_folded_B", b_new.astype(w.dtype)),
    ]
    del conv.input[:]
    conv.input.extend(inputs)
    conv.output[0] = bn.node.output[0]
    return ""


def _fold_gemm(g: _Graph, bn: _BN, gemm: onnx.NodeProto) -> str:
    b_mat = g.const(gemm.input[1])
    if b_mat is None or b_mat.ndim != 2:
        return f"Gemm {_label(gemm)!r} has a non-constant or non-2D B"
    attrs = _attrs(gemm)
    trans_b = int(attrs.get("transB", 0))
    n = b_mat.shape[0] if trans_b else b_mat.shape[1]
    if n != bn.channels:
        return f"Gemm output has {n} columns, BN has {bn.channels} channels"
    beta = float(attrs.get("beta", 1.0))
    c = _bias_of(g, gemm, 2, n, b_mat.dtype)
    if c is None:
        return f"Gemm {_label(gemm)!r} has a non-constant C"
    if c.ndim > 2:
        return f"Gemm C has rank {c.ndim}"
    s, t = bn.affine()
    b_new = b_mat.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
    c_new = beta * c.astype(np.float64) * s + t  # broadcast: (N,), (1, N), (M, 1) -> (M, N)...
    base = gemm.name or bn.node.name or "Gemm"
    inputs = [
        gemm.input[0],
        g.add_const(f"{base}_bn_folded_B", b_new.astype(b_mat.dtype)),
        g.add_const(f"{base}_bn_folded_C", c_new.astype(b_mat.dtype)),
    ]
    del gemm.input[:]
    gemm.input.extend(inputs)
    keep = [a for a in gemm.attribute if a.name != "beta"]
    del gemm.attribute[:]
    gemm.attribute.extend(keep)  # beta defaults to 1: already applied to C
    gemm.output[0] = bn.node.output[0]
    return ""


def _matmul_weight(g: _Graph, mm: onnx.NodeProto, bn: _BN) -> tuple[np.ndarray | None, str]:
    w = g.const(mm.input[1])
    if w is None or w.ndim != 2:
        return None, f"MatMul {_label(mm)!r} has no constant 2D weight (K, N) as second input"
    if g.ranks.get(mm.output[0]) != 2:
        rank = g.ranks.get(mm.output[0], "unknown")
        return None, f"MatMul {_label(mm)!r} output rank is {rank}, not 2 (BN axis 1 = columns)"
    if w.shape[1] != bn.channels:
        return None, f"MatMul weight {list(w.shape)} does not have {bn.channels} columns"
    return w, ""


def _fold_matmul(g: _Graph, bn: _BN, mm: onnx.NodeProto, index: int) -> str:
    """MatMul + BN: scale W's columns; the BN node becomes Add(MatMul, t)."""
    w, why = _matmul_weight(g, mm, bn)
    if w is None:
        return why
    s, t = bn.affine()
    base = mm.name or bn.node.name or "MatMul"
    mm.input[1] = g.add_const(f"{base}_bn_folded_W", (w.astype(np.float64) * s).astype(w.dtype))
    add = helper.make_node(
        "Add",
        [mm.output[0], g.add_const(f"{base}_bn_folded_bias", t.astype(w.dtype))],
        [bn.node.output[0]],
        name=_unique(f"{base}_bn_folded_Add", g.taken),
    )
    g.nodes[index] = add  # in the BN's place: after the MatMul, before the BN's consumers
    return ""


def _fold_matmul_add(g: _Graph, bn: _BN, add: onnx.NodeProto) -> str:
    """MatMul + Add(constant bias) + BN: scale W's columns, bias b * s + t."""
    if len(add.input) != 2:
        return "Add without two inputs"
    for mm_side in (0, 1):
        mm = g.producer.get(add.input[mm_side])
        b = g.const(add.input[1 - mm_side])
        if mm is not None and mm.op_type == "MatMul" and mm.domain in _DOMAINS and b is not None:
            break
    else:
        return f"Add {_label(add)!r} is not MatMul + constant bias"
    if not g.only_feeds(mm.output[0]):
        return f"MatMul {_label(mm)!r} output feeds more than the Add"
    w, why = _matmul_weight(g, mm, bn)
    if w is None:
        return why
    if b.ndim > 2 or g.ranks.get(add.output[0]) != 2:
        return f"Add {_label(add)!r}: bias rank {b.ndim} or output rank not 2"
    s, t = bn.affine()
    b_new = b.astype(np.float64) * s + t
    base = mm.name or bn.node.name or "MatMul"
    mm.input[1] = g.add_const(f"{base}_bn_folded_W", (w.astype(np.float64) * s).astype(w.dtype))
    add.input[1 - mm_side] = g.add_const(f"{base}_bn_folded_bias", b_new.astype(w.dtype))
    add.output[0] = bn.node.output[0]
    return ""


def _try_fold(g: _Graph, bn: _BN, index: int) -> tuple[str, str]:
    """Fold `bn` (at g.nodes[index]) into its producer. Returns (producer label, op) on
    success, ("", reason) when it is kept."""
    x = bn.node.input[0]
    prod = g.producer.get(x)
    if prod is None:
        return "", "its input is a graph input or a constant"
    if prod.domain not in _DOMAINS or prod.op_type not in _FOLDABLE:
        return "", f"its input comes from {prod.op_type} {_label(prod)!r}"
    if len([o for o in prod.output if o]) != 1:
        return "", f"{prod.op_type} {_label(prod)!r} has several outputs"
    if not g.only_feeds(x):
        return "", f"{prod.op_type} {_label(prod)!r} output {x!r} feeds more than this BN"
    label = _label(prod)
    if prod.op_type in ("Conv", "ConvTranspose"):
        return (label, prod.op_type) if not (why := _fold_conv(g, bn, prod)) else ("", why)
    if prod.op_type == "Gemm":
        return (label, "Gemm") if not (why := _fold_gemm(g, bn, prod)) else ("", why)
    if prod.op_type == "MatMul":
        return (label, "MatMul") if not (why := _fold_matmul(g, bn, prod, index)) else ("", why)
    return (label, "MatMul+Add") if not (why := _fold_matmul_add(g, bn, prod)) else ("", why)


def _refuse_training_mode(model: onnx.ModelProto) -> None:
    graphs = [(model.graph, "main graph")] + [
        (helper.make_graph(f.node, f.name, [], []), f"function {f.name}") for f in model.functions
    ]
    for graph, where in graphs:
        used = {i for n, _ in _walk(graph, where) for i in n.input} | {o.name for o in graph.output}
        for node, node_where in _walk(graph, where):
            if _is_bn(node) and (why := _training_mode_reason(node, used)):
                raise OnnxFoldError(
                    f"BatchNormalization node {_label(node)!r} in {node_where} is in training "
                    f"mode ({why}): it normalizes with the statistics of each batch, so a "
                    "sample's output would depend on the requests batched with it; export the "
                    "network in inference mode (Keras: training=False; PyTorch: model.eval())"
                )


def _cleanup(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], used_before: set[str]
) -> list[str]:
    """Drop Constant nodes and initializers that folding left unused; stale value_info."""
    g = model.graph
    while True:
        used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
        for n in nodes:
            used |= _names_read_by_subgraphs(n)
        dead = [
            n
            for n in nodes
            if n.op_type == "Constant" and n.output[0] not in used and n.output[0] in used_before
        ]
        if not dead:
            break
        nodes = [n for n in nodes if all(n is not d for d in dead)]
    del g.node[:]
    g.node.extend(nodes)
    inputs = {i.name for i in g.input}
    removed = [t.name for t in g.initializer if t.name not in used and t.name not in inputs]
    keep = [t for t in g.initializer if t.name not in set(removed)]
    del g.initializer[:]
    g.initializer.extend(keep)
    live = {o for n in nodes for o in n.output} | inputs | {o.name for o in g.output}
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)
    return removed


def fold_onnx_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable inference-mode BatchNormalization of the main graph into the
    Conv / ConvTranspose / Gemm / MatMul (+ Add) before it. `model` is not modified.

    Returns the new model (checked with onnx.checker) and what was folded and kept, with each
    BN's parameters. Raises OnnxFoldError if any BN (main graph, subgraphs, functions) is in
    training mode.
    """
    _refuse_training_mode(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = FoldReport(op_counts_before=_op_counts(model.graph))
    g = _Graph(out)
    used_before = set(g.uses) | {t.name for t in out.graph.initializer}
    kept: dict[int, KeptBN] = {}  # by id(node): tried once, left in place
    changed = True
    while changed:  # Conv -> BN -> BN folds twice: after the first, the Conv feeds the second
        changed = False
        for index, node in enumerate(g.nodes):
            if not _is_bn(node) or id(node) in kept:
                continue
            bn, why = _read_bn(g, node)
            if bn is not None:
                producer, op = _try_fold(g, bn, index)
                if producer:
                    if g.nodes[index] is node:
                        del g.nodes[index]
                    report.folded.append(
                        FoldedBN(
                            name=_label(node),
                            producer=producer,
                            producer_op=op,
                            epsilon=bn.epsilon,
                            momentum=bn.momentum,
                            scale=_floats(bn.scale),
                            bias=_floats(bn.bias),
                            mean=_floats(bn.mean),
                            var=_floats(bn.var),
                        )
                    )
                    g.reindex()
                    changed = True
                    break
                why = producer or op
            kept[id(node)] = _kept(g, node, why)
    report.kept = list(kept.values())
    out.graph.initializer.extend(g.new_initializers)
    # Kept BNs: drop declared-but-unused statistics outputs (the server's gate refuses them).
    for node in g.nodes:
        if _is_bn(node) and len(node.output) > 1:
            del node.output[1:]
    report.removed_initializers = _cleanup(out, g.nodes, used_before)
    report.op_counts_after = _op_counts(out.graph)
    onnx.checker.check_model(out)
    return out, report


def _kept(g: _Graph, node: onnx.NodeProto, why: str) -> KeptBN:
    attrs = _attrs(node)
    params = [p for p in (g.const(n) for n in node.input[1:5]) if p is not None]
    mom = attrs.get("momentum")
    return KeptBN(
        name=_label(node),
        reason=why,
        epsilon=float(attrs.get("epsilon", DEFAULT_EPSILON)),
        momentum=None if mom is None else float(mom),
        params=None
        if len(params) != 4
        else {k: _floats(p) for k, p in zip(("scale", "bias", "mean", "var"), params, strict=True)},
    )


# --------------------------------------------------------------------------------------------
# Batch axis, parity


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def make_batch_dynamic(model: onnx.ModelProto, dim_param: str = "batch") -> list[str]:
    """Give every graph input and output whose first axis is a fixed size a symbolic one
    (in place). Returns the names changed. When any changed, intermediate value_info (which
    may carry the old fixed size) is dropped: onnxruntime infers shapes again. Whether the graph
    really computes per sample (no Reshape to a fixed batch, ...) is then proved by running it
    at batch 1 and 16 and by the server's batch-invariance gate."""
    changed = []
    for v in (*_graph_inputs(model), *model.graph.output):
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or not t.HasField("shape") or not t.shape.dim:
            continue
        dim0 = t.shape.dim[0]
        if not dim0.HasField("dim_param"):
            dim0.Clear()
            dim0.dim_param = dim_param
            changed.append(v.name)
    if changed:
        del model.graph.value_info[:]
    return changed


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|) (as training/export.py, which imports torch)."""
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    return float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)) / scale


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _random_inputs(
    sess: ort.InferenceSession, rows: int, free_dim_size: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for arg in sess.get_inputs():
        dims = [d if isinstance(d, int) and d >= 0 else free_dim_size for d in arg.shape[1:]]
        dtype = _ORT_TO_NUMPY.get(arg.type)
        if dtype is None:
            raise OnnxExportError(f"input {arg.name!r} has type {arg.type}: no random inputs")
        shape = (rows, *dims)
        if np.dtype(dtype).kind == "f":
            out[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[arg.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def _reference_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The unfolded graph exactly as written: onnxruntime's own optimizer would fuse Conv + BN
    itself (not Gemm + BN), so it is switched off for the reference."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def parity(
    reference: onnx.ModelProto,
    folded: onnx.ModelProto,
    *,
    batches: Sequence[int] = PARITY_BATCHES,
    free_dim_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Max relative error (over all outputs) of `folded`, run as the server runs it, against
    `reference` run unoptimized, on standard-normal inputs: {"batch_1": e, "batch_16": e}.
    Fixed first axes are run at their own size (the label then says so)."""
    ref = _reference_session(reference)
    got = ort.InferenceSession(
        folded.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in ref.get_outputs()]
    if names != [o.name for o in got.get_outputs()]:
        raise OnnxExportError(f"outputs differ: {names} vs {[o.name for o in got.get_outputs()]}")
    fixed = {a.shape[0] for a in ref.get_inputs() if a.shape and isinstance(a.shape[0], int)}
    sizes = sorted(fixed) if fixed else list(batches)
    rows = max(sizes)
    xs = _random_inputs(ref, rows, free_dim_size, seed)
    out: dict[str, float] = {}
    for b in sizes:
        feed = {k: v[:b] for k, v in xs.items()}
        try:
            want = ref.run(names, feed)
            have = got.run(names, feed)
        except Exception as exc:
            raise OnnxExportError(f"could not run the model at batch {b}: {exc}") from exc
        errs = []
        for name, w, h in zip(names, want, have, strict=True):
            if w.shape != h.shape:
                raise OnnxExportError(f"batch {b}: output {name!r} shape {h.shape} != {w.shape}")
            errs.append(relative_error(h, w))
        out[f"batch_{b}"] = max(errs, default=0.0)
    return out


# --------------------------------------------------------------------------------------------
# Repository entry


def _next_version(model_dir: Path) -> int:
    # As training/repo.py's next_version (not imported: that module imports torch).
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _bn_records(report: FoldReport) -> list[dict[str, Any]]:
    """The `batchnorm` list of config.json, in training/repo.py's schema (layer, folded, eps,
    momentum, running_mean, running_var, weight, bias) plus where each BN went."""
    out: list[dict[str, Any]] = []
    for f in report.folded:
        out.append(
            {
                "layer": f.name,
                "folded": True,
                "folded_into": f.producer,
                "folded_into_op": f.producer_op,
                "eps": f.epsilon,
                "momentum": f.momentum,
                "momentum_convention": "onnx",  # running = momentum * running + (1 - m) * batch
                "num_batches_tracked": None,
                "running_mean": list(f.mean),
                "running_var": list(f.var),
                "weight": list(f.scale),
                "bias": list(f.bias),
            }
        )
    for k in report.kept:
        p = k.params or {}
        out.append(
            {
                "layer": k.name,
                "folded": False,
                "kept_because": k.reason,
                "eps": k.epsilon,
                "momentum": k.momentum,
                "momentum_convention": "onnx",
                "num_batches_tracked": None,
                "running_mean": list(p["mean"]) if p else None,
                "running_var": list(p["var"]) if p else None,
                "weight": list(p["scale"]) if p else None,
                "bias": list(p["bias"]) if p else None,
            }
        )
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_onnx_file(
    path: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: int | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    tolerance: float = PARITY_TOLERANCE,
) -> Path:
    """Fold the BN of an ONNX file, verify, and write `<repo>/<name>/<version>/model.onnx` and
    `<repo>/<name>/config.json` (training/repo.py's schema). Returns the model.onnx path.

    name: default the file's stem. version: default the next one. With max_batch_size > 0 a
    fixed first axis on the inputs/outputs is made dynamic (see make_batch_dynamic). Checks, in
    order: onnx.checker on the input, no BN in training mode (OnnxFoldError), onnx.checker on
    the result, the server's frozen gate, parity with the unfolded graph at batch 1 and 16
    (<= tolerance), the server's load_model (dynamic batch axis, batch invariance). Nothing is
    written unless all pass (OnnxExportError with the numbers).
    """
    src_path = Path(path)
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    try:
        name = validate_model_name(name or src_path.stem)
    except BnserveError as exc:
        raise ValueError(exc.message) from None
    raw = src_path.read_bytes()  # FileNotFoundError as is
    try:
        source = onnx.load(os.fspath(src_path))  # from the path: external data resolves
        onnx.checker.check_model(source)
    except Exception as exc:
        raise OnnxExportError(f"{src_path} is not a valid ONNX model: {exc}") from exc
    made_dynamic = make_batch_dynamic(source) if max_batch_size > 0 else []
    if made_dynamic:
        log.info("first axis of %s made dynamic ('batch')", made_dynamic)
    folded, report = fold_onnx_batchnorm(source)
    data = folded.SerializeToString()
    try:
        check_frozen(data)
    except BnserveError as exc:
        raise OnnxExportError(
            f"the server's frozen gate refuses the result: {exc.message}"
        ) from exc
    try:
        errors = parity(source, folded)
    except OnnxExportError as exc:
        if not made_dynamic:
            raise
        raise OnnxExportError(
            f"{exc}; the first axis of {made_dynamic} was fixed and has been made dynamic, but "
            "the graph does not run with another batch size (a Reshape to a fixed batch?): "
            "serve it without batching (max_batch_size 0)"
        ) from exc
    worst = max(errors.values(), default=0.0)
    if not worst <= tolerance:
        raise OnnxExportError(
            f"parity check failed: max abs error relative to output scale {worst:.3g} > "
            f"{tolerance:g} ({errors})"
        )

    model_dir = Path(repo) / name
    version = version or _next_version(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        candidate.write_bytes(data)
        try:
            loaded = load_model(
                candidate,
                name=name,
                version=version,
                max_batch_size=max_batch_size,
                instances=1,
                invariance_batch_sizes=(5, 16),
            )
        except BnserveError as exc:
            raise OnnxExportError(f"the server refuses the result: {exc.message}") from exc
        loaded.close()
    spec = loaded.spec

    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    onnx_path = model_dir / str(version) / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(onnx_path, data)
    config_path = model_dir / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": max_batch_size,
            "inputs": tensors(spec.inputs),
            "outputs": tensors(spec.outputs),
            "batching": config.get("batching", BatchingSettings().to_json()),
            # Unknown for a foreign model: whatever an earlier version (or a person) recorded.
            "labels": config.get("labels", []),
            "preprocessing": config.get("preprocessing", {}),
        }
    )
    versions = config.setdefault("versions", {})
    versions[str(version)] = {
        "accuracy": None,  # no labelled data comes with an ONNX file
        "torch_accuracy": None,
        "source": {
            "format": "onnx",
            "file": src_path.name,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "producer": f"{source.producer_name} {source.producer_version}".strip(),
            "opset": {(o.domain or "ai.onnx"): o.version for o in source.opset_import},
            "batch_axis_made_dynamic": made_dynamic,
        },
        "parity_max_rel_error": errors,
        "parity_reference": "onnxruntime on the unfolded graph, graph optimizations off",
        "op_counts": report.op_counts_after,
        "op_counts_before_folding": report.op_counts_before,
        "bn_left_unfolded": [k.name for k in report.kept],
        "onnxruntime_version": ort.__version__,
        "batchnorm": _bn_records(report),
    }
    config["versions"] = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))
    _write_atomic(config_path, (json.dumps(config, indent=1) + "\n").encode())
    log.info(
        "exported %s: %d BN folded, %d kept, parity %s",
        onnx_path,
        len(report.folded),
        len(report.kept),
        {k: f"{v:.2e}" for k, v in errors.items()},
    )
    return onnx_path
