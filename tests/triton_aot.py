"""Compile the Triton engine's kernels ahead of time for NVIDIA GPUs, without one (Triton's own compiler and the
ptxas it ships): ``python tests/triton_aot.py SM [SM ...]`` prints one JSON line per kernel and configuration with
its registers, stack (spills), shared memory and compile time, and exits 1 if one fails. Run by test_triton.py in a
subprocess (the test process runs Triton's interpreter, whose kernels cannot be compiled); also useful before a GPU
run, to see what the autotuner will try."""

import json
import os
import re
import subprocess
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from patchmosaic.ops.triton_engine import kernels as K  # noqa: E402

LOCAL = dict(train="*fp32", q_hi="*fp32", q_lo="*fp32", row_b="*i32", coef_a="*fp32", coef_s="*fp32", items="*i64",
             cls_kpos="*i32", grp_img="*i32", elem_ch="*i32", elem_dr="*i32", elem_dc="*i32", elem_scale="*fp32",
             part_m="*fp32", part_s="*fp64", part_acc="*fp64", part_key="*i64", skipped="*i32", C="i32", H="i32",
             W="i32")
QUERY = dict(query="*fp32", row_b="*i32", row_pix="*i32", row_elem="*i64", q_hi="*fp32", q_lo="*fp32",
             elem_ch="*i32", elem_dr="*i32", elem_dc="*i32", elem_scale="*fp32", n_rows="i32", C="i32", Hq="i32",
             Wq="i32")
IDEAL = dict(train="*fp32", query="*fp32", row_b="*i32", coef_a="*fp32", coef_s="*fp64", items="*i64",
             grp_img="*i32", logits="*fp64", D="i32", n_cols="i32")
FLAGS = dict(CIRCULAR=False, SCALED=False, SPLIT=True, SKIP=True, COUNT=False, PROVENANCE=False)
# (kernel, signature, constexprs, warps, stages): a resident and a chunked query tile, C = 1 and 3, every switch
CONFIGS = [
    (K.local_softmax_kernel, LOCAL, dict(FLAGS, D_PAD=64, C_PAD=1, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64), 8, 2),
    (K.local_softmax_kernel, LOCAL, dict(FLAGS, D_PAD=16, C_PAD=1, BLOCK_M=128, BLOCK_N=128, BLOCK_D=16), 8, 3),
    (K.local_softmax_kernel, LOCAL, dict(FLAGS, D_PAD=192, C_PAD=4, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, CIRCULAR=True,
                                         SCALED=True, PROVENANCE=True, COUNT=True), 8, 2),
    (K.local_softmax_kernel, LOCAL, dict(FLAGS, D_PAD=128, C_PAD=1, BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, SPLIT=False,
                                         SKIP=False), 4, 2),
    (K.query_patches_kernel, QUERY, dict(D_PAD=64, CIRCULAR=True, SCALED=True, SPLIT=True, BLOCK_R=32, BLOCK_D=64), 4, 2),
    (K.ideal_logits_kernel, IDEAL, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32), 4, 2),
]


def usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/patchmosaic_aot_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups()))) if m else {}


def main(sms):
    ok = True
    for sm in sms:
        for fn, sig, const, warps, stages in CONFIGS:
            s = dict(sig, **{k: "constexpr" for k in const})
            src = ASTSource(fn=fn, signature=s, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            t0 = time.time()
            row = dict(sm=sm, kernel=fn.__name__, warps=warps, stages=stages, **const)
            try:
                ck = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=dict(num_warps=warps,
                                                                                        num_stages=stages))
                row.update(shared=ck.metadata.shared, seconds=round(time.time() - t0, 1), **usage(ck.asm["cubin"]))
            except Exception as e:  # noqa: BLE001  (report every failure, then fail)
                ok = False
                row["error"] = repr(e)[:400]
            print(json.dumps(row), flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(0 if main([int(a) for a in sys.argv[1:]] or [90]) else 1)
