"""BatchNormalization folding at the ONNX level (training/onnx_fold.py), on graphs built with
onnx.helper, on a PyTorch export that keeps BN, and through `bnserve export --onnx`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnserve.server.model import check_frozen, load_model
from bnserve.training.onnx_fold import (
    FoldReport,
    OnnxExportError,
    OnnxFoldError,
    export_onnx_file,
    fold_onnx_batchnorm,
    parity,
)

OPSET = 20
IR_VERSION = 10  # onnxruntime 1.32 reads IR <= 11; helper.make_model would write onnx's newest
TOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Graph builders


class Builder:
    """Nodes, initializers and one float input/output, with seeded random parameters."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, shape: tuple[int, ...], *, positive: bool = False) -> str:
        v = self.rng.standard_normal(shape).astype(np.float32)
        if positive:
            v = (np.abs(v) + 0.1).astype(np.float32)
        self.inits.append(numpy_helper.from_array(v, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs))
        return outputs[0]

    def bn(self, x: str, y: str, c: int, *, var_scale: float = 1.0, **attrs: Any) -> str:
        """BN with non-trivial statistics: scale/bias ~ N(0, 1), mean ~ N(0, 1), var > 0."""
        p = f"{y}_bn"
        scale, bias, mean = (self.const(f"{p}_{k}", (c,)) for k in ("scale", "bias", "mean"))
        var = self.const(f"{p}_var", (c,), positive=True)
        if var_scale != 1.0:
            t = next(i for i in self.inits if i.name == var)
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * var_scale, var))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", [x, scale, bias, mean, var], [y], name=f"bn_{y}", **attrs
            )
        )
        return y

    def model(
        self,
        in_shape: list[int | str],
        outputs: dict[str, list[int | str] | None],
        *,
        name: str = "input",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outputs.items()],
            initializer=self.inits,
        )
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="test"
        )
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


def fold_and_check(
    model: onnx.ModelProto, batches: tuple[str, ...] = ("batch_1", "batch_16")
) -> tuple[onnx.ModelProto, FoldReport, dict[str, float]]:
    """Fold; the input is untouched, the result passes onnx.checker and the server's frozen gate
    and matches the unfolded graph at batch 1 and 16 (a fixed batch: at its size)."""
    before = model.SerializeToString()
    folded, report = fold_onnx_batchnorm(model)
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(folded, full_check=True)
    check_frozen(folded.SerializeToString())
    errors = parity(model, folded)
    assert set(errors) == set(batches)
    assert max(errors.values()) <= TOL, errors
    # Nothing dangling: every initializer is read by a node.
    used = {i for n in folded.graph.node for i in n.input}
    assert {t.name for t in folded.graph.initializer} <= used
    return folded, report, errors


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


