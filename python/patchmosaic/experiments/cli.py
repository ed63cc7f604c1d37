"""The ``patchmosaic`` command line. Exit code 0 on success, 2 with a one-line reason on bad input, 130 when
interrupted (Ctrl-C), with what was saved (from :func:`main` on: a Ctrl-C while the package and torch are still
being imported, before any work, is Python's own KeyboardInterrupt).

Subcommands: ``demo`` (the main job on the built-in data), ``sample``, ``train`` (also ``--preset NAME``),
``convert`` (TorchScript to a checkpoint), ``calibrate``, ``compare``.
Every long run shows progress on stderr (``--quiet`` switches it off) and resumes when rerun with
the same arguments.

Every failure goes through :func:`main`: options are checked by their argparse types (ranges included), outputs
are checked before the run (:func:`patchmosaic.io.files.check_output`), and an error becomes one line naming
the command (and, under torchrun, the rank). Under torchrun the ranks agree on a fingerprint of everything that
must match before their first collective (:meth:`patchmosaic.distributed.queries.Layout.agree`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile
import zlib
from typing import Optional

from ..machines.factory import MACHINES  # the registry: every command's machines

MAX_INT = 2**31 - 1  # the largest count an option takes (images, seeds, steps, sizes)
MAX_STEPS = 100_000  # reverse-process steps beyond this are a typing mistake, not a run (training: 100x)
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``patchmosaic CMD: error: argument --n: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(lo: int, hi: int = MAX_INT):
    """An argparse type: a base-10 integer in ``lo .. hi``."""
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            if hi == MAX_INT and lo in (0, 1) and v < lo:
                raise argparse.ArgumentTypeError(f"must be a {'positive' if lo else 'non-negative'} integer, got {v}")
            raise argparse.ArgumentTypeError(f"must lie in {lo}..{hi}, got {v}")
        return v
    return parse


def _float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in the interval ``lo .. hi`` (each end open or closed)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return v
    return parse


def _ints(text: Optional[str], option: str, lo: int = 0, hi: int = MAX_INT) -> Optional[list]:
    """A comma-separated list of integers in ``lo .. hi`` (None stays None), or a ValueError naming ``option``."""
    if text is None:
        return None
    items = [v.strip() for v in text.split(",")]
    try:
        vals = [int(v, 10) for v in items]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers (e.g. 1,2,3), got {text!r}") from None
    bad = [v for v in vals if not lo <= v <= hi]
    if bad:
        raise ValueError(f"{option}: every entry must lie in {lo}..{hi}, got {bad[0]}")
    return vals


def _numbers(text: Optional[str], option: str) -> Optional[list]:
    """A comma-separated list of numbers (None stays None), or a ValueError naming ``option``."""
    if text is None:
        return None
    try:
        return [float(v.strip()) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers (e.g. 0.005,0.02), got {text!r}") from None



DATA_HELP = ("training images: 'default' (the built-in 2,000 MNIST digits), an .npz file (uint8 images under "
             "x_train/images/x, labels under y_train/labels/y) or an IDX file or directory (MNIST format)")
FIGURE_FORMATS = ("png", "svg", "pdf")  # --figure-format


def _demo(args) -> int:
    from .demo import run_demo

    res = run_demo(out=args.out, n=args.n, steps=args.steps, seed=args.seed,
                   train_per_class=args.train_per_class, backend=args.backend, progress=not args.quiet)
    print(f"wrote {res['out']}: {args.n} boundary-aware ELS samples in {res['seconds']:.1f}s")
    for b in range(args.n):
        print(f"  seed {b}: label {int(res['labels'][b])}, {res['sources_per_sample'][b]} training images "
              f"contribute patches, distance to nearest training image {float(res['nearest_distance'][b]):.2f}")
    return 0


def _sample(args) -> int:
    from .synthesis import run_sample

    canvas = None
    if args.canvas is not None:
        h, x, w = args.canvas.lower().partition("x")
        try:
            canvas = (int(h, 10), int(w if x else h, 10))
        except ValueError:
            raise ValueError(f"--canvas reads HxW (e.g. 256x256), got {args.canvas!r}") from None
        if not all(1 <= v <= 1 << 20 for v in canvas):
            raise ValueError(f"--canvas: each side must lie in 1..{1 << 20}, got {args.canvas!r}")
    labels = _ints(args.labels, "--labels")
    classes = _ints(args.classes, "--classes")
    res = run_sample(args.data, out=args.out, machine=args.machine, boundary=args.boundary, k=args.k,
                     canvas=canvas, n=args.n, steps=args.steps, sampler=args.sampler, seed=args.seed,
                     labels=labels, classes=classes, limit=args.limit, crop=args.crop, stride=args.stride,
                     provenance=args.provenance, download=args.download, backend=args.backend,
                     progress=not args.quiet, force=args.force, layout=args.layout,
                     data_layout=args.layout_of_data, alpha="drop" if args.drop_alpha else "refuse")
    if not _leader(args):
        return 0
    size = "x".join(map(str, res["samples"].shape[-2:]))
    print(f"wrote {res['out']} and {res['npz']}: {args.n} {args.machine.upper()} samples of {size} from "
          f"{res['train_images']} training images in {res['seconds']:.1f}s")
    return 0


# the train options' defaults without --preset (with a preset, an option given overrides the preset's value)
TRAIN_DEFAULTS = dict(data="default", arch="resnet", width=128, depth=6, widths="64,128,256", attention=False,
                      padding="zeros", conditional=False, steps=10000, batch_size=128, lr=2e-4, weight_decay=0.0,
                      ema=0.999, seed=0)
ARCH_OPTIONS = {"resnet": ("width", "depth"), "unet": ("widths", "attention")}  # the options of one arch only


def _train(args) -> int:
    from ..io.files import check_output
    from ..networks import TrainConfig, train

    if args.list_presets:
        from .train_preset import list_presets

        list_presets(device=args.device)
        return 0
    if args.out is None:
        raise ValueError("--out is required: the checkpoint folder to write (or resume)")
    if args.out.endswith(".safetensors"):
        check_output(args.out, suffixes=(".safetensors",), what="the checkpoint")
    else:
        check_output(args.out, folder=True, what="the checkpoint folder")
    if args.preset is not None:
        return _train_preset(args)
    arch = args.arch or TRAIN_DEFAULTS["arch"]
    wrong = [k for a, keys in ARCH_OPTIONS.items() if a != arch for k in keys if getattr(args, k) is not None]
    if wrong:
        raise ValueError(f"--{wrong[0]} is not an option of a {arch} (its options: "
                         f"{', '.join('--' + k for k in ARCH_OPTIONS[arch])}, --padding)")
    for key, value in TRAIN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    widths = _ints(args.widths, "--widths", 1, 4096) if args.arch == "unet" else None
    images, labels = _load_data(args)
    if args.conditional and len(set(labels.tolist())) < 2:
        raise ValueError(f"--conditional: every image of --data {args.data} has label {int(labels[0])} (a file "
                         "without labels reads as all 0); a class-conditional network needs at least two classes")
    ncls = int(labels.max()) + 1 if args.conditional else 0
    if args.arch == "resnet":
        cfg = dict(arch="resnet", channels=images.shape[1], width=args.width, depth=args.depth,
                   padding=args.padding, num_classes=ncls)
    else:
        cfg = dict(arch="unet", channels=images.shape[1], widths=widths,
                   padding=args.padding, num_classes=ncls, attention=args.attention)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     ema_decay=args.ema, seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device)
    train(cfg, images, labels, out=args.out, config=tc, progress=not args.quiet, override=args.override_settings)
    from ..networks.checkpoint import load as load_checkpoint

    step = int(load_checkpoint(args.out, ema=False)[1].get("step", args.steps))
    if step > args.steps:  # a finished checkpoint past --steps is returned as it is: nothing was trained or written
        print(f"kept {args.out}: its checkpoint is already at step {step}, past --steps {args.steps}; nothing was "
              "trained (another --out trains a new network)")
        return 0
    file = args.out if args.out.endswith(".safetensors") else os.path.join(args.out, "model.safetensors")
    print(f"wrote {file} ({args.arch}, {len(images)} images, {args.steps} steps)")
    return 0


def _train_preset(args) -> int:
    """``train --preset NAME``: the preset's recipe, each option given on the command line overriding it."""
    from .train_preset import run_preset

    overrides = dict(data=args.data, limit=args.limit, arch=args.arch, width=args.width, depth=args.depth,
                     widths=None if args.widths is None else _ints(args.widths, "--widths", 1, 4096),
                     attention=args.attention, padding=args.padding, conditional=args.conditional, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, ema_decay=args.ema,
                     seed=args.seed)
    res = run_preset(args.preset, args.out, overrides, device=args.device, checkpoint_every=args.checkpoint_every,
                     progress=not args.quiet, override=args.override_settings,
                     data_options=dict(download=args.download, layout=args.layout_of_data,
                                       alpha="drop" if args.drop_alpha else "refuse"))
    r = res["recipe"]
    print(f"wrote {args.out} (preset {args.preset}: {r['network']['arch']}, {r['data']}, {r['train']['steps']} steps)")
    return 0


