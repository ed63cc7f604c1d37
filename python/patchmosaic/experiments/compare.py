"""Machine versus network, seed by seed (spec section 5).

The network and every machine are sampled with DDIM from the same noise seeds and labels on the same
grid. Per seed and machine: Pearson ``r``, ``R2`` and ``MSE`` against the network's sample; per machine:
medians with interquartile ranges and, for every machine other than the baseline (IS), the fraction of
seeds where it beats the baseline (by ``r``). Samples are saved after every batch of seeds, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..diffusion.denoisers import NetworkDenoiser, as_denoiser, full_description
from ..diffusion.inputs import as_labels
from ..diffusion.samplers import check_grid, common_schedule, ddim
from ..io.files import check_output
from ..io.progress import Progress
from ..io.runstate import check_writable, fingerprint, load_state, save_state, write_json
from ..metrics import METRICS, summary
from ..ops.checks import check_cuda_inputs


def sample_batched(denoiser, x1: torch.Tensor, labels, *, grid, batch_size: int, state: Optional[str] = None,
                   fp: str = "", progress: bool = True, desc: str = "", layout=None, device=None) -> torch.Tensor:
    """DDIM samples of ``denoiser`` from every seed, ``batch_size`` seeds at a time, saved after each batch.

    One progress bar (``desc``) counts the steps of all seeds, through :class:`Progress`: nothing is written
    with ``progress`` off or when stderr is not a terminal. With a ``layout`` (distributed/queries.py) each round
    takes ``batch_size`` seeds per query shard, spreads them over the shards and gathers the samples; rank 0
    saves them in the same state file, so any number of ranks resumes it. ``device``: where the seeds are sampled
    (None: the CPU); the samples come back to the CPU."""
    M, steps = x1.shape[0], len(grid) - 1
    saved = load_state(state, fp) if layout is None else layout.load_state(state, fp)
    check_saved_batch(saved, state, batch_size, layout is None)
    out = torch.from_numpy(saved["samples"]) if saved is not None else torch.full_like(x1, float("nan"))
    done = int(saved["done"]) if saved is not None else 0
    bar = Progress(M * steps, desc, enabled=progress and (layout is None or layout.leader), initial=done * steps)
    per_round = batch_size * (1 if layout is None else layout.n_query)
    for s in range(done, M, per_round):
        e = min(M, s + per_round)
        lab = None if labels is None else labels[s:e]
        seeds = f"seeds {s}..{e - 1} of {M}"
        kw = dict(grid=grid, progress=False, callback=lambda i, t, x, x0: bar.update(e - s, postfix=f"{seeds}, t={t:.2f}"))
        xs = x1[s:e] if device is None else x1[s:e].to(device)
        out[s:e] = (ddim(denoiser, xs, lab, **kw) if layout is None else layout.sample(ddim, denoiser, xs, lab, **kw)).cpu()
        if state is not None:
            arrays = dict(samples=out.numpy(), done=np.array(e), batch_size=np.array(batch_size))
            (save_state if layout is None else layout.save_state)(state, fp, **arrays)
    bar.close()
    return out


def check_saved_batch(saved: Optional[dict], state: Optional[str], batch_size: int, writable: bool = True) -> None:
    """An unfinished sample file is resumed with the batch size it was made with: a network's outputs depend (in
    the last digits) on how many seeds run together, and the smoothed denoiser's draws on an image's place in its
    batch, so a resume with another would mix two runs' samples (a finished file is read whatever the batch size);
    and (``writable``: one process) its folder must be writable."""
    if saved is None or int(saved["done"]) >= len(saved["samples"]):
        return
    if writable:
        check_writable(state)
    if "batch_size" not in saved:
        raise ValueError(f"{state} does not record the batch size its samples were made with (an earlier "
                         "version wrote it); delete it to start again")
    if int(saved["batch_size"]) != int(batch_size):
        raise ValueError(f"{state} holds samples made {int(saved['batch_size'])} seeds at a time, and this run "
                         f"asks for {int(batch_size)} (a network's outputs, and seeded draws, depend on the batch): resume "
                         f"with batch_size={int(saved['batch_size'])} (CLI: --batch {int(saved['batch_size'])}) "
                         "or delete the file")


def nearest_training(samples: torch.Tensor, images: torch.Tensor, labels=None, train_labels=None) -> np.ndarray:
    """Index of the training image nearest (L2) to each sample, within the sample's class if labels are given."""
    flat = images.reshape(images.shape[0], -1).double()
    out = np.zeros(samples.shape[0], np.int64)
    for m in range(samples.shape[0]):
        cand = np.arange(images.shape[0])
        if labels is not None and train_labels is not None:
            cand = np.nonzero(np.asarray(train_labels) == int(labels[m]))[0]
        d = torch.cdist(samples[m].reshape(1, -1).double(), flat[cand])
        out[m] = cand[int(d.argmin())]
    return out


