"""The smoothed closed-form denoiser (machines/smoothed.py, after Scarvelis et al. and the Analytic Diffusion
Studio's scfdm): against a float64 numpy transcription -- the mean over the draws of the exact ideal denoiser (a
softmax over every training image) at the perturbed queries -- with the machine's own draws; seeded reproducibility;
the interpolant coordinates; s = 0 is IS; gradients; bad input. Tolerances: float64 within 1e-9, float32 within
1e-5 of the data range on average and 1e-3 at worst."""

import numpy as np
import pytest
import torch

import patchmosaic as pm

C, H, W, N = 1, 5, 4, 25


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (N, C, H, W)), rng.integers(0, 2, N)


def literal(imgs, x, a, b2, eps, s, tau=1.0, groups=None):
    X = imgs.reshape(len(imgs), -1)
    out = np.zeros((len(x), X.shape[1]))
    for b in range(len(x)):
        idx = np.arange(len(X)) if groups is None else groups[b]
        for m in range(len(eps)):
            q = x[b].reshape(-1) + s[b] * eps[m, b].reshape(-1)
            logits = -((q[None, :] - a[b] * X[idx]) ** 2).sum(1) / (2 * b2[b] * tau)
            w = np.exp(logits - logits.max())
            out[b] += (w[:, None] * X[idx]).sum(0) / w.sum() / len(eps)
    return out.reshape(x.shape)


def coefficients(t):
    ab = np.cos(np.asarray(t, np.float64) / 1.008 * np.pi / 2) ** 2
    return np.sqrt(ab), 1 - ab


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("coordinates", ["vp", "interpolant"])
def test_equals_the_mean_of_exact_ideal_denoisers_at_the_draws(coordinates, dtype):
    imgs, labels = data()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, C, H, W))
    t = np.array([0.3, 0.6, 0.9])
    lab = np.array([1, 0, 1])
    m = pm.SmoothedCFDM(imgs.astype(dtype), labels, smoothing=0.4, samples=5, coordinates=coordinates,
                        temperature=0.7, seed=3)
    got = m.denoise(x.astype(dtype), t, labels=lab)
    a, b2 = coefficients(t)
    s = np.full(3, 0.4) * ((a + np.sqrt(b2)) if coordinates == "interpolant" else 1.0)
    eps = m.noise(m.call_times(t, 3), x.shape).numpy()
    want = literal(imgs, x, a, b2, eps, s, 0.7, [np.nonzero(labels == v)[0] for v in lab])
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= (1e-9 if dtype == np.float64 else 2e-3) and err.mean() <= (1e-9 if dtype == np.float64 else 2e-5)


def test_draws_are_seeded_and_reproducible():
    imgs, _ = data()
    x = np.random.default_rng(2).standard_normal((2, C, H, W))
    m = pm.SmoothedCFDM(imgs, smoothing=0.5, samples=4, seed=7)
    first = m.denoise(x, 0.5)
    m.denoise(x, 0.2)  # another call in between changes nothing
    assert np.array_equal(first, m.denoise(x, 0.5))
    assert np.array_equal(first, pm.SmoothedCFDM(imgs, smoothing=0.5, samples=4, seed=7).denoise(x, 0.5))
    assert not np.array_equal(first, pm.SmoothedCFDM(imgs, smoothing=0.5, samples=4, seed=8).denoise(x, 0.5))
    assert np.allclose(pm.SmoothedCFDM(imgs, smoothing=0.0, samples=3).denoise(x, 0.5), pm.IS(imgs).denoise(x, 0.5),
                       rtol=0, atol=1e-12)