def _convert(args) -> int:
    from ..io.files import check_output
    from ..networks.convert import convert

    if args.out.endswith(".safetensors"):
        check_output(args.out, suffixes=(".safetensors",), what="the checkpoint")
    else:
        check_output(args.out, folder=True, what="the checkpoint folder")
    info = convert(args.source, args.out)
    chk = info["check"]
    print(f"wrote {args.out}: {info['config']['arch']} {info['config']}; eps agrees with the TorchScript module on "
          f"{chk['inputs']} inputs to {chk['max_abs_eps_difference']:.2g} (max |eps| {chk['max_abs_eps']:.3g})")
    return 0


def _load_data(args):
    """The training images of ``--data`` with the data options of the command (``--limit``, ``--layout``,
    ``--drop-alpha``, ``--download``)."""
    from .. import data

    return data.load(args.data, limit=args.limit, download=args.download, layout=args.layout_of_data,
                     alpha="drop" if args.drop_alpha else "refuse")


def _leader(args) -> bool:
    """Whether this process prints and writes: the only one, or rank 0 of a torchrun job."""
    return args.layout is None or args.layout.leader


def _machine(args, name, images, labels, **kw):
    """The machine called ``name`` over ``images``: key-sharded over the ranks under torchrun."""
    from ..machines import make_machine

    if args.layout is None:
        return make_machine(name, images, labels, **kw)
    return args.layout.machine(name, images, labels, **kw)


