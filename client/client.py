"""Inference clients for the Open Inference Protocol (KServe V2 gRPC, plus Triton's streaming).

`InferenceClient` (blocking) and `AsyncInferenceClient` (grpc.aio) have the same methods::

    with InferenceClient("127.0.0.1:8001") as client:
        logits = client.infer("digits", x)              # x: (N, 1, 8, 8) float32
        for logits in client.stream("digits", batches):  # results in the order sent
            ...

Tensors travel as raw little-endian bytes (raw_input_contents / raw_output_contents). Arrays
are sent in their own dtype: convert to the model's datatype first (the server refuses a
mismatch with INVALID_ARGUMENT). Outputs are read-only numpy views of the response bytes.

Errors: every failure is an `InferenceError` with `.code` (a grpc.StatusCode name such as
"INVALID_ARGUMENT") and `.message`; gRPC errors are converted in one place (`_rpc_error`).

Retries: only UNAVAILABLE (server unreachable, draining, or overloaded) is retried, at most
`retries` more times, with exponential backoff and full jitter, within the call's deadline
(`timeout` covers all attempts). Inference is a pure function of its inputs, so a retry is
safe. Streams are not retried.

Several targets: one channel with gRPC's round_robin policy over all their addresses (hostnames
are resolved once, at construction).

Streaming semantics (`stream`): each batch gets exactly one outcome, delivered in the order the
batches were given. Iterating yields results; a batch that failed raises its `InferenceError`
(with `.index`, the batch's position) from `next()` at its position, and the stream stays usable:
the next `next()` goes on with the following batch. `InferStream.results()` yields
`StreamResult`s (value or error, never raising for one batch) instead. If the RPC itself fails
(server gone, deadline), every batch sent but not answered fails with that error; if batches
were left to send, the next position fails with it too (so a broken stream never looks like a
complete one), and the iteration ends. The iterable's own exception is raised after the results
of the batches taken before it. `close()` ends the iteration quietly.

At most `window` batches are outstanding: taken from the iterable and not yet handed to the
caller (a batch keeps its slot until the caller asks for the next result), which bounds both the
requests in flight and the reorder buffer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.proto.datatypes import CONTENTS_FIELD
from bnserve.proto.datatypes import DATATYPES as _DATATYPES

__all__ = [
    "DATATYPES",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "InferResult",
    "InferStream",
    "InferenceClient",
    "InferenceError",
    "StreamResult",
    "TLSConfig",
]

MiB = 1024 * 1024
# The server's default limit is 64 MiB; the client accepts more so it is never the bottleneck.
DEFAULT_MAX_MESSAGE_BYTES = 256 * MiB

# Open Inference Protocol datatype -> numpy dtype, little-endian as on the wire.
DATATYPES = _DATATYPES
_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPES.items()}
# Typed `contents` members, for servers that answer without raw_output_contents.
_CONTENTS_MEMBER = CONTENTS_FIELD

InferResult: TypeAlias = np.ndarray | dict[str, np.ndarray]
Inputs: TypeAlias = np.ndarray | Mapping[str, np.ndarray]
Outputs: TypeAlias = str | Sequence[str] | None
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Errors


class InferenceError(Exception):
    """A failed call or a failed batch. `code`: a grpc.StatusCode name ("UNAVAILABLE", ...);
    `index`: the batch's position in a stream; `attempts`: how many times it was sent."""

    def __init__(
        self, code: str, message: str, *, index: int | None = None, attempts: int = 1
    ) -> None:
        where = f"batch {index}: " if index is not None else ""
        super().__init__(f"{where}[{code}] {message}")
        self.code = code
        self.message = message
        self.index = index
        self.attempts = attempts

    def at(self, index: int) -> InferenceError:
        """The same error attributed to stream batch `index`."""
        return InferenceError(self.code, self.message, index=index, attempts=self.attempts)


