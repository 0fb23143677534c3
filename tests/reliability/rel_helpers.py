"""Shared by the reliability tests: repositories, request builders, bounded polling, RSS."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.proto import inference_pb2 as pb

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


def infer_request(
    x: np.ndarray,
    *,
    model: str = "digits",
    request_id: str = "",
    version: str = "",
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id, model_version=version)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return req


def logits_of(resp: pb.ModelInferResponse) -> np.ndarray:
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(list(out.shape))


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll (bounded) until predicate() is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what or predicate}"
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


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