def _setup(args, fields: dict):
    """Network, data, machine factory inputs, seeds and labels shared by calibrate and compare; under torchrun the
    ranks then agree on all of it and on ``fields`` (the command's own settings) before any collective."""
    import numpy as np
    import torch

    from ..data.cifar import check_labels
    from ..diffusion.denoisers import NetworkDenoiser
    from ..io.files import read_npz
    from ..io.runstate import array_digest, module_digest
    from ..networks import load_network, network_channels, network_classes

    net = load_network(args.network)
    images, labels = _load_data(args)
    channels = network_channels(net)
    if channels is not None and channels != images.shape[1]:
        raise ValueError(f"--network {args.network} takes {channels}-channel images, but --data {args.data} holds "
                         f"{images.shape[1]}-channel images of shape {tuple(images.shape[1:])}; give data with "
                         f"{channels} channel(s)")
    classes = network_classes(net)  # 0: unconditional, None: cannot be told
    cond = args.conditional
    if cond is None:
        cond = bool(classes)
    elif cond and classes == 0:
        raise ValueError(f"--conditional: the network {args.network} is unconditional (it has no class embedding)")
    elif not cond and classes:
        # the user asked for it: the network runs without its class embedding (NetworkDenoiser warns)
        net = NetworkDenoiser(net, conditional=False)
    if args.seeds_file:
        z = read_npz(args.seeds_file, "a readable seeds .npz (--seeds-file)", ("seeds", "labels"))
        if "seeds" not in z:
            raise ValueError(f"--seeds-file {args.seeds_file} is not a readable seeds .npz: it has no 'seeds' array")
        seeds = z["seeds"][: args.seeds]
        lab = z["labels"][: args.seeds] if "labels" in z else None
        if seeds.dtype.kind != "f" or seeds.ndim != 4 or len(seeds) == 0 or not np.all(np.isfinite(seeds)):
            raise ValueError(f"--seeds-file {args.seeds_file}: 'seeds' must be finite floats (M, C, H, W), got "
                             f"{seeds.dtype} of shape {seeds.shape}")
        x1 = torch.from_numpy(seeds.astype(np.float32))
        y = None if lab is None else torch.from_numpy(check_labels(lab, len(seeds), args.seeds_file))
    else:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be positive, got {args.seeds}")
        from ..validation import check_memory

        check_memory(4 * args.seeds * int(np.prod(images.shape[1:])) * 4, f"--seeds {args.seeds} noise seeds")
        gen = torch.Generator().manual_seed(args.seed)
        x1 = torch.randn((args.seeds,) + tuple(images.shape[1:]), generator=gen)
        classes = np.unique(labels.numpy())
        y = torch.from_numpy(classes[np.arange(args.seeds) % len(classes)])
    if x1.shape[1:] != images.shape[1:]:
        raise ValueError(f"--seeds-file {args.seeds_file}: seeds of shape {tuple(x1.shape[1:])}, but the training "
                         f"images of --data {args.data} are {tuple(images.shape[1:])}")
    if not cond:
        y = None
    elif y is None:
        raise ValueError("a conditional comparison needs labels (the seeds file has none)")
    if args.layout is not None:  # every rank must hold the same network, data, seeds and settings
        args.layout.agree(dict(fields, command=args.command, network=module_digest(net),
                               data=array_digest(images, labels), train_shape=list(images.shape),
                               seeds=x1, labels=y, conditional=bool(cond), steps=args.steps, boundary=args.boundary,
                               torch=torch.__version__), f"patchmosaic {args.command}")
    return net, images, (labels if cond else None), x1, y


def _calibrate(args) -> int:
    from .calibrate import calibrate
    from ..diffusion.samplers import time_grid
    from ..io.files import check_output
    from ..io.plots import kschedule_plot, save_figure

    ext = os.path.splitext(args.out)[1].lower()
    if ext[1:] in FIGURE_FORMATS:
        raise ValueError(f"--out is the k-schedule JSON; {args.out!r} has the figure extension {ext} (the plot is "
                         f"written beside it, as OUT with the --figure-format extension); give a .json path")
    check_output(args.out, suffixes=(".json",), what="the k-schedule JSON")
    plot = os.path.splitext(args.out)[0] + "." + args.figure_format
    if not args.blend:
        check_output(plot, option="--out (its plot)", what="the k-schedule plot")
    state = args.state or args.out + ".state.npz"
    check_output(state, suffixes=(".npz",), option="--state", what="the resumable state")
    if args.blend:
        return _calibrate_blend(args, state)
    if args.machine is None:
        args.machine = "els"
    param = MACHINES[args.machine].parameter
    cands = (_ints(args.candidates, "--candidates", 1) if param in ("k", "p")
             else _numbers(args.candidates, "--candidates"))
    net, images, labels, x1, y = _setup(args, dict(machine=args.machine, k_max=args.k_max, candidates=cands))
    machine = _machine(args, args.machine, images, labels, boundary=args.boundary)
    c = calibrate(net, machine, x1, y, candidates=cands, k_max=args.k_max, grid=time_grid(args.steps),
                  state=state, progress=not args.quiet, layout=args.layout, median=args.median)
    if not _leader(args):
        return 0
    c.to_json(args.out, network=args.network, machine=args.machine, seeds=int(x1.shape[0]))
    save_figure(kschedule_plot({args.machine: c.schedule}, c.choices, c.schedule.times,
                               title=os.path.basename(args.network)), plot)
    print(f"wrote {args.out} and {plot}: {param} per step {list(c.schedule.values)} (t = 1 -> {1 / args.steps:g})")
    return 0


