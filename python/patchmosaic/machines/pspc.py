"""PSPC, the patch set posterior composite of Niedoba, Zwartsenberg, Murphy and Wood ("Towards a Mechanistic
Explanation of Diffusion Model Generalization", ICML 2025; arXiv 2411.19339; reference code plai-group/pspc), exactly
as its definition reads, on the same-position engine -- and the soft relaxations of the Filtered Posterior Mean
Collections of Niedoba, Zwartsenberg and Wood (arXiv 2605.24192) on the same rows.

A *patch set* is a collection of crops ``C`` of the image. For each crop, the posterior mean of the crop against the
same crop of every training image (a softmax over all ``N`` images, over every channel of the crop's pixels),

    E[x_C | x_t] = sum_n w_n phi_n[C] / sum_n w_n,     w_n = exp(-sum_{e in C} (x_t[e] - a phi_n[e])^2 / (2 b^2)),

(the paper's ``-|z_C - x_C|^2 / (2 sigma^2)`` in the variance-exploding coordinates ``z = x_t / a``, ``sigma = b / a``)
and each element of the output the average of the posterior means of every crop that covers it
(``(sum_C C^T C)^-1 sum_C C^T E[x_C | x_t]``, the paper's eq. 11).

- ``mode="square"``: the crops are the ``p x p`` squares at every position where one fits inside the image (upper-left
  corners ``(i, j)``, ``0 <= i <= H - p``, ``0 <= j <= W - p``; none is padded), ``p`` any size from 1 to
  ``min(H, W)`` -- even sizes too: the squares are anchored at a corner, not centred (the published CIFAR-10 schedule
  starts at 32, the whole image, where PSPC is the ideal denoiser). The per-step parameter is ``p``
  (``denoise(x, t, p)``; a :class:`patchmosaic.KSchedule` with ``odd=False``).
- ``mode="flex"``: one crop per pixel, the input pixels a trained network's denoiser is most sensitive to at that
  pixel: the heatmap ``G`` of the pixel (the mean over noisy inputs of ``sum_c |d D(z)[c, pixel] / d z[c]|``, :class:
  `Heatmaps`, computed by :func:`patchmosaic.experiments.heatmaps.network_heatmaps`), normalised to sum 1, sorted
  ascending, and cut where the cumulative sum reaches ``1 - tau``: the entries at which it is at least ``1 - tau``
  are kept (the reference's rule), so the smallest are dropped while their mass stays below ``1 - tau`` and the kept
  mass is at least ``tau`` (an entry at which the sum reaches ``1 - tau`` exactly is kept: one entry more than the
  smallest set of mass ``tau`` then); ties in a stable order (the later of equal entries kept); ``tau = 1``: the
  whole image, the ideal denoiser). The per-step parameter
  is ``tau`` (``denoise(x, t, tau)``; a :class:`patchmosaic.ThresholdSchedule`); the heatmap is the one at the nearest
  of its times. A pixel that no crop covers (where the reference divides 0 by 0) gets one more crop, its own with the
  pixel added, whose mean is written at that pixel only: every other output element is the reference's.

Source: ``xflip=True`` adds the left-right mirror of every training image (the reference's default, EDM's
``--xflip``).

The filtered-posterior-mean axes on these rows (FPMC; our reading of the abstract -- its body could not be read --
stated in the README's table): *query precision* ``precision=s`` weights the distance of each crop element by a
Gaussian ``exp(-d^2 / (2 s^2))`` of its distance ``d`` in pixels from the crop's centre (square) or from the crop's
own pixel (flex), instead of 1; *response weights* ``response=s`` weights each crop's posterior mean in the average by
the same kind of Gaussian (``"patch"``, the default: uniform, PSPC's), or ``response="centre"`` (flex only) writes
each crop's mean at its own pixel only; the source axis is ``xflip``. With the defaults the machine is PSPC exactly.

Each row of the engine is one crop (its neighbourhood and its response the crop's elements, ops/aligned.py); the
composite average is :func:`patchmosaic.ops.composite`. Identical crops (every pixel's crop at ``tau = 1``) are
computed once and counted with their multiplicity.
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..io.files import write_npz
from ..schedules import ScheduleLike, nearest_step
from ..validation import outside_transforms
from .base import BACKEND_ARG, DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, docstring, traced_name
from .same_position import SamePosition

MODES = ("square", "flex")


class Heatmaps:
    """Per-pixel sensitivity heatmaps at several noise levels, what :class:`PSPC` in ``mode="flex"`` cuts its crops
    from: ``maps[l, y, x]`` is the ``H x W`` heatmap of output pixel ``(y, x)`` at time ``times[l]`` (non-negative;
    only its shape matters, each is normalised to sum 1).

    Args:
        times: ``(L,)`` times in ``(0, 1]``, distinct (a call at time ``t`` uses the nearest, the earlier on a tie).
        maps: ``(L, H, W, H, W)`` non-negative finite values, numpy or torch.
        info: a dict of how they were made (network, samples, seed...), kept in the file.
    """

    def __init__(self, times, maps, info: Optional[dict] = None):
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        m = torch.as_tensor(np.asarray(maps.detach().cpu() if torch.is_tensor(maps) else maps), dtype=torch.float64)
        if m.dim() != 5 or m.shape[0] != len(t) or tuple(m.shape[1:3]) != tuple(m.shape[3:5]) or len(t) < 1:
            raise ValueError(f"heatmaps must be (L, H, W, H, W) with one map set per time, got maps of shape "
                             f"{tuple(m.shape)} for {len(t)} times")
        if not np.all((t > 0) & (t <= 1)) or len(np.unique(t)) != len(t):
            raise ValueError(f"heatmap times must be distinct and lie in (0, 1], got {t.tolist()}")
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError("heatmaps must be finite and non-negative")
        self.times, self.maps, self.info = t, m.contiguous(), dict(info or {})
        self._time_list = tuple(float(v) for v in t)  # (for index under torch.compile)
        self._digest = None

    @property
    def size(self):
        return int(self.maps.shape[1]), int(self.maps.shape[2])

    def index(self, t: float) -> int:
        """The index of the time nearest to ``t`` (the first on a tie, as the schedules' steps: :func:`patchmosaic.
        schedules.nearest_step`)."""
        # (Python arithmetic, not numpy: under torch.compile dynamo would trace numpy into tensors, and the index
        # would be a value the graph cannot read)
        return nearest_step(self._time_list, t)

    @property
    def digest(self) -> str:
        """SHA-256 of the times and maps (what a machine's description records)."""
        if self._digest is None:
            h = hashlib.sha256(self.times.tobytes())
            h.update(self.maps.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def save(self, path: str) -> None:
        """Write ``times``, ``maps`` (float32) and ``info`` (JSON text) to an ``.npz``, atomically (readable without
        pickle)."""
        import json

        write_npz(path, times=self.times, maps=self.maps.numpy().astype(np.float32),
                  info=np.array(json.dumps(self.info, sort_keys=True)))

    @classmethod
    def load(cls, path: str) -> "Heatmaps":
        """Read a file written by :meth:`save` (``allow_pickle=False``: loading runs no code)."""
        import json

        from ..io.files import read_npz

        arrays = read_npz(path, "a heatmap file (written by Heatmaps.save)")
        if "times" not in arrays or "maps" not in arrays:
            raise ValueError(f"{path} is not a heatmap file: it needs arrays 'times' and 'maps'")
        try:
            info = json.loads(str(arrays["info"])) if "info" in arrays else {}
        except ValueError as e:
            raise ValueError(f"{path} is not a heatmap file: its 'info' is not JSON ({e})") from None
        return cls(arrays["times"], arrays["maps"].astype(np.float64), info)

    def __repr__(self):
        return f"Heatmaps({len(self.times)} times, {self.size[0]}x{self.size[1]})"


def heatmap_mask(G: torch.Tensor, tau: float) -> torch.Tensor:
    """The crops of PSPC-Flex from heatmaps ``G`` ``(R, HW)`` (one per row) at mass ``tau``: each row normalised to
    sum 1, its entries sorted ascending (stable), and those whose cumulative sum is ``>= 1 - tau`` kept (the
    reference's rule); boolean ``(R, HW)``. A row summing to 0 is a ValueError."""
    G = G.to(torch.float64)
    total = G.sum(1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError(f"a heatmap sums to 0 (row {int(torch.nonzero(total.reshape(-1) <= 0)[0])}): it holds no "
                         "sensitivity to cut a crop from")
    vals, order = torch.sort(G / total, dim=1, stable=True)
    keep_sorted = torch.cumsum(vals, 1) >= 1.0 - tau
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


_LIVE = weakref.WeakValueDictionary()  # handle -> PSPC
_HANDLES = itertools.count()


@torch.compiler.assume_constant_result
def _warm_flex_table(handle: int, tau: float, hm_index: int) -> bool:
    """Compute (or find) the flex table of the live :class:`PSPC` ``handle`` at mass ``tau`` and heatmap
    ``hm_index`` and set it as its attribute ``traced_name(tau, hm_index)`` (machines/base.py), for
    ``torch.compile``: called while a graph is traced (its arguments are constants there), so that the trace reads
    the table as constants of the graph (its crops come from data-dependent sorts and merges a graph cannot hold)."""
    m = _LIVE[handle]
    setattr(m, traced_name(tau, hm_index), m.cached_table(tau, hm_index))
    return True


def _gaussian(d2: torch.Tensor, s: Optional[float]) -> torch.Tensor:
    return torch.ones_like(d2) if s is None else torch.exp(-d2 / (2 * s * s))


def _check_width(value, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < np.inf:
        raise ValueError(f"{name} must be None or a Gaussian width in pixels (a finite number > 0), got {value!r}")
    return float(value)


PSPC_ARGS = """\
        mode: ``"square"`` (default): ``p x p`` crops at every position where one fits, ``denoise(x, t, p)``;
            ``"flex"``: a crop per pixel cut from ``heatmaps`` at mass ``tau``, ``denoise(x, t, tau)``.
        xflip: also use every training image mirrored left-right (the reference's default); default False.
        heatmaps: flex only (required there): a :class:`Heatmaps` of the training size, or the path of its
            ``.npz``.
        tau: flex only: the mass of a call without its own ``tau``, in ``(0, 1]`` (default 1).
        precision: None (default: every crop element counts 1, PSPC), or a Gaussian width ``s`` in pixels: the
            squared distance of a crop weights each element by ``exp(-d^2 / (2 s^2))``, ``d`` its distance from the
            crop's centre (square) or from the crop's pixel (flex) -- the soft query precision of FPMC.
        response: ``"patch"`` (default: every crop's posterior mean counts 1 at each of its elements, PSPC), a
            Gaussian width ``s``: the mean weighted by ``exp(-d^2 / (2 s^2))`` in the composite (soft response
            weights), or ``"centre"`` (flex only): each crop's mean written at its own pixel only.
"""


class PSPC(SamePosition):
    __doc__ = """The patch set posterior composite (Niedoba et al., ICML 2025): for every crop of a patch set, the
    posterior mean of the crop against the same crop of every training image; each output element the average of
    the means of the crops that cover it (see the module for the formulas, both modes and the FPMC options). Exact
    softmax over all training images; differentiable; any engine. Queries have the training size; provenance is per
    pixel, the winning image of the most confident crop that covers it.

    Args:
        images, labels: as for :class:`patchmosaic.LS`.
""" + PSPC_ARGS + ENGINE_ARGS + """
    Raises:
        ValueError for an unknown mode, a flex machine without heatmaps (or heatmaps of another size), a ``tau``
        outside ``(0, 1]``, a bad ``precision`` or ``response``; at a call, a ``p`` that is not an int in
        ``1..min(H, W)`` (TypeError for a non-integer), a ``tau`` outside ``(0, 1]``.
    """

    rule = None  # no key set of patches (the patch index and the key-sharded machines do not serve it)
    # default calibration candidates of a flex machine's tau
    threshold_candidates = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __init__(self, images, labels=None, mode: str = "square", xflip: bool = False, *, heatmaps=None,
                 tau: float = 1.0, precision: Optional[float] = None, response="patch",
                 schedule: ScheduleLike = "cosine_legacy", backend: str = "auto", n_threads: int = 0,
                 max_memory: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.precision = _check_width(precision, "precision")
        if isinstance(response, str):
            if response not in ("patch", "centre"):
                raise ValueError(f"response must be 'patch', 'centre' or a Gaussian width > 0, got {response!r}")
            if response == "centre" and mode == "square":
                raise ValueError("response='centre' needs a crop per pixel (mode='flex'); square crops fit only where "
                                 "they lie inside the image, so their centres miss the border (LS(response=...) has "
                                 "a centred square per pixel)")
            self.response = response
        else:
            self.response = _check_width(response, "response")
        self.tau = self._check_tau(tau)
        if mode == "square" and heatmaps is not None:
            raise ValueError("heatmaps= is for mode='flex' (square crops need none)")
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend=backend, n_threads=n_threads,
                         max_memory=max_memory)
        self.heatmaps = None
        if mode == "flex":
            if heatmaps is None:
                raise ValueError("PSPC(mode='flex') needs heatmaps= (a Heatmaps, or the .npz path of one: a trained "
                                 "network's sensitivity per pixel, patchmosaic.experiments.heatmaps.network_heatmaps)")
            hm = Heatmaps.load(heatmaps) if isinstance(heatmaps, (str, bytes)) or hasattr(heatmaps, "__fspath__") \
                else heatmaps
            if not isinstance(hm, Heatmaps):
                raise TypeError(f"heatmaps must be a Heatmaps or a path, got {type(heatmaps).__name__}")
            if hm.size != (self.H, self.W):
                raise ValueError(f"the heatmaps are for {hm.size[0]}x{hm.size[1]} images, the training images are "
                                 f"{self.H}x{self.W}")
            self.heatmaps = hm
        self._tables = {}
        self._handle = next(_HANDLES)  # its name in _LIVE, for a compiled graph's trace (_warm_flex_table)
        _LIVE[self._handle] = self

    # ----- the per-step parameter ------------------------------------------------------------------
    @property
    def parameter(self) -> str:
        """``"p"`` (square: a patch size, even sizes too) or ``"threshold"`` (flex: the mass ``tau``)."""
        return "p" if self.mode == "square" else "threshold"

    @staticmethod
    def _check_tau(tau) -> float:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise TypeError(f"tau must be a number in (0, 1], got {tau!r}")
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {float(tau)}")
        return float(tau)

    def check_p(self, p) -> int:
        """``p`` as an int in ``1..min(H, W)`` (a square crop must fit inside the image), or a TypeError /
        ValueError naming it."""
        if p is None:
            raise ValueError("PSPC(mode='square') needs a patch size p (an int from 1 to the image size)")
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise TypeError(f"patch size p must be an integer, got {p!r}")
        p = int(p)
        if not 1 <= p <= min(self.H, self.W):
            raise ValueError(f"patch size p must lie in 1..{min(self.H, self.W)} (a square crop must fit inside the "
                             f"{self.H}x{self.W} images), got {p}")
        return p

    def _value(self, k):
        return self.check_p(k) if self.mode == "square" else (self.tau if k is None else self._check_tau(k))

    def effective_k(self, k, Hq: int, Wq: int) -> int:
        return 0  # no centred patch: the crops are the machine's own (checked by _value)

    def keyset(self, Hq: int, Wq: int, k: int):
        raise ValueError("PSPC has no key set of patches (its rows are crops at the same position: neither the patch "
                         "index nor the key-sharded machines serve it)")

    def check_canvas(self, Hq: int, Wq: int, k=None) -> None:
        self._check_canvas(int(Hq), int(Wq))
        if k is not None:
            self._value(k)

    # ----- the rows ---------------------------------------------------------------------------------
    def crops(self, value, t: Optional[float] = None) -> torch.Tensor:
        """The crops of a call as a boolean ``(n_rows, H, W)`` tensor (before identical ones are merged): square at
        ``p = value`` (every upper-left corner in row-major order), or flex at ``tau = value`` and time ``t`` (one per
        pixel, row-major)."""
        H, W = self.H, self.W
        if self.mode == "square":
            p = self.check_p(value)
            out = torch.zeros(((H - p + 1) * (W - p + 1), H, W), dtype=torch.bool)
            r = 0
            for i in range(H - p + 1):
                for j in range(W - p + 1):
                    out[r, i : i + p, j : j + p] = True
                    r += 1
            return out
        if t is None:
            raise ValueError("flex crops depend on the time: pass t")
        G = self.heatmaps.maps[self.heatmaps.index(t)].reshape(H * W, H * W)
        return heatmap_mask(G, self._check_tau(value)).reshape(H * W, H, W)

    def _table(self, value, hm_index: Optional[int]):
        """``(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, resp_weight, row_pixel)`` of a call; cached."""
        if torch.compiler.is_compiling():
            if self.mode == "square":  # (traced: window_table is an op)
                return self._square_table(value)
            _warm_flex_table(self._handle, value, hm_index)  # constants of the graph, made while it is traced
            return getattr(self, traced_name(value, hm_index))
        return self.cached_table(value, hm_index)

    def cached_table(self, value, hm_index: Optional[int]):
        """The table of :meth:`_table` at a checked ``value`` (``p`` or ``tau``) and heatmap index (flex; None for
        square), from the cache (computed on a miss, outside any ``torch.func`` transform)."""
        key = (value, hm_index)
        if key not in self._tables:
            if len(self._tables) > 64:
                self._tables.clear()
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                self._tables[key] = self._square_table(value) if self.mode == "square" else \
                    self._flex_table(value, hm_index)
        return self._tables[key]

    def _square_table(self, p: int):
        H, W, C = self.H, self.W, self.C
        c = (p - 1) / 2
        u = torch.arange(p, dtype=torch.float64) - c
        d2 = u[:, None] ** 2 + u[None, :] ** 2
        w = _gaussian(d2, self.precision)
        ii, jj = torch.meshgrid(torch.arange(H - p + 1), torch.arange(W - p + 1), indexing="ij")
        anchors = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1).to(torch.int64)
        if self.response == "patch":
            hp, he, hw, rp, re, rwt = ops.window_table(w, torch.ones_like(d2), anchors, C, H, W)
        else:  # Gaussian responses formed per element (they underflow at small widths)
            hp, he, hw, rp, re, rwt = ops.window_table_log_response(w, -d2 / (2 * self.response ** 2), anchors, C, H, W)
        centre = (anchors[:, 0] + p // 2) * W + anchors[:, 1] + p // 2  # the pixel at (or past) each crop's centre
        return (hp, he, None if self.precision is None else hw, rp, re,
                None if self.response == "patch" else rwt, centre)

    def _flex_table(self, tau: float, l: int):
        H, W, C = self.H, self.W, self.C
        HW = H * W
        G = self.heatmaps.maps[l].reshape(HW, HW)
        mask = heatmap_mask(G, tau)  # (rows = pixels, HW)
        pix = torch.arange(HW)
        mult = torch.ones(HW, dtype=torch.float64)
        if self.precision is None and self.response == "patch":  # crops independent of their pixel: merge equal ones
            mask, inverse, counts = torch.unique(mask, dim=0, return_inverse=True, return_counts=True)
            mult = counts.to(torch.float64)
            first = torch.full((len(mask),), HW, dtype=torch.int64).scatter_reduce(0, inverse, pix, "amin")
            pix = first
        py, px = pix // W, pix % W
        qy, qx = torch.arange(HW) // W, torch.arange(HW) % W
        d2 = ((qy[None, :] - py[:, None]) ** 2 + (qx[None, :] - px[:, None]) ** 2).to(torch.float64)
        hood = mask.to(torch.float64) * _gaussian(d2, self.precision)
        if self.response == "centre":
            resp = torch.zeros_like(hood)
            resp[torch.arange(len(pix)), pix] = 1.0
        elif self.response == "patch":
            resp = mask.to(torch.float64) * mult[:, None]
        else:  # a Gaussian, formed per element (column) by ops.element_weights: an element far from every crop
            # centre that covers it is not left out by underflow
            r_i, c_i = torch.nonzero(mask, as_tuple=True)
            resp = torch.zeros_like(hood)
            resp[r_i, c_i] = ops.element_weights(c_i, -d2[r_i, c_i] / (2 * self.response ** 2) + torch.log(mult)[r_i],
                                                 HW)
        cover = resp.sum(0)
        lone = torch.nonzero(cover <= 0).reshape(-1)  # pixels no crop covers: the reference's 0 / 0
        if len(lone):  # one more row each: the pixel's own crop with the pixel added, written at the pixel only
            own = heatmap_mask(G[lone], tau)
            own[torch.arange(len(lone)), lone] = True
            d2l = ((qy[None, :] - qy[lone][:, None]) ** 2 + (qx[None, :] - qx[lone][:, None]) ** 2).to(torch.float64)
            extra = torch.zeros((len(lone), HW), dtype=torch.float64)
            extra[torch.arange(len(lone)), lone] = 1.0
            hood = torch.cat([hood, own.to(torch.float64) * _gaussian(d2l, self.precision)])
            resp = torch.cat([resp, extra])
            pix = torch.cat([pix, lone])
            mult = torch.cat([mult, torch.ones(len(lone), dtype=torch.float64)])
        rows = len(pix)
        hood_c = hood[:, None, :].expand(rows, C, HW).reshape(rows, C * HW)
        resp_c = resp[:, None, :].expand(rows, C, HW).reshape(rows, C * HW)
        hp, he, hw = ops.dense_table(hood_c)
        rp, re, rwt = ops.dense_table(resp_c)
        plain = self.precision is None
        uniform = (self.response == "patch" and bool((mult == 1).all()) and not len(lone)) or self.response == "centre"
        return hp, he, None if plain else hw, rp, re, None if uniform else rwt, pix

    # ----- calls ------------------------------------------------------------------------------------
    @docstring("""Posterior-mean estimate ``x0_hat``: the composite of the crops' posterior means (differentiable
        in ``x``, and in ``t`` through the softmax's coefficients; the crops at each ``t`` are constants).

        Args:
            x: noisy images ``x_t`` ``(B, C, H, W)``, float32 or float64, numpy or torch (CPU, or CUDA with the
                ``"cuda"`` or ``"torch"`` backend).
            t: diffusion time in ``(0, 1]``: a float, or one per image as a ``(B,)`` array or tensor.
            k: square: the patch size ``p``, an int in ``1..min(H, W)`` (required); flex: the mass ``tau`` in
                ``(0, 1]`` (None: the machine's).
            labels: ``(B,)`` integer class labels or None, as for :meth:`patchmosaic.ELS.denoise`.
            return_provenance: also return a :class:`patchmosaic.Provenance` per pixel (default False).
""" + BACKEND_ARG + """
        Returns:
            ``x0_hat`` with the shape and dtype of ``x`` (numpy for numpy ``x``); with ``return_provenance``, the
            pair ``(x0_hat, provenance)``.
        """)
    def denoise(self, x, t, k=None, labels=None, *, return_provenance: bool = False, backend: Optional[str] = None):
        value = self._value(k)
        is_numpy, xt, _, a, inv_2b2, t_check, lab, name, train, max_memory = \
            self._prepare_call(x, t, [None], labels, backend)
        B = xt.shape[0]
        self.check_request(xt.shape, xt.dtype, name, return_provenance, k=value if self.mode == "square" else None)
        if self.mode == "square":
            groups = [(None, list(range(B)))]
        else:
            times = self.call_times(t, B)
            idx = [self.heatmaps.index(tv) for tv in times]
            groups = [(l, [b for b in range(B) if idx[b] == l]) for l in sorted(set(idx))]
        out = torch.zeros_like(xt)
        key = torch.full((B, self.H, self.W), -1, dtype=torch.int64)
        share = torch.zeros((B, self.H, self.W), dtype=xt.dtype)
        for l, members in groups:
            table = self._table(value, l)
            whole = len(members) == B
            sel = None if whole else torch.as_tensor(members, device=xt.device)
            pick = (lambda v: v) if whole else (lambda v: None if v is None else v[sel.to(v.device)])  # noqa: E731
            o, kk, ss = self._rows_forward(train, pick(xt), pick(a), pick(inv_2b2), pick(t_check), pick(lab), table,
                                           return_provenance, name, max_memory)
            if whole:
                out = o
            else:
                out = out.index_put((sel,), o)
            if return_provenance:
                key[torch.as_tensor(members)] = kk
                share[torch.as_tensor(members)] = ss
        result = out.detach().numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(key, share, is_numpy)

    def _rows_forward(self, train, xt, a, inv, t_check, lab, table, provenance, name, max_memory):
        hp, he, hw, rp, re, rw, row_pixel = table
        lv, lp, li = self._label_tensors
        rows, _, img, share = ops.aligned_softmax(train, xt, a, inv, t_check, lab, lv, lp, li, hp, he, hw, rp, re,
                                                  provenance, name, self.n_threads, max_memory)
        D = self.C * self.H * self.W
        out = ops.composite(rows, re, ops.response_count(re, D, rw), xt.shape, rw)
        if not provenance:
            return out, None, None
        return out, *self._pixel_provenance(img, share, rp, re, row_pixel)

    def _pixel_provenance(self, img, share, resp_ptr, resp_elem, row_pixel):
        """Per pixel: the winning image of the crop with the largest winning share among those whose response
        covers the pixel (channel 0's elements), as ``key = image * H W + pixel`` (the training position is the
        pixel's own) and that share."""
        B = img.shape[0]
        HW = self.H * self.W
        re = resp_elem.cpu().numpy()
        row = np.repeat(np.arange(len(resp_ptr) - 1), np.diff(resp_ptr.cpu().numpy()))
        first = re < HW
        pix, row = re[first], row[first]
        im, sh = img.cpu().numpy(), share.detach().cpu().double().numpy()
        key = np.full((B, HW), -1, np.int64)
        best = np.zeros((B, HW))
        for b in range(B):
            order = np.lexsort((sh[b, row], pix))  # by pixel, then share ascending: the last of a pixel wins
            last = np.ones(len(order), bool)
            last[:-1] = pix[order][1:] != pix[order][:-1]
            win = order[last]
            p, r = pix[win], row[win]
            key[b, p] = np.where(im[b, r] >= 0, im[b, r] * HW + p, im[b, r])
            best[b, p] = sh[b, r]
        return (torch.from_numpy(key).reshape(B, self.H, self.W),
                torch.from_numpy(best).to(share.dtype).reshape(B, self.H, self.W))

    def denoise_ks(self, x, t, ks: Sequence, labels=None, *, backend: Optional[str] = None):
        """``x0_hat`` at several values of the parameter on the same noisy images (a calibration sweep):
        ``(K, B, C, H, W)``, ``out[j] = denoise(x, t, ks[j], labels)`` to float rounding, from one pass of the engine
        over the training images with every value's crops as rows. Forward only."""
        values = [self._value(v) for v in ks]
        if not values:
            raise ValueError("ks is empty: pass at least one value")
        is_numpy, xt, _, a, inv_2b2, t_check, lab, name, train, max_memory = \
            self._prepare_call(x, t, [None], labels, backend)
        B = xt.shape[0]
        idx = [None] * B if self.mode == "square" else [self.heatmaps.index(tv) for tv in self.call_times(t, B)]
        out = torch.zeros((len(values),) + tuple(xt.shape), dtype=xt.dtype, device=xt.device)
        lv, lp, li = self._label_tensors
        D = self.C * self.H * self.W
        with torch.no_grad():
            for l in sorted(set(idx), key=lambda v: -1 if v is None else v):
                members = [b for b in range(B) if idx[b] == l]
                sel = torch.as_tensor(members, device=xt.device)
                tables = [self._table(v, l) for v in values]
                hp, he, hw, rp, re, cuts = _concat(tables)
                rows = ops.aligned_softmax(train, xt[sel], a[sel], inv_2b2[sel],
                                           None if t_check is None else t_check[sel],
                                           None if lab is None else lab[sel.to(lab.device)], lv, lp, li, hp, he, hw,
                                           rp, re, False, name, self.n_threads, max_memory)[0]
                for j, (tb, (r0, r1)) in enumerate(zip(tables, cuts)):
                    rw = tb[5]
                    part = ops.composite(rows[:, r0:r1], tb[4], ops.response_count(tb[4], D, rw), xt[sel].shape, rw)
                    out[j, sel] = part
        return out.numpy() if is_numpy else out

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k=None) -> None:
        """Raise :class:`patchmosaic.ResourceError` if a call on a batch of ``shape`` would need more working
        memory than allowed (the engine's per-row states and the composite; at most ``H W`` crops of ``D``
        elements; a square call's table of crops)."""
        shape = tuple(int(v) for v in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a batch shape is (B, C, H, W) with positive sizes, got {shape}")
        D = self.C * self.H * self.W
        rows = self.H * self.W
        n_resp = rows * D if self.mode == "flex" else D * (self.H if k is None else self.check_p(k)) ** 2
        need = ops.aligned.aligned_bytes(shape, dtype, rows, min(n_resp, rows * D), self.N, backend, self.n_threads)
        if self.mode == "square":  # the crops' table, made before the call (a flex call's masks: its heatmaps')
            p = min(self.H, self.W) if k is None else self.check_p(k)
            need += ops.aligned.table_bytes((self.H - p + 1) * (self.W - p + 1), 2 * self.C * p * p)
        ops.checks.memory(need, f"PSPC.denoise on a batch of shape {shape}", self.max_memory)  # (compile-safe)

    def describe(self) -> dict:
        """What changes the machine's results: kind, data (mirrors included), schedule, mode, the FPMC options and
        the heatmaps (a hash)."""
        d = super().describe()
        d.update(mode=self.mode, tau=self.tau, precision=self.precision, response=self.response,
                 heatmaps=None if self.heatmaps is None else self.heatmaps.digest)
        return d

    def __repr__(self):
        extra = f", mode={self.mode!r}" + (", xflip=True" if self.xflip else "")
        if self.precision is not None:
            extra += f", precision={self.precision}"
        if self.response != "patch":
            extra += f", response={self.response!r}"
        return super().__repr__()[:-1] + extra + ")"


def _concat(tables):
    """Several element tables as one (their rows one after the other): ``(hood_ptr, hood_elem, hood_weight,
    resp_ptr, resp_elem, cuts)`` with ``cuts[j]`` the range of table ``j``'s responses in the op's output."""
    hps, hes, hws, rps, res, cuts = [], [], [], [], [], []
    h0 = r0 = 0
    weighted = any(t[2] is not None for t in tables)
    for hp, he, hw, rp, re, _, _ in tables:
        hps.append(hp[:-1] + h0)
        rps.append(rp[:-1] + r0)
        hes.append(he)
        res.append(re)
        if weighted:
            hws.append(torch.ones(len(he), dtype=torch.float64) if hw is None else hw)
        cuts.append((r0, r0 + len(re)))
        h0 += len(he)
        r0 += len(re)
    hp = torch.cat(hps + [torch.tensor([h0])])
    rp = torch.cat(rps + [torch.tensor([r0])])
    return hp, torch.cat(hes), torch.cat(hws) if weighted else None, rp, torch.cat(res), cuts


__all__ = ["PSPC", "Heatmaps", "heatmap_mask"]
