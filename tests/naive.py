"""A literal, loop-by-loop transcription of spec section 2 in float64 numpy.

Independent of the package's key sets and backends (it recomputes every padding signature from the
spec's formula), so that the torch oracle itself is checked. Only for tiny cases.
"""

import numpy as np


def pad_patch(img, i, j, k, mode):
    """C*k*k patch of img (C, H, W) centred at (i, j): 'zeros' or 'circular' padding."""
    C, H, W = img.shape
    r = k // 2
    out = np.zeros((C, k, k))
    for di in range(k):
        for dj in range(k):
            y, x = i - r + di, j - r + dj
            if mode == "circular":
                out[:, di, dj] = img[:, y % H, x % W]
            elif 0 <= y < H and 0 <= x < W:
                out[:, di, dj] = img[:, y, x]
    return out.ravel()


def sig(i, j, H, W, r):
    return (max(0, r - i), max(0, i + r - (H - 1)), max(0, r - j), max(0, j + r - (W - 1)))


def softmax_average(q, keys, centres, a, b2, weights=None):
    """``weights``: a masked neighbourhood's weight of every patch element (None: all 1)."""
    w2 = 1.0 if weights is None else weights[None, :]
    d2 = (w2 * (q[None, :] - a * keys) ** 2).sum(1)
    logit = -d2 / (2 * b2)
    w = np.exp(logit - logit.max())
    return (w[:, None] * centres).sum(0) / w.sum()


def denoise(machine, train, x, a, b2, k=None, groups=None, wrapped=False, mask=None):
    """machine in {'IS', 'LS', 'ELS_circular', 'ELS_zeros'}; groups[b] = training indices for query b; mask: a
    local machine's (k, k) neighbourhood weights, or (Hq, Wq, k, k) one per query pixel (None: the square patch)."""
    train = np.asarray(train, np.float64)
    x = np.asarray(x, np.float64)
    N, C, H, W = train.shape
    B, _, Hq, Wq = x.shape
    out = np.zeros_like(x)
    mask = None if mask is None else np.asarray(mask, np.float64)
    per_pixel = mask is not None and mask.ndim == 4  # (Hq, Wq, k, k): a mask per query pixel
    weights = None if mask is None or per_pixel else np.tile(mask.ravel(), C)
    for b in range(B):
        imgs = train[groups[b]] if groups is not None else train
        ab, bb = float(np.asarray(a).reshape(-1)[b]), float(np.asarray(b2).reshape(-1)[b])
        if machine == "IS":
            flat = imgs.reshape(len(imgs), -1)
            out[b] = softmax_average(x[b].ravel(), flat, flat, ab, bb).reshape(C, H, W)
            continue
        r = k // 2
        for i in range(Hq):
            for j in range(Wq):
                keys, cents = [], []
                if machine == "LS":
                    q = pad_patch(x[b], i, j, k, "zeros")
                    positions = [(i, j)]
                    kmode = "zeros"
                elif machine == "ELS_circular":
                    q = pad_patch(x[b], i, j, k, "circular")
                    if wrapped:
                        positions = [(u, v) for u in range(H) for v in range(W)]
                        kmode = "circular"
                    else:
                        positions = [(u, v) for u in range(r, H - r) for v in range(r, W - r)]
                        kmode = "zeros"
                else:
                    q = pad_patch(x[b], i, j, k, "zeros")
                    s = sig(i, j, Hq, Wq, r)
                    positions = [(u, v) for u in range(H) for v in range(W) if sig(u, v, H, W, r) == s]
                    kmode = "zeros"
                assert positions, "no key with this signature"
                for img in imgs:
                    for (u, v) in positions:
                        keys.append(pad_patch(img, u, v, k, kmode))
                        cents.append(img[:, u, v])
                wij = np.tile(mask[i, j].ravel(), C) if per_pixel else weights
                out[b, :, i, j] = softmax_average(q, np.array(keys), np.array(cents), ab, bb, wij)
    return out
