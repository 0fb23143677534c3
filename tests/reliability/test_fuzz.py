"""Fuzzing one in-process server with hypothesis: random, near-valid and valid inference
requests, undecodable bytes on every unary RPC, and a stream of mixed requests.

Contract: a valid request gets OK and the right answer (bitwise equal to onnxruntime in-process
on the same file); anything else gets a status other than INTERNAL/UNKNOWN with a non-empty
message. Afterwards the server still serves correctly and its resident memory (the server is in
this process) has not grown by more than 50 MB. Derandomized: CI runs the same examples.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rel_helpers import BUG_CODES, BUNDLED, MB, SERVICE, logits_of, rss_bytes

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.model import SessionPool

pytestmark = pytest.mark.timeout(300)

RSS_LIMIT = 50 * MB
# Examples per property (sum >= 2,000; see test_examples_total).
N_RANDOM, N_MUTATED, N_VALID, N_BYTES, N_META, N_STREAMS = 500, 300, 100, 700, 400, 15
EXAMPLES: collections.Counter[str] = collections.Counter()

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
MODELS = {"digits": (1, 8, 8), "vol3d": (1, 32, 32, 32)}
MAX_ROWS = {"digits": 4, "vol3d": 2}  # kept small: vol3d costs ~2 ms per row


# ---------------------------------------------------------------------------------- server


@dataclass
class Fuzzed:
    app: App
    channel: grpc.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    refs: dict[str, SessionPool]
    rss_start: int


@pytest.fixture(scope="module")
def srv() -> Iterator[Fuzzed]:
    s = Settings(repo=BUNDLED, host="127.0.0.1", port=0, metrics_port=-1, instances=2, grace=5)
    refs = {m: SessionPool(str(BUNDLED / m / "1" / "model.onnx"), instances=1) for m in MODELS}
    with serve_in_thread(s) as app, grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        _warm_up(stub, refs)
        yield Fuzzed(app, ch, stub, refs, settled_rss())
    for pool in refs.values():
        pool.close()


def _warm_up(stub: pb_grpc.GRPCInferenceServiceStub, refs: dict[str, SessionPool]) -> None:
    """Bring every one-time allocation to its high-water mark before RSS is measured, so that
    what is left to see is growth per request: onnxruntime's arenas (each session's grows to
    its largest batch and keeps it; the batcher may merge fuzzed requests up to max_batch_size
    rows, so both server sessions run max-size batches here, 4 at once so none can merge) and
    hypothesis's own caches (~20 MB the first time its strategies run)."""
    rng = np.random.default_rng(1)
    for m, inner in MODELS.items():
        for rows in (64, 1):
            x = rng.random((rows, *inner), dtype=np.float32)
            futures = [
                stub.ModelInfer.future(_request(m, x, raw=True), timeout=60) for _ in range(4)
            ]
            for f in futures:
                f.result()
        for rows in range(1, MAX_ROWS[m] + 1):
            refs[m].run({"input": rng.random((rows, *inner), dtype=np.float32)})

    @settings(FUZZ, max_examples=100, phases=[Phase.generate])
    @given(a=random_requests(), b=mutated_requests(), c=undecodable(), d=valid_requests())
    def generate_only(a: Case, b: Case, c: tuple[str, bytes], d: Case) -> None:
        pass

    generate_only()


