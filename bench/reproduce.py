"""Reproduce the paper's central result on the reference networks in ../shared/models.

For each network: calibrate the k-schedules of the local machines (boundary-aware ELS, or periodic ELS
for a circular network, and LS) against the network's own DDIM trajectories, then sample network and
machines from the same seeds (the seeds and labels of the network's ddim20_samples.npz) and compare
them seed by seed (Pearson r, R^2; IS as the baseline), with our calibrated schedules and with the
paper's published schedule for the same family. Writes, per network, under --out:
calibration_{ELS,LS}.json, kschedule.png, report.json, scatter.png, grid.png and resumable
state files; and the table
between the reproduce markers of bench/RESULTS.md.

    python bench/reproduce.py --networks cifar10k_resnet_zeros_cond fmnist20k_resnet_zeros_cond \
        --seeds 32 --calib-seeds 8 --k-max 23

Interrupted runs resume from the state files (rerun the same command).
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
from common import SHARED, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.experiments.calibrate import calibrate  # noqa: E402
from patchmosaic.experiments.compare import compare, nearest_training  # noqa: E402
from patchmosaic.diffusion.denoisers import MachineDenoiser, NetworkDenoiser  # noqa: E402
from patchmosaic.networks import load_network  # noqa: E402
from patchmosaic.io.plots import comparison_grid, kschedule_plot, save_figure, scatter  # noqa: E402
from patchmosaic.io.runstate import write_json  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
MNIST = os.path.join(SHARED, "data", "mnist.npz")
CIFAR = os.path.join(SHARED, "data", "cifar10_10k.npz")
# network -> (data, limit, padding, paper schedule, paper row (dataset, arch))
NETWORKS = {
    "cifar10k_resnet_zeros_cond": (CIFAR, None, "zeros", "CIFAR10_ResNet_zeros_conditional", ("CIFAR10", "ResNet")),
    "fmnist20k_resnet_zeros_cond": (FMNIST, 20000, "zeros", "FashionMNIST_ResNet_zeros_conditional",
                                    ("FashionMNIST", "ResNet")),
    "mnist_resnet_zeros": (MNIST, None, "zeros", "MNIST_ResNet_zeros", ("MNIST", "ResNet")),
    "mnist_unet_zeros": (MNIST, None, "zeros", "MNIST_UNet_zeros", ("MNIST", "UNet")),
    "mnist_resnet_circular": (MNIST, None, "circular", "MNIST_ResNet_circular", ("MNIST", "ResNet")),
    "cifar10k_unet_zeros_cond": (CIFAR, None, "zeros", "CIFAR10_UNet_zeros_conditional", ("CIFAR10", "UNet")),
    "cifar10k_unet_attn_zeros_cond": (CIFAR, None, "zeros", "CIFAR10_UNet_zeros_conditional",
                                      ("CIFAR10", "UNet+self-attention (pretrained, external)")),
}
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"


def paper_row(dataset, arch, padding):
    with open(os.path.join(SHARED, "paper", "results.json")) as f:
        rows = json.load(f)["rows"]
    for r in rows:
        if r["dataset"] == dataset and r["arch"] == arch and r["padding"] == padding:
            return r
    return None


def run_network(name, args):
    data, limit, padding, paper_name, (pdata, parch) = NETWORKS[name]
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    card = json.load(open(os.path.join(SHARED, "models", name, "card.json")))
    images, labels = pm.data.load(data, limit=limit)
    ref = np.load(os.path.join(SHARED, "models", name, "ddim20_samples.npz"))
    seeds = torch.from_numpy(ref["seeds"][: args.seeds])
    ylab = torch.from_numpy(ref["labels"][: args.seeds]) if card["conditional"] else None
    train_labels = labels if card["conditional"] else None
    net = NetworkDenoiser(load_network(os.path.join(SHARED, "models", name, "model.pt")))
    boundary = "circular" if padding == "circular" else "zeros"
    els = pm.ELS(images, train_labels, boundary=boundary)
    ls = pm.LS(images, train_labels)
    iss = pm.IS(images, train_labels)
    # times add up over interrupted and resumed runs (a rerun of a finished run adds only seconds)
    prev = os.path.join(out, "report.json")
    timings = dict(json.load(open(prev)).get("timings", {})) if os.path.exists(prev) else {}

    cal = {}
    for mname, machine in (("ELS", els), ("LS", ls)):
        t0 = time.perf_counter()
        mc = args.calib_seeds
        c = calibrate(net, machine, seeds[:mc], None if ylab is None else ylab[:mc], k_max=args.k_max,
                      state=os.path.join(out, f"calibration_{mname}.state.npz"), run_id=name,
                      progress=not args.quiet)
        c.to_json(os.path.join(out, f"calibration_{mname}.json"), network=name, seeds=mc)
        cal[mname] = c.schedule
        timings[f"calibrate_{mname}_s"] = round(timings.get(f"calibrate_{mname}_s", 0) + time.perf_counter() - t0, 1)
        print(f"{name}: {mname} schedule (t = 1 -> 1/20): {list(c.schedule.ks)}", flush=True)
    paper = pm.kschedule.paper_schedule(paper_name)
    ch = json.load(open(os.path.join(out, "calibration_ELS.json")))["choices"]
    save_figure(kschedule_plot({"ELS ours": cal["ELS"], "LS ours": cal["LS"], "paper": paper}, np.array(ch),
                               cal["ELS"].times, title=name.replace("_", " ")), os.path.join(out, "kschedule.png"))
    machines = {
        "ELS_ours": MachineDenoiser(els, cal["ELS"]), "LS_ours": MachineDenoiser(ls, cal["LS"]),
        "ELS_paper": MachineDenoiser(els, paper), "LS_paper": MachineDenoiser(ls, paper),
        "IS": MachineDenoiser(iss),
    }
    t0 = time.perf_counter()
    rep = compare(net, machines, seeds, ylab, out_dir=out, run_id=name, batch_size=args.batch,
                  progress=not args.quiet,
                  info={"network": name, "train_images": int(len(images)), "conditional": card["conditional"],
                        "k_schedules": {"ours_ELS": list(cal["ELS"].ks), "ours_LS": list(cal["LS"].ks),
                                        "paper": list(paper.ks), "paper_name": paper_name},
                        "calibration_seeds": args.calib_seeds, "k_max": args.k_max})
    timings["compare_s"] = round(timings.get("compare_s", 0) + time.perf_counter() - t0, 1)
    u = rep["samples"]["network"]
    ref_samples = torch.from_numpy(ref["samples"][: args.seeds])
    rep_json = json.load(open(os.path.join(out, "report.json")))
    rep_json["network_vs_reference_max_abs"] = float((u - ref_samples).abs().max())
    rep_json["timings"] = timings
    write_json(os.path.join(out, "report.json"), rep_json)

    r = rep["per_seed"]
    els_name = f"{'B' if boundary == 'zeros' else ''}ELS"
    save_figure(scatter(r["IS"]["r"], r["ELS_ours"]["r"], xlabel="Pearson r of IS with the network",
                        ylabel=f"Pearson r of {els_name} with the network", title=name.replace("_", " ")),
                os.path.join(out, "scatter.png"))
    near = nearest_training(u, images, ylab, train_labels)
    n = min(8, args.seeds)
    rows = [seeds[:n], u[:n], rep["samples"]["ELS_ours"][:n], rep["samples"]["ELS_paper"][:n],
            rep["samples"]["LS_ours"][:n], rep["samples"]["IS"][:n], images[near[:n]]]
    save_figure(comparison_grid(rows, ["noise", "network", "ELS ours", "ELS paper", "LS ours", "IS", "nearest"]),
                os.path.join(out, "grid.png"))
    return rep_json, paper_row(pdata, parch, padding)


def table(results) -> str:
    lines = ["| network | seeds | k-schedule | median r ELS [IQR] | median r LS | median r IS | ELS beats IS | "
             "median R² ELS | median R² LS | median R² IS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (rep, prow) in results.items():
        s = rep["summary"]
        for which in ("ours", "paper"):
            e, l_, i = s[f"ELS_{which}"], s[f"LS_{which}"], s["IS"]
            ks = rep["k_schedules"]["ours_ELS" if which == "ours" else "paper"]
            lines.append(
                f"| {name} | {rep['seeds']} | {which}: {','.join(map(str, ks))} | {e['r']['median']:.3f} "
                f"[{e['r']['q25']:.2f}, {e['r']['q75']:.2f}] | {l_['r']['median']:.3f} | {i['r']['median']:.3f} | "
                f"{e['frac_beats_IS_r']:.2f} | {e['R2']['median']:.3f} | {l_['R2']['median']:.3f} | {i['R2']['median']:.3f} |")
        if prow is not None:
            lines.append(f"| paper: {prow['dataset']} {prow['arch']} {prow['padding']} (Table 2, 20 steps) | 100 | "
                         f"paper | {prow['ELS']['table2']:.2f} | {prow['LS']['table2']:.2f} | {prow['IS']['table2']:.2f} | "
                         f"{prow['frac_local_beats_IS']['table2']:.2f} | — | — | — |")
    return "\n".join(lines)


def write_md(path, results, args, seconds):
    block = [BEGIN, "", f"Command: `python bench/reproduce.py --networks {' '.join(results)} --seeds {args.seeds} "
             f"--calib-seeds {args.calib_seeds} --k-max {args.k_max}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine_line()}; total {seconds / 60:.1f} min of compute "
             "(per network: " + "; ".join(
                 f"{n}: calibration ELS {r['timings']['calibrate_ELS_s']:.0f} s, LS {r['timings']['calibrate_LS_s']:.0f} s, "
                 f"comparison {r['timings']['compare_s']:.0f} s" for n, (r, _) in results.items()) + ").",
             "", table(results), "", END]
    text = open(path).read() if os.path.exists(path) else ""
    new = "\n".join(block)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["cifar10k_resnet_zeros_cond", "fmnist20k_resnet_zeros_cond"],
                   choices=sorted(NETWORKS))
    p.add_argument("--seeds", type=int, default=32, help="comparison seeds (at most 128)")
    p.add_argument("--calib-seeds", type=int, default=8, help="seeds of the calibration (the first ones)")
    p.add_argument("--k-max", type=int, default=23, help="largest candidate patch size")
    p.add_argument("--batch", type=int, default=8, help="seeds sampled per machine call")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reproduce"))
    p.add_argument("--md", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                   help="markdown file whose reproduce block is replaced ('' to skip)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if "fmnist20k_resnet_zeros_cond" in args.networks and not os.path.isdir(FMNIST):
        sys.exit(f"Fashion-MNIST not found at {FMNIST}: apt-get install -y dataset-fashion-mnist")
    results = {n: run_network(n, args) for n in args.networks}
    print(table(results))
    if args.md:
        write_md(args.md, results, args, sum(sum(r["timings"].values()) for r, _ in results.values()))


if __name__ == "__main__":
    main()
