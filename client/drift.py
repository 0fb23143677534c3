"""`bnserve drift`: the per-layer drift report of a server, read over gRPC from ModelStatistics
(`--target`, its bn_drift extension fields) or scraped from its /metrics endpoint
(`--metrics-url`, the Prometheus port of `bnserve serve`). docs/drift.md.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bnserve.proto import inference_pb2 as pb
from bnserve.proto import inference_pb2_grpc as pb_grpc

__all__ = ["LayerDrift", "fetch", "from_statistics", "render", "run", "scrape"]


@dataclass(frozen=True)
class LayerDrift:
    model: str
    version: str
    layer: str
    channels: int
    score: float
    samples: int


def parse(text: str, model: str | None = None) -> list[LayerDrift]:
    """The drift rows of a Prometheus text exposition, in exposition order (model, version,
    then the model's layer order as first reported)."""
    scores: dict[tuple[str, str, str], float] = {}
    channels: dict[tuple[str, str, str], int] = {}
    samples: dict[tuple[str, str], int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            m, v = s.labels.get("model", ""), s.labels.get("version", "")
            if model is not None and m != model:
                continue
            if s.name == "bnserve_bn_drift":
                scores[(m, v, s.labels["layer"])] = s.value
            elif s.name == "bnserve_bn_drift_channels":
                channels[(m, v, s.labels["layer"])] = int(s.value)
            elif s.name == "bnserve_drift_samples_total":
                samples[(m, v)] = int(s.value)
    return [
        LayerDrift(m, v, layer, channels.get((m, v, layer), 0), score, samples.get((m, v), 0))
        for (m, v, layer), score in scores.items()
    ]


def scrape(url: str, model: str | None = None, *, timeout: float = 5.0) -> list[LayerDrift]:
    """GET `url` (http://HOST:PORT/metrics) and parse its drift rows."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse(resp.read().decode("utf-8"), model)


def from_statistics(response: pb.ModelStatisticsResponse) -> list[LayerDrift]:
    """The drift rows of a ModelStatistics answer, in its order (model, version, layer)."""
    return [
        LayerDrift(m.name, m.version, d.layer, d.channels, d.score, m.bn_drift_samples)
        for m in response.model_stats
        for d in m.bn_drift
    ]


def fetch(target: str, model: str | None = None, *, timeout: float = 5.0) -> list[LayerDrift]:
    """ModelStatistics of `model` (all models when None) from the server at HOST:PORT."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model or ""), timeout=timeout
        )
    return from_statistics(response)


def render(rows: list[LayerDrift], threshold: float | None = None) -> str:
    header = f"{'model':<12} {'ver':>3} {'layer':<24} {'channels':>8} {'score':>10} {'samples':>8}"
    lines = [header]
    for r in rows:
        flag = "  DRIFT" if threshold is not None and r.score > threshold else ""
        lines.append(
            f"{r.model:<12} {r.version:>3} {r.layer:<24} {r.channels:>8} {r.score:>10.4f} "
            f"{r.samples:>8}{flag}"
        )
    return "\n".join(lines)


def run(args: Any) -> int:
    """Exit 0 with rows, 1 when no drift series are exported (monitor off, or no samples yet),
    2 when some layer's score is above --threshold."""
    if args.metrics_url:
        rows = scrape(args.metrics_url, args.model, timeout=args.timeout)
    else:
        try:
            rows = fetch(args.target, args.model, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"ModelStatistics from {args.target} failed: {exc.code().name}: {exc.details()}")
            return 1
    if not rows:
        print(
            "no drift series: is the server run with --drift-sample-rate > 0, does the model's "
            "config.json have a drift_reference, and has a sampled batch been scored yet?"
        )
        return 1
    print(render(rows, args.threshold))
    if args.threshold is not None and any(r.score > args.threshold for r in rows):
        return 2
    return 0
