"""Adapters: machine + k-schedule and eps networks as denoisers agree with direct calls."""

import math
import os

import numpy as np
import pytest
import torch

import patchmosaic as pm
from conftest import SHARED, scripted
from patchmosaic.networks import ResNet, UNet, load_network


def test_machine_denoiser_uses_the_k_of_each_step():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (10, 1, 9, 9))
    m = pm.ELS(train)
    ks = pm.KSchedule((1.0, 0.5, 0.25), (7, 5, 3))
    d = pm.MachineDenoiser(m, ks)
    x = torch.from_numpy(rng.standard_normal((2, 1, 9, 9)))
    for t, k in ((1.0, 7), (0.5, 5), (0.25, 3), (0.3, 3)):
        assert torch.equal(d(x, t), m.denoise(x, t, k))
    assert torch.allclose(d.eps(x, 0.5), m.eps(x, 0.5, 5), atol=1e-12)
    assert torch.allclose(d.score(x, 0.5), m.score(x, 0.5, 5), atol=1e-10)


def test_machine_denoiser_needs_k_for_local_machines():
    with pytest.raises(ValueError, match="patch size"):
        pm.MachineDenoiser(pm.LS(np.zeros((2, 1, 4, 4))))


@pytest.mark.parametrize("make", [
    lambda: ResNet(1, 8, 2, num_classes=3),
    lambda: UNet(1, (4, 8, 16), num_classes=3, attention=True),
])
def test_network_denoiser_matches_a_direct_call(make):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(3, 1, 16, 16)
    y = torch.tensor([0, 2, 1])
    t = 0.4
    ab = math.cos(t / 1.008 * math.pi / 2) ** 2
    with torch.no_grad():
        eps = net(torch.full((3,), t), x, y)
    want = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    for module in (net, scripted(net)):
        d = pm.NetworkDenoiser(module, batch_size=2)   # two chunks
        assert torch.allclose(d(x, t, y), want, atol=1e-5)
        assert torch.allclose(d.eps(x, t, y), eps, atol=1e-6)


def test_network_denoiser_rejects_bad_input():
    d = pm.NetworkDenoiser(ResNet(1, 4, 1))
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        d(torch.zeros(1, 1, 8, 8), 0.0)
    with pytest.raises(ValueError, match="one label per image"):
        d(torch.zeros(2, 1, 8, 8), 0.5, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        d(torch.zeros(8, 8), 0.5)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "models")), reason="needs ../shared/models")
def test_reference_network_reproduces_its_own_samples():
    # the reference samples were made on a GPU in float32; 20 chaotic steps later the CPU agrees to
    # ~1e-3 on average and ~2e-2 at worst (measured 1.6e-3 / 2.4e-2 on three seeds)
    z = np.load(os.path.join(SHARED, "models", "fmnist20k_resnet_zeros_cond", "ddim20_samples.npz"))
    net = load_network(os.path.join(SHARED, "models", "fmnist20k_resnet_zeros_cond", "model.pt"))
    d = pm.NetworkDenoiser(net)
    x1, y = torch.from_numpy(z["seeds"][:2]), torch.from_numpy(z["labels"][:2])
    out = pm.ddim(d, x1, y, progress=False)
    err = (out - torch.from_numpy(z["samples"][:2])).abs()
    assert float(err.mean()) < 5e-3 and float(err.max()) < 0.05
    # and the adapter is the network's own call
    with torch.no_grad():
        eps = net(torch.full((2,), 0.5), x1, y)
    assert torch.allclose(d.eps(x1, 0.5, y), eps)
