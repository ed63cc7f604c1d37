#!/usr/bin/env bash
# The README's high-resolution pictures, made with the command line (CPU, about 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
# 16 crops of 64x64 from each 512x512 texture as the training set; a 256x256 canvas. Bricks need a
# larger patch than gravel and grass to draw their long mortar lines; k stays >= 7 at the end so that
# the position map shows which regions were copied together (at k = 3 every pixel picks its own winner).
patchmosaic sample --data skimage:brick --crop 64 --stride 128 --canvas 256x256 --k ramp:41:9 \
    --provenance position --n 1 --steps 20 --seed 1 --out texture_brick.png --quiet
for tex in grass gravel; do
  patchmosaic sample --data skimage:$tex --crop 64 --stride 128 --canvas 256x256 --k ramp:25:7 \
      --provenance position --n 1 --steps 20 --seed 1 --out texture_$tex.png --quiet
done
# 128x128 canvas from 200 CIFAR-10 horses (class 7), class-conditional boundary-aware ELS
patchmosaic sample --data ../../shared/data/cifar10_10k.npz --classes 7 --limit 200 --labels 7 \
    --canvas 128x128 --k paper:CIFAR10_ResNet_zeros_conditional --n 2 --steps 20 --seed 0 \
    --out cifar10_horses_128.png --quiet
