"""The data-driven locality machine pm.DataLocal: its Wiener sensitivity fields against a float64 closed form and a
naive loop, its masks (the k^2 largest values, the centre always in), its calls against ELS with the same mask
(identical) and against the float64 torch oracle, and its use by MachineDenoiser, calibrate and compare.

Tolerances: fields and the float64 oracle 1e-9 (relative / of the data range); float32 engine 1e-3 worst and 1e-5
mean of the data range, as for every machine."""

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.machines.locality import pixel_fields, shared_field, top_mask, windowed_fields

from cases import MachineNet

SCHED = pm.schedules.get_schedule("cosine_legacy")


def smooth_images(rng, N, C=1, H=8, W=8):
    """Images with local correlations (blurred noise), in [-1, 1]; N > C H W keeps the covariance full rank."""
    x = rng.standard_normal((N, C, H + 2, W + 2))
    x = (x[..., 1:-1, 1:-1] + 0.6 * (x[..., :-2, 1:-1] + x[..., 2:, 1:-1]) + 0.3 * (x[..., 1:-1, :-2] + x[..., 1:-1, 2:]))
    return np.tanh(0.5 * x)


@pytest.fixture
def train(rng):
    return smooth_images(rng, 200)


def closed_form_jacobian(images, t):
    X = torch.as_tensor(images, dtype=torch.float64).reshape(len(images), -1)
    mu = X.mean(0)
    sigma = (X - mu).T @ (X - mu) / len(X)
    a, b2 = SCHED.scalar_coefficients(t)
    A = a * a * sigma + b2 * torch.eye(len(sigma), dtype=torch.float64)
    return a * torch.linalg.solve(A, sigma).T  # a Sigma A^-1 (Sigma, A symmetric)


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_jacobian_is_the_closed_form(rng, t):
    train = smooth_images(rng, 150, C=2, H=5, W=5)
    w = pm.Wiener(train)
    J = w.jacobian(t)
    ref = closed_form_jacobian(train, t)
    assert (J - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_fields_against_a_naive_loop(rng):
    C, H, W, K = 2, 5, 4, 5
    train = smooth_images(rng, 150, C=C, H=H, W=W)
    w = pm.Wiener(train)
    J = closed_form_jacobian(train, 0.4).numpy().reshape(C, H, W, C, H, W)
    F = np.abs(J).sum(axis=(0, 3))  # (H, W, H, W)
    got = pixel_fields(w, 0.4).numpy().reshape(H, W, H, W)
    assert np.abs(got - F).max() <= 1e-9 * F.max()
    win = windowed_fields(pixel_fields(w, 0.4), H, W, K).numpy()
    shared = np.zeros((K, K))
    for i in range(H):
        for j in range(W):
            row = F[i, j] / F[i, j].sum()
            for di in range(-2, 3):
                for dj in range(-2, 3):
                    inside = 0 <= i + di < H and 0 <= j + dj < W
                    want = F[i, j, i + di, j + dj] if inside else 0.0
                    assert win[i * W + j, di + 2, dj + 2] == pytest.approx(want, rel=1e-9, abs=1e-12)
                    shared[di + 2, dj + 2] += row[i + di, j + dj] / (H * W) if inside else 0.0
    got_shared = shared_field(pixel_fields(w, 0.4), H, W, K).numpy()
    assert np.abs(got_shared - shared).max() <= 1e-12


def test_top_mask_keeps_the_largest_and_the_centre(rng):
    field = torch.from_numpy(rng.random((9, 9)))
    for k in (1, 3, 5, 7, 9):
        m = top_mask(field, k)
        assert int(m.sum()) == k * k and bool(m[4, 4])
        others = m.clone()
        others[4, 4] = False
        rest = ~m
        if k > 1 and k < 9:
            assert field[others].min() >= field[rest].max()  # the k^2 - 1 largest besides the centre
    assert int(top_mask(field, 11).sum()) == 81  # more than the window: all of it
    # ties go to the nearer pixel: a flat field gives the disc-like nearest k^2 offsets
    m = top_mask(torch.ones(7, 7), 3)
    d2 = (torch.arange(7) - 3).reshape(7, 1) ** 2 + (torch.arange(7) - 3).reshape(1, 7) ** 2
    assert int(m.sum()) == 9 and d2[m].max() <= d2[~m].min()


def test_masks_grow_with_k_and_shrink_with_noise(train):
    m = pm.DataLocal(train)
    for t in (0.2, 0.8):
        masks = [m.mask(t, k) for k in (3, 5, 7)]
        for k, small, big in zip((3, 5), masks, masks[1:]):
            assert int(small.sum()) == k * k
            o = (big.shape[-1] - small.shape[-1]) // 2
            assert o >= 0
            padded = torch.zeros_like(big)
            padded[o : o + small.shape[-1], o : o + small.shape[-1]] = small
            assert bool((padded <= big).all())  # nested: the 9 pixels of k = 3 are among the 25 of k = 5
    # the field is wider at high noise: more of its mass away from the centre
    f_hi, f_lo = m.field(0.9), m.field(0.05)
    c = f_hi.shape[-1] // 2
    assert f_hi[c, c] / f_hi.sum() < f_lo[c, c] / f_lo.sum()


@pytest.mark.parametrize("boundary", ["zeros", "circular"])
@pytest.mark.parametrize("per_pixel", [False, True])
def test_calls_are_ELS_with_the_mask_and_match_the_oracle(rng, train, boundary, per_pixel):
    keys = train[:40]
    m = pm.DataLocal(keys, boundary=boundary, per_pixel=per_pixel, statistics=train)
    els = pm.ELS(keys, boundary=boundary)
    x = 0.8 * keys[:3] + 0.6 * rng.standard_normal((3,) + keys.shape[1:])
    for t, k in ((0.3, 3), (0.7, 5)):
        mask = m.mask(t, k)
        assert mask.shape[:-2] == ((8, 8) if per_pixel else ())
        got = m.denoise(torch.from_numpy(x).float(), t, k)
        same = els.denoise(torch.from_numpy(x).float(), t, mask.shape[-1], patch_mask=mask)
        assert torch.equal(got, same)
        ref = m.denoise(torch.from_numpy(x), t, k, backend="torch")  # float64 oracle
        err = (got.double() - ref).abs() / 2.0
        assert err.max() <= 1e-3 and err.mean() <= 1e-5
        got64 = m.denoise(torch.from_numpy(x), t, k, backend="cpu")
        assert (got64 - ref).abs().max() <= 1e-9 * 2.0


def test_field_weighting_is_the_relative_sensitivity_on_the_kept_pixels(rng, train):
    soft = pm.DataLocal(train, weighting="field")
    hard = pm.DataLocal(train)
    for t, k in ((0.2, 3), (0.9, 5)):
        w, keep = soft.mask(t, k), hard.mask(t, k)
        assert w.shape == keep.shape and w.dtype == torch.float64
        assert torch.equal(w > 0, keep)  # the same pixels
        K = w.shape[-1]
        assert w[K // 2, K // 2] == 1.0 and float(w.max()) <= 1.0 + 1e-12
        f = soft.field(t)
        o = (f.shape[-1] - K) // 2
        rel = f[o : o + K, o : o + K] / f[f.shape[-1] // 2, f.shape[-1] // 2]
        assert torch.allclose(w[keep], rel[keep].clamp(min=1e-12), rtol=1e-12, atol=0)
        x = rng.standard_normal((2, 1, 8, 8))
        assert np.array_equal(soft.denoise(x, t, k), pm.ELS(train).denoise(x, t, K, patch_mask=w))


def test_one_call_with_several_times_is_the_calls_per_time(rng, train):
    m = pm.DataLocal(train[:30], statistics=train)
    x = torch.from_numpy(rng.standard_normal((4, 1, 8, 8)))
    t = torch.tensor([0.3, 0.7, 0.3, 0.7], dtype=torch.float64)
    got = m.denoise(x, t, 3)
    for tv in (0.3, 0.7):
        rows = (t == tv).nonzero().reshape(-1)
        assert torch.equal(got[rows], m.denoise(x[rows], tv, 3))
    eps = m.eps(x, t, 3)
    a, b2 = SCHED.coefficients(t.numpy())
    want = (x - torch.from_numpy(a).reshape(4, 1, 1, 1) * got) / torch.from_numpy(np.sqrt(b2)).reshape(4, 1, 1, 1)
    assert (eps - want).abs().max() <= 1e-12


def test_larger_canvas_and_conditional_calls(rng, train):
    y = np.arange(len(train)) % 3
    m = pm.DataLocal(train, y)
    x = rng.standard_normal((2, 1, 12, 12))
    out = m.denoise(x, 0.5, 3, labels=[0, 2])
    mask = m.mask(0.5, 3)
    assert np.array_equal(out, pm.ELS(train, y).denoise(x, 0.5, mask.shape[-1], labels=[0, 2], patch_mask=mask))


def test_bad_input_is_refused_before_work(train):
    m = pm.DataLocal(train)
    x = np.zeros((1, 1, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        m.denoise(x, 0.5, 4)
    with pytest.raises(ValueError, match="neighbourhood size k"):
        m.denoise(x, 0.5)
    for t in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t"):
            m.denoise(x, t, 3)
    with pytest.raises(ValueError, match="patch_mask"):
        m.denoise(x, 0.5, 3, patch_mask=np.ones((3, 3)))
    with pytest.raises(ValueError, match="statistics images are 1x4x4"):
        pm.DataLocal(train, statistics=train[:, :, :4, :4])
    with pytest.raises(ValueError, match="window"):
        pm.DataLocal(train, window=4)
    with pytest.raises(ValueError, match="training size 8x8"):
        pm.DataLocal(train, per_pixel=True).denoise(np.zeros((1, 1, 10, 10)), 0.5, 3)
    with pytest.raises(ValueError, match="boundary"):
        pm.DataLocal(train, boundary="reflect")
    with pytest.raises(pm.ResourceError):  # the memory check sizes the largest frame of the neighbourhood
        pm.DataLocal(train, max_memory=10**6).check_request((64, 1, 256, 256), k=9)
    with pytest.raises(ValueError, match="weighting"):
        pm.DataLocal(train, weighting="gaussian")
    with pytest.raises(ValueError, match="window 17 exceeds"):
        pm.DataLocal(train, boundary="circular", window=17)


def test_denoiser_calibration_and_comparison(rng, train):
    """calibrate finds the size of a network that *is* the machine at that size; compare and MachineDenoiser take
    the machine and the Wiener filter like any other."""
    keys = train[:30]
    m = pm.DataLocal(keys, statistics=train)
    x1 = torch.from_numpy(rng.standard_normal((3, 1, 8, 8))).float()
    c = pm.calibrate(MachineNet(m, 5), m, x1, candidates=(3, 5, 7), steps=4, progress=False)
    assert list(c.schedule.ks) == [5, 5, 5, 5]
    rep = pm.compare(MachineNet(m, 5), {"DataLocal": pm.MachineDenoiser(m, c.schedule),
                                        "Wiener": pm.MachineDenoiser(pm.Wiener(train))}, x1, steps=4,
                     progress=False)
    assert rep["summary"]["DataLocal"]["r"]["median"] > 0.999  # the same machine: the same samples
    assert rep["per_seed"]["DataLocal"]["machine"] == {"type": "DataLocal", "train_images": 30, "boundary": "zeros",
                                                       "ks": [5, 5, 5, 5]}
    assert rep["per_seed"]["Wiener"]["machine"]["type"] == "Wiener"
    assert "neighbourhood" in pm.MachineDenoiser(m, 5).describe()["machine"]  # the denoiser's own, fuller record
