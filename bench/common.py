"""Shared helpers of the benchmark scripts: data from ../shared, timing, machine description."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

# ../shared beside the checkout, or $PATCHMOSAIC_SHARED (the device machine gets a carried copy)
SHARED = os.environ.get("PATCHMOSAIC_SHARED") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")


def load(name: str, n: int | None = None):
    """(images float32 (N, C, 32, 32) in [-1, 1], labels) with the paper's preprocessing."""
    from patchmosaic.data import preprocess

    if name == "mnist":
        d = np.load(os.path.join(SHARED, "data", "mnist.npz"))
        x, y = d["x_train"], d["y_train"]
    elif name == "cifar10":
        d = np.load(os.path.join(SHARED, "data", "cifar10_10k.npz"))
        x, y = d["x_train"], d["y_train"]
    else:
        raise ValueError(f"unknown data set {name}")
    if n is not None:
        x, y = x[:n], y[:n]
    return preprocess(x).numpy(), y


def best_time(fn, repeat: int = 1, clock=time.perf_counter) -> float:
    """The best of ``repeat`` calls of ``fn`` by ``clock`` (wall seconds; ``time.process_time``: CPU seconds of the
    process, every thread)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def write_rows(path: str, rows) -> None:
    """``rows`` as JSON at ``path``, with the command, machine and BLAS, written atomically (a temporary file
    renamed)."""
    import json
    import sys

    with open(path + ".tmp", "w") as fh:
        json.dump({"command": " ".join(sys.argv), "machine": machine_line(), "blas": blas_line(), "rows": rows}, fh,
                  indent=1)
    os.replace(path + ".tmp", path)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def blas_line() -> str:
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                         f"threads={i.get('num_threads')}" for i in threadpool_info())
    except ImportError:
        return "threadpoolctl not installed"


def write_block(path: str, name: str, body: str, append: bool = True) -> bool:
    """Replace what lies between the markers ``<!-- name:begin -->`` and ``<!-- name:end -->`` of the markdown file
    ``path`` by ``body`` (atomically). Without the markers: with ``append`` the block goes at the end of the file
    (created if missing), else nothing is written. Returns whether the file was written."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    new = begin + "\n" + body + "\n" + end
    if begin in text and end in text:
        text = text[: text.index(begin)] + new + text[text.index(end) + len(end):]
    elif append:
        text = text.rstrip() + "\n\n" + new + "\n"
    else:
        return False
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return True
