"""Calibration of a machine's per-step parameter against a trained network (spec section 4): the patch size ``k``
of a local machine (a k-schedule), or the threshold of PCA-locality (a threshold schedule) the same way.

Along the network's own DDIM trajectory from each seed, at every step, the machine is evaluated at
every candidate value on the network's current ``x_t`` (all candidates in one call, ``Machine.denoise_ks``: one pass
over the keys for patch sizes); the value whose score has the highest cosine similarity with the network's score is
that seed's choice. The schedule is the per-step median over seeds, rounded to the nearest candidate (for patch
sizes, odd ones: "rounded to an odd size", spec section 4; of two candidates equally near, the smaller):
``median="rounded"``, the default. ``median="lower"`` takes the lower median instead (the smaller of the two middle
choices with an even number of seeds; the rule before 2026-12-07, which biased two-seed schedules to the smaller
choice); both are the plain median with an odd number of seeds.

The scores ``-eps / b`` of network and machine share the factor ``1 / b^2`` against ``a x0_hat - x_t``,
so the cosine is computed on ``a x0_hat - x_t`` per seed over all pixels and channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..diffusion.denoisers import NetworkDenoiser
from ..diffusion.inputs import as_labels
from ..diffusion.kschedule import KSchedule, ThresholdSchedule
from ..io.progress import Progress
from ..io.runstate import check_writable, fingerprint, load_state, save_state, write_json
from ..ops.checks import check_cuda_inputs
from ..diffusion.samplers import check_grid, common_schedule, update
from ..machines import Machine
from ..validation import check_k, check_threshold


@dataclass
class Calibration:
    """What :func:`calibrate` returns (S steps, M seeds, K candidate values); ``to_json`` writes it.

    Args:
        schedule: the calibrated :class:`KSchedule` (or :class:`ThresholdSchedule` for a threshold): one value per
            step, the median over seeds of ``choices[i]`` rounded to the nearest candidate (``median="rounded"``)
            or their lower median (``median="lower"``).
        candidates: the K candidate values tried (patch sizes: odd positive ints in increasing order; thresholds:
            numbers in (0, 1]), a tuple.
        choices: ``(S, M)`` array; ``choices[i, m]`` is the candidate whose machine score was most
            cosine-similar to the network's at step i for seed m.
        cosine: ``(S, M, K)`` float64 array; ``cosine[i, m, j]`` is the cosine similarity of the network's and
            the machine's scores at step i, seed m, candidate ``candidates[j]`` (in ``[-1, 1]``).
    """

    schedule: KSchedule
    candidates: tuple
    choices: np.ndarray
    cosine: np.ndarray

    def to_json(self, path: str, **info) -> None:
        """The schedule (readable by ``KSchedule.from_json``) plus the per-seed choices and cosines."""
        k = isinstance(self.schedule, KSchedule)
        kind, cast = ("ks", int) if k else ("thresholds", float)
        if k and not self.schedule.odd:
            info = {"odd": False, **info}
        write_json(path, {"times": list(map(float, self.schedule.times)), kind: list(map(cast, self.schedule.values)),
                          "candidates": list(map(cast, self.candidates)),
                          "choices": self.choices.astype(int if k else float).tolist(),
                          "cosine": np.round(self.cosine, 6).tolist(), **info})


def cosine_per_seed(u: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """Cosine similarity of ``u[m]`` and ``v[m]`` over all their entries, per ``m`` (float64)."""
    u = u.reshape(u.shape[0], -1).double()
    v = v.reshape(v.shape[0], -1).double()
    return (torch.sum(u * v, 1) / (u.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-300)).cpu().numpy()


def lower_median(values: np.ndarray):
    """The lower median of values (always one of them: for odd patch sizes, an odd one)."""
    s = np.sort(np.asarray(values).ravel())
    return s[(len(s) - 1) // 2].item()


MEDIANS = ("rounded", "lower")


def rounded_median(values: np.ndarray, candidates):
    """The median of values (the mean of the two middle ones for an even count) rounded to the nearest of
    ``candidates``, the smaller of two equally near (spec section 4: for odd patch sizes, the median rounded to an
    odd size)."""
    m = float(np.median(np.asarray(values, dtype=np.float64).ravel()))
    c = sorted(set(np.asarray(candidates).ravel().tolist()))
    # "equally near" up to the rounding of the mean of two decimal candidates (0.1 and 0.2: 0.15000000000000002)
    near = min(abs(v - m) for v in c)
    return min(v for v in c if abs(v - m) <= near + 1e-9 * max(1.0, abs(m)))


def check_median(median) -> str:
    if median not in MEDIANS:
        raise ValueError(f"median must be one of {', '.join(map(repr, MEDIANS))}, got {median!r}")
    return median


DEFAULT_THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # PCA-locality candidates


def calibrate(network, machine, x1: torch.Tensor, labels=None, *, candidates: Optional[Sequence[int]] = None,
              k_max: Optional[int] = None, grid: Optional[Sequence[float]] = None, steps: int = 20,
              state: Optional[str] = None, run_id: str = "", progress: bool = True, layout=None,
              device=None, median: str = "rounded") -> Calibration:
    """Calibrate a k-schedule for ``machine`` against ``network`` from the noise seeds ``x1``.

    Along the network's DDIM trajectory from each seed, at every step, the machine is evaluated at every
    candidate k on the network's current ``x_t``; the k whose score is most cosine-similar to the network's is
    that seed's choice, and the schedule takes the median over seeds per step, rounded to the nearest candidate.
    Everything runs in float32 (the engines' precision); cosines are accumulated in float64.

    Args:
        network: an eps network module ``net(t, x, labels)`` (run on the machine's noise schedule) or a
            :class:`NetworkDenoiser` (whose schedule must be the machine's: a ValueError otherwise).
        machine: the machine to calibrate: its per-step parameter (``machine.parameter``): the patch size of LS,
            ELS and DataLocal, the size ``p`` of PSPC-Square (even sizes too), the threshold of PCA-locality or the
            mass ``tau`` of PSPC-Flex (IS and the Wiener filter have none: a ValueError).
        x1: the noise seeds, a ``(M, C, H, W)`` float torch tensor on the CPU (a CUDA tensor on a torch
            without CUDA is a RuntimeError, before any work).
        labels: ``(M,)`` integer class labels, one per seed (numpy, a CPU torch tensor or a list), for a
            conditional network and machine; None (default): unconditional.
        candidates: the patch sizes to try, odd positive ints of at most ``2 max(H, W) - 1`` (at most 32
            distinct ones); None (default): ``3, 5, ..., k_max``. PSPC's ``p``: ints from 1 to ``min(H, W)``; None:
            ``3, 5, ..., k_max`` below ``min(H, W)`` and ``min(H, W)`` itself. Thresholds: numbers in ``(0, 1]``;
            None: the machine's defaults (PCA-locality 0.001 ... 0.2, PSPC-Flex 0.1 ... 1).
        k_max: the largest candidate when ``candidates`` is None, an int of at most ``2 max(H, W) - 1``;
            None (default): 31, or ``2 max(H, W) - 1`` if smaller (a larger patch only adds zero padding).
            Ignored when ``candidates`` is given.
        grid: descending times from ``grid[0]`` in ``(0, 1]`` to ``grid[-1] >= 0``; None (default):
            ``t_i = i / steps``.
        steps: number of steps of the default grid (a positive integer, default 20).
        state: path of an npz state file saved after every step, so that a rerun with the same settings
            resumes from it; None (default): nothing saved. The state is tied to a fingerprint of the
            network's weights, the machine (its kind, training images and schedule), the candidates, the grid,
            the seeds, the labels and ``run_id``: another run's state file is a ValueError.
        run_id: any string that goes into the state's fingerprint, to keep apart runs that share a state path
            (default ``""``).
        progress: a progress bar on stderr (default True; shown only on a terminal, and by rank 0 only).
        layout: a :class:`patchmosaic.distributed.queries.Layout` spreading the seeds over the query shards of a
            ``torchrun`` job (every rank calls ``calibrate`` with all the seeds and gets the whole result; rank 0
            writes the state, which any number of ranks, or one process, resumes); None (default): one process.
        device: where the trajectories run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``): the machine
            sees ``x_t`` there, so a CUDA device runs it on the CUDA engine (the network runs on its own device);
            the result and the state stay on the CPU, and a state resumes on any device. None (default): the
            device of ``x1``.
        median: ``"rounded"`` (default): per step the median of the seeds' choices rounded to the nearest
            candidate, the smaller of two equally near (spec section 4); ``"lower"``: the lower median (the rule
            before 2026-12-07; the same with an odd number of seeds). Not part of the state: a finished state
            gives either schedule.

    Returns:
        a :class:`Calibration`: the schedule, the candidates, the per-seed choices and all cosines.
    """
    check_cuda_inputs(x1=x1, labels=labels, device=device)
    check_median(median)
    if not isinstance(machine, Machine):
        raise TypeError(f"calibrate takes the machine itself (pm.ELS, pm.LS, pm.PCALocality, ...), got "
                        f"{type(machine).__name__}")
    net = network if isinstance(network, NetworkDenoiser) else NetworkDenoiser(network, machine.schedule)
    common_schedule({"network": net, type(machine).__name__: machine})
    param = machine.parameter
    if param is None:
        raise ValueError(f"calibration chooses a per-step parameter; the {type(machine).__name__} machine has none")
    if not torch.is_tensor(x1) or x1.ndim != 4:
        raise ValueError(f"x1 must be a (M, C, H, W) tensor of seeds, got shape {tuple(getattr(x1, 'shape', ()))}")
    if not bool(torch.isfinite(x1).all()):
        raise ValueError(f"x1 contains NaN or infinite values (shape {tuple(x1.shape)})")
    H, W = x1.shape[-2:]
    if param == "threshold":
        candidates = _threshold_candidates(candidates, getattr(machine, "threshold_candidates", DEFAULT_THRESHOLDS))
    elif param == "p":
        candidates = _p_candidates(candidates, k_max, min(H, W))
    else:
        candidates = _k_candidates(candidates, k_max, H, W)
    g = check_grid(grid, steps)
    dev = x1.device if device is None else torch.device(device)
    x1 = x1.detach().cpu()
    M = x1.shape[0]
    lab = as_labels(labels, M)  # (integers: not truncated)
    lab = None if lab is None else lab.cpu()
    machine.check_labels(None if lab is None else lab.numpy(), M)
    fp = fingerprint(kind="calibrate", run_id=run_id, network=net.describe(), machine=machine.describe(),
                     grid=g.tolist(), candidates=list(candidates), x1=x1.float(),
                     labels=None if lab is None else lab.numpy())
    sweep = sorted(set(candidates))

    def x0_of(xd, t, lab_mine):  # every candidate in one pass over the keys (Machine.denoise_ks)
        x0_all = machine.denoise_ks(xd, t, sweep, labels=lab_mine)
        return [x0_all[sweep.index(k)] for k in candidates]

    cos = trajectory_cosines(net, machine.schedule, x1, lab, candidates, x0_of, grid=g, state=state, fp=fp,
                             layout=layout, progress=progress, device=dev, desc=f"calibrate {type(machine).__name__}")
    choices, times, values = per_step_choices(cos, candidates, g, median)
    schedule = ThresholdSchedule(times, values) if param == "threshold" else KSchedule(times, values, param != "p")
    return Calibration(schedule, candidates, choices, cos)


def per_step_choices(cos: np.ndarray, candidates, grid, median: str = "rounded"):
    """From the ``(S, M, K)`` cosines of a sweep: each seed's best candidate per step ``(S, M)``, the steps' start
    times, and per step the seeds' median (``"rounded"``: rounded to the nearest candidate; ``"lower"``: the lower
    median), always one of the candidates. Candidates whose cosines tie exactly: the smallest (whatever their order)."""
    cand = np.asarray(candidates)
    order = np.argsort(cand, kind="stable")  # (argmax takes the first of equal values: the smallest candidate)
    choices = cand[order][np.argmax(np.asarray(cos)[..., order], axis=2)]
    pick = (lambda c: rounded_median(c, candidates)) if check_median(median) == "rounded" else lower_median
    return choices, tuple(float(t) for t in grid[:-1]), tuple(pick(c) for c in choices)


def trajectory_cosines(net, schedule, x1: torch.Tensor, lab, candidates, x0_of, *, grid, state, fp, layout, progress,
                       device, desc: str) -> np.ndarray:
    """The calibration sweep: along the network's DDIM trajectory from each seed ``x1[m]`` over ``grid``, at every
    step the cosine of the network's score with the score of each candidate's ``x0_hat`` (``x0_of(x_t, t, labels)``:
    one ``x0_hat`` per candidate, in the order of ``candidates``). Saved to ``state`` after every step (fingerprint
    ``fp``) and resumed from it; ``layout`` spreads the seeds over the ranks of a torchrun job. Returns the
    ``(S, M, K)`` float64 cosines."""
    S, M, K = len(grid) - 1, x1.shape[0], len(candidates)
    saved = load_state(state, fp) if layout is None else layout.load_state(state, fp)
    x = x1.float()
    cos = np.full((S, M, K), np.nan)
    start = 0
    if saved is not None:
        start, x, cos = int(saved["next_step"]), torch.from_numpy(saved["x"]), saved["cosine"]
        if start < S and layout is None:  # steps left to save (a finished state is only read)
            check_writable(state)
    mine = slice(0, M) if layout is None else layout.seeds(M)  # this rank's seeds
    lab_mine = None if lab is None else lab[mine]
    leader = layout is None or layout.leader
    bar = Progress(S * K, desc, enabled=progress and leader, initial=start * K)
    for i in range(start, S):
        t, t_next = float(grid[i]), float(grid[i + 1])
        a, b2 = (float(v) for v in schedule.coefficients(t))
        xm = x[mine]
        if len(xm):
            xd = xm.to(device)
            eps_net = net.eps(xd, t, lab_mine)
            target = -np.sqrt(b2) * eps_net          # = a x0_net - x_t
            x0_all = x0_of(xd, t, lab_mine)
        for j, k in enumerate(candidates):
            if len(xm):
                cos[i, mine, j] = cosine_per_seed(a * x0_all[j] - xd, target)
            bar.update(postfix=f"t={t:.2f} {k}")
        if len(xm):
            xm = update(schedule, xd, (xd - np.sqrt(b2) * eps_net) / a, t, t_next, eps=eps_net).cpu()
        if layout is None:
            x = xm
        else:
            x = layout.gather(xm, M, "gather of the calibration trajectories")
            cos[i] = layout.gather(cos[i, mine], M, "gather of the calibration cosines")
        if state is not None:
            if layout is None:
                save_state(state, fp, next_step=np.array(i + 1), x=x.numpy(), cosine=cos)
            else:
                layout.save_state(state, fp, next_step=np.array(i + 1), x=x.numpy(), cosine=cos)
    bar.close()
    return cos


def _k_candidates(candidates, k_max, H: int, W: int) -> tuple:
    """The candidate patch sizes, checked (odd, at most ``2 max(H, W) - 1``, at most 32 distinct), ``k_max``
    before any list of candidates is made."""
    limit = 2 * max(H, W) - 1
    if candidates is None:
        if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer))):
            raise TypeError(f"k_max must be an integer, got {k_max!r}")
        k_max = min(31, limit) if k_max is None else int(k_max)
        if k_max > limit:  # refused before the list of candidates is made
            raise ValueError(f"k_max = {k_max} is larger than any useful one for {H}x{W} images (at most "
                             f"{limit}: a larger patch only adds zero padding); lower k_max (--k-max)")
        candidates = list(range(3, k_max + 1, 2))
    elif isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__"):
        raise TypeError(f"candidates must be a sequence of odd patch sizes, got {candidates!r}")
    elif len(candidates) > 4096:
        raise ValueError(f"at most 32 distinct candidate patch sizes, got a list of {len(candidates)}")
    candidates = tuple(check_k(k, H, W) for k in candidates)
    if not candidates:
        raise ValueError("no candidate patch sizes")
    if max(candidates) > limit:
        raise ValueError(f"candidate patch size {max(candidates)} is larger than any useful one for {H}x{W} images "
                         f"(at most {limit}: a larger patch only adds zero padding); lower k_max")
    if len(set(candidates)) > 32:
        raise ValueError(f"at most 32 distinct candidate patch sizes, got {len(set(candidates))}")
    return candidates


def _p_candidates(candidates, k_max, size: int) -> tuple:
    """The candidate sizes of a patch that may be even (PSPC's square crops): ints in ``1..size`` (the largest
    square that fits), at most 32 distinct; None: ``3, 5, ..., k_max`` (default 31) below ``size``, and ``size``
    itself (the whole image on square images: the ideal denoiser, where PSPC's published schedules start)."""
    if candidates is None:
        if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer))):
            raise TypeError(f"k_max must be an integer, got {k_max!r}")
        top = 31 if k_max is None else int(k_max)
        candidates = [k for k in range(3, min(top, size - 1) + 1, 2)] + [size]
    elif isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__"):
        raise TypeError(f"candidates must be a sequence of patch sizes, got {candidates!r}")
    elif len(candidates) > 4096:
        raise ValueError(f"at most 32 distinct candidate patch sizes, got a list of {len(candidates)}")
    out = []
    for k in candidates:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"candidate patch sizes must be ints, got {k!r}")
        if not 1 <= int(k) <= size:
            raise ValueError(f"candidate patch size {int(k)} must lie in 1..{size} (a square crop must fit inside the "
                             "images)")
        out.append(int(k))
    if len(set(out)) > 32:
        raise ValueError(f"at most 32 distinct candidate patch sizes, got {len(set(out))}")
    return tuple(out)


def _threshold_candidates(candidates, default=DEFAULT_THRESHOLDS) -> tuple:
    """The candidate thresholds, checked (each in (0, 1], at most 32 distinct); None: ``default`` (the machine's:
    PCA-locality's :data:`DEFAULT_THRESHOLDS`, PSPC-Flex's masses 0.1 ... 1)."""
    if candidates is not None and (isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__")
                                   or len(candidates) > 4096):
        raise TypeError(f"candidates must be a sequence of at most 32 distinct thresholds, got {candidates!r}")
    candidates = tuple(check_threshold(v) for v in (default if candidates is None else candidates))
    if not candidates:
        raise ValueError("no candidate thresholds")
    if len(set(candidates)) > 32:
        raise ValueError(f"at most 32 distinct candidate thresholds, got {len(set(candidates))}")
    return candidates
