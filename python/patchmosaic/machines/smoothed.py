"""The smoothed closed-form denoiser (Scarvelis, Borde and Solomon, "Closed-Form Diffusion Models", TMLR 2025;
arXiv 2310.12395; the Analytic Diffusion Studio's ``scfdm``): the ideal (empirical posterior-mean) denoiser
averaged over Gaussian perturbations of its input,

    x0_hat(x_t) = (1/M) sum_m IS(x_t + s eps_m),        eps_m ~ N(0, I),

which smooths the closed-form score (the average of the posterior means, converted to a score with the
unperturbed ``x_t``, is the average of the scores). The expectation over ``eps`` has no closed form (a softmax of
Gaussian-perturbed logits), so it is a Monte Carlo average over ``M`` draws; each ideal denoiser inside is exact
over all training images (the Studio's takes a FAISS top-200 of each perturbed query). The draws share the
images: one float64 product of the perturbed queries with the images gives every distance by expansion (exact to
float64 rounding: the terms are of the order of the data, not of their differences), another the weighted means,
on the device of the query; autograd differentiates them. Weights below e^-60 of a draw's largest are left out
(below float64 rounding, and no exp among the denormals); where the draws keep few images, as at all but the
highest noise levels, the means are taken over those alone. On the CPU a call that nothing differentiates,
transforms or traces runs the same function as one compiled forward-only kernel (``ops.expansion_means``: the
logits in float64 from the images as stored, float32 read at half the bytes, then one weighted sum of the images per
query: the mean of its draws' means), equal to the torch operations to float64 rounding. The draws are seeded:
a call's noise is a function of the machine's seed, the call's time and the query's shape, so the same call gives
the same result. A query image's draws depend on its place in the batch and on the batch's shape: the same image
in another batch gets other draws (another Monte Carlo estimate), so a sample is reproduced with the same batch
(``compare`` refuses to resume a run with another batch size).

``s`` is constant in the variance-preserving coordinates of the project (``coordinates="vp"``, as the Studio's
``smoothing_std``; its settings: 1 for MNIST, 0.1 for the other data sets) or constant in the paper's interpolant
coordinates ``z = x_t / (a + b)`` (``coordinates="interpolant"``: ``s_vp = s (a + b)``).
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from .. import ops
from ..schedules import ScheduleLike
from ..validation import check_memory, outside_transforms
from .base import BACKEND_ARG, CALL_ARGS, DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, Machine, docstring


# A weight below e^-60 of its row's largest (each under 1e-26 of it: N of them below float64 rounding for any N under
# 10^9) is left out, so that no exp lands among the denormals (below e^-708: 50-100x slower on a CPU)
CUT = 60.0
# the means over the images some draw keeps, gathered, when they are at most this share of the images (at all but
# the highest noise levels a draw keeps a few of them: one product with every image instead of two)
SPARSE = 0.1


def weighted_means(logits: torch.Tensor, XT: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted means of the images ``XT`` (``(D, N)``) by the rows of ``logits`` (``(R, N)``): ``(R, D)``,
    the weights below e^-CUT of a row's largest left out. Eager and outside the ``torch.func`` transforms, the means
    are taken over the images that some row keeps when they are few (a gather: its size depends on the values); the
    same function either way, differentiable in both."""
    d = logits - logits.amax(1, keepdim=True).detach()
    keep = d >= -CUT
    if not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(d) or d.is_meta):
        cols = keep.any(0).nonzero().squeeze(1)
        if cols.numel() <= SPARSE * d.shape[1]:
            w = torch.where(keep[:, cols], d[:, cols], float("-inf")).exp()
            return (w @ XT[:, cols].T) / w.sum(1, keepdim=True)
    w = torch.where(keep, d, float("-inf")).exp()
    return (XT @ w.T).T / w.sum(1, keepdim=True)


def plain(*tensors) -> bool:
    """Whether nothing differentiates, transforms or traces through ``tensors`` (no autograd graph, forward-mode
    tangent, ``torch.func`` wrapper or ``torch.compile`` trace): then the compiled, forward-only means apply."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
               and not t.requires_grad and fwAD.unpack_dual(t).tangent is None for t in tensors)


class SmoothedCFDM(Machine):
    __doc__ = """The smoothed closed-form denoiser (Scarvelis et al.): the ideal score machine averaged over ``M``
    seeded Gaussian perturbations of its input, ``x0_hat(x) = mean_m IS(x + s eps_m)`` (see the module), each IS
    exact over all training images. Queries have the training size; ``k`` is ignored (no patch); no provenance
    (each draw has its own winner). It computes in float64 on the query's device (``backend`` only chooses and
    checks that device; ``n_threads``: the compiled CPU kernel's threads, 0 for all).

    Args:
