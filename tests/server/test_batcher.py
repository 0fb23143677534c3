"""server/batcher.py: dynamic batching on real onnxruntime sessions.

Where a test needs a session to stay busy, `GatedPool` (a real SessionPool) holds each run at a
threading.Event until the test opens it: ordering is then decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_nets import bn_net, finish

from bnserve.server.batcher import Batcher, BatchingConfig, Outcome
from bnserve.server.errors import (
    BnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
)
from bnserve.server.model import SessionPool

T = TypeVar("T")
WAIT = 10.0  # upper bound for any single wait; tests normally finish in milliseconds


def _save(graph: onnx.GraphProto | onnx.ModelProto, path: Path) -> Path:
    onnx.save(graph if isinstance(graph, onnx.ModelProto) else finish(graph), path)
    return path


def _free_dim_net() -> onnx.GraphProto:
    """y = Relu(x) * 3 on (N, L): requests with different L must never be merged."""
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    return helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "three"], ["y"])],
        "free_dim",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])],
        [three],
    )


def _gather_net() -> onnx.GraphProto:
    """y = table[idx]: onnxruntime fails at run time for an index out of range."""
    table = numpy_helper.from_array(np.array([10.0, 20.0, 30.0], dtype=np.float32), "table")
    return helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [table],
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batcher_models")
    return {
        "bn": _save(bn_net(), d / "bn.onnx"),
        "free": _save(_free_dim_net(), d / "free.onnx"),
        "gather": _save(_gather_net(), d / "gather.onnx"),
    }


class GatedPool(SessionPool):
    """A real SessionPool whose runs wait for `gate`, and which counts what it computed."""

    def __init__(self, path: Path, instances: int, *, open_gate: bool = False) -> None:
        super().__init__(path, instances)
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self._cond = threading.Condition()
        self.calls = 0
        self.rows_run = 0

    def run(
        self, arrays: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        with self._cond:
            self.calls += 1
            self.rows_run += next(iter(arrays.values())).shape[0]
            self._cond.notify_all()
        if not self.gate.wait(timeout=WAIT):
            raise RuntimeError("test gate never opened")
        return super().run(arrays, output_names)

    async def until_calls(self, n: int) -> None:
        """Wait (off the event loop) until n runs have started."""

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self.calls >= n, timeout=WAIT)

        assert await asyncio.to_thread(wait), f"only {self.calls} runs started, wanted {n}"


class Recorder:
    """BatchObserver that keeps everything it is told."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, float]] = []
        self.done: list[tuple[float, Outcome]] = []
        self.depths: list[int] = []

    def on_batch(self, rows: int, requests: int, compute_s: float) -> None:
        self.batches.append((rows, requests, compute_s))

    def on_request_done(self, queue_s: float, outcome: Outcome) -> None:
        self.done.append((queue_s, outcome))

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, outcome in self.done:
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, 8, 8)).astype(np.float32)


async def _bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, WAIT)


