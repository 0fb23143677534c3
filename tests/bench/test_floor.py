"""bench/floor.py: its null model computes what it says, and one tiny round runs end to end
(two native servers, onnxruntime in a child process beside a load) and reports every figure.

The figures are not judged here (they are measurements: docs/performance-notes.md reads them),
only that each is measured and consistent with the others.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
FLOOR = ROOT / "bench" / "floor.py"


def test_the_null_model_has_vol3ds_interface_and_returns_the_mean(tmp_path: Path) -> None:
    floor = load_script("floor")
    repo = floor.null_repository(ROOT / "model_repository", tmp_path / "repo")
    real = ort.InferenceSession(str(ROOT / "model_repository" / "vol3d" / "1" / "model.onnx"))
    null = ort.InferenceSession(str(repo / "vol3d" / "1" / "model.onnx"))
    assert [(i.name, i.shape[1:], i.type) for i in null.get_inputs()] == [
        (i.name, i.shape[1:], i.type) for i in real.get_inputs()
    ]
    assert [(o.name, o.shape[1:], o.type) for o in null.get_outputs()] == [
        (o.name, o.shape[1:], o.type) for o in real.get_outputs()
    ]
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32, 32)).astype(np.float32)
    (y,) = null.run(None, {null.get_inputs()[0].name: x})  # (3, 3) float32
    assert y.shape == (3, 3)
    np.testing.assert_allclose(
        y, np.repeat(x.mean(axis=(1, 2, 3, 4))[:, None], 3, axis=1), rtol=1e-4
    )
    assert (repo / "vol3d" / "config.json").read_text() == (
        ROOT / "model_repository" / "vol3d" / "config.json"
    ).read_text()


@pytest.mark.timeout(120)
def test_one_tiny_round_reports_every_figure() -> None:
    cmd = [sys.executable, str(FLOOR), "--rounds", "1", "--seconds", "0.5", "--ort-seconds", "0.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("round 1: "))
    r = json.loads(line.removeprefix("round 1: "))
    for key in ("served_cpu_ms_per_sample", "ref_cpu_ms", "config_cpu_ms", "beside_cpu_ms"):
        assert 0.1 < r[key] < 100, (key, r)  # a vol3d sample: milliseconds of CPU
    assert 0 < r["null_cpu_ms_per_request"] < r["served_cpu_ms_per_sample"], r
    assert r["served_rate"] > 0 and r["null_rate"] > r["served_rate"], r
    rows = dict(
        (m.group(1), (float(m.group(2)), float(m.group(3))))
        for m in re.finditer(r"^\| ([^|]+?) \| ([0-9.-]+) \| ([0-9.-]+) \|$", proc.stdout, re.M)
    )
    assert len(rows) == 7, proc.stdout
    ref = r["ref_cpu_ms"]
    served = rows["served: the server's CPU a vol3d sample, c16 unary"]
    assert served == pytest.approx(
        (r["served_cpu_ms_per_sample"], r["served_cpu_ms_per_sample"] / ref), abs=1e-3
    )
    outside = rows["served - beside the load: spent outside onnxruntime"][0]
    assert outside == pytest.approx(r["served_cpu_ms_per_sample"] - r["beside_cpu_ms"], abs=1e-3)
