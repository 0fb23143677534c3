"""`bnserve serve --frontend native`: the C++ front end (server/native/), end to end.

Each server here is a real `bnserve serve --frontend native` child: Python gates the bundled
models, then execs build/native/bnserve_native (built by `make native`, which `make test` runs
first) on 127.0.0.1, an ephemeral port. Clients are tritonclient and our own stub; reference
answers come from onnxruntime in-process on the same files with the frozen settings.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip import infer_request, logits_of, reference_pool, tritonclient_stream, wait_for
from pki import Pki, make_pki, tls_channel

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server import native_frontend as native
from bnserve.server.app import serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.model import SessionPool
from bnserve.server.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
_METRICS = re.compile(r"metrics [^ ]+:(\d+)/metrics\)")

pytestmark = pytest.mark.timeout(180)


def _binary() -> Path:
    try:
        return native.binary()
    except native.NativeUnavailableError as exc:  # make test builds it: missing is a failure
        pytest.fail(str(exc))


class NativeServer(ServerProcess):
    """ServerProcess with --frontend native and a metrics endpoint on an ephemeral port."""

    def __init__(self, repo: Path, *extra: str) -> None:
        _binary()
        super().__init__(repo, "--frontend", "native", "--metrics-port", "0", *extra)
        line = next(x for x in self.log if " serving " in x)
        m = _METRICS.search(line)
        assert m, f"no metrics port in {line!r}"
        self.metrics_port = int(m.group(1))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`, from the text
        exposition (one sample when every label is given; 0 when none matches)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            found = dict(re.findall(r'(\w+)="([^"]*)"', head))
            if head.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total


@pytest.fixture(scope="module")
def server() -> Iterator[NativeServer]:
    s = NativeServer(BUNDLED, "--instances", "2", "--grace", "10")
    try:
        yield s
    finally:
        assert s.stop(60) == 0, "".join(s.log[-20:])


@pytest.fixture(scope="module")
def stub(server: NativeServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def digits_x() -> np.ndarray:
    from bnserve.training.data import digits

    return digits().x_test  # (450, 1, 8, 8) float32


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[str, SessionPool]]:
    """In-process onnxruntime on the same files, frozen settings: the reference answers."""
    sources = {m: reference_pool(m) for m in ("digits", "vol3d")}
    yield {m: next(source) for m, source in sources.items()}
    for source in sources.values():
        source.close()


def _vol3d_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 32, 32, 32), dtype=np.float32)


# --- the process ------------------------------------------------------------------------------


def test_python_hands_the_process_to_the_native_binary(server: NativeServer) -> None:
    """Same PID, now running bnserve_native; both models loaded within the memory target."""
    exe = Path(os.readlink(f"/proc/{server.proc.pid}/exe"))
    assert exe.name == "bnserve_native"
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    assert rss_kb < 200 * 1024, f"RSS {rss_kb / 1024:.0f} MiB with both models"
    fds = Path(f"/proc/{server.proc.pid}/fd")
    open_files = [os.readlink(fd) for fd in fds.iterdir()]
    assert not [f for f in open_files if "bnserve-native-plan" in f]  # read, then closed
    assert any("gates passed for digits, vol3d" in line for line in server.log)


def test_the_queue_thread_runs_sched_batch_and_the_workers_do_not(server: NativeServer) -> None:
    """bnn-grpc must not preempt a worker on each wake-up (SCHED_BATCH); the onnxruntime workers
    (one per instance: 2 a model here) keep the default policy, so they are never the ones
    waiting for a tick."""
    threads: dict[str, list[int]] = {}
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        threads.setdefault(name, []).append(int(task.name))
    queues = max(1, (os.cpu_count() or 1) // 4)
    assert len(threads.get("bnn-grpc", [])) == queues, threads
    assert len(threads.get("bnn-ort", [])) == 2 * 2, threads
    assert {os.sched_getscheduler(t) for t in threads["bnn-grpc"]} == {os.SCHED_BATCH}
    assert {os.sched_getscheduler(t) for t in threads["bnn-ort"]} == {os.SCHED_OTHER}


def test_unsupported_settings_are_refused_before_anything_loads() -> None:
    for flags, what in (
        (["--poll", "5"], "--poll"),
        (["--auth-token-file", __file__], "--auth-token-file"),
        (["--drift-sample-rate", "0.1"], "--drift-sample-rate"),
        (["--workers", "2"], "--workers"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "bnserve.cli",
                "serve",
                "--repo",
                str(BUNDLED),
                "--frontend",
                "native",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert "--frontend native does not support" in r.stderr and what in r.stderr


# --- TLS -------------------------------------------------------------------------------------


def _tls_code(target: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> Any:
    """ServerLive over TLS trusting `ca` (with a client certificate when given): True, or the
    status code of the failure."""
    with tls_channel(target, ca, cert, key) as channel:
        try:
            return (
                pb_grpc.GRPCInferenceServiceStub(channel)
                .ServerLive(pb.ServerLiveRequest(), timeout=5)
                .live
            )
        except grpc.RpcError as exc:
            return exc.code()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_serves_the_answers_and_refuses_plaintext(
    pki: Pki, digits_x: np.ndarray, pools: dict[str, SessionPool], tmp_path: Path
) -> None:
    # The certificate as `openssl pkcs12` exports it: text before the PEM block, not all ASCII.
    cert = tmp_path / "server-bag.crt"
    cert.write_bytes(
        "Bag Attributes\n    friendlyName: s\u00e9rveur\n".encode() + pki.server_cert.read_bytes()
    )
    s = NativeServer(BUNDLED, "--tls-cert", str(cert), "--tls-key", str(pki.server_key))
    try:
        assert any("(native, TLS;" in line for line in s.log)
        x = digits_x[:5]
        want = pools["digits"].run({"input": x})["logits"].tobytes()
        for host in ("127.0.0.1", "localhost"):  # the certificate's IP and DNS names
            client = tc.InferenceServerClient(
                f"{host}:{s.port}", ssl=True, root_certificates=str(pki.ca)
            )
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("digits", [inp]).as_numpy("logits").tobytes() == want
            client.close()
        with grpc.insecure_channel(s.target) as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive
            with pytest.raises(grpc.RpcError) as err:
                live(pb.ServerLiveRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server's certificate.
        assert _tls_code(s.target, pki.rogue_ca) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert s.stop(60) == 0, "".join(s.log[-20:])


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki) -> None:
    s = NativeServer(
        BUNDLED,
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--tls-client-ca", str(pki.ca)),
    )
    try:
        assert any("(native, mutual TLS;" in line for line in s.log)
        assert _tls_code(s.target, pki.ca) == grpc.StatusCode.UNAVAILABLE  # no certificate
        rogue = _tls_code(s.target, pki.ca, pki.rogue_cert, pki.rogue_key)
        assert rogue == grpc.StatusCode.UNAVAILABLE  # signed by a CA the server does not trust
        assert _tls_code(s.target, pki.ca, pki.client_cert, pki.client_key) is True
    finally:
        assert s.stop(60) == 0, "".join(s.log[-20:])


def test_unusable_tls_files_are_refused_as_by_the_python_front_end(pki: Pki) -> None:
    """Checked before anything loads, with the Python front end's words (exit 2)."""
    for flags, words in (
        ([str(pki.server_cert), str(pki.client_key)], "the key does not belong to the certificate"),
        ([str(pki.server_key), str(pki.server_key)], "not a PEM certificate"),
    ):
        r = subprocess.run(
            [
                *(sys.executable, "-m", "bnserve.cli", "serve", "--repo", str(BUNDLED)),
                *("--frontend", "native", "--tls-cert", flags[0], "--tls-key", flags[1]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "gates passed" not in r.stderr


# --- answers -----------------------------------------------------------------------------------


def test_tritonclient_unary_and_stream_equal_in_process(
    server: NativeServer, digits_x: np.ndarray, pools: dict[str, SessionPool]
) -> None:
    client = tc.InferenceServerClient(server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("vol3d")
    x = digits_x[:7]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], request_id="abc")
    assert (
        result.as_numpy("logits").tobytes() == pools["digits"].run({"input": x})["logits"].tobytes()
    )
    assert result.get_response().id == "abc"

    n = 60
    batches = [digits_x[i : i + 1 + i % 3] for i in range(n)]
    seen = tritonclient_stream(client, "digits", batches)
    assert sorted(seen, key=int) == [str(i) for i in range(n)]
    for i, x in enumerate(batches):
        want = pools["digits"].run({"input": x})["logits"]
        assert seen[str(i)].as_numpy("logits").tobytes() == want.tobytes()
    client.close()


def test_vol3d_unary_and_stream_equal_in_process(stub, pools: dict[str, SessionPool]) -> None:
    x = _vol3d_rows(3)
    want = pools["vol3d"].run({"input": x})
    name = next(iter(want))
    resp = stub.ModelInfer(infer_request(x, model="vol3d", request_id="v"), timeout=60)
    assert resp.outputs[0].name == name and logits_of(resp).tobytes() == want[name].tobytes()
    reqs = [infer_request(x[i : i + 1], model="vol3d", request_id=str(i)) for i in range(3)]
    got = {
        r.infer_response.id: logits_of(r.infer_response)
        for r in stub.ModelStreamInfer(iter(reqs), timeout=60)
    }
    for i in range(3):
        assert got[str(i)].tobytes() == pools["vol3d"].run({"input": x[i : i + 1]})[name].tobytes()


def test_answers_do_not_depend_on_how_the_request_bytes_are_laid_out(
    server: NativeServer, pools: dict[str, SessionPool]
) -> None:
    """The native front end reads raw_input_contents by hand, as views into gRPC's slices
    (server/native/wire.h); protobuf parses the rest. The same vol3d rows sent as the plain
    message, with raw_input_contents before the other fields, with an unknown varint field
    (left to protobuf whole), gzip-compressed, and as 64 rows (8 MiB: many slices, copied piece
    by piece into the batch): every answer equals in-process onnxruntime bit for bit, unary and
    over a stream."""
    service = "/inference.GRPCInferenceService/"
    unknown_varint = bytes([0xA0, 0x06, 0x01])  # field 100, wire type 0, value 1

    def layouts(x: np.ndarray) -> dict[str, bytes]:
        req = infer_request(x, model="vol3d", request_id="r")
        rest = pb.ModelInferRequest()
        rest.CopyFrom(req)
        del rest.raw_input_contents[:]
        raw_only = pb.ModelInferRequest(raw_input_contents=req.raw_input_contents)
        plain = req.SerializeToString()
        return {
            "plain": plain,
            "raw first": raw_only.SerializeToString() + rest.SerializeToString(),
            "unknown varint": plain + unknown_varint,
        }

    with grpc.insecure_channel(
        server.target, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        unary = ch.unary_unary(service + "ModelInfer")
        stream = ch.stream_stream(service + "ModelStreamInfer")
        for rows in (1, 3, 64):
            x = _vol3d_rows(rows, seed=rows)
            want = pools["vol3d"].run({"input": x})["logits"].tobytes()
            for name, body in layouts(x).items():
                for compression in (grpc.Compression.NoCompression, grpc.Compression.Gzip):
                    what = f"{rows} rows, {name}, {compression.name}"
                    got = pb.ModelInferResponse.FromString(
                        unary(body, timeout=60, compression=compression)
                    )
                    assert logits_of(got).tobytes() == want, what
                answers = list(stream(iter([body]), timeout=60))
                assert len(answers) == 1, name
                sr = pb.ModelStreamInferResponse.FromString(answers[0])
                assert sr.error_message == "", (rows, name, sr.error_message)
                assert logits_of(sr.infer_response).tobytes() == want, (rows, name)


def test_metadata_and_config_are_the_python_front_ends_bytes(stub) -> None:
    settings = Settings(
        repo=BUNDLED, host="127.0.0.1", port=0, metrics_port=-1, instances=2, grace=2
    )
    with serve_in_thread(settings) as app, grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        py = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10) == py.ServerMetadata(
            pb.ServerMetadataRequest(), timeout=10
        )
        for name in ("digits", "vol3d"):
            for version in ("", "1"):
                assert stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=name, version=version), timeout=10
                ) == py.ModelMetadata(
                    pb.ModelMetadataRequest(name=name, version=version), timeout=10
                )
                assert stub.ModelConfig(
                    pb.ModelConfigRequest(name=name, version=version), timeout=10
                ) == py.ModelConfig(pb.ModelConfigRequest(name=name, version=version), timeout=10)


