"""Reference activation statistics for drift monitoring (docs/drift.md).

After folding, each Conv / ConvTranspose / Gemm that absorbed a BatchNorm outputs what that BN
output in training: per channel, mean ~ beta and variance ~ gamma^2 on training-like data. This
module measures the actual per-channel mean and variance of those outputs over the TRAINING data,
through the exported ONNX file itself (the server watches the same tensors), and records the
BN's beta and gamma^2 next to them for reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnserve.server.drift import channel_moments, with_outputs

from .export import session

# ONNX ops a BN can be folded into (training/fold.py: Conv*, ConvTranspose*, Linear).
FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def folded_producers(model: nn.Module, folded: set[str]) -> dict[str, str]:
    """{producer module name: BN module name} for every folded BN (the layer that absorbed it).

    Empty when the model cannot be traced (the reference is then simply not recorded)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:
        return {}
    modules = dict(gm.named_modules())
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in folded:
            continue
        if not isinstance(modules.get(str(node.target)), _BatchNorm) or not node.args:
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            out[str(src.target)] = str(node.target)
    return out


def folded_tensors(proto: onnx.ModelProto, producers: dict[str, str]) -> list[tuple[str, str]]:
    """[(ONNX output tensor, BN layer)] of the nodes whose weight belongs to a producer module,
    in graph order."""
    out = []
    for node in proto.graph.node:
        if node.op_type not in FOLD_TARGETS or len(node.input) < 2:
            continue
        owner = node.input[1].rpartition(".")[0]  # "features.0.weight" -> "features.0"
        if owner in producers:
            out.append((node.output[0], producers[owner]))
    return out


def reference(
    onnx_path: str | Path,
    model: nn.Module,
    folded: set[str],
    x_train: np.ndarray,
    *,
    input_name: str = "input",
    batch: int = 64,
) -> dict[str, Any] | None:
    """{"layers": [{"tensor", "layer", "channels", "mean", "var", "beta", "gamma2"}, ...]} or None
    when no folded layer could be located in the ONNX graph."""
    proto = onnx.load(str(onnx_path))
    pairs = folded_tensors(proto, folded_producers(model, folded))
    if not pairs:
        return None
    names = [t for t, _ in pairs]
    sess = session(with_outputs(proto, names))
    sums: list[np.ndarray] = []
    squares: list[np.ndarray] = []
    count = [0] * len(names)
    for i in range(0, len(x_train), batch):
        outs = sess.run(names, {input_name: x_train[i : i + batch]})
        for j, out in enumerate(outs):
            s, q, n = channel_moments(out)
            if len(sums) <= j:
                sums.append(s)
                squares.append(q)
            else:
                sums[j] += s
                squares[j] += q
            count[j] += n
    modules = dict(model.named_modules())
    layers = []
    for j, (tensor, layer) in enumerate(pairs):
        mean = sums[j] / count[j]
        var = np.maximum(squares[j] / count[j] - np.square(mean), 0.0)
        bn = modules[layer]
        assert isinstance(bn, _BatchNorm)
        channels = len(mean)
        beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros(channels)
        gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones(channels)
        layers.append(
            {
                "tensor": tensor,
                "layer": layer,
                "channels": channels,
                "mean": [float(v) for v in mean],
                "var": [float(v) for v in var],
                "beta": [float(v) for v in beta],
                "gamma2": [float(v) for v in np.square(gamma)],
            }
        )
    return {"source": "training split through the exported model", "layers": layers}
