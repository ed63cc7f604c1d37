"""PSPC (machines/pspc.py; Niedoba et al., ICML 2025) and the FPMC axes on the same-position machines, against a
float64 numpy transcription of the definition written as literally as the paper and its reference code state it:
for every crop (every p x p square that fits, upper-left corners; or every pixel's heatmap crop cut at mass tau),
the posterior mean of the crop over every training image (a softmax of the crop's squared distance over all its
channels), and each output element the average of the crop means that cover it. Both dtypes, the CPU engine, the
torch reference and the CUDA engine (its emulator without a GPU), labels, per-image times, the source's mirrors,
the soft options (Gaussian query precision, Gaussian response weights, centre response), LS with a patch response,
the sweep, provenance, gradients, the per-step parameter p (even sizes) in MachineDenoiser and calibrate, the published
schedules, bad input.

Tolerances: float64 within 1e-9 of the transcription (max abs), float32 within 2e-5 on average and 2e-3 at worst."""

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.experiments.calibrate import calibrate
from patchmosaic.machines.pspc import Heatmaps

from cuda_emulation import dev  # noqa: F401  (the CUDA-or-emulator fixture)

C, H, W = 2, 6, 5


def data(N=25, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (N, C, H, W)), rng.integers(0, 3, N)


def coefficients(t):
    ab = np.cos(np.asarray(t, np.float64) / 1.008 * np.pi / 2) ** 2
    return np.sqrt(ab), 1 - ab


def queries(imgs, B=3, t=0.4, seed=1):
    rng = np.random.default_rng(seed)
    a, b2 = coefficients(t)
    return a * imgs[rng.integers(0, len(imgs), B)] + np.sqrt(b2) * rng.standard_normal((B,) + imgs.shape[1:])


def square_crops(p, s=None, s_resp=None):
    """[(hood weights (H, W), response weights (H, W))] of every p x p square that fits, upper-left corners row-major;
    weights exp(-d^2 / (2 s^2)) by the distance from the square's centre (1 without s)."""
    out = []
    c = (p - 1) / 2
    for i in range(H - p + 1):
        for j in range(W - p + 1):
            hood, resp = np.zeros((H, W)), np.zeros((H, W))
            for u in range(p):
                for v in range(p):
                    d2 = (u - c) ** 2 + (v - c) ** 2
                    hood[i + u, j + v] = 1.0 if s is None else np.exp(-d2 / (2 * s * s))
                    resp[i + u, j + v] = 1.0 if s_resp is None else np.exp(-d2 / (2 * s_resp * s_resp))
            out.append((hood, resp))
    return out


def literal_mask(G, tau):
    """The reference's rule: the heatmap over its sum, sorted ascending, kept where the cumulative sum >= 1 - tau."""
    g = G.reshape(-1) / G.sum()
    order = np.argsort(g, kind="stable")
    keep = np.cumsum(g[order]) >= 1.0 - tau
    mask = np.zeros(len(g), bool)
    mask[order] = keep
    return mask.reshape(G.shape)


def flex_crops(maps, tau, s=None, s_resp=None, centre=False):
    out = []
    for y in range(H):
        for x in range(W):
            m = literal_mask(maps[y, x], tau).astype(float)
            yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
            d2 = (yy - y) ** 2 + (xx - x) ** 2
            hood = m * (1.0 if s is None else np.exp(-d2 / (2 * s * s)))
            if centre:
                resp = np.zeros((H, W))
                resp[y, x] = 1.0
            else:
                resp = m * (1.0 if s_resp is None else np.exp(-d2 / (2 * s_resp * s_resp)))
            out.append((hood, resp))
    return out


def ls_crops(k, s_resp=None, patch=True):
    """LS's rows with a response: the k x k window centred on each pixel (cut at the border)."""
    r = k // 2
    out = []
    for y in range(H):
        for x in range(W):
            hood, resp = np.zeros((H, W)), np.zeros((H, W))
            for u in range(-r, r + 1):
                for v in range(-r, r + 1):
                    if 0 <= y + u < H and 0 <= x + v < W:
                        hood[y + u, x + v] = 1.0
                        resp[y + u, x + v] = 1.0 if s_resp is None else np.exp(-(u * u + v * v) / (2 * s_resp ** 2))
            if not patch:
                resp = np.zeros((H, W))
                resp[y, x] = 1.0
            out.append((hood, resp))
    return out


