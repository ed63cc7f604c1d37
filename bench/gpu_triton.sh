#!/usr/bin/env bash
# One device run for issue 26 (the Triton engine), within 8 minutes: install, autotune, time (bench/gpu_triton.py:
# the Triton engine against the CUDA engine, float32 attention and bfloat16 FlashAttention on the same work, 60,000
# MNIST, boundary-aware and periodic ELS, k = 3, 7, 11, B = 1 and 16, CIFAR-10 C = 3; backward pass; the 20-step
# 16-seed calibrated sample; the measured table of backend="auto"), then the Triton engine's GPU tests.
#
# Here (once per session), copy the data the run needs into an ignored, carried folder (40 MB):
#     mkdir -p .gpu/data && cp ../shared/data/mnist.npz ../shared/data/cifar10_10k.npz .gpu/data/ \
#       && (grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude)
# then on the device machine (tool `run`, carry [".gpu"], timeout_s 590):
#     bash bench/gpu_triton.sh
# Everything lands in $OUT (or ./gpu_out without it): gpu.txt, build.log, bench.log, gpu_triton.json,
# auto_table.json (copy it to python/patchmosaic/ops/triton_engine/auto_table.json to make auto use it), tests.log.
# The device image has triton 3.6 and torch 2.11 (compiled kernels need triton >= 3; tests/triton_aot.py compiled
# every kernel for sm_90 with triton 3.6 and 3.9 beforehand, without a GPU).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATCHMOSAIC_SHARED="$PWD/.gpu" TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt" \
  || { echo "no triton on the device: carry a wheel (bench/gpu_triton.sh header)"; exit 1; }
# 1. install, with the CUDA engine (the comparison, and the Triton engine's backward pass), for this GPU only
arch=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}-real')")
PATCHMOSAIC_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch" python3 -m pip install --no-build-isolation --no-deps -q \
  -Cbuild-dir=/tmp/pm-build . 2>&1 | tail -20 | tee "$OUT/build.log" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
# 2. autotune and time (each phase saved as it finishes)
timeout $(left 330) python3 bench/gpu_triton.py --json "$OUT/gpu_triton.json" --auto-table "$OUT/auto_table.json" \
  2>&1 | grep -v "UserWarning\|warn_once" | tee "$OUT/bench.log"
# 3. the Triton engine's tests on the GPU, with one fixed tile configuration (no autotuning of each small shape);
#    the interpreter runs them on every CPU machine
t=$(left 470)
if (( t > 30 )); then
  (cd /tmp && PATCHMOSAIC_TRITON_AUTOTUNE=0 timeout $t python3 -m pytest -q -p no:cacheprovider -rs -x \
    "$OLDPWD/tests/test_triton.py" "$OLDPWD/tests/test_exactness.py" "$OLDPWD/tests/test_gradients.py" \
    "$OLDPWD/tests/test_masks.py" "$OLDPWD/tests/test_multi_k.py" -k "triton and not hopper" 2>&1 | tail -30 | tee "$OUT/tests.log")
fi
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.log"
