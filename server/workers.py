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
systemd) restarts the whole set, as it would a single server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from types import FrameType

from .config import Settings

__all__ = ["supervise", "worker_env"]

log = logging.getLogger(__name__)


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
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def supervise(settings: Settings) -> int:
    """Run settings.workers servers on one port until SIGTERM/SIGINT; the exit code."""
    n = settings.workers
    holder = _reserve_port(settings.host) if settings.port == 0 else None
    port = holder.getsockname()[1] if holder is not None else settings.port
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for p in workers:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        log.info("supervisor: %s received, stopping %d worker(s)", signal.Signals(sig).name, n)
        stop_all(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            env = worker_env(settings, port=port, index=i)
            cmd = [sys.executable, "-m", "bnserve.cli", "serve"]
            workers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
            log.info("supervisor: worker %d/%d pid %d on port %d", i + 1, n, workers[-1].pid, port)
        codes: dict[int, int] = {}
        while len(codes) < n:
            pid, status = os.wait()  # PEP 475: a signal runs on_signal, then the wait resumes
            index = next((i for i, p in enumerate(workers) if p.pid == pid), None)
            if index is None:
                continue
            workers[index].returncode = code = os.waitstatus_to_exitcode(status)
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
        stop_all(signal.SIGKILL)  # only if we are leaving by an exception
        for s, handler in previous.items():
            signal.signal(s, handler)
        if holder is not None:
            holder.close()
    failed = {i + 1: c for i, c in codes.items() if c != 0}
    if failed:
        log.error("supervisor: worker(s) failed: %s", failed)
        return 1
    log.info("supervisor: all %d workers stopped cleanly", n)
    return 0