def settled_rss() -> int:
    """RSS after returning freed memory to the OS (gc, then glibc's malloc_trim): what is left
    is memory in use, not free pages malloc kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def _request(model: str, x: np.ndarray, *, raw: bool, rid: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=rid)
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def check_status(code: grpc.StatusCode, details: str | None, what: object) -> None:
    assert code.name not in BUG_CODES, f"{code.name} ({details}) for {what!r}"
    assert details, f"{code.name} with an empty message for {what!r}"


def call_infer(srv: Fuzzed, req: pb.ModelInferRequest) -> pb.ModelInferResponse | None:
    """The response, or None after checking the error status is a proper one."""
    try:
        return srv.stub.ModelInfer(req, timeout=30)
    except grpc.RpcError as exc:
        check_status(exc.code(), exc.details(), _short(req))
        return None


def _short(req: pb.ModelInferRequest) -> str:
    text = str(req)
    return text if len(text) < 2000 else text[:2000] + "..."


# ---------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Case:
    """A request and, when it is valid, the model and input it must be answered for."""

    request: pb.ModelInferRequest
    model: str | None = None
    x: np.ndarray | None = None


names = st.one_of(
    st.sampled_from(["digits", "vol3d", "", "nope", "digits/1", "../digits"]), st.text(max_size=40)
)
versions = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "01", "1.0"]), st.text(max_size=12))
dims = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 8, 10, 32, 64, 65, 2**31, 2**32 + 1]),
    st.integers(-(2**63), 2**63 - 1),
)
shapes = st.one_of(
    st.lists(dims, max_size=7),
    st.sampled_from([[1, 1, 8, 8], [2, 1, 8, 8], [1, 8, 8], [1, 1, 32, 32, 32], [64, 1, 8, 8]]),
)
datatypes = st.one_of(st.sampled_from(DATATYPES), st.text(max_size=6))
int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)
CONTENT_MEMBERS = {
    "bool_contents": st.booleans(),
    "int_contents": int32s,
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": uint32s,
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}


@st.composite
def contents(draw: st.DrawFn) -> pb.InferTensorContents:
    c = pb.InferTensorContents()
    for member in draw(st.lists(st.sampled_from(sorted(CONTENT_MEMBERS)), max_size=2)):
        size = draw(st.sampled_from([0, 1, 3, 63, 64, 65, 128]))
        values = draw(st.lists(CONTENT_MEMBERS[member], min_size=size, max_size=size))
        getattr(c, member).extend(values)
    return c


@st.composite
def parameters(draw: st.DrawFn) -> dict[str, pb.InferParameter]:
    out = {}
    for key in draw(st.lists(st.text(max_size=10), max_size=3, unique=True)):
        kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
        p = pb.InferParameter()
        if kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "int64":
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "string":
            p.string_param = draw(st.text(max_size=20))
        elif kind == "double":
            p.double_param = draw(st.floats())
        elif kind == "uint64":
            p.uint64_param = draw(st.integers(0, 2**64 - 1))
        out[key] = p
    return out


def _fill_params(params: dict[str, pb.InferParameter], target: object) -> None:
    for key, p in params.items():
        target[key].CopyFrom(p)  # type: ignore[index]


@st.composite
def random_requests(draw: st.DrawFn) -> Case:
    """Anything the message type can hold, biased toward the names the server knows."""
    req = pb.ModelInferRequest(
        model_name=draw(names), model_version=draw(versions), id=draw(st.text(max_size=20))
    )
    _fill_params(draw(parameters()), req.parameters)
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(
            name=draw(st.one_of(st.just("input"), st.text(max_size=8))),
            datatype=draw(datatypes),
            shape=draw(shapes),
        )
        _fill_params(draw(parameters()), t.parameters)
        if draw(st.booleans()):
            t.contents.CopyFrom(draw(contents()))
    n_raw = draw(st.integers(0, 3))
    for _ in range(n_raw):
        size = draw(st.sampled_from([0, 1, 3, 4, 255, 256, 512, 1024]))
        req.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    for _ in range(draw(st.integers(0, 2))):
        o = req.outputs.add(name=draw(st.one_of(st.just("logits"), st.text(max_size=8))))
        _fill_params(draw(parameters()), o.parameters)
    return Case(req)


@st.composite
def valid_requests(draw: st.DrawFn, models: tuple[str, ...] = tuple(MODELS)) -> Case:
    """Valid: raw or typed FP32, 1..4 rows, optional requested output, parameters, id."""
    model = draw(st.sampled_from(models))
    rows = draw(st.integers(1, MAX_ROWS[model]))
    seed = draw(st.integers(0, 2**32 - 1))
    special = draw(st.sampled_from(["none", "zeros", "huge", "tiny"]))
    x = np.random.default_rng(seed).standard_normal((rows, *MODELS[model]), dtype=np.float32)
    if special == "zeros":
        x[:] = 0
    elif special == "huge":
        x *= np.float32(1e30)
    elif special == "tiny":
        x *= np.float32(1e-40)  # subnormals
    raw = draw(st.booleans()) or model == "vol3d"  # typed vol3d is 32k floats per row: slow
    req = _request(model, x, raw=raw, rid=draw(st.text(max_size=20)))
    req.model_version = draw(st.sampled_from(["", "1"]))
    _fill_params(draw(parameters()), req.parameters)
    if draw(st.booleans()):
        req.outputs.add(name="logits")
    return Case(req, model, x)


MUTATIONS = [
    "datatype",
    "shape_dim",
    "shape_rank",
    "raw_short",
    "raw_long",
    "raw_extra_entry",
    "raw_and_typed",
    "typed_count",
    "typed_member",
    "duplicate_input",
    "extra_input",
    "no_data",
    "no_inputs",
    "bad_output",
    "dup_output",
    "version",
    "huge_batch",
    "input_name",
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> Case:
    """A valid digits request with exactly one thing wrong."""
    base = draw(valid_requests(("digits",)))
    req = base.request
    mutation = draw(st.sampled_from(MUTATIONS))
    t = req.inputs[0]
    if mutation == "datatype":
        t.datatype = draw(datatypes.filter(lambda d: d != "FP32"))
    elif mutation == "shape_dim":
        axis = draw(st.integers(0, len(t.shape) - 1))
        old = t.shape[axis]
        t.shape[axis] = draw(dims.filter(lambda d: d != old))
    elif mutation == "shape_rank":
        if draw(st.booleans()):
            t.shape.append(draw(dims))
        else:
            del t.shape[-1]
    elif mutation in ("raw_short", "raw_long", "raw_extra_entry", "raw_and_typed"):
        if not req.raw_input_contents:
            req.raw_input_contents.append(np.asarray(base.x).tobytes())
            t.ClearField("contents")
        data = req.raw_input_contents[0]
        cut = draw(st.integers(1, len(data)))
        if mutation == "raw_short":
            req.raw_input_contents[0] = data[: len(data) - cut]
        elif mutation == "raw_long":
            req.raw_input_contents[0] = data + draw(st.binary(min_size=1, max_size=64))
        elif mutation == "raw_extra_entry":
            req.raw_input_contents.append(draw(st.binary(max_size=16)))
        else:
            t.contents.fp32_contents.append(1.0)
    elif mutation in ("typed_count", "typed_member"):
        del req.raw_input_contents[:]
        values = np.asarray(base.x).reshape(-1).tolist()
        t.ClearField("contents")
        if mutation == "typed_count":
            count = len(values)
            n = draw(st.integers(0, count + 3).filter(lambda k: k != count))
            t.contents.fp32_contents.extend((values * 2)[:n])
        else:
            member = draw(st.sampled_from(sorted(set(CONTENT_MEMBERS) - {"fp32_contents"})))
            getattr(t.contents, member).extend(
                draw(st.lists(CONTENT_MEMBERS[member], min_size=1, max_size=4))
            )
    elif mutation == "duplicate_input":
        req.inputs.add().CopyFrom(t)
        if req.raw_input_contents:
            req.raw_input_contents.append(req.raw_input_contents[0])
    elif mutation == "extra_input":
        extra = req.inputs.add(name=draw(st.text(max_size=8).filter(lambda s: s != "input")))
        extra.datatype, extra.shape[:] = "FP32", [1]
        if req.raw_input_contents:
            req.raw_input_contents.append(b"\0\0\0\0")
        else:
            extra.contents.fp32_contents.append(0.0)
    elif mutation == "no_data":
        del req.raw_input_contents[:]
        t.ClearField("contents")
    elif mutation == "no_inputs":
        del req.inputs[:]
    elif mutation == "bad_output":
        req.outputs.add(name=draw(st.text(max_size=8).filter(lambda s: s != "logits")))
    elif mutation == "dup_output":
        req.outputs.add(name="logits")
        req.outputs.add(name="logits")
    elif mutation == "version":
        req.model_version = draw(versions.filter(lambda v: v not in ("", "1")))
    elif mutation == "huge_batch":
        t.shape[0] = draw(st.sampled_from([65, 1000, 2**31 - 1, 2**62]))
    elif mutation == "input_name":
        t.name = draw(st.text(max_size=8).filter(lambda s: s != "input"))
    return Case(req)


def _mutated_bytes(data: bytes, draw: st.DrawFn) -> bytes:
    """Flip, cut or splice a valid serialization: the parser's deeper error paths."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "byte"]))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            b[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:]
        else:
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


