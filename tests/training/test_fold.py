"""fold_batchnorm: exactness per layer kind, the BNs it must leave alone, the models it refuses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnserve.training.fold import FoldError, fold_batchnorm

RTOL = 1e-5


def _randomize_bn(bn: _BatchNorm, seed: int, dead: bool = False) -> None:
    """Non-trivial running stats (and gamma/beta when affine); `dead` zeroes channel 0's var."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 2)
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
        if dead:
            bn.running_var[0] = 0.0
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))


def _prepare(model: nn.Module, dead: bool = False) -> nn.Module:
    torch.manual_seed(0)
    for i, m in enumerate(model.modules()):
        if isinstance(m, _BatchNorm):
            _randomize_bn(m, seed=i, dead=dead)
    return model.eval()


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _check_fold(model: nn.Module, x: torch.Tensor, bn_left: int) -> fx.GraphModule:
    """Fold, then check: output matches, input model bitwise unchanged, `bn_left` BNs remain."""
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model)
        out = folded(x)
    assert isinstance(folded, fx.GraphModule) and folded is not model
    assert not folded.training
    assert _rel_err(out, ref) <= RTOL
    assert _count_bn(folded) == bn_left
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.training is False
    return folded


# (id, layer, BN class, input shape): every layer kind and a BN matching its output rank.
CASES: list[tuple[str, Callable[[], nn.Module], type[_BatchNorm], tuple[int, ...]]] = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), nn.BatchNorm1d, (2, 4, 9)),
    ("conv1d-nobias", lambda: nn.Conv1d(4, 6, 3, bias=False), nn.BatchNorm1d, (2, 4, 9)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d, (2, 4, 7, 7)),
    ("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d, (2, 4, 7, 7)),
    ("conv2d-depthwise", lambda: nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d, (2, 4, 7, 7)),
    (
        "conv2d-reflect-nobias",
        lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d,
        (2, 4, 7, 7),
    ),
    ("conv3d", lambda: nn.Conv3d(3, 5, 2, groups=1), nn.BatchNorm3d, (2, 3, 4, 5, 5)),
    ("conv3d-groups", lambda: nn.Conv3d(4, 6, 2, groups=2), nn.BatchNorm3d, (2, 4, 4, 5, 5)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, (2, 4, 5)),
    (
        "convT2d-nobias",
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, bias=False),
        nn.BatchNorm2d,
        (2, 4, 5, 5),
    ),
    (
        "convT2d-groups",
        lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3),
        nn.BatchNorm2d,
        (2, 6, 5, 5),
    ),
    (
        "convT2d-depthwise",
        lambda: nn.ConvTranspose2d(4, 4, 3, groups=4, output_padding=0),
        nn.BatchNorm2d,
        (2, 4, 5, 5),
    ),
    (
        "convT3d-groups",
        lambda: nn.ConvTranspose3d(4, 6, 2, groups=2),
        nn.BatchNorm3d,
        (2, 4, 3, 4, 4),
    ),
    ("linear", lambda: nn.Linear(5, 7), nn.BatchNorm1d, (3, 5)),
    ("linear-nobias", lambda: nn.Linear(5, 7, bias=False), nn.BatchNorm1d, (3, 5)),
    ("sync-conv2d", lambda: nn.Conv2d(4, 6, 3), nn.SyncBatchNorm, (2, 4, 7, 7)),
    (
        "sync-convT2d-groups",
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
        nn.SyncBatchNorm,
        (2, 4, 5, 5),
    ),
    ("sync-linear", lambda: nn.Linear(5, 7), nn.SyncBatchNorm, (3, 5)),
]


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(
    ("make_layer", "make_bn", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_folds_each_layer_kind(
    make_layer: Callable[[], nn.Module],
    make_bn: type[_BatchNorm],
    shape: tuple[int, ...],
    affine: bool,
) -> None:
    torch.manual_seed(1)
    layer = make_layer()
    model = _prepare(nn.Sequential(layer, make_bn(_channels(layer), affine=affine), nn.ReLU()))
    folded = _check_fold(model, torch.randn(shape), bn_left=0)
    fused = folded.get_submodule("0")
    assert type(fused) is type(layer) and fused.bias is not None


@pytest.mark.parametrize(
    ("make_layer", "make_bn", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_dead_channels(
    make_layer: Callable[[], nn.Module], make_bn: type[_BatchNorm], shape: tuple[int, ...]
) -> None:
    # running_var == 0 in a channel: scale = gamma / sqrt(eps) ~ 316 * gamma, outputs grow large.
    torch.manual_seed(2)
    layer = make_layer()
    model = _prepare(nn.Sequential(layer, make_bn(_channels(layer))), dead=True)
    _check_fold(model, torch.randn(shape) * 4, bn_left=0)


def test_stats_from_training_batches_nested_model() -> None:
    # Stats produced the real way (a few train-mode batches), BNs in nested submodules.
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10),
    )
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 8, 8) * 3 + 1)
    model.eval()
    folded = _check_fold(model, torch.randn(4, 3, 8, 8), bn_left=0)
    assert set(dict(folded.named_children())) == {"0", "1", "2", "3"}  # "4", the last BN, is gone
    assert set(dict(folded.get_submodule("1").named_children())) == {"0", "2"}