def test_eager_draws_are_the_ops_draws():
    """An eager call takes its draws from ``ops.seeded_draws`` (no op dispatch); a compiled graph from the op
    ``ops.seeded_normal`` (times read when the graph runs): the same draws, bit for bit."""
    from patchmosaic import ops

    times = [0.25, 0.5, 0.5]
    shape = [3, C, H, W]
    eager = ops.seeded_draws(times, 5, 4, shape)
    assert eager.shape == (4, 3, C, H, W) and eager.dtype == torch.float64
    assert torch.equal(eager, ops.seeded_normal(torch.tensor(times, dtype=torch.float64), 5, 4, shape))
    assert not torch.equal(eager[:, 1], eager[:, 2])  # the image's index is in the seed
    with pytest.raises(ValueError, match="one time per image"):
        ops.seeded_draws(times[:2], 5, 4, shape)

def test_gradients_and_the_samplers():
    imgs, _ = data()
    m = pm.SmoothedCFDM(imgs, smoothing=0.3, samples=3)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, C, H, W))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx: m.denoise(xx, 0.4), (x,), eps=1e-6, atol=1e-6)
    # in t with the draws fixed (they are seeded by t, so finite differences in t would redraw them): the mean of the
    # ideal denoiser's t-derivatives at the perturbed queries
    t = torch.tensor([0.4, 0.7], dtype=torch.float64, requires_grad=True)
    (gt,) = torch.autograd.grad(m.denoise(x.detach(), t).sum(), t)
    eps = m.noise(m.call_times(t, 2), x.shape)
    ref = sum(pm.IS(imgs).denoise(x.detach() + 0.3 * eps[j], t) for j in range(3)) / 3
    (want,) = torch.autograd.grad(ref.sum(), t)
    assert torch.allclose(gt, want, rtol=1e-10, atol=1e-12)
    # both coordinates with the draws held fixed: in "interpolant" the scale s (a + b) moves with t too (its
    # derivative was once dropped: 1-2% off)
    for coords in ("vp", "interpolant"):
        mc = pm.SmoothedCFDM(imgs, smoothing=0.3, samples=3, coordinates=coords)
        fixed = mc.noise(m.call_times(t, 2), x.shape)
        mc.noise = lambda times, shape: fixed
        assert torch.autograd.gradcheck(lambda xx, tt: mc.denoise(xx, tt), (x, t), eps=1e-6, atol=1e-6), coords
    out = pm.ddim(pm.MachineDenoiser(m), torch.randn(2, C, H, W, dtype=torch.float64), steps=3, progress=False)
    assert out.shape == (2, C, H, W) and bool(torch.isfinite(out).all())


def test_bad_input_is_refused():
    imgs, _ = data()
    for kw, msg in (({"smoothing": -0.1}, "smoothing must be"), ({"smoothing": float("inf")}, "smoothing must be"),
                    ({"samples": 0}, "samples must be a positive int"), ({"coordinates": "edm"}, "coordinates must"),
                    ({"temperature": 0}, "temperature must"), ({"seed": 1.5}, "seed must be an int")):
        with pytest.raises(ValueError, match=msg):
            pm.SmoothedCFDM(imgs, **kw)
    m = pm.SmoothedCFDM(imgs)
    with pytest.raises(ValueError, match="no provenance"):
        m.denoise(np.zeros((1, C, H, W)), 0.5, return_provenance=True)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        m.denoise(np.zeros((1, C, H, W)), 0.0)
    with pytest.raises(pm.ResourceError):
        pm.SmoothedCFDM(imgs, samples=10, max_memory=10_000).check_request((64, C, H, W))


