"""server/codec.py: protobuf <-> numpy, every datatype both ways, and every refusal's message."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc._utils import _get_inference_request

from bnserve.proto import inference_pb2 as pb
from bnserve.server import codec
from bnserve.server.errors import BnserveError, InvalidInputError
from bnserve.server.types import V2_TO_NUMPY, TensorSpec

X = TensorSpec("x", "FP32", (-1, 4))
MASK = TensorSpec("mask", "INT64", (-1, 2))
Y = TensorSpec("y", "FP32", (-1, 3))
PROBS = TensorSpec("probs", "FP64", (-1, 3))
INPUTS = (X, MASK)
OUTPUTS = (Y, PROBS)

ALL_DATATYPES = sorted(V2_TO_NUMPY)
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Distinctive values that use the dtype's range (extremes included)."""
    dtype = V2_TO_NUMPY[datatype]
    n = int(np.prod(shape))
    if dtype.kind == "b":
        values = np.arange(n) % 3 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        values = np.array([lo + (hi - lo) * k // (n - 1) for k in range(n)], dtype=dtype)
    else:
        values = (np.arange(n, dtype=np.float64) - n / 2) * 1.25
    return np.asarray(values, dtype=dtype).reshape(shape)


def raw_request(
    arrays: dict[str, np.ndarray],
    *,
    datatypes: dict[str, str] | None = None,
    outputs: Sequence[str] = (),
    request_id: str = "req-1",
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", id=request_id)
    for name, arr in arrays.items():
        datatype = (datatypes or {}).get(name) or codec.NUMPY_TO_V2[arr.dtype]
        req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        req.raw_input_contents.append(arr.tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    # Parse from bytes, as the server receives it.
    return pb.ModelInferRequest.FromString(req.SerializeToString())


def typed_request(name: str, datatype: str, shape: Sequence[int], field: str, values: object):
    req = pb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return pb.ModelInferRequest.FromString(req.SerializeToString())


def good_arrays(batch: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(batch * 4, dtype=np.float32).reshape(batch, 4),
        "mask": np.ones((batch, 2), dtype=np.int64),
    }


def refused(req: pb.ModelInferRequest, *patterns: str, **kwargs: object) -> str:
    """Decode must raise InvalidInputError whose message contains every pattern (regex)."""
    specs = kwargs.pop("inputs", INPUTS)
    max_batch_size = kwargs.pop("max_batch_size", 64)
    with pytest.raises(InvalidInputError) as info:
        codec.decode_request(req, specs, max_batch_size, **kwargs)
    message = info.value.message
    assert info.value.status_code == "INVALID_ARGUMENT"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    spec = TensorSpec("t", datatype, (-1, 3, 2))
    original = sample(datatype, (4, 3, 2))
    req = raw_request({"t": original})
    decoded = codec.decode_request(req, (spec,), 8)
    got = decoded.arrays["t"]
    assert got.dtype == V2_TO_NUMPY[datatype]
    np.testing.assert_array_equal(got, original)
    assert decoded.batch_size == 4

    resp = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id=decoded.id,
        outputs={"t": got},
        specs=(spec,),
        requested=(),
    )
    parsed = pb.ModelInferResponse.FromString(resp.SerializeToString())
    out = parsed.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("t", datatype, [4, 3, 2])
    assert parsed.raw_output_contents[0] == original.tobytes()
    back = np.frombuffer(parsed.raw_output_contents[0], V2_TO_NUMPY[datatype]).reshape(4, 3, 2)
    np.testing.assert_array_equal(back, original)


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELD))
def test_typed_round_trip_every_datatype(datatype: str) -> None:
    spec = TensorSpec("t", datatype, (-1, 3))
    original = sample(datatype, (2, 3))
    req = typed_request("t", datatype, (2, 3), TYPED_FIELD[datatype], original.reshape(-1).tolist())
    decoded = codec.decode_request(req, (spec,), 8)
    got = decoded.arrays["t"]
    assert got.dtype == V2_TO_NUMPY[datatype]
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, original)