def compare(network, machines: Dict[str, object], x1: torch.Tensor, labels=None, *, baseline: str = "IS",
            grid: Optional[Sequence[float]] = None, steps: int = 20, batch_size: int = 8,
            out_dir: Optional[str] = None, run_id: str = "", progress: bool = True, info: Optional[dict] = None,
            layout=None, device=None) -> dict:
    """Compare ``network`` with ``machines`` seed by seed: all are sampled with DDIM from the same seeds and
    labels on the same grid, and every machine's samples are measured against the network's (Pearson ``r``,
    ``R2``, ``MSE`` per seed; medians with interquartile ranges per machine).

    Every denoiser samples on its own noise schedule, and they must share one (a ValueError names two that
    differ); a network given as a bare module runs on the machines' schedule.

    Args:
        network: an eps network module ``net(t, x, labels)`` or a denoiser (e.g. a :class:`NetworkDenoiser`).
        machines: a non-empty dict from a name to a denoiser (or an IS machine, which needs no patch size),
            e.g. ``{"ELS": MachineDenoiser(els, kschedule), "IS": MachineDenoiser(is_machine)}``; the name
            ``"network"`` is reserved, and two names may not map to the same sample file (characters other than
            ``A-Za-z0-9_.-`` become ``_``).
        x1: the noise seeds, a ``(M, C, H, W)`` float torch tensor on the CPU (a CUDA tensor on a torch without
            CUDA is a RuntimeError, before any work).
        labels: ``(M,)`` integer class labels, one per seed (numpy, a CPU torch tensor or a list), for a
            conditional network and machines; None (default): unconditional.
        baseline: the name in ``machines`` that every other machine is scored against (the fraction of seeds
            where it has the higher ``r``); default ``"IS"``; a name not in ``machines`` skips that score.
        grid: descending times from ``grid[0]`` in ``(0, 1]`` to ``grid[-1] >= 0``; None (default):
            ``t_i = i / steps``.
        steps: number of steps of the default grid (a positive integer, default 20).
        batch_size: seeds sampled at a time (a positive integer, default 8); samples are saved after each batch.
        out_dir: folder for the sample files (``samples_<name>.npz``, resumed by a rerun with the same
            settings) and ``report.json``; None (default): nothing written.
        run_id: any string that goes into the sample files' fingerprints, to keep apart runs that share
            ``out_dir`` (default ``""``).
        progress: one progress bar per denoiser on stderr (default True; shown only on a terminal).
        info: extra JSON-able entries for the report (e.g. where the network came from); None (default): none.
        layout: a :class:`patchmosaic.distributed.queries.Layout` spreading the seeds over the query shards of a
            ``torchrun`` job (every rank calls ``compare`` with all the seeds and gets the whole report; rank 0
            writes the files, which any number of ranks, or one process, resumes); None (default): one process.
        device: where the seeds are sampled (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``): machines
            see ``x_t`` there, so a CUDA device runs them on the CUDA engine (a network runs on its own device);
            samples, report and files stay on the CPU, and files resume on any device. None (default): the
            device of ``x1``.

    Returns:
        the report dict: ``seeds``, ``grid``, ``baseline``, ``metrics`` (what each measures), ``summary``
        (per machine and metric), ``per_seed`` (per machine: every metric's list and the machine's
        description), the ``info`` entries, and ``samples`` (name -> ``(M, C, H, W)`` tensor, ``"network"``
        included; not in ``report.json``).
    """
    check_cuda_inputs(x1=x1, labels=labels, device=device)
    if not torch.is_tensor(x1) or x1.ndim != 4:
        raise ValueError(f"x1 must be a (M, C, H, W) tensor of seeds, got shape {tuple(getattr(x1, 'shape', ()))}")
    if not bool(torch.isfinite(x1).all()):
        raise ValueError(f"x1 contains NaN or infinite values (shape {tuple(x1.shape)})")
    dev = x1.device if device is None else torch.device(device)
    dev = None if dev.type == "cpu" else dev
    x1 = x1.detach().cpu()
    if not isinstance(machines, dict):
        raise TypeError(f"machines must be a dict from a name to a denoiser, got {type(machines).__name__}")
    if not machines:
        raise ValueError("give at least one machine to compare")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir} is a file, not a folder for the sample files and the report")
    if out_dir is not None:  # (a path under a file, or a folder that cannot be written)
        check_output(out_dir, option="out_dir", what="the folder of the sample files and the report", folder=True)
    if info is not None:
        try:
            json.dumps(info)
        except (TypeError, ValueError) as e:
            raise TypeError(f"info must hold JSON-able entries for report.json: {e}") from None
    g = check_grid(grid, steps)
    M = x1.shape[0]
    lab = None if labels is None else torch.as_tensor(np.asarray(labels))
    if lab is not None and lab.shape != (M,):
        raise ValueError(f"labels must have shape ({M},), got {tuple(lab.shape)}")
    lab = as_labels(lab, M)  # (integers: float labels refused, not truncated)
    for d in machines.values():
        check_parts_labels(d, None if lab is None else lab.numpy(), M)
    x1 = x1.float()
    base_fp = dict(kind="compare", run_id=run_id, grid=g.tolist(), x1=x1, labels=None if lab is None else lab.numpy())

    files = {}
    for name in machines:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
        if name == "network" or safe == "network":
            raise ValueError("'network' names the network's samples; give the machine another name")
        if safe in files.values():
            other = next(n for n, f in files.items() if f == safe)
            raise ValueError(f"machine names {other!r} and {name!r} would share the sample file samples_{safe}.npz; "
                             "rename one")
        files[name] = safe
    files["network"] = "network"

    def state(name):
        return None if out_dir is None else os.path.join(out_dir, f"samples_{files[name]}.npz")

    dens = {name: as_denoiser(m) for name, m in machines.items()}
    if isinstance(network, torch.nn.Module) or isinstance(network, torch.jit.ScriptModule):
        net = NetworkDenoiser(network, common_schedule(dens))
    else:
        net = as_denoiser(network)
    common_schedule({"network": net, **dens})
    fps = {"network": fingerprint(who="network", denoiser=full_description(net), **base_fp)}
    fps.update({name: fingerprint(who=name, machine=describe(d), denoiser=full_description(d), **base_fp)
                for name, d in dens.items()})
    if out_dir is not None:  # every sample file left by another run (or not one) refused before any sampling
        for name, fp in fps.items():
            check_saved_batch((load_state if layout is None else layout.load_state)(state(name), fp), state(name),
                              batch_size, layout is None)
    u = sample_batched(net, x1, lab, grid=g, batch_size=batch_size, state=state("network"), fp=fps["network"],
                       progress=progress, desc="network", layout=layout, device=dev)
    if not np.all(np.isfinite(u.numpy())):
        raise ValueError("the network's samples are not finite (NaN or infinite values); check its weights")
    samples, per_seed = {"network": u}, {}
    for name, d in dens.items():
        desc = describe(d)
        v = sample_batched(d, x1, lab, grid=g, batch_size=batch_size, state=state(name), fp=fps[name],
                           progress=progress, desc=name, layout=layout, device=dev)
        if not np.all(np.isfinite(v.numpy())):
            raise ValueError(f"the samples of {name!r} are not finite; nothing to compare")
        samples[name] = v
        per_seed[name] = {metric: fn(u, v).tolist() for metric, fn in METRICS.items()}
        per_seed[name]["machine"] = desc
    summ = {}
    for name, vals in per_seed.items():
        summ[name] = {metric: summary(vals[metric]) for metric in METRICS}
        if baseline in per_seed and name != baseline:
            # over the seeds where both r are defined (None where none is: every network sample constant)
            mine, base = np.asarray(vals["r"], np.float64), np.asarray(per_seed[baseline]["r"], np.float64)
            defined = np.isfinite(mine) & np.isfinite(base)
            summ[name]["frac_beats_" + baseline + "_r"] = \
                float(np.mean(mine[defined] > base[defined])) if defined.any() else None
    report = {"seeds": M, "grid": g.tolist(), "baseline": baseline,
              "metrics": {"r": "Pearson correlation over all pixels and channels (the paper's 'r^2'); in report.json "
                               "null where undefined (a constant image), as R2",
                          "R2": "1 - |u - v|^2 / |u - mean(u)|^2, u = network sample, v = machine sample",
                          "mse": "mean squared difference"},
              "summary": summ, "per_seed": per_seed, **(info or {})}
    if out_dir is not None and (layout is None or layout.leader):
        write_json(os.path.join(out_dir, "report.json"), json_null_for_nan(report))
    report["samples"] = samples
    return report


