"""bench/suite.py in a tiny mode: the whole pipeline (in-process onnxruntime, the server as a
subprocess, every load run, the report and its plots) in well under a minute.

The figures themselves are not checked (the suite measures, it does not judge; its targets are
in the report): only that every section, every run and every target is there.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "suite.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    return load_script("suite")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("perf")
    out = out_dir / "performance.md"
    data = out_dir / "performance.json"
    cmd = [
        sys.executable,
        str(SUITE),
        "--quick",
        "--out",
        str(out),
        "--json",
        str(data),
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--ort-duration",
        "0.05",
        # 0.2 s windows are too short to be stable within 25%: this test checks the pipeline
        "--pa-stability",
        "1000",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=out_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, out.read_text(), json.loads(data.read_text())


@pytest.mark.timeout(150)
def test_report_has_every_section_and_table(report, suite) -> None:
    _, md, _ = report
    for heading in (
        "# Performance",
        "## Targets",
        "## Machine and versions",
        "## Commands",
        "## Server start-up and memory",
        "## Server under load",
        "## onnxruntime in-process",
        "## perf_analyzer (Triton's load tester), same server",
        "## Drift monitoring's cost",
        "### Native front end (`bnserve serve --frontend native`)",
        "## Native front end under load",
        "## Peers, for reference",
        "## Plots",
    ):
        assert heading in md, heading
    assert "| target | measured | limit | result |" in md
    assert "| model | mode | c | req/s |" in md
    assert "| model | sessions | batch 1 | batch 4 | batch 16 | batch 64 |" in md
    # one row per load run, one row per (model, sessions) in-process
    for model, mode, conc, _ in suite.RUNS:
        assert f"| {model} | {mode} | {conc} |" in md
    for model in suite.ORT_MODELS:
        for n in suite.ORT_SESSIONS:
            assert f"| {model} | {n} |" in md
    # every target has a verdict; the versions are named
    verdicts = [line for line in md.splitlines() if line.endswith(("**PASS** |", "**FAIL** |"))]
    assert len(verdicts) == 15 + 14  # the Python front end's, then the native one's (no drift)
    for name in ("grpcio", "onnxruntime", "numpy", "python", "bnserve"):
        assert f"| {name} |" in md
    assert "4,040 req/s" in md and "5,472 req/s" in md  # peers
    # where a native vol3d sample's CPU goes: one row per native vol3d run
    assert "| run | samples/s / in-process best | workers ms/sample |" in md
    for model, mode, conc, _ in suite.RUNS:
        if model == "vol3d":
            rows = [
                ln for ln in md.splitlines() if ln.startswith(f"| native vol3d {mode} c{conc} |")
            ]
            assert len(rows) == 2, rows  # the table against in-process, and this one


def test_plots_exist_and_are_linked(report) -> None:
    out, md, _ = report
    links = [line[line.index("](") + 2 : -1] for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2
    for rel in links:
        png = out.parent / rel
        assert png.is_file(), rel
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 5_000


def test_json_accounts_for_every_run(report, suite) -> None:
    _, _, data = report
    runs = data["runs"]
    assert [(r["model"], r["mode"], r["concurrency"]) for r in runs] == [
        (m, mode, c) for m, mode, c, _ in suite.RUNS
    ]
    for r in runs:
        assert r["requests"] > 0 and r["errors"] == 0, r
        # CPU a request is over every request the CPU window saw: window + warm-up
        sent = r["requests"] + r["warmup_requests"]
        assert r["server_cpu_ms_per_request"] == pytest.approx(
            1000 * r["server_cpu_s"] / sent, rel=1e-2, abs=1e-3
        )
    assert len(data["ort"]) == len(suite.ORT_MODELS) * len(suite.ORT_BATCHES) * len(
        suite.ORT_SESSIONS
    )
    assert all(p["samples_per_s"] > 0 for p in data["ort"])
    # vol3d again right before and after each front end's vol3d runs: batch 1 x 1 session and
    # the in-process best's configuration, and the vol3d targets divide by those
    vol3d = [p for p in data["ort"] if p["model"] == "vol3d"]
    best = max(vol3d, key=lambda p: p["samples_per_s"])
    configs = sorted({(1, 1), (best["batch"], best["sessions"])})
    assert sorted(data["ort_around"]) == ["native", "python"]
    for front, around in data["ort_around"].items():
        for when in ("before", "after"):
            points = around[when]
            assert [(p["batch"], p["sessions"]) for p in points] == configs, (front, when)
            assert all(p["model"] == "vol3d" and p["samples_per_s"] > 0 for p in points)
            assert all(p["cpu_ms_per_sample"] > 0 for p in points)
    for targets in (data["targets"], data["native"]["targets"]):
        vol3d_targets = [t for t in targets if t["name"].startswith("vol3d")]
        assert len(vol3d_targets) == 4
        assert all("before and after these runs" in t["name"] for t in vol3d_targets)
    assert 0 < data["server"]["ready_s"] < 60
    # drift cost: one pair of servers in --quick, both driven for real
    drift = data["drift_cost"]
    assert len(drift["off_rps"]) == len(drift["on_rps"]) == 1
    assert min(drift["off_rps"] + drift["on_rps"]) > 0 and drift["cost_pct"] is not None
    # perf_analyzer: run when it can run here (root, chroot prepared), else the reason is named
    pa = data["perf_analyzer"]
    if pa["skipped"] is None:
        worker_run = ("unary, --workers 2 --instances 1", 16)
        assert [(r["mode"], r["concurrency"]) for r in pa["runs"]] == [
            *suite.PA_RUNS,
            worker_run,
        ]
        for r in pa["runs"]:
            assert r["error"] == "" and r["throughput_rps"] > 0, r
            assert (r["served"] > 0) == ((r["mode"], r["concurrency"]) != worker_run), r
    else:
        assert pa["runs"] == [] and pa["skipped"]
    assert data["server"]["rss_ready_kb"] > 10_000
    # the native front end (make test builds it): the same runs, every one answered
    native = data["native"]
    assert native is not None, data["native_skipped"]
    assert [(r["model"], r["mode"], r["concurrency"]) for r in native["runs"]] == [
        (m, mode, c) for m, mode, c, _ in suite.RUNS
    ]
    for r in native["runs"]:
        assert r["requests"] > 0 and r["errors"] == 0, r
        # the server's CPU split: its onnxruntime workers (named threads) and the rest
        ort_ms, rest_ms = r["ort_workers_cpu_ms_per_sample"], r["rest_of_server_cpu_ms_per_request"]
        assert ort_ms is not None and rest_ms is not None and rest_ms > 0, r
        assert ort_ms + rest_ms == pytest.approx(r["server_cpu_ms_per_request"], abs=2e-3), r
        if r["model"] == "vol3d":  # queued at c16 behind two sessions: the workers run it
            assert ort_ms > 0, r
    # the Python front end's workers are not named threads: no split
    assert all(r["ort_workers_cpu_ms_per_sample"] is None for r in runs)
    assert len(native["targets"]) == 14 and 0 < native["ready_s"] < 60
    if pa["skipped"] is None:
        assert [(r["mode"], r["concurrency"]) for r in native["perf_analyzer"]] == [
            (f"{mode}, --frontend native", c) for mode, c in suite.PA_RUNS
        ]
        for r in native["perf_analyzer"]:
            assert r["error"] == "" and r["throughput_rps"] > 0 and r["served"] > 0, r


@contextlib.contextmanager
def _burner(code: str, suite: ModuleType) -> Iterator[subprocess.Popen[str]]:
    """A Python child running `code`, once it has printed 'ready'; killed (with its children)
    at the end."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        for child in suite._children(proc.pid):
            subprocess.run(["kill", str(child)], check=False)
        proc.kill()
        proc.wait()


