"""Freeze and export: check the running statistics, fold BN, export to ONNX with a dynamic batch
axis, prove that no BatchNormalization is left and that onnxruntime agrees with PyTorch.

Everything raises ExportError (with the numbers) rather than writing a model that might be wrong.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fold import fold_batchnorm
from .stats import check_running_stats, require_eval

log = logging.getLogger("bnserve.training")

OPSET = 20
PARITY_TOLERANCE = 1e-5  # max abs error relative to the output's scale


class ExportError(RuntimeError):
    """The exported model failed a check; the message has the numbers."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    input_name: str
    output_name: str
    bn_folded: int  # BN layers folded away
    bn_left: list[str] = field(default_factory=list)  # BN layers folding correctly declined
    parity: dict[str, float] = field(default_factory=dict)  # "batch_1", "batch_N" -> rel error
    op_counts: dict[str, int] = field(default_factory=dict)


def session(model: str | Path | bytes) -> ort.InferenceSession:
    """A one-intra-op-thread session: the frozen configuration (batch-invariant outputs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|): absolute near 0, relative for large outputs."""
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    return float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)) / scale


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch 2.13's exporter logs a warning per torchvision op when torchvision is absent, INFO
    lines from onnxscript's passes, and a FutureWarning from its own pytree use. None is about
    our model; everything else (real warnings) still shows."""
    names = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _strip_stack_traces(proto: onnx.ModelProto) -> None:
    """The exporter records each node's Python stack trace, absolute paths included: the same
    model exported from two checkouts would differ byte for byte. Drop just that entry."""
    node_lists = [proto.graph.node, *(f.node for f in proto.functions)]
    while node_lists:
        for node in node_lists.pop():
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            for attr in node.attribute:  # subgraphs of If / Loop / Scan
                if attr.HasField("g"):
                    node_lists.append(attr.g.node)
                node_lists.extend(g.node for g in attr.graphs)


def _example_batch(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension seen as 0 or 1: trace with a batch of at least 2.
    return example if example.shape[0] >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    check_inputs: torch.Tensor | None = None,
    input_name: str = "input",
    output_name: str = "output",
    large_batch: int = 16,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportReport:
    """Check, fold, export, verify. `model` must be in eval mode and is not modified.

    example_input: (N, ...) float32, traced with a dynamic batch axis.
    check_inputs: held-out (M, ...) inputs for the parity check at batch 1 and batch
        min(M, large_batch); default: `large_batch` standard-normal samples of the example's shape.
    Raises ExportError (or StatisticsError / FoldError from the checks before it).
    """
    require_eval(model)
    check_running_stats(model)
    folded = fold_batchnorm(model)
    bn_before = sum(isinstance(m, _BatchNorm) for m in model.modules())
    bn_left = [n for n, m in folded.named_modules() if isinstance(m, _BatchNorm)]

    example = _example_batch(example_input.detach().float())
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            folded,
            (example,),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    _strip_stack_traces(proto)
    onnx.checker.check_model(proto)

    ops = Counter(node.op_type for node in proto.graph.node)
    if ops.get("BatchNormalization", 0) > len(bn_left):
        raise ExportError(
            f"{ops['BatchNormalization']} BatchNormalization node(s) left in the ONNX graph but "
            f"only {len(bn_left)} BN layer(s) were declined by folding ({bn_left})"
        )
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise ExportError(f"the batch axis was exported as a fixed size {dim0.dim_value}")

    # Parity: the ORIGINAL eval model (unfolded) against onnxruntime on the folded export.
    if check_inputs is None:
        gen = torch.Generator().manual_seed(0)
        check_inputs = torch.randn((large_batch, *example.shape[1:]), generator=gen)
    xs = check_inputs.detach().float().numpy()[:large_batch]
    sess = session(proto.SerializeToString())
    parity: dict[str, float] = {}
    with torch.no_grad():
        for label, x in (("batch_1", xs[:1]), (f"batch_{len(xs)}", xs)):
            ref = model(torch.from_numpy(x)).numpy()
            got = sess.run([output_name], {input_name: x})[0]
            if got.shape != ref.shape:
                raise ExportError(f"{label}: onnxruntime shape {got.shape} != torch {ref.shape}")
            parity[label] = relative_error(got, ref)
    worst = max(parity.values())
    if not worst <= tolerance:
        raise ExportError(
            f"parity check failed: max abs error relative to output scale {worst:.3g} > "
            f"{tolerance:g} ({parity})"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    log.info(
        "exported %s: %d BN folded, %d left, parity %s",
        path,
        bn_before - len(bn_left),
        len(bn_left),
        {k: f"{v:.2e}" for k, v in parity.items()},
    )
    return ExportReport(
        path=path,
        input_name=input_name,
        output_name=output_name,
        bn_folded=bn_before - len(bn_left),
        bn_left=bn_left,
        parity=parity,
        op_counts=dict(sorted(ops.items())),
    )