""" + DATA_ARGS + """\
        smoothing: the perturbation's standard deviation ``s >= 0`` (default 0.1; 0 is IS).
        samples: the Monte Carlo draws ``M >= 1`` per call (default 10, the Studio's).
        coordinates: ``"vp"`` (default): ``s`` in the project's ``x_t = a x0 + b eps`` coordinates (the Studio's);
            ``"interpolant"``: ``s`` in the paper's ``z = x_t / (a + b)`` coordinates.
        temperature: the softmax temperature ``tau > 0`` (default 1).
        seed: the seed of the draws (default 0).
""" + SOURCE_ARGS + ENGINE_ARGS

    local = False
    converts_images = False  # it reads its images as stored (_images_stored, _images64)
    has_provenance = False  # each draw has its own winning image

    def __init__(self, images, labels=None, smoothing: float = 0.1, samples: int = 10, *, coordinates: str = "vp",
                 temperature: float = 1.0, seed: int = 0, xflip: bool = False, schedule: ScheduleLike = "cosine_legacy",
                 backend: str = "auto", n_threads: int = 0, max_memory: Optional[int] = None):
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < np.inf:
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"samples must be a positive int (draws per call), got {samples!r}")
        if coordinates not in ("vp", "interpolant"):
            raise ValueError(f"coordinates must be 'vp' or 'interpolant', got {coordinates!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0 \
                or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend=backend, n_threads=n_threads,
                         max_memory=max_memory)
        self.smoothing, self.samples, self.coordinates = float(smoothing), int(samples), coordinates
        self.temperature, self.seed = float(temperature), int(seed)
        self._default_threads = ops.engines.CPU.module.max_threads()  # read here: not from inside a compiled graph

    def noise(self, times, shape) -> torch.Tensor:
        """The draws of a call at ``times`` (one float per query image) on a batch of ``shape``: ``(M, B, C, H, W)``
        float64 on the CPU, from a generator per image seeded by the machine's seed, the image's time, its index and the
        shape, so that a call is reproducible whatever came before it."""
        with outside_transforms():  # constants of the call: the same draws under torch.func's vmap
            return ops.seeded_draws([float(v) for v in times], self.seed, self.samples, [int(v) for v in shape])

    @docstring("""Posterior-mean estimate ``x0_hat``: the average of ``samples`` exact IS calls on the perturbed
        queries (differentiable in ``x`` and ``t`` with the draws held fixed: they are seeded by ``t``, so the
        function itself jumps between times).

        Args:
