"""`make models`: retrain and re-export the bundled models, bit for bit the same files.

Reproducible because the seed, the data, the thread count and the algorithms are fixed
(torch.use_deterministic_algorithms); the same CPU kind gives the same bytes.
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


def build(repo: Path, name: str, *, progress: bool = False) -> Path:
    cfg = T.TrainConfig.for_model(name, **BUNDLE[name])
    result = T.train(cfg, progress=progress)
    shutil.rmtree(repo / name, ignore_errors=True)
    path, _ = write_entry(
        repo, result.model, cfg, result.split, version=1, torch_accuracy=result.accuracy
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("models", nargs="*", default=list(BUNDLE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in args.models:
        print(build(args.repo, name, progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
