"""server/model.py: the frozen-BN gate, the batch-invariance gate, specs and the session pool.

Real onnxruntime throughout; the models are built here with onnx.helper.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_nets import bn_net

from bnserve.server.errors import BnserveError, InvalidInputError, ModelLoadError
from bnserve.server.model import (
    ARENA_KEEP_INPUT_BYTES,
    LoadedModel,
    SessionPool,
    check_frozen,
    load_model,
    session_options,
    validate_inputs,
)

OPSET = 17
VOL3D = Path(__file__).resolve().parents[2] / "model_repository" / "vol3d" / "1" / "model.onnx"


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _batch_mean_net() -> onnx.ModelProto:
    """y = x - mean over the batch axis: each row depends on the others."""
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fixed_batch_net() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    good = _save(bn_net(), d / "bn_net.onnx")
    truncated = d / "truncated.onnx"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    not_onnx = d / "not_onnx.onnx"
    not_onnx.write_text("this is not a protobuf at all \x00\xff" * 10, encoding="latin-1")
    empty = d / "empty.onnx"
    empty.write_bytes(b"")
    return {
        "good": good,
        "training": _save(bn_net(training_mode=1), d / "bn_training.onnx"),
        "stats": _save(bn_net(stats_outputs=True), d / "bn_stats.onnx"),
        "batch_mean": _save(_batch_mean_net(), d / "batch_mean.onnx"),
        "fixed": _save(_fixed_batch_net(), d / "fixed.onnx"),
        "truncated": truncated,
        "not_onnx": not_onnx,
        "empty": empty,
    }


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------- session options


def test_session_options_single_threaded_sequential() -> None:
    import onnxruntime as ort

    so = session_options()
    assert so.intra_op_num_threads == 1
    assert so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_pool_sessions_really_use_one_thread(models: dict[str, Path]) -> None:
    pool = SessionPool(models["good"], instances=3)
    try:
        assert pool.size == 3
        for sess in pool.sessions:
            opts = sess.get_session_options()
            assert opts.intra_op_num_threads == 1
            assert opts.inter_op_num_threads == 1
    finally:
        pool.close()


# ---------------------------------------------------------------------------- frozen gate


def test_check_frozen_accepts_inference_bn(models: dict[str, Path]) -> None:
    proto = check_frozen(models["good"])
    assert any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    check_frozen(models["good"].read_bytes())  # bytes work too


def test_check_frozen_refuses_training_mode(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"'bn1'.*training_mode=1"):
        check_frozen(models["training"])


def test_check_frozen_refuses_bn_with_statistics_outputs(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"'bn1'.*batch statistics"):
        check_frozen(models["stats"])


def test_check_frozen_finds_bn_inside_subgraph(tmp_path: Path) -> None:
    inner = bn_net(training_mode=1).graph
    then_graph = helper.make_graph(
        list(inner.node),
        "then",
        [],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        list(inner.initializer),
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["logits"], then_branch=then_graph, else_branch=then_graph)],
        "outer",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    with pytest.raises(ModelLoadError, match=r"'bn1'.*If\.(then|else)_branch.*training"):
        check_frozen(model.SerializeToString())


@pytest.mark.parametrize("kind", ["truncated", "not_onnx", "empty"])
def test_check_frozen_refuses_unreadable_files(models: dict[str, Path], kind: str) -> None:
    with pytest.raises(ModelLoadError):
        check_frozen(models[kind])
    with pytest.raises(ModelLoadError):
        load_model(models[kind], name="m", version=1, max_batch_size=8, instances=1)


def test_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        check_frozen(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx", name="m", version=1, max_batch_size=8)


# ---------------------------------------------------------------------------- invariance gate


def test_batch_dependent_model_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"not batch-invariant.*'y'.*max abs difference"):
        load_model(models["batch_mean"], name="bm", version=1, max_batch_size=8, instances=1)


def test_dynamically_quantized_model_is_refused_naming_the_cause(tmp_path: Path) -> None:
    """Dynamic quantization takes each scale from the whole batch: the bundled digits model,
    quantized so, answers a sample differently alone and in a batch, and the gate's message
    names the DynamicQuantizeLinear node as the cause."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    digits = VOL3D.parents[2] / "digits" / "1" / "model.onnx"
    dynamic = tmp_path / "digits_dynamic_int8.onnx"
    quantize_dynamic(digits, dynamic, weight_type=QuantType.QInt8)
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(dynamic)).graph.node}
    with pytest.raises(
        ModelLoadError,
        match=r"not batch-invariant.*'logits'.*the cause: DynamicQuantizeLinear node .* takes "
        r"its scale and zero point from the whole input.*quantize_static",
    ):
        load_model(dynamic, name="digits", version=1, max_batch_size=64, instances=1)
    # the float model it came from passes the same gate
    load_model(digits, name="digits", version=1, max_batch_size=64, instances=1).close()


def test_batch_dependent_model_passes_when_it_cannot_batch(models: dict[str, Path]) -> None:
    # max_batch_size 1: requests are never merged, so the gate does not apply.
    loaded = load_model(models["batch_mean"], name="bm", version=1, max_batch_size=1, instances=1)
    loaded.close()