def test_weighted_means_gathers_only_the_kept_images_when_few(monkeypatch):
    """A weight below e^-60 of its row's largest is left out; when the images some row keeps are at most a tenth
    of them, the means are taken over those alone (an image no row keeps is never read: a NaN there stays out), else
    over every image; both equal the softmax means to float64 rounding, and logits spread far beyond the denormal
    range (-708) are no problem for either."""
    from patchmosaic.machines import smoothed

    rng = np.random.default_rng(6)
    R, D, n = 3, 7, 50
    XT = torch.from_numpy(rng.uniform(-1, 1, (D, n)))
    logits = torch.from_numpy(rng.uniform(-5000, -1000, (R, n)))
    logits[:, :3] = torch.from_numpy(rng.uniform(-3, 0, (R, 3)))  # three images carry every row's weight
    want = (torch.softmax(logits, 1) @ XT.T)
    assert torch.allclose(smoothed.weighted_means(logits, XT), want, rtol=0, atol=1e-14)
    poisoned = XT.clone()
    poisoned[:, 10] = float("nan")
    assert torch.isfinite(smoothed.weighted_means(logits, poisoned)).all()  # gathered: column 10 never read
    monkeypatch.setattr(smoothed, "SPARSE", -1.0)  # every image
    assert torch.allclose(smoothed.weighted_means(logits, XT), want, rtol=0, atol=1e-14)
    assert torch.isnan(smoothed.weighted_means(logits, poisoned)).all()
    # rows whose kept images differ: the union is gathered, each row's own weights used
    logits2 = logits.clone()
    logits2[1, :3] -= 200.0
    logits2[1, 20] = 0.0
    monkeypatch.setattr(smoothed, "SPARSE", 0.1)
    assert torch.allclose(smoothed.weighted_means(logits2, XT), torch.softmax(logits2, 1) @ XT.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_low_noise_on_many_images_equals_the_literal(path):
    """At low noise the draws keep 2 of 300 images of 8 x 8 pixels (spied on: the compiled call's count of kept
    images; on the torch path, taken when x requires a gradient, the gathered means): still the literal's output to
    1e-9."""
    from patchmosaic.machines import smoothed

    rng = np.random.default_rng(8)
    imgs = rng.uniform(-1, 1, (300, 1, 8, 8))
    t = np.array([0.05, 0.2])
    a, b2 = coefficients(t)
    x = a[:, None, None, None] * imgs[[4, 9]] + np.sqrt(b2)[:, None, None, None] * rng.standard_normal((2, 1, 8, 8))
    m = pm.SmoothedCFDM(imgs, smoothing=0.05, samples=4, seed=1)
    kept = {"torch": [], "compiled": []}  # images kept, per path that ran
    means, compiled = smoothed.weighted_means, smoothed.ops.expansion_means

    def spy(logits, XT):
        kept["torch"].append(int((logits - logits.amax(1, keepdim=True) >= -smoothed.CUT).any(0).sum()))
        return means(logits, XT)

    def spy_compiled(*args, **kw):
        out, n = compiled(*args, **kw)
        kept["compiled"].append(n)
        return out, n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smoothed, "weighted_means", spy)
        mp.setattr(smoothed.ops, "expansion_means", spy_compiled)
        if path == "compiled":
            got = m.denoise(x, t)
        else:
            got = m.denoise(torch.from_numpy(x).requires_grad_(True), t).detach().numpy()
    other = "torch" if path == "compiled" else "compiled"
    assert kept[other] == [] and len(kept[path]) == 1 and 2 <= kept[path][0] <= smoothed.SPARSE * len(imgs)
    eps = m.noise(m.call_times(t, 2), x.shape).numpy()
    want = literal(imgs, x, a, b2, eps, np.full(2, 0.05))
    assert np.abs(got - want).max() <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_compiled_means_equal_the_torch_means(dtype):
    """The compiled CPU path (ops.expansion_means: no derivative asked for) and the torch operations (taken when
    one is) compute the same function: equal to float64 rounding (1e-12 relative to the data) at high noise (every
    image kept), middle and low noise (few kept), with labels, images stored in float32 or float64, sizes that are
    not multiples of the kernel's tiles (301 images, 3 x 10 x 10 = 300 elements, 7 draws x 3 queries = 21 rows) (the
    compiled op counted: it runs for the plain calls, not for those that ask for a gradient); and the compiled result
    is the same for 1, 2, 3 and 5 threads, bit for bit."""
    from patchmosaic.machines import smoothed

    calls = []
    compiled = smoothed.ops.expansion_means

    def counted(*args, **kw):
        calls.append(1)
        return compiled(*args, **kw)

    rng = np.random.default_rng(11)
    imgs = torch.from_numpy(rng.uniform(-1, 1, (301, 3, 10, 10))).to(dtype)
    labels = rng.integers(0, 3, 301)
    x = torch.from_numpy(rng.standard_normal((3, 3, 10, 10)))
    x[1] = 0.9 * imgs[7].double() + 0.1 * x[1]
    lab = np.array([2, 0, 1])
    for smoothing, t in ((1.0, 0.95), (0.3, 0.5), (0.02, 0.05)):
        for labels_or_none, lab_or_none in ((None, None), (labels, lab)):
            m = pm.SmoothedCFDM(imgs, labels_or_none, smoothing=smoothing, samples=7, seed=4, n_threads=1)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(smoothed.ops, "expansion_means", counted)
                fast = m.denoise(x.to(dtype), t, labels=lab_or_none)
                assert len(calls) == 1
                slow = m.denoise(x.to(dtype).clone().requires_grad_(True), t, labels=lab_or_none).detach()
                assert len(calls) == 1
                calls.clear()
            assert (fast.double() - slow.double()).abs().max() <= (1e-12 if dtype == torch.float64 else 1e-6)
            for n_threads in (2, 3, 5):
                more = pm.SmoothedCFDM(imgs, labels_or_none, smoothing=smoothing, samples=7, seed=4,
                                       n_threads=n_threads)
                assert torch.equal(more.denoise(x.to(dtype), t, labels=lab_or_none), fast)


