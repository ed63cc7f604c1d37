"""Samplers (spec section 3) against a closed-form case, and DDIM with the IS machine.

Gaussian data x0 ~ N(mu, s^2 I) has the exact denoiser E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu).
"""

import math

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.diffusion.samplers import ddim, ddpm, reverse_process, time_grid

MU, S = 0.3, 0.5


def alpha_bar(t):  # cosine-legacy, written out here independently of the package
    return math.cos(t / 1.008 * math.pi / 2) ** 2


def gauss_denoiser(x, t, labels=None):
    ab = alpha_bar(t)
    a, b2 = math.sqrt(ab), 1 - ab
    return MU + a * S**2 / (ab * S**2 + b2) * (x - a * MU)


def test_time_grid():
    g = time_grid(20)
    assert g[0] == 1.0 and g[-1] == 0.0 and len(g) == 21
    assert np.allclose(np.diff(g), -0.05)


def test_ddim_matches_the_spec_update_step_by_step():
    x1 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddim(gauss_denoiser, x1, steps=7, progress=False)
    g = [i / 7 for i in range(7, -1, -1)]
    x = x1.clone()
    for t, t1 in zip(g[:-1], g[1:]):
        x0 = gauss_denoiser(x, t)
        if t1 == 0:
            x = x0
            break
        a, b = math.sqrt(alpha_bar(t)), math.sqrt(1 - alpha_bar(t))
        a1, b1 = math.sqrt(alpha_bar(t1)), math.sqrt(1 - alpha_bar(t1))
        x = a1 * x0 + b1 * (x - a * x0) / b
    assert torch.allclose(out, x, atol=1e-12, rtol=0)  # float64 throughout


def test_ddpm_matches_the_posterior_of_ho_et_al():
    x1 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddpm(gauss_denoiser, x1, generator=torch.Generator().manual_seed(7), steps=6, progress=False)
    gen = torch.Generator().manual_seed(7)
    g = [i / 6 for i in range(6, -1, -1)]
    x = x1.clone()
    for t, t1 in zip(g[:-1], g[1:]):
        x0 = gauss_denoiser(x, t)
        if t1 == 0:
            x = x0
            break
        ab, ab1 = alpha_bar(t), alpha_bar(t1)
        alpha = ab / ab1
        beta = 1 - alpha
        mean = math.sqrt(ab1) * beta / (1 - ab) * x0 + math.sqrt(alpha) * (1 - ab1) / (1 - ab) * x
        var = (1 - ab1) / (1 - ab) * beta
        x = mean + math.sqrt(var) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    assert torch.allclose(out, x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_many_steps_reach_the_data_distribution(sampler):
    # with the exact denoiser and a fine grid both samplers draw from N(mu, s^2): moments within 3%
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(40000, 1, 1, 1, generator=gen, dtype=torch.float64)
    kw = dict(steps=400, progress=False)
    x = ddim(gauss_denoiser, x1, **kw) if sampler == "ddim" else ddpm(gauss_denoiser, x1, generator=gen, **kw)
    assert abs(float(x.mean()) - MU) < 0.015
    assert abs(float(x.std()) / S - 1) < 0.03


def test_callback_sees_every_step_in_order():
    seen = []
    ddim(gauss_denoiser, torch.zeros(1, 1, 2, 2), steps=5, progress=False,
         callback=lambda i, t, x, x0: seen.append((i, t)))
    assert seen == [(i, (5 - i) / 5) for i in range(5)]


def test_ddim_with_the_is_machine_ends_on_a_training_image():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (12, 1, 8, 8))
    m = pm.IS(train)
    x1 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ddim(pm.MachineDenoiser(m), x1, steps=20, progress=False).numpy()
    d = ((out[:, None] - train[None]) ** 2).reshape(6, 12, -1).sum(-1)
    nearest = d.argmin(1)
    # at t = 1/20 the IS posterior is one-hot to within exp(-huge): the sample is that training image
    assert np.abs(out - train[nearest]).max() < 1e-9


@pytest.mark.parametrize("bad, match", [
    (dict(grid=[0.5, 0.7, 0.0]), "strictly decreasing"),
    (dict(grid=[1.5, 0.5, 0.0]), "within"),
    (dict(grid=[1.0]), "at least two"),
    (dict(steps=0), "positive integer"),
    (dict(eta=1.0), "torch.Generator"),
    (dict(eta=2.0, generator=torch.Generator()), "eta"),
])
def test_bad_sampler_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        reverse_process(gauss_denoiser, torch.zeros(1, 1, 2, 2), progress=False, **bad)


def test_bad_start():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ddim(gauss_denoiser, torch.zeros(2, 2), progress=False)
