#!/usr/bin/env bash
# The figures of bench/RESULTS.md, section "CPU engine": about 45 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results
python cpu_engine.py --data mnist --n-train 60000 --batch 1,8 --ks 3,5,7,11,15 --machines els_zeros,els_circular \
  --json results/cpu_engine_mnist.json
python cpu_engine.py --data cifar10 --n-train 10000 --batch 1,8 --ks 5,11 --machines els_zeros,els_circular \
  --json results/cpu_engine_cifar10.json
