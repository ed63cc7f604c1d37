"""The PCA-locality machine (machines/pca_locality.py) against a float64 numpy transcription of its definition
(Lukoianov et al. 2025; the Analytic Diffusion Studio's pca_locality.py): covariance (mean subtracted, / (N - 1)),
its eigendecomposition, the shrunk Wiener matrix, rows divided by their diagonal, one global relative threshold, the
masked distance over each output element's column, the softmax over every training image with a temperature.
Both dtypes on every engine, labels, per-image times, the batch-averaged approximation of the reference
implementation, gradients, the per-step threshold in MachineDenoiser and calibrate, the CLI, bad input.

Tolerances: float64 within 1e-9 of the transcription (max abs), float32 within 1e-5 of the data range on average and
1e-3 at worst."""

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.experiments.calibrate import calibrate

from cuda_emulation import dev  # noqa: F401  (the CUDA-or-emulator fixture)

C, H, W = 2, 4, 3
D = C * H * W


def data(N=30, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, (4, D))
    imgs = np.tanh(rng.standard_normal((N, 4)) @ base + 0.3 * rng.standard_normal((N, D)))  # correlated elements
    imgs[:, 5] = 0.25  # a constant element: a zero diagonal, divided by 1, an empty neighbourhood
    return imgs.reshape(N, C, H, W), rng.integers(0, 3, N)


def coefficients(t):
    ab = np.cos(np.asarray(t, np.float64) / 1.008 * np.pi / 2) ** 2
    return np.sqrt(ab), 1 - ab


def literal_mask(imgs, t, theta):
    X = imgs.reshape(len(imgs), -1).astype(np.float64)
    S = (X - X.mean(0)).T @ (X - X.mean(0)) / (len(X) - 1)
    lam, U = np.linalg.eigh(S)
    lam = np.clip(lam, 0, None)
    a, b2 = coefficients(t)
    L = U @ np.diag(a * a * lam / (b2 + a * a * lam)) @ U.T
    d = np.diag(L).copy()
    d[np.abs(d) < 1e-6] = 1.0
    M = L / d[:, None]
    return np.abs(M) >= theta * np.abs(M).max()


def literal(imgs, x, t, theta, tau=1.0, groups=None, batch=None):
    """x0_hat by loops: for each output element m, the softmax over the images of -sum_{n: mask[n, m]} (x_n - a
    phi_n)^2 / (2 b^2 tau); ``batch``: the reference implementation's per-batch softmax, batch means averaged."""
    X = imgs.reshape(len(imgs), -1).astype(np.float64)
    out = np.zeros((len(x), D))
    for b in range(len(x)):
        tb = t[b] if np.ndim(t) else t
        mask = literal_mask(imgs, tb, theta)
        a, b2 = coefficients(tb)
        idx = np.arange(len(X)) if groups is None else groups[b]
        xb = x[b].reshape(-1).astype(np.float64)
        for m in range(D):
            hood = np.nonzero(mask[:, m])[0]
            logits = np.array([-np.sum((xb[hood] - a * X[n, hood]) ** 2) / (2 * b2 * tau) for n in idx])
            if batch is None:
                w = np.exp(logits - logits.max())
                out[b, m] = np.sum(w * X[idx, m]) / w.sum()
            else:
                means = []
                for i0 in range(0, len(idx), batch):
                    lg, vals = logits[i0 : i0 + batch], X[idx[i0 : i0 + batch], m]
                    w = np.exp(lg - lg.max())
                    means.append(np.sum(w / w.sum() * vals))
                out[b, m] = np.sum(means) / (len(means) + 1e-8)
    return out.reshape(x.shape)


def queries(imgs, B=3, t=0.4, seed=1):
    rng = np.random.default_rng(seed)
    a, b2 = coefficients(t)
    return a * imgs[rng.integers(0, len(imgs), B)] + np.sqrt(b2) * rng.standard_normal((B,) + imgs.shape[1:])


def _check(got, want, dtype, what):
    err = np.abs(np.asarray(got, np.float64) - want)
    if dtype == np.float64:
        assert err.max() <= 1e-9, f"{what}: float64 error {err.max():.3g}"
    else:
        assert err.mean() <= 2e-5 and err.max() <= 2e-3, f"{what}: float32 error {err.mean():.3g} / {err.max():.3g}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("N", [30, 9], ids=["N>D", "N<D"])
