"""Every analytic machine against every reference network (issues 19 and 27): IS, LS, boundary-aware (or periodic)
ELS, the Wiener filter, the data-driven locality machine (DataLocal), PCA-locality with the published threshold and
with a calibrated threshold schedule, PSPC-Square with a calibrated patch-size schedule and with its published
schedule, PSPC-Flex (crops from the network's own sensitivity heatmaps, the published mass schedule) and a filtered
posterior mean collection variant (--fpmc), and the blends of calibrated ELS with the Wiener filter (Blend) and with
calibrated DataLocal (Blend-DL), of Blend-DL with the Wiener filter (Blend-3), and of the FPMC variant with the Wiener
filter (Blend-F) (``pm.BlendDenoiser``: the parts with
their own schedules, the first part's weight calibrated per step by ``pm.calibrate_blend``), all sampled from the same seeds as the network and scored seed by seed
(Pearson r, R^2), each against calibrated ELS by paired per-seed differences with bootstrap intervals. The calibrated
schedules are each calibrated against the network on the same seeds, training images and candidates.

    python bench/all_machines.py --networks all --limit 2000 --seeds 32 --calib-seeds 2 --median lower --k-max 15

The softmax machines use the first --limit training images of the network's data set (a reduced size for this 2-core
CPU); the Wiener filter, DataLocal's neighbourhoods and PCA-locality's masks use the statistics of the network's whole
training set (for PCA-locality: its machine holds the --limit images, its masks come from the covariance of those).
The published settings: PCA-locality's threshold 0.005 (MNIST, Fashion-MNIST) and 0.05 (CIFAR-10); PSPC's CIFAR-10
schedules (the patch size, and Flex's mass tau) mapped to our time by the nearest EDM noise level, with the source's
left-right mirrors (their default). Flex's heatmaps are the network's mean absolute input gradient per output pixel
(--heatmap-samples noisy inputs per time, at the steps' times where tau < 1), cached per network.

Writes per network under --out: calibration_<machine>.json, heatmaps.npz, report.json (every machine in ``summary``
and ``per_seed``), grid.png; and the tables between the markers ``<!-- all-machines:begin/end -->`` of each --md file
plus bench/results/all_machines/grid_all.png. Resumable per network and machine: finished calibrations, heatmaps and
per-machine sample files are reused by a rerun with the same settings (a machine added later is computed alone); the
calibrations do not depend on --seeds, so a rerun with more comparison seeds reuses them (remove the earlier run's
``<network>/samples_*.npz`` first: compare refuses sample files of other seeds). ``--machines`` runs a subset; the
network's earlier ``report.json`` (same seeds and settings) keeps its other machines, with their dates (``dates``,
``machines_of``), so machines can be added a few at a time.

A held-out replication compares on other reference seeds with the main run's calibrations, in a folder of its own and
a table block of its own in RESULTS (``all-machines-heldout`` for seeds 32-63, ``all-machines-seeds<first>``
for another first seed):

    python bench/all_machines.py --networks NET --limit 2000 --seeds 32 --first-seed 32 --calib-seeds 2 --median lower --k-max 15 \
        --machines ELS,Blend-3 --out bench/results/all_machines_heldout --calibration-dir bench/results/all_machines
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHARED, machine_line, write_block  # noqa: E402
from reproduce import NETWORKS, ORDER  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.diffusion.denoisers import MachineDenoiser, NetworkDenoiser  # noqa: E402
from patchmosaic.experiments.calibrate import calibrate  # noqa: E402
from patchmosaic.experiments.compare import compare  # noqa: E402
from patchmosaic.io.plots import comparison_grid, save_figure  # noqa: E402
from patchmosaic.io.runstate import write_json  # noqa: E402
from patchmosaic.networks import load_network  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MACHINES = ["IS", "LS", "ELS", "Wiener", "DataLocal", "PCA", "PCA-cal", "PSPC", "PSPC-pub", "Flex", "FPMC", "Blend",
            "Blend-DL", "Blend-3", "Blend-F"]
SHORT = {"cifar10k_resnet_zeros_cond": "CIFAR ResNet", "fmnist20k_resnet_zeros_cond": "FMNIST ResNet",
         "mnist_resnet_zeros": "MNIST ResNet", "mnist_resnet_circular": "MNIST circ.", "mnist_unet_zeros": "MNIST UNet",
         "cifar10k_unet_zeros_cond": "CIFAR UNet", "cifar10k_unet_attn_zeros_cond": "CIFAR attn"}
CALIBRATED = ["LS", "ELS", "DataLocal", "PCA-cal", "PSPC", "FPMC"]
# the blends: calibrated ELS and a second machine; Blend-3: Blend-DL and the Wiener filter (a blend of a blend);
# Blend-F: the FPMC variant (ELS with a soft window and the mirrored source) and the Wiener filter
BLENDS = {"Blend": ("ELS", "Wiener"), "Blend-DL": ("ELS", "DataLocal"), "Blend-3": ("Blend-DL", "Wiener"),
          "Blend-F": ("FPMC", "Wiener")}
PCA_THRESHOLD = {"cifar": 0.05, "mnist": 0.005, "fmnist": 0.005}  # the published (Analytic Diffusion Studio) settings
DEFAULT_FPMC = "els+soft=0.5+xflip"  # the best of bench/fpmc_explore.py on the MNIST and CIFAR-10 ResNets


def pca_threshold(network: str) -> float:
    return PCA_THRESHOLD["cifar" if network.startswith("cifar") else "fmnist" if network.startswith("fmnist") else "mnist"]


def parse_fpmc(spec: str) -> dict:
    """A filtered posterior mean collection variant: ``BASE[+OPTION...]`` with BASE ``els``, ``ls`` or ``pspc`` and
    options ``xflip`` (the source's mirrors), ``soft=C`` (ELS, LS: a Gaussian window of width C k over each step's
    k x k patch), ``prec=S`` (PSPC: Gaussian query precision of width S pixels), ``patch`` (LS: whole-patch response),
    ``resp=S`` (LS, PSPC: Gaussian response weights of width S pixels). Its size (or patch size) schedule is calibrated
    like the others'."""
    base, *opts = spec.split("+")
    if base not in ("els", "ls", "pspc"):
        raise SystemExit(f"--fpmc {spec!r}: the base must be els, ls or pspc")
    out = {"base": base, "xflip": False, "soft": None, "prec": None,
           "response": "patch" if base == "pspc" else "centre"}
    for o in opts:
        name, _, val = o.partition("=")
        if name == "xflip" and not val:
            out["xflip"] = True
        elif name == "soft" and val and base in ("els", "ls"):
            out["soft"] = float(val)
        elif name == "prec" and val and base == "pspc":
            out["prec"] = float(val)
        elif name == "patch" and not val and base == "ls":
            out["response"] = "patch"
        elif name == "resp" and val and base in ("ls", "pspc"):
            out["response"] = float(val)
        else:
            raise SystemExit(f"--fpmc {spec!r}: unknown option {o!r} for {base}")
    return out


