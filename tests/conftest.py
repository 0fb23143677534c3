"""Session fixtures: models really trained and exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_REPO = ROOT / "model_repository"


@pytest.fixture(scope="session")
def digits_result():  # type: ignore[no-untyped-def]
    """The digits CNN trained with the bundled recipe (seed 0, 2 threads): ~99% in seconds."""
    from bnserve.training import train as T
    from bnserve.training.bundle import BUNDLE

    return T.train(T.TrainConfig.for_model("digits", **BUNDLE["digits"]), progress=False)


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory: pytest.TempPathFactory, digits_result) -> Path:  # type: ignore[no-untyped-def]
    """A model repository holding the freshly trained digits model as version 1."""
    from bnserve.training.repo import write_entry

    repo = tmp_path_factory.mktemp("repo")
    write_entry(
        repo,
        digits_result.model,
        digits_result.config,
        digits_result.split,
        version=1,
        torch_accuracy=digits_result.accuracy,
        trained_on=digits_result.trained_on,
    )
    return repo
