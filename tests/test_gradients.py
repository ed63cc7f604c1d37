"""Exact gradients of every machine: the engines' backward passes against finite differences.

- float64, both compiled engines' formula (CPU here; the CUDA engine in test_cuda.py) and the torch
  reference: ``torch.autograd.gradcheck`` of ``denoise`` with respect to the query and to ``t`` (atol 1e-7,
  rtol 1e-5 on central differences with eps 1e-6), for IS, LS, periodic ELS (inside and wrapped keys),
  boundary-aware ELS, with and without labels, and on a canvas larger than the training images.
- ``eps`` and ``score`` (which add an explicit ``x_t`` term) by gradcheck too.
- float32 against float64 (tolerance justified at test_float32_gradients_agree_with_float64).
- The Triton engine: float64 calls run on the CPU engine (gradcheck); float32 forward passes on its kernels, whose
  statistics the compiled engine's backward pass reads (tolerance: tests/triton_cases.py's TRITON_LAM times the
  float32 one, on fewer, smaller digits: its interpreter is slow).
"""

import numpy as np
import pytest
import torch

from cases import mnist_digits
from triton_cases import DEVICE, TRITON, TRITON_LAM

import patchmosaic as pm

GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-5)


def _machine(kind, train, labels=None):
    return {"IS": lambda: pm.IS(train, labels), "LS": lambda: pm.LS(train, labels),
            "ELS_zeros": lambda: pm.ELS(train, labels),
            "ELS_circular": lambda: pm.ELS(train, labels, boundary="circular"),
            "ELS_wrapped": lambda: pm.ELS(train, labels, boundary="circular", wrapped=True)}[kind]()


KINDS = ["IS", "LS", "ELS_zeros", "ELS_circular", "ELS_wrapped"]


@pytest.mark.parametrize("backend", ["cpu", "torch", TRITON])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_query_and_time(kind, conditional, backend):
    rng = np.random.default_rng(KINDS.index(kind) + 10 * conditional)
    train = rng.uniform(-1, 1, (6, 2, 5, 6))
    labels = np.array([0, 1, 2, 0, 1, 2]) if conditional else None
    m = _machine(kind, train, labels)
    x = torch.tensor(rng.standard_normal((2, 2, 5, 6)) * 0.7, requires_grad=True)
    t = torch.tensor([0.15, 0.55], dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([2, 0]) if conditional else None
    f = lambda x, t: m.denoise(x, t, 3, labels=lab, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, t), fast_mode=backend == "torch", **GRADCHECK)


@pytest.mark.parametrize("k", [3, 5])
def test_gradcheck_on_a_larger_canvas(k):
    """Boundary-aware ELS on a 9x10 canvas from 6x7 training images: every padding signature class."""
    rng = np.random.default_rng(20 + k)
    m = pm.ELS(rng.uniform(-1, 1, (4, 1, 6, 7)))
    x = torch.tensor(rng.standard_normal((1, 1, 9, 10)), requires_grad=True)
    t = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: m.denoise(x, t, k), (x, t), **GRADCHECK)


@pytest.mark.parametrize("t", [0.03, 0.3, 0.9])
def test_gradcheck_across_noise_levels(t):
    rng = np.random.default_rng(30)
    train = rng.uniform(-1, 1, (5, 1, 6, 6))
    m = pm.ELS(train)
    x0 = train[[1]] + 0.1 * rng.standard_normal((1, 1, 6, 6))
    a, b2 = pm.schedules.cosine_legacy.coefficients(t)
    x = torch.tensor(float(a) * x0 + np.sqrt(b2) * rng.standard_normal(x0.shape), requires_grad=True)
    tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, tt: m.denoise(x, tt, 3), (x, tt), **GRADCHECK)


