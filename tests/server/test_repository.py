"""server/repository.py: scanning, version policies, refusals, path safety, hot reload.

Real onnxruntime and real files: small Conv+BN+Relu+Flatten+Gemm models built with onnx.helper,
and the freshly trained digits model from the `digits_repo` fixture (copied before any change).
Polls are driven by awaiting poll_once(), never by sleeping; every wait loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_nets import bn_net

from bnserve.server import repository as repo_mod
from bnserve.server.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ShuttingDownError,
)
from bnserve.server.model import session_options
from bnserve.server.repository import (
    BatchingSettings,
    IndexEntry,
    Repository,
    ServedModel,
    parse_config,
    validate_model_name,
)

OPSET = 17
LOGGER = "bnserve.server.repository"
T = TypeVar("T")


# ---------------------------------------------------------------------------- helpers


def _relu_net(in_shape: list[Any], transpose: bool = False) -> onnx.ModelProto:
    """y = relu(x), or y = transpose(x) (a different first dimension), on a declared shape."""
    node = (
        helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])
        if transpose
        else helper.make_node("Relu", ["x"], ["y"])
    )
    out_shape = list(reversed(in_shape)) if transpose else in_shape
    graph = helper.make_graph(
        [node],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _put(root: Path, name: str, version: int | str, model: onnx.ModelProto | bytes) -> Path:
    """Write <root>/<name>/<version>/model.onnx atomically (temp file + rename), as a
    deployment should."""
    d = root / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    tmp = d / ".model.onnx.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, d / "model.onnx")
    return d / "model.onnx"


def _config(root: Path, name: str, config: dict[str, Any] | str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (root / name / "config.json").write_text(text)


def _x(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)


def _direct(path: Path | str, x: np.ndarray, input_name: str = "x") -> np.ndarray:
    """The model file run alone, one intra-op thread: what the server must return."""
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {input_name: x})[0])


class Events:
    """Records on_change and on_load_failure calls."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []
        self.failures: list[tuple[str, str, str]] = []

    def on_change(self, name: str, ready: bool) -> None:
        self.changes.append((name, ready))

    def on_load_failure(self, name: str, version: str, reason: str) -> None:
        self.failures.append((name, version, reason))


def _repo(root: Path, events: Events | None = None, **kw: Any) -> Repository:
    return Repository(
        root,
        instances=kw.pop("instances", 1),
        on_change=events.on_change if events else None,
        on_load_failure=events.on_load_failure if events else None,
        **kw,
    )


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await main()

    return asyncio.run(wrapper())


def _states(repo: Repository, name: str) -> dict[str, str]:
    return {e.version: e.state for e in repo.index() if e.name == name}


def _entry(repo: Repository, name: str, version: str) -> IndexEntry:
    (entry,) = [e for e in repo.index() if e.name == name and e.version == version]
    return entry


async def _until(cond: Callable[[], bool], what: str, tries: int = 500) -> None:
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------------------- names and config


