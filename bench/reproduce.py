"""Reproduce the paper's Tables 1-2 on the reference networks in ../shared/models (or trained here).

For each network: calibrate the k-schedules of the local machines (boundary-aware ELS, or for the circular
network periodic ELS with interior keys and with wrapped keys, and LS) against the network's own DDIM
trajectories, then sample network and machines from the same seeds (the seeds and labels of the network's
ddim20_samples.npz) and compare them seed by seed (Pearson r, R^2; IS as the baseline), with our calibrated
schedules and with the paper's published schedule for the same family. Writes, per network, under --out:
calibration_<machine>.json, report.json (per-seed numbers), kschedule.png, scatter.png, grid.png, stages.json
(what is done, with its settings and seconds) and resumable state files; and the table between the markers
``<!-- <block>:begin -->`` / ``<!-- <block>:end -->`` of each --md file (every finished network under --out).

    python bench/reproduce.py --networks all                 # every reference network, the paper's table
    python bench/reproduce.py --networks all --estimate-only # only the time estimate
    python bench/reproduce.py --networks all --device cuda   # machines on the CUDA engine, network on the GPU

Before any work it prints a time estimate per network and stage (one timed machine call per patch size on a
subset of the training images, scaled linearly to the whole set; one timed network call). The MNIST rows
(60,000 training images) are meant for a GPU: on this 2-core CPU their estimate is hours; `--limit` runs them on
fewer training images to check the pipeline (such rows are marked with their training-set size).

Resumable per network and per stage: a finished stage (calibration of each machine, comparison, figures) with
the same settings is skipped on a rerun; an interrupted stage resumes from its state files.

Without ../shared (a clone of the repository only): `--train-missing DIR` trains every network whose folder
../shared/models/<network> is absent from its preset (`patchmosaic train --preset <network>`, the recipe of the
reference network's card; resumable) into DIR/<network>, on the data the machines use, and takes the reference
seeds from that network's own 20-step DDIM samples from fixed seeds (DIR/<network>/ddim20_samples.npz). The data
come from ../shared/data where it exists, else from the named sets (`mnist`, `fashion-mnist`, `cifar10` under
$PATCHMOSAIC_DATA: `pm.data.load` says which files to put where). `--train-option KEY=VALUE` changes the
preset (e.g. steps=2000 for a shorter run; the trained network records it).

    python bench/reproduce.py --networks mnist_resnet_zeros --train-missing runs --device cuda
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

import patchmosaic as pm  # noqa: E402
from patchmosaic.experiments.calibrate import calibrate  # noqa: E402
from patchmosaic.experiments.compare import compare, nearest_training  # noqa: E402
from patchmosaic.diffusion.denoisers import MachineDenoiser, NetworkDenoiser  # noqa: E402
from patchmosaic.networks import load_network  # noqa: E402
from patchmosaic.networks import presets  # noqa: E402
from patchmosaic.networks.timing import estimate_text, step_seconds  # noqa: E402
from patchmosaic.io.plots import comparison_grid, kschedule_plot, save_figure, scatter  # noqa: E402
from patchmosaic.io.runstate import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Debian's dataset-fashion-mnist, else the named set (under $PATCHMOSAIC_DATA)
FMNIST = "/usr/share/datasets/fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "fashion-mnist"
# the shared copies where they exist, else the named sets (pm.data.load: under $PATCHMOSAIC_DATA)
MNIST = os.path.join(SHARED, "data", "mnist.npz") if os.path.exists(os.path.join(SHARED, "data", "mnist.npz")) \
    else "mnist"
CIFAR = os.path.join(SHARED, "data", "cifar10_10k.npz") \
    if os.path.exists(os.path.join(SHARED, "data", "cifar10_10k.npz")) else "cifar10"
# network -> (data, limit, padding, paper schedule, paper row (dataset, arch))
NETWORKS = {
    "cifar10k_resnet_zeros_cond": (CIFAR, 10000, "zeros", "CIFAR10_ResNet_zeros_conditional", ("CIFAR10", "ResNet")),
    "fmnist20k_resnet_zeros_cond": (FMNIST, 20000, "zeros", "FashionMNIST_ResNet_zeros_conditional",
                                    ("FashionMNIST", "ResNet")),
    "mnist_resnet_zeros": (MNIST, None, "zeros", "MNIST_ResNet_zeros", ("MNIST", "ResNet")),
    "mnist_resnet_circular": (MNIST, None, "circular", "MNIST_ResNet_circular", ("MNIST", "ResNet")),
    "mnist_unet_zeros": (MNIST, None, "zeros", "MNIST_UNet_zeros", ("MNIST", "UNet")),
    "cifar10k_unet_zeros_cond": (CIFAR, 10000, "zeros", "CIFAR10_UNet_zeros_conditional", ("CIFAR10", "UNet")),
    "cifar10k_unet_attn_zeros_cond": (CIFAR, 10000, "zeros", "CIFAR10_UNet_zeros_conditional",
                                      ("CIFAR10", "UNet+self-attention (pretrained, external)")),
}
ORDER = list(NETWORKS)
DEFAULT_OUT = os.path.join(HERE, "results", "reproduce")
PAPER = os.path.join(HERE, "paper_results.json")  # the paper's Table 1-2 numbers (a copy of shared/paper/results.json)


def fraction(value) -> str:
    """A share for the table, or a dash where it is undefined (None: no seed where both r are defined)."""
    return "—" if value is None else f"{value:.2f}"


def paper_row(dataset, arch, padding):
    with open(PAPER) as f:
        rows = json.load(f)["rows"]
    for r in rows:
        if r["dataset"] == dataset and r["arch"] == arch and r["padding"] == padding:
            return r
    return None


def stages_from_report(rep_path: str) -> dict:
    """The stages of a run of the earlier script (no stages.json): its report says what was done, with which
    settings and how long it took; the date is the report's."""
    r = json.load(open(rep_path))
    old = {"seeds": r["seeds"], "calib_seeds": r["calibration_seeds"], "k_max": r["k_max"],
           "train_images": r["train_images"]}
    tm = r.get("timings", {})
    date = time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(rep_path)))
    st = {f"calibrate_{m}": {"settings": old, "seconds": tm.get(f"calibrate_{m}_s", 0.0), "date": date}
          for m in ("ELS", "LS")}
    st["compare"] = {"settings": old, "seconds": tm.get("compare_s", 0.0), "date": date}
    if os.path.exists(os.path.join(os.path.dirname(rep_path), "grid.png")):
        st["figures"] = {"settings": old, "seconds": 0.0, "date": date}
    return st