@pytest.mark.parametrize("what", ["eps", "score"])
@pytest.mark.parametrize("kind", ["IS", "ELS_zeros"])
def test_eps_and_score_gradients(kind, what):
    """eps = (x - a x0) / b and score = (a x0 - x) / b^2: the explicit x and t terms and the machine's."""
    rng = np.random.default_rng(40)
    m = _machine(kind, rng.uniform(-1, 1, (5, 1, 5, 6)))
    x = torch.tensor(rng.standard_normal((2, 1, 5, 6)), requires_grad=True)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    fn = getattr(m, what)
    assert torch.autograd.gradcheck(lambda x, t: fn(x, t, 3), (x, t), **GRADCHECK)
    # and they are what the formula says, gradients included
    x0 = m.denoise(x, t, 3)
    a, b2 = m.schedule.torch_coefficients(t)
    a, b2 = a[:, None, None, None], b2[:, None, None, None]
    ref = (x - a * x0) / b2.sqrt() if what == "eps" else (a * x0 - x) / b2
    g = torch.randn_like(x)
    got = torch.autograd.grad(fn(x, t, 3), (x, t), g)
    want = torch.autograd.grad(ref, (x, t), g)
    for u, v in zip(got, want):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)


def test_float32_gradients_agree_with_float64():
    """float32 gradients against float64 on real digits, every machine, t from 0.02 to 1.

    Tolerance: the float32 engines form each logit from float32 dot products, so a logit carries an
    absolute error up to about lam = eps32 * s * |Q| |a K| (s = 1 / (2 b^2), |Q|, |K| the largest patch
    norms, eps32 = 6e-8). A logit error moves the softmax weights by that much relative to each other, and
    the query gradient 2 s sum_q w_q delta_q (a K_q - Q) by about lam times its own size: we allow
    10 lam of the largest float64 gradient, plus 1e-5 (gradient units: grad_out ~ N(0, 1)) for the
    rounding of the sums. lam is 9e-4 at t = 0.02 and 4e-6 at t = 0.3 for these digits; measured
    errors are 0.1-3.5 lam. The t-gradient -sum_q w_q delta_q |Q - a K_q|^2 cancels strongly (sum_q w_q delta_q
    = 0): at small t the float32 logit error is of the order of the spread of the distances it weighs, so
    float32 t-gradients are asserted (to 1e-3) only at t >= 0.3; use float64 for t-gradients at low noise.
    """
    float32_gradients("auto", 150, slice(4, 24), [0.02, 0.05, 0.3, 1.0], 1.0)


@pytest.mark.parametrize("backend", [TRITON])
def test_float32_gradients_agree_with_float64_on_fewer_digits(backend):
    """The same on 20 digits cropped to 10x10 at t = 0.02 and 0.3, with the Triton engine's float32 forward pass
    (tolerance: TRITON_LAM times the float32 one). With so few digits IS's posterior is one-hot for the second query
    (its float64 t-gradient is 5e-5 of the first's, and the CPU engine's float32 one misses it by 5x, as the
    Triton engine's does): t-gradients are compared where they exceed 1e-3 of the batch's largest."""
    float32_gradients(backend, 20, slice(9, 19), [0.02, 0.3], TRITON_LAM, t_floor=1e-3)