def literal(imgs, x, t, crops_of, groups=None):
    """x0_hat by loops: per query image, per crop, the softmax over the images of -sum w (x - a phi)^2 / (2 b^2) over
    the crop's elements of every channel; the crop's mean image added to the composite with its response weights."""
    X = imgs.astype(np.float64)
    out = np.zeros(x.shape)
    for b in range(len(x)):
        tb = t[b] if np.ndim(t) else t
        a, b2 = coefficients(tb)
        idx = np.arange(len(X)) if groups is None else groups[b]
        comp, norm = np.zeros(x.shape[1:]), np.zeros(x.shape[1:])
        for hood, resp in crops_of(tb):
            logits = np.array([-np.sum(hood[None] * (x[b] - a * X[n]) ** 2) / (2 * b2) for n in idx])
            w = np.exp(logits - logits.max())
            mean = np.tensordot(w / w.sum(), X[idx], axes=1)
            comp += resp[None] * mean
            norm += resp[None]
        out[b] = comp / norm
    return out


def _check(got, want, dtype, what):
    err = np.abs(np.asarray(got, np.float64) - want)
    if dtype == np.float64:
        assert err.max() <= 1e-9, f"{what}: float64 error {err.max():.3g}"
    else:
        assert err.mean() <= 2e-5 and err.max() <= 2e-3, f"{what}: float32 error {err.mean():.3g} / {err.max():.3g}"