class _Residual(nn.Module):
    """y = conv(x); out = bn(y) + y: the pre-BN output has a second user."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    """The same conv called twice, only its first call is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


class _WeightReadElsewhere(nn.Module):
    """fc -> bn, and fc.weight is also read directly (a tied weight, e.g. a decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.bn(self.fc(x)), self.fc.weight)


class _LayerOutputReturned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return self.bn(y), y


@pytest.mark.parametrize(
    ("make_model", "shape"),
    [
        (_Residual, (2, 4, 6, 6)),
        (_SharedConv, (2, 4, 6, 6)),
        (_WeightReadElsewhere, (3, 5)),
        (_LayerOutputReturned, (3, 5)),
    ],
    ids=["residual", "shared-conv", "tied-weight", "output-returned"],
)
def test_bn_left_when_layer_output_has_other_users(
    make_model: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(4)
    model = _prepare(make_model())
    x = torch.randn(shape)
    before = _snapshot(model)
    with torch.no_grad():
        ref, out = model(x), fold_batchnorm(model)(x)
    refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    for r, o in zip(refs, outs, strict=True):
        assert _rel_err(o, r) <= RTOL
    assert _count_bn(fold_batchnorm(model)) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("model", "shape", "bn_left"),
    [
        (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 6, 6), 1),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), (2, 3, 6, 6), 1),
        # Mixed: the first BN folds, the one after the ReLU stays.
        (
            lambda: nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2)
            ),
            (2, 3, 6, 6),
            1,
        ),
        (lambda: nn.Sequential(nn.Linear(5, 6), nn.Dropout(), nn.BatchNorm1d(6)), (3, 5), 1),
    ],
    ids=["bn-first", "bn-after-relu", "mixed", "bn-after-dropout"],
)
def test_bn_without_foldable_producer_is_left(
    model: Callable[[], nn.Module], shape: tuple[int, ...], bn_left: int
) -> None:
    torch.manual_seed(5)
    _check_fold(_prepare(model()), torch.randn(shape), bn_left=bn_left)


def _nested(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Identity(), bn))


def test_refuses_training_mode() -> None:
    model = _prepare(_nested(nn.BatchNorm2d(4))).train()
    with pytest.raises(FoldError, match=r"model\.eval\(\)"):
        fold_batchnorm(model)
    # One submodule left in training mode is enough, and is named.
    model.eval()
    model[1][1].train()
    with pytest.raises(FoldError, match=r"'1\.1' is in training mode"):
        fold_batchnorm(model)


def test_refuses_batch_statistics_bn() -> None:
    model = _nested(nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(FoldError, match=r"'1\.1' has track_running_stats=False"):
        fold_batchnorm(model)


def test_refuses_missing_running_stats() -> None:
    model = _prepare(_nested(nn.BatchNorm2d(4)))
    model[1][1].running_var = None
    with pytest.raises(FoldError, match=r"'1\.1' has no running_mean/running_var"):
        fold_batchnorm(model)


def test_fold_error_is_value_error() -> None:
    assert issubclass(FoldError, ValueError)