# --------------------------------------------------------------------------------------------
# Conv, ConvTranspose


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_bn(bias: bool, group: int) -> None:
    b = Builder()
    inputs = ["input", b.const("W", (8, 4 // group, 3, 3))] + ([b.const("B", (8,))] if bias else [])
    y = b.node("Conv", inputs, ["conv"], group=group, pads=[1, 1, 1, 1])
    b.bn(y, "output", 8)
    model = b.model(["N", 4, 6, 6], {"output": ["N", 8, 6, 6]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded) == {"Conv": 1}
    assert [(f.producer, f.producer_op) for f in report.folded] == [("Conv_conv", "Conv")]
    assert report.kept == []
    assert {"W", "output_bn_scale", "output_bn_var"} <= set(report.removed_initializers)
    assert len(folded.graph.node[0].input) == 3  # a bias was added when there was none
    assert folded.graph.node[0].output[0] == "output"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("group", "c_in", "out_per_group"), [(1, 4, 6), (2, 4, 3), (4, 8, 2)])
def test_conv_transpose_bn(bias: bool, group: int, c_in: int, out_per_group: int) -> None:
    """Weight (C_in, C_out/group, k, k): output channel g * C_out/group + j is W[rows of g, j]."""
    b = Builder(1)
    c_out = group * out_per_group
    inputs = ["input", b.const("W", (c_in, out_per_group, 3, 3))]
    inputs += [b.const("B", (c_out,))] if bias else []
    y = b.node("ConvTranspose", inputs, ["deconv"], group=group, strides=[2, 2])
    b.bn(y, "output", c_out)
    model = b.model(["N", c_in, 5, 5], {"output": ["N", c_out, 11, 11]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded) == {"ConvTranspose": 1}
    assert report.folded[0].producer_op == "ConvTranspose"


def test_conv_bn_bn_folds_twice_and_shared_weight_is_copied() -> None:
    """Conv -> BN -> BN folds both; a second Conv reading the same weight keeps it unscaled."""
    b = Builder(2)
    w = b.const("W", (4, 4, 1, 1))
    b.node("Conv", ["input", w], ["c1"])
    b.bn("c1", "bn1", 4)
    b.bn("bn1", "out1", 4)
    b.node("Conv", ["input", w], ["out2"])
    model = b.model(["N", 4, 3, 3], {"out1": ["N", 4, 3, 3], "out2": ["N", 4, 3, 3]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded) == {"Conv": 2}
    assert len(report.folded) == 2
    assert "W" in {t.name for t in folded.graph.initializer}  # still read by the other Conv


# --------------------------------------------------------------------------------------------
# Gemm, MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("alpha", "beta", "c_shape"),
    [(1.0, 1.0, None), (0.5, 2.0, (6,)), (1.5, -0.5, (1, 6)), (2.0, 3.0, ()), (1.0, 0.7, (4, 1))],
)
def test_gemm_bn(trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None) -> None:
    b = Builder(3)
    inputs = ["input", b.const("B", (6, 5) if trans_b else (5, 6))]
    if c_shape is not None:
        inputs.append(b.const("C", c_shape))
    y = b.node("Gemm", inputs, ["gemm"], alpha=alpha, beta=beta, transB=trans_b)
    b.bn(y, "output", 6)
    # C of shape (M, 1) fixes the batch (M = 4); the others keep it dynamic.
    rows: int | str = 4 if c_shape == (4, 1) else "N"
    model = b.model([rows, 5], {"output": [rows, 6]})
    batches = ("batch_4",) if rows == 4 else ("batch_1", "batch_16")
    folded, report, _ = fold_and_check(model, batches)
    assert ops(folded) == {"Gemm": 1}
    assert report.folded[0].producer_op == "Gemm"


def test_gemm_with_data_as_b_is_kept() -> None:
    b = Builder(4)
    y = b.node("Gemm", [b.const("A", (5, 3)), "input", b.const("C", (3,))], ["g"], transA=1)
    # Here the input is B: columns depend on the data, not on a constant: kept.
    b.bn(y, "output", 3)
    model = b.model([5, 3], {"output": [3, 3]})
    folded, report, _ = fold_and_check(model, ("batch_5",))
    assert ops(folded)["BatchNormalization"] == 1
    assert "non-constant" in report.kept[0].reason


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bn(bias_first: bool) -> None:
    b = Builder(5)
    mm = b.node("MatMul", ["input", b.const("W", (5, 7))], ["mm"])
    bias = b.const("b", (7,))
    b.node("Add", [bias, mm] if bias_first else [mm, bias], ["add"])
    b.bn("add", "output", 7)
    model = b.model(["N", 5], {"output": ["N", 7]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded) == {"MatMul": 1, "Add": 1}
    assert report.folded[0].producer_op == "MatMul+Add"


def test_matmul_bn_becomes_matmul_add() -> None:
    b = Builder(6)
    mm = b.node("MatMul", ["input", b.const("W", (5, 7))], ["mm"])
    b.bn(mm, "output", 7)
    folded, report, _ = fold_and_check(b.model(["N", 5], {"output": ["N", 7]}))
    assert ops(folded) == {"MatMul": 1, "Add": 1}
    assert report.folded[0].producer_op == "MatMul"


def test_matmul_rank3_bn_is_kept() -> None:
    """On (N, T, C) BN normalizes axis 1 (T), not the MatMul's columns: not foldable."""
    b = Builder(7)
    mm = b.node("MatMul", ["input", b.const("W", (4, 4))], ["mm"])
    b.bn(mm, "output", 4)  # T == C == 4, so the graph runs
    folded, report, _ = fold_and_check(b.model(["N", 4, 4], {"output": ["N", 4, 4]}))
    assert ops(folded)["BatchNormalization"] == 1
    assert "rank is 3" in report.kept[0].reason


# --------------------------------------------------------------------------------------------
# Keras conventions, what is kept, what is refused


def test_keras_epsilon_and_tf_momentum() -> None:
    """tf2onnx writes Keras' epsilon 1e-3 and momentum 0.99; the variances here are small enough
    that using the ONNX default 1e-5 instead would be off by far more than the tolerance."""
    b = Builder(8)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3)), b.const("B", (4,))], ["conv"])
    b.bn(y, "output", 4, var_scale=1e-3, epsilon=1e-3, momentum=0.99)
    model = b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3]})
    folded, report, _ = fold_and_check(model)
    assert report.folded[0].epsilon == pytest.approx(1e-3)
    assert report.folded[0].momentum == pytest.approx(0.99)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    eps = next(a for a in wrong.graph.node[1].attribute if a.name == "epsilon")
    eps.f = 1e-5
    assert max(parity(wrong, folded).values()) > 1e-2