@st.composite
def undecodable(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(UNARY_METHODS))
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=512))
    if method == "ModelInfer":
        seed = draw(valid_requests()).request
    else:
        seed = getattr(pb, f"{method}Request")()
        for field in seed.DESCRIPTOR.fields:
            if field.type == field.TYPE_STRING and not field.is_repeated:
                setattr(seed, field.name, draw(st.sampled_from(["digits", "vol3d", "1", ""])))
    return method, _mutated_bytes(seed.SerializeToString(), draw)


# Every unary RPC except RepositoryModelLoad/Unload: bytes that happen to decode to "unload
# digits" would change the server under the other tests (those two are fuzzed by name below).
UNARY_METHODS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
]


# ---------------------------------------------------------------------------------- properties


def _check_answer(srv: Fuzzed, case: Case, resp: pb.ModelInferResponse) -> None:
    assert case.model is not None and case.x is not None
    assert resp.id == case.request.id and resp.model_name == case.model
    assert resp.model_version == "1"
    want = srv.refs[case.model].run({"input": case.x})["logits"]
    got = logits_of(resp)
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes(), f"wrong answer for {case.model} {case.x.shape}"


@settings(FUZZ, max_examples=N_RANDOM)
@given(case=random_requests())
def test_random_requests(srv: Fuzzed, case: Case) -> None:
    EXAMPLES["random"] += 1
    call_infer(srv, case.request)


