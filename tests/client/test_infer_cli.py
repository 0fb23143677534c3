"""`bnserve infer` as a user runs it (a subprocess) against a real server in this process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
BNSERVE = [sys.executable, "-m", "bnserve.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BNSERVE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV
    )


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    settings = Settings(
        repo=BUNDLED, host="127.0.0.1", port=0, metrics_port=-1, instances=2, grace=5
    )
    with serve_in_thread(settings) as app:
        assert isinstance(app, App)
        yield f"127.0.0.1:{app.port}"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits test set (x (N,1,8,8) float32, y, raw 0..16 pixel counts) and the reference
    probabilities from onnxruntime on the bundled file."""
    from bnserve.client.infer import digits_test_split, softmax

    x, y = digits_test_split()
    x = x.reshape(-1, 1, 8, 8)
    session = ort.InferenceSession(str(BUNDLED / "digits" / "1" / "model.onnx"))
    probs = softmax(session.run(None, {"input": x})[0])
    return x, y, probs


def _top(line: str) -> list[tuple[str, float]]:
    """'name: 3 0.9981  8 0.0012  5 0.0004' -> [("3", 0.9981), ...]."""
    _, _, rest = line.rpartition(": ")
    parts = rest.split()
    return [(parts[i], float(parts[i + 1])) for i in range(0, len(parts), 2)]


def test_split_matches_training(digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    from bnserve.training.data import digits as training_digits

    split = training_digits()
    np.testing.assert_array_equal(digits[0], split.x_test)
    np.testing.assert_array_equal(digits[1], split.y_test)


def test_infer_npy(
    target: str, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x, _, probs = digits
    batch = tmp_path / "five.npy"
    np.save(batch, x[:5])
    single = tmp_path / "one.npy"
    np.save(single, x[7, 0].astype(np.float64))  # (8, 8), float64: no batch axis, cast
    r = run("infer", "--target", target, "--model", "digits", str(batch), str(single))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"{batch}[{i}]" for i in range(5)] + [str(single)]
    for line, k in zip(lines, [0, 1, 2, 3, 4, 7], strict=True):
        top = _top(line)
        assert len(top) == 3
        want = np.argsort(-probs[k])[:3]
        assert [label for label, _ in top] == [str(i) for i in want]
        np.testing.assert_allclose([p for _, p in top], probs[k][want], atol=1e-4)


def test_infer_png(
    target: str, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    from PIL import Image

    x, y, probs = digits
    k = int(np.argmax(probs.max(axis=1)))  # a sample the model is sure about
    counts = np.rint(x[k, 0] * 16).astype(np.int64)  # back to sklearn's 0..16 pixel counts
    ink = np.rint(counts * 255 / 16).astype(np.uint8)
    # As a scan would come: dark ink on white paper, 32x32 (each pixel a 4x4 block), RGB.
    paper = Image.fromarray(255 - ink).resize((32, 32), Image.Resampling.NEAREST).convert("RGB")
    dark = tmp_path / "digit_paper.png"
    paper.save(dark)
    # And light ink on black, already 8x8, grayscale: no inversion.
    light = tmp_path / "digit_screen.png"
    Image.fromarray(ink).save(light)
    r = run("infer", "--target", target, "--model", "digits", "--top-k", "2", str(dark), str(light))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        top = _top(line)
        assert top[0][0] == str(y[k]) == str(np.argmax(probs[k])), line
        assert len(top) == 2
        assert abs(top[0][1] - probs[k].max()) < 1e-2


def test_infer_with_config_elsewhere(
    target: str, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """Run outside the repository: labels come from --config (here renamed, to see them)."""
    x, _, probs = digits
    config = json.loads((BUNDLED / "digits" / "config.json").read_text())
    config["labels"] = [f"digit-{i}" for i in range(10)]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    np.savez(tmp_path / "x.npz", first=x[:2], second=x[2])
    r = run(
        "infer", "--target", target, "--model", "digits", "--config", str(path), "--top-k", "1",
        str(tmp_path / "x.npz"), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [
        f"{tmp_path / 'x.npz'}:first[0]",
        f"{tmp_path / 'x.npz'}:first[1]",
        f"{tmp_path / 'x.npz'}:second",
    ]
    for line, k in zip(lines, [0, 1, 2], strict=True):
        assert _top(line)[0][0] == f"digit-{np.argmax(probs[k])}"


@pytest.mark.timeout(300)
def test_demo_accuracy_matches_config(target: str) -> None:
    config = json.loads((BUNDLED / "digits" / "config.json").read_text())
    recorded = config["versions"]["1"]["accuracy"]
    r = run("infer", "--target", target, "--model", "digits", "--demo", "--batch-size", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"accuracy (\d\.\d{4}) \((\d+)/(\d+)\)", r.stdout)
    assert m, r.stdout
    correct, n = int(m.group(2)), int(m.group(3))
    assert n == 450 and correct == round(recorded * n), (r.stdout, recorded)
    assert f"{recorded:.4f} (match)" in r.stdout
    lat = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", r.stdout)
    assert lat and 0 < float(lat.group(1)) <= float(lat.group(2)), r.stdout
    print("\n" + r.stdout)


def test_errors_are_reported(target: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 7), np.float32))
    r = run("infer", "--target", target, "--model", "digits", str(bad))
    assert r.returncode == 2 and "does not hold whole samples" in r.stderr
    r = run("infer", "--target", target, "--model", "nope", str(bad))
    assert r.returncode == 1 and "[NOT_FOUND]" in r.stderr
    r = run("infer", "--target", target, "--model", "digits")
    assert r.returncode == 2 and "--demo" in r.stderr


def test_demo_without_sklearn_says_so(target: str) -> None:
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from bnserve.cli import main\n"
        f"raise SystemExit(main(['infer', '--target', '{target}', '--model', 'digits', '--demo']))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert r.returncode == 2
    assert "needs scikit-learn" in r.stderr


def test_client_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, bnserve.client, bnserve.client.infer, bnserve.cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('bnserve.server')"
        " or m in ('sklearn', 'PIL')]\n"
        "assert not bad, bad"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert r.returncode == 0, r.stderr
