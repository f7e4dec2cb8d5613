"""Synthetic images and a stand-in model for the gate (canary) and drift tests.

A deterministic stand-in model (nearest group centroid on 7x7 pooled pixels, embedding = a fixed random
projection) so the tests run without training; the same checks against a real trained model run in the
orchestration integration tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zalando.drift import reference_profile
from zalando.labels import LABEL_TO_GROUP


def _prototypes() -> np.ndarray:
    """One smooth, half-dark 28x28 pattern per label (fixed seed)."""
    base = np.kron(np.random.default_rng(123).normal(size=(10, 7, 7)), np.ones((4, 4)))
    for _ in range(2):
        base = (np.roll(base, 1, 1) + base + np.roll(base, -1, 1)) / 3
        base = (np.roll(base, 1, 2) + base + np.roll(base, -1, 2)) / 3
    return np.clip(base * 200, 0, 255)


PROTOS = _prototypes()


def make_images(n: int, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
    x = PROTOS[y] * rng.uniform(0.7, 1.1, (n, 1, 1)) + rng.normal(0, 20, (n, 28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), y


class CentroidModel:
    """A deterministic stand-in for a trained net: softmax of -distance to group centroids."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        f, g = self._feat(x), LABEL_TO_GROUP[y]
        self.centroids = np.stack([f[g == k].mean(0) for k in range(5)])
        self.proj = np.random.default_rng(7).normal(size=(49, 16)) / 3

    @staticmethod
    def _feat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(x), 49) / 255.0

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self._feat(x)
        z = -((f[:, None, :] - self.centroids[None]) ** 2).sum(-1) / 0.5
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).astype(np.float32), np.tanh(f @ self.proj).astype(np.float32)


def make_world() -> dict[str, Any]:
    """A stand-in model trained on 3,000 synthetic images, its reference profile and 1,000 val images."""
    x_train, y_train = make_images(3000, 1)
    x_val, y_val = make_images(1000, 2)
    model = CentroidModel(x_train, y_train)
    p_val, e_val = model(x_val)
    prior = np.bincount(LABEL_TO_GROUP[y_train], minlength=5)
    ref = reference_profile(x_train, p_val, e_val, prior, sample_size=500, seed=0)
    return {"model": model, "ref": ref, "x_val": x_val, "y_val": y_val, "p_val": p_val}