def fpmc_machine(v: dict, images, labels, boundary):
    if v["base"] == "pspc":
        return pm.PSPC(images, labels, xflip=v["xflip"], precision=v["prec"], response=v["response"])
    if v["base"] == "ls":
        return pm.LS(images, labels, xflip=v["xflip"], response=v["response"], soft=v["soft"])
    return pm.ELS(images, labels, boundary=boundary, xflip=v["xflip"], soft=v["soft"])


def run_network(name: str, args) -> dict:
    data, full_limit, padding, _, _ = NETWORKS[name]
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    card_dir = os.path.join(SHARED, "models", name)
    card = json.load(open(os.path.join(card_dir, "card.json")))
    cond = bool(card["conditional"])
    everything, all_labels = pm.data.load(data, limit=full_limit)
    n = len(everything) if args.limit is None else min(args.limit, len(everything))
    images, labels = everything[:n], (all_labels[:n] if cond else None)
    ref = np.load(os.path.join(card_dir, "ddim20_samples.npz"))
    if args.first_seed + args.seeds > len(ref["seeds"]):
        raise SystemExit(f"{name}: --first-seed {args.first_seed} --seeds {args.seeds} asks for more than the "
                         f"{len(ref['seeds'])} reference seeds")
    # calibration on the first --calib-seeds reference seeds, comparison on --seeds of them from --first-seed
    cal_seeds = torch.from_numpy(ref["seeds"][: args.calib_seeds])
    cal_lab = torch.from_numpy(ref["labels"][: args.calib_seeds]) if cond else None
    chosen = slice(args.first_seed, args.first_seed + args.seeds)
    seeds = torch.from_numpy(ref["seeds"][chosen])
    ylab = torch.from_numpy(ref["labels"][chosen]) if cond else None
    cal_dir = os.path.join(args.calibration_dir, name) if args.calibration_dir else out
    os.makedirs(cal_dir, exist_ok=True)
    net = NetworkDenoiser(load_network(os.path.join(card_dir, "model.pt")))
    boundary = "circular" if padding == "circular" else "zeros"
    t0 = time.perf_counter()
    wanted = args.machine_list
    fpmc = parse_fpmc(args.fpmc)
    local = Lazy({"LS": lambda: pm.LS(images, labels), "ELS": lambda: pm.ELS(images, labels, boundary=boundary),
                  "DataLocal": lambda: pm.DataLocal(images, labels, boundary=boundary, statistics=everything),
                  "PCA-cal": lambda: pm.PCALocality(images, labels, threshold=pca_threshold(name)),
                  "PSPC": lambda: pm.PSPC(images, labels),
                  "FPMC": lambda: fpmc_machine(fpmc, images, labels, boundary)})
    build_s = time.perf_counter() - t0
    settings = {"train_images": n, "statistics_images": len(everything), "seeds": args.seeds,
                "calib_seeds": args.calib_seeds, "k_max": args.k_max}
    if args.median != "lower":  # (no key: the lower median, the rule of every run before 2026-12-07)
        settings["median"] = args.median
    if args.first_seed:
        settings["first_seed"] = args.first_seed
    schedules, cal_seconds = {}, {}
    blends = {b for b in BLENDS if b in wanted}
    for b in reversed(BLENDS):  # a blend's parts come before it in BLENDS: one backward pass adds the blends among them
        if b in blends:
            blends |= {p for p in BLENDS[b] if p in BLENDS}
    parts = {p for b in blends for p in BLENDS[b]}  # the machines the blends need, calibrated first
    for m in [m for m in CALIBRATED if m in wanted or m in parts]:
        label = m if m != "FPMC" else "FPMC-" + args.fpmc
        path = os.path.join(cal_dir, f"calibration_{safe_name(label)}.json")
        cands = list(range(3, args.k_max + 1, 2)) + [min(images.shape[-2:])] if m == "PSPC" or \
            (m == "FPMC" and fpmc["base"] == "pspc") else None
        if os.path.exists(path):
            c = json.load(open(path))
            if calibration_settings(c.get("settings") or {}) == calibration_settings(settings) and \
                    c.get("candidates_requested", None) == cands:
                schedules[m] = read_schedule(c)
                cal_seconds[m] = c.get("seconds")
                continue
        t0 = time.perf_counter()
        c = calibrate(net, local[m], cal_seeds, cal_lab,
                      candidates=cands, k_max=None if local[m].parameter == "threshold" else args.k_max,
                      state=os.path.join(cal_dir, f"calibration_{safe_name(label)}.state.npz"), run_id=name,
                      progress=not args.quiet, median=args.median)
        cal_seconds[m] = round(time.perf_counter() - t0, 1)
        c.to_json(path, network=name, machine=label, settings=calibration_settings(settings), seconds=cal_seconds[m],
                  candidates_requested=cands)
        schedules[m] = c.schedule
        print(f"{name}: {label} schedule {list(c.schedule.values)} ({cal_seconds[m]:.0f} s)", flush=True)
    def denoiser(m):  # a blend's part
        if m in BLENDS:
            return pm.BlendDenoiser(*map(denoiser, BLENDS[m]), schedules[m])
        return MachineDenoiser(pm.Wiener(everything, all_labels if cond else None)) if m == "Wiener" else \
            MachineDenoiser(local[m], schedules[m])

    for b in [b for b in BLENDS if b in blends]:  # in BLENDS' order: a blend after the blends it is made of
        schedules[b], cal_seconds[b] = blend_weights(name, b, net, *map(denoiser, BLENDS[b]), cal_seeds, cal_lab,
                                                     cal_dir, settings, args)
    published_p = pm.kschedule.published_schedule("square", steps=20, max_size=min(images.shape[-2:]))
    published_tau = pm.kschedule.published_schedule("flex", steps=20)
    heat_info = None
    builders = {
        "IS": lambda: MachineDenoiser(pm.IS(images, labels)),
        "LS": lambda: MachineDenoiser(local["LS"], schedules["LS"]),
        "ELS": lambda: MachineDenoiser(local["ELS"], schedules["ELS"]),
        "Wiener": lambda: MachineDenoiser(pm.Wiener(everything, all_labels if cond else None)),
        "DataLocal": lambda: MachineDenoiser(local["DataLocal"], schedules["DataLocal"]),
        "PCA": lambda: MachineDenoiser(pm.PCALocality(images, labels, threshold=pca_threshold(name))),
        "PCA-cal": lambda: MachineDenoiser(local["PCA-cal"], schedules["PCA-cal"]),
        "PSPC": lambda: MachineDenoiser(local["PSPC"], schedules["PSPC"]),
        "PSPC-pub": lambda: MachineDenoiser(pm.PSPC(images, labels, xflip=True), published_p),
        "Flex": lambda: MachineDenoiser(pm.PSPC(images, labels, mode="flex", xflip=True,
                                                heatmaps=flex_heatmaps(name, net, everything, all_labels if cond
                                                                       else None, published_tau, out, args)),
                                        published_tau),
        "FPMC": lambda: MachineDenoiser(local["FPMC"], schedules["FPMC"]),
        **{b: (lambda b=b: denoiser(b)) for b in BLENDS},
    }
    # the FPMC variant is compared under a name of its own (its sample file), shown as "FPMC" (collect)
    machines = {(m if m != "FPMC" else fpmc_key(args.fpmc)): builders[m]() for m in MACHINES if m in wanted}
    if "Flex" in machines:
        heat_info = {"samples": args.heatmap_samples, "every": args.heatmap_every,
                     "times": list(map(float, machines["Flex"].machine.heatmaps.times))}
    earlier = earlier_report(os.path.join(out, "report.json"), settings)
    t0 = time.perf_counter()
    rep = compare(net, machines, seeds, ylab, out_dir=out, run_id=name + json.dumps(settings, sort_keys=True),
                  batch_size=args.batch, progress=not args.quiet,
                  info={"network": name, "settings": settings, "boundary": boundary, "conditional": cond,
                        "k_schedules": {m: list(map(int, schedules[m].values)) for m in schedules
                                        if isinstance(schedules[m], pm.KSchedule)},
                        "threshold_schedules": {m: list(map(float, schedules[m].values)) for m in schedules
                                                if isinstance(schedules[m], pm.ThresholdSchedule)},
                        "weight_schedules": {m: list(map(float, schedules[m].values)) for m in schedules
                                             if isinstance(schedules[m], pm.WeightSchedule)},
                        "published": {"PCA_threshold": pca_threshold(name), "PSPC_p": list(map(int, published_p.ks)),
                                      "Flex_tau": list(map(float, published_tau.thresholds))},
                        "fpmc": args.fpmc, "heatmaps": heat_info,
                        "calibration_seconds": cal_seconds, "machine": machine_line(),
                        "date": time.strftime("%Y-%m-%d")})
    compare_s = time.perf_counter() - t0
    carried = carry_earlier(rep, earlier, os.path.join(out, "report.json"))
    k = min(8, args.seeds)
    key = {m: m if m != "FPMC" else fpmc_key(args.fpmc) for m in MACHINES}
    shown, pictures = [], []
    for m in MACHINES:  # every machine with samples: this run's, or an earlier run's sample file
        if key[m] in rep["samples"]:
            pictures.append(rep["samples"][key[m]][:k])
        elif key[m] in rep["summary"] and os.path.exists(os.path.join(out, f"samples_{safe_name(key[m])}.npz")):
            pictures.append(torch.from_numpy(read_samples(os.path.join(out, f"samples_{safe_name(key[m])}.npz"))[:k]))
        else:
            continue
        shown.append(m)
    rows = [seeds[:k], rep["samples"]["network"][:k]] + pictures
    save_figure(comparison_grid(rows, ["noise", "network"] + shown), os.path.join(out, "grid.png"))
    print(f"{name}: compared in {compare_s:.0f} s (machines built in {build_s:.0f} s)" +
          (f"; kept from the earlier run: {', '.join(carried)}" if carried else ""), flush=True)
    return {m: rep["summary"][key[m]] for m in MACHINES if key[m] in rep["summary"]}


