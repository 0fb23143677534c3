"""Shared by the reliability tests: repositories, bounded polling, RSS (request builders and
reference sessions: tests/oip.py, re-exported here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from oip import infer_request as infer_request
from oip import logits_of as logits_of
from oip import reference_pool as reference_pool
from oip import wait_for as wait_for

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
DIGITS_ONNX = BUNDLED / "digits" / "1" / "model.onnx"
SERVICE = "/inference.GRPCInferenceService"
MB = 1024 * 1024
# Codes a client's input must never produce: they mean "the server has a bug".
BUG_CODES = frozenset({"INTERNAL", "UNKNOWN"})


def copy_model(
    repo: Path,
    model: str = "digits",
    *,
    max_queue_size: int | None = None,
    instances: int | None = None,
    versions: tuple[str, ...] = ("1",),
    **config: Any,
) -> Path:
    """Copy a bundled model into `repo` (created as needed), with config.json overrides."""
    dst = repo / model
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((BUNDLED / model / "config.json").read_text())
    if max_queue_size is not None:
        cfg.setdefault("batching", {})["max_queue_size"] = max_queue_size
    if instances is not None:
        cfg["instances"] = instances
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    for v in versions:
        (dst / v).mkdir(exist_ok=True)
        shutil.copy(BUNDLED / model / "1" / "model.onnx", dst / v / "model.onnx")
    return dst


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def digits_inputs(n: int = 64, seed: int = 0) -> np.ndarray:
    """Deterministic digit-like inputs (values in [0, 1]); no dataset download needed."""
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 8, 8), dtype=np.float32)


# --- broken model files ------------------------------------------------------------------------


def bn_training_mode_onnx() -> bytes:
    """A valid ONNX model whose one BatchNormalization node is in training mode (input
    "input" FP32 [-1, 4]): the frozen-BN gate must refuse it."""
    import onnx
    from onnx import TensorProto, helper

    c = 4
    inits = [
        helper.make_tensor(n, TensorProto.FLOAT, [c], v)
        for n, v in (
            ("scale", [1.0] * c),
            ("bias", [0.0] * c),
            ("mean", [0.0] * c),
            ("var", [1.0] * c),
        )
    ]
    node = helper.make_node(
        "BatchNormalization",
        ["input", "scale", "bias", "mean", "var"],
        ["output"],
        training_mode=1,
        name="bn0",
    )
    graph = helper.make_graph(
        [node],
        "bn_training",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, c])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, c])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def broken_model_bytes(kind: str) -> bytes:
    """model.onnx contents for each way a file can be broken."""
    good = DIGITS_ONNX.read_bytes()
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "corrupt":  # the middle overwritten with garbage
        rng = np.random.default_rng(0)
        mid = len(good) // 3
        return good[:mid] + rng.bytes(4096) + good[mid + 4096 :]
    if kind == "not_onnx":
        return b'{"this": "is JSON, not ONNX"}\n' * 10
    if kind == "empty":
        return b""
    if kind == "bn_training":
        return bn_training_mode_onnx()
    raise ValueError(kind)


BROKEN_KINDS = ("truncated", "corrupt", "not_onnx", "empty", "bn_training")


def write_atomically(path: Path, data: bytes) -> None:
    """Write next to `path`, then rename over it: a poll never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