def json_null_for_nan(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON's null: strict parsers refuse ``NaN``)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_null_for_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_null_for_nan(v) for v in obj]
    return obj


def check_parts_labels(denoiser, labels, M: int) -> None:
    """Every machine inside ``denoiser`` (a MachineDenoiser's, a blend's two parts') checks ``labels``: an unknown
    label found before any sampling, not after the network's trajectories."""
    if hasattr(denoiser, "machine"):
        denoiser.machine.check_labels(labels, M)
    for part in (getattr(denoiser, "first", None), getattr(denoiser, "second", None)):
        if part is not None:
            check_parts_labels(part, labels, M)


def describe(denoiser) -> dict:
    """A JSON description of a denoiser (machine type, boundary, training size, its parameter or schedule)."""
    from ..diffusion.blend import BlendDenoiser, WeightSchedule
    from ..diffusion.denoisers import IndexedDenoiser, MachineDenoiser
    from ..diffusion.kschedule import KSchedule, ThresholdSchedule

    if isinstance(denoiser, BlendDenoiser):  # its parts, and the first's weight
        w = denoiser.weight
        return {"type": "BlendDenoiser", "first": describe(denoiser.first), "second": describe(denoiser.second),
                **({"weights": list(map(float, w.weights))} if isinstance(w, WeightSchedule) else {"weight": w})}
    if isinstance(denoiser, IndexedDenoiser):  # its exact machine, and the index's settings
        return {**denoiser.describe(), "exact": describe(denoiser.exact)}
    if not isinstance(denoiser, MachineDenoiser):
        return {"type": type(denoiser).__name__}
    m = denoiser.machine
    d = {"type": getattr(m, "machine_type", type(m).__name__), "train_images": m.N}  # a ShardedMachine: its kind
    if hasattr(m, "boundary"):
        d["boundary"] = m.boundary
    if isinstance(denoiser.k, KSchedule):
        d["ks"] = list(map(int, denoiser.k.ks))
    elif isinstance(denoiser.k, ThresholdSchedule):
        d["thresholds"] = list(map(float, denoiser.k.thresholds))
    elif denoiser.k is not None and m.parameter is not None:
        d[m.parameter] = int(denoiser.k) if m.parameter in ("k", "p") else float(denoiser.k)
    return d
