#!/usr/bin/env python
"""The performance suite: bnserve over gRPC against onnxruntime in-process, same model files.

    .venv/bin/python bench/suite.py                 # full run (~4-5 min), docs/performance.md
    .venv/bin/python bench/suite.py --quick         # shorter runs (< 2 min)
    .venv/bin/python bench/suite.py --quick --out /tmp/perf.md --duration 0.5 --warmup 0.2 \
        --ort-duration 0.1                          # smoke test (tests/bench/test_suite.py)

What it does, in one process (see bench/README.md for the method):

1. onnxruntime in-process, with the server's own session options (1 intra-op thread,
   ORT_ENABLE_ALL): for digits and vol3d, samples/s at batch 1, 4, 16, 64 with 1 session and
   with 2 sessions driven by 2 threads; CPU per sample (time.process_time) at batch 1, 1 session.
2. The server as a subprocess (`python -m bnserve.cli serve`, the bundled model_repository):
   time to ready (process start -> grpc.health.v1 SERVING, polled) and VmRSS with both models
   loaded.
3. `run_bench` (bnserve.client.bench) in this process -- the client shares the cores with the
   server, as it would on a 2-core box -- for every run in RUNS; for each, the server's CPU
   seconds (its scheduler clock, every thread to the nanosecond, plus reaped children and any
   live descendants) over the whole run, divided by every request the run sent (warm-up included,
   since the CPU window includes the warm-up).
4. docs/performance.md (tables, targets with PASS/FAIL, peers' figures for reference) and two
   PNG plots next to it (img/).

Run from anywhere; bench/ is not a package, this file is run as a script.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = ROOT / "model_repository"
DEFAULT_OUT = ROOT / "docs" / "performance.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None, use_errno=True)

# (model, mode, concurrency, batch): the runs against the server, in this order.
RUNS: tuple[tuple[str, str, int, int], ...] = (
    ("digits", "unary", 1, 1),
    ("digits", "stream", 1, 1),
    ("digits", "unary", 4, 1),
    ("digits", "stream", 4, 1),
    ("digits", "unary", 16, 1),
    ("digits", "stream", 16, 1),
    ("vol3d", "unary", 16, 1),
    ("vol3d", "stream", 16, 1),
)
# Triton's perf_analyzer against the same server (when its chroot is prepared, as root): digits.
PA_RUNS: tuple[tuple[str, int], ...] = (("unary", 1), ("unary", 16), ("stream", 16))
PA_WORKERS = 2  # then digits unary c16 once more against `serve --workers 2 --instances 1`
PA_ROOT = Path(os.environ.get("PA_ROOT", "/var/cache/bnserve/perf-analyzer-trixie"))
PA_SCRIPT = ROOT / "bench" / "perf_analyzer.sh"
# Drift monitoring's cost (issue: 1% sampling costs <= 3% throughput): digits unary c8, alternate
# servers with --drift-sample-rate 0 and DRIFT_RATE, DRIFT_PAIRS pairs (1 in --quick).
DRIFT_RATE = 0.01
DRIFT_PAIRS = 5
DRIFT_LIMIT_PCT = 3.0
# The native server's onnxruntime workers name their threads so (server/native/model.cc): the
# CPU they spend is the model's, the rest of the server's is gRPC's, parsing and replies.
ORT_THREAD = "bnn-ort"
# The front ends measured (`bnserve serve --frontend F`); native only when it is built.
DEFAULT_FRONTENDS = "python,native"
ORT_MODELS = ("digits", "vol3d")
ORT_BATCHES = (1, 4, 16, 64)
ORT_SESSIONS = (1, 2)


@dataclass(frozen=True)
class Durations:
    run_s: float  # measured window of each server run
    warmup_s: float  # warm-up of each server run (inside the CPU window, counted)
    ort_s: float  # each in-process measurement
    idle_s: float  # the server's idle CPU, measured once after ready
    settle_s: float  # pause between runs (outside every CPU window)


FULL = Durations(run_s=20.0, warmup_s=2.0, ort_s=3.0, idle_s=2.0, settle_s=0.5)
QUICK = Durations(run_s=4.0, warmup_s=1.0, ort_s=0.5, idle_s=0.5, settle_s=0.2)

# Peers, same models on this kind of machine, client on the same 2 cores (../shared/FACTS.md).
PEERS: tuple[tuple[str, str], ...] = (
    (
        "Triton 2.51 (Python backend calling onnxruntime), digits c16 unary",
        "4,040 req/s (FACTS.md's runs: 700 default, 3,627 with its dynamic batcher)",
    ),
    (
        "MLServer 1.7.1, digits c16 unary (inference inline)",
        "2,564 req/s (3,313 adaptive batching)",
    ),
    ("MLServer 1.7.1, digits c16 stream", "5,472 req/s"),
    ("Triton / MLServer, vol3d (Conv3d net)", "230-330 samples/s (0.21-0.54 of in-process)"),
    (
        "bare grpc.aio answering a precomputed response, c16 (unary / stream)",
        "6,960 / 8,326 req/s; 0.156 / 0.095 ms server CPU a request",
    ),
    (
        "bare grpc.aio running digits inline, c16 (unary / stream)",
        "4,725 / 7,108 req/s; 0.244 / 0.130 ms server CPU a request",
    ),
)


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from field 3 (state) on; the name may hold spaces/parens."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """Live descendants of pid (all of /proc scanned once)."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _process_clock_s(pid: int) -> float:
    """CPU seconds of every thread of pid, live or exited, to the nanosecond: the kernel's
    scheduler clock of the process (clock_getcpuclockid), not /proc's clock ticks."""
    clock = ctypes.c_int()
    err = _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock))
    if err:
        raise OSError(err, os.strerror(err), f"clock_getcpuclockid({pid})")
    return time.clock_gettime(clock.value)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of a process tree: every thread of pid (live or exited, nanoseconds) plus
    cutime + cstime (its reaped children, clock ticks), plus the same for each live
    descendant."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            f = _stat_fields(p)
            # fields 16-17 (cutime, cstime); f[0] is field 3
            reaped = (int(f[13]) + int(f[14])) / CLK_TCK
            total += _process_clock_s(p) + reaped
    return total


def threads_cpu_s(pid: int, comm: str) -> float | None:
    """CPU seconds of pid's live threads named `comm`, to the nanosecond (the first field of
    /proc/PID/task/TID/schedstat); None if it has none."""
    ns, found = 0, False
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                if Path(task.path, "comm").read_text().rstrip("\n") != comm:
                    continue
                ns += int(Path(task.path, "schedstat").read_text().split()[0])
                found = True
    return ns / 1e9 if found else None


@dataclass(frozen=True)
class CpuSample:
    """A server's CPU at one instant: the whole tree, and what its threads named `comm` (the
    onnxruntime workers) hold of it. Both in nanoseconds from the scheduler, read back to back,
    so the difference of two samples splits the window exactly."""

    total_s: float
    named_s: float | None

    @classmethod
    def take(cls, pid: int, comm: str) -> CpuSample:
        named = threads_cpu_s(pid, comm)
        return cls(proc_cpu_s(pid), named)


def system_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every CPU): /proc/stat's first line, user +
    nice + system + irq + softirq + steal (guest time is already inside user)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# --- the server -------------------------------------------------------------------------------


# Both front ends log "serving MODELS on HOST:PORT (...) in X s" once the port is bound.
_LOGGED_PORT = re.compile(r" on 127\.0\.0\.1:(\d+) \(")