def _calibrate_blend(args, state: str) -> int:
    """``calibrate --blend FIRST+SECOND``: the weight of FIRST per step (a weight-schedule JSON at --out)."""
    from .blend_calibration import calibrate_blend
    from ..diffusion.denoisers import MachineDenoiser
    from ..diffusion.samplers import time_grid

    if args.machine is not None or args.k_max is not None:
        raise ValueError("--blend calibrates the blend's weights: leave out --machine and --k-max (each part is "
                         "given with its own schedule in FIRST+SECOND)")
    if args.layout is not None:
        raise ValueError("--blend runs in one process (not under torchrun)")
    parts, _ = _blend_spec(args.blend, args.steps, weights=False)
    cands = _numbers(args.candidates, "--candidates")
    net, images, labels, x1, y = _setup(args, dict(blend=args.blend, candidates=cands))
    first, second = (MachineDenoiser(_machine(args, name, images, labels, boundary=args.boundary), ks)
                     for name, ks in parts)
    c = calibrate_blend(net, first, second, x1, y, candidates=cands, grid=time_grid(args.steps), state=state,
                        progress=not args.quiet, median=args.median)
    c.to_json(args.out, network=args.network, blend=args.blend, seeds=int(x1.shape[0]))
    print(f"wrote {args.out}: the weight of {args.blend.split('+')[0]} per step {list(c.schedule.weights)} "
          f"(t = 1 -> {1 / args.steps:g})")
    return 0


def _machine_spec(spec: str, steps: int, option: str):
    """``NAME`` or ``NAME=SCHEDULE`` of ``--machine`` (and of a blend's parts): the machine's name and its schedule
    (None for a machine without a per-step parameter), or a ValueError naming the problem."""
    from ..diffusion.kschedule import schedule_from_spec

    name, _, ks = spec.partition("=")
    if name not in MACHINES:
        raise ValueError(f"{option} takes NAME=SCHEDULE or NAME with NAME one of {', '.join(MACHINES)}, got {spec!r}")
    param = MACHINES[name].parameter
    if param is None and ks:
        raise ValueError(f"{option} {name} takes no k-schedule (it has no per-step parameter), got {spec!r}")
    if param == "k" and not ks:
        raise ValueError(f"{option} {name} needs a k-schedule: {name}=7, {name}=paper:NAME or {name}=FILE.json")
    if param == "p" and not ks:
        raise ValueError(f"{option} {name} needs a patch-size schedule: {name}=8 (any size), {name}=pspc (the "
                         f"published one) or {name}=FILE.json")
    try:
        return name, (schedule_from_spec(param, ks, steps) if ks else None)
    except ValueError as e:
        raise ValueError(f"{option} {spec}: {e}") from None


def _blend_spec(spec: str, steps: int, weights: bool):
    """``FIRST+SECOND`` (calibrate) or ``FIRST+SECOND@WEIGHT`` (compare; WEIGHT a number in [0, 1] or a weight-schedule
    JSON) of ``--blend``: the two parts as :func:`_machine_spec` reads them, and the weight (None for calibrate)."""
    from ..diffusion.blend import WeightSchedule, check_weight

    pair, at, w = spec.partition("@")
    parts = pair.split("+")
    form = "FIRST+SECOND@WEIGHT (e.g. els=ks.json+wiener@weights.json or @0.6)" if weights else \
        "FIRST+SECOND (e.g. els=ks.json+wiener)"
    if len(parts) != 2 or not all(parts) or bool(at) != weights or (weights and not w):
        raise ValueError(f"--blend takes {form}, got {spec!r}")
    parts = tuple(_machine_spec(p, steps, "--blend") for p in parts)
    if not weights:
        return parts, None
    try:
        weight = WeightSchedule.from_json(w) if w.lower().endswith(".json") else check_weight(float(w))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--blend {spec}: {e}") from None
    if isinstance(weight, WeightSchedule) and len(weight.times) != steps:
        raise ValueError(f"--blend {spec}: the weight schedule has {len(weight.times)} steps, the run {steps}")
    return parts, weight