def blend_weights(name, blend, net, first, second, cal_seeds, cal_lab, out, settings, args):
    """A blend's weight schedule: the weight of its first machine (calibrated ELS) against its second, calibrated per
    step on the calibration seeds (``pm.calibrate_blend``, candidates 0, 0.1, ..., 1), cached in
    ``calibration_<blend>.json`` under ``out`` (with the parts' descriptions); and the seconds it took."""
    path = os.path.join(out, f"calibration_{blend}.json")
    parts = {"first": first.describe(), "second": second.describe()}
    parts_key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    if os.path.exists(path):
        c = json.load(open(path))
        if calibration_settings(c.get("settings") or {}) == calibration_settings(settings) and \
                c.get("parts") == parts_key:
            return pm.WeightSchedule.from_json(path), c.get("seconds")
    t0 = time.perf_counter()
    c = pm.calibrate_blend(net, first, second, cal_seeds, cal_lab, run_id=name,
                           state=os.path.join(out, f"calibration_{blend}.state.npz"), progress=not args.quiet,
                           median=args.median)
    seconds = round(time.perf_counter() - t0, 1)
    c.to_json(path, network=name, machine=f"{blend}: " + " + ".join(BLENDS[blend]),
              settings=calibration_settings(settings), seconds=seconds, parts=parts_key)
    print(f"{name}: {blend} weights of {BLENDS[blend][0]} {list(c.schedule.weights)} ({seconds:.0f} s)", flush=True)
    return c.schedule, seconds