def test_fp16_has_no_typed_field() -> None:
    spec = TensorSpec("t", "FP16", (-1, 2))
    req = typed_request("t", "FP16", (1, 2), "fp32_contents", [1.0, 2.0])
    refused(req, "input 't'", "FP16", "raw_input_contents", inputs=(spec,))


def test_typed_narrow_integers_out_of_range_are_refused() -> None:
    spec = TensorSpec("t", "INT8", (-1, 2))
    req = typed_request("t", "INT8", (1, 2), "int_contents", [1, 300])
    refused(req, "input 't'", "out of range for INT8", r"\[-128, 127\]", inputs=(spec,))


def test_raw_decode_is_a_view_of_the_request_bytes() -> None:
    req = raw_request(good_arrays())
    decoded = codec.decode_request(req, INPUTS, 64)
    for arr in decoded.arrays.values():
        assert not arr.flags.owndata
        assert not arr.flags.writeable
        base = arr.base
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, bytes)
        assert np.shares_memory(arr, np.frombuffer(base, dtype=np.uint8))


def test_decoded_request_fields() -> None:
    req = raw_request(good_arrays(3), outputs=["probs"], request_id="abc")
    req.parameters["priority"].uint64_param = 2
    req.parameters["flag"].bool_param = True
    req.parameters["tag"].string_param = "t"
    req.parameters["scale"].double_param = 0.25
    req.parameters["timeout"].int64_param = -5
    decoded = codec.decode_request(req, INPUTS, 64, outputs=OUTPUTS)
    assert decoded.id == "abc"
    assert decoded.batch_size == 3
    assert decoded.requested_outputs == ("probs",)
    assert dict(decoded.parameters) == {
        "priority": 2,
        "flag": True,
        "tag": "t",
        "scale": 0.25,
        "timeout": -5,
    }
    assert set(decoded.arrays) == {"x", "mask"}
    with pytest.raises(AttributeError):
        setattr(decoded, "batch_size", 4)  # noqa: B010 (frozen: must raise)


def test_decode_accepts_specs_as_list_and_inputs_in_any_order() -> None:
    arrays = good_arrays()
    req = raw_request({"mask": arrays["mask"], "x": arrays["x"]})
    decoded = codec.decode_request(req, list(INPUTS), 64)
    np.testing.assert_array_equal(decoded.arrays["x"], arrays["x"])
    np.testing.assert_array_equal(decoded.arrays["mask"], arrays["mask"])


def test_free_inner_dimensions_accept_any_positive_size() -> None:
    spec = TensorSpec("seq", "FP32", (-1, -1, 2))
    for length in (1, 5):
        arr = np.zeros((2, length, 2), np.float32)
        decoded = codec.decode_request(raw_request({"seq": arr}), (spec,), 4)
        assert decoded.arrays["seq"].shape == (2, length, 2)


def test_non_batching_model_takes_exact_shapes() -> None:
    spec = TensorSpec("x", "FP32", (3, 4))
    arr = np.ones((3, 4), np.float32)
    decoded = codec.decode_request(raw_request({"x": arr}), (spec,), 0)
    assert decoded.batch_size == 1
    np.testing.assert_array_equal(decoded.arrays["x"], arr)
    # 2 rows would be a fine batch for a batching model, but not here.
    bad = raw_request({"x": np.ones((2, 4), np.float32)})
    refused(
        bad,
        "input 'x'",
        r"expected shape \[3, 4\]",
        r"got \[2, 4\]",
        inputs=(spec,),
        max_batch_size=0,
    )


def test_tritonclient_built_request_decodes() -> None:
    x = tg.InferInput("x", [5, 4], "FP32")
    x_data = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    x.set_data_from_numpy(x_data)
    mask = tg.InferInput("mask", [5, 2], "INT64")
    mask.set_data_from_numpy(np.arange(10, dtype=np.int64).reshape(5, 2))
    theirs = _get_inference_request(
        model_name="m",
        inputs=[x, mask],
        model_version="",
        request_id="tc-1",
        outputs=[tg.InferRequestedOutput("y")],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=3,
        timeout=1000,
        parameters=None,
    )
    assert isinstance(theirs, tpb.ModelInferRequest)
    req = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    decoded = codec.decode_request(req, INPUTS, 64, outputs=OUTPUTS)
    np.testing.assert_array_equal(decoded.arrays["x"], x_data)
    np.testing.assert_array_equal(decoded.arrays["mask"], np.arange(10).reshape(5, 2))
    assert decoded.id == "tc-1"
    assert decoded.batch_size == 5
    assert decoded.requested_outputs == ("y",)
    assert decoded.parameters["priority"] == 3
    assert decoded.parameters["timeout"] == 1000


