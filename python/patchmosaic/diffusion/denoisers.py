"""Adapters that turn machines and trained networks into denoisers ``denoiser(x_t, t, labels) -> x0_hat``.

- :class:`MachineDenoiser`: a machine (IS, LS, ELS) plus a patch size or a k-schedule (one k per step,
  looked up by the step's own ``t``).
- :class:`NetworkDenoiser`: an eps-predicting network ``eps = net(t, x, labels)`` (any ``torch.nn.Module``
  or TorchScript module, ``t`` a ``(B,)`` float32 tensor) turned into ``x0_hat = (x - b eps) / a``.
- :class:`IndexedDenoiser`: a machine and k-schedule that uses FAISS patch indexes where they are accurate.

Each owns its noise schedule (``.schedule``), which the samplers, calibration and comparison use. The first
two also give ``eps(x, t, labels)`` and ``score(x, t, labels) = -eps / b``, which calibration compares. Each
takes ``x`` as ``Machine.denoise`` does (numpy or torch, float32 or float64) and answers in the same array type.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import time
import warnings
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from .. import ops
from ..index import KINDS, PatchIndex
from ..index.patch_index import INDEX_OPTION_ARGS, check_canvas_size
from ..machines import Machine
from ..machines.base import docstring
from ..networks import network_channels, network_classes
from ..ops.checks import check_cuda_inputs
from ..ops.masks import check_patch_mask, crop_patch_mask
from ..schedules import ScheduleLike, get_schedule
from ..validation import check_k, check_t, check_time
from .inputs import as_images, as_labels, like_input
from .kschedule import KSchedule, ThresholdSchedule


def _call_args(times: str = "a float") -> str:
    """The Args entries of a denoiser call (``__call__``, ``eps``, ``score``); ``times``: the forms of ``t``."""
    return f"""\
            x: noisy images ``x_t`` ``(B, C, H, W)``, float32 or float64, numpy or torch.
            t: diffusion time in ``(0, 1]`` (1: pure noise): {times}.
            labels: ``(B,)`` integer class labels (numpy, torch, a list, or one int for all), or None
                (default: unconditional).
"""


def _architecture(net) -> dict:
    """What a network computes besides its weights: its class, its config (this package's networks: padding,
    widths, ...) and, for TorchScript, a hash of its code (two networks of equal weights may differ in these)."""
    d = {"class": type(net).__qualname__}
    config = getattr(net, "config", None)
    if isinstance(config, dict):
        d["config"] = config
    if isinstance(net, torch.jit.ScriptModule):  # its whole graph, submodules inlined (their padding, constants)
        try:
            d["code"] = hashlib.sha256(str(net.inlined_graph).encode()).hexdigest()
        except (AttributeError, RuntimeError):
            pass
    return d


def full_description(denoiser) -> dict:
    """Everything that changes a denoiser's samples (weights and data hashes included), for fingerprints."""
    fn = getattr(denoiser, "describe", None)
    return fn() if callable(fn) else {"type": type(denoiser).__name__}


def _one_time(t, who: str) -> float:
    """``t`` as one float (a number, or an array or tensor of one value); a TypeError naming ``t`` otherwise."""
    one = t.numel() == 1 if torch.is_tensor(t) else isinstance(t, np.ndarray) and t.size == 1
    if isinstance(t, bool) or not (isinstance(t, numbers.Real) or one):
        raise TypeError(f"{who} takes t as one float in (0, 1], got {type(t).__name__}"
                        f"{f' of shape {tuple(t.shape)}' if hasattr(t, 'shape') else ''}")
    return float(t)


