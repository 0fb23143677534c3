"""Assembling and running the server: build_server(settings) -> (app, port); serve(settings).

Start: repository loaded (each version gated), gRPC services registered (inference, health,
reflection), metrics endpoint up, health SERVING. Stop (SIGTERM/SIGINT or App.stop): health
NOT_SERVING, new requests refused with UNAVAILABLE, in-flight requests finish within the grace
period, batchers drained, sessions closed, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from bnserve.proto import inference_pb2 as pb

from .config import DRAIN_QUIET_S, Settings
from .metrics import Metrics
from .repository import Repository
from .security import BearerTokenInterceptor, read_token_file, server_credentials
from .servicer import InferenceServicer, ServerState, add_to_server
from .stats import StatsBook, Tee

log = logging.getLogger("bnserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    # Our messages live in a private pool (tritonclient may share the process); reflection gets
    # a pool of its own holding our file plus the health and reflection protocols.
    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class App:
    """One running server: gRPC, repository, metrics. Create with build_server()."""

    def __init__(self, settings: Settings, *, frontend_why: str = "--frontend python") -> None:
        self.settings = settings
        self.frontend_why = frontend_why  # why this front end answers (logged at start)
        # Security first: a bad certificate, key or token file fails before anything is loaded.
        self.credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        self.auth: BearerTokenInterceptor | None = None
        if settings.auth_token_file is not None:
            self.auth = BearerTokenInterceptor(
                read_token_file(settings.auth_token_file),
                exempt_health=settings.auth_exempt_health,
            )
        elif settings.auth_exempt_health:
            log.warning("auth_exempt_health has no effect without auth_token_file")
        self.state = ServerState()
        self.metrics = Metrics()
        self.stats = StatsBook()
        self.health = HealthServicer()
        self._health_tasks: set[asyncio.Task[None]] = set()
        self.repository = Repository(
            settings.repo,
            instances=settings.instances_per_model,
            observer_factory=lambda n, v: Tee([self.metrics.observer(n, v), self.stats.get(n, v)]),
            on_change=self._on_model_change,
            on_load_failure=lambda n, v, reason: self.metrics.load_failure(n),
            grace=settings.grace,
            drift_sample_rate=settings.drift_sample_rate,
            drift_sink=self.metrics,
        )
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Off unless this process is one of --workers: then the kernel spreads connections.
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ]
        self.server = grpc.aio.server(
            options=options, interceptors=[self.auth] if self.auth else None
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    def _on_model_change(self, name: str, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready and self.state.accepting
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self.health.set(name, status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def start(self) -> int:
        s = self.settings
        started = time.monotonic()
        log.info("front end: python (%s)", self.frontend_why)
        log.info("bnserve starting: %s", s.summary())
        await self.repository.load_all()
        servicer = InferenceServicer(
            self.repository, metrics=self.metrics, stats=self.stats, state=self.state
        )
        add_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME),
            self.server,
            pool=_reflection_pool(),
        )
        address = f"{s.host}:{s.port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {s.host}:{s.port}")
        await self.server.start()
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.start_http(s.metrics_host or s.host, s.metrics_port)
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in self.repository.names():
            ok = self.repository.ready(name)
            await self.health.set(
                name, serving if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        if s.poll:
            self._poller = asyncio.get_running_loop().create_task(
                self.repository.poll_forever(s.poll)
            )
        ready = [n for n in self.repository.names() if self.repository.ready(n)]
        log.info(
            "serving %s on %s:%d (%s, %s; metrics %s) in %.2f s",
            ", ".join(ready) or "no models",
            s.host,
            self.port,
            ("mutual TLS" if s.tls_client_ca else "TLS") if s.tls else "plaintext",
            (
                "bearer token" + (", health exempt" if s.auth_exempt_health else "")
                if self.auth
                else "no auth"
            ),
            f"{s.metrics_host or s.host}:{self.metrics_port}/metrics"
            if self.metrics_port
            else "off",
            time.monotonic() - started,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful drain: refuse new work, let accepted work finish within `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace if grace is None else grace
        signalled = time.monotonic()
        deadline = signalled + grace
        log.info("draining: %d request(s) in flight, grace %.1f s", self.state.inflight, grace)
        self.state.accepting = False
        await self.health.enter_graceful_shutdown()
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.idle.wait(), timeout=max(0.0, grace))
        # grpc's stop cancels (CANCELLED) every call that has reached it but not yet a handler:
        # a client cannot tell that from its own cancellation and will not retry elsewhere. So
        # the port closes only once the refusals have stopped: every client that was sending
        # has had its UNAVAILABLE. Within the grace period.
        # Quiet since the signal, or since the last refusal: calls in transit at the signal count.
        while (
            wait := max(signalled, self.state.last_refusal) + DRAIN_QUIET_S - time.monotonic()
        ) > 0:
            if time.monotonic() + wait > deadline:
                break
            await asyncio.sleep(wait)
        # Lame duck: the port stays open, refusing new calls with UNAVAILABLE, until lame_duck
        # seconds after the signal (within the grace period). A call that reaches the port
        # while grpc closes it is cancelled by grpc before bnserve sees it; clients that got
        # their UNAVAILABLE meanwhile have moved on. A timed period by design: nothing to poll.
        lame_end = min(signalled + self.settings.lame_duck, deadline)
        if (lame_s := lame_end - time.monotonic()) > 0:
            log.info("lame duck: refusing new calls for %.1f s before closing the port", lame_s)
            await asyncio.sleep(lame_s)
        left = self.state.inflight
        await self.repository.close(max(0.0, deadline - time.monotonic()))
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        self.metrics.stop_http()
        if left:
            log.warning("stopped with %d request(s) unfinished after the grace period", left)
        else:
            log.info("stopped cleanly: every accepted request was answered")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def build_server(
    settings: Settings, *, frontend_why: str = "--frontend python"
) -> tuple[App, int]:
    """Start a server (on the running loop) and return it with its bound gRPC port."""
    app = App(settings, frontend_why=frontend_why)
    port = await app.start()
    return app, port


async def _serve(settings: Settings, frontend_why: str) -> int:
    app, _ = await build_server(settings, frontend_why=frontend_why)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: shutting down")
    await app.stop()
    return 0


def serve(settings: Settings, *, frontend_why: str = "--frontend python") -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        return asyncio.run(_serve(settings, frontend_why))
    return uvloop.run(_serve(settings, frontend_why))


@contextlib.contextmanager
def serve_in_thread(settings: Settings, *, stop_grace: float = 5.0) -> Iterator[App]:
    """Run a server on its own event loop in a background thread (tests, embedding); the app
    is yielded once it is serving, and stopped gracefully on exit."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["app"] = loop.run_until_complete(build_server(settings))[0]
        except BaseException as exc:  # surfaced to the caller below
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="bnserve-server", daemon=True)
    thread.start()
    if not started.wait(timeout=120):
        raise TimeoutError("server did not start within 120 s")
    if "error" in box:
        thread.join(timeout=5)
        loop.close()
        raise box["error"]  # type: ignore[misc]
    app = box["app"]
    assert isinstance(app, App)
    try:
        yield app
    finally:
        asyncio.run_coroutine_threadsafe(app.stop(stop_grace), loop).result(timeout=stop_grace + 30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