# How gRPC words a lost connection. When a server dies under a call or stream the status is
# usually UNAVAILABLE, but depending on what the transport saw first it can be INTERNAL (e.g. a
# reset HTTP/2 stream): that is the same event, a dead server, and is retried like UNAVAILABLE.
_LOST_CONNECTION_WORDS = (
    "rst_stream",
    "socket closed",
    "connection reset",
    "broken pipe",
    "stream removed",
    "goaway",
    "connection refused",
    "endpoint",
    "transport",
    # grpcio's own words when a write on a stream whose connection just broke fails inside the
    # core (measured: SIGKILL of the server under a stream, 4 times in 12). A server's INTERNAL
    # status carries the server's message, never this one.
    "internal error from core",
)


def status_name(code: str, details: str) -> str:
    """The status name to act on for a failed call: `code`, except that INTERNAL or UNKNOWN
    worded as a lost connection is UNAVAILABLE (the server is gone: retry elsewhere)."""
    if code in ("INTERNAL", "UNKNOWN"):
        lowered = details.lower()
        if any(w in lowered for w in _LOST_CONNECTION_WORDS):
            return "UNAVAILABLE"
    return code


def _rpc_error(exc: grpc.RpcError, attempts: int = 1) -> InferenceError:
    """The one place a gRPC error becomes an InferenceError (sync and aio errors alike)."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return InferenceError(status_name(name, details or ""), details or str(exc), attempts=attempts)


def _batch_error(exc: Exception) -> InferenceError:
    """Why one stream batch could not be turned into a request."""
    if isinstance(exc, InferenceError):
        return exc
    return InferenceError("INVALID_ARGUMENT", f"batch could not be encoded: {exc!r}")


_STREAM_ERROR = re.compile(r"\[([A-Z_]+)\] (.*)", re.DOTALL)


def _stream_error(text: str, index: int) -> InferenceError:
    """An in-band ModelStreamInfer error ("[INVALID_ARGUMENT] ...") as an InferenceError."""
    m = _STREAM_ERROR.fullmatch(text)
    if m and m.group(1) in grpc.StatusCode.__members__:
        return InferenceError(m.group(1), m.group(2), index=index)
    return InferenceError("UNKNOWN", text, index=index)


# --------------------------------------------------------------------------------------------
# Encoding and decoding


def _wire(name: str, value: Any) -> tuple[str, np.ndarray]:
    arr = np.asarray(value)
    little = arr.dtype.newbyteorder("<") if arr.dtype.kind in "biuf" else arr.dtype
    datatype = _TO_DATATYPE.get(little)
    if datatype is None:
        raise InferenceError(
            "INVALID_ARGUMENT",
            f"input '{name}' has dtype {arr.dtype}; supported: "
            + ", ".join(str(d) for d in DATATYPES.values()),
        )
    if arr.dtype != little:
        arr = arr.astype(little)  # big-endian input: the wire is little-endian
    return datatype, arr


def _encode(
    model: str,
    inputs: Mapping[str, Any],
    version: str | None,
    outputs: Outputs,
    request_id: str | None,
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version or "", id=request_id or "")
    raws = []
    for name, value in inputs.items():
        datatype, arr = _wire(name, value)
        tensor = req.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(arr.shape)
        raws.append(arr.tobytes())  # C order, whatever the array's strides
    req.raw_input_contents.extend(raws)
    for out in [outputs] if isinstance(outputs, str) else outputs or ():
        req.outputs.add(name=out)
    return req


def _decode(resp: pb.ModelInferResponse, outputs: Outputs) -> InferResult:
    raws = resp.raw_output_contents
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(resp.outputs):
        name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise InferenceError(
                "UNIMPLEMENTED", f"output '{name}' has datatype {datatype}, not decodable here"
            )
        if raws:
            if i >= len(raws):
                raise InferenceError("INTERNAL", f"response has no raw data for output '{name}'")
            arr = np.frombuffer(raws[i], dtype)
        elif datatype in _CONTENTS_MEMBER:
            arr = np.array(getattr(tensor.contents, _CONTENTS_MEMBER[datatype]), dtype)
        else:
            raise InferenceError("INTERNAL", f"output '{name}' ({datatype}) came without data")
        if arr.size != int(np.prod(shape)):
            raise InferenceError(
                "INTERNAL", f"output '{name}': {arr.size} values for shape {list(shape)}"
            )
        arrays[name] = arr.reshape(shape)
    if isinstance(outputs, str):
        return arrays[outputs]
    if outputs is None and len(arrays) == 1:
        return next(iter(arrays.values()))
    return arrays


def _to_dict(msg: Message) -> dict[str, Any]:
    """A message as plain Python: int64 stay ints (json_format would make them strings), enums
    become their names, unset sub-messages and unselected oneof members are left out."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        oneof = f.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != f.name:
            continue
        value = getattr(msg, f.name)
        mt = f.message_type
        if mt is not None and mt.GetOptions().map_entry:
            vf = mt.fields_by_name["value"]
            out[f.name] = {k: _scalar(vf, v) for k, v in value.items()}
        elif f.is_repeated:
            out[f.name] = [_scalar(f, v) for v in value]
        elif mt is not None and not msg.HasField(f.name):
            continue
        else:
            out[f.name] = _scalar(f, value)
    return out


