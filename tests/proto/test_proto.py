"""The generated modules are fresh, share a process with tritonclient, and speak its wire format.

tritonclient ships its own generated copy of Triton's protos (tritonclient.grpc.service_pb2 and
model_config_pb2); every message built with one side must parse on the other with nothing lost.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as tmc
from tritonclient.grpc import service_pb2 as tpb

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pbg


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- generation ------------------------------------------------------------------------------


def test_generated_files_are_not_stale() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bnserve.proto.generate", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_descriptors_live_in_a_private_pool() -> None:
    from google.protobuf import descriptor_pool

    assert pb.DESCRIPTOR.pool is pb.POOL
    assert pb.POOL is not descriptor_pool.Default()
    assert pb.DESCRIPTOR.name == "bnserve/proto/inference.proto"
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert pb.POOL.FindMessageTypeByName("inference.ModelConfig") is pb.ModelConfig.DESCRIPTOR


@pytest.mark.parametrize("triton_first", [True, False], ids=["tritonclient-first", "ours-first"])
def test_imports_coexist_with_tritonclient(triton_first: bool) -> None:
    ours = "import bnserve.proto.inference_pb2_grpc as pbg\n"
    theirs = "import tritonclient.grpc\nfrom tritonclient.grpc import service_pb2 as tpb\n"
    code = (theirs + ours) if triton_first else (ours + theirs)
    code += textwrap.dedent(
        """
        from bnserve.proto import inference_pb2 as pb
        req = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"x"])
        assert tpb.ModelInferRequest.FromString(req.SerializeToString()).model_name == "m"
        assert pbg.GRPCInferenceServiceStub and pbg.add_GRPCInferenceServiceServicer_to_server
        print("ok")
        """
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_grpc_stub_and_servicer_work_end_to_end() -> None:
    """A real server on loopback built from our servicer helpers, called by tritonclient."""
    from concurrent import futures

    import grpc
    import numpy as np
    import tritonclient.grpc as tg

    class Servicer(pbg.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ModelInfer(self, request, context):
            data = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
            out = pb.ModelInferResponse.InferOutputTensor(
                name="OUT", datatype="FP32", shape=request.inputs[0].shape
            )
            return pb.ModelInferResponse(
                model_name=request.model_name,
                id=request.id,
                outputs=[out],
                raw_output_contents=[(data * 2).tobytes()],
            )

        def ModelStreamInfer(self, request_iterator, context):
            for request in request_iterator:
                yield pb.ModelStreamInferResponse(error_message=f"refused {request.id}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pbg.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = tg.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        x = tg.InferInput("IN", [2, 3], "FP32")
        x.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
        result = client.infer("m", [x], request_id="r1")
        np.testing.assert_array_equal(
            result.as_numpy("OUT"), 2 * np.arange(6, dtype=np.float32).reshape(2, 3)
        )
        assert result.get_response().id == "r1"
        client.close()

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            requests = [pb.ModelInferRequest(id="a"), pb.ModelInferRequest(id="b")]
            replies = list(stub.ModelStreamInfer(iter(requests)))
        assert [r.error_message for r in replies] == ["refused a", "refused b"]
    finally:
        server.stop(None)


# --- schema: every field number, type and name against tritonclient's copy --------------------


def _field_signature(f: descriptor.FieldDescriptor) -> tuple[object, ...]:
    sub = f.message_type.full_name if f.message_type else None
    enum = f.enum_type.full_name if f.enum_type else None
    oneof = f.containing_oneof.name if f.containing_oneof else None
    return (f.name, f.number, f.type, f.is_repeated, f.is_packed, sub, enum, oneof)


def _walk_messages(d: descriptor.Descriptor) -> list[descriptor.Descriptor]:
    found = [d]
    for nested in d.nested_types:
        found.extend(_walk_messages(nested))
    return found


def _walk_enums(d: descriptor.Descriptor) -> list[descriptor.EnumDescriptor]:
    return [e for m in _walk_messages(d) for e in m.enum_types]


def _triton_pool_lookup(full_name: str) -> descriptor.Descriptor:
    return tpb.DESCRIPTOR.pool.FindMessageTypeByName(full_name)


# bnserve's own additions (docs/drift.md): field numbers from 1000 on, far from Triton's, and
# the messages only they use. Everything else must be Triton's, field for field.
EXTENSION_FIELDS = {
    "inference.ModelStatistics.bn_drift",
    "inference.ModelStatistics.bn_drift_samples",
}
EXTENSION_MESSAGES = {"inference.BnDriftStatistics"}


def test_every_message_matches_tritonclient_field_for_field() -> None:
    checked = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        if top.full_name in EXTENSION_MESSAGES:
            continue
        for ours in _walk_messages(top):
            theirs = _triton_pool_lookup(ours.full_name)
            theirs_by_number = {f.number: f for f in theirs.fields}
            for field in ours.fields:
                if field.full_name in EXTENSION_FIELDS:
                    assert field.number >= 1000 and field.number not in theirs_by_number
                    continue
                assert field.number in theirs_by_number, f"{ours.full_name}.{field.name}"
                assert _field_signature(field) == _field_signature(theirs_by_number[field.number])
                checked += 1
    assert checked > 150


def test_extension_fields_are_skipped_by_tritonclient() -> None:
    """A ModelStatistics answer with bn_drift parses in tritonclient, its own fields intact."""
    ours = pb.ModelStatisticsResponse()
    m = ours.model_stats.add(name="digits", version="1", inference_count=7, execution_count=3)
    m.bn_drift.add(layer="features.1", channels=32, score=0.25)
    m.bn_drift_samples = 5
    theirs = tpb.ModelStatisticsResponse.FromString(ours.SerializeToString())
    t = theirs.model_stats[0]
    assert (t.name, t.version, t.inference_count, t.execution_count) == ("digits", "1", 7, 3)
    back = pb.ModelStatisticsResponse.FromString(theirs.SerializeToString())  # kept as unknown
    assert back.model_stats[0].bn_drift[0].score == 0.25


def test_every_enum_matches_tritonclient() -> None:
    enums = list(pb.DESCRIPTOR.enum_types_by_name.values())
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        enums.extend(_walk_enums(top))
    for ours in enums:
        theirs = tpb.DESCRIPTOR.pool.FindEnumTypeByName(ours.full_name)
        assert [(v.name, v.number) for v in ours.values] == [
            (v.name, v.number) for v in theirs.values
        ]
    assert [v.name for v in pb.DataType.DESCRIPTOR.values][-2:] == ["TYPE_STRING", "TYPE_BF16"]


def test_every_rpc_matches_tritonclient() -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = tpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    expected = [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ]
    assert [m.name for m in ours.methods] == expected
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert method.client_streaming == other.client_streaming
        assert method.server_streaming == other.server_streaming
    stream = ours.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


# --- wire round trips with filled messages ---------------------------------------------------


def _triton_infer_request() -> Message:
    req = tpb.ModelInferRequest(model_name="bn", model_version="3", id="req-7")
    req.parameters["priority"].uint64_param = 2
    req.parameters["timeout"].int64_param = 1000
    req.parameters["flag"].bool_param = True
    req.parameters["tag"].string_param = "x"
    req.parameters["scale"].double_param = 0.5
    a = req.inputs.add(name="a", datatype="FP32", shape=[2, 3])
    a.parameters["binary_data_size"].int64_param = 24
    req.inputs.add(name="b", datatype="INT64", shape=[2, 1])
    out = req.outputs.add(name="y")
    out.parameters["classification"].int64_param = 0
    req.raw_input_contents.extend([bytes(range(24)), bytes(16)])
    return req


def _triton_typed_request() -> Message:
    req = tpb.ModelInferRequest(model_name="bn")
    t = req.inputs.add(name="t", datatype="FP32", shape=[1, 2])
    c = t.contents
    c.bool_contents.extend([True, False])
    c.int_contents.extend([-1, 2])
    c.int64_contents.extend([-(2**40), 5])
    c.uint_contents.extend([1, 2**32 - 1])
    c.uint64_contents.extend([2**64 - 1, 0])
    c.fp32_contents.extend([1.5, -2.25])
    c.fp64_contents.extend([1e300, -0.0])
    c.bytes_contents.extend([b"ab", b""])
    return req


def _triton_infer_response() -> Message:
    resp = tpb.ModelInferResponse(model_name="bn", model_version="1", id="req-7")
    resp.parameters["sequence_end"].bool_param = False
    o = resp.outputs.add(name="y", datatype="FP16", shape=[2, 10])
    o.parameters["note"].string_param = "n"
    resp.outputs.add(name="z", datatype="UINT8", shape=[2])
    resp.raw_output_contents.extend([bytes(40), b"\x01\x02"])
    return resp


def _triton_stream_response() -> Message:
    s = tpb.ModelStreamInferResponse(error_message="")
    s.infer_response.CopyFrom(_triton_infer_response())
    return s


def _triton_stream_error() -> Message:
    s = tpb.ModelStreamInferResponse(error_message="batch of 70 rows exceeds max_batch_size 64")
    s.infer_response.id = "req-9"
    return s


def _triton_config_response() -> Message:
    cfg = tmc.ModelConfig(
        name="bn", platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=64
    )
    cfg.version_policy.latest.num_versions = 1
    i = cfg.input.add(name="x", data_type=tmc.TYPE_FP32, format=tmc.ModelInput.FORMAT_NCHW)
    i.dims.extend([3, 8, 8])
    i.reshape.shape.extend([192])
    i.is_shape_tensor = False
    i.allow_ragged_batch = True
    i.optional = True
    o = cfg.output.add(name="y", data_type=tmc.TYPE_BF16, label_filename="labels.txt")
    o.dims.extend([10])
    o.reshape.shape.extend([10])
    o.is_shape_tensor = True
    g = cfg.instance_group.add(name="g", kind=tmc.ModelInstanceGroup.KIND_CPU, count=2)
    g.gpus.extend([0, 1])
    g.profile.append("p0")
    g.passive = True
    g.host_policy = "cpu"
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend([16, 32])
    db.max_queue_delay_microseconds = 500
    db.preserve_ordering = True
    db.priority_levels = 2
    db.default_priority_level = 1
    db.default_queue_policy.max_queue_size = 128
    db.default_queue_policy.timeout_action = tmc.ModelQueuePolicy.DELAY
    db.default_queue_policy.default_timeout_microseconds = 10
    db.default_queue_policy.allow_timeout_override = True
    db.priority_queue_policy[1].max_queue_size = 4
    cfg.default_model_filename = "model.onnx"
    cfg.metric_tags["team"] = "bn"
    cfg.parameters["folded"].string_value = "true"
    cfg.model_transaction_policy.decoupled = True
    cfg.response_cache.enable = False
    return tpb.ModelConfigResponse(config=cfg)


def _triton_metadata_response() -> Message:
    md = tpb.ModelMetadataResponse(name="bn", versions=["1", "2"], platform="onnxruntime_onnx")
    md.inputs.add(name="x", datatype="FP32", shape=[-1, 3, 8, 8])
    md.outputs.add(name="y", datatype="FP32", shape=[-1, 10])
    return md


def _triton_statistics_response() -> Message:
    resp = tpb.ModelStatisticsResponse()
    s = resp.model_stats.add(name="bn", version="1", last_inference=1_700_000_000_000)
    s.inference_count = 640
    s.execution_count = 10
    for i, field in enumerate(
        [
            "success",
            "fail",
            "queue",
            "compute_input",
            "compute_infer",
            "compute_output",
            "cache_hit",
            "cache_miss",
        ]
    ):
        d = getattr(s.inference_stats, field)
        d.count = i + 1
        d.ns = 1000 * (i + 1)
    b = s.batch_stats.add(batch_size=64)
    b.compute_input.count = 10
    b.compute_input.ns = 11
    b.compute_infer.count = 10
    b.compute_infer.ns = 2**40
    b.compute_output.count = 10
    b.compute_output.ns = 13
    s.memory_usage.add(type="CPU", id=0, byte_size=2**33)
    return resp


CASES: dict[str, tuple[Callable[[], Message], type[Message]]] = {
    "ModelInferRequest": (_triton_infer_request, pb.ModelInferRequest),
    "ModelInferRequest-typed": (_triton_typed_request, pb.ModelInferRequest),
    "ModelInferResponse": (_triton_infer_response, pb.ModelInferResponse),
    "ModelStreamInferResponse": (_triton_stream_response, pb.ModelStreamInferResponse),
    "ModelStreamInferResponse-error": (_triton_stream_error, pb.ModelStreamInferResponse),
    "ModelConfigResponse": (_triton_config_response, pb.ModelConfigResponse),
    "ModelMetadataResponse": (_triton_metadata_response, pb.ModelMetadataResponse),
    "ModelStatisticsResponse": (_triton_statistics_response, pb.ModelStatisticsResponse),
}


def _as_dict(msg: Message) -> dict[str, object]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


@pytest.mark.parametrize("case", list(CASES))
def test_tritonclient_message_parses_with_ours(case: str) -> None:
    build, ours_cls = CASES[case]
    theirs = build()
    ours = ours_cls.FromString(theirs.SerializeToString())
    assert _as_dict(ours) == _as_dict(theirs)
    assert _as_dict(ours)  # the comparison saw real content
    # Nothing was left as unknown fields: re-serializing ours gives the very same bytes.
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


@pytest.mark.parametrize("case", list(CASES))
def test_our_message_parses_with_tritonclient(case: str) -> None:
    build, ours_cls = CASES[case]
    theirs_cls = type(build())
    ours = ours_cls()
    json_format.ParseDict(_as_dict(build()), ours)
    theirs = theirs_cls.FromString(ours.SerializeToString())
    assert _as_dict(theirs) == _as_dict(ours)
    assert theirs.SerializeToString(deterministic=True) == ours.SerializeToString(
        deterministic=True
    )


def test_spot_check_fields_after_parsing() -> None:
    req = pb.ModelInferRequest.FromString(_triton_infer_request().SerializeToString())
    assert req.inputs[1].name == "b" and list(req.inputs[1].shape) == [2, 1]
    assert req.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert req.parameters["scale"].double_param == 0.5
    assert req.raw_input_contents[0] == bytes(range(24))

    cfg = pb.ModelConfigResponse.FromString(_triton_config_response().SerializeToString()).config
    assert cfg.max_batch_size == 64 and list(cfg.input[0].dims) == [3, 8, 8]
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.model_transaction_policy.decoupled
    assert cfg.output[0].data_type == pb.TYPE_BF16
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU

    stats = pb.ModelStatisticsResponse.FromString(_triton_statistics_response().SerializeToString())
    assert stats.model_stats[0].batch_stats[0].compute_infer.ns == 2**40
    assert stats.model_stats[0].inference_stats.cache_miss.count == 8
