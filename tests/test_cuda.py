"""The CUDA engine computes the spec's function. Every test here runs on two engines: the GPU
(parameter ``gpu``, marked ``cuda``: it needs a GPU and a build with the CUDA engine, and is skipped
otherwise) and the same kernel sources built for the CPU under an emulator (``emulated``,
tests/cuda_emulation.py: it runs everywhere, and shows indexing, barriers and arithmetic, not speed).
Tests of GPU-only behaviour (streams, ``auto``, real digits at full size) run on the GPU only.
Same tolerances as the CPU engine (tests/test_exactness.py): float32 mean |diff| <= 1e-5 and
max <= 1e-3 of the data range at every t, float64 max <= 1e-9."""

import numpy as np
import pytest
import torch

from cases import assert_float32_close, build, draw, mnist_digits, queries

import patchmosaic as pm
from patchmosaic import _core
from patchmosaic.ops import engines

RANGE = 2.0
SEEDS = list(range(48))
from cuda_emulation import dev, needs_gpu  # noqa: E402,F401  (the CUDA-or-emulator fixture)




def oracle(case, x):
    return build(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels, backend="torch")


def on_gpu(case, x, dtype, dev, **kw):
    m = build(case, dtype)
    xq = torch.from_numpy(x.astype(dtype)).to(dev)
    out = m.denoise(xq, torch.from_numpy(case.t), case.k, labels=torch.from_numpy(case.qlabels), backend="cuda", **kw)
    return m, xq, out


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_matches_oracle(seed, dev):
    case = draw(seed)
    x = queries(case, seed)
    _, _, out = on_gpu(case, x, np.float32, dev)
    assert out.device.type == dev.type and out.dtype == torch.float32 and tuple(out.shape) == x.shape
    assert_float32_close(np.abs(out.cpu().double().numpy() - oracle(case, x)), case, RANGE)


@pytest.mark.parametrize("seed", SEEDS)
def test_float64_matches_oracle(seed, dev):
    case = draw(seed)
    x = queries(case, seed)
    _, _, out = on_gpu(case, x, np.float64, dev)
    assert np.abs(out.cpu().numpy() - oracle(case, x)).max() <= 1e-9 * RANGE, case


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("t", [0.02, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("machine,k", [("ELS_zeros", 5), ("ELS_circular", 3), ("LS", 3), ("IS", None)])
def test_float32_on_mnist(machine, k, t):
    cls, kw, train, x = mnist_digits(machine, t, 600, 4, slice(2, 26))
    ref = cls(train, **kw).denoise(x, t, k, backend="cpu")
    got = cls(torch.from_numpy(train).float().cuda(), **kw).denoise(torch.from_numpy(x).float().cuda(), t, k)
    err = np.abs(got.cpu().double().numpy() - ref)
    assert err.mean() <= 1e-5 * RANGE and err.max() <= 1e-3 * RANGE, (err.mean(), err.max())


@pytest.mark.parametrize("C,k", [(1, 7), (1, 13), (3, 15)])
def test_query_patches_resident_or_gathered_per_tile(C, k, dev, monkeypatch):
    # the item's 64 query patches are kept in shared memory when they fit the budget
    # (PATCHMOSAIC_CUDA_QUERY_SMEM_KB, default 48: C k^2 = 49 and 169 float32 elements do, 675 do not)
    # and gathered again with every key tile otherwise (budget 0): the same products in the same order
    rng = np.random.default_rng(5)
    train = rng.uniform(-1, 1, (12, C, 20, 20))
    x = rng.standard_normal((3, C, 20, 20))
    t = np.array([0.05, 0.3, 1.0])
    ref = pm.ELS(train).denoise(x, t, k, backend="torch")
    m = pm.ELS(torch.from_numpy(train).float().to(dev))
    xq = torch.from_numpy(x).float().to(dev)
    got = m.denoise(xq, t, k, backend="cuda")
    err = np.abs(got.cpu().double().numpy() - ref)
    assert err.mean() <= 1e-5 * RANGE and err.max() <= 1e-3 * RANGE, (err.mean(), err.max())
    monkeypatch.setenv("PATCHMOSAIC_CUDA_QUERY_SMEM_KB", "0")
    assert torch.equal(m.denoise(xq, t, k, backend="cuda"), got)


def test_conditional_batches_large_canvas_and_provenance(dev):
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (40, 3, 12, 12))
    labels = np.arange(40) % 4
    x = rng.standard_normal((6, 3, 40, 36))
    t = np.array([0.05, 0.2, 0.4, 0.6, 0.8, 1.0])
    ql = np.array([0, 1, 2, 3, 1, 0])
    cpu = pm.ELS(train, labels)
    ref, pref = cpu.denoise(x, t, 5, labels=ql, return_provenance=True)
    gpu = pm.ELS(torch.from_numpy(train).to(dev), torch.from_numpy(labels))
    got, pgot = gpu.denoise(torch.from_numpy(x).to(dev), t, 5, labels=torch.from_numpy(ql).to(dev),
                            return_provenance=True, backend="cuda")
    assert got.device.type == dev.type and pgot.image.device.type == dev.type
    assert np.abs(got.cpu().numpy() - ref).max() <= 1e-9 * RANGE
    same = (pgot.image.cpu().numpy() == pref.image) & (pgot.row.cpu().numpy() == pref.row)
    assert same.mean() == 1.0
    assert np.abs(pgot.share.cpu().numpy() - pref.share).max() <= 1e-9


@pytest.mark.cuda
@needs_gpu
def test_auto_picks_cuda_for_cuda_tensors_and_runs_on_the_current_stream():
    rng = np.random.default_rng(4)
    train = torch.from_numpy(rng.uniform(-1, 1, (30, 1, 16, 16)).astype(np.float32)).cuda()
    x = torch.randn(4, 1, 16, 16, device="cuda")
    m = pm.ELS(train)
    assert pm.ops.library._engine(x, "auto", 1) is engines.CUDA
    ref = m.denoise(x, 0.3, 7)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = x * 1.0  # ordered on s before the machine's kernels
        out = m.denoise(y, 0.3, 7)
    s.synchronize()
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="needs CUDA inputs"):
        m.denoise(x.cpu(), 0.3, 7, backend="cuda")