def float32_gradients(backend, n_train, crop, times, lam_factor, t_floor=None):
    """float32 against float64 gradients on ``n_train`` digits cropped to ``crop`` (tolerance above, with ``lam``
    times ``lam_factor``); the float32 calls on ``backend``, the float64 ones on the default engine. ``t_floor``:
    compare t-gradients only where they exceed that fraction of the largest (None: all of them)."""
    size = crop.stop - crop.start
    g = np.random.default_rng(1).standard_normal((2, 1, size, size))
    for machine, k in [("ELS_zeros", 5), ("ELS_circular", 3), ("LS", 3), ("IS", None)]:
        for t in times:
            cls, kw, train, x = mnist_digits(machine, t, n_train, 2, crop)
            res = {}
            for dt in (torch.float64, torch.float32):
                be = backend if dt == torch.float32 else "auto"
                dev = DEVICE if be == "triton" else torch.device("cpu")
                m = cls(torch.from_numpy(train).to(dev, dt), **kw)
                xx = torch.from_numpy(x).to(dev, dt).requires_grad_(True)
                tt = torch.tensor([t, t], dtype=torch.float64, device=xx.device, requires_grad=True)
                res[dt] = [v.cpu() for v in torch.autograd.grad(m.denoise(xx, tt, k, backend=be), (xx, tt),
                                                                torch.from_numpy(g).to(xx.device, dt))]
            gx64, gt64 = res[torch.float64]
            gx32, gt32 = res[torch.float32]
            a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(t)
            if machine == "IS":
                qn = np.sqrt((x ** 2).reshape(2, -1).sum(1)).max()
                kn = np.sqrt((train ** 2).reshape(len(train), -1).sum(1)).max()
            else:
                d = k * k
                qn = np.abs(x).max() * np.sqrt(d)
                kn = np.sqrt(d)  # pixels in [-1, 1]
            lam = lam_factor * 6e-8 * (0.5 / b2) * qn * a * kn
            err = (gx32.double() - gx64).abs().max().item()
            assert err <= 10 * lam * gx64.abs().max().item() + 1e-5, (machine, t, err, lam)
            if t >= 0.3 and gt64.abs().max() > 1e-6:
                keep = gt64.abs() > (0 if t_floor is None else t_floor) * gt64.abs().max()
                assert ((gt32 - gt64).abs() / gt64.abs())[keep].max() <= 1e-3, (machine, t)


def test_sensitivity_is_the_jacobian_row_and_local():
    rng = np.random.default_rng(50)
    m = pm.ELS(rng.uniform(-1, 1, (5, 2, 7, 8)))
    x = torch.tensor(rng.standard_normal((2, 2, 7, 8)))
    J = m.sensitivity(x, 0.4, 3, pixel=(3, 5))
    assert J.shape == (2, 2, 2, 7, 8)
    full = torch.autograd.functional.jacobian(lambda v: m.denoise(v, 0.4, 3), x)  # (B, C, H, W, B, C, H, W)
    for b in range(2):
        assert torch.allclose(J[b], full[b, :, 3, 5, b], atol=1e-12)
    outside = torch.ones(7, 8, dtype=torch.bool)
    outside[2:5, 4:7] = False
    assert J[..., outside].abs().max() == 0 and J[..., ~outside].abs().max() > 0
    # numpy in, numpy out
    Jn = m.sensitivity(x.numpy(), 0.4, 3, pixel=(3, 5))
    assert isinstance(Jn, np.ndarray) and np.allclose(Jn, J.numpy())
    with pytest.raises(ValueError, match="outside"):
        m.sensitivity(x, 0.4, 3, pixel=(7, 0))


