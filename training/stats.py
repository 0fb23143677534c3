"""Running-statistics checks and recalibration: what must hold before a BN network is frozen.

A BN layer in eval mode normalizes with its running mean/var. If those were never updated (the
PyTorch twin of TensorFlow's forgotten UPDATE_OPS) they are still mean 0, var 1 and the frozen
model is wrong (measured: digits 99.6% -> 50%). If the layer does not track them at all
(track_running_stats=False) it normalizes with the batch's statistics even in eval mode, so one
sample's answer depends on its batch-mates.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class StatisticsError(ValueError):
    """A BN layer's running statistics cannot be trusted for inference."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def require_eval(model: nn.Module) -> None:
    """Raise unless every submodule is in eval mode."""
    bad = [n or "<root>" for n, m in model.named_modules() if m.training]
    if bad:
        raise StatisticsError(
            f"model is in training mode (modules {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}); a train-mode pass normalizes with the batch's "
            "statistics and overwrites the running ones. Call model.eval() first."
        )


def check_running_stats(model: nn.Module) -> None:
    """Every BN must track running statistics, have been updated at least once, and hold finite
    values with a non-negative variance. Raises StatisticsError naming the layer and the fix."""
    for name, bn in batchnorm_layers(model):
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise StatisticsError(
                f"BN layer {name!r} has track_running_stats=False: it normalizes with batch "
                "statistics even in eval mode, so a sample's output depends on its batch. "
                "Build it with track_running_stats=True and retrain, or recalibrate."
            )
        tracked = bn.num_batches_tracked
        if tracked is not None and int(tracked) == 0:
            raise StatisticsError(
                f"BN layer {name!r} was never updated (num_batches_tracked == 0; running mean "
                "0, var 1): its moving statistics are not the data's. This is TensorFlow's "
                "forgotten UPDATE_OPS: train with model.train() so BN updates its statistics, "
                "or recompute them with --recalibrate (recalibrate(model, data))."
            )
        mean, var = bn.running_mean, bn.running_var
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any():
            raise StatisticsError(
                f"BN layer {name!r} has non-finite or negative running statistics; "
                "recalibrate (recalibrate(model, data)) or retrain."
            )


@torch.no_grad()
def recalibrate(model: nn.Module, x: np.ndarray, *, batch_size: int = 64) -> nn.Module:
    """Precise BN: recompute every running mean/var as an exact cumulative average over `x`
    ((N, ...) float32), via torch.optim.swa_utils.update_bn. Mutates and returns `model` in
    eval mode (the weights are untouched; only BN buffers change)."""
    loader = [torch.from_numpy(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    loader = [b for b in loader if len(b) > 1]  # train-mode BN cannot take a batch of one
    torch.optim.swa_utils.update_bn(loader, model)
    model.eval()
    return model