@settings(FUZZ, max_examples=N_MUTATED)
@given(case=mutated_requests())
def test_near_valid_requests_are_refused_properly(srv: Fuzzed, case: Case) -> None:
    EXAMPLES["mutated"] += 1
    resp = call_infer(srv, case.request)
    assert resp is None, f"accepted an invalid request: {_short(case.request)}"


@settings(FUZZ, max_examples=N_VALID)
@given(case=valid_requests())
def test_valid_requests_get_the_right_answer(srv: Fuzzed, case: Case) -> None:
    EXAMPLES["valid"] += 1
    resp = srv.stub.ModelInfer(case.request, timeout=30)
    _check_answer(srv, case, resp)


@settings(FUZZ, max_examples=N_BYTES)
@given(item=undecodable())
def test_undecodable_bytes(srv: Fuzzed, item: tuple[str, bytes]) -> None:
    EXAMPLES["bytes"] += 1
    method, data = item
    call = srv.channel.unary_unary(f"{SERVICE}/{method}")  # no serializers: raw bytes
    try:
        call(data, timeout=30)
    except grpc.RpcError as exc:
        check_status(exc.code(), exc.details(), (method, data))


@settings(FUZZ, max_examples=N_META)
@given(
    method=st.sampled_from(
        ["ModelMetadata", "ModelConfig", "ModelStatistics", "ModelReady", "Load", "Unload"]
    ),
    name=names,
    version=versions,
)
def test_metadata_and_repository_rpcs(srv: Fuzzed, method: str, name: str, version: str) -> None:
    EXAMPLES["metadata"] += 1
    stub = srv.stub
    try:
        if method in ("Load", "Unload"):
            # Never load or unload a served model here (the other properties need them); the
            # repository name makes it fail before it touches the model, or the name is unknown.
            req_repo = (version or "x") if name in MODELS else version
            if method == "Load":
                stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(repository_name=req_repo, model_name=name),
                    timeout=30,
                )
            else:
                stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(repository_name=req_repo, model_name=name),
                    timeout=30,
                )
        else:
            request = getattr(pb, f"{method}Request")(name=name, version=version)
            getattr(stub, method)(request, timeout=30)
    except grpc.RpcError as exc:
        check_status(exc.code(), exc.details(), (method, name, version))