def earlier_report(path: str, settings: dict):
    """The earlier ``report.json`` of this network if it was made with the same settings (the same seeds, training
    images and calibration settings), else None: its machines that this run does not sample are kept."""
    if not os.path.exists(path):
        return None
    rep = json.load(open(path))
    return rep if rep.get("settings") == settings else None


def carry_earlier(rep: dict, earlier, path: str) -> list:
    """Adds to ``rep`` (and its ``report.json``) the machines of the earlier report that this run did not sample
    (their per-seed scores on the same seeds, their schedules, calibration times and dates), and returns their
    names."""
    if not earlier:
        return []
    carried = [m for m in earlier["summary"] if m not in rep["summary"]]
    if not carried:
        return []
    for m in carried:
        rep["summary"][m], rep["per_seed"][m] = earlier["summary"][m], earlier["per_seed"][m]
    for entry in ("k_schedules", "threshold_schedules", "weight_schedules", "calibration_seconds"):
        rep[entry] = {**(earlier.get(entry) or {}), **(rep.get(entry) or {})}  # (FPMC's schedule is under "FPMC")
    dates = dict(earlier.get("dates") or {})
    rep["dates"] = {**{m: dates.get(m, earlier.get("date")) for m in carried},
                    **{m: rep["date"] for m in rep["per_seed"] if m not in carried}}
    rep["machines_of"] = {**{m: (earlier.get("machines_of") or {}).get(m, earlier.get("machine")) for m in carried},
                          **{m: rep["machine"] for m in rep["per_seed"] if m not in carried}}
    write_json(path, {k: v for k, v in rep.items() if k != "samples"})
    return carried