def test_bn_after_relu_is_kept() -> None:
    b = Builder(9)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.node("Relu", [y], ["relu"])
    b.bn("relu", "output", 4)
    folded, report, _ = fold_and_check(b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3]}))
    assert ops(folded) == {"Conv": 1, "Relu": 1, "BatchNormalization": 1}
    assert report.folded == []
    assert "Relu" in report.kept[0].reason
    assert report.kept[0].params is not None and len(report.kept[0].params["var"]) == 4


def test_bn_on_graph_input_is_kept() -> None:
    b = Builder(10)
    b.bn("input", "output", 3)
    folded, report, _ = fold_and_check(b.model(["N", 3, 4], {"output": ["N", 3, 4]}))
    assert ops(folded) == {"BatchNormalization": 1}
    assert "graph input" in report.kept[0].reason


def test_conv_output_with_two_consumers_is_kept() -> None:
    b = Builder(11)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "out_bn", 4)
    b.node("Relu", [y], ["out_relu"])
    model = b.model(["N", 3, 5, 5], {"out_bn": ["N", 4, 3, 3], "out_relu": ["N", 4, 3, 3]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert "feeds more than this BN" in report.kept[0].reason


def test_conv_output_that_is_a_graph_output_is_kept() -> None:
    b = Builder(12)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "output", 4)
    model = b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3], "conv": ["N", 4, 3, 3]})
    folded, report, _ = fold_and_check(model)
    assert ops(folded)["BatchNormalization"] == 1
    assert "feeds more than this BN" in report.kept[0].reason


def test_overridable_bn_parameters_are_kept() -> None:
    """An initializer that is also a graph input is a default the caller may replace."""
    b = Builder(13)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "output", 4)
    model = b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3]})
    var = next(t for t in model.graph.initializer if t.name == "output_bn_var")
    model.graph.input.append(helper.make_tensor_value_info(var.name, TensorProto.FLOAT, [4]))
    folded, report, _ = fold_and_check(model)
    assert ops(folded)["BatchNormalization"] == 1
    assert "not all constants" in report.kept[0].reason


def test_constant_node_weights_are_folded_and_removed() -> None:
    b = Builder(14)
    w = b.rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    b.nodes.append(
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"), name="cw")
    )
    y = b.node("Conv", ["input", "W"], ["conv"])
    b.bn(y, "output", 4)
    folded, _, _ = fold_and_check(b.model(["N", 3, 2, 2], {"output": ["N", 4, 2, 2]}))
    assert ops(folded) == {"Conv": 1}