# (model, requests, rows a request at most, client threads). Whether requests are merged depends
# on the load: a digits run (~20 us) is shorter than this Python client's gap between requests,
# so digits requests mostly run one by one, inline; a vol3d row costs ~3.5 ms, so 16 clients
# always have requests queued behind both sessions and merged (max_combined_batch_size 4).
MIXED = [("digits", 600, 8, 32), ("vol3d", 48, 4, 16)]


@pytest.mark.parametrize(("model", "n", "max_rows", "threads"), MIXED, ids=[m[0] for m in MIXED])
def test_concurrent_mixed_requests_get_exactly_their_rows(
    server: NativeServer,
    stub,
    digits_x: np.ndarray,
    pools: dict[str, SessionPool],
    model: str,
    n: int,
    max_rows: int,
    threads: int,
) -> None:
    def model_stats():
        request = pb.ModelStatisticsRequest(name=model)
        return stub.ModelStatistics(request, timeout=10).model_stats[0]

    stats0 = model_stats()
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, max_rows + 1, size=n)
    data = digits_x if model == "digits" else _vol3d_rows(64)
    starts = rng.integers(0, len(data) - max_rows, size=n)

    def call(i: int) -> tuple[int, bytes]:
        x = data[starts[i] : starts[i] + sizes[i]]
        resp = stub.ModelInfer(infer_request(x, model=model, request_id=f"r{i}"), timeout=60)
        assert resp.id == f"r{i}"
        return i, logits_of(resp).tobytes()

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as ex:
        results = dict(ex.map(call, range(n)))
    for i, got in results.items():
        x = data[starts[i] : starts[i] + sizes[i]]
        want = pools[model].run({"input": x})
        assert got == next(iter(want.values())).tobytes(), f"request {i}"
    stats = model_stats()
    ok = stats.inference_stats.success.count - stats0.inference_stats.success.count
    rows = stats.inference_count - stats0.inference_count
    runs = stats.execution_count - stats0.execution_count
    assert ok == n and rows == int(sizes.sum())
    assert 0 < runs <= n
    if model == "vol3d":
        assert runs < n, "concurrent requests were merged into shared runs"
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(stats.inference_stats, part).count == stats.inference_stats.success.count