def test_proc_cpu_counts_threads_and_children(suite) -> None:
    """The server's CPU is read from /proc: a child that burns CPU in a thread and in a
    grandchild is fully counted in its parent's tree."""
    burn = (
        "import subprocess, sys, threading, time\n"
        "def spin(s):\n"
        "    t = time.thread_time()\n"
        "    while time.thread_time() - t < s: pass\n"
        "th = threading.Thread(target=spin, args=(0.3,)); th.start()\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass\\n"
        "time.sleep(30)'])\n"
        "th.join()\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    with _burner(burn, suite) as proc:
        deadline = time.monotonic() + 20
        cpu = suite.proc_cpu_s(proc.pid)
        while cpu < 0.55 and time.monotonic() < deadline:  # the grandchild may still burn
            time.sleep(0.05)
            cpu = suite.proc_cpu_s(proc.pid)
        assert cpu >= 0.55  # 0.3 s in a thread + 0.3 s in the grandchild (+ start-up)


def test_threads_cpu_counts_the_named_threads_only(suite) -> None:
    """The split of the server's CPU reads its threads by name: a thread named so that burned
    0.3 s is counted, another thread is not, and a name no thread has gives None."""
    burn = (
        "import ctypes, threading, time\n"
        "def spin(name, s, done):\n"
        "    ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME: this thread's comm\n"
        "    t = time.thread_time()\n"
        "    while time.thread_time() - t < s: pass\n"
        "    done.set()\n"
        "    time.sleep(30)\n"
        "events = [threading.Event(), threading.Event()]\n"
        "for name, ev in zip((b'bnn-test', b'other'), events):\n"
        "    threading.Thread(target=spin, args=(name, 0.3, ev), daemon=True).start()\n"
        "for ev in events: ev.wait()\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    with _burner(burn, suite) as proc:
        named = suite.threads_cpu_s(proc.pid, "bnn-test")
        assert named is not None and 0.28 <= named < 0.45
        assert suite.proc_cpu_s(proc.pid) >= named + 0.28  # the other thread burned as much
        assert suite.threads_cpu_s(proc.pid, "bnn-none") is None
        # one sample holds both terms; the rest is the other thread (and start-up)
        sample = suite.CpuSample.take(proc.pid, "bnn-test")
        assert sample.named_s is not None and 0.28 <= sample.named_s < 0.45
        assert sample.total_s - sample.named_s >= 0.28


def test_vol3d_best_cpu_is_the_mean_at_the_best_configuration(suite) -> None:
    def point(batch: int, sessions: int, sps: float, cpu: float) -> Any:
        return suite.OrtPoint("vol3d", batch, sessions, sps, cpu, 0.0)

    ort = {"vol3d": [point(1, 1, 300.0, 3.0), point(4, 2, 600.0, 3.1)]}
    around = [point(1, 1, 310.0, 2.9), point(4, 2, 620.0, 2.8), point(4, 2, 580.0, 3.2)]
    best, cpu = suite.vol3d_best_cpu(ort, around)
    assert (best.batch, best.sessions) == (4, 2) and cpu == pytest.approx(3.0)
    assert suite.vol3d_best_cpu(ort, []) == (best, None)
    assert suite.vol3d_best_cpu({}, around) == (None, None)


def test_vol3d_reference_is_the_mean_around_the_runs(suite) -> None:
    """The vol3d targets divide by the mean of the measurements taken around the runs (batch 1
    x 1 session for CPU, the first table's best configuration for samples/s); without any, by
    the first table."""

    def point(batch: int, sessions: int, sps: float, cpu: float) -> Any:
        return suite.OrtPoint("vol3d", batch, sessions, sps, cpu, 0.0)

    table = [point(1, 1, 300.0, 3.0), point(4, 2, 600.0, 3.1), point(1, 2, 590.0, 3.2)]
    ort = {"vol3d": table}
    assert suite.vol3d_reference(ort) == (3.0, 600.0, "start")
    around = [point(1, 1, 310.0, 2.9), point(4, 2, 620.0, 3.0)]
    around += [point(1, 1, 290.0, 3.3), point(4, 2, 580.0, 3.4)]
    cpu, sps, where = suite.vol3d_reference(ort, around)
    assert where == "around"
    assert cpu == pytest.approx(3.1) and sps == pytest.approx(600.0)
    cpu, sps, _ = suite.vol3d_reference(ort, around[:2])
    assert cpu == pytest.approx(2.9) and sps == pytest.approx(620.0)