def read_samples(path: str) -> np.ndarray:
    f = np.load(path)
    return np.asarray(f["samples"] if "samples" in f.files else f[f.files[-1]])


def fpmc_key(spec: str) -> str:
    return "FPMC-" + spec


class Lazy(dict):
    """Machines built on first use (a subset of --machines builds only what it needs)."""

    def __init__(self, builders):
        super().__init__()
        self.builders = builders

    def __missing__(self, key):
        self[key] = self.builders[key]()
        return self[key]


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def read_schedule(c: dict):
    if "thresholds" in c:
        return pm.ThresholdSchedule(tuple(c["times"]), tuple(c["thresholds"]))
    return pm.KSchedule(tuple(c["times"]), tuple(c["ks"]), c.get("odd", True))


def flex_heatmaps(name, net, images, labels, taus, out, args):
    """The network's heatmaps at the steps' times where the published tau is below 1 (every --heatmap-every-th of
    them), cached in ``<out>/heatmaps.npz``; at tau = 1 the crop is the whole image whatever the heatmap."""
    from patchmosaic.experiments.heatmaps import network_heatmaps

    times = [t for t, tau in zip(taus.times, taus.thresholds) if tau < 1][:: args.heatmap_every]
    t0 = time.perf_counter()
    hm = network_heatmaps(net, images, times, labels, samples=args.heatmap_samples, seed=0,
                          path=os.path.join(out, "heatmaps.npz"), progress=not args.quiet)
    print(f"{name}: heatmaps at {len(times)} times ({time.perf_counter() - t0:.0f} s)", flush=True)
    return hm


