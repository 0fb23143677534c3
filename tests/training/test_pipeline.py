"""Train -> check statistics -> fold -> export -> onnxruntime, with real training throughout."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bnserve.training import (
    ExportError,
    FoldError,
    StatisticsError,
    bundle,
    check_running_stats,
    export_onnx,
    recalibrate,
)
from bnserve.training import train as T
from bnserve.training.data import digits, volumes
from bnserve.training.export import relative_error, session
from bnserve.training.models import Vol3d, build
from bnserve.training.repo import MAX_COMBINED

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"


def onnx_logits(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def test_digits_trains_past_target_in_eval_mode(digits_result) -> None:  # type: ignore[no-untyped-def]
    assert digits_result.accuracy >= 0.985
    assert not any(m.training for m in digits_result.model.modules())
    assert len(digits_result.history) == digits_result.config.epochs


def test_onnx_accuracy_equals_torch_eval_accuracy(digits_result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    split, model = digits_result.split, digits_result.model
    report = export_onnx(
        model,
        torch.from_numpy(split.x_train[:4]),
        tmp_path / "m.onnx",
        check_inputs=torch.from_numpy(split.x_test[:32]),
    )
    torch_pred = T.predict(model, split.x_test).argmax(1)
    onnx_pred = onnx_logits(report.path, split.x_test).argmax(1)
    assert (torch_pred == onnx_pred).all()
    assert float((onnx_pred == split.y_test).mean()) == digits_result.accuracy
    assert report.bn_folded == 3 and report.bn_left == []
    assert "BatchNormalization" not in report.op_counts
    assert max(report.parity.values()) <= 1e-5
    # dynamic batch axis: any batch size runs
    proto = onnx.load(str(report.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for b in (1, 7, 33):
        assert onnx_logits(report.path, split.x_test[:b], batch=b).shape == (b, 10)
    # one file, no external data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_train_mode_pitfall(digits_result) -> None:  # type: ignore[no-untyped-def]
    """Evaluated in train mode at batch 1, BN normalizes each sample by its own statistics:
    other answers, much worse accuracy; and the pass overwrites the running statistics."""
    split = digits_result.split
    model = copy.deepcopy(digits_result.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        preds = np.array([int(model(torch.from_numpy(x[None])).argmax()) for x in split.x_test])
    train_mode_acc = float((preds == split.y_test).mean())
    assert train_mode_acc < 0.5 < digits_result.accuracy
    changed = [
        k for k, v in model.state_dict().items() if "running" in k and not torch.equal(v, before[k])
    ]
    assert changed, "a train-mode pass updates the running statistics"
    # the pipeline refuses to predict or export with a model in train mode
    with pytest.raises(StatisticsError, match="training mode"):
        T.predict(model, split.x_test[:2])
    with pytest.raises(StatisticsError, match=r"model\.eval\(\)"):
        export_onnx(model, torch.from_numpy(split.x_test[:2]), Path("/nonexistent/never.onnx"))


def test_never_updated_statistics_are_refused_and_recalibration_fixes_them(digits_result) -> None:  # type: ignore[no-untyped-def]
    """TensorFlow's forgotten UPDATE_OPS in PyTorch clothes: trained weights, statistics 0/1."""
    split = digits_result.split
    model = copy.deepcopy(digits_result.model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()  # mean 0, var 1, num_batches_tracked 0
    stale_acc = T.accuracy(model, split.x_test, split.y_test)
    assert stale_acc < 0.9
    with pytest.raises(StatisticsError, match=r"'features\.1' was never updated.*--recalibrate"):
        check_running_stats(model)
    with pytest.raises(StatisticsError, match="never updated"):
        export_onnx(model, torch.from_numpy(split.x_test[:2]), Path("/nonexistent/never.onnx"))
    recalibrate(model, split.x_train)
    check_running_stats(model)
    assert T.accuracy(model, split.x_test, split.y_test) >= 0.985


def test_batch_statistics_layer_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(StatisticsError, match=r"'1' has track_running_stats=False"):
        check_running_stats(model)
    with pytest.raises((StatisticsError, FoldError), match="track_running_stats=False"):
        export_onnx(model, torch.zeros(2, 1, 8, 8), Path("/nonexistent/never.onnx"))


def test_tf_momentum_convention() -> None:
    """Keras 0.99 is PyTorch 0.01: the running means agree."""
    assert T.tf_momentum_to_torch(0.99) == 0.01
    bn = nn.BatchNorm1d(3, momentum=T.tf_momentum_to_torch(0.99))
    gen = torch.Generator().manual_seed(0)
    keras_mean = np.zeros(3)
    for _ in range(200):
        x = torch.randn(16, 3, generator=gen) * 2 + torch.tensor([1.0, -3.0, 5.0])
        bn(x)
        keras_mean = 0.99 * keras_mean + (1 - 0.99) * x.mean(0).double().numpy()
    assert np.abs(bn.running_mean.double().numpy() - keras_mean).max() < 1e-5
    with pytest.raises(ValueError):
        T.tf_momentum_to_torch(99)


def test_unfolded_bn_is_kept_and_exported_correctly(tmp_path: Path) -> None:
    """A BN after ReLU cannot be folded: it stays (inference mode) and parity still holds."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten())
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 6, 6))
    model.eval()
    report = export_onnx(model, torch.randn(2, 1, 6, 6), tmp_path / "m.onnx")
    assert report.bn_left == ["2"]
    assert report.op_counts.get("BatchNormalization") == 1
    assert max(report.parity.values()) <= 1e-5


def test_parity_check_catches_a_wrong_export(tmp_path: Path) -> None:
    """Linear on (N, L, C) then BatchNorm1d normalizes dim 1 (L); with L == C it traces and the
    fold scales the wrong axis: the parity check must catch it rather than write the file."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))

    model = Seq()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
        model.bn.running_var.copy_(torch.tensor([0.1, 4.0, 9.0, 0.25]))
        model.bn.num_batches_tracked.fill_(1)
    model.eval()
    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx(model, torch.randn(2, 4, 4), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_vol3d_block_and_3d_export(tmp_path: Path) -> None:
    """The vol3d recipe: Conv3d(k=3) + BN3d(eps 1e-5, momentum 0.01) + LeakyReLU(0.2); a short
    real training run on generated volumes exports with every BN folded."""
    model = build("vol3d")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert [b.num_features for b in bns] == [8, 24, 32, 64]
    assert all(b.eps == 1e-5 and b.momentum == 0.01 for b in bns)
    assert [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * 4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert [c.stride for c in convs] == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert isinstance(model, Vol3d)
    x, y = volumes(24, seed=5, size=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for i in range(0, 24, 8):
        loss = nn.functional.cross_entropy(
            model(torch.from_numpy(x[i : i + 8])), torch.from_numpy(y[i : i + 8])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    report = export_onnx(
        model, torch.from_numpy(x[:2]), tmp_path / "v.onnx", check_inputs=torch.from_numpy(x[:6])
    )
    assert report.bn_folded == 4 and "BatchNormalization" not in report.op_counts
    assert report.op_counts["Conv"] == 4
    ref = T.predict(model, x[:6])
    assert relative_error(onnx_logits(report.path, x[:6]), ref) <= 1e-5


@pytest.mark.parametrize(("name", "target"), [("digits", 0.985), ("vol3d", 0.95)])
def test_bundled_models(name: str, target: float) -> None:
    """The committed models: accuracy at target, recomputed from the files themselves, no BN."""
    config = json.loads((BUNDLED / name / "config.json").read_text())
    onnx_path = BUNDLED / name / "1" / "model.onnx"
    meta = config["versions"]["1"]
    assert meta["accuracy"] >= target
    assert meta["accuracy"] == meta["torch_accuracy"]
    assert max(meta["parity_max_rel_error"].values()) <= 1e-5
    assert all(bn["folded"] for bn in meta["batchnorm"])
    assert not [
        n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "BatchNormalization"
    ]
    split = T.load_split(name)
    acc = float((onnx_logits(onnx_path, split.x_test).argmax(1) == split.y_test).mean())
    assert acc == meta["accuracy"]
    assert config["inputs"][0]["shape"] == [-1, *split.x_test.shape[1:]]
    assert config["labels"] == list(split.labels)
    # the batching the recipe writes (vol3d: merged batches capped, see training/repo.py)
    assert config["batching"].get("max_combined_batch_size") == MAX_COMBINED.get(name)


# What `make models` reproduces, and where (docs/reproducibility.md).
# Fields of a version in config.json that the exporting machine measures with its own kernels
# (torch's and onnxruntime's): across CPUs they agree to rounding, not bit for bit.
MEASURED_BY_THE_EXPORTER = ("parity_max_rel_error", "drift_reference")
# Retraining on another CPU: the bundled digits recipe, rerun with 1, 3 and 4 threads (other
# reduction orders, as another CPU's kernels have), gave weights up to 0.25 apart (0.35 seen on
# an AMD EPYC), accuracy within 0.22 points, BN means 0.09 of a committed standard deviation
# apart and variances within 0.052 in log (RMS over channels). Another seed: 0.77-1.39 and
# 0.23-0.88, so these tolerances still tell a different recipe apart.
RETRAIN_ACCURACY_POINTS = 1.0
RETRAIN_MEAN_SHIFT_STD = 0.3
RETRAIN_LOG_VAR = 0.15


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_close_tree(got: object, want: object, where: str = "") -> None:
    """Same structure, same strings, numbers equal to 1e-5 relative."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_close_tree(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), where
    else:
        assert got == want, where


@pytest.mark.parametrize("name", ["digits", "vol3d"])
def test_exporting_a_committed_checkpoint_gives_the_committed_files(
    name: str, tmp_path: Path
) -> None:
    """On any machine: the committed checkpoint exports to the committed model.onnx byte for
    byte, and to its config.json exactly but for what the exporter measures with its kernels."""
    checkpoint = bundle.checkpoint_path(BUNDLED, name)
    path = bundle.export(tmp_path, name, checkpoint)
    assert sha256(path) == sha256(BUNDLED / name / "1" / "model.onnx")
    assert sha256(bundle.checkpoint_path(tmp_path, name)) == sha256(checkpoint)
    fresh = json.loads((tmp_path / name / "config.json").read_text())
    committed = json.loads((BUNDLED / name / "config.json").read_text())
    fresh_v, committed_v = fresh["versions"]["1"], committed["versions"]["1"]
    for key in MEASURED_BY_THE_EXPORTER:
        assert_close_tree(fresh_v.pop(key), committed_v.pop(key), key)
    assert fresh == committed
    assert committed_v["trained_on"]["cpu"], "the checkpoint records the CPU that trained it"


def bn_drift(model: nn.Module, committed: list[dict]) -> dict[str, tuple[float, float]]:  # type: ignore[type-arg]
    """{layer: (RMS of the mean shift in committed standard deviations, RMS of log var ratio)}"""
    modules = dict(model.named_modules())
    out = {}
    for bn in committed:
        m = modules[bn["layer"]]
        mean, var = np.array(bn["running_mean"]), np.array(bn["running_var"])
        got_mean = m.running_mean.double().numpy()  # type: ignore[union-attr]
        got_var = m.running_var.double().numpy()  # type: ignore[union-attr]
        shift = float(np.sqrt(np.mean(((got_mean - mean) / np.sqrt(var + bn["eps"])) ** 2)))
        log_var = float(np.sqrt(np.mean(np.log(got_var / var) ** 2)))
        out[bn["layer"]] = (shift, log_var)
    return out


def test_retrained_digits_matches_the_committed_within_tolerance(digits_result) -> None:  # type: ignore[no-untyped-def]
    """On any machine: the bundled recipe retrained gives the committed model's accuracy and BN
    statistics within the stated tolerances."""
    committed = json.loads((BUNDLED / "digits" / "config.json").read_text())["versions"]["1"]
    points = 100 * abs(digits_result.accuracy - committed["accuracy"])
    assert points <= RETRAIN_ACCURACY_POINTS, (digits_result.accuracy, committed["accuracy"])
    drift = bn_drift(digits_result.model, committed["batchnorm"])
    assert len(drift) == 3
    for layer, (shift, log_var) in drift.items():
        assert shift <= RETRAIN_MEAN_SHIFT_STD and log_var <= RETRAIN_LOG_VAR, (layer, drift)


def test_retrained_digits_is_bit_for_bit_on_the_cpu_that_trained_it(
    digits_result,  # type: ignore[no-untyped-def]
    digits_repo: Path,
) -> None:
    """On the CPU recorded in config.json (`trained_on`) only: the recipe retrained gives the
    committed files byte for byte."""
    committed_cfg = json.loads((BUNDLED / "digits" / "config.json").read_text())
    built_on = committed_cfg["versions"]["1"]["trained_on"]
    if digits_result.trained_on != built_on:
        pytest.skip(
            f"bit for bit only on the CPU that trained the bundled models ({built_on}); this is "
            f"{digits_result.trained_on}: the within-tolerance test covers it"
        )
    assert sha256(digits_repo / "digits" / "1" / "model.onnx") == sha256(
        BUNDLED / "digits" / "1" / "model.onnx"
    )
    fresh_cfg = json.loads((digits_repo / "digits" / "config.json").read_text())
    assert fresh_cfg == committed_cfg


def test_digits_split_is_the_usual_one() -> None:
    split = digits()
    assert (len(split.y_train), len(split.y_test)) == (1347, 450)
    assert (
        split.x_train.dtype == np.float32
        and 0.0 <= split.x_train.min() <= split.x_train.max() <= 1.0
    )
