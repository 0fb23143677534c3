"""The server end to end: tritonclient and our own stub against a real server on port 0."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from oip import infer_request, logits_of, tritonclient_stream

from bnserve.proto import inference_pb2 as pb
from bnserve.server.app import App
from bnserve.server.model import SessionPool


def test_tritonclient_unary_equals_in_process(
    target: str, digits_x: np.ndarray, digits_pool: SessionPool
) -> None:
    client = tc.InferenceServerClient(target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("vol3d")
    x = digits_x[:7]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        "digits", [inp], request_id="abc", outputs=[tc.InferRequestedOutput("logits")]
    )
    got = result.as_numpy("logits")
    want = digits_pool.run({"input": x})["logits"]
    assert got.tobytes() == want.tobytes()  # bitwise: same file, same frozen settings
    assert result.get_response().id == "abc"
    client.close()


def test_tritonclient_stream_equals_in_process(
    target: str, digits_x: np.ndarray, digits_pool: SessionPool
) -> None:
    client = tc.InferenceServerClient(target)
    n = 50
    batches = [digits_x[i : i + 1 + i % 3] for i in range(n)]
    seen = tritonclient_stream(client, "digits", batches)
    assert sorted(seen, key=int) == [str(i) for i in range(n)]
    for i, x in enumerate(batches):
        want = digits_pool.run({"input": x})["logits"]
        assert seen[str(i)].as_numpy("logits").tobytes() == want.tobytes()
    client.close()


def test_metadata_and_config(target: str) -> None:
    client = tc.InferenceServerClient(target)
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["dims"] == ["1", "8", "8"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    params = config["parameters"]
    assert json.loads(params["labels"]["string_value"]) == [str(d) for d in range(10)]
    assert json.loads(params["preprocessing"]["string_value"])["layout"] == "NCHW"
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "bnserve" and "streaming" in server["extensions"]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {
        ("digits", "1", "READY"),
        ("vol3d", "1", "READY"),
    }
    client.close()


def test_statistics_and_metrics_move_by_the_right_counts(
    app: App, target: str, digits_x: np.ndarray
) -> None:
    client = tc.InferenceServerClient(target)
    m = app.metrics

    def stat() -> tuple[int, int]:
        s = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(
            s["inference_stats"]["success"].get("count", 0)
        )

    rows0, ok0 = stat()
    success0 = m.snapshot("bnserve_request_success_total", model="digits", version="1")
    samples0 = m.snapshot("bnserve_inference_count_total", model="digits", version="1")
    fail0 = m.snapshot(
        "bnserve_request_failure_total", model="digits", version="1", code="INVALID_ARGUMENT"
    )
    x = digits_x[:3]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(10):
        client.infer("digits", [inp])
    bad = tc.InferInput("input", [3, 1, 8, 9], "FP32")
    bad.set_data_from_numpy(np.zeros((3, 1, 8, 9), np.float32))
    with pytest.raises(tc.InferenceServerException):
        client.infer("digits", [bad])
    rows1, ok1 = stat()
    assert (rows1 - rows0, ok1 - ok0) == (30, 10)
    assert m.snapshot("bnserve_request_success_total", model="digits", version="1") - success0 == 10
    assert m.snapshot("bnserve_inference_count_total", model="digits", version="1") - samples0 == 30
    assert (
        m.snapshot(
            "bnserve_request_failure_total", model="digits", version="1", code="INVALID_ARGUMENT"
        )
        - fail0
        == 1
    )
    text = urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5).read()
    assert b'bnserve_request_success_total{model="digits",version="1"}' in text
    client.close()


def test_unknown_versions_of_a_known_model_share_one_label(app: App, stub) -> None:
    """A client naming versions that do not exist cannot grow the metric series: they are
    counted under version "<unknown>" of the model; an unknown model under model "<unknown>"."""
    m = app.metrics
    failures = "bnserve_request_failure_total"
    before = m.snapshot(failures, model="digits", version="<unknown>", code="NOT_FOUND")
    nope0 = m.snapshot(failures, model="<unknown>", version="", code="NOT_FOUND")
    x = np.zeros((1, 1, 8, 8), np.float32)
    for version in ("7", "8", "x" * 40):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(infer_request(x, version=version), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert m.snapshot(failures, model="digits", version=version, code="NOT_FOUND") == 0
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(x, model="nope", version="3"), timeout=10)
    assert m.snapshot(failures, model="digits", version="<unknown>", code="NOT_FOUND") == (
        before + 3
    )
    assert m.snapshot(failures, model="<unknown>", version="", code="NOT_FOUND") == nope0 + 1


def test_health_and_reflection(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "digits", "vol3d", "inference.GRPCInferenceService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                == serving
            )
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        replies = list(
            refl.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="inference.GRPCInferenceService"
                        )
                    ]
                ),
                timeout=5,
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_dynamic_batching_gives_each_request_exactly_its_rows(
    app: App, stub, digits_x: np.ndarray, digits_pool: SessionPool
) -> None:
    """1,000 concurrent requests of mixed sizes: each answer bitwise equal to running alone."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=1000)
    starts = rng.integers(0, len(digits_x) - 8, size=1000)
    execs0 = app.metrics.snapshot("bnserve_execution_count_total", model="digits", version="1")

    def call(i: int) -> tuple[int, bytes]:
        x = digits_x[starts[i] : starts[i] + sizes[i]]
        resp = stub.ModelInfer(infer_request(x, request_id=f"r{i}"), timeout=60)
        assert resp.id == f"r{i}"
        return i, logits_of(resp).tobytes()

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = dict(pool.map(call, range(1000)))
    assert len(results) == 1000
    for i, got in results.items():
        x = digits_x[starts[i] : starts[i] + sizes[i]]
        assert got == digits_pool.run({"input": x})["logits"].tobytes(), f"request {i}"
    runs = (
        app.metrics.snapshot("bnserve_execution_count_total", model="digits", version="1") - execs0
    )
    assert runs < 1000, "concurrent requests were merged into shared runs"


def test_requested_outputs_and_typed_contents(
    stub, digits_x: np.ndarray, digits_pool: SessionPool
) -> None:
    x = digits_x[:2]
    req = pb.ModelInferRequest(model_name="digits", model_version="1", id="typed")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 1, 8, 8])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="logits")
    resp = stub.ModelInfer(req, timeout=10)
    assert resp.model_version == "1" and resp.id == "typed"
    assert logits_of(resp).tobytes() == digits_pool.run({"input": x})["logits"].tobytes()


def test_stream_bad_request_in_band_and_stream_goes_on(stub, digits_x: np.ndarray) -> None:
    reqs = [
        infer_request(digits_x[:1], request_id="0"),
        infer_request(digits_x[:1], request_id="1", name="wrong"),
        infer_request(digits_x[:1], request_id="2", model="nope"),
        infer_request(digits_x[:2], request_id="3"),
    ]
    answers = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(reqs), timeout=30)}
    assert sorted(answers) == ["0", "1", "2", "3"]
    assert answers["0"].error_message == "" and answers["3"].error_message == ""
    assert (
        "INVALID_ARGUMENT" in answers["1"].error_message and "'wrong'" in answers["1"].error_message
    )
    assert "NOT_FOUND" in answers["2"].error_message and "nope" in answers["2"].error_message
    assert logits_of(answers["3"].infer_response).shape == (2, 10)