def test_second_derivatives_and_the_index_say_they_are_not_implemented():
    rng = np.random.default_rng(60)
    m = pm.ELS(rng.uniform(-1, 1, (4, 1, 5, 5)))
    x = torch.tensor(rng.standard_normal((1, 1, 5, 5)), requires_grad=True)
    (g,) = torch.autograd.grad(m.denoise(x, 0.3, 3).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        g.sum().backward()


def test_denoise_of_a_tensor_that_requires_grad_has_a_grad_fn():
    rng = np.random.default_rng(70)
    for m in (pm.ELS(rng.uniform(-1, 1, (4, 1, 5, 5))), pm.IS(rng.uniform(-1, 1, (4, 1, 5, 5)))):
        x = torch.randn(1, 1, 5, 5, requires_grad=True)
        assert m.denoise(x, 0.3, 3).grad_fn is not None
        assert m.denoise(x.detach(), 0.3, 3).grad_fn is None


# ------------------------------------------------------------------------------ torch.func transforms
# Every machine of the registry under the transforms researchers use: forward mode (torch.func.jvp, jacfwd,
# torch.autograd.forward_ad) against central differences (eps 1e-6 in float64: truncation ~1e-12 times the
# third derivative, rounding ~1e-10; atol 1e-6, rtol 1e-5 leave a margin of 100 over what was measured, 5e-9),
# reverse mode (torch.func.grad, vjp, jacrev) equal to torch.autograd's (the same backward pass: exactly), vmap
# equal to a loop over the slices, and second derivatives refused in every mode.
FD = dict(atol=1e-6, rtol=1e-5)


def _registry_call(name, labelled=False, seed=80):
    """A float64 machine of the registry, its call ``f(x, t)`` and inputs ``x`` (2, 1, 8, 8), ``t`` (2,)."""
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(rng.uniform(-1, 1, (20, 1, 8, 8)))
    m = pm.make_machine(name, train, np.arange(20) % 3 if labelled else None)
    p = {"k": 5, "threshold": 0.01, "p": 4, None: None}[pm.MACHINES[name].parameter]
    labels = torch.tensor([0, 2]) if labelled else None

    def f(x, t):
        return m.denoise(x, t, p, labels)

    x = torch.from_numpy(rng.standard_normal((2, 1, 8, 8)))
    return f, x, torch.tensor([0.45, 0.6], dtype=torch.float64)


def _central(f, x, v, eps=1e-6):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("name", list(pm.MACHINES))
def test_forward_mode_agrees_with_finite_differences(name, labelled):
    f, x, t = _registry_call(name, labelled)
    rng = np.random.default_rng(81)
    v, dt = torch.from_numpy(rng.standard_normal(x.shape)), torch.tensor([1.0, -0.5], dtype=torch.float64)
    out, tan = torch.func.jvp(lambda x: f(x, t), (x,), (v,))
    assert_same_primal(name, out, f(x, t))
    fd = _central(lambda x: f(x, t), x, v)
    assert fd.abs().max() > 1e-3  # a tangent to find, not zeros on both sides
    assert torch.allclose(tan, fd, **FD), (tan - fd).abs().max()
    # torch.autograd.forward_ad: the same rule
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_out = fwAD.unpack_dual(f(fwAD.make_dual(x, v), t))
    assert dual_out.tangent is not None and torch.equal(dual_out.tangent, tan)
    # with respect to t (the smoothed denoiser's draws are seeded by t, so its function jumps between times:
    # its tangent is that of the draws held fixed, as its reverse-mode gradient)
    _, tan_t = torch.func.jvp(lambda t: f(x, t), (t,), (dt,))
    if name == "scfdm":
        ref = torch.func.jacrev(lambda t: f(x, t))(t) @ dt
    else:
        ref = _central(lambda t: f(x, t), t, dt)
    assert torch.allclose(tan_t, ref, **FD), (tan_t - ref).abs().max()


def assert_same_primal(name, got, want):
    """A transformed call's output against the plain call's: bitwise, as every machine runs the same kernels both
    ways, except the smoothed denoiser, whose plain CPU call runs a compiled forward-only kernel and a transformed
    one torch operations (machines/smoothed.py): the same function, equal to float64 rounding (1e-12)."""
    if name == "scfdm":
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(pm.MACHINES))
def test_reverse_mode_transforms_equal_autograd(name):
    f, x, t = _registry_call(name, seed=82)
    w = torch.from_numpy(np.random.default_rng(83).standard_normal(x.shape))
    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = torch.autograd.grad((f(xr, tr) * w).sum(), (xr, tr))
    fx, ft = torch.func.grad(lambda x, t: (f(x, t) * w).sum(), argnums=(0, 1))(x, t)
    assert torch.equal(fx, gx) and torch.equal(ft, gt)
    out, pull = torch.func.vjp(f, x, t)
    vx, vt = pull(w)
    assert_same_primal(name, out, f(x, t))
    assert torch.equal(vx, gx) and torch.equal(vt, gt)
    # jacrev (a vmap of the backward pass) against jacfwd (a vmap of the forward-mode rule): the same Jacobian
    one = x[:1]
    Jr = torch.func.jacrev(lambda x: f(x, t[:1]))(one)
    Jf = torch.func.jacfwd(lambda x: f(x, t[:1]))(one)
    assert Jr.shape == (1, 1, 8, 8, 1, 1, 8, 8) and Jr.abs().max() > 1e-3
    assert torch.allclose(Jr, Jf, rtol=0, atol=1e-10), (Jr - Jf).abs().max()


