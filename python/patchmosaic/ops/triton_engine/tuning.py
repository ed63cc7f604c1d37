"""Tile sizes of the Triton engine: Triton's autotuner on a GPU, fixed small tiles under the interpreter, and the
host's own choices (rows per tile, keys per work item). ``settings`` holds the knobs tests and benchmarks turn.

On a GPU the local kernel is wrapped in ``triton.autotune`` over key-tile width ``BLOCK_N``, patch-chunk width
``BLOCK_D``, warps and pipeline stages (configurations whose ``BLOCK_D`` does not divide the padded patch length
are pruned), keyed by the padded patch length, channels, rows per tile and the kernel's switches: the first call
of each kind times every configuration on the real arguments (a few seconds; the kernel only writes its own
partial states, so the trials are harmless), later calls reuse the winner. Rows per tile (``BLOCK_M``) and the
split of the keys into work items are the host's (the plan depends on them): ``BLOCK_M`` is 64 or 128, and the keys
are split so that there are about ``items_per_sm`` items per multiprocessor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Settings:
    """Knobs of the Triton engine (module-level ``settings``; tests and benchmarks change them).

    Attributes:
        split: split-precision products (tf32x3, default) or plain float32 ones (``False``: ``input_precision
            "ieee"``, no tensor cores; for comparisons).
        skip: skip the exponentials of key tiles that cannot count (default True).
        count: make the kernel count skipped key tiles into ``last_counts`` (default False).
        block_m: rows per tile (None: 64 under the interpreter; on a GPU 64, or 128 when the call has enough rows).
        block_n, block_d: key-tile width and patch-chunk width under the interpreter (on a GPU: the autotuner's);
            ``block_d`` None: the whole padded patch in one chunk. The interpreter's cost is per operation, not
            per element, so its default tiles are large (64 rows, 128 keys, the whole patch); the tests of tiling,
            splits and chunks set small ones.
        keys_per_item: keys per work item (None: all of a tile's keys under the interpreter; on a GPU about
            ``items_per_sm`` items per multiprocessor).
        items_per_sm: the GPU's split target (default 4).
        autotune: on a GPU, let Triton's autotuner choose ``BLOCK_N``, ``BLOCK_D``, warps and stages (default; the
            first call of each kind compiles and times every configuration, about 1-2 s each); False, or
            ``PATCHMOSAIC_TRITON_AUTOTUNE=0``: the single configuration ``fixed`` (the GPU tests use it: their
            many small shapes would each be tuned).
        fixed: that configuration: ``(BLOCK_N, BLOCK_D or None for min(D_PAD, 64), num_warps, num_stages)``.
    """

    split: bool = True
    skip: bool = True
    count: bool = False
    block_m: Optional[int] = None
    block_n: int = 128
    block_d: Optional[int] = None
    keys_per_item: Optional[int] = None
    items_per_sm: int = 4
    autotune: bool = field(default_factory=lambda: os.environ.get("PATCHMOSAIC_TRITON_AUTOTUNE", "1") != "0")
    fixed: tuple = (64, None, 8, 2)


settings = Settings()
last_counts = {}  # filled by the local kernel when settings.count: key tiles, skipped key tiles


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def d_pad(n_elem: int, interpreted: bool = False) -> int:
    """The padded patch length: a power of two (at least 16) up to 128, then a multiple of 64 (under the
    interpreter always a power of two: one chunk costs it as little as a smaller one)."""
    if n_elem <= 128 or interpreted:
        return max(16, next_pow2(n_elem))
    return -(-int(n_elem) // 64) * 64


def block_m(n_rows_largest_segment: int, interpreted: bool) -> int:
    if settings.block_m is not None:
        return int(settings.block_m)
    if interpreted:
        return 64
    return 128 if n_rows_largest_segment >= 4 * 128 else 64


def keys_per_item(total_tile_keys: int, n_tiles: int, device: torch.device, interpreted: bool) -> int:
    """Keys per work item: ``settings.keys_per_item``, else (interpreter) no split, else enough items for
    ``items_per_sm`` per multiprocessor, at least 2048 keys each, a multiple of 256 (any key-tile width)."""
    if settings.keys_per_item is not None:
        return max(1, int(settings.keys_per_item))
    if interpreted or device.type != "cuda":
        return 1 << 62
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = max(1, settings.items_per_sm * sms)
    per = max(2048, -(-int(total_tile_keys) // target))
    return -(-per // 256) * 256


def gpu_configs():
    """The autotuner's configurations: key tiles of 64 or 128 keys, 4 or 8 warps, 2 pipeline stages, patch chunks of
    16 to 64 elements (pruned to one per shape); with ``PATCHMOSAIC_TRITON_WIDE_TUNE=1`` also 32-key tiles, 3 stages
    and 32-element chunks of long patches (a longer first call: each configuration compiles in 1-3 s)."""
    import triton

    wide = os.environ.get("PATCHMOSAIC_TRITON_WIDE_TUNE", "0") == "1"
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
            for bn in ((32, 64, 128) if wide else (64, 128)) for bd in (16, 32, 64) for warps in (4, 8)
            for stages in ((2, 3) if wide else (2,))]


def prune(configs, named_args, **kw):
    """Keep the configurations whose patch chunk is the whole padded patch up to 64 elements (the query tile then
    stays in registers), else 64 elements (32 too with the wide search); at most 128 x 64 logits per program with
    4 warps, 128 x 128 with 8. Compiled for sm_90 these use up to 255 registers a thread (tests/triton_aot.py)."""
    dp = int(kw.get("D_PAD", named_args.get("D_PAD")))
    bm = int(kw.get("BLOCK_M", named_args.get("BLOCK_M")))
    wide = os.environ.get("PATCHMOSAIC_TRITON_WIDE_TUNE", "0") == "1"
    want = (dp,) if dp <= 64 else ((32, 64) if wide else (64,))
    keep = [c for c in configs if c.kwargs["BLOCK_D"] in want and dp % c.kwargs["BLOCK_D"] == 0
            and bm * c.kwargs["BLOCK_N"] <= (128 * 128 if c.num_warps == 8 else 128 * 64)]
    return keep or configs[:1]


_tuned = None


def local_kernel(interpreted: bool):
    """``(kernel, extra launch arguments)``: the raw kernel under the interpreter (tiles from ``settings``), the
    autotuned one on a GPU, or with ``settings.autotune`` off the raw kernel with the ``fixed`` configuration."""
    from . import kernels

    if interpreted:
        return kernels.local_softmax_kernel, None
    if not settings.autotune:
        return kernels.local_softmax_kernel, settings.fixed
    global _tuned
    if _tuned is None:
        import triton

        _tuned = triton.autotune(configs=gpu_configs(), key=["D_PAD", "C_PAD", "BLOCK_M", "CIRCULAR", "SCALED",
                                                              "SPLIT", "SKIP", "PROVENANCE"],
                                 prune_configs_by={"early_config_prune": prune})(kernels.local_softmax_kernel)
    return _tuned, None