def shared_model(name):
    """The reference network's TorchScript file in ../shared/models, or None."""
    path = os.path.join(SHARED, "models", name, "model.pt")
    return path if os.path.exists(path) else None


def train_options(items) -> dict:
    """``--train-option KEY=VALUE`` items as preset overrides (values read as JSON where they parse: 2000, 1e-3,
    [32,64,128], true; else as text)."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            sys.exit(f"--train-option takes KEY=VALUE (e.g. steps=2000), got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def training_data(name):
    """The data spec and image count the preset of ``name`` trains on here: the machines' data (the shared copy
    where there is one)."""
    data, limit, *_ = NETWORKS[name]
    return dict(data=data, limit=limit)


def estimate_training(name, args) -> float:
    """Prints and returns the seconds to train ``name`` from its preset into --train-missing."""
    r, _ = presets.recipe(name, {**training_data(name), **train_options(args.train_option)})
    cfg = presets.network_config(r, r["channels"], r["num_classes"])
    timing = step_seconds(cfg, r["train"]["batch_size"], device=args.device)
    done = 0
    ckpt = os.path.join(args.train_missing, name, "config.json")
    if os.path.exists(ckpt):
        done = int(json.load(open(ckpt))["info"]["step"])
    print(f"#   {name}: train from its preset: " + estimate_text(timing, r["train"]["steps"], done), flush=True)
    return max(r["train"]["steps"] - done, 0) * timing["seconds_per_step"]


def train_missing(name, args) -> str:
    """Train ``name`` from its preset into --train-missing (resuming), with its reference samples; the folder."""
    from patchmosaic.experiments.train_preset import run_preset

    out = os.path.join(args.train_missing, name)
    run_preset(name, out, {**training_data(name), **train_options(args.train_option)}, device=args.device,
               progress=not args.quiet)
    return out


class Run:
    """One network's data, models and stage bookkeeping."""

    def __init__(self, name, args):
        self.name, self.args = name, args
        data, limit, padding, self.paper_name, self.paper_key = NETWORKS[name]
        self.padding = padding
        self.out = os.path.join(args.out, name)
        model = shared_model(name)
        if model is not None:  # the reference network of ../shared/models, its card and seeds
            card_dir = os.path.dirname(model)
            self.cond = bool(json.load(open(os.path.join(card_dir, "card.json")))["conditional"])
        else:  # trained here from its preset (train_missing): its own seeds
            card_dir = model = os.path.join(args.train_missing, name)
            self.cond = bool(presets.get(name)["conditional"])
        if args.limit is not None:
            limit = args.limit if limit is None else min(limit, args.limit)
        self.images, labels = pm.data.load(data, limit=limit)
        self.ref = np.load(os.path.join(card_dir, "ddim20_samples.npz"))
        self.seeds = torch.from_numpy(self.ref["seeds"][: args.seeds])
        self.ylab = torch.from_numpy(self.ref["labels"][: args.seeds]) if self.cond else None
        self.train_labels = labels if self.cond else None
        self.net = NetworkDenoiser(load_network(model), device=args.device)
        self.boundary = "circular" if padding == "circular" else "zeros"
        # the machines calibrated: (stage name, machine); the circular network gets both periodic key sets
        self.local = {"ELS": pm.ELS(self.images, self.train_labels, boundary=self.boundary)}
        if self.boundary == "circular":
            self.local["ELSwrap"] = pm.ELS(self.images, self.train_labels, boundary="circular", wrapped=True)
        self.local["LS"] = pm.LS(self.images, self.train_labels)
        self.iss = pm.IS(self.images, self.train_labels)
        self.settings = {"seeds": args.seeds, "calib_seeds": args.calib_seeds, "k_max": args.k_max,
                         "train_images": int(len(self.images))}
        if args.median != "lower":  # (no key: the lower median, the rule of every run before 2026-12-07)
            self.settings["median"] = args.median
        self.stages = self._load_stages()

    # -- stages -------------------------------------------------------------------------------------------
    def _load_stages(self):
        path = os.path.join(self.out, "stages.json")
        if os.path.exists(path):
            return json.load(open(path))
        rep = os.path.join(self.out, "report.json")
        if not os.path.exists(rep):
            return {}
        # a run of the earlier script (no stages.json): its report says what was done and how long it took
        st = stages_from_report(rep)
        write_json(path, st)  # from now on kept like any other run's
        return st

    def done(self, stage):
        return self.stages.get(stage, {}).get("settings") == self.settings and not self.stages[stage].get("partial")

    def mark(self, stage, seconds, partial=False):
        prev = self.stages.get(stage, {})
        same = prev.get("settings") == self.settings
        self.stages[stage] = {"settings": self.settings, "date": time.strftime("%Y-%m-%d"),
                              "device": self.args.device, "machine": machine_line(),
                              "seconds": round((prev.get("seconds", 0.0) if same else 0.0) + seconds, 1)}
        if partial:
            self.stages[stage]["partial"] = True
        write_json(os.path.join(self.out, "stages.json"), self.stages)

    def todo(self):
        names = [f"calibrate_{m}" for m in self.local] + ["compare", "figures"]
        return [s for s in names if not self.done(s)]

    # -- the time estimate ---------------------------------------------------------------------------------
    def estimate(self, n_sub: int = 1000) -> dict:
        """Seconds per stage still to do, from one timed call per patch size on ``n_sub`` training images."""
        todo = self.todo()
        if not todo:
            return {}
        a = self.args
        N = len(self.images)
        n0 = min(N, n_sub)
        scale = N / n0
        dev = torch.device(a.device)
        sub_lab = None if self.train_labels is None else self.train_labels[:n0]
        q = self.seeds[:1].to(dev)
        lab = None if self.ylab is None else self.ylab[:1]
        if sub_lab is not None and lab is not None and not (np.asarray(sub_lab) == int(lab[0])).any():
            lab = torch.as_tensor([int(np.asarray(sub_lab)[0])])

        def timed(fn):
            fn()  # warm-up (first call converts and caches the training images)
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        b = min(a.batch, a.seeds)
        xb = self.seeds[:b].to(dev)
        net_s = timed(lambda: self.net.eps(xb, 0.5, None if self.ylab is None else self.ylab[:b])) / b
        S = 20
        paper = pm.kschedule.paper_schedule(self.paper_name)
        est = {}
        kinds = {"ELS": lambda imgs, y: pm.ELS(imgs, y, boundary=self.boundary),
                 "ELSwrap": lambda imgs, y: pm.ELS(imgs, y, boundary="circular", wrapped=True),
                 "LS": lambda imgs, y: pm.LS(imgs, y)}
        per_sample = {}
        for m in self.local:
            small = kinds[m](self.images[:n0], sub_lab)
            if f"calibrate_{m}" in todo:
                ks = list(range(3, a.k_max + 1, 2))
                t_ks = timed(lambda: small.denoise_ks(q, 0.5, ks, labels=lab))
                est[f"calibrate_{m}"] = S * a.calib_seeds * (t_ks * scale + net_s)
            if "compare" in todo:
                t_k = {k: timed(lambda: small.denoise(q, 0.5, k, labels=lab)) for k in sorted(set(paper.ks))}
                per_sample[m] = sum(t_k[k] for k in paper.ks) * scale
        if "compare" in todo:
            small_is = pm.IS(self.images[:n0], sub_lab)
            is_s = timed(lambda: small_is.denoise(q, 0.5, labels=lab)) * scale
            # ours and the paper's schedule per local machine, IS, the network
            est["compare"] = a.seeds * (2 * sum(per_sample.values()) + S * is_s + S * net_s)
        if "figures" in todo:
            est["figures"] = 5.0  # measured: under a second for 8 seeds
        return est

    # -- the work ------------------------------------------------------------------------------------------
    def calibrate(self) -> dict:
        a, cal = self.args, {}
        mc = a.calib_seeds
        for m, machine in self.local.items():
            stage, path = f"calibrate_{m}", os.path.join(self.out, f"calibration_{m}.json")
            if self.done(stage) and os.path.exists(path):
                c = json.load(open(path))
                cal[m] = pm.KSchedule(c["times"], c["ks"])
                continue
            t0 = time.perf_counter()
            c = calibrate(self.net, machine, self.seeds[:mc], None if self.ylab is None else self.ylab[:mc],
                          k_max=a.k_max, state=os.path.join(self.out, f"calibration_{m}.state.npz"), run_id=self.name,
                          progress=not a.quiet, device=a.device, median=a.median)
            c.to_json(path, network=self.name, seeds=mc, train_images=len(self.images))
            cal[m] = c.schedule
            self.mark(stage, time.perf_counter() - t0)
            print(f"{self.name}: {m} schedule (t = 1 -> 1/20): {list(c.schedule.ks)}", flush=True)
        return cal

    def compare(self, cal):
        a = self.args
        paper = pm.kschedule.paper_schedule(self.paper_name)
        machines = {}
        for m, machine in self.local.items():
            machines[f"{m}_ours"] = MachineDenoiser(machine, cal[m])
            machines[f"{m}_paper"] = MachineDenoiser(machine, paper)
        machines["IS"] = MachineDenoiser(self.iss)
        t0 = time.perf_counter()
        rep = compare(self.net, machines, self.seeds, self.ylab, out_dir=self.out, run_id=self.name,
                      batch_size=a.batch, progress=not a.quiet, device=a.device,
                      info={"network": self.name, "train_images": int(len(self.images)), "conditional": self.cond,
                            "boundary": self.boundary,
                            "k_schedules": {**{f"ours_{m}": list(cal[m].ks) for m in cal},
                                            "paper": list(paper.ks), "paper_name": self.paper_name},
                            "calibration_seeds": a.calib_seeds, "k_max": a.k_max})
        seconds = time.perf_counter() - t0
        u = rep["samples"]["network"]
        ref_samples = torch.from_numpy(self.ref["samples"][: a.seeds])
        rep_json = json.load(open(os.path.join(self.out, "report.json")))
        rep_json["network_vs_reference_max_abs"] = float((u - ref_samples).abs().max())
        write_json(os.path.join(self.out, "report.json"), rep_json)
        if not self.done("compare"):
            self.mark("compare", seconds)
        return rep, cal, paper

    def figures(self, rep, cal, paper):
        if self.done("figures"):
            return
        t0 = time.perf_counter()
        name, out = self.name, self.out
        ch = json.load(open(os.path.join(out, "calibration_ELS.json")))["choices"]
        curves = {f"{m} ours": cal[m] for m in cal}
        curves["paper"] = paper
        save_figure(kschedule_plot(curves, np.array(ch), cal["ELS"].times, title=name.replace("_", " ")),
                    os.path.join(out, "kschedule.png"))
        r = rep["per_seed"]
        els_name = "BELS" if self.boundary == "zeros" else "periodic ELS"
        save_figure(scatter(r["IS"]["r"], r["ELS_ours"]["r"], xlabel="Pearson r of IS with the network",
                            ylabel=f"Pearson r of {els_name} with the network", title=name.replace("_", " ")),
                    os.path.join(out, "scatter.png"))
        u = rep["samples"]["network"]
        near = nearest_training(u, self.images, self.ylab, self.train_labels)
        n = min(8, self.args.seeds)
        s = rep["samples"]
        rows = [self.seeds[:n], u[:n], s["ELS_ours"][:n], s["ELS_paper"][:n]]
        names = ["noise", "network", "ELS ours", "ELS paper"]
        if "ELSwrap_ours" in s:
            rows.append(s["ELSwrap_ours"][:n])
            names.append("ELS wrapped")
        rows += [s["LS_ours"][:n], s["IS"][:n], self.images[near[:n]]]
        names += ["LS ours", "IS", "nearest"]
        save_figure(comparison_grid(rows, names), os.path.join(out, "grid.png"))
        self.mark("figures", time.perf_counter() - t0)

    def run(self):
        os.makedirs(self.out, exist_ok=True)
        cal = self.calibrate()
        if self.done("compare") and self.done("figures"):
            return
        rep, cal, paper = self.compare(cal)
        self.figures(rep, cal, paper)


