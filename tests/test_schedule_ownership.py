"""A denoiser owns its noise schedule: samplers, calibration and comparison take it from the denoiser,
and mixing denoisers of different schedules is an error (before, they silently stepped with the
cosine-legacy coefficients whatever the denoiser's schedule)."""

import math

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.experiments.calibrate import calibrate
from patchmosaic.experiments.compare import compare

from cases import MachineNet


def linear_ab(t):  # the linear-beta schedule, written out here independently of the package
    ab = math.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t * t))
    return math.sqrt(ab), math.sqrt(1 - ab)


def hand_ddim(denoiser, x1, labels, steps):
    x = x1.clone()
    g = [i / steps for i in range(steps, -1, -1)]
    for t, t1 in zip(g[:-1], g[1:]):
        x0 = denoiser(x, t, labels)
        if t1 == 0:
            return x0
        a, b = linear_ab(t)
        a1, b1 = linear_ab(t1)
        x = a1 * x0 + b1 * (x - a * x0) / b
    return x


def _setup():
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (12, 1, 8, 8))
    els = pm.ELS(train, schedule="linear")
    x1 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return els, x1


def test_ddim_steps_with_the_denoisers_own_schedule():
    els, x1 = _setup()
    den = pm.MachineDenoiser(els, 5)
    got = pm.ddim(den, x1, steps=6, progress=False)
    assert torch.allclose(got, hand_ddim(den, x1, None, 6), rtol=0, atol=1e-12)
    assert torch.equal(pm.ddim(den, x1, steps=6, schedule="linear", progress=False), got)
    with pytest.raises(ValueError, match="owns its schedule"):
        pm.ddim(den, x1, steps=6, schedule="cosine_legacy", progress=False)


def test_compare_samples_the_network_on_its_schedule(tmp_path):
    els, x1 = _setup()
    net = pm.NetworkDenoiser(MachineNet(els, 5), schedule="linear", dtype=torch.float64)
    rep = compare(net, {"ELS": pm.MachineDenoiser(els, 5)}, x1.float(), steps=6, batch_size=3, progress=False)
    want = hand_ddim(pm.MachineDenoiser(els, 5), x1.float(), None, 6)
    assert torch.allclose(rep["samples"]["network"], want, rtol=0, atol=1e-5)
    assert rep["summary"]["ELS"]["r"]["median"] > 1 - 1e-6
    # a bare network module runs on the machines' schedule
    rep = compare(MachineNet(els, 5), {"ELS": pm.MachineDenoiser(els, 5)}, x1.float(), steps=6, batch_size=3,
                  progress=False)
    assert torch.allclose(rep["samples"]["network"], want, rtol=0, atol=1e-5)


def test_mixing_schedules_is_refused():
    els, x1 = _setup()
    cosine_net = pm.NetworkDenoiser(MachineNet(els, 5))  # cosine_legacy by default
    with pytest.raises(ValueError, match="'network' runs on the noise schedule 'cosine_legacy' but 'ELS' on 'linear'"):
        compare(cosine_net, {"ELS": pm.MachineDenoiser(els, 5)}, x1.float(), steps=4, progress=False)
    other = pm.ELS(els.images, schedule="cosine")
    with pytest.raises(ValueError, match="runs on the noise schedule"):
        compare(MachineNet(els, 5), {"ELS": pm.MachineDenoiser(els, 5), "ELS_cos": pm.MachineDenoiser(other, 5)},
                x1.float(), steps=4, progress=False)
    with pytest.raises(ValueError, match="runs on the noise schedule"):
        calibrate(cosine_net, els, x1.float(), candidates=[3, 5], steps=4, progress=False)


def test_calibrate_runs_on_the_shared_schedule():
    els, x1 = _setup()
    net = pm.NetworkDenoiser(MachineNet(els, 5), schedule="linear", dtype=torch.float64)
    cal = calibrate(net, els, x1.float(), candidates=[3, 5, 7], steps=4, progress=False)
    assert set(cal.schedule.ks) == {5}  # the network is the k = 5 machine: every step recovers it
