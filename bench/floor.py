#!/usr/bin/env python
"""What the native server's vol3d CPU ratio is made of: the model's part and the transport's
part, measured apart on the same machine, alternating.

    .venv/bin/python bench/floor.py                     # 3 rounds, about 2 minutes
    .venv/bin/python bench/floor.py --rounds 1 --seconds 1 --ort-seconds 0.5   # smoke test

bench/suite.py's vol3d CPU target divides the server's CPU a sample (vol3d, unary, 16 in
flight, the load tester on the same two cores) by in-process onnxruntime's at batch 1 with one
session, alone. This script splits that ratio. Each round:

1. served: the server (`serve --frontend native`, the bundled repository), vol3d c16 unary for
   SECONDS: its CPU a sample, and the rate R it served.
2. alone: onnxruntime in-process on the same file, with the server's session options: batch 1 x
   1 session (the target's reference) and the server's configuration at c16 (its
   max_combined_batch_size x one session a core: batch 4 x 2 sessions here).
3. beside a load: the same onnxruntime at the server's configuration, in a child process,
   while the load tester sends vol3d-sized requests at R (open loop) to a native server whose
   model has vol3d's interface and almost no compute (a generated ReduceMean): what onnxruntime
   costs when it shares the two cores as the server's workers do.
4. nothing to compute: that null server alone, vol3d requests at 16 in flight (closed loop, as
   fast as it goes: thousands a second): its CPU a request. Requests handled in one busy turn
   share wake-ups and reads, so a request costs least at full speed: this is the least the
   server's request path (gRPC 1.51, the kernel's loopback TCP, bnserve's own code) was seen
   to cost a request.

It prints every figure and its ratio to the reference: served; "beside the load" (the model's
part); "nothing to compute"; their sum (what the server would cost if a request cost it no more
than at full speed with nothing to compute); and served minus "beside the load" (what the server
spent outside onnxruntime). It measures; it does not judge (docs/performance-notes.md, round 10,
reads the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # bench/ is not a package: its sibling script, by path

MODEL = "vol3d"
REFERENCE = (1, 1)  # (batch, sessions): the target's reference

# The child that measures onnxruntime beside the load: warms up, says "ready", measures, prints
# the point as JSON. A child process, so its threads do not share this one's GIL with the load
# tester.
_CHILD = """
import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import suite
path, seconds = Path(sys.argv[2]), float(sys.argv[3])
batch, sessions = int(sys.argv[4]), int(sys.argv[5])
suite.measure_ort(path, "vol3d", 0.2, [(batch, sessions)])  # the process's first runs
print("ready", flush=True)
point = suite.measure_ort(path, "vol3d", seconds, [(batch, sessions)])[0]
print(json.dumps(dataclasses.asdict(point)), flush=True)
"""


@dataclass(frozen=True)
class Round:
    served_cpu_ms_per_sample: float  # the server on vol3d, c16 unary (a request is a sample)
    served_rate: float  # its requests a second
    ref_cpu_ms: float  # in-process batch 1 x 1 session, alone
    config_cpu_ms: float  # in-process at the server's configuration, alone
    beside_cpu_ms: float  # the same beside the load tester and the null server at the rate
    null_cpu_ms_per_request: float  # the null server alone, c16 closed loop
    null_rate: float  # its requests a second


def server_config(repo: Path) -> tuple[int, int]:
    """(batch, sessions) the server runs vol3d at with 16 in flight: its config's
    max_combined_batch_size (16 queued requests fill every batch) and the server's default
    sessions a model, one per core."""
    config = json.loads((repo / MODEL / "config.json").read_text())
    return int(config["batching"]["max_combined_batch_size"]), os.cpu_count() or 1


def null_repository(src: Path, dst: Path) -> Path:
    """A repository with one model named vol3d: vol3d's config, and a graph with its input and
    output that reduces the volume to its mean (a few microseconds a sample)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    (dst / MODEL / "1").mkdir(parents=True)
    shutil.copy(src / MODEL / "config.json", dst / MODEL / "config.json")
    real = onnx.load(str(src / MODEL / "1" / "model.onnx"), load_external_data=False)
    x = real.graph.input[0]  # (N, 1, 32, 32, 32) float32
    y = real.graph.output[0]  # (N, 3) float32
    classes = y.type.tensor_type.shape.dim[1].dim_value
    rank = len(x.type.tensor_type.shape.dim)
    nodes = [
        helper.make_node("ReduceMean", [x.name, "axes"], ["mean"], keepdims=1),  # (N, 1, 1, 1, 1)
        helper.make_node("Reshape", ["mean", "rows"], ["col"]),  # (N, 1)
        helper.make_node("Tile", ["col", "reps"], [y.name]),  # (N, classes)
    ]
    consts = [
        numpy_helper.from_array(np.arange(1, rank, dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "rows"),
        numpy_helper.from_array(np.array([1, classes], dtype=np.int64), "reps"),
    ]
    graph = helper.make_graph(nodes, "null_vol3d", [x], [y], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(dst / MODEL / "1" / "model.onnx"))
    return dst


def _native(repo: Path, log: Path) -> suite.Server:
    return suite.start_server(repo, log, None, extra=["--frontend", "native"])


def served(repo: Path, log: Path, seconds: float) -> tuple[float, float]:
    """A native server on `repo`, vol3d c16 unary, one row a request: (its CPU ms a request,
    requests a second)."""
    server = _native(repo, log)
    try:
        d = suite.Durations(run_s=seconds, warmup_s=1.0, ort_s=0.0, idle_s=0.0, settle_s=0.0)
        run = suite.run_server_bench(server, MODEL, "unary", 16, 1, d)
    finally:
        suite.stop_server(server)
    return run.server_cpu_ms_per_request, float(run.result["throughput_rps"])


def beside_load(
    repo: Path, null_repo: Path, log: Path, rate: float, ort_seconds: float, at: tuple[int, int]
) -> float:
    """In-process onnxruntime at `at` (batch, sessions), in a child process, while the load
    tester sends vol3d requests at `rate` (open loop) to a native server on the null model: its
    CPU ms a sample."""
    from bnserve.client.bench import BenchConfig, run_bench

    server = _native(null_repo, log)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(Path(__file__).resolve().parent),
            str(repo / MODEL / "1" / "model.onnx"),
            str(ort_seconds),
            str(at[0]),
            str(at[1]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 120.0)  # bounded: a child may hang
        if not ready or child.stdout.readline().strip() != "ready":
            raise RuntimeError("the onnxruntime child did not get ready within 120 s")
        # The load spans the child's window (its sessions' creation and warm-up, well under a
        # second for vol3d, then the measurement) with a margin.
        config = BenchConfig(
            model=MODEL,
            targets=(server.target,),
            rate=rate,
            duration=ort_seconds + 4.0,
            warmup=0.5,
            progress=False,
        )
        run_bench(config)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        suite.stop_server(server)
    if child.returncode != 0:
        raise RuntimeError(f"the onnxruntime child exited with {child.returncode}")
    return float(json.loads(out.strip().splitlines()[-1])["cpu_ms_per_sample"])


def alone(repo: Path, seconds: float, at: tuple[int, int]) -> tuple[float, float]:
    """In-process onnxruntime alone: CPU ms a sample at REFERENCE and at `at`."""
    path = repo / MODEL / "1" / "model.onnx"
    points = suite.measure_ort(path, MODEL, seconds, [REFERENCE, at])
    cpu = {(p.batch, p.sessions): p.cpu_ms_per_sample for p in points}
    return cpu[REFERENCE], cpu[at]


def measure(repo: Path, rounds: int, seconds: float, ort_seconds: float) -> list[Round]:
    out: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bnserve-floor-") as tmp:
        null_repo = null_repository(repo, Path(tmp) / "repo")
        log = Path(tmp) / "server.log"
        at = server_config(repo)
        print(f"the server's configuration: batch {at[0]} x {at[1]} sessions", flush=True)
        for i in range(rounds):
            cpu, rate = served(repo, log, seconds)
            ref, b4 = alone(repo, ort_seconds, at)
            beside = beside_load(repo, null_repo, log, rate, ort_seconds, at)
            null_cpu, null_rate = served(null_repo, log, seconds)
            r = Round(cpu, rate, ref, b4, beside, null_cpu, null_rate)
            out.append(r)
            figures = {k: round(v, 4) for k, v in asdict(r).items()}
            print(f"round {i + 1}: {json.dumps(figures)}", flush=True)
    return out


def report(rounds: Sequence[Round]) -> str:
    """Every figure and its ratio to the reference, as a markdown table."""

    def span(values: Sequence[float], fmt: str) -> str:
        mean, lo, hi = (fmt.format(v) for v in (statistics.fmean(values), min(values), max(values)))
        return mean if len(values) == 1 else f"{mean} ({lo}-{hi})"

    def over_ref(f: Callable[[Round], float]) -> str:
        return span([f(r) / r.ref_cpu_ms for r in rounds], "{:.3f}")

    def col(f: Callable[[Round], float], fmt: str = "{:.4f}") -> str:
        return span([f(r) for r in rounds], fmt)

    rows = [
        (
            "served: the server's CPU a vol3d sample, c16 unary",
            lambda r: r.served_cpu_ms_per_sample,
        ),
        ("reference: onnxruntime alone, batch 1 x 1 session", lambda r: r.ref_cpu_ms),
        ("onnxruntime alone, the server's configuration", lambda r: r.config_cpu_ms),
        ("beside the load: onnxruntime, the server's configuration", lambda r: r.beside_cpu_ms),
        ("nothing to compute: the null server, a request", lambda r: r.null_cpu_ms_per_request),
        (
            "beside the load + nothing to compute",
            lambda r: r.beside_cpu_ms + r.null_cpu_ms_per_request,
        ),
        (
            "served - beside the load: spent outside onnxruntime",
            lambda r: r.served_cpu_ms_per_sample - r.beside_cpu_ms,
        ),
    ]
    lines = [
        f"{len(rounds)} round(s), each figure's mean (min-max); rates: served "
        f"{col(lambda r: r.served_rate, '{:.0f}')}/s, nothing to compute "
        f"{col(lambda r: r.null_rate, '{:.0f}')}/s",
        "",
        "| figure | ms | / reference |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {col(f)} | {over_ref(f)} |" for label, f in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="What the native server's vol3d CPU ratio is made of.")
    p.add_argument("--repo", type=Path, default=suite.DEFAULT_REPO, help="model repository")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--seconds", type=float, default=8.0, help="each server run (default 8)")
    p.add_argument(
        "--ort-seconds", type=float, default=6.0, help="each in-process point (default 6)"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.ort_seconds <= 0:
        p.error("--rounds must be at least 1, --seconds and --ort-seconds above 0")
    reason = suite.native_unavailable()
    if reason is not None:
        raise SystemExit(f"bench/floor.py: {reason}")
    t0 = time.monotonic()
    rounds = measure(args.repo.resolve(), args.rounds, args.seconds, args.ort_seconds)
    print()
    print(report(rounds))
    print(f"\n({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
