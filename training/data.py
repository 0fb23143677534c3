"""Datasets: scikit-learn's bundled handwritten digits (real data, no download) and generated
3D volumes (sphere / cube / torus under noise, random size and position).

Everything returns numpy float32 arrays in NC... layout and int64 labels; torch is not needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGITS_LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
VOL3D_LABELS: tuple[str, ...] = ("sphere", "cube", "torus")
VOL3D_SIZE = 32
# The digits' pixel values are 0..16 (counts of set pixels in 4x4 blocks of a 32x32 bitmap).
DIGITS_SCALE = 1.0 / 16.0


@dataclass(frozen=True)
class Split:
    """A train/test split. x: (N, C, ...) float32, y: (N,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]


def digits(*, flat: bool = False) -> Split:
    """sklearn's 1,797 8x8 digits, split 1,347 / 450 (the usual 75/25, fixed seed).

    x: (N, 1, 8, 8) float32 in [0, 1], or (N, 64) with flat=True.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) * DIGITS_SCALE).reshape(-1, 1, 8, 8)
    if flat:
        x = x.reshape(len(x), 64)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return Split(x_tr, y_tr, x_te, y_te, DIGITS_LABELS)


def _volume(rng: np.random.Generator, label: int, size: int, noise: float) -> np.ndarray:
    """One (size, size, size) float32 volume holding a solid of class `label` under noise."""
    ax = np.arange(size, dtype=np.float32)
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")  # each (D, H, W)
    r = rng.uniform(0.16, 0.26) * size  # the solid's radius / half-size, in voxels
    cz, cy, cx = rng.uniform(r + 1, size - r - 1, size=3)
    dz, dy, dx = z - cz, y - cy, x - cx
    if label == 0:  # sphere
        solid = dz**2 + dy**2 + dx**2 <= r**2
    elif label == 1:  # cube, half-size chosen so its volume is close to the sphere's
        h = 0.8 * r
        solid = np.maximum(np.maximum(abs(dz), abs(dy)), abs(dx)) <= h
    else:  # torus around a random axis: ring radius r*0.7, tube radius r*0.35
        axis = rng.integers(3)
        a = (dz, dy, dx)[axis]
        b, c = [d for i, d in enumerate((dz, dy, dx)) if i != axis]
        ring = np.sqrt(b**2 + c**2) - 0.7 * r
        solid = ring**2 + a**2 <= (0.35 * r) ** 2
    vol = solid.astype(np.float32) * rng.uniform(0.6, 1.0)  # random contrast
    vol += rng.normal(0.0, noise, size=vol.shape).astype(np.float32)
    return vol


def volumes(
    n: int, *, seed: int, size: int = VOL3D_SIZE, noise: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """n generated volumes, classes balanced. x: (n, 1, D, H, W) float32, y: (n,) int64."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % len(VOL3D_LABELS)
    rng.shuffle(y)
    x = np.stack([_volume(rng, int(label), size, noise) for label in y])[:, None]
    return x, y


def vol3d(*, n_train: int = 1200, n_test: int = 300, size: int = VOL3D_SIZE) -> Split:
    """Generated volumes with disjoint seeds for train and test."""
    x_tr, y_tr = volumes(n_train, seed=1, size=size)
    x_te, y_te = volumes(n_test, seed=2, size=size)
    return Split(x_tr, y_tr, x_te, y_te, VOL3D_LABELS)
