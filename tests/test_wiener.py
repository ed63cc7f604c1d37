"""The optimal linear denoiser pm.Wiener against its closed form, computed here directly in float64:
``x0_hat = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu)`` with a linear solve (no eigendecomposition),
``Sigma`` normalised by 1/N, per class for a conditional call."""

import numpy as np
import pytest
import torch

import patchmosaic as pm

SCHED = pm.schedules.get_schedule("cosine_legacy")


def closed_form(train, x, t, train_labels=None, labels=None):
    """float64 reference: one linear solve per query image with the mean and covariance of its class."""
    X = torch.as_tensor(np.asarray(train), dtype=torch.float64).reshape(len(train), -1)
    xq = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(len(x), -1)
    B, D = xq.shape
    t = np.broadcast_to(np.asarray(t, np.float64), (B,))
    out = torch.empty_like(xq)
    for b in range(B):
        rows = X if labels is None else X[torch.from_numpy(np.asarray(train_labels) == int(labels[b]))]
        mu = rows.mean(0)
        sigma = (rows - mu).T @ (rows - mu) / rows.shape[0]
        a, b2 = SCHED.scalar_coefficients(float(t[b]))
        A = a * a * sigma + b2 * torch.eye(D, dtype=torch.float64)
        out[b] = mu + a * sigma @ torch.linalg.solve(A, xq[b] - a * mu)
    return out.reshape(np.asarray(x).shape).numpy()


def data(rng, N=12, C=3, H=4, W=4, classes=None):
    """Correlated training images in [-1, 1] (a low-rank part plus noise) and optional labels."""
    D = C * H * W
    basis = rng.standard_normal((4, D))
    X = np.tanh(0.5 * rng.standard_normal((N, 4)) @ basis + 0.2 * rng.standard_normal((N, D)))
    y = None if classes is None else np.arange(N) % classes
    return X.reshape(N, C, H, W), y


def queries(rng, train, B, t):
    a, b2 = SCHED.coefficients(np.broadcast_to(np.asarray(t, float), (B,)))
    x0 = train[rng.integers(0, len(train), B)] + 0.1 * rng.standard_normal((B,) + train.shape[1:])
    return a[:, None, None, None] * x0 + np.sqrt(b2)[:, None, None, None] * rng.standard_normal(x0.shape)


def data_range(train):
    return float(np.ptp(train))


@pytest.mark.parametrize("N", [12, 100], ids=["N<D-svd", "N>D-eigh"])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_float64_matches_the_closed_form(rng, N, t):
    train, _ = data(rng, N=N)
    m = pm.Wiener(train)
    x = queries(rng, train, 5, t)
    got = m.denoise(x, t)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == x.shape
    assert np.abs(got - closed_form(train, x, t)).max() <= 1e-9 * data_range(train)


def test_float32_matches_the_closed_form(rng):
    train, _ = data(rng, N=40)
    m = pm.Wiener(train.astype(np.float32))
    x = queries(rng, train, 6, 0.4).astype(np.float32)
    got = m.denoise(torch.from_numpy(x), 0.4)
    assert torch.is_tensor(got) and got.dtype == torch.float32
    # the reference sees the same float32 data, in float64
    err = np.abs(got.numpy() - closed_form(train.astype(np.float32), x, 0.4))
    assert err.mean() <= 1e-5 and err.max() <= 1e-3


def test_per_image_t(rng):
    train, _ = data(rng, N=30)
    m = pm.Wiener(train)
    t = np.array([0.02, 0.25, 0.5, 0.9, 1.0])
    x = queries(rng, train, 5, t)
    ref = closed_form(train, x, t)
    for tt in (t, torch.from_numpy(t), list(t)):
        got = m.denoise(x, tt)
        assert np.abs(got - ref).max() <= 1e-9 * data_range(train)
    # a batch of mixed times equals each image on its own
    one = np.concatenate([m.denoise(x[b : b + 1], float(t[b])) for b in range(5)])
    assert np.abs(one - ref).max() <= 1e-9 * data_range(train)