class _Denoiser:
    schedule = None

    def __call__(self, x, t, labels=None):
        raise NotImplementedError

    @docstring("""Predicted noise ``eps = (x - a x0_hat) / b`` (``a = sqrt(alpha_bar(t))``,
        ``b = sqrt(1 - alpha_bar(t))`` of the denoiser's schedule).

        Args:
""" + _call_args() + """
        Returns:
            ``eps`` with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def eps(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        a, b = self._ab(t, xt)
        return like_input((xt - a * self(xt, t, labels)) / b, is_numpy)

    @docstring("""Score ``-eps / b = (a x0_hat - x) / b^2``.

        Args:
""" + _call_args() + """
        Returns:
            the score with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def score(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        return like_input(-self.eps(xt, t, labels) / self._ab(t, xt)[1], is_numpy)

    def _ab(self, t, x):
        """``a`` and ``b`` at ``t`` (float or one per image), shaped to broadcast against ``x``; a ValueError where
        the schedule leaves no noise (``b = 0``: eps and the score undefined)."""
        if isinstance(t, float):
            a, b2 = self.schedule.scalar_coefficients(check_time(t))
            if not b2 > 0:
                raise ValueError(f"the schedule gives alpha_bar(t) = 1 at t = {t:g}: no noise to remove")
            return a, b2 ** 0.5
        tt = check_t(t, x.shape[0])
        a, b2 = self.schedule.coefficients(tt)
        noiseless = ~(np.asarray(b2) > 0)
        if bool(noiseless.any()):
            raise ValueError(f"the schedule gives alpha_bar(t) = 1 at t = {float(np.asarray(tt)[noiseless][0]):g}: no "
                             "noise to remove")
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (torch.as_tensor(a, dtype=x.dtype, device=x.device).reshape(shape),
                torch.as_tensor(np.sqrt(b2), dtype=x.dtype, device=x.device).reshape(shape))


class MachineDenoiser(_Denoiser):
    """A machine as a denoiser: ``denoiser(x, t, labels) = machine.denoise(x, t, k(t), labels)``, ``k(t)`` the
    machine's per-step parameter (``machine.parameter``): the patch size of a local machine (``"k"``, odd; ``"p"``,
    any size: PSPC's square crops), the threshold of :class:`patchmosaic.PCALocality` or the mass ``tau`` of
    PSPC-Flex (``"threshold"``), none for IS and the Wiener filter.

    Args:
        machine: a machine (:class:`patchmosaic.IS`, :class:`patchmosaic.LS`, :class:`patchmosaic.ELS`, ...); its
            noise schedule becomes the denoiser's.
        k: the parameter: for a patch size an int (every step; odd for ``"k"``), a :class:`KSchedule` (one k per
            step, looked up by the step's own ``t``), or None (IS and Wiener only, which have no patch); for a
            threshold a number in ``(0, 1]``, a :class:`ThresholdSchedule`, or None (the machine's own).
        backend: the engine of every call (``"auto"``, ``"cpu"``, ``"cuda"``, ``"torch"``); None (default)
            keeps the machine's.
        keep_provenance: keep the :class:`patchmosaic.Provenance` of the latest call in ``.provenance``
            (default False).
        patch_mask: machines with a patch size only: the neighbourhood of every call instead of the square
            ``k x k`` patch, a ``(k, k)`` mask shared by every pixel or ``(Hq, Wq, k, k)`` one per query pixel,
            boolean or non-negative weights (see :meth:`patchmosaic.ELS.denoise`); with it ``k`` may be None (the
            mask's size), and a k-schedule crops the mask to each step's size (the mask's centre ``k x k``).
            None (default): square patches.
    """

    def __init__(self, machine, k: Union[int, float, KSchedule, ThresholdSchedule, None] = None, *,
                 backend: Optional[str] = None, keep_provenance: bool = False, patch_mask=None):
        if not isinstance(machine, Machine) and not hasattr(machine, "denoise"):
            raise TypeError(f"machine must be a machine (pm.ELS, pm.LS, pm.IS, ...), got {type(machine).__name__}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        self.machine = machine
        self.schedule = machine.schedule
        self.patch_mask = None
        param = machine.parameter
        if param in ("k", "p") and k is not None and not isinstance(k, (KSchedule, ThresholdSchedule)):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # (not truncated to an int)
                raise TypeError(f"{type(machine).__name__}: the patch size {param} must be an int or a KSchedule, "
                                f"got {k!r}")
            if param == "k":
                check_k(k, 0, 0)
            elif k < 1:
                raise ValueError(f"{type(machine).__name__}: the patch size p must be a positive int, got {k}")
        if patch_mask is not None:
            if param != "k":
                what = "IS compares whole images" if not machine.local else "its neighbourhoods are its own"
                raise ValueError(f"patch_mask: {type(machine).__name__} has no patch ({what}; it takes no "
                                 "patch_mask)")
            self.patch_mask = check_patch_mask(patch_mask)
            if k is None:
                k = int(self.patch_mask.shape[-1])
            k_top = max(k.ks) if isinstance(k, KSchedule) else int(k)
            if k_top > self.patch_mask.shape[-1]:
                what = "the k-schedule reaches" if isinstance(k, KSchedule) else "the patch size is"
                raise ValueError(f"{what} k = {k_top}, larger than the {self.patch_mask.shape[-1]}"
                                 f"x{self.patch_mask.shape[-1]} patch_mask")
        if param == "k" and k is None:
            raise ValueError(f"{type(machine).__name__} needs a patch size k or a k-schedule")
        if param == "p" and k is None:
            raise ValueError(f"{type(machine).__name__} needs a patch size p or a k-schedule (KSchedule(..., odd=False) "
                             "for even sizes)")
        if param == "threshold" and (isinstance(k, KSchedule) or (
                k is not None and not isinstance(k, ThresholdSchedule) and (
                    isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < float(k) <= 1))):
            raise ValueError(f"{type(machine).__name__} takes a threshold in (0, 1] or a ThresholdSchedule, got {k!r}")
        if param in ("k", "p") and isinstance(k, ThresholdSchedule):
            raise ValueError(f"{type(machine).__name__} takes a patch size or a KSchedule, not a ThresholdSchedule")
        if param == "k" and isinstance(k, KSchedule):  # every step's size, before any step runs
            for v in sorted(set(int(v) for v in k.ks)):
                try:
                    check_k(v, 0, 0)
                except ValueError as e:
                    raise ValueError(f"{type(machine).__name__}: the k-schedule holds k = {v}: {e}") from None
        if param is None and k is not None:
            raise ValueError(f"{type(machine).__name__} has no per-step parameter (it compares whole images or "
                             f"filters them): give k=None, got {k!r}")
        self.k = k
        self.backend = backend
        self.keep_provenance = keep_provenance
        self.provenance = None

    def k_at(self, t: float):
        """The parameter used at time ``t``: the patch size (int), the threshold (float), or None (IS, Wiener, or
        a threshold machine's own)."""
        if self.k is None or self.machine.parameter is None:
            return None
        if isinstance(self.k, (KSchedule, ThresholdSchedule)):
            return self.k.value_at(t)
        return int(self.k) if self.machine.parameter in ("k", "p") else float(self.k)

    def describe(self) -> dict:
        """What changes this denoiser's results: the machine's description and its per-step parameter."""
        d = {"type": "MachineDenoiser", "machine": self.machine.describe()}
        if isinstance(self.k, KSchedule):
            d["ks"], d["times"] = list(map(int, self.k.ks)), list(map(float, self.k.times))
        elif isinstance(self.k, ThresholdSchedule):
            d["thresholds"], d["times"] = list(map(float, self.k.thresholds)), list(map(float, self.k.times))
        elif self.k is not None and self.machine.parameter in ("k", "p"):
            d["k"] = int(self.k)
        elif self.k is not None and self.machine.parameter == "threshold":
            d["threshold"] = float(self.k)
        if self.patch_mask is not None:
            d["patch_mask"] = {"shape": list(self.patch_mask.shape),
                               "sha256": hashlib.sha256(self.patch_mask.numpy().tobytes()).hexdigest()}
        return d

    @docstring("""``x0_hat``: the machine's ``denoise(x, t, k(t), labels)``.

        Args:
""" + _call_args() + """
        Returns:
            ``x0_hat`` with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def __call__(self, x, t, labels=None):
        k = self.k_at(_one_time(t, "MachineDenoiser"))
        mask = None
        if self.patch_mask is not None:
            mask = self.patch_mask if k == self.patch_mask.shape[-1] else crop_patch_mask(self.patch_mask, k)
        out = self.machine.denoise(x, t, k, labels=labels, return_provenance=self.keep_provenance,
                                   backend=self.backend, **({} if mask is None else {"patch_mask": mask}))
        if self.keep_provenance:
            out, self.provenance = out
        return out


MIN_SIGNAL = 1e-4  # the least a = sqrt(alpha_bar(t)) a network's x0 = (x - b eps) / a is formed at


class NetworkDenoiser(_Denoiser):
    """An eps-predicting network as a denoiser: ``x0_hat = (x - b eps) / a`` with ``eps = net(t, x, labels)``.

    The network runs on its device in ``dtype`` under ``torch.no_grad``, in chunks of at most ``batch_size``
    images; the result comes back on the device and in the dtype of ``x``.

    Class conditioning is read from the network where it can be (``net.embed.num_classes``, which this
    package's networks and the TorchScript reference networks of ``shared/models`` have; else
    ``net.config["num_classes"]``): a class-conditional network then needs labels on every call, and an
    unconditional one refuses them (ValueError), unless ``conditional`` says otherwise.

    Args:
        net: the eps network, callable as ``net(t, x, labels)`` with ``t`` a ``(B,)`` float32 tensor, ``x``
            ``(B, C, H, W)`` and ``labels`` a ``(B,)`` int64 tensor or None: a ``torch.nn.Module``, a
            TorchScript module (:func:`patchmosaic.networks.load_network`) or any callable.
        schedule: the noise schedule the network was trained on: ``"cosine_legacy"`` (default, the
            paper's and the reference networks'), ``"cosine"``, ``"linear"``, a
            :class:`patchmosaic.schedules.Schedule` or a callable ``t -> alpha_bar(t)``.
        device: the device the network runs on (a ``torch.device`` or a string such as ``"cpu"`` or
            ``"cuda:0"``); None (default): the device of its first parameter, else the CPU. A CUDA device on
            a torch without CUDA is refused (RuntimeError).
        batch_size: the most images per network call (default 256).
        dtype: the dtype the network runs in (default ``torch.float32``): the images are cast to it, and the
            network's floating-point weights must have it (cast the network with ``net.to(dtype)``; a ValueError
            otherwise). A TorchScript network runs in float32 only (a ValueError for another dtype).
        conditional: None (default): as read from the network (above; a network that cannot be read gets
            the labels it is given). True: labels are required on every call (a ValueError at once if the
            network reads as unconditional). False: labels are dropped before every call; for a
            class-conditional network this runs it without its class embedding (an input it never saw in
            training unless trained with label dropout), which a UserWarning says.
    """

    def __init__(self, net, schedule: ScheduleLike = "cosine_legacy", *, device=None, batch_size: int = 256,
                 dtype: torch.dtype = torch.float32, conditional: Optional[bool] = None):
        if not callable(net):
            raise TypeError(f"net must be callable as net(t, x, labels), got {type(net).__name__}")
        check_cuda_inputs(device=device)
        if conditional not in (None, True, False):
            raise ValueError(f"conditional must be None, True or False, got {conditional!r}")
        self.net = net
        self.schedule = get_schedule(schedule)
        params = list(net.parameters()) if hasattr(net, "parameters") else []
        if device is None:
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be a torch floating dtype (torch.float32, float64, float16, bfloat16), got "
                            f"{dtype!r}")
        if dtype != torch.float32 and isinstance(net, torch.jit.ScriptModule):
            raise ValueError(f"NetworkDenoiser(dtype={dtype}): a TorchScript network runs in torch.float32 only (its "
                             "scripted time embedding is float32); convert it into a checkpoint of this package "
                             "(patchmosaic convert MODEL.pt DIR), load that and cast it, or use dtype=torch.float32")
        weights = {p.dtype for p in params if p.is_floating_point()}
        if weights - {dtype}:
            raise ValueError(f"NetworkDenoiser(dtype={dtype}): the network runs in dtype, but its weights are "
                             f"{', '.join(sorted(map(str, weights)))}; cast the network first (net.to({dtype})) or "
                             "pass the dtype of its weights")
        self.dtype = dtype
        self.conditional = conditional
        self.num_classes = network_classes(net)  # None: cannot be read from the network
        self.channels = network_channels(net)  # None: cannot be read from the network
        if conditional is True and self.num_classes == 0:
            raise ValueError("conditional=True, but the network is unconditional (it has no class embedding: "
                             "num_classes = 0) and would ignore the labels; use a class-conditional network")
        if conditional is False and self.num_classes:
            warnings.warn(f"NetworkDenoiser(conditional=False) runs a class-conditional network "
                          f"({self.num_classes} classes) without labels: its class embedding is left out, an "
                          "input it never saw in training unless it was trained with label dropout", UserWarning,
                          stacklevel=2)
        if hasattr(net, "eval"):
            net.eval()

    def describe(self) -> dict:
        """What changes this denoiser's results: the network's weights (a hash), schedule, dtype, labels use."""
        from ..io.runstate import module_digest

        return {"type": "NetworkDenoiser", "weights": module_digest(self.net), "architecture": _architecture(self.net),
                "schedule": self.schedule.describe(), "dtype": str(self.dtype), "conditional": self.conditional}

    @docstring("""The network's noise estimate ``eps = net(t, x, labels)``.

        Args:
""" + _call_args("a float, or one per image as a ``(B,)`` array or tensor") + """
        Returns:
            ``eps`` with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor on ``x``'s
            device.

        Raises:
            ValueError for images with other channels than the network takes (where it can be read) or with NaN or
                infinite values, labels that
            do not match the network's conditioning (see the class), labels outside its classes, or a network that
            returns another shape than ``x`` or non-finite values.
        """)
    def eps(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        check_cuda_inputs(t=t)
        B = xt.shape[0]
        if self.channels is not None and xt.shape[1] != self.channels:
            raise ValueError(f"the network takes {self.channels}-channel images, but x has {xt.shape[1]} channel(s) "
                             f"(shape {tuple(xt.shape)}); give it images of its data set")
        if not bool(torch.isfinite(xt).all()):  # (before the network runs: its output would be blamed)
            raise ValueError(f"x contains NaN or infinite values (shape {tuple(xt.shape)})")
        tv = torch.from_numpy(check_t(t, B))
        lab = self._network_labels(labels, B)
        outs = []
        with torch.no_grad():
            for s in range(0, B, self.batch_size):
                e = slice(s, s + self.batch_size)
                xb = xt[e].to(self.device, self.dtype)
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
                outs.append(e_b.to(xt.device, xt.dtype))
        return like_input(torch.cat(outs), is_numpy)

    @docstring("""``x0_hat = (x - b eps) / a`` from the network's ``eps``.

        Args:
""" + _call_args("a float, or one per image as a ``(B,)`` array or tensor") + """
        Returns:
            ``x0_hat`` with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def __call__(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        a, b = self._ab(t, xt)
        if not float(np.min(np.asarray(torch.as_tensor(a).cpu()))) >= MIN_SIGNAL:
            at = t if isinstance(t, float) else "max(t)"
            raise ValueError(f"the schedule ({self.schedule.name}) leaves almost no signal at t = {at} (a = "
                             f"sqrt(alpha_bar) below {MIN_SIGNAL:g}): x0 = (x - b eps) / a would amplify the network's "
                             "error past any use; start the time grid lower (grid=, e.g. from 0.99) or use a schedule "
                             "with signal left at t = 1 (cosine_legacy)")
        return like_input((xt - b * self.eps(xt, t, labels)) / a, is_numpy)

    def _network_labels(self, labels, B: int) -> Optional[torch.Tensor]:
        """The labels the network is called with, checked against its conditioning."""
        lab = as_labels(labels, B)
        if self.conditional is False:
            return None
        if lab is None and (self.conditional or self.num_classes):
            what = f"class-conditional ({self.num_classes} classes)" if self.num_classes else \
                "class-conditional (conditional=True)"
            raise ValueError(f"the network is {what} but no labels were given: pass labels (one class per "
                             "image), or NetworkDenoiser(net, conditional=False) to run it without its class "
                             "embedding on purpose")
        if lab is not None and self.num_classes == 0 and self.conditional is None:
            raise ValueError("labels were given but the network is unconditional (no class embedding: it would "
                             "ignore them); drop the labels, or pass NetworkDenoiser(net, conditional=False) "
                             "to drop them on purpose")
        if lab is not None and self.num_classes and not bool(((lab >= 0) & (lab < self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) for this network, got "
                             f"{int(lab.min())}..{int(lab.max())}")
        return lab


@docstring("""A machine + k-schedule denoiser that uses patch indexes where they are provably accurate.

    Every call with ``t <= t_max`` first runs the approximate machine (``m`` nearest keys per pixel)
    and then, by ``mode``:

    - ``"pixel"`` (default): every pixel whose bound exceeds ``tol`` (data units) is recomputed by the
      exact engine (only those pixels, image by image: ``Machine.denoise(pixels=...)``); the others
      keep the index value, so every output pixel is within ``tol`` of the exact machine (conditional
      on retrieval for IVF indexes: each IVF query checks retrieval on a sample of pixels, and a call
      whose check fails runs exactly, see :class:`patchmosaic.index.ApproxResult`), up to the float32
      rounding of the index's own arithmetic: it computes in float32, so a float64 query's index pixels are
      float32-accurate (about 1e-6 of the data range; a ``tol`` below that is met by the exact pixels only).
      When more than ``max_exact_fraction`` of the pixels need the exact engine, the whole call runs exactly.
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

    Args:
        machine: a local machine (:class:`patchmosaic.LS` or :class:`patchmosaic.ELS`); its schedule becomes
            the denoiser's.
        k: an odd patch size or a :class:`KSchedule` (one k per step, looked up by the step's ``t``).
        tol: the largest error bound (data units, >= 0) a kept index pixel may have (default 1e-3).
        m: nearest keys per pixel the index retrieves (default 64).
        t_max: calls with ``t > t_max`` run exactly (default 1.0: the index may serve every call).
        mode: ``"pixel"`` (default), ``"step"`` or ``"measured"``, as above.
        max_exact_fraction: in ``"pixel"`` mode, above this fraction of pixels to recompute (0..1) the
            whole call runs exactly (default 0.5).
        cache_dir: folder for the indexes on disk (one subfolder per k), reused when they match; None
            (default): in memory only.
        canvas: ``(Hq, Wq)`` of the queries the indexes serve; None (default): the training size.
        progress: progress bars while indexes are built (default False).
""" + INDEX_OPTION_ARGS + """    """)
class IndexedDenoiser:

    MODES = ("pixel", "step", "measured")

    def __init__(self, machine, k, *, tol: float = 1e-3, m: int = 64, t_max: float = 1.0, mode: str = "pixel",
                 max_exact_fraction: float = 0.5, cache_dir: Optional[str] = None, canvas=None, progress: bool = False,
                 kind: Optional[str] = None, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                 pq_m: Optional[int] = None, flat_budget: Optional[int] = None, min_index_keys: Optional[int] = None,
                 merge: Optional[bool] = None):
        index_kw = dict(kind=kind, nlist=nlist, nprobe=nprobe, pq_m=pq_m, flat_budget=flat_budget,
                        min_index_keys=min_index_keys, merge=merge)
        index_kw = {name: value for name, value in index_kw.items() if value is not None}
        if kind is not None and kind not in KINDS:  # (at construction, not at the first call)
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.number)) or not tol >= 0:
            raise ValueError(f"tol must be a non-negative number, got {tol!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m must be a positive integer number of candidates, got {m!r}")
        if isinstance(t_max, bool) or not isinstance(t_max, (int, float, np.number)) or not 0 <= t_max <= 1:
            raise ValueError(f"t_max must be a number in [0, 1], got {t_max!r}")
        if isinstance(max_exact_fraction, bool) or not isinstance(max_exact_fraction, (int, float, np.number)) or \
                not 0 <= max_exact_fraction <= 1:
            raise ValueError(f"max_exact_fraction must be a number in [0, 1], got {max_exact_fraction!r}")
        self.exact = MachineDenoiser(machine, k)
        self.machine, self.schedule = machine, machine.schedule
        self.query_size = check_canvas_size(canvas, machine)
        ks = sorted(set(int(v) for v in k.ks)) if isinstance(k, KSchedule) else [self.exact.k_at(1.0)]
        for kk in ks:  # every step's key set on this canvas (IS, PSPC, PCA-locality: no patches to index)
            machine.keyset(*self.query_size, kk)
        self.tol, self.m, self.t_max, self.mode = float(tol), int(m), float(t_max), mode
        self.max_exact_fraction = float(max_exact_fraction)
        self.cache_dir, self.canvas, self.progress, self.index_kw = cache_dir, canvas, progress, index_kw
        self.indexes: Dict[int, PatchIndex] = {}
        self.record: List[dict] = []

    def describe(self) -> dict:
        """What changes this denoiser's results: the exact denoiser's description and the index's settings."""
        return {"type": "IndexedDenoiser", "exact": self.exact.describe(), "tol": self.tol, "m": self.m,
                "t_max": self.t_max, "mode": self.mode, "max_exact_fraction": self.max_exact_fraction,
                "canvas": list(self.query_size), "index": {k: v for k, v in sorted(self.index_kw.items())}}

    def index(self, k: int) -> PatchIndex:
        """The patch index at ``k`` (built, or loaded from ``cache_dir``, on first use)."""
        if k not in self.indexes:
            folder = None if self.cache_dir is None else os.path.join(self.cache_dir, f"k{k}")
            self.indexes[k] = PatchIndex.open(folder, self.machine, k, self.canvas, progress=self.progress,
                                              **self.index_kw)
        return self.indexes[k]

    @docstring("""``x0_hat``, from the index where its bound allows (see the class), else exactly.

        Args:
""" + _call_args() + """
        Returns:
            ``x0_hat`` with the shape of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def __call__(self, x, t, labels=None):
        check_cuda_inputs(x=x, t=t, labels=labels)
        # the call's input checked before an index is built for it (its k may not have one yet)
        xt, is_numpy = as_images(x)  # (float32 or float64, (B, C, H, W))
        t = check_time(_one_time(t, "IndexedDenoiser"))
        lab = as_labels(labels, xt.shape[0])
        k = self.exact.k_at(t)
        self.machine.check_labels(None if lab is None else lab.cpu().numpy(), xt.shape[0])
        if tuple(xt.shape[2:]) != self.query_size:
            raise ValueError(f"this denoiser's indexes serve queries of {self.query_size[0]}x{self.query_size[1]} "
                             f"(canvas=), got shape {tuple(xt.shape)}")
        if not bool(torch.isfinite(xt).all()):
            raise ValueError(f"x contains NaN or infinite values (shape {tuple(xt.shape)})")
        t0 = time.perf_counter()
        entry = {"t": t, "k": k}
        if t > self.t_max or (lab is None and self.machine.labels is not None):
            # (a class-conditional machine's index serves a class: a call without labels runs over all images)
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        res = self.index(k).denoise(xt.float(), t, lab, self.m)  # (the index works in float32)
        bound = res.bound
        x0 = like_input(res.x0.to(xt.dtype), is_numpy)
        if self.mode == "measured":
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            return self._finish(entry, t0, x0, "index", 0.0)
        if res.bound_valid is False:
            # the IVF bound's retrieval condition failed on checked pixels: the bound cannot be trusted
            entry.update(retrieval_failed=f"{res.failed_pixels}/{res.checked_pixels}")
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        bad = bound > self.tol
        if self.mode == "step" or not bool(bad.any()) or float(bad.float().mean()) > self.max_exact_fraction:
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            if not bool(bad.any()):
                return self._finish(entry, t0, x0, "index", 0.0)
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        kept = bound[~bad]
        entry.update(bound_max=float(kept.max()) if len(kept) else 0.0,
                     bound_mean=float(kept.mean()) if len(kept) else 0.0)
        out = torch.as_tensor(x0).clone()
        for b in np.nonzero(bad.reshape(len(bad), -1).any(1).numpy())[0]:
            mask = bad[b]
            ex = self.machine.denoise(xt[b : b + 1], t, k, None if lab is None else lab[b : b + 1], pixels=mask)
            out[b][:, mask.to(out.device)] = ex[0][:, mask.to(ex.device)].to(out.dtype)
        frac = float(bad.float().mean())
        return self._finish(entry, t0, like_input(out, is_numpy), "mixed", frac)

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
    if callable(obj) and getattr(obj, "schedule", None) is not None:
        return obj  # a denoiser of its own kind that owns a schedule (e.g. diffusion/edm.py's VPDenoiser)
    raise TypeError(f"cannot make a denoiser from {type(obj).__name__}")
