"""Which front end answers: `--frontend auto|python|native`, decided before anything heavy is
imported (the --workers supervisor imports neither grpc nor onnxruntime).

auto (the default) is native when the `bnserve_native` binary is built and every setting asked
for is one it supports (`unsupported()`); else Python, and the log says why.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Settings

ROOT = Path(__file__).resolve().parents[1]  # the checkout (editable installs link back here)
DEFAULT_BINARY = ROOT / "build" / "native" / "bnserve_native"
BINARY_ENV = "BNSERVE_NATIVE_BIN"


class NativeUnavailableError(RuntimeError):
    """The native front end cannot start: not built, or asked for what it does not support
    (a start-up error: `bnserve serve` prints it and exits 2)."""


def _binary_path() -> Path:
    return Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)


def binary() -> Path:
    """The `bnserve_native` executable: $BNSERVE_NATIVE_BIN, else the checkout's build/native."""
    path = _binary_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise NativeUnavailableError(
            f"--frontend native needs the bnserve_native executable, not found at {path}: "
            f"build it with `make native` (or point {BINARY_ENV} at it)"
        )
    return path


def unsupported(settings: Settings) -> list[str]:
    """Settings the native front end cannot honour, one sentence each (empty: all fine)."""
    problems = []
    if settings.poll:
        problems.append("--poll (hot reload): restart the server to change models")
    if settings.lame_duck > 0:
        problems.append("--lame-duck: new calls are refused at once after SIGTERM")
    if settings.workers > 1:
        problems.append("--workers: one native process already uses every core")
    if settings.auth_token_file is not None:
        problems.append("--auth-token-file: serve bearer tokens through the Python front end")
    if settings.drift_sample_rate > 0:
        problems.append("--drift-sample-rate: drift is scored by the Python front end only")
    return problems


def choose(settings: Settings) -> tuple[str, str]:
    """The front end `settings.frontend` means ("python" or "native") and why, for the log.

    auto is native when the binary is built and every setting is one it supports; else Python,
    saying what native lacks or how to build it.
    """
    if settings.frontend != "auto":
        return settings.frontend, "--frontend " + settings.frontend
    if problems := unsupported(settings):
        return "python", "auto: the native front end lacks " + "; ".join(problems)
    try:
        exe = binary()
    except NativeUnavailableError:
        return "python", (
            f"auto: the native front end is not built ({_binary_path()}); `make native` builds it, "
            "for several times less CPU a request"
        )
    return "native", f"auto: the native front end is built ({exe})"