def _logged_port(log_path: Path) -> int | None:
    """The port a server started with --port 0 bound, once its log says so."""
    m = _LOGGED_PORT.search(log_path.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def _health_serving(target: str, timeout: float) -> bool:
    """One grpc.health.v1 Check on a fresh channel (a reused channel would sit in reconnect
    backoff after the first refused connection, and the poll would measure the backoff)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str
    command: list[str]
    log_path: Path
    ready_s: float  # process start -> health SERVING (polled)
    ready_logged_s: float | None  # the server's own figure ("serving ... in X s")
    rss_ready_kb: int  # VmRSS with both models loaded, just after ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_server(
    repo: Path,
    log_path: Path,
    instances: int | None,
    timeout: float = 60.0,
    extra: Sequence[str] = (),
) -> Server:
    command = [
        sys.executable,
        "-m",
        "bnserve.cli",
        "serve",
        "--repo",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        "0",  # the server picks it (no port chosen here and freed for someone else to take)
        "--metrics-port",
        "-1",
    ]
    if instances is not None:
        command += ["--instances", str(instances)]
    command += list(extra)
    log_file = log_path.open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    log_file.close()
    server = Server(proc, "", command, log_path, 0.0, None, 0)
    while True:
        if not server.target and (port := _logged_port(log_path)) is not None:
            server.target = f"127.0.0.1:{port}"
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before ready:\n{server.log_tail()}"
            )
        if time.perf_counter() - t0 > timeout:
            stop_server(server)
            raise RuntimeError(f"server not SERVING after {timeout:.0f} s:\n{server.log_tail()}")
        if server.target and _health_serving(server.target, timeout=0.5):
            break
        time.sleep(0.01)
    server.ready_s = time.perf_counter() - t0
    server.rss_ready_kb = proc_status_kb(proc.pid, "VmRSS")
    for line in log_path.read_text(errors="replace").splitlines():
        if " serving " in line and line.rstrip().endswith(" s"):
            with contextlib.suppress(ValueError, IndexError):
                server.ready_logged_s = float(line.rsplit(" in ", 1)[1].split()[0])
    return server


def _stop_keeping_log(server: Server, what: str) -> None:
    """Stop `server`; its log is deleted after a clean exit, kept (and named) otherwise."""
    rc = stop_server(server)
    if rc not in (0, None):
        _say(f"warning: {what} exited with {rc}; log: {server.log_path}")
    else:
        server.log_path.unlink(missing_ok=True)


def wait_for_log_lines(path: Path, marker: str, n: int, timeout: float = 60.0) -> None:
    """Until `path` holds n lines containing `marker` (bounded, polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if sum(marker in line for line in text.splitlines()) >= n:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{n} x {marker!r} not in {path} after {timeout:.0f} s")


def stop_server(server: Server, grace: float = 15.0) -> int | None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(grace)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


# --- runs against the server -----------------------------------------------------------------


@dataclass
class ServerRun:
    model: str
    mode: str
    concurrency: int
    batch: int
    result: dict[str, Any]  # BenchResult.to_dict()
    latencies_s: np.ndarray = field(repr=False)
    server_cpu_s: float  # over the whole run_bench call (warm-up included)
    client_cpu_s: float  # this process (the load generator), same window
    wall_s: float  # the CPU window
    other_cpu_s: float  # every other process on the machine, same window
    sent: int  # requests the run sent: window + warm-up (the CPU denominator)
    # Of server_cpu_s, what its onnxruntime worker threads spent (ORT_THREAD; None: the server
    # has no such threads). A request run inline on a gRPC thread is not in it.
    ort_cpu_s: float | None = None

    @property
    def samples_sent(self) -> int:
        return self.sent * int(self.result["rows_per_request"])

    @property
    def server_cpu_ms_per_request(self) -> float:
        return 1000.0 * self.server_cpu_s / max(1, self.sent)

    @property
    def server_cpu_ms_per_sample(self) -> float:
        return 1000.0 * self.server_cpu_s / max(1, self.samples_sent)

    @property
    def client_cpu_ms_per_request(self) -> float:
        return 1000.0 * self.client_cpu_s / max(1, self.sent)

    @property
    def ort_cpu_ms_per_sample(self) -> float | None:
        if self.ort_cpu_s is None:
            return None
        return 1000.0 * self.ort_cpu_s / max(1, self.samples_sent)

    @property
    def rest_cpu_ms_per_request(self) -> float | None:
        """The server's CPU outside its onnxruntime workers, a request."""
        if self.ort_cpu_s is None:
            return None
        return 1000.0 * (self.server_cpu_s - self.ort_cpu_s) / max(1, self.sent)

    @property
    def key(self) -> str:
        return f"{self.model} {self.mode} c{self.concurrency}"

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "model": self.model,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "batch": self.batch,
            "throughput_rps": r["throughput_rps"],
            "samples_per_s": r["samples_per_s"],
            "latency_ms": r["latency_ms"],
            "requests": r["requests"],
            "warmup_requests": r["warmup_requests"],
            "errors": r["errors"],
            "errors_by_code": r["errors_by_code"],
            "server_cpu_s": round(self.server_cpu_s, 3),
            "server_cpu_ms_per_request": round(self.server_cpu_ms_per_request, 4),
            "server_cpu_ms_per_sample": round(self.server_cpu_ms_per_sample, 4),
            "client_cpu_ms_per_request": round(self.client_cpu_ms_per_request, 4),
            "ort_workers_cpu_ms_per_sample": _round(self.ort_cpu_ms_per_sample, 4),
            "rest_of_server_cpu_ms_per_request": _round(self.rest_cpu_ms_per_request, 4),
            "cpu_window_s": round(self.wall_s, 3),
            "other_processes_cpu_s": round(self.other_cpu_s, 3),
        }


def run_server_bench(
    server: Server, model: str, mode: str, concurrency: int, batch: int, d: Durations
) -> ServerRun:
    from bnserve.client.bench import BenchConfig, run_bench

    config = BenchConfig(
        model=model,
        targets=(server.target,),
        concurrency=concurrency,
        duration=d.run_s,
        warmup=d.warmup_s,
        batch=batch,
        mode=mode,  # type: ignore[arg-type]
        progress=False,
    )
    # The CPU window spans the whole call: one ModelMetadata call, the warm-up, the window and
    # the tail (requests sent in the window, answered after it). Every inference request sent
    # in it is in requests + warmup_requests, so that is the denominator.
    busy0 = system_busy_s()
    cpu0, client0, t0 = (
        CpuSample.take(server.pid, ORT_THREAD),
        time.process_time(),
        time.perf_counter(),
    )
    res = run_bench(config)
    cpu1, client1, t1 = (
        CpuSample.take(server.pid, ORT_THREAD),
        time.process_time(),
        time.perf_counter(),
    )
    busy1 = system_busy_s()
    server_cpu_s = cpu1.total_s - cpu0.total_s
    if server.proc.poll() is not None:
        raise RuntimeError(f"server died during {model} {mode} c{concurrency}")
    return ServerRun(
        model=model,
        mode=mode,
        concurrency=concurrency,
        batch=batch,
        result=res.to_dict(),
        latencies_s=np.asarray(res.latencies_s),
        server_cpu_s=server_cpu_s,
        client_cpu_s=client1 - client0,
        wall_s=t1 - t0,
        other_cpu_s=max(0.0, (busy1 - busy0) - server_cpu_s - (client1 - client0)),
        sent=res.requests + res.warmup_requests,
        ort_cpu_s=(
            None if cpu0.named_s is None or cpu1.named_s is None else cpu1.named_s - cpu0.named_s
        ),
    )


# --- perf_analyzer ---------------------------------------------------------------------------


def perf_analyzer_unavailable() -> str | None:
    """Why perf_analyzer cannot run here, or None (same conditions as its test)."""
    if os.geteuid() != 0:
        return "not root (perf_analyzer runs in a chroot)"
    if not (PA_ROOT / ".bnserve-perf-analyzer").is_file():
        return f"chroot not prepared at {PA_ROOT} (`bench/perf_analyzer.sh --prepare-only`)"
    return None


@dataclass
class PaRun:
    mode: str
    concurrency: int
    throughput_rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu_ms_per_request: float | None = None
    served: int = 0  # inferences the server counted over the whole perf_analyzer run
    error: str = ""


def _inference_count(target: str, model: str) -> int:
    import grpc

    from bnserve.proto import inference_pb2 as pb
    from bnserve.proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    return sum(m.inference_count for m in stats.model_stats)


def run_perf_analyzer(
    server: Server,
    model: str,
    mode: str,
    concurrency: int,
    d: Durations,
    workdir: Path,
    *,
    label: str | None = None,
    count: bool = True,
    stability_pct: float = 25.0,
) -> PaRun:
    """One perf_analyzer profile (a few measurement windows of d.run_s / 4 each). Its server
    CPU a request is over every inference the server counted meanwhile (ModelStatistics);
    count=False (a --workers server, whose ModelStatistics is per worker) leaves it out."""
    out = PaRun(label or mode, concurrency)
    csv_path = workdir / "pa.csv"
    csv_path.unlink(missing_ok=True)
    interval_ms = max(200, int(d.run_s * 1000 / 4))
    command = [
        "bash",
        str(PA_SCRIPT),
        "-m",
        model,
        "-u",
        server.target,
        "-i",
        "grpc",
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(interval_ms),
        "--max-trials",
        "4",
        "--stability-percentage",
        f"{stability_pct:g}",
        "-f",
        csv_path.name,
        *(["--streaming"] if mode == "stream" else []),
    ]
    try:
        count0 = _inference_count(server.target, model) if count else 0
        cpu0 = proc_cpu_s(server.pid)
        # Its own session: on timeout the whole chain (bash, timeout, unshare, chroot,
        # perf_analyzer) is killed, not just bash, so nothing loads the cores afterwards.
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=60 + 10 * d.run_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            out.error = "timed out"
            return out
        cpu1 = proc_cpu_s(server.pid)
        out.served = _inference_count(server.target, model) - count0 if count else 0
        if out.served > 0:
            out.server_cpu_ms_per_request = 1000 * (cpu1 - cpu0) / out.served
        if proc.returncode != 0 or not csv_path.is_file():
            tail = output.strip().splitlines()[-1:] or ["no output"]
            out.error = f"exit {proc.returncode}: {tail[0][:200]}"
            return out
        with csv_path.open() as f:
            row = next(csv.DictReader(f), None)
        if row is None:
            out.error = "perf_analyzer wrote no result row"
            return out
        out.throughput_rps = float(row["Inferences/Second"])
        out.p50_ms = float(row["p50 latency"]) / 1000
        out.p99_ms = float(row["p99 latency"]) / 1000
    except Exception as exc:  # one profile's failure is reported, not the end of the suite
        out.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


# --- one front end: start, load runs, perf_analyzer -----------------------------------------


@dataclass
class FrontendResult:
    """Everything measured against one server: `bnserve serve [--frontend native]`."""

    frontend: str  # "python" or "native"
    server: Server
    runs: dict[str, ServerRun]
    idle_pct: float
    rss_end_kb: int
    hwm_end_kb: int
    pa_runs: list[PaRun] = field(default_factory=list)
    # vol3d in-process right before its first server run and right after its last (the server
    # idle): the references of the vol3d targets, taken under the same machine conditions.
    ort_before: list[OrtPoint] = field(default_factory=list)
    ort_after: list[OrtPoint] = field(default_factory=list)

    @property
    def around(self) -> list[OrtPoint]:
        """Both measurements around the vol3d runs: what evaluate() averages."""
        return self.ort_before + self.ort_after


@dataclass(frozen=True)
class Reference:
    """What a vol3d server run is compared with: in-process onnxruntime on the same file."""

    path: Path
    model: str
    configs: list[tuple[int, int]]  # (batch, sessions): batch 1 x 1 session, and the best
    seconds: float


def measure_frontend(
    frontend: str,
    repo: Path,
    instances: int | None,
    d: Durations,
    pa_skipped: str | None,
    pa_stability_pct: float = 25.0,
    reference: Reference | None = None,
) -> FrontendResult:
    """Start the server with `frontend`, drive every run in RUNS, then perf_analyzer's
    PA_RUNS (when it can run here); the server is stopped (its log kept on failure). With a
    reference, its model is also measured in-process just before its first run and just after
    its last."""
    log_path = _server_log()
    before: list[OrtPoint] = []
    after: list[OrtPoint] = []
    ref_runs = [i for i, run in enumerate(RUNS) if reference and run[0] == reference.model]
    if reference is not None and not ref_runs:
        raise ValueError(f"no run of {reference.model!r} in RUNS to measure the reference around")
    _say(f"starting the server ({frontend} front end)")
    extra = ["--frontend", frontend]
    server = start_server(repo, log_path, instances, extra=extra)
    runs: dict[str, ServerRun] = {}
    pa_runs: list[PaRun] = []
    try:
        _say(f"ready in {server.ready_s:.2f} s, VmRSS {server.rss_ready_kb / 1024:.1f} MiB")
        c0, t0 = proc_cpu_s(server.pid), time.perf_counter()
        time.sleep(d.idle_s)
        idle_pct = 100.0 * (proc_cpu_s(server.pid) - c0) / (time.perf_counter() - t0)
        for i, (model, mode, conc, batch) in enumerate(RUNS):
            if reference is not None and i == ref_runs[0]:
                before = measure_ort(
                    reference.path, reference.model, reference.seconds, reference.configs
                )
            time.sleep(d.settle_s)
            r = run_server_bench(server, model, mode, conc, batch, d)
            runs[r.key] = r
            lat = r.result["latency_ms"]
            _say(
                f"{frontend} {r.key}: {r.result['throughput_rps']:,.0f} req/s, p50 "
                f"{_ms(lat['p50'])} p99 {_ms(lat['p99'])} ms, "
                f"server CPU {r.server_cpu_ms_per_request:.4f} ms/req, errors {r.result['errors']}"
            )
            if reference is not None and i == ref_runs[-1]:
                after = measure_ort(
                    reference.path, reference.model, reference.seconds, reference.configs
                )
        rss_end = proc_status_kb(server.pid, "VmRSS")
        hwm_end = proc_status_kb(server.pid, "VmHWM")
        if pa_skipped is None:
            with tempfile.TemporaryDirectory(prefix="bnserve-pa-") as workdir:
                for mode, conc in PA_RUNS:
                    time.sleep(d.settle_s)
                    label = mode if frontend == "python" else f"{mode}, --frontend {frontend}"
                    pa = run_perf_analyzer(
                        server,
                        "digits",
                        mode,
                        conc,
                        d,
                        Path(workdir),
                        label=label,
                        stability_pct=pa_stability_pct,
                    )
                    pa_runs.append(pa)
                    _say(
                        f"perf_analyzer digits {pa.mode} c{conc}: {pa.throughput_rps} req/s, "
                        f"p50 {_ms(pa.p50_ms)} ms, server CPU "
                        f"{_ms(pa.server_cpu_ms_per_request, '{:.4f}')} ms/req {pa.error}"
                    )
    finally:
        _stop_keeping_log(server, f"the server ({frontend} front end)")
    return FrontendResult(
        frontend, server, runs, idle_pct, rss_end, hwm_end, pa_runs, before, after
    )


def native_unavailable() -> str | None:
    """Why the native front end cannot be measured here (None: it can)."""
    from bnserve.server.native_frontend import NativeUnavailableError, binary

    try:
        binary()
    except NativeUnavailableError as exc:
        return str(exc)
    return None


# --- drift monitoring's cost ------------------------------------------------------------------


@dataclass
class DriftCost:
    rate: float
    off_rps: list[float] = field(default_factory=list)
    on_rps: list[float] = field(default_factory=list)

    @property
    def cost_pct(self) -> float | None:
        if not self.off_rps or not self.on_rps:
            return None
        off, on = statistics.fmean(self.off_rps), statistics.fmean(self.on_rps)
        return 100.0 * (off - on) / off


def measure_drift_cost(
    repo: Path, instances: int | None, d: Durations, pairs: int, log_path: Path
) -> DriftCost:
    """Alternating servers without and with --drift-sample-rate DRIFT_RATE, digits unary c8."""
    cost = DriftCost(DRIFT_RATE)
    half = dataclasses.replace(d, run_s=max(d.run_s / 2, 0.1))
    for _ in range(pairs):
        for rate, into in ((0.0, cost.off_rps), (DRIFT_RATE, cost.on_rps)):
            server = start_server(
                repo,
                log_path,
                instances,
                # drift is scored by the Python front end: both of a pair run it
                extra=["--frontend", "python", "--drift-sample-rate", str(rate)],
            )
            try:
                time.sleep(d.settle_s)
                r = run_server_bench(server, "digits", "unary", 8, 1, half)
            finally:
                stop_server(server)
            into.append(float(r.result["throughput_rps"]))
    return cost


# --- onnxruntime in-process ------------------------------------------------------------------


@dataclass
class OrtPoint:
    model: str
    batch: int
    sessions: int
    samples_per_s: float
    cpu_ms_per_sample: float  # the driving threads' CPU time / samples
    other_cpu_pct: float  # other processes on the machine, % of one core, same window


def _ort_input(session: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dims[0] = batch
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _drive(
    session: Any,
    feeds: dict[str, np.ndarray],
    barrier: threading.Barrier,
    deadline: list[float],
    counts: list[int],
    cpu_s: list[float],
    i: int,
) -> None:
    """One thread calling its own session back to back until the deadline; its own CPU time
    (onnxruntime runs on the calling thread with one intra-op thread) goes to cpu_s[i]."""
    barrier.wait()
    c0 = time.thread_time()
    k = 0
    while True:
        session.run(None, feeds)
        k += 1
        if time.perf_counter() >= deadline[0]:
            break
    cpu_s[i] = time.thread_time() - c0
    counts[i] = k


def measure_ort(
    model_path: Path,
    model: str,
    seconds: float,
    configs: Sequence[tuple[int, int]] | None = None,
) -> list[OrtPoint]:
    """Samples/s for every (batch, sessions) in configs (default: every ORT_BATCHES x
    ORT_SESSIONS), each session driven by its own thread. CPU a sample is the driving threads'
    own CPU time: threads this process has for other reasons (gRPC's, once the load tester has
    run) are not counted."""
    import onnxruntime as ort

    from bnserve.server.model import session_options

    if configs is None:
        configs = [(b, n) for b in ORT_BATCHES for n in ORT_SESSIONS]
    sessions = [
        ort.InferenceSession(str(model_path), session_options(), providers=["CPUExecutionProvider"])
        for _ in range(max(n for _, n in configs))
    ]
    points: list[OrtPoint] = []
    warm: set[int] = set()
    for batch, n in configs:
        feeds = _ort_input(sessions[0], batch)
        if batch not in warm:  # warm-up: the first run at a shape allocates
            warm.add(batch)
            for s in sessions:
                s.run(None, feeds)
        counts = [0] * n
        cpu_s = [0.0] * n
        barrier = threading.Barrier(n + 1)
        deadline = [0.0]
        threads = [
            threading.Thread(
                target=_drive, args=(sessions[i], feeds, barrier, deadline, counts, cpu_s, i)
            )
            for i in range(n)
        ]
        for t in threads:
            t.start()
        busy0 = system_busy_s()
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline[0] = t0 + seconds
        barrier.wait()
        for t in threads:
            t.join()
        cpu1, t1 = time.process_time(), time.perf_counter()
        other = max(0.0, system_busy_s() - busy0 - (cpu1 - cpu0))
        samples = sum(counts) * batch
        points.append(
            OrtPoint(
                model=model,
                batch=batch,
                sessions=n,
                samples_per_s=samples / (t1 - t0),
                cpu_ms_per_sample=1000.0 * sum(cpu_s) / samples,
                other_cpu_pct=100.0 * other / (t1 - t0),
            )
        )
    return points


# --- environment -------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
    sha = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(ram_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "protobuf": _version("protobuf"),
        "bnserve_sha": sha,
        "bnserve_dirty": len(dirty.splitlines()) if dirty else 0,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
    }


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    figure: float | None
    limit: float
    higher_is_better: bool
    unit: str
    fmt: str = "{:,.3f}"

    @property
    def passed(self) -> bool:
        if self.figure is None:
            return False
        if self.higher_is_better:
            return self.figure >= self.limit
        return self.figure <= self.limit

    def row(self) -> str:
        fig = "-" if self.figure is None else self.fmt.format(self.figure)
        op = ">=" if self.higher_is_better else "<="
        unit = f" {self.unit}" if self.unit else ""
        verdict = "**PASS**" if self.passed else "**FAIL**"
        return (
            f"| {self.name} | {fig}{unit} | {op} {self.fmt.format(self.limit)}{unit} | {verdict} |"
        )


def vol3d_reference(
    ort: dict[str, list[OrtPoint]], around: Sequence[OrtPoint] = ()
) -> tuple[float | None, float | None, str]:
    """The vol3d targets' references: in-process CPU a sample (batch 1, 1 session) and the best
    samples/s, from the measurements around the server's vol3d runs (their mean) when there are
    any, else from the suite's first in-process table; and a label saying which."""
    table = ort.get("vol3d", [])
    best = ort_best(table)
    if not around or best is None:
        return ort_cpu_per_sample(table), None if best is None else best.samples_per_s, "start"
    return (
        _mean_at(around, (1, 1), "cpu_ms_per_sample"),
        _mean_at(around, (best.batch, best.sessions), "samples_per_s"),
        "around",
    )


def vol3d_best_cpu(
    ort: dict[str, list[OrtPoint]], around: Sequence[OrtPoint]
) -> tuple[OrtPoint | None, float | None]:
    """The in-process best configuration of vol3d (the suite's first table) and its CPU a
    sample, the mean of the measurements around a front end's vol3d runs (None without any)."""
    best = ort_best(ort.get("vol3d", []))
    if best is None:
        return None, None
    return best, _mean_at(around, (best.batch, best.sessions), "cpu_ms_per_sample")


def _mean_at(points: Sequence[OrtPoint], at: tuple[int, int], attr: str) -> float | None:
    """The mean of `attr` over the points at (batch, sessions) `at`; None if none is."""
    values = [float(getattr(p, attr)) for p in points if (p.batch, p.sessions) == at]
    return statistics.fmean(values) if values else None


def evaluate(
    runs: dict[str, ServerRun],
    ort: dict[str, list[OrtPoint]],
    server: Server,
    drift: DriftCost | None = None,
    around: Sequence[OrtPoint] = (),
) -> list[Check]:
    checks: list[Check] = []
    cpu1, best_sps, where = vol3d_reference(ort, around)
    when = "before and after these runs" if where == "around" else "start of the suite"
    for mode in ("unary", "stream"):
        r = runs.get(f"vol3d {mode} c16")
        if r is not None and cpu1 is not None:
            checks.append(
                Check(
                    f"vol3d c16 {mode}: server CPU a sample / in-process (batch 1, 1 session; "
                    f"{when})",
                    r.server_cpu_ms_per_sample / cpu1,
                    1.08,
                    False,
                    "x",
                )
            )
        if r is not None and best_sps is not None:
            checks.append(
                Check(
                    f"vol3d c16 {mode}: samples/s / in-process best ({best_sps:,.0f}; {when})",
                    float(r.result["samples_per_s"]) / best_sps,
                    0.80,
                    True,
                    "x",
                )
            )
    for mode, cpu_limit, rps_limit in (("unary", 0.17, 6000.0), ("stream", 0.105, 7500.0)):
        r = runs.get(f"digits {mode} c16")
        if r is None:
            continue
        checks.append(
            Check(
                f"digits c16 {mode}: server CPU a request",
                r.server_cpu_ms_per_request,
                cpu_limit,
                False,
                "ms",
            )
        )
        checks.append(
            Check(
                f"digits c16 {mode}: throughput",
                float(r.result["throughput_rps"]),
                rps_limit,
                True,
                "req/s",
                "{:,.0f}",
            )
        )
    for mode in ("unary", "stream"):
        r = runs.get(f"digits {mode} c1")
        if r is None:
            continue
        lat = r.result["latency_ms"]
        checks.append(Check(f"digits c1 {mode}: p50 latency", lat["p50"], 0.4, False, "ms"))
        checks.append(Check(f"digits c1 {mode}: p99 latency", lat["p99"], 1.0, False, "ms"))
    checks.append(
        Check(
            "RSS with both models loaded (VmRSS at ready)",
            server.rss_ready_kb / 1024,
            200.0,
            False,
            "MiB",
            "{:,.1f}",
        )
    )
    checks.append(
        Check("time to ready (start -> health SERVING)", server.ready_s, 2.0, False, "s", "{:.2f}")
    )
    if drift is not None:
        checks.append(
            Check(
                f"drift monitor at rate {drift.rate:g}: throughput cost (digits unary c8)",
                drift.cost_pct,
                DRIFT_LIMIT_PCT,
                False,
                "%",
                "{:.1f}",
            )
        )
    return checks


def ort_best(points: Sequence[OrtPoint]) -> OrtPoint | None:
    return max(points, key=lambda p: p.samples_per_s, default=None)


def ort_cpu_per_sample(points: Sequence[OrtPoint]) -> float | None:
    for p in points:
        if p.batch == 1 and p.sessions == 1:
            return p.cpu_ms_per_sample
    return None


# --- plots --------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_throughput(runs: dict[str, ServerRun], path: Path, sha: str) -> None:
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    for mode, marker, limit in (("unary", "o", 6000.0), ("stream", "s", 7500.0)):
        pts = sorted(
            (r.concurrency, float(r.result["throughput_rps"]))
            for r in runs.values()
            if r.model == "digits" and r.mode == mode
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            (line,) = ax.plot(xs, ys, marker=marker, label=f"bnserve {mode}")
            ax.axhline(limit, color=line.get_color(), ls=":", lw=1, label=f"{mode} target c16")
    ax.axhline(4040, color="grey", ls="--", lw=1, label="Triton c16 unary (4,040)")
    ax.axhline(5472, color="black", ls="--", lw=1, label="MLServer c16 stream (5,472)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16], ["1", "4", "16"])
    ax.set_xlabel("requests in flight (closed loop, batch 1)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"digits over gRPC, client on the same cores ({sha})", fontsize=10)
    fig.savefig(path, dpi=100)


def plot_latency_cdf(runs: dict[str, ServerRun], path: Path, sha: str) -> None:
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    for mode in ("unary", "stream"):
        r = runs.get(f"digits {mode} c16")
        if r is None or not r.latencies_s.size:
            continue
        lat = np.sort(r.latencies_s) * 1000.0
        y = np.arange(1, lat.size + 1) / lat.size
        p99 = r.result["latency_ms"]["p99"]
        ax.plot(lat, y, label=f"{mode} (p99 {p99:.2f} ms, n={lat.size:,})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"digits, 16 in flight: latency CDF ({sha})", fontsize=10)
    fig.savefig(path, dpi=100)


# --- report -------------------------------------------------------------------------------------


def _ms(v: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _runs_table(w: Any, runs: dict[str, ServerRun]) -> None:
    w(
        "| model | mode | c | req/s | samples/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| errors | server CPU ms/req | server CPU use | client CPU ms/req | other processes "
        "| requests (+ warm-up) |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs.values():
        lat = r.result["latency_ms"]
        errs = r.result["errors"]
        codes = ", ".join(f"{k} {v}" for k, v in r.result["errors_by_code"].items())
        w(
            f"| {r.model} | {r.mode} | {r.concurrency} | {r.result['throughput_rps']:,.0f} | "
            f"{r.result['samples_per_s']:,.0f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
            f"{_ms(lat['p99'])} | {_ms(lat['p999'])} | {_ms(lat['max'])} | "
            f"{errs}{f' ({codes})' if codes else ''} | {r.server_cpu_ms_per_request:.4f} | "
            f"{100 * r.server_cpu_s / r.wall_s:.0f} % | {r.client_cpu_ms_per_request:.4f} | "
            f"{100 * r.other_cpu_s / r.wall_s:.0f} % | "
            f"{r.result['requests']:,} (+ {r.result['warmup_requests']:,}) |"
        )
    w("")


def render(
    *,
    info: dict[str, Any],
    commands: dict[str, str],
    durations: Durations,
    server: Server,
    idle_cpu_pct: float,
    rss_end_kb: int,
    hwm_end_kb: int,
    runs: dict[str, ServerRun],
    ort: dict[str, list[OrtPoint]],
    checks: list[Check],
    plots: dict[str, str],
    pa_runs: Sequence[PaRun] = (),
    pa_skipped: str | None = None,
    drift: DriftCost | None = None,
    native: FrontendResult | None = None,
    native_checks: Sequence[Check] = (),
    native_skipped: str | None = None,
    around: dict[str, tuple[list[OrtPoint], list[OrtPoint]]] | None = None,
) -> str:
    around = around or {}
    out: list[str] = []
    w = out.append
    passed = sum(c.passed for c in checks)
    w("# Performance")
    w("")
    w(
        f"Generated by `bench/suite.py` on {info['date']} (bnserve {info['bnserve_sha']}"
        + (
            f", with uncommitted changes in {info['bnserve_dirty']} tracked file(s)"
            if info["bnserve_dirty"]
            else ""
        )
        + "). Do not edit by hand: rerun the suite. How it measures: `bench/README.md`; "
        "where the time goes and the alternatives weighed: `docs/performance-notes.md`."
    )
    w("")
    w(
        f"Targets met: **{passed} of {len(checks)}**. The client (bnserve's own load tester, "
        "`run_bench`) runs in the suite's process on the same cores as the server, so every "
        "server figure below is what is left once the client has taken its share."
    )
    w("")
    busy = [100 * r.other_cpu_s / r.wall_s for r in runs.values()]
    if busy and max(busy) > 10:
        w(
            f"**Caveat: a shared machine.** Other processes used {np.mean(busy):.0f} % of one core "
            f"on average during the server runs (max {max(busy):.0f} %; load average "
            f"{info['loadavg_start']} at the start, {info.get('loadavg_end', '?')} at the end): "
            "they took CPU from both the server and the client, so throughput and latency are "
            "pessimistic. CPU *per request* is the figure least affected."
        )
        w("")
    w("## Targets")
    w("")
    w("The Python front end, `bnserve serve --frontend python` (every feature).")
    w("")
    w("| target | measured | limit | result |")
    w("|---|---|---|---|")
    out.extend(c.row() for c in checks)
    w("")
    w("### Native front end (`bnserve serve --frontend native`)")
    w("")
    if native is None:
        w(f"Not measured in this run: {native_skipped}.")
    else:
        w(
            f"Targets met: **{sum(c.passed for c in native_checks)} of {len(native_checks)}**. "
            "The same models, gates and runs; requests are answered by gRPC C++ and "
            "onnxruntime's C API with the same batching, validation, statistics and metrics "
            "(no hot reload, tokens, drift or --workers: docs/native.md)."
        )
        w("")
        w("| target | measured | limit | result |")
        w("|---|---|---|---|")
        out.extend(c.row() for c in native_checks)
    w("")
    w("## Machine and versions")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPUs | {info['nproc']} (usable by this process: {info['affinity']}) |")
    w(f"| CPU model | {info['cpu_model']} |")
    w(f"| RAM | {info['ram_gib']} GiB |")
    w(f"| kernel | {info['kernel']} |")
    for k in ("python", "grpcio", "onnxruntime", "numpy", "protobuf"):
        w(f"| {k} | {info[k]} |")
    w(f"| bnserve | git {info['bnserve_sha']} |")
    w(f"| date | {info['date']} |")
    w(
        f"| load average (1, 5, 15 min) | {info['loadavg_start']} at the start, "
        f"{info.get('loadavg_end', '?')} at the end |"
    )
    w("")
    w("## Commands")
    w("")
    w("```sh")
    w(f"# the suite (this report)\n{commands['suite']}")
    w(f"# the server it starts (port: a free one)\n{commands['server']}")
    w("# each load run is the equivalent of")
    w(commands["bench"])
    w("```")
    w("")
    w(
        f"Durations: {durations.run_s:g} s measured after {durations.warmup_s:g} s warm-up per "
        f"server run; {durations.ort_s:g} s per in-process measurement."
    )
    w("")
    w("## Server start-up and memory")
    w("")
    w("| | |")
    w("|---|---|")
    w(
        f"| time to ready (process start -> health SERVING, polled every 10 ms) | "
        f"{server.ready_s:.2f} s |"
    )
    w(
        "| the server's own figure (repository load + gRPC start) | "
        f"{_ms(server.ready_logged_s, '{:.2f}')} s |"
    )
    w(f"| VmRSS at ready (digits + vol3d loaded) | {server.rss_ready_kb / 1024:.1f} MiB |")
    w(f"| VmRSS after all runs | {rss_end_kb / 1024:.1f} MiB |")
    w(f"| VmHWM (peak RSS) after all runs | {hwm_end_kb / 1024:.1f} MiB |")
    w(f"| idle CPU after ready | {idle_cpu_pct:.2f} % of one core |")
    if native is not None:
        n = native
        w(f"| native front end: time to ready | {n.server.ready_s:.2f} s |")
        w(f"| native front end: VmRSS at ready | {n.server.rss_ready_kb / 1024:.1f} MiB |")
        w(
            f"| native front end: VmRSS / VmHWM after all runs | {n.rss_end_kb / 1024:.1f} / "
            f"{n.hwm_end_kb / 1024:.1f} MiB |"
        )
        w(f"| native front end: idle CPU after ready | {n.idle_pct:.2f} % of one core |")
    w("")
    w("## Server under load (gRPC, closed loop, batch 1)")
    w("")
    w(
        "Server CPU = the server process's CPU time (all threads, and children if any) "
        "over the whole run, warm-up included, divided by every request sent in that time "
        "(window + warm-up). Client CPU: the same for the suite's process (the load generator). "
        "CPU use and other processes: CPU seconds over the run's wall time, in % of one core "
        "(the machine has "
        f"{info['nproc']}); other processes = the whole machine (/proc/stat) minus server and "
        "client: anything above a few % means the figures were taken on a busy machine."
    )
    w("")
    _runs_table(w, runs)
    if native is not None:
        w("## Native front end under load (same runs, `--frontend native`)")
        w("")
        _runs_table(w, native.runs)
    w("## onnxruntime in-process (same files, the server's session options)")
    w("")
    w(
        "Samples/s; *n* sessions are driven by *n* threads, each calling its own session "
        "back to back (1 intra-op thread each, ORT_ENABLE_ALL). CPU a sample: "
        "the driving threads' own CPU time (time.thread_time) over the measurement / samples."
    )
    w("")
    header = "| model | sessions | " + " | ".join(f"batch {b}" for b in ORT_BATCHES) + " |"
    w(header)
    w("|---|---|" + "---|" * len(ORT_BATCHES))
    for model, pts in ort.items():
        for sessions in ORT_SESSIONS:
            cells = []
            for b in ORT_BATCHES:
                p = next((q for q in pts if q.batch == b and q.sessions == sessions), None)
                cells.append("-" if p is None else f"{p.samples_per_s:,.0f}")
            w(f"| {model} | {sessions} | " + " | ".join(cells) + " |")
    w("")
    others = [p.other_cpu_pct for pts in ort.values() for p in pts]
    if others:
        w(
            f"Other processes during these measurements: {np.mean(others):.0f} % of one core on "
            f"average (max {max(others):.0f} %)."
        )
        w("")
    w("| model | best samples/s (batch, sessions) | CPU a sample, batch 1, 1 session |")
    w("|---|---|---|")
    for model, pts in ort.items():
        best = ort_best(pts)
        cpu = ort_cpu_per_sample(pts)
        if best is not None:
            w(
                f"| {model} | {best.samples_per_s:,.0f} (batch {best.batch}, "
                f"{best.sessions} session{'s' if best.sessions > 1 else ''}) | "
                f"{_ms(cpu, '{:.4f}')} ms |"
            )
    w("")
    fronts = [("Python", "", runs, around.get("python", ([], [])))]
    if native is not None:
        fronts.append(("native", "native ", native.runs, around.get("native", ([], []))))
    if any(b or a for *_, (b, a) in fronts):
        w(
            "vol3d in-process again, right before each front end's first vol3d run and right "
            "after its last (the server idle), "
            f"{2 * durations.ort_s:g} s each: the machine's speed drifts over minutes, so the "
            "vol3d targets compare each front end with the mean of these two, taken under the "
            "same conditions. CPU a sample is the driving threads' own CPU time."
        )
        w("")
        w("| front end | batch, sessions | before: samples/s, CPU ms | after: samples/s, CPU ms |")
        w("|---|---|---|---|")
        for name, _, _, (before, after) in fronts:
            for p0 in before:
                p1 = next(
                    (q for q in after if (q.batch, q.sessions) == (p0.batch, p0.sessions)), None
                )
                w(
                    f"| {name} | {p0.batch}, {p0.sessions} | {p0.samples_per_s:,.0f}, "
                    f"{p0.cpu_ms_per_sample:.4f} | "
                    + (
                        "-"
                        if p1 is None
                        else f"{p1.samples_per_s:,.0f}, {p1.cpu_ms_per_sample:.4f}"
                    )
                    + " |"
                )
        w("")
    w(
        "Server against in-process, per sample (vol3d: against the measurements around its "
        "runs when there are any; digits: the table above):"
    )
    w("")
    w(
        "| run | server samples/s | / in-process best | server CPU ms/sample "
        "| / in-process batch 1 |"
    )
    w("|---|---|---|---|---|")
    for _, prefix, front_runs, (before, after) in fronts:
        for r in front_runs.values():
            if r.model == "vol3d":
                cpu, best_sps, _ = vol3d_reference(ort, before + after)
            else:
                best = ort_best(ort.get(r.model, []))
                cpu = ort_cpu_per_sample(ort.get(r.model, []))
                best_sps = None if best is None else best.samples_per_s
            if best_sps is None or cpu is None:
                continue
            w(
                f"| {prefix}{r.key} | {r.result['samples_per_s']:,.0f} | "
                f"{r.result['samples_per_s'] / best_sps:.2f} | "
                f"{r.server_cpu_ms_per_sample:.4f} | {r.server_cpu_ms_per_sample / cpu:.2f} |"
            )
    w("")
    split = [
        (prefix, r, before + after)
        for _, prefix, front_runs, (before, after) in fronts
        for r in front_runs.values()
        if r.model == "vol3d" and r.ort_cpu_s is not None
    ]
    if split:
        best, _ = vol3d_best_cpu(ort, split[0][2])
        w(
            "Where a vol3d sample's CPU goes, for a server whose onnxruntime workers are named "
            f"threads (`{ORT_THREAD}`: the native front end; from /proc/PID/task over the same "
            "window): the workers' CPU a sample, against in-process onnxruntime's at its best "
            + (f"configuration (batch {best.batch}, {best.sessions} sessions; " if best else "(")
            + "the mean of the measurements before and after the runs); the rest of the server "
            "(gRPC's threads: reading, parsing, replies) and the load tester, a request (one "
            "sample each). With every core busy, samples/s / in-process best comes to about "
            "in-process / (workers + rest + load tester): the last column."
        )
        w("")
        w(
            "| run | samples/s / in-process best | workers ms/sample | in-process ms/sample "
            "| workers / in-process | rest of the server ms/request | load tester ms/request "
            "| in-process / (workers + rest + load tester) |"
        )
        w("|---|---|---|---|---|---|---|---|")
        for prefix, r, pts in split:
            _, best_sps, _ = vol3d_reference(ort, pts)
            _, cpu_best = vol3d_best_cpu(ort, pts)
            ort_ms, rest_ms = r.ort_cpu_ms_per_sample, r.rest_cpu_ms_per_request
            client_ms = r.client_cpu_ms_per_request
            whole = None if ort_ms is None or rest_ms is None else ort_ms + rest_ms + client_ms
            w(
                f"| {prefix}{r.key} | "
                + (f"{r.result['samples_per_s'] / best_sps:.3f}" if best_sps else "-")
                + f" | {_ms(ort_ms, '{:.4f}')} | {_ms(cpu_best, '{:.4f}')} | "
                + (f"{ort_ms / cpu_best:.3f}" if ort_ms and cpu_best else "-")
                + f" | {_ms(rest_ms, '{:.4f}')} | {client_ms:.4f} | "
                + (f"{cpu_best / whole:.3f}" if cpu_best and whole else "-")
                + " |"
            )
        w("")
        w(
            "What the vol3d CPU ratio is made of, measured apart (onnxruntime at the server's "
            "batch beside the load tester; a server with nothing to compute): `make bench-floor` "
            "(bench/floor.py; docs/performance-notes.md, round 10)."
        )
        w("")
    w("## perf_analyzer (Triton's load tester), same server")
    w("")
    if pa_skipped:
        w(f"Not run: {pa_skipped}.")
    else:
        w(
            "`bench/perf_analyzer.sh -m digits -i grpc --concurrency-range C "
            "[--streaming]` (C++ client, docs/perf_analyzer.md), a few measurement windows "
            "each. Server CPU a request is over every inference the server counted during the "
            "run (ModelStatistics before and after), warm-up windows included. The row "
            "labelled --workers is a separate server, `serve --workers 2 --instances 1` (two "
            "processes on one port; its ModelStatistics are per worker, so no CPU a request "
            "there); rows labelled --frontend native ran against the native front end."
        )
        w("")
        w("| model | mode | c | req/s | p50 ms | p99 ms | server CPU ms/req | note |")
        w("|---|---|---|---|---|---|---|---|")
        for pa in [*pa_runs, *(native.pa_runs if native is not None else [])]:
            w(
                f"| digits | {pa.mode} | {pa.concurrency} | "
                + ("-" if pa.throughput_rps is None else f"{pa.throughput_rps:,.0f}")
                + f" | {_ms(pa.p50_ms)} | {_ms(pa.p99_ms)} | "
                + f"{_ms(pa.server_cpu_ms_per_request, '{:.4f}')} | {pa.error or 'ok'} |"
            )
    w("")
    w("## Drift monitoring's cost")
    w("")
    if drift is None or drift.cost_pct is None:
        w("Not measured in this run.")
    else:
        w(
            f"Servers started alternately with `--drift-sample-rate 0` and `{drift.rate:g}`, "
            f"each driven by `bnserve bench --model digits --mode unary --concurrency 8` for "
            f"half a load run; {len(drift.off_rps)} pair(s). Single runs vary by a few percent: "
            "the mean is the figure, not a bound."
        )
        w("")
        w("| rate | runs, req/s | mean req/s |")
        w("|---|---|---|")
        for rate, values in ((0.0, drift.off_rps), (drift.rate, drift.on_rps)):
            runs_txt = ", ".join(f"{v:,.0f}" for v in values)
            w(f"| {rate:g} | {runs_txt} | {statistics.fmean(values):,.0f} |")
        w("")
        w(f"Cost: **{drift.cost_pct:.1f}%** of throughput (target <= {DRIFT_LIMIT_PCT:g}%).")
    w("")
    w("## Peers, for reference (not measured by this suite)")
    w("")
    w(
        "From `../shared/FACTS.md`: the same ONNX models on this kind of machine, client on "
        "the same 2 cores, +-20%."
    )
    w("")
    w("| server | figure |")
    w("|---|---|")
    for name, fig in PEERS:
        w(f"| {name} | {fig} |")
    w("")
    w("## Plots")
    w("")
    for title, rel in plots.items():
        w(f"![{title}]({rel})")
        w("")
    return "\n".join(out).rstrip() + "\n"


# --- main ---------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path, ROOT)
    except ValueError:
        return str(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/suite.py",
        description="bnserve over gRPC against onnxruntime in-process; writes a markdown report.",
    )
    p.add_argument("--quick", action="store_true", help="short runs: the whole suite < 2 min")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    p.add_argument("--img-dir", type=Path, help="where the PNGs go (default: OUT's dir/img)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="model repository")
    p.add_argument("--instances", type=int, help="server --instances (default: the server's)")
    p.add_argument("--duration", type=float, help="measured seconds per server run (override)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per server run (override)")
    p.add_argument("--ort-duration", type=float, help="seconds per in-process point (override)")
    p.add_argument("--json", type=Path, help="also write every figure as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument(
        "--pa-stability",
        type=float,
        default=25.0,
        help="perf_analyzer's --stability-percentage (25; the smoke test, whose windows are "
        "0.2 s, takes any window: 1000)",
    )
    p.add_argument(
        "--frontends",
        default=DEFAULT_FRONTENDS,
        help="comma-separated front ends to measure (default: python, and native when built; "
        "naming native when it is not built is an error)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    d = QUICK if args.quick else FULL
    d = dataclasses.replace(
        d,
        run_s=args.duration if args.duration is not None else d.run_s,
        warmup_s=args.warmup if args.warmup is not None else d.warmup_s,
        ort_s=args.ort_duration if args.ort_duration is not None else d.ort_s,
    )
    out: Path = args.out.resolve()
    img_dir: Path = (args.img_dir or out.parent / "img").resolve()
    img_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    repo: Path = args.repo.resolve()
    started = time.perf_counter()
    info = machine_info()

    # 1. onnxruntime in-process first, while this process has no gRPC threads around.
    ort: dict[str, list[OrtPoint]] = {}
    for model in ORT_MODELS:
        path = repo / model / "1" / "model.onnx"
        _say(f"onnxruntime in-process: {model}")
        ort[model] = measure_ort(path, model, d.ort_s)

    # 2.-3. the server(s): the Python front end, then the native one when it is built.
    pa_skipped = perf_analyzer_unavailable()
    if pa_skipped is not None:
        _say(f"perf_analyzer not run: {pa_skipped}")
    frontends = [f.strip() for f in args.frontends.split(",") if f.strip()]
    native_skipped = native_unavailable() if "native" in frontends else "not asked for"
    if native_skipped is not None and "native" in frontends:
        if args.frontends != DEFAULT_FRONTENDS:
            raise SystemExit(f"bench/suite.py: {native_skipped}")
        _say(f"native front end not measured: {native_skipped}")
        frontends.remove("native")
    # The vol3d targets' references, measured again around each front end's vol3d runs: the
    # machine's speed drifts over minutes (shared host), so the ratios compare like with like.
    vol3d_best = ort_best(ort.get("vol3d", []))
    reference = (
        None
        if vol3d_best is None
        else Reference(
            path=repo / "vol3d" / "1" / "model.onnx",
            model="vol3d",
            configs=sorted({(1, 1), (vol3d_best.batch, vol3d_best.sessions)}),
            seconds=2 * d.ort_s,
        )
    )
    results = {
        f: measure_frontend(
            f, repo, args.instances, d, pa_skipped, args.pa_stability, reference=reference
        )
        for f in frontends
    }
    py = results["python"]
    server, runs, pa_runs = py.server, py.runs, py.pa_runs
    idle_pct, rss_end, hwm_end = py.idle_pct, py.rss_end_kb, py.hwm_end_kb
    native = results.get("native")

    # 3b'. perf_analyzer against `serve --workers 2` (a session each): the SO_REUSEPORT option.
    if pa_skipped is None:
        workers_log = _server_log()
        workers = start_server(
            repo, workers_log, 1, extra=["--frontend", "python", "--workers", str(PA_WORKERS)]
        )
        try:
            wait_for_log_lines(workers_log, " serving ", PA_WORKERS)  # every worker, not one
            with tempfile.TemporaryDirectory(prefix="bnserve-pa-") as workdir:
                time.sleep(d.settle_s)
                pa = run_perf_analyzer(
                    workers,
                    "digits",
                    "unary",
                    16,
                    d,
                    Path(workdir),
                    label=f"unary, --workers {PA_WORKERS} --instances 1",
                    count=False,
                    stability_pct=args.pa_stability,
                )
                pa_runs.append(pa)
                _say(f"perf_analyzer digits {pa.mode} c16: {pa.throughput_rps} req/s {pa.error}")
        finally:
            _stop_keeping_log(workers, "the --workers server")

    # 3c. drift monitoring's cost: servers of its own.
    pairs = 1 if args.quick else DRIFT_PAIRS
    _say(f"drift monitoring cost: {pairs} pair(s) of servers, rate 0 and {DRIFT_RATE:g}")
    drift_log = _server_log()
    drift = measure_drift_cost(repo, args.instances, d, pairs, drift_log)
    _say(f"drift cost: {drift.cost_pct:.1f}% ({drift.off_rps} -> {drift.on_rps} req/s)")
    drift_log.unlink(missing_ok=True)

    # 4. the report.
    info["loadavg_end"] = loadavg()
    checks = evaluate(runs, ort, server, drift, around=py.around)
    native_checks = (
        evaluate(native.runs, ort, native.server, around=native.around)
        if native is not None
        else []
    )
    sha = info["bnserve_sha"]
    plots = {
        "digits: throughput against concurrency": img_dir / "digits_throughput.png",
        "digits, 16 in flight: latency CDF": img_dir / "digits_c16_latency_cdf.png",
    }
    paths = list(plots.values())
    plot_throughput(runs, paths[0], sha)
    plot_latency_cdf(runs, paths[1], sha)
    suite_cmd = " ".join(
        [
            ".venv/bin/python",
            "bench/suite.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    )
    server_cmd = (
        " ".join([".venv/bin/python", *map(shlex.quote, server.command[1:])])
        .replace(str(repo), _rel(repo))
        .replace(server.target.split(":")[1], "PORT")
    )
    bench_cmd = (
        ".venv/bin/bnserve bench --target 127.0.0.1:PORT --model MODEL --mode MODE "
        f"--concurrency C --batch 1 --duration {d.run_s:g} --warmup {d.warmup_s:g}"
    )
    text = render(
        info=info,
        commands={"suite": suite_cmd, "server": server_cmd, "bench": bench_cmd},
        durations=d,
        server=server,
        idle_cpu_pct=idle_pct,
        rss_end_kb=rss_end,
        hwm_end_kb=hwm_end,
        runs=runs,
        ort=ort,
        checks=checks,
        plots={k: os.path.relpath(v, out.parent) for k, v in plots.items()},
        pa_runs=pa_runs,
        pa_skipped=pa_skipped,
        drift=drift,
        native=native,
        native_checks=native_checks,
        native_skipped=native_skipped,
        around={f: (r.ort_before, r.ort_after) for f, r in results.items()},
    )
    out.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "durations": dataclasses.asdict(d),
                    "server": {
                        "ready_s": server.ready_s,
                        "ready_logged_s": server.ready_logged_s,
                        "rss_ready_kb": server.rss_ready_kb,
                        "rss_end_kb": rss_end,
                        "hwm_end_kb": hwm_end,
                        "idle_cpu_pct": idle_pct,
                    },
                    "runs": [r.summary() for r in runs.values()],
                    "ort": [dataclasses.asdict(p) for pts in ort.values() for p in pts],
                    "ort_around": {
                        f: {
                            "before": [dataclasses.asdict(p) for p in r.ort_before],
                            "after": [dataclasses.asdict(p) for p in r.ort_after],
                        }
                        for f, r in results.items()
                    },
                    "targets": [{**dataclasses.asdict(c), "passed": c.passed} for c in checks],
                    "perf_analyzer": {
                        "skipped": pa_skipped,
                        "runs": [dataclasses.asdict(pa) for pa in pa_runs],
                    },
                    "drift_cost": {**dataclasses.asdict(drift), "cost_pct": drift.cost_pct},
                    "native": None
                    if native is None
                    else {
                        "ready_s": native.server.ready_s,
                        "rss_ready_kb": native.server.rss_ready_kb,
                        "rss_end_kb": native.rss_end_kb,
                        "hwm_end_kb": native.hwm_end_kb,
                        "idle_cpu_pct": native.idle_pct,
                        "runs": [r.summary() for r in native.runs.values()],
                        "targets": [
                            {**dataclasses.asdict(c), "passed": c.passed} for c in native_checks
                        ],
                        "perf_analyzer": [dataclasses.asdict(pa) for pa in native.pa_runs],
                    },
                    "native_skipped": native_skipped if native is None else None,
                },
                indent=2,
            )
        )
    _say(
        f"wrote {_rel(out)} and {len(paths)} plots in {time.perf_counter() - started:.0f} s: "
        f"{sum(c.passed for c in checks)} of {len(checks)} targets met"
    )
    for c in checks:
        _say(("PASS " if c.passed else "FAIL ") + c.row())
    if native is not None:
        _say(f"native front end: {sum(c.passed for c in native_checks)} of {len(native_checks)}")
        for c in native_checks:
            _say(("PASS " if c.passed else "FAIL ") + c.row())
    return 1 if args.strict and not all(c.passed for c in checks) else 0


def _server_log() -> Path:
    """The server's stdout/stderr: in the temp dir (never next to the committed report)."""

    fd, name = tempfile.mkstemp(prefix="bnserve-suite-server-", suffix=".log")
    os.close(fd)
    return Path(name)


if __name__ == "__main__":
    raise SystemExit(main())
