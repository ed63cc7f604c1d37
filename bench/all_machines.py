"""Every analytic machine against every reference network (issue 19): IS, LS, boundary-aware (or periodic) ELS,
the Wiener filter, and the data-driven locality machine (DataLocal: ELS over the k^2 pixels the data's Wiener
filter is most sensitive to), sampled from the same seeds as the network and scored seed by seed (Pearson r,
R^2). The k-schedules of LS, ELS and DataLocal are each calibrated against the network on the same seeds,
training images and candidates, so the machines compete on equal terms.

    python bench/all_machines.py --networks all --limit 2000 --seeds 8 --calib-seeds 2 --k-max 15

The softmax machines (IS, LS, ELS, DataLocal) use the first --limit training images of the network's data set
(a reduced size for this 2-core CPU); the Wiener filter and DataLocal's neighbourhoods use the covariance of
the network's whole training set (a second-order statistic, cheap at any size). Writes per network under --out:
calibration_<machine>.json, report.json, grid.png; and the table between the markers
``<!-- all-machines:begin/end -->`` of each --md file plus bench/results/all_machines/grid_all.png. Resumable:
finished calibrations and sample files are reused by a rerun with the same settings; the calibrations do not
depend on --seeds, so a rerun with more comparison seeds reuses them (remove the earlier run's
``<network>/samples_*.npz`` first: compare refuses sample files of other seeds).
"""

from __future__ import annotations

import argparse
import json
import os
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
MACHINES = ["IS", "LS", "ELS", "Wiener", "DataLocal"]
SHORT = {"cifar10k_resnet_zeros_cond": "CIFAR ResNet", "fmnist20k_resnet_zeros_cond": "FMNIST ResNet",
         "mnist_resnet_zeros": "MNIST ResNet", "mnist_resnet_circular": "MNIST circ.", "mnist_unet_zeros": "MNIST UNet",
         "cifar10k_unet_zeros_cond": "CIFAR UNet", "cifar10k_unet_attn_zeros_cond": "CIFAR attn"}
CALIBRATED = ["LS", "ELS", "DataLocal"]


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
    seeds = torch.from_numpy(ref["seeds"][: args.seeds])
    ylab = torch.from_numpy(ref["labels"][: args.seeds]) if cond else None
    net = NetworkDenoiser(load_network(os.path.join(card_dir, "model.pt")))
    boundary = "circular" if padding == "circular" else "zeros"
    t0 = time.perf_counter()
    local = {"LS": pm.LS(images, labels), "ELS": pm.ELS(images, labels, boundary=boundary),
             "DataLocal": pm.DataLocal(images, labels, boundary=boundary, statistics=everything)}
    wiener = pm.Wiener(everything, all_labels if cond else None)
    build_s = time.perf_counter() - t0
    settings = {"train_images": n, "statistics_images": len(everything), "seeds": args.seeds,
                "calib_seeds": args.calib_seeds, "k_max": args.k_max}
    schedules, cal_seconds = {}, {}
    for m in CALIBRATED:
        path = os.path.join(out, f"calibration_{m}.json")
        if os.path.exists(path):
            c = json.load(open(path))
            if calibration_settings(c.get("settings") or {}) == calibration_settings(settings):
                schedules[m] = pm.KSchedule(c["times"], c["ks"])
                cal_seconds[m] = c.get("seconds")
                continue
        t0 = time.perf_counter()
        c = calibrate(net, local[m], seeds[: args.calib_seeds], None if ylab is None else ylab[: args.calib_seeds],
                      k_max=args.k_max, state=os.path.join(out, f"calibration_{m}.state.npz"), run_id=name,
                      progress=not args.quiet)
        cal_seconds[m] = round(time.perf_counter() - t0, 1)
        c.to_json(path, network=name, machine=m, settings=calibration_settings(settings), seconds=cal_seconds[m])
        schedules[m] = c.schedule
        print(f"{name}: {m} k-schedule {list(c.schedule.ks)} ({cal_seconds[m]:.0f} s)", flush=True)
    machines = {"IS": MachineDenoiser(pm.IS(images, labels)),
                "LS": MachineDenoiser(local["LS"], schedules["LS"]),
                "ELS": MachineDenoiser(local["ELS"], schedules["ELS"]),
                "Wiener": MachineDenoiser(wiener),
                "DataLocal": MachineDenoiser(local["DataLocal"], schedules["DataLocal"])}
    t0 = time.perf_counter()
    rep = compare(net, machines, seeds, ylab, out_dir=out, run_id=name + json.dumps(settings, sort_keys=True),
                  batch_size=args.batch, progress=not args.quiet,
                  info={"network": name, "settings": settings, "boundary": boundary, "conditional": cond,
                        "k_schedules": {m: list(map(int, schedules[m].ks)) for m in CALIBRATED},
                        "calibration_seconds": cal_seconds, "machine": machine_line(),
                        "date": time.strftime("%Y-%m-%d")})
    compare_s = time.perf_counter() - t0
    k = min(8, args.seeds)
    rows = [seeds[:k], rep["samples"]["network"][:k]] + [rep["samples"][m][:k] for m in MACHINES]
    save_figure(comparison_grid(rows, ["noise", "network"] + MACHINES), os.path.join(out, "grid.png"))
    print(f"{name}: compared in {compare_s:.0f} s (machines built in {build_s:.0f} s)", flush=True)
    return {m: rep["summary"][m] for m in MACHINES}