def _compare(args) -> int:
    from .compare import compare, nearest_training
    from ..diffusion.blend import BlendDenoiser
    from ..diffusion.denoisers import MachineDenoiser
    from ..io.files import check_output
    from ..io.plots import comparison_grid, save_figure, scatter

    check_output(args.out, folder=True, what="the comparison folder")
    specs, blends = {}, {}
    for spec in args.machine or []:
        name, ks = _machine_spec(spec, args.steps, "--machine")
        label = {"is": "IS", "wiener": "Wiener"}.get(name, spec)
        if label in specs:
            raise ValueError(f"--machine {spec} is given twice")
        specs[label] = (name, ks)
    for spec in args.blend or []:
        if spec in blends:
            raise ValueError(f"--blend {spec} is given twice")
        blends[spec] = _blend_spec(spec, args.steps, weights=True)
    net, images, labels, x1, y = _setup(args, dict(
        batch=args.batch, machines={label: [name, None if k is None else [list(k.times), list(k.values)]]
                                    for label, (name, k) in specs.items()}, blends=sorted(blends)))
    machines = {}
    for label, (name, ks) in specs.items():
        m = _machine(args, name, images, labels, boundary=args.boundary)
        machines[label] = MachineDenoiser(m, ks)
    for label, (parts, w) in blends.items():
        machines[label] = BlendDenoiser(*(MachineDenoiser(_machine(args, name, images, labels, boundary=args.boundary),
                                                          ks) for name, ks in parts), w)
    if "IS" not in machines:
        machines["IS"] = MachineDenoiser(_machine(args, "is", images, labels))
    rep = compare(net, machines, x1, y, grid=None, steps=args.steps, batch_size=args.batch, out_dir=args.out,
                  progress=not args.quiet,
                  info={"network": args.network, "data": args.data, "train_images": int(len(images))},
                  layout=args.layout)
    if not _leader(args):
        return 0
    local = [n for n in machines if n not in ("IS", "Wiener")]
    r = rep["per_seed"]
    ext = "." + args.figure_format
    if local:
        other = local[0].split("=")[0].upper() if local[0] not in blends else "the blend"
        save_figure(scatter(r["IS"]["r"], r[local[0]]["r"], xlabel="Pearson r of IS with the network",
                            ylabel=f"Pearson r of {other} with the network", title=os.path.basename(args.network)),
                    os.path.join(args.out, "scatter" + ext))
    u = rep["samples"]["network"]
    n = min(8, x1.shape[0])
    near = nearest_training(u[:n], images, None if y is None else y[:n], labels)
    rows = [x1[:n], u[:n]] + [rep["samples"][m][:n] for m in machines] + [images[near]]
    names = ["noise", "network"] + [m.split("=")[0] if m not in blends else "blend" for m in machines] + ["nearest"]
    save_figure(comparison_grid(rows, names), os.path.join(args.out, "grid" + ext))
    for name, s in rep["summary"].items():
        beats = s.get("frac_beats_IS_r")
        if "frac_beats_IS_r" not in s:
            extra = ""
        elif beats is None:  # (no seed where both r are defined: e.g. every network sample constant)
            extra = ", r undefined on every seed"
        else:
            extra = f", beats IS on {beats:.0%} of seeds"
        print(f"{name}: median r {s['r']['median']:.3f} [IQR {s['r']['q25']:.3f}, {s['r']['q75']:.3f}], "
              f"median R2 {s['R2']['median']:.3f}{extra}")
    print(f"wrote {args.out}/report.json, grid{ext}" + (f", scatter{ext}" if local else ""))
    return 0