def test_compiled_means_refuse_bad_arguments():
    """The compiled op checks its arrays before it reads them: a ValueError naming the argument."""
    from patchmosaic import ops

    X, Q, v = torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    sq = torch.zeros(5, dtype=torch.float64)
    out, kept = ops.expansion_means(X, sq, Q, v, v)
    assert out.shape == (2, 4) and kept == 5
    with pytest.raises(ValueError, match="Q must have shape"):
        ops.expansion_means(X, sq, torch.zeros(2, 3, dtype=torch.float64), v, v)
    with pytest.raises(ValueError, match="sq must have shape"):
        ops.expansion_means(X, sq[:4], Q, v, v)
    with pytest.raises(ValueError, match="c2 must have shape"):
        ops.expansion_means(X, sq, Q, v, v[:1])
    with pytest.raises(ValueError, match="img_label must have shape"):
        ops.expansion_means(X, sq, Q, v, v, torch.zeros(2, dtype=torch.int64), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="X must be a 2-d float32 or float64"):
        ops.expansion_means(X.half(), sq, Q, v, v)
    for cut in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cut must be a finite number > 0"):
            ops.expansion_means(X, sq, Q, v, v, cut=cut)
    for groups in (0, 3, -2):
        with pytest.raises(ValueError, match="groups must be >= 1 and divide the rows of Q"):
            ops.expansion_means(X, sq, Q, v, v, groups=groups)


@pytest.mark.parametrize("N,D,R,G", [(17, 129, 6, 3), (600, 7, 10, 1), (1000, 64, 12, 4), (257, 300, 10, 5),
                                     (300, 33, 8, 8)])