def test_training_mode_is_refused() -> None:
    b = Builder(15)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "output", 4, training_mode=1)
    model = b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3]})
    with pytest.raises(OnnxFoldError, match=r"'bn_output'.*training mode \(training_mode=1\)"):
        fold_onnx_batchnorm(model)


def test_used_batch_statistics_are_refused() -> None:
    b = Builder(16)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "output", 4, training_mode=1)
    b.nodes[-1].output.extend(["running_mean", "running_var"])
    model = b.model(
        ["N", 3, 5, 5], {"output": ["N", 4, 3, 3], "running_mean": [4], "running_var": [4]}
    )
    with pytest.raises(OnnxFoldError, match="bn_output"):
        fold_onnx_batchnorm(model)


# --------------------------------------------------------------------------------------------
# A PyTorch export with BN left in, the repository entry, the command line


def small_conv_net() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Conv + BN + ReLU, grouped Conv (no bias) + BN, Linear + BN1d (eps 1e-3), exported by
    torch's dynamo exporter without its optimizer (with it, onnxscript already folds BN into
    Conv and Gemm). Returns (model, x, the torch eval output on x)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, bias=False),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10, eps=1e-3),
    )
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    net.eval()
    program = torch.onnx.export(
        net,
        (torch.randn(2, 3, 8, 8),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=OPSET,
        dynamo=True,
        optimize=False,
        external_data=False,
        verbose=False,
    )
    assert program is not None
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    return program.model_proto, x.numpy(), ref


@pytest.mark.filterwarnings("ignore")
def test_pytorch_export_with_bn_nodes() -> None:
    import onnxruntime as ort

    model, x, ref = small_conv_net()
    assert ops(model)["BatchNormalization"] == 3
    folded, report, _ = fold_and_check(model)
    # Conv + BN and Gemm + BN fold. The grouped Conv's bias is computed by the exporter (an
    # Expand of zeros, CastLike'd to the activation), not a constant: that BN is kept.
    assert sorted(f.producer_op for f in report.folded) == ["Conv", "Gemm"]
    assert len(report.kept) == 1 and "non-constant bias" in report.kept[0].reason
    assert ops(folded)["BatchNormalization"] == 1
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    assert float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())) <= TOL


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def keras_like_model(batch: int | str = 1) -> onnx.ModelProto:
    """What tf2onnx gives for Conv2D + BatchNormalization + Dense + BatchNormalization (after
    Flatten): fixed batch 1 when the Keras model had a fixed batch, eps 1e-3, momentum 0.99."""
    b = Builder(20)
    y = b.node("Conv", ["input", b.const("W", (6, 3, 3, 3)), b.const("B", (6,))], ["conv"])
    b.bn(y, "bn1", 6, epsilon=1e-3, momentum=0.99)
    b.node("Relu", ["bn1"], ["relu"])
    b.node("Flatten", ["relu"], ["flat"])
    mm = b.node("MatMul", ["flat", b.const("K", (6 * 4 * 4, 5))], ["dense"])
    b.node("Add", [mm, b.const("dense_b", (5,))], ["dense_add"])
    b.bn("dense_add", "logits", 5, epsilon=1e-3, momentum=0.99)
    return b.model([batch, 3, 6, 6], {"logits": [batch, 5]})