def _add_run_options(p, out_help):
    p.add_argument("--network", required=True,
                   help="trained eps network: a patchmosaic checkpoint directory / .safetensors, or a TorchScript file")
    p.add_argument("--data", default="default", help=DATA_HELP + " (default: %(default)s)")
    p.add_argument("--download", action="store_true",
                   help="fetch a named data set (mnist, fashion-mnist, cifar10, celeba) with torchvision if it is missing")
    p.add_argument("--limit", type=_int(1), default=None, help="use only the first LIMIT training images")
    _add_data_format(p)
    p.add_argument("--seeds", type=_int(1), default=16, help="number of noise seeds (default: %(default)s)")
    p.add_argument("--seed", type=_int(0, MAX_SEED), default=0,
                   help="seed of the noise generator (default: %(default)s)")
    p.add_argument("--seeds-file", default=None,
                   help="npz with 'seeds' (M, C, H, W) and optionally 'labels' (M,) to use instead of fresh noise "
                        "(e.g. a reference network's ddim20_samples.npz)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--conditional", dest="conditional", action="store_true", default=None,
                   help="class-conditional network and machines (default: read from the network)")
    g.add_argument("--unconditional", dest="conditional", action="store_false", help="ignore labels")
    p.add_argument("--boundary", default="zeros", choices=["zeros", "circular"],
                   help="ELS boundary: 'zeros' (boundary-aware, for zero-padded networks) or 'circular' "
                        "(periodic) (default: %(default)s)")
    p.add_argument("--steps", type=_int(1, MAX_STEPS), default=20,
                   help="DDIM steps on the grid t_i = i/steps (default: %(default)s)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--figure-format", default="png", choices=list(FIGURE_FORMATS),
                   help="file format of the figures written beside the results (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_key_shards(p)


def _add_data_format(p):
    p.add_argument("--layout", dest="layout_of_data", default=None, choices=["NHWC", "NCHW"],
                   help="where an .npz file's channel axis is, when its shape leaves it open (e.g. 3x3 RGB images: "
                        "(N, 3, 3, 3)); default: read from the shape")
    p.add_argument("--drop-alpha", action="store_true",
                   help="drop an alpha channel of the images (RGBA / grey+alpha); refused without it")


def _add_key_shards(p):
    p.add_argument("--key-shards", type=_int(1), default=None,
                   help="under torchrun: ranks that share the training images of a machine (a divisor of the number "
                        "of ranks; the others split the seeds). Default: $PATCHMOSAIC_KEY_SHARDS, else all ranks")


def version_text() -> str:
    """What ``patchmosaic --version`` prints: the version, the CPU engine variant in use and those runnable
    here, and the CUDA engine's state."""
    import torch

    from .. import __version__, ops

    cuda = ("available" if ops.cuda_available() else "built, no device") if ops.cuda_built() else "not built"
    variants = ", ".join(f"{k} ({v})" for k, v in ops.cpu_variants().items())
    return (f"patchmosaic {__version__} (torch {torch.__version__}); CPU engine: {ops.cpu_variant()} "
            f"[runnable here: {variants}]; CUDA engine: {cuda}")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help=kw.get("help"))

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="patchmosaic", description="Equivariant local score machines: patch mosaics.")
    p.add_argument("--version", action=_Version,
                   help="print the version, the CPU engine variant in use (and those this CPU can run) and the "
                        "CUDA engine's state")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sample digits with the boundary-aware ELS machine from the built-in data",
                       description="Sample digits with the boundary-aware ELS machine from the built-in 2,000 "
                                   "MNIST digits and write a PNG: noise, sample, nearest training image, provenance.")
    d.add_argument("--out", default="patchmosaic_demo.png", help="PNG to write (default: %(default)s)")
    d.add_argument("--n", "--samples", dest="n", type=_int(1), default=8,
                   help="number of seeds, one digit class each (default: %(default)s)")
    d.add_argument("--steps", type=_int(1, MAX_STEPS), default=20,
                   help="DDIM steps on the grid t_i = i/steps (default: %(default)s)")
    d.add_argument("--seed", type=_int(0, MAX_SEED), default=0,
                   help="seed of the noise generator (default: %(default)s)")
    d.add_argument("--train-per-class", type=_int(1), default=None,
                   help="use only this many training digits per class (default: all 200)")
    d.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "cuda"],
                   help="engine (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    s = sub.add_parser("sample", help="sample a machine from any data set, on a canvas of any size",
                       description="Run DDIM (or DDPM) with a machine on a data set and write a PNG (samples, then "
                                   "their provenance maps) and an .npz of the samples. Canvases larger than the "
                                   "training images work with the boundary-aware ELS machine.")
    s.add_argument("--data", default="default", help=DATA_HELP + "; also 'skimage:NAME' photographs "
                   "(with --crop) and named sets mnist, fashion-mnist, cifar10, celeba (default: %(default)s)")
    s.add_argument("--download", action="store_true",
                   help="fetch a named data set (mnist, fashion-mnist, cifar10, celeba) with torchvision if it is missing")
    s.add_argument("--crop", type=_int(1), default=None, help="skimage photographs: train on all CROPxCROP crops")
    s.add_argument("--force", action="store_true",
                   help="run on training images larger than 128x128 without --crop or --canvas (refused otherwise, "
                        "with the run's size and estimated time)")
    s.add_argument("--stride", type=_int(1), default=None, help="stride of those crops (default: CROP/2)")
    s.add_argument("--limit", type=_int(1), default=None, help="use only the first LIMIT training images")
    _add_data_format(s)
    s.add_argument("--classes", default=None, help="comma-separated classes of the data set to keep")
    s.add_argument("--labels", default=None, help="comma-separated label per seed (cycled) for a class-conditional "
                   "machine (default: unconditional)")
    s.add_argument("--machine", default="els", choices=[n for n in MACHINES if n != "wiener"],
                   help="machine: " + "; ".join(f"{n}: {MACHINES[n].help}" for n in MACHINES if n != "wiener")
                        + " (default: %(default)s)")
    s.add_argument("--boundary", default="zeros", choices=["zeros", "circular"],
                   help="ELS boundary: boundary-aware ('zeros') or periodic (default: %(default)s)")
    s.add_argument("--k", default=None,
                   help="the machine's parameter per step: its patch size, an odd int, ramp:K_FIRST:K_LAST, paper:NAME "
                        "or a k-schedule JSON (default: paper:MNIST_ResNet_zeros); for pca a threshold in (0, 1] or "
                        "a threshold-schedule JSON (default: the machine's); for pspc a size (even too), a JSON file "
                        "or pspc (the published schedule)")
    s.add_argument("--canvas", default=None, help="output size HxW, e.g. 256x256 (default: the training size)")
    s.add_argument("--n", "--samples", dest="n", type=_int(1), default=4,
                   help="number of samples; under torchrun write --samples (torchrun reads --n as its own option) "
                        "(default: %(default)s)")
    s.add_argument("--steps", type=_int(1, MAX_STEPS), default=20,
                   help="reverse-process steps on t_i = i/steps (default: %(default)s)")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="(default: %(default)s)")
    s.add_argument("--seed", type=_int(0, MAX_SEED), default=0,
                   help="seed of the noise generator (default: %(default)s)")
    s.add_argument("--provenance", default="image", choices=["image", "position"],
                   help="colour the provenance map by the winning patch's training image or by its position in "
                        "that image (default: %(default)s)")
    s.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "cuda"], help="engine (default: %(default)s)")
    s.add_argument("--out", default="patchmosaic_sample.png", help="PNG to write; the .npz goes beside it "
                   "(default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_key_shards(s)
    s.set_defaults(func=_sample)

    t = sub.add_parser("train", help="train a ResNet or UNet eps-prediction network, or a preset's",
                       description="Train one of the paper's CNN diffusion networks by eps-prediction on the "
                                   "cosine-legacy schedule (AdamW, EMA), from options or from a named recipe "
                                   "(--preset: the reference networks' and small ones; a time estimate measured "
                                   "here comes first, the network's reference samples ddim20_samples.npz last). "
                                   "Checkpoints (safetensors + config.json) go to --out; rerunning the same command "
                                   "resumes from the last checkpoint.")
    t.add_argument("--preset", default=None, metavar="NAME",
                   help="train from a named recipe (data, network, steps, optimiser; --list-presets shows them): "
                        "the options below given on the command line override the preset's values")
    t.add_argument("--list-presets", action="store_true",
                   help="list the presets, with a time estimate measured here on --device, and stop")
    t.add_argument("--data", default=None, help=DATA_HELP + " (default: default)")
    t.add_argument("--download", action="store_true",
                   help="fetch a named data set (mnist, fashion-mnist, cifar10, celeba) with torchvision if it is missing")
    t.add_argument("--limit", type=_int(1), default=None, help="use only the first LIMIT training images")
    _add_data_format(t)
    t.add_argument("--arch", default=None, choices=["resnet", "unet"], help="network family (default: resnet)")
    t.add_argument("--width", type=_int(2, 4096), default=None, help="ResNet channels (default: 128)")
    t.add_argument("--depth", type=_int(0, 1024), default=None, help="ResNet inner 3x3 convolutions (default: 6)")
    t.add_argument("--widths", default=None, help="UNet channels per level (default: 64,128,256)")
    t.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet: self-attention at the coarsest level (default: off)")
    t.add_argument("--padding", default=None, choices=["zeros", "circular"],
                   help="convolution padding (default: zeros)")
    t.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="add a class embedding (labels from the data) (default: off)")
    t.add_argument("--steps", type=_int(1, 100 * MAX_STEPS), default=None, help="optimiser steps (default: 10000)")
    t.add_argument("--batch-size", type=_int(1, 1 << 20), default=None, help="images per step (default: 128)")
    t.add_argument("--lr", type=_float(0, 1, lo_open=True), default=None,
                   help="AdamW learning rate, in (0, 1] (default: 0.0002)")
    t.add_argument("--weight-decay", type=_float(0, 1e6), default=None, help="AdamW weight decay (default: 0)")
    t.add_argument("--ema", type=_float(0, 1, hi_open=True), default=None,
                   help="EMA decay of the weights, 0 = off (default: 0.999)")
    t.add_argument("--seed", type=_int(0, MAX_SEED), default=None,
                   help="seed of the initial weights, data order and noise (default: 0)")
    t.add_argument("--override-settings", action="store_true",
                   help="resume a checkpoint with other optimiser settings (batch size, lr, weight decay, EMA, seed) "
                        "or other training data; without it that is refused. The checkpoint records which settings "
                        "and data applied from which step")
    t.add_argument("--checkpoint-every", type=_int(1), default=500,
                   help="steps between checkpoints (default: %(default)s)")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (bf16 autocast on cuda) (default: %(default)s)")
    t.add_argument("--out", default=None, help="checkpoint directory (resumed if it exists); required unless "
                   "--list-presets")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    v = sub.add_parser("convert", help="convert a TorchScript eps network into a patchmosaic checkpoint",
                       description="Read a TorchScript ResNet or UNet of this package's families (such as the "
                                   "reference networks' model.pt), build the same network here, check that both give "
                                   "the same eps, and write it as a safetensors checkpoint plus config.json (no "
                                   "TorchScript needed to load it).")
    v.add_argument("source", help="the TorchScript file (e.g. model.pt)")
    v.add_argument("out", help="checkpoint folder (or .safetensors file) to write")
    v.set_defaults(func=_convert)

    c = sub.add_parser("calibrate", help="calibrate a machine's k-schedule against a trained network",
                       description="Along the network's own DDIM trajectories, pick per step and seed the patch "
                                   "size whose machine score is most cosine-similar to the network's; the schedule "
                                   "is the per-step median over seeds. Writes a k-schedule JSON with the per-seed "
                                   "choices and a plot of it beside (OUT with the --figure-format extension); "
                                   "resumes from --state.")
    _add_run_options(c, "k-schedule JSON to write (not a .png/.svg/.pdf path: the plot is written beside it)")
    c.add_argument("--machine", default=None, choices=[n for n in MACHINES if MACHINES[n].parameter],
                   help="machine to calibrate: its patch size k per step (datalocal: its neighbourhood holds k^2 "
                        "pixels), or pca's threshold (default: els)")
    c.add_argument("--blend", default=None, help="calibrate instead the weight of FIRST per step in a blend "
                   "FIRST+SECOND, each part as for compare --machine (e.g. els=ks.json+wiener); writes a weight-schedule "
                   "JSON for compare --blend FIRST+SECOND@OUT (--candidates: weights in [0, 1], default 0, 0.1, ..., 1)")
    c.add_argument("--k-max", type=_int(1), default=None, help="largest candidate k (default: 31 or 2*size-1)")
    c.add_argument("--candidates", default=None, help="comma-separated candidate k's (overrides --k-max), or "
                   "thresholds in (0, 1] for pca (default: 0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2)")
    c.add_argument("--state", default=None, help="resumable state file (default: OUT.state.npz)")
    c.add_argument("--median", default="rounded", choices=["rounded", "lower"],
                   help="per step, the seeds' median rounded to the nearest candidate (default; the smaller of two "
                        "equally near) or their lower median (the rule before 2026-12-07)")
    c.set_defaults(func=_calibrate)

    m = sub.add_parser("compare", help="sample network and machines from the same seeds and compare them",
                       description="Sample the network and each machine with DDIM from the same seeds and labels; "
                                   "per seed Pearson r, R2 and MSE against the network (IS is always included as "
                                   "the baseline). Writes report.json, grid.png and scatter.png (or .svg/.pdf by "
                                   "--figure-format) to --out; "
                                   "resumes from the sample files there.")
    _add_run_options(m, "output directory")
    m.add_argument("--machine", action="append", default=None,
                   help="machine and its per-step parameter: els=K, ls=K, datalocal=K with K an odd int, paper:NAME "
                        "or a JSON file (datalocal: a neighbourhood of K^2 pixels), pca or pca=THRESHOLD (a number in "
                        "(0, 1] or a threshold-schedule JSON), pspc=P (any size, a JSON file, or pspc: the published "
                        "schedule), or is / wiener / scfdm (no parameter); repeatable (default without --blend: "
                        "els=paper:MNIST_ResNet_zeros)")
    m.add_argument("--blend", action="append", default=None,
                   help="a blend of two machines, FIRST+SECOND@WEIGHT: each part as for --machine, WEIGHT the first's "
                        "weight, a number in [0, 1] or a weight-schedule JSON (calibrate --blend writes one); e.g. "
                        "els=ks.json+wiener@weights.json; repeatable")
    m.add_argument("--batch", type=_int(1), default=8, help="seeds sampled together (default: %(default)s)")
    m.set_defaults(func=_compare)
    return p