""" + CALL_ARGS + BACKEND_ARG + """
        Returns:
            ``x0_hat`` with the shape, dtype and array type (numpy or torch) of ``x``.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None):
        if return_provenance:
            raise ValueError("SmoothedCFDM has no provenance: each of its draws has its own winning image")
        is_numpy, xt, _, a, inv_2b2, t_check, lab, name, _, max_memory = \
            self._prepare_call(x, t, [k], labels, backend)
        B = xt.shape[0]
        ops.checks.values(xt, "x", t_check, a, inv_2b2)
        self.check_request(xt.shape, xt.dtype)  # (before the draws: M B D float64 values)
        if torch.compiler.is_compiling():  # the times read when the graph runs (ops.seeded_normal)
            tt = (t if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)).detach().to(torch.float64).reshape(-1)
            eps = ops.seeded_normal(tt.expand(B).cpu(), self.seed, self.samples, list(xt.shape))
        else:
            eps = self.noise(self.call_times(t, B), xt.shape)
        dev = xt.device
        s = torch.full((B,), self.smoothing, dtype=torch.float64, device=dev)
        if self.coordinates == "interpolant":
            b = torch.sqrt(0.5 / inv_2b2.to(dev))  # (attached: s depends on t, and so does the gradient in t)
            s = s * (a.to(dev) + b)
        eps = eps.to(dev)  # drawn in float64: the same draws in any dtype
        M = self.samples
        xs = (xt.to(torch.float64)[None] + s.reshape(1, B, 1, 1, 1) * eps).reshape(M * B, -1)
        aa, inv = a.to(dev).repeat(M), (inv_2b2.to(dev) / self.temperature).repeat(M)
        if lab is not None:
            ops.checks.labels_known(lab, *self._label_tensors, self.N)  # an unknown label: a ValueError naming it
        # every draw's logits for every image by expansion, in float64: -(|q|^2 - 2 a <q, phi> + a^2 |phi|^2) /
        # (2 b^2 tau) less its row constant |q|^2 (exact to float64 rounding), the weights, the means
        c1, c2 = 2 * aa * inv, aa * aa * inv
        if dev.type == "cpu" and plain(xs, c1, c2):  # nothing to differentiate: one compiled call
            X, sq = self._images_stored()
            rows, images = (None, None) if lab is None else (lab.repeat(M), self.labels)
            # the draws of query b are the rows b, B + b, 2B + b, ...: their means averaged as one weighted sum
            out, _ = ops.expansion_means(X, sq, xs, c1, c2, rows, images, CUT, self.n_threads, groups=B)
        else:  # torch operations (autograd, torch.func, torch.compile, CUDA): one product, the weights, the means
            XT, sq = self._images64(dev)
            logits = c1[:, None] * (xs @ XT) - c2[:, None] * sq[None, :]
            if lab is not None:
                same = torch.from_numpy(self.labels).to(dev)[None, :] == lab.to(dev).repeat(M)[:, None]
                logits = logits.masked_fill(~same, float("-inf"))
            out = weighted_means(logits, XT).reshape(M, B, -1).mean(0)
        out = out.reshape(xt.shape).to(xt.dtype)
        return out.detach().numpy() if is_numpy else out

    def _images_stored(self):
        """The training images as stored (float32 or float64; other types in float64), one row each (``(N, D)``),
        and their squared norms in float64, for the compiled CPU path (made once)."""
        if "flat" not in self._train_cache:
            X = self.images.reshape(self.N, -1)
            if X.dtype not in (torch.float32, torch.float64):
                X = X.to(torch.float64)
            sq = torch.cat([(c.to(torch.float64) ** 2).sum(1) for c in X.split(1024)])
            self._train_cache["flat"] = (X.contiguous(), sq)
        return self._train_cache["flat"]

    def _images64(self, device):
        """The training images in float64 on ``device``, one column each (``(D, N)``: both products of a call read it
        along its rows, a third faster than the ``(N, D)`` layout's transposed product), and their squared norms
        (made once per device)."""
        key = ("flat64T", str(device))
        if key not in self._train_cache:
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                XT = self.images.reshape(self.N, -1).to(device=device, dtype=torch.float64).T.contiguous()
                self._train_cache[key] = (XT, (XT * XT).sum(0))
        return self._train_cache[key]

    def effective_k(self, k, Hq: int, Wq: int) -> int:
        return 0  # no patch

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        """Raise :class:`patchmosaic.ResourceError` if a call on a batch of ``shape`` would need more working
        memory than allowed: the float64 images, the perturbed queries, their distances and weights to every image
        and their outputs, and the compiled kernel's buffers (per thread, and the blocks' sums)."""
        shape = tuple(int(v) for v in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a batch shape is (B, C, H, W) with positive sizes, got {shape}")
        rows, D = shape[0] * self.samples, int(np.prod(shape[1:]))
        # the compiled kernel's buffers: per thread a segment of 16 images and their logits; the blocks' (at most 32)
        # weighted sums, one per query, queries in chunks that keep them within 64 MiB (at least one at a time)
        threads = self.n_threads if self.n_threads > 0 else self._default_threads
        blocks = min(32 * shape[0] * (D + 1), max(2 ** 23, 32 * (D + 1)))
        need = 8 * (self.N * D + self.N + 3 * rows * D + 3 * rows * self.N + threads * 16 * (D + rows) + blocks)
        ops.checks.memory(need, f"SmoothedCFDM.denoise on a batch of shape {shape} ({self.samples} draws)", self.max_memory)

    def describe(self) -> dict:
        """What changes the machine's results: its kind, data, schedule, and the smoothing's settings and seed."""
        d = super().describe()
        d.update(smoothing=self.smoothing, samples=self.samples, coordinates=self.coordinates,
                 temperature=self.temperature, seed=self.seed)
        return d