# --- errors ------------------------------------------------------------------------------------

BAD = [
    (
        "wrong shape",
        lambda x: infer_request(x, shape=[1, 1, 8, 7]),
        "INVALID_ARGUMENT",
        ["'input'", "[-1, 1, 8, 8]", "[1, 1, 8, 7]"],
    ),
    (
        "wrong datatype",
        lambda x: infer_request(x, datatype="FP64"),
        "INVALID_ARGUMENT",
        ["FP32", "FP64"],
    ),
    (
        "unknown input",
        lambda x: infer_request(x, name="pixels"),
        "INVALID_ARGUMENT",
        ["'pixels'", "'input'"],
    ),
    ("unknown model", lambda x: infer_request(x, model="nope"), "NOT_FOUND", ["'nope'"]),
    ("byte count", lambda x: infer_request(x, shape=[2, 1, 8, 8]), "INVALID_ARGUMENT", ["bytes"]),
    (
        "batch too big",
        lambda x: infer_request(np.zeros((65, 1, 8, 8), np.float32)),
        "INVALID_ARGUMENT",
        ["65", "64"],
    ),
]


@pytest.mark.parametrize(("what", "make", "code", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_status_that_says_what_was_wrong(
    server: NativeServer, stub, digits_x: np.ndarray, what, make, code: str, says: list[str]
) -> None:
    failures0 = server.metric("bnserve_request_failure_total", code=code)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make(digits_x[:1]), timeout=10)
    assert err.value.code().name == code
    for fragment in says:
        assert fragment in err.value.details(), err.value.details()
    assert server.metric("bnserve_request_failure_total", code=code) == failures0 + 1
    # and the server keeps serving
    assert logits_of(stub.ModelInfer(infer_request(digits_x[:2]), timeout=10)).shape == (2, 10)


def test_unknown_versions_of_a_known_model_share_one_label(
    server: NativeServer, stub, digits_x: np.ndarray
) -> None:
    """Made-up versions of a served model are counted under version "<unknown>" of that model
    (as on the Python front end), an unknown model under model "<unknown>": a client cannot
    grow the metric series."""
    failures = "bnserve_request_failure_total"
    digits_unknown = {"model": "digits", "version": "<unknown>", "code": "NOT_FOUND"}
    nope = {"model": "<unknown>", "version": "", "code": "NOT_FOUND"}
    before, nope0 = server.metric(failures, **digits_unknown), server.metric(failures, **nope)
    for version in ("7", "8", "x" * 40):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(infer_request(digits_x[:1], version=version), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"'{version}'" in err.value.details()
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(digits_x[:1], model="nope", version="3"), timeout=10)
    assert server.metric(failures, **digits_unknown) == before + 3
    assert server.metric(failures, **nope) == nope0 + 1
    text = server.metrics()
    for version in ("7", "8", "x" * 40):
        assert f'version="{version}"' not in text


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
        answers["1"].error_message.startswith("[INVALID_ARGUMENT]")
        and "'wrong'" in answers["1"].error_message
    )
    assert (
        answers["2"].error_message.startswith("[NOT_FOUND]")
        and "nope" in answers["2"].error_message
    )
    assert logits_of(answers["3"].infer_response).shape == (2, 10)


