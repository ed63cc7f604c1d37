"""Randomly drawn machine cases shared by the exactness tests (seeded, so reproducible), and helpers other tests
share."""

from dataclasses import dataclass

import numpy as np
import torch

TIMES = [0.005, 0.02, 0.05, 0.1, 0.3, 0.6, 0.9, 1.0]


@dataclass
class Case:
    machine: str  # IS, LS, ELS_zeros, ELS_circular
    wrapped: bool
    train: np.ndarray  # float64 (N, C, H, W)
    labels: np.ndarray
    qlabels: np.ndarray  # (B,)
    t: np.ndarray  # (B,)
    k: int
    size: tuple  # query canvas

    def __repr__(self):
        N, C, H, W = self.train.shape
        return (f"{self.machine}{'(wrapped)' if self.wrapped else ''} N={N} C={C} {H}x{W} -> {self.size} "
                f"k={self.k} t={np.round(self.t, 3).tolist()} B={len(self.t)}")


def draw(seed: int, machine: str = None, times=None) -> Case:
    rng = np.random.default_rng(seed)
    machine = machine or ["IS", "LS", "ELS_zeros", "ELS_circular"][seed % 4]
    N = int(rng.integers(1, 7))
    C = int(rng.choice([1, 3]))
    H, W = int(rng.integers(4, 11)), int(rng.integers(4, 11))
    if H == W:
        W += 1
    wrapped = machine == "ELS_circular" and bool(rng.integers(0, 2))
    size = (H, W)
    kmax = 2 * max(H, W) + 1
    if machine == "ELS_circular" and not wrapped:
        kmax = min(H, W)
    if machine == "ELS_zeros" and rng.integers(0, 3) == 0:
        size = (H + int(rng.integers(1, 9)), W + int(rng.integers(0, 9)))  # a larger canvas
        kmax = min(H, W)
    k = int(rng.choice(np.arange(1, kmax + 1, 2)))
    B = int(rng.integers(1, 5))
    nlab = int(rng.integers(1, 4))
    labels = np.arange(N) % nlab
    qlabels = rng.choice(np.unique(labels), B)
    t = rng.choice(times or TIMES, B)
    train = rng.uniform(-1, 1, (N, C, H, W))
    if rng.integers(0, 2):  # MNIST-like: a flat background with bright strokes, so keys repeat
        train = np.where(train > 0.3, train, -1.0)
    return Case(machine, wrapped, train, labels, qlabels, t, k, size)


def build(case: Case, dtype=np.float64, backend="auto"):
    import patchmosaic as pm

    tr = case.train.astype(dtype)
    if case.machine == "IS":
        return pm.IS(tr, case.labels, backend=backend)
    if case.machine == "LS":
        return pm.LS(tr, case.labels, backend=backend)
    if case.machine == "ELS_zeros":
        return pm.ELS(tr, case.labels, boundary="zeros", backend=backend)
    return pm.ELS(tr, case.labels, boundary="circular", wrapped=case.wrapped, backend=backend)


def queries(case: Case, seed: int):
    from conftest import noisy

    rng = np.random.default_rng(seed + 10_000)
    B = len(case.t)
    x = np.empty((B, case.train.shape[1]) + tuple(case.size))
    for b in range(B):
        x[b] = noisy(rng, case.train[case.labels == case.qlabels[b]], 1, case.t[b], "cosine_legacy", case.size)[0]
    return x


def assert_float32_close(err: np.ndarray, case, data_range: float = 2.0):
    """The float32 tolerance against the float64 oracle, per query image (so each t is held to it):
    mean |diff| <= 1e-5 and max <= 1e-3 of the data range."""
    for b in range(len(err)):
        assert err[b].mean() <= 1e-5 * data_range, (case, b)
        assert err[b].max() <= 1e-3 * data_range, (case, b)


def mnist_digits(machine: str, t: float, n_train: int, n_query: int, crop: slice):
    """(machine class, its keyword arguments, train, x): the first ``n_train`` MNIST training digits
    cropped to ``crop`` in both axes, in [-1, 1], and the first ``n_query`` test digits noised to ``t``
    (cosine_legacy, seed 7). Skips the calling test when ../shared/data/mnist.npz is missing."""
    import os

    import pytest

    import patchmosaic as pm
    from conftest import SHARED

    path = os.path.join(SHARED, "data", "mnist.npz")
    if not os.path.exists(path):
        pytest.skip("../shared/data/mnist.npz not present")
    d = np.load(path)
    train = d["x_train"][:n_train, None, crop, crop].astype(np.float64) / 127.5 - 1
    rng = np.random.default_rng(7)
    a, b2 = pm.schedules.cosine_legacy.coefficients(np.array([t]))
    x0 = d["x_test"][:n_query, None, crop, crop] / 127.5 - 1
    x = a[0] * x0 + np.sqrt(b2[0]) * rng.standard_normal(x0.shape)
    kinds = {"IS": (pm.IS, {}), "LS": (pm.LS, {}), "ELS_zeros": (pm.ELS, {}),
             "ELS_circular": (pm.ELS, {"boundary": "circular"})}
    cls, kw = kinds[machine]
    return cls, kw, train, x


class MachineNet(torch.nn.Module):
    """An eps network that is a machine at a fixed patch size ``k`` (so its samples are known exactly): the
    network of the calibration and comparison tests, called with the times in float64."""

    def __init__(self, machine, k):
        super().__init__()
        self.machine, self.k = machine, k

    def forward(self, t, x, labels=None):
        return self.machine.eps(x, t.double(), self.k, labels=labels)
