"""The Open Inference Protocol handlers (grpc.aio): thin, over the repository and the batcher.

This module and the codec are the only ones that see protobuf types. Every BnserveError is
mapped to its gRPC status here, once; anything else is a server bug, logged and reported as
INTERNAL without tearing the server down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from bnserve import __version__
from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc

from . import codec
from .errors import BnserveError, ModelNotFoundError, ShuttingDownError
from .metrics import Metrics
from .repository import Repository, ServedModel
from .stats import StatsBook

log = logging.getLogger("bnserve.server")

EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "streaming",
    "health",
)
# At most this many requests of one ModelStreamInfer stream are in flight; the stream stops
# reading (flow control) until one finishes.
STREAM_WINDOW = 1024


@dataclass
class ServerState:
    """What the handlers need to know about the server's life."""

    accepting: bool = True
    inflight: int = 0
    accepted: int = 0  # every request ever let in (monotonic): inflight + those answered
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    last_refusal: float = 0.0  # time.monotonic() of the last request refused by the drain

    def __post_init__(self) -> None:
        self.idle.set()  # nothing in flight yet

    def refuse(self, message: str) -> ShuttingDownError:
        """The drain's refusal of a call, timed (the drain waits for refusals to stop)."""
        self.last_refusal = time.monotonic()
        return ShuttingDownError(message)

    def enter(self) -> None:
        if not self.accepting:
            raise self.refuse("server is shutting down; retry on another replica")
        self.inflight += 1
        self.accepted += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


class Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message. grpcio would answer
    a deserializer's exception with INTERNAL; a client's garbage deserves INVALID_ARGUMENT."""

    __slots__ = ("error", "message_type")

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type, self.error = message_type, error

    @property
    def detail(self) -> str:
        return f"request is not a valid {self.message_type} protobuf message: {self.error}"


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    parse = cls.FromString
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError (and friends on bad UTF-8)
            return Undecodable(name, exc)

    return deserialize


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every RPC of the service like the generated add_..._to_server, but with
    deserializers that never raise (see Undecodable)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        impl = getattr(servicer, method.name)
        kwargs = {
            "request_deserializer": _lenient(request_cls),
            "response_serializer": response_cls.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(impl, **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_checked(impl), **kwargs)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # Registered methods take grpc core's fast path (no per-call method lookup in Python).
    server.add_registered_method_handlers(service.full_name, handlers)


def _checked(impl: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        return await impl(request, context)

    return handler


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _config_parameters(model: ServedModel) -> dict[str, str]:
    """What a client needs to prepare inputs and read outputs, as Triton-style string
    parameters holding JSON: the labels and the input preprocessing of config.json, and the
    batcher's combine limit when it is below max_batch_size (Triton's config has no field)."""
    params = {}
    combined = model.batcher.config.max_combined_batch_size
    if combined is not None:
        params["max_combined_batch_size"] = str(combined)
    if model.config.labels:
        params["labels"] = json.dumps(list(model.config.labels))
    preprocessing = model.config.raw.get("preprocessing")
    if preprocessing:
        params["preprocessing"] = json.dumps(preprocessing)
    return params


def server_metadata(name: str = "bnserve") -> pb.ServerMetadataResponse:
    """ServerMetadata's answer (the native front end sends the same bytes)."""
    return codec.server_metadata_response(name=name, version=__version__, extensions=EXTENSIONS)


def model_metadata(repo: Repository, name: str, version: str) -> pb.ModelMetadataResponse:
    """ModelMetadata's answer for a served model version (ModelNotFoundError otherwise)."""
    model = repo.get(name, version)
    versions = [e.version for e in repo.index() if e.name == name and e.state == "READY"]
    return codec.model_metadata_response(
        name=model.name,
        versions=versions or [model.version],
        inputs=model.spec.inputs,
        outputs=model.spec.outputs,
        platform=model.spec.platform,
    )


def model_config(repo: Repository, name: str, version: str) -> pb.ModelConfigResponse:
    """ModelConfig's answer for a served model version (ModelNotFoundError otherwise)."""
    model = repo.get(name, version)
    b = model.batcher.config
    return codec.model_config_response(
        name=model.name,
        inputs=model.spec.inputs,
        outputs=model.spec.outputs,
        max_batch_size=model.spec.max_batch_size,
        preferred_batch_sizes=b.preferred_batch_sizes,
        max_queue_delay_us=b.max_queue_delay_us,
        max_queue_size=b.max_queue_size,
        dynamic_batching=model.spec.max_batch_size > 0,
        instance_count=model.loaded.pool.size,
        parameters=_config_parameters(model),
    )