@pytest.mark.parametrize(
    "name", ["../x", "..", "a/b", "a\\b", "/etc", "a\x00b", "", ".hidden", "C:x", "a\nb"]
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_model_name(name)


def test_parse_config_defaults_and_policies() -> None:
    cfg = parse_config("m", None)
    assert not cfg.present and cfg.max_batch_size is None
    assert cfg.version_policy.describe() == "latest 1"
    cfg = parse_config(
        "m",
        {
            "max_batch_size": 8,
            "version_policy": {"specific": {"versions": [3, 1]}},
            "instances": 2,
            "batching": {"preferred_batch_sizes": [4, 2], "max_queue_delay_us": 100},
            "labels": ["a", "b"],
        },
    )
    assert cfg.version_policy.candidates([1, 2, 3]) == [3, 1]
    assert cfg.batching.preferred_batch_sizes == (2, 4)
    assert cfg.instances == 2 and cfg.labels == ("a", "b")
    assert parse_config("m", {"version_policy": {"all": {}}}).version_policy.kind == "all"
    for bad, match in [
        ({"max_batch_size": "8"}, "max_batch_size must be an integer"),
        ({"max_batch_size": True}, "max_batch_size must be an integer"),
        ({"instances": 0}, "instances must be >= 1"),
        ({"version_policy": {"newest": {}}}, "version_policy must be one of"),
        ({"version_policy": {"specific": {"versions": []}}}, "non-empty"),
        ({"name": "other"}, "names the model 'other'"),
        ({"platform": "pytorch_libtorch"}, "only 'onnxruntime_onnx'"),
        ({"inputs": [{"datatype": "FP32"}]}, r"inputs\[0\]\.name"),
        ([1, 2], "must be a JSON object"),
    ]:
        with pytest.raises(ModelLoadError, match=match):
            parse_config("m", bad)


# ---------------------------------------------------------------------------- load_all


def test_load_all_versions_policies_and_serving(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for v in (1, 2, 3):
        _put(root, "latest1", v, bn_net(seed=v))
        _put(root, "latest2", v, bn_net(seed=v))
        _put(root, "specific", v, bn_net(seed=v))
    _config(root, "latest2", {"version_policy": {"latest": {"num_versions": 2}}})
    _config(root, "specific", {"version_policy": {"specific": {"versions": [1, 3, 7]}}})
    for v in (1, 2):
        _put(root, "all", v, bn_net(seed=10 + v))
    _config(
        root,
        "all",
        {
            "version_policy": {"all": {}},
            "max_batch_size": 16,
            "instances": 2,
            "batching": {
                "preferred_batch_sizes": [4, 8],
                "max_queue_delay_us": 500,
                "max_combined_batch_size": 8,
            },
            "labels": [str(i) for i in range(10)],
        },
    )
    _put(root, "fixed", 1, _relu_net([2, 3]))
    (root / "notes").mkdir()  # a directory without versions
    (root / ".git").mkdir()  # hidden: not a model
    (root / "latest1" / "01").mkdir()  # not a canonical version name: ignored
    (root / "README").write_text("not a model")
    events = Events()

    async def main() -> None:
        repo = _repo(root, events)
        await repo.load_all()
        try:
            assert repo.names() == ["all", "fixed", "latest1", "latest2", "notes", "specific"]
            assert _states(repo, "latest1") == {
                "1": "UNAVAILABLE",
                "2": "UNAVAILABLE",
                "3": "READY",
            }
            assert "not selected by version_policy latest 1" in _entry(repo, "latest1", "1").reason
            assert _states(repo, "latest2") == {"1": "UNAVAILABLE", "2": "READY", "3": "READY"}
            assert _states(repo, "specific") == {"1": "READY", "2": "UNAVAILABLE", "3": "READY"}
            assert _states(repo, "all") == {"1": "READY", "2": "READY"}
            assert _states(repo, "notes") == {"": "UNAVAILABLE"}
            assert "no version directory" in _entry(repo, "notes", "").reason

            assert repo.get("latest1").version == "3"
            assert repo.get("latest2").version == "3"
            assert repo.get("latest2", "2").version == "2"
            assert repo.get("specific").version == "3"
            assert repo.ready("all", "1") and repo.ready("all", "2") and repo.ready("all")
            assert not repo.ready("latest1", "2") and not repo.ready("notes")

            # Derived configuration (no config.json): dynamic batch axis -> 64.
            s = repo.get("latest1")
            assert isinstance(s, ServedModel)
            assert not s.config.present
            assert s.max_batch_size == s.spec.max_batch_size == 64
            assert s.batcher.config.max_batch_size == 64
            assert s.instance_count == 1
            assert len(s.sha256) == 64
            # config.json settings.
            a = repo.get("all", "2")
            assert a.max_batch_size == 16 and a.instance_count == 2
            assert a.preferred_batch_sizes == (4, 8) and a.max_queue_delay_us == 500
            assert a.batcher.config.combine_limit == 8 and s.batcher.config.combine_limit == 64
            assert a.labels == tuple(str(i) for i in range(10))
            assert a.config.raw["version_policy"] == {"all": {}}

            # Served numerics equal the file run alone, per version.
            x = _x(5)
            for name, version in [("latest1", "3"), ("latest2", "2"), ("all", "1")]:
                got = await repo.get(name, version).batcher.submit({"x": x})
                path = root / name / version / "model.onnx"
                assert np.array_equal(got["logits"], _direct(path, x))

            # A fixed-shape model: max_batch_size 0, served one request at a time.
            f = repo.get("fixed")
            assert f.max_batch_size == 0 and f.batcher.config.max_batch_size == 2
            xf = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)
            outs = await asyncio.gather(*(f.batcher.submit({"x": xf}) for _ in range(4)))
            for out in outs:
                assert np.array_equal(out["y"], np.maximum(xf, 0))
        finally:
            await repo.close(1.0)
        assert not repo.ready("latest1")

    run(main)
    assert sorted(c for c in events.changes if c[1]) == [
        (n, True) for n in ["all", "fixed", "latest1", "latest2", "specific"]
    ]
    assert ("notes", False) in events.changes
    # close() reports every ready model as not ready.
    assert events.changes.count(("latest1", False)) == 1


def test_loading_runs_on_worker_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    _put(root, "m", 1, bn_net(seed=0))
    threads: list[threading.Thread] = []
    real = repo_mod.load_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(repo_mod, "load_model", spy)

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        assert repo.ready("m")
        await repo.close(1.0)

    run(main)
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_loading_state_is_visible_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    _put(root, "slow", 1, bn_net(seed=0))
    gate = threading.Event()
    real = repo_mod.load_model

    def gated(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(30), "gate never opened"
        return real(*args, **kwargs)

    monkeypatch.setattr(repo_mod, "load_model", gated)

    async def main() -> None:
        repo = _repo(root)
        loading = asyncio.create_task(repo.load_all())
        await _until(lambda: _states(repo, "slow") == {"1": "LOADING"}, "the LOADING state")
        with pytest.raises(ModelNotReadyError, match="LOADING"):
            repo.get("slow", "1")
        assert not repo.ready("slow")
        gate.set()  # the event loop kept running while the load waited on its thread
        await asyncio.wait_for(loading, 30)
        assert _states(repo, "slow") == {"1": "READY"}
        await repo.close(1.0)

    run(main)


def test_unexpected_load_error_refuses_only_that_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    _put(root, "a", 1, bn_net(seed=0))
    _put(root, "b", 1, bn_net(seed=0))
    real = repo_mod.load_model

    def flaky(path: Any, **kwargs: Any) -> Any:
        if kwargs["name"] == "a":
            raise RuntimeError("boom")
        return real(path, **kwargs)

    monkeypatch.setattr(repo_mod, "load_model", flaky)

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        assert repo.ready("b") and not repo.ready("a")
        assert "RuntimeError: boom" in _entry(repo, "a", "1").reason
        await repo.close(1.0)

    run(main)


# ---------------------------------------------------------------------------- errors and refusals


def test_get_errors_not_found_vs_not_ready(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _put(root, "good", 1, bn_net(seed=0))
    _put(root, "good", 2, bn_net(seed=2))
    _put(root, "broken", 1, b"definitely not onnx")

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        try:
            with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope'.*broken, good"):
                repo.get("nope")
            with pytest.raises(ModelNotFoundError, match=r"no version '9'.*1 \(UNAVAILABLE\)"):
                repo.get("good", "9")
            with pytest.raises(ModelNotFoundError):
                repo.get("../good")
            with pytest.raises(ModelNotReadyError, match="not selected by version_policy"):
                repo.get("good", "1")
            with pytest.raises(ModelNotReadyError, match=r"no ready version.*not a readable ONNX"):
                repo.get("broken")
            with pytest.raises(ModelNotReadyError, match="not a readable ONNX"):
                repo.get("broken", "1")
            assert repo.get("good").version == "2"
            assert ModelNotFoundError("x").status_code == "NOT_FOUND"
            assert ModelNotReadyError("x").status_code == "UNAVAILABLE"
        finally:
            await repo.close(1.0)

    run(main)


def test_refused_models_are_reported_and_do_not_block_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    good = bn_net(seed=0)
    raw = good.SerializeToString()
    _put(root, "good", 1, good)
    _put(root, "training_bn", 1, bn_net(training_mode=1))
    _put(root, "truncated", 1, raw[: len(raw) // 2])
    _put(root, "not_onnx", 1, b"\x00\xffthis is not a protobuf" * 10)
    _put(root, "bad_json", 1, good)
    _config(root, "bad_json", '{"max_batch_size": 8,')
    _put(root, "bad_type", 1, good)
    _config(root, "bad_type", {"max_batch_size": "lots"})
    _put(root, "stale_config", 1, good)
    _config(root, "stale_config", {"inputs": [{"name": "input", "datatype": "FP32"}]})
    _put(root, "too_preferred", 1, good)
    _config(root, "too_preferred", {"batching": {"preferred_batch_sizes": [128]}})
    _put(root, "too_combined", 1, good)
    _config(root, "too_combined", {"batching": {"max_combined_batch_size": 65}})
    _put(root, "zero_combined", 1, good)
    _config(root, "zero_combined", {"batching": {"max_combined_batch_size": 0}})
    _put(root, "fixed_but_batched", 1, _relu_net([2, 3]))
    _config(root, "fixed_but_batched", {"max_batch_size": 8})
    _put(root, "mixed_dims", 1, _relu_net([2, 3], transpose=True))
    events = Events()
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        repo = _repo(root, events)
        await repo.load_all()
        try:
            assert repo.ready("good")
            assert np.array_equal(
                (await repo.get("good").batcher.submit({"x": _x(3)}))["logits"],
                _direct(root / "good" / "1" / "model.onnx", _x(3)),
            )
            expect = {
                "training_bn": ("1", "training mode"),
                "truncated": ("1", "ONNX"),
                "not_onnx": ("1", "ONNX"),
                "bad_json": ("1", "config.json refused: not valid JSON"),
                "bad_type": ("1", "config.json refused: max_batch_size must be an integer"),
                "stale_config": ("1", r"declares inputs \['input'\] but model.onnx has \['x'\]"),
                "too_preferred": ("1", r"preferred_batch_sizes \[128\] not in \[1, 64\]"),
                "too_combined": ("1", r"max_combined_batch_size must be in \[1, 64\], got 65"),
                "zero_combined": ("1", "batching.max_combined_batch_size must be >= 1, got 0"),
                "fixed_but_batched": ("1", "needs a dynamic first axis"),
                "mixed_dims": ("1", "different first dimensions"),
            }
            for name, (version, reason) in expect.items():
                entry = _entry(repo, name, version)
                assert entry.state == "UNAVAILABLE", name
                assert re.search(reason, entry.reason), (name, entry.reason)
                assert not repo.ready(name)
                with pytest.raises(ModelNotReadyError):
                    repo.get(name)
        finally:
            await repo.close(1.0)

    run(main)
    warnings = _warnings(caplog)
    # ONE line per refusal, naming the model.
    assert len(warnings) == 11, warnings
    refused = {name for name, _, _ in events.failures}
    assert refused == {
        "training_bn",
        "truncated",
        "not_onnx",
        "bad_json",
        "bad_type",
        "stale_config",
        "too_preferred",
        "too_combined",
        "zero_combined",
        "fixed_but_batched",
        "mixed_dims",
    }
    assert ("good", True) in events.changes and ("truncated", False) in events.changes


# ---------------------------------------------------------------------------- path safety


def test_path_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    outside = tmp_path / "outside"
    _put(outside, "victim", 1, bn_net(seed=0))  # a perfectly good model, but outside the root
    _put(root, "good", 1, bn_net(seed=0))
    # A version directory that is a symlink leaving the root.
    (root / "linked_version").mkdir(parents=True)
    (root / "linked_version" / "1").symlink_to(outside / "victim" / "1")
    # A model directory that is a symlink leaving the root.
    (root / "linked_model").symlink_to(outside / "victim")
    # model.onnx itself a symlink leaving the root.
    (root / "linked_file" / "1").mkdir(parents=True)
    (root / "linked_file" / "1" / "model.onnx").symlink_to(outside / "victim" / "1" / "model.onnx")
    # A symlink that stays inside the root is fine.
    (root / "alias").symlink_to(root / "good")

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        try:
            assert repo.ready("good") and repo.ready("alias")
            for name, version in [
                ("linked_version", "1"),
                ("linked_model", ""),
                ("linked_file", "1"),
            ]:
                entry = _entry(repo, name, version)
                assert entry.state == "UNAVAILABLE"
                assert "outside the repository" in entry.reason, entry
                assert not repo.ready(name)
            for bad in ["../outside/victim", "..", "/etc", "good/../../outside", "a\x00b", "x\\y"]:
                with pytest.raises(InvalidInputError):
                    await repo.load(bad)
            with pytest.raises(ModelNotFoundError, match="no model directory 'victim'"):
                await repo.load("victim")
            with pytest.raises(ModelLoadError, match="outside the repository"):
                await repo.load("linked_version")
            assert "victim" not in repo.names() and "../outside/victim" not in repo.names()
        finally:
            await repo.close(1.0)

    run(main)


# ---------------------------------------------------------------------------- hot reload


def _shifted_digits(path: Path, delta: float) -> onnx.ModelProto:
    """The digits model with `delta` added to the bias of its last Gemm: different logits."""
    model = onnx.load(str(path))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    bias = gemm.input[2]
    for init in model.graph.initializer:
        if init.name == bias:
            arr = numpy_helper.to_array(init) + np.float32(delta)
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), bias))
            return model
    raise AssertionError("no Gemm bias initializer")


def test_hot_reload_swaps_versions_safely(
    digits_repo: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(digits_repo, root)
    v1_path = root / "digits" / "1" / "model.onnx"
    x = np.random.default_rng(3).uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)
    want_v1 = _direct(v1_path, x, "input")
    events = Events()
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        repo = _repo(root, events, instances=1, grace=30.0)
        await repo.load_all()
        try:
            v1 = repo.get("digits")
            assert v1.version == "1" and v1.labels == tuple(str(i) for i in range(10))
            assert v1.max_batch_size == 64  # from config.json

            # Hold v1's only session so that its requests are really in flight during the swap.
            gate = threading.Event()
            real_run = v1.loaded.pool.run

            def gated_run(*args: Any, **kwargs: Any) -> Any:
                assert gate.wait(30), "gate never opened"
                return real_run(*args, **kwargs)

            monkeypatch.setattr(v1.loaded.pool, "run", gated_run)
            in_flight = [
                asyncio.create_task(repo.get("digits").batcher.submit({"input": x[i : i + 1]}))
                for i in range(3)
            ]
            await _until(lambda: v1.batcher.in_flight >= 1, "v1 requests in flight")

            # Version 2 appears: loaded and gated on a thread, then swapped in.
            v2_model = _shifted_digits(v1_path, 1.0)
            v2_path = _put(root, "digits", 2, v2_model)
            await repo.poll_once()
            v2 = repo.get("digits")
            assert v2.version == "2" and v2 is not v1
            assert v1.batcher.closed  # retired: accepts nothing new...
            assert not any(t.done() for t in in_flight)  # ...but its requests are still running
            with pytest.raises(ShuttingDownError):
                await v1.batcher.submit({"input": x[:1]})
            got2 = await v2.batcher.submit({"input": x})
            assert np.array_equal(got2["logits"], _direct(v2_path, x, "input"))
            assert not np.array_equal(got2["logits"], want_v1)

            # The in-flight requests on v1 complete, with v1's answers.
            gate.set()
            done = await asyncio.wait_for(asyncio.gather(*in_flight), 30)
            for i, out in enumerate(done):
                assert np.array_equal(out["logits"], want_v1[i : i + 1])
            await _until(lambda: v1.loaded.pool.closed, "v1 sessions closed after draining")
            assert _states(repo, "digits") == {"1": "UNAVAILABLE", "2": "READY"}

            # A broken version 3 is refused; v2 keeps serving; not retried while unchanged.
            raw = v2_model.SerializeToString()
            _put(root, "digits", 3, raw[: len(raw) // 3])
            await repo.poll_once()
            await repo.poll_once()
            assert repo.get("digits") is v2
            e3 = _entry(repo, "digits", "3")
            assert e3.state == "UNAVAILABLE" and "ONNX" in e3.reason
            assert [w for w in _warnings(caplog) if "version 3" in w] == [
                f"model digits version 3 refused: {e3.reason}"
            ]
            assert [f[:2] for f in events.failures] == [("digits", "3")]
            # Changed (still broken): tried again, once.
            _put(root, "digits", 3, b"not onnx at all")
            await repo.poll_once()
            await repo.poll_once()
            assert len([w for w in _warnings(caplog) if "version 3" in w]) == 2
            assert repo.get("digits") is v2

            # Deleting the served version unloads it: the next best version serves again.
            shutil.rmtree(root / "digits" / "2")
            await repo.poll_once()
            assert "2" not in _states(repo, "digits")
            with pytest.raises(ModelNotFoundError):
                repo.get("digits", "2")
            again = repo.get("digits")
            assert again.version == "1" and again is not v1
            assert np.array_equal((await again.batcher.submit({"input": x}))["logits"], want_v1)
            await _until(lambda: v2.loaded.pool.closed, "v2 sessions closed")

            # Every version gone: not ready; the model directory gone: not known any more.
            shutil.rmtree(root / "digits" / "1")
            shutil.rmtree(root / "digits" / "3")
            await repo.poll_once()
            assert not repo.ready("digits") and "digits" in repo.names()
            with pytest.raises(ModelNotReadyError):
                repo.get("digits")
            shutil.rmtree(root / "digits")
            await repo.poll_once()
            assert repo.names() == []
            with pytest.raises(ModelNotFoundError):
                repo.get("digits")
        finally:
            await repo.close(1.0)

    run(main)
    assert events.changes == [("digits", True), ("digits", False)]


def test_changed_file_of_same_version_and_config_changes(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    p = _put(root, "m", 1, bn_net(seed=1))
    x = _x(4)

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        try:
            first = repo.get("m")
            # Touched, not changed: same sha256, nothing reloaded.
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
            await repo.poll_once()
            assert repo.get("m") is first

            # Replaced by another model under the same version: reloaded, swapped, old drained.
            _put(root, "m", 1, bn_net(seed=2))
            await repo.poll_once()
            second = repo.get("m")
            assert second is not first and second.version == "1"
            assert second.sha256 != first.sha256
            assert np.array_equal((await second.batcher.submit({"x": x}))["logits"], _direct(p, x))
            await _until(lambda: first.loaded.pool.closed, "first sessions closed")

            # Replaced by a broken file: refused, the previous file keeps serving.
            _put(root, "m", 1, bn_net(seed=3, training_mode=1))
            await repo.poll_once()
            assert repo.get("m") is second
            entry = _entry(repo, "m", "1")
            assert entry.state == "READY" and "new one was refused" in entry.reason
            assert "training mode" in entry.reason

            # Fixed again, and config.json appears with new settings: reloaded with them.
            _put(root, "m", 1, bn_net(seed=4))
            _config(root, "m", {"instances": 2, "batching": {"max_queue_size": 7}})
            await repo.poll_once()
            third = repo.get("m")
            assert third is not second and third.instance_count == 2
            assert third.max_queue_size == 7 and _entry(repo, "m", "1").reason == ""

            # A malformed config.json: refused, the running configuration keeps serving.
            _config(root, "m", "{broken")
            await repo.poll_once()
            assert repo.get("m") is third
            assert "config.json refused" in _entry(repo, "m", "1").reason
            # The version policy changes to "all" and version 2 appears: both served.
            _put(root, "m", 2, bn_net(seed=5))
            _config(root, "m", {"version_policy": {"all": {}}})
            await repo.poll_once()
            assert _states(repo, "m") == {"1": "READY", "2": "READY"}
            assert repo.get("m").version == "2"
        finally:
            await repo.close(1.0)

    run(main)


def test_unload_and_explicit_load(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _put(root, "m", 1, bn_net(seed=0))
    _put(root, "bad", 1, bn_net(training_mode=1))
    events = Events()

    async def main() -> None:
        repo = _repo(root, events)
        await repo.load_all()
        try:
            served = repo.get("m")
            pending = asyncio.create_task(served.batcher.submit({"x": _x(2)}))
            await asyncio.sleep(0)  # queued before the unload
            await repo.unload("m")
            assert (await pending)["logits"].shape == (2, 10)  # drained, not dropped
            assert served.loaded.pool.closed
            with pytest.raises(ModelNotReadyError, match="unloaded"):
                repo.get("m")
            assert _entry(repo, "m", "1") == IndexEntry("m", "1", "UNAVAILABLE", "unloaded")
            await repo.poll_once()  # an unloaded model stays unloaded across polls
            assert not repo.ready("m")

            await repo.load("m")
            assert repo.ready("m") and repo.get("m") is not served
            # load() reloads from disk now even when nothing changed.
            current = repo.get("m")
            await repo.load("m")
            assert repo.get("m") is not current

            with pytest.raises(ModelLoadError, match=r"could not be loaded: version 1: .*training"):
                await repo.load("bad")
            with pytest.raises(ModelNotFoundError):
                await repo.load("absent")
            with pytest.raises(ModelNotFoundError):
                await repo.unload("absent")
            with pytest.raises(InvalidInputError):
                await repo.unload("../m")

            # A model added after start-up and loaded explicitly.
            _put(root, "late", 3, bn_net(seed=9))
            await repo.load("late")
            assert repo.get("late").version == "3"
        finally:
            await repo.close(1.0)

    run(main)
    assert [c for c in events.changes if c[0] == "m"] == [
        ("m", True),
        ("m", False),
        ("m", True),
        ("m", False),  # close()
    ]
    assert ("bad", False) in events.changes and ("late", True) in events.changes


def test_close_drains_accepted_requests(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    p = _put(root, "m", 1, bn_net(seed=0))
    x = _x(8)

    async def main() -> None:
        repo = _repo(root, instances=2)
        await repo.load_all()
        served = repo.get("m")
        tasks = [asyncio.create_task(served.batcher.submit({"x": x[i : i + 1]})) for i in range(8)]
        await asyncio.sleep(0)
        await repo.close(10.0)
        outs = await asyncio.gather(*tasks)
        want = _direct(p, x)
        for i, out in enumerate(outs):
            assert np.array_equal(out["logits"], want[i : i + 1])
        assert served.loaded.pool.closed
        with pytest.raises(ModelNotReadyError):
            repo.get("m")
        await repo.poll_once()  # no-op once closed
        with pytest.raises(ShuttingDownError):
            await repo.load("m")
        assert repo.index() == [IndexEntry("m", "1", "UNAVAILABLE", "server shutting down")]

    run(main)


def test_missing_root_and_poll_forever(tmp_path: Path) -> None:
    async def missing() -> None:
        with pytest.raises(FileNotFoundError):
            await _repo(tmp_path / "nope").load_all()

    run(missing)

    root = tmp_path / "repo"
    root.mkdir()

    async def main() -> None:
        repo = _repo(root)
        await repo.load_all()
        assert repo.names() == []
        poller = asyncio.create_task(repo.poll_forever(0.02))
        _put(root, "m", 1, bn_net(seed=0))
        await _until(lambda: repo.ready("m"), "the poller to load a new model")
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller
        await repo.close(1.0)

    run(main)


def test_batching_settings_round_trip_through_config_json() -> None:
    for b in (
        BatchingSettings(),
        BatchingSettings(
            max_queue_delay_us=100,
            preferred_batch_sizes=(2, 4),
            max_queue_size=7,
            max_combined_batch_size=4,
        ),
    ):
        assert parse_config("m", {"batching": b.to_json()}).batching == b
    assert "max_combined_batch_size" not in BatchingSettings().to_json()
