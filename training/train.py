"""The training loop: Adam, shuffled mini-batches, per-epoch loss and eval-mode accuracy.

Deterministic for a given seed, thread count and CPU (torch.use_deterministic_algorithms):
another CPU model runs other kernels, which round differently, and the weights drift apart over
the epochs (docs/reproducibility.md). So a checkpoint records the CPU that trained it. Train
mode is used ONLY for optimizer steps (BN normalizes with the batch's statistics and updates its
running averages); every accuracy is measured in eval mode, which uses the running statistics
alone.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import data, models, stats

log = logging.getLogger("bnserve.training")

# Defaults per model: epochs, batch size, learning rate, recalibrate at the end.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 15, "batch_size": 32, "lr": 2e-3, "recalibrate": False},
    # momentum 0.01 (TF 0.99) lags the weights over ~100 steps: precise BN at the end fixes it.
    "vol3d": {"epochs": 8, "batch_size": 16, "lr": 2e-3, "recalibrate": True},
    "mlp": {"epochs": 20, "batch_size": 32, "lr": 2e-3, "recalibrate": False},
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What `bnserve train` takes. bn_momentum uses PyTorch's convention (None: the model's)."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    bn_momentum: float | None = None
    bn_eps: float = 1e-5
    recalibrate: bool = False
    threads: int | None = None
    n_train: int | None = None  # vol3d only: number of generated training volumes

    @classmethod
    def for_model(cls, model: str, **overrides: Any) -> TrainConfig:
        if model not in DEFAULTS:
            raise ValueError(f"unknown model {model!r}; expected one of {sorted(DEFAULTS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(model=model, **{**DEFAULTS[model], **given})


def tf_momentum_to_torch(tf_momentum: float) -> float:
    """TensorFlow/Keras: running = m * running + (1 - m) * batch. PyTorch: running =
    (1 - m) * running + m * batch. So Keras 0.99 is PyTorch 0.01."""
    if not 0.0 <= tf_momentum <= 1.0:
        raise ValueError(f"TensorFlow momentum must be in [0, 1], got {tf_momentum}")
    return round(1.0 - tf_momentum, 12)


class DataParallel(Protocol):
    """How train() runs as one of several data-parallel processes (distributed.py implements it).

    Every process walks the same global batches (same seed, same permutation) and trains on its
    shard of each. Without one, train() is the single-process loop, unchanged.
    """

    main: bool  # this process evaluates, logs and recalibrates; the others only train
    min_batch: int  # a last global batch smaller than this is dropped (every shard needs 2)

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the model to optimize, evaluate and return; the module to run training steps
        through, e.g. DistributedDataParallel over it)."""
        ...

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's part of a global batch, and the factor its mean loss is scaled by so
        that the averaged gradient is the gradient of the global batch's mean loss."""
        ...

    def sum(self, values: list[float]) -> list[float]:
        """Sums over all processes (for the logged loss)."""
        ...

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The trained model as a single-process module (e.g. SyncBatchNorm -> BatchNorm)."""
        ...


def trained_on() -> dict[str, str]:
    """The CPU whose kernels computed the weights: its model name (/proc/cpuinfo) and the
    kernels torch dispatched to. The same recipe gives the same bytes only on the same pair."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


@dataclass
class TrainResult:
    model: nn.Module  # in eval mode
    config: TrainConfig
    split: data.Split
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy: float = 0.0  # eval mode, test split
    trained_on: dict[str, str] = field(default_factory=trained_on)


def load_split(name: str, *, n_train: int | None = None) -> data.Split:
    if name == "digits":
        return data.digits()
    if name == "mlp":
        return data.digits(flat=True)
    if name == "vol3d":
        return data.vol3d(n_train=n_train or 1200)
    raise ValueError(f"unknown model {name!r}")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an EVAL-mode model. Refuses a model in train mode: a train-mode pass would use
    batch statistics and overwrite the running ones."""
    stats.require_eval(model)
    out = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == y).mean())


def train(
    cfg: TrainConfig,
    *,
    split: data.Split | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = log.info,
    parallel: DataParallel | None = None,
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    split = split or load_split(cfg.model, n_train=cfg.n_train)
    model = models.build(cfg.model, bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    echo(
        f"{cfg.model}: {len(bn)} BN layers, momentum {bn[0].momentum} (PyTorch convention), "
        f"eps {bn[0].eps}"
    )
    net = model  # what training steps run through
    if parallel is not None:
        model, net = parallel.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * -(-len(split.x_train) // cfg.batch_size)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train = torch.from_numpy(split.x_train)  # (N, C, ...) float32
    y_train = torch.from_numpy(split.y_train)  # (N,) int64
    result = TrainResult(model=model, config=cfg, split=split)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        min_batch = 2 if parallel is None else parallel.min_batch
        if len(batches[-1]) < min_batch:  # BN cannot take a batch of one in train mode
            batches.pop()
        total, seen = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{cfg.epochs}",
            leave=False,
            disable=None if progress else True,
        )  # None: off when not a TTY
        for idx in bar:
            weight = 1.0
            if parallel is not None:
                idx, weight = parallel.shard(idx)
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        if parallel is not None:
            total, n = parallel.sum([total, float(seen)])
            seen = round(n)
        model.eval()
        main = parallel is None or parallel.main
        acc = accuracy(model, split.x_test, split.y_test) if main else float("nan")
        result.history.append({"epoch": epoch, "loss": total / seen, "accuracy": acc})
        echo(f"epoch {epoch:3d}  loss {total / seen:.4f}  eval accuracy {acc:.4f}")
    if parallel is not None:
        model = result.model = parallel.unwrap(model)
        if not parallel.main:
            model.eval()
            return result
    if cfg.recalibrate:
        before = accuracy(model, split.x_test, split.y_test)
        stats.recalibrate(model, split.x_train, batch_size=cfg.batch_size)
        acc = accuracy(model, split.x_test, split.y_test)
        echo(
            f"recalibrated running statistics (cumulative average over the training set): "
            f"eval accuracy {before:.4f} -> {acc:.4f}"
        )
    model.eval()
    result.accuracy = accuracy(model, split.x_test, split.y_test)
    return result


def save_checkpoint(path: str | Path, result: TrainResult) -> Path:
    """A checkpoint that torch.load(weights_only=True) reads: tensors and plain values only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": result.config.model,
            "state_dict": result.model.state_dict(),
            "config": asdict(result.config),
            "history": result.history,
            "accuracy": result.accuracy,
            "trained_on": result.trained_on,
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """(model in eval mode, its training config, the raw checkpoint dict)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    cfg = TrainConfig(**ckpt["config"])
    model = models.build(cfg.model, bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, cfg, ckpt


__all__ = [
    "DEFAULTS",
    "DataParallel",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "load_checkpoint",
    "load_split",
    "predict",
    "replace",
    "save_checkpoint",
    "tf_momentum_to_torch",
    "train",
    "trained_on",
]
