"""How the calibration's per-step rule changes the recorded schedules: every calibration JSON under
bench/results (its per-seed ``choices`` and ``candidates``), per results folder, the steps whose value differs
between the lower median over seeds (the rule of every run before 2026-12-07) and the median rounded to the nearest
candidate (spec section 4, ``pm.calibrate``'s default since then). No machine or network runs: the choices are
the runs' own.

    PYTHONPATH=python python bench/median_rule.py

With ``--compare OLD NEW`` (two bench/all_machines.py output folders, e.g. a run with ``--median lower`` and one with
``--median rounded``): per network and machine present in both, the median Pearson r and R² of each run and their
difference.

    PYTHONPATH=python python bench/median_rule.py --compare bench/results/all_machines bench/results/all_machines_rounded
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from patchmosaic.experiments.calibrate import lower_median, rounded_median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from all_machines import paired  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def schedule_of(report: dict, machine: str):
    """The calibrated per-step values of ``machine`` in a report: its k, threshold or weight schedule (the FPMC
    variant's under "FPMC"); None if it has none."""
    for entry in ("k_schedules", "threshold_schedules", "weight_schedules"):
        table = report.get(entry) or {}
        for name in (machine, "FPMC" if machine.startswith("FPMC") else None):
            if name in table:
                return table[name]
    return None


def compare(old: str, new: str) -> None:
    """Per network and machine in both runs: median r and R² of each, and seed by seed (the same seeds) the median
    of r(new) - r(old) with a 95% bootstrap interval of that median and the share of seeds higher."""
    print("| network | machine | steps whose value differs | r, old | r, new | per seed: new - old [95% interval], "
          "higher | R², old | R², new |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(new, "*", "report.json"))):
        net = os.path.basename(os.path.dirname(path))
        other = os.path.join(old, net, "report.json")
        if not os.path.exists(other):
            continue
        with open(path) as fh:
            b = json.load(fh)
        with open(other) as fh:
            a = json.load(fh)
        for m in sorted(set(a["summary"]) & set(b["summary"])):
            if m == "IS":
                continue
            # (all_machines.paired: the same seeds' r, new run against old)
            med, (lo, hi), higher = paired({"per_seed": {"new": b["per_seed"][m], "old": a["per_seed"][m]}}, "new", "old")
            ka, kb = schedule_of(a, m), schedule_of(b, m)
            steps = "—" if ka is None or kb is None else sum(float(x) != float(y) for x, y in zip(ka, kb))
            sa, sb = a["summary"][m], b["summary"][m]
            print(f"| {net} | {m} | {steps} | {sa['r']['median']:.3f} | {sb['r']['median']:.3f} | "
                  f"{med:+.4f} [{lo:+.4f}, {hi:+.4f}], {higher:.0%} | {sa['R2']['median']:.2f} | "
                  f"{sb['R2']['median']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), default=None)
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    per = {}
    for path in sorted(glob.glob(os.path.join(HERE, "results", "**", "calibration_*.json"), recursive=True)):
        with open(path) as fh:
            c = json.load(fh)
        if "choices" not in c or "candidates" not in c:
            continue
        choices = np.asarray(c["choices"])
        low = [lower_median(r) for r in choices]
        rnd = [rounded_median(r, c["candidates"]) for r in choices]
        recorded = next((c[k] for k in ("ks", "thresholds", "weights") if k in c), None)
        rule = (c.get("settings") or {}).get("median", "lower")  # (no key: made before the rule was recorded)
        made = rnd if rule == "rounded" else low
        folder = os.path.relpath(path, os.path.join(HERE, "results")).split(os.sep)[0]
        row = per.setdefault(folder, {"files": 0, "seeds": set(), "steps": 0, "changed": 0, "recorded_not_rule": 0,
                                      "rules": set()})
        row["rules"].add(rule)
        row["files"] += 1
        row["seeds"].add(choices.shape[1])
        row["steps"] += len(low)
        row["changed"] += sum(a != b for a, b in zip(low, rnd))
        row["recorded_not_rule"] += recorded is not None and [float(v) for v in recorded] != [float(v) for v in made]
    print("| results folder | calibrations | seeds each | rule it was made with | steps | steps whose value differs "
          "between the rules | recorded != its rule's |")
    print("|---|---|---|---|---|---|---|")
    for folder, r in per.items():
        print(f"| {folder} | {r['files']} | {', '.join(map(str, sorted(r['seeds'])))} | "
              f"{', '.join(sorted(r['rules']))} | {r['steps']} | {r['changed']} "
              f"({100 * r['changed'] / r['steps']:.0f}%) | {r['recorded_not_rule']} |")


if __name__ == "__main__":
    main()
