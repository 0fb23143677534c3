"""Protobuf <-> numpy for the Open Inference Protocol: the one place (with the servicer) that
touches the generated message types.

Everything downstream (batcher, runner, repository) sees numpy arrays, `TensorSpec`s and plain
dataclasses. Decoding validates a request completely against the model's input specs and raises
`InvalidInputError` with a message that names the input, what was expected and what came.

Hot path notes: raw tensor data is decoded with `np.frombuffer(...).reshape(...)`, a read-only
view of the request's bytes (no copy). Specs are indexed once per spec tuple and cached, so pass
the model's specs as a tuple that lives as long as the model.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np

from bnserve.proto.datatypes import CONTENTS_FIELD
from bnserve.proto.inference_pb2 import (
    DataType,
    InferParameter,
    ModelConfig,
    ModelConfigResponse,
    ModelInferRequest,
    ModelInferResponse,
    ModelInstanceGroup,
    ModelMetadataResponse,
    ModelStreamInferResponse,
    ServerMetadataResponse,
)
from bnserve.server.errors import BnserveError, InvalidInputError
from bnserve.server.types import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec

__all__ = [
    "BACKEND",
    "MAX_TENSOR_BYTES",
    "PLATFORM",
    "DecodedRequest",
    "ParamValue",
    "config_data_type",
    "decode_request",
    "encode_response",
    "encode_stream_response",
    "model_config_response",
    "model_metadata_response",
    "server_metadata_response",
    "stream_error",
]

PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"

# No single tensor may claim more than this many bytes: larger shapes are refused before any
# multiplication can overflow or any allocation is attempted (gRPC messages cap at 2 GiB anyway).
MAX_TENSOR_BYTES: Final = 2**31 - 1

ParamValue = bool | int | str | float

# Typed-contents member carrying each datatype, its wire dtype, and the value range when the wire
# type is wider than the tensor's (INT8 travels as int32, UINT16 as uint32, ...).
_TYPED_FIELD: Final[dict[str, str]] = CONTENTS_FIELD
_TYPED_FIELDS: Final = tuple(sorted(set(_TYPED_FIELD.values())))
_WIRE_DTYPE: Final[dict[str, np.dtype]] = {
    "bool_contents": np.dtype(np.bool_),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
_NARROW: Final[frozenset[str]] = frozenset({"UINT8", "UINT16", "INT8", "INT16"})

# Open Inference Protocol datatype -> Triton model-config DataType name.
_CONFIG_TYPE: Final[dict[str, str]] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """A validated inference request in plain form.

    `arrays` maps each input name to its tensor (raw inputs are read-only views of the request
    bytes). `requested_outputs` is empty when the client asked for every output. `batch_size` is
    the common first dimension when the model batches, and 1 when it does not.
    """

    id: str
    arrays: dict[str, np.ndarray]
    requested_outputs: tuple[str, ...]
    batch_size: int
    parameters: Mapping[str, ParamValue]


_NO_PARAMETERS: Final[Mapping[str, ParamValue]] = MappingProxyType({})


# A frozen dataclass's __init__ pays object.__setattr__ per field; on the hot path we fill the
# slots directly through their descriptors, which is the same result at half the cost.
def _slot_setter(name: str) -> Callable[[DecodedRequest, object], None]:
    setter: Callable[[DecodedRequest, object], None] = DecodedRequest.__dict__[name].__set__
    return setter


_decoded_new = DecodedRequest.__new__
_set_id = _slot_setter("id")
_set_arrays = _slot_setter("arrays")
_set_requested = _slot_setter("requested_outputs")
_set_batch = _slot_setter("batch_size")
_set_parameters = _slot_setter("parameters")


def _decoded(
    id: str,
    arrays: dict[str, np.ndarray],
    requested: tuple[str, ...],
    batch_size: int,
    parameters: Mapping[str, ParamValue],
) -> DecodedRequest:
    obj = _decoded_new(DecodedRequest)
    _set_id(obj, id)
    _set_arrays(obj, arrays)
    _set_requested(obj, requested)
    _set_batch(obj, batch_size)
    _set_parameters(obj, parameters)
    return obj


# --- spec index ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Input:
    index: int
    spec: TensorSpec
    datatype: str
    dtype: np.dtype | None  # None for BYTES
    itemsize: int
    # Fast path: the spec's dims after the batch axis (batching) or all dims (not batching),
    # as a list to compare against the request's shape, when none of them is free (-1);
    # else None. `fixed_count` is their product.
    fixed: list[int] | None
    fixed_count: int


@dataclass(frozen=True, slots=True)
class _Schema:
    max_batch_size: int
    by_name: dict[str, _Input]
    names: str  # "'a', 'b'" for messages


# Keyed by id() of a spec tuple; the tuple itself is kept in the entry so the id stays unique
# while cached (tuples of frozen dataclasses cannot change).
_SCHEMAS: dict[int, tuple[tuple[TensorSpec, ...], _Schema]] = {}
_SCHEMA_CACHE_SIZE: Final = 256


def _build_schema(specs: Sequence[TensorSpec], max_batch_size: int) -> _Schema:
    by_name = {}
    for i, spec in enumerate(specs):
        dtype = None if spec.datatype == "BYTES" else V2_TO_NUMPY[spec.datatype]
        itemsize = 1 if dtype is None else dtype.itemsize
        if max_batch_size > 0 and not spec.shape:
            raise ValueError(f"input '{spec.name}' of a batching model has no batch axis")
        dims = list(spec.shape[1:] if max_batch_size > 0 else spec.shape)
        fixed_count = 1
        for d in dims:
            fixed_count *= d
        usable = (
            dtype is not None
            and all(d > 0 for d in dims)
            and fixed_count * max(max_batch_size, 1) * itemsize <= MAX_TENSOR_BYTES
        )
        by_name[spec.name] = _Input(
            i, spec, spec.datatype, dtype, itemsize, dims if usable else None, fixed_count
        )
    return _Schema(max_batch_size, by_name, ", ".join(repr(s.name) for s in specs))


def _schema(specs: Sequence[TensorSpec], max_batch_size: int) -> _Schema:
    if type(specs) is not tuple:
        return _build_schema(specs, max_batch_size)
    entry = _SCHEMAS.get(id(specs))
    if entry is not None and entry[0] is specs and entry[1].max_batch_size == max_batch_size:
        return entry[1]
    schema = _build_schema(specs, max_batch_size)
    if len(_SCHEMAS) >= _SCHEMA_CACHE_SIZE:
        _SCHEMAS.clear()
    _SCHEMAS[id(specs)] = (specs, schema)
    return schema


# --- decoding --------------------------------------------------------------------------------


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _param_value(p: InferParameter) -> ParamValue:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        return ""
    value: ParamValue = getattr(p, which)
    return value


def _parameters(req: ModelInferRequest) -> dict[str, ParamValue]:
    return {key: _param_value(p) for key, p in req.parameters.items()}


def _check_shape(
    name: str, shape: list[int], spec: TensorSpec, max_batch_size: int, itemsize: int
) -> int:
    """Validate `shape` against `spec`; return the element count."""
    expected = spec.shape
    if len(shape) != len(expected):
        raise InvalidInputError(
            f"input '{name}': expected rank {len(expected)} (shape {_fmt_shape(expected)}), "
            f"got rank {len(shape)} (shape {_fmt_shape(shape)})"
        )
    limit = MAX_TENSOR_BYTES // max(itemsize, 1)
    count = 1
    for axis, (dim, want) in enumerate(zip(shape, expected, strict=True)):
        if dim <= 0:
            raise InvalidInputError(
                f"input '{name}': dimension {axis} of shape {_fmt_shape(shape)} is {dim}; "
                "every dimension must be at least 1"
            )
        if axis == 0 and max_batch_size > 0:
            if dim > max_batch_size:
                raise InvalidInputError(
                    f"input '{name}': batch of {dim} rows exceeds max_batch_size {max_batch_size}"
                )
        elif want != -1 and dim != want:
            raise InvalidInputError(
                f"input '{name}': expected shape {_fmt_shape(expected)}, "
                f"got {_fmt_shape(shape)} (dimension {axis} is {dim}, expected {want})"
            )
        if dim > limit // count:
            raise InvalidInputError(
                f"input '{name}': shape {_fmt_shape(shape)} is too large "
                f"(more than {MAX_TENSOR_BYTES} bytes)"
            )
        count *= dim
    return count


def _decode_bytes_raw(name: str, raw: bytes, count: int) -> np.ndarray:
    """BYTES raw layout: per element a 4-byte little-endian length, then that many bytes."""
    out = np.empty(count, dtype=object)
    pos, size = 0, len(raw)
    for i in range(count):
        if pos + 4 > size:
            raise InvalidInputError(
                f"input '{name}': BYTES raw contents end after {i} of {count} elements"
            )
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > size:
            raise InvalidInputError(
                f"input '{name}': BYTES element {i} claims {length} bytes, only {size - pos} remain"
            )
        out[i] = raw[pos : pos + length]
        pos += length
    if pos != size:
        raise InvalidInputError(
            f"input '{name}': BYTES raw contents have {size - pos} bytes after {count} elements"
        )
    return out


def _decode_typed(
    name: str, tensor: ModelInferRequest.InferInputTensor, datatype: str, count: int
) -> np.ndarray:
    contents = tensor.contents
    member = _TYPED_FIELD.get(datatype)
    if member is None:  # FP16 (and BF16) have no typed member
        raise InvalidInputError(
            f"input '{name}': datatype {datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(contents, member)
    if len(values) != count:
        others = [f for f in _TYPED_FIELDS if f != member and len(getattr(contents, f))]
        if not values and others:
            raise InvalidInputError(
                f"input '{name}': datatype {datatype} takes its values in contents.{member}, "
                f"got contents.{others[0]}"
            )
        raise InvalidInputError(
            f"input '{name}': expected {count} values in contents.{member} for shape "
            f"{_fmt_shape(tensor.shape)}, got {len(values)}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    wire = _WIRE_DTYPE[member]
    arr = np.array(values, dtype=wire)
    if datatype in _NARROW:
        target = V2_TO_NUMPY[datatype]
        info = np.iinfo(target)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise InvalidInputError(
                f"input '{name}': values in contents.{member} out of range for {datatype} "
                f"[{info.min}, {info.max}]"
            )
        arr = arr.astype(target)
    return arr


def decode_request(
    req: ModelInferRequest,
    inputs: Sequence[TensorSpec],
    max_batch_size: int,
    *,
    outputs: Sequence[TensorSpec] | None = None,
) -> DecodedRequest:
    """Validate `req` against the model's input specs and turn it into numpy arrays.

    `inputs[i].shape` includes the batch axis (as -1) when `max_batch_size > 0`; with
    `max_batch_size == 0` shapes must match the spec exactly (-1 entries stay free). Pass the
    model's `outputs` to refuse unknown requested output names here (otherwise
    `encode_response` refuses them). Raises `InvalidInputError` on any mismatch.
    """
    schema = _schema(inputs, max_batch_size)
    tensors = req.inputs
    raw = req.raw_input_contents
    n_raw = len(raw)
    n_tensors = len(tensors)
    if n_raw and n_raw != n_tensors:
        raise InvalidInputError(
            f"request has {n_tensors} inputs but {n_raw} raw_input_contents entries; "
            "raw_input_contents needs exactly one entry per input, in order"
        )
    by_name = schema.by_name
    arrays: dict[str, np.ndarray] = {}
    batch_size = -1
    batch_from = ""
    # Indexing is cheaper than iterating a repeated field (no iterator wrapper).
    for i in range(n_tensors):
        tensor = tensors[i]
        name = tensor.name
        entry = by_name.get(name)
        if entry is None:
            raise InvalidInputError(
                f"unknown input '{name}'; this model's inputs are {schema.names}"
            )
        if name in arrays:
            raise InvalidInputError(f"input '{name}' appears more than once in the request")
        datatype = tensor.datatype
        if datatype != entry.datatype:
            _bad_datatype(name, datatype, entry.spec)
        shape = tensor.shape[:]
        # Fast path: fixed inner dims and a batch within bounds; anything else (including
        # every error) goes through the full check, which produces the message.
        fixed = entry.fixed
        if max_batch_size > 0:
            if (
                fixed is not None
                and shape
                and 0 < shape[0] <= max_batch_size
                and shape[1:] == fixed
            ):
                count = shape[0] * entry.fixed_count
            else:
                count = _check_shape(name, shape, entry.spec, max_batch_size, entry.itemsize)
            if batch_size < 0:
                batch_size, batch_from = shape[0], name
            elif shape[0] != batch_size:
                raise InvalidInputError(
                    f"inputs disagree on batch size: input '{name}' has {shape[0]} rows, "
                    f"input '{batch_from}' has {batch_size}"
                )
        elif fixed is not None and shape == fixed:
            count = entry.fixed_count
        else:
            count = _check_shape(name, shape, entry.spec, max_batch_size, entry.itemsize)
        if n_raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input '{name}' has typed contents while the request also carries "
                    "raw_input_contents; use one or the other for all inputs"
                )
            data = raw[i]
            dtype = entry.dtype
            if dtype is None:
                arr = _decode_bytes_raw(name, data, count).reshape(shape)
            else:
                nbytes = count * entry.itemsize
                if len(data) != nbytes:
                    raise InvalidInputError(
                        f"input '{name}': expected {nbytes} bytes for shape {_fmt_shape(shape)} "
                        f"and datatype {datatype}, got {len(data)}"
                    )
                arr = np.frombuffer(data, dtype).reshape(shape)
        elif tensor.HasField("contents"):
            arr = _decode_typed(name, tensor, datatype, count).reshape(shape)
        else:
            raise InvalidInputError(
                f"input '{name}' has no data: neither raw_input_contents nor contents"
            )
        arrays[name] = arr
    if len(arrays) != len(by_name):
        missing = [n for n in by_name if n not in arrays]
        raise InvalidInputError(
            f"missing input {', '.join(repr(m) for m in missing)}; "
            f"this model's inputs are {schema.names}"
        )
    requested: tuple[str, ...] = ()
    if len(req.outputs):
        requested = tuple(o.name for o in req.outputs)
        if outputs is not None:
            _check_requested(requested, outputs)
    return _decoded(
        req.id,
        arrays,
        requested,
        batch_size if max_batch_size > 0 else 1,
        _parameters(req) if len(req.parameters) else _NO_PARAMETERS,
    )


def _bad_datatype(name: str, datatype: str, spec: TensorSpec) -> None:
    if datatype == "BYTES":
        raise InvalidInputError(
            f"input '{name}': datatype BYTES is not supported by this model "
            f"(expected {spec.datatype})"
        )
    raise InvalidInputError(
        f"input '{name}': expected datatype {spec.datatype}, got {datatype or '(empty)'}"
    )


def _check_requested(requested: tuple[str, ...], specs: Sequence[TensorSpec]) -> None:
    known = {s.name for s in specs}
    seen: set[str] = set()
    for name in requested:
        if name not in known:
            raise InvalidInputError(
                f"unknown requested output '{name}'; this model's outputs are "
                + ", ".join(repr(s.name) for s in specs)
            )
        if name in seen:
            raise InvalidInputError(f"output '{name}' is requested more than once")
        seen.add(name)


# --- encoding --------------------------------------------------------------------------------


def _wire_datatype(name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """The protocol datatype of `arr`, and `arr` in little-endian byte order."""
    dt = arr.dtype
    if dt.kind == "O" or dt.kind == "S":
        return "BYTES", arr
    little = dt.newbyteorder("<")
    datatype = NUMPY_TO_V2.get(little)
    if datatype is None:
        raise BnserveError(f"output '{name}' has dtype {dt}, which the protocol cannot carry")
    return datatype, arr.astype(little)


def _bytes_raw(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _add_outputs(
    resp: ModelInferResponse,
    outputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    requested: tuple[str, ...],
) -> None:
    if requested:
        _check_requested(requested, specs)
        names: Sequence[str] = requested
    else:
        names = [s.name for s in specs]
    add = resp.outputs.add
    raws = []
    for name in names:
        arr = outputs.get(name)
        if arr is None:
            raise BnserveError(f"the model produced no output '{name}'")
        datatype = NUMPY_TO_V2.get(arr.dtype)
        if datatype is None:
            datatype, arr = _wire_datatype(name, arr)
        tensor = add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(arr.shape)
        raws.append(_bytes_raw(arr) if datatype == "BYTES" else arr.tobytes())
    resp.raw_output_contents.extend(raws)


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    requested: tuple[str, ...],
) -> ModelInferResponse:
    """Build the response for one request: `requested` outputs in that order, or every output
    in spec order when it is empty. Data goes in raw_output_contents (C-order little-endian
    bytes); datatype and shape come from each array. Unknown requested names raise
    `InvalidInputError`; an output missing from `outputs` is a server bug (`BnserveError`)."""
    resp = ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    _add_outputs(resp, outputs, specs, requested)
    return resp


def encode_stream_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    requested: tuple[str, ...],
) -> ModelStreamInferResponse:
    """`encode_response` wrapped for the ModelStreamInfer stream (empty error_message)."""
    msg = ModelStreamInferResponse()
    resp = msg.infer_response
    resp.model_name = model_name
    resp.model_version = model_version
    resp.id = request_id
    _add_outputs(resp, outputs, specs, requested)
    return msg


def stream_error(
    message: str, request_id: str = "", *, model_name: str = "", model_version: str = ""
) -> ModelStreamInferResponse:
    """An in-band error on the ModelStreamInfer stream. The request id (and model) ride in
    infer_response so a client can tell which request failed."""
    msg = ModelStreamInferResponse(error_message=message)
    inner = msg.infer_response
    inner.id = request_id
    inner.model_name = model_name
    inner.model_version = model_version
    return msg


# --- metadata and configuration --------------------------------------------------------------


def server_metadata_response(
    *, name: str, version: str, extensions: Sequence[str]
) -> ServerMetadataResponse:
    return ServerMetadataResponse(name=name, version=version, extensions=list(extensions))


def _tensor_metadata(
    specs: Sequence[TensorSpec],
) -> list[ModelMetadataResponse.TensorMetadata]:
    return [
        ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def model_metadata_response(
    *,
    name: str,
    versions: Sequence[str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    platform: str = PLATFORM,
) -> ModelMetadataResponse:
    """Model metadata: shapes as in the specs, batch axis (and free dims) as -1."""
    return ModelMetadataResponse(
        name=name,
        versions=list(versions),
        platform=platform,
        inputs=_tensor_metadata(inputs),
        outputs=_tensor_metadata(outputs),
    )


def config_data_type(datatype: str) -> int:
    """Triton's DataType enum value for a protocol datatype string ("FP32" -> TYPE_FP32)."""
    try:
        return int(DataType.Value(_CONFIG_TYPE[datatype]))
    except KeyError:
        raise ValueError(f"no model-config data type for datatype {datatype!r}") from None