def heatmaps(L=2, seed=3):
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0, 1, (L, H, W, H, W)) ** 3
    for y in range(H):
        for x in range(W):
            maps[:, y, x, y, x] += 2.0  # each pixel most sensitive to itself
    return Heatmaps(np.linspace(1.0, 0.2, L), maps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_square_equals_the_literal_definition(backend, dtype):
    imgs, _ = data()
    for t, p in ((0.4, 3), (0.8, 4), (0.1, 2), (0.3, 1)):
        x = queries(imgs, t=t)
        m = pm.PSPC(imgs.astype(dtype), backend=backend)
        _check(m.denoise(x.astype(dtype), t, p), literal(imgs, x, t, lambda _: square_crops(p)), dtype,
               f"{backend} t={t} p={p}")
    # p = min(H, W) = 5 crops of 5x5 (not the whole 6x5 image); on a square image p = H is the ideal denoiser
    sq = imgs[:, :, :5, :5].copy()
    xs = queries(sq, t=0.5)
    _check(pm.PSPC(sq).denoise(xs, 0.5, 5), pm.IS(sq).denoise(xs, 0.5), np.float64, "p = H is IS")


def test_a_pixel_no_flex_crop_covers_gets_its_own_crop():
    """Every pixel's crop is the pixel itself, but pixel (0, 0)'s is pixel (5, 4): nothing covers (0, 0) (the reference
    divides 0 by 0 there). It gets one more crop, its own with itself added, written at (0, 0) only; every other element
    is the reference's."""
    imgs, _ = data()
    maps = np.full((1, H, W, H, W), 1e-3)
    for y in range(H):
        for x in range(W):
            maps[0, y, x, y, x] = 10.0
    maps[0, :, :, 0, 0] = 0.0
    maps[0, 0, 0, 5, 4] = 10.0
    hm = Heatmaps([0.5], maps)
    crops = flex_crops(maps[0], 0.5)
    assert crops[0][0][5, 4] == 1 and sum(c[1][0, 0] for c in crops) == 0
    extra_hood, extra_resp = crops[0][0].copy(), np.zeros((H, W))
    extra_hood[0, 0], extra_resp[0, 0] = 1.0, 1.0
    x = queries(imgs, t=0.5)
    want = literal(imgs, x, 0.5, lambda _: crops + [(extra_hood, extra_resp)])
    _check(pm.PSPC(imgs, mode="flex", heatmaps=hm).denoise(x, 0.5, 0.5), want, np.float64, "uncovered pixel")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_flex_equals_the_literal_definition(dtype):
    imgs, _ = data()
    hm = heatmaps()
    x = queries(imgs, t=0.3)
    t = np.array([0.3, 0.9, 0.3])
    m = pm.PSPC(imgs.astype(dtype), mode="flex", heatmaps=hm)
    for tau in (0.3, 0.6):
        want = literal(imgs, x, t, lambda tb: flex_crops(hm.maps[hm.index(tb)].numpy(), tau))
        _check(m.denoise(x.astype(dtype), t, tau), want, dtype, f"flex tau={tau}")
    # tau = 1: every crop the whole image (computed once, counted H W times): the ideal denoiser
    _check(m.denoise(x, 0.5, 1.0), pm.IS(imgs).denoise(x, 0.5), dtype, "flex tau = 1 is IS")
    # the machine's own tau when the call gives none
    m2 = pm.PSPC(imgs, mode="flex", heatmaps=hm, tau=0.4)
    assert np.array_equal(m2.denoise(x, 0.5), m2.denoise(x, 0.5, 0.4))


def test_fpmc_options_equal_the_literal_definition():
    """The soft relaxations: Gaussian query precision, Gaussian response weights, centre response (flex), and LS
    with a whole-patch or Gaussian response."""
    imgs, labels = data()
    hm = heatmaps()
    x = queries(imgs, t=0.5)
    cases = [
        (pm.PSPC(imgs, precision=1.0), 3, lambda _: square_crops(3, s=1.0)),
        (pm.PSPC(imgs, response=0.8), 4, lambda _: square_crops(4, s_resp=0.8)),
        (pm.PSPC(imgs, precision=1.5, response=1.0), 3, lambda _: square_crops(3, s=1.5, s_resp=1.0)),
        (pm.PSPC(imgs, mode="flex", heatmaps=hm, precision=1.2), 0.5,
         lambda tb: flex_crops(hm.maps[hm.index(tb)].numpy(), 0.5, s=1.2)),
        (pm.PSPC(imgs, mode="flex", heatmaps=hm, response="centre"), 0.5,
         lambda tb: flex_crops(hm.maps[hm.index(tb)].numpy(), 0.5, centre=True)),
        (pm.PSPC(imgs, mode="flex", heatmaps=hm, response=1.0), 0.7,
         lambda tb: flex_crops(hm.maps[hm.index(tb)].numpy(), 0.7, s_resp=1.0)),
        (pm.LS(imgs, response="patch"), 3, lambda _: ls_crops(3)),
        (pm.LS(imgs, response=0.7), 5, lambda _: ls_crops(5, s_resp=0.7)),
    ]
    for m, v, crops in cases:
        _check(m.denoise(x, 0.5, v), literal(imgs, x, 0.5, crops), np.float64, repr(m))
        _check(m.denoise(x.astype(np.float32), 0.5, v, backend="torch"), literal(imgs, x, 0.5, crops), np.float32,
               repr(m) + " torch f32")
    # soft LS and ELS: a Gaussian window of width c k over each k x k patch, the same as that patch mask given
    r = 2
    u = np.arange(-r, r + 1)
    g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * (0.4 * 5) ** 2))

    def soft_ls(_):
        out = []
        for hood, resp in ls_crops(5):
            y, x_ = divmod(len(out), W)
            w = np.zeros((H, W))
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    if 0 <= y + a < H and 0 <= x_ + b < W:
                        w[y + a, x_ + b] = g[a + r, b + r]
            out.append((w, resp))
        return out

    _check(pm.LS(imgs, response="patch", soft=0.4).denoise(x, 0.5, 5), literal(imgs, x, 0.5, soft_ls), np.float64,
           "soft LS, patch response")
    els = pm.ELS(imgs, labels, soft=0.4)
    mask = pm.ops.gaussian_mask(5, 2.0)
    assert np.array_equal(els.denoise(x, 0.5, 5, labels=[0, 1, 2]),
                          pm.ELS(imgs, labels).denoise(x, 0.5, 5, labels=[0, 1, 2], patch_mask=mask))
    sweep = els.denoise_ks(x, 0.5, [3, 5], labels=[0, 1, 2])
    assert np.array_equal(sweep[1], els.denoise(x, 0.5, 5, labels=[0, 1, 2]))
    assert els.describe()["soft"] == 0.4
    with pytest.raises(ValueError, match="patch_mask= and a soft machine"):
        els.denoise(x, 0.5, 5, patch_mask=mask)
    with pytest.raises(ValueError, match="soft must be None or a finite number > 0"):
        pm.ELS(imgs, soft=-1)
    with pytest.raises(ValueError, match="this machine is soft"):
        pm.PatchIndex(els, 3)
    # LS's centre response is LS; the patch index refuses a patch response
    _check(pm.LS(imgs).denoise(x, 0.5, 3), literal(imgs, x, 0.5, lambda _: ls_crops(3, patch=False)), np.float64, "LS")
    with pytest.raises(ValueError, match="centre response"):
        pm.PatchIndex(pm.LS(imgs, response="patch"), 3)


