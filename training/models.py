"""The three BN networks, each a few lines: digits (2D CNN), vol3d (3D conv net), mlp.

BN hyper-parameters use PyTorch's convention: `momentum` is the weight of the NEW batch in the
running average (TensorFlow/Keras 0.99 == PyTorch 0.01), eps is added to the variance.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


class Digits(nn.Module):
    """(N, 1, 8, 8) float32 -> (N, 10) logits. Three conv + BN + ReLU blocks.

    16/32/32 channels: the overhead-bound reference workload of docs/performance.md (about 10 us
    of compute a sample; onnxruntime, one thread: 8.5 us a sample at batch 16, 22 us a batch-1
    run). The earlier 32/64/64 net cost 22 / 41 us for the same 99.3% test accuracy.
    """

    def __init__(self, *, bn_momentum: float | None = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        bn = partial(nn.BatchNorm2d, momentum=bn_momentum, eps=bn_eps)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),  # bias is redundant before BN
            bn(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            bn(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 32, 4, 4)
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            bn(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # (N, 32, 1, 1)
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _vol_block(
    c_in: int, c_out: int, stride: int, momentum: float | None, eps: float
) -> nn.Sequential:
    # k=3, padding=1 is 'same' at stride 1 and halves the size at stride 2 (PyTorch rejects
    # padding='same' for strided convs; TF would pad 0 before / 1 after, we pad 1 / 1).
    conv = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")  # He-normal
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)
    bn = nn.BatchNorm3d(c_out, eps=eps, momentum=momentum)
    return nn.Sequential(conv, bn, nn.LeakyReLU(0.2))


class Vol3d(nn.Module):
    """(N, 1, 32, 32, 32) float32 -> (N, 3) logits.

    Four Conv3d(k=3) + BatchNorm3d + LeakyReLU(0.2) blocks, strides 1,2,2,2, channels
    8,24,32,64: 32^3 -> 32^3 -> 16^3 -> 8^3 -> 4^3, global average pool, linear head.
    BN defaults to TensorFlow's momentum 0.99 (PyTorch 0.01) and PyTorch's eps 1e-5.
    The widths give the issue's reference workload, about 1.9 ms a sample on one core with
    onnxruntime (16,32,32,64 took 3.0-3.5 ms; docs/performance-notes.md, round 5).
    """

    def __init__(self, *, bn_momentum: float | None = 0.01, bn_eps: float = 1e-5) -> None:
        super().__init__()
        chans, strides = (8, 24, 32, 64), (1, 2, 2, 2)
        blocks, c_in = [], 1
        for c, s in zip(chans, strides, strict=True):
            blocks.append(_vol_block(c_in, c, s, bn_momentum, bn_eps))
            c_in = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """(N, 64) float32 -> (N, 10) logits. Linear + BatchNorm1d + ReLU layers."""

    def __init__(self, *, bn_momentum: float | None = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        bn = partial(nn.BatchNorm1d, momentum=bn_momentum, eps=bn_eps)
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            bn(128),
            nn.ReLU(),
            nn.Linear(128, 64),
            bn(64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# name -> (constructor, input shape without the batch axis, default BN momentum)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "digits": (Digits, (1, 8, 8)),
    "vol3d": (Vol3d, (1, 32, 32, 32)),
    "mlp": (MLP, (64,)),
}


def build(name: str, *, bn_momentum: float | None = None, bn_eps: float = 1e-5) -> nn.Module:
    """A fresh model by name; bn_momentum None keeps the model's default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    ctor, _ = MODELS[name]
    kwargs: dict[str, float | None] = {"bn_eps": bn_eps}
    if bn_momentum is not None:
        kwargs["bn_momentum"] = bn_momentum
    return ctor(**kwargs)