def calibration_settings(settings: dict) -> dict:
    """What a calibration depends on: everything but the comparison seeds (how many, and the first)."""
    return {k: v for k, v in settings.items() if k not in ("seeds", "first_seed")}


def collect(out_dir: str) -> list:
    rows = []
    for name in ORDER:
        p = os.path.join(out_dir, name, "report.json")
        if os.path.exists(p):
            rep = json.load(open(p))
            key = fpmc_key(rep["fpmc"]) if rep.get("fpmc") else None
            if key in rep["summary"]:  # the variant's entries, as "FPMC"
                rep["summary"]["FPMC"], rep["per_seed"]["FPMC"] = rep["summary"][key], rep["per_seed"][key]
                rep["fpmc_file"] = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            rows.append((name, rep))
    return rows


def paired(rep, a: str, b: str = "ELS", n_boot: int = 4000):
    """Seed by seed, ``r`` of machine ``a`` minus ``r`` of machine ``b``: (median, 95% bootstrap interval of the
    median, fraction of seeds where ``a`` is higher)."""
    d = np.asarray(rep["per_seed"][a]["r"], np.float64) - np.asarray(rep["per_seed"][b]["r"], np.float64)
    rng = np.random.default_rng(0)
    boots = np.median(d[rng.integers(0, len(d), (n_boot, len(d)))], axis=1)
    return float(np.median(d)), np.quantile(boots, [0.025, 0.975]).tolist(), float(np.mean(d > 0))


