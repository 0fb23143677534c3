"""Data-parallel BN training on CPU: DistributedDataParallel over gloo, launched by torchrun.

`bnserve train MODEL --nproc N` starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m bnserve.training.distributed ...`` (`launch`). Every rank runs the ordinary
training loop (train.train) with a `Replica`: same seed, same weights, same permutation of the
training set, so every rank walks the same GLOBAL batches (--batch-size) and trains on its
strided shard of each (``idx[rank::N]``, as DistributedSampler splits). DDP averages the
gradients; rank 0 evaluates, logs and writes the checkpoint (train.save_checkpoint's format, plain
BatchNorm modules holding the synchronized running statistics).

BN statistics. Without synchronization each replica normalizes with, and averages into its
running statistics, the mean/variance of its own shard: with small per-device batches those are
noisy, and the replicas' running statistics drift apart. With SyncBN (on by default) every BN
layer in train mode gathers the shards' (count, mean, M2) and normalizes with the statistics of
the whole global batch, so N processes compute what one process computes on the global batch, up
to float reduction order (tests/training/test_distributed.py measures it).

torch.nn.SyncBatchNorm only runs on GPUs ("SyncBatchNorm expected input tensor to be on GPU"),
(and DDP refuses it on CPU modules), so `CPUSyncBatchNorm` does the same two collectives over
any backend (gloo on CPU): an all_gather of the per-shard statistics in forward and an
all_reduce of sum(dy), sum(dy * x_hat) in backward. The trained model is converted back to plain
BatchNorm{1,2,3}d (`revert_sync_batchnorm`) before it is evaluated, recalibrated or saved, so
the checkpoint, the statistics checks, fold and export see ordinary BatchNorm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from . import train as T

log = logging.getLogger("bnserve.training")

__all__ = [
    "CPUSyncBatchNorm",
    "Replica",
    "convert_sync_batchnorm",
    "launch",
    "replica_spread",
    "revert_sync_batchnorm",
    "shard",
    "worker",
]

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SyncBatchNormFn(torch.autograd.Function):
    """Train-mode batch norm over the union of every rank's shard (torch's sync_batch_norm,
    which has CUDA kernels only, redone with plain tensor ops and gloo-capable collectives)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        group: Any,
        world: int,
    ) -> torch.Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        n = x.numel() // c
        if n:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        else:  # an empty shard contributes nothing
            var = mean = x.new_zeros(c)
        # Per shard (mean, M2 = n * biased var, n), combined exactly (Chan et al.): no
        # E[x^2] - E[x]^2 cancellation, so the result matches one process on the whole batch.
        local = torch.cat([mean, var * n, x.new_full((1,), float(n))])
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        table = torch.stack(parts)  # (world, 2C + 1)
        means, m2s, counts = table[:, :c], table[:, c : 2 * c], table[:, 2 * c :]
        total = float(counts.sum())
        if total < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(total)} "
                "over all replicas"
            )
        g_mean = (means * counts).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
        invstd = torch.rsqrt(g_m2 / total + eps)
        if running_mean is not None and running_var is not None:
            # The same update as F.batch_norm: the running variance is the UNBIASED one.
            running_mean.mul_(1 - momentum).add_(g_mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(g_m2 / (total - 1), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - g_mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(x, weight, g_mean, invstd)
        ctx.total, ctx.group, ctx.dims = total, group, dims
        return y

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (dy,) = grads
        x, weight, mean, invstd = ctx.saved_tensors
        c, dims = x.shape[1], ctx.dims
        shape = [1, c] + [1] * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        # Every rank's loss depends on the global mean/var, so the input gradient needs the
        # global sums; the weight/bias gradients stay local (DDP averages them).
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        mean_dy, mean_dy_xhat = both[:c] / ctx.total, both[c:] / ctx.total
        scale = invstd if weight is None else invstd * weight
        dx = (dy - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * scale.view(shape)
        dw = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """What torch.nn.SyncBatchNorm computes, on CPU (any process-group backend, e.g. gloo).

    Not a torch.nn.SyncBatchNorm subclass: DDP refuses those on CPU modules ("SyncBatchNorm
    layers only work with GPU modules"). Eval mode, or train mode without an initialized
    process group of more than one rank, is plain batch norm. `plain` is the BatchNorm class it
    converts back to; the parameters and buffers are BatchNorm's, so are state_dict keys.
    """

    plain: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        world = dist.get_world_size(group) if group is not None else 1
        if not self.training or world < 2:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        running_mean = running_var = None
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            running_mean, running_var = self.running_mean, self.running_var
        out = _SyncBatchNormFn.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world
        )
        assert isinstance(out, torch.Tensor)
        return out


def _swap(module: nn.Module, to_sync: bool) -> nn.Module:
    """convert/revert one module (children are handled by the callers' recursion)."""
    old: _BatchNorm
    new: _BatchNorm
    if to_sync and isinstance(module, _PLAIN) and type(module) in _PLAIN:
        old = module
        sync = CPUSyncBatchNorm(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats
        )
        sync.plain = type(old)
        new = sync
    elif not to_sync and isinstance(module, CPUSyncBatchNorm):
        old = module
        new = old.plain(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats
        )
    else:
        return module  # not BN, or a _BatchNorm subclass of its own: left alone
    # The same Parameter and buffer objects: an optimizer built before keeps working.
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.running_mean, new.running_var = old.running_mean, old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def _convert(module: nn.Module, to_sync: bool) -> nn.Module:
    out = _swap(module, to_sync)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, to_sync))
    return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm{1,2,3}d replaced by a `CPUSyncBatchNorm` sharing its
    parameters and buffers (in place for submodules; returns the root, new if it was a BN)."""
    return _convert(module, True)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_sync_batchnorm: plain BatchNorm{1,2,3}d with the same tensors."""
    return _convert(module, False)