_Msg = pb.ModelInferResponse | pb.ModelStreamInferResponse
_M = TypeVar("_M", pb.ModelInferResponse, pb.ModelStreamInferResponse)


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str  # a grpc.StatusCode name
    message: str


def _responder(
    encode: Callable[..., _M],
) -> Callable[[ServedModel, dict[str, Any], codec.DecodedRequest], _M]:
    """An encoder of a successful answer (unary or stream message) for InferenceServicer._run."""

    def respond(model: ServedModel, outputs: dict[str, Any], decoded: codec.DecodedRequest) -> _M:
        return encode(
            model_name=model.name,
            model_version=model.version,
            request_id=decoded.id,
            outputs=outputs,
            specs=model.spec.outputs,
            requested=decoded.requested_outputs,
        )

    return respond


_unary_response = _responder(codec.encode_response)
_stream_response = _responder(codec.encode_stream_response)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: Repository,
        *,
        metrics: Metrics,
        stats: StatsBook,
        state: ServerState,
        server_name: str = "bnserve",
    ) -> None:
        self._repo = repository
        self._metrics = metrics
        self._stats = stats
        self._state = state
        self._name = server_name

    # --- the core of one inference, shared by unary and streaming -----------------------------
    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> tuple[ServedModel, dict[str, Any], codec.DecodedRequest]:
        model = self._repo.get(request.model_name, request.model_version)
        spec = model.spec
        decoded = codec.decode_request(
            request, spec.inputs, spec.max_batch_size, outputs=spec.outputs
        )
        # The codec validated the arrays in full; its batch size is the batcher's row count
        # (a model without a batch axis is batched on its fixed first dim: let the batcher count).
        rows = decoded.batch_size if spec.max_batch_size > 0 else None
        outputs = await model.batcher.submit(decoded.arrays, deadline=deadline, rows=rows)
        return model, outputs, decoded

    def _account(
        self, request: pb.ModelInferRequest, model: ServedModel | None, code: str, started: float
    ) -> None:
        elapsed = time.perf_counter() - started
        if model is not None:
            name, version = model.name, model.version
        else:
            # Unknown names and unknown versions of a known model share one label value each:
            # a client must not grow the series unbounded.
            name, version = request.model_name, request.model_version
            if not self._repo.seen(name):
                name, version = "<unknown>", ""
            elif not self._repo.seen(name, version):
                version = "<unknown>"
        self._metrics.request_done(name, version, code, elapsed)
        if model is not None:
            self._stats.get(name, version).request_done(code == "OK", elapsed)

    async def _run(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext,
        encode: Callable[[ServedModel, dict[str, Any], codec.DecodedRequest], _Msg],
    ) -> _Msg | _Failure:
        """One request end to end (resolve, decode, batch, encode), counted exactly once.
        Returns the encoded answer or a _Failure; raises only CancelledError."""
        started = time.perf_counter()
        model: ServedModel | None = None
        try:
            model, outputs, decoded = await self._infer(request, _deadline(context))
            msg = encode(model, outputs, decoded)
        except BnserveError as exc:
            self._account(request, model or self._maybe_model(request), exc.status_code, started)
            return _Failure(exc.status_code, exc.message)
        except asyncio.CancelledError:
            self._account(request, model or self._maybe_model(request), "CANCELLED", started)
            raise
        except Exception:
            log.exception("internal error in inference for model %r", request.model_name)
            self._account(request, model, "INTERNAL", started)
            return _Failure("INTERNAL", "internal server error (see server log)")
        self._account(request, model, "OK", started)
        return msg

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            self._state.enter()
        except BnserveError as exc:
            self._account(request, None, exc.status_code, time.perf_counter())
            await context.abort(grpc.StatusCode[exc.status_code], exc.message)
        self._metrics.inflight_inc()
        try:
            result = await self._run(request, context, _unary_response)
        finally:
            self._metrics.inflight_dec()
            self._state.leave()
        if isinstance(result, _Failure):
            await context.abort(grpc.StatusCode[result.code], result.message)
        assert isinstance(result, pb.ModelInferResponse)
        return result

    def _maybe_model(self, request: pb.ModelInferRequest) -> ServedModel | None:
        return self._loaded(request.model_name, request.model_version)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (they are batched with everything else);
        responses are written as they complete, each carrying its request's id. A bad request
        gets an in-band error_message and the stream goes on."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                result = await self._run(request, context, _stream_response)
            finally:
                self._metrics.inflight_dec()
                self._state.leave()
                window.release()
            if isinstance(result, _Failure):
                result = codec.stream_error(
                    f"[{result.code}] {result.message}",
                    request.id,
                    model_name=request.model_name,
                    model_version=request.model_version,
                )
            out.put_nowait(result)

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    if isinstance(request, Undecodable):
                        out.put_nowait(codec.stream_error(f"[INVALID_ARGUMENT] {request.detail}"))
                        continue
                    await window.acquire()
                    try:
                        self._state.enter()
                    except BnserveError as exc:
                        window.release()
                        self._account(request, None, exc.status_code, time.perf_counter())
                        out.put_nowait(
                            codec.stream_error(f"[{exc.status_code}] {exc.message}", request.id)
                        )
                        continue
                    self._metrics.inflight_inc()
                    task = asyncio.get_running_loop().create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                out.put_nowait(None)  # end of stream: every accepted request was answered

        read_task = asyncio.get_running_loop().create_task(reader())
        try:
            while (msg := await out.get()) is not None:
                yield msg
        finally:
            if not read_task.done():
                read_task.cancel()  # the client went away: cancel what it can no longer read
                for task in list(tasks):
                    task.cancel()

    # --- health and metadata ------------------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        ready = self._state.accepting and any(self._repo.ready(n) for n in self._repo.names())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        ready = self._state.accepting and self._repo.ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return server_metadata(self._name)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return await self._guard(context, lambda: self._metadata(request.name, request.version))

    def _metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        return model_metadata(self._repo, name, version)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return await self._guard(context, lambda: self._config(request.name, request.version))

    def _config(self, name: str, version: str) -> pb.ModelConfigResponse:
        return model_config(self._repo, name, version)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return await self._guard(context, lambda: self._statistics(request.name, request.version))

    def _statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        if name:
            self._repo.get(name, version)  # NOT_FOUND for an unknown model, as Triton does
        response = pb.ModelStatisticsResponse()
        for s in self._stats.select(name, version):
            m = response.model_stats.add(
                name=s.name,
                version=s.version,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            st = m.inference_stats
            for target, src in (
                (st.success, s.success),
                (st.fail, s.fail),
                (st.queue, s.queue),
                (st.compute_infer, s.compute_infer),
            ):
                target.count, target.ns = src.count, src.ns
            # Input and output copies are part of compute_infer here (one onnxruntime run);
            # their counts must still match it: perf_analyzer refuses statistics otherwise.
            st.compute_input.count = st.compute_output.count = s.compute_infer.count
            for rows, d in sorted(s.batches.items()):
                b = m.batch_stats.add(batch_size=rows)
                b.compute_infer.count, b.compute_infer.ns = d.count, d.ns
                b.compute_input.count = b.compute_output.count = d.count
            served = self._loaded(s.name, s.version)
            if served is not None and served.drift is not None:
                m.bn_drift_samples, rows_ = served.drift.report()
                for layer, channels, score in rows_:
                    m.bn_drift.add(layer=layer, channels=channels, score=score)
        return response

    def _loaded(self, name: str, version: str) -> ServedModel | None:
        """The served version, or None when it is not loaded (or the name is unknown)."""
        try:
            return self._repo.get(name, version)
        except BnserveError:
            return None

    # --- repository ---------------------------------------------------------------------------
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for e in self._repo.index():
            if request.ready and e.state != "READY":
                continue
            response.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._guard_async(
            context, request.repository_name, self._repo.load(request.model_name)
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._guard_async(
            context, request.repository_name, self._repo.unload(request.model_name)
        )
        return pb.RepositoryModelUnloadResponse()

    # --- error mapping for the non-inference RPCs ---------------------------------------------
    async def _guard(self, context: grpc.aio.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BnserveError as exc:
            await context.abort(grpc.StatusCode[exc.status_code], exc.message)
        except Exception:
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see server log)")

    async def _guard_async(
        self, context: grpc.aio.ServicerContext, repository_name: str, coro: Any
    ) -> None:
        try:
            if repository_name:
                raise ModelNotFoundError(
                    f"unknown repository {repository_name!r}; this server has one repository, "
                    "name it with an empty string"
                )
            if not self._state.accepting:
                raise self._state.refuse("server is shutting down")
            await coro
        except BnserveError as exc:
            await context.abort(grpc.StatusCode[exc.status_code], exc.message)
        except Exception:
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see server log)")
        finally:
            if asyncio.iscoroutine(coro):
                coro.close()  # never awaited when refused early: close it quietly


__all__ = ["EXTENSIONS", "InferenceServicer", "ServerState", "Undecodable", "add_to_server"]
