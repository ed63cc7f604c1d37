#!/usr/bin/env bash
# One device run for issue 7: build with the CUDA engine, run the GPU tests, time the engine.
#
# Here (once per session), copy the data the run needs into an ignored, carried folder:
#     mkdir -p .gpu/data && cp ../shared/data/mnist.npz .gpu/data/ && (grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude)
# then on the device machine (tool `run`, carry [".gpu"], timeout about 540 s):
#     bash bench/gpu_check.sh
# Logs and bench/results/gpu_engine.json land in $OUT (or ./gpu_out without it).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATCHMOSAIC_SHARED="$PWD/.gpu"  # .gpu/data/mnist.npz, carried
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
start=$(date +%s)
PATCHMOSAIC_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -Cbuild-dir=/tmp/pm-build . 2>&1 | tail -20 | tee "$OUT/build.log" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
python3 -c "import patchmosaic as pm; print('cuda available:', pm.cuda_available())" | tee -a "$OUT/build.log"
# the GPU parameter of the engine tests (their emulated twins run in CI, not here)
cd /tmp && timeout 240 python3 -m pytest -q -p no:cacheprovider -rs -k "not emulated" "$OLDPWD/tests/test_cuda.py" \
  "$OLDPWD/tests/test_validation.py" 2>&1 | tail -40 | tee "$OUT/tests.log"
cd "$OLDPWD"
timeout 300 python3 bench/gpu_engine.py --json "$OUT/gpu_engine.json" 2>&1 | tee "$OUT/bench.log"
# out-of-bounds reads / writes and races in the kernels, on a few small cases, if time is left
if (( $(date +%s) - start < 420 )) && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    (cd /tmp && timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
      "$OLDPWD/tests/test_cuda.py" -k "gpu and (float32_matches_oracle and 7 or resident_or_gathered and 1-7)" 2>&1 | tail -15 | tee "$OUT/sanitizer_$tool.log")
  done
fi
echo "total: $(( $(date +%s) - start )) s"
