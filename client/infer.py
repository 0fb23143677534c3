"""`bnserve infer`: classify files on a running server, or stream the digits test set (--demo).

Files: .npy / .npz arrays (already preprocessed; with or without the batch axis) and images
(PNG, JPEG, ... via Pillow, imported only when an image is given), preprocessed as the model's
config.json says. The client cannot read the server's files, so labels and preprocessing come
from an explicit `--config` file, else from the ModelConfig RPC's `parameters` ("labels": JSON
list, "preprocessing": JSON object, which bnserve's server sends), else from
model_repository/<model>/config.json when it exists.

Imports no torch and nothing of bnserve.server; scikit-learn only for --demo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .client import DATATYPES, InferenceClient, InferenceError, TLSConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# The same split as bnserve.training.data.digits (that package needs torch, so it is repeated
# here; tests check the two agree).
DIGITS_TEST_SIZE = 0.25
DIGITS_SEED = 0
DIGITS_SCALE = 1.0 / 16.0


@dataclass(frozen=True)
class ModelInfo:
    """What the command needs to know about the served model."""

    name: str
    version: str  # the served version whose config.json entry applies
    input_name: str
    dtype: np.dtype
    inner_shape: tuple[int, ...]  # the input's shape without the batch axis
    max_batch_size: int
    labels: tuple[str, ...] | None
    preprocessing: Mapping[str, Any] | None
    recorded_accuracy: float | None  # config.json versions[version]["accuracy"]


def _local_config(model: str, path: Path | None) -> dict[str, Any]:
    if path is None:
        default = Path("model_repository") / model / "config.json"
        if not default.is_file():
            return {}
        path = default
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def model_info(
    client: InferenceClient, model: str, version: str | None, config_path: Path | None
) -> ModelInfo:
    meta = client.metadata(model, version)
    cfg = client.config(model, version)
    if len(meta["inputs"]) != 1:
        raise ValueError(f"model {model!r} has {len(meta['inputs'])} inputs; infer needs one")
    spec = meta["inputs"][0]
    if spec["datatype"] not in DATATYPES:
        raise ValueError(f"input {spec['name']!r} has datatype {spec['datatype']}")
    mbs = int(cfg.get("max_batch_size", 0))
    shape = tuple(int(d) for d in spec["shape"])
    inner = shape[1:] if mbs > 0 else shape
    served = version or max(meta["versions"] or ["1"], key=int)
    local = _local_config(model, config_path)
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    # An explicit --config wins; then what the server says; then the default local file.
    served_labels = json.loads(params["labels"]) if params.get("labels") else None
    served_prep = json.loads(params["preprocessing"]) if params.get("preprocessing") else None
    if config_path is not None:
        labels = local.get("labels", served_labels)
        prep = local.get("preprocessing", served_prep)
    else:
        labels = served_labels if served_labels is not None else local.get("labels")
        prep = served_prep if served_prep is not None else local.get("preprocessing")
    recorded = local.get("versions", {}).get(str(served), {}).get("accuracy")
    return ModelInfo(
        name=model,
        version=str(served),
        input_name=spec["name"],
        dtype=DATATYPES[spec["datatype"]],
        inner_shape=inner,
        max_batch_size=mbs,
        labels=tuple(str(x) for x in labels) if labels else None,
        preprocessing=prep,
        recorded_accuracy=None if recorded is None else float(recorded),
    )


# --------------------------------------------------------------------------------------------
# Inputs


def fit_rows(arr: np.ndarray, info: ModelInfo, what: str) -> np.ndarray:
    """`arr` as (rows, *inner_shape) in the model's dtype; a missing batch axis is added and,
    when the inner shape is fixed, any layout with the right element count is accepted
    ((8, 8), (64,), (N, 64) for an input of (1, 8, 8))."""
    inner = info.inner_shape
    if all(d >= 0 for d in inner):
        per_row = int(np.prod(inner))
        if arr.size == 0 or arr.size % per_row:
            raise ValueError(
                f"{what}: shape {list(arr.shape)} does not hold whole samples of {list(inner)}"
            )
        arr = arr.reshape(-1, *inner)
    elif arr.ndim == len(inner):
        arr = arr[None]
    elif arr.ndim != len(inner) + 1:
        raise ValueError(f"{what}: shape {list(arr.shape)} does not fit {list(inner)}")
    return arr.astype(info.dtype, copy=False)


def load_image(path: Path, prep: Mapping[str, Any]) -> np.ndarray:
    """One image as the model's input sample, following config.json's preprocessing.image:
    grayscale, size [H, W], invert (true / false / "auto": when the background is light),
    scale (multiplies the 0..255 pixel values), layout NCHW (default) or NHWC."""
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError(
            "reading images needs Pillow (pip install pillow); .npy/.npz work without it"
        ) from None
    spec = prep.get("image")
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{path}: the model's config has no preprocessing.image section; pass --config "
            "with one, or give preprocessed .npy/.npz arrays"
        )
    with Image.open(path) as opened:
        img = opened.convert("RGBA")
    # Transparent pixels count as white paper, not as whatever colour they happen to hold.
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, img)
    img = img.convert("L" if spec.get("grayscale", True) else "RGB")
    if "size" in spec:
        h, w = (int(d) for d in spec["size"])
        # BOX averages each output pixel's source area, like the block counts sklearn's digits
        # were made from; other filters would sharpen a downscaled stroke.
        img = img.resize((w, h), Image.Resampling.BOX)
    x = np.asarray(img, dtype=np.float32) / 255.0
    invert = spec.get("invert", False)
    if invert == "auto":
        border = np.concatenate([x[0].ravel(), x[-1].ravel(), x[:, 0].ravel(), x[:, -1].ravel()])
        invert = float(np.median(border)) > 0.5  # light paper, dark ink: the model wants ink high
    if invert:
        x = 1.0 - x
    x = x * (float(spec.get("scale", 1.0 / 255.0)) * 255.0)
    if x.ndim == 2:
        x = x[None] if prep.get("layout", "NCHW") == "NCHW" else x[..., None]
    elif prep.get("layout", "NCHW") == "NCHW":
        x = x.transpose(2, 0, 1)
    return x


def load_inputs(files: Sequence[Path], info: ModelInfo) -> tuple[list[str], np.ndarray]:
    """Every sample of every file as (names, rows)."""
    names: list[str] = []
    parts: list[np.ndarray] = []

    def add(what: str, arr: np.ndarray) -> None:
        rows = fit_rows(arr, info, what)
        names.extend([what] if len(rows) == 1 else [f"{what}[{i}]" for i in range(len(rows))])
        parts.append(rows)

    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            add(str(path), np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    add(f"{path}:{key}", npz[key])
        elif suffix in IMAGE_SUFFIXES:
            add(str(path), load_image(path, info.preprocessing or {}))
        else:
            raise ValueError(f"{path}: not .npy, .npz or an image ({', '.join(IMAGE_SUFFIXES)})")
    if not parts:
        raise ValueError("no input files given (or use --demo)")
    return names, np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# Output


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)  # stable: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(
    scores: np.ndarray, k: int, labels: Sequence[str] | None
) -> list[list[tuple[str, float]]]:
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    name = (lambda i: labels[i]) if labels and len(labels) == scores.shape[-1] else str
    return [
        [(name(int(i)), float(row[i])) for i in idx] for row, idx in zip(scores, order, strict=True)
    ]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _as_logits(result: Any) -> np.ndarray:
    if isinstance(result, dict):
        result = next(iter(result.values()))  # the first output is the classifier's
    arr = np.asarray(result)
    return arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)


def classify(client: InferenceClient, info: ModelInfo, files: Sequence[Path], k: int) -> int:
    names, x = load_inputs(files, info)
    size = info.max_batch_size if info.max_batch_size > 0 else 1
    logits = []
    for sl in _chunks(len(x), size):
        rows = x[sl] if info.max_batch_size > 0 else x[sl][0]
        logits.append(_as_logits(client.infer(info.name, rows, info.version)))
    scores = softmax(np.concatenate(logits))
    for name, best in zip(names, top_k(scores, k, info.labels), strict=True):
        print(f"{name}: " + "  ".join(f"{label} {p:.4f}" for label, p in best))
    return 0


# --------------------------------------------------------------------------------------------
# --demo


def digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits test set exactly as training/data.py splits it: x (450, 64) float32 in
    [0, 1] and y int64."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise RuntimeError(
            "bnserve infer --demo needs scikit-learn for the digits data set "
            "(pip install scikit-learn); classifying files works without it"
        ) from None
    bunch = load_digits()
    x = bunch.data.astype(np.float32) * np.float32(DIGITS_SCALE)
    y = bunch.target.astype(np.int64)
    _, x_te, _, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SEED, stratify=y
    )
    return x_te, y_te


def demo(client: InferenceClient, info: ModelInfo, batch_size: int, window: int) -> int:
    x, y = digits_test_split()
    rows = fit_rows(x, info, "digits test set")
    if info.max_batch_size > 0:
        batch_size = min(batch_size, info.max_batch_size)
    slices = _chunks(len(rows), batch_size)
    started = time.perf_counter()
    preds: list[np.ndarray] = []
    latencies: list[float] = []
    with client.stream(
        info.name, (rows[sl] for sl in slices), window=window, version=info.version
    ) as stream:
        for r in stream.results():
            if r.error is not None:
                print(f"bnserve infer: error: {r.error}", file=sys.stderr)
                return 1
            preds.append(_as_logits(r.value).argmax(axis=-1))
            latencies.append(r.latency)
    elapsed = time.perf_counter() - started
    pred = np.concatenate(preds)
    correct = int((pred == y).sum())
    n = len(y)
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
    print(
        f"{info.name} (version {info.version}): accuracy {correct / n:.4f} ({correct}/{n}) on the "
        f"digits test set, streamed in {len(slices)} batches of up to {batch_size}"
    )
    print(
        f"latency per batch: p50 {p50:.2f} ms, p99 {p99:.2f} ms; window {window}, "
        f"{n / elapsed:.0f} samples/s"
    )
    if info.recorded_accuracy is None:
        print("offline accuracy: not recorded (no config.json entry for this version)")
        return 0
    match = round(info.recorded_accuracy * n) == correct
    print(
        f"offline accuracy recorded in config.json: {info.recorded_accuracy:.4f} "
        f"({'match' if match else 'MISMATCH'})"
    )
    return 0 if match else 1


# --------------------------------------------------------------------------------------------
# Entry point (cli.py defines the arguments)


def run(args: argparse.Namespace) -> int:
    targets = [t for arg in args.target or ["127.0.0.1:8001"] for t in arg.split(",") if t]
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSConfig(
            ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
        )
    if args.top_k < 1:
        raise ValueError("--top-k must be >= 1")
    if not args.demo and not args.files:
        raise ValueError("give files to classify, or --demo")
    try:
        with InferenceClient(
            targets,
            tls=tls,
            token=args.token or os.environ.get("BNSERVE_TOKEN"),
            timeout=args.timeout,
            retries=args.retries,
        ) as client:
            info = model_info(client, args.model, args.model_version, args.config)
            if args.demo:
                return demo(client, info, args.batch_size, args.window)
            return classify(client, info, args.files, args.top_k)
    except InferenceError as err:
        print(f"bnserve infer: error: {err}", file=sys.stderr)
        return 1