def test_export_onnx_file_writes_entry(tmp_path: Path) -> None:
    src = tmp_path / "keras_net.onnx"
    onnx.save(keras_like_model(), src)
    before = src.read_bytes()
    path = export_onnx_file(src, tmp_path / "repo", max_batch_size=32)
    assert src.read_bytes() == before
    assert path == tmp_path / "repo" / "keras_net" / "1" / "model.onnx"
    config = json.loads((path.parent.parent / "config.json").read_text())
    assert config["max_batch_size"] == 32 and config["platform"] == "onnxruntime_onnx"
    assert config["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 6, 6]}]
    assert config["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]
    v = config["versions"]["1"]
    assert v["source"]["batch_axis_made_dynamic"] == ["input", "logits"]
    assert max(v["parity_max_rel_error"].values()) <= TOL
    assert v["bn_left_unfolded"] == []
    assert [(bn["layer"], bn["folded"], bn["eps"]) for bn in v["batchnorm"]] == [
        ("bn_bn1", True, pytest.approx(1e-3)),
        ("bn_logits", True, pytest.approx(1e-3)),
    ]
    assert len(v["batchnorm"][0]["running_var"]) == 6
    assert "BatchNormalization" not in v["op_counts"]


def test_cli_round_trip_and_load(tmp_path: Path) -> None:
    src = tmp_path / "net.onnx"
    onnx.save(keras_like_model(), src)
    repo = tmp_path / "repo"
    for expected in ("1", "2"):
        r = cli("export", "--onnx", str(src), "--repo", str(repo), "--name", "kerasnet")
        assert r.returncode == 0, r.stderr
        assert f"(version {expected})" in r.stdout, r.stdout
    assert "2 BN folded" in r.stdout, r.stdout
    config = json.loads((repo / "kerasnet" / "config.json").read_text())
    assert sorted(config["versions"]) == ["1", "2"]
    loaded = load_model(
        repo / "kerasnet" / "2" / "model.onnx",
        name="kerasnet",
        version=2,
        max_batch_size=config["max_batch_size"],
        instances=1,
    )
    try:
        x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)
        assert loaded.pool.run({"input": x})["logits"].shape == (3, 5)
    finally:
        loaded.close()


def test_cli_refuses_training_mode(tmp_path: Path) -> None:
    b = Builder(21)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "output", 4, training_mode=1)
    src = tmp_path / "train_mode.onnx"
    onnx.save(b.model(["N", 3, 5, 5], {"output": ["N", 4, 3, 3]}), src)
    r = cli("export", "--onnx", str(src), "--repo", str(tmp_path / "repo"))
    assert r.returncode == 2
    assert "'bn_output'" in r.stderr and "training mode" in r.stderr, r.stderr
    assert not (tmp_path / "repo").exists()


def test_cli_needs_checkpoint_or_onnx(tmp_path: Path) -> None:
    r = cli("export", "--repo", str(tmp_path))
    assert r.returncode == 2 and "CHECKPOINT or --onnx" in r.stderr, r.stderr


def fixed_batch_reshape_model() -> onnx.ModelProto:
    """Conv + BN then a Reshape to the constant shape [1, 16]: only runs with batch 1."""
    b = Builder(22)
    y = b.node("Conv", ["input", b.const("W", (4, 3, 3, 3))], ["conv"])
    b.bn(y, "bn", 4)
    shape = numpy_helper.from_array(np.array([1, 16], dtype=np.int64), "shape")
    b.inits.append(shape)
    b.node("Reshape", ["bn", "shape"], ["output"])
    return b.model([1, 3, 4, 4], {"output": [1, 16]})


def test_fixed_batch_graph(tmp_path: Path) -> None:
    """Made dynamic, it fails at batch 16 with the way out; with max_batch_size 0 it is served
    as it is (batch 1)."""
    src = tmp_path / "fixed.onnx"
    onnx.save(fixed_batch_reshape_model(), src)
    with pytest.raises(OnnxExportError, match=r"made dynamic.*max_batch_size 0"):
        export_onnx_file(src, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    path = export_onnx_file(src, tmp_path / "repo", max_batch_size=0)
    config = json.loads((path.parent.parent / "config.json").read_text())
    assert config["inputs"][0]["shape"] == [1, 3, 4, 4]
    v = config["versions"]["1"]
    assert set(v["parity_max_rel_error"]) == {"batch_1"}
    assert v["source"]["batch_axis_made_dynamic"] == []
    assert v["bn_left_unfolded"] == []