# -- the table ---------------------------------------------------------------------------------------------
def finished(out_dirs):
    """(name, report, stages, paper row) of every network with a finished comparison under the first of out_dirs
    that has one, in table order."""
    rows = []
    for name in ORDER:
        d = next((os.path.join(o, name) for o in out_dirs if os.path.exists(os.path.join(o, name, "report.json"))),
                 None)
        if d is None:
            continue
        rep = json.load(open(os.path.join(d, "report.json")))
        st_path = os.path.join(d, "stages.json")
        stages = json.load(open(st_path)) if os.path.exists(st_path) else stages_from_report(
            os.path.join(d, "report.json"))
        _, _, padding, _, (pdata, parch) = NETWORKS[name]
        rows.append((name, rep, stages, paper_row(pdata, parch, padding)))
    return rows


def table(results) -> str:
    lines = ["| network | train images | seeds | machine: k-schedule | median r ELS [IQR] | median r LS | median r IS | "
             "ELS beats IS | median R² ELS | median R² LS | median R² IS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep, _, prow in results:
        s = rep["summary"]
        ksch = rep["k_schedules"]
        els_kinds = [m for m in ("ELS", "ELSwrap") if f"{m}_ours" in s]
        for m in els_kinds:
            label = {"ELS": "BELS" if rep.get("boundary", "zeros") == "zeros" else "periodic ELS, interior keys",
                     "ELSwrap": "periodic ELS, wrapped keys"}[m]
            for which in ("ours", "paper"):
                e, l_, i = s[f"{m}_{which}"], s[f"LS_{which}"], s["IS"]
                ks = ksch[f"ours_{m}"] if which == "ours" else ksch["paper"]
                lines.append(
                    f"| {name} | {rep['train_images']} | {rep['seeds']} | {label}, {which}: {','.join(map(str, ks))} | "
                    f"{e['r']['median']:.3f} [{e['r']['q25']:.2f}, {e['r']['q75']:.2f}] | {l_['r']['median']:.3f} | "
                    f"{i['r']['median']:.3f} | {fraction(e['frac_beats_IS_r'])} | {e['R2']['median']:.3f} | "
                    f"{l_['R2']['median']:.3f} | {i['R2']['median']:.3f} |")
        if prow is not None:
            lines.append(f"| paper: {prow['dataset']} {prow['arch']} {prow['padding']} (Table 2, 20 steps) | full set | "
                         f"100 | paper | {prow['ELS']['table2']:.2f} | {prow['LS']['table2']:.2f} | "
                         f"{prow['IS']['table2']:.2f} | {prow['frac_local_beats_IS']['table2']:.2f} | — | — | — |")
    return "\n".join(lines)


def cost_line(name, stages) -> str:
    parts = [f"{st.replace('calibrate_', 'calibration ')} {v['seconds']:.0f} s" for st, v in stages.items()
             if v.get("seconds")]
    where = {v.get("machine", "") + (f", {v['device']}" if v.get("device") else "") for v in stages.values()} - {""}
    dates = sorted({v["date"] for v in stages.values() if "date" in v})
    extra = f" ({'; '.join(sorted(where))}; {', '.join(dates)})" if where else f" ({', '.join(dates)})"
    return f"{name}: " + ", ".join(parts) + extra


def write_md(path, block, results, command):
    lines = ["", f"Command: `{command}`  ",
             "Compute per network and stage: " + "; ".join(cost_line(n, st) for n, _, st, _ in results) + ".",
             "", table(results), ""]
    write_block(path, block, "\n".join(lines))


def fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["all"], choices=["all"] + ORDER,
                   help="networks to run, or 'all' (default)")
    p.add_argument("--seeds", type=int, default=32, help="comparison seeds (at most 128; default 32)")
    p.add_argument("--calib-seeds", type=int, default=8, help="seeds of the calibration (the first ones; default 8)")
    p.add_argument("--k-max", type=int, default=23, help="largest candidate patch size (default 23)")
    p.add_argument("--median", default="rounded", choices=["rounded", "lower"],
                   help="the calibrations' per-step rule (pm.calibrate's median=); the runs recorded in RESULTS "
                        "section 3 used 'lower'")
    p.add_argument("--batch", type=int, default=8, help="seeds sampled per machine call (default 8)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first LIMIT training images (a reduced run; default: the network's whole set)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where network and machines run")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--md", nargs="*", default=None,
                   help="markdown files whose table block is replaced (none: skip; default: bench/RESULTS.md and the "
                        "README when --out is the default folder and no --train-option changes a recipe, else none)")
    p.add_argument("--block", default="reproduce", help="name of the table block in the markdown files")
    p.add_argument("--also", nargs="*", default=[os.path.join(HERE, "results", "reproduce_mnist_cpu_small")],
                   help="result folders whose finished networks fill the table's rows missing under --out "
                        "(default: the reduced CPU run of the MNIST rows)")
    p.add_argument("--estimate-only", action="store_true", help="print the time estimate and stop")
    p.add_argument("--train-missing", default=None, metavar="DIR",
                   help="train each network missing from ../shared/models from its preset into DIR/<network> "
                        "(resumable) and use it, with its own DDIM samples as the reference seeds")
    p.add_argument("--train-option", action="append", default=None, metavar="KEY=VALUE",
                   help="with --train-missing: change the preset (e.g. steps=2000, batch_size=64; repeatable)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    names = ORDER if "all" in args.networks else [n for n in ORDER if n in args.networks]
    if not 1 <= args.seeds <= 128 or not 1 <= args.calib_seeds <= args.seeds:
        sys.exit(f"--seeds must be in 1..128 and --calib-seeds in 1..--seeds, got {args.seeds} and {args.calib_seeds}")
    if args.device.startswith("cuda") and not pm.ops.cuda_available():
        sys.exit("--device cuda: this build has no usable CUDA engine (patchmosaic --version says why)")
    for n in names:  # every data set is there before any work (the error says where to put a missing one)
        try:
            pm.data.load(NETWORKS[n][0], limit=1)
        except ValueError as e:
            sys.exit(f"{n}: {e}")
    missing = [n for n in names if shared_model(n) is None]
    if missing and args.train_missing is None:
        sys.exit(f"no reference network {', '.join(missing)} in {os.path.join(SHARED, 'models')}: pass --train-missing "
                 "DIR to train each from its preset (patchmosaic train --preset NAME), or set PATCHMOSAIC_SHARED")
    if args.train_option and args.train_missing is None:
        sys.exit("--train-option changes the preset of --train-missing, which is not given")
    total = 0.0
    print(f"# time estimate ({args.device}, {machine_line()}):", flush=True)
    for n in missing:
        total += estimate_training(n, args)
    if missing:
        print(f"#   (the other stages of {', '.join(missing)}: estimated once the network is trained)", flush=True)
    runs = []
    for n in names:
        if n in missing and args.estimate_only:
            continue
        if n in missing:
            train_missing(n, args)
        runs.append(Run(n, args))
    for r in runs:
        est = r.estimate()
        total += sum(est.values())
        what = ", ".join(f"{k.replace('calibrate_', 'calibration ')} {fmt_s(v)}" for k, v in est.items()) or "done"
        print(f"#   {r.name} ({len(r.images)} training images): {what}", flush=True)
    print(f"# total about {fmt_s(total)}", flush=True)
    if args.estimate_only:
        return
    for r in runs:
        r.run()
    results = finished([args.out] + list(args.also))
    print(table(results))
    cmd = "python bench/reproduce.py --networks " + ("all" if "all" in args.networks else " ".join(names))
    for flag, default in (("seeds", 32), ("calib_seeds", 8), ("k_max", 23), ("limit", None)):
        v = getattr(args, flag)
        if v != default:
            cmd += f" --{flag.replace('_', '-')} {v}"
    if args.device != "cpu":
        cmd += f" --device {args.device}"
    if missing:
        cmd += f" --train-missing {args.train_missing}" + "".join(f" --train-option {o}" for o in args.train_option or [])
    md = args.md
    if md is None:  # the project's own table only from its own run: a trial elsewhere or a changed recipe leaves it
        own = os.path.abspath(args.out) == os.path.abspath(DEFAULT_OUT) and not args.train_option
        md = [os.path.join(HERE, "RESULTS.md"), os.path.join(HERE, "..", "README.md")] if own else []
        if not own:
            print("(the README's and RESULTS.md's table left as they are: --md FILE... writes this one there)")
    for path in md:
        write_md(path, args.block, results, cmd)


if __name__ == "__main__":
    main()
