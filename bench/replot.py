"""Redraw the figures of bench/reproduce.py that need no samples (the k-schedule plot and the r_IS vs
r_ELS scatter) from the JSON it saved, e.g. after a change of the plotting code:

    python bench/replot.py bench/results/reproduce/cifar10k_resnet_zeros_cond [--docs docs/compare_cifar10]

writes kschedule.png and scatter.png beside the JSON (and, with --docs PREFIX, PREFIX_scatter.png and
PREFIX_kschedule.png). The grid of samples needs the samples: rerun bench/reproduce.py for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

import patchmosaic as pm
from patchmosaic.io.plots import kschedule_plot, save_figure, scatter


def replot(folder: str, docs: str = None) -> None:
    rep = json.load(open(os.path.join(folder, "report.json")))
    name = rep.get("network", os.path.basename(folder))
    cal = {m: json.load(open(os.path.join(folder, f"calibration_{m}.json"))) for m in ("ELS", "LS")}
    sched = {f"{m} ours": pm.KSchedule(c["times"], c["ks"]) for m, c in cal.items()}
    paper = rep["k_schedules"].get("paper_name")
    if paper:
        sched["paper"] = pm.kschedule.paper_schedule(paper, len(cal["ELS"]["ks"]))
    save_figure(kschedule_plot(sched, np.array(cal["ELS"]["choices"]), cal["ELS"]["times"],
                               title=name.replace("_", " ")), os.path.join(folder, "kschedule.png"))
    r = rep["per_seed"]
    save_figure(scatter(r["IS"]["r"], r["ELS_ours"]["r"], xlabel="Pearson r of IS with the network",
                        ylabel="Pearson r of ELS with the network", title=name.replace("_", " ")),
                os.path.join(folder, "scatter.png"))
    if docs:
        for fig in ("scatter", "kschedule"):
            shutil.copyfile(os.path.join(folder, f"{fig}.png"), f"{docs}_{fig}.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--docs", default=None, help="also copy the figures to PREFIX_scatter.png, PREFIX_kschedule.png")
    args = p.parse_args()
    replot(args.folder, args.docs)


if __name__ == "__main__":
    main()
