"""`bnserve serve --frontend native`: Python keeps the control plane, C++ serves the requests.

Why: on a 2-core machine Python's gRPC stack costs ~0.25 ms of CPU a request before any model
runs (docs/performance-notes.md), more than the whole budget the performance targets allow. gRPC
C++ with onnxruntime's C API answers the same requests for ~0.1 ms.

What stays in Python, done once at start and exactly as the Python front end does it: settings,
the repository scan and version policy, the gates every model passes before it is served (frozen
BatchNorm, batch invariance: server/model.py), and the answers to ServerMetadata, ModelMetadata
and ModelConfig (server/servicer.py builds them; the native server sends the same bytes). Then
a plan (JSON) is handed to `bnserve_native` (server/native/bnserve_native.cc, built by
`make native`) with os.execv: the binary replaces this process, keeps its PID (PID 1 in a
container gets SIGTERM itself) and serves the Open Inference Protocol with its own batcher,
statistics, health, metrics and drain.

What the native front end does not do (yet) is refused up front, never silently dropped: hot
reload (--poll), --lame-duck, --workers, bearer tokens, drift monitoring (`unsupported()`). TLS
and mutual TLS are served: the PEM files are checked here as for the Python front end
(security.tls_material) and their contents travel in the plan.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path
from typing import Any, NoReturn

from .config import DRAIN_QUIET_S, Settings
from .frontend import NativeUnavailableError, binary, unsupported
from .metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS
from .repository import Repository
from .security import TlsMaterial, tls_material
from .servicer import model_config, model_metadata, server_metadata

__all__ = ["NativeUnavailableError", "binary", "build_plan", "exec_native", "unsupported"]

log = logging.getLogger("bnserve.server")


def _b64bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64(message: Any) -> str:
    return _b64bytes(message.SerializeToString())


async def build_plan(settings: Settings) -> dict[str, Any]:
    """Load and gate the repository as the Python front end would, and describe what to serve.

    Models or versions refused by a gate are logged (as by the Python front end) and left out.
    """
    repo = Repository(settings.repo, instances=settings.instances_per_model, grace=0.0)
    try:
        await repo.load_all()
        models = []
        for name in repo.names():
            if not repo.ready(name):
                continue
            versions = []
            for entry in repo.index():
                if entry.name != name or entry.state != "READY":
                    continue
                served = repo.get(name, entry.version)
                b = served.batcher.config
                versions.append(
                    {
                        "version": served.version,
                        "path": str(Path(served.path).resolve()),
                        "instances": served.instance_count,
                        "max_batch_size": served.max_batch_size,
                        "max_queue_size": b.max_queue_size,
                        "max_combined_batch_size": b.combine_limit,
                        "max_queue_delay_us": b.max_queue_delay_us,
                        "preferred_batch_sizes": list(b.preferred_batch_sizes),
                        "metadata_pb": _b64(model_metadata(repo, name, served.version)),
                        "config_pb": _b64(model_config(repo, name, served.version)),
                    }
                )
            default = repo.get(name, "").version
            models.append({"name": name, "default_version": default, "versions": versions})
    finally:
        await repo.close(0.0)
    metrics_host = settings.metrics_host or settings.host
    return {
        "host": settings.host,
        "port": settings.port,
        "metrics_host": metrics_host,
        "metrics_port": settings.metrics_port,
        "grace_s": settings.grace,
        "drain_quiet_s": DRAIN_QUIET_S,
        "max_message_bytes": settings.max_message_bytes,
        "log_level": settings.log_level,
        "server_metadata_pb": _b64(server_metadata()),
        "latency_buckets": list(LATENCY_BUCKETS),
        "batch_size_buckets": list(BATCH_SIZE_BUCKETS),
        "models": models,
    }


def _tls_plan(tls: TlsMaterial) -> dict[str, str]:
    """The plan's "tls": the PEM files' bytes, base64 (exactly as read, comments included); no
    client_ca means no client certificate is asked for."""
    out = {"cert": _b64bytes(tls.cert_pem), "key": _b64bytes(tls.key_pem)}
    if tls.client_ca_pem is not None:
        out["client_ca"] = _b64bytes(tls.client_ca_pem)
    return out


def _plan_fd(plan: dict[str, Any]) -> int:
    """The plan in an anonymous in-memory file the executed binary inherits (nothing to clean
    up on disk); it reads /proc/self/fd/N."""
    fd = os.memfd_create("bnserve-native-plan", 0)  # no MFD_CLOEXEC: it must survive execv
    os.write(fd, json.dumps(plan).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def exec_native(settings: Settings, *, why: str = "--frontend native") -> NoReturn:
    """Gate the models, then replace this process with `bnserve_native` serving them.

    Raises NativeUnavailableError (nothing loaded yet) when the binary is missing or a setting
    is not supported; returns never otherwise.
    """
    problems = unsupported(settings)
    if problems:
        raise NativeUnavailableError("--frontend native does not support: " + "; ".join(problems))
    exe = binary()
    tls = tls_material(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    log.info("front end: native (%s)", why)
    log.info("bnserve starting (native front end): %s", settings.summary())
    plan = asyncio.run(build_plan(settings))
    if tls is not None:
        plan["tls"] = _tls_plan(tls)
    if not plan["models"]:
        raise NativeUnavailableError(
            f"no model of {settings.repo} passed its gates: nothing to serve"
        )
    fd = _plan_fd(plan)
    served = ", ".join(m["name"] for m in plan["models"])
    log.info("gates passed for %s; handing the port to %s", served, exe)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(exe, [str(exe), "--plan", f"/proc/self/fd/{fd}"])