def test_per_class_with_labels(rng):
    train, y = data(rng, N=36, classes=3)
    m = pm.Wiener(train, y)
    x = queries(rng, train, 7, 0.3)
    lab = np.array([2, 0, 1, 1, 2, 0, 0])
    tol = 1e-9 * data_range(train)
    assert np.abs(m.denoise(x, 0.3, labels=lab) - closed_form(train, x, 0.3, y, lab)).max() <= tol
    assert np.abs(m.denoise(x, 0.3, labels=torch.from_numpy(lab)) - closed_form(train, x, 0.3, y, lab)).max() <= tol
    # one int for all; a single class in the batch
    assert np.abs(m.denoise(x, 0.3, labels=1) - closed_form(train, x, 0.3, y, np.full(7, 1))).max() <= tol
    # without labels at call time: every training image, whatever its label
    assert np.abs(m.denoise(x, 0.3) - closed_form(train, x, 0.3)).max() <= tol
    # the classes really differ
    assert np.abs(m.denoise(x, 0.3, labels=0) - m.denoise(x, 0.3, labels=1)).max() > 1e-3
    mu, sigma = m.statistics(2)
    rows = torch.from_numpy(train[y == 2].reshape(12, -1))
    assert torch.allclose(mu, rows.mean(0), atol=1e-12)
    assert torch.allclose(sigma, torch.cov(rows.T, correction=0), atol=1e-12)


def test_numpy_and_torch_in_same_type_out(rng):
    train, _ = data(rng)
    m = pm.Wiener(torch.from_numpy(train).float())
    x = queries(rng, train, 3, 0.5)
    for xin in (x, x.astype(np.float32)):
        for fn in (m.denoise, m.eps, m.score):
            out = fn(xin, 0.5)
            assert isinstance(out, np.ndarray) and out.dtype == xin.dtype and out.shape == xin.shape
            out = fn(torch.from_numpy(xin), 0.5)
            assert torch.is_tensor(out) and out.dtype == torch.from_numpy(xin).dtype


def test_eps_and_score_follow_from_x0(rng):
    train, _ = data(rng, N=20)
    m = pm.Wiener(train)
    t = np.array([0.1, 0.6, 0.95])
    x = queries(rng, train, 3, t)
    a, b2 = SCHED.coefficients(t)
    a, b = a[:, None, None, None], np.sqrt(b2)[:, None, None, None]
    x0 = m.denoise(x, t)
    assert np.allclose(m.eps(x, t), (x - a * x0) / b, rtol=0, atol=1e-12)
    assert np.allclose(m.score(x, t), (a * x0 - x) / b ** 2, rtol=0, atol=1e-10)


def test_small_t_projects_onto_the_data_span_and_t1_gives_the_mean(rng):
    train, _ = data(rng, N=6)  # 6 images: an affine span of dimension 5 in D = 48
    m = pm.Wiener(train)
    X = train.reshape(6, -1)
    mu = X.mean(0)
    Q = np.linalg.svd(X - mu, full_matrices=False)[2][:5].T  # orthonormal basis of the span (D, 5)
    t = 1e-3
    a, _ = SCHED.scalar_coefficients(t)
    x = queries(rng, train, 4, t)
    proj = mu + ((x.reshape(4, -1) / a - mu) @ Q) @ Q.T
    got = m.denoise(x, t).reshape(4, -1)
    assert np.abs(got - proj).max() <= 1e-4 * data_range(train)
    # a clean training image, scaled, comes back
    assert np.abs(m.denoise(a * train[:2], t) - train[:2]).max() <= 1e-4 * data_range(train)
    # at t = 1 almost no signal is left (alpha_bar(1) ~ 1.55e-4): the answer is close to the mean
    far = m.denoise(queries(rng, train, 4, 1.0), 1.0).reshape(4, -1)
    assert np.abs(far - mu).max() <= 0.05 * data_range(train)


def test_jacobian_is_the_filter_matrix(rng):
    train, _ = data(rng, N=10, C=1, H=3, W=3)
    m = pm.Wiener(train)
    X = torch.from_numpy(train.reshape(10, -1))
    sigma = torch.cov(X.T, correction=0)
    a, b2 = SCHED.scalar_coefficients(0.4)
    G = a * sigma @ torch.linalg.inv(a * a * sigma + b2 * torch.eye(9, dtype=torch.float64))
    x = torch.from_numpy(queries(rng, train, 2, 0.4))
    J = m.sensitivity(x, 0.4, pixel=(1, 2))  # (B, C, C, H, W): row 1 * 3 + 2 of G
    assert torch.allclose(J[:, 0, 0].reshape(2, 9), G[5].expand(2, 9), atol=1e-12)
    # differentiable in t too
    tt = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    m.denoise(x, tt).sum().backward()
    assert tt.grad is not None and torch.isfinite(tt.grad).all() and (tt.grad != 0).all()