@pytest.mark.cuda
@needs_gpu
def test_entry_points_exist():
    assert _core.has_cuda and all(hasattr(_core, f"{op}_{p}_cuda") for op in ("local", "ideal")
                                  for p in ("forward", "backward"))


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_backward_matches_the_cpu_engine(seed, dev):
    """The CUDA backward pass (query and t gradients) on the drawn cases. float64: against the CPU engine to
    1e-9 of the largest gradient (t-gradients: plus 1e-10 absolute, the rounding left where a one-hot
    posterior makes the true gradient ~0). float32: each engine against the float64 gradient, to
    max(10 lam, 1e-3) of the largest one plus 1e-5 absolute (gradient units, grad_out ~ N(0, 1)), lam the
    float32 logits' relative rounding of test_gradients.test_float32_gradients_agree_with_float64. The two float32 engines are not compared with
    each other: they round differently where one contracts products into FMAs (the AVX2 CPU variant), and
    near a one-hot posterior (gradients ~1e-6) that difference is of the size of the gradient itself."""
    case = draw(seed, times=[0.05, 0.1, 0.3, 0.6, 1.0])
    x = queries(case, seed)
    g = np.random.default_rng(seed).standard_normal(x.shape)
    grads = {}
    for dtype in (np.float64, np.float32):
        for backend, device in (("cpu", torch.device("cpu")), ("cuda", dev)):
            m = build(case, dtype)
            xq = torch.tensor(x.astype(dtype), device=device, requires_grad=True)
            tq = torch.tensor(case.t, dtype=torch.float64, device=device, requires_grad=True)
            out = m.denoise(xq, tq, case.k, labels=torch.from_numpy(case.qlabels).to(device), backend=backend)
            gx, gt = torch.autograd.grad(out, (xq, tq), torch.from_numpy(g.astype(dtype)).to(device))
            grads[(dtype, backend)] = (gx.cpu().double(), gt.cpu())
    cx, ct = grads[(np.float64, "cpu")]
    ux, ut = grads[(np.float64, "cuda")]
    assert (cx - ux).abs().max() <= 1e-9 * cx.abs().max() + 1e-12, case
    assert (ct - ut).abs().max() <= 1e-9 * ct.abs().max() + 1e-10, case
    # lam: the float32 logit error relative to the weights (test_gradients), at the case's lowest t
    a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(float(np.min(case.t)))
    C = case.train.shape[1]
    d = C * (case.k * case.k if case.k else case.train.shape[2] * case.train.shape[3])
    lam = 6e-8 * (0.5 / b2) * np.abs(x).max() * np.sqrt(d) * a * np.abs(case.train).max() * np.sqrt(d)
    for backend in ("cpu", "cuda"):
        fx, _ = grads[(np.float32, backend)]
        assert (fx - cx).abs().max() <= max(10 * lam, 1e-3) * cx.abs().max() + 1e-5, (backend, case, lam)


