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


def test_denoiser_wrappers_refuse_or_describe_what_a_review_found(tmp_path):
    """From a review of the denoiser wrappers: an IndexedDenoiser had no description (every one shared one
    fingerprint: a comparison resumed another's samples); a network's description held its weights only (a zero-
    and a circular-padded ResNet of equal weights shared one); a network on the standard cosine schedule formed
    x0 = (x - b eps) / a at t = 1 with a = 6e-17 (samples of 1e12); a KSchedule of even k for ELS, a k for IS, a
    threshold given as a string or a bool, an IndexedDenoiser schedule whose later k the canvas cannot serve were
    taken and failed later or never; a KSchedule file with a 400-digit time, a published schedule's unsorted or NaN
    grid, Linear(beta_min=nan), a score at a time without noise, and per-image times given to a MachineDenoiser
    each gave no clear error. Each is now refused by name at construction or before the call's work."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (6, 1, 6, 6)), rng.uniform(-1, 1, (6, 1, 6, 6))
    descs = [pm.IndexedDenoiser(pm.ELS(x), k, tol=tol).describe() for x, k, tol in ((a, 3, 1e-3), (b, 3, 1e-3),
                                                                                   (a, 5, 1e-3), (a, 3, 1e-2))]
    assert all(descs[i] != descs[j] for i in range(4) for j in range(i))
    torch.manual_seed(0)
    zeros = ResNet(1, 4, 1)
    circular = ResNet(1, 4, 1, padding="circular")
    circular.load_state_dict(zeros.state_dict())
    assert pm.NetworkDenoiser(zeros).describe() != pm.NetworkDenoiser(circular).describe()
    assert pm.NetworkDenoiser(scripted(zeros)).describe() != pm.NetworkDenoiser(scripted(circular)).describe()
    net = pm.NetworkDenoiser(zeros, "cosine")
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"leaves almost no signal at t = 1.*start the time grid lower"):
        net(x, 1.0)
    assert torch.isfinite(net(x, 0.99)).all()
    with pytest.raises(ValueError, match="alpha_bar"):
        pm.NetworkDenoiser(zeros).score(x, 1e-200)
    els = pm.ELS(a)
    with pytest.raises(ValueError, match=r"the k-schedule holds k = 4"):
        pm.MachineDenoiser(els, pm.KSchedule((1.0, 0.5), (3, 4), odd=False))
    with pytest.raises(ValueError, match=r"IS has no per-step parameter .* give k=None, got 7"):
        pm.MachineDenoiser(pm.IS(a), 7)
    for k in ("0.5", True):
        with pytest.raises(ValueError, match="takes a threshold in"):
            pm.MachineDenoiser(pm.PCALocality(a), k)
    with pytest.raises(ValueError, match="padding signature|canvas"):
        pm.IndexedDenoiser(els, pm.KSchedule((1.0, 0.5), (3, 11)), canvas=(10, 10), mode="measured")
    with pytest.raises(TypeError, match=r"MachineDenoiser takes t as one float .* of shape \(2,\)"):
        pm.MachineDenoiser(els, 3)(np.zeros((2, 1, 6, 6)), np.array([0.3, 0.5]))
    path = tmp_path / "k.json"
    path.write_text('{"times": [' + "1" * 400 + '], "ks": [3]}')
    with pytest.raises(ValueError, match=r"k\.json"):
        pm.KSchedule.from_json(str(path))
    from patchmosaic.diffusion.kschedule import published_schedule

    for grid in ([1.0, float("nan"), 0.5, 0.0], [0.5, 1.0, 0.25]):
        with pytest.raises(ValueError, match="grid must be strictly decreasing"):
            published_schedule(grid=grid)
    with pytest.raises(ValueError, match=r"Linear: beta_min must be a finite number >= 0, got nan"):
        pm.schedules.Linear(beta_min=float("nan"))
