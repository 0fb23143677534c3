"""A short soak: bench/soak.py against a `bnserve serve` subprocess, 60 s on the Python front end
and 30 s on the native one (the full 10-minute run is `make soak`; `--frontend native` for the
C++ one). Nothing lost, nothing answered twice, every answer right, no errors, server RSS growth
under 50 MB, clean exit on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rel_helpers import ROOT

from bnserve.server import native_frontend as native

SOAK_SECONDS = {"python": 60, "native": 30}

pytestmark = pytest.mark.timeout(max(SOAK_SECONDS.values()) + 240)


@pytest.mark.parametrize("frontend", ["python", "native"])
def test_soak(frontend: str) -> None:
    if frontend == "native":
        try:
            native.binary()
        except native.NativeUnavailableError as exc:  # make test builds it: missing is a failure
            pytest.fail(str(exc))
    seconds = SOAK_SECONDS[frontend]
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", str(seconds)]
    done = subprocess.run(
        [*cmd, "--frontend", frontend, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 200,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nsoak ({frontend}): {report}")
    assert done.returncode == 0, report["problems"]
    assert report["requests"] > 0 and report["answers"] == report["requests"]
    assert report["lost"] == report["duplicates"] == report["wrong_answers"] == 0
    assert report["errors"] == 0, report["codes"]
    assert report["rss_mb"]["growth"] < 50
    assert report["server_exit"] == 0
