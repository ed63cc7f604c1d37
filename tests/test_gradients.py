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
