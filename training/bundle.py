"""`make models`: retrain the bundled models, keep their checkpoints, export from them.

What is reproducible, and where (docs/reproducibility.md):
- Exporting a committed checkpoint (`<repo>/<name>/1/checkpoint.pt`) gives the committed
  model.onnx byte for byte on any machine: folding and serializing are exact operations.
- Retraining gives the same checkpoint bit for bit only on the CPU that trained it (config.json:
  `trained_on`): another CPU model runs other kernels, which round differently, and the weights
  drift apart over the epochs. Elsewhere it gives a model of the same accuracy and BN statistics
  within the tolerances tests/training/test_pipeline.py states.

    python -m bnserve.training.bundle                     # retrain, checkpoint, export
    python -m bnserve.training.bundle --from-checkpoint   # export the committed checkpoints
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from . import train as T
from .repo import write_entry

# The bundled models' recipes. Two threads: the same on every machine of this kind.
BUNDLE: dict[str, dict[str, object]] = {
    "digits": {"seed": 0, "threads": 2},
    "vol3d": {"seed": 0, "threads": 2},
}
VERSION = 1


def checkpoint_path(repo: Path, name: str) -> Path:
    """Where a bundled model's checkpoint lives: beside the model.onnx exported from it (the
    server loads only model.onnx; the image leaves *.pt out)."""
    return repo / name / str(VERSION) / "checkpoint.pt"


def export(repo: Path, name: str, checkpoint: Path) -> Path:
    """Write `<repo>/<name>/` afresh from a checkpoint: model.onnx and config.json."""
    model, cfg, ckpt = T.load_checkpoint(checkpoint)
    split = T.load_split(cfg.model, n_train=cfg.n_train)
    keep = checkpoint.read_bytes()
    shutil.rmtree(repo / name, ignore_errors=True)
    path, _ = write_entry(
        repo,
        model,
        cfg,
        split,
        name=name,
        version=VERSION,
        torch_accuracy=T.accuracy(model, split.x_test, split.y_test),
        trained_on=ckpt.get("trained_on"),
    )
    checkpoint_path(repo, name).write_bytes(keep)
    return path


def build(repo: Path, name: str, *, progress: bool = False) -> Path:
    """Retrain with the bundled recipe, save the checkpoint, export from it."""
    cfg = T.TrainConfig.for_model(name, **BUNDLE[name])
    result = T.train(cfg, progress=progress)
    ckpt = T.save_checkpoint(repo / f".{name}.checkpoint.pt", result)
    try:
        return export(repo, name, ckpt)
    finally:
        ckpt.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="do not retrain: export each model from its committed checkpoint",
    )
    parser.add_argument("models", nargs="*", default=list(BUNDLE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in args.models:
        if args.from_checkpoint:
            print(export(args.repo, name, checkpoint_path(args.repo, name)))
        else:
            print(build(args.repo, name, progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