def test_equals_the_literal_definition(N, backend, dtype):
    imgs, _ = data(N)
    x = queries(imgs)
    for t, theta, tau in ((0.4, 0.05, 1.0), (0.9, 0.02, 0.5), (0.1, 0.2, 2.0)):
        m = pm.PCALocality(imgs.astype(dtype), threshold=theta, temperature=tau, backend=backend)
        got = m.denoise(queries(imgs, t=t).astype(dtype), t)
        _check(got, literal(imgs, queries(imgs, t=t), t, theta, tau), dtype, f"{backend} t={t}")
    # the mask itself, and an element with an empty neighbourhood (the constant one) gets the images' mean
    m = pm.PCALocality(imgs, threshold=0.05)
    assert np.array_equal(m.mask(0.4).numpy(), literal_mask(imgs, 0.4, 0.05))
    assert int(m.neighbourhood_sizes(0.4).reshape(-1)[5]) == 0
    assert np.allclose(m.denoise(x, 0.4).reshape(3, -1)[:, 5], 0.25)


def test_threshold_one_keeps_each_elements_own_diagonal():
    """Each row of M is divided by its diagonal, so every diagonal entry is exactly 1, and at threshold 1 (allowed)
    on data whose off-diagonal entries stay below 1 all of them tie with the maximum: each element's neighbourhood
    is itself. The mask search computed the diagonal ratios as a sum times the inverse of the diagonal summed in
    another order, a few ulp either side of 1: only the largest survived, 24 of 25 neighbourhoods were empty
    (outputs the images' mean, 1.95 off)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 1, 7, 7))
    imgs = (base[:, :, :-2, :-2] + base[:, :, 1:-1, 1:-1] + base[:, :, 2:, 2:]) / 3  # smooth fields, 5 x 5
    t = 0.3
    m = pm.PCALocality(imgs, threshold=1.0)
    M = m.matrix(t).numpy()
    assert np.all(np.diag(M) == 1.0) and np.abs(M - np.eye(25)).max() < 1  # (the tie the test is about)
    assert np.array_equal(m.mask(t).numpy(), literal_mask(imgs, t, 1.0)) and np.array_equal(m.mask(t).numpy(),
                                                                                             np.eye(25, dtype=bool))
    a, b2 = coefficients(t)
    x = a * imgs[:2] + np.sqrt(b2) * rng.standard_normal((2, 1, 5, 5))
    X, q = imgs.reshape(20, 25), x.reshape(2, 25)
    logits = -(q[:, None, :] - a * X[None]) ** 2 / (2 * b2)  # (query, image, element): each element alone
    w = np.exp(logits - logits.max(1, keepdims=True))
    want = (w * X[None]).sum(1) / w.sum(1)
    assert np.abs(m.denoise(x, t).reshape(2, 25) - want).max() <= 1e-9


def _exact_ratios(L):
    """|L| / dd in float64 (the diagonal divided by 1 below 1e-6), row m = output element m."""
    dd = np.diag(L).copy()
    dd[np.abs(dd) < 1e-6] = 1.0
    return np.abs(L) / dd[None, :]


@pytest.mark.parametrize("chunk", [2048, 8], ids=["one-product", "chunked"])
def test_mask_search_decides_entries_closer_to_the_threshold_than_float32_resolves(chunk, monkeypatch):
    """The masks come from a float32 product and its error bound (cpu/wiener_mask.cpp): entries the bound cannot
    decide are recomputed in float64. A threshold 1e-12 (relative) on either side of an entry -- far below float32
    resolution, far above float64's -- must put that entry in and out exactly as float64 does; so must the
    largest entry, and the search must have recomputed some entries to get there. Also with the columns in
    float32 products of ``chunk`` each, summed in float64 (the path of long products, r > 2048)."""
    from patchmosaic.ops import wiener_mask, wiener_mask_max, wiener_mask_rows, wiener_masks

    monkeypatch.setattr(wiener_mask, "CHUNK", chunk)

    rng = np.random.default_rng(3)
    U = rng.standard_normal((40, 30))
    U[7] *= 1e-4  # a row with a small diagonal (its entries divided by it are large)
    U[11] = 0.0  # a constant element: zero diagonal, divided by 1
    w = np.logspace(0, -12, 30)  # decreasing shrinkage: the trailing columns are left out of the float32 product
    L = (U * w) @ U.T
    A = _exact_ratios(L)
    Ut = torch.from_numpy(U)
    args = wiener_masks(Ut, Ut * Ut, Ut.float(), torch.from_numpy(w))
    assert float(args[6].max()) > 0  # some columns were left out (the bound's tail term)
    assert args[0].dtype == (np.float64 if chunk < 30 else np.float32)
    top, _ = wiener_mask_max(args)
    assert top == pytest.approx(A.max(), rel=1e-14)
    m, n = 5, 23
    for factor, inside in ((1 - 1e-12, True), (1 + 1e-12, False)):
        tau = A[m, n] * factor
        ptr, elem, checked = wiener_mask_rows(args, tau)
        got = np.zeros_like(A, dtype=bool)
        got[np.repeat(np.arange(len(A)), np.diff(ptr)), elem] = True
        assert np.array_equal(got, A >= tau) and bool(got[m, n]) == inside and checked >= 1
    # the float64 matrix itself (no error to bound) decides everything, recomputing nothing
    zero = np.zeros(40)
    exact = (L, *args[1:6], zero, zero, zero, 0.0, 0)
    ptr, elem, checked = wiener_mask_rows(exact, A[m, n])
    assert checked == 0 and len(elem) == int((A >= A[m, n]).sum())


def test_mask_search_keeps_float32_products_exact_and_the_user_setting():
    """A user's reduced float32 matmul precision would break the error bound: the search runs in full precision
    and leaves the setting as it was."""
    imgs, _ = data(30)
    want = literal_mask(imgs, 0.4, 0.05)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert np.array_equal(pm.PCALocality(imgs, threshold=0.05).mask(0.4).numpy(), want)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)


def test_labels_per_image_times_and_a_call_threshold(dev):  # noqa: F811
    imgs, labels = data(30)
    x = queries(imgs, B=3)
    t = np.array([0.3, 0.7, 0.3])
    lab = np.array([2, 0, 1])
    groups = [np.nonzero(labels == v)[0] for v in lab]
    want = literal(imgs, x, t, 0.1, groups=groups)
    m = pm.PCALocality(imgs, labels, threshold=0.02)
    _check(m.denoise(x, t, 0.1, labels=lab), want, np.float64, "cpu")
    g = pm.PCALocality(torch.from_numpy(imgs).to(dev), labels, threshold=0.02, backend="cuda")
    _check(g.denoise(torch.from_numpy(x).to(dev), torch.from_numpy(t), 0.1, labels=lab).cpu().numpy(), want,
           np.float64, "cuda")


def test_batch_averaged_approximation_reproduces_the_reference_implementation():
    imgs, labels = data(30)
    x = queries(imgs, B=2)
    m = pm.PCALocality(imgs, threshold=0.05, batch_average=8)
    _check(m.denoise(x, 0.5), literal(imgs, x, 0.5, 0.05, batch=8), np.float64, "batch-averaged")
    exact = pm.PCALocality(imgs, threshold=0.05).denoise(x, 0.5)
    assert np.abs(m.denoise(x, 0.5) - exact).max() > 1e-3  # it is an approximation
    mc = pm.PCALocality(imgs, labels, threshold=0.05, batch_average=4)
    groups = [np.nonzero(labels == v)[0] for v in (1, 2)]
    _check(mc.denoise(x, 0.5, labels=[1, 2]), literal(imgs, x, 0.5, 0.05, groups=groups, batch=4), np.float64,
           "batch-averaged, conditional")


def test_gradients():
    imgs, _ = data(20)
    m = pm.PCALocality(imgs, threshold=0.05)
    x = torch.from_numpy(queries(imgs, B=2)).requires_grad_(True)
    t = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, tt: m.denoise(xx, tt), (x, t), eps=1e-6, atol=1e-6)
    g = [torch.autograd.grad(m.denoise(x, t, backend=be).sin().sum(), (x, t)) for be in ("cpu", "torch")]
    assert all(torch.allclose(u, v, rtol=1e-9, atol=1e-10) for u, v in zip(*g))
    e = int(m.neighbourhood_sizes(0.4)[0].reshape(-1).argmax())  # channel 0's element with the largest neighbourhood
    jac = m.sensitivity(x.detach(), 0.4, None, pixel=divmod(e, W))  # (B, C_out, C_in, H, W)
    hood = m.mask(0.4)[:, e].reshape(C, H, W)
    assert not bool(((jac[:, 0].abs() > 0) & ~hood).any()) and bool((jac[:, 0].abs() > 0).any())


def test_machine_denoiser_schedules_and_calibration():
    imgs, _ = data(30)
    m = pm.PCALocality(imgs, threshold=0.05)
    sched = pm.ThresholdSchedule((1.0, 0.5), (0.2, 0.01))
    den = pm.MachineDenoiser(m, sched)
    x = torch.from_numpy(queries(imgs, B=2))
    assert torch.equal(den(x, 0.5), m.denoise(x, 0.5, 0.01)) and torch.equal(den(x, 0.9), m.denoise(x, 0.9, 0.2))
    assert torch.equal(pm.MachineDenoiser(m)(x, 0.5), m.denoise(x, 0.5))
    assert den.describe()["thresholds"] == [0.2, 0.01]
    with pytest.raises(ValueError, match="threshold in \\(0, 1\\] or a ThresholdSchedule"):
        pm.MachineDenoiser(m, pm.KSchedule.constant(5, 2))
    with pytest.raises(ValueError, match="not a ThresholdSchedule"):
        pm.MachineDenoiser(pm.ELS(imgs), sched)
    samples = pm.ddim(den, torch.randn(2, C, H, W, dtype=torch.float64), steps=4, progress=False)
    assert samples.shape == (2, C, H, W) and bool(torch.isfinite(samples).all())

    target = pm.PCALocality(imgs, threshold=0.05)  # a "network" that is the machine at threshold 0.05

    def net(t, xt, labels):
        a, b2 = (torch.as_tensor(v) for v in coefficients(t.double()))
        x0 = target.denoise(xt.double(), t.double())
        return ((xt - a[:, None, None, None] * x0) / torch.sqrt(b2)[:, None, None, None]).float()

    cands = (0.01, 0.05, 0.3)
    c = calibrate(net, target, torch.randn(3, C, H, W), candidates=cands, steps=5, progress=False)
    assert isinstance(c.schedule, pm.ThresholdSchedule) and c.candidates == cands
    for i, t in enumerate(c.schedule.times):  # where the candidates' masks differ, the network's own threshold wins
        masks = [target.mask(t, v) for v in cands]
        if not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]):
            assert c.schedule.thresholds[i] == 0.05, (t, c.cosine[i])


def test_cli_sample_takes_the_machine_and_its_threshold(tmp_path, capsys):
    from patchmosaic.experiments.cli import main

    out = tmp_path / "s.png"
    assert main(["sample", "--machine", "pca", "--k", "0.02", "--n", "2", "--steps", "2", "--limit", "200",
                 "--quiet", "--out", str(out)]) == 0
    assert out.exists() and "PCA samples" in capsys.readouterr().out
    assert main(["sample", "--machine", "pca", "--k", "1.5", "--n", "1", "--steps", "1", "--limit", "50", "--quiet",
                 "--out", str(tmp_path / "t.png")]) == 2
    assert "threshold" in capsys.readouterr().err and not (tmp_path / "t.png").exists()


def test_bad_input_is_refused_before_any_work():
    imgs, _ = data(12)
    for bad, err in ((0, "threshold must lie in \\(0, 1\\], got 0.0"), (1.5, "got 1.5"), (-0.1, "got -0.1")):
        with pytest.raises(ValueError, match=err):
            pm.PCALocality(imgs, threshold=bad)
    with pytest.raises(TypeError, match="threshold must be a number"):
        pm.PCALocality(imgs, threshold="0.1")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            pm.PCALocality(imgs, temperature=bad)
    with pytest.raises(ValueError, match="batch_average must be None or a positive int"):
        pm.PCALocality(imgs, batch_average=0)
    with pytest.raises(pm.ResourceError, match="D = 24 elements"):
        pm.PCALocality(imgs, max_memory=1000)
    m = pm.PCALocality(imgs)
    x = queries(imgs, B=1)
    with pytest.raises(ValueError, match="threshold must lie in"):
        m.denoise(x, 0.5, 2.0)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        m.denoise(x, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        m.denoise(np.full_like(x, np.nan), 0.5)
    with pytest.raises(ValueError, match="training size"):
        m.denoise(np.zeros((1, C, H + 1, W)), 0.5)
