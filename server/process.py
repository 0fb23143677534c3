"""A bnserve server in a child process: for soak runs, fault tests and supervisors.

`ServerProcess(repo, *extra)` runs `python -m bnserve.cli serve --repo REPO --host 127.0.0.1
--port 0 --metrics-port -1 *extra`, reads its log (stderr) on a thread, and learns the bound port
from the "serving ... on HOST:PORT" line: no port is picked in advance, so none can be taken by
someone else in between. `stop()` sends SIGTERM (the graceful drain) and waits, bounded.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ServerProcess"]

_SERVING = re.compile(r"serving .* on [^ ]+:(\d+) ")


class ServerProcess:
    """A `bnserve serve` child on 127.0.0.1, an ephemeral port, no metrics endpoint."""

    def __init__(self, repo: str | Path, *extra: str, start_timeout: float = 120.0) -> None:
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
            "0",
            "--metrics-port",
            "-1",
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines as they are written
        self.proc = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.log: list[str] = []  # every stderr line so far
        self.lines: queue.Queue[str] = queue.Queue()  # the same lines, to wait on
        threading.Thread(target=self._read, daemon=True, name="bnserve-server-log").start()
        self.port = self._wait_port(start_timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def _wait_port(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=min(1.0, max(0.0, end - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if m := _SERVING.search(line):
                return int(m.group(1))
        self.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait up to `timeout`; the exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