def test_bad_inputs_fail_with_clear_errors(rng):
    train, y = data(rng, N=12, classes=3)
    m, plain = pm.Wiener(train, y), pm.Wiener(train)
    x = queries(rng, train, 2, 0.5)
    with pytest.raises(ValueError, match="training size 4x4.*not translation-equivariant"):
        m.denoise(np.zeros((2, 3, 6, 6)), 0.5)
    with pytest.raises(ValueError, match="channels"):
        m.denoise(x[:, :1], 0.5)
    with pytest.raises(TypeError, match="float32 or float64"):
        m.denoise(x.astype(np.int64), 0.5)
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.denoise(bad, 0.5)
    for t in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            m.denoise(x, t)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        m.denoise(x, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m.denoise(x, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="label 7 has no training images"):
        m.denoise(x, 0.5, labels=[0, 7])
    with pytest.raises(ValueError, match="label 5 has no training images"):
        m.statistics(5)
    with pytest.raises(ValueError, match="built without training labels"):
        plain.denoise(x, 0.5, labels=[0, 1])
    with pytest.raises(ValueError, match="no winning training key"):
        m.denoise(x, 0.5, return_provenance=True)
    with pytest.raises(ValueError, match="unknown backend"):
        m.denoise(x, 0.5, backend="gpu")
    with pytest.raises(ValueError, match="odd positive"):
        m.denoise(x, 0.5, k=4)
    assert np.array_equal(m.denoise(x, 0.5, k=5), m.denoise(x, 0.5))  # k is ignored, as by IS
    with pytest.raises(pm.ResourceError, match="D = 48"):
        pm.Wiener(train, max_memory=1000)
    big = pm.Wiener(train, max_memory=200_000)
    with pytest.raises(pm.ResourceError, match="batch of shape"):
        big.denoise(np.zeros((1000, 3, 4, 4)), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pm.Wiener(np.full((3, 1, 2, 2), np.nan))


def test_machine_denoiser_ddim_and_compare(rng):
    train, y = data(rng, N=24, classes=2)
    m = pm.Wiener(train.astype(np.float32), y)
    den = pm.MachineDenoiser(m)
    assert den.schedule is m.schedule and den.describe()["machine"]["type"] == "Wiener"
    x1 = torch.from_numpy(rng.standard_normal((3,) + train.shape[1:])).float()
    lab = torch.tensor([0, 1, 1])
    out = pm.ddim(den, x1, lab, steps=5, progress=False)
    assert out.shape == x1.shape and torch.isfinite(out).all()
    # the deterministic sampler ends near the class's Gaussian: within the data's range
    assert float(out.abs().max()) < 3
    rep = pm.compare(pm.MachineDenoiser(pm.IS(train.astype(np.float32), y)), {"Wiener": m}, x1, lab, steps=4,
                     batch_size=2, progress=False)
    assert rep["per_seed"]["Wiener"]["machine"]["type"] == "Wiener" and len(rep["per_seed"]["Wiener"]["r"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda is unavailable on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_the_closed_form(rng, dtype):
    train, y = data(rng, N=30, classes=3)
    m = pm.Wiener(train, y)
    t = np.array([0.1, 0.5, 0.9, 1.0])
    x = queries(rng, train, 4, t)
    lab = np.array([0, 2, 1, 2])
    xc = torch.from_numpy(x).to("cuda", dtype)
    got = m.denoise(xc, torch.from_numpy(t).cuda(), labels=torch.from_numpy(lab).cuda())
    assert got.device.type == "cuda" and got.dtype == dtype
    ref = closed_form(train, xc.cpu().double().numpy(), t, y, lab)
    err = np.abs(got.cpu().double().numpy() - ref)
    if dtype == torch.float64:
        assert err.max() <= 1e-9 * data_range(train)
    else:
        assert err.mean() <= 1e-5 and err.max() <= 1e-3
    e = m.eps(xc, 0.5, labels=torch.from_numpy(lab).cuda())
    assert e.device.type == "cuda" and e.dtype == dtype
