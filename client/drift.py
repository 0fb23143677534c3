"""`bnserve drift`: the per-layer drift report of a server, scraped from its /metrics endpoint
(the Prometheus port, --metrics-port of `bnserve serve`, 8002 by default). docs/drift.md.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["LayerDrift", "render", "run", "scrape"]


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
    rows = scrape(args.metrics_url, args.model, timeout=args.timeout)
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