def test_labels_mirrors_and_the_cuda_engine(dev):  # noqa: F811
    imgs, labels = data()
    x = queries(imgs)
    t = np.array([0.3, 0.7, 0.3])
    lab = np.array([2, 0, 1])
    groups = [np.nonzero(labels == v)[0] for v in lab]
    want = literal(imgs, x, t, lambda _: square_crops(3), groups)
    _check(pm.PSPC(imgs, labels).denoise(x, t, 3, labels=lab), want, np.float64, "cpu, labels")
    g = pm.PSPC(torch.from_numpy(imgs).to(dev), labels, backend="cuda")
    _check(g.denoise(torch.from_numpy(x).to(dev), torch.from_numpy(t), 3, labels=lab).cpu().numpy(), want, np.float64,
           "cuda, labels")
    hm = heatmaps()
    gf = pm.PSPC(torch.from_numpy(imgs).to(dev), mode="flex", heatmaps=hm, response=1.0, backend="cuda")
    wf = literal(imgs, x, t, lambda tb: flex_crops(hm.maps[hm.index(tb)].numpy(), 0.5, s_resp=1.0))
    _check(gf.denoise(torch.from_numpy(x).to(dev), torch.from_numpy(t), 0.5).cpu().numpy(), wf, np.float64, "cuda flex")
    # the source's mirrors (the reference's default): the machine on the images and their mirrors given explicitly
    both = np.concatenate([imgs, imgs[..., ::-1]])
    _check(pm.PSPC(imgs, xflip=True).denoise(x, 0.4, 3), literal(both, x, 0.4, lambda _: square_crops(3)), np.float64,
           "xflip")


def test_sweep_provenance_and_gradients():
    imgs, _ = data(20)
    x = queries(imgs, B=2, t=0.05)
    m = pm.PSPC(imgs)
    sweep = m.denoise_ks(x, 0.3, [2, 3, 6 - 1])
    for j, p in enumerate([2, 3, 5]):
        _check(sweep[j], m.denoise(x, 0.3, p), np.float64, f"sweep p={p}")
    fl = pm.PSPC(imgs, mode="flex", heatmaps=heatmaps(), precision=2.0)
    sw = fl.denoise_ks(x, np.array([0.3, 0.9]), [0.4, 0.8])
    _check(sw[1], fl.denoise(x, np.array([0.3, 0.9]), 0.8), np.float64, "flex sweep")
    # provenance: at low noise a query near training image 4 copies it everywhere
    q = 0.999 * imgs[4:5] + 0.01 * np.random.default_rng(0).standard_normal((1, C, H, W))
    x0, prov = m.denoise(q, 0.02, 3, return_provenance=True)
    assert np.all(prov.image == 4) and np.all(prov.share > 0.9)
    assert np.array_equal(prov.row, np.broadcast_to(np.arange(H)[:, None], (1, H, W)))
    # gradients in x and t (float64, exact: gradcheck), square and flex
    xt = torch.from_numpy(queries(imgs, B=2)).requires_grad_(True)
    tt = torch.tensor([0.4, 0.7], dtype=torch.float64, requires_grad=True)  # (not at 0.6, where flex's heatmap changes)
    assert torch.autograd.gradcheck(lambda a, b: m.denoise(a, b, 3), (xt, tt), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda a, b: fl.denoise(a, b, 0.5), (xt, tt), eps=1e-6, atol=1e-6)
    g = [torch.autograd.grad(m.denoise(xt, tt, 4, backend=be).sin().sum(), (xt, tt)) for be in ("cpu", "torch")]
    assert all(torch.allclose(u, v, rtol=1e-9, atol=1e-10) for u, v in zip(*g))
    # locality: output pixel (0, 0) depends only on the one 3x3 crop covering it
    jac = m.sensitivity(xt.detach(), 0.4, 3, pixel=(0, 0))
    assert bool((jac[:, :, :, 3:, :] == 0).all()) and bool((jac[:, :, :, :, 3:] == 0).all())


