"""Figures with matplotlib: the comparison grid of samples, the scatter of r_IS against a local machine's
r, and calibrated k-schedules.

Each plot function returns a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas (no pyplot and
no global figure state: safe without a display and from threads); :func:`save_figure` writes it as PNG,
SVG or PDF, the format named by the file's extension, through the atomic-write helper of io/files.py.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import write_bytes
from .images import grid, to_uint8

FORMATS = ("png", "svg", "pdf")


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches on a private Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_format(path: str) -> str:
    """The format a figure at ``path`` is written in (its extension), or a ValueError naming the choices."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"cannot write a figure to {path}: the name must end in one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    return ext


def save_figure(fig: Figure, path: str, dpi: int = 150) -> None:
    """Write ``fig`` to ``path`` as PNG, SVG or PDF (by its extension), atomically."""
    fmt = figure_format(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    write_bytes(path, buf.getvalue())


def scatter(xs: Sequence[float], ys: Sequence[float], *, xlabel: str = "", ylabel: str = "", title: str = "",
            lo: float = 0.0, hi: float = 1.0, label: str = "seeds") -> Figure:
    """A square scatter of ``ys`` against ``xs`` with the diagonal ``y = x`` (points above it: ``y`` beats
    ``x``), on ``[lo, hi]^2`` widened to hold every point; non-finite points are left out."""
    fig = new_figure(4.5, 4.5)
    ax = fig.add_subplot()
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    lo, hi = min([lo, *x, *y]), max([hi, *x, *y])
    margin = 0.02 * (hi - lo)
    ax.plot([lo, hi], [lo, hi], color="0.6", linewidth=1, label="y = x")
    ax.scatter(x, y, s=18, color="tab:red", label=f"{label} ({len(x)})", zorder=3)
    ax.set(xlim=(lo - margin, hi + margin), ylim=(lo - margin, hi + margin), xlabel=xlabel, ylabel=ylabel,
           title=title, aspect="equal")
    ax.grid(True, color="0.9")
    ax.legend(loc="best")
    return fig


def comparison_grid(rows: Sequence[np.ndarray], names: Sequence[str], tile_inches: float = 0.8,
                    columns: Optional[Sequence[str]] = None) -> Figure:
    """One column per seed, one row per image kind (e.g. noise, network, machine, nearest), the row names
    as tick labels on the left; ``columns``: a label per column instead of the seed numbers.

    ``rows``: arrays ``(M, C, H, W)`` in [-1, 1] (a row named ``noise...`` is shown clipped to +-3, scaled
    to [-1, 1]).
    """
    if len(rows) != len(names) or not rows:
        raise ValueError(f"comparison_grid needs one name per row, got {len(rows)} rows and {len(names)} names")
    M = rows[0].shape[0]
    h, w = rows[0].shape[-2:]
    tiles = []
    for r, name in zip(rows, names):
        r = np.asarray(r, dtype=np.float64)
        if name.lower().startswith("noise"):
            r = np.clip(r, -3, 3) / 3
        tiles += [to_uint8(r[m]) for m in range(M)]
    pad = max(1, h // 16)
    pic = grid(tiles, len(rows), M, pad=pad)
    label_inches = 0.12 * max(len(n) for n in names) + 0.4
    fig = new_figure(label_inches + tile_inches * M, 0.5 + tile_inches * len(rows))
    ax = fig.add_subplot()
    ax.imshow(pic, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))], list(names))
    if columns is not None and len(columns) != M:
        raise ValueError(f"comparison_grid needs one column label per column, got {len(columns)} for {M}")
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(M)],
                  [str(j) for j in range(M)] if columns is None else list(columns),
                  rotation=0 if columns is None else 90)
    ax.set_xlabel("seed" if columns is None else "")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def kschedule_plot(schedules: dict, choices: Optional[np.ndarray] = None, times: Optional[Sequence[float]] = None,
                   *, title: str = "") -> Figure:
    """A per-step parameter against t (t = 1 on the left, as the reverse process runs) for named schedules
    (``name -> KSchedule`` or ``ThresholdSchedule``, a step line each: ``values[i]`` holds from ``times[i]`` to the
    next step; the y axis says which parameter: patch size k, or a threshold on a log scale);
    ``choices`` ``(steps, seeds)`` (a calibration's per-seed picks at ``times``) are grey dots behind them."""
    integer = all(hasattr(s, "ks") for s in schedules.values())
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    if choices is not None and times is not None:
        c = np.asarray(choices, np.float64).reshape(len(times), -1)
        jitter = np.random.default_rng(0).uniform(-0.008, 0.008, c.shape)
        ax.scatter((np.asarray(times, np.float64)[:, None] + jitter).ravel(), c.ravel(), s=8, color="0.7",
                   label="per-seed choices", zorder=1)
    for name, s in schedules.items():
        t = [float(v) for v in s.times] + [0.0]
        k = [int(v) if integer else float(v) for v in s.values]
        (line,) = ax.step(t, k + k[-1:], where="post", linewidth=2, label=str(name), zorder=2)
        ax.plot(t[:-1], k, "o", color=line.get_color(), markersize=4, zorder=3)
    ax.set_xlim(1.02, -0.02)
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_yscale("log")
    ax.set(xlabel="diffusion time t (sampling runs from t = 1 to 0)", ylabel="patch size k" if integer else
           "threshold", title=title)
    ax.grid(True, color="0.9")
    ax.legend(loc="upper right")
    return fig