async def _yield_until(cond: Callable[[], bool], what: str) -> None:
    """Let other tasks run until cond() holds (pure event-loop progress, bounded)."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(main())


# ---------------------------------------------------------------------------- correctness


def test_config_validation() -> None:
    assert BatchingConfig(max_batch_size=8, preferred_batch_sizes=(4, 8)).target_rows == 4
    assert BatchingConfig(max_batch_size=8).target_rows == 8
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=8, max_queue_size=0)
    combined = BatchingConfig(max_batch_size=8, max_combined_batch_size=2)
    assert (combined.combine_limit, combined.target_rows) == (2, 2)
    assert BatchingConfig(max_batch_size=8).combine_limit == 8
    for bad in (0, 9):
        with pytest.raises(ValueError, match="max_combined_batch_size"):
            BatchingConfig(max_batch_size=8, max_combined_batch_size=bad)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):  # above the combine limit
        BatchingConfig(max_batch_size=8, max_combined_batch_size=2, preferred_batch_sizes=(4,))


def test_combine_limit_caps_merged_batches_not_single_requests(models: dict[str, Path]) -> None:
    """max_combined_batch_size 3: queued 1-row requests run 3 at a time at most; a 7-row
    request (under max_batch_size 8) still runs, alone; every row is its own."""
    pool = GatedPool(models["bn"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=8, max_combined_batch_size=3, observer=rec)
    inputs = [_x(1, seed=0), *[_x(1, seed=s) for s in range(1, 8)], _x(7, seed=8)]

    async def main() -> list[dict[str, np.ndarray]]:
        try:
            first = asyncio.create_task(batcher.submit({"x": inputs[0]}))
            await pool.until_calls(1)  # the one session is busy: the rest queue up
            rest = [asyncio.create_task(batcher.submit({"x": x})) for x in inputs[1:]]
            await _yield_until(lambda: batcher.queue_depth == len(rest), "all queued")
        finally:
            pool.gate.set()
        results = await _bounded(asyncio.gather(first, *rest))
        await batcher.close(grace=WAIT)
        return results

    pool.gate.set()
    expected = [pool.run({"x": x})["logits"] for x in inputs]  # each alone: the reference
    pool.gate.clear()
    pool.calls = pool.rows_run = 0
    results = _run(main())
    pool.close()
    for got, want in zip(results, expected, strict=True):
        assert got["logits"].tobytes() == want.tobytes()
    # 1 alone, then 7 queued singles as 3 + 3 + 1, then the 7-row request alone
    assert [(rows, n) for rows, n, _ in rec.batches] == [(1, 1), (3, 3), (3, 3), (1, 1), (7, 1)]


def test_1000_concurrent_mixed_requests_get_their_own_rows(models: dict[str, Path]) -> None:
    pool = SessionPool(models["bn"], instances=2)
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 9, size=1000)]
    inputs = [_x(n, seed=i) for i, n in enumerate(sizes)]
    # Reference: every request run alone on the same kind of session.
    expected = [pool.run({"x": x})["logits"] for x in inputs]
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=32, max_queue_size=1000, observer=rec)

    async def main() -> list[dict[str, np.ndarray]]:
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
        await batcher.close(grace=WAIT)
        return results

    t0 = time.perf_counter()
    results = _run(main())
    elapsed = time.perf_counter() - t0
    pool.close()
    for got, want in zip(results, expected, strict=True):
        assert got["logits"].shape == want.shape
        assert got["logits"].tobytes() == want.tobytes()
    assert sum(r for r, _, _ in rec.batches) == sum(sizes)
    assert sum(n for _, n, _ in rec.batches) == 1000
    assert all(rows <= 32 for rows, _, _ in rec.batches)
    assert max(n for _, n, _ in rec.batches) > 1, "requests were never merged"
    assert rec.outcomes() == {"ok": 1000}
    assert rec.depths[-1] == 0
    print(
        f"\n1000 requests / {sum(sizes)} rows in {elapsed:.3f} s, {len(rec.batches)} batches, "
        f"mean {sum(sizes) / len(rec.batches):.1f} rows/batch"
    )


def test_requests_with_different_free_dims_are_not_merged(models: dict[str, Path]) -> None:
    pool = SessionPool(models["free"], instances=1)
    rng = np.random.default_rng(1)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 4)), int(rng.choice([3, 5, 7])))).astype(
            np.float32
        )
        for _ in range(200)
    ]
    batcher = Batcher(pool, max_batch_size=16, max_queue_size=200)

    async def main() -> list[dict[str, np.ndarray]]:
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
        await batcher.close(grace=WAIT)
        return results

    results = _run(main())
    pool.close()
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(got["y"], np.maximum(x, 0) * np.float32(3))


def test_read_only_inputs(models: dict[str, Path]) -> None:
    # The codec hands over np.frombuffer views of request bytes, which are read-only.
    pool = SessionPool(models["bn"], instances=1)
    x = _x(2, seed=3)
    want = pool.run({"x": x})["logits"]
    ro = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)
    assert not ro.flags.writeable
    batcher = Batcher(pool, max_batch_size=8)

    async def main() -> list[dict[str, np.ndarray]]:
        out = await asyncio.gather(batcher.submit({"x": ro}), batcher.submit({"x": ro[:1]}))
        await batcher.close(grace=WAIT)
        return list(out)

    both, first = _run(main())
    pool.close()
    assert both["logits"].tobytes() == want.tobytes()
    assert first["logits"].tobytes() == want[:1].tobytes()


def test_invalid_requests(models: dict[str, Path]) -> None:
    pool = SessionPool(models["bn"], instances=1)
    batcher = Batcher(pool, max_batch_size=4)

    async def main() -> None:
        with pytest.raises(InvalidInputError, match="max_batch_size"):
            await batcher.submit({"x": _x(5, seed=0)})
        with pytest.raises(InvalidInputError, match="dtype"):
            await batcher.submit({"x": _x(1, seed=0).astype(np.float64)})
        with pytest.raises(InvalidInputError):
            await batcher.submit({"y": _x(1, seed=0)})
        with pytest.raises(DeadlineExceededError):
            await batcher.submit({"x": _x(1, seed=0)}, deadline=time.monotonic() - 1)
        await batcher.close(grace=WAIT)

    _run(main())
    pool.close()


def test_onnxruntime_error_fails_its_batch_and_batcher_keeps_going(
    models: dict[str, Path],
) -> None:
    pool = SessionPool(models["gather"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=8, observer=rec)

    async def main() -> np.ndarray:
        with pytest.raises(BnserveError) as info:
            await _bounded(batcher.submit({"idx": np.array([[7]], dtype=np.int64)}))
        assert info.value.status_code == "INTERNAL"
        ok = await _bounded(batcher.submit({"idx": np.array([[2], [0]], dtype=np.int64)}))
        await batcher.close(grace=WAIT)
        return ok["y"]

    y = _run(main())
    pool.close()
    np.testing.assert_array_equal(y, [[30.0], [10.0]])
    assert rec.outcomes() == {"error": 1, "ok": 1}


# ---------------------------------------------------------------------------- latency policy


def test_lone_request_is_not_delayed_by_max_queue_delay(models: dict[str, Path]) -> None:
    pool = SessionPool(models["bn"], instances=2)
    rec = Recorder()
    # A 30 s delay: if a lone request waited for it, the bounded await below would fail.
    batcher = Batcher(
        pool,
        max_batch_size=16,
        max_queue_delay_us=30_000_000,
        preferred_batch_sizes=(8,),
        observer=rec,
    )

    async def main() -> None:
        for i in range(3):  # sequential requests, each alone on an idle server
            await _bounded(batcher.submit({"x": _x(1, seed=i)}))
        await batcher.close(grace=WAIT)

    _run(main())
    pool.close()
    assert [n for _, n, _ in rec.batches] == [1, 1, 1]
    queue_times = [q for q, _ in rec.done]
    assert max(queue_times) < 1.0, queue_times  # vs the 30 s delay it would otherwise wait
    print(f"\nlone request queue time: max {max(queue_times) * 1e6:.0f} us")


@pytest.mark.parametrize(("delay_us", "expected"), [(0, [1, 1, 3]), (30_000_000, [1, 4])])
def test_queue_delay_waits_for_preferred_size_while_busy(
    models: dict[str, Path], delay_us: int, expected: list[int]
) -> None:
    pool = GatedPool(models["bn"], instances=2)
    rec = Recorder()
    batcher = Batcher(
        pool,
        max_batch_size=8,
        max_queue_delay_us=delay_us,
        preferred_batch_sizes=(4,),
        observer=rec,
    )

    async def main() -> None:
        try:
            a = asyncio.create_task(batcher.submit({"x": _x(1, seed=0)}))
            await pool.until_calls(1)  # A holds session 1
            b = asyncio.create_task(batcher.submit({"x": _x(1, seed=1)}))
            await _yield_until(lambda: batcher.queue_depth == 1, "B queued")
            if delay_us == 0:
                await pool.until_calls(2)  # greedy: B goes alone to the free session
            else:
                # B waits for the preferred size: 200 loop turns later it is still queued.
                for _ in range(200):
                    await asyncio.sleep(0)
                assert batcher.queue_depth == 1 and pool.calls == 1
            rest = [asyncio.create_task(batcher.submit({"x": _x(1, seed=s)})) for s in range(2, 5)]
            if delay_us == 0:  # both sessions busy: C, D, E wait and will merge
                await _yield_until(lambda: batcher.queue_depth == 3, "C, D, E queued")
            else:  # the preferred size is reached: B+C+D+E go to session 2 at once
                await pool.until_calls(2)
        finally:
            pool.gate.set()
        await _bounded(asyncio.gather(a, b, *rest))
        await batcher.close(grace=WAIT)

    _run(main())
    pool.close()
    # on_batch comes at completion, and the gate releases both sessions at once.
    assert sorted(n for _, n, _ in rec.batches) == expected


# ---------------------------------------------------------------------------- overload, deadline


def test_burst_of_ten_times_queue_size(models: dict[str, Path]) -> None:
    queue_size, max_batch = 20, 4
    pool = GatedPool(models["bn"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=max_batch, max_queue_size=queue_size, observer=rec)
    inputs = [_x(1 + i % 3, seed=i) for i in range(10 * queue_size)]

    async def main() -> list[Any]:
        try:
            tasks = [asyncio.create_task(batcher.submit({"x": x})) for x in inputs]
            await asyncio.sleep(0)  # one loop turn: every submit ran up to its first await
            done = [t for t in tasks if t.done()]
            # Refused at once (while the session is still held): everything beyond the queue.
            assert all(isinstance(t.exception(), OverloadedError) for t in done)
            assert len(done) >= len(tasks) - queue_size - max_batch
        finally:
            pool.gate.set()
        return await _bounded(asyncio.gather(*tasks, return_exceptions=True))

    results = _run(main())
    accepted = [(x, r) for x, r in zip(inputs, results, strict=True) if isinstance(r, dict)]
    overloaded = [r for r in results if isinstance(r, OverloadedError)]
    assert len(accepted) + len(overloaded) == len(inputs)
    assert queue_size <= len(accepted) <= queue_size + max_batch
    pool.gate.set()
    for x, r in accepted:
        assert r["logits"].tobytes() == SessionPool.run(pool, {"x": x})["logits"].tobytes()
    assert rec.outcomes() == {"ok": len(accepted), "overloaded": len(overloaded)}
    pool.close()


def test_deadline_expired_in_queue_is_not_computed(models: dict[str, Path]) -> None:
    pool = GatedPool(models["bn"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=8, observer=rec)

    async def main() -> None:
        try:
            a = asyncio.create_task(batcher.submit({"x": _x(2, seed=0)}))
            await pool.until_calls(1)  # the only session is busy
            with pytest.raises(DeadlineExceededError):
                await _bounded(
                    batcher.submit({"x": _x(3, seed=1)}, deadline=time.monotonic() + 0.05)
                )
            assert batcher.queue_depth == 0
        finally:
            pool.gate.set()
        await _bounded(a)
        # The session is free again: a later request is computed alone.
        await _bounded(batcher.submit({"x": _x(1, seed=2)}))
        await batcher.close(grace=WAIT)

    _run(main())
    pool.close()
    assert pool.rows_run == 2 + 1  # the 3-row request never reached onnxruntime
    assert rec.outcomes() == {"ok": 2, "deadline": 1}


def test_cancelled_request_frees_its_place_and_is_not_computed(models: dict[str, Path]) -> None:
    pool = GatedPool(models["bn"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=8, max_queue_size=2, observer=rec)

    async def main() -> list[dict[str, np.ndarray]]:
        try:
            a = asyncio.create_task(batcher.submit({"x": _x(1, seed=0)}))
            await pool.until_calls(1)
            b = asyncio.create_task(batcher.submit({"x": _x(4, seed=1)}))
            c = asyncio.create_task(batcher.submit({"x": _x(2, seed=2)}))
            await _yield_until(lambda: batcher.queue_depth == 2, "B and C queued")
            with pytest.raises(OverloadedError):
                await batcher.submit({"x": _x(1, seed=3)})
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            assert batcher.queue_depth == 1 and batcher.queued_rows == 2
            d = asyncio.create_task(batcher.submit({"x": _x(1, seed=3)}))  # B's place
            await _yield_until(lambda: batcher.queue_depth == 2, "D queued")
        finally:
            pool.gate.set()
        out = await _bounded(asyncio.gather(a, c, d))
        await batcher.close(grace=WAIT)
        return list(out)

    results = _run(main())
    assert [r["logits"].shape[0] for r in results] == [1, 2, 1]
    assert pool.rows_run == 1 + 2 + 1  # B's 4 rows were never computed
    assert rec.outcomes() == {"ok": 3, "cancelled": 1, "overloaded": 1}
    pool.close()


# ---------------------------------------------------------------------------- close


def test_close_drains_accepted_work(models: dict[str, Path]) -> None:
    pool = SessionPool(models["bn"], instances=2)
    inputs = [_x(1 + i % 4, seed=i) for i in range(300)]
    expected = [pool.run({"x": x})["logits"] for x in inputs]
    batcher = Batcher(pool, max_batch_size=8, max_queue_size=300)

    async def main() -> list[dict[str, np.ndarray]]:
        tasks = [asyncio.create_task(batcher.submit({"x": x})) for x in inputs]
        await asyncio.sleep(0)  # all accepted
        assert batcher.queue_depth + batcher.in_flight > 0
        await batcher.close(grace=WAIT)
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        assert all(t.done() for t in tasks)
        with pytest.raises(ShuttingDownError):
            await batcher.submit({"x": inputs[0]})
        await batcher.close(grace=WAIT)  # idempotent
        return await asyncio.gather(*tasks)

    results = _run(main())
    pool.close()
    for got, want in zip(results, expected, strict=True):
        assert got["logits"].tobytes() == want.tobytes()


def test_close_fails_leftovers_at_grace_deadline(models: dict[str, Path]) -> None:
    pool = GatedPool(models["bn"], instances=1)
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=8, observer=rec)

    async def main() -> list[Any]:
        try:
            a = asyncio.create_task(batcher.submit({"x": _x(1, seed=0)}))
            await pool.until_calls(1)  # computing, held by the gate
            b = asyncio.create_task(batcher.submit({"x": _x(1, seed=1)}))
            await _yield_until(lambda: batcher.queue_depth == 1, "B queued")
            await _bounded(batcher.close(grace=0.05))
            return list(await _bounded(asyncio.gather(a, b, return_exceptions=True)))
        finally:
            pool.gate.set()

    results = _run(main())
    assert all(isinstance(r, ShuttingDownError) for r in results), results
    assert rec.outcomes() == {"shutdown": 2}
    pool.close()


def test_close_before_any_request(models: dict[str, Path]) -> None:
    pool = SessionPool(models["bn"], instances=1)
    batcher = Batcher(pool, max_batch_size=8)

    async def main() -> None:
        await batcher.close(grace=1.0)
        with pytest.raises(ShuttingDownError):
            await batcher.submit({"x": _x(1, seed=0)})

    _run(main())
    pool.close()


def test_many_clients_sequential_requests(models: dict[str, Path]) -> None:
    """Requests arriving over time (not one burst): batches form while sessions are busy."""
    pool = SessionPool(models["bn"], instances=2)
    clients, per_client = 24, 40
    inputs = [[_x(1 + (c + i) % 8, seed=1000 * c + i) for i in range(per_client)]
              for c in range(clients)]  # fmt: skip
    expected = [[pool.run({"x": x})["logits"] for x in xs] for xs in inputs]
    rec = Recorder()
    batcher = Batcher(pool, max_batch_size=16, max_queue_size=clients, observer=rec)

    async def client(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [(await batcher.submit({"x": x}))["logits"] for x in xs]

    async def main() -> list[list[np.ndarray]]:
        out = await asyncio.gather(*(client(xs) for xs in inputs))
        await batcher.close(grace=WAIT)
        return out

    results = _run(main())
    pool.close()
    for got_c, want_c in zip(results, expected, strict=True):
        for got, want in zip(got_c, want_c, strict=True):
            assert got.tobytes() == want.tobytes()
    assert rec.outcomes() == {"ok": clients * per_client}
    assert max(n for _, n, _ in rec.batches) > 1
