"""`bnserve inspect model.onnx`: what a model takes and gives, its ops, any BatchNormalization
node left (and whether it is in training mode), and whether each sample's output is bitwise the
same alone and inside a batch with the server's frozen session settings.

Needs only onnx and onnxruntime (the serving install).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .errors import ModelLoadError
from .model import SessionPool, check_batch_invariance


@dataclass
class BNNode:
    name: str
    training_mode: bool
    epsilon: float


@dataclass
class InspectReport:
    path: str
    opset: int
    inputs: list[dict[str, object]] = field(default_factory=list)
    outputs: list[dict[str, object]] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    batchnorm: list[BNNode] = field(default_factory=list)
    batch_invariant: bool | None = None  # None: could not be checked
    invariance_detail: str = ""

    @property
    def ok(self) -> bool:
        """Servable as frozen: no BN in training mode and batch-invariant."""
        return self.batch_invariant is True and not any(b.training_mode for b in self.batchnorm)


def inspect_model(path: str | Path, *, batch: int = 8) -> InspectReport:
    proto = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    report = InspectReport(path=str(path), opset=opset)
    report.op_counts = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            training = bool(attrs.get("training_mode", 0)) or any(o for o in node.output[1:])
            eps = float(attrs.get("epsilon", 1e-5))
            report.batchnorm.append(BNNode(node.name or node.output[0], training, eps))
    pool = SessionPool(str(path), instances=1)
    try:
        for kind, specs in (("inputs", pool.inputs), ("outputs", pool.outputs)):
            getattr(report, kind).extend(
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs
            )
        try:
            check_batch_invariance(pool, batch_sizes=(batch,))
            report.batch_invariant = True
            report.invariance_detail = (
                f"each of {batch} samples run alone is bitwise equal to its row in a batch of "
                f"{batch} (1 intra-op thread)"
            )
        except ModelLoadError as exc:
            report.batch_invariant = False
            report.invariance_detail = exc.message
    finally:
        pool.close()
    return report


def render(report: InspectReport, *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps({**asdict(report), "ok": report.ok}, indent=2)
    lines = [f"{report.path}  (opset {report.opset})"]
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        for t in getattr(report, kind):
            lines.append(f"  {t['name']:<16} {t['datatype']:<6} {t['shape']}")
    ops = ", ".join(f"{k} x{v}" for k, v in report.op_counts.items())
    lines.append(f"ops: {ops}")
    if report.batchnorm:
        for bn in report.batchnorm:
            mode = "TRAINING MODE (batch statistics)" if bn.training_mode else "inference mode"
            lines.append(f"BatchNormalization {bn.name}: {mode}, epsilon {bn.epsilon:g}")
    else:
        lines.append("BatchNormalization: none (folded)")
    verdict = {True: "yes", False: "NO", None: "not checked"}[report.batch_invariant]
    lines.append(f"batch-invariant: {verdict}: {report.invariance_detail}")
    lines.append("frozen: ok" if report.ok else "frozen: REFUSED by the server's gate")
    return "\n".join(lines)
