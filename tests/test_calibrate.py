"""Calibration (spec section 4) recovers a known k-schedule and resumes after an interruption."""

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.experiments.calibrate import calibrate, cosine_per_seed, lower_median, per_step_choices, rounded_median


class MachineNet(torch.nn.Module):
    """A 'network' that is itself a machine with a known k-schedule: eps = machine.eps(x, t, k(t))."""

    def __init__(self, machine, ks, stop_after=None):
        super().__init__()
        self.machine, self.ks, self.calls, self.stop_after = machine, ks, 0, stop_after

    def forward(self, t, x, labels=None):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt  # (an interruption: the same network class, so the same fingerprint)
        self.calls += 1
        t0 = float(t[0])
        return self.machine.eps(x, t0, self.ks.k_at(t0), labels=labels)


def _setup(conditional=False):
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (24, 1, 10, 10)).astype(np.float32)
    labels = np.arange(24) % 3
    m = pm.ELS(train, labels if conditional else None)
    true = pm.KSchedule((1.0, 0.8, 0.6, 0.4, 0.2), (9, 7, 7, 5, 3))
    x1 = torch.randn(4, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0]) if conditional else None
    return m, true, x1, y


@pytest.mark.parametrize("conditional", [False, True])
def test_calibration_recovers_the_true_schedule(conditional):
    m, true, x1, y = _setup(conditional)
    c = calibrate(MachineNet(m, true), m, x1, y, candidates=(3, 5, 7, 9, 11), steps=5, progress=False)
    assert c.schedule == true
    assert (c.choices == np.array(true.ks)[:, None]).all()  # every seed, every step
    best = c.cosine.max(2)
    assert np.all(best > 1 - 1e-6) and c.cosine.shape == (5, 4, 5)


def test_calibration_resumes_where_it_stopped(tmp_path):
    m, true, x1, _ = _setup()
    state = str(tmp_path / "cal.npz")
    full = calibrate(MachineNet(m, true), m, x1, candidates=(3, 5, 7, 9), steps=5, progress=False)

    with pytest.raises(KeyboardInterrupt):
        calibrate(MachineNet(m, true, stop_after=3), m, x1, candidates=(3, 5, 7, 9), steps=5, state=state,
                  progress=False)
    net = MachineNet(m, true)
    resumed = calibrate(net, m, x1, candidates=(3, 5, 7, 9), steps=5, state=state, progress=False)
    assert net.calls == 2  # steps 3 and 4 only
    assert resumed.schedule == full.schedule and np.array_equal(resumed.cosine, full.cosine)
    with pytest.raises(ValueError, match="different run"):
        calibrate(net, m, x1, candidates=(3, 5), steps=5, state=state, progress=False)


def test_calibration_json_is_a_k_schedule(tmp_path):
    m, true, x1, _ = _setup()
    c = calibrate(MachineNet(m, true), m, x1, candidates=(3, 5, 7, 9), steps=5, progress=False)
    c.to_json(str(tmp_path / "k.json"), note="x")
    assert pm.KSchedule.from_json(str(tmp_path / "k.json")) == true


