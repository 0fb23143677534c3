"""A short soak: bench/soak.py for 60 s against a `bnserve serve` subprocess (the full 10-minute
run is `make soak`). Nothing lost, nothing answered twice, every answer right, no errors, server
RSS growth under 50 MB, clean exit on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rel_helpers import ROOT

SOAK_SECONDS = 60

pytestmark = pytest.mark.timeout(SOAK_SECONDS + 240)


def test_soak_60s() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", str(SOAK_SECONDS)]
    done = subprocess.run(
        [*cmd, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=SOAK_SECONDS + 200
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nsoak: {report}")
    assert done.returncode == 0, report["problems"]
    assert report["requests"] > 0 and report["answers"] == report["requests"]
    assert report["lost"] == report["duplicates"] == report["wrong_answers"] == 0
    assert report["errors"] == 0, report["codes"]
    assert report["rss_mb"]["growth"] < 50
    assert report["server_exit"] == 0