def test_repository_control_is_refused_with_the_reason(stub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert {(m.name, m.state) for m in index.models} >= {("digits", "READY"), ("vol3d", "READY")}
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--frontend native" in err.value.details()


# --- health and metrics ------------------------------------------------------------------------


def test_health_and_metrics_count_what_was_sent(
    server: NativeServer, stub, digits_x: np.ndarray
) -> None:
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService", "digits", "vol3d"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    ok0 = server.metric("bnserve_request_success_total", model="digits", version="1")
    rows0 = server.metric("bnserve_inference_count_total", model="digits", version="1")
    for k in range(1, 6):
        stub.ModelInfer(infer_request(digits_x[:k]), timeout=10)
    assert server.metric("bnserve_request_success_total", model="digits", version="1") == ok0 + 5
    assert server.metric("bnserve_inference_count_total", model="digits", version="1") == rows0 + 15
    assert (
        server.metric("bnserve_request_duration_seconds_count", model="digits", version="1")
        >= ok0 + 5
    )
    assert server.metric("bnserve_model_ready", model="vol3d", version="1") == 1


# --- overload and drain (each on its own server) -----------------------------------------------


def _small_queue_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED / "vol3d", repo / "vol3d")
    cfg_path = repo / "vol3d" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["batching"]["max_queue_size"] = 2
    cfg_path.write_text(json.dumps(cfg))
    return repo