def test_helpers():
    assert lower_median([3, 5, 7, 9]) == 5 and lower_median([7, 3, 5]) == 5 and lower_median([0.05, 0.01]) == 0.01
    # spec section 4: the median over seeds rounded to an odd size (a candidate; the smaller of two equally near)
    ks = (3, 5, 7, 9, 11)
    assert rounded_median([3, 9], ks) == 5 and lower_median([3, 9]) == 3  # median 6: 5 and 7 equally near
    assert rounded_median([3, 11], ks) == 7 and rounded_median([3, 3, 9, 11], ks) == 5  # medians 7 and 6
    assert rounded_median([3, 5], ks) == 3 and rounded_median([9, 3, 5], ks) == 5  # (odd count: the median itself)
    assert rounded_median([3, 9], (3, 9)) == 3  # the candidates tried, not every odd size
    assert rounded_median([0.001, 0.1], (0.001, 0.01, 0.05, 0.1)) == 0.05  # thresholds: the nearest candidate
    # decimal candidates: the mean of two adjacent ones lies a rounding off halfway (0.1, 0.2: 0.15000000000000002),
    # still a tie, to the smaller (the larger won at 3 of 10 pairs of the blend weights)
    weights = tuple(np.round(np.linspace(0, 1, 11), 10))
    assert all(rounded_median([a, b], weights) == a for a, b in zip(weights, weights[1:]))
    thresholds = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    assert all(rounded_median([b, a], thresholds) == a for a, b in zip(thresholds, thresholds[1:]))
    from patchmosaic.diffusion.kschedule import KSchedule

    ten = KSchedule(tuple(i / 10 for i in range(10, 0, -1)), tuple(range(21, 1, -2)))
    halfway = [(i + 0.5) / 10 for i in range(1, 10)]  # each between two steps: the earlier (larger t) one
    assert [ten.k_at(t) for t in halfway] == [ten.k_at((i + 1) / 10) for i in range(1, 10)]
    cos = np.zeros((2, 2, 3))
    cos[0, 0, 0] = cos[0, 1, 2] = cos[1, 0, 1] = cos[1, 1, 1] = 1  # step 0: seeds choose 3 and 11; step 1: 7, 7
    assert per_step_choices(cos, (3, 7, 11), [1.0, 0.5, 0.0])[2] == (7, 7)
    assert per_step_choices(cos, (3, 7, 11), [1.0, 0.5, 0.0], "lower")[2] == (3, 7)
    with pytest.raises(ValueError, match="median must be one of 'rounded', 'lower', got 'mean'"):
        per_step_choices(cos, (3, 7, 11), [1.0, 0.5, 0.0], "mean")
    u = torch.randn(3, 1, 4, 4)
    assert np.allclose(cosine_per_seed(u, 2 * u), 1) and np.allclose(cosine_per_seed(u, -u), -1)


def test_calibration_rejects_bad_input():
    m, true, x1, _ = _setup()
    net = MachineNet(m, true)
    with pytest.raises(ValueError, match="odd"):
        calibrate(net, m, x1, candidates=(3, 4), steps=5, progress=False)
    with pytest.raises(ValueError, match="median must be one of 'rounded', 'lower', got 'mean'"):
        calibrate(net, m, x1, steps=5, progress=False, median="mean")
    assert net.calls == 0
    with pytest.raises(ValueError, match="IS machine"):
        calibrate(net, pm.IS(np.zeros((2, 1, 10, 10))), x1, steps=5, progress=False)
    with pytest.raises(ValueError, match=r"\(M, C, H, W\)"):
        calibrate(net, m, x1[0], steps=5, progress=False)


def test_default_candidates_on_small_images_stop_at_the_largest_useful_patch():
    """Default k_max: 31, or 2 max(H, W) - 1 if smaller (it was 2 max(H, W) + 1, refused as useless on every
    image of at most 15 pixels a side)."""
    rng = np.random.default_rng(2)
    m = pm.ELS(rng.uniform(-1, 1, (6, 1, 4, 5)).astype(np.float32))
    x1 = torch.randn(2, 1, 4, 5, generator=torch.Generator().manual_seed(0))
    c = calibrate(MachineNet(m, pm.KSchedule.constant(3, 2)), m, x1, steps=2, progress=False)
    assert c.candidates == (3, 5, 7, 9)


def test_calibration_device_argument():
    """``device="cpu"`` is today's run, bit for bit; a CUDA device on a torch without CUDA is refused by name."""
    m, true, x1, y = _setup(True)
    base = calibrate(MachineNet(m, true), m, x1, y, candidates=(3, 5, 7), steps=3, progress=False)
    on_cpu = calibrate(MachineNet(m, true), m, x1, y, candidates=(3, 5, 7), steps=3, progress=False, device="cpu")
    assert np.array_equal(base.cosine, on_cpu.cosine) and base.schedule == on_cpu.schedule
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' asks for a CUDA device"):
            calibrate(MachineNet(m, true), m, x1, y, candidates=(3, 5), steps=2, progress=False, device="cuda")
