"""`--frontend auto` (the default): native when built and every setting is one it supports,
else Python; one log line says which and why."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.config import Settings
from bnserve.server.frontend import BINARY_ENV, binary, choose
from bnserve.server.process import ServerProcess

BUNDLED = Path(__file__).resolve().parents[2] / "model_repository"


def test_auto_is_native_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    exe = binary()  # make test builds it
    monkeypatch.setenv(BINARY_ENV, str(exe))
    assert choose(Settings(repo=BUNDLED)) == (
        "native",
        f"auto: the native front end is built ({exe})",
    )


def test_auto_is_python_when_native_is_not_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "bnserve_native"
    monkeypatch.setenv(BINARY_ENV, str(missing))
    frontend, why = choose(Settings(repo=BUNDLED))
    assert frontend == "python"
    assert f"not built ({missing})" in why and "`make native` builds it" in why


@pytest.mark.parametrize(
    ("settings", "lacks"),
    [
        ({"poll": 2.0}, "--poll"),
        ({"lame_duck": 1.0}, "--lame-duck"),
        ({"workers": 2}, "--workers"),
        ({"drift_sample_rate": 0.5}, "--drift-sample-rate"),
    ],
)
def test_auto_is_python_when_a_setting_needs_it(settings: dict, lacks: str) -> None:  # type: ignore[type-arg]
    frontend, why = choose(Settings(repo=BUNDLED, **settings))
    assert frontend == "python" and why.startswith("auto: the native front end lacks ")
    assert lacks in why


@pytest.mark.parametrize("asked", ["python", "native"])
def test_an_explicit_frontend_is_taken_as_asked(asked: str) -> None:
    assert choose(Settings(repo=BUNDLED, frontend=asked)) == (asked, f"--frontend {asked}")  # type: ignore[arg-type]


@pytest.mark.parametrize("built", [True, False], ids=["built", "not-built"])
def test_bnserve_serve_logs_its_choice_and_serves(
    built: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(binary()) if built else str(tmp_path / "none"))
    server = ServerProcess(BUNDLED, "--instances", "1")
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=30).ready
    finally:
        rc = server.stop(60)
    log = "".join(server.log)
    lines = [ln for ln in server.log if "front end: " in ln]
    assert len(lines) == 1, log[-2000:]
    if built:
        assert "front end: native (auto: the native front end is built" in lines[0]
        assert "bnserve-native:" in log
    else:
        assert "front end: python (auto: the native front end is not built" in lines[0]
        assert "bnserve-native:" not in log
    assert rc == 0 and "stopped cleanly" in log
