"""Adapters that turn machines and trained networks into denoisers ``denoiser(x_t, t, labels) -> x0_hat``.

- :class:`MachineDenoiser`: a machine (IS, LS, ELS) plus a patch size or a k-schedule (one k per step,
  looked up by the step's own ``t``).
- :class:`NetworkDenoiser`: an eps-predicting network ``eps = net(t, x, labels)`` (any ``torch.nn.Module``
  or TorchScript module, ``t`` a ``(B,)`` float32 tensor) turned into ``x0_hat = (x - b eps) / a``.

Both also give ``eps(x, t, labels)`` and ``score(x, t, labels) = -eps / b``, which calibration compares.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .kschedule import KSchedule
from .schedules import ScheduleLike, get_schedule
from .validation import check_t


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

    def eps(self, x, t, labels=None):
        """The network's ``eps`` for ``x`` ``(B, C, H, W)`` at ``t`` (float or ``(B,)``), labels ``(B,)`` or None."""
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
                outs.append(self.net(tb, xb, lb).to(x.device, x.dtype))
        return torch.cat(outs)

    def __call__(self, x, t, labels=None):
        a, b = self._ab(t, x)
        return (x - b * self.eps(x, t, labels)) / a


def as_denoiser(obj, k=None, **kw):
    """A denoiser from a machine (with ``k``), a network module, or something that already is one."""
    from .machines import Machine

    if isinstance(obj, _Denoiser):
        return obj
    if isinstance(obj, Machine):
        return MachineDenoiser(obj, k, **kw)
    if isinstance(obj, torch.nn.Module) or isinstance(obj, torch.jit.ScriptModule):
        return NetworkDenoiser(obj, **kw)
    raise TypeError(f"cannot make a denoiser from {type(obj).__name__}")