def _config_dims(spec: TensorSpec, max_batch_size: int) -> tuple[int, ...]:
    if max_batch_size > 0:
        if not spec.shape:
            raise ValueError(f"tensor '{spec.name}' of a batching model has no batch axis")
        return spec.shape[1:]
    return spec.shape


def model_config_response(
    *,
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    max_queue_size: int = 0,
    dynamic_batching: bool = True,
    instance_count: int = 1,
    platform: str = PLATFORM,
    backend: str = BACKEND,
    default_model_filename: str = "model.onnx",
    decoupled: bool = False,
    parameters: Mapping[str, str] | None = None,
) -> ModelConfigResponse:
    """Triton's view of a model. With `max_batch_size > 0` the tensor dims leave out the batch
    axis (Triton's convention) and, if `dynamic_batching`, the batcher settings are included."""
    cfg = ModelConfig(
        name=name,
        platform=platform,
        backend=backend,
        max_batch_size=max_batch_size,
        default_model_filename=default_model_filename,
    )
    cfg.version_policy.latest.num_versions = 1
    for spec in inputs:
        cfg.input.add(
            name=spec.name,
            data_type=config_data_type(spec.datatype),
            dims=_config_dims(spec, max_batch_size),
        )
    for spec in outputs:
        cfg.output.add(
            name=spec.name,
            data_type=config_data_type(spec.datatype),
            dims=_config_dims(spec, max_batch_size),
        )
    cfg.instance_group.add(
        name=f"{name}_cpu", kind=ModelInstanceGroup.KIND_CPU, count=instance_count
    )
    if max_batch_size > 0 and dynamic_batching:
        db = cfg.dynamic_batching
        db.preferred_batch_size.extend(preferred_batch_sizes)
        db.max_queue_delay_microseconds = max_queue_delay_us
        if max_queue_size:
            db.default_queue_policy.max_queue_size = max_queue_size
    cfg.model_transaction_policy.decoupled = decoupled
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return ModelConfigResponse(config=cfg)
