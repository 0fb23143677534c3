"""Triton's perf_analyzer against a real bnserve server (in-process, 127.0.0.1, port 0).

perf_analyzer needs glibc >= 2.38, so it runs in the Debian trixie chroot that
bench/perf_analyzer.sh prepares (docs/perf_analyzer.md). When that chroot is not there these
tests skip, naming the command that prepares it; they never prepare it themselves (a minute or
two and ~260 MB of downloads do not belong in a test run).

Each run is short (count windows of a few hundred requests): they check that perf_analyzer's
whole protocol path works (ModelMetadata, ModelConfig, ModelInfer or ModelStreamInfer,
ModelStatistics before and after each window), not how fast the server is.
"""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
SCRIPT = ROOT / "bench" / "perf_analyzer.sh"
PA_ROOT = Path(os.environ.get("PA_ROOT", "/var/cache/bnserve/perf-analyzer-trixie"))
# What bench/perf_analyzer.sh writes last when the chroot is complete, and the binary it runs.
STAMP = PA_ROOT / ".bnserve-perf-analyzer"
BINARY = PA_ROOT / "opt" / "perf-analyzer" / "bin" / "perf_analyzer.elf"
RUN_TIMEOUT_S = 25

pytestmark = pytest.mark.timeout(90)


def _not_ready_reason() -> str | None:
    if os.geteuid() != 0:
        return "perf_analyzer runs in a chroot: needs root"
    if not (STAMP.is_file() and BINARY.exists()):
        return (
            f"perf_analyzer chroot not prepared at {PA_ROOT}: "
            f"run `bench/perf_analyzer.sh --prepare-only` as root (~1.5 min, ~260 MB)"
        )
    return None


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    reason = _not_ready_reason()
    if reason:
        pytest.skip(reason)
    settings = Settings(
        repo=BUNDLED,
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        instances=2,
        grace=5,
        log_level="WARNING",
    )
    with serve_in_thread(settings) as running:
        yield running


def _failures(app: App, model: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(m.inference_stats.fail.count for m in stats.model_stats)


def _perf_analyzer(app: App, cwd: Path, *args: str) -> tuple[dict[str, str], str]:
    """Run perf_analyzer through the script; its CSV row (one concurrency) and its output."""
    env = dict(os.environ, PA_ROOT=str(PA_ROOT), PA_TIMEOUT=str(RUN_TIMEOUT_S))
    cmd = [
        "bash",
        str(SCRIPT),
        "-u",
        f"127.0.0.1:{app.port}",
        "-i",
        "grpc",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "200",
        # The test judges success, not stability: any three windows will do.
        "--stability-percentage",
        "1000",
        "-f",
        "pa.csv",  # relative: the script bind-mounts the working directory into the chroot
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 15
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"perf_analyzer exited {proc.returncode}:\n{out[-3000:]}"
    for bad in ("error", "Error", "Failed", "terminate called"):
        assert bad not in out, f"{bad!r} in perf_analyzer's output:\n{out[-3000:]}"
    with open(cwd / "pa.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1, rows
    return rows[0], out


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["--concurrency-range", "2"], id="unary"),
        pytest.param(["--concurrency-range", "2", "--streaming"], id="streaming"),
        pytest.param(["--concurrency-range", "2", "--async", "-b", "4"], id="async-batch4"),
    ],
)
def test_perf_analyzer_digits(app: App, tmp_path: Path, mode: list[str]) -> None:
    fails0 = _failures(app, "digits")
    row, out = _perf_analyzer(app, tmp_path, "-m", "digits", *mode)
    assert float(row["Inferences/Second"]) > 0, row
    assert int(row["p99 latency"]) > 0, row
    # perf_analyzer's server-side section comes from ModelStatistics: it must have been there.
    assert "Server:" in out and "Successful request count" in out, out[-3000:]
    assert _failures(app, "digits") == fails0