def test_encoded_response_reads_back_with_tritonclient() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    probs = np.full((2, 3), 1 / 3, dtype=np.float64)
    ours = codec.encode_response(
        model_name="m",
        model_version="2",
        request_id="r9",
        outputs={"y": y, "probs": probs},
        specs=OUTPUTS,
        requested=(),
    )
    result = tg.InferResult(tpb.ModelInferResponse.FromString(ours.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("probs"), probs)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "r9")
    assert [o.name for o in response.outputs] == ["y", "probs"]


# --- encoding --------------------------------------------------------------------------------


def test_encode_requested_outputs_in_requested_order() -> None:
    outputs = {"y": np.zeros((1, 3), np.float32), "probs": np.ones((1, 3), np.float64)}
    resp = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id="",
        outputs=outputs,
        specs=OUTPUTS,
        requested=("probs",),
    )
    assert [o.name for o in resp.outputs] == ["probs"]
    assert resp.outputs[0].datatype == "FP64"
    assert len(resp.raw_output_contents) == 1
    assert resp.id == ""


def test_encode_makes_non_contiguous_and_big_endian_arrays_little_endian_c_order() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = base.T  # Fortran-ordered view
    big = np.arange(3, dtype=">f8").reshape(1, 3)
    resp = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs={"y": strided, "probs": big},
        specs=OUTPUTS,
        requested=(),
    )
    assert list(resp.outputs[0].shape) == [4, 3]
    assert resp.raw_output_contents[0] == np.ascontiguousarray(strided).tobytes()
    assert resp.outputs[1].datatype == "FP64"
    assert resp.raw_output_contents[1] == np.arange(3, dtype="<f8").tobytes()


def test_encode_unknown_requested_output_is_a_client_error() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown requested output 'nope'.*'y', 'probs'"):
        codec.encode_response(
            model_name="m",
            model_version="1",
            request_id="r",
            outputs={"y": np.zeros((1, 3), np.float32)},
            specs=OUTPUTS,
            requested=("nope",),
        )


def test_encode_missing_model_output_is_a_server_error() -> None:
    with pytest.raises(BnserveError, match="produced no output 'probs'") as info:
        codec.encode_response(
            model_name="m",
            model_version="1",
            request_id="r",
            outputs={"y": np.zeros((1, 3), np.float32)},
            specs=OUTPUTS,
            requested=(),
        )
    assert info.value.status_code == "INTERNAL"


def test_stream_response_and_stream_error() -> None:
    msg = codec.encode_stream_response(
        model_name="m",
        model_version="1",
        request_id="s1",
        outputs={"y": np.ones((1, 3), np.float32), "probs": np.ones((1, 3), np.float64)},
        specs=OUTPUTS,
        requested=("y",),
    )
    assert isinstance(msg, pb.ModelStreamInferResponse)
    assert msg.error_message == ""
    assert msg.infer_response.id == "s1"
    assert [o.name for o in msg.infer_response.outputs] == ["y"]

    err = codec.stream_error("batch of 70 rows exceeds max_batch_size 64", "s2", model_name="m")
    theirs = tpb.ModelStreamInferResponse.FromString(err.SerializeToString())
    assert theirs.error_message == "batch of 70 rows exceeds max_batch_size 64"
    assert theirs.infer_response.id == "s2"
    assert theirs.infer_response.model_name == "m"


# --- metadata and configuration --------------------------------------------------------------


def test_server_metadata_response() -> None:
    resp = codec.server_metadata_response(
        name="bnserve", version="0.1.0", extensions=["model_configuration", "statistics"]
    )
    assert (resp.name, resp.version) == ("bnserve", "0.1.0")
    assert list(resp.extensions) == ["model_configuration", "statistics"]