def shard(idx: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, float]:
    """Rank's strided part of a global batch and its loss weight.

    DDP AVERAGES the ranks' gradients; the gradient of the global batch's mean loss is the
    average of the ranks' mean-loss gradients weighted by world * len(part) / len(idx): 1.0 when
    the shards are equal, which is the usual case (--batch-size divisible by --nproc).
    """
    part = idx[rank::world]
    return part, world * len(part) / len(idx)


@torch.no_grad()
def replica_spread(model: nn.Module) -> float:
    """Collective: the largest difference, over every BN running mean/var element, between the
    replicas' values. 0 with SyncBN (up to float noise); per-replica statistics drift apart."""
    bufs = [
        t.reshape(-1).double()
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]
    if not bufs:
        return 0.0
    flat = torch.cat(bufs)
    both = torch.cat([flat, -flat])  # max(x) and -min(x) in one MAX reduction
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float((both[: len(flat)] + both[len(flat) :]).max())


class Replica:
    """train.DataParallel for one torchrun rank: DDP (+ SyncBN), strided shards, step timing."""

    def __init__(self, *, rank: int, world: int, sync_bn: bool) -> None:
        self.rank, self.world, self.sync_bn = rank, world, sync_bn
        self.main = rank == 0
        # The last global batch is dropped when too small: with SyncBN every shard needs a
        # sample (and BN 2 in all: the single-process rule), without it every shard needs 2.
        self.min_batch = max(2, world) if sync_bn else 2 * world
        self.step_seconds: list[float] = []  # time between consecutive steps (shard calls)
        self.spread = 0.0
        self._last: float | None = None

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        if self.sync_bn:
            model = convert_sync_batchnorm(model)
        # forward_sync_buffers=False: each replica keeps its own running statistics (identical with
        # SyncBN; with --no-sync-bn rank 0 saves its own, the others' are reported as spread).
        return model, DistributedDataParallel(model, forward_sync_buffers=False)

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        now = time.perf_counter()
        if self._last is not None:
            self.step_seconds.append(now - self._last)
        self._last = now
        return shard(idx, self.rank, self.world)

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return [float(v) for v in t]

    def unwrap(self, model: nn.Module) -> nn.Module:
        self.spread = replica_spread(model)
        return revert_sync_batchnorm(model)

    def median_step_ms(self) -> float:
        """Median of the step intervals: robust to the epoch boundaries (evaluation)."""
        s = sorted(self.step_seconds)
        return 1e3 * s[len(s) // 2] if s else float("nan")


def _exit_with_parent() -> None:
    """torchrun starts each worker in its own session; if torchrun dies (SIGKILL after a
    timeout), the worker must not live on waiting in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker(argv: Sequence[str] | None = None) -> int:
    """One rank, under torchrun (reads RANK and WORLD_SIZE; torchrun provides the store)."""
    p = argparse.ArgumentParser(prog="bnserve.training.distributed")
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--out", type=Path, required=True, help="checkpoint (rank 0 writes it)")
    p.add_argument("--summary", type=Path, help="rank 0 writes a JSON summary here")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--collective-timeout", type=float, default=300.0)
    p.add_argument("--train-samples", type=int, help="train on the first K training samples")
    args = p.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _exit_with_parent()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}/{world}]: %(message)s",
    )
    cfg = T.TrainConfig(**json.loads(args.config))
    torch.set_num_threads(cfg.threads or 1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.collective_timeout))
    try:
        replica = Replica(rank=rank, world=world, sync_bn=args.sync_bn)
        if replica.main:
            log.info(
                "%d processes (gloo), global batch %d = %s per process, BN statistics %s",
                world,
                cfg.batch_size,
                "/".join(str(len(range(r, cfg.batch_size, world))) for r in range(world)),
                "synchronized (SyncBatchNorm)" if args.sync_bn else "per replica",
            )
        split = T.load_split(cfg.model, n_train=cfg.n_train)
        if args.train_samples:
            split = dataclasses.replace(
                split,
                x_train=split.x_train[: args.train_samples],
                y_train=split.y_train[: args.train_samples],
            )
        result = T.train(
            cfg,
            split=split,
            progress=args.progress and replica.main,
            echo=log.info if replica.main else (lambda _msg: None),
            parallel=replica,
        )
        if replica.main:
            T.save_checkpoint(args.out, result)
            summary = {
                "checkpoint": str(args.out),
                "accuracy": result.accuracy,
                "n_test": len(result.split.y_test),
                "history": result.history,
                "nproc": world,
                "sync_bn": args.sync_bn,
                "steps": len(replica.step_seconds) + 1,
                "step_ms_median": replica.median_step_ms(),
                "replica_spread": replica.spread,
            }
            log.info(
                "median step %.2f ms; running statistics differ between replicas by up to %.3g",
                summary["step_ms_median"],
                replica.spread,
            )
            if args.summary:
                args.summary.write_text(json.dumps(summary, indent=1))
        # Tear gloo down together (PyTorch asks every rank to destroy the group at about the same
        # time): once in CI, rank 1 destroyed its group while rank 0 was still writing the
        # checkpoint and aborted ("terminate called without an active exception"). Only on
        # success: after a failure the others may never come.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM torchrun (its agent terminates the workers), then SIGKILL if it lingers (the
    workers then exit on their own: _exit_with_parent)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def launch(
    cfg: T.TrainConfig,
    *,
    nproc: int,
    out: str | Path,
    sync_bn: bool = True,
    progress: bool = True,
    timeout: float | None = None,
    collective_timeout: float = 300.0,
    train_samples: int | None = None,
) -> dict[str, Any]:
    """Train with `nproc` processes under torchrun and return rank 0's summary (accuracy,
    history, median step time, replica spread); the checkpoint is at `out`.

    cfg.batch_size is the GLOBAL batch; each process runs 1 torch thread unless cfg.threads says
    otherwise. `timeout` bounds the whole run (None: no bound; a collective that waits longer
    than `collective_timeout` for a dead or stuck rank fails anyway). On timeout, Ctrl-C or a
    failed rank every process is stopped and RuntimeError (or KeyboardInterrupt) is raised.
    `train_samples` trains on the first K training samples only (smoke and equivalence tests).
    """
    if nproc < 2:
        raise ValueError(f"nproc must be at least 2 for distributed training, got {nproc}")
    if cfg.batch_size < 2 * nproc:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch, split over {nproc} processes: "
            f"it must be at least {2 * nproc} (BN needs 2 samples per process)"
        )
    cfg = replace(cfg, threads=cfg.threads or 1)
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="bnserve-ddp-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
            "-m", "bnserve.training.distributed",
            "--config", json.dumps(asdict(cfg)),
            "--out", str(out), "--summary", str(summary),
            "--sync-bn" if sync_bn else "--no-sync-bn",
            f"--collective-timeout={collective_timeout}",
            *(["--progress"] if progress else []),
            *([f"--train-samples={train_samples}"] if train_samples else []),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
        log.debug("launching %s", " ".join(cmd))
        # Own session: a terminal's Ctrl-C reaches only us, and we stop torchrun in order.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise RuntimeError(
                f"distributed training did not finish within {timeout:g} s; stopped"
            ) from None
        except BaseException:
            _stop(proc)
            raise
        if rc != 0:
            raise RuntimeError(
                f"distributed training failed: torchrun exited with status {rc} "
                "(the failing rank's traceback is above)"
            )
        result: dict[str, Any] = json.loads(summary.read_text())
        return result


if __name__ == "__main__":
    raise SystemExit(worker())
