"""The CPU engine's instruction-set variants (CMakeLists.txt, ops/engines.py): chosen at import, forced by an
environment variable, reported, and computing the same function within the exactness tolerances.

Tolerances (as the exactness tests): float32 within 1e-3 of the data range of the float64 oracle at worst and
1e-5 on average; float64 within 1e-9. Variants built with the same vector instructions give bitwise-equal
results; those with different ones (baseline without FMA, AVX2 with FMA in 8 lanes, AVX-512 in 16) round
differently (contraction, summation order) and agree within the float32 tolerance.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic import ops

VARIANTS = list(ops.cpu_variants())


def test_the_best_runnable_variant_is_chosen_and_reported():
    runnable = ops.cpu_variants()
    assert "baseline" in runnable
    if "PATCHMOSAIC_CPU_VARIANT" not in os.environ:
        best = next(v for v in ("native", "avx512", "avx2", "baseline") if v in runnable)
        assert ops.cpu_variant() == best
    assert ops.cpu_variant() in runnable


def test_version_reports_the_variant():
    from patchmosaic.experiments.cli import version_text
    text = version_text()
    assert f"CPU engine: {ops.cpu_variant()}" in text and pm.__version__ in text
    r = subprocess.run([sys.executable, "-m", "patchmosaic", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "CPU engine:" in r.stdout


@pytest.mark.parametrize("name", VARIANTS)
def test_forcing_a_runnable_variant(name):
    r = subprocess.run([sys.executable, "-c", "from patchmosaic import ops; print(ops.cpu_variant())"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PATCHMOSAIC_CPU_VARIANT": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


@pytest.mark.parametrize("name", ["avx512", "sse9"])
def test_forcing_an_unrunnable_variant_fails_clearly(name):
    if name in VARIANTS:
        pytest.skip(f"{name} is runnable on this CPU, so forcing it cannot show the error for a variant that is not")
    r = subprocess.run([sys.executable, "-c", "import patchmosaic"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATCHMOSAIC_CPU_VARIANT": name})
    assert r.returncode != 0
    assert f"PATCHMOSAIC_CPU_VARIANT={name!r}" in r.stderr and "runnable here" in r.stderr


def test_use_cpu_variant_refuses_unknown():
    with pytest.raises(ValueError, match="cannot run here"):
        ops.use_cpu_variant("sse9")


def _machines(train):
    labels = np.arange(len(train)) % 3
    return [("IS", lambda d: pm.IS(d), None, None), ("LS", lambda d: pm.LS(d), 5, None),
            ("ELS", lambda d: pm.ELS(d), 5, None), ("ELS circular", lambda d: pm.ELS(d, boundary="circular"), 3, None),
            ("ELS conditional", lambda d: pm.ELS(d, labels=labels), 5, np.array([0, 2]))]


@pytest.fixture
def restore_variant():
    chosen = ops.cpu_variant()
    yield
    ops.use_cpu_variant(chosen)


def _switch(v):
    """Run the CPU engine from variant v, and check that the module the calls go to is v's (its compiled level)."""
    ops.use_cpu_variant(v)
    assert ops.cpu_variant() == v and pm.ops.engines._CPU_MODULE.CPU_VARIANT == ops.cpu_variants()[v], v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_variant_matches_the_oracle(dtype, restore_variant):
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (24, 2, 10, 9))
    x = rng.standard_normal((2, 2, 10, 9))
    rng_span = train.max() - train.min()
    for name, make, k, y in _machines(train):
        ref = make(train).denoise(x, 0.4, k, labels=y, backend="torch")
        m = make(train.astype(dtype))
        outs = {}
        for v in VARIANTS:
            _switch(v)
            outs[v] = np.asarray(m.denoise(x.astype(dtype), 0.4, k, labels=y, backend="cpu"), np.float64)
            err = np.abs(outs[v] - ref) / rng_span
            if dtype == np.float32:
                assert err.max() <= 1e-3 and err.mean() <= 1e-5, (name, v, err.max(), err.mean())
            else:
                assert err.max() <= 1e-9, (name, v, err.max())
        for v in VARIANTS[1:]:
            diff = np.abs(outs[v] - outs[VARIANTS[0]]) / rng_span
            # float32: each variant is within its own rounding of the oracle (IS on this case: baseline and AVX2
            # 2.2e-6 of the range, AVX-512, summing in 16 lanes, 4e-7), so two variants differ by up to the sum
            assert diff.max() <= (1e-5 if dtype == np.float32 else 1e-12), (name, v, diff.max())


def test_gradients_agree_across_variants(restore_variant):
    rng = np.random.default_rng(4)
    train = torch.tensor(rng.uniform(-1, 1, (16, 1, 8, 8)))
    x0 = torch.tensor(rng.standard_normal((1, 1, 8, 8)))
    grads = []
    for v in VARIANTS:
        _switch(v)
        x = x0.clone().requires_grad_()
        pm.ELS(train).denoise(x, 0.5, 3, backend="cpu").pow(2).sum().backward()
        grads.append(x.grad)
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=0, atol=1e-9)


def test_the_command_says_an_unrunnable_variant_in_one_line():
    """Issue 28: a bad PATCHMOSAIC_CPU_VARIANT printed a raw traceback from ``python -m patchmosaic``; the command
    now says it in one line (exit 2), while a program importing the package still gets the exception."""
    r = subprocess.run([sys.executable, "-m", "patchmosaic", "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATCHMOSAIC_CPU_VARIANT": "sse9"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("patchmosaic: error: PATCHMOSAIC_CPU_VARIANT='sse9'")