def test_a_full_queue_refuses_with_unavailable_and_loses_nothing(
    tmp_path: Path, pools: dict[str, SessionPool]
) -> None:
    s = NativeServer(_small_queue_repo(tmp_path), "--instances", "1")
    try:
        x = _vol3d_rows(32, seed=3)
        name = next(iter(pools["vol3d"].run({"input": x[:1]})))
        with grpc.insecure_channel(s.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            futures = [
                stub.ModelInfer.future(
                    infer_request(x[i : i + 1], model="vol3d", request_id=str(i)), timeout=60
                )
                for i in range(32)
            ]
            ok, refused = {}, 0
            for i, f in enumerate(futures):
                try:
                    ok[i] = logits_of(f.result())
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "queue full" in exc.details()
                    refused += 1
        assert refused > 0 and len(ok) + refused == 32
        for i, got in ok.items():
            assert got.tobytes() == pools["vol3d"].run({"input": x[i : i + 1]})[name].tobytes()
        assert (
            s.metric(
                "bnserve_request_failure_total", model="vol3d", version="1", code="UNAVAILABLE"
            )
            == refused
        )
        assert s.metric("bnserve_request_success_total", model="vol3d", version="1") == len(ok)
    finally:
        assert s.stop(60) == 0


def _wait_inflight(s: NativeServer, n: int, timeout: float = 60.0) -> float:
    """Poll the server's in-flight gauge until it reaches n (bounded); its last value."""
    deadline = time.monotonic() + timeout
    seen = s.metric("bnserve_inflight_requests")
    while seen < n and time.monotonic() < deadline:
        time.sleep(0.01)
        seen = s.metric("bnserve_inflight_requests")
    return seen


def test_sigterm_answers_every_accepted_request_then_exits_0(pools: dict[str, SessionPool]) -> None:
    """48 requests of 16 vol3d rows (each runs alone: ~60 ms, ~1.4 s of work on 2 sessions);
    SIGTERM once 32 are in the server. Every request is answered right or, if it never got
    in, refused with UNAVAILABLE; all those in flight at the signal are answered; exit 0."""
    rows = 16
    s = NativeServer(BUNDLED, "--instances", "2", "--grace", "60")
    x = _vol3d_rows(48 * rows, seed=5)
    name = next(iter(pools["vol3d"].run({"input": x[:1]})))
    results: dict[int, object] = {}
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            futures = [
                stub.ModelInfer.future(
                    infer_request(x[rows * i : rows * (i + 1)], model="vol3d", request_id=str(i)),
                    timeout=120,
                )
                for i in range(48)
            ]
            assert _wait_inflight(s, 32) >= 32
            s.proc.send_signal(signal.SIGTERM)
            for i, f in enumerate(futures):
                try:
                    results[i] = logits_of(f.result())
                except grpc.RpcError as exc:
                    results[i] = exc
            rc = s.proc.wait(60)
    finally:
        s.kill()
    refused = {i: r for i, r in results.items() if isinstance(r, grpc.RpcError)}
    assert all(r.code() == grpc.StatusCode.UNAVAILABLE for r in refused.values()), {
        i: (r.code(), r.details()) for i, r in refused.items()
    }
    answered = {i: r for i, r in results.items() if isinstance(r, np.ndarray)}
    for i, got in answered.items():
        want = pools["vol3d"].run({"input": x[rows * i : rows * (i + 1)]})[name]
        assert got.tobytes() == want.tobytes(), f"request {i}"
    assert rc == 0, "".join(s.log[-20:])
    log = "".join(s.log)
    drained = re.search(r"draining: (\d+) request\(s\) in flight", log)
    assert drained, log[-2000:]
    # In flight at the signal: a good part of the load (a few may have finished between the
    # gauge's reading and the signal), and every one of them answered.
    assert int(drained.group(1)) >= 16 and len(answered) >= int(drained.group(1))
    assert "stopped cleanly" in log


def test_new_calls_during_the_drain_get_unavailable() -> None:
    """16 requests of 32 vol3d rows on one session (each runs alone, ~0.12 s: ~2 s of work):
    a call made once the drain has begun is refused with UNAVAILABLE saying why, while every
    request in flight at the signal is answered."""
    s = NativeServer(BUNDLED, "--instances", "1", "--grace", "60")
    x = _vol3d_rows(32, seed=7)
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            futures = [
                stub.ModelInfer.future(infer_request(x, model="vol3d"), timeout=120)
                for _ in range(16)
            ]
            inflight = _wait_inflight(s, 12)  # >= 11 still queued: >= 1.3 s of drain left
            assert inflight >= 12
            s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30  # until the drain has begun (its log line)
            while not any("draining" in line for line in s.log) and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(infer_request(x[:1], model="vol3d"), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            # Each request is 4 MiB: one still uploading at the signal was never accepted and
            # is refused the same way; every accepted one is answered.
            answered = 0
            for f in futures:
                try:
                    assert logits_of(f.result()).shape[0] == 32
                    answered += 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "shutting down" in exc.details()
            assert answered >= inflight
        assert s.proc.wait(60) == 0
    finally:
        s.kill()


def test_the_drain_ends_idle_streams_and_health_watches(digits_x: np.ndarray) -> None:
    """Health is the server's own (not gRPC's default service): Check and Watch answer as
    grpcio-health-checking's service does, Watch follows the drain, and neither an idle
    ModelStreamInfer stream (a read pending) nor a Watch holds the shutdown for the grace."""
    s = NativeServer(BUNDLED, "--instances", "1", "--grace", "60")
    try:
        with grpc.insecure_channel(s.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown service 'nope'" in err.value.details()
            unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=60)
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
            watch = health.Watch(health_pb2.HealthCheckRequest(service="digits"), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
            stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
            requests.put(infer_request(digits_x[:2], request_id="a"))
            first = next(stream)
            assert not first.error_message and first.infer_response.id == "a"

            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                next(watch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                next(stream)  # idle: ended with UNAVAILABLE once the drain is done
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            requests.put(None)
        assert s.proc.wait(60) == 0, "".join(s.log[-20:])
        # Well inside the 60 s grace: nothing waited for it.
        assert time.monotonic() - t0 < 30
        assert "stopped cleanly" in "".join(s.log)
    finally:
        s.kill()


def test_queued_requests_past_their_deadline_or_cancelled_are_not_run() -> None:
    """One vol3d session kept busy by 32-row requests, at least 1 s of them whatever the CPU's
    speed (timed here first). Requests queued behind them with a 200 ms deadline (room to
    arrive and be queued on a loaded machine: with 50 ms, one CI run saw none of them queued in
    time), and requests the client cancels while queued, are dropped from the queue (the worker
    checks each call's deadline and whether its client is gone) and never run: ModelStatistics
    counts only the rows of the requests that were answered."""
    s = NativeServer(BUNDLED, "--instances", "1")
    big = _vol3d_rows(32, seed=11)
    one = big[:1]
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            timed = []
            for _ in range(2):
                t = time.monotonic()
                stub.ModelInfer(infer_request(big, model="vol3d"), timeout=120)
                timed.append(time.monotonic() - t)
            n_busy = max(8, math.ceil(1.0 / min(timed)))
            busy = [
                stub.ModelInfer.future(infer_request(big, model="vol3d"), timeout=120)
                for _ in range(n_busy)
            ]
            assert _wait_inflight(s, n_busy) >= n_busy
            late = [
                stub.ModelInfer.future(infer_request(one, model="vol3d"), timeout=0.2)
                for _ in range(4)
            ]
            gone = [
                stub.ModelInfer.future(infer_request(one, model="vol3d"), timeout=120)
                for _ in range(4)
            ]
            # the 8 have arrived (a busy one may have finished, a late one expired already)
            assert _wait_inflight(s, n_busy + 5) >= n_busy + 5
            for f in gone:
                assert f.cancel()
            for f in busy:
                assert logits_of(f.result()).shape == (32, 3)
            for f in late:
                with pytest.raises(grpc.RpcError) as err:
                    f.result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server answers the dropped ones too (to no one): wait until all 16 are counted.
            wait_for(lambda: s.metric("bnserve_inflight_requests") == 0, what="queue drained")
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="vol3d"), timeout=10)
            assert stats.model_stats[0].inference_count == (2 + n_busy) * 32
            failed = {
                code: s.metric(
                    "bnserve_request_failure_total", model="vol3d", version="1", code=code
                )
                for code in ("DEADLINE_EXCEEDED", "CANCELLED")
            }
            assert failed == {"DEADLINE_EXCEEDED": 4, "CANCELLED": 4}
            # and it goes on serving
            assert logits_of(
                stub.ModelInfer(infer_request(one, model="vol3d"), timeout=60)
            ).shape == (1, 3)
    finally:
        assert s.stop(60) == 0


@pytest.mark.parametrize(
    "mode",
    [["--concurrency-range", "4"], ["--concurrency-range", "4", "--streaming"]],
    ids=["unary", "streaming"],
)
def test_perf_analyzer_runs_against_the_native_front_end(
    server: NativeServer, stub, tmp_path: Path, mode: list[str]
) -> None:
    """Triton's own load generator, unchanged (when its chroot is prepared: see
    tests/bench/test_perf_analyzer.py, whose runner this reuses, for why it may skip)."""
    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    try:
        import test_perf_analyzer as tpa
    finally:
        sys.path.pop(0)
    reason = tpa._not_ready_reason()
    if reason:
        pytest.skip(reason)

    def fails() -> int:
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"), timeout=10)
        return sum(m.inference_stats.fail.count for m in stats.model_stats)

    fails0 = fails()
    row, out = tpa._perf_analyzer(server, tmp_path, "-m", "digits", *mode)
    assert float(row["Inferences/Second"]) > 0 and int(row["p99 latency"]) > 0, row
    assert "Server:" in out and "Successful request count" in out, out[-3000:]
    assert fails() == fails0


def test_non_utf8_strings_are_refused_without_flooding_the_log(server: NativeServer) -> None:
    """A ModelInferRequest whose model_name is not UTF-8 gets INVALID_ARGUMENT, every time;
    libprotobuf's ERROR line about it reaches the log at most once a second, not per request."""
    bad = b"\x0a\x02\xff\xfe"  # field 1 (model_name): 2 bytes, not UTF-8
    n = 300
    unknown = {"model": "<unknown>", "code": "INVALID_ARGUMENT"}
    failures0 = server.metric("bnserve_request_failure_total", **unknown)
    first = len(server.log)
    t0 = time.monotonic()
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(n):
            with pytest.raises(grpc.RpcError) as err:
                call(bad, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid inference.ModelInferRequest" in err.value.details()
    elapsed = time.monotonic() - t0

    def lines() -> list[str]:
        return [x for x in server.log[first:] if "protobuf:" in x]

    wait_for(lambda: len(lines()) >= 1, what="libprotobuf's line in the log")
    assert "UTF-8" in lines()[0], lines()
    assert len(lines()) <= elapsed + 2, lines()
    assert server.metric("bnserve_request_failure_total", **unknown) == failures0 + n


def test_undecodable_bytes_get_invalid_argument(server: NativeServer, digits_x: np.ndarray) -> None:
    """Bytes that are not the method's protobuf message: INVALID_ARGUMENT naming the expected
    message (gRPC C++ alone would answer UNIMPLEMENTED, no message); on a stream in band, with
    an empty id, and the stream goes on; counted under model "<unknown>"."""
    service = "/inference.GRPCInferenceService/"
    garbage = b"\xff\xff\xff\x07garbage"
    unknown = {"model": "<unknown>", "code": "INVALID_ARGUMENT"}
    failures0 = server.metric("bnserve_request_failure_total", **unknown)
    with grpc.insecure_channel(server.target) as ch:
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            if method.client_streaming:
                continue
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(service + method.name)(garbage, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
            details = err.value.details()
            assert f"not a valid {method.input_type.full_name} protobuf message" in details
        good = infer_request(digits_x[:1], request_id="good")
        call = ch.stream_stream(service + "ModelStreamInfer")
        frames = [garbage, good.SerializeToString()]
        answers = [
            pb.ModelStreamInferResponse.FromString(r) for r in call(iter(frames), timeout=30)
        ]
        assert len(answers) == 2
        assert answers[0].error_message.startswith("[INVALID_ARGUMENT]"), answers[0]
        assert "inference.ModelInferRequest" in answers[0].error_message
        assert answers[0].infer_response.id == ""
        assert answers[1].error_message == "" and answers[1].infer_response.id == "good"
        assert logits_of(answers[1].infer_response).shape == (1, 10)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert logits_of(stub.ModelInfer(infer_request(digits_x[:2]), timeout=10)).shape == (2, 10)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    # the unary ModelInfer and the stream message
    assert server.metric("bnserve_request_failure_total", **unknown) == failures0 + 2


# --- typed contents: every datatype the native front end serves, as the Python one decodes it --

# (input name, V2 datatype, ONNX element type, numpy dtype, the typed contents member, values)
_TYPED = [
    ("b", "BOOL", 9, np.bool_, "bool_contents", [True, False, True, True]),
    ("i8", "INT8", 3, np.int8, "int_contents", [-128, 127, 0, -5]),
    ("i16", "INT16", 5, np.int16, "int_contents", [-32768, 32767, 7, -9]),
    ("u8", "UINT8", 2, np.uint8, "uint_contents", [0, 255, 17, 200]),
    ("u16", "UINT16", 4, np.uint16, "uint_contents", [0, 65535, 1, 300]),
    ("u32", "UINT32", 12, np.uint32, "uint_contents", [0, 2**32 - 1, 2, 70000]),
    ("u64", "UINT64", 13, np.uint64, "uint64_contents", [0, 2**64 - 1, 3, 2**40]),
    ("i32", "INT32", 6, np.int32, "int_contents", [-(2**31), 2**31 - 1, 3, -4]),
    ("i64", "INT64", 7, np.int64, "int64_contents", [-(2**63), 2**63 - 1, 5, -6]),
    ("f32", "FP32", 1, np.float32, "fp32_contents", [1.5, -2.25, 3e38, -0.0]),
    ("f64", "FP64", 11, np.float64, "fp64_contents", [1e300, -2.5, 0.1, 7.0]),
]


def _identity_model(inputs: list[tuple[str, int]]) -> Any:
    """An ONNX model whose output o_NAME is its input NAME (shape [batch, 2]) for each input."""
    from onnx import helper
    from onnx_nets import finish

    ins = [helper.make_tensor_value_info(n, et, ["batch", 2]) for n, et in inputs]
    outs = [helper.make_tensor_value_info(f"o_{n}", et, ["batch", 2]) for n, et in inputs]
    nodes = [helper.make_node("Identity", [n], [f"o_{n}"]) for n, _ in inputs]
    return finish(helper.make_graph(nodes, "identity", ins, outs))


@pytest.fixture(scope="module")
def typed_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Both front ends serving `typed` (an input of each datatype with a typed contents member)
    and `half` (one FP16 input, which has none)."""
    import onnx

    repo = tmp_path_factory.mktemp("typed_repo")
    for name, model in (
        ("typed", _identity_model([(n, et) for n, _, et, _, _, _ in _TYPED])),
        ("half", _identity_model([("h", 10)])),
    ):
        (repo / name / "1").mkdir(parents=True)
        onnx.save(model, str(repo / name / "1" / "model.onnx"))
    python = ServerProcess(repo)
    try:
        nat = NativeServer(repo)
        try:
            yield {"python": python.target, "native": nat.target}
        finally:
            assert nat.stop(60) == 0, "".join(nat.log[-20:])
    finally:
        python.stop(60)


def _typed_request(overrides: dict[str, tuple[str, list[Any]]] | None = None) -> Any:
    """`typed`'s every input as typed contents, 2 rows; `overrides`: input -> (member, values)."""
    req = pb.ModelInferRequest(model_name="typed")
    for name, datatype, _, _, member, values in _TYPED:
        member, values = (overrides or {}).get(name, (member, values))
        t = req.inputs.add(name=name, datatype=datatype, shape=[2, 2])
        getattr(t.contents, member).extend(values)
    return req


def test_typed_contents_of_every_datatype_as_the_python_front_end(typed_servers) -> None:
    """The native front end decodes typed contents of every datatype it serves exactly as the
    Python one does (INT8, INT16, UINT8 and UINT16 narrowed from 32 bits), and refuses the same
    bad ones with the same message."""
    answers: dict[str, dict[str, Any]] = {}
    for front, target in typed_servers.items():
        got: dict[str, Any] = {}
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            resp = stub.ModelInfer(_typed_request(), timeout=30)
            names = [o.name for o in resp.outputs]
            got["outputs"] = dict(zip(names, resp.raw_output_contents, strict=True))
            half = pb.ModelInferRequest(model_name="half")
            half.inputs.add(name="h", datatype="FP16", shape=[2, 2]).contents.fp32_contents.extend(
                [1.0] * 4
            )
            bad = {
                "int8 out of range": _typed_request({"i8": ("int_contents", [1, 128, 0, 0])}),
                "uint8 out of range": _typed_request({"u8": ("uint_contents", [256, 0, 0, 0])}),
                "uint16 out of range": _typed_request({"u16": ("uint_contents", [0, 0, 65536, 0])}),
                "wrong member": _typed_request({"i64": ("int_contents", [1, 2, 3, 4])}),
                "too few": _typed_request({"f64": ("fp64_contents", [1.0, 2.0, 3.0])}),
                "fp16": half,
            }
            for what, req in bad.items():
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(req, timeout=30)
                got[what] = (err.value.code().name, err.value.details())
        answers[front] = got
    # every value arrives as sent, in the tensor's own type, on both front ends
    for name, _, _, dtype, _, values in _TYPED:
        expected = np.array(values, dtype=dtype).reshape(2, 2).tobytes()
        assert answers["native"]["outputs"][f"o_{name}"] == expected, name
    assert answers["native"] == answers["python"]
    python = answers["python"]
    assert python["fp16"] == (
        "INVALID_ARGUMENT",
        "input 'h': datatype FP16 has no typed contents field; send it in raw_input_contents",
    )
    assert "out of range for INT8 [-128, 127]" in python["int8 out of range"][1]
    assert "out of range for UINT8 [0, 255]" in python["uint8 out of range"][1]
    assert "out of range for UINT16 [0, 65535]" in python["uint16 out of range"][1]
    assert (
        "INT64 takes its values in contents.int64_contents, got contents.int_contents"
        in (python["wrong member"][1])
    )
    assert "expected 4 values in contents.fp64_contents" in python["too few"][1]
