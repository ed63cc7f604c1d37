#!/usr/bin/env bash
# The device run of issue 17: the three MNIST rows of the paper's table (mnist_resnet_zeros,
# mnist_resnet_circular with interior and wrapped keys, mnist_unet_zeros; all 60,000 training images) end
# to end on one GPU: build with the CUDA engine, time estimate, calibration, comparison, figures.
#
# Here (once per session), copy what the run reads into an ignored, carried folder:
#     mkdir -p .gpu/data .gpu/paper .gpu/models && cp ../shared/data/mnist.npz .gpu/data/ && \
#     cp ../shared/paper/results.json .gpu/paper/ && cp -r ../shared/models/mnist_* .gpu/models/ && \
#     (grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude)
# then on the device machine (tool `run`, carry [".gpu"], timeout about 590 s):
#     bash bench/gpu_reproduce.sh
# Everything lands in $OUT (or ./gpu_out): build.log, reproduce.log, table.md and reproduce.tar.gz (per
# network: report.json, stages.json, calibration_*.json, grid/scatter/kschedule.png); unpack the tarball
# into bench/results/ here to merge the rows into the table.
#
# The same script proves itself on a CPU at reduced size (no build, the installed package):
#     DEVICE=cpu LIMIT=500 SEEDS=8 CALIB_SEEDS=2 SKIP_BUILD=1 KEEP_RESULTS=1 BUDGET_S=36000 \
#         OUT=bench/results/gpu_reproduce_cpu bash bench/gpu_reproduce.sh
set -o pipefail
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
[ -d .gpu/models ] && export PATCHMOSAIC_SHARED="$PWD/.gpu"
start=$(date +%s)
if [ -z "$SKIP_BUILD" ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
  PATCHMOSAIC_CUDA=ON CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90-real} python3 -m pip install --no-build-isolation \
    --no-deps -q -Cbuild-dir=/tmp/pm-build . 2>&1 | tail -20 | tee "$OUT/build.log" || exit 1
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
fi
python3 -c "import patchmosaic as pm; print('patchmosaic', pm.__version__, 'cuda available:', pm.ops.cuda_available())" \
  | tee -a "$OUT/build.log"
args=(--networks mnist_resnet_zeros mnist_resnet_circular mnist_unet_zeros --device "$DEVICE"
      --seeds "${SEEDS:-32}" --calib-seeds "${CALIB_SEEDS:-8}" --out "$OUT/reproduce" --md "$OUT/table.md"
      --block reproduce-mnist --also --quiet)
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
# what is left of the 10-minute command after the build (and a margin to pack the results)
left=$(( ${BUDGET_S:-580} - ($(date +%s) - start) - 20 ))
(cd "$(dirname "$0")/.." && timeout "$left" python3 bench/reproduce.py "${args[@]}") 2>&1 | tee "$OUT/reproduce.log"
echo "exit: $? (124: stopped at the time limit; rerun the same command to resume)" | tee -a "$OUT/reproduce.log"
# one tarball comes back (at most 8 files do); the folder itself, with the state files, stays for a rerun to resume
# (KEEP_RESULTS=1) or moves out of $OUT
(cd "$OUT" && tar czf reproduce.tar.gz --exclude='*.npz' reproduce && { [ -n "$KEEP_RESULTS" ] || mv reproduce "/tmp/reproduce.$$"; })
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/reproduce.log"