def test_per_step_p_even_sizes_and_calibration():
    imgs, _ = data(30)
    m = pm.PSPC(imgs)
    ks = pm.KSchedule((1.0, 0.5), (4, 2), odd=False)
    den = pm.MachineDenoiser(m, ks)
    x = torch.from_numpy(queries(imgs, B=2))
    assert torch.equal(den(x, 0.9), m.denoise(x, 0.9, 4)) and torch.equal(den(x, 0.3), m.denoise(x, 0.3, 2))
    assert den.describe()["ks"] == [4, 2]
    with pytest.raises(ValueError, match="odd=False"):
        pm.KSchedule((1.0,), (4,))
    with pytest.raises(ValueError, match="patch size p or a k-schedule"):
        pm.MachineDenoiser(m)
    with pytest.raises(ValueError, match="not a ThresholdSchedule"):
        pm.MachineDenoiser(m, pm.ThresholdSchedule.constant(0.5, 2))
    target = pm.PSPC(imgs)  # a "network" that is the machine at p = 4

    def net(t, xt, labels):
        a, b2 = (torch.as_tensor(v) for v in coefficients(t.double()))
        x0 = target.denoise(xt.double(), t.double(), 4)
        return ((xt - a[:, None, None, None] * x0) / torch.sqrt(b2)[:, None, None, None]).float()

    seeds = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(5))
    c = calibrate(net, m, seeds, candidates=(2, 3, 4, 5), steps=4, progress=False)
    assert c.schedule.odd is False and set(c.schedule.ks) <= {2, 3, 4, 5}
    # the network's own p is never behind another candidate (beyond the float32 network's rounding), and wins
    # wherever it is ahead of all others; elsewhere p = 5 can tie it (both reproduce one training image at low
    # noise: for about 1 in 8 seeds at the last step)
    own = c.cosine[:, :, 2]
    others = np.delete(c.cosine, 2, axis=2).max(2)
    assert np.all(own >= others - 1e-6), c.cosine
    ahead = own > others + 1e-6
    assert ahead.sum() >= 4 and np.all(c.choices[ahead] == 4), (c.choices, c.cosine)
    assert np.ptp(c.cosine, axis=2).max() > 1e-4
    cd = calibrate(net, m, torch.randn(1, C, H, W), k_max=3, steps=1, progress=False)
    assert cd.candidates == (3, 5)  # default candidates: odd sizes up to k_max, and the largest square that fits


def test_published_schedules_on_our_grid():
    sq = pm.kschedule.published_schedule("square", steps=20)
    fl = pm.kschedule.published_schedule("flex", steps=20)
    assert sq.odd is False and len(sq.ks) == 20 and sq.ks[0] == 32 and sq.ks[-1] == 3
    # their rule: the entry of the EDM noise level nearest to sigma(t) (cosine-legacy: sigma(t) = tan(t / 1.008 pi/2))
    edm = pm.edm_sigmas(18)[:-1]
    for t, p, tau in zip(sq.times, sq.ks, fl.thresholds):
        j = int(np.argmin(np.abs(edm - np.tan(t / 1.008 * np.pi / 2))))
        assert p == (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)[j]
        assert tau == (1, 1, 1, 1, 1, 1, 1, .7, .7, .5, .4, .4, .4, .4, .3, .3, .3, .3)[j]
    own = pm.kschedule.published_schedule("square", steps=None)  # on their own 18 noise levels
    assert own.ks == (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)
    assert np.allclose([pm.schedules.cosine_legacy.sigma(t) for t in own.times], edm, rtol=1e-12)
    assert max(pm.kschedule.published_schedule("square", steps=20, max_size=28).ks) == 28


def test_heatmap_file_round_trip(tmp_path):
    hm = heatmaps()
    hm.info = {"network": "x", "samples": 2}
    hm.save(str(tmp_path / "h.npz"))
    back = Heatmaps.load(str(tmp_path / "h.npz"))
    assert np.array_equal(back.times, hm.times) and torch.allclose(back.maps, hm.maps.float().double())
    assert back.info == hm.info
    imgs, _ = data()
    m = pm.PSPC(imgs, mode="flex", heatmaps=str(tmp_path / "h.npz"))
    assert m.heatmaps.digest == back.digest and m.describe()["heatmaps"] == back.digest


