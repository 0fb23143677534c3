"""Soak test: N seconds of mixed unary and streaming load against a `bnserve serve` it starts.

    python bench/soak.py --seconds 600            # `make soak`
    python bench/soak.py --seconds 20 --json      # what tests/reliability/test_soak.py runs
    python bench/soak.py --frontend native        # the C++ front end (`make native` first)

Every request carries a unique id; every answer is checked against onnxruntime in-process on
the same file (bitwise), and accounted: nothing may be lost (a request without an answer) or
answered twice. The server's resident memory is sampled from /proc/<pid>/status once a second;
the baseline is taken after a warm-up that brings onnxruntime's arenas to their high-water mark
(max-size batches on every session). At the end the server gets SIGTERM and must exit 0.

Exit status: 0 when all is well; 1 on loss, duplicates, wrong answers, INTERNAL/UNKNOWN errors,
RSS growth beyond --rss-limit-mb, or an unclean server exit; 2 when the server does not start.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc
from bnserve.server.model import SessionPool
from bnserve.server.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
MODELS = {"digits": (1, 8, 8), "vol3d": (1, 32, 32, 32)}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------ the server


# ------------------------------------------------------------------------------ accounting


@dataclass
class Ledger:
    """Every id sent, every answer received: loss, duplicates, wrong answers, codes."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: set[str] = field(default_factory=set)
    answered: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def send(self, rid: str) -> None:
        with self.lock:
            self.sent.add(rid)

    def answer(self, rid: str, code: str, right: bool = True, latency: float = 0.0) -> None:
        with self.lock:
            if rid not in self.sent:
                self.unknown.append(rid)
                return
            self.answered[rid] += 1
            self.codes[code] += 1
            if code == "OK":
                if not right:
                    self.wrong.append(rid)
                if len(self.latencies) < 1_000_000:
                    self.latencies.append(latency)


@dataclass
class Inputs:
    """A fixed pool of inputs with their reference answers (bitwise, same file in-process)."""

    xs: dict[str, list[np.ndarray]]
    wants: dict[str, list[bytes]]

    @classmethod
    def make(cls, repo: Path, per_model: int = 16, seed: int = 0) -> Inputs:
        rng = np.random.default_rng(seed)
        xs: dict[str, list[np.ndarray]] = {}
        wants: dict[str, list[bytes]] = {}
        for model, inner in MODELS.items():
            pool = SessionPool(str(repo / model / "1" / "model.onnx"), instances=1)
            try:
                top = 8 if model == "digits" else 2
                xs[model] = [
                    rng.random((int(rng.integers(1, top + 1)), *inner), dtype=np.float32)
                    for _ in range(per_model)
                ]
                wants[model] = [pool.run({"input": x})["logits"].tobytes() for x in xs[model]]
            finally:
                pool.close()
        return cls(xs, wants)

    def request(self, model: str, k: int, rid: str) -> pb.ModelInferRequest:
        x = self.xs[model][k]
        req = pb.ModelInferRequest(model_name=model, id=rid)
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        return req

    def right(self, model: str, k: int, resp: pb.ModelInferResponse) -> bool:
        return (
            bool(resp.raw_output_contents) and resp.raw_output_contents[0] == self.wants[model][k]
        )


def _pick(i: int, vol3d_every: int) -> str:
    return "vol3d" if vol3d_every and i % vol3d_every == vol3d_every - 1 else "digits"


# ------------------------------------------------------------------------------ load


def unary_client(
    c: int, target: str, inputs: Inputs, ledger: Ledger, end: float, vol3d_every: int
) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        i = 0
        while time.monotonic() < end:
            model = _pick(i, vol3d_every)
            k = i % len(inputs.xs[model])
            rid = f"u{c}-{i}"
            i += 1
            ledger.send(rid)
            t0 = time.perf_counter()
            try:
                resp = stub.ModelInfer(inputs.request(model, k, rid), timeout=30)
            except grpc.RpcError as exc:
                ledger.answer(rid, exc.code().name)
                continue
            ok = resp.id == rid and inputs.right(model, k, resp)
            ledger.answer(resp.id, "OK", ok, time.perf_counter() - t0)