@pytest.mark.parametrize("name", list(pm.MACHINES))
def test_vmap_equals_a_loop_over_the_slices(name):
    f, x, t = _registry_call(name, labelled=True, seed=84)
    X = torch.stack([x, x.flip(-1), 0.5 * x])  # (3, 2, 1, 8, 8): three batches of two
    got = torch.func.vmap(lambda x: f(x, t))(X)
    want = torch.stack([f(X[i], t) for i in range(3)])
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    # per-sample gradients: vmap of grad, each slice's own gradient
    g = torch.func.vmap(torch.func.grad(lambda x: f(x, t).square().sum()))(X)
    for i in range(3):
        xi = X[i].clone().requires_grad_()
        (gi,) = torch.autograd.grad(f(xi, t).square().sum(), xi)
        assert torch.allclose(g[i], gi, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["datalocal", "pca", "scfdm"])
def test_vmap_over_times_that_choose_the_computation_is_refused(name):
    """DataLocal and PCA-locality pick their neighbourhood, the smoothed denoiser its draws, by the value of t: a t
    batched by vmap is refused with a TypeError naming the cause (an ELS's t, a coefficient of the softmax, is
    batched)."""
    f, x, t = _registry_call(name, seed=85)
    T = torch.stack([t, t.flip(0)])
    with pytest.raises(TypeError, match="cannot be batched by torch.func.vmap"):
        torch.func.vmap(lambda t: f(x, t))(T)
    g, x, t = _registry_call("els", seed=85)
    got = torch.func.vmap(lambda t: g(x, t))(T)
    assert torch.allclose(got, torch.stack([g(x, T[0]), g(x, T[1])]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["els", "ls", "is", "datalocal", "pca"])
def test_second_derivatives_are_refused_in_every_mode(name):
    f, x, t = _registry_call(name, seed=86)
    one, t1 = x[:1], t[:1]
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.hessian(lambda x: f(x, t1).sum())(one)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.jacrev(torch.func.grad(lambda x: f(x, t1).sum()))(one)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.jvp(torch.func.grad(lambda x: f(x, t1).sum()), (one,), (one,))
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.jacfwd(lambda x: torch.func.jvp(lambda y: f(y, t1), (x,), (one,))[1])(one)
    xr = one.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xr, t1).sum(), xr, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        g.sum().backward()


@pytest.mark.parametrize("op", ["local", "aligned", "ideal"])
def test_derivatives_with_respect_to_the_training_images_are_refused(op):
    """The ops differentiate in the queries and the coefficients only: a gradient or tangent asked of the training
    images is refused by name (never the zero a missing formula would give)."""
    rng = np.random.default_rng(87)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 5, 5)))
    x = torch.from_numpy(rng.standard_normal((2, 1, 5, 5)))
    m = {"local": pm.ELS, "aligned": pm.LS, "ideal": pm.IS}[op](train)

    def f(train):
        m.train_as = lambda dtype, device: train  # the op reads the training images the machine hands it
        return m.denoise(x, 0.5, 3)

    with pytest.raises(NotImplementedError, match="no derivative with respect to the training images"):
        torch.func.jvp(f, (train,), (torch.ones_like(train),))
    with pytest.raises(NotImplementedError, match="no derivative with respect to the training images"):
        torch.func.grad(lambda tr: f(tr).sum())(train)


def test_the_patch_index_refuses_every_derivative():
    rng = np.random.default_rng(88)
    pytest.importorskip("faiss")
    idx = pm.PatchIndex(pm.ELS(rng.uniform(-1, 1, (8, 1, 6, 6)).astype(np.float32)), 3, kind="flat", progress=False)
    x = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
    f = lambda x: idx.denoise(x, 0.5).x0  # noqa: E731
    for transform in (lambda: torch.func.jvp(f, (x,), (x,)), lambda: torch.func.grad(lambda x: f(x).sum())(x)):
        with pytest.raises(NotImplementedError, match="no gradient"):
            transform()


