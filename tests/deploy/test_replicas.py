"""Several replicas: `bnserve bench --retries` over three server processes, one SIGKILLed mid-run.

Three `bnserve serve` processes on loopback (any free ports, read from their "serving ... on"
log line; ready once the grpc.health.v1 probe says SERVING) are driven by `bnserve bench` (a
subprocess, closed loop, 6 workers, round robin over the three targets, --retries 5). Once the
servers' own success counters show the bench has been running for ~2 s, the middle one is killed
with SIGKILL. Every request must still succeed -- those in flight on the dead server and those
later sent its way fail with UNAVAILABLE and are re-sent to the next target -- and the client's
figures must agree with the servers' counters:

* a survivor's success counter == the bench's successes from that target, exactly (it counts
  what it answered; the bench received all of it, each answer once);
* the killed server cannot be read at its death: its counter can still grow between the last
  scrape and the kill, and its last answers may be lost in flight (the server counted them, the
  client got UNAVAILABLE and had a survivor answer again). A lost answer belongs to a request
  still in flight at the kill: at most one per worker. So the bench's successes from it are at
  least its last scraped counter minus the concurrency -- and no upper bound from the servers'
  side is true (a bound "ok <= survivors + last scrape" fails whenever the killed server answers
  between the scrape and the kill).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
MODEL = "digits"
REPLICAS = 3
VICTIM = 1  # the middle target: its retries go to target 2, its turn's neighbours stay up
CONCURRENCY = 6
DURATION_S = 6.0
WARMUP_S = 0.5
RETRIES = 5
KILL_AFTER_S = 2.0  # of bench progress, as seen in the servers' success counters
MIN_SHARE = 0.15
START_TIMEOUT_S = 60.0

# "serving digits, vol3d on 127.0.0.1:PORT (... metrics 127.0.0.1:MPORT/metrics) in 0.70 s"
SERVING = re.compile(
    r"serving .* on 127\.0\.0\.1:(\d+) \([^)]*metrics 127\.0\.0\.1:(\d+)/metrics\)"
)
SAMPLE = re.compile(r"^bnserve_request_success_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def successes(self) -> int:
        """The server's bnserve_request_success_total for the model (all versions)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2.0) as reply:
            text = reply.read().decode()
        total = 0.0
        for m in SAMPLE.finditer(text):
            if f'model="{MODEL}"' in m["labels"]:
                total += float(m["value"])
        return round(total)


def _start(tmp_path: Path, i: int, files: list[IO[bytes]]) -> Replica:
    log = tmp_path / f"server{i}.log"
    out = log.open("wb")
    files.append(out)
    cmd = [
        sys.executable,
        "-m",
        "bnserve.cli",
        "serve",
        "--repo",
        str(BUNDLED),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--instances",
        "1",
        "--grace",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=tmp_path)
    return Replica(proc, log)


def _wait_serving(r: Replica, deadline: float) -> None:
    """Ports from the log line, then the health probe until SERVING (both bounded)."""
    while True:
        m = SERVING.search(r.log.read_text(errors="replace"))
        if m:
            r.port, r.metrics_port = int(m[1]), int(m[2])
            break
        if r.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not start (exit {r.proc.poll()}):\n{r.log.read_text()}")
        time.sleep(0.05)
    with grpc.insecure_channel(r.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if r.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{r.target} never SERVING:\n{r.log.read_text()}")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    files: list[IO[bytes]] = []
    servers: list[Replica] = []
    try:
        servers = [_start(tmp_path, i, files) for i in range(REPLICAS)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for r in servers:
            _wait_serving(r, deadline)
        yield servers
    finally:
        for r in servers:
            _stop(r.proc)
        for f in files:
            f.close()


def _kill_when_running(servers: list[Replica], bench: subprocess.Popen[bytes]) -> list[int]:
    """Poll the success counters; once every server answers and the bench has run for
    KILL_AFTER_S, scrape them all and SIGKILL the victim. Returns the scrape (at the kill)."""
    deadline = time.monotonic() + 30.0
    first: float | None = None
    while True:
        counts = [r.successes() for r in servers]
        now = time.monotonic()
        if first is None and sum(counts) > 0:
            first = now
        if first is not None and now - first >= KILL_AFTER_S and min(counts) > 0:
            break
        if bench.poll() is not None:
            pytest.fail(f"the bench ended (exit {bench.returncode}) before the kill")
        if now > deadline:
            pytest.fail(f"the bench made no progress: success counters {counts}")
        time.sleep(0.05)
    # The last look at the victim, then (as soon as possible) its death.
    counts = [r.successes() for r in servers]
    victim = servers[VICTIM].proc
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    return counts


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_replica_killed_mid_run_loses_no_request(
    replicas: list[Replica], tmp_path: Path, mode: str
) -> None:
    out = tmp_path / f"bench-{mode}.json"
    cmd = [sys.executable, "-m", "bnserve.cli", "bench"]
    for r in replicas:
        cmd += ["--target", r.target]
    cmd += [
        "--model",
        MODEL,
        "--mode",
        mode,
        "--concurrency",
        str(CONCURRENCY),
        "--duration",
        str(DURATION_S),
        "--warmup",
        str(WARMUP_S),
        "--timeout",
        "5",
        "--retries",
        str(RETRIES),
        "--json",
        str(out),
        "--no-progress",
    ]
    bench = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        at_kill = _kill_when_running(replicas, bench)
        report, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate(timeout=10)
    text = report.decode(errors="replace")
    assert replicas[VICTIM].proc.returncode == -signal.SIGKILL
    survivors = [i for i in range(REPLICAS) if i != VICTIM]
    final = {i: replicas[i].successes() for i in survivors}

    assert bench.returncode == 0, text  # exit 1 when any request failed
    doc = json.loads(out.read_text())
    # Every request succeeded: the ones the dead server could not answer were retried.
    assert doc["errors"] == 0 and doc["errors_by_code"] == {}, text
    assert doc["requests"] == doc["ok"] > 0
    assert doc["retries"] == RETRIES
    assert doc["retried"] > 0, text
    assert "retried" in text
    by_target = doc["ok_by_target"]
    assert list(by_target) == [r.target for r in replicas]
    answered = doc["ok"] + doc["warmup_ok"]  # each logical request once, by its final outcome
    assert sum(by_target.values()) == answered

    # Survivors: what each counted == what the bench received from it, exactly.
    for i in survivors:
        assert by_target[replicas[i].target] == final[i], (i, by_target, final)
    # The victim: its answers counted by the last scrape reached the bench, except those lost
    # in flight at the kill (at most one per worker; their requests were answered again).
    from_victim = by_target[replicas[VICTIM].target]
    assert from_victim >= at_kill[VICTIM] - CONCURRENCY, (from_victim, at_kill)
    assert answered >= sum(final.values()) + at_kill[VICTIM] - CONCURRENCY
    # Before the kill, round robin: every server took a substantial share.
    for i, n in enumerate(at_kill):
        assert n > MIN_SHARE * sum(at_kill), (i, at_kill)
    # After it, both survivors kept serving (the victim's turns went on to the next target).
    after = {i: final[i] - at_kill[i] for i in survivors}
    for i, n in after.items():
        assert n > MIN_SHARE * sum(after.values()), (i, after)
    print(
        f"\n{mode}: ok {doc['ok']} (+{doc['warmup_ok']} warm-up), retried {doc['retried']}, "
        f"by target {list(by_target.values())}, counters at kill {at_kill}, "
        f"survivors final {final}, p99 {doc['latency_ms']['p99']} ms"
    )