@settings(FUZZ, max_examples=N_STREAMS)
@given(
    cases=st.lists(
        st.one_of(random_requests(), mutated_requests(), valid_requests()),
        min_size=10,
        max_size=20,
    )
)
def test_stream_every_request_gets_one_response(srv: Fuzzed, cases: list[Case]) -> None:
    EXAMPLES["stream"] += 1
    EXAMPLES["stream messages"] += len(cases)
    by_id = {}
    for i, case in enumerate(cases):
        case.request.id = f"s{i}"
        by_id[case.request.id] = case
    seen: collections.Counter[str] = collections.Counter()
    for msg in srv.stub.ModelStreamInfer(iter([c.request for c in cases]), timeout=60):
        rid = msg.infer_response.id
        seen[rid] += 1
        got = by_id.get(rid)
        assert got is not None, f"response for an unknown id {rid!r}: {msg.error_message}"
        if msg.error_message:
            assert not msg.error_message.startswith(("[INTERNAL]", "[UNKNOWN]")), msg.error_message
            assert got.model is None, f"valid request {rid} failed: {msg.error_message}"
        elif got.model is not None:
            _check_answer(srv, got, msg.infer_response)
    twice = sorted(k for k, n in seen.items() if n != 1)
    lost = sorted(set(by_id) - set(seen))
    assert not twice and not lost, f"answered more than once: {twice}; never answered: {lost}"


def test_undecodable_bytes_in_a_stream(srv: Fuzzed) -> None:
    """Garbage frames on a stream get an in-band INVALID_ARGUMENT each; the stream goes on."""
    good = _request("digits", np.zeros((1, 1, 8, 8), np.float32), raw=True, rid="ok")
    frames = [b"\xff\xff\xff", good.SerializeToString(), b"\x0a\x80", b"\x12\x02\xc3\x28"]
    call = srv.channel.stream_stream(f"{SERVICE}/ModelStreamInfer")
    replies = [pb.ModelStreamInferResponse.FromString(r) for r in call(iter(frames), timeout=30)]
    assert len(replies) == 4
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 3 and all(e.startswith("[INVALID_ARGUMENT]") for e in errors)
    assert [r.infer_response.id for r in replies if not r.error_message] == ["ok"]


# ---------------------------------------------------------------------------------- afterwards


def test_server_still_serves_and_memory_is_flat(srv: Fuzzed) -> None:
    """Runs last in this module: after everything above, one good request is answered right,
    nothing is left in flight, and RSS grew by less than 50 MB."""
    x = np.random.default_rng(7).random((5, 1, 8, 8), dtype=np.float32)
    case = Case(_request("digits", x, raw=True, rid="final"), "digits", x)
    _check_answer(srv, case, srv.stub.ModelInfer(case.request, timeout=30))
    assert srv.app.state.inflight == 0
    assert sorted(srv.app.repository.names()) == sorted(MODELS), "fuzzed names must not stick"
    assert srv.app.metrics.snapshot("bnserve_inflight_requests") == 0
    end = settled_rss()
    grown = end - srv.rss_start
    total = sum(v for k, v in EXAMPLES.items() if k != "stream messages")
    print(
        f"\nfuzz: {total} examples {dict(EXAMPLES)}; RSS {srv.rss_start / MB:.1f} MB -> "
        f"{end / MB:.1f} MB (growth {grown / MB:+.1f} MB)"
    )
    assert grown < RSS_LIMIT, f"RSS grew by {grown / MB:.1f} MB"


def test_examples_total() -> None:
    """At least 2,000 examples ran (only meaningful when the whole module ran)."""
    if len(EXAMPLES) < 6:
        pytest.skip("not the whole module")
    assert sum(v for k, v in EXAMPLES.items() if k != "stream messages") >= 2000