def test_model_metadata_response() -> None:
    resp = codec.model_metadata_response(name="bn", versions=["1"], inputs=INPUTS, outputs=OUTPUTS)
    assert resp.platform == "onnxruntime_onnx"
    assert list(resp.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in resp.inputs] == [
        ("x", "FP32", [-1, 4]),
        ("mask", "INT64", [-1, 2]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in resp.outputs] == [
        ("y", "FP32", [-1, 3]),
        ("probs", "FP64", [-1, 3]),
    ]


def test_model_config_response_batching_model() -> None:
    resp = codec.model_config_response(
        name="bn",
        inputs=INPUTS,
        outputs=OUTPUTS,
        max_batch_size=64,
        preferred_batch_sizes=[16, 32],
        max_queue_delay_us=500,
        instance_count=2,
    )
    # tritonclient parses it, and the dims leave out the batch axis (Triton's convention).
    cfg = tpb.ModelConfigResponse.FromString(resp.SerializeToString()).config
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == (
        "bn",
        "onnxruntime_onnx",
        "onnxruntime",
        64,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("x", tpb.model__config__pb2.TYPE_FP32, [4]),
        ("mask", tpb.model__config__pb2.TYPE_INT64, [2]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        ("y", tpb.model__config__pb2.TYPE_FP32, [3]),
        ("probs", tpb.model__config__pb2.TYPE_FP64, [3]),
    ]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == tpb.model__config__pb2.ModelInstanceGroup.KIND_CPU
    assert not cfg.model_transaction_policy.decoupled


def test_model_config_response_non_batching_model() -> None:
    spec = TensorSpec("x", "FP16", (3, 4))
    resp = codec.model_config_response(name="nb", inputs=(spec,), outputs=(spec,), max_batch_size=0)
    cfg = resp.config
    assert cfg.max_batch_size == 0
    assert list(cfg.input[0].dims) == [3, 4]
    assert cfg.input[0].data_type == pb.TYPE_FP16
    assert not cfg.HasField("dynamic_batching")


@pytest.mark.parametrize(
    ("datatype", "enum_name"),
    [
        ("BOOL", "TYPE_BOOL"),
        ("UINT8", "TYPE_UINT8"),
        ("FP32", "TYPE_FP32"),
        ("BYTES", "TYPE_STRING"),
    ],
)
def test_config_data_type(datatype: str, enum_name: str) -> None:
    assert codec.config_data_type(datatype) == pb.DataType.Value(enum_name)


def test_config_data_type_unknown() -> None:
    with pytest.raises(ValueError, match="FLOAT"):
        codec.config_data_type("FLOAT")


# --- refusals --------------------------------------------------------------------------------


def test_unknown_input_name_lists_expected_names() -> None:
    arrays = good_arrays()
    arrays["extra"] = np.zeros((2, 1), np.float32)
    refused(raw_request(arrays), "unknown input 'extra'", "'x', 'mask'")


def test_missing_input() -> None:
    req = raw_request({"x": good_arrays()["x"]})
    refused(req, "missing input 'mask'", "'x', 'mask'")


def test_duplicate_input() -> None:
    arrays = good_arrays()
    req = pb.ModelInferRequest()
    for _ in range(2):
        req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
        req.raw_input_contents.append(arrays["x"].tobytes())
    refused(req, "input 'x' appears more than once")


def test_wrong_datatype() -> None:
    req = raw_request(good_arrays(), datatypes={"x": "FP64"})
    refused(req, "input 'x'", "expected datatype FP32", "got FP64")


def test_unknown_datatype_string() -> None:
    req = raw_request(good_arrays(), datatypes={"x": "FLOAT"})
    refused(req, "input 'x'", "expected datatype FP32", "got FLOAT")


def test_bytes_datatype_not_supported_by_this_model() -> None:
    req = raw_request(good_arrays(), datatypes={"x": "BYTES"})
    refused(req, "input 'x'", "BYTES is not supported by this model", "FP32")


def test_bytes_input_decodes_when_the_spec_has_it() -> None:
    spec = TensorSpec("s", "BYTES", (-1,))
    items = [b"ab", b"", b"\x00xyz"]
    raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
    req = pb.ModelInferRequest()
    req.inputs.add(name="s", datatype="BYTES", shape=[3])
    req.raw_input_contents.append(raw)
    decoded = codec.decode_request(req, (spec,), 4)
    assert decoded.arrays["s"].tolist() == items
    typed = typed_request("s", "BYTES", (3,), "bytes_contents", items)
    assert codec.decode_request(typed, (spec,), 4).arrays["s"].tolist() == items
    req.raw_input_contents[0] = raw[:-1]
    refused(req, "input 's'", "BYTES element 2 claims 4 bytes", inputs=(spec,), max_batch_size=4)


def test_wrong_rank() -> None:
    arrays = good_arrays()
    arrays["x"] = arrays["x"].reshape(2, 2, 2)
    refused(raw_request(arrays), "input 'x'", r"expected rank 2 \(shape \[-1, 4\]\)", "got rank 3")


def test_scalar_shape_for_a_batched_input() -> None:
    req = raw_request(good_arrays())
    del req.inputs[0].shape[:]
    refused(req, "input 'x'", "expected rank 2", r"got rank 0 \(shape \[\]\)")


def test_wrong_inner_dimension() -> None:
    arrays = good_arrays()
    arrays["x"] = np.zeros((2, 5), np.float32)
    refused(
        raw_request(arrays),
        "input 'x'",
        r"expected shape \[-1, 4\]",
        r"got \[2, 5\]",
        "dimension 1 is 5, expected 4",
    )


@pytest.mark.parametrize("bad", [0, -3])
def test_zero_or_negative_dimension(bad: int) -> None:
    req = raw_request(good_arrays())
    req.inputs[0].shape[0] = bad
    refused(req, "input 'x'", f"dimension 0 of shape \\[{bad}, 4\\] is {bad}", "at least 1")


def test_absurd_dimensions_are_refused_before_multiplying() -> None:
    spec = TensorSpec("x", "FP32", (-1, -1, -1))
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2**40, 2**40])
    req.raw_input_contents.append(b"")
    refused(req, "input 'x'", "too large", inputs=(spec,), max_batch_size=4)


