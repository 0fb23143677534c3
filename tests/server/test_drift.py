"""Drift monitoring (docs/drift.md): a served digits model scores clean test digits low and
noised, shifted or inverted digits high, layer by layer; off by default."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from oip import wait_for

from bnserve import cli
from bnserve.client.bench import drift_transform
from bnserve.client.client import InferenceClient
from bnserve.client.drift import fetch, render, scrape
from bnserve.server.app import serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.drift import DriftMonitor, symmetric_kl
from bnserve.training.data import digits, vol3d

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"
EARLY = ("features.1", "features.4")  # the first two folded BN layers of digits
THRESHOLD = 0.002  # docs/drift.md: alarm when an early layer's score is above this
CLEAN_MAX = 0.02  # every layer, clean digits (measured <= 0.004)


def _copy_bundled(tmp_path_factory: pytest.TempPathFactory, model: str) -> Path:
    """A repository holding only the bundled `model` (config.json with its drift reference)."""
    root = tmp_path_factory.mktemp(f"drift_{model}") / "repo"
    (root / model).mkdir(parents=True)
    shutil.copy(BUNDLED / model / "config.json", root / model / "config.json")
    shutil.copytree(BUNDLED / model / "1", root / model / "1")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_bundled(tmp_path_factory, "digits")


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digits().x_test


@pytest.fixture(scope="module")
def vol_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_bundled(tmp_path_factory, "vol3d")


def _settings(repo: Path, rate: float) -> Settings:
    return Settings(
        repo=repo, host="127.0.0.1", port=0, metrics_port=0, instances=1, drift_sample_rate=rate
    )


def _send(port: int, x: np.ndarray, rows: int = 16) -> int:
    with InferenceClient(f"127.0.0.1:{port}", timeout=10) as client:
        for i in range(0, len(x), rows):
            client.infer("digits", x[i : i + rows])
    return (len(x) + rows - 1) // rows


def _caught_up(monitor: DriftMonitor, batches: int) -> Callable[[], bool]:
    return lambda: monitor.samples + monitor.dropped >= batches


def test_symmetric_kl() -> None:
    m, v = np.array([0.0, 1.0]), np.array([1.0, 4.0])
    assert np.allclose(symmetric_kl(m, v, m, v), 0.0)
    got = symmetric_kl(np.array([0.0]), np.array([1.0]), np.array([1.0]), np.array([2.0]))
    vp, vq = 1 + 1e-5, 2 + 1e-5
    kl = 0.5 * (vp / vq + 1 / vq - 1 + np.log(vq / vp)) + 0.5 * (
        vq / vp + 1 / vp - 1 + np.log(vp / vq)
    )
    assert got[0] == pytest.approx(kl)


@pytest.mark.parametrize("kind", [None, "noise", "shift", "contrast"])
def test_scores_clean_low_drifted_high(repo: Path, x_test: np.ndarray, kind: str | None) -> None:
    x = x_test if kind is None else drift_transform(x_test, kind, seed=0)
    with serve_in_thread(_settings(repo, 1.0)) as app:
        monitor = app.repository.get("digits").drift
        assert monitor is not None and [r.layer for r in monitor.layers][:2] == list(EARLY)
        batches = _send(app.port, x)
        wait_for(_caught_up(monitor, batches))
        assert monitor.samples >= batches // 2
        scores = monitor.scores()
        # The gauge carries the same values (set after the scores, so poll for it).
        wait_for(
            lambda: (
                app.metrics.snapshot("bnserve_drift_samples_total", model="digits", version="1")
                == monitor.samples
            )
        )
        for layer, score in scores.items():
            gauge = app.metrics.snapshot(
                "bnserve_bn_drift", model="digits", version="1", layer=layer
            )
            assert gauge == pytest.approx(score)
        if kind is None:
            assert all(s < CLEAN_MAX for s in scores.values()), scores
            assert all(scores[layer] < THRESHOLD / 5 for layer in EARLY), scores
            # `bnserve drift` reads the same report from /metrics.
            rows = scrape(f"http://127.0.0.1:{app.metrics_port}/metrics", "digits")
            assert {r.layer: r.score for r in rows} == pytest.approx(scores)
            assert [r.channels for r in rows] == [16, 32, 32]
            assert "features.1" in render(rows, THRESHOLD) and "DRIFT" not in render(
                rows, THRESHOLD
            )
        else:
            assert all(scores[layer] > 2 * THRESHOLD for layer in EARLY), scores
        # ModelStatistics carries the same report (its bn_drift extension), layers in order.
        via_grpc = fetch(f"127.0.0.1:{app.port}", "digits")
        assert [r.layer for r in via_grpc] == [ref.layer for ref in monitor.layers]
        assert {r.layer: r.score for r in via_grpc} == pytest.approx(scores)
        assert [r.channels for r in via_grpc] == [16, 32, 32]
        assert {(r.model, r.version, r.samples) for r in via_grpc} == {
            ("digits", "1", monitor.samples)
        }


def test_gauge_moves_from_clean_to_drifted(repo: Path, x_test: np.ndarray) -> None:
    with serve_in_thread(_settings(repo, 1.0)) as app:
        monitor = app.repository.get("digits").drift
        assert monitor is not None
        sent = _send(app.port, x_test)
        wait_for(_caught_up(monitor, sent))
        clean = app.metrics.snapshot(
            "bnserve_bn_drift", model="digits", version="1", layer=EARLY[0]
        )
        sent += _send(app.port, drift_transform(x_test, "noise"))
        wait_for(_caught_up(monitor, sent))
        wait_for(
            lambda: (
                app.metrics.snapshot(
                    "bnserve_bn_drift", model="digits", version="1", layer=EARLY[0]
                )
                > 10 * max(clean, THRESHOLD)
            )
        )


def test_off_by_default(repo: Path, x_test: np.ndarray) -> None:
    assert Settings().drift_sample_rate == 0.0
    with serve_in_thread(_settings(repo, 0.0)) as app:
        assert app.repository.get("digits").drift is None
        _send(app.port, x_test[:32])
        text = app.metrics.render().decode()
        assert "bnserve_bn_drift{" not in text and "bnserve_drift_samples_total{" not in text
        assert fetch(f"127.0.0.1:{app.port}", "digits") == []


def test_sampling_rate_is_deterministic(repo: Path) -> None:
    with serve_in_thread(_settings(repo, 0.25)) as app:
        monitor = app.repository.get("digits").drift
        assert monitor is not None
        assert sum(monitor.want() for _ in range(400)) == 100


def test_drift_cli_reads_model_statistics(
    repo: Path, x_test: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bnserve drift --target HOST:PORT`: the report over gRPC; exit 2 when a layer is over
    --threshold, 1 when the server has no drift monitor for the model."""
    with serve_in_thread(_settings(repo, 1.0)) as app:
        monitor = app.repository.get("digits").drift
        assert monitor is not None
        wait_for(_caught_up(monitor, _send(app.port, drift_transform(x_test[:160], "noise"))))
        argv = ["drift", "--target", f"127.0.0.1:{app.port}", "--model", "digits"]
        assert cli.main([*argv, "--threshold", str(THRESHOLD)]) == 2
        out = capsys.readouterr().out
        assert "features.1" in out and "DRIFT" in out
    with serve_in_thread(_settings(repo, 0.0)) as app:
        assert cli.main(["drift", "--target", f"127.0.0.1:{app.port}"]) == 1
        assert "no drift series" in capsys.readouterr().out