def _saved(args) -> str:
    """What an interrupted run leaves behind, in words (for the Ctrl-C message)."""
    import glob
    import json

    cmd = args.command
    if cmd in ("demo", "sample"):
        return "nothing was written (the files are written at the end)"
    if cmd == "train":
        if args.list_presets or args.out is None:
            return "nothing was written"
        from ..networks.checkpoint import side_file

        try:
            with open(side_file(args.out, "config.json")) as f:
                step = json.load(f)["info"]["step"]
            return f"the checkpoint of step {step} in {args.out} is kept: rerun the same command to resume"
        except (OSError, ValueError, KeyError, TypeError):
            first = args.checkpoint_every if args.steps is None else min(args.checkpoint_every, args.steps)
            return (f"no checkpoint was written yet (the first comes at step {first}); rerunning the same command "
                    "starts over")
    if cmd == "calibrate":
        state = args.state or args.out + ".state.npz"
        if os.path.exists(state):
            return f"the finished steps are kept in {state}: rerun the same command to resume"
        return "no step had finished (nothing was written)"
    if cmd == "compare":
        if glob.glob(os.path.join(args.out, "*.npz")):
            return f"the finished batches are kept in {args.out}: rerun the same command to resume"
        return "no batch had finished (nothing was written)"
    return "nothing was saved"


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'") and msg.endswith("'"):
        msg = f"missing entry {msg}"
    return msg.splitlines()[0] if msg else type(e).__name__


