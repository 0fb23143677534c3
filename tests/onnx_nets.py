"""Small ONNX graphs built with onnx.helper, shared by the tests (server and native)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    """The graph as a checked model that any onnxruntime >= 1.14 reads (IR version 8)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bn_net(
    *, seed: int = 42, training_mode: int = 0, stats_outputs: bool = False
) -> onnx.ModelProto:
    """Conv(1->4, 3x3) + BatchNormalization "bn1" + Relu + Flatten + Gemm(256->10): (N,1,8,8)
    float32 "x" -> (N,10) "logits". training_mode=1 marks the BN as training (a frozen-mode
    gate must refuse it); stats_outputs adds its running-statistics outputs."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("conv_w", rng.standard_normal((4, 1, 3, 3))),
        init("conv_b", rng.standard_normal(4)),
        init("bn_scale", rng.uniform(0.5, 1.5, 4)),
        init("bn_bias", rng.standard_normal(4)),
        init("bn_mean", rng.standard_normal(4)),
        init("bn_var", rng.uniform(0.5, 2.0, 4)),
        init("fc_w", rng.standard_normal((10, 256))),
        init("fc_b", rng.standard_normal(10)),
    ]
    bn = helper.make_node(
        "BatchNormalization",
        ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
        ["bn_out", "run_mean", "run_var"] if stats_outputs else ["bn_out"],
        name="bn1",
    )
    if training_mode:
        bn.attribute.append(helper.make_attribute("training_mode", training_mode))
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv_out"], pads=[1, 1, 1, 1]),
        bn,
        helper.make_node("Relu", ["bn_out"], ["relu_out"]),
        helper.make_node("Flatten", ["relu_out"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model  # not checked here: a training-mode BN with stats outputs is the point