@pytest.mark.parametrize("kind", ["IS", "ELS_zeros", "ELS_circular"])
def test_gradcheck_on_the_cuda_engine(kind, dev):
    rng = np.random.default_rng(7)
    train = torch.from_numpy(rng.uniform(-1, 1, (4, 2, 5, 6))).to(dev)
    m = {"IS": pm.IS, "ELS_zeros": pm.ELS, "ELS_circular": lambda tr: pm.ELS(tr, boundary="circular")}[kind](train)
    x = torch.tensor(rng.standard_normal((2, 2, 5, 6)), device=dev, requires_grad=True)
    t = torch.tensor([0.2, 0.6], dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: m.denoise(x, t, 3, backend="cuda"), (x, t), eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


@pytest.mark.cuda
@needs_gpu
def test_compile_fullgraph_on_the_gpu():
    """denoise, eps, score and a DDIM loop over the CUDA engine in one compiled graph, equal to eager."""
    rng = np.random.default_rng(8)
    train = torch.from_numpy(rng.uniform(-1, 1, (30, 1, 16, 16)).astype(np.float32)).cuda()
    m = pm.ELS(train)
    den = pm.MachineDenoiser(m, pm.KSchedule.ramp(7, 3, 5))

    def f(x):
        return m.denoise(x, 0.3, 5) + m.eps(x, 0.5, 3) + m.score(x, 0.7, 3) + pm.ddim(den, x, steps=5, progress=False)

    x = torch.randn(3, 1, 16, 16, device="cuda")
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=1e-5)


def test_the_backward_pass_fits_its_partial_sums_to_the_limit(dev, monkeypatch):
    """The CUDA backward pass keeps a whole patch of partial sums per slot (row and key range) and planned its key
    ranges as the forward does, for a few thousand thread blocks whatever the batch: at B = 1 a 3 x 64 x 64 ELS at
    k = 41 needed 9.2 GiB and was refused, with advice (split the batch) that could not help. Now the backward
    lengthens its ranges until the slots fit the limit (here set small through PATCHMOSAIC_CUDA_SCRATCH_BYTES):
    the same gradients; refused, naming the limit, only where one slot per row is too many."""
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.uniform(-1, 1, (40, 2, 6, 6))).to(dev)
    m = pm.ELS(train, boundary="circular")  # one class of 36 positions: 1,440 keys, in 512-key ranges by default
    g = torch.from_numpy(rng.standard_normal((2, 2, 6, 6))).to(dev)
    xs = torch.from_numpy(rng.standard_normal((2, 2, 6, 6))).to(dev)

    def grads():
        x = xs.clone().requires_grad_()
        t = torch.tensor([0.3, 0.7], dtype=torch.float64, device=dev, requires_grad=True)
        return torch.autograd.grad(m.denoise(x, t, 5, backend="cuda"), (x, t), g)

    want = grads()
    one_per_row = 2 * 6 * 6 * (2 * 5 * 5 + 2) * 8  # rows x (patch + 2) doubles: the fewest slots
    monkeypatch.setenv("PATCHMOSAIC_CUDA_SCRATCH_BYTES", str(int(1.5 * one_per_row)))
    for u, v in zip(want, grads()):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("PATCHMOSAIC_CUDA_SCRATCH_BYTES", str(one_per_row - 8))
    with pytest.raises(ValueError, match=r"CUDA backward pass of this call needs .* GiB of partial sums"):
        grads()