def test_bad_input_is_refused_before_any_work():
    imgs, _ = data(12)
    x = queries(imgs, B=1)
    m = pm.PSPC(imgs)
    for bad, err in ((6, "p must lie in 1..5"), (0, "p must lie in 1..5"), (None, "needs a patch size p")):
        with pytest.raises(ValueError, match=err):
            m.denoise(x, 0.5, bad)
    with pytest.raises(TypeError, match="p must be an integer"):
        m.denoise(x, 0.5, 3.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        pm.PSPC(imgs, mode="circle")
    with pytest.raises(ValueError, match="needs heatmaps="):
        pm.PSPC(imgs, mode="flex")
    with pytest.raises(ValueError, match="heatmaps= is for mode='flex'"):
        pm.PSPC(imgs, heatmaps=heatmaps())
    with pytest.raises(ValueError, match="heatmaps are for 5x5 images"):
        pm.PSPC(imgs, mode="flex", heatmaps=Heatmaps([0.5], np.ones((1, 5, 5, 5, 5))))
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match="tau must lie in \\(0, 1\\]"):
            pm.PSPC(imgs, mode="flex", heatmaps=heatmaps(), tau=bad)
    fl = pm.PSPC(imgs, mode="flex", heatmaps=heatmaps())
    with pytest.raises(ValueError, match="tau must lie in \\(0, 1\\]"):
        fl.denoise(x, 0.5, 2.0)
    for kw, err in (({"precision": 0}, "precision must be None or a Gaussian width"),
                    ({"response": "centre"}, "needs a crop per pixel"), ({"response": "middle"}, "response must be")):
        with pytest.raises(ValueError, match=err):
            pm.PSPC(imgs, **kw)
    with pytest.raises(ValueError, match="response must be"):
        pm.LS(imgs, response=-1.0)
    with pytest.raises(ValueError, match="heatmap times must be distinct"):
        Heatmaps([0.5, 0.5], np.ones((2, H, W, H, W)))
    with pytest.raises(ValueError, match="a heatmap sums to 0"):
        pm.PSPC(imgs, mode="flex", heatmaps=Heatmaps([0.5], np.zeros((1, H, W, H, W)))).denoise(x, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        m.denoise(x, 1.5, 3)
    with pytest.raises(ValueError, match="NaN"):
        m.denoise(np.full_like(x, np.nan), 0.5, 3)
    with pytest.raises(ValueError, match="training size"):
        m.denoise(np.zeros((1, C, H + 1, W)), 0.5, 3)
    with pytest.raises(ValueError, match="no key set"):
        pm.PatchIndex(m, 3)


def test_a_soft_window_keeps_its_width_at_a_patch_size_above_the_equivalent_one():
    """LS and boundary-aware ELS compute a k above 2 max(H, W, Hq, Wq) - 1 at that size (the rest is padding), but a
    soft machine then built its Gaussian of width soft * (the cut size): on 5 x 5 images, k = 13 with soft = 0.2
    was the k = 9 window's result (2e-2 of the data range off on average, 0.4 at worst). Now the width is
    soft * k as asked, the window cropped; against the literal oracle (tests/naive.py) with the full k x k window."""
    import naive

    rng = np.random.default_rng(45)
    tr, x = rng.uniform(-1, 1, (6, 1, 5, 5)), rng.standard_normal((2, 1, 5, 5))
    a, b2 = coefficients(0.3)
    for k in (7, 9, 11, 13):
        mask = pm.ops.gaussian_mask(k, 0.2 * k).numpy()
        for cls, name in ((pm.LS, "LS"), (pm.ELS, "ELS_zeros")):
            got = cls(tr, soft=0.2).denoise(x, 0.3, k)
            want = naive.denoise(name, tr, x, np.full(2, a), np.full(2, b2), k, mask=mask)
            assert np.abs(got - want).max() <= 1e-9 * 2, (name, k, np.abs(got - want).max())  # data range 2
    assert not np.allclose(pm.ELS(tr, soft=0.2).denoise(x, 0.3, 13), pm.ELS(tr, soft=0.2).denoise(x, 0.3, 9))


def test_network_heatmaps_are_the_mean_absolute_jacobian(tmp_path):
    """network_heatmaps against autograd one output element at a time, on the same draws (seeded as documented:
    a generator per time seeded ``seed * 1000003 + l``, an image index, then the noise); the cache file is reused;
    a flex machine runs on the result."""
    from patchmosaic.experiments.heatmaps import network_heatmaps
    from patchmosaic.networks import ResNet

    torch.manual_seed(0)
    net = ResNet(channels=C, width=4, depth=1, num_classes=3)
    den = pm.NetworkDenoiser(net)
    imgs, labels = data(8)
    times = [0.7, 0.3]
    hm = network_heatmaps(den, imgs, times, labels, samples=2, seed=5, path=str(tmp_path / "h.npz"), progress=False)
    for l, t in enumerate(times):
        a, b2 = coefficients(t)
        gen = torch.Generator().manual_seed(5 * 1_000_003 + l)
        want = np.zeros((H, W, H, W))
        for _ in range(2):
            n = int(torch.randint(8, (1,), generator=gen))
            z = (a * torch.from_numpy(imgs[n]) + np.sqrt(b2) * torch.randn((C, H, W), generator=gen,
                                                                           dtype=torch.float64))
            z = z.float().requires_grad_(True)
            x0 = (z - np.sqrt(b2) * net(torch.full((1,), t), z[None], torch.tensor([labels[n]]))[0]) / a
            for c in range(C):
                for y in range(H):
                    for x in range(W):
                        (g,) = torch.autograd.grad(x0[c, y, x], z, retain_graph=True)
                        want[y, x] += g[c].abs().numpy() / 2
        assert np.allclose(hm.maps[l].numpy(), want, rtol=1e-5, atol=1e-6)
    again = network_heatmaps(den, imgs, times, labels, samples=2, seed=5, path=str(tmp_path / "h.npz"), progress=False)
    assert again.digest == hm.digest and not (tmp_path / "h.npz.partial.npz").exists()
    out = pm.PSPC(imgs, labels, mode="flex", heatmaps=hm).denoise(queries(imgs, B=2), 0.5, 0.6, labels=labels[:2])
    assert out.shape == (2, C, H, W) and np.all(np.isfinite(out))


def test_cli_takes_pspc_and_its_published_schedule(tmp_path, capsys):
    from patchmosaic.experiments.cli import main

    assert main(["sample", "--machine", "pspc", "--k", "8", "--n", "1", "--steps", "2", "--limit", "50", "--quiet",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists() and "PSPC samples" in capsys.readouterr().out
    assert main(["sample", "--machine", "pspc", "--k", "pspc", "--n", "1", "--steps", "2", "--limit", "50", "--quiet",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert main(["sample", "--machine", "pspc", "--k", "40", "--n", "1", "--steps", "1", "--limit", "50", "--quiet",
                 "--out", str(tmp_path / "t.png")]) == 2
    assert "p must lie in 1..32" in capsys.readouterr().err


def test_window_table_opcheck_and_compile_fullgraph():
    """The table constructor is a custom op (schema, fake tensors); PSPC-Square compiles with
    torch.compile(fullgraph=True) and gives the eager results."""
    w = pm.ops.gaussian_mask(3, 1.0)
    anchors = torch.tensor([[0, 0], [-1, 2], [3, 3]])
    torch.library.opcheck(pm.ops.window_table, (w, torch.ones(3, 3, dtype=torch.float64), anchors, 2, 5, 6),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="no response element inside"):
        pm.ops.window_table(w, w, torch.tensor([[9, 9]]), 1, 5, 6)
    torch.compiler.reset()
    imgs, labels = data(10)
    for m, v in ((pm.PSPC(torch.from_numpy(imgs).float(), labels, precision=1.5), 3),):
        def f(x, t, y):
            return m.denoise(x, t, v, labels=y) + m.score(x, t, v, labels=y)

        x = torch.from_numpy(queries(imgs, B=2)).float()
        y = torch.tensor([0, 2])
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        assert torch.allclose(cf(x, 0.4, y), f(x, 0.4, y), rtol=0, atol=1e-6)
        torch.compiler.reset()


@pytest.mark.parametrize("options", [{}, {"response": "centre"}, {"precision": 1.0, "response": 1.5}],
                         ids=["patch", "centre", "soft"])
def test_flex_compiles_fullgraph_with_t_a_float(options):
    """PSPC-Flex under torch.compile(fullgraph=True): its crops (sorts and merges of data-dependent size) are made
    while the graph is traced, as constants of a graph per (t, tau), like PCA-locality's masks; t a Python float
    (it chooses the heatmap), a tensor t a TypeError. Values and gradients those of eager mode (it once failed:
    'Could not extract specialized integer from data-dependent expression')."""
    torch.compiler.reset()
    imgs, labels = data(10)
    m = pm.PSPC(imgs, labels, mode="flex", heatmaps=heatmaps(), **options)
    x = torch.from_numpy(queries(imgs, B=2)).requires_grad_(True)
    y = torch.tensor([0, 2])

    def f(x, t):
        return m.denoise(x, t, 0.6, labels=y)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for t in (0.9, 0.3):  # the two heatmaps
        want = f(x, t)
        (gw,) = torch.autograd.grad(want.sum(), x)
        got = cf(x, t)
        (gg,) = torch.autograd.grad(got.sum(), x)
        assert torch.equal(got, want) and torch.equal(gg, gw), t
    with pytest.raises(torch._dynamo.exc.Unsupported, match="takes t as a Python float"):  # (its TypeError)
        cf(x, torch.tensor([0.9, 0.3], dtype=torch.float64))
    torch.compiler.reset()


def _literal_log_response(imgs, x, t, p, s):
    """As :func:`literal` for square crops of size p with a Gaussian response of width s, its weights formed per
    element relative to the largest (the plain weights underflow at small widths: an element's 0 / 0)."""
    X = imgs.astype(np.float64)
    a, b2 = coefficients(t)
    c = (p - 1) / 2
    out = np.zeros(x.shape)
    for b in range(len(x)):
        logs, means = [], []
        for i in range(H - p + 1):
            for j in range(W - p + 1):
                hood = np.zeros((H, W))
                hood[i:i + p, j:j + p] = 1.0
                lr = np.full((H, W), -np.inf)
                for u in range(p):
                    for v in range(p):
                        lr[i + u, j + v] = -((u - c) ** 2 + (v - c) ** 2) / (2 * s * s)
                logits = np.array([-np.sum(hood[None] * (x[b] - a * X[n]) ** 2) / (2 * b2) for n in range(len(X))])
                w = np.exp(logits - logits.max())
                logs.append(lr)
                means.append(np.tensordot(w / w.sum(), X, axes=1))
        logs, means = np.array(logs), np.array(means)  # (crops, H, W), (crops, C, H, W)
        rw = np.exp(logs - logs.max(0))
        out[b] = np.sum(rw[:, None] * means, 0) / np.sum(rw, 0)[None]
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_a_narrow_gaussian_response_does_not_underflow(dtype):
    # the corner of a 5x5 crop lies d^2 = 8 from its centre: at width 0.15 its weight underflows in float32, at 0.07
    # in float64, and the corner element (covered by that crop only) came out 0
    imgs, _ = data()
    x = queries(imgs, t=0.4)
    for p, s in ((5, 0.15), (5, 0.07), (3, 0.1)):
        m = pm.PSPC(imgs.astype(dtype), response=s)
        _check(m.denoise(x.astype(dtype), 0.4, p), _literal_log_response(imgs, x, 0.4, p, s), dtype, f"p={p} s={s}")
    # Flex with a narrow response: it failed building its table ("resp_ptr must rise")
    hm = heatmaps()
    got = pm.PSPC(imgs.astype(dtype), mode="flex", heatmaps=hm, response=0.05).denoise(x.astype(dtype), 0.3, 0.6)
    assert np.all(np.isfinite(np.asarray(got)))


def test_heatmap_times_halfway_between_two_take_the_first():
    maps = np.ones((10, H, W, H, W))
    hm = Heatmaps([i / 10 for i in range(10, 0, -1)], maps)  # heatmaps at every second step of a 20-step grid
    assert [hm.index((i + 0.5) / 10) for i in range(9, 0, -1)] == list(range(0, 9))
    assert Heatmaps([0.2, 0.6], np.ones((2, H, W, H, W))).index(0.4) == 0
