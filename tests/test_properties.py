"""The limits and symmetries of spec section 2, checked on the compiled engine in float64 (tol 1e-9)."""

import numpy as np
import pytest

import naive
import patchmosaic as pm

TOL = 1e-9


def data(seed, N=4, C=1, H=7, W=9):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (N, C, H, W)), rng


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("wrapped", [False, True])
def test_circular_els_commutes_with_circular_shifts(k, wrapped):
    train, rng = data(1, C=3)
    m = pm.ELS(train, boundary="circular", wrapped=wrapped)
    x = rng.standard_normal((2, 3, 7, 9))
    out = m.denoise(x, 0.3, k)
    for dy, dx in [(1, 0), (0, 4), (3, 5), (-2, -7)]:
        shifted = m.denoise(np.roll(x, (dy, dx), axis=(2, 3)), 0.3, k)
        assert np.abs(shifted - np.roll(out, (dy, dx), axis=(2, 3))).max() <= TOL


@pytest.mark.parametrize("machine", ["LS", "ELS_zeros", "ELS_circular"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_locality(machine, k):
    """Changing a pixel farther than k//2 from p leaves x0_hat[p] unchanged."""
    train, rng = data(2)
    m = {"LS": pm.LS(train), "ELS_zeros": pm.ELS(train), "ELS_circular": pm.ELS(train, boundary="circular")}[machine]
    x = rng.standard_normal((1, 1, 7, 9))
    out = m.denoise(x, 0.4, k)
    r = k // 2
    for (ci, cj) in [(0, 0), (3, 4), (6, 8), (2, 7)]:
        x2 = x.copy()
        x2[0, 0, ci, cj] += 3.0
        out2 = m.denoise(x2, 0.4, k)
        ii, jj = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
        di, dj = np.abs(ii - ci), np.abs(jj - cj)
        if machine == "ELS_circular":
            di, dj = np.minimum(di, 7 - di), np.minimum(dj, 9 - dj)
        far = np.maximum(di, dj) > r
        assert far.any()
        assert np.abs(out2 - out)[0, 0][far].max() <= TOL
        assert np.abs(out2 - out)[0, 0][~far].max() > 0  # and the near pixels do change


def nearest_key_centres(machine, train, x, a, k):
    """Per pixel, the centre of the key patch nearest to the query patch (spec Theorem 4.1)."""
    N, C, H, W = train.shape
    r = k // 2
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for i in range(H):
            for j in range(W):
                mode = "circular" if machine == "ELS_circular" else "zeros"
                q = naive.pad_patch(x[b], i, j, k, mode)
                if machine == "LS":
                    pos = [(i, j)]
                elif machine == "ELS_circular":
                    pos = [(u, v) for u in range(r, H - r) for v in range(r, W - r)]
                else:
                    s = naive.sig(i, j, H, W, r)
                    pos = [(u, v) for u in range(H) for v in range(W) if naive.sig(u, v, H, W, r) == s]
                best, cen = np.inf, None
                for n in range(N):
                    for (u, v) in pos:
                        d = ((q - a * naive.pad_patch(train[n], u, v, k, "zeros")) ** 2).sum()
                        if d < best:
                            best, cen = d, train[n, :, u, v]
                out[b, :, i, j] = cen
    return out


@pytest.mark.parametrize("machine", ["LS", "ELS_zeros", "ELS_circular"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_small_t_returns_nearest_key_centre(machine, k):
    train, rng = data(3, C=2)
    m = {"LS": pm.LS(train), "ELS_zeros": pm.ELS(train), "ELS_circular": pm.ELS(train, boundary="circular")}[machine]
    t = 1e-4
    a, _ = pm.schedules.cosine_legacy.coefficients(t)
    x = rng.uniform(-1, 1, (2, 2, 7, 9))
    out = m.denoise(x, t, k)
    assert np.abs(out - nearest_key_centres(machine, train, x, float(a), k)).max() <= TOL


def test_small_t_is_returns_nearest_image():
    train, rng = data(4)
    x = train[[2, 0]] + 0.05 * rng.standard_normal((2, 1, 7, 9))
    out = pm.IS(train).denoise(x, 1e-3)
    assert np.abs(out - train[[2, 0]]).max() <= TOL


def signature_means(train, Hq, Wq, k):
    """Mean over keys of each pixel's boundary-aware key set, from the spec's signature formula."""
    N, C, H, W = train.shape
    r = k // 2
    out = np.zeros((C, Hq, Wq))
    for i in range(Hq):
        for j in range(Wq):
            s = naive.sig(i, j, Hq, Wq, r)
            pos = [(u, v) for u in range(H) for v in range(W) if naive.sig(u, v, H, W, r) == s]
            out[:, i, j] = np.mean([train[:, :, u, v] for (u, v) in pos], axis=(0, 1))
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_zero_signal_gives_mean_of_key_centres(k):
    """a -> 0 (a schedule reaching alpha_bar = 0): every weight is equal."""
    train, rng = data(5, C=2)
    x = rng.standard_normal((1, 2, 7, 9))
    zero = lambda t: np.zeros_like(t)  # noqa: E731 -- alpha_bar = 0: a = 0, b = 1
    r = k // 2
    assert np.abs(pm.IS(train, schedule=zero).denoise(x, 0.5) - train.mean(0)).max() <= TOL
    assert np.abs(pm.LS(train, schedule=zero).denoise(x, 0.5, k) - train.mean(0)).max() <= TOL
    interior = train[:, :, r:7 - r, r:9 - r].mean(axis=(0, 2, 3))
    got = pm.ELS(train, boundary="circular", schedule=zero).denoise(x, 0.5, k)
    assert np.abs(got - interior[None, :, None, None]).max() <= TOL
    got = pm.ELS(train, schedule=zero).denoise(x, 0.5, k)
    assert np.abs(got[0] - signature_means(train, 7, 9, k)).max() <= TOL
    # the standard cosine schedule reaches alpha_bar(1) = 0 up to rounding (a ~ 6e-17)
    got = pm.ELS(train, schedule="cosine").denoise(x, 1.0, k)
    assert np.abs(got[0] - signature_means(train, 7, 9, k)).max() <= 1e-12


@pytest.mark.parametrize("t", [0.05, 0.4, 1.0])
def test_ls_equals_is_for_full_image_patches(t):
    train, rng = data(6, C=3, H=5, W=6)
    x = rng.standard_normal((3, 3, 5, 6))
    k = 2 * 6 - 1
    assert np.abs(pm.LS(train).denoise(x, t, k) - pm.IS(train).denoise(x, t)).max() <= TOL
    assert np.abs(pm.LS(train).denoise(x, t, k + 4) - pm.IS(train).denoise(x, t)).max() <= TOL


@pytest.mark.parametrize("k", [7, 9, 13])
def test_boundary_els_equals_ls_for_large_k(k):
    train, rng = data(7, H=6, W=7)
    x = rng.standard_normal((2, 1, 6, 7))
    for t in [0.1, 0.7]:
        assert np.abs(pm.ELS(train).denoise(x, t, k) - pm.LS(train).denoise(x, t, k)).max() <= TOL


def test_k1_is_a_per_pixel_softmax_over_all_training_pixels():
    train, rng = data(8, C=2)
    x = rng.standard_normal((1, 2, 7, 9))
    a, b2 = pm.schedules.cosine_legacy.coefficients(0.3)
    vals = train.transpose(0, 2, 3, 1).reshape(-1, 2)
    expect = np.zeros_like(x)
    for i in range(7):
        for j in range(9):
            expect[0, :, i, j] = naive.softmax_average(x[0, :, i, j], vals, vals, float(a), float(b2))
    for m in [pm.ELS(train), pm.ELS(train, boundary="circular")]:
        assert np.abs(m.denoise(x, 0.3, 1) - expect).max() <= TOL


def test_eps_and_score_follow_from_x0():
    train, rng = data(9)
    m = pm.ELS(train)
    x = rng.standard_normal((2, 1, 7, 9))
    t = np.array([0.2, 0.8])
    a, b2 = pm.schedules.cosine_legacy.coefficients(t)
    a, b2 = a[:, None, None, None], b2[:, None, None, None]
    x0 = m.denoise(x, t, 3)
    assert np.allclose(m.eps(x, t, 3), (x - a * x0) / np.sqrt(b2), rtol=0, atol=1e-12)
    assert np.allclose(m.score(x, t, 3), (a * x0 - x) / b2, rtol=0, atol=1e-12)
    assert np.allclose(m.score(x, t, 3), -m.eps(x, t, 3) / np.sqrt(b2), rtol=0, atol=1e-10)


def test_labels_restrict_keys_to_their_class():
    train, rng = data(10, N=6)
    labels = np.array([0, 1, 0, 1, 2, 2])
    x = rng.standard_normal((3, 1, 7, 9))
    m = pm.ELS(train, labels)
    got = m.denoise(x, 0.3, 3, labels=[1, 2, 0])
    for b, y in enumerate([1, 2, 0]):
        alone = pm.ELS(train[labels == y]).denoise(x[b : b + 1], 0.3, 3)
        assert np.abs(got[b : b + 1] - alone).max() <= TOL


def test_provenance_names_the_nearest_key_at_small_t():
    train, rng = data(11, N=3)
    m = pm.ELS(train)
    x = pm.schedules.cosine_legacy.coefficients(1e-4)[0] * np.roll(train[1:2], 0)  # the clean training image
    out, prov = m.denoise(x, 1e-4, 3, return_provenance=True)
    assert np.all(prov.image[:, 2:5, 2:7] == 1)  # interior pixels: their own patch is an exact match
    assert np.all(prov.row[0, 2:5, 2:7] == np.arange(2, 5)[:, None])
    assert np.all(prov.col[0, 2:5, 2:7] == np.arange(2, 7)[None, :])
    assert np.all(prov.share > 0.99)
    n = train[prov.image, :, prov.row, prov.col]  # (B, H, W, C): the winning keys' centres
    assert np.abs(np.moveaxis(n, -1, 1) - out).max() <= 1e-6


@pytest.mark.parametrize("machine", ["IS", "LS", "ELS_zeros", "ELS_circular"])
def test_result_does_not_depend_on_the_thread_count(machine):
    """The key ranges and their merge order are fixed, so 1 and 2 threads give identical bits."""
    train, rng = data(12, N=40, C=3, H=12, W=10)
    x = rng.standard_normal((3, 3, 12, 10)).astype(np.float32)
    outs = []
    for nt in (1, 2):
        kw = dict(n_threads=nt)
        m = {"IS": pm.IS(train.astype(np.float32), **kw), "LS": pm.LS(train.astype(np.float32), **kw),
             "ELS_zeros": pm.ELS(train.astype(np.float32), **kw),
             "ELS_circular": pm.ELS(train.astype(np.float32), boundary="circular", **kw)}[machine]
        outs.append(m.denoise(x, 0.4, 5, backend="cpu"))
    assert np.array_equal(outs[0], outs[1])
