"""One machine against calibrated ELS over the reference seeds of several runs of ``bench/all_machines.py`` (issue 27):
the runs' per-seed Pearson r pooled (their seed ranges must not overlap, their calibrations must be the same), then
the paired difference's median, its 95% bootstrap interval and the share of seeds where the machine is higher, as
``all_machines.paired`` computes them for one run. Reads the runs' ``<network>/report.json``; writes nothing but
``--json``.

    python bench/pooled_seeds.py --runs bench/results/all_machines,bench/results/all_machines_heldout,\\
        bench/results/all_machines_seeds64 --machine cifar10k_resnet_zeros_cond=Blend-F,...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from all_machines import paired  # noqa: E402
from common import write_rows  # noqa: E402


def seed_range(rep: dict) -> range:
    first = int(rep["settings"].get("first_seed", 0))
    return range(first, first + int(rep["settings"]["seeds"]))


def pooled(reports: list, machine: str) -> dict:
    """The runs' per-seed r of ``machine`` and ELS in one report (``paired`` reads it), after checking that the
    seed ranges are disjoint and the schedules the same."""
    seen: set = set()
    for rep in reports:
        s = set(seed_range(rep))
        if s & seen:
            raise SystemExit(f"seed ranges overlap: {sorted(s & seen)[:3]} ...")
        seen |= s
        for key in ("k_schedules", "weight_schedules"):
            if rep.get(key) and reports[0].get(key) and any(
                    rep[key].get(m) != reports[0][key].get(m) for m in (machine, "ELS") if m in rep[key]):
                raise SystemExit(f"{key} differ between the runs: not the same calibrated machines")
        for m in (machine, "ELS"):
            if m not in rep["per_seed"]:
                raise SystemExit(f"{m} missing from a run of {rep['network']}")
    return {"per_seed": {m: {"r": sum((list(rep["per_seed"][m]["r"]) for rep in reports), [])}
                         for m in (machine, "ELS")}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="comma-separated result folders of bench/all_machines.py")
    p.add_argument("--machine", required=True, help="comma-separated NETWORK=MACHINE")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for item in a.machine.split(","):
        net, machine = item.split("=")
        reports = []
        for run in a.runs.split(","):
            with open(os.path.join(run, net, "report.json")) as f:
                reports.append(json.load(f))
        each = [paired(rep, machine) for rep in reports]
        med, (lo, hi), share = paired(pooled(reports, machine), machine)
        n = sum(len(seed_range(rep)) for rep in reports)
        rows.append({"network": net, "machine": machine, "seeds": n, "median": med, "interval": [lo, hi],
                     "share_higher": share, "per_run": [{"seeds": [seed_range(r).start, seed_range(r).stop - 1],
                                                         "median": e[0], "interval": e[1], "share_higher": e[2]}
                                                        for r, e in zip(reports, each)]})
        runs = "; ".join(f"seeds {seed_range(r).start}-{seed_range(r).stop - 1}: {e[0]:+.3f} [{e[1][0]:+.4f}, "
                         f"{e[1][1]:+.4f}], {e[2]:.0%}" for r, e in zip(reports, each))
        print(f"{net} {machine} - ELS: pooled {n} seeds {med:+.4f} [{lo:+.4f}, {hi:+.4f}], {share:.0%} higher "
              f"({'above 0' if lo > 0 else 'not above 0'}); {runs}", flush=True)
    if a.json:
        write_rows(a.json, rows)


if __name__ == "__main__":
    main()