def _scalar(f: Any, value: Any) -> Any:
    if f.message_type is not None:
        return _to_dict(value)
    if f.enum_type is not None:
        v = f.enum_type.values_by_number.get(value)
        return v.name if v is not None else value
    return value


def _metadata_dict(resp: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(ts: Iterable[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {
        "name": resp.name,
        "versions": list(resp.versions),
        "platform": resp.platform,
        "inputs": tensors(resp.inputs),
        "outputs": tensors(resp.outputs),
    }


def _single_input(model: str, meta: Mapping[str, Any]) -> str:
    names = [t["name"] for t in meta["inputs"]]
    if len(names) != 1:
        raise InferenceError(
            "INVALID_ARGUMENT",
            f"model '{model}' has inputs {names}: pass a dict of input name -> array",
        )
    return str(names[0])


# --------------------------------------------------------------------------------------------
# Channel


@dataclass(frozen=True, kw_only=True, slots=True)
class TLSConfig:
    """TLS for the channel: `ca` verifies the server (system roots when None); `cert` and `key`
    together are the client's identity for mutual TLS; `server_name` overrides the name checked
    against the server's certificate (needed with IP targets or several targets)."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: give both cert and key (mutual TLS) or neither")

        def read(p: str | Path | None) -> bytes | None:
            return None if p is None else Path(p).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _split_hostport(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not HOST:PORT")
    return host.strip("[]"), port


def _channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one or several HOST:PORT. Several become an ipv4:/ipv6: address
    list, which round_robin spreads requests over (hostnames are resolved here, once)."""
    if isinstance(target, str):
        return target
    targets = list(target)
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    v4: list[str] = []
    v6: list[str] = []
    for t in targets:
        host, port = _split_hostport(t)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
            v4.extend(f"{info[4][0]}:{port}" for info in infos)
            continue
        if ip.version == 4:
            v4.append(f"{ip}:{port}")
        else:
            v6.append(f"[{ip}]:{port}")
    if v4 and v6:
        raise ValueError("targets mix IPv4 and IPv6 addresses; gRPC needs one family per list")
    return "ipv4:" + ",".join(dict.fromkeys(v4)) if v4 else "ipv6:" + ",".join(v6)


def _channel_options(tls: TLSConfig | None, max_message_bytes: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        # gRPC's own reconnect backoff starts at 1 s and grows to 120 s; while it waits, calls
        # fail fast with UNAVAILABLE, so our short retries would never see a restarted server.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


@dataclass(frozen=True, slots=True)
class _Retry:
    retries: int
    backoff: float
    max_backoff: float

    def pause(self, err: InferenceError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: do not retry."""
        if err.code != "UNAVAILABLE" or attempt > self.retries:
            return None
        # Full jitter: uniform over [0, exponential cap] spreads clients that failed together.
        pause = random.uniform(0.0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        if deadline is not None and time.monotonic() + pause >= deadline:
            return None
        return pause


def _remaining(deadline: float | None, attempts: int) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise InferenceError("DEADLINE_EXCEEDED", "deadline exceeded", attempts=attempts)
    return left


class _Base:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: TLSConfig | None,
        token: str | None,
        timeout: float | None,
        retries: int,
        backoff: float,
        max_backoff: float,
        max_message_bytes: int,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.target = _channel_target(target)
        self.timeout = timeout
        self._tls = tls
        self._options = _channel_options(tls, max_message_bytes)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._retry = _Retry(retries, backoff, max_backoff)
        # (model, version) -> the single input's name, for infer() with a bare array.
        self._input_names: dict[tuple[str, str], str] = {}

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _forget(self, model: str, version: str | None, err: InferenceError) -> None:
        # The model may have been reloaded with another signature: ask again next time.
        if err.code in ("INVALID_ARGUMENT", "NOT_FOUND"):
            self._input_names.pop((model, version or ""), None)


# --------------------------------------------------------------------------------------------
# Streams: the reorder state shared by the blocking and the asyncio stream


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one stream batch: `value` or `error`; `latency` is seconds from handing
    the request to gRPC to reading its response (0 for a batch refused before sending)."""

    index: int
    value: InferResult | None
    error: InferenceError | None
    latency: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def result(self) -> InferResult:
        """The value, or raise the batch's InferenceError."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class _End:
    """Marks the end of a stream's outcomes."""


_END = _End()


@dataclass
class _Reorder:
    """Which batches were taken, sent, answered; no locking here (the owner locks)."""

    window: int
    outputs: Outputs
    taken: int = 0  # batches taken from the iterable (indexes 0..taken-1 assigned)
    held: int = 0  # slots held: taken and not yet handed to the caller
    max_held: int = 0
    max_answered: int = -1  # the highest index answered so far
    out_of_order: int = 0  # responses that arrived after a later batch's response
    next_index: int = 0  # the next batch to hand to the caller
    done_taking: bool = False  # the iterable is exhausted (or raised)
    finished: bool = False  # the RPC is over
    closed: bool = False
    owed: bool = False  # the caller holds a result whose slot is released on its next call
    broken: InferenceError | None = None  # why the RPC ended, when it failed
    source_error: BaseException | None = None  # the batches iterable raised this
    outcomes: dict[int, StreamResult] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)

    def can_take(self) -> bool:
        return self.held < self.window or self.finished or self.closed

    def stop_taking(self) -> bool:
        return self.finished or self.closed

    def take_slot(self) -> int:
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        return self.taken

    def untake(self, source_error: BaseException | None = None) -> None:
        self.held -= 1
        self.done_taking = True
        self.source_error = source_error

    def refused(self, index: int, err: InferenceError) -> None:
        self.taken += 1
        self.outcomes[index] = StreamResult(index, None, err.at(index))

    def sending(self, index: int) -> None:
        self.taken += 1
        self.sent_at[index] = time.perf_counter()

    def on_response(self, msg: pb.ModelStreamInferResponse) -> None:
        resp = msg.infer_response
        try:
            index = int(resp.id)
        except ValueError:
            index = -1
        started = self.sent_at.pop(index, None)
        if started is None:
            # Not one of ours (or answered twice): nothing can be matched any more.
            self.broken = InferenceError(
                "INTERNAL", f"stream response with unknown id {resp.id!r}: {msg.error_message}"
            )
            return
        latency = time.perf_counter() - started
        if index < self.max_answered:
            self.out_of_order += 1
        self.max_answered = max(self.max_answered, index)
        if msg.error_message:
            outcome = StreamResult(index, None, _stream_error(msg.error_message, index), latency)
        else:
            try:
                outcome = StreamResult(index, _decode(resp, self.outputs), None, latency)
            except InferenceError as err:
                outcome = StreamResult(index, None, err.at(index), latency)
        self.outcomes[index] = outcome

    def on_end(self, err: InferenceError | None) -> None:
        self.finished = True
        if err is not None and self.broken is None:
            self.broken = err

    def release(self) -> bool:
        """The caller came back for another result: free the slot of the one it got."""
        if self.owed:
            self.owed = False
            self.held -= 1
            return True
        return False

    def next(self) -> StreamResult | _End | None:
        """The next outcome in order, _END, or None (wait)."""
        if self.closed:
            return _END
        i = self.next_index
        outcome = self.outcomes.pop(i, None)
        if outcome is None and i < self.taken and self.finished:
            # Sent, and the RPC is over: this batch will never be answered.
            err = self.broken or InferenceError(
                "UNKNOWN", "the stream ended without answering this batch"
            )
            started = self.sent_at.pop(i, None)
            latency = 0.0 if started is None else time.perf_counter() - started
            outcome = StreamResult(i, None, err.at(i), latency)
        if outcome is not None:
            self.next_index += 1
            self.owed = True
            return outcome
        if i >= self.taken and (self.done_taking or self.finished):
            if self.finished and not self.done_taking and self.broken is not None:
                # The RPC failed with batches still to send: say so once, at the position of
                # the first batch that will not be sent, rather than end as if all went well.
                self.done_taking = True
                self.next_index += 1
                return StreamResult(i, None, self.broken.at(i))
            return _END
        return None


class InferStream:
    """A running ModelStreamInfer call (blocking). Iterate for results in order; see the module
    docstring for the error semantics. Close it (or use `with`) to cancel early."""

    def __init__(
        self,
        client: InferenceClient,
        model: str,
        batches: Iterable[Inputs],
        *,
        window: int,
        version: str | None,
        outputs: Outputs,
        timeout: float | None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._client = client
        self._model, self._version, self._outputs = model, version, outputs
        self._batches = iter(batches)
        self._state = _Reorder(window, outputs)
        self._cond = threading.Condition()
        self._call = client._stub.ModelStreamInfer(
            self._requests(), timeout=timeout, metadata=client._metadata
        )
        self._reader = threading.Thread(
            target=self._read, name="bnserve-stream-reader", daemon=True
        )
        self._reader.start()

    @property
    def max_in_flight(self) -> int:
        """The most batches outstanding at once so far (never above `window`)."""
        return self._state.max_held

    @property
    def out_of_order(self) -> int:
        """How many responses arrived after a later batch's (and were put back in order)."""
        return self._state.out_of_order

    def _requests(self) -> Iterator[pb.ModelInferRequest]:
        # Runs on gRPC's request-consuming thread.
        s, cond = self._state, self._cond
        while True:
            with cond:
                while not s.can_take():
                    cond.wait()
                if s.stop_taking():
                    cond.notify_all()
                    return
                index = s.take_slot()
            try:
                batch = next(self._batches)
            except StopIteration:
                with cond:
                    s.untake()
                    cond.notify_all()
                return
            except BaseException as exc:  # the caller's iterable failed: report it to them
                with cond:
                    s.untake(exc)
                    cond.notify_all()
                return
            try:
                req = self._client._request(
                    self._model, batch, self._version, self._outputs, str(index)
                )
            except Exception as exc:  # raised here, it would only cancel the call silently
                err = _batch_error(exc)
                with cond:
                    s.refused(index, err)
                    cond.notify_all()
                continue
            with cond:
                s.sending(index)
            yield req

    def _read(self) -> None:
        s, cond = self._state, self._cond
        end: InferenceError | None = None
        try:
            for msg in self._call:
                with cond:
                    s.on_response(msg)
                    cond.notify_all()
        except grpc.RpcError as exc:
            end = _rpc_error(exc)
        with cond:
            s.on_end(end)
            cond.notify_all()

    def next_result(self) -> StreamResult:
        """The next batch's outcome (never raises for one batch); StopIteration at the end."""
        s, cond = self._state, self._cond
        with cond:
            if s.release():
                cond.notify_all()
            while (outcome := s.next()) is None:
                cond.wait()
            if isinstance(outcome, _End):
                if s.source_error is not None:
                    exc, s.source_error = s.source_error, None
                    raise exc
                raise StopIteration
            return outcome

    def results(self) -> Iterator[StreamResult]:
        """Every batch's StreamResult in order; a failed batch does not raise."""
        while True:
            try:
                yield self.next_result()
            except StopIteration:
                return

    def __iter__(self) -> InferStream:
        return self

    def __next__(self) -> InferResult:
        return self.next_result().result()

    def close(self) -> None:
        """Cancel the call; batches not yet handed out are dropped."""
        with self._cond:
            self._state.closed = True
            self._cond.notify_all()
        self._call.cancel()

    def __enter__(self) -> InferStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Blocking client


class InferenceClient(_Base):
    """Blocking client. `target`: "HOST:PORT" (or any gRPC target), or several HOST:PORT for
    round_robin. `timeout`: seconds per call including retries (None: no deadline).
    `retries`: extra attempts after UNAVAILABLE; `backoff`/`max_backoff`: the jitter's base
    and cap, in seconds."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: TLSConfig | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(
            target,
            tls=tls,
            token=token,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_message_bytes=max_message_bytes,
        )
        if tls is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(
                self.target, tls.credentials(), options=self._options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._streams: weakref.WeakSet[InferStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _call(self, method: Callable[..., _T], request: Message, *, retry: bool = True) -> _T:
        deadline = self._deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(
                    request, timeout=_remaining(deadline, attempt), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                err = _rpc_error(exc, attempt)
                pause = self._retry.pause(err, attempt, deadline) if retry else None
                if pause is None:
                    raise err from None
                time.sleep(pause)

    def _input_name(self, model: str, version: str | None) -> str:
        key = (model, version or "")
        name = self._input_names.get(key)
        if name is None:
            name = self._input_names[key] = _single_input(model, self.metadata(model, version))
        return name

    def _request(
        self,
        model: str,
        inputs: Inputs,
        version: str | None,
        outputs: Outputs,
        request_id: str | None,
    ) -> pb.ModelInferRequest:
        if not isinstance(inputs, Mapping):
            inputs = {self._input_name(model, version): inputs}
        return _encode(model, inputs, version, outputs, request_id)

    def infer(
        self,
        model: str,
        inputs: Inputs,
        version: str | None = None,
        *,
        outputs: Outputs = None,
        request_id: str | None = None,
    ) -> InferResult:
        """One inference. `inputs`: an array (the model's only input) or name -> array.
        Returns the output array when `outputs` is a name or the model has one output, else
        name -> array (`outputs` a list of names: those, in that order)."""
        try:
            req = self._request(model, inputs, version, outputs, request_id)
            resp = self._call(self._stub.ModelInfer, req)
        except InferenceError as err:
            self._forget(model, version, err)
            raise
        return _decode(resp, outputs)

    def stream(
        self,
        model: str,
        batches: Iterable[Inputs],
        *,
        window: int = 16,
        version: str | None = None,
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> InferStream:
        """Bidirectional ModelStreamInfer: results in the order of `batches`, at most `window`
        outstanding. `timeout`: a deadline for the whole stream (default none)."""
        s = InferStream(
            self, model, batches, window=window, version=version, outputs=outputs, timeout=timeout
        )
        with self._lock:
            self._streams.add(s)
        return s

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """{"name", "versions", "platform", "inputs", "outputs"}; tensors as {"name",
        "datatype", "shape"} with -1 for free dimensions."""
        req = pb.ModelMetadataRequest(name=model, version=version or "")
        return _metadata_dict(self._call(self._stub.ModelMetadata, req))

    def config(self, model: str, version: str | None = None) -> dict[str, Any]:
        """Triton's ModelConfig as a dict (field names as in the proto)."""
        req = pb.ModelConfigRequest(name=model, version=version or "")
        return _to_dict(self._call(self._stub.ModelConfig, req).config)

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """Server (or model) readiness, as a probe: no retries, unreachable -> False."""
        try:
            if model is None:
                return bool(
                    self._call(self._stub.ServerReady, pb.ServerReadyRequest(), retry=False).ready
                )
            req = pb.ModelReadyRequest(name=model, version=version or "")
            return bool(self._call(self._stub.ModelReady, req, retry=False).ready)
        except InferenceError as err:
            if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"):
                return False
            raise

    def live(self) -> bool:
        """Server liveness, as a probe: no retries, unreachable -> False."""
        try:
            return bool(self._call(self._stub.ServerLive, pb.ServerLiveRequest(), retry=False).live)
        except InferenceError as err:
            if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                return False
            raise

    def close(self) -> None:
        """Cancel open streams and close the channel."""
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            s.close()
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# asyncio client


class AsyncInferStream:
    """A running ModelStreamInfer call (asyncio): `async for` gives results in order, with the
    same semantics as InferStream. Starts on the first `__anext__`."""

    def __init__(
        self,
        client: AsyncInferenceClient,
        model: str,
        batches: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        window: int,
        version: str | None,
        outputs: Outputs,
        timeout: float | None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._client = client
        self._model, self._version, self._outputs = model, version, outputs
        self._batches = batches
        self._timeout = timeout
        self._state = _Reorder(window, outputs)
        self._cond: asyncio.Condition | None = None
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def max_in_flight(self) -> int:
        return self._state.max_held

    @property
    def out_of_order(self) -> int:
        """How many responses arrived after a later batch's (and were put back in order)."""
        return self._state.out_of_order

    def _start(self) -> asyncio.Condition:
        self._cond = asyncio.Condition()
        self._call = self._client._stub.ModelStreamInfer(
            timeout=self._timeout, metadata=self._client._metadata
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write()), loop.create_task(self._read())]
        return self._cond

    async def _next_batch(self, it: Iterator[Inputs] | AsyncIterator[Inputs]) -> Inputs:
        if isinstance(it, AsyncIterator):
            return await it.__anext__()
        try:
            return next(it)
        except StopIteration:
            raise StopAsyncIteration from None

    async def _write(self) -> None:
        s, cond, call = self._state, self._cond, self._call
        assert cond is not None
        b = self._batches
        it: Iterator[Inputs] | AsyncIterator[Inputs] = (
            b.__aiter__() if isinstance(b, AsyncIterable) else iter(b)
        )
        try:
            while True:
                async with cond:
                    await cond.wait_for(s.can_take)
                    if s.stop_taking():
                        cond.notify_all()
                        return
                    index = s.take_slot()
                try:
                    batch = await self._next_batch(it)
                except StopAsyncIteration:
                    async with cond:
                        s.untake()
                        cond.notify_all()
                    break
                except Exception as exc:  # the caller's iterable failed: report it to them
                    async with cond:
                        s.untake(exc)
                        cond.notify_all()
                    break
                try:
                    req = await self._client._request(
                        self._model, batch, self._version, self._outputs, str(index)
                    )
                except Exception as exc:
                    err = _batch_error(exc)
                    async with cond:
                        s.refused(index, err)
                        cond.notify_all()
                    continue
                s.sending(index)
                await call.write(req)
            await call.done_writing()
        except Exception as exc:
            if call.done():
                return  # writing to a call that already ended: the reader reports why
            # Anything else would leave the call open with nobody writing: end it, say why.
            s.on_end(InferenceError("INTERNAL", f"stream writer failed: {exc!r}"))
            call.cancel()

    async def _read(self) -> None:
        s, cond, call = self._state, self._cond, self._call
        assert cond is not None
        end: InferenceError | None = None
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                async with cond:
                    s.on_response(msg)
                    cond.notify_all()
        except grpc.RpcError as exc:
            end = _rpc_error(exc)
        except asyncio.CancelledError:
            s.on_end(InferenceError("CANCELLED", "stream cancelled"))
            raise
        async with cond:
            s.on_end(end)
            cond.notify_all()

    async def next_result(self) -> StreamResult:
        """The next batch's outcome (never raises for one batch); StopAsyncIteration at the end."""
        cond = self._cond or self._start()
        s = self._state
        async with cond:
            if s.release():
                cond.notify_all()
            while (outcome := s.next()) is None:
                await cond.wait()
            if isinstance(outcome, _End):
                if s.source_error is not None:
                    exc, s.source_error = s.source_error, None
                    raise exc
                raise StopAsyncIteration
            return outcome

    async def results(self) -> AsyncIterator[StreamResult]:
        """Every batch's StreamResult in order; a failed batch does not raise."""
        while True:
            try:
                yield await self.next_result()
            except StopAsyncIteration:
                return

    def __aiter__(self) -> AsyncInferStream:
        return self

    async def __anext__(self) -> InferResult:
        return (await self.next_result()).result()

    async def aclose(self) -> None:
        """Cancel the call; batches not yet handed out are dropped."""
        self._state.closed = True
        if self._call is not None:
            self._call.cancel()
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncInferStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncInferenceClient(_Base):
    """asyncio client over grpc.aio, with InferenceClient's methods as coroutines (`stream`
    returns an async iterator). Create it inside the event loop that uses it."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: TLSConfig | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(
            target,
            tls=tls,
            token=token,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_message_bytes=max_message_bytes,
        )
        if tls is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, tls.credentials(), options=self._options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._streams: weakref.WeakSet[AsyncInferStream] = weakref.WeakSet()

    async def _call(
        self, method: Callable[..., Awaitable[_T]], request: Message, *, retry: bool = True
    ) -> _T:
        deadline = self._deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(
                    request, timeout=_remaining(deadline, attempt), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                err = _rpc_error(exc, attempt)
                pause = self._retry.pause(err, attempt, deadline) if retry else None
                if pause is None:
                    raise err from None
                await asyncio.sleep(pause)

    async def _input_name(self, model: str, version: str | None) -> str:
        key = (model, version or "")
        name = self._input_names.get(key)
        if name is None:
            meta = await self.metadata(model, version)
            name = self._input_names[key] = _single_input(model, meta)
        return name

    async def _request(
        self,
        model: str,
        inputs: Inputs,
        version: str | None,
        outputs: Outputs,
        request_id: str | None,
    ) -> pb.ModelInferRequest:
        if not isinstance(inputs, Mapping):
            inputs = {await self._input_name(model, version): inputs}
        return _encode(model, inputs, version, outputs, request_id)

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        version: str | None = None,
        *,
        outputs: Outputs = None,
        request_id: str | None = None,
    ) -> InferResult:
        """See InferenceClient.infer."""
        try:
            req = await self._request(model, inputs, version, outputs, request_id)
            resp = await self._call(self._stub.ModelInfer, req)
        except InferenceError as err:
            self._forget(model, version, err)
            raise
        return _decode(resp, outputs)

    def stream(
        self,
        model: str,
        batches: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        window: int = 16,
        version: str | None = None,
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> AsyncInferStream:
        """See InferenceClient.stream; `batches` may also be an async iterable."""
        s = AsyncInferStream(
            self, model, batches, window=window, version=version, outputs=outputs, timeout=timeout
        )
        self._streams.add(s)
        return s

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        req = pb.ModelMetadataRequest(name=model, version=version or "")
        return _metadata_dict(await self._call(self._stub.ModelMetadata, req))

    async def config(self, model: str, version: str | None = None) -> dict[str, Any]:
        req = pb.ModelConfigRequest(name=model, version=version or "")
        return _to_dict((await self._call(self._stub.ModelConfig, req)).config)

    async def ready(self, model: str | None = None, version: str | None = None) -> bool:
        try:
            if model is None:
                resp = await self._call(
                    self._stub.ServerReady, pb.ServerReadyRequest(), retry=False
                )
                return bool(resp.ready)
            req = pb.ModelReadyRequest(name=model, version=version or "")
            return bool((await self._call(self._stub.ModelReady, req, retry=False)).ready)
        except InferenceError as err:
            if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"):
                return False
            raise

    async def live(self) -> bool:
        try:
            resp = await self._call(self._stub.ServerLive, pb.ServerLiveRequest(), retry=False)
            return bool(resp.live)
        except InferenceError as err:
            if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                return False
            raise

    async def close(self) -> None:
        for s in list(self._streams):
            await s.aclose()
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