def stream_client(
    c: int,
    target: str,
    inputs: Inputs,
    ledger: Ledger,
    end: float,
    vol3d_every: int,
    window: int = 16,
    per_stream: int = 2000,
) -> None:
    """Streams of `per_stream` requests, `window` in flight, one after the other until `end`."""
    n = 0
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        s = 0
        while time.monotonic() < end:
            todo: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
            meta: dict[str, tuple[str, int, float]] = {}
            closing = False

            def gen(
                todo: queue.Queue[pb.ModelInferRequest | None] = todo,
            ) -> Iterator[pb.ModelInferRequest]:
                while (req := todo.get(timeout=60)) is not None:
                    yield req

            def send(
                meta: dict[str, tuple[str, int, float]] = meta,
                todo: queue.Queue[pb.ModelInferRequest | None] = todo,
                s: int = s,
            ) -> None:
                nonlocal n
                model = _pick(n, vol3d_every)
                k = n % len(inputs.xs[model])
                rid = f"s{c}.{s}-{n}"
                n += 1
                meta[rid] = (model, k, time.perf_counter())
                ledger.send(rid)
                todo.put(inputs.request(model, k, rid))

            for _ in range(window):
                send()
            sent_here = window
            try:
                # The server ends the stream after the last answer once we half-close.
                for msg in stub.ModelStreamInfer(gen(), timeout=600):
                    rid = msg.infer_response.id
                    if msg.error_message:
                        code = msg.error_message.split("]")[0].strip("[") or "UNKNOWN"
                        ledger.answer(rid, code)
                    elif rid in meta:
                        model, k, t0 = meta[rid]
                        ok = inputs.right(model, k, msg.infer_response)
                        ledger.answer(rid, "OK", ok, time.perf_counter() - t0)
                    else:
                        ledger.answer(rid, "OK", False)
                    if not closing and (time.monotonic() >= end or sent_here >= per_stream):
                        closing = True
                        todo.put(None)  # half-close; the server answers what it has
                    if not closing:
                        send()
                        sent_here += 1
            except grpc.RpcError as exc:
                for rid in meta:
                    if ledger.answered[rid] == 0:
                        ledger.answer(rid, exc.code().name)
            finally:
                todo.put(None)
            s += 1