def table(rows) -> str:
    present = [m for m in MACHINES if any(m in rep["summary"] for _, rep in rows)]
    cell = lambda rep, m, f: f(rep) if m in rep["summary"] else "—"  # noqa: E731
    lines = ["Median Pearson r against the network (best in bold), then median R²:", "",
             "| network | " + " | ".join(f"{m} r" for m in present) + " | best r |",
             "|" + "---|" * (len(present) + 2)]
    for name, rep in rows:
        s = rep["summary"]
        r = {m: s[m]["r"]["median"] for m in present if m in s}
        best = max(r, key=lambda m: r[m])
        cells = [cell(rep, m, lambda _: f"**{r[m]:.3f}**" if m == best else f"{r[m]:.3f}") for m in present]
        st = rep["settings"]
        lines.append(f"| {name} ({st['train_images']} imgs, {st['seeds']} seeds) | " + " | ".join(cells) + f" | {best} |")
    lines += ["", "| network | " + " | ".join(f"{m} R²" for m in present) + " |", "|" + "---|" * (len(present) + 1)]
    for name, rep in rows:
        lines.append(f"| {name} | " + " | ".join(cell(rep, m, lambda rp: f"{rp['summary'][m]['R2']['median']:.2f}")
                                               for m in present) + " |")
    others = [m for m in present if m != "ELS"]
    lines += ["", "Seed by seed against calibrated ELS: median r difference [95% bootstrap interval], seeds higher:", "",
              "| network | " + " | ".join(f"{m} − ELS" for m in others) + " |", "|" + "---|" * (len(others) + 1)]
    sure = {m: 0 for m in others}
    beaten = {}  # network -> the machines whose interval lies above 0
    for name, rep in rows:
        cells = []
        for m in others:
            if m not in rep["summary"] or "ELS" not in rep["summary"]:
                cells.append("—")
                continue
            med, (lo, hi), frac = paired(rep, m)
            sure[m] += lo > 0
            if lo > 0:
                beaten.setdefault(name, []).append(m)
            cells.append(f"{'**' if lo > 0 else ''}{med:+.3f} [{lo:+.3f}, {hi:+.3f}], {frac:.0%}{'**' if lo > 0 else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Networks where a machine beats calibrated ELS seed by seed (the interval above 0, in bold): " +
              ", ".join(f"{m} {sure[m]}" for m in others) + f" (of {len(rows)}).", "",
              f"Networks where some machine beats calibrated ELS seed by seed: {len(beaten)} of {len(rows)}" +
              (" (" + "; ".join(f"{SHORT.get(n, n)}: {', '.join(ms)}" for n, ms in beaten.items()) + ")" if beaten
               else "") + ".", "",
              "Schedules (t = 1 → 0.05): "]
    for name, rep in rows:
        ks = {**rep.get("k_schedules", {}), **rep.get("threshold_schedules", {}), **rep.get("weight_schedules", {})}
        lines.append(f"- {name}: " + "; ".join(f"{m} {','.join(map(str, v))}" for m, v in ks.items()) +
                     (f"; FPMC = {rep['fpmc']}" if rep.get("fpmc") and "FPMC" in rep["summary"] else ""))
    return "\n".join(lines)


def grid_all(rows, out_dir, seeds_per_net: int = 2):
    """One picture: for each network with finished sample files its first seeds, rows network and every machine that
    any of these networks has samples of (a mid-grey tile where a network has none: that machine was not run there)."""
    def file(name, rep, k):
        return os.path.join(out_dir, name, f"samples_{rep.get('fpmc_file') if k == 'FPMC' else k}.npz")

    def finished(path):
        if not os.path.exists(path):
            return False
        with np.load(path) as f:
            return bool(np.asarray(f["done"]).all()) if "done" in f.files else True

    rows = [(name, rep) for name, rep in rows if finished(file(name, rep, "network"))]
    if not rows:
        return None
    have = {(name, m) for name, rep in rows for m in MACHINES if m in rep["summary"] and finished(file(name, rep, m))}
    cols = {k: [] for k in ["network"] + [m for m in MACHINES if any((name, m) in have for name, _ in rows)]}
    labels = []
    for name, rep in rows:
        labels += [f"{SHORT[name]} {j}" for j in range(seeds_per_net)]
        shape = read_samples(file(name, rep, "network"))[:seeds_per_net].shape
        for k in cols:
            a = (read_samples(file(name, rep, k))[:seeds_per_net].astype(np.float64)
                 if k == "network" or (name, k) in have else np.zeros(shape))
            if a.shape[1] == 1:
                a = np.repeat(a, 3, axis=1)
            cols[k].append(a)
    rows_img = [np.concatenate(cols[k]) for k in cols]
    return comparison_grid(rows_img, list(cols), columns=labels)


