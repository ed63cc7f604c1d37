"""Local machines with a masked neighbourhood (``patch_mask=``, ops/masks.py): a boolean or weighted ``k x k``
mask in place of the square patch, shared by every pixel or one per query pixel, on every engine.

The torch oracle is checked against a loop-by-loop transcription of the spec with the weighted distance
(naive.py); the CPU engine and the CUDA kernels (on a GPU and under the emulator, tests/cuda_emulation.py)
against the oracle with the tolerances of tests/test_exactness.py: float64 max |diff| <= 1e-9 at every t,
float32 mean <= 1e-5 and max <= 1e-3 of the data range at the contract's times (t >= 0.05; see
CONTRACT_TIMES). A full mask of ones is the square machine bit for bit, also through the engines' element
table; a mask of the centre alone is the analytic per-pixel softmax. The patch index takes a shared mask.
"""

import numpy as np
import pytest
import torch

import cuda_emulation
import naive
from cases import TIMES, assert_float32_close, build, draw, queries
from triton_cases import needs_triton, on_device, to_numpy

import patchmosaic as pm
from patchmosaic import ops
from patchmosaic.ops import engines, masks

RANGE = 2.0
LOCAL = ("LS", "ELS_zeros", "ELS_circular")
# float32: the contract's times (t >= 0.05). Below them a mask's fewer elements make near-tied keys (whose float32
# logit errors, ~1e-7 |q||k| / (2 b^2), move the output) more frequent than with the square patch: at t = 0.005
# a drawn case reaches a max error of 1e-3 of the range on the CPU engine (and more on the torch reference).
CONTRACT_TIMES = [t for t in TIMES if t >= 0.05]
SEEDS = list(range(24))
from cuda_emulation import dev, needs_gpu  # noqa: E402,F401  (the CUDA-or-emulator fixture)


def local_case(seed, times=None):
    """A drawn case of a local machine (the machines in turn) with k >= 3 where the images allow it."""
    case = draw(seed, machine=LOCAL[seed % 3], times=times)
    if case.k == 1:
        case.k = 3 if min(case.train.shape[2:]) >= 3 else 1
    return case


