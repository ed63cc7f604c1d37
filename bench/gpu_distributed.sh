#!/usr/bin/env bash
# One device run for issue 18: key sharding over NCCL with 2 ranks on one GPU, checked against one process
# (bench/nccl_check.py: IS, LS, ELS zeros / circular / wrapped, labels, provenance, float32 and float64).
#
# On the device machine (tool `run`, nothing to carry, timeout about 420 s):
#     bash bench/gpu_distributed.sh
# Logs land in $OUT (or ./gpu_out without it); $OUT/summary.txt says in plain words which path ran:
#   1. NCCL, 2 ranks on the one GPU, as they are. NCCL (2.5 and later) normally refuses this with
#      "Duplicate GPU detected"; the log keeps its words.
#   2. NCCL, 2 ranks on the one GPU, each rank with its own NCCL_HOSTID: NCCL takes them for two hosts and
#      connects them with its socket transport over the loopback (a test set-up, not a way to run).
#   3. Fallback, when neither works: NCCL with 1 rank (the exchange through NCCL, no peer) and gloo with
#      2 ranks computing on the GPU.
# The exit status is 0 when one of the paths passed.
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PATCHMOSAIC_DIST_TIMEOUT=${PATCHMOSAIC_DIST_TIMEOUT:-60}
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
PATCHMOSAIC_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -Cbuild-dir=/tmp/pm-build \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90-real}" . 2>&1 | tail -20 | tee "$OUT/build.log" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
(cd /tmp && python3 -c "import torch, patchmosaic as pm; print('torch', torch.__version__, '| nccl',
'.'.join(map(str, torch.cuda.nccl.version())), '| gpus', torch.cuda.device_count(), '| cuda engine',
pm.cuda_available())") 2>&1 | tee -a "$OUT/build.log"

# check NAME NPROC ARGS...: bench/nccl_check.py on NPROC ranks; its result line on stdout, its log and
# per-rank JSON under $OUT/NAME; the status of torchrun
check() {
  local name=$1 n=$2
  shift 2
  mkdir -p "$OUT/$name"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/nccl_check.py \
    --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h "^NCCL_CHECK" "$OUT/$name.log" | grep -v "FAIL rank" | tail -1
  (( rc == 124 )) && echo "NCCL_CHECK FAIL $name: no answer within 150 s (killed)"
  return $rc
}

path="none: every path failed (see the logs)"
status=1
echo "== 1. NCCL, 2 ranks on one GPU, as they are" | tee "$OUT/summary.txt"
if NCCL_DEBUG=WARN check nccl2_plain 2 --backend nccl | tee -a "$OUT/summary.txt"; then
  path="1: NCCL with 2 ranks on one GPU, as they are"
  status=0
else
  refused=$(grep -ho "Duplicate GPU detected[^|\"]*" "$OUT/nccl2_plain.log" | head -1)
  echo "   refused: ${refused:-see nccl2_plain.log}" | tee -a "$OUT/summary.txt"
  echo "== 2. NCCL, 2 ranks on one GPU, NCCL_HOSTID per rank (sockets over lo)" | tee -a "$OUT/summary.txt"
  if NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \
     NCCL_NVLS_ENABLE=0 NCCL_MNNVL_ENABLE=0 check nccl2_hostid 2 --backend nccl --hostid-per-rank \
     | tee -a "$OUT/summary.txt"; then
    path="2: NCCL with 2 ranks on one GPU, each with its own NCCL_HOSTID (socket transport over lo)"
    status=0
    grep -h "via NET\|NET/Socket : Using" "$OUT/nccl2_hostid.log" | head -3 | tee -a "$OUT/summary.txt"
  else
    echo "== 3. fallback: NCCL with 1 rank, gloo with 2 ranks on the GPU" | tee -a "$OUT/summary.txt"
    NCCL_DEBUG=WARN check nccl1 1 --backend nccl | tee -a "$OUT/summary.txt"
    r1=$?
    check gloo2_gpu 2 --backend gloo | tee -a "$OUT/summary.txt"
    r2=$?
    if (( r1 == 0 && r2 == 0 )); then
      path="3 (fallback): NCCL with 1 rank only (no peer: two ranks on one GPU failed) + gloo with 2 ranks on the GPU"
      status=0
    fi
  fi
fi
echo "PATH: $path" | tee -a "$OUT/summary.txt"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
exit $status
