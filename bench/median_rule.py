"""How the calibration's per-step rule changes the recorded schedules: every calibration JSON under
bench/results (its per-seed ``choices`` and ``candidates``), per results folder, the steps whose value differs
between the lower median over seeds (the rule of every run before 2026-12-07) and the median rounded to the nearest
candidate (spec section 4, ``pm.calibrate``'s default since then). No machine or network runs: the choices are
the runs' own.

    PYTHONPATH=python python bench/median_rule.py
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from patchmosaic.experiments.calibrate import lower_median, rounded_median

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
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
        folder = os.path.relpath(path, os.path.join(HERE, "results")).split(os.sep)[0]
        row = per.setdefault(folder, {"files": 0, "seeds": set(), "steps": 0, "changed": 0, "recorded_not_lower": 0})
        row["files"] += 1
        row["seeds"].add(choices.shape[1])
        row["steps"] += len(low)
        row["changed"] += sum(a != b for a, b in zip(low, rnd))
        row["recorded_not_lower"] += recorded is not None and [float(v) for v in recorded] != [float(v) for v in low]
    print("| results folder | calibrations | seeds each | steps | steps whose value changes | recorded != lower median |")
    print("|---|---|---|---|---|---|")
    for folder, r in per.items():
        print(f"| {folder} | {r['files']} | {', '.join(map(str, sorted(r['seeds'])))} | {r['steps']} | "
              f"{r['changed']} ({100 * r['changed'] / r['steps']:.0f}%) | {r['recorded_not_lower']} |")


if __name__ == "__main__":
    main()
