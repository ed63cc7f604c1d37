"""Adapters that turn machines and trained networks into denoisers ``denoiser(x_t, t, labels) -> x0_hat``.

- :class:`MachineDenoiser`: a machine (IS, LS, ELS) plus a patch size or a k-schedule (one k per step,
  looked up by the step's own ``t``).
- :class:`NetworkDenoiser`: an eps-predicting network ``eps = net(t, x, labels)`` (any ``torch.nn.Module``
  or TorchScript module, ``t`` a ``(B,)`` float32 tensor) turned into ``x0_hat = (x - b eps) / a``.
- :class:`IndexedDenoiser`: a machine and k-schedule that uses FAISS patch indexes where they are accurate.

Each owns its noise schedule (``.schedule``), which the samplers, calibration and comparison use. All
also give ``eps(x, t, labels)`` and ``score(x, t, labels) = -eps / b``, which calibration compares.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from ..index import PatchIndex
from ..machines import Machine
from ..schedules import ScheduleLike, get_schedule
from ..validation import check_t
from .kschedule import KSchedule


class _Denoiser:
    schedule = None

    def __call__(self, x, t, labels=None):
        raise NotImplementedError

    def eps(self, x, t, labels=None):
        """Predicted noise ``(x - a x0_hat) / b``, shape of ``x`` ``(B, C, H, W)``."""
        a, b = self._ab(t, x)
        return (x - a * self(x, t, labels)) / b

    def score(self, x, t, labels=None):
        """Score ``-eps / b = (a x0_hat - x) / b^2``, shape of ``x``."""
        return -self.eps(x, t, labels) / self._ab(t, x)[1]

    def _ab(self, t, x):
        """``a`` and ``b`` at ``t`` (float or one per image), shaped to broadcast against ``x``."""
        if isinstance(t, float):
            a, b2 = self.schedule.scalar_coefficients(t)
            return a, b2 ** 0.5
        a, b2 = self.schedule.coefficients(check_t(t, x.shape[0]))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (torch.as_tensor(a, dtype=x.dtype, device=x.device).reshape(shape),
                torch.as_tensor(np.sqrt(b2), dtype=x.dtype, device=x.device).reshape(shape))


class MachineDenoiser(_Denoiser):
    """``machine.denoise(x, t, k(t), labels)``; ``k`` is an odd int or a :class:`KSchedule`.

    With ``keep_provenance=True`` the provenance of the latest call is kept in ``.provenance``.
    """

    def __init__(self, machine, k: Union[int, KSchedule, None] = None, *, backend: Optional[str] = None,
                 keep_provenance: bool = False):
        self.machine = machine
        self.schedule = machine.schedule
        if machine.local and k is None:
            raise ValueError(f"{type(machine).__name__} needs a patch size k or a k-schedule")
        self.k = k
        self.backend = backend
        self.keep_provenance = keep_provenance
        self.provenance = None

    def k_at(self, t: float) -> Optional[int]:
        """The patch size used at time ``t`` (None for IS)."""
        if self.k is None or not self.machine.local:
            return None
        return self.k.k_at(t) if isinstance(self.k, KSchedule) else int(self.k)

    def describe(self) -> dict:
        """What changes this denoiser's results: the machine's description and the patch sizes."""
        d = {"type": "MachineDenoiser", "machine": self.machine.describe()}
        if isinstance(self.k, KSchedule):
            d["ks"], d["times"] = list(map(int, self.k.ks)), list(map(float, self.k.times))
        elif self.k is not None and self.machine.local:
            d["k"] = int(self.k)
        return d

    def __call__(self, x, t, labels=None):
        out = self.machine.denoise(x, t, self.k_at(float(t)), labels=labels,
                                   return_provenance=self.keep_provenance, backend=self.backend)
        if self.keep_provenance:
            out, self.provenance = out
        return out


class NetworkDenoiser(_Denoiser):
    """An eps-predicting network as a denoiser. ``net(t, x, labels)`` with ``t`` of shape ``(B,)``.

    The network runs on its own device (that of its first parameter, or ``device``) in ``dtype``
    (float32 by default) under ``torch.no_grad``, in chunks of at most ``batch_size`` images; the result
    comes back on the device and in the dtype of ``x``. ``conditional=False`` drops labels before the call.
    """

    def __init__(self, net, schedule: ScheduleLike = "cosine_legacy", *, device=None, batch_size: int = 256,
                 dtype: torch.dtype = torch.float32, conditional: Optional[bool] = None):
        if not callable(net):
            raise TypeError(f"net must be callable as net(t, x, labels), got {type(net).__name__}")
        self.net = net
        self.schedule = get_schedule(schedule)
        if device is None:
            params = list(net.parameters()) if hasattr(net, "parameters") else []
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.conditional = conditional
        if hasattr(net, "eval"):
            net.eval()

    def describe(self) -> dict:
        """What changes this denoiser's results: the network's weights (a hash), schedule, dtype, labels use."""
        from ..io.runstate import module_digest

        return {"type": "NetworkDenoiser", "weights": module_digest(self.net),
                "schedule": self.schedule.describe(), "dtype": str(self.dtype), "conditional": self.conditional}

    def eps(self, x, t, labels=None):
        """The network's ``eps`` for ``x`` ``(B, C, H, W)`` at ``t`` (float or ``(B,)``), labels ``(B,)`` or None.
        A ValueError if the network returns another shape than ``x`` or non-finite values."""
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        B = x.shape[0]
        tv = torch.from_numpy(check_t(t, B))
        if labels is not None and self.conditional is not False:
            lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if lab.numel() != B:
                raise ValueError(f"labels must hold one label per image ({B}), got {lab.numel()}")
        else:
            lab = None
        outs = []
        with torch.no_grad():
            for s in range(0, B, self.batch_size):
                e = slice(s, s + self.batch_size)
                xb = x[e].to(self.device, self.dtype)
                tb = tv[e].to(self.device, torch.float32)
                lb = None if lab is None else lab[e].to(self.device)
                e_b = self.net(tb, xb, lb)
                if not torch.is_tensor(e_b) or tuple(e_b.shape) != tuple(xb.shape):
                    raise ValueError(f"the network returned {type(e_b).__name__} of shape "
                                     f"{tuple(getattr(e_b, 'shape', ()))} for an input of shape {tuple(xb.shape)}; "
                                     "an eps network returns one noise estimate per input pixel")
                if not bool(torch.isfinite(e_b).all()):
                    raise ValueError(f"the network returned NaN or infinite values at t = {float(tb[0]):g} "
                                     "(check its weights)")
                outs.append(e_b.to(x.device, x.dtype))
        return torch.cat(outs)

    def __call__(self, x, t, labels=None):
        a, b = self._ab(t, x)
        return (x - b * self.eps(x, t, labels)) / a


class IndexedDenoiser:
    """A machine + k-schedule denoiser that uses patch indexes where they are provably accurate.

    Every call with ``t <= t_max`` first runs the approximate machine (``m`` nearest keys per pixel)
    and then, by ``mode``:

    - ``"pixel"`` (default): every pixel whose bound exceeds ``tol`` (data units) is recomputed by the
      exact engine (only those pixels, image by image: ``Machine.denoise(pixels=...)``); the others
      keep the index value, so every output pixel is within ``tol`` of the exact machine (conditional
      on retrieval for IVF indexes). When more than ``max_exact_fraction`` of the pixels need the
      exact engine, the whole call runs exactly (cheaper than image by image).
    - ``"step"``: the index result is used only if the largest bound of the whole call is within
      ``tol``; otherwise the exact engine reruns the whole call.
    - ``"measured"``: the index result is used at every ``t <= t_max`` whatever its bound (which is
      still recorded). For data where the worst-case bound is loose (on MNIST millions of near-blank
      patches are nearly tied, so it is vacuous), choose ``t_max`` by measured agreement with
      :func:`calibrate_t_max` on calibration seeds.

    Calls with ``t > t_max`` run exactly. ``record`` lists, per call, ``t``, ``k``, the path used
    (``index``, ``mixed`` or ``exact``), the fraction of pixels computed exactly, the bound of the kept
    index pixels (max, mean) and the seconds taken. Indexes are built once per ``k`` and cached in
    memory, and on disk under ``cache_dir`` (one folder per k) when given.
    """

    MODES = ("pixel", "step", "measured")

    def __init__(self, machine, k, *, tol: float = 1e-3, m: int = 64, t_max: float = 1.0, mode: str = "pixel",
                 max_exact_fraction: float = 0.5, cache_dir: Optional[str] = None, canvas=None, progress: bool = False, **index_kw):
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.exact = MachineDenoiser(machine, k)
        self.machine, self.schedule = machine, machine.schedule
        self.tol, self.m, self.t_max, self.mode = float(tol), int(m), float(t_max), mode
        self.max_exact_fraction = float(max_exact_fraction)
        self.cache_dir, self.canvas, self.progress, self.index_kw = cache_dir, canvas, progress, index_kw
        self.indexes: Dict[int, PatchIndex] = {}
        self.record: List[dict] = []

    def index(self, k: int) -> PatchIndex:
        if k not in self.indexes:
            folder = None if self.cache_dir is None else os.path.join(self.cache_dir, f"k{k}")
            self.indexes[k] = PatchIndex.open(folder, self.machine, k, self.canvas, progress=self.progress,
                                              **self.index_kw)
        return self.indexes[k]

    def __call__(self, x, t, labels=None):
        k = self.exact.k_at(float(t))
        t0 = time.perf_counter()
        entry = {"t": float(t), "k": k}
        if float(t) > self.t_max:
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        res = self.index(k).denoise(x, t, labels, self.m)
        bound = res.bound
        x0 = res.x0.to(x.dtype) if torch.is_tensor(x) else res.x0.numpy()
        if self.mode == "measured":
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            return self._finish(entry, t0, x0, "index", 0.0)
        bad = bound > self.tol
        if self.mode == "step" or not bool(bad.any()) or float(bad.float().mean()) > self.max_exact_fraction:
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            if not bool(bad.any()):
                return self._finish(entry, t0, x0, "index", 0.0)
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        kept = bound[~bad]
        entry.update(bound_max=float(kept.max()) if len(kept) else 0.0,
                     bound_mean=float(kept.mean()) if len(kept) else 0.0)
        xt = torch.as_tensor(x)
        out = torch.as_tensor(x0).clone()
        tt = np.broadcast_to(np.asarray(t, dtype=np.float64), (xt.shape[0],))
        for b in np.nonzero(bad.reshape(len(bad), -1).any(1).numpy())[0]:
            lab = None if labels is None else torch.as_tensor(np.asarray(labels))[b : b + 1]
            mask = bad[b]
            ex = self.machine.denoise(xt[b : b + 1], float(tt[b]), k, lab, pixels=mask)
            out[b][:, mask.to(out.device)] = ex[0][:, mask.to(ex.device)].to(out.dtype)
        frac = float(bad.float().mean())
        return self._finish(entry, t0, out if torch.is_tensor(x) else out.numpy(), "mixed", frac)

    def _finish(self, entry, t0, out, used, exact_fraction):
        entry.update(used=used, exact_fraction=exact_fraction, seconds=time.perf_counter() - t0)
        self.record.append(entry)
        return out


def as_denoiser(obj, k=None, **kw):
    """A denoiser from a machine (with ``k``), a network module, or something that already is one."""
    if isinstance(obj, _Denoiser):
        return obj
    if isinstance(obj, Machine):
        return MachineDenoiser(obj, k, **kw)
    if isinstance(obj, torch.nn.Module) or isinstance(obj, torch.jit.ScriptModule):
        return NetworkDenoiser(obj, **kw)
    raise TypeError(f"cannot make a denoiser from {type(obj).__name__}")
