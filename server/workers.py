"""`bnserve serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

One Python process serves from one event-loop thread, and that thread is what saturates first
(docs/performance-notes.md: ~110% of a core at 16 in flight, gRPC's own code most of it). With N
workers the kernel spreads incoming *connections* over N such processes; a single connection
(one channel, one stream) stays on one worker. Each worker is a complete server: its own models,
sessions, batcher, health, ModelStatistics and hot reload. Metrics: worker i listens on
--metrics-port + i (scrape each; 0 gives each an ephemeral port, -1 none).

This supervisor loads no model and imports neither grpc nor onnxruntime. It forwards SIGTERM and
SIGINT to the workers (each drains as usual, --grace and --lame-duck included) and exits once all
have exited: 0 when every worker did. A worker that exits on its own takes the others down with
it (they get SIGTERM), and the supervisor exits non-zero: the process manager (Kubernetes,
systemd) restarts the whole set, as it would a single server. Workers get SIGTERM from the kernel
if the supervisor itself dies (PR_SET_PDEATHSIG), so no orphan keeps serving on the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

from .config import Settings

__all__ = ["supervise", "worker_env"]

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_env(settings: Settings, *, port: int, index: int) -> dict[str, str]:
    """The environment of worker `index`: every setting as BNSERVE_<FIELD> (so the worker's
    `bnserve serve`, given no flags, rebuilds the same Settings), with the shared port,
    SO_REUSEPORT on, one worker, and its own metrics port."""
    fields = settings.model_dump(mode="json")
    metrics = settings.metrics_port
    fields.update(
        port=port,
        workers=1,
        reuse_port=True,
        metrics_port=metrics + index if metrics > 0 else metrics,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    for name, value in fields.items():
        if value is not None:
            env[f"BNSERVE_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def _reserve_port(host: str) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: it picks the port for --port 0 and keeps it
    taken while the workers bind theirs (a non-listening socket gets no connections)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn of a worker: SIGTERM it (a graceful drain) when the supervisor dies, even by
    SIGKILL; without this, orphaned workers would keep serving old models on the shared port."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return arm


def supervise(settings: Settings) -> int:
    """Run settings.workers servers on one port until SIGTERM/SIGINT; the exit code."""
    n = settings.workers
    if settings.metrics_port > 0 and settings.metrics_port + n - 1 > 65535:
        raise ValueError(
            f"--metrics-port {settings.metrics_port} + {n} workers goes past port 65535"
        )
    holder = _reserve_port(settings.host) if settings.port == 0 else None
    port = holder.getsockname()[1] if holder is not None else settings.port
    workers: list[subprocess.Popen[bytes]] = []
    codes: dict[int, int] = {}  # worker index -> exit code, once reaped by os.wait() below
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        # os.kill, never Popen.poll/send_signal: those reap, and only os.wait() below may.
        for i, p in enumerate(workers):
            if i not in codes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        log.info("supervisor: %s received, stopping the workers", signal.Signals(sig).name)
        stop_all(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            if stopping:  # a signal came while starting: start no more
                break
            env = worker_env(settings, port=port, index=i)
            cmd = [sys.executable, "-m", "bnserve.cli", "serve"]
            workers.append(
                subprocess.Popen(
                    cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid())
                )
            )
            log.info("supervisor: worker %d/%d pid %d on port %d", i + 1, n, workers[-1].pid, port)
        while len(codes) < len(workers):
            pid, status = os.wait()  # PEP 475: a signal runs on_signal, then the wait resumes
            index = next((i for i, p in enumerate(workers) if p.pid == pid), None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            workers[index].returncode = code
            if stopping and code == -signal.SIGTERM:
                code = 0  # stopped while still loading, before its drain handler: nothing accepted
            codes[index] = code
            if not stopping:
                stopping = True
                log.error(
                    "supervisor: worker %d (pid %d) exited with %d; stopping the others",
                    index + 1,
                    pid,
                    code,
                )
                stop_all(signal.SIGTERM)
                codes[index] = code or 1  # an unrequested exit is a failure even if clean
    finally:
        if len(codes) < len(workers):  # leaving by an exception: leave no worker behind
            stop_all(signal.SIGKILL)
            for i, p in enumerate(workers):
                if i not in codes:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(p.pid, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if holder is not None:
            holder.close()
    failed = {i + 1: c for i, c in codes.items() if c != 0}
    if failed:
        log.error("supervisor: worker(s) failed: %s", failed)
        return 1
    log.info("supervisor: all %d workers stopped cleanly", len(workers))
    return 0
