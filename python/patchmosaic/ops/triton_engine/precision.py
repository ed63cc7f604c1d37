"""The split-precision arithmetic of the Triton kernels, emulated with torch on any device (no triton needed):
for the error budget (bench/triton_precision.py) and for tests that check the kernels against it.

Triton's interpreter computes every ``tl.dot`` in numpy float32 whatever ``input_precision`` says, so it cannot
show what TF32 tensor cores do. The kernels write the split out (kernels.py): ``hi`` = ``x`` rounded to TF32 (10
mantissa bits, to nearest, ties away from zero), ``lo`` = ``x - hi`` cut to TF32 (towards zero). Each TF32 x TF32
product is exact in float32, so what remains to model is the tensor core's accumulation; two models bracket it:

- ``"rn"``: each MMA instruction (8 products along the inner dimension) adds its exact products to the
  accumulator and rounds once to nearest;
- ``"rz"``: the same with the rounding towards zero (the truncation measured on NVIDIA tensor cores: Fasi,
  Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021), the worse of the two.

The products of a chunk of ``chunk`` inner elements are accumulated in the kernels' order (``lo_q hi_k`` over the
chunk, then ``hi_q lo_k``, then ``hi_q hi_k``) into a fresh accumulator, which is then added to the running float32
sum (rounded to nearest): so a tensor core's truncation accumulates over one chunk, not over the whole patch
(``flush=False`` models one accumulator carried through every chunk, as ``tl.dot(a, b, acc)`` chaining would do).
"""

from __future__ import annotations

import torch

MMA_K = 8  # inner elements of one TF32 MMA instruction (mma.m16n8k8 / wgmma k8)


def tf32_hi(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32: to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def tf32_cut(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) with its low 13 mantissa bits cleared (towards zero)."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


def split(x: torch.Tensor):
    """``(hi, lo)``: the kernels' two TF32 halves of a float32 tensor."""
    hi = tf32_hi(x)
    return hi, tf32_cut(x - hi)


def round_f32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """float64 ``x`` to float32, to nearest (``"rn"``) or towards zero (``"rz"``)."""
    y = x.to(torch.float32)
    if mode == "rn":
        return y
    over = y.double().abs() > x.abs()
    return torch.where(over, torch.nextafter(y, torch.zeros_like(y)), y)


def split_dot(q: torch.Tensor, k: torch.Tensor, mode: str = "rz", chunk: int = 32, flush: bool = True) -> torch.Tensor:
    """The kernels' ``q @ k.T`` in split precision (float32 ``(R, d)`` and ``(K, d)`` -> float32 ``(R, K)``) under the
    accumulation model ``mode`` (``"rn"`` or ``"rz"``, module docstring); ``mode="ieee"``: float32 products and
    sums rounded to nearest per MMA-sized group (what a SIMT float32 dot product does, for comparison)."""
    R, d = q.shape
    acc = torch.zeros((R, k.shape[0]), dtype=torch.float32, device=q.device)
    if mode == "ieee":
        for g0 in range(0, d, MMA_K):
            part = q[:, g0:g0 + MMA_K].double() @ k[:, g0:g0 + MMA_K].double().T
            acc = (acc.double() + part).to(torch.float32)
        return acc
    qh, ql = split(q)
    kh, kl = split(k)
    for c0 in range(0, d, chunk):
        c1 = min(d, c0 + chunk)
        run = torch.zeros_like(acc) if flush else acc
        for a, b in ((ql, kh), (qh, kl), (qh, kh)):
            for g0 in range(c0, c1, MMA_K):
                g1 = min(c1, g0 + MMA_K)
                part = a[:, g0:g1].double() @ b[:, g0:g1].double().T  # exact: TF32 products, 8 of them
                run = round_f32(run.double() + part, mode)
        acc = (acc.double() + run.double()).to(torch.float32) if flush else run
    return acc


def logits(q: torch.Tensor, k: torch.Tensor, a: float, s: float, mode: str = "rz", chunk: int = 32,
           flush: bool = True) -> torch.Tensor:
    """The kernels' shifted logits ``s (2 a q.k - a^2 |k|^2)`` in float32 (``|k|^2`` a float32 sum per chunk, as the
    kernel forms it)."""
    dot = split_dot(q, k, mode, chunk, flush)
    kn = torch.zeros(k.shape[0], dtype=torch.float32, device=k.device)
    for c0 in range(0, k.shape[1], chunk):
        kn = kn + (k[:, c0:c0 + chunk] * k[:, c0:c0 + chunk]).sum(dim=1)
    a32, s32 = torch.tensor(a, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    return s32 * (2 * a32 * dot - (a32 * a32) * kn[None, :])


def exact_logits(q: torch.Tensor, k: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """The same logits in float64 from the same float32 inputs (the reference of the error budget)."""
    qd, kd = q.double(), k.double()
    return s * (2 * a * (qd @ kd.T) - a * a * (kd * kd).sum(dim=1)[None, :])