def test_byte_count_mismatch() -> None:
    req = raw_request(good_arrays())
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    refused(req, "input 'x'", r"expected 32 bytes for shape \[2, 4\] and datatype FP32", "got 28")


def test_raw_and_typed_contents_together() -> None:
    req = raw_request(good_arrays())
    req.inputs[1].contents.int64_contents.extend([1, 1, 1, 1])
    refused(req, "input 'mask'", "typed contents", "raw_input_contents")


def test_raw_input_contents_count_mismatch() -> None:
    req = raw_request(good_arrays())
    del req.raw_input_contents[1]
    refused(req, "2 inputs but 1 raw_input_contents")


def test_input_without_any_data() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    refused(req, "input 'x' has no data", inputs=(X,))


def test_typed_contents_count_mismatch() -> None:
    req = typed_request("x", "FP32", (2, 4), "fp32_contents", [1.0] * 7)
    refused(req, "input 'x'", "expected 8 values in contents.fp32_contents", "got 7", inputs=(X,))


def test_typed_contents_in_the_wrong_member() -> None:
    req = typed_request("x", "FP32", (1, 4), "fp64_contents", [1.0] * 4)
    refused(req, "input 'x'", "contents.fp32_contents", "got contents.fp64_contents", inputs=(X,))


def test_batch_over_max_batch_size() -> None:
    req = raw_request(good_arrays(70))
    refused(req, "input 'x'", "batch of 70 rows exceeds max_batch_size 64")


def test_inputs_disagree_on_batch_size() -> None:
    arrays = good_arrays(3)
    arrays["mask"] = np.ones((2, 2), np.int64)
    refused(raw_request(arrays), "disagree on batch size", "'mask' has 2 rows", "'x' has 3")


def test_unknown_requested_output() -> None:
    req = raw_request(good_arrays(), outputs=["y", "logits"])
    refused(req, "unknown requested output 'logits'", "'y', 'probs'", outputs=OUTPUTS)


def test_messages_never_mention_protobuf_internals() -> None:
    req = raw_request(good_arrays(70))
    message = refused(req)
    assert "google" not in message and "Traceback" not in message