def calibration_settings(settings: dict) -> dict:
    """What a calibration depends on: everything but the number of comparison seeds."""
    return {k: v for k, v in settings.items() if k != "seeds"}


def collect(out_dir: str) -> list:
    rows = []
    for name in ORDER:
        p = os.path.join(out_dir, name, "report.json")
        if os.path.exists(p):
            rows.append((name, json.load(open(p))))
    return rows


def paired(rep, a: str = "DataLocal", b: str = "ELS", n_boot: int = 4000):
    """Seed by seed, ``r`` of machine ``a`` minus ``r`` of machine ``b``: (median, 95% bootstrap interval of the
    median, fraction of seeds where ``a`` is higher)."""
    d = np.asarray(rep["per_seed"][a]["r"]) - np.asarray(rep["per_seed"][b]["r"])
    rng = np.random.default_rng(0)
    boots = np.median(d[rng.integers(0, len(d), (n_boot, len(d)))], axis=1)
    return float(np.median(d)), np.quantile(boots, [0.025, 0.975]).tolist(), float(np.mean(d > 0))


def table(rows) -> str:
    head = "| network | " + " | ".join(f"{m} r" for m in MACHINES) + " | " + \
        " | ".join(f"{m} R²" for m in MACHINES) + \
        " | best r | DataLocal − ELS per seed: median r diff [95% CI], seeds higher | k-schedules (t = 1 → 0.05) |"
    lines = [head, "|" + "---|" * (2 * len(MACHINES) + 4)]
    wins = sure = 0
    for name, rep in rows:
        s = rep["summary"]
        r = {m: s[m]["r"]["median"] for m in MACHINES}
        best = max(MACHINES, key=lambda m: r[m])
        beats = r["DataLocal"] > r["ELS"]
        wins += beats
        med, (lo, hi), frac = paired(rep)
        sure += lo > 0
        ks = rep["k_schedules"]
        sched = "; ".join(f"{m} {','.join(map(str, ks[m]))}" for m in CALIBRATED)
        cells = [f"**{r[m]:.3f}**" if m == best else f"{r[m]:.3f}" for m in MACHINES]
        cells += [f"{s[m]['R2']['median']:.2f}" for m in MACHINES]
        st = rep["settings"]
        lines.append(f"| {name} ({st['train_images']} imgs, {st['seeds']} seeds) | " + " | ".join(cells) +
                     f" | {best} | {med:+.3f} [{lo:+.3f}, {hi:+.3f}], {frac:.0%} | {sched} |")
    lines.append("")
    lines.append(f"DataLocal's median r above calibrated ELS's on {wins} of {len(rows)} networks; the paired per-seed "
                 f"difference's 95% bootstrap interval lies above 0 on {sure} of them.")
    return "\n".join(lines)


def grid_all(rows, out_dir, seeds_per_net: int = 2):
    """One picture: for each network its first seeds, rows network and every machine."""
    cols = {k: [] for k in ["network"] + MACHINES}
    labels = []
    for name, _ in rows:
        labels += [f"{SHORT[name]} {j}" for j in range(seeds_per_net)]
        d = os.path.join(out_dir, name)
        for k in cols:
            f = np.load(os.path.join(d, f"samples_{k}.npz"))
            arr = f["samples"] if "samples" in f.files else f[f.files[-1]]
            a = np.asarray(arr[:seeds_per_net], dtype=np.float64)
            if a.shape[1] == 1:
                a = np.repeat(a, 3, axis=1)
            cols[k].append(a)
    rows_img = [np.concatenate(cols[k]) for k in cols]
    return comparison_grid(rows_img, list(cols), columns=labels)


def write_md(path: str, block: str) -> None:
    if not os.path.exists(path):
        raise SystemExit(f"--md {path}: no such file")
    write_block(path, "all-machines", block, append=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="all", help="comma-separated names, or all")
    p.add_argument("--limit", type=int, default=2000, help="training images of the softmax machines")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--calib-seeds", type=int, default=2)
    p.add_argument("--k-max", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "all_machines"))
    p.add_argument("--md", action="append", default=None, help="markdown files with the table markers")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    names = ORDER if args.networks == "all" else args.networks.split(",")
    for n in names:
        if n not in NETWORKS:
            raise SystemExit(f"unknown network {n!r}; choose from {ORDER}")
    torch.manual_seed(0)
    if not args.table_only:
        for n in names:
            t0 = time.perf_counter()
            run_network(n, args)
            print(f"{n}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = collect(args.out)
    block = table(rows) + f"\n\n(`python bench/all_machines.py --networks all --limit {args.limit} --seeds {args.seeds} " \
        f"--calib-seeds {args.calib_seeds} --k-max {args.k_max}`; {time.strftime('%Y-%m-%d')}; {machine_line()})"
    print(block)
    if rows:
        save_figure(grid_all(rows, args.out), os.path.join(args.out, "grid_all.png"))
    for md in args.md or [os.path.join(HERE, "RESULTS.md"), os.path.join(HERE, "..", "README.md")]:
        write_md(md, block)


if __name__ == "__main__":
    main()