VOL_EARLY = ("features.0.1", "features.1.1")  # vol3d's first two folded BN layers


@pytest.mark.parametrize("kind", [None, "noise", "contrast", "shift"])
def test_vol3d_scores(vol_repo: Path, kind: str | None) -> None:
    """The same threshold holds for the 3D model (docs/drift.md): clean test volumes stay far
    below it on the early layers, noised or inverted ones far above. A shift is no drift here:
    vol3d's solids sit at random positions, so a rolled volume is still training-like."""
    x = vol3d(n_train=1200).x_test  # (300, 1, 32, 32, 32) float32
    x = x if kind is None else drift_transform(x, kind, seed=0)
    with serve_in_thread(_settings(vol_repo, 1.0)) as app:
        monitor = app.repository.get("vol3d").drift
        assert monitor is not None and [r.layer for r in monitor.layers][:2] == list(VOL_EARLY)
        sent = 0
        with InferenceClient(f"127.0.0.1:{app.port}", timeout=30) as client:
            for i in range(0, len(x), 16):
                client.infer("vol3d", x[i : i + 16])
                sent += 1
        wait_for(_caught_up(monitor, sent), 60)
        assert monitor.samples >= sent // 2
        scores = monitor.scores()
    early = [scores[layer] for layer in VOL_EARLY]
    if kind in (None, "shift"):
        assert max(early) < THRESHOLD / 5, scores
    else:
        assert min(early) > 100 * THRESHOLD, scores


def test_numpy_fallback_scores_like_the_in_graph_moments(
    x_test: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model the in-graph moments cannot serve (opset < 18, unknown rank) gets the folded
    tensors as raw outputs and numpy moments: the same scores, up to float32 vs float64 sums."""
    import json

    from bnserve.server import drift

    path = str(BUNDLED / "digits" / "1" / "model.onnx")
    layers = drift.parse_reference(
        json.loads((BUNDLED / "digits" / "config.json").read_text()), "1"
    )
    batches = [[{"input": x_test[i : i + 16]}] for i in range(0, 160, 16)]

    def scores(in_graph: bool) -> dict[str, float]:
        monitor = drift.DriftMonitor("digits", "1", path, layers, rate=1.0)
        assert monitor._in_graph is in_graph
        try:
            for b in batches:
                monitor._observe(b)  # the worker's step, run here for determinism
            return monitor.scores()
        finally:
            monitor.close()

    in_graph = scores(True)
    monkeypatch.setattr(drift, "_moments_graph", lambda path, tensors: None)
    fallback = scores(False)
    assert list(fallback) == list(in_graph) == [r.layer for r in layers]
    assert fallback == pytest.approx(in_graph, rel=1e-3, abs=1e-7)
