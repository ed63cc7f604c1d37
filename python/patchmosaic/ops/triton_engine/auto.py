"""``backend="auto"`` on a GPU: the fastest exact engine for a call's shape, from a table of measured times.

The table is JSON (``auto_table.json`` beside this module, or the file ``$PATCHMOSAIC_AUTO_TABLE`` names), written by
``bench/gpu_triton.py --auto-table FILE`` on a GPU: per GPU model (``torch.cuda.get_device_name``), rows of one
call's shape (``op`` "local" or "ideal", key-set ``rule``, channels ``C``, patch size ``k``, batch ``B``, training
images ``N``, ``dtype``) with the seconds each engine took (``times``: ``{"cuda": s, "triton": s, ...}``). A call
takes the engine that was fastest on the nearest measured shape of its GPU, op, rule, channels and dtype (nearest
in log k, log B and log N); with no such row (another GPU, an empty table, a CPU tensor) ``auto`` does what it did
before the table existed: the CPU engine on the CPU, the CUDA engine on a GPU. Only engines that can run the call
are chosen (the Triton engine needs ``triton``; the CUDA engine a CUDA build).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "auto_table.json")


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime: float) -> dict:
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("devices", {}), dict):
        raise ValueError(f"{path}: not an engine timing table (a JSON object with 'devices')")
    return table


def table() -> dict:
    """The measured table in use (``{"devices": {}}`` when there is none)."""
    path = os.environ.get("PATCHMOSAIC_AUTO_TABLE") or DEFAULT
    if not os.path.exists(path):
        return {"devices": {}}
    return _read(path, os.path.getmtime(path))


def nearest(rows, k: int, B: int, N: int) -> Optional[dict]:
    """The row whose (k, B, N) is nearest in log scale, or None."""
    def dist(r):
        return sum((math.log(max(1, x)) - math.log(max(1, y))) ** 2 for x, y in
                   ((r.get("k", 0) or 1, k or 1), (r.get("B", 1), B), (r.get("N", 1), N)))
    return min(rows, key=dist) if rows else None


def choose(device_name: str, op: str, rule: Optional[str], C: int, k: int, B: int, N: int, dtype: str,
           candidates) -> Optional[str]:
    """The fastest of ``candidates`` (engine names) on the nearest measured shape, or None without a row."""
    dev = table()["devices"].get(device_name)
    if not dev:
        return None
    rows = [r for r in dev.get("rows", []) if r.get("op") == op and r.get("rule") == rule and r.get("C") == C
            and r.get("dtype") == dtype and any(e in r.get("times", {}) for e in candidates)]
    row = nearest(rows, k, B, N)
    if row is None:
        return None
    times = {e: t for e, t in row["times"].items() if e in candidates and t is not None}
    return min(times, key=times.get) if times else None