def test_fixed_shape_model_needs_max_batch_size_zero(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="dynamic first axis"):
        load_model(models["fixed"], name="f", version=1, max_batch_size=4, instances=1)
    loaded = load_model(models["fixed"], name="f", version=1, max_batch_size=0, instances=1)
    try:
        assert loaded.spec.inputs[0].shape == (2, 3)
        assert loaded.spec.max_batch_size == 0
    finally:
        loaded.close()


# ---------------------------------------------------------------------------- spec & pool


def test_load_model_spec(models: dict[str, Path]) -> None:
    loaded = load_model(models["good"], name="bn", version=3, max_batch_size=16, instances=2)
    try:
        assert isinstance(loaded, LoadedModel)
        spec = loaded.spec
        assert (spec.name, spec.version, spec.max_batch_size) == ("bn", "3", 16)
        assert spec.platform == "onnxruntime_onnx"
        assert [(s.name, s.datatype, s.shape) for s in spec.inputs] == [
            ("x", "FP32", (-1, 1, 8, 8))
        ]
        assert [(s.name, s.datatype, s.shape) for s in spec.outputs] == [
            ("logits", "FP32", (-1, 10))
        ]
        assert spec.input("x").dtype == np.float32
        with pytest.raises(InvalidInputError):
            spec.output("nope")
        assert loaded.pool.size == 2
        with pytest.raises(AttributeError):
            setattr(spec, "name", "other")  # noqa: B010 (frozen dataclass)
    finally:
        loaded.close()


def test_bitwise_equal_alone_and_batched(models: dict[str, Path]) -> None:
    pool = SessionPool(models["good"], instances=1)
    try:
        x = _x(64, seed=7)
        alone = np.concatenate([pool.run({"x": x[i : i + 1]})["logits"] for i in range(64)])
        for b in (5, 16, 64):
            assert pool.run({"x": x[:b]})["logits"].tobytes() == alone[:b].tobytes()
    finally:
        pool.close()


def test_pool_from_many_threads(models: dict[str, Path]) -> None:
    pool = SessionPool(models["good"], instances=3)
    x = _x(8, seed=1)
    expected = [pool.run({"x": x[i : i + 1]})["logits"] for i in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def worker(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            for j in range(25):
                i = (k + j) % 8
                got = pool.run({"x": x[i : i + 1]}, ["logits"])
                assert got["logits"].tobytes() == expected[i].tobytes()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    pool.close()
    assert errors == []


def test_pool_errors(models: dict[str, Path]) -> None:
    pool = SessionPool(models["good"], instances=1)
    # onnxruntime's own complaint becomes a BnserveError, never a raw exception.
    with pytest.raises(BnserveError) as info:
        pool.run({"x": np.zeros((1, 1, 8, 8), dtype=np.float64)})
    assert info.value.status_code == "INTERNAL"
    pool.close()
    with pytest.raises(BnserveError, match="unloading"):
        pool.run({"x": _x(1)})


def test_close_wakes_waiting_threads(models: dict[str, Path]) -> None:
    pool = SessionPool(models["good"], instances=1)
    session = pool._acquire()  # hold the only session so the next run must wait
    result: list[BaseException] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        try:
            pool.run({"x": _x(1)})
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert started.wait(timeout=10)
    pool.close()
    t.join(timeout=10)
    assert not t.is_alive()
    assert result and isinstance(result[0], BnserveError)
    pool._release(session)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: {}, "missing"),
        (lambda: {"x": _x(1), "z": _x(1)}, "unexpected"),
        (lambda: {"x": _x(1).astype(np.float64)}, "dtype"),
        (lambda: {"x": np.zeros((1, 1, 8, 9), np.float32)}, "shape"),
        (lambda: {"x": np.zeros((1, 8, 8), np.float32)}, "shape"),
        (lambda: {"x": np.zeros((0, 1, 8, 8), np.float32)}, "at least one row"),
    ],
)
def test_validate_inputs(
    models: dict[str, Path], make: Callable[[], dict[str, np.ndarray]], error: str
) -> None:
    pool = SessionPool(models["good"], instances=1)
    try:
        assert validate_inputs(pool.inputs, {"x": _x(3)}, batched=True) == 3
        with pytest.raises(InvalidInputError, match=error):
            validate_inputs(pool.inputs, make(), batched=True)
    finally:
        pool.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_large_batch_gives_its_arena_memory_back() -> None:
    """The sessions keep onnxruntime's memory arena (faster small runs) but a run with inputs
    over ARENA_KEEP_INPUT_BYTES shrinks it afterwards: vol3d at batch 64 would otherwise hold
    ~160 MB a session for good (measured: 85 -> 253 MB without the shrink, 93 MB with it)."""
    pool = SessionPool(str(VOL3D), instances=1)
    try:
        rng = np.random.default_rng(0)
        small = rng.standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
        big = rng.standard_normal((64, 1, 32, 32, 32)).astype(np.float32)  # 8 MiB of input
        assert small.nbytes <= ARENA_KEEP_INPUT_BYTES < big.nbytes
        pool.run({"input": small})
        before = _rss_mb()
        out = pool.run({"input": big})["logits"]
        assert out.shape == (64, 3)
        pool.run({"input": small})
        grown = _rss_mb() - before
    finally:
        pool.close()
    # what stays is the big run's output and allocator slack, far below the 160 MB activations
    assert grown < 60, f"RSS grew {grown:.0f} MB after a batch-64 run"