def random_mask(seed, k, weighted=None):
    """A random neighbourhood of size k with its centre: boolean (even seeds) or weights in [0, 2] with some
    zeros (odd seeds)."""
    rng = np.random.default_rng(seed + 500)
    weighted = bool(seed % 2) if weighted is None else weighted
    keep = rng.random((k, k)) < 0.6
    keep[k // 2, k // 2] = True
    if not weighted:
        return keep
    return np.where(keep, rng.uniform(0.05, 2.0, (k, k)), 0.0)


def oracle(case, x, mask):
    return build(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels, backend="torch", patch_mask=mask)




# ------------------------------------------------------------------------------------------- the oracle
def assert_oracle_is_the_literal_spec(seed, make_mask):
    """The torch oracle with the mask ``make_mask(case)`` against the naive loop (tests/naive.py), float64, 1e-9 of
    the range; cases with many patch pairs keep 2 training images so that the loop stays quick."""
    case = local_case(seed)
    N, C, H, W = case.train.shape
    if np.prod(case.size) * N * H * W > 40_000:
        case.train, case.labels = case.train[:2], case.labels[:2]
        case.qlabels = np.full(len(case.t), case.labels[0])
    x = queries(case, seed)
    mask = make_mask(case)
    a, b2 = pm.schedules.cosine_legacy.coefficients(case.t)
    groups = [np.nonzero(case.labels == y)[0] for y in case.qlabels]
    ref = naive.denoise(case.machine, case.train, x, a, b2, case.k, groups, case.wrapped, mask=mask)
    assert np.abs(oracle(case, x, mask) - ref).max() <= 1e-9 * RANGE, case


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_oracle_matches_literal_spec(seed):
    assert_oracle_is_the_literal_spec(seed, lambda case: random_mask(seed, case.k))


# ------------------------------------------------------------------------------------------ the CPU engine
@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_float64_matches_oracle(seed):
    case = local_case(seed)
    x = queries(case, seed)
    mask = random_mask(seed, case.k)
    got = build(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels, backend="cpu", patch_mask=mask)
    assert got.dtype == np.float64 and got.shape == x.shape
    assert np.abs(got - oracle(case, x, mask)).max() <= 1e-9 * RANGE, case


@pytest.mark.parametrize("seed,backend", [(s, b) for b in ("cpu", "torch") for s in SEEDS]
                         + [pytest.param(s, "triton", marks=needs_triton) for s in SEEDS[:8]])
def test_float32_matches_oracle(seed, backend):
    """The Triton engine (its element table: masks and weights) on the first 8 cases: its interpreter is slow."""
    case = local_case(seed, CONTRACT_TIMES)
    x = queries(case, seed)
    mask = random_mask(seed, case.k)
    got = to_numpy(build(case, np.float32).denoise(on_device(x.astype(np.float32), backend), case.t, case.k,
                                                   labels=case.qlabels, backend=backend, patch_mask=mask))
    assert got.dtype == np.float32
    assert_float32_close(np.abs(got.astype(np.float64) - oracle(case, x, mask)), case, RANGE)


# --------------------------------------------------------------------------------------- the CUDA engine
@pytest.mark.parametrize("seed", SEEDS[:12])
def test_cuda_matches_oracle(seed, dev):
    case = local_case(seed, CONTRACT_TIMES)
    x = queries(case, seed)
    mask = random_mask(seed, case.k)
    ref = oracle(case, x, mask)
    for dtype in (np.float32, np.float64):
        m = build(case, dtype)
        xq = torch.from_numpy(x.astype(dtype)).to(dev)
        out = m.denoise(xq, torch.from_numpy(case.t), case.k, labels=torch.from_numpy(case.qlabels),
                        backend="cuda", patch_mask=mask)
        assert out.device.type == dev.type and out.dtype == xq.dtype
        err = np.abs(out.cpu().double().numpy() - ref)
        if dtype == np.float64:
            assert err.max() <= 1e-9 * RANGE, case
        else:
            assert_float32_close(err, case, RANGE)


# ---------------------------------------------------------------------------------------------- limits
def full_table(C, k):
    return masks.patch_elements(torch.ones(k, k, dtype=torch.float64), C, square=True)


@pytest.mark.parametrize("engine", ["cpu", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [1, 2, 5, 6])
def test_full_mask_is_the_square_machine_exactly(seed, dtype, engine, monkeypatch):
    """Through the engines' element table, a table of every element is the square patch bit for bit (forward
    and backward); through the API a mask of ones is the square call."""
    case = local_case(seed)
    x = torch.from_numpy(queries(case, seed)).to(dtype)
    m = build(case, np.float64 if dtype == torch.float64 else np.float32)
    if engine == "emulated":
        monkeypatch.setattr(engines, "_EMULATOR", cuda_emulation.module())
    eng = engines.CPU if engine == "cpu" else engines.CUDA
    B, C, Hq, Wq = x.shape
    a, s, _ = m.coefficients(torch.from_numpy(case.t), B)
    grp = ops.groups(torch.from_numpy(case.qlabels), *m._label_tensors, m.N, B)
    ks = m.keyset(Hq, Wq, case.k)
    train = m.train_as(dtype, torch.device("cpu"))
    square = engines.local_forward(eng, train, x, case.k, ks, a, s, grp, True)
    table = engines.local_forward(eng, train, x, case.k, ks, a, s, grp, True, elements=full_table(C, case.k))
    for u, v in zip(square, table):
        assert torch.equal(u, v)
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal(x.shape)).to(dtype)
    gsq = engines.local_backward(eng, g, square[0], square[1], train, x, case.k, ks, a, s, grp)
    gtab = engines.local_backward(eng, g, square[0], square[1], train, x, case.k, ks, a, s, grp,
                                  elements=full_table(C, case.k))
    for u, v in zip(gsq, gtab):
        assert torch.equal(u, v)
    name = "cpu" if engine == "cpu" else "cuda"
    api = m.denoise(x, torch.from_numpy(case.t), case.k, labels=case.qlabels, backend=name,
                    patch_mask=np.ones((case.k, case.k), bool))
    assert torch.equal(api, m.denoise(x, torch.from_numpy(case.t), case.k, labels=case.qlabels, backend=name))


def centre_only(case, x):
    """The analytic machine of a mask with the centre alone: per pixel, a softmax over the key centres of its
    class with logits -|x_p - a v|^2 / (2 b^2) (over the channels)."""
    m = build(case, np.float64)
    B, C, Hq, Wq = x.shape
    N, _, H, W = case.train.shape
    a, b2 = pm.schedules.cosine_legacy.coefficients(case.t)
    ks = m.keyset(Hq, Wq, case.k)
    out = np.zeros_like(x)
    for b in range(B):
        imgs = case.train[case.labels == case.qlabels[b]]
        for qpix, kpos in ks.classes():
            v = imgs[:, :, kpos // W, kpos % W].transpose(0, 2, 1).reshape(-1, C)  # (keys, C)
            xp = x[b, :, qpix // Wq, qpix % Wq]  # (pixels, C)
            d2 = ((xp[:, None, :] - a[b] * v[None]) ** 2).sum(-1)
            logit = -d2 / (2 * b2[b])
            w = np.exp(logit - logit.max(1, keepdims=True))
            out[b, :, qpix // Wq, qpix % Wq] = (w @ v) / w.sum(1, keepdims=True)
    return out


@pytest.mark.parametrize("seed", SEEDS[:9])
def test_centre_only_mask_is_the_single_pixel_machine(seed, monkeypatch):
    case = local_case(seed)
    x = queries(case, seed)
    mask = np.zeros((case.k, case.k), bool)
    mask[case.k // 2, case.k // 2] = True
    ref = centre_only(case, x)
    m = build(case, np.float64)
    for backend in ("torch", "cpu"):
        got = m.denoise(x, case.t, case.k, labels=case.qlabels, backend=backend, patch_mask=mask)
        assert np.abs(got - ref).max() <= 1e-9 * RANGE, (backend, case)
    monkeypatch.setattr(engines, "_EMULATOR", cuda_emulation.module())
    got = m.denoise(torch.from_numpy(x), case.t, case.k, labels=case.qlabels, backend="cuda", patch_mask=mask)
    assert np.abs(got.numpy() - ref).max() <= 1e-9 * RANGE, case
    if case.machine == "LS":  # LS's key set does not depend on k: the centre alone is LS at k = 1
        sq = m.denoise(x, case.t, 1, labels=case.qlabels, backend="cpu")
        assert np.abs(got.numpy() - sq).max() <= 1e-12


def test_weights_scale_like_the_noise():
    """A mask of weights c everywhere is the square machine at 1 / (2 b^2) scaled by c: checked through the
    op's coefficients (the same a, inv_2b2 * c)."""
    case = local_case(4)
    x = torch.from_numpy(queries(case, 4))
    m = build(case, np.float64)
    B, C, Hq, Wq = x.shape
    a, s, _ = m.coefficients(torch.from_numpy(case.t), B)
    lv, lp, li = m._label_tensors
    lab = torch.from_numpy(case.qlabels)
    c = 2.5
    w = torch.full((case.k, case.k), c, dtype=torch.float64)
    cl = m.call_classes(Hq, Wq, case.k)
    got = ops.local_softmax(m.images, x, a, s, None, lab, lv, lp, li, *cl, case.k, False, "cpu", 0, 0, w)[0]
    ref = ops.local_softmax(m.images, x, a, s * c, None, lab, lv, lp, li, *cl, case.k, False, "cpu", 0, 0)[0]
    assert (got - ref).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------- gradients
def assert_engine_gradients(m, x0, mask, monkeypatch):
    """The gradient of a fixed linear functional of ``m.denoise(x0, 0.4, patch_mask=mask)``: the CPU engine's and
    the emulated CUDA engine's equal the torch oracle's within 1e-9 (float64)."""

    def grad(backend):
        x = x0.clone().requires_grad_(True)
        out = m.denoise(x, 0.4, backend=backend, patch_mask=mask)
        return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(), x)[0]

    ref = grad("torch")
    assert (grad("cpu") - ref).abs().max() <= 1e-9
    monkeypatch.setattr(engines, "_EMULATOR", cuda_emulation.module())
    assert (grad("cuda") - ref).abs().max() <= 1e-9


@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_match_the_oracle_and_finite_differences(weighted, monkeypatch):
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (4, 2, 6, 7))
    m = pm.ELS(train, boundary="zeros")
    mask = random_mask(int(weighted), 5, weighted)
    x0 = torch.from_numpy(rng.normal(size=(2, 2, 6, 7)) * 0.8)

    assert_engine_gradients(m, x0, mask, monkeypatch)
    monkeypatch.setattr(engines, "_EMULATOR", None)
    x = x0[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: m.denoise(v, 0.4, backend="cpu", patch_mask=mask), (x,), eps=1e-6,
                                    atol=1e-6)


def test_score_eps_and_sensitivity_take_the_mask():
    rng = np.random.default_rng(0)
    m = pm.LS(rng.uniform(-1, 1, (5, 1, 6, 6)))
    x = rng.normal(size=(1, 1, 6, 6))
    mask = np.zeros((5, 5), bool)
    mask[2, :] = True  # a horizontal line
    x0 = m.denoise(x, 0.3, patch_mask=mask)
    a, b2 = m.schedule.coefficients(np.array([0.3]))
    assert np.allclose(m.eps(x, 0.3, patch_mask=mask), (x - a[0] * x0) / np.sqrt(b2[0]))
    assert np.allclose(m.score(x, 0.3, patch_mask=mask), (a[0] * x0 - x) / b2[0])
    jac = m.sensitivity(x, 0.3, pixel=(3, 3), patch_mask=mask)
    field = np.abs(jac[0, 0, 0]) > 0
    assert field[3].any() and not field[np.arange(6) != 3].any()  # only the mask's row reads the input


# ---------------------------------------------------------------------------------------- user errors
BAD = [
    (np.ones((3, 5), bool), ValueError, "square"),
    (np.ones(3, bool), ValueError, "square"),
    (np.ones((1, 3, 3), bool), ValueError, "square"),
    (np.ones((4, 4), bool), ValueError, "odd"),
    (np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool), ValueError, "centre"),
    (np.array([[1, 1, 1], [1, 0.0, 1], [1, 1, 1]]), ValueError, "centre"),
    (np.array([[1, np.nan, 1], [1, 1, 1], [1, 1, 1]]), ValueError, "NaN"),
    (np.array([[1, np.inf, 1], [1, 1, 1], [1, 1, 1]]), ValueError, "NaN or infinite"),
    (np.array([[1, -0.5, 1], [1, 1, 1], [1, 1, 1]]), ValueError, "negative"),
    (np.ones((3, 3), complex), TypeError, "boolean or real"),
    (np.array([["a"] * 3] * 3), TypeError, "boolean or real"),
]


@pytest.mark.parametrize("mask,error,words", BAD)
def test_bad_masks_raise_before_any_work(mask, error, words, monkeypatch):
    m = pm.ELS(np.zeros((2, 1, 8, 8)))

    def no_work(*args, **kw):
        raise AssertionError("the call reached the op")

    monkeypatch.setattr(ops, "local_softmax", no_work)
    with pytest.raises(error, match=words):
        m.denoise(np.zeros((1, 1, 8, 8)), 0.5, patch_mask=mask)
    with pytest.raises(error, match=words):
        m.score(np.zeros((1, 1, 8, 8)), 0.5, patch_mask=torch.as_tensor(mask) if mask.dtype.kind in "bf" else mask)


def test_mask_and_k_must_agree_and_is_has_no_mask():
    m = pm.ELS(np.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="k=3"):
        m.denoise(np.zeros((1, 1, 8, 8)), 0.5, 3, patch_mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="IS machine"):
        pm.IS(np.zeros((2, 1, 8, 8))).denoise(np.zeros((1, 1, 8, 8)), 0.5, patch_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="patch size is k=3"):
        ops.local_softmax(m.images, torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                          torch.ones(1, dtype=torch.float64), None, None, *m._label_tensors, *m.call_classes(8, 8, 3), 3,
                          False, "cpu", 0, 0, torch.ones(5, 5, dtype=torch.float64))


def test_engine_refuses_a_bad_element_table():
    """The compiled core checks the table itself (validate.hpp): codes outside the frame, repeats, scales."""
    rng = np.random.default_rng(0)
    m = pm.ELS(rng.uniform(-1, 1, (2, 1, 8, 8)))
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    a, s, _ = m.coefficients(0.5, 1)
    grp = ops.groups(None, *m._label_tensors, m.N, 1)
    ks = m.keyset(8, 8, 3)
    bad = [(masks.PatchElements(np.array([0, 3 << 12], np.int32), None), "entry 1 is not an element of the C x k x k"),
           (masks.PatchElements(np.array([0, 0], np.int32), None), "entry 1 repeats a patch element"),
           (masks.PatchElements(np.array([1 << 24], np.int32), None), "entry 0 is not an element of the C x k x k"),
           (masks.PatchElements(np.array([0, 1], np.int32), np.array([1.0, -1.0])),
            "elem_scale entry 1 must be finite and positive")]
    for el, words in bad:
        with pytest.raises(ValueError, match=words):
            engines.local_forward(engines.CPU, m.images, x, 3, ks, a, s, grp, False, elements=el)


def test_large_mask_is_cropped_like_k():
    """With zero padding a patch past 2 max(H, W) - 1 only adds padded zeros: a larger mask computes as its
    central part (as k does)."""
    rng = np.random.default_rng(1)
    m = pm.LS(rng.uniform(-1, 1, (3, 1, 4, 4)))
    x = rng.normal(size=(1, 1, 4, 4))
    big = random_mask(0, 11)
    got = m.denoise(x, 0.4, patch_mask=big)
    ref = m.denoise(x, 0.4, patch_mask=big[2:9, 2:9])
    assert np.abs(got - ref).max() == 0


# ------------------------------------------------------------------------------- a mask per query pixel
def pixel_masks(seed, case, repeat=True):
    """One random mask per query pixel (boolean or weighted as random_mask); with ``repeat`` the first rows share
    one mask (so that classes keep several pixels)."""
    Hq, Wq = case.size
    out = np.stack([random_mask(seed * 1000 + p, case.k) for p in range(Hq * Wq)]).reshape(Hq, Wq, case.k, case.k)
    if repeat:
        out[: Hq // 2] = out[0, 0]
    return out


@pytest.mark.parametrize("seed", SEEDS[:9])
def test_per_pixel_oracle_matches_literal_spec(seed):
    assert_oracle_is_the_literal_spec(seed, lambda case: pixel_masks(seed, case))


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_per_pixel_cpu_matches_oracle(seed):
    case = local_case(seed, CONTRACT_TIMES)
    x = queries(case, seed)
    mask = pixel_masks(seed, case)
    ref = oracle(case, x, mask)
    got = build(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels, backend="cpu", patch_mask=mask)
    assert np.abs(got - ref).max() <= 1e-9 * RANGE, case
    got = build(case, np.float32).denoise(x.astype(np.float32), case.t, case.k, labels=case.qlabels, backend="cpu",
                                          patch_mask=mask)
    assert_float32_close(np.abs(got.astype(np.float64) - ref), case, RANGE)


@needs_triton
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_per_pixel_triton_matches_oracle(seed):
    """A mask per pixel on the Triton engine (a table per class), float32, on 4 cases (its interpreter is slow)."""
    case = local_case(seed, CONTRACT_TIMES)
    x = queries(case, seed)
    mask = pixel_masks(seed, case)
    ref = oracle(case, x, mask)
    got = to_numpy(build(case, np.float32).denoise(on_device(x.astype(np.float32), "triton"), case.t, case.k,
                                                   labels=case.qlabels, backend="triton", patch_mask=mask))
    assert_float32_close(np.abs(got.astype(np.float64) - ref), case, RANGE)


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_per_pixel_cuda_matches_oracle(seed, dev):
    case = local_case(seed, CONTRACT_TIMES)
    x = queries(case, seed)
    mask = pixel_masks(seed, case)
    ref = oracle(case, x, mask)
    for dtype in (np.float32, np.float64):
        xq = torch.from_numpy(x.astype(dtype)).to(dev)
        out = build(case, dtype).denoise(xq, torch.from_numpy(case.t), case.k, labels=torch.from_numpy(case.qlabels),
                                         backend="cuda", patch_mask=mask)
        err = np.abs(out.cpu().double().numpy() - ref)
        if dtype == np.float64:
            assert err.max() <= 1e-9 * RANGE, case
        else:
            assert_float32_close(err, case, RANGE)


@pytest.mark.parametrize("backend", ["cpu", "emulated", "torch"])
def test_one_mask_at_every_pixel_is_the_shared_mask_exactly(backend, monkeypatch):
    case = local_case(5)
    x = torch.from_numpy(queries(case, 5))
    shared = random_mask(3, case.k)
    every = np.broadcast_to(shared, tuple(case.size) + shared.shape)
    if backend == "emulated":
        monkeypatch.setattr(engines, "_EMULATOR", cuda_emulation.module())
    name = "cuda" if backend == "emulated" else backend
    m = build(case, np.float64)
    a = m.denoise(x, case.t, case.k, labels=case.qlabels, backend=name, patch_mask=shared)
    b = m.denoise(x, case.t, case.k, labels=case.qlabels, backend=name, patch_mask=every)
    assert torch.equal(a, b)


@pytest.mark.parametrize("machine", LOCAL)
def test_per_pixel_gradients_match_the_oracle(machine, monkeypatch):
    rng = np.random.default_rng(4)
    train = rng.uniform(-1, 1, (3, 2, 6, 7))
    m = {"LS": pm.LS, "ELS_zeros": pm.ELS}.get(machine, lambda tr: pm.ELS(tr, boundary="circular"))(train)
    case = local_case(0)
    case.size, case.k = (6, 7), 3
    mask = pixel_masks(7, case)
    x0 = torch.from_numpy(rng.normal(size=(2, 2, 6, 7)) * 0.8)

    assert_engine_gradients(m, x0, mask, monkeypatch)


def test_per_pixel_mask_errors_name_the_problem():
    m = pm.ELS(np.zeros((2, 1, 8, 8)))
    x = np.zeros((1, 1, 8, 8))
    with pytest.raises(ValueError, match="one mask per pixel of a 6x8 canvas, but the queries are 8x8"):
        m.denoise(x, 0.5, patch_mask=np.ones((6, 8, 3, 3), bool))
    bad = np.ones((8, 8, 3, 3), bool)
    bad[2, 5, 1, 1] = False
    with pytest.raises(ValueError, match=r"centre element .* \(the mask of query pixel \(2, 5\)\)"):
        m.denoise(x, 0.5, patch_mask=bad)
    with pytest.raises(ValueError, match="square"):
        m.denoise(x, 0.5, patch_mask=np.ones((8, 8, 3, 5), bool))


# ------------------------------------------------------------------------------------------ the patch index
MASK_MACHINES = {
    "bbELS_cond": lambda tr, lab: pm.ELS(tr, lab),
    "periodic": lambda tr, lab: pm.ELS(tr, boundary="circular"),
    "wrapped": lambda tr, lab: pm.ELS(tr, boundary="circular", wrapped=True),
    "LS": lambda tr, lab: pm.LS(tr, lab),
}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", sorted(MASK_MACHINES))
def test_masked_patch_index_bound_holds_and_all_keys_are_exact(name, weighted):
    pytest.importorskip("faiss")
    from patchmosaic import PatchIndex

    rng = np.random.default_rng(2)
    tr = rng.uniform(-1, 1, (18, 3, 9, 10)).astype(np.float32)
    tr[::3] = np.where(tr[::3] > 0, tr[::3], -1.0)  # flat backgrounds: duplicates for the merge
    lab = np.arange(18) % 3
    mach = MASK_MACHINES[name](tr, lab)
    labels = [0, 2] if mach.labels is not None else None
    mask = random_mask(int(weighted) + 10, 5, weighted)
    idx = PatchIndex(mach, 5, kind="flat", progress=False, patch_mask=mask)
    assert idx.d == 3 * int((mask > 0).sum())
    for t in (0.05, 0.3, 1.0):
        x = torch.from_numpy(rng.standard_normal((2, 3, 9, 10)).astype(np.float32))
        exact = mach.denoise(x.double(), t, labels=labels, patch_mask=mask)
        for m in (1, 8):
            r = idx.denoise(x, t, labels, m=m)
            err = (exact - r.x0.double()).abs().amax(1)
            assert torch.all(err <= r.bound + 2e-5), (name, t, m, float((err - r.bound).max()))
        r = idx.denoise(x, t, labels, m=10 ** 6)
        assert float(r.bound.max()) == 0.0
        assert torch.allclose(r.x0.double(), exact, atol=2e-5)


def test_masked_patch_index_round_trips_and_refuses_another_mask(tmp_path):
    pytest.importorskip("faiss")
    from patchmosaic import PatchIndex

    rng = np.random.default_rng(0)
    mach = pm.ELS(rng.uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32))
    mask = random_mask(1, 3)
    PatchIndex(mach, 3, kind="flat", progress=False, patch_mask=mask).save(str(tmp_path))
    x = torch.from_numpy(rng.standard_normal((1, 1, 8, 8)).astype(np.float32))
    loaded = PatchIndex.load(str(tmp_path), mach, 3, patch_mask=mask)
    exact = mach.denoise(x.double(), 0.3, 3, patch_mask=mask)
    assert torch.allclose(loaded.denoise(x, 0.3, m=10 ** 6).x0.double(), exact, atol=2e-5)
    with pytest.raises(ValueError, match="patch_mask"):
        PatchIndex.load(str(tmp_path), mach, 3)
    with pytest.raises(ValueError, match="mask per pixel is not supported"):
        PatchIndex(mach, 3, kind="flat", progress=False, patch_mask=np.ones((8, 8, 3, 3), bool))


@pytest.mark.parametrize("per_pixel", [False, True])
def test_cuda_resident_and_per_tile_query_gathers_agree_bit_for_bit(per_pixel, dev, monkeypatch):
    """The CUDA forward pass keeps an item's query patches in shared memory or gathers them again per key tile
    (PATCHMOSAIC_CUDA_QUERY_SMEM_KB=0): a masked table gives the same products in the same order either way."""
    case = local_case(7, CONTRACT_TIMES)
    x = torch.from_numpy(queries(case, 7).astype(np.float32)).to(dev)
    mask = pixel_masks(7, case) if per_pixel else random_mask(7, case.k)
    m = build(case, np.float32)
    run = lambda: m.denoise(x, torch.from_numpy(case.t), case.k, labels=torch.from_numpy(case.qlabels),  # noqa: E731
                            backend="cuda", patch_mask=mask)
    resident = run()
    monkeypatch.setenv("PATCHMOSAIC_CUDA_QUERY_SMEM_KB", "0")
    assert torch.equal(resident, run())


def test_machine_denoiser_with_a_patch_mask():
    """MachineDenoiser(patch_mask=...) runs every step with the mask (cropped to a k-schedule's sizes), describes
    it for the resume fingerprints, and refuses it for IS and for a schedule larger than the mask."""
    rng = np.random.default_rng(5)
    train = rng.uniform(-1, 1, (12, 1, 9, 9))
    els = pm.ELS(train)
    cross = np.zeros((5, 5), bool)
    cross[2, :] = cross[:, 2] = True
    x = rng.standard_normal((2, 1, 9, 9))
    d = pm.MachineDenoiser(els, patch_mask=cross)
    assert d.k == 5 and d.describe()["patch_mask"]["shape"] == [5, 5]
    assert np.array_equal(d(x, 0.5), els.denoise(x, 0.5, 5, patch_mask=cross))
    sched = pm.KSchedule((1.0, 0.5), (5, 3))
    d2 = pm.MachineDenoiser(els, sched, patch_mask=cross)
    assert np.array_equal(d2(x, 0.4), els.denoise(x, 0.4, 3, patch_mask=cross[1:4, 1:4]))
    assert np.array_equal(d2(x, 0.9), els.denoise(x, 0.9, 5, patch_mask=cross))
    assert pm.MachineDenoiser(els, 5).describe() != d.describe()
    with pytest.raises(ValueError, match="IS compares whole images"):
        pm.MachineDenoiser(pm.IS(train), patch_mask=cross)
    with pytest.raises(ValueError, match="larger than the 5x5 patch_mask"):
        pm.MachineDenoiser(els, pm.KSchedule((1.0, 0.5), (7, 3)), patch_mask=cross)
    with pytest.raises(ValueError, match="patch size is k = 7, larger than the 5x5 patch_mask"):
        pm.MachineDenoiser(els, 7, patch_mask=cross)
    with pytest.raises(ValueError, match="centre"):
        pm.MachineDenoiser(els, patch_mask=np.zeros((3, 3)))


def test_mask_weights_that_would_overflow_the_logits_are_refused():
    """Issue 28 campaign: patch_mask weights of 1e38 gave NaN in float32 without a word. The logits' bound counts
    the mask's weights (the largest pixel's sum), so such a call is refused, naming the weights; float64 takes them."""
    rng = np.random.default_rng(28)
    train = rng.uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    w = np.full((3, 3), 1e38)
    w[1, 1] = 1.0
    per_pixel = np.ones((8, 8, 3, 3))
    per_pixel[2, 5] = w
    for mask in (w, per_pixel):
        with pytest.raises(ValueError, match="too large for float32.*patch_mask weights summing to"):
            pm.ELS(train).denoise(x, 0.5, None, patch_mask=mask)
    w[w > 1] = 1e30
    out = pm.ELS(train.astype(np.float64)).denoise(x.astype(np.float64), 0.5, None, patch_mask=w)
    assert np.isfinite(out).all()
    small = np.ones((3, 3))  # the ordinary case is unchanged
    assert np.allclose(pm.ELS(train).denoise(x, 0.5, None, patch_mask=small), pm.ELS(train).denoise(x, 0.5, 3))