def warm_up(target: str, inputs: Inputs, instances: int) -> None:
    """Max-size batches on every session (so none can merge), both models: onnxruntime's
    arenas reach their high-water mark before the RSS baseline."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for model, inner in MODELS.items():
            x = np.zeros((64, *inner), np.float32)
            req = pb.ModelInferRequest(model_name=model)
            req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            futures = [stub.ModelInfer.future(req, timeout=120) for _ in range(2 * instances)]
            for f in futures:
                f.result()


# ------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    inputs = Inputs.make(repo)
    try:
        server = ServerProcess(
            repo, "--instances", str(args.instances), "--grace", "30", "--frontend", args.frontend
        )
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    target = f"127.0.0.1:{server.port}"
    ledger = Ledger()
    samples: list[tuple[float, int]] = []
    try:
        warm_up(target, inputs, args.instances)
        started = time.monotonic()
        end = started + args.seconds
        threads = [
            threading.Thread(
                target=unary_client, args=(c, target, inputs, ledger, end, args.vol3d_every)
            )
            for c in range(args.unary_clients)
        ]
        threads += [
            threading.Thread(
                target=stream_client, args=(c, target, inputs, ledger, end, args.vol3d_every)
            )
            for c in range(args.stream_clients)
        ]
        for t in threads:
            t.start()
        # Baseline after the first stretch of load (allocator and grpc buffers settle).
        settle = min(max(args.seconds * 0.1, 2.0), 30.0)
        while any(t.is_alive() for t in threads) and time.monotonic() < end + 120:
            samples.append((time.monotonic() - started, rss_bytes(server.proc.pid)))
            for t in threads:
                t.join(timeout=1.0 / max(1, len(threads)))
        hung = [t.name for t in threads if t.is_alive()]
        elapsed = time.monotonic() - started
        rss_end = rss_bytes(server.proc.pid)
    finally:
        rc = server.stop()
    base = [r for t, r in samples if t >= settle] or [r for _, r in samples]
    rss_start, rss_max = base[0], max(r for _, r in samples)
    growth = rss_end - rss_start
    lost = sorted(ledger.sent - set(ledger.answered))
    dups = sorted(rid for rid, n in ledger.answered.items() if n > 1)
    bad_codes = {c: n for c, n in ledger.codes.items() if c in ("INTERNAL", "UNKNOWN")}
    lat = np.array(ledger.latencies) * 1e3 if ledger.latencies else np.zeros(1)
    report = {
        "seconds": round(elapsed, 1),
        "requests": len(ledger.sent),
        "answers": sum(ledger.answered.values()),
        "rps": round(len(ledger.sent) / max(elapsed, 1e-9), 1),
        "codes": dict(ledger.codes),
        "errors": sum(n for c, n in ledger.codes.items() if c != "OK"),
        "lost": len(lost),
        "duplicates": len(dups),
        "unknown_ids": len(ledger.unknown),
        "wrong_answers": len(ledger.wrong),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2),
        },
        "rss_mb": {
            "baseline_at_s": round(settle, 1),
            "start": round(rss_start / MB, 1),
            "end": round(rss_end / MB, 1),
            "max": round(rss_max / MB, 1),
            "growth": round(growth / MB, 1),
            "limit": args.rss_limit_mb,
        },
        "server_exit": rc,
        "hung_clients": hung,
    }
    problems = []
    if lost:
        problems.append(f"{len(lost)} lost (e.g. {lost[:5]})")
    if dups:
        problems.append(f"{len(dups)} answered twice (e.g. {dups[:5]})")
    if ledger.unknown:
        problems.append(f"{len(ledger.unknown)} answers for ids never sent")
    if ledger.wrong:
        problems.append(f"{len(ledger.wrong)} wrong answers (e.g. {ledger.wrong[:5]})")
    if bad_codes:
        problems.append(f"server bugs: {bad_codes}")
    if growth > args.rss_limit_mb * MB:
        problems.append(f"RSS grew {growth / MB:.1f} MB > {args.rss_limit_mb} MB")
    if rc != 0:
        problems.append(f"server exit status {rc} after SIGTERM")
    if hung:
        problems.append(f"clients did not finish: {hung}")
    report["problems"] = problems
    if args.json:
        print(json.dumps(report))
    else:
        r: Any = report
        print(
            f"soak {r['seconds']} s: {r['requests']} requests ({r['rps']}/s), "
            f"{r['answers']} answers, codes {r['codes']}\n"
            f"  lost {r['lost']}, duplicates {r['duplicates']}, wrong {r['wrong_answers']}, "
            f"errors {r['errors']}\n"
            f"  latency ms p50 {r['latency_ms']['p50']} p99 {r['latency_ms']['p99']} "
            f"max {r['latency_ms']['max']}\n"
            f"  server RSS MB: start {r['rss_mb']['start']} (at {r['rss_mb']['baseline_at_s']} s)"
            f", end {r['rss_mb']['end']}, max {r['rss_mb']['max']}, "
            f"growth {r['rss_mb']['growth']:+} (limit {args.rss_limit_mb})\n"
            f"  server exit {rc}; " + ("OK" if not problems else "FAILED: " + "; ".join(problems))
        )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="load duration (600)")
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="model repository")
    p.add_argument("--instances", type=int, default=2, help="server sessions per model (2)")
    p.add_argument("--unary-clients", type=int, default=4, help="unary client threads (4)")
    p.add_argument("--stream-clients", type=int, default=2, help="stream client threads (2)")
    p.add_argument("--vol3d-every", type=int, default=20, help="every Nth request is vol3d")
    p.add_argument("--rss-limit-mb", type=float, default=50.0, help="allowed RSS growth (50)")
    p.add_argument(
        "--frontend",
        choices=("python", "native"),
        default="python",
        help="the server's front end (python; native needs `make native`)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