def write_md(path: str, block: str, marker: str = "all-machines") -> None:
    if not os.path.exists(path):
        raise SystemExit(f"--md {path}: no such file")
    if not write_block(path, marker, block, append=False):
        raise SystemExit(f"--md {path}: no <!-- {marker}:begin --> ... <!-- {marker}:end --> markers to write between")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="all", help="comma-separated names, or all")
    p.add_argument("--limit", type=int, default=2000, help="training images of the softmax machines")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=0, help="the comparison's first reference seed (its index); "
                   "32 with --seeds 32: a held-out replication on seeds no calibration or choice has seen")
    p.add_argument("--calibration-dir", default=None, help="read (and write) the calibrations here, one folder per "
                   "network, instead of under --out: a held-out run reuses the main run's")
    p.add_argument("--calib-seeds", type=int, default=2)
    p.add_argument("--median", default="rounded", choices=["rounded", "lower"],
                   help="the calibrations' per-step rule (pm.calibrate's median=); the runs recorded in RESULTS "
                        "section 10 used 'lower'")
    p.add_argument("--k-max", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "all_machines"))
    p.add_argument("--md", action="append", default=None, help="markdown files with the table markers")
    p.add_argument("--machines", default="all", help="comma-separated machines of " + ",".join(MACHINES) + ", or all")
    p.add_argument("--fpmc", default=DEFAULT_FPMC, help="the FPMC variant: BASE[+OPTION...], BASE els, ls or pspc; "
                   "options xflip, soft=C (ELS, LS), prec=S (PSPC), patch (LS), resp=S (default: %(default)s)")
    p.add_argument("--heatmap-samples", type=int, default=2, help="noisy inputs per time of Flex's heatmaps")
    p.add_argument("--heatmap-every", type=int, default=1, help="heatmaps at every n-th step where tau < 1")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    names = ORDER if args.networks == "all" else args.networks.split(",")
    for n in names:
        if n not in NETWORKS:
            raise SystemExit(f"unknown network {n!r}; choose from {ORDER}")
    args.machine_list = MACHINES if args.machines == "all" else args.machines.split(",")
    bad = [m for m in args.machine_list if m not in MACHINES]
    if bad:
        raise SystemExit(f"--machines: unknown {bad}")
    parse_fpmc(args.fpmc)
    if args.first_seed < 0 or (args.first_seed and args.first_seed < args.calib_seeds):
        raise SystemExit(f"--first-seed {args.first_seed}: a held-out comparison starts at or after the calibration "
                         f"seeds (0..{args.calib_seeds - 1}), or at 0 for the main run")
    torch.manual_seed(0)
    if not args.table_only:
        for n in names:
            t0 = time.perf_counter()
            run_network(n, args)
            print(f"{n}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = collect(args.out)
    held_out = f" --first-seed {args.first_seed} --out {os.path.relpath(args.out)}" + \
        (f" --calibration-dir {os.path.relpath(args.calibration_dir)}" if args.calibration_dir else "") \
        if args.first_seed else ""
    block = table(rows) + f"\n\n(`python bench/all_machines.py --networks {args.networks} --limit {args.limit} --seeds {args.seeds} " \
        f"--calib-seeds {args.calib_seeds} --median {args.median} --k-max {args.k_max} --fpmc {args.fpmc} " \
        f"--heatmap-samples " \
        f"{args.heatmap_samples} --heatmap-every {args.heatmap_every}{held_out}`; {time.strftime('%Y-%m-%d')}; " \
        f"{machine_line()})"
    print(block)
    picture = grid_all(rows, args.out) if rows else None
    if picture is not None:
        save_figure(picture, os.path.join(args.out, "grid_all.png"))
    # a held-out replication has its own block (RESULTS only); the main table goes to RESULTS and the README
    # (seeds 32-63: "all-machines-heldout"; another held-out set: "all-machines-seeds<first>")
    marker = "all-machines" if not args.first_seed else \
        ("all-machines-heldout" if args.first_seed == 32 else f"all-machines-seeds{args.first_seed}")
    default_md = [os.path.join(HERE, "RESULTS.md")] + ([] if args.first_seed else [os.path.join(HERE, "..", "README.md")])
    for md in args.md or default_md:
        write_md(md, block, marker)


if __name__ == "__main__":
    main()
