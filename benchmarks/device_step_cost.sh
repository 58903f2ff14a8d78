#!/usr/bin/env bash
# One device run: sCT/sCD step cost vs the diffusion step on a GPU (CIFAR-10 preset network, and the
# ImageNet-64 network at EDM2-S width), both jvp modes. Logs go to $OUT.
#   OUT=/tmp/out bash benchmarks/device_step_cost.sh
set -u -o pipefail
OUT=${OUT:-/tmp/step_cost_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
run() { echo "== $*"; timeout 150 $PY benchmarks/train_step.py --device cuda --threads 8 --steps 8 --warmup 3 "$@" 2>&1; }
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  run --preset cifar10 --batch 128
  run --preset cifar10 --batch 128 --methods diffusion,sct --set loss.jvp_mode=separate
  run --preset imagenet64 --batch 32 --set network.model_channels=192 --methods diffusion,sct
} | tee "$OUT/step_cost.log"
