"""TLS, mutual TLS, bearer tokens, the health exemption and message limits, against real servers
on 127.0.0.1 port 0. Certificates are made at test time (tests/pki.py)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from oip import infer_request, logits_of
from pki import Pki, make_pki, tls_channel
from pydantic import ValidationError

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.app import App, serve_in_thread
from bnserve.server.config import Settings
from bnserve.server.security import (
    UNAUTHENTICATED_DETAIL,
    BearerTokenInterceptor,
    SecurityConfigError,
    read_token_file,
    server_credentials,
)

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"
TOKEN = "t0ken-" + "0123456789abcdef" * 2
HEALTH = health_pb2.HealthCheckRequest


# --------------------------------------------------------------------------------------------
# Certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits only: servers start fast."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(BUNDLED / "digits", root / "digits")
    return root


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(f"  {TOKEN}\n\n")  # surrounding whitespace is stripped
    return path


def _settings(repo: Path, **kw: object) -> Settings:
    return Settings(
        repo=repo, host="127.0.0.1", port=0, metrics_port=-1, instances=1, grace=2, **kw
    )


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()


def _bearer(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --------------------------------------------------------------------------------------------
# TLS and mutual TLS


@pytest.fixture(scope="module")
def tls_app(repo: Path, pki: Pki) -> Iterator[App]:
    with serve_in_thread(_settings(repo, tls_cert=pki.server_cert, tls_key=pki.server_key)) as app:
        yield app


def test_tls_serves_and_plaintext_fails(tls_app: App, pki: Pki, x: np.ndarray) -> None:
    for host in ("127.0.0.1", "localhost"):  # IP SAN and DNS SAN
        with tls_channel(f"{host}:{tls_app.port}", pki.ca) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert logits_of(stub.ModelInfer(infer_request(x), timeout=10)).shape == (3, 10)
    target = f"127.0.0.1:{tls_app.port}"
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    # A client that trusts another CA refuses the server's certificate.
    with tls_channel(target, pki.rogue_ca) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_tls_with_tritonclient(tls_app: App, pki: Pki, x: np.ndarray) -> None:
    client = tc.InferenceServerClient(
        f"localhost:{tls_app.port}", ssl=True, root_certificates=str(pki.ca)
    )
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert client.infer("digits", [inp]).as_numpy("logits").shape == (3, 10)
    client.close()


@pytest.fixture(scope="module")
def mtls_app(repo: Path, pki: Pki) -> Iterator[App]:
    settings = _settings(
        repo, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with serve_in_thread(settings) as app:
        yield app


def test_mutual_tls_requires_a_client_certificate(mtls_app: App, pki: Pki, x: np.ndarray) -> None:
    target = f"127.0.0.1:{mtls_app.port}"
    for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
        # No certificate, or one signed by a CA the server does not trust: no handshake.
        with tls_channel(target, pki.ca, cert, key) as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive
            assert _code(lambda: live(pb.ServerLiveRequest(), timeout=5)) == (  # noqa: B023
                grpc.StatusCode.UNAVAILABLE
            )
    with tls_channel(target, pki.ca, pki.client_cert, pki.client_key) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert logits_of(stub.ModelInfer(infer_request(x), timeout=10)).shape == (3, 10)


# --------------------------------------------------------------------------------------------
# Bearer tokens


@pytest.fixture(scope="module")
def token_app(repo: Path, token_file: Path) -> Iterator[App]:
    with serve_in_thread(_settings(repo, auth_token_file=token_file)) as app:
        yield app


def _stream(
    stub: pb_grpc.GRPCInferenceServiceStub, x: np.ndarray, metadata: object = None
) -> list[pb.ModelStreamInferResponse]:
    requests = [infer_request(x, request_id=str(i)) for i in range(3)]
    return list(stub.ModelStreamInfer(iter(requests), timeout=10, metadata=metadata))


def test_token_refuses_missing_and_wrong_tokens(token_app: App, x: np.ndarray) -> None:
    before = token_app.auth.rejected if token_app.auth else 0
    wrong = (
        None,
        (),
        _bearer("nope"),
        _bearer(TOKEN + "x"),
        _bearer(TOKEN[:-1]),
        _bearer(""),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"Basic {TOKEN}"),),
        (("x-token", TOKEN),),
    )
    with grpc.insecure_channel(f"127.0.0.1:{token_app.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for md in wrong:
            for call in (
                lambda md=md: stub.ModelInfer(infer_request(x), timeout=10, metadata=md),
                lambda md=md: stub.ServerLive(pb.ServerLiveRequest(), timeout=10, metadata=md),
                lambda md=md: _stream(stub, x, md),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
                assert err.value.details() == UNAUTHENTICATED_DETAIL
        # An unknown method is refused the same way: an anonymous caller learns nothing.
        unknown = channel.unary_unary("/inference.GRPCInferenceService/Nope")
        assert _code(lambda: unknown(b"", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: unknown(b"", timeout=5, metadata=_bearer())) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
    assert token_app.auth is not None
    assert token_app.auth.rejected - before == 3 * len(wrong) + 1


def test_token_accepts_the_right_one(token_app: App, x: np.ndarray) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_app.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for md in (_bearer(), (("authorization", f"bearer {TOKEN}"),)):  # scheme: any case
            assert logits_of(stub.ModelInfer(infer_request(x), timeout=10, metadata=md)).shape == (
                3,
                10,
            )
            replies = _stream(stub, x, md)
            assert sorted(r.infer_response.id for r in replies) == ["0", "1", "2"]
            assert not any(r.error_message for r in replies)


def test_token_with_tritonclient(token_app: App, x: np.ndarray) -> None:
    client = tc.InferenceServerClient(f"127.0.0.1:{token_app.port}")
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(tc.InferenceServerException) as err:
        client.infer("digits", [inp])
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_live(headers=headers)
    assert client.infer("digits", [inp], headers=headers).as_numpy("logits").shape == (3, 10)
    # Streaming: the headers go with start_stream.
    answers: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=headers
    )
    for i in range(5):
        client.async_stream_infer("digits", [inp], request_id=str(i))
    client.stop_stream()
    got = [answers.get(timeout=10) for _ in range(5)]
    assert all(e is None for _, e in got)
    assert sorted(r.get_response().id for r, _ in got) == [str(i) for i in range(5)]
    # ... and without them the stream is refused.
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    # The refusal may arrive before this send: then the send itself raises. Either way the
    # callback gets the status.
    with contextlib.suppress(tc.InferenceServerException):
        client.async_stream_infer("digits", [inp], request_id="x")
    _, error = answers.get(timeout=10)
    client.stop_stream()
    assert error is not None and "UNAUTHENTICATED" in str(error.status())
    client.close()


def _reflection_works(channel: grpc.Channel, metadata: object = None) -> bool:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata))
    return bool(replies[0].list_services_response.service)


def test_health_needs_the_token_by_default(token_app: App) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert _code(lambda: health.Check(HEALTH(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(HEALTH(), timeout=5, metadata=_bearer()).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert _code(lambda: _reflection_works(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert _reflection_works(channel, _bearer())


@pytest.fixture(scope="module")
def exempt_app(repo: Path, token_file: Path) -> Iterator[App]:
    settings = _settings(repo, auth_token_file=token_file, auth_exempt_health=True)
    with serve_in_thread(settings) as app:
        yield app


def test_health_exempt_when_configured(exempt_app: App, x: np.ndarray) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{exempt_app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "digits", "inference.GRPCInferenceService"):
            assert health.Check(HEALTH(service=service), timeout=5).status == serving
        watch = health.Watch(HEALTH(), timeout=5)  # the streaming RPC of Health too
        assert next(watch).status == serving
        watch.cancel()
        # Only Health: inference and reflection still need the token.
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(lambda: stub.ModelInfer(infer_request(x), timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(lambda: _reflection_works(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5, metadata=_bearer()).ready


# --------------------------------------------------------------------------------------------
# `bnserve health` and `bnserve serve` (subprocesses)


def _bnserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def secured_app(repo: Path, pki: Pki, token_file: Path) -> Iterator[App]:
    settings = _settings(
        repo,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_token_file=token_file,
    )
    with serve_in_thread(settings) as app:
        yield app


def test_health_cli_against_mutual_tls_and_token(
    secured_app: App, pki: Pki, token_file: Path
) -> None:
    target = ["--target", f"127.0.0.1:{secured_app.port}", "--timeout", "5"]
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
    tls += ["--tls-key", str(pki.client_key)]
    ok = _bnserve("health", *target, *tls, "--token-file", str(token_file))
    assert ok.returncode == 0, ok.stderr
    assert "(server): SERVING" in ok.stdout
    ok = _bnserve("health", *target, *tls, "--token-file", str(token_file), "--service", "digits")
    assert ok.returncode == 0 and "digits: SERVING" in ok.stdout
    no_token = _bnserve("health", *target, *tls)
    assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
    no_cert = _bnserve("health", *target, "--tls-ca", str(pki.ca), "--token-file", str(token_file))
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
    plaintext = _bnserve("health", *target, "--token-file", str(token_file))
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    half = _bnserve("health", *target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def test_serve_cli_with_tls_token_and_exempt_health(repo: Path, pki: Pki, token_file: Path) -> None:
    """The flags reach the server: TLS on, token required, Health exempt."""
    cmd = [sys.executable, "-m", "bnserve.cli", "serve", "--repo", str(repo), "--host"]
    cmd += ["127.0.0.1", "--port", "0", "--metrics-port", "-1", "--instances", "1"]
    cmd += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    cmd += ["--auth-token-file", str(token_file), "--auth-exempt-health"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(
                r"serving .* on 127\.0\.0\.1:(\d+) \(TLS, bearer token, health exempt", line
            )
            port = int(m.group(1)) if m else None
        assert port, "server did not report its port"
        target = ["--target", f"localhost:{port}", "--tls-ca", str(pki.ca)]
        ok = _bnserve("health", *target)  # exempt: no token needed
        assert ok.returncode == 0, ok.stderr
        with tls_channel(f"localhost:{port}", pki.ca) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert _code(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=_bearer()).live
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{server_cert}"], "tls_cert needs tls_key"),
        (["--tls-key", "{server_key}"], "tls_key needs tls_cert"),
        (["--tls-client-ca", "{ca}"], "needs tls_cert and tls_key"),
        (["--tls-cert", "{missing}", "--tls-key", "{server_key}"], "certificate file not found"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{client_key}"], "does not belong"),
        (["--tls-cert", "{server_key}", "--tls-key", "{server_key}"], "not a PEM certificate"),
        (["--auth-token-file", "{empty}"], "token file is empty"),
        (["--auth-token-file", "{missing}"], "token file not found"),
        (["--port", "70000"], "--port: "),
    ],
)
def test_serve_cli_refuses_bad_security_settings(
    flags: list[str], message: str, pki: Pki, tmp_path: Path, repo: Path
) -> None:
    (tmp_path / "empty").write_text(" \n")
    paths = {
        "server_cert": pki.server_cert,
        "server_key": pki.server_key,
        "client_key": pki.client_key,
        "ca": pki.ca,
        "missing": tmp_path / "missing.pem",
        "empty": tmp_path / "empty",
    }
    args = [f.format(**paths) for f in flags]
    proc = _bnserve("serve", "--repo", str(repo), "--port", "0", "--metrics-port", "-1", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("bnserve serve: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Unit checks of the start-time validation


def test_settings_and_env(monkeypatch: pytest.MonkeyPatch, pki: Pki, token_file: Path) -> None:
    monkeypatch.setenv("BNSERVE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("BNSERVE_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("BNSERVE_TLS_CLIENT_CA", str(pki.ca))
    monkeypatch.setenv("BNSERVE_AUTH_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("BNSERVE_AUTH_EXEMPT_HEALTH", "true")
    s = Settings()
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server_cert, pki.server_key, pki.ca)
    assert s.tls and s.auth_token_file == token_file and s.auth_exempt_health
    assert TOKEN not in s.summary()  # the path is printed, never the token
    monkeypatch.delenv("BNSERVE_TLS_KEY")
    with pytest.raises(ValidationError, match="tls_cert needs tls_key"):
        Settings()


def test_server_credentials_validation(pki: Pki, tmp_path: Path) -> None:
    assert server_credentials(None, None) is None
    assert server_credentials(pki.server_cert, pki.server_key) is not None
    assert server_credentials(pki.server_cert, pki.server_key, pki.ca) is not None
    with pytest.raises(SecurityConfigError, match="needs --tls-cert and --tls-key"):
        server_credentials(None, None, pki.ca)
    with pytest.raises(SecurityConfigError, match="is a directory"):
        server_credentials(tmp_path, pki.server_key)
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(SecurityConfigError, match="encrypted"):
        server_credentials(pki.server_cert, encrypted)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityConfigError, match=r"--tls-client-ca .*not PEM CA"):
        server_credentials(pki.server_cert, pki.server_key, garbage)


def test_read_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\t{TOKEN}\r\n")
    assert read_token_file(path) == TOKEN
    for bad, message in (
        ("", "empty"),
        ("  \n\n", "empty"),
        ("two words", "whitespace"),
        ("line1\nline2", "whitespace"),
        ("tök€n", "ASCII"),
    ):
        path.write_text(bad)
        with pytest.raises(SecurityConfigError, match=message):
            read_token_file(path)
    with pytest.raises(SecurityConfigError, match="empty"):
        BearerTokenInterceptor("")


def test_interceptor_authorized_and_exempt() -> None:
    auth = BearerTokenInterceptor(TOKEN)
    assert auth.authorized(_bearer())
    assert auth.authorized((("other", "x"), *_bearer()))
    assert auth.authorized((("authorization", "nope"), *_bearer()))  # any matching header
    assert not auth.authorized((("authorization", f"Bearer{TOKEN}"),))
    assert not auth.authorized(None)
    assert not auth.authorized((("authorization-bin", TOKEN.encode()),))
    assert not auth.exempt("/grpc.health.v1.Health/Check")
    exempt = BearerTokenInterceptor(TOKEN, exempt_health=True)
    assert exempt.exempt("/grpc.health.v1.Health/Check")
    assert exempt.exempt("/grpc.health.v1.Health/Watch")
    assert not exempt.exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not exempt.exempt("/inference.GRPCInferenceService/ServerLive")


# --------------------------------------------------------------------------------------------
# Message size limits


@pytest.fixture(scope="module")
def small_app(repo: Path) -> Iterator[App]:
    with serve_in_thread(_settings(repo, max_message_mb=1)) as app:
        yield app


def test_oversized_message_is_resource_exhausted_and_server_goes_on(
    small_app: App, x: np.ndarray
) -> None:
    big = np.zeros((5000, 1, 8, 8), np.float32)  # 1.28 MB of tensor data > 1 MiB
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{small_app.port}", options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(infer_request(big), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SERVER: Received message larger than max" in (err.value.details() or "")
            assert logits_of(stub.ModelInfer(infer_request(x), timeout=10)).shape == (3, 10)
        # In a stream: the stream ends with RESOURCE_EXHAUSTED; a new stream works.
        requests = [infer_request(x, request_id="a"), infer_request(big, request_id="b")]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter(requests), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        replies = list(stub.ModelStreamInfer(iter([infer_request(x, request_id="c")]), timeout=10))
        assert [r.infer_response.id for r in replies] == ["c"]
    # A 1 MiB server answers a default client normally.
    client = tc.InferenceServerClient(f"127.0.0.1:{small_app.port}")
    assert client.is_server_ready()
    client.close()