EXPECTED = (ValueError, TypeError, RuntimeError, OSError, KeyError, EOFError, zlib.error, zipfile.BadZipFile)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is _compare and args.machine is None and not args.blend:
        args.machine = ["els=paper:MNIST_ResNet_zeros"]
    args.layout = None

    def report(msg: str) -> None:
        rank = "" if args.layout is None else f" (rank {args.layout.rank})"
        print(f"patchmosaic {args.command}{rank}: {msg}", file=sys.stderr)

    def leave(code: int, msg: Optional[str] = None) -> int:
        """Under torchrun: a rank that fails before the ranks agreed tells the others (they stop with its message
        instead of waiting for it); after a failed collective, leave at once (a broken group cannot be torn down)."""
        if args.layout is not None:
            from ..distributed import launch

            if msg is not None and not args.layout.agreed and not launch.broken():
                try:
                    args.layout.agree(None, f"patchmosaic {args.command}", error=msg)
                except Exception:
                    pass
            if launch.broken() or code == 130:
                launch.exit_now(code)
        return code

    try:
        if args.command in ("sample", "calibrate", "compare"):
            from ..distributed import launch

            if launch.launched():  # one of torchrun's ranks: join the job, split the work
                from ..distributed.queries import Layout

                launch.init()
                try:
                    args.layout = Layout(args.key_shards)
                except ValueError:
                    args.layout = Layout(1)  # a layout every rank can make, to tell the others why this one stops
                    raise
        return args.func(args)
    except KeyboardInterrupt:
        report(f"interrupted; {_saved(args)}")
        return leave(130)
    except MemoryError as e:
        from ..validation import ResourceError

        msg = str(e) if isinstance(e, ResourceError) else \
            f"out of memory{': ' + str(e) if str(e) else ''}; use a smaller batch, canvas or data set"
        report(f"error: {msg}")
        return leave(2, msg)
    except EXPECTED as e:
        msg = _one_line(e)
        if isinstance(e, RuntimeError) and ("alloc" in msg.lower() or "out of memory" in msg.lower()):
            msg = f"out of memory ({msg}); use a smaller batch, canvas or data set"
        report(f"error: {msg}")
        return leave(2, msg)
    except Exception as e:  # a bug: still one line, and a different exit code
        msg = f"internal error: {type(e).__name__}: {_one_line(e)} (a bug in patchmosaic; please report it)"
        report(msg)
        return leave(1, msg)
    finally:
        if args.layout is not None:
            from ..distributed import launch

            launch.shutdown()


if __name__ == "__main__":
    sys.exit(main())
