"""Model repository entries: `<repo>/<name>/<version>/model.onnx` and `<repo>/<name>/config.json`.

config.json is what the server reads (inputs, outputs, max_batch_size, batching) plus what a user
or a drift monitor wants to know: labels, input preprocessing, and per version the measured
accuracy, the parity error and the BN statistics of every layer that was folded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnserve.server.repository import BatchingSettings

from . import data, drift_reference
from .export import ExportReport, export_onnx, session
from .train import TrainConfig

MAX_BATCH_SIZE = 64
# The server combines requests of these models only up to this many rows: vol3d's per-row cost
# grows with the batch (its activations leave the cache; one session, arena on: 3.5 ms a row at
# batch 1, 3.8 at 8, 4.1 at 32), and measured over gRPC at concurrency 16 a limit of 4 beat 1,
# 2, 8 and 64 (docs/performance.md).
MAX_COMBINED: dict[str, int] = {"vol3d": 4}

PREPROCESSING: dict[str, dict[str, Any]] = {
    "digits": {
        "layout": "NCHW",
        "values": "sklearn digits pixel counts 0..16 divided by 16, so 0 = background, 1 = ink",
        "image": {"size": [8, 8], "grayscale": True, "invert": "auto", "scale": 1 / 255},
    },
    "mlp": {
        "layout": "NC",
        "values": "sklearn digits 8x8 pixel counts 0..16 divided by 16, flattened row-major",
        "image": {"size": [8, 8], "grayscale": True, "invert": "auto", "scale": 1 / 255},
    },
    "vol3d": {
        "layout": "NCDHW",
        "values": "volumes of a solid (intensity 0.6..1.0) under N(0, 0.35) noise",
    },
}


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def bn_statistics(model: nn.Module, folded: set[str]) -> list[dict[str, Any]]:
    """Every BN's frozen statistics, for drift monitoring against live activations later."""
    out = []
    for name, bn in model.named_modules():
        if not isinstance(bn, _BatchNorm):
            continue
        assert bn.running_mean is not None and bn.running_var is not None

        def floats(t: torch.Tensor | None) -> list[float] | None:
            return None if t is None else [float(v) for v in t.detach().double()]

        out.append(
            {
                "layer": name,
                "folded": name in folded,
                "eps": bn.eps,
                "momentum": bn.momentum,
                "num_batches_tracked": int(bn.num_batches_tracked or 0),
                "running_mean": floats(bn.running_mean),
                "running_var": floats(bn.running_var),
                "weight": floats(bn.weight),
                "bias": floats(bn.bias),
            }
        )
    return out


def write_entry(
    repo: str | Path,
    model: nn.Module,
    cfg: TrainConfig,
    split: data.Split,
    *,
    name: str | None = None,
    version: int | None = None,
    torch_accuracy: float | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    trained_on: dict[str, str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Export `model` (eval mode) as the next version of `name` and update its config.json.
    `trained_on` is the checkpoint's record of the CPU that trained it (train.trained_on()).
    Returns (path of model.onnx, the config written)."""
    name = name or cfg.model
    model_dir = Path(repo) / name
    version = version or next_version(model_dir)
    onnx_path = model_dir / str(version) / "model.onnx"
    report: ExportReport = export_onnx(
        model,
        torch.from_numpy(split.x_train[:2]),
        onnx_path,
        check_inputs=torch.from_numpy(split.x_test[:16]),  # held out: never trained on
        output_name="logits",
    )
    # Accuracy of the exported file itself, one intra-op thread, batch 64, test split.
    sess = session(onnx_path)
    logits = np.concatenate(
        [
            sess.run(["logits"], {"input": split.x_test[i : i + max_batch_size]})[0]
            for i in range(0, len(split.x_test), max_batch_size)
        ]
    )
    onnx_accuracy = float((logits.argmax(1) == split.y_test).mean())
    folded = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)} - set(
        report.bn_left
    )
    x_shape, n_classes = list(split.x_train.shape[1:]), len(split.labels)
    config_path = model_dir / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *x_shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, n_classes]}],
            "batching": BatchingSettings(
                max_combined_batch_size=MAX_COMBINED.get(cfg.model)
            ).to_json(),
            "labels": list(split.labels),
            "preprocessing": PREPROCESSING.get(cfg.model, {}),
        }
    )
    versions = config.setdefault("versions", {})
    versions[str(version)] = {
        "accuracy": onnx_accuracy,
        "torch_accuracy": torch_accuracy,
        "test_samples": len(split.y_test),
        "parity_max_rel_error": report.parity,
        "op_counts": report.op_counts,
        "bn_left_unfolded": report.bn_left,
        "training": {k: v for k, v in vars(cfg).items()},
        "torch_version": torch.__version__.split("+")[0],
        # Retraining gives these bytes again only on this CPU (docs/reproducibility.md).
        "trained_on": trained_on,
        "batchnorm": bn_statistics(model, folded),
    }
    drift = drift_reference.reference(onnx_path, model, folded, split.x_train)
    if drift is not None:
        versions[str(version)]["drift_reference"] = drift
    config["versions"] = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))
    config_path.write_text(json.dumps(config, indent=1) + "\n")
    return onnx_path, config
