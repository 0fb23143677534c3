"""Distributed BN training: DDP over gloo under torchrun, SyncBN on CPU, and what it changes.

The equivalence test runs 2 real processes on 5 global batches of 32 digits and compares with
one process on the same 5 batches: with SyncBN every step is the single-process step up to float
reduction order, so the running statistics agree to ~5e-7 (asserted <= 1e-5). Per-replica BN
(16 samples a process) differs by ~3e-2 from the same comparison.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bnserve import cli
from bnserve.training import distributed as D
from bnserve.training import fold_batchnorm
from bnserve.training import train as T

STEPS, BATCH = 5, 32  # 5 global batches of 32: 16 samples a process


def _bn_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def small() -> tuple[T.TrainConfig, Any]:
    """digits, one epoch over the first STEPS * BATCH training samples, and one process's run
    on exactly those global batches."""
    cfg = T.TrainConfig.for_model("digits", epochs=1, batch_size=BATCH, threads=1)
    split = T.load_split("digits")
    n = STEPS * BATCH
    split = dataclasses.replace(split, x_train=split.x_train[:n], y_train=split.y_train[:n])
    return cfg, T.train(cfg, split=split, progress=False)


def _run(cfg: T.TrainConfig, out: Path, *, sync_bn: bool) -> tuple[dict[str, Any], nn.Module]:
    summary = D.launch(
        cfg,
        nproc=2,
        out=out,
        sync_bn=sync_bn,
        progress=False,
        timeout=120,
        collective_timeout=60,
        train_samples=STEPS * BATCH,
    )
    model, _, ckpt = T.load_checkpoint(out)
    assert summary["steps"] == STEPS and summary["nproc"] == 2
    assert ckpt["history"] == summary["history"]
    return summary, model


def test_sync_bn_statistics_equal_one_process(small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, ref = small
    summary, model = _run(cfg, tmp_path / "sync.pt", sync_bn=True)
    diff = _max_diff(_bn_stats(model.state_dict()), _bn_stats(ref.model.state_dict()))
    # Same global batches, same weights: only float reduction order differs (measured ~5e-7).
    assert diff <= 1e-5, diff
    assert summary["replica_spread"] == 0.0  # every replica holds the same statistics
    for name, m in model.named_modules():  # the checkpoint holds plain BatchNorm2d
        assert not isinstance(m, D.CPUSyncBatchNorm), name
    # ... and export folds all of it
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.from_numpy(ref.split.x_test[:64])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_per_replica_statistics_differ(small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, ref = small
    summary, model = _run(cfg, tmp_path / "nosync.pt", sync_bn=False)
    diff = _max_diff(_bn_stats(model.state_dict()), _bn_stats(ref.model.state_dict()))
    # Each replica averages the statistics of its own 16 samples (measured ~3e-2, vs ~5e-7).
    assert diff > 1e-3, diff
    assert summary["replica_spread"] > 1e-3  # and the two replicas disagree with each other


def test_launch_timeout_stops_every_process(tmp_path: Path) -> None:
    cfg = T.TrainConfig.for_model("digits", epochs=50, threads=1)
    out = tmp_path / "never.pt"
    with pytest.raises(RuntimeError, match="did not finish within"):
        D.launch(cfg, nproc=2, out=out, progress=False, timeout=3)
    assert not out.exists()
    if Path("/proc").is_dir():  # no worker outlives the launch (they run in their own sessions)
        deadline = time.monotonic() + 10
        while (left := _processes_naming(str(out))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left


def _processes_naming(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            continue
    return found


def test_shards_cover_the_global_batch_and_weights_restore_its_mean() -> None:
    idx = torch.randperm(35, generator=torch.Generator().manual_seed(0))
    losses = torch.rand(35, dtype=torch.float64)
    for world in (1, 2, 3, 4):
        parts = [D.shard(idx, r, world) for r in range(world)]
        assert sorted(torch.cat([p for p, _ in parts]).tolist()) == sorted(idx.tolist())
        # DDP averages the ranks' weighted mean losses' gradients: the global mean's gradient.
        ddp = sum(w * float(losses[p].mean()) for p, w in parts) / world
        assert ddp == pytest.approx(float(losses[idx].mean()), rel=1e-12)
    assert [w for _, w in (D.shard(torch.arange(32), r, 2) for r in range(2))] == [1.0, 1.0]


def test_convert_and_revert_keep_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    synced = D.convert_sync_batchnorm(model)
    sync = D.CPUSyncBatchNorm
    assert [type(m) for m in synced] == [nn.Linear, sync, nn.Conv2d, sync]
    assert [id(p) for p in synced.parameters()] == params and list(synced.state_dict()) == keys
    # No process group: plain batch norm, train and eval.
    x = torch.randn(8, 4)
    ref = nn.BatchNorm1d(6)
    torch.testing.assert_close(synced[1](x @ torch.ones(4, 6)), ref(x @ torch.ones(4, 6)))
    plain = D.revert_sync_batchnorm(synced)
    assert [type(m) for m in plain] == [nn.Linear, nn.BatchNorm1d, nn.Conv2d, nn.BatchNorm2d]
    assert [id(p) for p in plain.parameters()] == params and list(plain.state_dict()) == keys


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3, 3), (5, 2, 3, 2, 2)])
def test_sync_function_equals_batch_norm_on_one_rank(shape: tuple[int, ...]) -> None:
    """The SyncBN autograd function, forced to run its collectives on a 1-rank gloo group,
    gives F.batch_norm's output, input/weight/bias gradients and running statistics."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(1)
        c = shape[1]
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_()
        w = torch.rand(c, generator=gen, dtype=torch.float64).requires_grad_()
        b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        rm2, rv2 = rm.clone(), rv.clone()
        y = D._SyncBatchNormFn.apply(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        y2 = nn.functional.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.1, eps=1e-5)
        grads2 = torch.autograd.grad(y2, (x, w, b), dy)
        torch.testing.assert_close(y, y2)
        for g, g2 in zip(grads, grads2, strict=True):
            torch.testing.assert_close(g, g2)
        torch.testing.assert_close(rm, rm2)
        torch.testing.assert_close(rv, rv2)  # the unbiased variance, like BatchNorm
    finally:
        dist.destroy_process_group()


def test_cli_train_nproc_launches_distributed(monkeypatch, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    calls: list[dict[str, Any]] = []

    def fake_launch(cfg: T.TrainConfig, **kw: Any) -> dict[str, Any]:
        calls.append({"cfg": cfg, **kw})
        return {"accuracy": 0.5, "n_test": 450, "step_ms_median": 12.0, "replica_spread": 0.0}

    monkeypatch.setattr(D, "launch", fake_launch)
    out = tmp_path / "d.pt"
    base = ["train", "digits", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert cli.main([*base, "--nproc", "2"]) == 0
    assert cli.main([*base, "--nproc", "2", "--no-sync-bn", "--batch-size", "8"]) == 0
    assert [c["sync_bn"] for c in calls] == [True, False]
    assert [c["nproc"] for c in calls] == [2, 2]
    assert calls[1]["cfg"].batch_size == 8 and calls[0]["out"] == out
    assert "2 processes, SyncBN" in capsys.readouterr().out
    assert cli.main([*base, "--nproc", "0"]) == 2


def test_launch_refuses_too_small_global_batch(tmp_path: Path) -> None:
    cfg = T.TrainConfig.for_model("digits", batch_size=3)
    with pytest.raises(ValueError, match="global batch"):
        D.launch(cfg, nproc=2, out=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="at least 2"):
        D.launch(cfg, nproc=1, out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