def test_compiled_means_averaged_over_groups(N, D, R, G):
    """``groups=G``: out[g] is the mean of the softmax means of rows g, g + G, ... (the smoothed denoiser's draws of
    one query), taken by the op as one weighted sum per group: against the per-row means written out in numpy and
    averaged, to 1e-12 of the data (times |L| / 1000 where the logits are larger), with labels (one row's label has
    no image: its group is NaN, the others unaffected), at the default cut and at cut 5 (the cut is exact: every
    row's largest logit is known before its weights are made), images in float32 and float64; the images kept
    counted as the reference does; the same bits on 1, 2 and 3 threads."""
    from patchmosaic import ops

    rng = np.random.default_rng(N + D + R + G)
    X64 = rng.uniform(-1, 1, (N, D))
    lab, rl = rng.integers(0, 3, N), np.arange(R) % 4  # label 3: no image
    for dtype in (np.float32, np.float64):
        X = X64.astype(dtype)
        Xd = X.astype(np.float64)
        sq = (Xd ** 2).sum(1)
        Q = rng.standard_normal((R, D))
        for scale, cut, labelled in ((0.01, 60.0, False), (3.0, 60.0, True), (3.0, 5.0, False), (300.0, 60.0, True)):
            c1 = rng.uniform(0.5, 1.5, R) * scale
            c2 = c1 * rng.uniform(0.3, 0.6, R)
            L = c1[:, None] * (Q @ Xd.T) - c2[:, None] * sq[None]
            if labelled:
                L = np.where(lab[None] == rl[:, None], L, -np.inf)
            with np.errstate(invalid="ignore"):
                d = L - L.max(1, keepdims=True)
                Wt = np.where(d >= -cut, np.exp(d), 0.0)
                per_row = (Wt @ Xd) / Wt.sum(1, keepdims=True)
            want = per_row.reshape(R // G, G, D).mean(0)
            args = [torch.from_numpy(v) for v in (X, sq, Q, c1, c2)]
            kw = dict(row_label=torch.from_numpy(rl), img_label=lab) if labelled else {}
            outs = [ops.expansion_means(*args, **kw, cut=cut, groups=G, n_threads=n) for n in (1, 2, 3)]
            assert all(k == int((Wt > 0).any(0).sum()) for _, k in outs)
            got = outs[0][0].numpy()
            assert got.shape == (G, D)
            empty = np.isnan(want).any(1)
            assert labelled == empty.any() and (np.isnan(got).all(1) == empty).all()
            tol = 1e-12 * max(1.0, np.abs(L[np.isfinite(L)]).max() / 1e3)
            assert np.abs(got[~empty] - want[~empty]).max(initial=0.0) <= tol
            assert all(np.array_equal(o.numpy(), got, equal_nan=True) for o, _ in outs[1:])


def test_compiled_equals_eager_where_eager_gathers_the_kept_images():
    """Eager, the means at low noise run over the few images the draws keep (a gather whose size depends on the
    values); a compiled graph takes them over every image (the left-out weights as zeros): the same function, equal
    to float64 rounding (1e-12)."""
    from patchmosaic.machines import smoothed

    rng = np.random.default_rng(8)
    imgs = torch.from_numpy(rng.uniform(-1, 1, (300, 1, 8, 8)))
    m = pm.SmoothedCFDM(imgs, smoothing=0.05, samples=3, seed=2)
    x = 0.99 * imgs[[3]] + 0.05 * torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eager = m.denoise(x, 0.05)
    compiled = torch.compile(lambda q: m.denoise(q, 0.05), fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-12)
    logits = torch.zeros(1, 300, dtype=torch.float64)
    logits[0, 5:] = -1e4
    assert (smoothed.weighted_means(logits, imgs.reshape(300, -1).T) - imgs[:5].reshape(5, -1).mean(0)).abs().max() < 1e-14


@pytest.mark.parametrize("N,D,R", [(17, 129, 1), (257, 300, 5), (600, 7, 9), (1000, 64, 4), (257, 300, 10), (600, 7, 7),
                                   (1000, 64, 3)])
def test_compiled_means_across_blocks_and_segments(N, D, R):
    """The compiled op takes the logits and the weighted sums in blocks of images (at least 256 images each, fixed by
    N) of 16-image segments and merges the blocks' sums at the end: against the softmax means written out in numpy (float64, e^-60 cut) to 1e-12 of
    the data (times |L| / 1000 where the logits are larger) at three logit scales (every image kept, some, one), with labels, images in float32; the images kept
    counted as the reference does; the same bits on 1, 2 and 3 threads."""
    from patchmosaic import ops

    rng = np.random.default_rng(N + D + R)
    X = rng.uniform(-1, 1, (N, D)).astype(np.float32)
    Xd = X.astype(np.float64)
    sq = (Xd ** 2).sum(1)
    Q = rng.standard_normal((R, D))
    lab, rl = rng.integers(0, 3, N), np.arange(R) % 3
    for scale in (0.01, 3.0, 1000.0):
        c1 = rng.uniform(0.5, 1.5, R) * scale
        c2 = c1 * rng.uniform(0.3, 0.6, R)
        for labelled in (False, True):
            L = c1[:, None] * (Q @ Xd.T) - c2[:, None] * sq[None]
            if labelled:
                L = np.where(lab[None] == rl[:, None], L, -np.inf)
            d = L - L.max(1, keepdims=True)
            Wt = np.where(d >= -60, np.exp(d), 0.0)
            want = (Wt @ Xd) / Wt.sum(1, keepdims=True)
            args = [torch.from_numpy(v) for v in (X, sq, Q, c1, c2)]
            kw = dict(row_label=torch.from_numpy(rl), img_label=lab) if labelled else {}
            outs = [ops.expansion_means(*args, **kw, n_threads=n) for n in (1, 2, 3)]
            assert all(k == int((Wt > 0).any(0).sum()) for _, k in outs)
            # both sides round logits of size |L| (to ~1e-16 |L|), which moves the weights' ratios by that much
            tol = 1e-12 * max(1.0, np.abs(L[np.isfinite(L)]).max() / 1e3)
            assert np.abs(outs[0][0].numpy() - want).max() <= tol
            assert all(torch.equal(o, outs[0][0]) for o, _ in outs[1:])


def test_calls_make_no_copy_of_the_images_in_the_query_dtype(monkeypatch):
    """The machine reads its images as stored (the compiled path) or as its float64 columns (the torch path): a call
    never asks the base class for the images in the query's dtype (a float64 query on float32 images made a float64
    copy it did not use)."""
    imgs, _ = data()
    m = pm.SmoothedCFDM(imgs.astype(np.float32), smoothing=0.3, samples=3)

    def refused(*args):
        raise AssertionError("train_as called")

    monkeypatch.setattr(m, "train_as", refused)
    x = np.random.default_rng(5).standard_normal((2, C, H, W))
    assert m.denoise(x, 0.5).dtype == np.float64 and m.denoise(x.astype(np.float32), 0.5).dtype == np.float32
    m.denoise(torch.from_numpy(x).requires_grad_(True), 0.5).sum().backward()


def test_compiled_means_with_labels_sorted_by_block():
    """Labels sorted so that a row's label lies in the first blocks only, or only in the last block after its first
    segment (every other block adds nothing for that row), six blocks: against the numpy
    softmax means to 1e-12 at a low and a high logit scale, the kept counts the reference's, 1 and 3 threads
    bit-identical."""
    from patchmosaic import ops

    rng = np.random.default_rng(3)
    N, D = 1500, 9
    X = rng.uniform(-1, 1, (N, D))
    sq = (X ** 2).sum(1)
    lab = np.zeros(N, np.int64)
    lab[700:] = 1
    lab[1490:1496] = 2  # the last block (1280-1499) only, not its first 16 images
    rl = np.array([0, 1, 2, 2, 0])
    Q = rng.standard_normal((5, D))
    for scale in (0.01, 50.0):
        c1 = np.full(5, scale)
        c2 = 0.5 * c1
        L = np.where(lab[None] == rl[:, None], c1[:, None] * (Q @ X.T) - c2[:, None] * sq[None], -np.inf)
        d = L - L.max(1, keepdims=True)
        Wt = np.where(d >= -60, np.exp(d), 0.0)
        want = (Wt @ X) / Wt.sum(1, keepdims=True)
        args = [torch.from_numpy(v) for v in (X, sq, Q, c1, c2)]
        outs = [ops.expansion_means(*args, row_label=torch.from_numpy(rl), img_label=lab, n_threads=n) for n in (1, 3)]
        assert outs[0][1] == outs[1][1] == int((Wt > 0).any(0).sum())
        assert np.abs(outs[0][0].numpy() - want).max() <= 1e-12
        assert torch.equal(outs[0][0], outs[1][0])
