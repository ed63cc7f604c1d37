"""The variance-exploding (EDM / k-diffusion) interface (diffusion/edm.py): the inverse of every noise schedule at a
noise level, ``D_VE(x, sigma) = D_VP(a x, t(sigma))`` and back, EDM's noise levels, and its samplers: Euler on the
noise levels of a time grid is the project's DDIM (the same process: the same samples to float rounding, a machine
with a k-schedule and a plain function), Heun is second order (on Gaussian data, whose ODE has a closed-form solution),
and bad input is refused."""

import math

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.schedules import FromCallable, cosine, cosine_legacy, linear

SCHEDULES = [cosine_legacy, cosine, linear, FromCallable(lambda t: np.cos(np.asarray(t) * np.pi / 2 * 0.99) ** 2)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name)
def test_time_at_sigma_inverts_the_schedule(sched):
    # a callable's 1 - alpha_bar cancels at small t (sigma itself is known only to ~1e-12 there): a looser bound
    rel = 1e-6 if isinstance(sched, FromCallable) else 1e-9
    for t in (1e-4, 0.02, 0.3, 0.5, 0.77, 0.999, 1.0):
        s = float(sched.sigma(t))
        assert abs(sched.time_at_sigma(s) - t) <= rel * t, (t, s)
        ab = float(sched.alpha_bar(sched.time_at_sigma(s)))
        assert abs(ab - 1 / (1 + s * s)) <= 1e-9 * max(ab, 1e-300) + 1e-15
    top = float(sched.sigma(1.0))
    if math.isfinite(top) and top < 1e6:
        with pytest.raises(ValueError, match="lies above the largest noise level"):
            sched.time_at_sigma(top * 1.01)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
            sched.time_at_sigma(bad)
    assert abs(cosine_legacy.sigma(1.0) - 80.2099) < 1e-3  # EDM's sigma_max = 80 lies just inside cosine-legacy


def test_edm_sigmas_are_karras_grid():
    s = pm.edm_sigmas(18)
    assert len(s) == 19 and s[-1] == 0 and abs(s[0] - 80) < 1e-12 and abs(s[17] - 0.002) < 1e-15
    r = s[:-1] ** (1 / 7)
    assert np.allclose(np.diff(r), np.diff(r)[0])
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        pm.edm_sigmas(1)


def machine_denoiser(dtype=torch.float64):
    images, labels = pm.data.load_default()
    m = pm.ELS(images[:60].to(dtype), labels[:60])
    return pm.MachineDenoiser(m, pm.KSchedule((1.0, 0.8, 0.6, 0.4, 0.2), (7, 7, 5, 5, 3)))


def test_sigma_denoiser_is_the_denoiser_in_ve_coordinates():
    den = machine_denoiser()
    D = pm.as_sigma_denoiser(den)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    for t in (0.9, 0.45, 0.1):
        a, b2 = cosine_legacy.scalar_coefficients(t)
        sigma = math.sqrt(b2) / a
        assert abs(D.time(sigma) - t) < 1e-12
        got = D(x / a, sigma, y)  # x_VE = x_VP / a
        assert torch.allclose(got, den(x, t, y), rtol=0, atol=1e-12)
    back = pm.from_sigma_denoiser(D)  # and back: a denoiser of the project again
    assert torch.allclose(back(x, 0.45, y), den(x, 0.45, y), rtol=0, atol=1e-12)
    assert back.schedule is cosine_legacy and torch.allclose(back.eps(x, 0.45, y), den.eps(x, 0.45, y), atol=1e-9)
    assert isinstance(D(x.numpy(), 3.0, y), np.ndarray)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_euler_in_sigma_is_ddim_on_the_same_grid(dtype):
    """DDIM (eta = 0) from x1 at t = 1 and EDM's Euler from x1 / a(1) on the noise levels of the same grid: one update
    x' = D + sigma' (x - D) / sigma in both, so the same samples (float64: to 1e-10; float32: to its rounding)."""
    den = machine_denoiser(dtype)
    x1 = torch.randn(2, 1, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([4, 7])
    grid = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    ddim = pm.ddim(den, x1, y, grid=grid, progress=False)
    sig = pm.diffusion.sigma_grid(grid)
    a1 = cosine_legacy.scalar_coefficients(1.0)[0]
    euler = pm.edm_sample(pm.as_sigma_denoiser(den), x1 / a1, y, sigmas=sig, progress=False)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert euler.dtype == dtype and float((euler - ddim).abs().max()) <= tol
    # a plain function (the schedule given): the same
    f = lambda x, t, labels=None: torch.tanh(x * (1 - t))  # noqa: E731
    u = pm.ddim(f, x1, grid=grid, progress=False)
    v = pm.edm_sample(pm.as_sigma_denoiser(f, "cosine_legacy"), x1 / a1, sigmas=sig, progress=False)
    assert float((u - v).abs().max()) <= tol


def test_heun_is_second_order_on_gaussian_data():
    """Data N(mu, s^2 I): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE keeps
    (x - mu) / sqrt(s^2 + sigma^2) constant; Heun's error shrinks as h^2, Euler's as h."""
    mu, s = 0.3, 0.7
    D = lambda x, sigma, labels=None: mu + s * s / (s * s + sigma * sigma) * (x - mu)  # noqa: E731
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    errs = {}
    for n in (20, 40):
        sig = pm.edm_sigmas(n)[:-1]  # to sigma_min = 0.002 (no final step to 0)
        exact = mu + (x - mu) * math.sqrt(s * s + sig[-1] ** 2) / math.sqrt(s * s + sig[0] ** 2)
        for solver in ("euler", "heun"):
            out = pm.edm_sample(D, x, sigmas=sig, solver=solver, progress=False)
            errs[solver, n] = float((out - exact).abs().max())
    assert errs["heun", 40] < errs["euler", 40] / 5
    assert errs["heun", 20] / errs["heun", 40] > 3.5 and errs["euler", 20] / errs["euler", 40] < 2.5


def test_bad_input():
    den = machine_denoiser()
    D = pm.as_sigma_denoiser(den)
    x = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="lies above the largest noise level"):
        D(x, 100.0)
    with pytest.raises(ValueError, match="solver must be"):
        pm.edm_sample(D, x, solver="rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        pm.edm_sample(D, x, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="schedule="):
        pm.as_sigma_denoiser(den, "linear")
    with pytest.raises(TypeError, match="callable"):
        pm.as_sigma_denoiser(3)


def test_a_network_in_the_ve_convention_is_compared_as_any_denoiser():
    """A network written as D(x, sigma) (here: a small eps network seen through as_sigma_denoiser) goes into compare
    through from_sigma_denoiser, and samples as the network itself does."""
    from patchmosaic.networks import ResNet

    torch.manual_seed(0)
    net = pm.NetworkDenoiser(ResNet(channels=1, width=4, depth=1))
    ve = pm.as_sigma_denoiser(net)  # D(x, sigma): what a k-diffusion model offers
    x1 = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    images = pm.data.load_default()[0][:30]
    rep = pm.compare(pm.from_sigma_denoiser(ve),
                     {"IS": pm.MachineDenoiser(pm.IS(images))}, x1, steps=4, progress=False)
    direct = pm.ddim(net, x1, steps=4, progress=False)
    assert torch.allclose(rep["samples"]["network"], direct, rtol=0, atol=1e-4)
