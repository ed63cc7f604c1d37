"""Pictures without plotting libraries: comparison grids and the paper's scatter of r_IS vs r_local.

Both return uint8 ``(H, W, 3)`` arrays; :func:`patchmosaic.png.write_png` writes them. Text uses a
built-in 3x5 pixel font (upper-case letters, digits and a few signs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .png import grid, to_uint8

_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", ":": "000010000010000", "=": "000111000111000", "/": "001001010100100",
    "(": "010100100100010", ")": "010001001001010", "_": "000000000000111", "%": "101001010100101",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}


def draw_text(img: np.ndarray, text: str, y: int, x: int, scale: int = 2, colour=(0, 0, 0),
              vertical: bool = False) -> None:
    """Draw ``text`` into ``img`` in place, top-left corner at ``(y, x)`` (unknown characters: blanks)."""
    for i, ch in enumerate(text.upper()):
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        g = np.array([int(b) for b in bits], bool).reshape(5, 3)
        if vertical:
            g = np.rot90(g)
        g = np.repeat(np.repeat(g, scale, 0), scale, 1)
        oy, ox = (y - (i + 1) * 4 * scale, x) if vertical else (y, x + i * 4 * scale)
        h, w = g.shape
        if oy < 0 or ox < 0 or oy + h > img.shape[0] or ox + w > img.shape[1]:
            continue
        img[oy : oy + h, ox : ox + w][g] = colour


def scatter(xs: Sequence[float], ys: Sequence[float], *, xlabel: str = "", ylabel: str = "", title: str = "",
            lo: float = 0.0, hi: float = 1.0, size: int = 360, colours: Optional[Sequence] = None) -> np.ndarray:
    """A square scatter plot on ``[lo, hi]^2`` with the diagonal ``y = x``, ticks every 0.2 and labels."""
    m = 40  # margin for ticks and labels
    img = np.full((size + 2 * m, size + 2 * m, 3), 255, np.uint8)
    x0, y0 = m, m + size  # data origin at the bottom-left corner

    def px(v):
        return np.clip((np.asarray(v, float) - lo) / (hi - lo), 0, 1) * (size - 1)

    img[m : m + size, x0] = img[y0 - 1, x0 : x0 + size] = 0
    img[m, x0 : x0 + size] = img[m : m + size, x0 + size - 1] = 160
    diag = np.arange(size)
    img[y0 - 1 - diag, x0 + diag] = (150, 150, 150)
    for tv in np.arange(0, 1.0001, 0.2):
        v = lo + tv * (hi - lo)
        p = int(px(v))
        img[y0 : y0 + 5, x0 + p] = 0
        img[y0 - 1 - p, x0 - 5 : x0] = 0
        lab = f"{v:.1f}"
        draw_text(img, lab, y0 + 8, x0 + p - 6, 2)
        draw_text(img, lab, y0 - 1 - p - 5, x0 - 32, 2)
    draw_text(img, xlabel, y0 + 24, x0 + size // 2 - 4 * len(xlabel), 2)
    draw_text(img, ylabel, m + size // 2 + 4 * len(ylabel), 4, 2, vertical=True)
    draw_text(img, title, 12, x0, 2)
    cols = colours if colours is not None else [(200, 40, 40)] * len(xs)
    for xv, yv, c in zip(px(xs), px(ys), cols):
        if not (np.isfinite(xv) and np.isfinite(yv)):
            continue
        cy, cx = int(y0 - 1 - yv), int(x0 + xv)
        img[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3] = c
    return img


def comparison_grid(rows: Sequence[np.ndarray], names: Sequence[str], scale: int = 2) -> np.ndarray:
    """One column per seed, one row per image kind (e.g. noise, network, machine, nearest), row names on the left.

    ``rows``: arrays ``(M, C, H, W)`` in [-1, 1] (noise is shown clipped to +-3, scaled to [-1, 1]).
    """
    M = rows[0].shape[0]
    tiles = []
    for r, name in zip(rows, names):
        r = np.asarray(r, dtype=np.float64)
        if name.lower().startswith("noise"):
            r = np.clip(r, -3, 3) / 3
        tiles += [to_uint8(r[m]) for m in range(M)]
    pic = grid(tiles, len(rows), M, pad=2, scale=scale)
    label_w = 4 * 2 * max(len(n) for n in names) + 8
    out = np.full((pic.shape[0], pic.shape[1] + label_w, 3), 255, np.uint8)
    out[:, label_w:] = pic
    h = rows[0].shape[-2] * scale + 2
    for i, name in enumerate(names):
        draw_text(out, name, 2 + i * h + h // 2 - 5, 4, 2)
    return out


def kschedule_plot(schedules: dict, choices: Optional[np.ndarray] = None, times: Optional[Sequence[float]] = None,
                   *, title: str = "", size: int = 360) -> np.ndarray:
    """Patch size k against t (t = 1 on the left, as the reverse process runs) for named schedules
    (``name -> KSchedule``, one colour each, legend at the top right); ``choices`` ``(steps, seeds)``
    (a calibration's per-seed picks at ``times``) are drawn as small grey dots behind them."""
    palette = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (160, 60, 170), (220, 140, 20)]
    all_k = [k for s in schedules.values() for k in s.ks] + ([] if choices is None else list(np.ravel(choices)))
    k_hi = int(max(all_k) + 2)
    m = 40
    img = np.full((size + 2 * m, size + 2 * m, 3), 255, np.uint8)
    x0, y0 = m, m + size

    def px(t, k):
        return int(y0 - 1 - (k / k_hi) * (size - 1)), int(x0 + (1 - t) * (size - 1))

    img[m : m + size, x0] = img[y0 - 1, x0 : x0 + size] = 0
    for tv in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, cx = px(tv, 0)
        img[y0 : y0 + 5, cx] = 0
        draw_text(img, f"{tv:g}", y0 + 8, cx - 6, 2)
    for kv in range(0, k_hi + 1, 4 if k_hi > 16 else 2):
        cy, _ = px(1, kv)
        img[cy, x0 - 5 : x0] = 0
        draw_text(img, str(kv), cy - 5, x0 - 30, 2)
    draw_text(img, "T", y0 + 24, x0 + size // 2, 2)
    draw_text(img, "K", m - 14, x0 - 3, 2)
    draw_text(img, title, 12, x0, 2)
    if choices is not None and times is not None:
        rng = np.random.default_rng(0)
        for i, t in enumerate(times):
            for k in np.ravel(choices[i]):
                cy, cx = px(t, k)
                cx += int(rng.integers(-3, 4))
                img[cy - 1 : cy + 2, cx - 1 : cx + 2] = (170, 170, 170)
    for j, (name, s) in enumerate(schedules.items()):
        c = palette[j % len(palette)]
        pts = [px(t, k) for t, k in zip(s.times, s.ks)]
        for (ya, xa), (yb, xb) in zip(pts[:-1], pts[1:]):  # steps: horizontal then vertical
            img[ya - 1 : ya + 2, min(xa, xb) : max(xa, xb) + 1] = c
            img[min(ya, yb) : max(ya, yb) + 1, xb - 1 : xb + 2] = c
        for cy, cx in pts:
            img[cy - 3 : cy + 4, cx - 3 : cx + 4] = c
        ly = m + 8 + 14 * j
        img[ly : ly + 8, x0 + size - 120 : x0 + size - 108] = c
        draw_text(img, name, ly - 1, x0 + size - 100, 2)
    return img