@pytest.mark.parametrize("case", ["els_weights", "els_per_pixel", "ls_mask", "datalocal_field_per_pixel"])
def test_forward_mode_with_neighbourhood_masks(case):
    """The masked paths of both engines' forward-mode rules (a weighted mask shared by every pixel, one mask per
    pixel) against central differences (tolerance as above)."""
    rng = np.random.default_rng(89)
    train = torch.from_numpy(rng.uniform(-1, 1, (12, 2, 7, 7)))
    x = torch.from_numpy(rng.standard_normal((2, 2, 7, 7)))
    v = torch.from_numpy(rng.standard_normal(x.shape))
    weights = torch.from_numpy(rng.uniform(0, 1, (5, 5)))
    weights[2, 2] = 1.0
    per_pixel = torch.from_numpy(rng.uniform(0, 1, (7, 7, 3, 3)) > 0.4)
    per_pixel[..., 1, 1] = True
    f = {"els_weights": lambda x: pm.ELS(train).denoise(x, 0.4, 5, patch_mask=weights),
         "els_per_pixel": lambda x: pm.ELS(train).denoise(x, 0.4, 3, patch_mask=per_pixel),
         "ls_mask": lambda x: pm.LS(train).denoise(x, 0.4, 5, patch_mask=weights > 0.5),
         "datalocal_field_per_pixel": lambda x: pm.DataLocal(train, per_pixel=True, weighting="field")
         .denoise(x, 0.4, 3)}[case]
    _, tan = torch.func.jvp(f, (x,), (v,))
    fd = _central(f, x, v)
    assert fd.abs().max() > 1e-3
    assert torch.allclose(tan, fd, **FD), (tan - fd).abs().max()


def test_the_backward_pass_runs_on_the_forward_passs_engine(monkeypatch):
    """A backward pass reads its forward pass's statistics, so it must run on the forward's engine. With
    backend='auto' on a GPU a measured table picks the forward's engine by the call's shape, and the backward asked
    without it, so it could get another engine. Simulated on the CPU by a table whose best for these calls is the
    torch reference: every engine choice of the forward and the backward passes is recorded, and each backward asks
    with the forward's shape and gets the forward's engine (and the gradients are the reference's own)."""
    from patchmosaic.ops import engines, library, reference

    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 4, 4)))
    idx = pm.ops.LabelIndex.from_labels(None).tensors()
    x = torch.from_numpy(rng.standard_normal((2, 1, 4, 4)) * 0.7).requires_grad_()
    a = torch.tensor([0.8, 0.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.5, 0.7], dtype=torch.float64, requires_grad=True)
    qc, kc, qp, kp = pm.machines.keysets.class_maps("els_zeros", 4, 4, 4, 4, 3)

    def grads(op):
        out = op(x, a, s)
        return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum(),
                                   (x, a, s))

    ideal = lambda backend: lambda x, a, s: pm.ops.ideal_softmax(train, x, a, s, None, None, *idx, False, backend, 0,
                                                                 0)[0]
    local = lambda backend: lambda x, a, s: pm.ops.local_softmax(train, x, a, s, None, None, *idx, qc, kc, qp, kp, 3,
                                                                 False, backend, 0, 0)[0]
    want = {name: grads(op("torch")) for name, op in (("ideal", ideal), ("local", local))}
    orig, chosen = library._engine, []

    def measured(query, backend, C, shape=None):  # a table whose best for these calls is the torch reference
        if backend == "auto":
            engine = reference if shape is not None else engines.CPU
            chosen.append((shape, engine))
            return engine
        return orig(query, backend, C, shape)

    monkeypatch.setattr(library, "_engine", measured)
    for name, op in (("ideal", ideal), ("local", local)):
        chosen.clear()
        got = grads(op("auto"))
        assert len(chosen) == 2 and chosen[0] == chosen[1] and chosen[0][1] is reference, (name, chosen)
        for u, v in zip(want[name], got):
            assert torch.allclose(u, v, rtol=1e-9, atol=1e-12), name
