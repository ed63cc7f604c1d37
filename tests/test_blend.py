"""A per-step blend of two denoisers (diffusion/blend.py) and the calibration of its weights
(experiments/blend_calibration.py): exact mixtures, recovered weights, resume, bad input refused."""

import json

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.diffusion.blend import check_weight


def _pair(conditional=False):
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (30, 1, 10, 10))
    labels = np.arange(30) % 3 if conditional else None
    els = pm.MachineDenoiser(pm.ELS(train, labels), 3)
    wiener = pm.MachineDenoiser(pm.Wiener(train, labels))
    return els, wiener


class BlendNet(torch.nn.Module):
    """A 'network' that is itself a blend with known weights."""

    def __init__(self, blend, stop_after=None):
        super().__init__()
        self.blend, self.calls, self.stop_after = blend, 0, stop_after

    def forward(self, t, x, labels=None):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt  # (an interruption: the same network class, so the same fingerprint)
        self.calls += 1
        return self.blend.eps(x.double(), float(t[0]), labels).float()


def test_blend_is_the_weighted_mixture_float64():
    els, wiener = _pair()
    x = torch.randn(3, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, v = els(x, 0.4), wiener(x, 0.4)
    assert torch.equal(pm.BlendDenoiser(els, wiener, 1.0)(x, 0.4), u)
    assert torch.equal(pm.BlendDenoiser(els, wiener, 0.0)(x, 0.4), v)
    assert torch.allclose(pm.BlendDenoiser(els, wiener, 0.3)(x, 0.4), 0.3 * u + 0.7 * v, rtol=0, atol=1e-12)
    out = pm.BlendDenoiser(els, wiener, 0.3)(x.numpy(), 0.4)  # numpy in, numpy out
    assert isinstance(out, np.ndarray) and np.allclose(out, (0.3 * u + 0.7 * v).numpy(), rtol=0, atol=1e-12)
    # a schedule: each step's own weight; eps and score follow from x0_hat
    ws = pm.WeightSchedule((1.0, 0.5), (0.25, 0.75))
    b = pm.BlendDenoiser(els, wiener, ws)
    assert b.weight_at(0.9) == 0.25 and b.weight_at(0.4) == 0.75
    assert torch.allclose(b(x, 0.4), 0.75 * u + 0.25 * v, rtol=0, atol=1e-12)
    a, s = (float(c) for c in b.schedule.coefficients(0.4))
    assert torch.allclose(b.eps(x, 0.4), (x - a * b(x, 0.4)) / s ** 0.5, rtol=0, atol=1e-12)


def test_a_zero_weight_denoiser_is_not_called():
    els, _ = _pair()

    class Refuses(pm.MachineDenoiser):
        def __call__(self, x, t, labels=None):
            raise AssertionError("called")

    other = Refuses(pm.IS(np.zeros((2, 1, 10, 10))))
    x = torch.randn(1, 1, 10, 10)
    assert torch.equal(pm.BlendDenoiser(els, other, 1.0)(x, 0.5), els(x, 0.5))


def test_samples_of_a_one_sided_blend_are_the_denoisers_own():
    els, wiener = _pair(conditional=True)
    x1 = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = [0, 2]
    s1 = pm.ddim(pm.BlendDenoiser(els, wiener, 1.0), x1, y, steps=4, progress=False)
    assert torch.equal(s1, pm.ddim(els, x1, y, steps=4, progress=False))


@pytest.mark.parametrize("conditional", [False, True])
def test_calibration_recovers_the_true_weights(conditional):
    els, wiener = _pair(conditional)
    true = pm.WeightSchedule((1.0, 0.8, 0.6, 0.4, 0.2), (0.2, 0.5, 1.0, 0.0, 0.7))
    x1 = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2]) if conditional else None
    c = pm.calibrate_blend(BlendNet(pm.BlendDenoiser(els, wiener, true)), els, wiener, x1, y, steps=5, progress=False)
    assert c.schedule == true
    assert (c.choices == np.array(true.weights)[:, None]).all()
    assert c.cosine.shape == (5, 3, 11) and np.all(c.cosine.max(2) > 1 - 1e-6)
    assert torch.allclose(c.denoiser(els, wiener)(x1.double(), 0.6), els(x1.double(), 0.6))


def test_calibration_resumes_and_round_trips(tmp_path):
    els, wiener = _pair()
    true = pm.WeightSchedule((1.0, 0.75, 0.5, 0.25), (0.3, 0.3, 0.9, 0.6))
    x1 = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(4))
    full = pm.calibrate_blend(BlendNet(pm.BlendDenoiser(els, wiener, true)), els, wiener, x1, steps=4, progress=False)

    state = str(tmp_path / "blend.npz")
    with pytest.raises(KeyboardInterrupt):
        pm.calibrate_blend(BlendNet(pm.BlendDenoiser(els, wiener, true), stop_after=2), els, wiener, x1, steps=4,
                           state=state, progress=False)
    net = BlendNet(pm.BlendDenoiser(els, wiener, true))
    again = pm.calibrate_blend(net, els, wiener, x1, steps=4, state=state, progress=False)
    assert net.calls == 2  # two of the four steps were saved before the interruption
    assert again.schedule == full.schedule and np.array_equal(again.cosine, full.cosine)
    path = str(tmp_path / "w.json")
    again.to_json(path, network="toy")
    assert pm.WeightSchedule.from_json(path) == full.schedule and json.load(open(path))["network"] == "toy"
    (tmp_path / "bad.json").write_text(json.dumps({"times": [1.0], "weights": [1.5]}))
    with pytest.raises(ValueError, match="bad.json"):
        pm.WeightSchedule.from_json(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("w, error", [(float("nan"), ValueError), (-0.1, ValueError), (1.5, ValueError),
                                      (True, TypeError), ("0.5", TypeError), (None, TypeError)])
def test_bad_weights_are_refused(w, error):
    with pytest.raises(error, match="weight"):
        check_weight(w)
    els, wiener = _pair()
    with pytest.raises(error, match="weight"):
        pm.BlendDenoiser(els, wiener, w)
    with pytest.raises(error, match="weight"):
        pm.WeightSchedule((1.0, 0.5), (0.5, w))


def test_bad_blends_are_refused_before_any_work():
    els, wiener = _pair()
    with pytest.raises(TypeError, match="second must be a denoiser"):
        pm.BlendDenoiser(els, lambda x, t, labels=None: x, 0.5)
    other = pm.MachineDenoiser(pm.Wiener(np.zeros((4, 1, 10, 10)), schedule="linear"))
    with pytest.raises(ValueError, match="noise schedule"):
        pm.BlendDenoiser(els, other, 0.5)
    with pytest.raises(ValueError, match="times and weights"):
        pm.WeightSchedule((1.0,), (0.5, 0.5))
    net = BlendNet(pm.BlendDenoiser(els, wiener, 0.5))
    x1 = torch.randn(2, 1, 10, 10)
    with pytest.raises(ValueError, match="candidates"):
        pm.calibrate_blend(net, els, wiener, x1, candidates=[], progress=False)
    with pytest.raises(ValueError, match="weight"):
        pm.calibrate_blend(net, els, wiener, x1, candidates=[0.5, 2.0], progress=False)
    with pytest.raises(ValueError, match="x1 must be"):
        pm.calibrate_blend(net, els, wiener, x1[0], progress=False)
    with pytest.raises(ValueError, match="labels"):
        pm.calibrate_blend(net, els, wiener, x1, [0, 1, 2], progress=False)
    assert net.calls == 0
